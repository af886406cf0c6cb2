"""``bastion sessions``: create, list, show, start, stop, delete and prune sessions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

from .._client import Bastion
from .._exceptions import (
    SessionNotFoundError,
)
from ..wire import (
    ExpiryAction,
    NetworkRequest,
    SessionInfo,
    SessionLimits,
    SessionList,
    SessionStatus,
)
from .common import (
    Runner,
    Subparsers,
    add_command,
    add_group,
    add_page_options,
    duration,
    json_mode,
    key_value,
    note_next_page,
    print_lines,
    table_width,
    to_stderr,
)
from .errors import ExitCode, UsageError
from .format import (
    command_text,
    format_size,
    format_time_ago,
    metadata_text,
    network_text,
    number_text,
    session_details,
    table,
    write_json,
)
from .snapshots import add_session_snapshot_actions

# --------------------------------------------------------------------------- sessions


def add_sessions(subparsers: Subparsers, common: list[argparse.ArgumentParser]) -> None:
    actions = add_group(
        subparsers,
        "sessions",
        help="create, list, start, stop, pause and delete sessions",
        description="Manage sessions: isolated sandboxes that jobs run in and files live "
        "in. A session is created (status 'created'), started ('running'), paused "
        "('paused', its processes frozen), stopped ('stopped', its files kept) and "
        "deleted ('deleted', everything gone).",
        examples=[
            "SID=$(bastion sessions create --memory-mb 256 --start -q)",
            "bastion sessions list",
            "bastion sessions status $SID",
            "bastion sessions delete $SID",
        ],
    )

    create = add_command(
        actions,
        "create",
        help="create a session",
        description="Create a session, with resource limits, timeouts, outbound network "
        "and labels. Omitted limits take the server's defaults. Prints the session "
        "(with -q only its id).",
        examples=[
            "bastion sessions create --start",
            "SID=$(bastion sessions create --start -q)",
            "bastion sessions create --memory-mb 256 --pids 64 --cpus 0.5 --disk-mb 512",
            "bastion sessions create --idle-timeout 10m --max-lifetime 2h --on-timeout delete",
            "bastion sessions create --network --allow 203.0.113.0/24 pypi.org --start",
            "bastion sessions create --metadata user=alice --metadata task=42 --json",
        ],
        parents=common,
    )
    limits = create.add_argument_group("limits")
    limits.add_argument("--memory-mb", type=int, metavar="MIB", help="memory limit in MiB")
    limits.add_argument("--pids", type=int, metavar="N", help="most processes and threads")
    limits.add_argument("--cpus", type=float, metavar="CORES", help="CPU limit, e.g. 0.5")
    limits.add_argument(
        "--disk-mb", type=int, metavar="MIB", help="size of the session's writable layer"
    )
    timeouts = create.add_argument_group("timeouts (seconds, or 90s, 10m, 1h30m, 2d)")
    timeouts.add_argument(
        "--idle-timeout",
        type=duration,
        metavar="DURATION",
        help="stop the session after this long without a job, terminal or request",
    )
    timeouts.add_argument(
        "--max-lifetime",
        type=duration,
        metavar="DURATION",
        help="stop the session this long after it was created",
    )
    timeouts.add_argument(
        "--paused-timeout",
        type=duration,
        metavar="DURATION",
        help="stop the session once it has been paused this long",
    )
    timeouts.add_argument(
        "--on-timeout",
        choices=["stop", "delete"],
        help="what a timeout does (default: stop, files kept)",
    )
    network = create.add_argument_group("network (off unless asked for)")
    network.add_argument(
        "--network", action="store_true", help="allow outbound network (never to the host)"
    )
    network.add_argument(
        "--allow",
        nargs="+",
        action="extend",
        default=[],
        metavar="CIDR",
        help="only to these networks or host names (implies --network; repeatable)",
    )
    create.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=key_value,
        help="a label stored with the session (repeatable)",
    )
    create.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        type=key_value,
        help="a variable every job and terminal of the session gets (repeatable)",
    )
    create.add_argument(
        "--snapshot", metavar="SNAPSHOT", help="start from this snapshot's files (and image)"
    )
    create.add_argument(
        "--image",
        metavar="IMAGE",
        help="the image to run (bastion images list); default: the server's",
    )
    create.add_argument("--start", action="store_true", help="start the session right away")
    create.add_argument("-q", "--quiet", action="store_true", help="print only the session id")
    create.set_defaults(runner=_sessions_create)

    list_ = add_command(
        actions,
        "list",
        help="list sessions",
        description="List the sessions (of your API key), oldest first.",
        examples=[
            "bastion sessions list",
            "bastion sessions list --status running -q",
            "bastion sessions list --json",
        ],
        parents=common,
    )
    list_.add_argument(
        "--status",
        choices=[s.value for s in SessionStatus],
        help="only the sessions in this state",
    )
    list_.add_argument("-q", "--quiet", action="store_true", help="print only the session ids")
    add_page_options(list_, "sessions")
    list_.set_defaults(runner=_sessions_list)

    ps = add_command(
        actions,
        "ps",
        help="list a running session's processes",
        description="List every process of a running session: pid and parent as the "
        "session sees them, user, CPU time, memory, the job it belongs to, and command.",
        examples=["bastion sessions ps $SID", "bastion sessions ps $SID --json"],
        parents=common,
    )
    ps.add_argument("session_id", metavar="SESSION")
    ps.set_defaults(runner=_sessions_ps)

    for name, summary, description, example in (
        (
            "status",
            "show a session",
            "Show a session: its state, the node that holds it (a cluster's, behind "
            "'bastion serve --ray'), limits, timeouts, network and labels, and what it "
            "uses now (CPU time, memory, processes, disk) while it runs.",
            "bastion sessions status $SID",
        ),
        (
            "start",
            "start a session",
            "Start a created or stopped session; its files are where they were.",
            "bastion sessions start $SID",
        ),
        (
            "stop",
            "stop a session (files kept)",
            "Stop a running session: its processes are killed, its files kept.",
            "bastion sessions stop $SID",
        ),
        (
            "pause",
            "pause a session (processes frozen, memory kept)",
            "Freeze every process of a running session: memory kept, no CPU used, its "
            "timers stand still. Jobs, terminals and files are refused until it is resumed.",
            "bastion sessions pause $SID",
        ),
        (
            "resume",
            "resume a paused session",
            "Thaw a paused session: its processes go on where they were.",
            "bastion sessions resume $SID",
        ),
        (
            "delete",
            "delete a session, or all of them (irreversible)",
            "Delete a session and everything in it, or with --all every session of your "
            "API key. This cannot be undone.",
            "bastion sessions delete $SID",
        ),
    ):
        action = add_command(
            actions,
            name,
            help=summary,
            description=description,
            examples=[example, example + " --json"],
            parents=common,
        )
        if name == "delete":
            action.add_argument("session_id", metavar="SESSION", nargs="?")
            action.add_argument(
                "--all",
                action="store_true",
                help="delete every session of your API key instead of one",
            )
            action.set_defaults(runner=_sessions_delete)
            action.epilog = (action.epilog or "") + "\n  bastion sessions delete --all"
        else:
            action.add_argument("session_id", metavar="SESSION")
            action.set_defaults(runner=_session_action(name))

    prune = add_command(
        actions,
        "prune",
        help="delete every stopped session (irreversible)",
        description="Delete every stopped session of your API key, with its files: what "
        "timeouts, restarts and the server's exit policy leave behind. Running and "
        "created sessions are kept.",
        examples=["bastion sessions prune", "bastion sessions prune --json"],
        parents=common,
    )
    prune.set_defaults(runner=_sessions_prune)
    add_session_snapshot_actions(actions, common)


def _sessions_create(client: Bastion, args: argparse.Namespace) -> int:
    limits: SessionLimits = {}
    if args.memory_mb is not None:
        limits["memory_mb"] = args.memory_mb
    if args.pids is not None:
        limits["pids"] = args.pids
    if args.cpus is not None:
        limits["cpus"] = args.cpus
    if args.disk_mb is not None:
        limits["disk_mb"] = args.disk_mb
    network: NetworkRequest | None = None
    if args.network or args.allow:
        network = {"enabled": True}
        if args.allow:
            network["allow"] = list(args.allow)
    info = client.sessions.create(
        limits=limits or None,
        metadata=dict(args.metadata) if args.metadata else None,
        idle_timeout=args.idle_timeout,
        max_lifetime=args.max_lifetime,
        on_timeout=cast(ExpiryAction | None, args.on_timeout),
        network=network,
        env=dict(args.env) if args.env else None,
        paused_timeout=args.paused_timeout,
        snapshot=args.snapshot,
        image=args.image,
    )
    if args.start:
        try:
            info = client.sessions.start(info["session_id"])
        except BaseException:
            to_stderr(f"bastion: session {info['session_id']} was created but not started")
            raise
    _show_session(info, args)
    return ExitCode.OK


def _show_session(info: SessionInfo, args: argparse.Namespace) -> None:
    if json_mode(args):
        write_json(sys.stdout, info)
    elif getattr(args, "quiet", False):
        print_lines([info["session_id"]])
    else:
        print_lines(session_details(info))


def _sessions_ps(client: Bastion, args: argparse.Namespace) -> int:
    found = client.sessions.processes(args.session_id)
    if json_mode(args):
        write_json(sys.stdout, found)
        return ExitCode.OK
    rows = [
        [
            str(p["pid"]),
            str(p["ppid"]),
            p["user"],
            f"{p['cpu_seconds']:.2f}s",
            format_size(p["memory_bytes"]),
            p["job_id"] or "-",
            command_text(p["command"]),
        ]
        for p in found
    ]
    headers = ["PID", "PPID", "USER", "CPU", "MEM", "JOB", "COMMAND"]
    print_lines(table(headers, rows, right=("PID", "PPID", "CPU", "MEM"), max_width=table_width()))
    return ExitCode.OK


def _sessions_list(client: Bastion, args: argparse.Namespace) -> int:
    result = client.sessions.list(limit=args.limit, cursor=args.cursor)
    if args.status:
        result = {
            **result,
            "sessions": [s for s in result["sessions"] if s.get("status") == args.status],
        }
    _print_sessions(result, args)
    note_next_page(result)
    return ExitCode.OK


def _print_sessions(result: SessionList, args: argparse.Namespace) -> None:
    sessions = result["sessions"]
    if json_mode(args):
        write_json(sys.stdout, result)
        return
    if args.quiet:
        print_lines([s["session_id"] for s in sessions])
        return
    # Every server names the node of its sessions (its host's name by default); the
    # column is shown only where it tells them apart: sessions spread over a cluster.
    with_node = len({s.get("node") for s in sessions}) > 1
    rows = []
    for s in sessions:
        limits: Mapping[str, Any] = s.get("limits") or {}
        memory = limits.get("memory_mb")
        rows.append(
            [
                s["session_id"],
                str(s.get("status", "-")),
                format_time_ago(s.get("created_at")),
                format_size(memory * 1024 * 1024) if isinstance(memory, int) else "-",
                str(limits.get("pids", "-")),
                number_text(limits.get("cpus")),
                network_text(s.get("network")),
                metadata_text(s.get("metadata")),
            ]
        )
        if with_node:
            rows[-1].insert(2, str(s.get("node") or "-"))
    if not rows:
        to_stderr("no sessions")
        return
    headers = ["SESSION", "STATUS", "CREATED", "MEMORY", "PIDS", "CPUS", "NETWORK", "METADATA"]
    if with_node:
        headers.insert(2, "NODE")
    right = ["MEMORY", "PIDS", "CPUS"]
    print_lines(table(headers, rows, right=right, max_width=table_width()))


def _delete_sessions(client: Bastion, args: argparse.Namespace, ids: Sequence[str]) -> int:
    """Delete ``ids``, one line each (a session gone meanwhile is skipped)."""
    deleted: list[str] = []
    for session_id in ids:
        try:
            client.sessions.delete(session_id)
        except SessionNotFoundError:
            continue
        deleted.append(session_id)
        if not json_mode(args):
            print_lines([f"{session_id}  deleted"])
    if json_mode(args):
        write_json(sys.stdout, {"deleted": deleted})
    elif not deleted:
        to_stderr("no sessions to delete")
    return ExitCode.OK


def _sessions_delete(client: Bastion, args: argparse.Namespace) -> int:
    if args.all == (args.session_id is not None):
        raise UsageError("give a SESSION to delete, or --all (not both)")
    if not args.all:
        return _session_action("delete")(client, args)
    ids = [s["session_id"] for s in client.sessions.list()["sessions"]]
    return _delete_sessions(client, args, ids)


def _sessions_prune(client: Bastion, args: argparse.Namespace) -> int:
    sessions = client.sessions.list()["sessions"]
    ids = [s["session_id"] for s in sessions if s.get("status") == "stopped"]
    return _delete_sessions(client, args, ids)


def _session_action(name: str) -> Runner:
    def run(client: Bastion, args: argparse.Namespace) -> int:
        info: SessionInfo = getattr(client.sessions, "get" if name == "status" else name)(
            args.session_id
        )
        if json_mode(args) or name == "status":
            _show_session(info, args)
        else:
            print_lines([f"{info.get('session_id', args.session_id)}  {info.get('status')}"])
        return ExitCode.OK

    return run
