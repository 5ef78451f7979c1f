"""The training engine's loop, in this process (no Ray): every preset of every task trains,
validates and logs its images; resume, checkpoints, EMA, early stopping, accumulation,
throughput units and the driver's checks."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from helpers import CONFIGS
from helpers.engine import grey_shards, multiscale_prior_store, prior_store, run_in_process, shrink
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tokenmill.models.errors import UserError
from tokenmill.pipeline.prior.config import load_prior_config
from tokenmill.pipeline.registry.config import load_retrain_config
from tokenmill.pipeline.training.config import load_train_config
from tokenmill.pipeline.training.tasks.adversarial import AdversarialTask
from tokenmill.pipeline.training.tasks.prior import PriorTask
from tokenmill.pipeline.training.tasks.tokenizer import TokenizerTask

PRESETS = sorted(CONFIGS.glob("*.yaml"))
# The image views each model family must show at a validation (tasks/image_validation.py).
VAE_IMAGES = {"reconstructions", "samples", "interpolations"}
VQ_IMAGES = {"reconstructions", "codebook_usage"}
EXPECTED_IMAGES = {"vae": VAE_IMAGES, "cvae": VAE_IMAGES, "hvae": VAE_IMAGES, "vqvae": VQ_IMAGES,
                   "vqvae2": VQ_IMAGES, "vqgan": VQ_IMAGES, "prior": {"samples"}, "maskgit": {"samples"},
                   "var": {"samples"}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """64 random 32x32 grey images: ~45 train, ~19 val (enough for one batch of image views)."""
    return grey_shards(tmp_path_factory.mktemp("loop-shards"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return prior_store(tmp_path_factory.mktemp("loop-store"))


@pytest.fixture(scope="module")
def scale_store(tmp_path_factory) -> str:
    """A two-scale store (2x2 then 4x4 codes): what a VAR preset trains on."""
    return multiscale_prior_store(tmp_path_factory.mktemp("loop-scale-store"))


def preset_task(preset: Path, shards: str, store: str, root: Path, *overrides: str):
    """The task `tokenmill train` / `train-prior` / `retrain` would train for `preset`, shrunk."""
    text = yaml.safe_load(preset.read_text())
    sets = [*shrink(), f"run.root={root}", f"run.name={preset.stem}", *overrides]
    if "store" in text.get("data", {}):
        return PriorTask(load_prior_config(preset, [*sets, f"data.store={store}", "train.sample_every=2"]))
    if "versions" in text:  # a retrain preset: the challenger it trains
        retrain = load_retrain_config(preset, sets)
        return TokenizerTask(retrain.challenger_config(shards, preset.stem, None, ""))
    sets.append(f"data.shards={shards}")
    if text["model"].get("image_size", 32) > 32:  # the same architecture at 32 px: a quarter of the work
        sets += ["model.image_size=32", "data.transform.size=32"]
    if "loss" in text:  # the LPIPS weights are not shipped: the adversarial tests use random ones
        return AdversarialTask(load_train_config(preset, [*sets, "loss.perceptual_weight=0"]))
    return TokenizerTask(load_train_config(preset, sets))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_trains_validates_and_logs_its_images(preset, shards, store, sqlite_tracking, tmp_path, request):
    if yaml.safe_load(preset.read_text()).get("model", {}).get("kind") == "var":  # next-scale: a multi-scale store
        store = request.getfixturevalue("scale_store")
    task = preset_task(preset, shards, store, tmp_path)
    run = run_in_process(task, tmp_path / "checkpoints", sqlite_tracking, run_name=f"preset-{preset.stem}")
    report = run.context.reports[-1]
    assert run.state.step == report["step"] == 2
    val = {k: v for k, v in report.items() if k.startswith("val/")}
    assert val and all(math.isfinite(v) for v in val.values()), val
    assert (run.checkpoint() / "model" / "model.safetensors").is_file()

    client = mlflow.MlflowClient(sqlite_tracking)
    run_id = client.get_experiment_by_name(task.config.tracking.experiment).experiment_id
    (found,) = client.search_runs([run_id], f"tags.mlflow.runName = 'preset-{preset.stem}'")
    kind = task.config.model.kind
    for folder in EXPECTED_IMAGES[kind]:
        names = [Path(a.path).name for a in client.list_artifacts(found.info.run_id, folder)]
        assert any(name.endswith("step_0000002.png") for name in names), (folder, names)
    assert {"train/loss", "train/grad_norm", "train/lr"} <= set(found.data.metrics)


def prior_task(store: str, root: Path, *overrides: str) -> PriorTask:
    config = load_prior_config(CONFIGS / "debug_prior.yaml", [
        f"data.store={store}", f"run.root={root}", "train.sample_every=0", "train.val_every=3",
        "train.checkpoint_every=3", *overrides])
    return PriorTask(config)


def vq_task(shards: str, root: Path, *overrides: str) -> TokenizerTask:
    config = load_train_config(CONFIGS / "debug_vqvae.yaml", [
        f"data.shards={shards}", f"run.root={root}", "train.val_every=3", "train.checkpoint_every=3",
        "train.batch_size=8", "tracking.log_images=false", *overrides])
    return TokenizerTask(config)


def weights(state: dict, part: str = "model", key: str = "module") -> dict[str, torch.Tensor]:
    return state["parts"][part][key]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.mark.parametrize("kind", ["prior", "vqvae"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(kind, shards, store, tmp_path):
    """Weights, EMA, optimizer moments and counters after 3 + 3 steps (killed, resumed from the
    step-3 checkpoint) equal those after 6 uninterrupted steps: the data order, RNG and state
    all come back. The prior's store holds 48 items in batches of 4 (12 per epoch); the VQ-VAE's
    45 images in batches of 8 (5 per epoch), so its resume crosses an epoch boundary."""
    common = ["optim.ema_decay=0.9", "optim.total_steps=6"]  # one LR schedule for the 3- and 6-step runs
    make = (lambda root, *o: prior_task(store, root, *common, *o)) if kind == "prior" else (
        lambda root, *o: vq_task(shards, root, *common, *o))
    whole = run_in_process(make(tmp_path / "whole", "train.steps=6"), tmp_path / "whole")
    run_in_process(make(tmp_path / "parts", "train.steps=3"), tmp_path / "parts")
    resumed = run_in_process(make(tmp_path / "parts", "train.steps=6"), tmp_path / "parts")
    assert resumed.context.reports[-1]["resumed_from_step"] == 3 and resumed.state.step == 6
    a, b = whole.train_state(), resumed.train_state()
    assert a["state"] == b["state"]
    for key in ("module", "ema"):
        assert_same(weights(a, key=key), weights(b, key=key))
    moments = lambda s: [v["exp_avg"] for v in s["parts"]["model"]["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))


def test_checkpoint_holds_every_part_and_the_exported_model_is_the_ema(store, tmp_path):
    from tokenmill.models.serialization import load_model

    run = run_in_process(prior_task(store, tmp_path, "train.steps=3", "optim.ema_decay=0.9"), tmp_path)
    state = run.train_state()
    assert state["format"] == 2 and list(state["parts"]) == ["model"]
    model = state["parts"]["model"]
    assert (model["steps"], model["updates"], model["skipped"]) == (3, 3, 0) and model["optimizer"]["state"]
    assert set(state["extra"]) == {"step", "task"} and len(state["rng"]) == 1
    assert state["state"]["step"] == 3 and state["state"]["last_val"]["val/bits_per_token"] > 0
    exported = load_model(run.checkpoint() / "model").state_dict()
    assert_same(exported, model["ema"])
    assert any(not torch.equal(exported[k], model["module"][k]) for k in exported)  # EMA, not the live weights


def test_early_stop_ends_the_run_and_is_reported(shards, tmp_path):
    """val/images never changes: with patience 1 the second validation stops the run."""
    task = vq_task(shards, tmp_path, "train.steps=30", "train.val_every=2", "train.checkpoint_every=30",
                   "train.early_stop.metric=val/images", "train.early_stop.mode=max", "train.early_stop.patience=1")
    run = run_in_process(task, tmp_path / "c")
    assert run.state.step == 4 and run.state.stopped_early
    assert run.context.reports[-1]["stopped_early"] and run.context.reports[-1]["step"] == 4


def test_a_failing_run_ends_its_mlflow_run_as_failed(shards, sqlite_tracking, tmp_path, monkeypatch):
    """In process, a run that raises must not stay active: the next `mlflow.start_run` would fail."""
    task = vq_task(shards, tmp_path, "train.steps=4")

    def broken(*_):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(task, "validate", broken)
    with pytest.raises(RuntimeError, match="validation broke"):
        run_in_process(task, tmp_path / "c", sqlite_tracking, run_name="failing")
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(sqlite_tracking)
    experiment = client.get_experiment_by_name(task.config.tracking.experiment)
    (found,) = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'failing'")
    assert found.info.status == "FAILED"


def test_accumulated_micro_batches_train_as_one_bigger_batch(store, tmp_path):
    """2 micro-batches of 4 per step give the weights 1 batch of 8 gives (the prior's partition
    hands out the same 8 items either way; no dropout, so the losses are deterministic)."""
    common = ["train.steps=2", "model.label_dropout=0", "optim.ema_decay=0"]
    one = run_in_process(prior_task(store, tmp_path / "one", *common, "train.batch_size=8"), tmp_path / "one")
    two = run_in_process(prior_task(store, tmp_path / "two", *common, "train.batch_size=4", "train.accumulate=2"),
                         tmp_path / "two")
    a, b = weights(one.train_state()), weights(two.train_state())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], weights(run_in_process(
        prior_task(store, tmp_path / "short", *common, "train.batch_size=4"), tmp_path / "short").train_state())[k])
        for k in a)  # and 1 micro-batch of 4 is not the same thing


def test_throughput_is_counted_in_each_tasks_own_unit(shards, store, sqlite_tracking, tmp_path):
    """A tokenizer reports images per second, a prior sequences and tokens per second."""
    prior = run_in_process(prior_task(store, tmp_path / "p", "train.steps=3"), tmp_path / "p", sqlite_tracking,
                           run_name="throughput-prior")
    images = run_in_process(vq_task(shards, tmp_path / "v", "train.steps=3"), tmp_path / "v")
    assert {"seq_per_s", "tokens_per_s"} <= set(prior.context.reports[-1]) and "img_per_s" not in prior.context.reports[-1]
    assert prior.context.reports[-1]["tokens_per_s"] == pytest.approx(4 * prior.context.reports[-1]["seq_per_s"])
    assert "img_per_s" in images.context.reports[-1] and "seq_per_s" not in images.context.reports[-1]
    client = mlflow.MlflowClient(sqlite_tracking)
    experiment = client.get_experiment_by_name(prior.task.config.tracking.experiment).experiment_id
    (found,) = client.search_runs([experiment], "tags.mlflow.runName = 'throughput-prior'")
    assert {"train/seq_per_s", "train/tokens_per_s"} <= set(found.data.metrics)
    assert "train/img_per_s" not in found.data.metrics


def test_train_prior_refuses_node_local_storage_on_a_multi_node_cluster(store, tmp_path, monkeypatch):
    """The driver's storage check runs for every task, the prior's included (before any Ray work)."""
    from tokenmill.pipeline.training import cluster_check
    from tokenmill.pipeline.training.driver import train_prior

    monkeypatch.setattr(cluster_check, "cluster_nodes", lambda: 3)
    config = load_prior_config(CONFIGS / "debug_prior.yaml", [f"data.store={store}", f"run.root={tmp_path}"])
    with pytest.raises(UserError, match=r"3 nodes .*data\.store=.* is a local path"):
        train_prior(config)
    assert not (tmp_path / "ray").exists()


def test_warm_start_loads_the_given_weights_before_training(store, tmp_path):
    from tokenmill.models.serialization import load_model

    first = run_in_process(prior_task(store, tmp_path / "a", "train.steps=3"), tmp_path / "a")
    source = first.checkpoint() / "model"
    warm = run_in_process(prior_task(store, tmp_path / "b", "train.steps=1", "optim.lr=1e-12",
                                     f"train.init_from={source}"), tmp_path / "b")
    loaded, trained = load_model(source).state_dict(), weights(warm.train_state())
    assert loaded.keys() == trained.keys()
    assert all(torch.allclose(loaded[k], trained[k], atol=1e-8) for k in loaded)


def test_the_prior_step_runs_its_forward_under_autocast_and_backward_and_update_outside(store, tmp_path):
    """bf16 on the CPU: the prior's forward is autocast, its backward and optimizer step are not."""
    seen: dict[str, list[bool]] = {"forward": [], "backward": [], "update": []}

    class Watched(PriorTask):
        def build(self):
            parts = super().build()
            module = parts["model"][0]
            module.register_forward_hook(lambda *_: seen["forward"].append(torch.is_autocast_enabled("cpu")))
            module.embed.weight.register_hook(lambda g: seen["backward"].append(torch.is_autocast_enabled("cpu")))
            return parts

    hook = register_optimizer_step_pre_hook(
        lambda *_: seen["update"].append(torch.is_autocast_enabled("cpu")))
    try:
        config = prior_task(store, tmp_path, "train.steps=2", "train.precision=bf16").config
        run_in_process(Watched(config), tmp_path)
    finally:
        hook.remove()
    assert seen["forward"][:2] == [True, True]  # the two steps' forwards (validation runs after them)
    assert seen["backward"] == [False, False] and seen["update"] == [False, False]


