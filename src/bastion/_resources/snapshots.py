"""``bastion.snapshots``: snapshots of sessions' files (sync and async).

A snapshot is taken with ``bastion.sessions.snapshot`` (or ``fork``), started from
with ``bastion.sessions.create(snapshot=...)`` and gone back to with
``bastion.sessions.restore``; here they are listed, read and deleted.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, cast

from .._base import APIRequest, BaseBastion, docs_from
from .._pages import merge_pages, page_params, wants_every_page
from ..wire import (
    MAX_PAGE_SIZE,
    CreateSnapshotRequest,
    ForkRequest,
    RestoreRequest,
    SnapshotInfo,
    SnapshotList,
)

if TYPE_CHECKING:
    from .._client import AsyncBastion, Bastion


def _snapshot_url(*rest: str) -> str:
    return BaseBastion._url("snapshots", *rest)


def take_snapshot_request(session_id: str, name: str | None, wait: bool) -> APIRequest:
    """``POST /sessions/{id}/snapshots``: not idempotent (a repeat takes another)."""
    body: CreateSnapshotRequest = {} if name is None else {"name": name}
    return APIRequest(
        "POST",
        BaseBastion._url("sessions", session_id, "snapshots"),
        params=None if wait else {"wait": "false"},
        json=body,
        idempotent=False,
    )


def fork_request(session_id: str, count: int, name: str | None) -> APIRequest:
    """``POST /sessions/{id}/fork``: not idempotent (a repeat makes more copies)."""
    body: ForkRequest = {"count": count}
    if name is not None:
        body["name"] = name
    return APIRequest(
        "POST", BaseBastion._url("sessions", session_id, "fork"), json=body, idempotent=False
    )


def restore_request(session_id: str, snapshot_id: str) -> APIRequest:
    """``POST /sessions/{id}/restore``: a repeat restores the same files again."""
    body: RestoreRequest = {"snapshot_id": snapshot_id}
    return APIRequest("POST", BaseBastion._url("sessions", session_id, "restore"), json=body)


def list_snapshots_request(limit: int | None = None, cursor: str | None = None) -> APIRequest:
    return APIRequest("GET", _snapshot_url(), params=page_params(limit, cursor))


class Snapshots:
    """List, read and delete snapshots (``bastion.snapshots``).

    Snapshots belong to the API key that took them (another key's are not found) and
    outlive the session they were taken of.
    """

    def __init__(self, client: Bastion) -> None:
        self._client = client

    def get(self, snapshot_id: str) -> SnapshotInfo:
        """Get one snapshot: its ``status`` (``"creating"``, ``"ready"``, ``"failed"``
        with ``status_reason``) and ``size_bytes``.

        Raises:
            SnapshotNotFoundError: No snapshot of this key has this id.
        """
        return cast(
            SnapshotInfo, self._client._request(APIRequest("GET", _snapshot_url(snapshot_id)))
        )

    def delete(self, snapshot_id: str) -> SnapshotInfo:
        """Delete a snapshot.  Sessions started from it keep their files (its layer
        stays on disk until the last of them is deleted).

        Returns:
            The snapshot's last ``SnapshotInfo``.

        Raises:
            SnapshotNotFoundError: No snapshot of this key has this id.
            SnapshotStateError: It is still being made (delete it once ready).
        """
        request = APIRequest("DELETE", _snapshot_url(snapshot_id))
        return cast(SnapshotInfo, self._client._request(request))

    def list(self, *, limit: int | None = None, cursor: str | None = None) -> SnapshotList:
        """List this key's snapshots, oldest first: every one without ``limit`` and
        ``cursor``, else one page (``next_cursor`` for the next).

        Raises:
            InvalidRequestError: ``limit`` is out of range or ``cursor`` is not this
                list's (code ``invalid_cursor``).
        """
        if wants_every_page(limit, cursor):
            pages = self._client._pages(functools.partial(list_snapshots_request, MAX_PAGE_SIZE))
            return cast(SnapshotList, merge_pages(pages, "snapshots"))
        return cast(SnapshotList, self._client._request(list_snapshots_request(limit, cursor)))

    def iter_all(self, *, page_size: int = MAX_PAGE_SIZE) -> Iterator[SnapshotInfo]:
        """Every snapshot of this key, oldest first, a page fetched as the loop needs it."""
        for page in self._client._pages(functools.partial(list_snapshots_request, page_size)):
            yield from page["snapshots"]


@docs_from(Snapshots)
class AsyncSnapshots:
    """List, read and delete snapshots (``bastion.snapshots``).

    The async twin of :class:`Snapshots`: the same methods, as coroutines.
    """

    def __init__(self, client: AsyncBastion) -> None:
        self._client = client

    async def get(self, snapshot_id: str) -> SnapshotInfo:
        request = APIRequest("GET", _snapshot_url(snapshot_id))
        return cast(SnapshotInfo, await self._client._request(request))

    async def delete(self, snapshot_id: str) -> SnapshotInfo:
        request = APIRequest("DELETE", _snapshot_url(snapshot_id))
        return cast(SnapshotInfo, await self._client._request(request))

    async def list(self, *, limit: int | None = None, cursor: str | None = None) -> SnapshotList:
        if wants_every_page(limit, cursor):
            request_for = functools.partial(list_snapshots_request, MAX_PAGE_SIZE)
            pages = [page async for page in self._client._pages(request_for)]
            return cast(SnapshotList, merge_pages(pages, "snapshots"))
        data = await self._client._request(list_snapshots_request(limit, cursor))
        return cast(SnapshotList, data)

    async def iter_all(self, *, page_size: int = MAX_PAGE_SIZE) -> AsyncIterator[SnapshotInfo]:
        request_for = functools.partial(list_snapshots_request, page_size)
        async for page in self._client._pages(request_for):
            for snapshot in page["snapshots"]:
                yield snapshot
