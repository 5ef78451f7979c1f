"""The README's walkthrough, from your own images to samples, runs as written: every block marked
`<!-- walkthrough -->`, in order, in a fresh folder that is not the repository, with the
environment's `tokenmill` on PATH (tests/helpers/readme.py). Its quick settings (tiny presets,
`scaling.in_process`) are in the README itself; the one step on Ray (`tokenize`) starts its own
local Ray, as in a new user's shell. (The demo's follow-up blocks run on the demo's own outputs:
tests/system/test_demo_cli.py.) The fine-tuning walkthrough (`<!-- finetune-walkthrough -->`) runs the
same way, with a tiny random LlamaGen checkpoint in place of the published `vq_ds16_c2i.pt`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from helpers.llamagen import write_checkpoint
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


def test_the_finetune_walkthrough_keeps_the_codes_and_puts_both_evals_in_one_experiment(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    write_checkpoint(project / "vq_ds16_c2i.pt")  # the stand-in: vq_train.py's format, 16 px, 64 codes, random
    printed = ""
    for block in readme_blocks("finetune-walkthrough"):
        proc = run_block(block, project, user_env())
        assert proc.returncode == 0, failure(block, proc)
        printed += proc.stdout
    evaluated = re.findall(r"evaluated (\S+) on val: .* psnr=([\d.]+)", printed)  # before, after
    assert [model for model, _ in evaluated] == ["models/vq16", "runs/vq16-my-photos/model"], printed[-3000:]
    _check_experiment(project, [float(psnr) for _, psnr in evaluated])
    _check_codes_kept_and_decoder_moved(project)


def _check_experiment(project: Path, printed_psnr: list[float]) -> None:
    """Both evals (and the training run) in the experiment the README names, their metrics the printed ones."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project}/runs/mlflow.db")
    experiment = client.get_experiment_by_name("vq16-my-photos")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert {"eval-before", "eval-after", "vq16-my-photos"} <= set(runs), sorted(runs)
    for name, psnr in zip(("before", "after"), printed_psnr):
        result = json.loads((project / f"runs/eval-{name}.json").read_text())
        assert result["mlflow_run_id"] == runs[f"eval-{name}"].info.run_id
        assert runs[f"eval-{name}"].data.metrics["psnr"] == result["metrics"]["psnr"]
        assert abs(result["metrics"]["psnr"] - psnr) < 1e-3 * psnr  # printed with 4 significant digits


def _check_codes_kept_and_decoder_moved(project: Path) -> None:
    """The photos' codes through the original and the fine-tuned model are equal; the decoder's weights are not."""
    import torch
    import zarr

    from tokenmill.models.serialization import load_model
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.local_tokenize import tokenize_in_process

    codes = []
    for model in ("models/vq16", "runs/vq16-my-photos/model"):
        store = tokenize_in_process(resolve_model(str(project / model)), str(project / "shards/my-photos"),
                                    str(project / f"{Path(model).parent.name}.zarr"))
        group = zarr.open_group(store, mode="r")
        codes.append(group["codes"].oindex[group["valid"][:]])  # (56, 8, 8)
    assert codes[0].shape[0] == 56 and np.array_equal(codes[0], codes[1])
    old, new = (load_model(project / model).state_dict() for model in ("models/vq16", "runs/vq16-my-photos/model"))
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith(("encoder.", "quant_conv.", "quantizer.")))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
