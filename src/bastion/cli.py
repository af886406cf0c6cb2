"""The ``bastion`` command line.

Client commands (``bastion sessions ...``, ``bastion jobs ...``) talk to a server
given by ``--url``/``$BASTION_URL`` and print JSON.  Other packages add commands
through the ``bastion.commands`` entry-point group: each entry point loads to a
function ``register(subparsers)`` that adds one sub-parser and sets its ``func``
default to a callable ``func(args) -> int``.  The server's commands (``bastion serve``)
come that way from the ``server`` extra; when it is not installed, asking for one of
them says how to install it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import httpx

from ._base import __version__
from ._client import Bastion
from ._exceptions import APIConnectionError, BastionError, JobFailedError
from .wire import SessionLimits

__all__ = ["main"]

ENTRY_POINT_GROUP = "bastion.commands"
_BUILTIN_COMMANDS = frozenset({"sessions", "jobs"})

Handler = Callable[[Bastion, argparse.Namespace], Any]


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
    if handler is None:  # a command registered through an entry point
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            parser.error(f"command {args.command!r} set no func")
        return int(func(args))
    client = Bastion(args.url, args.api_key, transport=transport)
    try:
        with client:
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
    run.add_argument("session_id", metavar="SESSION")
    run.add_argument("argv", nargs="+", metavar="CMD", help="the command and its arguments")
    run.add_argument("--shell", action="store_true", help="run the words with /bin/sh -c")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", type=_key_value)
    run.add_argument("--cwd", help="working directory in the session")
    run.add_argument("--timeout", type=float, help="server-side time limit in seconds")
    run.add_argument("--wait-timeout", type=float, help="seconds to wait for the result")
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
