"""Freezing named parts of a tokenizer for fine-tuning (`train.freeze: [encoder, quantizer]`).

A tokenizer's parts are named as in taming/diffusers: encoder, quant_conv, quantizer (alias
codebook), post_quant_conv, decoder; freezing encoder and quantizer freezes quant_conv, between
them, too (`[encoder, quantizer]` is decoder-only fine-tuning: the codes stay the same). A model class may say which of its modules make up each
part with a class attribute `freezable_parts = {"encoder": ("encoder_bottom", ...), ...}`;
otherwise each part is the attribute of that name, where the model has one.

A frozen part's parameters get `requires_grad=False` (so the optimizer and DDP never see them)
and the part stays in eval mode while the rest trains (`frozen_modules`, applied by the training
step): every quantizer learns only in train mode (EMA codebooks, k-means init, dead-code
restarts, LFQ's projection init), so a frozen quantizer's buffers never change either.

`code_parts_sha256` hashes the weights the codes depend on (encoder, quant_conv, quantizer):
two models with the same hash give the same codes, so a store made by one decodes with the other.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch import nn

from tokenmill.models.errors import UserError

PARTS = ("encoder", "quant_conv", "quantizer", "post_quant_conv", "decoder")
ALIASES = {"codebook": "quantizer"}
CODE_PARTS = ("encoder", "quant_conv", "quantizer")  # what the codes depend on


def model_parts(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Part name -> the attribute names of `model`'s modules that make it up (parts it lacks omitted)."""
    declared = getattr(type(model), "freezable_parts", None)
    if declared is not None:
        return {name: tuple(modules) for name, modules in declared.items()}
    return {name: (name,) for name in PARTS if isinstance(getattr(model, name, None), nn.Module)}


def canonical_parts(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    """`names` checked against `model`'s parts (aliases resolved), in PARTS order; UserError
    naming the valid ones otherwise."""
    parts = model_parts(model)
    resolved = {ALIASES.get(name, name) for name in names}
    unknown = sorted(name for name in names if ALIASES.get(name, name) not in parts)
    if unknown:
        valid = [p for p in PARTS if p in parts] + [a for a, p in ALIASES.items() if p in parts]
        raise UserError(f"train.freeze {unknown}: {type(model).__name__} has no such part; "
                        f"valid: {', '.join(valid) or 'none (this model cannot be partly frozen)'}")
    if {"encoder", "quantizer"} <= resolved:  # quant_conv maps one into the other: frozen with them, or the codes move
        resolved.add("quant_conv")
    return tuple(p for p in PARTS if p in resolved and p in parts)


def freeze(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    """Freeze `names` of `model` (see the module doc); returns the canonical part names, also
    kept as `model.frozen_parts`. UserError when a name is wrong or nothing would be left to train."""
    parts = canonical_parts(model, names)
    for module in _modules(model, parts):
        module.requires_grad_(False)
    model.frozen_parts = parts
    if parts and not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"train.freeze {list(parts)} freezes every parameter of {type(model).__name__}; "
                        "leave at least one part to train")
    return parts


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model`'s frozen parts (empty when none): the training step keeps them in eval mode."""
    return _modules(model, getattr(model, "frozen_parts", ()))


def code_parts_sha256(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor (weights and buffers) of
    the parts the codes depend on, in name order."""
    prefixes = tuple(f"{attr}." for part in CODE_PARTS for attr in model_parts(model).get(part, ()))
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if key.startswith(prefixes):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{key}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d tensors too
    return digest.hexdigest()


def freezes_codes(parts: Iterable[str], model: nn.Module) -> bool:
    """True when `parts` cover every code part `model` has: training then leaves its codes unchanged."""
    present = [p for p in CODE_PARTS if p in model_parts(model)]
    return bool(present) and set(present) <= set(parts)


def reproduces_codes_of(lineage: dict, model: nn.Module, weights_sha256: str) -> bool:
    """True when `model`, whose fine-tuning lineage (config.json `extra.lineage`) is `lineage`,
    reproduces the codes of the model whose weights hash to `weights_sha256`: that one is among
    its `same_codes_as` and its code parts still hash to the recorded `code_parts_sha256`."""
    return weights_sha256 in lineage.get("same_codes_as", []) and \
        lineage.get("code_parts_sha256") == code_parts_sha256(model)


def _modules(model: nn.Module, parts: Iterable[str]) -> list[nn.Module]:
    mapping = model_parts(model)
    return [getattr(model, attr) for part in parts for attr in mapping[part]]


__all__ = ["CODE_PARTS", "PARTS", "canonical_parts", "code_parts_sha256", "freeze", "freezes_codes",
           "frozen_modules", "model_parts", "reproduces_codes_of"]
