"""The audit log: one JSON line per job and per session change, to the operator's file.

``bastion serve --audit-log PATH`` appends a line to ``PATH`` (created mode 0600) for
every session created, started, stopped or deleted (by a request or by the server:
timeouts, restarts, shutdown) and every job that ends, and for every API key made or
revoked::

    {"time": "2026-12-02T01:02:03.456789Z", "action": "job", "key": "key_3f...",
     "tenant": "key_3f...", "session": "ses_...", "job": "job_...",
     "command": ["python3", "main.py"], "status": "completed", "exit_status": 0,
     "failure_reason": null, "duration_seconds": 0.042, "cpu_seconds": null,
     "peak_memory_bytes": null}

``key`` is the id (fingerprint) of the key whose request did it, ``"server"`` for
what the server did by itself (a timeout, the exit policy), ``anonymous`` on a server
without keys; ``tenant`` is whose session it was.  ``cpu_seconds`` and
``peak_memory_bytes`` are ``null`` while the runtime does not measure them per job.

Lines are written by a thread of their own: the event loop only queues them, so a slow
disk never holds a request up.  Each line is written whole and flushed, so ``tail -f``
and log shippers see complete lines; the file is opened for appending (rotate it by
renaming it and restarting the server, or with ``copytruncate``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from bastion_server.service.keys import current_principal
from bastion_server.store.sqlite import JobRecord, SessionRecord

log = logging.getLogger("bastion.audit")

#: Who did what the server did by itself (the reaper, the exit policy).
SERVER = "server"

_SESSION_ACTIONS = {
    "created": "session_create",
    "running": "session_start",
    "stopped": "session_stop",
    "deleted": "session_delete",
}


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    parse = datetime.fromisoformat
    delta = parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))
    return round(delta.total_seconds(), 6)


def _now() -> str:
    from bastion_server.service.sessions import now_iso

    return now_iso()


class AuditLog:
    """Appends audit lines to ``path`` from a writer thread; ``None``: writes nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if path is None:
            return
        # Opened here, at start-up: a path that cannot be written fails the start.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file: IO[str] = os.fdopen(fd, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._write, name="audit-log", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def record(self, action: str, **fields: Any) -> None:
        """Queue one line: the time, the acting key, ``action`` and ``fields``."""
        if self._thread is None:
            return
        who = current_principal.get()
        line = {"time": _now(), "action": action, "key": who.key_id if who else SERVER}
        line.update(fields)
        self._queue.put(json.dumps(line, ensure_ascii=False) + "\n")

    def session_changed(self, record: SessionRecord, reason: str | None = None) -> None:
        """A session now in ``record.status`` (created, started, stopped, deleted)."""
        self.record(
            _SESSION_ACTIONS.get(record.status, f"session_{record.status}"),
            tenant=record.owner,
            session=record.id,
            reason=reason,
        )

    def job_ended(
        self,
        record: JobRecord,
        tenant: str | None,
        *,
        cpu_seconds: float | None = None,
        peak_memory_bytes: int | None = None,
    ) -> None:
        self.record(
            "job",
            tenant=tenant,
            session=record.session_id,
            job=record.id,
            command=record.command,
            status=record.status,
            exit_status=record.exit_code,
            failure_reason=record.failure_reason,
            duration_seconds=_seconds_between(
                record.started_at or record.created_at, record.finished_at
            ),
            cpu_seconds=cpu_seconds,
            peak_memory_bytes=peak_memory_bytes,
        )

    def _write(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                return
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:  # a full disk must not end the writer: say so, go on
                log.error("audit log write failed", extra={"error": str(exc)})

    def close(self) -> None:
        """Write what is queued, then close the file (blocks: call it off the loop)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._thread = None
        self._file.close()
