"""Pages of a list: what a request asks for, what a page holds, and cursors.

Lists are paged by key (keyset pagination): each list has a fixed order over a key
(sessions and jobs: ``(created_at, id)``; files: the name's bytes), a page is the
first ``limit`` items after a key, and its cursor is the key of its last item.  The
store answers such a page from an index, however long the list; and items added or
removed meanwhile never shift the rest, as they would with offsets.

A cursor is the list's kind and the key, as JSON in URL-safe base64: opaque to
clients, and refused (``invalid_cursor``) when it was not made for the list it is
sent to.  Nothing in it is secret: a key only says where a page starts, and a page
shows only what the caller may see anyway.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from bastion.wire import DEFAULT_PAGE_SIZE, ErrorCode
from bastion_server.service.errors import ServiceError
from bastion_server.unicode_text import is_encodable

T = TypeVar("T")

#: The lists that are paged; a cursor names the one it was made for.
ListKind = Literal["sessions", "jobs", "files", "snapshots", "images"]
Key = tuple[str, ...]

#: Longest cursor accepted: a files cursor holds a name of up to 255 bytes as hex.
MAX_CURSOR_LENGTH = 2048


@dataclass(frozen=True)
class PageRequest:
    """The ``limit`` and ``cursor`` of a list request (validated at the API's edge)."""

    limit: int = DEFAULT_PAGE_SIZE
    cursor: str | None = None

    def after(self, kind: ListKind, size: int) -> Key | None:
        """The key the page starts after: None for the first page."""
        return None if self.cursor is None else decode_cursor(kind, self.cursor, size)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    #: The cursor of the page after this one; None when this is the last.
    next_cursor: str | None


def take_page(kind: ListKind, rows: Sequence[T], limit: int, key: Callable[[T], Key]) -> Page[T]:
    """The page of ``rows``, which are the first ``limit + 1`` items after the cursor:
    one more than the page shows, so that a full last page is known to be the last."""
    if len(rows) <= limit:
        return Page(list(rows), None)
    items = list(rows[:limit])
    return Page(items, encode_cursor(kind, key(items[-1])))


class _Created(Protocol):
    created_at: str
    id: str


def creation_key(record: _Created) -> Key:
    """The key of a list in creation order: ``(created_at, id)``, ids breaking ties."""
    return (record.created_at, record.id)


def encode_cursor(kind: ListKind, key: Key) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(kind: ListKind, cursor: str, size: int) -> Key:
    """The key in a cursor of list ``kind`` whose keys have ``size`` parts."""
    value = None
    try:
        if len(cursor) <= MAX_CURSOR_LENGTH:
            raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
            value = json.loads(raw.decode("ascii"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    if (
        isinstance(value, list)
        and len(value) == size + 1
        and value[0] == kind
        # JSON can carry lone surrogates, SQLite cannot
        and all(isinstance(part, str) and is_encodable(part) for part in value[1:])
    ):
        return tuple(value[1:])
    raise invalid_cursor(kind)


def invalid_cursor(kind: ListKind) -> ServiceError:
    return ServiceError(
        ErrorCode.INVALID_CURSOR,
        f"cursor is not one of this {kind} list's next_cursor values; start again without one",
    )
