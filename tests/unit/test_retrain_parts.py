"""The parts of `tokenmill retrain` that need no Ray and no server: the decision rule and data
version discovery. (The workflow end to end and the registry lock: tests/integration/test_retrain.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS
from helpers.jobs import write_digits_shards

from tokenmill.models.vae import VAEConfig
from tokenmill.pipeline.registry import promotion
from tokenmill.pipeline.registry.config import load_retrain_config
from tokenmill.pipeline.shards.manifest import read_manifest, write_manifest
from tokenmill.pipeline.shards.versions import newest_version

CONFIG = str(CONFIGS / "debug_retrain_vqvae.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """builtin:digits as PNG shards of 600 with a manifest (a data version)."""
    return write_digits_shards(tmp_path_factory.mktemp("digits"), 600)


@pytest.mark.parametrize(("kind", "challenger", "champion", "margin", "promote"), [
    ("vqvae", {"val/psnr": 20.0, "val/usage": 0.5}, None, 0.0, True),
    ("vqvae", {"val/psnr": 20.2, "val/usage": 0.5}, {"val/psnr": 20.0}, 0.1, True),
    ("vqvae", {"val/psnr": 20.05, "val/usage": 0.5}, {"val/psnr": 20.0}, 0.1, False),
    ("vqvae", {"val/psnr": 20.0, "val/usage": 0.5}, {"val/psnr": 20.0}, 0.0, False),  # a tie keeps the champion
    ("vqvae", {"val/psnr": 30.0, "val/usage": 0.01}, {"val/psnr": 20.0}, 0.0, False),  # collapsed codebook
    ("vqvae", {"val/psnr": float("nan"), "val/usage": 0.5}, None, 0.0, False),
    ("vae", {"val/nll_nats": 90.0}, {"val/nll_nats": 100.0}, 5.0, True),  # lower NLL is better
    ("vae", {"val/nll_nats": 98.0}, {"val/nll_nats": 100.0}, 5.0, False),
])
def test_decision_rule(kind, challenger, champion, margin, promote):
    from tokenmill.models.vae import VAEConfig

    floor = 0.05 if kind == "vqvae" else 0.0
    config = load_retrain_config(CONFIG, [f"promotion.margin={margin}", f"promotion.usage_floor={floor}"])
    if kind == "vae":
        config = config.model_copy(update={"model": VAEConfig()})
    assert promotion.decide(config, challenger, champion).promote is promote


def test_newest_version_is_the_greatest_complete_folder_name(digits, tmp_path):
    for name in ("2025-01-01", "2025-02-01", "2025-03-01"):
        shutil.copytree(digits, tmp_path / name)
    (tmp_path / "2025-04-01").mkdir()  # no manifest yet
    manifest = read_manifest(str(tmp_path / "2025-03-01"))
    write_manifest(str(tmp_path / "2025-03-01"), {**manifest, "complete": False})  # still being written
    found = newest_version(str(tmp_path))
    assert (found.name, found.url) == ("2025-02-01", str(tmp_path / "2025-02-01"))



def test_a_challenger_starts_from_the_champion_else_from_the_configured_init_from():
    """No champion yet: the first challenger warm-starts from `train.init_from` (e.g. a published checkpoint)."""
    config = load_retrain_config(CONFIG, ["train.init_from=taming:logs/vqgan_imagenet_f16_1024"])
    assert config.challenger_config("v1", "c", None, "").train.init_from == "taming:logs/vqgan_imagenet_f16_1024"
    assert config.challenger_config("v1", "c", "models:/tok/3", "").train.init_from == "models:/tok/3"


SCORES = {"val/psnr": 20.0, "val/usage": 0.5, "val/lpips": 0.20, "downstream/prior_bits": 3.0}


@pytest.mark.parametrize(("overrides", "challenger", "promote"), [
    (["promotion.metric=prior_bits", "promotion.margin=0.5"], {"downstream/prior_bits": 2.0}, True),  # fewer bits win
    (["promotion.metric=prior_bits", "promotion.margin=1.5"], {"downstream/prior_bits": 2.0}, False),  # not by 1.5
    (["promotion.metric=prior_bits"], {"downstream/prior_bits": 3.5}, False),
    (["promotion.metric=lpips", "promotion.margin=0.01"], {"val/lpips": 0.15}, True),  # lower LPIPS wins
    (["promotion.metric=usage"], {"val/usage": 0.6}, True),  # higher usage wins
    (["promotion.metric=usage"], {"val/usage": 0.4}, False),
    (["promotion.metric=psnr", "promotion.direction=min"], {"val/psnr": 19.0}, True),  # a direction overrides
    (["promotion.metric=prior_bits", "promotion.direction=max"], {"downstream/prior_bits": 2.0}, False),
])
def test_promotion_by_any_metric_in_its_direction_with_a_margin(overrides, challenger, promote):
    config = load_retrain_config(CONFIG, overrides)
    decision = promotion.decide(config, SCORES | challenger, SCORES)
    assert decision.promote is promote, decision.reason
    metric = challenger.popitem()[0]
    assert decision.metric == metric and metric in decision.reason
    assert [row["metric"] for row in decision.table if row["decided"]] == [metric]


def test_the_decision_table_shows_every_metric_and_which_one_decided():
    """prior_bits decides for the challenger although PSNR and LPIPS favour the champion."""
    config = load_retrain_config(CONFIG, ["promotion.metric=prior_bits", "promotion.margin=0.25"])
    challenger = {"val/psnr": 18.0, "val/usage": 0.5, "val/lpips": 0.25, "val/images": 100.0,
                  "downstream/prior_bits": 1.0}
    decision = promotion.decide(config, challenger, SCORES)
    assert decision.promote and decision.margin == 0.25 and not decision.higher_is_better
    rows = {row["metric"]: row for row in decision.table}
    assert set(rows) == set(challenger)  # every metric of either model
    assert rows["downstream/prior_bits"] == {"metric": "downstream/prior_bits", "challenger": 1.0, "champion": 3.0,
                                             "higher_is_better": False, "better": "challenger", "decided": True}
    assert rows["val/psnr"]["better"] == "champion" and rows["val/lpips"]["better"] == "champion"
    assert rows["val/usage"]["better"] == "tie" and rows["val/images"]["better"] is None  # no direction: no verdict
    assert rows["val/images"]["champion"] is None
    summary = decision.to_json()
    assert summary["metric"] == "downstream/prior_bits" and summary["direction"] == "min" and len(summary["table"]) == 5
    tags = promotion.decision_tags("v1", decision, "3", challenger, SCORES)
    assert (tags["decided_by"], tags["direction"], tags["margin"]) == ("downstream/prior_bits", "min", "0.25")


def test_metrics_that_cannot_be_computed_are_refused_before_training(tmp_path):
    from tokenmill.models.errors import UserError
    from tokenmill.models.vae import VAEConfig
    from tokenmill.pipeline.config import ConfigError
    from tokenmill.pipeline.registry.downstream import check_metric

    with pytest.raises(ConfigError, match="promotion.metric 'bits' is not one of psnr"):
        load_retrain_config(CONFIG, ["promotion.metric=bits"])
    absent = f"promotion.inception.path={tmp_path / 'inception.pth'}"
    with pytest.raises(UserError, match="^promotion.metric rfid needs FID's Inception weights: .*inception.pth"):
        check_metric(load_retrain_config(CONFIG, ["promotion.metric=rfid", absent]))
    with pytest.raises(UserError, match="^promotion.metric gfid needs a prior trained and sampled for each model"):
        check_metric(load_retrain_config(CONFIG, ["promotion.metric=gfid"]))
    vae = load_retrain_config(CONFIG, ["promotion.metric=prior_bits"])
    with pytest.raises(UserError, match="does not apply to the VAE family"):
        check_metric(vae.model_copy(update={"model": VAEConfig()}))
    missing = [f"promotion.lpips.vgg_path={tmp_path / 'vgg.pth'}", f"promotion.lpips.lin_path={tmp_path / 'lin.pth'}"]
    with pytest.raises(UserError, match="^promotion.metric lpips needs the LPIPS weights: .*vgg.pth"):
        check_metric(load_retrain_config(CONFIG, ["promotion.metric=lpips", *missing]))
    check_metric(load_retrain_config(CONFIG, ["promotion.metric=prior_bits"]))  # computable: no error


def test_retrains_lpips_equals_tokenmill_evals_on_the_same_split(tmp_path):
    """promotion.metric lpips scores with `tokenmill eval`'s measure (random LPIPS weights here),
    on ~10 validation images."""
    from helpers.engine import grey_shards
    from helpers.lpips import write_random_lpips_weights

    from tokenmill.models import save_model
    from tokenmill.models.lpips import LPIPSWeights
    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.tokenizer_eval import EvalOptions, evaluate

    vgg, lin = write_random_lpips_weights(tmp_path)
    shards = grey_shards(tmp_path, n=32)
    config = load_retrain_config(CONFIG, [
        "promotion.metric=lpips", f"promotion.lpips.vgg_path={vgg}", f"promotion.lpips.lin_path={lin}",
        "promotion.lpips.verify_sha256=false", f"validation.shards={shards}", f"run.root={tmp_path}"])
    model = build_model(config.model_dump(mode="json")["model"]).eval()
    folder = save_model(model, tmp_path / "model",
                        extra={"transform": config.data.transform.for_eval().model_dump(mode="json")})
    scores = promotion.score(str(folder), "", config)
    lpips = LPIPSWeights(vgg_path=str(vgg), lin_path=str(lin), verify_sha256=False)
    reference = evaluate(str(folder), shards, "val", tmp_path / "eval", EvalOptions(lpips=lpips)).metrics
    assert scores["val/lpips"] > 0 and scores["val/lpips"] == pytest.approx(reference["lpips"], rel=1e-5)
    assert scores["val/psnr"] == pytest.approx(reference["psnr"], rel=1e-5)


def test_retrains_rfid_equals_tokenmill_evals_on_the_same_split(tmp_path, inception_weights, one_thread):
    """promotion.metric rfid scores with `tokenmill eval`'s rFID (random Inception weights here)."""
    from helpers.engine import grey_shards

    from tokenmill.models import save_model
    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.generation_eval import InceptionWeights
    from tokenmill.pipeline.tokenizer_eval import EvalOptions, evaluate

    path, sha256 = inception_weights
    shards = grey_shards(tmp_path, n=12, size=16)
    config = load_retrain_config(CONFIG, [
        "promotion.metric=rfid", f"promotion.inception.path={path}", f"promotion.inception.sha256={sha256}",
        f"validation.shards={shards}", f"run.root={tmp_path}", "data.transform.size=16"])
    model = build_model(config.model_dump(mode="json")["model"]).eval()
    folder = save_model(model, tmp_path / "model",
                        extra={"transform": config.data.transform.for_eval().model_dump(mode="json")})
    scores = promotion.score(str(folder), "", config)
    reference = evaluate(str(folder), shards, "val", tmp_path / "eval",
                         EvalOptions(inception=InceptionWeights(path, sha256))).metrics
    assert scores["val/rfid"] > 0 and scores["val/rfid"] == pytest.approx(reference["rfid"], rel=1e-6)


