"""Drivers racing on one new token store, as real processes: locally and on S3 (moto), many
times over the creation step itself, and once end to end with two `tokenize` commands. Every
race must end with one complete store equal to a single run's; a run of another model is
refused with a message, never half-mixed in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenize_helpers import array_bytes, make_vqvae, race_setup, write_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SAME, OTHER = 20, 3  # races between runs of one model, then between runs of two models

# One process per driver; each iteration both wait at a file barrier, then call the real
# `TokenStore.prepare` at the same moment (imports happen once, before the first race).
RACER = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from tokenize_helpers import race_setup
from models.errors import UserError
from pipeline.tokens.store import TokenStore
urls, models, me, sync = json.loads(sys.argv[1])
for i, (url, model) in enumerate(zip(urls, models)):
    open(os.path.join(sync, f"{{i}}.{{me}}"), "w").close()
    while not os.path.exists(os.path.join(sync, f"{{i}}.{{1 - me}}")):
        time.sleep(0.0002)
    try:
        TokenStore(url).prepare(*race_setup(model), overwrite=False)
        print("ok", flush=True)
    except UserError as err:
        print("refused " + str(err), flush=True)
"""


def _race(urls: list[str], models: tuple[list[str], list[str]], sync: Path) -> list[tuple[str, str]]:
    sync.mkdir()
    code = RACER.format(tests=str(TESTS))
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps([urls, models[me], me, str(sync)])], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in (0, 1)]
    outs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    return list(zip(*(out.splitlines() for out, _ in outs)))


def test_drivers_racing_to_create_a_store_locally_and_on_s3(s3_server, s3_bucket, tmp_path):
    """Same model: both drivers go on with the store. Two models: one wins, one is refused;
    either way the store is exactly the winner's single-run store."""
    import s3fs

    from pipeline.tokens.store import TokenStore

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    bases = {"local": str(tmp_path), "s3": s3_bucket}
    read = {"local": lambda url: _files(Path(url)), "s3": lambda url: _objects(fs, url)}
    references = {}
    for where, base in bases.items():
        for name in ("a", "b"):
            TokenStore(f"{base}/ref-{name}").prepare(*race_setup(f"model-{name}"), overwrite=False)
            references[where, name] = read[where](f"{base}/ref-{name}")
    plan = [(where, i) for where in bases for i in range(SAME + OTHER)]  # (where, i): i >= SAME races two models
    urls = [f"{bases[where]}/race-{i}.zarr" for where, i in plan]
    models = (["model-a"] * len(plan), ["model-a" if i < SAME else "model-b" for _, i in plan])
    results = _race(urls, models, tmp_path / "sync")
    assert len(results) == len(plan)
    for (where, i), url, pair in zip(plan, urls, results):
        if i < SAME:
            assert pair == ("ok", "ok"), (where, i, pair)
            assert read[where](url) == references[where, "a"], (where, i)
            continue
        assert sorted(p.split()[0] for p in pair) == ["ok", "refused"], (where, i, pair)
        assert all("--overwrite" in p for p in pair if p.startswith("refused")), pair
        winner = "a" if pair[0] == "ok" else "b"
        assert read[where](url) == references[where, winner], (where, i, winner)


def test_two_tokenize_commands_started_at_once_end_with_the_single_run_store(tmp_path, ray_local):
    from pipeline.tokenize import tokenize_dataset

    model = make_vqvae(tmp_path / "model")
    shards = write_shards(str(tmp_path / "shards"), tmp_path / "source", n=20)
    reference = tmp_path / "reference.zarr"
    tokenize_dataset(str(model), shards, str(reference), batch_size=4, actors=1)
    store = tmp_path / "raced.zarr"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "jobs", "tokenize", "--model", str(model), "--data", shards, "--out", str(store),
           "--batch-size", "4", "--actors", "1"]
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert array_bytes(store) == array_bytes(reference)
    assert json.loads((store / "zarr.json").read_text())["attributes"]["tokenmill"]["state"] == "complete"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(fs, url: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    prefix = url.removeprefix("s3://")
    paths = fs.find(prefix)
    return {p[len(prefix) + 1:]: data for p, data in sorted(fs.cat(paths).items())}
