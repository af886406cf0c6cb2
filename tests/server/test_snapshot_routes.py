"""The pause, resume, snapshot, fork and restore routes and /v1/snapshots in-process, on
the fake runtime: status codes, error bodies and their codes, tenancy."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bastion.wire import ERROR_HTTP_STATUS, ErrorCode
from bastion_server.api.app import create_app
from bastion_server.config import ServerConfig
from bastion_server.testing import FakeRuntime

KEY_A, KEY_B = "snapshot-key-a-123456", "snapshot-key-b-123456"


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    root = Path(tempfile.mkdtemp(prefix="bastion-snap-api-"))
    config = ServerConfig(
        data_dir=root / "data", images_dir=root / "no-images", api_keys=(KEY_A, KEY_B)
    )
    (root / "data").mkdir()
    with TestClient(create_app(config, FakeRuntime(root / "sandboxes"))) as client:
        yield client


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(response: object, code: ErrorCode) -> None:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert response.status_code == ERROR_HTTP_STATUS[code]  # type: ignore[attr-defined]


def _running(api: TestClient, key: str = KEY_A) -> str:
    sid = api.post("/v1/sessions", headers=_as(key)).json()["session_id"]
    assert api.post(f"/v1/sessions/{sid}/start", headers=_as(key)).status_code == 200
    return str(sid)


def test_pause_and_resume_routes(api: TestClient) -> None:
    sid = _running(api)
    paused = api.post(f"/v1/sessions/{sid}/pause", headers=_as(KEY_A))
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    _error(api.post(f"/v1/sessions/{sid}/pause", headers=_as(KEY_A)), ErrorCode.SESSION_STATE)
    job = api.post(f"/v1/sessions/{sid}/jobs", json={"command": ["true"]}, headers=_as(KEY_A))
    _error(job, ErrorCode.SESSION_PAUSED)
    files = api.get(f"/v1/sessions/{sid}/files", params={"path": "/"}, headers=_as(KEY_A))
    _error(files, ErrorCode.SESSION_PAUSED)
    _error(api.post(f"/v1/sessions/{sid}/pause", headers=_as(KEY_B)), ErrorCode.SESSION_NOT_FOUND)
    resumed = api.post(f"/v1/sessions/{sid}/resume", headers=_as(KEY_A))
    assert resumed.status_code == 200 and resumed.json()["status"] == "running"
    assert resumed.json()["paused_timeout"] is None


def test_snapshot_routes(api: TestClient) -> None:
    sid = _running(api)
    made = api.post(f"/v1/sessions/{sid}/snapshots", json={"name": "n"}, headers=_as(KEY_A))
    assert made.status_code == 201, made.text
    snap = made.json()
    assert snap["status"] == "ready" and snap["name"] == "n" and snap["session_id"] == sid
    later = api.post(f"/v1/sessions/{sid}/snapshots?wait=false", headers=_as(KEY_A))
    assert later.status_code == 202 and later.json()["status"] == "creating"
    got = api.get(f"/v1/snapshots/{snap['snapshot_id']}", headers=_as(KEY_A))
    assert got.status_code == 200 and got.json() == snap
    listed = api.get("/v1/snapshots", params={"limit": 1}, headers=_as(KEY_A)).json()
    assert listed["snapshots"][0]["snapshot_id"] == snap["snapshot_id"] and listed["next_cursor"]
    assert api.get("/v1/snapshots", headers=_as(KEY_B)).json()["snapshots"] == []
    _error(
        api.get(f"/v1/snapshots/{snap['snapshot_id']}", headers=_as(KEY_B)),
        ErrorCode.SNAPSHOT_NOT_FOUND,
    )
    bad_cursor = api.get("/v1/snapshots", params={"cursor": "nope"}, headers=_as(KEY_A))
    _error(bad_cursor, ErrorCode.INVALID_CURSOR)
    bad_name = api.post(f"/v1/sessions/{sid}/snapshots", json={"name": 5}, headers=_as(KEY_A))
    _error(bad_name, ErrorCode.INVALID_REQUEST)

    copy = api.post("/v1/sessions", json={"snapshot": snap["snapshot_id"]}, headers=_as(KEY_A))
    assert copy.status_code == 201 and copy.json()["snapshot"] == snap["snapshot_id"]
    stranger = api.post("/v1/sessions", json={"snapshot": snap["snapshot_id"]}, headers=_as(KEY_B))
    _error(stranger, ErrorCode.SNAPSHOT_NOT_FOUND)
    _error(
        api.post("/v1/sessions", json={"snapshot": 7}, headers=_as(KEY_A)),
        ErrorCode.INVALID_REQUEST,
    )

    restored = api.post(
        f"/v1/sessions/{sid}/restore", json={"snapshot_id": snap["snapshot_id"]}, headers=_as(KEY_A)
    )
    assert restored.status_code == 200 and restored.json()["snapshot"] == snap["snapshot_id"]
    missing = api.post(
        f"/v1/sessions/{sid}/restore", json={"snapshot_id": "snap_x"}, headers=_as(KEY_A)
    )
    _error(missing, ErrorCode.SNAPSHOT_NOT_FOUND)

    forked = api.post(f"/v1/sessions/{sid}/fork", json={"count": 2}, headers=_as(KEY_A))
    assert forked.status_code == 201, forked.text
    assert [s["status"] for s in forked.json()["sessions"]] == ["running", "running"]
    too_many = api.post(f"/v1/sessions/{sid}/fork", json={"count": 1000}, headers=_as(KEY_A))
    _error(too_many, ErrorCode.INVALID_REQUEST)

    deleted = api.delete(f"/v1/snapshots/{snap['snapshot_id']}", headers=_as(KEY_A))
    assert deleted.status_code == 200 and deleted.json()["snapshot_id"] == snap["snapshot_id"]
    _error(
        api.get(f"/v1/snapshots/{snap['snapshot_id']}", headers=_as(KEY_A)),
        ErrorCode.SNAPSHOT_NOT_FOUND,
    )
