"""Session, snapshot and file records to wire shapes (a job's shape is JobService.view, which
also reads its output)."""

from __future__ import annotations

from bastion.wire import FileEntry, SessionInfo, SessionUsage, SnapshotInfo
from bastion_server.runtime.base import SandboxUsage
from bastion_server.runtime.sandbox_fs import Entry
from bastion_server.store.sqlite import SessionRecord, SnapshotRecord


def session_view(record: SessionRecord, usage: SandboxUsage | None = None) -> SessionInfo:
    view: SessionInfo = {
        "session_id": record.id,
        "status": record.status,  # type: ignore[typeddict-item]
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "limits": record.limits,  # type: ignore[typeddict-item]
        "metadata": record.metadata,
        "idle_timeout": record.idle_timeout,
        "max_lifetime": record.max_lifetime,
        "paused_timeout": record.paused_timeout,
        "snapshot": record.snapshot,
        "node": record.node,
        "on_timeout": record.on_timeout,  # type: ignore[typeddict-item]
        "network": {
            "enabled": bool(record.network.get("enabled")),
            "allow": list(record.network.get("allow") or []),
        },
        "status_reason": record.status_reason,
    }
    if record.image is not None:
        view["image"] = {"name": record.image["name"], "digest": record.image["digest"]}
    if usage is not None:
        view["usage"] = usage_view(usage)
    return view


def usage_view(usage: SandboxUsage) -> SessionUsage:
    return {
        "cpu_seconds": usage.cpu_seconds,
        "memory_bytes": usage.memory_bytes,
        "processes": usage.processes,
        "disk_bytes": usage.disk_bytes,
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


def snapshot_view(record: SnapshotRecord) -> SnapshotInfo:
    return {
        "snapshot_id": record.id,
        "session_id": record.session_id,
        "name": record.name,
        "status": record.status,  # type: ignore[typeddict-item]
        "status_reason": record.status_reason,
        "parent": record.parent,
        "size_bytes": record.size_bytes,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }
