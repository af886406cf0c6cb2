"""Durable records of sessions and jobs: one SQLite database in the data directory.

WAL mode, one connection used from the event loop's thread: every statement here is a
short indexed read or write (well under a millisecond), so the loop never waits long,
and one writer means no lock contention.  Job output is not stored here but in log
files beside the database (see :mod:`bastion_server.store.joblog`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion_server.unicode_text import printable, printable_tree

log = logging.getLogger("bastion.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT,
    limits TEXT NOT NULL,
    metadata TEXT NOT NULL,
    idempotency_key TEXT,
    idle_timeout REAL,
    max_lifetime REAL,
    on_timeout TEXT NOT NULL DEFAULT 'stop',
    network TEXT NOT NULL DEFAULT '{"enabled": false, "allow": []}',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    paused_timeout REAL,
    snapshot TEXT,
    node TEXT,
    image TEXT,
    sandbox TEXT,
    last_active_at REAL
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner, created_at);
CREATE INDEX IF NOT EXISTS sessions_page ON sessions(owner, created_at, id)
    WHERE status != 'deleted';
CREATE UNIQUE INDEX IF NOT EXISTS sessions_idempotency
    ON sessions(owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    status TEXT NOT NULL,
    command TEXT NOT NULL,
    spec TEXT NOT NULL,
    exit_code INTEGER,
    failure_reason TEXT,
    error_message TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    signal TEXT,
    usage TEXT
);
CREATE INDEX IF NOT EXISTS jobs_page ON jobs(session_id, created_at, id);
"""

#: API keys made at run time (only a SHA-256 hash of each key is kept) and the env
#: sessions give their jobs (apart from the session's shown record: secrets).
OPERATOR_TABLES = [
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        name TEXT,
        scope TEXT NOT NULL,
        tenant TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS api_keys_name ON api_keys(name)"
    " WHERE name IS NOT NULL AND revoked_at IS NULL",
    """CREATE TABLE IF NOT EXISTS session_env (
        session_id TEXT PRIMARY KEY REFERENCES sessions(id),
        env TEXT NOT NULL
    )""",
]
SCHEMA += "".join(f"{statement};\n" for statement in OPERATOR_TABLES)

