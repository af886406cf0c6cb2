"""The ``bastion`` command line.

``main`` builds the parser, runs one command and turns whatever goes wrong into one
line on stderr, ``bastion: <message> (<code>)``, and an exit status from the table of
:class:`~bastion.cli.errors.ExitCode` (docs/CLI.md shows it) -- never a traceback,
unless ``$BASTION_DEBUG`` is set.

One module per command group: :mod:`~bastion.cli.sessions`, :mod:`~bastion.cli.files`,
:mod:`~bastion.cli.jobs`, :mod:`~bastion.cli.keys`, :mod:`~bastion.cli.exec` and
:mod:`~bastion.cli.shell`; :mod:`~bastion.cli.common` holds what they share.
``bastion exec`` streams a command's output live and ``bastion shell`` attaches the
local terminal to a shell in a session; both exit with the remote command's status, or
:data:`EXEC_FAILED` (125, as ``docker run``) when ``bastion`` itself failed.
``--url``, ``--api-key`` and ``--json`` may come before or after the command.

Other packages add commands through the ``bastion.commands`` entry-point group: each
entry point loads to a function ``register(subparsers)`` that adds one sub-parser and
sets its ``func`` default to a callable ``func(args) -> int``.  The server's commands
(``bastion serve``, ``bastion image``) come that way from the ``server`` extra; when it
is not installed, asking for one of them says how to install it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import TypeAlias

import httpx

from .._base import __version__
from .._client import Bastion
from .._exceptions import (
    BastionError,
)
from .common import (
    CLIENT_COMMANDS,
    EXEC_FAILED,
    Runner,
    Subparsers,
    add_connection_options,
    connection_options,
    error_line,
    output_options,
)
from .errors import ExitCode, describe, error_code
from .exec import add_exec_command
from .files import add_files
from .images import add_images_command
from .jobs import add_jobs
from .keys import add_keys_command
from .sessions import add_sessions
from .shell import add_shell_command
from .snapshots import add_snapshots_command

__all__ = ["ENTRY_POINT_GROUP", "EXEC_FAILED", "ExitCode", "build_parser", "main"]

ENTRY_POINT_GROUP = "bastion.commands"
_REMOTE_COMMANDS = frozenset({"exec", "shell"})
_BUILTIN_COMMANDS = CLIENT_COMMANDS | _REMOTE_COMMANDS


#: Exit status when stdout was closed early (``| head``): 128 + SIGPIPE, as a shell
#: reports a program that the broken pipe ended.
_BROKEN_PIPE = 128 + signal.SIGPIPE

#: Set (to anything but ``0``) to get the traceback of an error as well.
ENV_DEBUG = "BASTION_DEBUG"


_PluginFunc: TypeAlias = Callable[[argparse.Namespace], int]

_EXIT_CODE_TEXT = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "the job failed (jobs run, jobs wait), or another error",
    ExitCode.USAGE: "usage: a bad command line or value, or the command's extra is missing",
    ExitCode.NOT_FOUND: "not found: no such session, job or file",
    ExitCode.CONFLICT: "conflict: the session's state, or a path of the wrong kind",
    ExitCode.AUTH: "authentication: the API key is missing, not accepted, or its scope forbids it",
    ExitCode.CONNECTION: "connection: the server cannot be reached, or the connection broke",
    ExitCode.TIMEOUT: "timeout: a request, or --timeout/--wait-timeout (the job keeps running)",
    ExitCode.INTERRUPTED: "interrupted by Ctrl-C",
}

_EXAMPLES = [
    "export BASTION_URL=http://localhost:8080",
    "SID=$(bastion sessions create --memory-mb 256 --start -q)",
    "bastion files upload data.csv $SID:/home/user/",
    "bastion exec $SID -- python3 -c 'print(6 * 7)'",
    "bastion --json sessions list",
    "bastion sessions delete $SID",
]


# --------------------------------------------------------------------------- main


def main(
    argv: Sequence[str] | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
    commands: Iterable[EntryPoint] | None = None,
) -> int:
    """Run the ``bastion`` command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
        transport: An ``httpx`` transport for the client commands (tests).
        commands: Entry points of extra commands; ``None`` uses the installed ones of
            the ``bastion.commands`` group.

    Returns:
        The process exit status: see :class:`ExitCode`; ``exec`` and ``shell`` exit
        with the remote command's status, or :data:`EXEC_FAILED` when ``bastion``
        itself failed.  A usage error found by the parser raises ``SystemExit(2)``.
    """
    try:
        return _main(argv, transport, commands)
    except BrokenPipeError:
        _silence_stdout()
        return _BROKEN_PIPE
    except KeyboardInterrupt:
        error_line(f"bastion: interrupted ({error_code(KeyboardInterrupt())})")
        return ExitCode.INTERRUPTED


def _main(
    argv: Sequence[str] | None,
    transport: httpx.BaseTransport | None,
    commands: Iterable[EntryPoint] | None,
) -> int:
    if commands is None:
        commands = entry_points(group=ENTRY_POINT_GROUP)
    parser, missing = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if args.command in missing:
        error_line(f"bastion: {args.command}: {missing[args.command]}")
        return ExitCode.USAGE
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    runner: Runner | None = getattr(args, "runner", None)
    if runner is None:  # a command registered through an entry point
        func: _PluginFunc | None = getattr(args, "func", None)
        if func is None:
            parser.error(f"command {args.command!r} set no func")
        return _run_plugin(args.command, func, args)
    remote = args.command in _REMOTE_COMMANDS
    client: Bastion | None = None
    try:
        client = Bastion(args.url, args.api_key, transport=transport)
        with client:
            return runner(client, args)
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        status = _report(exc, client.base_url if client is not None else args.url)
        return EXEC_FAILED if remote else status


def _run_plugin(name: str, func: _PluginFunc, args: argparse.Namespace) -> int:
    try:
        return int(func(args))
    except ImportError as exc:
        # `bastion serve` loads without the server extra and imports uvicorn when run.
        error_line(f"bastion: {name}: {_needs_extra(exc)}")
        if _debug():
            traceback.print_exc()
        return ExitCode.USAGE
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        return _report(exc, None)


def _needs_extra(exc: ImportError) -> str:
    return (
        f"this command needs the server extra ({exc}); "
        "install bastion-py-sdk[server] (pip install 'bastion-py-sdk[server]')"
    )


def _report(exc: Exception, base_url: str | None) -> int:
    """Print the error line for ``exc`` (and the traceback when debugging); its status."""
    status, line = describe(exc, base_url)
    debug = _debug()
    if debug:
        traceback.print_exception(exc)
    error_line(line)
    if not debug and not isinstance(exc, BastionError) and error_code(exc) == "internal_error":
        # Not an error the command line knows (the server's internal_error is one).
        error_line(f"bastion: this is a bug; set {ENV_DEBUG}=1 to see the traceback")
    return status


def _debug() -> bool:
    return os.environ.get(ENV_DEBUG, "") not in ("", "0")


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the interpreter's last
    flush does not complain about it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (tests)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


# --------------------------------------------------------------------------- parser


def build_parser(
    commands: Iterable[EntryPoint] = (),
) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The argument parser, with the commands of the given entry points added.

    Returns:
        The parser, and the entry points that could not be loaded: name -> the message
        to show when that command is asked for.  Each of those gets a placeholder
        sub-command so that asking for it is answered with that message (an install
        hint when the providing extra is missing) instead of "invalid choice", while
        every other command keeps working.
    """
    parser = argparse.ArgumentParser(
        prog="bastion",
        description=textwrap.fill(
            "Bastion sandboxes from the command line: sessions, files, jobs, live output "
            "and terminals. `bastion COMMAND --help` shows a command's options and "
            "examples; docs/CLI.md is the whole reference.",
            88,
        ),
        epilog=_top_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    add_connection_options(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the server's answer as JSON instead of a table (for scripts)",
    )
    subparsers: Subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_client_commands(subparsers)
    add_exec_command(subparsers)
    add_shell_command(subparsers)

    missing: dict[str, str] = {}
    for entry_point in commands:
        if entry_point.name in _BUILTIN_COMMANDS or entry_point.name in missing:
            continue
        try:
            register = entry_point.load()
        except ImportError as exc:
            # The extra that provides it is not installed; stay quiet unless asked for.
            missing[entry_point.name] = _needs_extra(exc)
        except Exception as exc:
            # A broken plugin must not take the client commands down with it.
            missing[entry_point.name] = (
                f"cannot load this command from {entry_point.value!r}: {type(exc).__name__}: {exc}"
            )
        else:
            register(subparsers)
            continue
        subparsers.add_parser(
            entry_point.name, add_help=False, help="(needs bastion-py-sdk[server])"
        )
    return parser, missing


def _top_epilog() -> str:
    codes = [
        f"  {int(code):<3} {_EXIT_CODE_TEXT.get(code, code.name.lower())}" for code in ExitCode
    ]
    return "\n".join(
        [
            "settings (a flag wins over the environment):",
            "  BASTION_URL      the server (--url; default http://localhost:8080)",
            "  BASTION_API_KEY  the API key (--api-key)",
            f"  {ENV_DEBUG}=1  print the traceback of an error too",
            "",
            "exit status (errors are one line on stderr: bastion: <message> (<code>)):",
            *codes,
            f"  exec and shell: the remote command's status, or {EXEC_FAILED} when bastion "
            "itself failed",
            "",
            "examples:",
            *(f"  {line}" for line in _EXAMPLES),
        ]
    )


def add_client_commands(subparsers: Subparsers) -> None:
    """Add ``sessions``, ``files`` and ``jobs`` with all their actions."""
    common = [connection_options(), output_options()]
    add_sessions(subparsers, common)
    add_files(subparsers, common)
    add_jobs(subparsers, common)
    add_keys_command(subparsers, common)
    add_snapshots_command(subparsers, common)
    add_images_command(subparsers, common)


if __name__ == "__main__":
    sys.exit(main())
