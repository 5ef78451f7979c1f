"""`taming:LOCATION`: a taming-transformers VQGAN (`taming.models.vqgan.VQModel`) as a tokenmill `VQGAN`.

LOCATION is one of
  - a taming log folder (how the released checkpoints ship): `checkpoints/last.ckpt` (or its one
    `.ckpt`) and `configs/*.yaml`;
  - a `.ckpt` file, its YAML beside it or in `../configs/`;
  - `CKPT,YAML`.
Several YAML files are merged in name order, as taming's `main.py` does when it resumes a log
folder (`*-project.yaml`, `*-lightning.yaml`); the `model` section is read.

The translation: taming's Encoder/Decoder are tokenmill's with `asymmetric_downsample` (taming pads
right and bottom) and `z_channels` (its 1x1 `quant_conv`/`post_quant_conv`); attention at the
lowest resolution and in the middle blocks. Its quantizer (VectorQuantizer, VectorQuantizer2 with
`legacy=True`, remap None) is tokenmill's `vq` with a learned codebook (no EMA, no k-means, no
restarts) and its loss ‖sg(e) − z‖² + 0.25·‖e − sg(z)‖²: beta 1.0, codebook_weight 0.25.
Dropout (0 in the released configs) applies only to training and is not carried over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tokenmill.models.converters.checkpoint import Converted, KeyPlan, file_sha256, load_checkpoint, load_mapped
from tokenmill.models.errors import UserError
from tokenmill.models.quantizers import QuantizerConfig
from tokenmill.models.vqgan import VQGAN, AttnBlock, ResBlock, VQGANConfig

TARGET = "taming.models.vqgan.VQModel"
FIX = "pass the YAML the checkpoint was trained with: taming:CKPT,YAML"
# tokenmill sub-module -> taming's, in a ResBlock and an AttnBlock (whose fused qkv is taming's q, k, v)
RESBLOCK = {"block.0": "norm1", "block.2": "conv1", "block.3": "norm2", "block.5": "conv2", "shortcut": "nin_shortcut"}
ATTENTION = {"norm": ("norm",), "qkv": ("q", "k", "v"), "proj": ("proj_out",)}


def convert(location: str, ref: str) -> Converted:
    ckpt, yamls = locate(location, ref)
    params = model_params(yamls, ref)
    model = translate(params, ref)
    load_mapped(model, state_dict(ckpt, ref), key_plan(model), ref, FIX, ignored=("loss.",))
    source = {"kind": "taming", "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt),
              "config": [str(p.resolve()) for p in yamls], "config_sha256": [file_sha256(p) for p in yamls]}
    return Converted(model.eval(), source)


# -- where the checkpoint and its config are ------------------------------------------------------

def locate(location: str, ref: str) -> tuple[Path, list[Path]]:
    """(checkpoint, YAML files in merge order)."""
    if "," in location:
        ckpt, config = (Path(p) for p in location.split(",", 1))
        for path in (ckpt, config):
            if not path.is_file():
                raise UserError(f"{ref}: {path} does not exist; check the path")
        return ckpt, [config]
    path = Path(location)
    if path.is_dir():
        ckpt = _folder_checkpoint(path, ref)
        config_dirs = [path / "configs", path]
    elif path.is_file():
        ckpt, config_dirs = path, [path.parent, path.parent.parent / "configs"]
    else:
        raise UserError(f"{ref}: {path} does not exist; give a taming log folder, a .ckpt with its YAML "
                        "beside it, or taming:CKPT,YAML")
    for folder in config_dirs:
        yamls = sorted(folder.glob("*.yaml"))
        if yamls:
            return ckpt, yamls
    raise UserError(f"{ref}: no YAML config found for {ckpt} (looked in {' and '.join(map(str, config_dirs))}); "
                    f"{FIX}")


def _folder_checkpoint(folder: Path, ref: str) -> Path:
    """`checkpoints/last.ckpt`, `last.ckpt`, else the folder's (or checkpoints/') only .ckpt."""
    for candidate in (folder / "checkpoints" / "last.ckpt", folder / "last.ckpt"):
        if candidate.is_file():
            return candidate
    found = sorted(folder.glob("*.ckpt")) or sorted(folder.glob("checkpoints/*.ckpt"))
    if len(found) != 1:
        raise UserError(f"{ref}: expected one .ckpt in {folder} or {folder / 'checkpoints'}, found {len(found)}; "
                        "name the checkpoint: taming:CKPT or taming:CKPT,YAML")
    return found[0]


# -- the config -------------------------------------------------------------------------------------

def model_params(yamls: list[Path], ref: str) -> dict[str, Any]:
    """`model.params` of the merged YAML files; UserError unless the model is a taming VQModel."""
    merged: dict[str, Any] = {}
    for path in yamls:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"{ref}: {path} is not valid YAML ({str(err).splitlines()[0]}); {FIX}") from None
        merged = _merge(merged, loaded if isinstance(loaded, dict) else {})
    model = merged.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise UserError(f"{ref}: {', '.join(map(str, yamls))} has no `model.params` section; {FIX}")
    if model.get("target") != TARGET:
        raise UserError(f"{ref}: the config's model is {model.get('target')!r}; taming: converts {TARGET} "
                        "(VQGAN first stages with VectorQuantizer) only")
    if model["params"].get("remap") is not None:
        raise UserError(f"{ref}: the quantizer remaps its codes (remap: {model['params']['remap']}); "
                        "taming: converts models with remap None only")
    return model["params"]


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (OmegaConf.merge for plain YAML)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def translate(params: dict[str, Any], ref: str) -> VQGAN:
    """taming's VQModel params (ddconfig, embed_dim, n_embed) -> a fresh tokenmill VQGAN of that layout."""
    dd = params.get("ddconfig") or {}
    required = ["ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels", "in_channels"]
    absent = [k for k in ("embed_dim", "n_embed") if k not in params] + [f"ddconfig.{k}" for k in required]
    absent = [k for k in absent if k.removeprefix("ddconfig.") not in (dd if k.startswith("ddconfig.") else params)]
    if absent:
        raise UserError(f"{ref}: the config's model.params lacks {', '.join(absent)}; {FIX}")
    try:
        _check_layout(dd, ref)
        quantizer = QuantizerConfig(kind="vq", codebook_size=params["n_embed"], beta=1.0, codebook_weight=0.25,
                                    ema=False, kmeans_init=False, dead_code_threshold=0.0)
        return VQGAN(VQGANConfig(
            in_channels=dd["in_channels"], image_size=dd["resolution"], base_channels=dd["ch"],
            channel_mult=tuple(dd["ch_mult"]), res_blocks=dd["num_res_blocks"], attention=True,
            latent_dim=params["embed_dim"], z_channels=dd["z_channels"], asymmetric_downsample=True,
            recon_loss="l1", quantizer=quantizer))
    except (TypeError, ValueError) as err:  # values of the wrong type or out of range
        raise UserError(f"{ref}: the config does not give a tokenmill VQGAN ({err}); {FIX}") from None


