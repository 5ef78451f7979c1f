"""`ray job submit` path: a real `ray start --head` on 127.0.0.1 (token authentication on, as in
Ray 2.60), and JobSubmissionClient running the train entry point to SUCCEEDED."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from pipeline.shards.writer import ShardSettings, write_shards

pytestmark = pytest.mark.slow  # starts a Ray head and job clients as processes

REPO = Path(__file__).resolve().parents[1]

# The client runs in its own process so its token is not the test session's cached one.
SUBMIT = """
import sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
client = JobSubmissionClient(sys.argv[1])
deadline = time.time() + 120
while True:  # the job agent starts after the dashboard answers: retry until it takes the job
    try:
        job = client.submit_job(entrypoint=sys.argv[2])
        break
    except RuntimeError as err:
        if "No available agent" not in str(err) or time.time() > deadline:
            raise
        time.sleep(2)
deadline = time.time() + 480
while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
    if time.time() > deadline:
        client.stop_job(job)
        break
    time.sleep(2)
print(client.get_job_logs(job)[-3000:])
print("STATUS", client.get_job_status(job).value)
"""


LIST_JOBS = "import sys; from ray.job_submission import JobSubmissionClient; JobSubmissionClient(sys.argv[1]).list_jobs()"


def test_ray_job_submit_train_succeeds(tmp_path):
    shards = tmp_path / "shards"
    write_shards("builtin:digits", str(shards), ShardSettings(maxcount=600), progress=False)
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
        entrypoint = (f"{sys.executable} -m jobs.train {REPO / 'configs' / 'debug_vqvae.yaml'} "
                      f"--set data.shards={shards} --set run.root={tmp_path / 'runs'} --set train.steps=6 "
                      f"--set tracking.log_images=false --json {summary}")
        address = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_dashboard(address, env)
        # Token authentication is on: a client with another token is refused.
        wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        assert subprocess.run([sys.executable, "-c", LIST_JOBS, address], env=wrong, capture_output=True).returncode != 0
        proc = subprocess.run([sys.executable, "-c", SUBMIT, address, entrypoint], env=env,
                              capture_output=True, text=True, timeout=540)
        assert "STATUS SUCCEEDED" in proc.stdout, proc.stdout + proc.stderr
        assert json.loads(summary.read_text())["final_metrics"]["step"] == 6
    finally:
        head.terminate()
        head.wait(timeout=60)


def _wait_for_dashboard(address: str, env: dict[str, str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        if subprocess.run([sys.executable, "-c", LIST_JOBS, address], env=env, capture_output=True).returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"Ray job API at {address} did not come up")
        time.sleep(2)
