"""Helpers shared by the tests of the train and retrain jobs and of Ray job submission."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO
from tokenmill.pipeline.shards.writer import ShardSettings, write_shards


def write_digits_shards(dest: Path, maxcount: int) -> Path:
    """builtin:digits (1,797 scikit-learn digits) as PNG shards of `maxcount` with a manifest."""
    write_shards("builtin:digits", str(dest), ShardSettings(maxcount=maxcount), progress=False)
    return dest


def run_misspelt_config(module: str, config: str, key: str, typo: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m module` on a copy of `config` whose `key:` reads `typo:`; asserts the answer to a
    user mistake: exit 2, `<section>.<typo>: unknown key`, no traceback. The copy is proc.args[-1]."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(config).read_text().replace(f"{key}:", f"{typo}:"))
    proc = subprocess.run([sys.executable, "-m", module, str(bad)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2
    assert f".{typo}: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    return proc


# `python -c SUBMIT DASHBOARD ENTRYPOINT`: submits the entrypoint through JobSubmissionClient, waits
# for it to end and prints its log tail and "STATUS <status>". The client runs in its own process
# so its token is not the test session's cached one.
SUBMIT = """
import sys, time, uuid
import requests
from ray.job_submission import JobSubmissionClient, JobStatus
client = JobSubmissionClient(sys.argv[1])
job = f"tokenmill-test-{uuid.uuid4().hex[:8]}"  # one id for every try: a retried submit never runs the job twice
deadline = time.time() + 120
while True:  # the job agent starts after the dashboard answers, and a busy dashboard may drop a request: retry
    try:
        client.submit_job(entrypoint=sys.argv[2], submission_id=job)
        break
    except (RuntimeError, requests.ConnectionError) as err:
        if "already exists" in str(err):  # an earlier try got through
            break
        if isinstance(err, RuntimeError) and "No available agent" not in str(err) or time.time() > deadline:
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


def wait_for_dashboard(address: str, env: dict[str, str], timeout: float = 120) -> None:
    """Until the Ray job API at `address` answers a client with `env`'s token."""
    deadline = time.time() + timeout
    while True:
        if subprocess.run([sys.executable, "-c", LIST_JOBS, address], env=env, capture_output=True).returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"Ray job API at {address} did not come up")
        time.sleep(2)
