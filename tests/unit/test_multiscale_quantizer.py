"""The multi-scale residual quantizer (VAR's tokenizer): one scale is exactly a VectorQuantizer,
the residual shrinks scale by scale, VQ-VAE and VQGAN tokenize and decode with it, gradients pass
straight through, bad scale lists are one error, and the store gets one level per scale, coarse
to fine, that TokenDataset and the store decoder read back. (Two gloo ranks = one process:
tests/system/test_vq_ddp.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CONFIGS
from helpers.tokens import images

from tokenmill.models import save_model
from tokenmill.models.quantizers import MultiScaleQuantizer, QuantizerConfig, VectorQuantizer
from tokenmill.models.vqgan import VQGAN, VQGANConfig
from tokenmill.models.vqvae import VQVAE, VQVAE2Config, VQVAEConfig

VQ_OPTIONS = dict(codebook_size=16, kmeans_iters=3, decay=0.5, seed=3)
MULTISCALE = QuantizerConfig(kind="multiscale", scales=(1, 2, 4), codebook_size=16, kmeans_iters=3)


def _vqvae(quantizer: QuantizerConfig = MULTISCALE) -> VQVAE:
    return VQVAE(VQVAEConfig(in_channels=1, image_size=16, hidden=8, res_blocks=1, latent_dim=4, downsample=4,
                             quantizer=quantizer))


def _vqgan() -> VQGAN:
    return VQGAN(VQGANConfig(in_channels=1, image_size=16, base_channels=8, channel_mult=(1, 2, 2), res_blocks=1,
                             attention=False, latent_dim=4, quantizer=MULTISCALE))


def _smooth_latents(n: int = 8, side: int = 8, dim: int = 4) -> torch.Tensor:
    """(n, side, side, dim): low-frequency waves with random phases and amplitudes per image."""
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 3.14, side)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    phase, amp = torch.rand(n, 1, 1, dim, generator=g) * 6, 1 + torch.rand(n, 1, 1, dim, generator=g)
    return amp * torch.sin(yy[None, :, :, None] + 0.7 * xx[None, :, :, None] + phase)


def test_one_scale_is_exactly_the_vector_quantizer():
    torch.manual_seed(0)
    plain, multi = VectorQuantizer(4, **VQ_OPTIONS), MultiScaleQuantizer(4, [4], **VQ_OPTIONS)
    multi.vq.load_state_dict(plain.state_dict())  # the same starting codebook
    batches = torch.randn(3, 6, 4, 4, 4)  # 3 training steps of (B, 4, 4, dim)
    for z in batches:
        grads = []
        for quantizer in (plain, multi):
            leaf = z.clone().requires_grad_(True)
            out = quantizer(leaf)
            (out.loss + out.codes.sin().sum()).backward()
            grads.append((out, leaf.grad))
        (a, grad_a), (b, grad_b) = grads
        assert torch.equal(a.codes, b.codes) and torch.equal(a.indices, b.indices[0]) and torch.equal(a.loss, b.loss)
        assert torch.equal(grad_a, grad_b)
    assert int(plain.steps) == 3 and bool(plain.initted)
    for key, value in plain.state_dict().items():  # k-means init, 3 EMA updates (and any restarts): identical
        assert torch.equal(value, multi.vq.state_dict()[key]), key
    plain.eval()
    multi.eval()
    assert torch.equal(plain(batches[1]).codes, multi(batches[1]).codes)


def test_the_residual_shrinks_scale_by_scale_on_smooth_latents():
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(4, [1, 2, 4, 8], codebook_size=32, kmeans_iters=5, decay=0.8)
    z = _smooth_latents()
    for _ in range(8):  # k-means, then EMA updates from every scale's residual rows
        quantizer.train()(z)
    out = quantizer.eval()(z)
    errors = [float((partial - z).pow(2).mean()) for partial in quantizer.cumulative_codes(out.indices)]
    assert all(finer < coarser for coarser, finer in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0], errors
    assert torch.equal(quantizer.cumulative_codes(out.indices)[-1], out.codes)
    assert [tuple(i.shape) for i in out.indices] == [(8, s, s) for s in (1, 2, 4, 8)]


@pytest.mark.parametrize("family", ["vqvae", "vqgan"])
def test_train_step_then_decode_of_encode_equals_recon(family):
    torch.manual_seed(0)
    model = _vqvae() if family == "vqvae" else _vqgan()
    x = torch.from_numpy(images(6)).permute(0, 3, 1, 2).float() / 255
    out = model.train()(x)
    out.loss.backward()
    first = next(p for n, p in model.named_parameters() if n.startswith("encoder"))
    assert first.grad.abs().sum() > 0  # straight-through reaches the encoder
    used = torch.cat([i.reshape(-1) for i in out.indices]).unique().numel()
    assert float(out.metrics["usage"]) == pytest.approx(used / 16)  # over the one shared codebook, every scale
    model.eval()
    with torch.no_grad():
        recon = model(x).recon
    codes = model.encode(x)
    assert model.token_shape == ((1, 1), (2, 2), (4, 4))
    assert [tuple(c.shape) for c in codes] == [(6, 1, 1), (6, 2, 2), (6, 4, 4)]
    assert all(c.dtype == torch.int64 and int(c.max()) < 16 for c in codes)
    assert torch.equal(model.decode(codes), recon)


def test_straight_through_gradient_of_the_sum_is_the_identity():
    quantizer = MultiScaleQuantizer(4, [1, 2, 4], codebook_size=8, codebook_dim=0, kmeans_iters=2).train()
    z = torch.randn(3, 4, 4, 4, requires_grad=True)
    quantizer(z).codes.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    z.grad = None
    quantizer(z).loss.backward()  # the commitment terms reach the encoder too
    assert z.grad.abs().sum() > 0


def test_validation_counts_usage_over_the_shared_codebook():
    from tokenmill.pipeline.training.tasks.image_validation import evaluate

    torch.manual_seed(0)
    model = _vqvae()
    model.train()(torch.rand(8, 1, 16, 16))  # k-means init
    batch = {"image": torch.from_numpy(images(8)), "label": torch.zeros(8, dtype=torch.long)}
    metrics, counts = evaluate(model, [batch], iw_samples=1)
    used = torch.cat([c.reshape(-1) for c in model.encode(batch["image"].permute(0, 3, 1, 2).float() / 255)])
    assert len(counts) == 1 and counts[0].shape == (1, 16) and int(counts[0].sum()) == 8 * (1 + 4 + 16)
    assert metrics["val/usage"] == pytest.approx(used.unique().numel() / 16)


def test_bad_scale_lists_are_one_value_error_naming_them():
    for scales, side in (((1, 2, 3), 4), ((1, 3, 2, 4), 4), ((2, 2, 4), 4)):
        bad = QuantizerConfig(kind="multiscale", scales=scales)
        with pytest.raises(ValueError, match=rf"\[{', '.join(map(str, scales))}\].*side {side}") as err:
            VQVAEConfig(image_size=16, downsample=4, quantizer=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"\[1, 2, 4\].*side 2"):
        VQGANConfig(image_size=16, channel_mult=(1, 2, 2, 2), quantizer=MULTISCALE)
    with pytest.raises(ValueError, match="vqvae2"):
        VQVAE2Config(image_size=16, quantizer=MULTISCALE)
    from tokenmill.pipeline.config import ConfigError
    from tokenmill.pipeline.training.config import load_train_config

    with pytest.raises(ConfigError, match=r"model.*\[1, 2, 4\].*side 8"):
        load_train_config(CONFIGS / "var_vqvae_mnist.yaml", ["model.quantizer.scales=[1,2,4]"])


def test_store_holds_one_level_per_scale_coarse_to_fine(tmp_path):
    from helpers.tokens import write_encoded_store

    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.dataset import TokenDataset
    from tokenmill.pipeline.tokens.detokenize import StoreDecoder
    from tokenmill.pipeline.tokens.encoder import TokenEncoder
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, tokenizer_lineage

    torch.manual_seed(0)
    model = _vqvae()
    model.train()(torch.rand(8, 1, 16, 16))  # k-means init
    files = resolve_model(str(save_model(model.eval(), tmp_path / "model")))
    encoder = TokenEncoder(files, latents=False)
    assert [(s.name, s.row_shape, s.codebook_size) for s in encoder.specs] == [
        ("codes_0", (1, 1), 16), ("codes_1", (2, 2), 16), ("codes_2", (4, 4), 16)]
    lineage = tokenizer_lineage(files, encoder, ExtractionOptions())
    assert lineage["scales"] == [1, 2, 4] and lineage["token_shape"] == [[1, 1], [2, 2], [4, 4]]

    pixels, n = images(5), 5
    rows = encoder.encode(pixels, np.zeros(n, dtype=np.int64))
    url = str(tmp_path / "store.zarr")
    write_encoded_store(url, encoder, lineage, rows)

    dataset = TokenDataset(url, split="train")
    expected = np.concatenate([rows[f"codes_{i}"].reshape(n, -1) for i in range(3)], axis=1)  # coarse to fine
    assert dataset.seq_len == 1 + 4 + 16 and [s["name"] for s in dataset.specs] == ["codes_0", "codes_1", "codes_2"]
    np.testing.assert_array_equal(dataset.batch(list(range(n)))["tokens"].numpy(), expected)
    decoded = next(StoreDecoder(url).images(0, n))  # through the lineage's model
    assert torch.equal(decoded, model.decode(tuple(torch.from_numpy(rows[f"codes_{i}"]).long() for i in range(3))))
