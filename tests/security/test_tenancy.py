"""API keys and tenants: a server with two keys keeps each key's sessions to itself.

Against a real `bastion serve --api-key A --api-key B`: requests without a valid key
are refused (401), and to key B every session, job and file of key A answers exactly
like one that does not exist (404 ``session_not_found``), never 403, so B cannot even
learn that A's ids exist.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from tests.conftest import ServerProcess

from bastion import (
    AuthenticationError,
    Bastion,
    JobNotFoundError,
    SessionNotFoundError,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MISSING_SESSION = "ses_" + "0" * 24


@dataclass
class Tenants:
    url: str
    key_a: str
    key_b: str
    a: Bastion
    b: Bastion
    a_sid: str
    a_job: str
    b_sid: str


@pytest.fixture(scope="module")
def tenants(auth_server: ServerProcess) -> Iterator[Tenants]:
    """Key A's running session with a finished job and a file; key B's own session."""
    key_a, key_b = auth_server.api_keys
    with (
        Bastion(base_url=auth_server.url, api_key=key_a) as a,
        Bastion(base_url=auth_server.url, api_key=key_b) as b,
    ):
        a_sid = a.sessions.create()["session_id"]
        b_sid = ""
        try:
            a.sessions.start(a_sid)
            a.files.upload(a_sid, b"tenant A's data", "/home/user/a.txt")
            a_job = a.jobs.run_and_wait(a_sid, ["echo", "from A"])["job_id"]
            b_sid = b.sessions.create()["session_id"]
            b.sessions.start(b_sid)
            yield Tenants(auth_server.url, key_a, key_b, a, b, a_sid, a_job, b_sid)
        finally:
            a.sessions.delete(a_sid)
            if b_sid:
                b.sessions.delete(b_sid)


def assert_a_untouched(t: Tenants) -> None:
    """A's session is still A's, running, with its file and its job."""
    assert t.a.sessions.get(t.a_sid)["status"] == "running"
    assert t.a.files.download(t.a_sid, "/home/user/a.txt") == b"tenant A's data"
    assert t.a.jobs.get(t.a_sid, t.a_job)["output"]["console_output"] == "from A\n"


# --------------------------------------------------------------------------- keys


def test_health_answers_without_a_key(auth_server: ServerProcess) -> None:
    response = httpx.get(auth_server.url + "/v1/health", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    with Bastion(base_url=auth_server.url, api_key=None) as anonymous:
        assert anonymous.health()["status"] == "ok"


def _keyless(url: str, monkeypatch: pytest.MonkeyPatch) -> Bastion:
    monkeypatch.delenv("BASTION_API_KEY", raising=False)
    return Bastion(base_url=url)


def _every_call(t: Tenants) -> list[tuple[str, Callable[[Bastion], object]]]:
    return [
        ("sessions.list", lambda c: c.sessions.list()),
        ("sessions.create", lambda c: c.sessions.create()),
        ("sessions.get", lambda c: c.sessions.get(t.a_sid)),
        ("sessions.stop", lambda c: c.sessions.stop(t.a_sid)),
        ("sessions.delete", lambda c: c.sessions.delete(t.a_sid)),
        ("jobs.run", lambda c: c.jobs.run(t.a_sid, ["true"])),
        ("jobs.get", lambda c: c.jobs.get(t.a_sid, t.a_job)),
        ("files.list", lambda c: c.files.list(t.a_sid, "/home/user")),
        ("files.download", lambda c: c.files.download(t.a_sid, "/home/user/a.txt")),
    ]


def test_no_key_is_rejected(tenants: Tenants, monkeypatch: pytest.MonkeyPatch) -> None:
    with _keyless(tenants.url, monkeypatch) as anonymous:
        for name, op in _every_call(tenants):
            with pytest.raises(AuthenticationError) as info:
                op(anonymous)
            assert info.value.status_code == 401, name
            assert info.value.code == "unauthorized", name
    response = httpx.get(tenants.url + "/v1/sessions", timeout=10)
    assert response.status_code == 401
    assert response.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert response.json()["error"]["code"] == "unauthorized"
    assert_a_untouched(tenants)


@pytest.mark.parametrize(
    "wrong",
    [
        "wrong-key-0123456789",
        "test-key-alpha-012345678",  # KEY_A minus its last character
        "test-key-alpha-01234567890",  # KEY_A plus one
        "TEST-KEY-ALPHA-0123456789",  # KEY_A in another case
        "test-key-alpha-0123456789test-key-bravo-9876543210",
    ],
)
def test_wrong_key_is_rejected(tenants: Tenants, wrong: str) -> None:
    assert wrong not in (tenants.key_a, tenants.key_b)
    with Bastion(base_url=tenants.url, api_key=wrong) as intruder:
        for name, op in _every_call(tenants):
            with pytest.raises(AuthenticationError) as info:
                op(intruder)
            assert info.value.status_code == 401, name
    assert_a_untouched(tenants)


def test_x_api_key_header_is_an_alternative(tenants: Tenants) -> None:
    def sessions_of(headers: dict[str, str]) -> httpx.Response:
        return httpx.get(tenants.url + "/v1/sessions", headers=headers, timeout=10)

    mine = sessions_of({"X-API-Key": tenants.key_a})
    assert mine.status_code == 200
    assert tenants.a_sid in {s["session_id"] for s in mine.json()["sessions"]}
    theirs = sessions_of({"X-API-Key": tenants.key_b})
    assert theirs.status_code == 200
    assert tenants.a_sid not in {s["session_id"] for s in theirs.json()["sessions"]}
    assert sessions_of({"X-API-Key": "wrong-key-0123456789"}).status_code == 401
    # The header works for everything, not just listing.
    got = httpx.get(
        f"{tenants.url}/v1/sessions/{tenants.a_sid}/files/content",
        params={"path": "/home/user/a.txt"},
        headers={"X-API-Key": tenants.key_a},
        timeout=10,
    )
    assert got.status_code == 200 and got.content == b"tenant A's data"
    foreign = httpx.get(
        f"{tenants.url}/v1/sessions/{tenants.a_sid}",
        headers={"X-API-Key": tenants.key_b},
        timeout=10,
    )
    assert foreign.status_code == 404
    assert foreign.json()["error"]["code"] == "session_not_found"


# --------------------------------------------------------------------------- tenant B on A's ids


B_OPS: dict[str, Callable[[Tenants], object]] = {
    "sessions.get": lambda t: t.b.sessions.get(t.a_sid),
    "sessions.start": lambda t: t.b.sessions.start(t.a_sid),
    "sessions.stop": lambda t: t.b.sessions.stop(t.a_sid),
    "sessions.delete": lambda t: t.b.sessions.delete(t.a_sid),
    "jobs.run": lambda t: t.b.jobs.run(t.a_sid, ["touch", "/home/user/b-was-here"]),
    "jobs.run_and_wait": lambda t: t.b.jobs.run_and_wait(t.a_sid, ["true"]),
    "jobs.list": lambda t: t.b.jobs.list(t.a_sid),
    "files.list": lambda t: t.b.files.list(t.a_sid, "/home/user"),
    "files.upload": lambda t: t.b.files.upload(t.a_sid, b"from B", "/home/user/b.txt"),
    "files.upload_over": lambda t: t.b.files.upload(t.a_sid, b"from B", "/home/user/a.txt"),
    "files.download": lambda t: t.b.files.download(t.a_sid, "/home/user/a.txt"),
    "files.delete": lambda t: t.b.files.delete(t.a_sid, "/home/user/a.txt"),
}


@pytest.mark.parametrize("op", sorted(B_OPS))
def test_other_tenant_gets_session_not_found(tenants: Tenants, op: str) -> None:
    with pytest.raises(SessionNotFoundError) as info:
        B_OPS[op](tenants)
    assert info.value.status_code == 404, repr(info.value)
    assert info.value.code == "session_not_found"
    assert_a_untouched(tenants)
    names = [f["name"] for f in tenants.a.files.list(tenants.a_sid, "/home/user")["files"]]
    assert "b.txt" not in names and "b-was-here" not in names


@pytest.mark.parametrize("op", ["sessions.get", "sessions.stop", "files.download", "jobs.list"])
def test_foreign_session_looks_exactly_like_a_missing_one(tenants: Tenants, op: str) -> None:
    """No existence oracle: the same code, status and message as for an unknown id."""
    with pytest.raises(SessionNotFoundError) as foreign:
        B_OPS[op](tenants)
    missing_t = Tenants(**{**tenants.__dict__, "a_sid": MISSING_SESSION})
    with pytest.raises(SessionNotFoundError) as missing:
        B_OPS[op](missing_t)
    assert foreign.value.status_code == missing.value.status_code == 404
    assert foreign.value.code == missing.value.code
    assert foreign.value.message.replace(tenants.a_sid, "<id>") == missing.value.message.replace(
        MISSING_SESSION, "<id>"
    )


def test_other_tenant_does_not_list_the_session(tenants: Tenants) -> None:
    theirs = {s["session_id"] for s in tenants.b.sessions.list()["sessions"]}
    assert tenants.a_sid not in theirs
    assert tenants.b_sid in theirs
    mine = {s["session_id"] for s in tenants.a.sessions.list()["sessions"]}
    assert tenants.a_sid in mine
    assert tenants.b_sid not in mine


def test_job_ids_are_not_reachable_across_tenants(tenants: Tenants) -> None:
    b, a_sid, a_job = tenants.b, tenants.a_sid, tenants.a_job
    # with A's session id: the session itself is not found
    for call in (
        lambda: b.jobs.get(a_sid, a_job),
        lambda: b.jobs.wait(a_sid, a_job, timeout=2),
        lambda: b.jobs.watch(a_sid, a_job, lambda _job: None, timeout=2),
    ):
        with pytest.raises(SessionNotFoundError) as info:
            call()
        assert info.value.status_code == 404
    # with B's own session id: A's job is not in it
    for call in (
        lambda: b.jobs.get(tenants.b_sid, a_job),
        lambda: b.jobs.wait(tenants.b_sid, a_job, timeout=2),
    ):
        with pytest.raises(JobNotFoundError) as jinfo:
            call()
        assert jinfo.value.code == "job_not_found"
    assert a_job not in {j["job_id"] for j in b.jobs.list(tenants.b_sid)["jobs"]}
    # and the raw event stream says the same
    for sid in (a_sid, tenants.b_sid):
        response = httpx.get(
            f"{tenants.url}/v1/sessions/{sid}/jobs/{a_job}/events",
            headers={"Authorization": f"Bearer {tenants.key_b}"},
            timeout=10,
        )
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] in ("session_not_found", "job_not_found")
        assert "from A" not in response.text
    assert_a_untouched(tenants)


def test_raw_api_never_answers_403(tenants: Tenants) -> None:
    base = f"{tenants.url}/v1/sessions/{tenants.a_sid}"
    headers = {"Authorization": f"Bearer {tenants.key_b}"}
    requests = [
        ("GET", base, None),
        ("POST", base + "/start", None),
        ("POST", base + "/stop", None),
        ("DELETE", base, None),
        ("GET", base + "/jobs", None),
        ("POST", base + "/jobs", {"command": ["true"]}),
        ("GET", f"{base}/jobs/{tenants.a_job}", None),
        ("GET", f"{base}/jobs/{tenants.a_job}/wait?timeout=1", None),
        ("GET", base + "/files?path=/", None),
        ("GET", base + "/files/content?path=/home/user/a.txt", None),
        ("DELETE", base + "/files?path=/home/user/a.txt", None),
    ]
    with httpx.Client(headers=headers, timeout=10) as http:
        for method, url, body in requests:
            response = http.request(method, url, json=body)
            assert response.status_code == 404, (method, url, response.status_code)
            assert response.json()["error"]["code"] == "session_not_found", (method, url)
        upload = http.put(
            base + "/files",
            params={"path": "/home/user/b.txt"},
            content=b"from B",
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 404, upload.text
    assert_a_untouched(tenants)


def test_idempotency_keys_are_per_tenant(tenants: Tenants) -> None:
    key = "idem-" + secrets.token_hex(8)
    a_new = tenants.a.sessions.create(idempotency_key=key)["session_id"]
    b_new = ""
    try:
        assert tenants.a.sessions.create(idempotency_key=key)["session_id"] == a_new
        b_new = tenants.b.sessions.create(idempotency_key=key)["session_id"]
        assert b_new != a_new, "tenant B got tenant A's session back by its idempotency key"
        assert tenants.b.sessions.get(b_new)["session_id"] == b_new
        with pytest.raises(SessionNotFoundError):
            tenants.b.sessions.get(a_new)
    finally:
        tenants.a.sessions.delete(a_new)
        if b_new and b_new != a_new:
            tenants.b.sessions.delete(b_new)
