"""The store gives space back: a deleted session's jobs drop their env, and the pages
that frees return to the file system."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bastion.wire import MAX_ENV_BYTES
from bastion_server.store.sqlite import SCHEMA, SCHEMA_VERSION, JobRecord, SessionRecord, Store

MiB = 1024 * 1024


def _session(store: Store, sid: str) -> None:
    store.insert_session(
        SessionRecord(
            id=sid, owner="o", status="created", limits={}, metadata={},
            created_at="2026-01-01T00:00:00Z", updated_at="2026-01-01T00:00:00Z",
        )
    )  # fmt: skip


def _big_jobs(store: Store, sid: str, n: int) -> None:
    env = {"BIG": "x" * (MAX_ENV_BYTES - 8)}
    for i in range(n):
        job = JobRecord(
            id=f"job_{sid}_{i}", session_id=sid, status="completed", command=["true"],
            spec={"env": env, "cwd": None, "timeout": None}, created_at=f"t{i:05}",
            exit_code=0,
        )  # fmt: skip
        store.insert_job(job)
        store.update_job(job)


def _size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def test_a_deleted_sessions_jobs_keep_their_results_and_drop_their_env(tmp_path: Path) -> None:
    store = Store(tmp_path / "bastion.db")
    _session(store, "ses_a")
    _session(store, "ses_b")
    _big_jobs(store, "ses_a", 2)
    _big_jobs(store, "ses_b", 1)
    store.update_session_status("ses_a", "deleted", "2026-01-01T00:01:00Z")
    job = store.get_job("job_ses_a_0")
    assert job is not None
    assert (job.status, job.exit_code, job.command) == ("completed", 0, ["true"])
    assert job.spec == {"env": {}, "cwd": None, "timeout": None}
    kept = store.get_job("job_ses_b_0")
    assert kept is not None and len(kept.spec["env"]["BIG"]) > 1000, "other sessions keep theirs"
    assert store.space_to_reclaim


def test_the_database_shrinks_after_deleting_a_session_with_big_jobs(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    store = Store(path)
    _session(store, "ses_big")
    _session(store, "ses_small")
    _big_jobs(store, "ses_big", 120)  # 120 x 128 KiB of env
    _big_jobs(store, "ses_small", 1)
    store.reclaim_space()  # checkpoints: the size before is the file's own
    before = _size(path)
    assert before > 15 * MiB
    store.update_session_status("ses_big", "deleted", "2026-01-01T00:01:00Z")
    freed = store.reclaim_space()
    after = _size(path)
    assert freed > 3000
    assert after < 2 * MiB, f"{before} -> {after} bytes"
    assert not store.space_to_reclaim
    store.close()
    reopened = Store(path)
    small = reopened.get_job("job_ses_small_0")
    assert small is not None and small.spec["env"]
    assert reopened._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_an_older_database_is_switched_to_incremental_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    with sqlite3.connect(path) as db:  # as an earlier version made it: auto_vacuum none
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    store = Store(path)
    assert store._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    _session(store, "ses_old")
    _big_jobs(store, "ses_old", 40)
    store.reclaim_space()
    before = _size(path)
    store.update_session_status("ses_old", "deleted", "2026-01-01T00:01:00Z")
    store.reclaim_space()
    assert _size(path) < before / 4
