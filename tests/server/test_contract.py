"""The API's contract, in-process: text at the edge, stored records that always read,
field limits, the OpenAPI document's errors and security, and the offline docs page."""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.conftest import IMAGES_DIR

from bastion.wire import (
    MAX_COMMAND_ARGS,
    MAX_COMMAND_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VARS,
    MAX_METADATA_ITEMS,
    MAX_METADATA_LENGTH,
)
from bastion_server.api.app import create_app
from bastion_server.config import ConfigError, ServerConfig

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def config() -> Iterator[ServerConfig]:
    root = Path(tempfile.mkdtemp(prefix="bastion-contract-", dir="/var/tmp"))
    root.chmod(0o711)
    yield ServerConfig(data_dir=root / "data", images_dir=IMAGES_DIR, pool_size=0)


@pytest.fixture(scope="module")
def api(config: ServerConfig) -> Iterator[TestClient]:
    app = create_app(config)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        yield client


def _error(response: Any) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return response.status_code, body["error"]["code"]


def _session_ids(api: TestClient) -> set[str]:
    response = api.get("/v1/sessions")
    assert response.status_code == 200, response.text
    return {s["session_id"] for s in response.json()["sessions"]}


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("url", "body", "where"),
    [
        ("/v1/sessions/ses_x/jobs", b'{"command": ["echo", "\\ud800"]}', "command[1]"),
        ("/v1/sessions/ses_x/jobs", b'{"command": ["true"], "env": {"\\udfff": "v"}}', "env."),
        ("/v1/sessions", b'{"metadata": {"k": "\\ud800"}}', "metadata.k"),
        ("/v1/sessions", b'{"metadata": {"k": "a\\uDC80b"}}', "metadata.k"),
        ("/v1/sessions", b'{"metadata": {"\\ud83d": "v"}}', "metadata."),
    ],
    ids=["command", "env-key", "metadata-value", "low-surrogate", "metadata-key"],
)
def test_a_lone_surrogate_is_refused_and_creates_nothing(
    api: TestClient, url: str, body: bytes, where: str
) -> None:
    before = _session_ids(api)
    response = api.post(url, content=body, headers=JSON)
    assert _error(response) == (422, "invalid_request")
    assert where in response.json()["error"]["message"]
    assert "surrogate" in response.json()["error"]["message"]
    assert _session_ids(api) == before


@pytest.mark.parametrize(
    "body",
    [b'{"metadata": {"k": "\xed\xa0\x80"}}', b'{"metadata": {"k": "\xff"}}'],
    ids=["encoded-surrogate", "not-utf8"],
)
def test_a_body_that_is_not_utf8_is_malformed(api: TestClient, body: bytes) -> None:
    before = _session_ids(api)
    assert _error(api.post("/v1/sessions", content=body, headers=JSON)) == (400, "malformed_json")
    assert _session_ids(api) == before


def test_paired_surrogates_and_escapes_are_plain_text(api: TestClient) -> None:
    body = b'{"metadata": {"emoji": "\\ud83d\\ude00", "slash": "\\\\ud800"}}'
    response = api.post("/v1/sessions", content=body, headers=JSON)
    assert response.status_code == 201, response.text
    try:
        assert response.json()["metadata"] == {"emoji": "\U0001f600", "slash": "\\ud800"}
    finally:
        api.delete(f"/v1/sessions/{response.json()['session_id']}")


def test_a_poisoned_stored_record_does_not_fail_reads(
    api: TestClient, config: ServerConfig
) -> None:
    """Rows written before text was checked (or damaged) still list, read and delete."""
    poisoned = api.post("/v1/sessions", json={"metadata": {"k": "v"}}).json()["session_id"]
    damaged = api.post("/v1/sessions").json()["session_id"]
    with sqlite3.connect(config.data_dir / "bastion.db") as db:
        db.execute(
            "UPDATE sessions SET metadata = ? WHERE id = ?",
            (json.dumps({"k": "\ud800", "\udcff": "x"}), poisoned),
        )
        db.execute("UPDATE sessions SET metadata = '{not json' WHERE id = ?", (damaged,))
    assert {poisoned, damaged} <= _session_ids(api)
    record = api.get(f"/v1/sessions/{poisoned}")
    assert record.status_code == 200
    assert record.json()["metadata"] == {"k": "?", "\ufffd": "x"}
    assert api.get(f"/v1/sessions/{damaged}").json()["metadata"] == {}
    for sid in (poisoned, damaged):
        assert api.delete(f"/v1/sessions/{sid}").status_code == 200


# --------------------------------------------------------------------------- field limits


