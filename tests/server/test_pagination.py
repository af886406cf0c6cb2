"""Pages of the lists (sessions, jobs, files) through the API, in-process.

The app runs over the in-memory FakeRuntime (sessions' files are plain host
directories), so hundreds of records cost milliseconds.  What is checked is the page
contract: boundaries, the fixed order, stability when items come and go while a list is
read, the errors of bad ``limit``/``cursor`` values, the SQL reading pages from an
index, and the SDK collecting every page.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import bastion
from bastion import Bastion, InvalidRequestError
from bastion.wire import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from bastion_server.api.app import create_app
from bastion_server.config import ServerConfig
from bastion_server.runtime import sandbox_fs
from bastion_server.runtime.sandbox_fs import SandboxFS
from bastion_server.service.container import Services
from bastion_server.store.sqlite import JobRecord, Store
from bastion_server.testing import FakeRuntime

LISTS = ("/v1/sessions", "/v1/sessions/{sid}/jobs", "/v1/sessions/{sid}/files")


@pytest.fixture
def runtime(tmp_path: Path) -> FakeRuntime:
    return FakeRuntime(tmp_path / "sandboxes")


@pytest.fixture
def api(tmp_path: Path, runtime: FakeRuntime) -> Iterator[TestClient]:
    config = ServerConfig(data_dir=tmp_path / "data", images_dir=tmp_path / "no-images")
    with TestClient(create_app(config, runtime), base_url="http://localhost") as client:
        yield client


def _services(api: TestClient) -> Services:
    services: Services = api.app.state.services  # type: ignore[attr-defined]
    return services


def _running_session(api: TestClient) -> str:
    sid: str = api.post("/v1/sessions").json()["session_id"]
    assert api.post(f"/v1/sessions/{sid}/start").status_code == 200
    return sid


def _run(api: TestClient, sid: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        r = api.post(f"/v1/sessions/{sid}/jobs", json={"command": ["true"]})
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    return ids


def _walk(
    api: TestClient, url: str, key: str, limit: int, between: Any = None, **params: str
) -> list[list[Any]]:
    """Every page of a list, calling ``between()`` after each page but the last."""
    pages, cursor = [], None
    while True:
        query = {**params, "limit": str(limit), **({"cursor": cursor} if cursor else {})}
        r = api.get(url, params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) >= {key, "next_cursor"}
        pages.append(body[key])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert isinstance(cursor, str) and cursor
        if between is not None:
            between()


def _error(response: Any) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return response.status_code, body["error"]["code"]


# --------------------------------------------------------------------------- boundaries


def test_job_pages_cover_the_list_in_order(api: TestClient) -> None:
    sid = _running_session(api)
    ids = _run(api, sid, 7)
    pages = _walk(api, f"/v1/sessions/{sid}/jobs", "jobs", 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [j["job_id"] for p in pages for j in p] == ids
    assert "output" in pages[0][0]  # still a JobInfo, without the output's text


def test_a_full_last_page_says_it_is_the_last(api: TestClient) -> None:
    sid = _running_session(api)
    ids = _run(api, sid, 6)
    pages = _walk(api, f"/v1/sessions/{sid}/jobs", "jobs", 3)
    assert [len(p) for p in pages] == [3, 3]  # no third, empty page to find the end
    assert [j["job_id"] for p in pages for j in p] == ids
    one = api.get(f"/v1/sessions/{sid}/jobs", params={"limit": "6"}).json()
    assert len(one["jobs"]) == 6 and one["next_cursor"] is None
    empty = api.get(f"/v1/sessions/{_running_session(api)}/jobs").json()
    assert empty == {"jobs": [], "next_cursor": None}


def test_default_and_largest_page(api: TestClient) -> None:
    sid = _running_session(api)
    store = _services(api).store
    total = MAX_PAGE_SIZE + 5
    for i in range(total):
        store.insert_job(
            JobRecord(
                id=f"job_{i:06d}",
                session_id=sid,
                status="completed",
                command=["true"],
                spec={},
                created_at=f"2026-01-01T00:00:00.{i:06d}Z",
            )
        )
    url = f"/v1/sessions/{sid}/jobs"
    first = api.get(url).json()
    assert len(first["jobs"]) == DEFAULT_PAGE_SIZE and first["next_cursor"]
    biggest = api.get(url, params={"limit": str(MAX_PAGE_SIZE)}).json()
    assert len(biggest["jobs"]) == MAX_PAGE_SIZE
    rest = api.get(url, params={"limit": str(MAX_PAGE_SIZE), "cursor": biggest["next_cursor"]})
    assert [j["job_id"] for j in rest.json()["jobs"]] == [
        f"job_{i:06d}" for i in range(MAX_PAGE_SIZE, total)
    ]
    assert rest.json()["next_cursor"] is None


def test_session_pages_and_their_old_shape(api: TestClient) -> None:
    ids = [api.post("/v1/sessions").json()["session_id"] for _ in range(5)]
    pages = _walk(api, "/v1/sessions", "sessions", 2)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [s["session_id"] for p in pages for s in p] == ids
    whole = api.get("/v1/sessions").json()  # a client that knows no pages: all of them
    assert set(whole) == {"sessions", "next_cursor"} and whole["next_cursor"] is None
    assert [s["session_id"] for s in whole["sessions"]] == ids


# --------------------------------------------------------------------------- stability


def test_jobs_started_while_a_list_is_read_never_repeat_or_skip(api: TestClient) -> None:
    sid = _running_session(api)
    before = _run(api, sid, 10)
    started: list[str] = []
    pages = _walk(
        api,
        f"/v1/sessions/{sid}/jobs",
        "jobs",
        3,
        between=lambda: started.extend(_run(api, sid, 2)),
    )
    seen = [j["job_id"] for p in pages for j in p]
    assert len(seen) == len(set(seen))
    # Everything that existed when the walk began, then everything started during it.
    assert seen == before + started


def test_sessions_deleted_while_a_list_is_read_shift_nothing(api: TestClient) -> None:
    ids = [api.post("/v1/sessions").json()["session_id"] for _ in range(7)]
    gone: list[str] = []

    def meanwhile() -> None:
        if not gone:  # after the first page: delete one shown and one not yet shown
            gone.extend([ids[0], ids[4]])
            for sid in gone:
                assert api.delete(f"/v1/sessions/{sid}").status_code == 200

    pages = _walk(api, "/v1/sessions", "sessions", 3, between=meanwhile)
    seen = [s["session_id"] for p in pages for s in p]
    # With offsets the deletion would shift ids[3] onto the first page, and skip it.
    assert seen == ids[:4] + ids[5:]


# --------------------------------------------------------------------------- files


def _names(pages: list[list[Any]]) -> list[bytes]:
    return [e["name"].encode("utf-8", "surrogateescape") for p in pages for e in p]


def test_file_pages_follow_the_names_bytes(api: TestClient, runtime: FakeRuntime) -> None:
    sid = _running_session(api)
    home = runtime.root / sid / "home" / "user"
    names = [f"f{i:02d}".encode() for i in range(20)]
    names += [b"Zeta", b"alpha", "é".encode(), b"a b", b"\xff-not-utf8", b"~"]
    for name in names:
        open(os.path.join(os.fsencode(home), name), "wb").close()
    (home / "subdir").mkdir()
    expected = sorted([*names, b"subdir"])
    pages = _walk(api, f"/v1/sessions/{sid}/files", "files", 10, path="/home/user")
    assert [len(p) for p in pages] == [10, 10, 7]
    assert _names(pages) == expected
    assert {e["type"] for p in pages for e in p} == {"file", "directory"}
    whole = api.get(f"/v1/sessions/{sid}/files", params={"path": "/home/user"}).json()
    assert set(whole) == {"path", "files", "next_cursor"} and whole["path"] == "/home/user"


def test_files_made_while_a_directory_is_read(api: TestClient, runtime: FakeRuntime) -> None:
    sid = _running_session(api)
    home = runtime.root / sid / "home" / "user"
    for i in range(9):
        (home / f"m{i}").touch()

    def meanwhile() -> None:
        (home / "a-before-the-cursor").touch()  # sorts before what was shown: not listed
        (home / "z-after-the-cursor").touch()  # after: listed, once
        (home / "m8").unlink()  # not yet shown: gone, and nothing else moves

    made = iter([meanwhile])
    pages = _walk(
        api,
        f"/v1/sessions/{sid}/files",
        "files",
        4,
        between=lambda: next(made, lambda: None)(),
        path="/home/user",
    )
    names = [n.decode() for n in _names(pages)]
    assert names == [f"m{i}" for i in range(8)] + ["z-after-the-cursor"]


def test_an_entry_that_vanishes_mid_page_does_not_end_the_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in "abcde":
        (tmp_path / name).touch()
    me = (os.getuid(), os.getgid())
    fs = SandboxFS(str(tmp_path), user=me, superuser=me)
    real_stat = os.stat

    def stat(name: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if name == "b":  # removed by the sandbox between the read of names and its stat
            raise FileNotFoundError(name)
        return real_stat(name, *args, **kwargs)

    monkeypatch.setattr(sandbox_fs.os, "stat", stat)
    # A page asks for one more entry than it shows: it must still get it, or a full
    # page would look like the last one.
    assert [e.name for e in fs.list("/", count=3)] == ["a", "c", "d"]
    assert [e.name for e in fs.list("/", after=b"c", count=3)] == ["d", "e"]


# --------------------------------------------------------------------------- bad params


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("url", LISTS)
def test_bad_limit_and_cursor_values(api: TestClient, url: str) -> None:
    sid = _running_session(api)
    url = url.format(sid=sid)
    for limit in ("0", "-1", str(MAX_PAGE_SIZE + 1), "many", "1.5", ""):
        assert _error(api.get(url, params={"limit": limit})) == (422, "invalid_request"), limit
    kind = url.rsplit("/", 1)[-1]
    other = "jobs" if kind != "jobs" else "sessions"
    for cursor in (
        "garbage!",
        "",
        "x" * 5000,
        base64.b64encode(b"\xff\xfe").decode(),
        _cursor([other, "2026-01-01T00:00:00Z", "ses_1"]),  # another list's
        _cursor([kind]),  # no key
        _cursor([kind, 1, 2]),
        _cursor({"kind": kind}),
        _cursor([kind, "\ud800", "\ud800"]),  # text SQLite cannot store
        _cursor([kind, "not-hex"]),
    ):
        r = api.get(url, params={"cursor": cursor})
        assert _error(r) == (400, "invalid_cursor"), cursor


def test_the_sdk_raises_invalid_request_for_a_bad_cursor(api: TestClient) -> None:
    with Bastion("http://localhost", transport=api._transport) as client:  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError) as caught:
            client.sessions.list(cursor="nope")
        assert caught.value.code == "invalid_cursor" and caught.value.status_code == 400
        with pytest.raises(InvalidRequestError):
            client.sessions.list(limit=0)


# --------------------------------------------------------------------------- the SDK


def test_the_sdk_collects_every_page(api: TestClient, runtime: FakeRuntime) -> None:
    sid = _running_session(api)
    ids = _run(api, sid, 25)
    home = runtime.root / sid / "home" / "user"
    for i in range(12):
        (home / f"n{i:02d}").touch()
    with Bastion("http://localhost", transport=api._transport) as client:  # type: ignore[arg-type]
        assert [j["job_id"] for j in client.jobs.list(sid)["jobs"]] == ids
        assert [j["job_id"] for j in client.jobs.iter_all(sid, page_size=4)] == ids
        page = client.jobs.list(sid, limit=10)
        assert [j["job_id"] for j in page["jobs"]] == ids[:10] and page["next_cursor"]
        after = client.jobs.list(sid, limit=10, cursor=page["next_cursor"])
        assert [j["job_id"] for j in after["jobs"]] == ids[10:20]
        files = client.files.list(sid, "/home/user")
        assert [f["name"] for f in files["files"]] == [f"n{i:02d}" for i in range(12)]
        assert files["path"] == "/home/user" and files["next_cursor"] is None
        assert len(list(client.files.iter_all(sid, "/home/user", page_size=5))) == 12
        sessions = client.sessions.list()
        assert [s["session_id"] for s in sessions["sessions"]] == [sid]
        assert [s["session_id"] for s in client.sessions.iter_all(page_size=1)] == [sid]


def test_the_sdk_docs_name_the_real_page_sizes() -> None:
    with Bastion("http://bastion.test") as client:
        resources = (client.sessions, client.jobs, client.files)
    for resource in resources:
        assert f"1 to {MAX_PAGE_SIZE}" in (resource.list.__doc__ or "")
        assert f"1 to {MAX_PAGE_SIZE}, the default" in (resource.iter_all.__doc__ or "")
        assert f"default {DEFAULT_PAGE_SIZE}" in (resource.list.__doc__ or "")
    assert f"1 to {MAX_PAGE_SIZE}; {DEFAULT_PAGE_SIZE} when not given" in (bastion.__doc__ or "")


# --------------------------------------------------------------------------- the SQL


def _plans(store: Store, call: Any) -> list[str]:
    """The query plan of every statement ``call()`` runs on the store."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        call()
    finally:
        store._db.set_trace_callback(None)
    assert statements
    return [
        " / ".join(row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql))
        for sql in statements
    ]


