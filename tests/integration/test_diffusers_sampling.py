"""The `diffusers:` adapter in this process: `--latents sample` draws a KL autoencoder's noise from
the sample's key (the same latents in any batch and order), unlike `--latents mean`; `--precision
bf16` runs the networks under autocast and gives fp32's codes and latents; fp16 is refused, in one
line, for a VAE that sets `force_upcast`; a DC-AE's latents equal `AutoencoderDC.encode(x).latent`
exactly and its decodes diffusers' decode, and a DC-AE whose config does not fit its weights is one
UserError. (Tokenizing with diffusers autoencoders on Ray: tests/integration/test_diffusers_tokenize.py.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers.diffusers import SCALE, SHIFT, SIZE, rgb_images, save_tiny_dc, save_tiny_kl, save_tiny_vq, write_rgb_shards

from tokenmill.models.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {"root": root, "kl": save_tiny_kl(root / "kl", shift_factor=SHIFT), "vq": save_tiny_vq(root / "vq"),
            "dc": save_tiny_dc(root / "dc")}


def test_kl_samples_are_seeded_by_the_sample_key(data):
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, load_tokenizer, resolve_tokenizer

    tokenizer = load_tokenizer(resolve_tokenizer(f"diffusers:{data['kl']}"), ExtractionOptions.build("sample"))
    images, labels = rgb_images(4), np.zeros(4, np.int64)
    first = tokenizer.encode(images, labels, ["a", "b", "c", "d"])["latents"]
    again = tokenizer.encode(images[[2, 0]], labels[:2], ["c", "a"])["latents"]  # other batch, other order
    np.testing.assert_allclose(again.astype(np.float32), first[[2, 0]].astype(np.float32), atol=2e-3)
    other_keys = tokenizer.encode(images[:1], labels[:1], ["z"])["latents"]
    assert np.abs(other_keys[0].astype(np.float32) - first[0].astype(np.float32)).max() > 1e-2
    mean = load_tokenizer(resolve_tokenizer(f"diffusers:{data['kl']}"), ExtractionOptions.build("mean"))
    assert np.abs(mean.encode(images, labels, list("abcd"))["latents"] - first).max() > 1e-2



def _encode_watched(model: str, latents: str | None, precision: str, images: np.ndarray) -> tuple[np.ndarray, set]:
    """The stored rows of `images` and the dtypes the encoder's first convolution put out."""
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, load_tokenizer, resolve_tokenizer

    tokenizer = load_tokenizer(resolve_tokenizer(model), ExtractionOptions.build(latents), precision=precision)
    seen = set()
    tokenizer.model.encoder.conv_in.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    rows = tokenizer.encode(images, np.zeros(len(images), np.int64), [str(i) for i in range(len(images))])
    return rows["latents" if latents else "codes"], seen


def test_bf16_runs_under_autocast_and_gives_fp32s_codes_and_latents(data, one_thread):
    images = rgb_images(16)
    fp32, seen32 = _encode_watched(f"diffusers:{data['vq']}", None, "fp32", images)
    bf16, seen16 = _encode_watched(f"diffusers:{data['vq']}", None, "bf16", images)
    assert seen32 == {torch.float32} and seen16 == {torch.bfloat16}  # bf16 ran under autocast
    assert fp32.shape == (16, 16, 16) and len(np.unique(fp32)) >= 8  # codes vary: agreement means something
    assert (fp32 == bf16).mean() >= 0.99, (fp32 == bf16).mean()
    mean32, _ = _encode_watched(f"diffusers:{data['kl']}", "mean", "fp32", images)
    mean16, seen = _encode_watched(f"diffusers:{data['kl']}", "mean", "bf16", images)
    assert seen == {torch.bfloat16} and mean16.dtype == np.float16
    np.testing.assert_allclose(mean16.astype(np.float32), mean32.astype(np.float32), atol=0.02 * np.abs(mean32).max())


def test_fp16_is_refused_in_one_line_for_a_vae_that_sets_force_upcast(data, tmp_path, capsys):
    from tokenmill.jobs.cli import main as cli_main

    shards = write_rgb_shards(str(tmp_path / "shards"), tmp_path / "source", 4)
    code = cli_main(["tokenize", "--model", f"diffusers:{data['kl']}", "--data", shards, "--out",
                     str(tmp_path / "kl.zarr"), "--latents", "mean", "--precision", "fp16"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "force_upcast" in err[0] and "--precision bf16" in err[0], err

def test_dc_latents_equal_diffusers_encode_exactly_and_decodes_its_decode(data):
    from diffusers import AutoencoderDC

    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, load_tokenizer, resolve_tokenizer

    # no --latents: a DC-AE's latents are deterministic; its config has no sample_size, so --size
    tokenizer = load_tokenizer(resolve_tokenizer(f"diffusers:{data['dc']}"), ExtractionOptions.build(size=SIZE))
    assert [(s.name, s.row_shape, s.dtype) for s in tokenizer.specs] == [("latents", (4, 16, 16), "float16")]
    assert tokenizer.lineage()["scaling_factor"] == SCALE and tokenizer.lineage()["shift_factor"] == 0.0
    images = rgb_images(6)
    stored = tokenizer.encode(images, np.zeros(6, np.int64), list("abcdef"))["latents"]  # (6, 4, 16, 16) float16
    model = AutoencoderDC.from_pretrained(data["dc"]).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (6, 3, 32, 32) in [-1, 1]
    with torch.no_grad():
        expected = (model.encode(x).latent * SCALE).half().numpy()  # the scale a diffusion model trains on
        reference = ((model.decode(torch.from_numpy(stored).float() / SCALE).sample + 1) / 2).clamp(0, 1)
    assert stored.dtype == np.float16 and np.array_equal(stored, expected)
    torch.testing.assert_close(tokenizer.decode([stored]), reference, atol=1e-5, rtol=0)
    mean = load_tokenizer(resolve_tokenizer(f"diffusers:{data['dc']}"), ExtractionOptions.build("mean", size=SIZE))
    assert np.array_equal(mean.encode(images, np.zeros(6, np.int64), list("abcdef"))["latents"], stored)
    with pytest.raises(UserError, match="no flag or --latents mean"):  # no posterior to sample from
        load_tokenizer(resolve_tokenizer(f"diffusers:{data['dc']}"), ExtractionOptions.build("sample"))


@pytest.mark.parametrize("change, message", [
    ({"latent_channels": 8}, "does not fit its weights: Error"),  # a size mismatch
    ({"encoder_layers_per_block": [2, 1]}, r"does not fit its weights \(missing encoder.down_blocks.0.1.conv1.bias.*; unexpected"),
    ({"encoder_block_types": ["Attention", "ResBlock"]}, "does not fit its weights: Block with block_type"),
])
def test_a_dc_config_that_does_not_fit_its_weights_is_one_user_error(data, tmp_path, capsys, change, message):
    from tokenmill.jobs.cli import main
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, load_tokenizer, resolve_tokenizer

    folder = shutil.copytree(data["dc"], tmp_path / "dc")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message) as caught:
        load_tokenizer(resolve_tokenizer(f"diffusers:{folder}"), ExtractionOptions.build(size=SIZE))
    assert "\n" not in str(caught.value)
    capsys.readouterr()  # and on the command line (eval loads the model before reading any shard): one line, exit 2
    assert main(["eval", "--model", f"diffusers:{folder}", "--data", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit its weights" in err and "Traceback" not in err
