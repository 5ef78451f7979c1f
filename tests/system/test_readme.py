"""The README's walkthrough, from your own images to samples, runs as written: every block marked
`<!-- walkthrough -->`, in order, in a fresh folder that is not the repository, with the
environment's `tokenmill` on PATH (tests/helpers/readme.py). Its quick settings (tiny presets,
`scaling.in_process`) are in the README itself; the one step on Ray (`tokenize`) starts its own
local Ray, as in a new user's shell. (The demo's follow-up blocks run on the demo's own outputs:
tests/system/test_demo_cli.py.)"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from helpers.readme import failure, readme_blocks, run_block, user_env

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_walkthrough_runs_as_written_and_each_step_makes_the_next_ones_input(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    env = user_env()
    printed = ""
    for block in readme_blocks("walkthrough"):
        proc = run_block(block, project, env)
        assert proc.returncode == 0, failure(block, proc)
        printed += proc.stdout
    psnr = float(re.search(r"evaluated .* psnr=([\d.]+)", printed).group(1))  # eval's line
    assert 5 < psnr < 60, printed[-3000:]
    _check_outputs(project)


def _check_outputs(project: Path) -> None:
    """What each step promised, read back: the steps ran on each other's outputs, not only exited 0."""
    import pyarrow.parquet as pq
    import zarr

    manifest = json.loads((project / "shards/my-images/manifest.json").read_text())
    images = len(list((project / "my-images").rglob("*.png")))
    assert images > 0 and sum(shard["count"] for shard in manifest["shards"]) == images
    tokenizer = project / "runs/my-tokenizer/model"
    assert (project / "runs/my-eval/reconstructions.png").read_bytes()[:8] == PNG
    store = zarr.open_group(str(project / "runs/my-tokens.zarr"), mode="r")
    valid = store["valid"][:]
    assert valid.sum() == images and set(store["labels"].oindex[valid]) == set(range(10))
    lineage = json.loads((project / "runs/my-prior/model/lineage.json").read_text())
    assert lineage["tokenizer_sha256"] == hashlib.sha256((tokenizer / "model.safetensors").read_bytes()).hexdigest()
    labels = np.load(project / "runs/my-samples/labels.npy")
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 8)  # --n 8, a row per class
    assert np.load(project / "runs/my-samples/codes.npy").max() < lineage["vocab"]["codebook_size"]
    for png in ("runs/my-samples/samples.png", "runs/my-decoded/grid-00000.png"):
        assert (project / png).read_bytes()[:8] == PNG
    train = pq.read_table(project / "runs/my-tokens-train.parquet")
    assert train.num_rows == sum(shard["count"] for shard in manifest["shards"] if shard["split"] == "train")