def _check_layout(dd: dict[str, Any], ref: str) -> None:
    """UserError for ddconfig options whose layout tokenmill's VQGAN does not have."""
    levels = len(dd["ch_mult"])
    lowest = dd["resolution"] // 2 ** (levels - 1)
    attended = {dd["resolution"] // 2**i for i in range(levels)} & set(dd["attn_resolutions"])
    unsupported = {
        "double_z": dd.get("double_z", True) is not False,  # taming's VQGAN configs all set it False
        "out_ch": dd.get("out_ch", dd["in_channels"]) != dd["in_channels"],
        "resamp_with_conv": dd.get("resamp_with_conv", True) is not True,
        "give_pre_end": bool(dd.get("give_pre_end", False)),
        "attn_resolutions": attended != {lowest},
    }
    if any(unsupported.values()):
        names = ", ".join(f"ddconfig.{k}: {dd.get(k)}" for k, bad in unsupported.items() if bad)
        raise UserError(f"{ref}: {names} is not a VQGAN layout tokenmill converts (double_z false, out_ch = "
                        f"in_channels, resampling convs, attention at the lowest resolution {lowest} only)")


# -- the weights ------------------------------------------------------------------------------------

def state_dict(ckpt: Path, ref: str) -> dict[str, Any]:
    """The Lightning checkpoint's `state_dict` (a bare state dict is taken as it is)."""
    loaded = load_checkpoint(ckpt, ref)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not any(str(k).startswith("encoder.") for k in state):
        keys = sorted(map(str, loaded))[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise UserError(f"{ref}: {ckpt} is not a taming VQGAN checkpoint (no `state_dict` with encoder weights; "
                        f"found {keys}); taming: reads taming-transformers' .ckpt files")
    return state


def key_plan(model: VQGAN) -> KeyPlan:
    """tokenmill key -> taming key(s)."""
    levels, blocks = len(model.config.channel_mult), model.config.res_blocks
    return module_plan(model, {"encoder": _encoder_names(levels, blocks), "decoder": _decoder_names(levels, blocks)})


def module_plan(model: VQGAN, modules: dict[str, list[str]], codebook: bool = True) -> KeyPlan:
    """tokenmill key -> source key(s) for a model of taming's modules (taming, LlamaGen, Open-MAGVIT2),
    given the source's names of the encoder's and decoder's modules with weights, in forward order:
    those are the Sequential children with weights, in the same order; within a block, parameters are
    renamed (q, k, v fused). With `codebook`, the codebook and the 1x1 convs have taming's names."""
    plan: KeyPlan = {"quantizer.embed": ("quantize.embedding.weight",)} if codebook else {}
    for name in ("quant_conv", "post_quant_conv") if codebook else ():
        plan |= {f"{name}.{leaf}": (f"{name}.{leaf}",) for leaf in ("weight", "bias")}
    for part, names in modules.items():
        children = [(i, m) for i, m in getattr(model, part).named_children() if any(True for _ in m.parameters())]
        assert len(children) == len(names), f"{part}: {len(children)} modules with weights, {len(names)} names"
        for (index, module), source in zip(children, names):
            for key, _ in module.named_parameters():
                sub, leaf = key.rsplit(".", 1) if "." in key else ("", key)
                plan[f"{part}.{index}.{key}"] = tuple(f"{part}.{source}.{s}{leaf}" for s in _renamed(module, sub))
    return plan


def _renamed(module, sub: str) -> list[str]:
    """taming's name(s) of a tokenmill sub-module, each with its trailing dot ('' for the module itself)."""
    if isinstance(module, ResBlock):
        return [f"{RESBLOCK[sub]}."]
    if isinstance(module, AttnBlock):
        return [f"{name}." for name in ATTENTION[sub]]
    return [f"{sub}." if sub else ""]  # same names below the module (Open-MAGVIT2's adaptive norm: gamma, beta)


def _encoder_names(levels: int, blocks: int) -> list[str]:
    names = ["conv_in"]
    for i in range(levels):
        for j in range(blocks):
            names += [f"down.{i}.block.{j}"] + ([f"down.{i}.attn.{j}"] if i == levels - 1 else [])
        names += [f"down.{i}.downsample.conv"] if i < levels - 1 else []
    return names + ["mid.block_1", "mid.attn_1", "mid.block_2", "norm_out", "conv_out"]


def _decoder_names(levels: int, blocks: int) -> list[str]:
    names = ["conv_in", "mid.block_1", "mid.attn_1", "mid.block_2"]
    for i in reversed(range(levels)):
        for j in range(blocks + 1):  # taming's decoder has one block more per level
            names += [f"up.{i}.block.{j}"] + ([f"up.{i}.attn.{j}"] if i == levels - 1 else [])
        names += [f"up.{i}.upsample.conv"] if i > 0 else []
    return names + ["norm_out", "conv_out"]
