"""``bastion sessions``, ``bastion files`` and ``bastion jobs``: the client commands.

Each command is a function ``(client, args) -> exit status`` set as the ``runner``
default of its sub-parser; :func:`bastion.cli.main` creates the client and turns an
exception that escapes into ``bastion: <message> (<code>)`` and an exit status (see
:mod:`bastion._cli_errors`).  Output goes to ``sys.stdout`` as looked up at call
time: a table or a record for people, the server's JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import shutil
import stat
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any, NamedTuple, TypeAlias, TypeVar, cast

from ._cli_errors import ExitCode, UsageError
from ._cli_format import (
    command_text,
    format_duration,
    format_size,
    format_time_ago,
    job_details,
    job_duration,
    job_exit_text,
    metadata_text,
    network_text,
    number_text,
    parse_duration,
    session_details,
    table,
    write_json,
    write_text,
)
from ._cli_keys import add_keys_command
from ._cli_progress import CountingReader, CountingWriter, Progress
from ._client import Bastion
from ._exceptions import (
    APITimeoutError,
    FileDeleteError,
    FileListError,
    JobFailedError,
    SessionNotFoundError,
)
from ._local_tree import tree_size
from .wire import (
    FINAL_JOB_STATUSES,
    MAX_PAGE_SIZE,
    ErrorCode,
    ExpiryAction,
    FileList,
    JobEvent,
    JobInfo,
    JobList,
    NetworkRequest,
    Page,
    SessionInfo,
    SessionLimits,
    SessionList,
    SessionStatus,
)

__all__ = [
    "CLIENT_COMMANDS",
    "Runner",
    "add_client_commands",
    "add_connection_options",
    "add_job_options",
    "connection_options",
    "duration",
    "job_command",
    "key_value",
    "output_options",
]

#: Does its own output and returns the exit status.
Runner = Callable[[Bastion, argparse.Namespace], int]

CLIENT_COMMANDS = frozenset({"sessions", "files", "jobs", "keys"})

#: ``jobs logs`` without ``-f`` on a job that still runs prints what the server
#: replays, and stops once nothing more has come for this long.
LOGS_QUIET_SECONDS = 0.5

_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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


def _note_next_page(page: Page) -> None:
    """Where the rest of a list starts, on stderr (the JSON output has it too)."""
    if page.get("next_cursor"):
        _stderr(f"more: --cursor {page['next_cursor']}")


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


def _parser(
    actions: _Subparsers,
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


def _group(
    subparsers: _Subparsers, name: str, *, help: str, description: str, examples: Sequence[str]
) -> _Subparsers:
    group = subparsers.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 88),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions: _Subparsers = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    return actions


def add_client_commands(subparsers: _Subparsers) -> None:
    """Add ``sessions``, ``files`` and ``jobs`` with all their actions."""
    common = [connection_options(), output_options()]
    _add_sessions(subparsers, common)
    _add_files(subparsers, common)
    _add_jobs(subparsers, common)
    add_keys_command(subparsers, common)


# --------------------------------------------------------------------------- output


def _json_mode(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _print_lines(lines: Sequence[str]) -> None:
    if lines:
        write_text(sys.stdout, "\n".join(lines) + "\n")


def _table_width() -> int | None:
    """The terminal's width when stdout is one (tables are cut to fit), else none."""
    try:
        if sys.stdout.isatty():
            return shutil.get_terminal_size((100, 24)).columns
    except (AttributeError, ValueError):
        pass
    return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- sessions


