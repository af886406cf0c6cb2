"""``bastion sessions snapshot|fork|restore`` and ``bastion snapshots list|get|delete``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .common import (
    add_command,
    add_group,
    add_page_options,
    json_mode,
    note_next_page,
    print_lines,
    table_width,
    to_stderr,
)
from .errors import ExitCode
from .format import details, format_size, format_time_ago, table, write_json

if TYPE_CHECKING:
    from .._client import Bastion
    from ..wire import SnapshotInfo
    from .common import Subparsers


def add_session_snapshot_actions(
    actions: Subparsers, common: list[argparse.ArgumentParser]
) -> None:
    """``snapshot``, ``fork`` and ``restore`` under ``bastion sessions``."""
    snapshot = add_command(
        actions,
        "snapshot",
        help="snapshot a session's files",
        description="Snapshot a session's files (the image plus everything written since), "
        "consistently: a running session is frozen for the copy. Works on running, paused "
        "and stopped sessions. Prints the snapshot (with -q only its id) once it is ready.",
        examples=[
            "SNAP=$(bastion sessions snapshot $SID -q)",
            "bastion sessions snapshot $SID --name after-setup",
        ],
        parents=common,
    )
    snapshot.add_argument("session_id", metavar="SESSION")
    snapshot.add_argument("--name", help="a label of your own")
    snapshot.add_argument("--no-wait", action="store_true", help="return at once (status creating)")
    snapshot.add_argument("-q", "--quiet", action="store_true", help="print only the id")
    snapshot.set_defaults(runner=_snapshot)

    fork = add_command(
        actions,
        "fork",
        help="start running copies of a session",
        description="Snapshot a session and start COUNT running copies of it (its files, "
        "limits, timeouts, network, metadata and env); each copy's writes are its own. "
        "Prints the copies' ids, one a line (the snapshot's id on stderr).",
        examples=["bastion sessions fork $SID 4", "bastion sessions fork $SID 2 --json"],
        parents=common,
    )
    fork.add_argument("session_id", metavar="SESSION")
    fork.add_argument("count", type=int, nargs="?", default=1, help="how many (default 1)")
    fork.add_argument("--name", help="the snapshot's name")
    fork.set_defaults(runner=_fork)

    restore = add_command(
        actions,
        "restore",
        help="reset a session's files to a snapshot",
        description="Reset a session's files to a snapshot's. A running or paused session's "
        "jobs and terminals end first (as at a stop) and it starts again on the snapshot's "
        "files; a created or stopped one keeps its state.",
        examples=["bastion sessions restore $SID $SNAP"],
        parents=common,
    )
    restore.add_argument("session_id", metavar="SESSION")
    restore.add_argument("snapshot_id", metavar="SNAPSHOT")
    restore.set_defaults(runner=_restore)


def add_snapshots_command(subparsers: Subparsers, common: list[argparse.ArgumentParser]) -> None:
    """``bastion snapshots list|get|delete``."""
    actions = add_group(
        subparsers,
        "snapshots",
        help="list and delete snapshots",
        description="Snapshots of sessions' files, taken with `bastion sessions snapshot` "
        "or `fork`. They belong to your API key and outlive their sessions.",
        examples=["bastion snapshots list", "bastion snapshots delete $SNAP"],
    )
    list_ = add_command(
        actions,
        "list",
        help="list snapshots",
        description="List your API key's snapshots, oldest first, with their disk use.",
        examples=[
            "bastion snapshots list",
            "bastion snapshots list -q",
            "bastion snapshots list --json",
        ],
        parents=common,
    )
    list_.add_argument("-q", "--quiet", action="store_true", help="print only the ids")
    add_page_options(list_, "snapshots")
    list_.set_defaults(runner=_list)
    get = add_command(
        actions,
        "get",
        help="show a snapshot",
        description="Show a snapshot: its status (creating, ready, failed) and disk use.",
        examples=["bastion snapshots get $SNAP"],
        parents=common,
    )
    get.add_argument("snapshot_id", metavar="SNAPSHOT")
    get.set_defaults(runner=_get)
    delete = add_command(
        actions,
        "delete",
        help="delete snapshots",
        description="Delete snapshots; sessions started from them keep their files.",
        examples=[
            "bastion snapshots delete $SNAP",
            "bastion snapshots list -q | xargs bastion snapshots delete",
        ],
        parents=common,
    )
    delete.add_argument("snapshot_ids", metavar="SNAPSHOT", nargs="+")
    delete.set_defaults(runner=_delete)


def _show(info: SnapshotInfo, args: argparse.Namespace) -> None:
    if json_mode(args):
        write_json(sys.stdout, info)
    elif getattr(args, "quiet", False):
        print_lines([info["snapshot_id"]])
    else:
        reason = info.get("status_reason")
        pairs = [
            ("snapshot", info["snapshot_id"]),
            ("status", info["status"]),
            *([("reason", reason)] if reason else []),
            ("name", info.get("name") or "-"),
            ("session", info["session_id"]),
            ("parent", info.get("parent") or "-"),
            ("size", format_size(info["size_bytes"])),
            ("created", format_time_ago(info["created_at"])),
        ]
        print_lines(details(pairs))


def _snapshot(client: Bastion, args: argparse.Namespace) -> int:
    info = client.sessions.snapshot(args.session_id, name=args.name, wait=not args.no_wait)
    _show(info, args)
    return ExitCode.OK if info["status"] != "failed" else ExitCode.FAILED


def _fork(client: Bastion, args: argparse.Namespace) -> int:
    result = client.sessions.fork(args.session_id, args.count, name=args.name)
    if json_mode(args):
        write_json(sys.stdout, result)
    else:
        to_stderr(f"snapshot {result['snapshot']['snapshot_id']}")
        print_lines([s["session_id"] for s in result["sessions"]])
    return ExitCode.OK


def _restore(client: Bastion, args: argparse.Namespace) -> int:
    info = client.sessions.restore(args.session_id, args.snapshot_id)
    if json_mode(args):
        write_json(sys.stdout, info)
    else:
        print_lines([f"{info['session_id']}  {info['status']}  (files of {args.snapshot_id})"])
    return ExitCode.OK


def _list(client: Bastion, args: argparse.Namespace) -> int:
    result = client.snapshots.list(limit=args.limit, cursor=args.cursor)
    note_next_page(result)
    if json_mode(args):
        write_json(sys.stdout, result)
        return ExitCode.OK
    snapshots = result["snapshots"]
    if args.quiet:
        print_lines([s["snapshot_id"] for s in snapshots])
        return ExitCode.OK
    if not snapshots:
        to_stderr("no snapshots")
        return ExitCode.OK
    rows = [
        [
            s["snapshot_id"],
            s["status"],
            format_time_ago(s["created_at"]),
            format_size(s["size_bytes"]),
            s["session_id"],
            s.get("name") or "-",
        ]
        for s in snapshots
    ]
    print_lines(
        table(
            ["SNAPSHOT", "STATUS", "CREATED", "SIZE", "SESSION", "NAME"],
            rows,
            right=["SIZE"],
            max_width=table_width(),
        )
    )
    return ExitCode.OK


def _get(client: Bastion, args: argparse.Namespace) -> int:
    _show(client.snapshots.get(args.snapshot_id), args)
    return ExitCode.OK


def _delete(client: Bastion, args: argparse.Namespace) -> int:
    deleted = [client.snapshots.delete(snapshot_id) for snapshot_id in args.snapshot_ids]
    if json_mode(args):
        write_json(sys.stdout, {"snapshots": deleted})
    else:
        print_lines([f"{d['snapshot_id']}  deleted" for d in deleted])
    return ExitCode.OK
