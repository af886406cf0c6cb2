"""/v1/snapshots: list, get, delete (taking one: POST /v1/sessions/{id}/snapshots)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from bastion.wire import SnapshotInfo, SnapshotList
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.paging import PageParams
from bastion_server.api.views import snapshot_view
from bastion_server.service.container import Services

router = APIRouter(prefix="/v1/snapshots", tags=["snapshots"])
Owner = Annotated[str, Depends(owner)]
Svc = Annotated[Services, Depends(services)]


@router.get("", response_model=SnapshotList)
async def list_snapshots(who: Owner, svc: Svc, page: PageParams) -> SnapshotList:
    """The snapshots of the caller's key, oldest first, a page at a time."""
    found = svc.snapshots.list(who, page)
    return {
        "snapshots": [snapshot_view(r) for r in found.items],
        "next_cursor": found.next_cursor,
    }


@router.get("/{snapshot_id}", response_model=SnapshotInfo)
async def get_snapshot(snapshot_id: str, who: Owner, svc: Svc) -> SnapshotInfo:
    """A snapshot: its status (``creating``, ``ready``, ``failed``) and disk use."""
    return snapshot_view(svc.snapshots.get(who, snapshot_id))


@router.delete("/{snapshot_id}", response_model=SnapshotInfo)
async def delete_snapshot(snapshot_id: str, who: Owner, svc: Svc) -> SnapshotInfo:
    """Delete a snapshot; sessions started from it keep their files (its layer stays
    on disk until the last of them is deleted)."""
    return snapshot_view(await svc.snapshots.delete(who, snapshot_id))