def test_a_vae_trains_in_bf16_with_importance_weighted_validation(shards, tmp_path):
    """The KL schedule per step and the IW-NLL validation of the VAE family, under bf16 autocast."""
    config = load_train_config(CONFIGS / "debug_vae.yaml", [
        f"data.shards={shards}", f"run.root={tmp_path}", "train.precision=bf16", "tracking.log_images=false",
        "train.steps=4", "train.val_every=4", "train.checkpoint_every=4", "train.batch_size=8"])
    report = run_in_process(TokenizerTask(config), tmp_path).context.reports[-1]
    assert report["step"] == 4
    assert 0 < report["val/nll_nats"] <= report["val/elbo_nats"] + 1e-3  # the IW bound is at least as tight


def test_a_compiled_run_trains_the_same_weights_and_checkpoints_plain_keys(store, tmp_path):
    """train.compile wraps the trained modules in torch.compile (the eager backend here: the
    graph capture without code generation); checkpoints, the EMA and exports keep the plain
    module's keys (the EMA shadows the unwrapped module)."""
    plain = run_in_process(prior_task(store, tmp_path / "plain", "train.steps=3"), tmp_path / "plain")
    compiled = run_in_process(prior_task(store, tmp_path / "compiled", "train.steps=3", "train.compile=eager",
                                       "optim.ema_decay=0.9"),
                              tmp_path / "compiled")
    a, b = weights(plain.train_state()), weights(compiled.train_state())
    ema = weights(compiled.train_state(), key="ema")
    assert not any("_orig_mod" in k for k in b) and set(ema) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("preset", ["debug_vqvae", "debug_vae", "debug_maskgit"])
