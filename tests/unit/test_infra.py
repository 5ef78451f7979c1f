"""infra/: every manifest parses, validates offline as its Kubernetes kind, follows the security
rules of issue 7, and refers only to things that exist in this repository.

Built-in kinds are validated against the strict OpenAPI-derived JSON schemas that the
`kubernetes-validate` package ships (no network). KubeRay's CRDs (RayCluster, RayJob,
RayCronJob) are validated against the schemas below: every field we may use, with
`additionalProperties: false` so a misspelt field fails, and Pod templates checked against the
real core/v1 PodTemplateSpec schema.
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from helpers import REPO
from referencing import Registry, Resource

INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
MANIFESTS = sorted(p.relative_to(REPO).as_posix() for p in INFRA.rglob("*.yaml"))
EXPECTED_MANIFESTS = {
    "infra/kuberay/raycluster.yaml",
    "infra/kuberay/rayjob-train.yaml",
    "infra/kuberay/rayjob-tokenize.yaml",
    "infra/kuberay/raycronjob-retrain.yaml",
    "infra/k8s/cronjob-retrain.yaml",
    "infra/mlflow/mlflow.yaml",
}
K8S_VERSION = "1.33.0"  # oldest Kubernetes these manifests target
SECRET_LIKE_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
CREDENTIALS_IN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
EXPOSING_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
EXPOSING_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute"}


# ------------------------------------------------------------------------------------------------
# Loading


def load_docs(rel: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((REPO / rel).read_text()) if doc is not None]


ALL_DOCS = [(rel, i, doc) for rel in MANIFESTS for i, doc in enumerate(load_docs(rel))]
DOC_IDS = [f"{rel}#{i}:{doc.get('kind')}" for rel, i, doc in ALL_DOCS]


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) in a parsed YAML tree, containers included."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every container of every Pod template in `doc`, at any depth (CRDs nest them)."""
    for path, node in walk(doc):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                for i, container in enumerate(node.get(key) or []):
                    yield f"{path}.{key}[{i}]", container


def strings(doc: dict) -> Iterator[tuple[str, str]]:
    for path, node in walk(doc):
        if isinstance(node, str):
            yield path, node


# ------------------------------------------------------------------------------------------------
# What infra/Dockerfile builds


