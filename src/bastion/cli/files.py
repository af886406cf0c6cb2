"""``bastion files``: upload, download (a file, or a tree with ``-r``), list, delete."""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from .._client import Bastion
from .._exceptions import (
    FileDeleteError,
    FileListError,
)
from .._local_tree import tree_size
from ..wire import (
    ErrorCode,
    FileList,
)
from .common import (
    RemotePath,
    Subparsers,
    add_command,
    add_group,
    add_page_options,
    json_mode,
    note_next_page,
    print_lines,
    remote_dir,
    remote_path,
    table_width,
    to_stderr,
)
from .errors import ExitCode, UsageError
from .format import (
    format_size,
    format_time_ago,
    table,
    write_json,
)
from .progress import CountingReader, CountingWriter, Progress

# --------------------------------------------------------------------------- files


def add_files(subparsers: Subparsers, common: list[argparse.ArgumentParser]) -> None:
    actions = add_group(
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

    upload = add_command(
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

    download = add_command(
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

    list_ = add_command(
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

    delete = add_command(
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
    return not json_mode(args) and not getattr(args, "no_progress", False)


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
    if json_mode(args):
        write_json(sys.stdout, result)
    else:
        size = format_size(result.get("size"))
        print_lines([f"uploaded {label} -> {target.session_id}:{result['path']} ({size})"])
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
    if json_mode(args):
        write_json(sys.stdout, result)
    else:
        moved = f"{result['files']} files, {format_size(result['bytes'])}"
        print_lines([f"uploaded {source} -> {target.session_id}:{result['path']} ({moved})"])
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
    if json_mode(args):
        write_json(sys.stdout, {"path": source.path, "entries": count, "local_path": dest})
    else:
        print_lines([f"downloaded {source} -> {dest} ({count} entries)"])
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
    if json_mode(args):
        write_json(sys.stdout, {"path": source.path, "size": size, "local_path": dest})
    else:
        print_lines([f"downloaded {source} -> {dest} ({format_size(size)})"])
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
    note_next_page(result)
    return ExitCode.OK


def _print_files(result: FileList, target: RemotePath, args: argparse.Namespace) -> None:
    if json_mode(args):
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
        to_stderr(f"{target}: empty directory")
        return
    print_lines(
        table(["MODE", "SIZE", "MODIFIED", "NAME"], rows, right=["SIZE"], max_width=table_width())
    )


def _files_delete(client: Bastion, args: argparse.Namespace) -> int:
    target: RemotePath = args.target
    try:
        result = client.files.delete(target.session_id, target.path, recursive=args.recursive)
    except FileDeleteError as exc:
        if exc.code == ErrorCode.DIRECTORY_NOT_EMPTY:
            exc.message = f"{target}: directory not empty (delete it with -r)"
        raise
    if json_mode(args):
        write_json(sys.stdout, result)
    else:
        print_lines([f"deleted {target.session_id}:{result.get('path', target.path)}"])
    return ExitCode.OK
