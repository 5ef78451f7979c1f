"""Run the training engine in this process: a task, a LocalContext, the real loop, no Ray.

    config = load_train_config(preset, shrink(steps=2) + [f"data.shards={shards}", f"run.root={tmp}"])
    run = run_in_process(TokenizerTask(config), tmp / "checkpoints", tracking_uri)
    run.state.step, run.context.reports[-1], run.checkpoint() / "train_state.pt"
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np


def shrink(steps: int = 2, batch_size: int = 8) -> list[str]:
    """--set overrides that make any preset a few-second run: `steps` steps, one validation and
    checkpoint at the end, logging every step, images on, one CPU worker."""
    return [f"train.steps={steps}", f"train.val_every={steps}", f"train.checkpoint_every={steps}",
            "train.log_every=1", f"train.batch_size={batch_size}", "scaling.num_workers=1", "scaling.use_gpu=false",
            "run.max_failures=0", "tracking.log_images=true"]


@dataclasses.dataclass
class InProcessRun:
    task: Any
    context: Any  # pipeline.training.context.LocalContext
    state: Any  # the final TrainState

    def checkpoint(self) -> Path:
        return self.context.checkpoints()[-1]

    def train_state(self) -> dict[str, Any]:
        import torch

        return torch.load(self.checkpoint() / "train_state.pt", weights_only=True)


def run_in_process(task: Any, folder: Path, tracking_uri: str | None = None, run_name: str | None = None,
                   **context_options: Any) -> InProcessRun:
    """Prepare `task` as the driver does, then run its loop on one in-process rank. With a
    `tracking_uri`, rank 0 logs to a run of that store (found again by `run_name` on a rerun)."""
    from tokenmill.pipeline.registry import tracking
    from tokenmill.pipeline.training.context import LocalContext
    from tokenmill.pipeline.training.loop import LoopSpec, run_rank

    task.prepare(tracking_uri or "")
    run_id = None
    if tracking_uri:
        config = task.config
        run_id = tracking.get_or_create_run(tracking_uri, config.tracking.experiment, run_name or config.run.name,
                                            tags={}, run_dir=folder)
    context = LocalContext(folder, task.inputs(in_process=True).datasets, **context_options)
    state = run_rank(task, context, LoopSpec(tracking_uri, run_id))
    return InProcessRun(task, context, state)


def grey_shards(root: Path, n: int = 64, size: int = 32, maxcount: int = 32) -> str:
    """`n` random `size`² grey images as shards (70 % train, 30 % val)."""
    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    np.save(root / "images.npy", np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8))
    write_shards(str(root / "images.npy"), str(root / "shards"), ShardSettings(maxcount=maxcount, val_fraction=0.3),
                 progress=False)
    return str(root / "shards")


def rgb_shards(root: Path, n: int = 48, size: int = 16) -> str:
    """`n` smooth random `size`² RGB images (upsampled 4x4 noise): ~70 % train, ~30 % val."""
    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    coarse = np.random.default_rng(0).integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    np.save(root / "images.npy", coarse.repeat(size // 4, axis=1).repeat(size // 4, axis=2))
    write_shards(str(root / "images.npy"), str(root / "shards"), ShardSettings(maxcount=24, val_fraction=0.3),
                 progress=False)
    return str(root / "shards")


PRIOR_K = 64  # the learnable store's codebook; 8x8 images -> 2x2 codes
PRIOR_COUNTS, PRIOR_SPLITS = [20, 13, 10, 15], ["train", "train", "val", "train"]  # 48 train items, 10 val


def learnable_store(url: str, tokenizer: Path | None, levels: int = 1) -> str:
    """A finished store of 2x2 codes (and 4x4 with `levels=2`; labels j % 7) whose codes are a
    function of the label, so a prior can learn them; its lineage names `tokenizer` (None: a
    model that does not exist)."""
    import zarr

    from helpers.tokens import build_store

    _, specs, _ = build_store(url, PRIOR_COUNTS, PRIOR_SPLITS, levels=levels, codebook_size=PRIOR_K)
    group = zarr.open_group(url, mode="r+")
    labels = group["labels"][:]
    for spec in specs:
        size = int(np.prod(spec.row_shape))
        group[spec.name][:] = ((np.maximum(labels, 0) * 5)[:, None] + np.arange(size)).reshape(
            -1, *spec.row_shape) % PRIOR_K
    sha = hashlib.sha256((tokenizer / "model.safetensors").read_bytes()).hexdigest() if tokenizer else "0" * 64
    lineage = dict(group.attrs["lineage"], model_uri=str(tokenizer or Path(url).parent / "no-such-model"),
                   weights_sha256=sha)
    group.attrs.update({"lineage": lineage})
    return url


def prior_store(root: Path) -> str:
    """A learnable store under `root` with its tokenizer (an untrained 8x8 VQ-VAE) beside it."""
    from helpers.tokens import make_vqvae

    return learnable_store(str(root / "tokens.zarr"), make_vqvae(root / "tokenizer", codebook_size=PRIOR_K,
                                                                 image_size=8))


def multiscale_prior_store(root: Path) -> str:
    """A learnable store of two scales from one codebook, 2x2 then 4x4 codes (what a VAR prior
    reads), with its tokenizer beside it: an untrained 16 px VQ-VAE-2, whose levels have those
    shapes (the multi-scale tokenizer is not needed to test the prior)."""
    from helpers.tokens import make_vqvae2

    return learnable_store(str(root / "scales.zarr"), make_vqvae2(root / "tokenizer", codebook_size=PRIOR_K),
                           levels=2)