def _env_of(total: int) -> dict[str, str]:
    """Variables of ``total`` bytes in all, each counted as NAME=value."""
    env, left, i = {}, total, 0
    while left > 0:
        name = f"V{i:04}"
        size = min(left, 60_000) - len(name) - 1
        env[name] = "x" * max(size, 0)
        left -= len(name) + 1 + max(size, 0)
        i += 1
    return env


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"command": ["true"], "env": _env_of(MAX_ENV_BYTES)}, (409, "session_state")),
        ({"command": ["true"], "env": _env_of(MAX_ENV_BYTES + 1)}, (422, "invalid_request")),
        ({"command": ["true"], "env": {f"V{i}": "" for i in range(MAX_ENV_VARS + 1)}},
         (422, "invalid_request")),
        ({"command": ["echo", "x" * (MAX_COMMAND_BYTES - 4)]}, (409, "session_state")),
        ({"command": ["echo", "x" * (MAX_COMMAND_BYTES - 3)]}, (422, "invalid_command")),
        ({"command": ["true"] * (MAX_COMMAND_ARGS + 1)}, (422, "invalid_command")),
        ({"command": ["true"], "cwd": "/" + "d" * 4096}, (422, "invalid_request")),
    ],
    ids=["env-at-cap", "env-bytes", "env-count", "command-at-cap", "command-bytes",
         "command-args", "cwd"],
)  # fmt: skip
def test_job_fields_are_capped(
    api: TestClient, body: dict[str, Any], expected: tuple[int, str]
) -> None:
    sid = api.post("/v1/sessions").json()["session_id"]  # created, not running
    try:
        assert _error(api.post(f"/v1/sessions/{sid}/jobs", json=body)) == expected
    finally:
        api.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(MAX_METADATA_ITEMS + 1)},
        {"k": "v" * (MAX_METADATA_LENGTH + 1)},
        {"k" * (MAX_METADATA_LENGTH + 1): "v"},
    ],
    ids=["items", "value", "key"],
)
def test_metadata_is_capped_and_nothing_is_created(
    api: TestClient, metadata: dict[str, str]
) -> None:
    before = _session_ids(api)
    assert _error(api.post("/v1/sessions", json={"metadata": metadata})) == (
        422,
        "invalid_request",
    )
    assert _session_ids(api) == before


def test_other_session_fields_are_capped(api: TestClient) -> None:
    before = _session_ids(api)
    for body, headers in [
        ({"network": {"enabled": True, "allow": ["10.0.0.1"] * 65}}, {}),
        ({"idle_timeout": 1e12}, {}),
        ({"max_lifetime": -1}, {}),
        ({}, {"Idempotency-Key": "k" * 256}),
    ]:
        assert _error(api.post("/v1/sessions", json=body, headers=headers)) == (
            422,
            "invalid_request",
        ), body
    assert _session_ids(api) == before


# --------------------------------------------------------------------------- OpenAPI


@pytest.fixture(scope="module")
def document(api: TestClient) -> dict[str, Any]:
    response = api.get("/v1/openapi.json")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def _v1_operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in document["paths"].items():
        if path.startswith("/v1/"):
            for method, operation in operations.items():
                yield path, method, operation


def test_every_operation_documents_its_errors_with_the_error_body(
    document: dict[str, Any],
) -> None:
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    schemas = document["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error"]
    detail = schemas["ErrorDetail"]
    assert set(detail["required"]) == {"code", "message"}
    operations = list(_v1_operations(document))
    assert len(operations) >= 15
    for path, method, operation in operations:
        responses = operation["responses"]
        errors = {s for s in responses if s[0] in "45"}
        assert {"403", "429", "500"} <= errors, (method, path)
        for status in errors:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == ref, (method, path, status)
            assert "`" in responses[status]["description"]  # names the codes
        if path != "/v1/health":
            assert "401" in errors, (method, path)
        if "{session_id}" in path:
            assert "404" in errors, (method, path)
        if "application/json" in operation.get("requestBody", {}).get("content", {}):
            assert {"400", "408", "413", "422"} <= errors, (method, path)
    assert '"#/components/schemas/HTTPValidationError"' not in json.dumps(
        {p: document["paths"][p] for p in document["paths"] if p.startswith("/v1/")}
    )


def test_the_documented_validation_error_is_the_one_sent(
    api: TestClient, document: dict[str, Any]
) -> None:
    response = api.post("/v1/sessions", json={"limits": {"memory": 5}})
    assert _error(response) == (422, "invalid_request")
    assert "422" in document["paths"]["/v1/sessions"]["post"]["responses"]


