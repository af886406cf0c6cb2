"""/v1/sessions: create, list, status, start, stop, pause, resume, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header

from bastion.wire import IDEMPOTENCY_HEADER, CreateSessionRequest, SessionInfo, SessionList
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.paging import PageParams
from bastion_server.api.views import session_view
from bastion_server.service.container import Services
from bastion_server.service.errors import invalid
from bastion_server.service.images import ChosenImage

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
    """Create a session (status ``created``); nothing runs until it is started."""
    body = body or {}
    record = await svc.sessions.create(
        who,
        limits=dict(body.get("limits") or {}),
        metadata=body.get("metadata"),
        idempotency_key=idempotency_key,
        idle_timeout=body.get("idle_timeout"),
        max_lifetime=body.get("max_lifetime"),
        on_timeout=body.get("on_timeout", "stop"),
        network=dict(body.get("network") or {}),
        env=body.get("env"),
        paused_timeout=body.get("paused_timeout"),
        image=await _chosen_image(svc, who, body.get("image")),
    )
    return session_view(record)


async def _chosen_image(svc: Services, who: str, image: object) -> ChosenImage | None:
    if image is None:
        return None
    if not isinstance(image, str):
        raise invalid("image must be an image's name")
    return await svc.images.choose(who, image)


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
