"""The ``bastion`` command line.

Client commands (``bastion sessions ...``, ``bastion jobs ...``) talk to a server
given by ``--url``/``$BASTION_URL`` and print JSON; ``bastion exec`` streams a
command's output live and ``bastion shell`` attaches the local terminal to a shell in
a session, both exiting with the remote exit status.  Other packages add commands
through the ``bastion.commands`` entry-point group: each entry point loads to a
function ``register(subparsers)`` that adds one sub-parser and sets its ``func``
default to a callable ``func(args) -> int``.  The server's commands (``bastion serve``)
come that way from the ``server`` extra; when it is not installed, asking for one of
them says how to install it.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import os
import select
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import EntryPoint, entry_points
from types import FrameType
from typing import Any, TextIO

import httpx

from ._base import __version__
from ._client import Bastion
from ._exceptions import APIConnectionError, BastionError, JobFailedError, TerminalError
from ._terminal import Terminal
from ._terminal_base import DEFAULT_COLS, DEFAULT_ROWS
from .wire import SessionLimits, TerminalMessage

__all__ = ["main"]

ENTRY_POINT_GROUP = "bastion.commands"
_BUILTIN_COMMANDS = frozenset({"sessions", "jobs", "exec", "shell"})

#: Prints its result as JSON.
Handler = Callable[[Bastion, argparse.Namespace], Any]
#: Does its own output and returns the exit status (``exec``, ``shell``).
Runner = Callable[[Bastion, argparse.Namespace], int]

#: Exit status after Ctrl-C, as a shell reports it (128 + SIGINT).
_INTERRUPTED = 130


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
        The process exit status: 0 on success, 1 on an API error (or a failed job's
        exit status for ``jobs run``), 2 on a usage error.
    """
    if commands is None:
        commands = entry_points(group=ENTRY_POINT_GROUP)
    parser, missing = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if args.command in missing:
        print(f"bastion: {args.command}: {missing[args.command]}", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler: Handler | None = getattr(args, "handler", None)
    runner: Runner | None = getattr(args, "runner", None)
    if handler is None and runner is None:  # a command registered through an entry point
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            parser.error(f"command {args.command!r} set no func")
        return int(func(args))
    client = Bastion(args.url, args.api_key, transport=transport)
    try:
        with client:
            if runner is not None:
                return runner(client, args)
            assert handler is not None
            return _output(handler(client, args))
    except JobFailedError as exc:
        _print_json(dict(exc))
        code = exc.status_code
        return code if code is not None and 0 < code < 256 else 1
    except APIConnectionError as exc:
        print(f"bastion: error: {exc} (is a server running at {client.base_url}?)", file=sys.stderr)
        return 1
    except BastionError as exc:
        suffix = f" [{exc.code}]" if exc.code else ""
        print(f"bastion: error: {exc}{suffix}", file=sys.stderr)
        return 1


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
    parser = argparse.ArgumentParser(prog="bastion", description="Bastion sandboxes.")
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    parser.add_argument("--url", help="server URL (default: $BASTION_URL or localhost:8080)")
    parser.add_argument("--api-key", help="API key (default: $BASTION_API_KEY)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_session_commands(subparsers)
    _add_job_commands(subparsers)
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
            missing[entry_point.name] = (
                f"this command needs the server extra ({exc}); install bastion-py-sdk[server]"
            )
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


# --------------------------------------------------------------------------- client commands


def _add_session_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    sessions = subparsers.add_parser("sessions", help="manage sessions")
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = actions.add_parser("create", help="create a session")
    create.add_argument("--memory-mb", type=int, help="memory limit in MiB")
    create.add_argument("--pids", type=int, help="process-count limit")
    create.add_argument("--cpus", type=float, help="CPU limit")
    create.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_key_value,
        help="a label (repeatable)",
    )
    create.add_argument("--start", action="store_true", help="start the session too")
    create.set_defaults(handler=_sessions_create)

    actions.add_parser("list", help="list sessions").set_defaults(
        handler=lambda client, args: client.sessions.list()
    )
    for name, help_text in (
        ("status", "show a session"),
        ("start", "start a session"),
        ("stop", "stop a session"),
        ("delete", "delete a session (irreversible)"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("session_id", metavar="SESSION")
        action.set_defaults(
            handler=lambda client, args, name=name: getattr(client.sessions, name)(args.session_id)
        )


def _sessions_create(client: Bastion, args: argparse.Namespace) -> Any:
    limits: SessionLimits = {}
    if args.memory_mb is not None:
        limits["memory_mb"] = args.memory_mb
    if args.pids is not None:
        limits["pids"] = args.pids
    if args.cpus is not None:
        limits["cpus"] = args.cpus
    info = client.sessions.create(
        limits=limits or None, metadata=dict(args.metadata) if args.metadata else None
    )
    if args.start:
        info = client.sessions.start(info["session_id"])
    return info


def _add_job_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    jobs = subparsers.add_parser("jobs", help="run and inspect jobs")
    actions = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)

    run = actions.add_parser(
        "run",
        help="run a command in a session",
        description="Run a command and print its result; exits with the job's exit status "
        "if it fails. Put the command after --, e.g.: bastion jobs run SESSION -- ls -la /",
    )
    _add_job_options(run)
    run.add_argument("--no-wait", action="store_true", help="print the queued job and exit")
    run.set_defaults(handler=_jobs_run)

    get = actions.add_parser("get", help="show a job")
    get.add_argument("session_id", metavar="SESSION")
    get.add_argument("job_id", metavar="JOB")
    get.set_defaults(handler=lambda client, args: client.jobs.get(args.session_id, args.job_id))

    list_ = actions.add_parser("list", help="list a session's jobs")
    list_.add_argument("session_id", metavar="SESSION")
    list_.set_defaults(handler=lambda client, args: client.jobs.list(args.session_id))


def _jobs_run(client: Bastion, args: argparse.Namespace) -> Any:
    command: str | list[str] = " ".join(args.argv) if args.shell else list(args.argv)
    options: dict[str, Any] = {
        "env": dict(args.env) if args.env else None,
        "cwd": args.cwd,
        "timeout": args.timeout,
    }
    if args.no_wait:
        return client.jobs.run(args.session_id, command, **options)
    return client.jobs.run_and_wait(
        args.session_id, command, wait_timeout=args.wait_timeout, **options
    )


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session_id", metavar="SESSION")
    parser.add_argument("argv", nargs="+", metavar="CMD", help="the command and its arguments")
    parser.add_argument("--shell", action="store_true", help="run the words with /bin/sh -c")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", type=_key_value)
    parser.add_argument("--cwd", help="working directory in the session")
    parser.add_argument("--timeout", type=float, help="server-side time limit in seconds")
    parser.add_argument("--wait-timeout", type=float, help="seconds to wait for the result")


def _add_exec_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    exec_ = subparsers.add_parser(
        "exec",
        help="run a command in a session, streaming its output",
        description="Run a command, copy its stdout and stderr here as they are produced, "
        "and exit with its exit status. Put the command after --, e.g.: "
        "bastion exec SESSION -- python3 -u train.py",
    )
    _add_job_options(exec_)
    exec_.set_defaults(runner=_exec)


def _exec(client: Bastion, args: argparse.Namespace) -> int:
    command: str | list[str] = " ".join(args.argv) if args.shell else list(args.argv)
    try:
        job = client.jobs.run_and_wait(
            args.session_id,
            command,
            env=dict(args.env) if args.env else None,
            cwd=args.cwd,
            timeout=args.timeout,
            wait_timeout=args.wait_timeout,
            on_stdout=lambda text: _write_live(sys.stdout, text),
            on_stderr=lambda text: _write_live(sys.stderr, text),
        )
    except JobFailedError as exc:
        return _failed_job_status(exc)
    except KeyboardInterrupt:
        # Only the client stops: the job runs on unless it has a --timeout.
        print("bastion: interrupted (the job keeps running in the session)", file=sys.stderr)
        return _INTERRUPTED
    output = job.get("output")
    status = output["status_code"] if output else None
    return 0 if status is None else _exit_status(status)


def _failed_job_status(exc: JobFailedError) -> int:
    """The exit status for a failed job, saying why when its own status does not."""
    status = exc.status_code
    if status is None or exc.failure_reason not in (None, "nonzero_exit"):
        # The job's stderr has been streamed already; only the reason is news (a
        # plain non-zero exit says it all through the exit status).
        parts = [f"bastion: job {exc.job_id} failed"]
        if status is not None:
            parts.append(f"with exit status {status}")
        if exc.failure_reason:
            parts.append(f"({exc.failure_reason})")
        print(" ".join(parts), file=sys.stderr)
    return 1 if status is None else _exit_status(status)


def _exit_status(status: int) -> int:
    """A remote exit status as a local one (1 when it does not fit in 1..255)."""
    return status if 0 <= status < 256 else 1


def _write_live(stream: TextIO, text: str) -> None:
    """Write output as it arrives: as UTF-8 to the byte stream when there is one (the
    local locale must not break on remote output), flushed at once."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(text)
    else:
        stream.flush()
        buffer.write(text.encode("utf-8", "replace"))
        buffer.flush()
    stream.flush()


# --------------------------------------------------------------------------- shell


def _add_shell_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    shell = subparsers.add_parser(
        "shell",
        help="attach this terminal to a shell in a session",
        description="Open an interactive shell in a running session. Exits with the "
        "shell's exit status. Without a terminal on stdin, stdin is sent as input "
        "until it ends (then the shell gets Ctrl-D).",
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
                _write_live(out, data)

    rows, cols = _window_size()
    terminal = client.terminal.connect(args.session_id, on_message, rows=rows, cols=cols)
    try:
        with _raw_mode(stdin_fd if interactive else None), _forward_resizes(terminal):
            _forward_input(terminal, stdin_fd)
            exit_info = terminal.wait()
    except KeyboardInterrupt:
        return _INTERRUPTED
    finally:
        terminal.close()
    reason = exit_info.get("reason")
    if reason != "exited":
        print(f"bastion: shell ended: {reason}", file=sys.stderr)
    status = exit_info.get("exit_code")
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
    ends a shell reading from an empty line.
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
        text = decoder.decode(data, final=not data) + ("" if data else "\x04")
        try:
            if text:
                terminal.send_input(text)
        except TerminalError:
            return  # closed meanwhile; wait() tells how
        if not data:
            return


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _output(result: Any) -> int:
    _print_json(result)
    return 0


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
