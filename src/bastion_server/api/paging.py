"""The query parameters every list takes: ``limit`` and ``cursor``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from bastion.wire import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from bastion_server.service.paging import PageRequest


def _page_request(
    limit: Annotated[
        int,
        Query(
            ge=1,
            le=MAX_PAGE_SIZE,
            description=f"most items in the page (1-{MAX_PAGE_SIZE}, default {DEFAULT_PAGE_SIZE})",
        ),
    ] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None,
        Query(description="the next_cursor of the previous page (opaque); none for the first page"),
    ] = None,
) -> PageRequest:
    return PageRequest(limit, cursor)


PageParams = Annotated[PageRequest, Depends(_page_request)]