def dockerfile_value(name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", DOCKERFILE.read_text())
    assert match, f"infra/Dockerfile does not document {name}=..."
    return match.group(1)


IMAGE = dockerfile_value("IMAGE")
VARIANTS = dockerfile_value("VARIANTS").split(",")
APP_DIR = dockerfile_value("TOKENMILL_HOME")  # where the image keeps configs/ and scripts


def copied_into_image() -> list[str]:
    """Repository paths that `COPY` puts into the image (sources of every COPY line)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            sources += [p.rstrip("/") for p in parts[1:-1]]
    return sources


# ------------------------------------------------------------------------------------------------
# Schemas

DEFS_URI = "https://kubernetes.io/api/_definitions.json"


def k8s_ref(name: str) -> dict:
    return {"$ref": f"{DEFS_URI}#/$defs/io.k8s.{name}"}


def obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


STR, INT, BOOL, NUM = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
ANY_OBJ = {"type": "object"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = k8s_ref("api.core.v1.PodTemplateSpec")

# What head and worker groups share. KubeRay passes rayStartParams to `ray start` and its CRD
# types them map[string]string: an unquoted number (num-cpus: 0) is rejected by the API server.
GROUP = {"rayStartParams": STR_MAP, "template": POD_TEMPLATE, "suspend": BOOL}
HEAD_GROUP = obj(
    {**GROUP, "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "headService": ANY_OBJ,
     "enableIngress": BOOL},
    required=("template",),
)
WORKER_GROUP = obj(
    {**GROUP, "groupName": STR, "replicas": INT, "minReplicas": INT, "maxReplicas": INT, "idleTimeoutSeconds": INT,
     "numOfHosts": INT, "scaleStrategy": ANY_OBJ},
    required=("groupName", "template"),
)
AUTOSCALER = obj(
    {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": INT,
        "version": {"enum": ["v1", "v2"]},
        "image": STR,
        "imagePullPolicy": STR,
        "env": {"type": "array", "items": k8s_ref("api.core.v1.EnvVar")},
        "envFrom": {"type": "array", "items": k8s_ref("api.core.v1.EnvFromSource")},
        "resources": k8s_ref("api.core.v1.ResourceRequirements"),
        "securityContext": k8s_ref("api.core.v1.SecurityContext"),
        "volumeMounts": {"type": "array", "items": k8s_ref("api.core.v1.VolumeMount")},
    }
)
RAY_CLUSTER_SPEC = obj(
    {
        "rayVersion": STR,
        "enableInTreeAutoscaling": BOOL,
        "autoscalerOptions": AUTOSCALER,
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "authOptions": obj({"mode": {"enum": ["disabled", "token"]}, "secretName": STR}),
        "headServiceAnnotations": STR_MAP,
        "gcsFaultToleranceOptions": ANY_OBJ,
        "managedBy": STR,
        "suspend": BOOL,
    },
    required=("headGroupSpec",),
)
RAY_JOB_SPEC = obj(
    {
        "entrypoint": STR,
        "runtimeEnvYAML": STR,
        "jobId": STR,
        "metadata": STR_MAP,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "clusterSelector": STR_MAP,
        "shutdownAfterJobFinishes": BOOL,
        "ttlSecondsAfterFinished": INT,
        "activeDeadlineSeconds": INT,
        "backoffLimit": INT,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterPodTemplate": POD_TEMPLATE,
        "submitterConfig": ANY_OBJ,
        "entrypointNumCpus": NUM,
        "entrypointNumGpus": NUM,
        "entrypointResources": STR,
        "deletionStrategy": ANY_OBJ,
        "managedBy": STR,
        "suspend": BOOL,
    },
    # Not required by the CRD (InteractiveMode), but every RayJob of ours runs a command on
    # a cluster it either creates or selects.
    required=("entrypoint",),
)
RAY_JOB_SPEC["anyOf"] = [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}]
# RayCronJob (KubeRay >= 1.6, alpha): ray.io/v1, spec.{schedule, jobTemplate} required, suspend optional.
RAY_CRONJOB_SPEC = obj(
    {"schedule": {"type": "string", "pattern": r"^\S+( \S+){4}$"}, "jobTemplate": RAY_JOB_SPEC, "suspend": BOOL},
    required=("schedule", "jobTemplate"),
)


def ray_kind(kind: str, spec: dict) -> dict:
    return obj(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": k8s_ref("apimachinery.pkg.apis.meta.v1.ObjectMeta"),
            "spec": spec,
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


# kustomize's own file (kubectl apply -k): only the fields the overlays under infra/ use.
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
KUSTOMIZATION = obj(
    {
        "apiVersion": {"const": KUSTOMIZE_API},
        "kind": {"const": "Kustomization"},
        "resources": {"type": "array", "items": STR},
        "patches": {"type": "array", "items": obj(
            {"target": obj({"group": STR, "version": STR, "kind": STR, "name": STR}), "patch": STR},
            required=("target", "patch"))},
    },
    required=("apiVersion", "kind", "resources"),
)

RAY_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): ray_kind("RayCluster", RAY_CLUSTER_SPEC),
    ("ray.io/v1", "RayJob"): ray_kind("RayJob", RAY_JOB_SPEC),
    ("ray.io/v1", "RayCronJob"): ray_kind("RayCronJob", RAY_CRONJOB_SPEC),
    (KUSTOMIZE_API, "Kustomization"): KUSTOMIZATION,
}


def schema_dir():
    return resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"


@lru_cache(maxsize=None)
def registry() -> Registry:
    definitions = json.loads((schema_dir() / "_definitions.json").read_text())
    return Registry().with_resource(DEFS_URI, Resource.from_contents(definitions))


def builtin_schema(api_version: str, kind: str) -> dict | None:
    # kubernetes-validate's file naming: apps/v1 Deployment -> deployment-apps-v1.json,
    # rbac.authorization.k8s.io/v1 Role -> role-rbac-v1.json, v1 Service -> service-v1.json.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = schema_dir() / f"{kind.lower()}-{group_version}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def schema_errors(doc: dict) -> list[str]:
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return ["missing apiVersion or kind"]
    schema = RAY_SCHEMAS.get((api_version, kind)) or builtin_schema(api_version, kind)
    if schema is None:
        return [f"unknown kind {api_version} {kind} (not Kubernetes {K8S_VERSION}, not a KubeRay CRD)"]
    validator = jsonschema.Draft202012Validator(schema, registry=registry())
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
    metadata = doc.get("metadata") or {}
    if kind != "Kustomization" and not (metadata.get("name") or metadata.get("generateName")):
        errors.append("metadata: needs a name or generateName")
    return errors


# ------------------------------------------------------------------------------------------------
# References from commands to the repository


def missing_references(text: str) -> list[str]:
    """What a command line (or path) names that the repository or the image does not have."""
    missing = []
    for module in re.findall(r"python3? -m ([A-Za-z_][\w.]*)", text):
        rel = module.removeprefix("tokenmill.").replace(".", "/")  # tokenmill.jobs.x is the repository's jobs/x.py
        if module.startswith("tokenmill.") and not ((REPO / f"{rel}.py").is_file() or (REPO / rel / "__init__.py").is_file()):
            missing.append(f"module {module} ({rel}.py does not exist)")
    copied = copied_into_image()
    for path in re.findall(rf"{re.escape(APP_DIR)}/([\w./-]+)", text):
        if not (REPO / path).exists():
            missing.append(f"{APP_DIR}/{path} ({path} does not exist in the repository)")
        elif not any(path == src or path.startswith(src + "/") for src in copied):
            missing.append(f"{APP_DIR}/{path} (infra/Dockerfile does not COPY {path})")
    for path in re.findall(r"(?<![\w/])(configs/[\w./-]+\.ya?ml)", text):
        if not (REPO / path).is_file():
            missing.append(f"{path} does not exist")
    return missing


# ------------------------------------------------------------------------------------------------
# Tests


def test_the_issue_7_manifests_exist():
    assert EXPECTED_MANIFESTS <= set(MANIFESTS), f"missing: {sorted(EXPECTED_MANIFESTS - set(MANIFESTS))}"


@pytest.mark.parametrize(("rel", "index", "doc"), ALL_DOCS, ids=DOC_IDS)
def test_manifest_validates_as_its_kind(rel, index, doc):
    assert schema_errors(doc) == []


def test_schema_check_catches_typos_and_wrong_types():
    """The validator is not vacuous: a misspelt CRD field, a numeric rayStartParams value and a
    bad core field are all reported."""
    cluster = next(doc for _, _, doc in ALL_DOCS if doc["kind"] == "RayCluster")
    spec = cluster["spec"]
    typo = {**cluster, "spec": {**spec, "workerGroupSpec": spec["workerGroupSpecs"]}}
    assert any("workerGroupSpec" in e for e in schema_errors(typo))
    numeric = {**cluster, "spec": {**spec, "headGroupSpec": {**spec["headGroupSpec"], "rayStartParams": {"num-cpus": 0}}}}
    assert schema_errors(numeric)
    job = next(doc for _, _, doc in ALL_DOCS if doc["kind"] == "CronJob")
    assert schema_errors({**job, "spec": {**job["spec"], "concurencyPolicy": "Forbid"}})
    assert schema_errors({"apiVersion": "ray.io/v1", "kind": "RayTask", "metadata": {"name": "x"}, "spec": {}})


@pytest.mark.parametrize(("rel", "index", "doc"), ALL_DOCS, ids=DOC_IDS)
def test_containers_run_as_non_root(rel, index, doc):
    found = list(containers(doc))
    for path, node in walk(doc):  # the autoscaler sidecar that KubeRay injects
        if path.endswith(".autoscalerOptions"):
            found.append((path, node))
    for path, container in found:
        context = container.get("securityContext") or {}
        assert context.get("runAsNonRoot") is True, f"{path}: securityContext.runAsNonRoot must be true"
        assert context.get("runAsUser", 1000) != 0, f"{path}: runAsUser 0"
        assert context.get("allowPrivilegeEscalation") is False, f"{path}: allowPrivilegeEscalation must be false"
        assert not context.get("privileged"), f"{path}: privileged"


@pytest.mark.parametrize(("rel", "index", "doc"), ALL_DOCS, ids=DOC_IDS)
def test_no_secret_in_manifests(rel, index, doc):
    assert doc["kind"] != "Secret", "Secrets are created with kubectl (infra/README.md), never committed"
    for path, node in walk(doc):
        if path.endswith(".env") and isinstance(node, list):
            for var in node:
                if SECRET_LIKE_ENV.search(var["name"]):
                    assert "value" not in var, f"{path}: {var['name']} has a literal value; use valueFrom.secretKeyRef"
    for path, text in strings(doc):
        assert not CREDENTIALS_IN_URL.search(text), f"{path}: credentials in a URL"


@pytest.mark.parametrize(("rel", "index", "doc"), ALL_DOCS, ids=DOC_IDS)
def test_nothing_is_exposed_outside_the_cluster(rel, index, doc):
    assert doc["kind"] not in EXPOSING_KINDS
    if doc["kind"] == "Service":
        assert doc["spec"].get("type", "ClusterIP") not in EXPOSING_SERVICE_TYPES
    for path, node in walk(doc):
        if path.endswith(".headGroupSpec"):  # the Ray head Service carries the dashboard (8265)
            assert node.get("serviceType", "ClusterIP") == "ClusterIP", f"{path}: dashboard exposed"
            assert not node.get("enableIngress"), f"{path}: dashboard Ingress"


def test_cronjobs_forbid_concurrent_runs():
    cronjobs = [doc for _, _, doc in ALL_DOCS if doc["kind"] == "CronJob"]
    assert cronjobs, "the legacy scheduled retraining (infra/k8s/cronjob-retrain.yaml) is a CronJob"
    for doc in cronjobs:
        assert doc["spec"].get("concurrencyPolicy") == "Forbid", doc["metadata"]["name"]


def test_retrain_submitter_may_only_create_and_get_rayjobs():
    roles = [doc for _, _, doc in load_docs_with_rel("infra/k8s/cronjob-retrain.yaml") if doc["kind"] == "Role"]
    assert [rule for role in roles for rule in role["rules"]] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}
    ]


def load_docs_with_rel(rel: str) -> list[tuple[str, int, dict]]:
    return [(r, i, doc) for r, i, doc in ALL_DOCS if r == rel]


@pytest.mark.parametrize(("rel", "index", "doc"), ALL_DOCS, ids=DOC_IDS)
def test_images_are_the_one_infra_dockerfile_builds(rel, index, doc):
    for path, container in containers(doc):
        image = container.get("image", "")
        assert image in {f"{IMAGE}:{v}" for v in VARIANTS}, f"{path}: image {image!r} is not {IMAGE}:{{{','.join(VARIANTS)}}}"
        gpu = any("nvidia.com/gpu" in (container.get("resources") or {}).get(k, {}) for k in ("requests", "limits"))
        assert (image == f"{IMAGE}:cuda") == gpu, f"{path}: GPU containers (and only they) use {IMAGE}:cuda"


@pytest.mark.parametrize(("rel", "index", "doc"), ALL_DOCS, ids=DOC_IDS)
def test_commands_refer_to_existing_modules_configs_and_files(rel, index, doc):
    texts = [text for _, text in strings(doc)]
    for _, container in containers(doc):  # command/args lists read as one command line
        texts.append(" ".join(map(str, (container.get("command") or []) + (container.get("args") or []))))
    missing = [m for text in texts for m in missing_references(text)]
    assert missing == [], f"{rel} refers to things that do not exist: {missing}"


def test_reference_check_catches_a_renamed_config_or_module():
    """What the test above does when a config is renamed: the old path is reported."""
    assert missing_references(f"python -m tokenmill.jobs.train {APP_DIR}/configs/renamed_away.yaml") == [
        f"{APP_DIR}/configs/renamed_away.yaml (configs/renamed_away.yaml does not exist in the repository)"
    ]
    assert missing_references("python -m tokenmill.jobs.no_such_job configs/nope.yaml") == [
        "module tokenmill.jobs.no_such_job (jobs/no_such_job.py does not exist)",
        "configs/nope.yaml does not exist",
    ]


def test_legacy_cronjob_submits_the_raycronjob_template_as_a_valid_rayjob():
    """infra/k8s/submit_rayjob.py turns raycronjob-retrain.yaml into the RayJob it creates."""
    spec = importlib.util.spec_from_file_location("submit_rayjob", INFRA / "k8s" / "submit_rayjob.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (cronjob,) = load_docs("infra/kuberay/raycronjob-retrain.yaml")
    rayjob = module.rayjob_from_cronjob(cronjob)
    assert schema_errors(rayjob) == []
    assert rayjob["spec"] == cronjob["spec"]["jobTemplate"]
    # The CronJob mounts the ConfigMap under the file name the submitter is given.
    (cron,) = [doc for _, _, doc in ALL_DOCS if doc["kind"] == "CronJob"]
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-1].endswith("/raycronjob-retrain.yaml")


# ------------------------------------------------------------------------------------------------
# What the shipped jobs run with: GPUs, shared storage, the MLflow server (issue 17)

MLFLOW_SERVICE = "http://mlflow:5000"  # infra/mlflow/mlflow.yaml's Service, same namespace


def job_specs() -> Iterator[tuple[str, dict]]:
    """(file, RayJob spec) of every RayJob and of every RayCronJob's job template."""
    for rel, _, doc in ALL_DOCS:
        if doc["kind"] == "RayJob":
            yield rel, doc["spec"]
        elif doc["kind"] == "RayCronJob":
            yield rel, doc["spec"]["jobTemplate"]


def entrypoint_config(entrypoint: str):
    """The typed config a `python -m tokenmill.jobs.train|retrain CONFIG --set ...` entrypoint runs with."""
    import shlex

    from tokenmill.pipeline.registry.config import load_retrain_config
    from tokenmill.pipeline.training.config import load_train_config

    words = shlex.split(entrypoint)
    module, path = words[words.index("-m") + 1], words[words.index("-m") + 2]
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    load = {"tokenmill.jobs.train": load_train_config, "tokenmill.jobs.retrain": load_retrain_config}[module]
    return load(REPO / path.replace(f"{APP_DIR}/", ""), overrides)


def gpu_worker_group(cluster_name: str) -> dict:
    (cluster,) = [doc for _, _, doc in ALL_DOCS if doc["kind"] == "RayCluster" and doc["metadata"]["name"] == cluster_name]
    groups = [g for g in cluster["spec"]["workerGroupSpecs"]
              if any(c.get("image") == f"{IMAGE}:cuda" for c in g["template"]["spec"]["containers"])]
    assert groups, f"RayCluster {cluster_name} has no worker group running {IMAGE}:cuda"
    return groups[0]


def test_training_jobs_use_gpus_shared_storage_and_the_mlflow_server():
    """Every shipped training RayJob (train, scheduled retrain) trains on the GPU worker group,
    reads shards and keeps checkpoints on s3://, logs to the MLflow server, and so passes the
    multi-node refusal of node-local storage."""
    from tokenmill.pipeline.training.cluster_check import check_cluster_storage

    trained = []
    for rel, spec in job_specs():
        if not re.search(r"-m tokenmill\.jobs\.(train|retrain)\b", spec["entrypoint"]):
            continue
        config = entrypoint_config(spec["entrypoint"])
        trained.append(rel)
        assert config.scaling.use_gpu, f"{rel}: scaling.use_gpu must be true"
        assert config.run.resolved_storage_path().startswith("s3://"), f"{rel}: checkpoints must be on s3://"
        assert config.tracking.tracking_uri == MLFLOW_SERVICE, f"{rel}: tracking_uri must be {MLFLOW_SERVICE}"
        if hasattr(config, "versions"):  # retrain: the data version is found at run time, under versions.prefix
            for url in (config.versions.prefix, config.validation.shards, config.retokenize.out_prefix):
                assert url.startswith("s3://"), f"{rel}: {url} must be on s3://"
            config = config.challenger_config(f"{config.versions.prefix}/v1", "challenger", None, MLFLOW_SERVICE)
        assert config.data.shards.startswith("s3://"), f"{rel}: data.shards must be on s3://"
        check_cluster_storage(config, {"data.shards": config.data.shards}, nodes=4)  # raises on anything node-local
    assert sorted(trained) == ["infra/kuberay/raycronjob-retrain.yaml", "infra/kuberay/rayjob-train.yaml"]


def test_tokenize_job_reads_the_model_from_the_mlflow_server():
    (spec,) = [spec for _, spec in job_specs() if "-m tokenmill.jobs.tokenize" in spec["entrypoint"]]
    words = spec["entrypoint"].split()
    assert words[words.index("--tracking-uri") + 1] == MLFLOW_SERVICE
    assert all(words[words.index(flag) + 1].startswith("s3://") for flag in ("--data", "--out"))


def test_cuda_image_records_gpu_system_metrics():
    """MLflow's GPU system metrics need `pynvml` (the nvidia-ml-py package): the cuda variant
    installs infra/requirements-cuda.txt, which lists it."""
    requirements = INFRA / "requirements-cuda.txt"
    names = [re.split(r"[<>=!~;\[ ]", line.strip())[0].lower()
             for line in requirements.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "nvidia-ml-py" in names
    dockerfile = DOCKERFILE.read_text()
    assert "infra/requirements-cuda.txt" in copied_into_image()
    (cuda_line,) = [line for line in dockerfile.splitlines() if line.strip().startswith("cuda)")]
    assert "-r infra/requirements-cuda.txt" in cuda_line


# ------------------------------------------------------------------------------------------------
# Nodes of N GPUs (issue 25): one Pod per node, bounded /dev/shm, IPC_LOCK, RDMA overlay, jobs
# that fill whole nodes and name only shared storage

GPU_NODE_LABEL = "nvidia.com/gpu.count"  # GPU feature discovery's label: GPUs on the node


def pod_shape(group: dict) -> tuple[int, int, float]:
    """(GPUs the node has, GPUs the Pod takes, CPUs the Pod takes) of a GPU worker group."""
    spec = group["template"]["spec"]
    resources = spec["containers"][0]["resources"]
    node_gpus = int((spec.get("nodeSelector") or {}).get(GPU_NODE_LABEL, 0))
    requests, limits = int(resources["requests"]["nvidia.com/gpu"]), int(resources["limits"]["nvidia.com/gpu"])
    assert requests == limits, f"{group['groupName']}: GPU requests {requests} != limits {limits}"
    return node_gpus, limits, float(resources["limits"]["cpu"])


def job_gpus(entrypoint: str) -> tuple[int, int]:
    """(GPUs a shipped job's entrypoint asks for, decode threads per GPU; 0 when not set)."""
    words = entrypoint.split()
    if "tokenmill.jobs.tokenize" in words:
        threads = int(words[words.index("--decode-threads") + 1]) if "--decode-threads" in words else 0
        return int(words[words.index("--gpus") + 1]), threads
    config = entrypoint_config(entrypoint)
    return (config.scaling.num_workers if config.scaling.use_gpu else 0), 0


def test_gpu_pods_hold_whole_nodes_and_every_job_fills_them():
    """One Ray worker Pod per GPU node with all its GPUs (NCCL uses NVLink / shared memory inside
    it), and every shipped job's GPUs = whole Pods: num_workers x 1 GPU = replicas x GPUs per node,
    with replicas within the group's maxReplicas (else the job never schedules)."""
    group = gpu_worker_group("tokenmill")
    node_gpus, pod_gpus, pod_cpus = pod_shape(group)
    assert pod_gpus == node_gpus > 1, f"a GPU Pod takes {pod_gpus} GPU(s) of a {node_gpus}-GPU node ({GPU_NODE_LABEL})"
    checked = []
    for rel, spec in job_specs():
        gpus, threads = job_gpus(spec["entrypoint"])
        replicas, rest = divmod(gpus, pod_gpus)
        assert rest == 0 and 1 <= replicas <= group["maxReplicas"], (
            f"{rel}: {gpus} GPU workers is not a whole number of {pod_gpus}-GPU Pods within maxReplicas "
            f"{group['maxReplicas']}")
        assert threads * pod_gpus <= pod_cpus, f"{rel}: {threads} decode threads x {pod_gpus} GPUs > {pod_cpus} CPUs"
        checked.append(rel)
    assert len(checked) == 3, checked  # train, tokenize, scheduled retrain


def ray_groups(doc: dict) -> Iterator[tuple[str, dict]]:
    """(name, group) of every head and worker group of a RayCluster, including a RayJob's own."""
    for path, node in walk(doc):
        if path.endswith(".headGroupSpec"):
            yield path, node
        elif path.endswith(".workerGroupSpecs"):
            yield from ((f"{path}[{g['groupName']}]", g) for g in node)


def memory_bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity))
    assert match and match.group(2) in {"", *units}, f"unknown quantity {quantity!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.mark.parametrize(("rel", "index", "doc"), ALL_DOCS, ids=DOC_IDS)
