"""Without --ray, Ray is never imported: not by the server's modules, not even by the
cluster package's (it imports Ray only once a gateway joins a cluster)."""

from __future__ import annotations

import subprocess
import sys


def test_the_server_imports_no_ray() -> None:
    code = (
        "import sys\n"
        "import bastion_server.cli, bastion_server.api.app, bastion_server.service.container\n"
        "import bastion_server.cluster.gateway_runtime, bastion_server.cluster.node_agent\n"
        "from bastion_server.config import ServerConfig\n"
        "from bastion_server.cluster.gateway_runtime import ClusterRuntime\n"
        "ClusterRuntime('auto', ServerConfig())\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
