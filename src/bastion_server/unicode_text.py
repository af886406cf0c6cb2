"""Text that UTF-8 can carry: the checks and repairs every layer shares.

A Python ``str`` can hold lone surrogates (U+D800-U+DFFF), which UTF-8 cannot encode:
JSON lets a request write one (``"\\ud800"``), and a path's bytes that are not UTF-8
are carried as U+DC80-U+DCFF on purpose (PEP 383).  Whatever leaves the server as
JSON, a log line or a database row must be encodable.
"""

from __future__ import annotations

from typing import Any


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a path's bytes that are not UTF-8 (PEP 383's
    U+DC80-U+DCFF) become U+FFFD, any other lone surrogate "?"."""
    if is_encodable(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def printable_tree(value: Any) -> Any:
    """``value`` (decoded JSON) with every string and key made :func:`printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_tree(k): printable_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_tree(v) for v in value]
    return value


def unencodable_at(value: Any) -> str | None:
    """Where in ``value`` (decoded JSON) the first string or key is that UTF-8 cannot
    encode, as a dotted path (``""`` for ``value`` itself), or ``None`` if nowhere.
    Iterative, so no depth makes it recurse."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not is_encodable(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                path = f"{where}.{key}" if where else str(key)
                if not is_encodable(str(key)):
                    return f"{where}.{key!a}" if where else ascii(key)
                stack.append((path, child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(item))
    return None
