"""A server that has begun to shut down refuses what it could not finish: new jobs
(503 ``server_shutdown``, nothing created) and new terminals (an ``error`` message
with that code, then close code 1001)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from tests.conftest import IMAGES_DIR

from bastion.wire import TerminalCloseCode
from bastion_server.api.app import create_app
from bastion_server.config import ServerConfig


@pytest.mark.slow
def test_a_draining_server_refuses_new_jobs_and_terminals() -> None:
    root = Path(tempfile.mkdtemp(prefix="bastion-drain-", dir="/var/tmp"))
    root.chmod(0o711)
    app = create_app(ServerConfig(data_dir=root / "data", images_dir=IMAGES_DIR, pool_size=0))
    with TestClient(app, base_url="http://localhost") as api:
        sid = api.post("/v1/sessions", json={}).json()["session_id"]
        assert api.post(f"/v1/sessions/{sid}/start").status_code == 200
        try:
            assert api.portal is not None
            api.portal.call(app.state.services.begin_shutdown)

            refused = api.post(f"/v1/sessions/{sid}/jobs", json={"command": ["true"]})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_shutdown"
            assert api.get(f"/v1/sessions/{sid}/jobs").json()["jobs"] == []

            with api.websocket_connect(f"ws://localhost/v1/sessions/{sid}/terminal") as ws:
                message = ws.receive_json()
                assert message["type"] == "error"
                assert message["payload"]["code"] == "server_shutdown"
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == TerminalCloseCode.GOING_AWAY
        finally:
            api.delete(f"/v1/sessions/{sid}")
