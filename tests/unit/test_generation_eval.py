"""Inception metrics end to end, in process: `tokenmill eval` reports rFID under the pinned protocol;
missing Inception weights degrade to "unavailable: <which file
where>" while the other metrics run; a wrong weights file, or a missing split, is one line, exit 2;
`tokenmill fid-stats` writes reference statistics (mu, sigma, features, protocol) and its JSON
byte-identically twice.
Random Inception weights in torch-fidelity's file format (tests/helpers/inception.py), accepted with
--inception-sha256; a 16 px grey VQ-VAE and 2 images per run keep each Inception pass to ~1 s."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers.tokens import make_vqvae, write_shards

from tokenmill.jobs.cli import main as cli_main
from tokenmill.pipeline.generation_eval import read_reference

PROTOCOL_KEYS = {"resolution", "resize_filter", "crop", "split", "n", "cfg", "evaluator", "inception_weights_sha256"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, inception_weights):
    root = tmp_path_factory.mktemp("inception-eval")
    shards = write_shards(str(root / "shards"), root / "source", n=14)  # 2 val images, 12 train
    weights, sha256 = inception_weights
    return {"model": str(make_vqvae(root / "vqvae")), "shards": shards, "weights": weights, "sha256": sha256}


def _eval(setup, out, *extra) -> int:
    return cli_main(["eval", "--model", setup["model"], "--data", setup["shards"], "--out", str(out.parent / "png"),
                     "--lpips-vgg", str(out.parent / "absent.pth"), "--json", str(out), *extra])


def test_eval_reports_rfid_under_the_protocol(setup, tmp_path, one_thread):
    assert _eval(setup, tmp_path / "a.json", "--inception", setup["weights"], "--inception-sha256", setup["sha256"]) == 0
    summary = json.loads((tmp_path / "a.json").read_text())
    protocol = summary["protocol"]["rfid"]
    assert PROTOCOL_KEYS <= set(protocol) and protocol["inception_weights_sha256"] == setup["sha256"]
    assert (protocol["resolution"], protocol["crop"], protocol["split"], protocol["n"]) == (16, "center-crop", "val", 2)
    assert summary["rfid"] == {"path": setup["weights"], "sha256": setup["sha256"], "published": "false", "images": 2}
    assert summary["metrics"]["rfid"] > 0 and np.isfinite(summary["metrics"]["psnr"])


def test_missing_inception_weights_leave_the_other_metrics(setup, tmp_path):
    absent = tmp_path / "hub" / "weights.pth"
    assert _eval(setup, tmp_path / "eval.json", "--inception", str(absent)) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["rfid"].startswith("unavailable: ") and "weights-inception-2015-12-05-6726825d.pth" in summary["rfid"]
    assert str(absent) in summary["rfid"] and "rfid" not in summary["metrics"]
    assert {"psnr", "ssim", "usage"} <= set(summary["metrics"])
    assert summary["protocol"]["rfid"]["inception_weights_sha256"] is None

    from tokenmill.pipeline.reference_stats import first_image_side
    from tokenmill.pipeline.shards.manifest import shards_for_split

    assert first_image_side(shards_for_split(setup["shards"], "val")) == 16  # fid-stats' default resolution


def test_wrong_weights_missing_split_and_missing_weights_for_fid_stats_are_one_line_exit_2(setup, tmp_path, capsys):
    assert _eval(setup, tmp_path / "e.json", "--inception", setup["weights"]) == 2  # random weights, published hash
    assert "expected 6726825d" in capsys.readouterr().err
    out = str(tmp_path / "ref.npz")
    assert cli_main(["fid-stats", setup["shards"], "--out", out, "--inception", str(tmp_path / "absent.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights-inception-2015-12-05-6726825d.pth" in err
    assert cli_main(["fid-stats", setup["shards"], "--split", "test", "--out", out]) == 2
    assert "unknown split" in capsys.readouterr().err


def test_weights_and_reference_files_by_fsspec_url(setup):
    import fsspec

    from tokenmill.pipeline.generation_eval import InceptionWeights, load_evaluator, write_reference

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/metrics-test/inception.pth", open(setup["weights"], "rb").read())
    evaluator = load_evaluator(InceptionWeights("memory://metrics-test/inception.pth", setup["sha256"][:8]))
    assert evaluator.weights == {"path": "memory://metrics-test/inception.pth", "sha256": setup["sha256"],
                                 "published": "false"}
    state = torch.load(setup["weights"], weights_only=True)
    assert torch.equal(evaluator.model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    features = torch.rand(3, 2048, generator=torch.Generator().manual_seed(1))
    sha = write_reference("memory://metrics-test/ref.npz", features, {"resolution": 8})
    reference = read_reference("memory://metrics-test/ref.npz")
    assert reference.sha256 == sha and torch.equal(reference.features, features) and reference.protocol == {"resolution": 8}
    fs.rm("/metrics-test", recursive=True)


def test_fid_stats_writes_identical_reference_statistics_with_the_protocol(setup, tmp_path, one_thread):
    outputs, out = [], tmp_path / "ref.npz"
    for _ in range(2):  # the same command twice: the same bytes in the .npz and the JSON
        assert cli_main(["fid-stats", setup["shards"], "--split", "train", "--limit", "2", "--resolution", "20",
                         "--out", str(out), "--inception", setup["weights"], "--inception-sha256", setup["sha256"][:12],
                         "--json", str(tmp_path / "ref.json")]) == 0
        outputs.append((out.read_bytes(), (tmp_path / "ref.json").read_text()))
        out.unlink()
    assert outputs[0] == outputs[1]
    (tmp_path / "again.npz").write_bytes(outputs[0][0])
    reference = read_reference(str(tmp_path / "again.npz"))
    assert reference.features.shape == (2, 2048) and reference.stats.n == 2
    assert torch.allclose(reference.stats.mu, reference.features.double().mean(0))
    assert torch.allclose(reference.stats.sigma, torch.cov(reference.features.double().T))
    assert reference.stats.sigma.trace() > 0
    protocol = reference.protocol
    assert PROTOCOL_KEYS <= set(protocol) and (protocol["resolution"], protocol["n"], protocol["split"]) == (20, 2, "train")
    summary = json.loads(outputs[0][1])
    assert summary["protocol"] == protocol and summary["out_sha256"] == hashlib.sha256(outputs[0][0]).hexdigest()


def _prior_and_tokenizer(root):
    """A 2-class tiny AR prior whose lineage names a 16 px grey VQ-VAE (as tests/unit/test_prior_sample.py)."""
    from tokenmill.models import save_model
    from tokenmill.models.prior import PriorConfig, TransformerPrior
    from tokenmill.models.quantizers import QuantizerConfig
    from tokenmill.models.serialization import WEIGHTS_FILE
    from tokenmill.models.vqvae import VQVAE, VQVAEConfig
    from tokenmill.pipeline.prior.lineage import prior_lineage, write_prior_lineage

    torch.manual_seed(0)
    tokenizer = VQVAE(VQVAEConfig(in_channels=1, image_size=16, hidden=8, res_blocks=1, latent_dim=4, downsample=4,
                                  quantizer=QuantizerConfig(codebook_size=32)))
    tok_dir = save_model(tokenizer.eval(), root / "tokenizer")
    prior = TransformerPrior(PriorConfig(codebook_size=32, num_classes=2, grid=[[4, 4]], dim=16, depth=1, heads=2))
    prior_dir = save_model(prior, root / "prior")
    lineage = {"model_uri": str(tok_dir), "weights_sha256": hashlib.sha256((tok_dir / WEIGHTS_FILE).read_bytes()).hexdigest()}
    write_prior_lineage(prior_dir, prior_lineage("/nowhere/store.zarr", lineage, prior.config.vocab(), [[4, 4]]))
    return prior_dir


def test_sample_eval_scores_against_reference_statistics_and_writes_adm_npz(setup, tmp_path, sqlite_tracking, one_thread):
    from tokenmill.pipeline.generation_eval import write_reference

    prior_dir = _prior_and_tokenizer(tmp_path)
    ref, other = str(tmp_path / "ref.npz"), str(tmp_path / "ref32.npz")
    features = torch.rand(6, 2048, generator=torch.Generator().manual_seed(0))  # 6 reference points
    write_reference(ref, features, {"resolution": 16, "split": "val", "inception_weights_sha256": setup["sha256"]})
    write_reference(other, features, {"resolution": 32, "inception_weights_sha256": setup["sha256"]})
    common = ["sample", "--prior", str(prior_dir), "--per-class", "2", "--cfg", "1.5", "--device", "cpu",
              "--inception", setup["weights"], "--inception-sha256", setup["sha256"]]
    assert cli_main([*common, "--out", str(tmp_path / "bad"), "--eval", other]) == 2  # 32 px reference, 16 px samples

    summary_path = tmp_path / "sample.json"
    assert cli_main([*common, "--out", str(tmp_path / "out"), "--eval", ref, "--npz", str(tmp_path / "adm.npz"),
                     "--tracking-uri", sqlite_tracking, "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    evaluation = summary["evaluation"]
    assert evaluation["metrics"]["gfid"] > 0 and 0 <= evaluation["metrics"]["precision"] <= 1
    assert 0 <= evaluation["metrics"]["recall"] <= 1
    assert evaluation["unavailable"]["inception_score"].startswith("unavailable: 4 samples")  # IS needs 10
    protocol = evaluation["protocol"]
    assert PROTOCOL_KEYS <= set(protocol) and (protocol["n"], protocol["cfg"], protocol["per_class"]) == (4, 1.5, 2)
    assert protocol["reference"]["sha256"] == hashlib.sha256(open(ref, "rb").read()).hexdigest()
    with np.load(tmp_path / "adm.npz") as adm:
        assert adm["arr_0"].shape == (4, 16, 16, 3) and adm["arr_0"].dtype == np.uint8
        assert adm["arr_1"].tolist() == [0, 0, 1, 1]

    import mlflow

    params = mlflow.MlflowClient(sqlite_tracking).get_run(summary["mlflow_run_id"]).data.params
    assert params["protocol.inception_weights_sha256"] == setup["sha256"] and params["protocol.cfg"] == "1.5"

    # Without the weights file, sampling still runs and each Inception metric says why it is missing.
    absent = str(tmp_path / "absent" / "inception.pth")
    assert cli_main(["sample", "--prior", str(prior_dir), "--per-class", "2", "--device", "cpu", "--eval", ref,
                     "--inception", absent, "--out", str(tmp_path / "out2"), "--json", str(summary_path)]) == 0
    evaluation = json.loads(summary_path.read_text())["evaluation"]
    assert evaluation["metrics"] == {} and set(evaluation["unavailable"]) == {"gfid", "inception_score", "precision",
                                                                              "recall"}
    assert all(absent in why and why.startswith("unavailable: ") for why in evaluation["unavailable"].values())
