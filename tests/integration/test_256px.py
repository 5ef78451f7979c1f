"""The 256-px path: img2dataset-layout shards (KEY.jpg + KEY.json + KEY.txt) of 256x256 photo-like
images, tokenized on local Ray with a x16 VQ-VAE (configs/debug_vqvae_f16.yaml) into 16x16 codes.
(The random-resized-crop transform at 256: tests/unit/test_256px_crop.py; the preset trained
through the engine: tests/unit/test_engine_loop.py.)"""

from __future__ import annotations

import numpy as np
import zarr
from helpers import CONFIGS


def test_img2dataset_shards_at_256px_tokenize_with_a_x16_model(ray_local, tmp_path):
    import torch

    from tokenmill.models.serialization import build_model, save_model
    from tokenmill.pipeline.shards.synthetic import photo_like_images, write_img2dataset_shards
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.training.config import load_train_config

    pictures = photo_like_images(10, size=256, seed=1)
    write_img2dataset_shards(pictures, tmp_path / "shards", per_shard=4)  # 4, 4, 2: no manifest yet
    config = load_train_config(CONFIGS / "debug_vqvae_f16.yaml")
    torch.manual_seed(0)
    model = build_model(config.model)
    model.train()(torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255)  # k-means init: codes vary
    save_model(model.eval(), tmp_path / "model", extra={"transform": config.data.transform.for_eval().model_dump()})

    summary = tokenize_dataset(str(tmp_path / "model"), str(tmp_path / "shards"), str(tmp_path / "tokens.zarr"),
                               TokenizeOptions(batch_size=4, actors=1, decode_threads=2))
    store = zarr.open_group(str(tmp_path / "tokens.zarr"), mode="r")
    assert summary.samples == 10 and summary.corrupt == 0 and summary.input_shards == 3
    assert store["codes"].shape[1:] == (16, 16) and summary.lineage["token_shape"] == [[16, 16]]
    assert summary.lineage["transform"]["resize"] == "center-crop"  # tokenization never crops at random
    keys = sorted(k for k in store["keys"][:].tolist() if k)
    assert keys == sorted(f"{s:05d}{i:04d}" for s, n in enumerate((4, 4, 2)) for i in range(n))
    assert len(np.unique(store["codes"][:])) > 1


