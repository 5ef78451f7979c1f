"""The one conftest: markers by folder, the guards, and the shared fixtures (one local Ray
instance, a loopback S3 server (moto), a real MLflow server, a SQLite MLflow store, one torch thread).

Tests are sorted by cost, and the folder says which (`pytest_collection_modifyitems` adds its
marker, so `-m unit` equals `tests/unit`):

    tests/unit/         in this process only: no Ray, no server, no subprocess, no multiprocessing
    tests/integration/  one Ray instance (`ray_local`) or one server (`mlflow_server`, `s3_server`)
    tests/system/       several processes or nodes: CLI subprocesses, Ray heads and clusters, job
                        submission, spawned gloo ranks, the demo

Shared builders live in tests/helpers/ (`from helpers.tokens import ...`): this folder is on
sys.path because this conftest sits in it.

The S3 endpoint and credentials are exported as environment variables at import time, before
any Ray process starts, so Ray workers (which inherit the driver's environment) reach the same
server through plain s3fs without extra options.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.net import free_port
from helpers.threads import one_torch_thread

S3_PORT = free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_ENDPOINT_URL_S3=S3_ENDPOINT,
)
# Under pytest-xdist (`-n 2`) two workers share the machine's cores. Each gets one torch thread (two each
# spin four OpenMP threads on two cores: three times the CPU time) and a Ray temp dir of its own: a
# `ray start --head` in one worker's test writes its address under the temp dir, and every plain
# `ray.init()` of the other worker's drivers would join that cluster (with a foreign auth token).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["RAY_TMPDIR"] = f"/tmp/tokenmill-tests-{XDIST_WORKER}"
# Keep Ray quiet and small on 2-core machines.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# MLflow samples system metrics every 10 s by default; test runs last seconds. Set before Ray
# starts, so the workers (rank 0 logs them) inherit it.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")

TESTS = Path(__file__).resolve().parent
FOLDERS = ("unit", "integration", "system")  # by cost; also the order tests run in
# Fixtures that start Ray or a server: a unit test may use none of them.
SERVICE_FIXTURES = {"ray_local", "mlflow_server", "s3_server", "s3_bucket"}
# Under pytest-xdist (`make test-fast` runs tests/unit on two workers; `pytest -n 2 --dist loadgroup`
# elsewhere) tests that share an expensive session fixture stay on one worker, so it is built once, and
# the system tests (clusters, subprocesses, the demo) run one after another on one worker.
SHARED_FIXTURE_GROUPS = {"tokenize_inputs": "tokenize-store", "uninterrupted_store": "tokenize-store"}


def pytest_collection_modifyitems(config, items):
    """Mark each test with its folder (unit, integration, system) and run the folders in that
    order: cheap failures first, and no unit test runs while the session's Ray is up."""
    rank = {}
    for item in items:
        path = Path(item.path).resolve()
        if not path.is_relative_to(TESTS):
            continue
        folder = path.relative_to(TESTS).parts[0]
        if folder not in FOLDERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/integration or tests/system "
                                    "(tests/conftest.py says which is which)")
        services = SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if folder == "unit" and services:
            raise pytest.UsageError(f"{item.nodeid}: a unit test uses {', '.join(sorted(services))}; "
                                    "move it to tests/integration")
        item.add_marker(folder)
        group = next((g for f, g in SHARED_FIXTURE_GROUPS.items() if f in getattr(item, "fixturenames", ())),
                     "processes" if folder == "system" else None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        rank[item.nodeid] = FOLDERS.index(folder)
    items.sort(key=lambda item: rank.get(item.nodeid, len(FOLDERS)))


def _ray_up() -> bool:
    """Whether this process holds a Ray driver (without importing Ray)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# Forking a process that holds a Ray driver is unsupported: the child shares the driver's gRPC
# channels to the GCS, and the driver can stop hearing about new actors (calls to them hang, in
# a later test). Count such forks here; the autouse fixture below fails the test that made one.
_forks_while_ray_up = [0]


def _count_fork_while_ray_up() -> None:
    _forks_while_ray_up[0] += _ray_up()


os.register_at_fork(before=_count_fork_while_ray_up)


@pytest.fixture(autouse=True)
def _no_fork_while_ray_up():
    """multiprocessing "fork" or a DataLoader's default workers while Ray is up: use "spawn"."""
    _forks_while_ray_up[0] = 0
    yield
    if _forks_while_ray_up[0]:
        pytest.fail("this test forked the pytest process while it holds a Ray driver, which breaks Ray "
                    "for later tests; start child processes with the \"spawn\" context instead")


@pytest.fixture(autouse=True)
def _no_mlflow_run_left_active():
    """A run left active in this process (an in-process training that failed without ending it)
    makes every later `mlflow.start_run` here fail: fail the test that left it instead."""
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        run_id = mlflow.active_run().info.run_id
        mlflow.end_run()
        pytest.fail(f"this test left MLflow run {run_id} active in the pytest process")


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """A unit test that starts Ray (e.g. through `ensure_ray` or a CLI job) fails: move it to
    tests/integration and use `ray_local`."""
    unit = request.node.get_closest_marker("unit") is not None
    already = _ray_up()
    yield
    if unit and not already and _ray_up():
        pytest.fail("this unit test started Ray; move it to tests/integration and use the ray_local fixture")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by the whole test session (4 logical CPUs on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sqlite_tracking(tmp_path_factory) -> str:
    """One SQLite MLflow store for the session's in-process runs (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite')}/mlflow.db"


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> tuple[str, str]:
    """(path, sha256) of random FID-Inception weights in torch-fidelity's file format, written once
    (24M parameters: seconds) for tests/unit/test_inception.py and test_generation_eval.py."""
    import hashlib

    from helpers.inception import write_random_inception_weights

    path = write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def one_thread():
    """torch on one thread for the test: tiny loops on a loaded 2-core machine are much faster so."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1; yields fsspec storage options for s3fs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield {
        "endpoint_url": S3_ENDPOINT,
        "storage_options": {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": S3_ENDPOINT}},
    }
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket for one test; yields its `s3://name` URL."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    name = f"test-{time.time_ns()}"
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend; yields its tracking URI."""
    root: Path = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: see teardown
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # on a loaded machine its children (uvicorn, job runner) stop slowly
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="session")
def tokenize_inputs(tmp_path_factory, ray_local) -> dict:
    """The tokenize tests' inputs (helpers.tokens.tokenize_data), made once for every test that
    compares against the uninterrupted store."""
    from helpers.tokens import tokenize_data

    return tokenize_data(tmp_path_factory.mktemp("tokenize"))


@pytest.fixture(scope="session")
def uninterrupted_store(tokenize_inputs) -> dict:
    """An uninterrupted tokenize run over `tokenize_inputs`: what every interrupted run must equal
    byte for byte."""
    from helpers.tokens import tokenize_reference

    return tokenize_reference(tokenize_inputs)
