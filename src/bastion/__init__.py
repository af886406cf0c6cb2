"""Bastion: the Python SDK of a self-hosted sandboxed execution runtime.

    from bastion import Bastion

    with Bastion() as bastion:                       # $BASTION_URL, $BASTION_API_KEY
        sid = bastion.sessions.create()["session_id"]
        bastion.sessions.start(sid)
        bastion.files.upload(sid, b'print("hi")', "/main.py")
        result = bastion.jobs.run_and_wait(sid, ["python3", "/main.py"])
        print(result["output"]["console_output"])    # hi
        bastion.jobs.run_and_wait(sid, "ls -la", on_stdout=print)   # live output
        with bastion.terminal.connect(session_id=sid, on_message=print) as term:
            term.exec("echo hello")                  # a live shell
        bastion.sessions.delete(sid)

The same with asyncio: :class:`AsyncBastion` has every method of :class:`Bastion`
with the same names, arguments and results, as coroutines and async iterators::

    async with AsyncBastion() as bastion:
        sid = (await bastion.sessions.create())["session_id"]
        await bastion.sessions.start(sid)
        result = await bastion.jobs.run_and_wait(sid, "ls -la", on_stdout=print)
        async with bastion.terminal.connect(session_id=sid) as term:
            await term.exec("echo hello; exit")
            async for message in term:
                print(message)
        async with bastion.jobs.stream(sid, result["job_id"]) as events:
            async for event in events:
                print(event)

Responses are plain dicts typed by the ``TypedDict``s re-exported here (defined in
:mod:`bastion.wire`); every exception derives from :class:`BastionError`.

Timeouts and retries
--------------------
``Bastion(timeout=30.0, connect_timeout=5.0, max_retries=2)`` (the defaults; the
connect timeout is never more than ``timeout`` unless given).  ``timeout`` may be an
``httpx.Timeout``.  A failed request is retried, at most ``max_retries`` times, after
0.5 s, 1 s, 2 s ... (at most 8 s; up to a quarter less at random; a ``Retry-After``
of up to 60 s is followed instead) when repeating it is safe:

==============================================  =====================================
request                                         retried on
==============================================  =====================================
GETs (get, list, wait, health, download,        connection errors and 502/503/504
stream's first answer)
``sessions.create``                             the same, with one ``Idempotency-Key``
                                                for all attempts: one session at most
``sessions.start`` / ``stop`` / ``delete``      the same; a retry refused with
                                                ``session_state`` while the session is
                                                in the target state (the lost attempt
                                                did it) returns that state as success
``files.delete``                                the same; ``file_not_found`` after a
                                                lost attempt is success
``files.upload`` of bytes / bytearray /         the same (a PUT replaces the file)
memoryview
``files.upload`` of a file object or            only when the connection could not be
async iterable                                  opened (nothing was read or sent)
``jobs.run`` (POST .../jobs)                    only when the connection could not be
                                                opened: a repeat could run it twice
terminal connect, reads of a body in progress   never
==============================================  =====================================

"Connection errors" are refused or reset connections, a server that closed a kept
alive connection, connect and write timeouts.  A read timeout is not retried:
``timeout`` bounds how long a call waits for a slow answer.  Once retries are spent
(or not allowed) the error is raised as :class:`APIConnectionError`,
:class:`APITimeoutError` or the error response's class.

Lists and pages
---------------
The server answers ``GET /v1/sessions``, ``.../jobs`` and ``.../files`` a page at a
time: ``?limit=N`` items (1 to 1000; 100 when not given) in the list's fixed order
(sessions and jobs oldest first, files by the bytes of their names) and
``"next_cursor"``, which passed back as ``?cursor=`` gives the next page (null after
the last).  A cursor marks a place in that order, so items added while a list is read
never make another repeat or go missing.  The SDK does the paging:

    every = bastion.jobs.list(sid)["jobs"]          # all pages, one answer
    for job in bastion.jobs.iter_all(sid):          # page by page, as the loop goes
        print(job["job_id"], job["status"])
    page = bastion.jobs.list(sid, limit=50)         # one page of 50 ...
    rest = bastion.jobs.list(sid, limit=50, cursor=page["next_cursor"])  # ... and the next

``sessions`` and ``files`` have the same ``list`` and ``iter_all``.  A ``limit`` out
of range raises :class:`InvalidRequestError`; so does a cursor that is not one of the
list's own (code ``invalid_cursor``).

Directory trees
---------------
``files.upload_dir(sid, "./src", "/home/user/src")`` and ``files.download_dir(sid,
"/home/user/out", "./out")`` move a whole tree as one tar stream, made while the tree
is walked and extracted as it arrives: no side stages a copy (the server holds a few
MiB of it at most).  On the wire: ``POST /v1/sessions/{id}/files/archive?path=DIR``
with a tar body (plain, gzip, bzip2 or xz; answered ``{"path", "files",
"directories", "symlinks", "bytes"}``) and ``GET`` of the same URL (an
``application/x-tar`` of directories, regular files and symlinks, names relative to
``DIR``; mount points, special files and what the acting user cannot read are left
out).  An upload acts as the session's user (``user=root`` as its root) and, like a
single file's, counts against the upload size limit.  Members the server refuses
(``invalid_path``; the extraction stops there, earlier members stay): absolute names,
``..``, symlinks whose target is absolute or leads out of ``DIR``, hard links,
devices, FIFOs, and any member whose path goes through a symlink (one from the
archive or one the sandbox planted).  Neutralised: setuid, setgid and sticky bits
are dropped and the archive's owners ignored.  ``download_dir`` extracts with
:mod:`tarfile`'s ``"data"`` filter.  An upload is retried only when the connection
could not be opened.

The original server's API
-------------------------
The server also speaks the REST API of the first Bastion server (Go, Docker), which
the ``generated_client`` module of the public ``bastion-py-sdk`` 1.0.0 wheel is a
client of: ``GET /health``, ``POST /session/create``, ``POST /session/{id}/start``
and ``/stop``, ``GET /session/{id}/status``, ``DELETE /session/{id}``, ``POST
/session/{id}/exec`` (``{"cmd": [...]}``), ``GET /session/{id}/job/{job_id}``,
``POST /session/{id}/upload`` (multipart ``metadata`` then ``file``), ``GET
/session/{id}/list?path=&page=&limit=``, ``GET /session/{id}/download?path=``,
``DELETE /session/{id}/delete`` (``{"path": ...}``) and the WebSocket
``/session/{id}/terminal?api_token=KEY`` (messages ``init``, ``term_input``,
``term_output``, ``error``), in that API's shapes, on the same sessions, keys and
tenancy as ``/v1``.  Differences: errors are ``{"error": "<message>"}`` with the old
statuses (400 bad request or path, 401, 403 for what the session's state or a path's
type forbids, 404, 413, 429, 500); file paths are relative to the sandbox user's
home (the old ``/workspace``, where jobs start); an upload never replaces a file
(409, as before); each terminal connection gets a shell of its own; a plain ``GET``
of the terminal is answered 426.
"""