#: Snapshots of sessions' files (see service/snapshots.py): a layer each, over its
#: ``parent`` snapshot's (or over the image, for none).  A deleted one's row stays
#: (status ``deleted``, hidden) until no session or snapshot stands on its layer.
SNAPSHOT_TABLES = [
    """CREATE TABLE IF NOT EXISTS snapshots (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        session_id TEXT NOT NULL,
        name TEXT,
        status TEXT NOT NULL,
        status_reason TEXT,
        parent TEXT,
        size_bytes INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS snapshots_page ON snapshots(owner, created_at, id)"
    " WHERE status != 'deleted'",
]
SCHEMA += "".join(f"{statement};\n" for statement in SNAPSHOT_TABLES)

#: Images by name (see service/images.py): an owner's own (``owner`` is its key's
#: tenant) or shared (``owner`` ''), each once ready naming its layer image on disk
#: (``ref``, below the images directory).  Sessions record theirs in ``image``.
IMAGE_TABLES = [
    """CREATE TABLE IF NOT EXISTS images (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        source TEXT NOT NULL,
        ref TEXT,
        digest TEXT,
        parent TEXT,
        size_bytes INTEGER NOT NULL DEFAULT 0,
        build_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (owner, name)
    )""",
]
SCHEMA += "".join(f"{statement};\n" for statement in IMAGE_TABLES)


#: Changes to databases made by earlier versions, in order: (version, statements).
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        2,
        [
            "ALTER TABLE sessions ADD COLUMN idle_timeout REAL",
            "ALTER TABLE sessions ADD COLUMN max_lifetime REAL",
            "ALTER TABLE sessions ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'stop'",
        ],
    ),
    (
        3,
        [
            "ALTER TABLE sessions ADD COLUMN network TEXT NOT NULL"
            """ DEFAULT '{"enabled": false, "allow": []}'""",
        ],
    ),
    (
        # Pages of lists are read by key: (created_at, id) after the last one shown.
        4,
        [
            "CREATE INDEX IF NOT EXISTS sessions_page ON sessions(owner, created_at, id)"
            " WHERE status != 'deleted'",
            "CREATE INDEX IF NOT EXISTS jobs_page ON jobs(session_id, created_at, id)",
            "DROP INDEX IF EXISTS jobs_session",
        ],
    ),
    (5, OPERATOR_TABLES),
    (
        # Pause and resume, and snapshots: a session may start from one.
        6,
        [
            "ALTER TABLE sessions ADD COLUMN paused_timeout REAL",
            "ALTER TABLE sessions ADD COLUMN snapshot TEXT",
            *SNAPSHOT_TABLES,
        ],
    ),
    # The node of a cluster that holds the session (bastion serve --ray).
    (7, ["ALTER TABLE sessions ADD COLUMN node TEXT"]),
    # A finished job's verdict: the signal that ended it, what it used (JSON).
    (8, ["ALTER TABLE jobs ADD COLUMN signal TEXT", "ALTER TABLE jobs ADD COLUMN usage TEXT"]),
    # Images: a session names the one it runs (JSON: name, digest, ref; NULL: default).
    (9, ["ALTER TABLE sessions ADD COLUMN image TEXT", *IMAGE_TABLES]),
    # Placement and the idle clock, so another process can take a session over: the
    # runtime's name for its sandbox, and when it was last active (epoch seconds).
    (
        10,
        [
            "ALTER TABLE sessions ADD COLUMN sandbox TEXT",
            "ALTER TABLE sessions ADD COLUMN last_active_at REAL",
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


#: The status of a session whose create is under way: its row is written before
#: anything is made on the host, and turns ``created`` in one compare-and-set once its
#: storage is whole.  No API read shows such a row; one found after a crash is rolled
#: back (its storage removed, its row deleted), so a create is all or nothing.
CREATING = "creating"


@dataclass
class SessionRecord:
    id: str
    owner: str
    status: str
    limits: dict[str, Any]
    metadata: dict[str, str]
    created_at: str
    updated_at: str
    status_reason: str | None = None
    idempotency_key: str | None = None
    idle_timeout: float | None = None
    max_lifetime: float | None = None
    on_timeout: str = "stop"
    network: dict[str, Any] = field(default_factory=lambda: {"enabled": False, "allow": []})
    #: Seconds a paused session may stay paused before ``on_timeout`` applies.
    paused_timeout: float | None = None
    #: The snapshot the session's files started from (None: the image alone).
    snapshot: str | None = None
    #: The node that holds the session's sandbox: a cluster's node, else the name of
    #: the server that created it (``--node-name``); None in rows of older servers.
    node: str | None = None
    #: The image it runs: ``{"name", "digest", "ref"}`` (None: the server's default).
    image: dict[str, str] | None = None
    #: What the runtime calls the session's sandbox (a container's name, say).
    sandbox: str | None = None
    #: When a request, job or terminal last touched it (epoch seconds; written at most
    #: every few seconds, and at once at a job's end and at each transition): the idle
    #: clock, kept across a restart.  None: never recorded (an older server's row).
    last_active_at: float | None = None


@dataclass
class SnapshotRecord:
    id: str
    owner: str
    session_id: str
    name: str | None
    status: str
    created_at: str
    updated_at: str
    status_reason: str | None = None
    parent: str | None = None
    size_bytes: int = 0


#: A deleted snapshot's status: hidden, its layer kept while anything stands on it.
SNAPSHOT_DELETED = "deleted"


@dataclass
class ImageRecord:
    """An image by name: ``owner`` '' is shared (stock images, an admin's)."""

    owner: str
    name: str
    status: str  # building | ready | failed
    source: str  # build | import | pull
    build_id: str
    created_at: str
    updated_at: str
    status_reason: str | None = None
    #: Its layer image below the images directory, once ready.
    ref: str | None = None
    digest: str | None = None
    #: The image it was built over (name), for a build.
    parent: str | None = None
    size_bytes: int = 0


@dataclass
class KeyRecord:
    """An API key made at run time; ``hash`` is the SHA-256 of the key (hex)."""

    id: str
    hash: str
    name: str | None
    scope: str
    tenant: str
    created_at: str
    revoked_at: str | None = None


@dataclass
class JobRecord:
    id: str
    session_id: str
    status: str
    command: list[str]
    spec: dict[str, Any]
    created_at: str
    exit_code: int | None = None
    failure_reason: str | None = None
    error_message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    #: The signal that ended the job ("SIGSEGV"); None for an exit or a job that never ran.
    signal: str | None = None
    #: What the job used (``JobUsageInfo``); None if it never ran, or from an old server.
    usage: dict[str, Any] | None = None


def _column(row: sqlite3.Row, name: str, default: Any) -> Any:
    """A JSON column, read so that no stored row can fail a listing: a value that does
    not parse (or is of the wrong kind) reads as ``default``, and text UTF-8 cannot
    carry (written before requests were checked for it) as printable text."""
    raw = row[name]
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        value = None
    if type(value) is not type(default):
        log.error("unreadable stored value", extra={"id": row["id"], "column": name})
        return default
    # Written with ensure_ascii: a surrogate can only be there as a \uDxxx escape.
    return printable_tree(value) if "\\ud" in raw.lower() else value


def _text(value: str | None) -> str | None:
    return None if value is None else printable(value)


#: PRAGMA auto_vacuum's value for "incremental".
_INCREMENTAL = 2
#: Pages (4 KiB each) returned to the file system per transaction of reclaim_space.
_VACUUM_STEP_PAGES = 2048


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Records hold tenants' commands and env (secrets): the server's alone.  SQLite
        # gives its -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)
        self.path = path
        #: Whether deletes have left free pages that :meth:`reclaim_space` can return.
        self.space_to_reclaim = False
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._use_incremental_vacuum()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        """Create the schema, or bring an older database up to it (PRAGMA user_version)."""
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='sessions'"
        ).fetchone()
        if not exists:
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return
        version = self._db.execute("PRAGMA user_version").fetchone()[0] or 1
        for target, statements in MIGRATIONS:
            if version < target:
                with self._db:
                    self._db.execute("BEGIN")
                    for statement in statements:
                        self._migrate_step(statement)
                    self._db.execute(f"PRAGMA user_version={target}")
                version = target

    def _migrate_step(self, statement: str) -> None:
        """One statement of a migration; adding a column that is already there (a
        database made by a newer schema, then marked older) is already done."""
        try:
            self._db.execute(statement)
        except sqlite3.OperationalError as exc:
            adds_column = statement.lstrip().upper().startswith("ALTER TABLE") and (
                "ADD COLUMN" in statement.upper()
            )
            if not (adds_column and "duplicate column name" in str(exc)):
                raise

    def _use_incremental_vacuum(self) -> None:
        """Let freed pages go back to the file system (see :meth:`reclaim_space`).

        A new database takes the mode before its first table; one made before it (mode
        0, "none") is rebuilt once with ``VACUUM``, which is what switching needs."""
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == _INCREMENTAL:
            return
        self._db.execute(f"PRAGMA auto_vacuum={_INCREMENTAL}")
        self._db.execute("VACUUM")

    def reclaim_space(self) -> int:
        """Give the pages that deletes freed back to the file system; the pages freed.

        Blocking (seconds for hundreds of MB): call it in a worker thread.  It uses a
        connection of its own and frees a bounded number of pages per transaction, so
        the event loop's writes wait for one short step at most."""
        self.space_to_reclaim = False
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        freed = 0
        try:
            while free := db.execute("PRAGMA freelist_count").fetchone()[0]:
                db.execute(f"PRAGMA incremental_vacuum({_VACUUM_STEP_PAGES})").fetchall()
                left = db.execute("PRAGMA freelist_count").fetchone()[0]
                if left >= free:
                    break  # nothing moved: do not spin
                freed += free - left
            # The file shrinks when the log is written back; an empty log takes no room.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.close()
        return freed

    def close(self) -> None:
        self._db.close()

    # -- sessions -------------------------------------------------------------------

    @staticmethod
    def _session(row: sqlite3.Row) -> SessionRecord:
        return SessionRecord(
            id=row["id"],
            owner=row["owner"],
            status=row["status"],
            status_reason=_text(row["status_reason"]),
            limits=_column(row, "limits", {}),
            metadata=_column(row, "metadata", {}),
            idempotency_key=row["idempotency_key"],
            idle_timeout=row["idle_timeout"],
            max_lifetime=row["max_lifetime"],
            on_timeout=row["on_timeout"],
            network=_column(row, "network", {"enabled": False, "allow": []}),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            paused_timeout=row["paused_timeout"],
            snapshot=row["snapshot"],
            node=row["node"],
            image=json.loads(row["image"]) if row["image"] else None,
            sandbox=row["sandbox"],
            last_active_at=row["last_active_at"],
        )

    def insert_session(self, s: SessionRecord) -> None:
        self._db.execute(
            "INSERT INTO sessions (id, owner, status, status_reason, limits, metadata,"
            " idempotency_key, idle_timeout, max_lifetime, on_timeout, network, created_at,"
            " updated_at, paused_timeout, snapshot, image, node)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                s.id,
                s.owner,
                s.status,
                s.status_reason,
                json.dumps(s.limits),
                json.dumps(s.metadata),
                s.idempotency_key,
                s.idle_timeout,
                s.max_lifetime,
                s.on_timeout,
                json.dumps(s.network),
                s.created_at,
                s.updated_at,
                s.paused_timeout,
                s.snapshot,
                json.dumps(s.image) if s.image is not None else None,
                s.node,
            ),
        )

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return self._session(row) if row else None

    def find_session_by_idempotency_key(self, owner: str, key: str) -> SessionRecord | None:
        row = self._db.execute(
            "SELECT * FROM sessions WHERE owner = ? AND idempotency_key = ?", (owner, key)
        ).fetchone()
        return self._session(row) if row else None

    def list_sessions(
        self, owner: str | None = None, *, include_deleted: bool = False
    ) -> list[SessionRecord]:
        query, args = "SELECT * FROM sessions WHERE 1=1", []
        if owner is not None:
            query += " AND owner = ?"
            args.append(owner)
        if not include_deleted:
            query += " AND status != 'deleted'"
        rows = self._db.execute(query + " ORDER BY created_at, id", args).fetchall()
        return [self._session(r) for r in rows]

    def page_sessions(
        self, owner: str, after: tuple[str, ...] | None, count: int
    ) -> list[SessionRecord]:
        """The owner's first ``count`` sessions not deleted after the key ``after``
        (``(created_at, id)``), in that order: a range of the index sessions_page."""
        rows = self._db.execute(
            "SELECT * FROM sessions WHERE owner = ? AND status != 'deleted'"
            f" AND status != '{CREATING}'"
            " AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?",
            (owner, *(after or ("", "")), count),
        ).fetchall()
        return [self._session(r) for r in rows]

    def list_creating_sessions(self) -> list[SessionRecord]:
        """Sessions whose create has not been committed (see :data:`CREATING`)."""
        rows = self._db.execute("SELECT * FROM sessions WHERE status = ?", (CREATING,)).fetchall()
        return [self._session(r) for r in rows]

    def commit_created(
        self,
        session_id: str,
        updated_at: str,
        *,
        node: str | None = None,
        sandbox: str | None = None,
        last_active_at: float | None = None,
    ) -> bool:
        """Turn a ``creating`` session ``created`` (a compare-and-set), recording in the
        same write where it was placed (``node``, ``sandbox``): whether it was."""
        cursor = self._db.execute(
            "UPDATE sessions SET status = 'created', updated_at = ?, node = ?, sandbox = ?,"
            " last_active_at = ? WHERE id = ? AND status = ?",
            (updated_at, node, sandbox, last_active_at, session_id, CREATING),
        )
        return cursor.rowcount == 1

    def remove_creating_session(self, session_id: str) -> None:
        """Forget a create that did not complete (nothing else refers to its row)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM session_env WHERE session_id = ?", (session_id,))
            self._db.execute(
                "DELETE FROM sessions WHERE id = ? AND status = ?", (session_id, CREATING)
            )

    def list_expirable_sessions(self) -> list[SessionRecord]:
        """Sessions not deleted that have an idle or paused timeout or a maximum lifetime."""
        rows = self._db.execute(
            "SELECT * FROM sessions WHERE status != 'deleted'"
            " AND (idle_timeout IS NOT NULL OR max_lifetime IS NOT NULL"
            " OR paused_timeout IS NOT NULL)"
        ).fetchall()
        return [self._session(r) for r in rows]

    def update_session_status(
        self,
        session_id: str,
        status: str,
        updated_at: str,
        reason: str | None = None,
        *,
        expected: str | None = None,
        last_active_at: float | None = None,
    ) -> bool:
        """Record a session's new status; with ``expected``, a compare-and-set: only
        if it is still in that status (what the caller read), else nothing is written
        and False is returned.  ``last_active_at`` is written with it when given."""
        query = "UPDATE sessions SET status = ?, status_reason = ?, updated_at = ?"
        args: list[Any] = [status, reason, updated_at]
        if last_active_at is not None:
            query += ", last_active_at = ?"
            args.append(last_active_at)
        query += " WHERE id = ?"
        args.append(session_id)
        if expected is not None:
            query += " AND status = ?"
            args.append(expected)
        if self._db.execute(query, args).rowcount != 1:
            return False
        if status == "deleted":  # a deleted session's secrets go with it
            self._db.execute("DELETE FROM session_env WHERE session_id = ?", (session_id,))
            # So does its jobs' env (up to MAX_ENV_BYTES each); their results stay.
            self._db.execute(
                "UPDATE jobs SET spec = json_set(spec, '$.env', json('{}'))"
                " WHERE session_id = ? AND json_extract(spec, '$.env') != '{}'",
                (session_id,),
            )
            self.space_to_reclaim = True
        return True

    def set_last_active(self, session_id: str, at: float) -> None:
        """Record when the session was last active (epoch seconds), never moving it back
        (another process may have recorded a later activity)."""
        self._db.execute(
            "UPDATE sessions SET last_active_at = ? WHERE id = ?"
            " AND (last_active_at IS NULL OR last_active_at < ?)",
            (at, session_id, at),
        )

    def count_sessions(
        self, owner: str | None = None, status: str | tuple[str, ...] | None = None
    ) -> int:
        """Sessions not deleted (of ``owner``, in ``status`` or one of them, when given)."""
        query, args = "SELECT COUNT(*) FROM sessions WHERE status != 'deleted'", []
        if owner is not None:
            query += " AND owner = ?"
            args.append(owner)
        if status is not None:
            statuses = (status,) if isinstance(status, str) else status
            query += f" AND status IN ({','.join('?' * len(statuses))})"
            args.extend(statuses)
        return int(self._db.execute(query, args).fetchone()[0])

    def set_session_env(self, session_id: str, env: dict[str, str]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO session_env (session_id, env) VALUES (?, ?)",
            (session_id, json.dumps(env)),
        )

    def session_env(self, session_id: str) -> dict[str, str]:
        row = self._db.execute(
            "SELECT env FROM session_env WHERE session_id = ?", (session_id,)
        ).fetchone()
        return dict(json.loads(row["env"])) if row else {}

    def set_session_snapshot(self, session_id: str, snapshot_id: str | None) -> None:
        self._db.execute("UPDATE sessions SET snapshot = ? WHERE id = ?", (snapshot_id, session_id))

    # -- snapshots ------------------------------------------------------------------

    @staticmethod
    def _snapshot(row: sqlite3.Row) -> SnapshotRecord:
        return SnapshotRecord(
            id=row["id"],
            owner=row["owner"],
            session_id=row["session_id"],
            name=row["name"],
            status=row["status"],
            status_reason=row["status_reason"],
            parent=row["parent"],
            size_bytes=row["size_bytes"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def insert_snapshot(self, r: SnapshotRecord) -> None:
        self._db.execute(
            "INSERT INTO snapshots (id, owner, session_id, name, status, status_reason,"
            " parent, size_bytes, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                r.id,
                r.owner,
                r.session_id,
                r.name,
                r.status,
                r.status_reason,
                r.parent,
                r.size_bytes,
                r.created_at,
                r.updated_at,
            ),
        )

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        row = self._db.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        return self._snapshot(row) if row else None

    def update_snapshot(self, r: SnapshotRecord) -> None:
        self._db.execute(
            "UPDATE snapshots SET status = ?, status_reason = ?, size_bytes = ?, updated_at = ?"
            " WHERE id = ?",
            (r.status, r.status_reason, r.size_bytes, r.updated_at, r.id),
        )

    def page_snapshots(
        self, owner: str, after: tuple[str, ...] | None, count: int
    ) -> list[SnapshotRecord]:
        """The owner's first ``count`` snapshots not deleted after ``(created_at, id)``."""
        rows = self._db.execute(
            "SELECT * FROM snapshots WHERE owner = ? AND status != ?"
            " AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?",
            (owner, SNAPSHOT_DELETED, *(after or ("", "")), count),
        ).fetchall()
        return [self._snapshot(r) for r in rows]

    def list_snapshots(self, status: str | None = None) -> list[SnapshotRecord]:
        """Every snapshot (in ``status``, when given), deleted ones included."""
        query, args = "SELECT * FROM snapshots", []
        if status is not None:
            query, args = query + " WHERE status = ?", [status]
        return [self._snapshot(r) for r in self._db.execute(query, args).fetchall()]

    def snapshot_bytes(self, owner: str) -> int:
        """Disk the owner's snapshots (not deleted) take."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(size_bytes), 0) FROM snapshots WHERE owner = ? AND status != ?",
            (owner, SNAPSHOT_DELETED),
        ).fetchone()
        return int(row[0])

    def remove_snapshot(self, snapshot_id: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def snapshots_in_use(self) -> set[str]:
        """Snapshots a session that is not deleted, or a snapshot that is not, stands
        on directly (their parents, transitively, are found by walking up)."""
        rows = self._db.execute(
            "SELECT snapshot FROM sessions WHERE status != 'deleted' AND snapshot IS NOT NULL"
            " UNION SELECT parent FROM snapshots WHERE status != ? AND parent IS NOT NULL",
            (SNAPSHOT_DELETED,),
        ).fetchall()
        return {r[0] for r in rows}

    # -- API keys -------------------------------------------------------------------

    def insert_key(self, k: KeyRecord) -> None:
        self._db.execute(
            "INSERT INTO api_keys (id, hash, name, scope, tenant, created_at, revoked_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (k.id, k.hash, k.name, k.scope, k.tenant, k.created_at, k.revoked_at),
        )

    def list_keys(self) -> list[KeyRecord]:
        rows = self._db.execute("SELECT * FROM api_keys ORDER BY created_at, id").fetchall()
        return [
            KeyRecord(
                id=r["id"],
                hash=r["hash"],
                name=r["name"],
                scope=r["scope"],
                tenant=r["tenant"],
                created_at=r["created_at"],
                revoked_at=r["revoked_at"],
            )
            for r in rows
        ]

    def revoke_key(self, key_id: str, revoked_at: str) -> None:
        self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (revoked_at, key_id),
        )

    # -- jobs -----------------------------------------------------------------------

    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"],
            session_id=row["session_id"],
            status=row["status"],
            command=_column(row, "command", []),
            spec=_column(row, "spec", {}),
            exit_code=row["exit_code"],
            failure_reason=row["failure_reason"],
            error_message=_text(row["error_message"]),
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            signal=row["signal"],
            usage=_column(row, "usage", {}) or None if row["usage"] is not None else None,
        )

    def insert_job(self, j: JobRecord) -> None:
        self._db.execute(
            "INSERT INTO jobs (id, session_id, status, command, spec, created_at)"
            " VALUES (?,?,?,?,?,?)",
            (j.id, j.session_id, j.status, json.dumps(j.command), json.dumps(j.spec), j.created_at),
        )

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def list_jobs(self, session_id: str) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE session_id = ? ORDER BY created_at, id", (session_id,)
        ).fetchall()
        return [self._job(r) for r in rows]

    def page_jobs(
        self, session_id: str, after: tuple[str, ...] | None, count: int
    ) -> list[JobRecord]:
        """The session's first ``count`` jobs after the key ``after`` (``(created_at,
        id)``), in that order: a range of the index jobs_page."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE session_id = ? AND (created_at, id) > (?, ?)"
            " ORDER BY created_at, id LIMIT ?",
            (session_id, *(after or ("", "")), count),
        ).fetchall()
        return [self._job(r) for r in rows]

    def update_job(self, j: JobRecord, *, expected: tuple[str, ...] = ()) -> bool:
        """Write a job's status and result; with ``expected``, a compare-and-set: only
        if its stored status is one of those (else nothing is written: False)."""
        condition = f" AND status IN ({','.join('?' * len(expected))})" if expected else ""
        cursor = self._db.execute(
            "UPDATE jobs SET status = ?, exit_code = ?, failure_reason = ?, error_message = ?,"
            " started_at = ?, finished_at = ?, signal = ?, usage = ? WHERE id = ?" + condition,
            (
                j.status,
                j.exit_code,
                j.failure_reason,
                j.error_message,
                j.started_at,
                j.finished_at,
                j.signal,
                None if j.usage is None else json.dumps(j.usage),
                j.id,
                *expected,
            ),
        )
        return cursor.rowcount == 1

    def unfinished_jobs(self) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE status IN ('queued', 'running')"
        ).fetchall()
        return [self._job(r) for r in rows]

    def list_unfinished_jobs(self, session_id: str) -> list[JobRecord]:
        """The session's jobs recorded queued or running."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE session_id = ? AND status IN ('queued', 'running')",
            (session_id,),
        ).fetchall()
        return [self._job(r) for r in rows]

    # -- images ---------------------------------------------------------------------

    @staticmethod
    def _image(row: sqlite3.Row) -> ImageRecord:
        return ImageRecord(**{key: row[key] for key in row.keys()})

    def upsert_image(self, r: ImageRecord) -> None:
        """Write an image's record (a rebuild of a name replaces its record)."""
        self._db.execute(
            "INSERT OR REPLACE INTO images (owner, name, status, status_reason, source, ref,"
            " digest, parent, size_bytes, build_id, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                r.owner, r.name, r.status, r.status_reason, r.source, r.ref, r.digest,
                r.parent, r.size_bytes, r.build_id, r.created_at, r.updated_at,
            ),
        )  # fmt: skip

    def get_image(self, owner: str, name: str) -> ImageRecord | None:
        row = self._db.execute(
            "SELECT * FROM images WHERE owner = ? AND name = ?", (owner, name)
        ).fetchone()
        return self._image(row) if row else None

    def list_images(self, owners: list[str]) -> list[ImageRecord]:
        marks = ",".join("?" * len(owners))
        rows = self._db.execute(
            f"SELECT * FROM images WHERE owner IN ({marks}) ORDER BY name, owner", owners
        ).fetchall()
        return [self._image(row) for row in rows]

    def all_images(self) -> list[ImageRecord]:
        return [self._image(row) for row in self._db.execute("SELECT * FROM images")]

    def delete_image(self, owner: str, name: str) -> None:
        self._db.execute("DELETE FROM images WHERE owner = ? AND name = ?", (owner, name))

    def image_refs_of_sessions(self) -> dict[str, int]:
        """How many sessions stand on each layer image, by ref: those not deleted, and
        deleted ones whose snapshots (not deleted) still do."""
        counts: dict[str, int] = {}
        for row in self._db.execute(
            "SELECT image FROM sessions WHERE image IS NOT NULL AND (status != 'deleted'"
            " OR id IN (SELECT session_id FROM snapshots WHERE status != 'deleted'))"
        ):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                ref = json.loads(row["image"])["ref"]
                counts[ref] = counts.get(ref, 0) + 1
        return counts
