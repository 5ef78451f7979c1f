"""The `diffusers:` adapter in this process: `--latents sample` draws a KL autoencoder's noise from
the sample's key (the same latents in any batch and order), unlike `--latents mean`. (Tokenizing
with diffusers autoencoders on Ray: tests/integration/test_diffusers_tokenize.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.diffusers import SHIFT, rgb_images, save_tiny_kl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {"root": root, "kl": save_tiny_kl(root / "kl", shift_factor=SHIFT)}


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

