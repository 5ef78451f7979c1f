"""A Ray cluster of several nodes on this machine for tests/system/test_multinode.py.

`ray.cluster_utils.Cluster` (what Ray's own tests use) runs in this process, not in the test
session, so the session's own local Ray (`ray_local`) is never touched and test order does not
matter. Usage: `python tests/helpers/multinode.py SPEC_JSON` where SPEC_JSON is
{"head": {node args}, "workers": {"name": {node args}, ...}} (node args as for
`Cluster.add_node`: num_cpus, resources, ...). It prints one JSON line
{"address", "dashboard", "nodes": {name: {"node_id", "raylet_pid"}}}, then reads commands:

    remove NAME      remove that worker node through Cluster.remove_node; answers `removed NAME`
    add NAME ARGS    add a worker node (ARGS: node args as JSON); answers with its {"node_id", "raylet_pid"}

End of input shuts the cluster down. The environment (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN, the
S3 endpoint) is every node's, hence every Ray worker's and every submitted job's.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

# Run as a script, this file's folder (tests/helpers) comes first on sys.path, where the other
# helpers would shadow what they are named after (helpers/jobs.py the project's jobs/, ...): drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def free_port() -> int:  # helpers.net's: this script imports nothing of the tests
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_ports() -> dict[str, int]:
    """Ports a node would otherwise take from Ray's defaults (the session's Ray may hold them)."""
    return {"metrics_export_port": free_port(), "runtime_env_agent_port": free_port()}


def describe(node) -> dict:
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    return {"node_id": node.node_id, "raylet_pid": raylet.pid}


def main() -> None:
    spec = json.loads(sys.argv[1])
    head_args = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
                 "gcs_server_port": free_port(), "dashboard_agent_listen_port": free_port(), **own_ports(),
                 **spec["head"]}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    nodes = {"head": cluster.head_node}
    for name, args in spec["workers"].items():
        nodes[name] = cluster.add_node(**own_ports(), **args)
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "dashboard": f"http://127.0.0.1:{head_args['dashboard_port']}",
                      "nodes": {name: describe(node) for name, node in nodes.items()}}), flush=True)
    for line in sys.stdin:
        command, name, *args = line.split(maxsplit=2)
        if command == "remove":
            cluster.remove_node(nodes.pop(name))
            print(f"removed {name}", flush=True)
        elif command == "add":
            nodes[name] = cluster.add_node(**own_ports(), **json.loads(args[0]))
            print(json.dumps(describe(nodes[name])), flush=True)
    cluster.shutdown()
    cluster.remove_node(cluster.head_node)


if __name__ == "__main__":
    main()