from ._async_terminal import AsyncTerminal
from ._base import __version__
from ._client import AsyncBastion, Bastion
from ._exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BastionError,
    FileDeleteError,
    FileDeleteNotFoundError,
    FileDownloadError,
    FileDownloadNotFoundError,
    FileError,
    FileListError,
    FileListNotFoundError,
    FileUploadError,
    FileUploadNotFoundError,
    ImageBuildError,
    ImageError,
    ImageNotFoundError,
    ImageStateError,
    InsufficientScopeError,
    InvalidCommandError,
    InvalidRecipeError,
    InvalidRequestError,
    JobError,
    JobFailedError,
    JobNotFoundError,
    JobStateError,
    JobTimeoutError,
    LocalFileError,
    NotFoundError,
    PathNotFoundError,
    QuotaExceededError,
    ServerError,
    ServerShutdownError,
    SessionError,
    SessionNotFoundError,
    SessionStartError,
    SessionStateError,
    SnapshotError,
    SnapshotNotFoundError,
    SnapshotStateError,
    TerminalAuthenticationError,
    TerminalConnectionError,
    TerminalError,
    TerminalForbiddenError,
    TerminalSendError,
    TerminalSessionNotFoundError,
    TerminalSessionStateError,
    TerminalTimeoutError,
)
from ._resources.jobs import AsyncJobEventStream, JobEventStream
from ._terminal import Terminal
from .wire import (
    ArchiveUploadResult,
    BuildImageRequest,
    CreatedKey,
    CreateKeyRequest,
    CreateSessionRequest,
    CreateSnapshotRequest,
    ErrorBody,
    ErrorCode,
    ErrorDetail,
    FileDeleteResult,
    FileEntry,
    FileList,
    FileUploadResult,
    ForkRequest,
    ForkResult,
    HealthInfo,
    ImageInfo,
    ImageList,
    JobEvent,
    JobInfo,
    JobLimitsRequest,
    JobList,
    JobOutput,
    JobResult,
    JobStatus,
    JobUsageInfo,
    KeyInfo,
    KeyList,
    KeyScope,
    KillJobRequest,
    NetworkInfo,
    NetworkRequest,
    Page,
    ProcessInfo,
    ProcessList,
    PullImageRequest,
    RestoreRequest,
    RunJobRequest,
    SessionImage,
    SessionInfo,
    SessionLimits,
    SessionList,
    SessionStatus,
    SessionUsage,
    SnapshotInfo,
    SnapshotList,
    SnapshotStatus,
    StdinResult,
    TerminalExit,
    TerminalInit,
    TerminalMessage,
)

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "ArchiveUploadResult",
    "AsyncBastion",
    "AsyncJobEventStream",
    "AsyncTerminal",
    "AuthenticationError",
    "Bastion",
    "BastionError",
    "BuildImageRequest",
    "CreateKeyRequest",
    "CreateSessionRequest",
    "CreateSnapshotRequest",
    "CreatedKey",
    "ErrorBody",
    "ErrorCode",
    "ErrorDetail",
    "FileDeleteError",
    "FileDeleteNotFoundError",
    "FileDeleteResult",
    "FileDownloadError",
    "FileDownloadNotFoundError",
    "FileEntry",
    "FileError",
    "FileList",
    "FileListError",
    "FileListNotFoundError",
    "FileUploadError",
    "FileUploadNotFoundError",
    "FileUploadResult",
    "ForkRequest",
    "ForkResult",
    "HealthInfo",
    "ImageBuildError",
    "ImageError",
    "ImageInfo",
    "ImageList",
    "ImageNotFoundError",
    "ImageStateError",
    "InsufficientScopeError",
    "InvalidCommandError",
    "InvalidRecipeError",
    "InvalidRequestError",
    "JobError",
    "JobEvent",
    "JobEventStream",
    "JobFailedError",
    "JobInfo",
    "JobLimitsRequest",
    "JobList",
    "JobNotFoundError",
    "JobOutput",
    "JobResult",
    "JobStateError",
    "JobStatus",
    "JobTimeoutError",
    "JobUsageInfo",
    "KeyInfo",
    "KeyList",
    "KeyScope",
    "KillJobRequest",
    "LocalFileError",
    "NetworkInfo",
    "NetworkRequest",
    "NotFoundError",
    "Page",
    "PathNotFoundError",
    "ProcessInfo",
    "ProcessList",
    "PullImageRequest",
    "QuotaExceededError",
    "RestoreRequest",
    "RunJobRequest",
    "ServerError",
    "ServerShutdownError",
    "SessionError",
    "SessionImage",
    "SessionInfo",
    "SessionLimits",
    "SessionList",
    "SessionNotFoundError",
    "SessionStartError",
    "SessionStateError",
    "SessionStatus",
    "SessionUsage",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotList",
    "SnapshotNotFoundError",
    "SnapshotStateError",
    "SnapshotStatus",
    "StdinResult",
    "Terminal",
    "TerminalAuthenticationError",
    "TerminalConnectionError",
    "TerminalError",
    "TerminalExit",
    "TerminalForbiddenError",
    "TerminalInit",
    "TerminalMessage",
    "TerminalSendError",
    "TerminalSessionNotFoundError",
    "TerminalSessionStateError",
    "TerminalTimeoutError",
    "__version__",
]
