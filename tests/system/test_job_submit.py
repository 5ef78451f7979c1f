"""`ray job submit` path: a real `ray start --head` on 127.0.0.1 (token authentication on, as in
Ray 2.60), and JobSubmissionClient running the train entry point to SUCCEEDED (the client runs as
a process of its own: helpers.jobs.SUBMIT). The submitted job trains in its own process
(`scaling.in_process`): what is tested here is the submission; Ray Train workers under a submitted
job: tests/system/test_multinode.py::test_retrain_runs_as_a_submitted_job_on_the_cluster."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from helpers import CONFIGS
from helpers.jobs import LIST_JOBS, SUBMIT, wait_for_dashboard, write_digits_shards
from helpers.net import free_port


def test_ray_job_submit_train_succeeds(tmp_path):
    shards = write_digits_shards(tmp_path / "shards", 600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=4",
         # Another Ray instance (the test session's) may hold the default agent ports.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        summary = tmp_path / "summary.json"
        sets = [f"data.shards={shards}", f"run.root={tmp_path / 'runs'}", "train.steps=2", "train.val_every=2",
                "train.checkpoint_every=2", "tracking.log_images=false", "scaling.in_process=true"]
        entrypoint = " ".join([sys.executable, "-m", "tokenmill.jobs.train", str(CONFIGS / "debug_vqvae.yaml"),
                               *[f"--set {o}" for o in sets], "--json", str(summary)])
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for_dashboard(address, env)
        # Token authentication is on: a client with another token is refused.
        wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        assert subprocess.run([sys.executable, "-c", LIST_JOBS, address], env=wrong, capture_output=True).returncode != 0
        proc = subprocess.run([sys.executable, "-c", SUBMIT, address, entrypoint], env=env,
                              capture_output=True, text=True, timeout=540)
        assert "STATUS SUCCEEDED" in proc.stdout, proc.stdout + proc.stderr
        assert json.loads(summary.read_text())["final_metrics"]["step"] == 2
    finally:
        head.terminate()
        head.wait(timeout=60)