def test_ray_dev_shm_is_bounded_and_holds_the_object_store(rel, index, doc):
    """Every Ray Pod mounts a memory-backed /dev/shm with a sizeLimit below its memory limit (it
    counts against it), and pins Ray's object store below that limit."""
    for path, group in ray_groups(doc):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        mounts = {m["name"] for m in container.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"}
        (volume,) = [v for v in spec.get("volumes") or [] if v["name"] in mounts] or [None]
        assert volume and volume.get("emptyDir", {}).get("medium") == "Memory", f"{path}: no memory-backed /dev/shm"
        limit = volume["emptyDir"].get("sizeLimit")
        assert limit, f"{path}: /dev/shm has no sizeLimit (unbounded, counted against the Pod's memory)"
        assert memory_bytes(limit) < memory_bytes(container["resources"]["limits"]["memory"]), path
        store = group.get("rayStartParams", {}).get("object-store-memory")
        assert store and int(store) < memory_bytes(limit), f"{path}: object-store-memory {store} vs /dev/shm {limit}"


def test_gpu_workers_may_pin_memory_and_drop_everything_else():
    (container,) = gpu_worker_group("tokenmill")["template"]["spec"]["containers"]
    capabilities = container["securityContext"]["capabilities"]
    assert capabilities == {"drop": ["ALL"], "add": ["IPC_LOCK"]}, capabilities


def test_quantity_parser():
    assert memory_bytes("256Gi") == 256 * 2**30 and memory_bytes("200000000000") == 2e11
    with pytest.raises(AssertionError):
        memory_bytes("12 GB")


def json_pointer_add(doc: dict, pointer: str, value: Any) -> None:
    """RFC 6902 `add` into an existing object (what the overlays use), `~1` and `~0` decoded."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in pointer.lstrip("/").split("/")]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    assert isinstance(node, dict), f"{pointer}: adds into a list are not used by the overlays"
    node[last] = value


def kustomize_build(directory) -> list[dict]:
    """`kubectl kustomize DIRECTORY` for the subset infra/ uses: resources (files or directories)
    and JSON 6902 `add` patches selected by kind and name."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        docs += kustomize_build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        selected = [d for d in docs if d["kind"] == target["kind"] and d["metadata"].get("name") == target["name"]
                    and d["apiVersion"] == f"{target['group']}/{target['version']}"]
        assert selected, f"{directory}: patch target {target} selects nothing"
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "add", f"{directory}: only `add` patches are checked here, got {op['op']}"
            for doc in selected:
                json_pointer_add(doc, op["path"], op["value"])
    return docs


