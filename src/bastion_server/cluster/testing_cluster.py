"""A real Ray cluster of several nodes on this machine, for tests and benchmarks.

``python -m bastion_server.cluster.testing_cluster head w1 w2`` starts a head node and
worker nodes with Ray's own multi-node helper (real raylets, each named by a
``bastion_node_<name>`` resource, small: one CPU and 80 MiB of object store each),
prints the cluster's address, then obeys lines on stdin: ``kill NAME`` (SIGKILL of
every Ray process of a worker node), ``add NAME`` (a worker node, again), and
``quit`` (or end of input: every node stopped).  Each command is answered ``ok``.
``NAME=DIR`` in place of a worker's name gives that node its own images directory
(``BASTION_NODE_IMAGES_DIR`` in its environment).

It runs in a process of its own (:class:`LocalRayCluster` starts it): the nodes are its
children, so a test process that dies takes nothing of the cluster's with it
unnoticed, and a finished test stops every node it started, nothing else.
Ray's health checks are tuned so a killed node is declared dead in about two seconds.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from bastion_server.cluster.node_agent import NODE_IMAGES_ENV

FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}


def _node_args(name: str, images_dir: str | None = None) -> dict[str, Any]:
    return {
        "num_cpus": 1,
        "object_store_memory": 80 * 1024**2,
        "resources": {f"bastion_node_{name}": 1},
        **({"env_vars": {NODE_IMAGES_ENV: images_dir}} if images_dir else {}),
    }


def main(names: Sequence[str]) -> int:
    from ray.cluster_utils import Cluster

    head, *named = names
    images = {n: d for n, _, d in (w.partition("=") for w in named)}
    workers = list(images)
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            **_node_args(head),
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    nodes = {name: cluster.add_node(**_node_args(name, images[name])) for name in workers}
    print(cluster.address, flush=True)
    try:
        for line in sys.stdin:
            command, _, name = line.strip().partition(" ")
            if command == "kill":
                cluster.remove_node(nodes.pop(name), allow_graceful=False)
            elif command == "add":
                nodes[name] = cluster.add_node(**_node_args(name, images.get(name)))
            elif command == "quit":
                break
            print("ok", flush=True)
    finally:
        cluster.shutdown()  # type: ignore[no-untyped-call]
    return 0


class LocalRayCluster:
    """The cluster above, run in a child process and driven through its stdin."""

    def __init__(self, names: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion_server.cluster.testing_cluster", *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError("the test cluster did not start")

    def _say(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ok":
            raise RuntimeError(f"the test cluster did not do {line!r}")

    def kill(self, name: str) -> None:
        self._say(f"kill {name}")

    def add(self, name: str) -> None:
        self._say(f"add {name}")

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
