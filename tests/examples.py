"""Running documentation examples verbatim against a real server.

Shared by tests/integration/test_readme.py (the README's fenced blocks) and
tests/integration/test_product_page.py (docs/PRODUCT_PAGE.txt, the SDK's public page).

The product page is the text of a rendered web page: its code blocks have no fences and
lost their indentation.  :func:`page_blocks` finds them by structure instead:

* A *logical line* is one physical line, or several when brackets are still open
  (``bastion = Bastion(`` ... ``)``).
* A logical line is code when it compiles and does something (an assignment, a call,
  an import, a ``with``/``def``/``for``/``try`` header, a dict literal); a bare name
  (``Quickstart``, ``createdrunningstoppeddeleted``) or a sentence is prose.
* The lost indentation is restored the only way the page allows: the body of a block
  header (a line ending in ``:``) is the one statement after it, and ``except`` /
  ``else`` / ``finally`` continue the statement they follow.  Every example on the page
  is written that way; a body of several statements would come out as one statement
  and the rest at top level, which the integration test then reports as a failure.
* A *block* is a run of consecutive code statements; its title is the prose line just
  before it (the section heading, or e.g. "Or use a context manager:").  A block that
  is a single dict literal is a format description (``"queued" | "running"``), not an
  example.
"""

from __future__ import annotations

import ast
import io
import os
import socket
import subprocess
import sys
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ServerProcess

REPO = Path(__file__).resolve().parents[1]
#: The repo's copy of the product page (CI has no ../shared); tests/unit checks it is
#: the same as ../shared/PRODUCT_PAGE.txt wherever that exists.
PRODUCT_PAGE = REPO / "docs" / "PRODUCT_PAGE.txt"
SHARED_PRODUCT_PAGE = REPO.parent / "shared" / "PRODUCT_PAGE.txt"

#: Where `make serve` listens, and so where documentation examples point.
DEFAULT_URL = "http://localhost:8080"
_MAX_LOGICAL_LINE = 40
_CONTINUATIONS = ("except", "else", "finally", "elif")


@dataclass(frozen=True)
class Block:
    """A code block of the page: its title (the prose line before it) and its source."""

    title: str
    source: str
    line: int  # 1-based line of the page where it starts

    @property
    def is_format(self) -> bool:
        """A data-shape description (a lone dict literal), not code to run."""
        body = ast.parse(self.source).body
        return (
            len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Dict)
        )


def _logical_line(lines: Sequence[str], i: int) -> tuple[str, int] | None:
    """The logical line starting at ``lines[i]`` and the index after it, or None."""
    for j in range(i + 1, min(len(lines), i + _MAX_LOGICAL_LINE) + 1):
        text = "\n".join(line.strip() for line in lines[i:j])
        try:
            list(tokenize.generate_tokens(io.StringIO(text + "\n").readline))
        except tokenize.TokenError:  # a bracket or triple quote still open
            continue
        except SyntaxError:  # an unterminated string: prose with an apostrophe
            return None
        return text, j
    return None


def _compiles(source: str) -> bool:
    try:
        compile(source, "<page>", "exec")
    except SyntaxError:
        return False
    return True


#: What a block header compiles in: alone (``with``, ``def``), as a ``try:`` (which
#: needs a handler) or as a continuation (``except``, ``else``, ``finally``).
_HEADER_CONTEXTS = (
    "{h}\n    pass",
    "{h}\n    pass\nfinally:\n    pass",
    "try:\n    pass\n{h}\n    pass",
    "if 1:\n    pass\n{h}\n    pass",
)


def _is_header(text: str) -> bool:
    return text.endswith(":") and any(_compiles(c.format(h=text)) for c in _HEADER_CONTEXTS)


def _is_continuation(text: str) -> bool:
    return text.split(None, 1)[0].rstrip(":") in _CONTINUATIONS


def _with_body(header: str, body: str) -> str:
    return header + "\n" + "\n".join("    " + line for line in body.splitlines())


def _does_something(text: str) -> bool:
    """Whether a compiled logical line is code rather than a word or a heading."""
    body = ast.parse(text).body
    if len(body) != 1 or not isinstance(body[0], ast.Expr):
        return True
    return isinstance(body[0].value, ast.Call | ast.Dict | ast.Await)


def _statement(lines: Sequence[str], i: int) -> tuple[str, int] | None:
    """The statement (re-indented) starting at ``lines[i]`` and the index after it."""
    first = _logical_line(lines, i)
    if first is None:
        return None
    text, j = first
    if not _is_header(text):
        return (text, j) if _compiles(text) and _does_something(text) else None
    if _is_continuation(text):
        return None  # an `except:` never starts a statement
    source = text
    while True:
        body = _statement(lines, j)
        if body is None:
            return None
        source, j = _with_body(source, body[0]), body[1]
        following = _logical_line(lines, j)
        if following is None or not _is_header(following[0]):
            break
        if not _is_continuation(following[0]):
            break
        source, j = source + "\n" + following[0], following[1]
    return (source, j) if _compiles(source) else None


def page_blocks(text: str) -> list[Block]:
    """The code blocks of a page whose code lost its fences and indentation."""
    lines = text.splitlines()
    blocks: list[Block] = []
    title = ""
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        statements: list[str] = []
        start = i
        while i < len(lines) and (stmt := _statement(lines, i)) is not None:
            statements.append(stmt[0])
            i = stmt[1]
        if statements:
            blocks.append(Block(title, "\n".join(statements) + "\n", start + 1))
        else:
            title = lines[i].strip()
            i += 1
    return blocks


# --------------------------------------------------------------------------- running


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def docs_server(data_dir: Path, api_keys: tuple[str, ...] = ()) -> ServerProcess:
    """A server (not started) on port 8080, as `make serve` runs, when that port is free.

    Examples then run with their ``http://localhost:8080`` untouched."""
    from bastion_server.testing import free_port

    return ServerProcess(data_dir, api_keys=api_keys, port=8080 if port_free(8080) else free_port())


def fill_in_url(code: str, server: ServerProcess) -> str:
    """``code`` with ``http://localhost:8080`` pointing at ``server`` (when not there)."""
    if server.port != 8080:  # only when something else holds 8080 on this machine
        code = code.replace(DEFAULT_URL, server.url)
    return code


def run_example(
    code: str,
    server: ServerProcess,
    *,
    api_key: str | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, ``$BASTION_URL`` pointing at ``server``.

    ``$BASTION_API_KEY`` is ``api_key`` (unset when None); nothing else of the example's
    environment names the server."""
    env = {**os.environ, "BASTION_URL": server.url}
    env.pop("BASTION_API_KEY", None)
    if api_key is not None:
        env["BASTION_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