def test_the_api_key_is_a_declared_security_scheme(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"]["in"] == "header"
    assert schemes["apiKeyHeader"]["name"] == "X-API-Key"
    for path, _method, operation in _v1_operations(document):
        if path == "/v1/health":
            assert operation["security"] == []
        else:
            assert {"bearerAuth": []} in operation["security"], path


# --------------------------------------------------------------------------- docs page


def test_the_docs_page_uses_only_assets_the_server_serves(api: TestClient) -> None:
    page = api.get("/v1/docs")
    assert page.status_code == 200
    html = page.text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)""", html) + re.findall(
        r"""url:\s*['"]([^'"]+)""", html
    )
    assert urls, html
    assert not re.search(r"https?://", html), "the page must not load anything from outside"
    for url in urls:
        assert url.startswith("/v1/"), url
        asset = api.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "swagger-ui-bundle.js" in html
    js = api.get("/v1/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in js.content
    assert api.get("/v1/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert _error(api.get("/v1/docs/assets/secrets.txt")) == (404, "not_found")


def test_the_docs_need_no_key(config: ServerConfig) -> None:
    keyed = ServerConfig(
        data_dir=config.data_dir.parent / "keyed",
        images_dir=IMAGES_DIR,
        pool_size=0,
        api_keys=("contract-key-0123456789",),
    )
    with TestClient(create_app(keyed)) as api:
        assert api.get("/v1/docs").status_code == 200
        assert api.get("/v1/docs/assets/swagger-ui-bundle.js").status_code == 200
        assert api.get("/v1/openapi.json").status_code == 200
        assert _error(api.get("/v1/sessions")) == (401, "unauthorized")


# --------------------------------------------------------------------------- methods


def test_a_wrong_method_is_405_naming_every_method_of_the_path(api: TestClient) -> None:
    response = api.request("OPTIONS", "/v1/sessions")
    assert _error(response) == (405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"
    files = api.request("PATCH", "/v1/sessions/ses_x/files")
    assert files.headers["allow"] == "GET, PUT, DELETE"


def test_a_concrete_path_allows_only_its_own_methods(api: TestClient) -> None:
    # /v1/images/import is its own path (POST), not an image named "import".
    response = api.request("OPTIONS", "/v1/images/import")
    assert _error(response) == (405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert api.request("OPTIONS", "/v1/images/judge").headers["allow"] == "GET, DELETE"


def test_a_body_for_no_route_is_not_checked_before_routing(api: TestClient) -> None:
    response = api.request("TRACE", "/v1/sessions", content=b"\xff\xfe", headers=JSON)
    assert _error(response) == (405, "method_not_allowed")
    assert _error(api.post("/v1/nowhere", content=b"\xff", headers=JSON)) == (404, "not_found")


def test_a_short_api_key_is_refused_saying_why() -> None:
    with pytest.raises(ConfigError, match="at least 8 characters") as info:
        ServerConfig(api_keys=("right-length-key", "short")).check()
    assert "short" not in str(info.value), "the message must not echo a key"
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert "at least 8 characters" in readme


# --------------------------------------------------------------------------- running sessions


@pytest.fixture(scope="module")
def running(api: TestClient) -> Iterator[str]:
    sid = api.post("/v1/sessions").json()["session_id"]
    assert api.post(f"/v1/sessions/{sid}/start").status_code == 200
    yield sid
    api.delete(f"/v1/sessions/{sid}")


def test_terminal_input_with_a_lone_surrogate_is_a_bad_message(
    api: TestClient, running: str
) -> None:
    with api.websocket_connect(f"ws://localhost/v1/sessions/{running}/terminal") as ws:
        assert ws.receive_json()["type"] == "init"
        ws.send_text('{"type": "input", "payload": {"data": "echo \\ud800\\n"}}')
        while (message := ws.receive_json())["type"] == "term_output":
            pass
        assert message["type"] == "error"
        assert message["payload"]["code"] == "invalid_request"
        assert "Unicode" in message["payload"]["message"]


def test_a_job_answered_within_its_wait_is_a_documented_200(
    api: TestClient, running: str, document: dict[str, Any]
) -> None:
    r = api.post(f"/v1/sessions/{running}/jobs", params={"wait": 10}, json={"command": ["true"]})
    assert (r.status_code, r.json()["status"]) == (200, "completed")
    responses = document["paths"]["/v1/sessions/{session_id}/jobs"]["post"]["responses"]
    assert {"200", "202"} <= set(responses)
    assert responses["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobInfo"
    }


@pytest.mark.slow
def test_the_database_shrinks_after_a_session_with_big_jobs_is_deleted(
    api: TestClient, config: ServerConfig
) -> None:
    """Through the API: the jobs' env goes with the session, and the reaper gives the
    space back to the file system (in a worker thread) within a few seconds."""
    db = config.data_dir / "bastion.db"

    def size() -> int:
        wal = Path(f"{db}-wal")
        return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    sid = api.post("/v1/sessions").json()["session_id"]
    api.post(f"/v1/sessions/{sid}/start")
    env = {"BIG": "x" * (MAX_ENV_BYTES - 8)}
    for _ in range(60):  # 60 x 128 KiB of env
        r = api.post(
            f"/v1/sessions/{sid}/jobs", params={"wait": 10}, json={"command": ["true"], "env": env}
        )
        assert r.status_code == 200, r.text
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = size()
    assert before > 7 * 1024 * 1024
    jobs = api.get(f"/v1/sessions/{sid}/jobs").json()["jobs"]
    assert api.delete(f"/v1/sessions/{sid}").status_code == 200
    deadline = time.monotonic() + 15
    while size() > before - 6 * 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert size() <= before - 6 * 1024 * 1024, f"{before} -> {size()} bytes"
    kept = api.get(f"/v1/sessions/{sid}/jobs/{jobs[0]['job_id']}")
    if kept.status_code == 200:  # a deleted session's jobs keep their results
        assert kept.json()["status"] == "completed"