def test_rdma_overlay_adds_the_nic_to_the_gpu_workers_only():
    """infra/kuberay-rdma builds (as kubectl kustomize would) to a valid RayCluster whose GPU
    workers, and only they, request the RDMA device in requests and limits alike."""
    (base,) = kustomize_build(INFRA / "kuberay")
    assert base == load_docs("infra/kuberay/raycluster.yaml")[0]
    (cluster,) = kustomize_build(INFRA / "kuberay-rdma")
    assert schema_errors(cluster) == []
    added = {}
    for group in cluster["spec"]["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        extra = {kind: {k: v for k, v in resources[kind].items() if k not in {"cpu", "memory", "nvidia.com/gpu"}}
                 for kind in ("requests", "limits")}
        added[group["groupName"]] = extra
    assert added["cpu-workers"] == {"requests": {}, "limits": {}}
    gpu = added["gpu-workers"]
    assert gpu["requests"] == gpu["limits"] and len(gpu["limits"]) == 1, gpu
    with pytest.raises(KeyError):  # a patch path into a group that is not there fails the build
        json_pointer_add(cluster, "/spec/workerGroupSpecs/1/template/spec/nope/resources/x", 1)


# ------------------------------------------------------------------------------------------------
# What the shipped jobs name: shared storage and servers only (a path exists on one node only)

