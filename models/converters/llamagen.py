"""`llamagen:LOCATION`: a LlamaGen VQ tokenizer (VQ-16, VQ-8: `VQModel` of its
`tokenizer/tokenizer_image/vq_model.py`) as a tokenmill `VQGAN`.

LOCATION is a `.pt` checkpoint as LlamaGen releases it (`vq_ds16_c2i.pt`: `{"model": state_dict}`)
or as its vq_train.py saves it (with `ema`, `args`, optimiser and discriminator states), or
`CKPT,IMAGE_SIZE`. The weights are `ema`, else `model`, else `state_dict`, as its vq_demo.py picks.

The checkpoint has no model config (LlamaGen rebuilds VQ_16/VQ_8 from flags), so the layout is read
from the weights' shapes: ch, the channel multipliers, blocks per level, z_channels and the codebook
(codebook_size x codebook_embed_dim). vq_train.py's `args`, when saved, give the rest; without them
its defaults (`ARG_DEFAULTS`). The image size (tokenmill's resize target; the network takes any
multiple of the downsample factor) is IMAGE_SIZE, else `args.image_size`, else 256.

The translation: LlamaGen's Encoder/Decoder are taming's (the same ResnetBlock, AttnBlock, GroupNorm
of 32 groups, right/bottom-padded Downsample, nearest Upsample + conv, attention at the lowest
resolution and in the middle, one more decoder block per level), named differently: `conv_blocks.i.
res/attn`, `mid.0-2`, the decoder's levels in forward order. So tokenmill's VQGAN with
`asymmetric_downsample` and `z_channels` (`quant_conv`: z_channels -> codebook_embed_dim, the lookup
dim). Its VectorQuantizer with `codebook_l2_norm` (always on in vq_train.py) is tokenmill's `vq` with
`cosine`: z and the codebook l2-normalised before the lookup, the normalised code the output; a
learned codebook (no EMA, k-means or restarts) and the loss ‖sg(z) − e‖² + β·‖z − sg(e)‖², β =
commit_loss_beta. The usage buffer `quantize.codebook_used` is training bookkeeping and is dropped;
dropout and the entropy loss (0 in the released models) act in training only and are not carried over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from tokenmill.models.converters.checkpoint import Converted, file_sha256, load_checkpoint, load_mapped
from tokenmill.models.converters.taming import module_plan
from tokenmill.models.errors import UserError
from tokenmill.models.quantizers import QuantizerConfig
from tokenmill.models.vqgan import VQGAN, VQGANConfig

FIX = ("the config is read from the encoder's weights and the rest must fit it: llamagen: converts LlamaGen's "
       "VQModel checkpoints (VQ-16, VQ-8) as its train and sample scripts save them")
WEIGHT_ENTRIES = ("ema", "model", "state_dict")  # vq_demo.py's order
CODEBOOK = "quantize.embedding.weight"
IGNORED = ("quantize.codebook_used",)  # codebook_show_usage's (65536,) usage history
# vq_train.py's defaults, for checkpoints saved without its `args` (the released ones)
ARG_DEFAULTS = {"image_size": 256, "codebook_l2_norm": True, "commit_loss_beta": 0.25, "reconstruction_loss": "l2"}


def convert(location: str, ref: str) -> Converted:
    ckpt, image_size = locate(location, ref)
    loaded = load_checkpoint(ckpt, ref)
    entry, state = state_dict(loaded, ckpt, ref)
    args = _args(loaded, image_size)
    model = translate(read_layout(state, ref), args, ref)
    load_mapped(model, state, key_plan(model), ref, FIX, ignored=IGNORED)
    source = {"kind": "llamagen", "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt),
              "config": [], "config_sha256": [], "weights": entry, "args": args}
    return Converted(model.eval(), source)


def locate(location: str, ref: str) -> tuple[Path, int | None]:
    """(checkpoint, image size given in the reference or None)."""
    path, _, size = location.partition(",")
    if size and not size.strip().isdigit():
        raise UserError(f"{ref}: {size!r} is not an image size; use llamagen:CKPT or llamagen:CKPT,IMAGE_SIZE")
    ckpt = Path(path)
    if not ckpt.is_file():
        raise UserError(f"{ref}: {ckpt} does not exist; give LlamaGen's .pt checkpoint (e.g. vq_ds16_c2i.pt)")
    return ckpt, int(size) if size else None


def _args(loaded: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """The vq_train.py flags the conversion needs: the checkpoint's `args`, else the defaults;
    an image size in the reference wins."""
    saved = loaded.get("args")
    args = {name: getattr(saved, name, default) for name, default in ARG_DEFAULTS.items()}
    return args | ({"image_size": image_size} if image_size else {})


def state_dict(loaded: Any, ckpt: Path, ref: str) -> tuple[str, dict[str, Tensor]]:
    """(entry, weights): the checkpoint's `ema`, `model` or `state_dict`; UserError unless it holds
    a LlamaGen VQModel's weights."""
    entry = next((k for k in WEIGHT_ENTRIES if isinstance(loaded, dict) and isinstance(loaded.get(k), dict)), None)
    state = loaded[entry] if entry else {}
    if not any(str(k).startswith("encoder.conv_blocks.") for k in state) or CODEBOOK not in state:
        keys = sorted(map(str, state or loaded))[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise UserError(f"{ref}: {ckpt} is not a LlamaGen VQ checkpoint (no {'/'.join(WEIGHT_ENTRIES)} entry with "
                        f"encoder.conv_blocks and {CODEBOOK} weights; found {keys}); {FIX}")
    return entry, state


def read_layout(state: dict[str, Tensor], ref: str) -> dict[str, Any]:
    """The VQModel's hyperparameters from its weights' shapes (weights are (out, in, kh, kw))."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise UserError(f"{ref}: the checkpoint lacks {key}, which every LlamaGen VQModel has; {FIX}")
        return tuple(state[key].shape)

    def count(pattern: str) -> int:
        return next(i for i in range(len(state) + 1) if pattern.format(i) not in state)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count("encoder.conv_blocks.{}.res.0.conv1.weight")
    encoder = [shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in range(levels)]
    decoder = [shape(f"decoder.conv_blocks.{k}.res.0.conv1.weight")[0]
               for k in reversed(range(count("decoder.conv_blocks.{}.res.0.conv1.weight")))]
    if encoder != decoder or any(width % ch for width in encoder):
        raise UserError(f"{ref}: the encoder's level widths {encoder} and the decoder's {decoder} differ "
                        f"(ModelArgs' encoder_ch_mult and decoder_ch_mult); tokenmill's VQGAN mirrors one channel_mult")
    if shape("decoder.conv_out.weight")[0] != in_channels:
        raise UserError(f"{ref}: the decoder outputs {shape('decoder.conv_out.weight')[0]} channels for "
                        f"{in_channels} input channels; tokenmill's VQGAN reconstructs its input's channels")
    codebook_size, codebook_dim = shape(CODEBOOK)
    return {"in_channels": in_channels, "ch": ch, "ch_mult": tuple(w // ch for w in encoder),
            "num_res_blocks": count("encoder.conv_blocks.0.res.{}.conv1.weight"),
            "z_channels": shape("encoder.conv_out.weight")[0], "codebook_size": codebook_size,
            "codebook_embed_dim": codebook_dim}


def translate(layout: dict[str, Any], args: dict[str, Any], ref: str) -> VQGAN:
    """The layout and vq_train.py flags -> a fresh tokenmill VQGAN of that architecture."""
    try:
        quantizer = QuantizerConfig(kind="vq", codebook_size=layout["codebook_size"], beta=args["commit_loss_beta"],
                                    codebook_weight=1.0, ema=False, kmeans_init=False, dead_code_threshold=0.0,
                                    cosine=bool(args["codebook_l2_norm"]))
        return VQGAN(VQGANConfig(
            in_channels=layout["in_channels"], image_size=args["image_size"], base_channels=layout["ch"],
            channel_mult=layout["ch_mult"], res_blocks=layout["num_res_blocks"], attention=True,
            latent_dim=layout["codebook_embed_dim"], z_channels=layout["z_channels"], asymmetric_downsample=True,
            recon_loss="l1" if args["reconstruction_loss"] == "l1" else "l2", quantizer=quantizer))
    except (TypeError, ValueError) as err:  # values of the wrong type or out of range (image size)
        raise UserError(f"{ref}: the checkpoint does not give a tokenmill VQGAN ({err}); use "
                        "llamagen:CKPT,IMAGE_SIZE with a multiple of the downsample factor") from None


def key_plan(model: VQGAN) -> dict[str, tuple[str, ...]]:
    """tokenmill key -> LlamaGen key(s): taming's modules under LlamaGen's names."""
    levels, blocks = len(model.config.channel_mult), model.config.res_blocks
    return module_plan(model, {"encoder": _encoder_names(levels, blocks), "decoder": _decoder_names(levels, blocks)})


def _encoder_names(levels: int, blocks: int) -> list[str]:
    names = ["conv_in"]
    for i in range(levels):
        for j in range(blocks):
            names += [f"conv_blocks.{i}.res.{j}"] + ([f"conv_blocks.{i}.attn.{j}"] if i == levels - 1 else [])
        names += [f"conv_blocks.{i}.downsample.conv"] if i < levels - 1 else []
    return names + ["mid.0", "mid.1", "mid.2", "norm_out", "conv_out"]


def _decoder_names(levels: int, blocks: int) -> list[str]:
    """LlamaGen's decoder numbers its levels in forward order: conv_blocks.0 is the lowest resolution."""
    names = ["conv_in", "mid.0", "mid.1", "mid.2"]
    for k in range(levels):
        for j in range(blocks + 1):
            names += [f"conv_blocks.{k}.res.{j}"] + ([f"conv_blocks.{k}.attn.{j}"] if k == 0 else [])
        names += [f"conv_blocks.{k}.upsample.conv"] if k < levels - 1 else []
    return names + ["norm_out", "conv_out"]
