"""The app in-process (Starlette's TestClient): protocol-level behaviour of the API.

The runtime behind it is the real one; these tests exercise what the API layer owns:
the error table, authentication, validation, OpenAPI, and the event stream shape.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tests.conftest import IMAGES_DIR

from bastion.wire import ERROR_HTTP_STATUS, ErrorCode
from bastion_server.api.app import create_app
from bastion_server.config import ServerConfig

KEY = "in-process-key-123456"


@pytest.fixture(scope="module")
def config() -> Iterator[ServerConfig]:
    root = Path(tempfile.mkdtemp(prefix="bastion-api-", dir="/var/tmp"))
    root.chmod(0o711)
    yield ServerConfig(data_dir=root / "data", images_dir=IMAGES_DIR)


@pytest.fixture(scope="module")
def api(config: ServerConfig) -> Iterator[TestClient]:
    # A keyless server answers only to loopback Host names (DNS rebinding): not "testserver".
    with TestClient(create_app(config), base_url="http://localhost") as client:
        yield client


def _error(response: object) -> tuple[int, str]:
    r = response
    body = r.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return r.status_code, body["error"]["code"]  # type: ignore[attr-defined]


def test_health_and_openapi(api: TestClient) -> None:
    assert api.get("/v1/health").json()["status"] == "ok"
    spec = api.get("/v1/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/v1/sessions",
        "/v1/sessions/{session_id}/jobs/{job_id}/wait",
        "/v1/sessions/{session_id}/files",
        "/v1/sessions/{session_id}/files/content",
        "/v1/sessions/{session_id}/jobs/{job_id}/events",
    } <= paths


def test_unknown_route_and_method(api: TestClient) -> None:
    assert _error(api.get("/v1/nothing")) == (404, "not_found")
    assert _error(api.put("/v1/sessions")) == (405, "method_not_allowed")


def test_malformed_json_and_bad_bodies(api: TestClient) -> None:
    headers = {"content-type": "application/json"}
    assert _error(api.post("/v1/sessions", content=b"{nope", headers=headers)) == (
        400,
        "malformed_json",
    )
    assert _error(api.post("/v1/sessions", content=b"{nope")) == (400, "malformed_json")
    assert _error(api.post("/v1/sessions", json=[1, 2])) == (422, "invalid_request")
    assert _error(api.post("/v1/sessions", json={"limits": {"memory": 5}})) == (
        422,
        "invalid_request",
    )
    assert _error(api.post("/v1/sessions", json={"limits": {"memory_mb": "lots"}})) == (
        422,
        "invalid_request",
    )


def test_job_requests_are_validated_before_the_session(api: TestClient) -> None:
    sid = api.post("/v1/sessions").json()["session_id"]
    try:
        url = f"/v1/sessions/{sid}/jobs"
        assert _error(api.post(url, json={})) == (422, "invalid_request")
        assert _error(api.post(url, json={"command": "ls"})) == (422, "invalid_request")
        assert _error(api.post(url, json={"command": []})) == (422, "invalid_command")
        assert _error(api.post(url, json={"command": ["ls"], "timeout": 0})) == (
            422,
            "invalid_request",
        )
        assert _error(api.post(url, json={"command": ["ls"], "env": {"A=B": "c"}})) == (
            422,
            "invalid_request",
        )
        # a valid job on a session that is not running
        assert _error(api.post(url, json={"command": ["ls"]})) == (409, "session_state")
        assert _error(api.get(f"{url}/job_nope")) == (404, "job_not_found")
        assert _error(api.get(f"{url}/job_nope/wait", params={"timeout": -1})) == (
            422,
            "invalid_request",
        )
    finally:
        api.delete(f"/v1/sessions/{sid}")


def test_file_paths_are_checked(api: TestClient) -> None:
    sid = api.post("/v1/sessions").json()["session_id"]
    api.post(f"/v1/sessions/{sid}/start")
    try:
        url = f"/v1/sessions/{sid}/files"
        for bad in ("relative", "/a/../b", "/a\x00b", "/" + "x" * 300, "/a" * 2100):
            status, code = _error(api.put(url, params={"path": bad}, content=b"x"))
            assert (status, code) == (422, "invalid_path"), bad
        assert api.get(url).status_code == 200
        assert _error(api.delete(url, params={"path": "/"})) == (422, "invalid_path")
    finally:
        api.delete(f"/v1/sessions/{sid}")


def test_event_stream_replays_a_finished_job(api: TestClient) -> None:
    sid = api.post("/v1/sessions").json()["session_id"]
    api.post(f"/v1/sessions/{sid}/start")
    try:
        job = api.post(
            f"/v1/sessions/{sid}/jobs",
            json={"command": ["sh", "-c", "printf 'a\\n'; printf 'b' >&2; exit 2"]},
        ).json()
        api.get(f"/v1/sessions/{sid}/jobs/{job['job_id']}/wait", params={"timeout": 10})
        with api.stream("GET", f"/v1/sessions/{sid}/jobs/{job['job_id']}/events") as r:
            assert r.headers["content-type"].startswith("application/x-ndjson")
            events = [json.loads(line) for line in r.iter_lines() if line]
        kinds = [e["type"] for e in events]
        assert kinds[-2:] == ["status", "end"]
        assert {"type": "stdout", "data": "a\n"} in events
        assert {"type": "stderr", "data": "b"} in events
        assert events[-1]["job"]["status"] == "failed"
        assert events[-1]["job"]["output"]["status_code"] == 2
        unknown = api.get(f"/v1/sessions/{sid}/jobs/job_nope/events")
        assert _error(unknown) == (404, "job_not_found")
    finally:
        api.delete(f"/v1/sessions/{sid}")


def test_api_keys(config: ServerConfig) -> None:
    keyed = ServerConfig(
        data_dir=config.data_dir.parent / "keyed", images_dir=IMAGES_DIR, api_keys=(KEY,)
    )
    with TestClient(create_app(keyed)) as api:
        assert api.get("/v1/health").status_code == 200  # no key needed
        r = api.get("/v1/sessions")
        assert _error(r) == (401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert _error(api.get("/v1/sessions", headers={"Authorization": "Bearer wrong"})) == (
            401,
            "unauthorized",
        )
        ok = api.get("/v1/sessions", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert api.get("/v1/sessions", headers={"X-API-Key": KEY}).status_code == 200
        with api.websocket_connect("/v1/sessions/ses_x/terminal") as ws:
            assert ws.receive_json()["payload"]["code"] == "unauthorized"


def test_every_error_code_has_a_status() -> None:
    assert set(ERROR_HTTP_STATUS) == set(ErrorCode)