def test_validation_runs_under_the_training_precision_with_fp32_metrics(preset, shards, store, tmp_path, one_thread):
    """train.precision=bf16: the loop's validation forward runs under autocast (a hook on the first
    layer sees bf16) and its metrics are finite and close to an fp32 validation of the same weights."""
    from tokenmill.pipeline.training.context import LocalContext
    from tokenmill.pipeline.training.loop import LoopSpec, RankRun

    task = preset_task(CONFIGS / f"{preset}.yaml", shards, store, tmp_path, "train.precision=bf16")
    task.prepare("")
    torch.manual_seed(0)
    run = RankRun.start(task, LocalContext(tmp_path, task.inputs(in_process=True).datasets), LoopSpec())
    run.step([next(batch for _, batch in task.batches(0, 0))])  # one step: codebooks initialised
    model = run.main.eval_module()
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    seen: list[torch.dtype] = []
    first.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    torch.manual_seed(1)  # the VAE's posterior samples: the same draws in both passes
    run.validate()
    bf16, seen_bf16 = run.state.last_val, set(seen)
    seen.clear()
    torch.manual_seed(1)
    fp32 = task.validate(model, "fp32")
    assert seen_bf16 == {torch.bfloat16} and set(seen) == {torch.float32}, (seen_bf16, set(seen))
    assert bf16.keys() == fp32.keys() and all(math.isfinite(v) for v in bf16.values()), bf16
    for name, value in fp32.items():
        counted = name.startswith(("val/usage", "val/perplexity"))  # code counts: a near-tie code may flip in bf16
        rel, abs_ = (0.1, 0.07) if counted else (0.02, 1e-3)  # 0.07: two codes of the debug preset's 32
        assert bf16[name] == pytest.approx(value, rel=rel, abs=abs_), (name, bf16[name], value)