def test_pages_are_read_from_an_index(tmp_path: Path) -> None:
    store = Store(tmp_path / "bastion.db")
    key = ("2026-01-01T00:00:00.000000Z", "x")
    for plan in (
        *_plans(store, lambda: store.page_sessions("owner", None, 101)),
        *_plans(store, lambda: store.page_sessions("owner", key, 101)),
        *_plans(store, lambda: store.page_jobs("ses_1", None, 101)),
        *_plans(store, lambda: store.page_jobs("ses_1", key, 101)),
    ):
        assert "USING INDEX sessions_page" in plan or "USING INDEX jobs_page" in plan, plan
        assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan
    store.close()


def test_an_older_database_gets_the_page_indexes(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    Store(path).close()
    db = sqlite3.connect(path)  # as version 3 left it
    db.executescript(
        "DROP INDEX sessions_page; DROP INDEX jobs_page;"
        " CREATE INDEX jobs_session ON jobs(session_id, created_at); PRAGMA user_version=3;"
    )
    db.close()
    store = Store(path)
    indexes = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"sessions_page", "jobs_page"} <= indexes and "jobs_session" not in indexes
    store.close()


def test_openapi_documents_the_page_parameters(api: TestClient) -> None:
    spec = api.get("/v1/openapi.json").json()
    for url in (
        "/v1/sessions",
        "/v1/sessions/{session_id}/jobs",
        "/v1/sessions/{session_id}/files",
    ):
        params = {p["name"]: p for p in spec["paths"][url]["get"]["parameters"]}
        limit = params["limit"]["schema"]
        assert (limit["minimum"], limit["maximum"], limit["default"]) == (
            1,
            MAX_PAGE_SIZE,
            DEFAULT_PAGE_SIZE,
        )
        assert "cursor" in params
        refused = spec["paths"][url]["get"]["responses"]["400"]["description"]
        assert "invalid_cursor" in refused
