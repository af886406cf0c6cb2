"""A session's view names its node: the server's --node-name (on the fake runtime)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi.testclient import TestClient

from bastion_server.api.app import create_app
from bastion_server.config import ServerConfig
from bastion_server.testing import FakeRuntime

KEY = "placement-key-123456"


def test_the_session_view_names_its_node() -> None:
    root = Path(tempfile.mkdtemp(prefix="bastion-placement-"))
    (root / "data").mkdir()
    config = ServerConfig(
        data_dir=root / "data",
        images_dir=root / "no-images",
        api_keys=(KEY,),
        node_name="node-7",
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(config, FakeRuntime(root / "sandboxes"))) as api:
        created = api.post("/v1/sessions", headers=auth).json()
        assert created["node"] == "node-7"
        sid = created["session_id"]
        assert api.get(f"/v1/sessions/{sid}", headers=auth).json()["node"] == "node-7"
        listed = api.get("/v1/sessions", headers=auth).json()["sessions"]
        assert [s["node"] for s in listed if s["session_id"] == sid] == ["node-7"]
