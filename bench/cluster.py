"""Jobs through a cluster gateway: on the gateway's own node against another node.

    .venv/bin/python bench/cluster.py [jobs]

Starts a two-node Ray cluster on this machine (head + w1;
bastion_server/cluster/testing_cluster.py) and a real ``bastion serve --ray`` on the
head, places one session on each node, and reports for each: the median and p90 wall
time of a trivial job (``true``, run and waited for through the SDK), and the
gateway's CPU time per job (from /proc); then the median create+start of a session.
The 2-core machine cannot show scale-out throughput (docs/CLUSTER.md says why and how
it grows).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bastion import Bastion
from bastion_server.cluster.testing_cluster import LocalRayCluster
from bastion_server.testing import ServerProcess


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    root = Path(tempfile.mkdtemp(prefix="bc-", dir="/var/tmp"))
    root.chmod(0o711)
    cluster = LocalRayCluster(["head", "w1"])
    gateway = ServerProcess(root / "gw", extra_args=("--ray", cluster.address, "--pool-size", "0"))
    try:
        gateway.start(timeout=180)
        assert gateway.proc is not None
        with Bastion(base_url=gateway.url) as bastion:
            by_node: dict[str, str] = {}
            starts: list[float] = []
            while len(by_node) < 2 or len(starts) < 6:
                t = time.perf_counter()
                sid = bastion.sessions.create()["session_id"]
                node = bastion.sessions.start(sid)["node"]
                starts.append(time.perf_counter() - t)
                if node in by_node:
                    bastion.sessions.delete(sid)
                else:
                    by_node[str(node)] = sid
            for node, sid in sorted(by_node.items()):
                bastion.jobs.run_and_wait(sid, ["true"])  # warm
                times = []
                cpu = _cpu_seconds(gateway.proc.pid)
                for _ in range(jobs):
                    t = time.perf_counter()
                    bastion.jobs.run_and_wait(sid, ["true"])
                    times.append(time.perf_counter() - t)
                cpu = (_cpu_seconds(gateway.proc.pid) - cpu) / jobs
                times.sort()
                where = "the gateway's own node" if node == "head" else "another node"
                print(
                    f"job on {node:4s} ({where:22s}): median {statistics.median(times) * 1000:6.1f}"
                    f" ms, p90 {times[int(len(times) * 0.9)] * 1000:6.1f} ms, gateway CPU"
                    f" {cpu * 1000:5.1f} ms/job"
                )
            print(f"create+start across nodes: median {statistics.median(starts) * 1000:.0f} ms")
            for sid in by_node.values():
                bastion.sessions.delete(sid)
    finally:
        gateway.stop()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
