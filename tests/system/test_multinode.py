"""A real multi-node Ray cluster on this machine (tests/helpers/multinode.py: ray.cluster_utils.Cluster,
token authentication on): a head that only schedules and four 1-CPU worker nodes, so work spreads
over nodes. Shards and token stores live on the loopback S3 server (moto), MLflow on a real server.

- train refuses node-local storage on the cluster (exit 2, before any work);
- tokenize spreads over nodes (each marker names its node), survives losing a node mid-job and
  ends byte-identical to an uninterrupted single-node run;
- train with 2 workers on 2 nodes loses rank 1's node mid-run and Ray Train restores the worker
  group from the latest checkpoint: the run continues (resumed_from_step > 0) to the last step;
- retrain (champion/challenger) runs as a job submitted through JobSubmissionClient.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import helpers
import psutil
import pytest
from helpers import CONFIGS, REPO
from helpers.jobs import SUBMIT, wait_for_dashboard
from helpers.tokens import make_vqvae, s3_objects, write_shards

WORKER = {"num_cpus": 1}
WORKERS = ("w1", "w2", "w3", "w4")
TRAIN_CONFIG = CONFIGS / "debug_vqvae.yaml"
RETRAIN_CONFIG = CONFIGS / "debug_retrain_vqvae.yaml"
CLUSTER_SCRIPT = Path(helpers.__file__).with_name("multinode.py")  # run as a script


class RayCluster:
    """The cluster process: its address, nodes ({name: {node_id, raylet_pid}}) and environment."""

    def __init__(self, root: Path):
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PYTHONPATH": str(REPO), "TOKENMILL_VERBOSE": "0"}
        self.env.pop("RAY_ADDRESS", None)
        spec = {"head": {"num_cpus": 0}, "workers": {name: WORKER for name in WORKERS}}
        self.log = open(root / "cluster.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(CLUSTER_SCRIPT), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=self.env, cwd=root, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster did not start; see {root / 'cluster.log'}")
        started = json.loads(line)
        self.address, self.dashboard, self.nodes = started["address"], started["dashboard"], started["nodes"]
        self.driver_env = {**self.env, "RAY_ADDRESS": self.address}

    def command(self, text: str) -> str:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def remove(self, name: str) -> None:
        assert name != "head" and self.command(f"remove {name}") == f"removed {name}"
        del self.nodes[name]

    def add(self, name: str) -> None:
        self.nodes[name] = json.loads(self.command(f"add {name} {json.dumps(WORKER)}"))

    def node_of(self, pid: int) -> str:
        """The name of the node whose raylet started process `pid` (a Ray worker)."""
        raylets = {info["raylet_pid"]: name for name, info in self.nodes.items()}
        for parent in psutil.Process(pid).parents():
            if parent.pid in raylets:
                return raylets[parent.pid]
        raise LookupError(f"process {pid} is not a worker of this cluster")

    def node_name(self, node_id: str) -> str:
        return next((name for name, info in self.nodes.items() if info["node_id"] == node_id), f"removed:{node_id[:8]}")

    def shutdown(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    ray_cluster = RayCluster(tmp_path_factory.mktemp("cluster"))
    yield ray_cluster
    ray_cluster.shutdown()


@pytest.fixture(scope="module")
def data(s3_server, tmp_path_factory):
    """A tiny VQ-VAE and 10 shards of 16x16 images (8 train, 2 val) on S3, shared by the tests."""
    import s3fs

    root = tmp_path_factory.mktemp("multinode")
    bucket = f"multinode-{time.time_ns()}"
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.mkdir(bucket)
    shards = write_shards(f"s3://{bucket}/shards", root / "source", n=90)
    return {"root": root, "bucket": bucket, "fs": fs, "shards": shards, "model": str(make_vqvae(root / "model"))}


def driver(cluster: RayCluster, args: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """`python -m tokenmill.jobs.<args>` as a driver of the cluster."""
    return subprocess.Popen([sys.executable, "-m", *args], env={**cluster.driver_env, **(env or {})}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_waiting(flag: Path, timeout: float = 240, count: int = 1) -> list[int]:
    """Pids of the processes held by an `action=wait,until=flag` fault, once `count` of them wait."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = [int(p.name.rsplit("-", 1)[1]) for p in flag.parent.glob(f"{flag.name}.waiting-*")]
        if len(pids) >= count:
            return pids
        time.sleep(0.5)
    raise TimeoutError(f"no process reached the fault that waits for {flag}")


def wait_for_file(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.5)


def test_train_refuses_node_local_storage_on_the_cluster(cluster, tmp_path):
    proc = driver(cluster, ["tokenmill.jobs.train", str(TRAIN_CONFIG), "--set", f"run.root={tmp_path}"],
                  env={"MLFLOW_TRACKING_URI": ""})
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tokenmill train: error: this Ray cluster has 5 nodes"), err
    for key in ("data.shards=builtin:mnist5k", f"run.storage_path={tmp_path / 'ray'}", "tracking.tracking_uri=sqlite"):
        assert key in lines[0]
    assert not (tmp_path / "shards").exists()  # refused before the built-in source was sharded