@pytest.mark.parametrize("kind", ["vqvae", "vae"])
def test_scores_merged_from_shards_split_over_tasks_equal_one_pass(tmp_path, kind, one_thread):
    """Retrain scores on Ray tasks, each given some of the validation shards (pipeline.registry.scoring):
    the merged shares equal the scores of one share holding every shard, bit for bit, however the
    shards are dealt; and (VQ) training's one validation pass over the whole split."""
    from helpers.engine import grey_shards

    from tokenmill.models import save_model
    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.registry import scoring
    from tokenmill.pipeline.training.tasks import image_validation

    shards = grey_shards(tmp_path, n=40, size=16, maxcount=4)  # ~12 val images in 3 shards
    overrides = [f"validation.shards={shards}", f"run.root={tmp_path}", "validation.batch_size=3",
                 "validation.iw_samples=2", "data.transform.size=16"]
    config = load_retrain_config(CONFIG, overrides)
    if kind == "vae":
        config = config.model_copy(update={"model": VAEConfig(arch="mlp", image_size=16, hidden=16, latent_dim=4)})
    torch.manual_seed(0)
    model = build_model(config.model_dump(mode="json")["model"]).eval()
    folder = str(save_model(model, tmp_path / "model",
                            extra={"transform": config.data.transform.for_eval().model_dump(mode="json")}))
    urls = promotion.validation_shard_urls(config)
    assert len(urls) == 3
    one = scoring.merge(scoring.score_shards(folder, "", config, scoring.deal(urls, 1)[0]), config)
    for tasks in (2, 3):
        shares = scoring.deal(urls, tasks)
        assert sorted(i for share in shares for i, _ in share) == [0, 1, 2]  # every shard once
        parts = [part for share in reversed(shares) for part in scoring.score_shards(folder, "", config, share)]
        assert scoring.merge(parts, config) == one
    batches = [b for url in urls for b in scoring.shard_batches(url, config)]
    assert one["val/images"] == sum(len(b["key"]) for b in batches) > 0
    if kind == "vqvae":  # no random draws: training's single pass over all batches gives the same numbers
        reference, _ = image_validation.evaluate(model, batches, iw_samples=2)
        assert one.keys() == reference.keys()
        assert all(one[k] == pytest.approx(reference[k], rel=1e-12) for k in one)
        assert one["val/usage"] == reference["val/usage"]
