"""`tokenize` drivers as processes on the session's Ray: killing the driver twice then rerunning,
and two `tokenize` commands started at once, both end byte-identical to one uninterrupted run.
(Tokenize in this process: tests/integration/test_tokenize.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO
from helpers.tokens import array_bytes


def _markers(store: Path) -> int:
    return len(list((store / "markers").glob("*/zarr.json")))


def _run_until(cmd: list[str], env: dict, store: Path, markers: int | None) -> int:
    """Run the driver; SIGKILL its process group once `markers` shards are done (None: to the end)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if markers is not None and store.exists() and _markers(store) >= markers:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return _markers(store)
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == 0, proc.stderr.read().decode()[-3000:]
    return _markers(store)


def test_killing_the_driver_twice_then_rerunning_gives_identical_arrays(
        tokenize_inputs, uninterrupted_store, tmp_path, ray_local):
    store = tmp_path / "killed.zarr"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    # The uninterrupted run's settings.
    cmd = [sys.executable, "-m", "tokenmill.jobs.tokenize", "--model", tokenize_inputs["model"],
           "--data", tokenize_inputs["shards"], "--out", str(store), "--batch-size", "4", "--actors", "1"]
    total = uninterrupted_store["summary"].input_shards
    first = _run_until(cmd, env, store, markers=1)
    second = _run_until(cmd, env, store, markers=first + 2)
    assert 1 <= first < second < total, (first, second, total)  # both kills landed mid-run
    assert _run_until(cmd, env, store, markers=None) == total
    assert array_bytes(store) == array_bytes(uninterrupted_store["store"])


def test_two_tokenize_commands_started_at_once_end_with_the_single_run_store(
        tokenize_inputs, uninterrupted_store, tmp_path, ray_local):
    """...and the one started with --verbose shows Ray's own lines, which the other keeps quiet."""
    store = tmp_path / "raced.zarr"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    env.pop("TOKENMILL_VERBOSE", None)
    args = ["tokenize", "--model", tokenize_inputs["model"], "--data", tokenize_inputs["shards"], "--out", str(store),
            "--batch-size", "4", "--actors", "1"]
    procs = [subprocess.Popen([sys.executable, "-m", "jobs", *flags, *args], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for flags in ([], ["--verbose"])]
    quiet, verbose = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], (quiet[-3000:], verbose[-3000:])
    ray_says = "Connecting to existing Ray cluster"  # Ray's own INFO line, once connected
    assert ray_says in verbose and ray_says not in quiet, verbose[-3000:]
    assert array_bytes(store) == array_bytes(uninterrupted_store["store"])
    assert json.loads((store / "zarr.json").read_text())["attributes"]["tokenmill"]["state"] == "complete"

