"""Records to wire shapes: the only place that builds response bodies."""

from __future__ import annotations

from bastion.wire import FINAL_JOB_STATUSES, FileEntry, JobInfo, JobOutput, SessionInfo
from bastion_server.runtime.sandbox_fs import Entry
from bastion_server.service.jobs import JobService
from bastion_server.store.sqlite import JobRecord, SessionRecord


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


def job_view(record: JobRecord, jobs: JobService) -> JobInfo:
    output: JobOutput | None = None
    if record.status in FINAL_JOB_STATUSES:
        stdout, stderr = jobs.output(record)
        output = {"console_output": stdout, "errout": stderr, "status_code": record.exit_code}
    return {
        "job_id": record.id,
        "session_id": record.session_id,
        "status": record.status,  # type: ignore[typeddict-item]
        "command": record.command,
        "output": output,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "failure_reason": record.failure_reason,
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
