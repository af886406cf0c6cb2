"""/v1/sessions: create, list, status, start, stop, pause, resume, delete; and a
session's snapshot, fork and restore (the snapshots themselves: api/snapshots.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse

from bastion.wire import (
    IDEMPOTENCY_HEADER,
    CreateSessionRequest,
    CreateSnapshotRequest,
    ForkRequest,
    ForkResult,
    RestoreRequest,
    SessionInfo,
    SessionList,
    SnapshotInfo,
    SnapshotStatus,
)
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.paging import PageParams
from bastion_server.api.views import session_view, snapshot_view
from bastion_server.service.container import Services
from bastion_server.service.errors import invalid

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
Owner = Annotated[str, Depends(owner)]
Svc = Annotated[Services, Depends(services)]


@router.post("", status_code=201, response_model=SessionInfo)
async def create_session(
    who: Owner,
    svc: Svc,
    body: CreateSessionRequest | None = None,
    idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER)] = None,
) -> SessionInfo:
    """Create a session (status ``created``); nothing runs until it is started.  With
    ``snapshot``, its files are that (ready) snapshot's."""
    body = body or {}
    snapshot = body.get("snapshot")
    options: dict[str, Any] = {
        "limits": dict(body.get("limits") or {}),
        "metadata": body.get("metadata"),
        "idempotency_key": idempotency_key,
        "idle_timeout": body.get("idle_timeout"),
        "max_lifetime": body.get("max_lifetime"),
        "on_timeout": body.get("on_timeout", "stop"),
        "network": dict(body.get("network") or {}),
        "env": body.get("env"),
        "paused_timeout": body.get("paused_timeout"),
    }
    image = body.get("image")
    if image is not None and not isinstance(image, str):
        raise invalid("image must be an image's name")
    if image is not None and snapshot is not None:
        raise invalid("a session from a snapshot runs the snapshot's image: name no image")
    if snapshot is None:
        chosen = await svc.images.choose(who, image) if image is not None else None
        record = await svc.sessions.create(who, **options, image=chosen)
    elif isinstance(snapshot, str):
        record = await svc.snapshots.create_session(who, snapshot, **options)
    else:
        raise invalid("snapshot must be a snapshot's id")
    return session_view(record)


@router.get("", response_model=SessionList)
async def list_sessions(who: Owner, svc: Svc, page: PageParams) -> SessionList:
    """The sessions of the caller's key that are not deleted, oldest first, a page at a
    time: pass ``next_cursor`` back as ``cursor`` for the next page."""
    found = svc.sessions.list(who, page)
    return {"sessions": [session_view(r) for r in found.items], "next_cursor": found.next_cursor}


@router.get("/{session_id}", response_model=SessionInfo)
async def get_session(session_id: str, who: Owner, svc: Svc) -> SessionInfo:
    """The session's status, limits and, while it runs, its current usage."""
    record = svc.sessions.get(who, session_id)
    return session_view(record, await svc.sessions.usage(record))


@router.post("/{session_id}/start", response_model=SessionInfo)
async def start_session(session_id: str, who: Owner, svc: Svc) -> SessionInfo:
    """Start the session's sandbox: ``created`` or ``stopped`` -> ``running``."""
    return session_view(await svc.sessions.start(who, session_id))


@router.post("/{session_id}/stop", response_model=SessionInfo)
async def stop_session(session_id: str, who: Owner, svc: Svc) -> SessionInfo:
    """Stop every process of the session; its files are kept. ``running`` -> ``stopped``."""
    return session_view(await svc.sessions.stop(who, session_id))


@router.post("/{session_id}/pause", response_model=SessionInfo)
async def pause_session(session_id: str, who: Owner, svc: Svc) -> SessionInfo:
    """Freeze every process of the session (memory kept, no CPU, timers stand still):
    ``running`` -> ``paused``.  Until it is resumed, new jobs, terminals and file
    operations are refused with 409 ``session_paused``; it may be stopped or deleted."""
    return session_view(await svc.sessions.pause(who, session_id))


@router.post("/{session_id}/resume", response_model=SessionInfo)
async def resume_session(session_id: str, who: Owner, svc: Svc) -> SessionInfo:
    """Thaw a paused session: ``paused`` -> ``running``; its jobs go on where they were."""
    return session_view(await svc.sessions.resume(who, session_id))


@router.delete("/{session_id}", response_model=SessionInfo)
async def delete_session(session_id: str, who: Owner, svc: Svc) -> SessionInfo:
    """Delete the session and all its files, irreversibly."""
    return session_view(await svc.sessions.delete(who, session_id))


@router.post(
    "/{session_id}/snapshots",
    status_code=201,
    response_model=SnapshotInfo,
    responses={202: {"model": SnapshotInfo, "description": "With wait=false: being made."}},
)
async def snapshot_session(
    session_id: str,
    who: Owner,
    svc: Svc,
    body: CreateSnapshotRequest | None = None,
    wait: Annotated[bool, Query()] = True,
) -> Any:
    """Snapshot the session's files (created, running, paused or stopped), consistent:
    a running session is frozen for the copy.  Answers once it is ``ready`` (201) or
    ``failed`` (201 too, with ``status_reason``); with ``wait=false`` at once (202,
    ``creating``): poll ``GET /v1/snapshots/{id}``."""
    record = await svc.snapshots.snapshot(who, session_id, (body or {}).get("name"), wait=wait)
    if record.status == SnapshotStatus.CREATING:
        return JSONResponse(snapshot_view(record), status_code=202)
    return snapshot_view(record)


@router.post("/{session_id}/fork", status_code=201, response_model=ForkResult)
async def fork_session(
    session_id: str, who: Owner, svc: Svc, body: ForkRequest | None = None
) -> ForkResult:
    """Snapshot the session and start ``count`` running copies of it (its limits,
    timeouts, network, metadata and env): all of them or none.  The snapshot is kept
    (delete it when done); the copies' writes are their own."""
    body = body or {}
    snapshot, copies = await svc.snapshots.fork(
        who, session_id, body.get("count", 1), body.get("name")
    )
    return {"snapshot": snapshot_view(snapshot), "sessions": [session_view(c) for c in copies]}


@router.post("/{session_id}/restore", response_model=SessionInfo)
async def restore_session(
    session_id: str, body: RestoreRequest, who: Owner, svc: Svc
) -> SessionInfo:
    """Reset the session's files to a snapshot's (any ready snapshot of the key): a
    running or paused session is stopped first (its jobs and terminals end, as at a
    stop) and started again; a created or stopped one keeps its state."""
    return session_view(await svc.snapshots.restore(who, session_id, body.get("snapshot_id")))
