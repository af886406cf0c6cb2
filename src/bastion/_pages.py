"""Lists that come in pages: what both clients share to walk them for the caller.

The server answers a list one page at a time (see "pages" in :mod:`bastion.wire`);
``list()`` without ``limit`` or ``cursor`` walks every page and returns them as one
answer of the same shape, ``iter_all()`` yields the items as their pages arrive, and
``list(limit=..., cursor=...)`` is one page as the server answered it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._exceptions import ServerError

if TYPE_CHECKING:
    from ._base import APIRequest

#: The request of one page of a list, given its cursor (None for the first page).
PageRequestFor = Callable[[str | None], "APIRequest"]


def page_params(limit: int | None, cursor: str | None) -> dict[str, str]:
    """The query parameters of one page (the server's defaults for what is None)."""
    params: dict[str, str] = {}
    if limit is not None:
        params["limit"] = str(limit)
    if cursor is not None:
        params["cursor"] = cursor
    return params


def wants_every_page(limit: int | None, cursor: str | None) -> bool:
    """``list()`` called with neither ``limit`` nor ``cursor``: the whole list."""
    return limit is None and cursor is None


def next_cursor(page: Mapping[str, Any], sent: str | None) -> str | None:
    """The cursor of the page after ``page`` (fetched with cursor ``sent``), or None
    when it was the last (a server without pages answers everything in one)."""
    cursor = page.get("next_cursor")
    if cursor is None:
        return None
    if not isinstance(cursor, str) or not cursor or cursor == sent:
        # A cursor that does not move on would make the walk endless.
        raise ServerError(f"the server answered a page with the bad next_cursor {cursor!r}")
    return cursor


def merge_pages(pages: Iterable[Mapping[str, Any]], key: str) -> Any:
    """The pages of a list as one answer: the first page's shape with every page's
    ``key`` items, in order, and no next page."""
    merged: dict[str, Any] | None = None
    items: list[Any] = []
    for page in pages:
        if merged is None:
            merged = dict(page)
        items.extend(page.get(key) or [])
    merged = merged or {}
    merged[key] = items
    if "next_cursor" in merged:
        merged["next_cursor"] = None
    return merged
