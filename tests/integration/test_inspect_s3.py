"""`tokenmill inspect` on the S3 test server: a model folder, a prior, a token store and shards copied to a
bucket describe the same as their local originals (only where they are differs). (Every artifact kind
and the refusals, locally: tests/unit/test_inspect.py.)"""

from __future__ import annotations

import json

import torch
from helpers.tokens import build_store, make_vqvae, write_shards

from tokenmill.jobs.cli import main
from tokenmill.models import save_model
from tokenmill.models.prior import PriorConfig, TransformerPrior
from tokenmill.pipeline.prior.lineage import prior_lineage, write_prior_lineage


def _artifacts(root) -> dict[str, str]:
    """A tokenizer, a prior (its lineage.json names a store and tokenizer), a two-level store and shards."""
    make_vqvae(root / "tokenizer")
    torch.manual_seed(0)
    config = PriorConfig(codebook_size=64, grid=[[4, 4]], dim=16, depth=1, heads=2)
    prior = save_model(TransformerPrior(config), root / "prior")
    write_prior_lineage(prior, prior_lineage("s3://somewhere/tokens.zarr", {"model_uri": "s3://somewhere/tokenizer",
                                                                            "weights_sha256": "c" * 64},
                                             config.vocab(), config.grid))
    build_store(str(root / "tokens.zarr"), [5, 3], ["train", "val"], levels=2)
    write_shards(str(root / "shards"), root / "source", n=12)
    return {name: str(root / name) for name in ("tokenizer", "prior", "tokens.zarr", "shards")}


def _inspect(target: str, out, *options: str) -> dict:
    assert main(["inspect", target, "--json", str(out), *options]) == 0
    return json.loads(out.read_text())


def test_artifacts_on_s3_inspect_as_their_local_copies(s3_server, s3_bucket, tmp_path):
    import s3fs

    local = _artifacts(tmp_path / "local")
    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    for name, path in local.items():
        fs.put(path, f"{s3_bucket}/{name}", recursive=True)
    moving = {"target", "url", "manifest", "origin"}  # what names the place, not the artifact
    for name, path in local.items():
        here = _inspect(path, tmp_path / "here.json")
        there = _inspect(f"{s3_bucket}/{name}", tmp_path / "there.json", "--storage-options", json.dumps(options))
        assert {k: v for k, v in there.items() if k not in moving} == {k: v for k, v in here.items() if k not in moving}
        if "origin" in there:
            assert there["origin"] == {"location": f"{s3_bucket}/{name}"}
    assert there["kind"] == "shards" and there["samples"] == 12
    assert _inspect(f"{s3_bucket}/prior", tmp_path / "p.json", "--storage-options", json.dumps(options))["prior"][
        "tokenizer"] == "s3://somewhere/tokenizer"
