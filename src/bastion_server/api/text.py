"""Text in JSON request bodies must be Unicode that UTF-8 can carry.

JSON lets a string hold a lone surrogate (``"\\ud800"``), and Python's JSON parser
lets one through from raw bytes too (``ED A0 80``, which is not UTF-8).  Such a string
cannot be stored, logged or answered as UTF-8: accepted, it failed the request only
once something had been created from it, and poisoned every later read of that
record.  So a body is checked here, before anything parses it for the routes: bytes
that are not UTF-8 are malformed JSON, and a lone surrogate is an invalid request
naming the field that holds it.
"""

from __future__ import annotations

import json
import re

from bastion_server.unicode_text import unencodable_at

#: A ``\\u`` escape of a surrogate (paired or not: the parser tells them apart).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class TextProblem(ValueError):
    """What is wrong with a body's text; ``malformed`` if the body is not UTF-8 at all."""

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.malformed = malformed


def check_body_text(body: bytes) -> None:
    """Raise :class:`TextProblem` if ``body`` is not UTF-8 or holds a lone surrogate."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextProblem(
            f"the request body is not UTF-8 (byte {exc.start})", malformed=True
        ) from exc
    if not _SURROGATE_ESCAPE.search(body):
        return  # the usual case: no escape that could make a surrogate
    try:
        value = json.loads(body)
    except ValueError:
        return  # not JSON: the route's parser says so in its own words
    where = unencodable_at(value)
    if where is not None:
        raise TextProblem(
            f"{where or 'body'}: text must be valid Unicode; a lone surrogate "
            "(such as \\ud800) cannot be encoded as UTF-8"
        )