SHARED_SCHEMES = {"s3", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "models", "runs"}
LOCATION_KEYS = {"shards", "path", "root", "prefix", "uri", "out", "out_prefix", "storage_path", "tracking_uri",
                 "vgg_path", "lin_path", "init_from", "store"}
MUST_BE_SET = ("run.storage_path", "tracking.tracking_uri")  # None: a local default (<root>/ray, SQLite)
NODE_SCRATCH = {"run.root"}  # the driver's own run directory (export, lock files): the image makes it writable


def flat(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from flat(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node


def node_local_settings(settings: dict[str, Any]) -> list[str]:
    """Every setting (dotted key -> value) that names a location only one node has: a path, a
    file:// or builtin: source, or a location left to its local default."""
    local = [f"{key}=None (a local default)" for key in MUST_BE_SET if key in settings and settings[key] is None]
    for key, value in settings.items():
        if key in NODE_SCRATCH or not isinstance(value, str):
            continue
        looks_like_location = "://" in value or ":/" in value or value.startswith(("/", ".", "~", "builtin:"))
        if looks_like_location or key.rsplit(".", 1)[-1].lstrip("-").replace("-", "_") in LOCATION_KEYS:
            if value.split(":", 1)[0] not in SHARED_SCHEMES or ":" not in value:
                local.append(f"{key}={value}")
    return local


def job_settings(entrypoint: str) -> dict[str, Any]:
    """What a shipped job runs with: its resolved config (train, retrain) or its flags (tokenize)."""
    words = entrypoint.split()
    if "tokenmill.jobs.tokenize" in words:
        return {word: words[i + 1] for i, word in enumerate(words) if word.startswith("--") and i + 1 < len(words)}
    config = entrypoint_config(entrypoint)
    settings = dict(flat(config.model_dump(mode="json")))
    if hasattr(config, "versions"):  # retrain: data.shards is the newest version under versions.prefix
        settings.pop("data.shards")
    return settings


def test_every_job_names_only_shared_storage_and_servers():
    """Data, checkpoints, artifacts and tracking of every shipped job (its preset plus its --set
    values, or its flags) are s3:// or server URLs, for every setting that names a location."""
    for rel, spec in job_specs():
        settings = job_settings(spec["entrypoint"])
        assert node_local_settings(settings) == [], f"{rel}: node-local settings"
    # The check itself: the preset alone (no --set) is refused, for each of its local settings.
    alone = dict(flat(entrypoint_config(f"python -m tokenmill.jobs.train {APP_DIR}/configs/vqvae_mnist.yaml")
                      .model_dump(mode="json")))
    assert node_local_settings(alone) == ["run.storage_path=None (a local default)",
                                          "tracking.tracking_uri=None (a local default)", "data.shards=builtin:mnist5k"]
    assert node_local_settings({"--data": "/data/shards", "--out": "file:///x", "loss.perceptual.vgg_path": "vgg.pth",
                                "--tracking-uri": "sqlite:///m.db", "--model": "models:/m@champion"}) == [
        "--data=/data/shards", "--out=file:///x", "loss.perceptual.vgg_path=vgg.pth", "--tracking-uri=sqlite:///m.db"]


# ------------------------------------------------------------------------------------------------
# The image (issue 25): CUDA base with NCCL and rdma-core, torch for its CUDA, the diffusers
# extra, a run root the runtime user owns, LPIPS weights that can be baked in


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """infra/Dockerfile's stages: name (`AS` name, `final` for the last, `global` before the first
    FROM) -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped, `${X}` and `$X`
    expanded from the ARG/ENV defaults seen so far (an unset one stays as written)."""
    values, stages, current, line = {}, {"global": []}, "global", ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not line:
            continue
        line += raw.rstrip()
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        text, line = " ".join(line.split()), ""
        if not text or text.startswith("#"):
            continue
        instruction, _, args = text.partition(" ")
        args = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), args)
        if instruction.upper() == "FROM":
            current = args.split(" AS ")[-1] if " AS " in args else "final"
            stages[current] = []
        if instruction.upper() in {"ARG", "ENV"}:
            values.update(re.findall(r"(\w+)=(\S*)", args))
        stages[current].append((instruction.upper(), args))
    return stages