def _add_sessions(subparsers: _Subparsers, common: list[argparse.ArgumentParser]) -> None:
    actions = _group(
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

    create = _parser(
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
    create.add_argument("--start", action="store_true", help="start the session right away")
    create.add_argument("-q", "--quiet", action="store_true", help="print only the session id")
    create.set_defaults(runner=_sessions_create)

    list_ = _parser(
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

    for name, summary, description, example in (
        (
            "status",
            "show a session",
            "Show a session: its state, limits, timeouts, network and labels, and what "
            "it uses now (CPU time, memory, processes, disk) while it runs.",
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
        action = _parser(
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

    prune = _parser(
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
    )
    if args.start:
        try:
            info = client.sessions.start(info["session_id"])
        except BaseException:
            _stderr(f"bastion: session {info['session_id']} was created but not started")
            raise
    _show_session(info, args)
    return ExitCode.OK


def _show_session(info: SessionInfo, args: argparse.Namespace) -> None:
    if _json_mode(args):
        write_json(sys.stdout, info)
    elif getattr(args, "quiet", False):
        _print_lines([info["session_id"]])
    else:
        _print_lines(session_details(info))


def _sessions_list(client: Bastion, args: argparse.Namespace) -> int:
    result = client.sessions.list(limit=args.limit, cursor=args.cursor)
    if args.status:
        result = {
            **result,
            "sessions": [s for s in result["sessions"] if s.get("status") == args.status],
        }
    _print_sessions(result, args)
    _note_next_page(result)
    return ExitCode.OK


def _print_sessions(result: SessionList, args: argparse.Namespace) -> None:
    sessions = result["sessions"]
    if _json_mode(args):
        write_json(sys.stdout, result)
        return
    if args.quiet:
        _print_lines([s["session_id"] for s in sessions])
        return
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
    if not rows:
        _stderr("no sessions")
        return
    _print_lines(
        table(
            ["SESSION", "STATUS", "CREATED", "MEMORY", "PIDS", "CPUS", "NETWORK", "METADATA"],
            rows,
            right=["MEMORY", "PIDS", "CPUS"],
            max_width=_table_width(),
        )
    )


def _delete_sessions(client: Bastion, args: argparse.Namespace, ids: Sequence[str]) -> int:
    """Delete ``ids``, one line each (a session gone meanwhile is skipped)."""
    deleted: list[str] = []
    for session_id in ids:
        try:
            client.sessions.delete(session_id)
        except SessionNotFoundError:
            continue
        deleted.append(session_id)
        if not _json_mode(args):
            _print_lines([f"{session_id}  deleted"])
    if _json_mode(args):
        write_json(sys.stdout, {"deleted": deleted})
    elif not deleted:
        _stderr("no sessions to delete")
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
        if _json_mode(args) or name == "status":
            _show_session(info, args)
        else:
            _print_lines([f"{info.get('session_id', args.session_id)}  {info.get('status')}"])
        return ExitCode.OK

    return run


# --------------------------------------------------------------------------- files


def _add_files(subparsers: _Subparsers, common: list[argparse.ArgumentParser]) -> None:
    actions = _group(
        subparsers,
        "files",
        help="copy files in and out of a session, list and delete them",
        description="Move files in and out of a running session, cp-style: the remote side "
        "is written SESSION:/path, and - is stdin or stdout. A progress bar is drawn on "
        "stderr for large transfers when it is a terminal.",
        examples=[
            "bastion files upload data.csv $SID:/home/user/",
            "bastion files download $SID:/home/user/data.csv copy.csv",
            "bastion files list $SID:/home/user",
        ],
    )
    no_progress = argparse.ArgumentParser(add_help=False)
    no_progress.add_argument("--no-progress", action="store_true", help="never draw a progress bar")

    upload = _parser(
        actions,
        "upload",
        help="copy a local file (or stdin) into a session",
        description="Copy LOCAL (- for stdin) to SESSION:/path, creating parent "
        "directories and replacing an existing file. A path ending in / or naming an "
        "existing directory receives the file under its local name. The file is "
        "streamed, never read whole into memory.",
        examples=[
            "echo 'print(\"hi\")' > hello.py",
            "bastion files upload hello.py $SID:/home/user/hello.py",
            "bastion files upload hello.py $SID:/home/user/",
            "tar czf - . | bastion files upload - $SID:/tmp/src.tar.gz",
            "bastion files upload -r ./src $SID:/home/user/src",
        ],
        parents=[*common, no_progress],
    )
    upload.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="upload a directory tree: LOCAL's content goes into SESSION:/path (made if "
        "missing), streamed as one tar",
    )
    upload.add_argument("source", metavar="LOCAL", help="a local file, or - for stdin")
    upload.add_argument("dest", metavar="SESSION:/path", type=remote_path)
    upload.set_defaults(runner=_files_upload)

    download = _parser(
        actions,
        "download",
        help="copy a file out of a session (or to stdout)",
        description="Copy SESSION:/path to LOCAL (- for stdout; default: the file's name in "
        "the current directory). An existing directory receives the file under its "
        "remote name. The file is written under a temporary name and renamed when "
        "complete, so a failed download leaves an existing file untouched.",
        examples=[
            "bastion files download $SID:/etc/os-release os-release",
            "bastion files download $SID:/etc/os-release .",
            "bastion files download $SID:/etc/os-release - | head -n 2",
            "bastion files download -r $SID:/home/user/out ./out",
        ],
        parents=[*common, no_progress],
    )
    download.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="download a directory tree: its content goes into LOCAL (default: the "
        "directory's name in the current directory), made if missing",
    )
    download.add_argument("source", metavar="SESSION:/path", type=remote_path)
    download.add_argument(
        "dest", metavar="LOCAL", nargs="?", default=".", help="a local path, or - for stdout"
    )
    download.set_defaults(runner=_files_download)

    list_ = _parser(
        actions,
        "list",
        help="list a directory in a session",
        description="List a directory of a running session (default: /).",
        examples=[
            "bastion files list $SID:/etc",
            "bastion files list $SID:/home/user --json",
        ],
        parents=common,
    )
    list_.add_argument("target", metavar="SESSION[:/path]", type=remote_dir)
    add_page_options(list_, "entries")
    list_.set_defaults(runner=_files_list)

    delete = _parser(
        actions,
        "delete",
        help="delete a file or directory in a session",
        description="Delete a file, or an empty directory (any directory with -r).",
        examples=[
            "bastion files delete $SID:/home/user/hello.py",
            "bastion files delete -r $SID:/home/user/build",
        ],
        parents=common,
    )
    delete.add_argument("target", metavar="SESSION:/path", type=remote_path)
    delete.add_argument(
        "-r", "--recursive", action="store_true", help="delete a directory and all it holds"
    )
    delete.set_defaults(runner=_files_delete)


def _progress_allowed(args: argparse.Namespace) -> bool:
    return not _json_mode(args) and not getattr(args, "no_progress", False)


def _remote_is_dir(client: Bastion, session_id: str, path: str) -> bool:
    try:
        client.files.list(session_id, path, limit=1)  # one page is enough to tell
    except FileListError:  # no such path, or a file: the upload names the file
        return False
    return True


def _files_upload(client: Bastion, args: argparse.Namespace) -> int:
    target: RemotePath = args.dest
    remote = target.path
    source: str = args.source
    if args.recursive:
        return _upload_tree(client, args, source, target)
    if source == "-":
        if remote.endswith("/"):
            raise UsageError(
                "uploading stdin needs a file name: SESSION:/dir/name, not a directory"
            )
        stdin = sys.stdin.buffer
        return _upload(client, args, stdin, None, "stdin", target)
    if os.path.isdir(source):
        raise IsADirectoryError(21, "Is a directory (upload it with -r)", source)
    with open(source, "rb") as fileobj:
        info = os.fstat(fileobj.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory (upload it with -r)", source)
        name = os.path.basename(source.rstrip(os.sep))
        if remote.endswith("/") or _remote_is_dir(client, target.session_id, remote):
            remote = remote.rstrip("/") + "/" + name
        total = info.st_size if stat.S_ISREG(info.st_mode) else None
        return _upload(client, args, fileobj, total, source, RemotePath(target.session_id, remote))


def _upload(
    client: Bastion,
    args: argparse.Namespace,
    fileobj: IO[bytes],
    total: int | None,
    label: str,
    target: RemotePath,
) -> int:
    progress = Progress.for_stream(
        posixpath.basename(target.path) or target.path,
        total,
        sys.stderr,
        allowed=_progress_allowed(args),
    )
    try:
        result = client.files.upload(
            target.session_id, CountingReader(fileobj, progress), target.path
        )
    finally:
        progress.finish()
    if _json_mode(args):
        write_json(sys.stdout, result)
    else:
        size = format_size(result.get("size"))
        _print_lines([f"uploaded {label} -> {target.session_id}:{result['path']} ({size})"])
    return ExitCode.OK


def _remote_size(client: Bastion, target: RemotePath) -> int | None:
    """The size of a remote file, from a listing of its directory (for the bar)."""
    parent, name = posixpath.split(target.path.rstrip("/"))
    try:
        listing = client.files.list(target.session_id, parent or "/")
    except FileListError:
        return None
    for entry in listing["files"]:
        if entry.get("name") == name and isinstance(entry.get("size"), int):
            return entry["size"]
    return None


def _upload_tree(client: Bastion, args: argparse.Namespace, source: str, target: RemotePath) -> int:
    if source == "-":
        raise UsageError("-r uploads a local directory, not stdin")
    total = tree_size(source) if _progress_allowed(args) and sys.stderr.isatty() else None
    label = os.path.basename(source.rstrip(os.sep)) or source
    result = _with_progress(
        args,
        label,
        total,
        lambda progress: client.files.upload_dir(
            target.session_id, source, target.path, progress=progress
        ),
    )
    if _json_mode(args):
        write_json(sys.stdout, result)
    else:
        moved = f"{result['files']} files, {format_size(result['bytes'])}"
        _print_lines([f"uploaded {source} -> {target.session_id}:{result['path']} ({moved})"])
    return ExitCode.OK


_T = TypeVar("_T")


def _with_progress(
    args: argparse.Namespace, label: str, total: int | None, transfer: Callable[[Any], _T]
) -> _T:
    """Run ``transfer`` with an SDK ``progress`` callback (bytes so far) drawing a bar."""
    bar = Progress.for_stream(label, total, sys.stderr, allowed=_progress_allowed(args))
    try:
        return transfer(lambda done: bar.update(done - bar.done))
    finally:
        bar.finish()


def _download_tree(client: Bastion, args: argparse.Namespace, source: RemotePath) -> int:
    dest: str = args.dest
    name = posixpath.basename(source.path.rstrip("/"))
    if dest == "-":
        raise UsageError("-r downloads into a local directory, not stdout")
    if dest == "." and name:
        dest = name
    count = _with_progress(
        args,
        name or source.path,
        None,
        lambda progress: client.files.download_dir(
            source.session_id, source.path, dest, progress=progress
        ),
    )
    if _json_mode(args):
        write_json(sys.stdout, {"path": source.path, "entries": count, "local_path": dest})
    else:
        _print_lines([f"downloaded {source} -> {dest} ({count} entries)"])
    return ExitCode.OK


def _files_download(client: Bastion, args: argparse.Namespace) -> int:
    source: RemotePath = args.source
    if args.recursive:
        return _download_tree(client, args, source)
    dest: str = args.dest
    name = posixpath.basename(source.path.rstrip("/"))
    progress_allowed = _progress_allowed(args)
    total = None
    if progress_allowed and sys.stderr.isatty():
        total = _remote_size(client, source)
    progress = Progress.for_stream(name or source.path, total, sys.stderr, allowed=progress_allowed)

    chunks = client.files.iter_download(source.session_id, source.path)
    with _closing(chunks):
        first = next(chunks, None)  # sends the request: errors come before any write
        if dest == "-":
            out = sys.stdout.buffer
            sys.stdout.flush()
            try:
                size = _copy(first, chunks, CountingWriter(out, progress))
            finally:
                progress.finish()
            out.flush()
            return ExitCode.OK
        if os.path.isdir(dest):
            if not name:
                raise UsageError(f"{source}: no file name to save it under; give LOCAL")
            dest = os.path.join(dest, name)
        try:
            size = _write_file(dest, first, chunks, progress)
        finally:
            progress.finish()
    if _json_mode(args):
        write_json(sys.stdout, {"path": source.path, "size": size, "local_path": dest})
    else:
        _print_lines([f"downloaded {source} -> {dest} ({format_size(size)})"])
    return ExitCode.OK


@contextlib.contextmanager
def _closing(iterator: Iterator[bytes]) -> Iterator[None]:
    """Close a generator however the block ends (its HTTP response is released)."""
    try:
        yield
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            close()


def _copy(first: bytes | None, rest: Iterator[bytes], out: CountingWriter) -> int:
    size = 0
    if first:
        out.write(first)
        size += len(first)
    for chunk in rest:
        out.write(chunk)
        size += len(chunk)
    return size


def _write_file(dest: str, first: bytes | None, rest: Iterator[bytes], progress: Progress) -> int:
    """Write to a temporary file beside ``dest`` and rename it into place when done."""
    directory = os.path.dirname(dest) or "."
    try:
        mode = stat.S_IMODE(os.stat(dest).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fileobj:
            size = _copy(first, rest, CountingWriter(fileobj, progress))
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size


def _files_list(client: Bastion, args: argparse.Namespace) -> int:
    target: RemotePath = args.target
    result = client.files.list(target.session_id, target.path, limit=args.limit, cursor=args.cursor)
    _print_files(result, target, args)
    _note_next_page(result)
    return ExitCode.OK


def _print_files(result: FileList, target: RemotePath, args: argparse.Namespace) -> None:
    if _json_mode(args):
        write_json(sys.stdout, result)
        return
    entries = sorted(result["files"], key=lambda e: str(e.get("name", "")))
    rows = [
        [
            str(e.get("mode", "-")),
            format_size(e.get("size")),
            format_time_ago(e.get("modified_at")),
            str(e.get("name", "")) + ("/" if e.get("type") == "directory" else ""),
        ]
        for e in entries
    ]
    if not rows:
        _stderr(f"{target}: empty directory")
        return
    _print_lines(
        table(["MODE", "SIZE", "MODIFIED", "NAME"], rows, right=["SIZE"], max_width=_table_width())
    )


def _files_delete(client: Bastion, args: argparse.Namespace) -> int:
    target: RemotePath = args.target
    try:
        result = client.files.delete(target.session_id, target.path, recursive=args.recursive)
    except FileDeleteError as exc:
        if exc.code == ErrorCode.DIRECTORY_NOT_EMPTY:
            exc.message = f"{target}: directory not empty (delete it with -r)"
        raise
    if _json_mode(args):
        write_json(sys.stdout, result)
    else:
        _print_lines([f"deleted {target.session_id}:{result.get('path', target.path)}"])
    return ExitCode.OK


# --------------------------------------------------------------------------- jobs


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """SESSION, the command after ``--`` and the job's options (``jobs run``, ``exec``)."""
    parser.add_argument("session_id", metavar="SESSION")
    parser.add_argument("argv", nargs="+", metavar="CMD", help="the command and its arguments")
    parser.add_argument("--shell", action="store_true", help="run the words with /bin/sh -c")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=key_value,
        help="an environment variable for the command (repeatable)",
    )
    parser.add_argument("--cwd", metavar="DIR", help="working directory in the session")
    parser.add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help="server-side time limit: the job's processes are killed after it",
    )
    parser.add_argument(
        "--wait-timeout",
        type=duration,
        metavar="DURATION",
        help="give up waiting after this long (the job keeps running)",
    )


def job_command(args: argparse.Namespace) -> str | list[str]:
    return " ".join(args.argv) if args.shell else list(args.argv)


def _add_jobs(subparsers: _Subparsers, common: list[argparse.ArgumentParser]) -> None:
    actions = _group(
        subparsers,
        "jobs",
        help="run commands in a session and inspect them",
        description="Run commands (jobs) in a running session, list them, wait for them and "
        "print their output. (bastion exec runs one and streams its output live.)",
        examples=[
            "bastion jobs run $SID -- python3 -c 'print(6 * 7)'",
            "JOB=$(bastion jobs run --no-wait -q $SID -- sleep 1)",
            "bastion jobs wait $SID $JOB",
            "bastion jobs logs -f $SID $JOB",
        ],
    )

    run = _parser(
        actions,
        "run",
        help="run a command and print its output",
        description="Run a command in a session, wait for it and print its output (stdout "
        "here, stderr on stderr). Exits 0 if the job completed, 1 if it failed (with its "
        "exit status and failure reason on stderr). Put the command after --. With "
        "--no-wait, print the queued job (or with -q its id) and return at once.",
        examples=[
            "bastion jobs run $SID -- python3 -c 'print(6 * 7)'",
            "bastion jobs run $SID --shell -- 'ls / | wc -l'",
            "bastion jobs run $SID --env MODE=fast --cwd /tmp -- sh -c 'echo $MODE; pwd'",
            "bastion jobs run $SID --timeout 5s -- sleep 1",
            "JOB=$(bastion jobs run --no-wait -q $SID -- sleep 1)",
            "bastion jobs run $SID --json -- uname -a",
        ],
        parents=common,
    )
    add_job_options(run)
    run.add_argument("--no-wait", action="store_true", help="print the queued job and exit")
    run.add_argument(
        "-q", "--quiet", action="store_true", help="with --no-wait: print only the job id"
    )
    run.set_defaults(runner=_jobs_run)

    list_ = _parser(
        actions,
        "list",
        help="list a session's jobs",
        description="List a session's jobs, oldest first.",
        examples=[
            "bastion jobs list $SID",
            "bastion jobs list $SID -q",
            "bastion jobs list $SID --json",
        ],
        parents=common,
    )
    list_.add_argument("session_id", metavar="SESSION")
    list_.add_argument("-q", "--quiet", action="store_true", help="print only the job ids")
    add_page_options(list_, "jobs")
    list_.set_defaults(runner=_jobs_list)

    get = _parser(
        actions,
        "get",
        help="show a job",
        description="Show a job: its state, exit status, failure reason, times and the "
        "size of its output (bastion jobs logs prints the output).",
        examples=["bastion jobs get $SID $JOB", "bastion jobs get $SID $JOB --json"],
        parents=common,
    )
    get.add_argument("session_id", metavar="SESSION")
    get.add_argument("job_id", metavar="JOB")
    get.set_defaults(runner=_jobs_get)

    wait = _parser(
        actions,
        "wait",
        help="wait for a job to end",
        description="Wait until a job has ended and show it. Exits 0 if it completed, 1 if "
        "it failed, 7 if --timeout passed first (the job keeps running).",
        examples=["bastion jobs wait $SID $JOB", "bastion jobs wait $SID $JOB --timeout 30s"],
        parents=common,
    )
    wait.add_argument("session_id", metavar="SESSION")
    wait.add_argument("job_id", metavar="JOB")
    wait.add_argument("--timeout", type=duration, metavar="DURATION", help="wait at most this long")
    wait.set_defaults(runner=_jobs_wait)

    logs = _parser(
        actions,
        "logs",
        help="print a job's output (-f: follow it live)",
        description="Print a job's output, stdout here and stderr on stderr, in the order it "
        "was written. With -f, follow a running job until it ends. Without -f, a job that "
        "still runs shows its output so far. With --json, print the job's events as "
        "JSON lines. Exits 0 once the output is printed, whatever the job's status "
        "(bastion jobs wait tells that).",
        examples=[
            "bastion jobs logs $SID $JOB",
            "bastion jobs logs -f $SID $JOB",
            "bastion jobs logs $SID $JOB --json",
        ],
        parents=common,
    )
    logs.add_argument("session_id", metavar="SESSION")
    logs.add_argument("job_id", metavar="JOB")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="follow the output until the job ends"
    )
    logs.set_defaults(runner=_jobs_logs)


def _job_failed_line(job: Mapping[str, Any]) -> str:
    parts = [f"bastion: job {job.get('job_id')} failed"]
    exit_text = job_exit_text(job)
    if exit_text != "-":
        parts.append(f"with exit status {exit_text}")
    parts.append(f"({job.get('failure_reason') or 'job_failed'})")
    return " ".join(parts)


def _jobs_run(client: Bastion, args: argparse.Namespace) -> int:
    command = job_command(args)
    env = dict(args.env) if args.env else None
    if args.no_wait:
        job = client.jobs.run(args.session_id, command, env=env, cwd=args.cwd, timeout=args.timeout)
        if _json_mode(args):
            write_json(sys.stdout, job)
        elif args.quiet:
            _print_lines([job["job_id"]])
        else:
            _print_lines(job_details(job))
        return ExitCode.OK
    try:
        job = client.jobs.run_and_wait(
            args.session_id,
            command,
            env=env,
            cwd=args.cwd,
            timeout=args.timeout,
            wait_timeout=args.wait_timeout,
        )
    except JobFailedError as exc:
        _print_job_output(exc.result, args)
        _stderr(_job_failed_line(exc.result))
        return ExitCode.FAILED
    _print_job_output(job, args)
    return ExitCode.OK


def _print_job_output(job: JobInfo, args: argparse.Namespace) -> None:
    if _json_mode(args):
        write_json(sys.stdout, job)
        return
    output = job.get("output")
    if output:
        if output.get("console_output"):
            write_text(sys.stdout, output["console_output"])
        if output.get("errout"):
            write_text(sys.stderr, output["errout"])


def _jobs_list(client: Bastion, args: argparse.Namespace) -> int:
    result = client.jobs.list(args.session_id, limit=args.limit, cursor=args.cursor)
    _print_jobs(result, args)
    _note_next_page(result)
    return ExitCode.OK


def _print_jobs(result: JobList, args: argparse.Namespace) -> None:
    if _json_mode(args):
        write_json(sys.stdout, result)
        return
    jobs = result["jobs"]
    if args.quiet:
        _print_lines([j["job_id"] for j in jobs])
        return
    if not jobs:
        _stderr(f"no jobs in session {args.session_id}")
        return
    rows = []
    for j in jobs:
        status = str(j.get("status", "-"))
        reason = j.get("failure_reason")
        if reason and reason != "nonzero_exit":
            status += f" ({reason})"
        rows.append(
            [
                j["job_id"],
                status,
                format_time_ago(j.get("created_at")),
                format_duration(job_duration(j)),
                command_text(j.get("command")),
            ]
        )
    _print_lines(
        table(
            ["JOB", "STATUS", "CREATED", "DURATION", "COMMAND"],
            rows,
            right=["DURATION"],
            max_width=_table_width(),
        )
    )


def _show_job(job: JobInfo, args: argparse.Namespace) -> None:
    if _json_mode(args):
        write_json(sys.stdout, job)
    else:
        _print_lines(job_details(job))


def _jobs_get(client: Bastion, args: argparse.Namespace) -> int:
    _show_job(client.jobs.get(args.session_id, args.job_id), args)
    return ExitCode.OK


def _jobs_wait(client: Bastion, args: argparse.Namespace) -> int:
    try:
        job = client.jobs.wait(args.session_id, args.job_id, timeout=args.timeout)
    except JobFailedError as exc:
        _show_job(exc.result, args)
        _stderr(_job_failed_line(exc.result))
        return ExitCode.FAILED
    _show_job(job, args)
    return ExitCode.OK


def _jobs_logs(client: Bastion, args: argparse.Namespace) -> int:
    json_mode = _json_mode(args)

    def emit(event: JobEvent) -> None:
        if json_mode:
            write_json(sys.stdout, event, indent=None)
        elif event["type"] == "stdout":
            write_text(sys.stdout, event.get("data", ""))
        elif event["type"] == "stderr":
            write_text(sys.stderr, event.get("data", ""))

    job = client.jobs.get(args.session_id, args.job_id)
    if args.follow or job["status"] in FINAL_JOB_STATUSES:
        with client.jobs.stream(args.session_id, args.job_id) as events:
            for event in events:
                emit(event)
        return ExitCode.OK
    # Still running and not followed: what the server replays, until it goes quiet.
    replay = client.jobs._iter_events(args.session_id, args.job_id, LOGS_QUIET_SECONDS)
    try:
        for event in replay:
            emit(event)
    except APITimeoutError:
        pass
    finally:
        replay.close()
    return ExitCode.OK