def test_tokenize_spreads_over_nodes_and_survives_losing_one(cluster, data, ray_local, tmp_path):
    from tokenmill.pipeline.shards.manifest import read_manifest
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.tokens.store import TokenStore

    fs, bucket = data["fs"], data["bucket"]
    tokenize_dataset(data["model"], data["shards"], f"s3://{bucket}/single-node.zarr",
                     TokenizeOptions(batch_size=4, actors=1))
    store = f"s3://{bucket}/tokens.zarr"
    args = ["tokenmill.jobs.tokenize", "--model", data["model"], "--data", data["shards"], "--out", store, "--batch-size", "4",
            "--actors", "3"]
    go = tmp_path / "go"
    # Every actor stops before its first marker until the test has removed one of their nodes.
    proc = driver(cluster, args, env={"TOKENMILL_FAULTS": f"tokenize.before_marker,action=wait,until={go}"})
    victim = cluster.node_of(wait_for_waiting(go)[0])
    cluster.remove(victim)
    go.touch()
    out, err = proc.communicate(timeout=300)
    print(f"tokenize after losing node {victim}: exit {proc.returncode}")
    if proc.returncode != 0:  # the job may fail with its node; the rerun finishes it
        rerun = driver(cluster, args)
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, out + err
    cluster.add(victim)  # the next tests start from four worker nodes again

    markers = TokenStore(store).finished()
    nodes = {cluster.node_name(m["worker"]["node"]) for m in markers.values()}
    assert len(markers) == len(read_manifest(data["shards"])["shards"]) and len(nodes) >= 2 and "head" not in nodes
    assert s3_objects(fs, f"{bucket}/tokens.zarr") == s3_objects(fs, f"{bucket}/single-node.zarr")


def test_train_restores_the_worker_group_after_losing_rank_1s_node(cluster, data, mlflow_server, tmp_path):
    go = tmp_path / "go"
    summary = tmp_path / "summary.json"
    args = ["tokenmill.jobs.train", str(TRAIN_CONFIG), "--json", str(summary)] + [a for o in (
        f"data.shards={data['shards']}", f"run.root={tmp_path / 'runs'}", f"run.storage_path={tmp_path / 'ray'}",
        "run.shared_storage=true",  # checkpoints on this machine's disk, which every node here shares
        f"tracking.tracking_uri={mlflow_server}", "tracking.log_images=false", "run.name=multinode-train",
        "train.steps=8", "train.checkpoint_every=3", "train.val_every=8", "train.log_every=4", "run.max_failures=2",
    ) for a in ("--set", o)]
    proc = driver(cluster, args, env={"TOKENMILL_FAULTS": f"train.step,step=4,rank=1,action=wait,until={go}"})
    (rank1,) = wait_for_waiting(go)
    # Ray Train restores what its controller has registered; it registers a reported checkpoint
    # (step 3) a moment later, recording it in this snapshot.
    wait_for_file(tmp_path / "ray" / "multinode-train" / "checkpoint_manager_snapshot.json")
    victim = cluster.node_of(rank1)
    cluster.remove(victim)
    go.touch()
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out + err
    cluster.add(victim)
    metrics = json.loads(summary.read_text())["final_metrics"]
    assert metrics["step"] == 8
    assert metrics["resumed_from_step"] == 3  # restored from the step-3 checkpoint, not restarted from zero


def test_retrain_runs_as_a_submitted_job_on_the_cluster(cluster, data, mlflow_server, tmp_path):
    fs, bucket = data["fs"], data["bucket"]
    fs.copy(f"{bucket}/shards", f"{bucket}/versions/v001", recursive=True)  # relative shard URLs: a valid copy
    decision = tmp_path / "decision.json"
    overrides = [f"versions.prefix=s3://{bucket}/versions", f"validation.shards={data['shards']}",
                 f"retokenize.out_prefix=s3://{bucket}/retokenized", f"run.root={tmp_path / 'runs'}",
                 f"run.storage_path={tmp_path / 'ray'}", "run.shared_storage=true",
                 f"tracking.tracking_uri={mlflow_server}", "tracking.registered_model=multinode-retrain",
                 "train.steps=6", "train.val_every=6", "train.checkpoint_every=6"]
    entrypoint = " ".join([sys.executable, "-m", "tokenmill.jobs.retrain", str(RETRAIN_CONFIG),
                           *[f"--set {o}" for o in overrides], "--json", str(decision)])
    wait_for_dashboard(cluster.dashboard, cluster.env)
    proc = subprocess.run([sys.executable, "-c", SUBMIT, cluster.dashboard, entrypoint], env=cluster.env,
                          capture_output=True, text=True, timeout=540, cwd=REPO)
    assert "STATUS SUCCEEDED" in proc.stdout, proc.stdout + proc.stderr
    result = json.loads(decision.read_text())
    assert result["decision"] == "promoted" and result["data_version"] == "v001"
    assert result["store_url"] == f"s3://{bucket}/retokenized/v001/multinode-retrain-v{result['model_version']}"
    assert fs.exists(f"{result['store_url'][len('s3://'):]}/zarr.json")
