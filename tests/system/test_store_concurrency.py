"""Drivers racing on one new token store, as real processes, locally and on S3 (moto), many
times over the creation step itself (two `tokenize` commands racing end to end:
tests/system/test_tokenize_processes.py). Every race must end with one complete store equal to
a single run's; a run of another model is refused with a message, never half-mixed in."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

from helpers.tokens import race_setup

SAME, OTHER = 20, 3  # races between runs of one model, then between runs of two models


def _racer(urls: list[str], models: list[str], me: int, sync: Path, out: Path) -> None:
    """One driver process: each iteration waits at a file barrier for the other, then calls the
    real `TokenStore.prepare` at the same moment; writes "ok" or "refused <message>" per race."""
    from tokenmill.models.errors import UserError
    from tokenmill.pipeline.tokens.store import TokenStore

    results = []
    for i, (url, model) in enumerate(zip(urls, models)):
        (sync / f"{i}.{me}").touch()
        while not (sync / f"{i}.{1 - me}").exists():
            time.sleep(0.0002)
        try:
            TokenStore(url).prepare(*race_setup(model), overwrite=False)
            results.append("ok")
        except UserError as err:
            results.append(f"refused {err}")
    out.write_text(json.dumps(results))


def _race(urls: list[str], models: tuple[list[str], list[str]], sync: Path) -> list[tuple[str, str]]:
    """Two spawned processes: this one may hold a Ray driver, which must not be forked (conftest)."""
    sync.mkdir()
    context = multiprocessing.get_context("spawn")
    outs = [sync / f"results-{me}.json" for me in (0, 1)]
    procs = [context.Process(target=_racer, args=(urls, models[me], me, sync, outs[me])) for me in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        if proc.is_alive():  # hung: fail, and leave no process behind
            proc.kill()
            proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0], "a racing driver failed; its traceback is in the output"
    return list(zip(*(json.loads(out.read_text()) for out in outs)))


def test_drivers_racing_to_create_a_store_locally_and_on_s3(s3_server, s3_bucket, tmp_path):
    """Same model: both drivers go on with the store. Two models: one wins, one is refused;
    either way the store is exactly the winner's single-run store."""
    import s3fs

    from tokenmill.pipeline.tokens.store import TokenStore

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


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(fs, url: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    prefix = url.removeprefix("s3://")
    paths = fs.find(prefix)
    return {p[len(prefix) + 1:]: data for p, data in sorted(fs.cat(paths).items())}
