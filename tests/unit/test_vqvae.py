"""VQ-VAE and VQ-VAE-2: tokenizer interface, eval-mode decode(encode(x)) == recon, configs,
save/load round trips and collectives injection."""

from __future__ import annotations

import pydantic
import pytest
import torch

from tokenmill.models import build_model, load_model, save_model
from tokenmill.models.quantizers import Collectives, QuantizerConfig
from tokenmill.models.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig

SMALL = dict(in_channels=1, image_size=16, hidden=16, res_blocks=1, latent_dim=8)
QUANTIZERS = {
    "vq": QuantizerConfig(codebook_size=32),
    "rvq": QuantizerConfig(kind="rvq", codebook_size=16, num_stages=2, codebook_dim=4),
    "fsq": QuantizerConfig(kind="fsq", levels=(5, 3, 3)),
    "lfq": QuantizerConfig(kind="lfq", bits=6),
    "bsq": QuantizerConfig(kind="bsq", bits=6, entropy_group_bits=3),
    "simvq": QuantizerConfig(kind="simvq", codebook_size=32, rotation_trick=True),
    "vq-rotation": QuantizerConfig(codebook_size=32, rotation_trick=True),
}


def _model(family: str, kind: str):
    if family == "vqvae":
        return VQVAE(VQVAEConfig(downsample=4, quantizer=QUANTIZERS[kind], **SMALL))
    return VQVAE2(VQVAE2Config(quantizer=QUANTIZERS[kind], **SMALL))


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", list(QUANTIZERS))
@pytest.mark.parametrize("family", ["vqvae", "vqvae2"])
def test_train_step_then_decode_of_encode_equals_recon(family, kind):
    torch.manual_seed(0)
    model, x = _model(family, kind), _images()
    out = model.train()(x)
    out.loss.backward()
    first_conv = next(p for n, p in model.named_parameters() if n.startswith("encoder"))
    assert first_conv.grad.abs().sum() > 0  # straight-through reaches the encoder
    for key in ("mse", "psnr", "perplexity", "usage", "vq_loss"):
        assert out.metrics[key].ndim == 0, key
    model.eval()
    with torch.no_grad():
        recon = model(x).recon
    codes = model.encode(x)
    levels = codes if family == "vqvae2" else (codes,)
    shapes = model.token_shape if family == "vqvae2" else (model.token_shape,)
    for level, shape in zip(levels, shapes):
        assert level.dtype == torch.int64 and tuple(level.shape) == (6, *shape)
        assert int(level.max()) < model.codebook_size
    images = model.decode(codes)
    assert torch.equal(images, recon)
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("factor", [8, 16])
def test_downsampling_factors(factor):
    model = VQVAE(VQVAEConfig(in_channels=3, image_size=32, hidden=8, res_blocks=1, latent_dim=4, downsample=factor))
    assert tuple(model.encode(torch.rand(2, 3, 32, 32)).shape) == (2, 32 // factor, 32 // factor)
    assert model.token_shape == (32 // factor, 32 // factor)


@pytest.mark.parametrize("family", ["vqvae", "vqvae2"])
def test_save_load_round_trip(tmp_path, family):
    torch.manual_seed(0)
    model, x = _model(family, "rvq"), _images()
    model.train()(x)  # k-means init and EMA buffers are part of the checkpoint
    save_model(model.eval(), tmp_path / family)
    loaded = load_model(tmp_path / family).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x).recon, model(x).recon)


def test_configs_build_from_dicts_and_reject_typos():
    model = build_model({"kind": "vqvae2", "quantizer": {"kind": "fsq", "levels": [4, 4]}, **SMALL})
    assert isinstance(model, VQVAE2) and model.codebook_size == 16
    adapter = pydantic.TypeAdapter(VQVAEConfig)
    assert adapter.validate_python({"quantizer": {"kind": "rvq", "num_stages": 2}}).quantizer.num_stages == 2
    with pytest.raises(pydantic.ValidationError, match="codebok_size"):
        adapter.validate_python({"quantizer": {"codebok_size": 8}})
    with pytest.raises(pydantic.ValidationError):
        adapter.validate_python({"downsample": 6})


def test_set_collectives_reaches_every_quantizer():
    model = _model("vqvae2", "rvq")
    collectives = Collectives(rank=1, world_size=2)
    model.set_collectives(collectives)
    stages = [m for m in model.modules() if hasattr(m, "collectives")]
    assert len(stages) == 4 and all(m.collectives is collectives for m in stages)
