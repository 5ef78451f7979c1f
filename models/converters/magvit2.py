"""`magvit2:LOCATION`: an Open-MAGVIT2 LFQ tokenizer (`src.Open_MAGVIT2.models.lfqgan.VQModel` or
`lfqgan_pretrain.VQModel` of github.com/TencentARC/SEED-Voken) as a tokenmill `VQGAN`.

LOCATION is `CKPT,YAML` (the released `.ckpt` and the repository's config it was trained with, e.g.
configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml) or a `.ckpt` with exactly one YAML beside it.
The YAML is LightningCLI's: `model.class_path` and `model.init_args` (`ddconfig`, `n_embed`,
`embed_dim`, `lossconfig`, `use_ema`). With `use_ema` the EMA weights (`model_ema.*`, LitEma's
dot-less names) are the model's, as reconstruct_image.py's `ema_scope` makes them.

The translation: Open-MAGVIT2's improved_model.py Encoder/Decoder are tokenmill's VQGAN with
`blocks: magvit2` (bias-free ResBlocks, no attention, num_res_blocks middle blocks, a 1x1 encoder
output, an adaptive GroupNorm on the quantized latent before each decoder level, conv + DCR
depth-to-space upsampling). Its LFQ (no projections: embed_dim = z_channels = log2(n_embed)) is
tokenmill's `lfq` with the same code convention: bit i is latent channel i > 0 and weighs 2^i, codes
±1. With `token_factorization` its two sub-indices (pre, post) are tokenmill's one index
pre + 2^factorized_bits[0]·post. The training loss takes commit_weight as β, codebook_weight as the
entropy weight, batch/sample_minimization_weight as the diversity and its temperature 0.01 as τ 100
(training only; not compared with the reference). IBQ is refused: see `IBQ`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from tokenmill.models.converters.checkpoint import Converted, KeyPlan, file_sha256, load_checkpoint, load_mapped
from tokenmill.models.converters.taming import module_plan
from tokenmill.models.errors import UserError
from tokenmill.models.quantizers import QuantizerConfig
from tokenmill.models.vqgan import VQGAN, VQGANConfig

# lfqgan.py and lfqgan_pretrain.py (the Pretrain_256 checkpoints) build the same Encoder, Decoder and LFQ
TARGETS = ("src.Open_MAGVIT2.models.lfqgan.VQModel", "src.Open_MAGVIT2.models.lfqgan_pretrain.VQModel")
FIX = "pass the YAML the checkpoint was trained with: magvit2:CKPT,YAML"
IBQ = ("IBQ's IndexPropagationQuantize picks the code of largest dot product z·e, which no tokenmill quantizer "
       "does (vq picks the nearest code); magvit2: converts Open-MAGVIT2's LFQ models only")
EMA = "model_ema."


def convert(location: str, ref: str) -> Converted:
    ckpt, config = locate(location, ref)
    params, image_size = model_params(config, ref)
    model = translate(params, image_size, ref)
    weights, state = state_dict(ckpt, bool(params.get("use_ema")), ref)
    load_mapped(model, state, key_plan(model), ref, FIX, ignored=("loss.", EMA))
    source = {"kind": "magvit2", "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt),
              "config": [str(config.resolve())], "config_sha256": [file_sha256(config)], "weights": weights}
    return Converted(model.eval(), source)


def locate(location: str, ref: str) -> tuple[Path, Path]:
    """(checkpoint, YAML)."""
    ckpt, _, config = location.partition(",")
    for path in (Path(ckpt), Path(config)) if config else (Path(ckpt),):
        if not path.is_file():
            raise UserError(f"{ref}: {path} does not exist; give magvit2:CKPT,YAML")
    if config:
        return Path(ckpt), Path(config)
    found = sorted(Path(ckpt).parent.glob("*.yaml"))
    if len(found) != 1:
        raise UserError(f"{ref}: expected one YAML beside {ckpt}, found {len(found)}; {FIX}")
    return Path(ckpt), found[0]


def model_params(config: Path, ref: str) -> tuple[dict[str, Any], int | None]:
    """(`model.init_args`, the test data's image size or None); UserError unless the model is
    Open-MAGVIT2's LFQ VQModel."""
    try:
        loaded = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{ref}: {config} is not valid YAML ({str(err).splitlines()[0]}); {FIX}") from None
    model = loaded.get("model") if isinstance(loaded, dict) else None
    target = model.get("class_path", model.get("target")) if isinstance(model, dict) else None
    params = model.get("init_args", model.get("params")) if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise UserError(f"{ref}: {config} has no `model.init_args` section; {FIX}")
    if "IBQ" in str(target):
        raise UserError(f"{ref}: the config's model is {target}; {IBQ}")
    if target not in TARGETS:
        raise UserError(f"{ref}: the config's model is {target!r}; magvit2: converts {' and '.join(TARGETS)} "
                        "(LFQ image tokenizers)")
    try:
        size = loaded["data"]["init_args"]["test"]["params"]["config"]["size"]
    except (KeyError, TypeError):
        size = None
    return params, size if isinstance(size, int) else None


def translate(params: dict[str, Any], image_size: int | None, ref: str) -> VQGAN:
    """VQModel's init_args -> a fresh tokenmill VQGAN of that layout."""
    dd = params.get("ddconfig") or {}
    required = ["ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "resolution"]
    absent = [k for k in ("n_embed", "embed_dim") if k not in params] + [f"ddconfig.{k}" for k in required
                                                                          if k not in dd]
    if absent:
        raise UserError(f"{ref}: the config's model.init_args lacks {', '.join(absent)}; {FIX}")
    bits = math.log2(params["n_embed"]) if isinstance(params["n_embed"], int) and params["n_embed"] > 0 else -1
    if not (bits == params["embed_dim"] == dd["z_channels"]) or dd.get("out_ch", dd["in_channels"]) != dd["in_channels"]:
        raise UserError(f"{ref}: n_embed {params['n_embed']}, embed_dim {params['embed_dim']}, z_channels "
                        f"{dd['z_channels']}, out_ch {dd.get('out_ch')}: magvit2: converts LFQ without projections "
                        "(n_embed = 2^embed_dim, embed_dim = z_channels) reconstructing its input's channels")
    loss = (params.get("lossconfig") or {}).get("params") or {}
    minimise = params.get("sample_minimization_weight", 1.0)
    try:
        quantizer = QuantizerConfig(kind="lfq", bits=int(bits), beta=loss.get("commit_weight", 0.25),
                                    entropy_weight=loss.get("codebook_weight", 1.0), inv_temperature=100.0,
                                    diversity=params.get("batch_maximization_weight", 1.0) / minimise)
        return VQGAN(VQGANConfig(
            in_channels=dd["in_channels"], image_size=image_size or dd["resolution"], base_channels=dd["ch"],
            channel_mult=tuple(dd["ch_mult"]), res_blocks=dd["num_res_blocks"], attention=False,
            latent_dim=int(bits), blocks="magvit2", recon_loss="l1", quantizer=quantizer))
    except (TypeError, ValueError, ZeroDivisionError) as err:  # values of the wrong type or out of range
        raise UserError(f"{ref}: the config does not give a tokenmill VQGAN ({err}); {FIX}") from None


def state_dict(ckpt: Path, use_ema: bool, ref: str) -> tuple[str, dict[str, Tensor]]:
    """("ema" or "model", the weights under the model's own names): the Lightning checkpoint's
    `state_dict`, its LitEma copies (`model_ema.encoderconv_inweight`) in place when `use_ema`."""
    loaded = load_checkpoint(ckpt, ref)
    state = loaded.get("state_dict") if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not any(str(k).startswith("encoder.down.") for k in state):
        keys = sorted(map(str, loaded))[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise UserError(f"{ref}: {ckpt} is not an Open-MAGVIT2 checkpoint (no `state_dict` with encoder.down "
                        f"weights; found {keys}); magvit2: reads lfqgan.VQModel's Lightning .ckpt files")
    if not use_ema:
        return "model", state
    ema = {key: state.get(EMA + key.replace(".", "")) for key in state if key.startswith(("encoder.", "decoder."))}
    if None in ema.values():
        raise UserError(f"{ref}: the config sets use_ema but {ckpt} lacks EMA weights ({EMA}*); {FIX}")
    return "ema", {**state, **ema}


def key_plan(model: VQGAN) -> KeyPlan:
    """tokenmill key -> Open-MAGVIT2 key: its modules in forward order (no codebook, no 1x1 convs)."""
    levels, blocks = len(model.config.channel_mult), model.config.res_blocks
    encoder = ["conv_in"]
    for i in range(levels):
        encoder += [f"down.{i}.block.{j}" for j in range(blocks)] + ([f"down.{i}.downsample"] if i < levels - 1 else [])
    encoder += [f"mid_block.{j}" for j in range(blocks)] + ["norm_out", "conv_out"]
    decoder = ["conv_in", *(f"mid_block.{j}" for j in range(blocks))]
    for i in reversed(range(levels)):
        decoder += [f"adaptive.{i}", *(f"up.{i}.block.{j}" for j in range(blocks))]
        decoder += [f"up.{i}.upsample.conv1"] if i > 0 else []
    return module_plan(model, {"encoder": encoder, "decoder": decoder + ["norm_out", "conv_out"]}, codebook=False)
