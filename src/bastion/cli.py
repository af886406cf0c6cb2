"""The ``bastion`` command line.

``main`` builds the parser, runs one command and turns whatever goes wrong into one
line on stderr, ``bastion: <message> (<code>)``, and an exit status from the table of
:class:`~bastion._cli_errors.ExitCode` (docs/CLI.md shows it) -- never a traceback,
unless ``$BASTION_DEBUG`` is set.

The client commands (``sessions``, ``files``, ``jobs``) live in
:mod:`bastion._cli_commands`.  ``bastion exec`` streams a command's output live and
``bastion shell`` attaches the local terminal to a shell in a session; both exit with
the remote command's status, or :data:`EXEC_FAILED` (125, as ``docker run``) when
``bastion`` itself failed.  ``--url``, ``--api-key`` and ``--json`` may come before or
after the command.

Other packages add commands through the ``bastion.commands`` entry-point group: each
entry point loads to a function ``register(subparsers)`` that adds one sub-parser and
sets its ``func`` default to a callable ``func(args) -> int``.  The server's commands
(``bastion serve``, ``bastion image``) come that way from the ``server`` extra; when it
is not installed, asking for one of them says how to install it.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import select
import shutil
import signal
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import EntryPoint, entry_points
from types import FrameType
from typing import TypeAlias

import httpx

from ._base import __version__
from ._cli_commands import (
    CLIENT_COMMANDS,
    Runner,
    add_client_commands,
    add_connection_options,
    add_job_options,
    connection_options,
    job_command,
)
from ._cli_errors import ExitCode, describe, error_code
from ._cli_format import write_text
from ._client import Bastion
from ._exceptions import BastionError, JobFailedError, TerminalError
from ._terminal import Terminal
from ._terminal_base import DEFAULT_COLS, DEFAULT_ROWS
from .wire import TerminalMessage

__all__ = ["ENTRY_POINT_GROUP", "EXEC_FAILED", "ExitCode", "build_parser", "main"]

ENTRY_POINT_GROUP = "bastion.commands"
_REMOTE_COMMANDS = frozenset({"exec", "shell"})
_BUILTIN_COMMANDS = CLIENT_COMMANDS | _REMOTE_COMMANDS

#: Exit status of ``exec`` and ``shell`` when ``bastion`` itself failed (an API or
#: connection error, no such session...), as ``docker run`` does: their other
#: statuses are the remote command's.
EXEC_FAILED = 125

#: Exit status when stdout was closed early (``| head``): 128 + SIGPIPE, as a shell
#: reports a program that the broken pipe ended.
_BROKEN_PIPE = 128 + signal.SIGPIPE

#: Set (to anything but ``0``) to get the traceback of an error as well.
ENV_DEBUG = "BASTION_DEBUG"

#: After stdin ends, ``bastion shell`` sends Ctrl-D this often until the terminal
#: closes (one sent before the remote shell's line editor is up is lost), and gives up
#: sending after this long (then it only waits for the shell to end).
EOF_INTERVAL = 0.5
EOF_PATIENCE = 10.0

_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
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
        _error_line(f"bastion: interrupted ({error_code(KeyboardInterrupt())})")
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
        _error_line(f"bastion: {args.command}: {missing[args.command]}")
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
        _error_line(f"bastion: {name}: {_needs_extra(exc)}")
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
    _error_line(line)
    if not debug and not isinstance(exc, BastionError) and error_code(exc) == "internal_error":
        # Not an error the command line knows (the server's internal_error is one).
        _error_line(f"bastion: this is a bug; set {ENV_DEBUG}=1 to see the traceback")
    return status


def _debug() -> bool:
    return os.environ.get(ENV_DEBUG, "") not in ("", "0")


def _error_line(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


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
    subparsers: _Subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_client_commands(subparsers)
    _add_exec_command(subparsers)
    _add_shell_command(subparsers)

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


def _add_remote_parser(
    subparsers: _Subparsers, name: str, *, help: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 88),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        parents=[connection_options()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --------------------------------------------------------------------------- exec


def _add_exec_command(subparsers: _Subparsers) -> None:
    exec_ = _add_remote_parser(
        subparsers,
        "exec",
        help="run a command in a session, streaming its output live",
        description="Run a command in a running session, copy its stdout and stderr here "
        "as they are produced, and exit with its exit status, as if it ran here. Put the "
        f"command after --. Exits {EXEC_FAILED} when bastion itself failed (the server "
        "cannot be reached, no such session, ...) and 130 on Ctrl-C (the job keeps "
        "running unless it has a --timeout).",
        examples=[
            "bastion exec $SID -- python3 -u train.py",
            "bastion exec $SID --cwd /tmp --env MODE=fast -- sh -c 'echo \"$MODE in $PWD\"'",
            "bastion exec $SID --shell -- 'ls / | wc -l'",
            'bastion exec $SID --timeout 10m -- make test || echo "exit status $?"',
        ],
    )
    add_job_options(exec_)
    exec_.set_defaults(runner=_exec)


def _exec(client: Bastion, args: argparse.Namespace) -> int:
    try:
        job = client.jobs.run_and_wait(
            args.session_id,
            job_command(args),
            env=dict(args.env) if args.env else None,
            cwd=args.cwd,
            timeout=args.timeout,
            wait_timeout=args.wait_timeout,
            on_stdout=lambda text: write_text(sys.stdout, text),
            on_stderr=lambda text: write_text(sys.stderr, text),
        )
    except JobFailedError as exc:
        return _failed_job_status(exc)
    except KeyboardInterrupt:
        # Only the client stops: the job runs on unless it has a --timeout.
        _error_line(
            "bastion: interrupted; the job keeps running in the session "
            f"({error_code(KeyboardInterrupt())})"
        )
        return ExitCode.INTERRUPTED
    output = job.get("output")
    status = output["status_code"] if output else None
    return 0 if status is None else _exit_status(status)


def _failed_job_status(exc: JobFailedError) -> int:
    """The exit status for a failed job, saying why when its own status does not."""
    status = exc.exit_status
    if status is None or exc.failure_reason not in (None, "nonzero_exit"):
        # The job's stderr has been streamed already; only the reason is news (a
        # plain non-zero exit says it all through the exit status).
        parts = [f"bastion: job {exc.job_id} failed"]
        if status is not None:
            parts.append(f"with exit status {status}")
        parts.append(f"({exc.failure_reason or 'job_failed'})")
        _error_line(" ".join(parts))
    return 1 if status is None else _exit_status(status)


def _exit_status(status: int) -> int:
    """A remote exit status as a local one (1 when it does not fit in 0..255)."""
    return status if 0 <= status < 256 else 1


# --------------------------------------------------------------------------- shell


def _add_shell_command(subparsers: _Subparsers) -> None:
    shell = _add_remote_parser(
        subparsers,
        "shell",
        help="attach this terminal to a shell in a session",
        description="Open an interactive shell in a running session, with this terminal "
        "in raw mode (keys go to the remote shell as typed; window resizes follow). "
        "Exits with the shell's exit status, or "
        f"{EXEC_FAILED} when bastion itself failed. Without a terminal on stdin, stdin "
        "is sent as input until it ends; then the shell gets Ctrl-D until it has ended.",
        examples=[
            "bastion shell $SID",
            "echo 'uname -a; exit 0' | bastion shell $SID",
            "bastion shell $SID < setup.sh",
            "bastion shell $SID --url http://sandbox-host:8080 --api-key $KEY",
        ],
    )
    shell.add_argument("session_id", metavar="SESSION")
    shell.set_defaults(runner=_shell)


def _shell(client: Bastion, args: argparse.Namespace) -> int:
    stdin_fd = sys.stdin.fileno()
    interactive = os.isatty(stdin_fd)
    out = sys.stdout

    def on_message(message: TerminalMessage) -> None:
        if message["type"] == "term_output":
            data = message["payload"].get("data")
            if isinstance(data, str):
                write_text(out, data)

    rows, cols = _window_size()
    terminal = client.terminal.connect(args.session_id, on_message, rows=rows, cols=cols)
    try:
        with _raw_mode(stdin_fd if interactive else None), _forward_resizes(terminal):
            _forward_input(terminal, stdin_fd)
            exit_info = terminal.wait()
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    finally:
        terminal.close()
    reason = exit_info.get("reason")
    status = exit_info.get("exit_code")
    if reason != "exited":
        ended = "the shell ended" + (" without an exit status" if status is None else "")
        _error_line(f"bastion: {ended} ({reason})")
    return 1 if status is None else _exit_status(status)


@contextlib.contextmanager
def _raw_mode(fd: int | None) -> Iterator[None]:
    """Put the local tty in raw mode (keys go to the remote shell as typed, Ctrl-C
    included) and restore it however the block ends."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _forward_resizes(terminal: Terminal) -> Iterator[None]:
    """Send the local window size to the shell on each SIGWINCH."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def on_winch(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(TerminalError, ValueError):
            terminal.resize(*_window_size())

    previous = signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _window_size() -> tuple[int, int]:
    """``(rows, cols)`` of the local terminal, 24x80 when there is none."""
    for stream in (sys.stdout, sys.stdin, sys.stderr):
        try:
            size = os.get_terminal_size(stream.fileno())
        except (AttributeError, OSError, ValueError):
            continue
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    size = shutil.get_terminal_size((DEFAULT_COLS, DEFAULT_ROWS))
    return max(1, size.lines), max(1, size.columns)


def _forward_input(terminal: Terminal, fd: int) -> None:
    """Send what arrives on ``fd`` to the shell until it ends or the terminal closes.

    The loop wakes up every 0.1 s to notice a terminal that closed (the shell exited)
    while nothing was typed.  At the end of the input the shell gets Ctrl-D, which
    ends a shell reading from an empty line (see :func:`_end_input`).
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while not terminal.closed:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # e.g. EIO: the tty went away
            data = b""
        text = decoder.decode(data, final=not data)
        try:
            if text:
                terminal.send_input(text)
        except TerminalError:
            return  # closed meanwhile; wait() tells how
        if not data:
            _end_input(terminal)
            return


def _end_input(terminal: Terminal) -> None:
    """Send Ctrl-D every :data:`EOF_INTERVAL` seconds until the terminal closes.

    One Ctrl-D is not enough: sent before the remote shell's line editor is up (input
    that ends at once, ``bastion shell SID </dev/null``), it is lost and the shell
    would wait for ever.  After :data:`EOF_PATIENCE` seconds (a command of the input
    still runs), stop sending; the caller waits for the shell to end.
    """
    deadline = time.monotonic() + EOF_PATIENCE
    while not terminal.closed:
        try:
            terminal.send_input("\x04")
        except TerminalError:
            return  # closed meanwhile
        next_try = min(time.monotonic() + EOF_INTERVAL, deadline)
        while not terminal.closed and time.monotonic() < next_try:
            time.sleep(0.02)
        if time.monotonic() >= deadline:
            return


if __name__ == "__main__":
    sys.exit(main())
