"""Unit tests of server pieces that need no sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion_server.api.auth import ANONYMOUS, authenticate, fingerprint
from bastion_server.config import ConfigError, Limits, ServerConfig
from bastion_server.runtime.agent_protocol import (
    FRAME_HEADER,
    MAX_FRAME,
    FrameReader,
    FrameTooLarge,
    decode_header,
    encode_frame,
    encode_json,
)
from bastion_server.runtime.sandbox_fs import InvalidPath, split_path
from bastion_server.service.errors import ServiceError
from bastion_server.store.joblog import JobLogWriter, read_output, read_records


@pytest.mark.parametrize(
    ("path", "parts"),
    [("/", []), ("/a/b", ["a", "b"]), ("//a/./b/", ["a", "b"]), ("/é x\ny", ["é x\ny"])],
)
def test_split_path_accepts(path: str, parts: list[str]) -> None:
    assert split_path(path) == parts


@pytest.mark.parametrize(
    "path", ["", "a/b", "/a/../b", "/..", "/a\x00", "/" + "x" * 256, "/a" * 2049]
)
def test_split_path_rejects(path: str) -> None:
    with pytest.raises(InvalidPath):
        split_path(path)


def test_joblog_keeps_order_and_caps_each_stream(tmp_path: Path) -> None:
    log = JobLogWriter(tmp_path / "j.log", max_bytes_per_stream=10)
    assert log.append("stdout", "é".encode()[:1]) == b"\xc3"
    log.append("stderr", b"err")
    log.append("stdout", "é".encode()[1:] + b"12345678901234")
    log.close()
    assert log.dropped == {"stdout": 6, "stderr": 0}
    records = [(s, d) for s, d, _ in read_records(tmp_path / "j.log")]
    assert [s for s, _ in records] == ["stdout", "stderr", "stdout"]
    stdout, stderr = read_output(tmp_path / "j.log")
    assert stdout == "é12345678" and stderr == "err"  # the split character is whole


def test_joblog_replay_from_an_offset_skips_partial_records(tmp_path: Path) -> None:
    path = tmp_path / "j.log"
    log = JobLogWriter(path, 100)
    log.append("stdout", b"one")
    log.close()
    ((_, _, offset),) = read_records(path)
    with open(path, "ab") as f:
        f.write(b"O\x00\x00\x00\x05ab")  # a record still being written
    assert list(read_records(path, offset)) == []


def test_frames_round_trip_across_arbitrary_splits() -> None:
    stream = (
        encode_json({"op": "exec"}) + encode_frame(b"O", b"x" * 70000) + encode_frame(b"E", b"")
    )
    reader, frames = FrameReader(), []
    for i in range(0, len(stream), 999):
        frames += reader.feed(stream[i : i + 999])
    assert [k for k, _ in frames] == [b"J", b"O", b"E"]
    assert frames[1][1] == b"x" * 70000


def test_oversized_frame_is_refused_from_its_header() -> None:
    header = FRAME_HEADER.pack(b"O", MAX_FRAME + 1)
    with pytest.raises(FrameTooLarge):
        FrameReader().feed(header)
    with pytest.raises(FrameTooLarge):
        decode_header(header)
    assert decode_header(FRAME_HEADER.pack(b"O", MAX_FRAME)) == (b"O", MAX_FRAME)


def test_authenticate() -> None:
    assert authenticate((), None) == ANONYMOUS
    assert authenticate(("k" * 10, "j" * 10), "j" * 10) == fingerprint("j" * 10)
    for supplied in (None, "", "x" * 10):
        with pytest.raises(ServiceError) as err:
            authenticate(("k" * 10,), supplied)
        assert err.value.code == "unauthorized"
    assert "k" * 10 not in fingerprint("k" * 10)


def test_config_refuses_open_non_loopback() -> None:
    ServerConfig(host="127.0.0.1").check()
    ServerConfig(host="::1").check()
    ServerConfig(host="0.0.0.0", api_keys=("a-long-key",)).check()
    with pytest.raises(ConfigError, match="without an API key"):
        ServerConfig(host="0.0.0.0").check()
    with pytest.raises(ConfigError):
        ServerConfig(api_keys=("short",)).check()
    with pytest.raises(ConfigError):
        ServerConfig(default_limits=Limits(10**6, 10, 1.0, 1024)).check()


def test_store_migrates_a_version_1_database(tmp_path: Path) -> None:
    import sqlite3

    from bastion_server.store.sqlite import SCHEMA_VERSION, Store

    old = sqlite3.connect(tmp_path / "b.db")
    old.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL,"
        " status_reason TEXT, limits TEXT NOT NULL, metadata TEXT NOT NULL,"
        " idempotency_key TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);"
        "INSERT INTO sessions VALUES ('ses_1', 'o', 'stopped', NULL, '{}', '{}', NULL, 't', 't');"
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),"
        " status TEXT NOT NULL, command TEXT NOT NULL, spec TEXT NOT NULL, exit_code INTEGER,"
        " failure_reason TEXT, error_message TEXT, created_at TEXT NOT NULL, started_at TEXT,"
        " finished_at TEXT);"
        "CREATE INDEX jobs_session ON jobs(session_id, created_at);"
    )
    old.commit()
    old.close()
    store = Store(tmp_path / "b.db")
    (record,) = store.list_sessions()
    assert record.id == "ses_1" and record.on_timeout == "stop" and record.idle_timeout is None
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
