"""`tokenize --model diffusers:PATH` on local Ray with tiny random diffusers autoencoders: stored
codes/latents equal diffusers' own encode of the same pixels, decode equals diffusers' decode,
`--augment flip` stores the mirrored encoding as variant 1, and an actor killed mid-shard is
retried to identical arrays; a DC-AE store is decoded, read, inspected and its model evaluated. (`--latents sample` draws its noise from the sample's key:
tests/unit/test_diffusers_sampling.py.)"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import zarr
from helpers.diffusers import SCALE, SHIFT, rgb_images, save_tiny_dc, save_tiny_kl, save_tiny_vq, write_rgb_shards
from helpers.tokens import array_bytes

N = 20  # shards of 8, 8, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("diffusers")
    return {"root": root, "kl": save_tiny_kl(root / "kl", shift_factor=SHIFT), "vq": save_tiny_vq(root / "vq"),
            "dc": save_tiny_dc(root / "dc", sample_size=32),
            "shards": write_rgb_shards(str(root / "shards"), root / "source", N)}


def _items(group) -> tuple[np.ndarray, torch.Tensor]:
    """Store rows of the good samples and their source pixels as diffusers takes them: (B, 3, 32, 32) in [-1, 1]."""
    starts, counts = group["shards/row_start"][:], group["shards/count"][:]
    rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)])
    index = np.array([int(k.rsplit("-", 1)[1]) for k in group["keys"][:][rows]])
    return rows, torch.from_numpy(rgb_images(N)[index]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def kl_store(data):
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    store = data["root"] / "kl.zarr"
    tokenize_dataset(f"diffusers:{data['kl']}", data["shards"], str(store),
                     TokenizeOptions(batch_size=8, latents="mean", augment="flip", actors=1))
    return store


def test_kl_latents_and_their_flips_equal_diffusers_encode_and_decode(data, kl_store):
    from diffusers import AutoencoderKL

    from tokenmill.pipeline.tokens.detokenize import StoreDecoder
    from tokenmill.pipeline.tokens.latent_dataset import LatentDataset

    group = zarr.open_group(str(kl_store), mode="r")
    lineage = group.attrs["lineage"]
    weights = (data["kl"] / "diffusion_pytorch_model.safetensors").read_bytes()
    assert lineage["adapter"] == "diffusers" and lineage["model_class"] == "AutoencoderKL"
    assert lineage["weights_sha256"] == hashlib.sha256(weights).hexdigest() and len(lineage["config_sha256"]) == 64
    assert (lineage["scaling_factor"], lineage["shift_factor"], lineage["latents"]) == (SCALE, SHIFT, "mean")
    assert lineage["augment"] == {"name": "flip", "variants": 2} and lineage["transform"]["size"] == 32
    assert group["latents"].dtype == np.float16 and group["latents"].shape[1:] == (2, 4, 16, 16)
    rows, x = _items(group)
    stored = torch.from_numpy(group["latents"][:][rows].astype(np.float32))  # (B, 2, 4, 16, 16)
    model = AutoencoderKL.from_pretrained(data["kl"]).eval()
    with torch.no_grad():
        for variant, pixels in enumerate([x, x.flip(-1)]):  # variant 1: the mirrored image
            expected = (model.encode(pixels).latent_dist.mean - SHIFT) * SCALE
            torch.testing.assert_close(stored[:, variant], expected.half().float(), atol=2e-3, rtol=1e-3)
        reference = ((model.decode(stored[:, 0] / SCALE + SHIFT).sample + 1) / 2).clamp(0, 1)
    decoded = next(StoreDecoder(str(kl_store)).images(0, N))
    torch.testing.assert_close(decoded, reference, atol=1e-5, rtol=0)
    ds = LatentDataset(str(kl_store), split=None)
    item = ds[3]
    assert item["latents"].shape == (4, 16, 16) and item["latents"].dtype == torch.float32
    assert any(torch.equal(item["latents"], stored[3, v]) for v in range(2))


def test_an_actor_killed_mid_shard_is_retried_to_identical_arrays(data, kl_store, tmp_path, monkeypatch):
    from tokenmill.pipeline.runtime import faults
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    flag = tmp_path / "crashed"
    monkeypatch.setenv(faults.ENV, f"tokenize.before_marker,unit=1,action=exit,once={flag}")
    store = tmp_path / "kl-crash.zarr"
    tokenize_dataset(f"diffusers:{data['kl']}", data["shards"], str(store),
                     TokenizeOptions(batch_size=8, latents="mean", augment="flip", actors=1))
    assert flag.exists()  # the actor died after shard 1's rows, before its marker
    assert array_bytes(store) == array_bytes(kl_store)


def test_vq_codes_equal_diffusers_quantize_and_decode_through_the_codebook(data, tmp_path):
    from diffusers import VQModel

    from tokenmill.jobs.cli import main
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.tokens.dataset import TokenDataset
    from tokenmill.pipeline.tokens.detokenize import StoreDecoder

    store = tmp_path / "vq.zarr"
    summary = tokenize_dataset(f"diffusers:{data['vq']}", data["shards"], str(store),
                               TokenizeOptions(batch_size=8, actors=1))
    group = zarr.open_group(str(store), mode="r")
    lineage = group.attrs["lineage"]
    assert (lineage["codebook_size"], lineage["token_shape"], lineage["mode"]) == (32, [[16, 16]], "codes")
    assert summary.codebook["codes"]["used_codes"] > 1
    rows, x = _items(group)
    codes = torch.from_numpy(group["codes"][:][rows].astype(np.int64))
    model = VQModel.from_pretrained(data["vq"]).eval()
    with torch.no_grad():
        h = model.encode(x).latents
        torch.testing.assert_close(codes, model.quantize(h)[2][2].reshape(len(x), 16, 16))  # equal codes
        quant = model.quantize.get_codebook_entry(codes.reshape(-1), (len(x), 16, 16, 4))
        reference = ((model.decode(quant, force_not_quantize=True).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(next(StoreDecoder(str(store)).images(0, N)), reference, atol=1e-5, rtol=0)
    assert TokenDataset(str(store), split=None)[0]["tokens"].shape == (256,)
    assert main(["decode", str(store), "--out", str(tmp_path / "png"), "--rows", "0:4"]) == 0
    assert len(list((tmp_path / "png").glob("grid-*.png"))) == 1




def test_inspect_a_diffusers_folder_with_or_without_the_prefix(data, tmp_path, capsys):
    """`tokenmill inspect` on a diffusers folder: its class, parameters (its whole state dict, counted
    from the weights file), codebook and sha256 (here, where diffusers is imported anyway)."""
    import json

    from diffusers import VQModel

    from tokenmill.jobs.cli import main

    expected = sum(p.numel() for p in VQModel.from_pretrained(data["vq"]).parameters())
    for target in (f"diffusers:{data['vq']}", str(data["vq"])):
        assert main(["inspect", target, "--json", str(tmp_path / "inspect.json")]) == 0
        result = json.loads((tmp_path / "inspect.json").read_text())
        assert result["kind"] == "model" and result["class"] == "VQModel" and result["parameters"] == expected
        assert result["tokens"] == {"codebook_size": 32} and result["config"]["sample_size"] == 32
        weights = (data["vq"] / "diffusion_pytorch_model.safetensors").read_bytes()
        assert result["weights_sha256"] == hashlib.sha256(weights).hexdigest()
        assert result["origin"] == {"location": str(data["vq"].resolve())} and "VQModel" in capsys.readouterr().out


def test_a_dc_ae_store_decodes_reads_inspects_and_evaluates_like_diffusers(data, tmp_path, capsys):
    """`tokenize --model diffusers:DC` (no --latents: DC-AE latents are deterministic), then `decode`,
    `LatentDataset`, `inspect` and `eval` on it. (Equality in-process: test_diffusers_sampling.py.)"""
    import json

    from diffusers import AutoencoderDC

    from tokenmill.jobs.cli import main
    from tokenmill.pipeline.tokens.latent_dataset import LatentDataset

    store = tmp_path / "dc.zarr"
    assert main(["tokenize", "--model", f"diffusers:{data['dc']}", "--data", data["shards"], "--out", str(store),
                 "--batch-size", "8", "--actors", "1"]) == 0
    group = zarr.open_group(str(store), mode="r")
    lineage = group.attrs["lineage"]
    assert (lineage["model_class"], lineage["mode"], lineage["latents"]) == ("AutoencoderDC", "latents", None)
    assert (lineage["scaling_factor"], lineage["shift_factor"], lineage["transform"]["size"]) == (SCALE, 0.0, 32)
    rows, x = _items(group)
    stored = group["latents"][:][rows]  # (N, 4, 16, 16) float16
    model = AutoencoderDC.from_pretrained(data["dc"]).eval()
    with torch.no_grad():
        assert np.array_equal(stored, (model.encode(x).latent * SCALE).half().numpy())
    assert main(["decode", str(store), "--out", str(tmp_path / "png"), "--rows", "0:4"]) == 0
    assert len(list((tmp_path / "png").glob("grid-*.png"))) == 1
    item = LatentDataset(str(store), split=None)[0]
    assert item["latents"].shape == (4, 16, 16) and item["latents"].dtype == torch.float32
    assert main(["inspect", f"diffusers:{data['dc']}", "--json", str(tmp_path / "inspect.json")]) == 0
    info = json.loads((tmp_path / "inspect.json").read_text())
    assert info["class"] == "AutoencoderDC" and info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["latents"] == {"channels": 4, "scaling_factor": SCALE, "shift_factor": None}
    assert main(["eval", "--model", f"diffusers:{data['dc']}", "--data", data["shards"], "--split", "train",
                 "--out", str(tmp_path / "eval"), "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    with torch.no_grad():  # eval reconstructs as the store decodes: its float16 latents through decode
        recon = ((model.decode(torch.from_numpy(stored).float() / SCALE).sample + 1) / 2).clamp(0, 1)
    mse = float(((recon.double() - (x.double() + 1) / 2) ** 2).mean())
    assert result["metrics"]["images"] == N and "usage" not in result["metrics"]
    assert abs(result["metrics"]["mse"] - mse) < 1e-6 and "AutoencoderDC" in result["protocol"]["reconstruction"]
    capsys.readouterr()
