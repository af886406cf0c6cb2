"""Records to wire shapes: the only place that builds response bodies."""

from __future__ import annotations

from bastion.wire import FileEntry, SessionInfo
from bastion_server.runtime.sandbox_fs import Entry
from bastion_server.store.sqlite import SessionRecord


def session_view(record: SessionRecord) -> SessionInfo:
    return {
        "session_id": record.id,
        "status": record.status,  # type: ignore[typeddict-item]
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "limits": record.limits,  # type: ignore[typeddict-item]
        "metadata": record.metadata,
        "status_reason": record.status_reason,
    }


def file_view(entry: Entry) -> FileEntry:
    return {
        "name": entry.name,
        "path": entry.path,
        "size": entry.size,
        "type": entry.type,  # type: ignore[typeddict-item]
        "modified_at": entry.modified_at,
        "mode": entry.mode,
    }
