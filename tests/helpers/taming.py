"""A tiny taming-transformers VQGAN with random weights, saved as taming ships its checkpoints (a log
folder: `checkpoints/last.ckpt` holding a Lightning `state_dict`, `configs/*-project.yaml`), and the
reference model built from taming's own modules.

The reference is `taming.models.vqgan.VQModel`'s encode/decode assembled from taming's Encoder,
Decoder and quantizer: importing `taming.models.vqgan` itself needs pytorch_lightning and
omegaconf (through `taming.main`), which tokenmill does not install; these modules need torch only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

# A tiny config of the published architecture (vqgan_imagenet_f16_1024 has ch 128, ch_mult [1,1,2,2,4],
# attn_resolutions [16], resolution 256, z_channels 256, embed_dim 256, n_embed 1024).
TINY_PARAMS = {
    "embed_dim": 8,
    "n_embed": 32,
    "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
    "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                   "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000}},
}
TARGET = "taming.models.vqgan.VQModel"


def taming_modules():
    """(Encoder, Decoder, quantizer class) from the installed taming-transformers, or skip."""
    pytest.importorskip("taming", reason="taming-transformers is not installed (make setup installs it --no-deps)")
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae import quantize

    # VectorQuantizer2 (later taming) defaults to legacy=True, the same loss as 0.0.1's VectorQuantizer.
    return Encoder, Decoder, getattr(quantize, "VectorQuantizer2", quantize.VectorQuantizer)


class TamingReference(nn.Module):
    """taming.models.vqgan.VQModel without its Lightning base and loss: same modules, same names."""

    def __init__(self, params: dict) -> None:
        super().__init__()
        encoder, decoder, quantizer = taming_modules()
        dd = params["ddconfig"]
        self.encoder, self.decoder = encoder(**dd), decoder(**dd)
        self.quantize = quantizer(params["n_embed"], params["embed_dim"], beta=0.25)
        self.quant_conv = nn.Conv2d(dd["z_channels"], params["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(params["embed_dim"], dd["z_channels"], 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (quantized (B, D, h, w), loss, codes (B, h, w))."""
        quant, loss, info = self.quantize(self.quant_conv(self.encoder(x)))
        return quant, loss, info[2].reshape(quant.shape[0], *quant.shape[2:])

    def decode(self, quant: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(quant))


def random_reference(params: dict = TINY_PARAMS, seed: int = 0) -> TamingReference:
    """Random weights everywhere (norm scales too, so a swapped mapping shows), and a codebook drawn
    from the encoder's own outputs so that many codes are in use."""
    torch.manual_seed(seed)
    model = TamingReference(params).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        z = model.quant_conv(model.encoder(torch.rand(4, 3, 16, 16) * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, 8)
        model.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[: params["n_embed"]]])
    return model


def write_taming_log(folder: Path, model: TamingReference, params: dict = TINY_PARAMS) -> Path:
    """taming's log folder layout: checkpoints/last.ckpt (+ a discriminator's `loss.*` weights, as
    released checkpoints have) and configs/<time>-project.yaml. Returns the folder."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "configs").mkdir(exist_ok=True)
    state = {**model.state_dict(), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100}, folder / "checkpoints" / "last.ckpt")
    config = {"model": {"base_learning_rate": 4.5e-6, "target": TARGET, "params": copy.deepcopy(params)}}
    (folder / "configs" / "2021-01-01T00-00-00-project.yaml").write_text(yaml.safe_dump(config))
    return folder
