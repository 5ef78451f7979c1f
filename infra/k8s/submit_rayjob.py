"""Create one RayJob from a RayCronJob's jobTemplate, then wait for it to finish.

Run by infra/k8s/cronjob-retrain.yaml, the scheduled retraining for KubeRay releases without
RayCronJob. It calls the Kubernetes API with the Pod's ServiceAccount token (RBAC: rayjobs
create/get, nothing else), so the image needs no kubectl. It waits for the Ray job so that
the Kubernetes Job lasts as long as the retraining run: that is what makes the CronJob's
`concurrencyPolicy: Forbid` skip a tick while a run is still going.

    python submit_rayjob.py RAYCRONJOB_YAML
Exit status: 0 when the Ray job SUCCEEDED, 1 when it ended otherwise.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.request
from pathlib import Path

import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
POLL_S = 30
TERMINAL_DEPLOYMENT = {"Complete", "Failed"}


def api(method: str, path: str, body: dict | None = None) -> dict:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    request = urllib.request.Request(
        f"https://{host}:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {(SA_DIR / 'token').read_text().strip()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
    )
    context = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
    with urllib.request.urlopen(request, context=context, timeout=60) as response:
        return json.load(response)


def rayjob_from_cronjob(cronjob: dict) -> dict:
    """The RayJob that the RayCronJob controller would create: its jobTemplate as the spec."""
    name = cronjob["metadata"]["name"]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "generateName": f"{name}-",
            "labels": {**cronjob["metadata"].get("labels", {}), "tokenmill/schedule": name},
        },
        "spec": cronjob["spec"]["jobTemplate"],
    }


def main(argv: list[str]) -> int:
    (cronjob_path,) = argv
    cronjob = yaml.safe_load(Path(cronjob_path).read_text())
    namespace = (SA_DIR / "namespace").read_text().strip()
    base = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    created = api("POST", base, rayjob_from_cronjob(cronjob))
    name = created["metadata"]["name"]
    print(f"created rayjob/{name}", flush=True)
    while True:
        status = api("GET", f"{base}/{name}").get("status", {})
        deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
        print(f"rayjob/{name}: deployment={deployment or '-'} job={job or '-'}", flush=True)
        if deployment in TERMINAL_DEPLOYMENT:
            return 0 if job == "SUCCEEDED" else 1
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
