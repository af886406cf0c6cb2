"""What every ``bastion`` command shares: argument types, option groups, sub-parser
builders and output helpers."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias

from .._client import Bastion
from ..wire import (
    MAX_PAGE_SIZE,
    Page,
)
from .format import (
    parse_duration,
    write_text,
)

#: Does its own output and returns the exit status.
Runner = Callable[[Bastion, argparse.Namespace], int]

CLIENT_COMMANDS = frozenset({"sessions", "files", "jobs", "keys"})

#: Exit status of ``exec`` and ``shell`` when ``bastion`` itself failed (an API or
#: connection error, no such session...), as ``docker run`` does: their other
#: statuses are the remote command's.
EXEC_FAILED = 125

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# --------------------------------------------------------------------------- options


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` as a pair (argparse ``type``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def duration(text: str) -> float:
    """Seconds from ``30``, ``1.5``, ``90s``, ``10m``, ``1h30m`` (argparse ``type``)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class RemotePath(NamedTuple):
    session_id: str
    path: str

    def __str__(self) -> str:
        return f"{self.session_id}:{self.path}"


def remote_path(text: str) -> RemotePath:
    """``SESSION:/path`` (argparse ``type``)."""
    session_id, sep, path = text.partition(":")
    if not sep or not session_id or not path:
        raise argparse.ArgumentTypeError(f"expected SESSION:/path, got {text!r}")
    return RemotePath(session_id, path)


def remote_dir(text: str) -> RemotePath:
    """``SESSION`` or ``SESSION:/path``; the path defaults to ``/``."""
    session_id, _, path = text.partition(":")
    if not session_id:
        raise argparse.ArgumentTypeError(f"expected SESSION or SESSION:/path, got {text!r}")
    return RemotePath(session_id, path or "/")


def page_size(text: str) -> int:
    """A page size, 1 to ``MAX_PAGE_SIZE`` (argparse ``type``)."""
    try:
        size = int(text)
    except ValueError:
        size = 0
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected a number from 1 to {MAX_PAGE_SIZE}, not {text!r}"
        )
    return size


def add_page_options(parser: argparse.ArgumentParser, items: str) -> None:
    """``--limit`` and ``--cursor`` of a list command (without them: every item)."""
    pages = parser.add_argument_group(f"pages (default: all {items})")
    pages.add_argument(
        "--limit",
        type=page_size,
        metavar="N",
        help=f"only the first N {items} (up to {MAX_PAGE_SIZE}); if there are more, "
        "the cursor of the rest goes to stderr",
    )
    pages.add_argument(
        "--cursor", metavar="CURSOR", help=f"the {items} after those that printed CURSOR"
    )


def note_next_page(page: Page) -> None:
    """Where the rest of a list starts, on stderr (the JSON output has it too)."""
    if page.get("next_cursor"):
        to_stderr(f"more: --cursor {page['next_cursor']}")


def connection_options() -> argparse.ArgumentParser:
    """``--url``/``--api-key``, accepted after any command as well as before it."""
    parent = argparse.ArgumentParser(add_help=False)
    add_connection_options(parent, default=argparse.SUPPRESS)
    return parent


def add_connection_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url",
        default=default,
        metavar="URL",
        help="server URL (default: $BASTION_URL, else http://localhost:8080)",
    )
    group.add_argument(
        "--api-key",
        default=default,
        metavar="KEY",
        help="API key (default: $BASTION_API_KEY)",
    )


def output_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the server's answer as JSON instead of a table (for scripts)",
    )
    return parent


def add_command(
    actions: Subparsers,
    name: str,
    *,
    help: str,
    description: str,
    examples: Sequence[str],
    parents: Sequence[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """A sub-command with its description and an ``examples:`` epilog."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return actions.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 88),
        epilog=epilog,
        parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_group(
    subparsers: Subparsers, name: str, *, help: str, description: str, examples: Sequence[str]
) -> Subparsers:
    group = subparsers.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 88),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions: Subparsers = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    return actions


# --------------------------------------------------------------------------- output


def json_mode(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def print_lines(lines: Sequence[str]) -> None:
    if lines:
        write_text(sys.stdout, "\n".join(lines) + "\n")


def table_width() -> int | None:
    """The terminal's width when stdout is one (tables are cut to fit), else none."""
    try:
        if sys.stdout.isatty():
            return shutil.get_terminal_size((100, 24)).columns
    except (AttributeError, ValueError):
        pass
    return None


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_remote_parser(
    subparsers: Subparsers, name: str, *, help: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 88),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        parents=[connection_options()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def error_line(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def remote_exit_status(status: int) -> int:
    """A remote exit status as a local one (1 when it does not fit in 0..255)."""
    return status if 0 <= status < 256 else 1