def shell_commands(stage: list[tuple[str, str]]) -> list[list[str]]:
    """The simple commands of a stage's RUN lines (split at &&, ;, ||), as word lists."""
    return [part.split() for instruction, args in stage if instruction == "RUN"
            for part in re.split(r"&&|\|\||;", args) if part.split()]


def test_image_runs_as_a_user_that_owns_the_run_root():
    """The final USER's uid is the manifests' runAsUser and owns `run.root` under the WORKDIR: the
    run root is created and chowned to it (WORKDIR and COPY would leave it to root)."""
    from tokenmill.pipeline.training.config import RunSection

    final = dockerfile_stages()["final"]
    (user,) = [args for instruction, args in final if instruction == "USER"][-1:]
    uid = user.split(":")[0]
    assert uid == "1000", f"the image runs as {user}, the manifests as runAsUser 1000"
    workdir = [args for instruction, args in final if instruction == "WORKDIR"][-1]
    assert workdir == APP_DIR
    run_root = f"{workdir}/{RunSection().root}"
    commands = shell_commands(final)
    assert any(c[0] == "mkdir" and run_root in c for c in commands), f"no RUN creates {run_root}"
    assert any(c[0] == "chown" and any(w.split(":")[0] in {uid, "ray"} for w in c[1:]) and run_root in c
               for c in commands), f"no RUN gives {run_root} to uid {uid}"


