"""A server shut down while it starts a sandbox (its warm pool's, say) leaves nothing
behind: no mount, no process, no open file for the garbage collector to find."""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.conftest import IMAGES_DIR

from bastion_server.api.app import create_app
from bastion_server.config import ServerConfig
from bastion_server.runtime.oci import OciRuntime


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(f"{path}/")]


@pytest.mark.slow
def test_a_shutdown_while_a_sandbox_is_prepared_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = Path(tempfile.mkdtemp(prefix="bastion-mid-start-", dir="/var/tmp"))
    root.chmod(0o711)
    prepared = threading.Event()
    real = OciRuntime._prepare_start

    def prepare_then_linger(self: OciRuntime, *args: Any) -> Any:
        made = real(self, *args)  # the mounts and the user namespace are made...
        prepared.set()
        time.sleep(0.5)  # ... and the server is told to stop before they are returned
        return made

    monkeypatch.setattr(OciRuntime, "_prepare_start", prepare_then_linger)
    config = ServerConfig(data_dir=root / "data", images_dir=IMAGES_DIR, pool_size=1)
    with TestClient(create_app(config), base_url="http://localhost"):
        assert prepared.wait(60), "the warm pool never prepared a sandbox"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == [], leaked  # such as the namespace's holder "is still running"
    assert _mounts_under(root) == []
    assert [p.name for p in (root / "data" / "sessions").iterdir()] == []
    shutil.rmtree(root)