def test_cuda_image_has_nccl_rdma_and_the_torch_of_its_cuda():
    stages = dockerfile_stages()
    (cuda_from,) = [args for instruction, args in stages["base-cuda"] if instruction == "FROM"]
    (cpu_from,) = [args for instruction, args in stages["base-cpu"] if instruction == "FROM"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu(\S+) AS base-cuda", cuda_from)
    assert match, f"the cuda variant's base is {cuda_from}, not an nvidia/cuda cudnn-runtime image (NCCL inside)"
    # One Python for the Ray head (cpu) and the GPU workers (cuda): the same Ubuntu release.
    assert cpu_from == f"ubuntu:{match[3]} AS base-cpu", cpu_from
    installed = {w for c in shell_commands(stages["base-cuda"]) if c[:2] == ["apt-get", "install"] for w in c}
    assert {"rdma-core", "libibverbs1", "ibverbs-providers"} <= installed, installed
    env = dict(re.findall(r"(\w+)=(\S*)", " ".join(args for i, args in stages["base-cuda"] if i == "ENV")))
    assert env["TORCH_VARIANT"] == f"cu{match[1]}{match[2]}", f"torch for CUDA {env['TORCH_VARIANT']} on CUDA {match[0]}"
    assert dict(re.findall(r"(\w+)=(\S*)", " ".join(a for i, a in stages["base-cpu"] if i == "ENV")))["TORCH_VARIANT"] == "cpu"
    script = (REPO / "scripts" / "install_torch.sh").read_text()
    assert "TORCH_VARIANT" in script and 'from_index "$TORCH_INDEX/$TORCH_VARIANT"' in script
    final = shell_commands(stages["final"])
    assert ["bash", "scripts/install_torch.sh", "python"] in [c[-3:] for c in final]


def test_image_installs_the_diffusers_extra():
    from importlib.metadata import metadata

    assert "diffusers" in metadata("tokenmill").get_all("Provides-Extra")  # pyproject's extra of that name
    installs = [c for c in shell_commands(dockerfile_stages()["final"]) if c[:2] == ["pip", "install"]]
    assert any(re.fullmatch(r"""["']?\.\[([\w,]*)\]["']?""", w) and "diffusers" in w for c in installs for w in c), installs


def test_lpips_weights_can_be_baked_in_with_the_published_hashes():
    """LPIPS_{VGG,LIN}_URL build arguments fetch through pipeline/runtime/weights.py into the
    default places of models/lpips.py, checked against the published hashes by default."""
    from tokenmill.models.lpips import LIN_FILE, LIN_SHA256, VGG_FILE, VGG_SHA256

    final = dockerfile_stages()["final"]
    args = dict(a.split("=", 1) for i, a in final if i == "ARG" and "=" in a)
    assert (args["LPIPS_VGG_URL"], args["LPIPS_LIN_URL"]) == ("", "")  # optional: off unless given
    assert (args["LPIPS_VGG_SHA256"], args["LPIPS_LIN_SHA256"]) == (VGG_SHA256, LIN_SHA256)
    bake = " ".join(a for i, a in final if i == "RUN" and "python -m tokenmill.pipeline.runtime.weights" in a)
    assert bake and missing_references(bake) == []
    env = dict(re.findall(r"(\w+)=(\S*)", " ".join(a for i, a in final if i == "ENV")))
    assert env["TORCH_HOME"].startswith("/home/ray/")  # the runtime user's: the run-time cache sits beside it
    for name in (VGG_FILE, LIN_FILE):  # torch.hub.get_dir() is $TORCH_HOME/hub
        assert f"{env['TORCH_HOME']}/hub/checkpoints/{name}" in bake, name
