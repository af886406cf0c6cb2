"""The wire contract between the Bastion SDK and the Bastion server.

Everything that crosses the network is described here, once: URL paths, request and
response shapes (as ``TypedDict``s, because the SDK returns plain dicts), session and
job states, and the table of machine-readable error codes with the HTTP status each
one travels with.  The server imports this module to build its responses; the SDK
imports it to parse them.  Neither side defines a shape of its own, so they cannot
drift apart.

This module has no dependencies beyond the standard library.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

# pydantic (the server's validation) accepts only typing_extensions' TypedDict before 3.12
from typing_extensions import NotRequired, TypedDict  # noqa: UP035

API_PREFIX = "/v1"

#: Header carrying an idempotency key on create requests (safe retries).
IDEMPOTENCY_HEADER = "Idempotency-Key"


class SessionStatus(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    #: Every process frozen (memory kept, no CPU); ``resume`` makes it running again.
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


#: Job states after which nothing about the job changes any more.
FINAL_JOB_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})

SessionStatusName = Literal["created", "running", "paused", "stopped", "deleted"]
JobStatusName = Literal["queued", "running", "completed", "failed"]
FileType = Literal["file", "directory", "symlink", "other"]


# --------------------------------------------------------------------------- errors


#: Who a file operation acts as inside the session.
FileUser = Literal["user", "root"]


class ErrorCode(StrEnum):
    """Every machine-readable error code the server sends.

    The body of every error response is ``{"error": {"code": ..., "message": ...}}``.
    """

    # generic request problems
    INVALID_REQUEST = "invalid_request"
    MALFORMED_JSON = "malformed_json"
    UNAUTHORIZED = "unauthorized"
    #: A keyless server was asked under a ``Host`` (or ``Origin``) that is not loopback.
    FORBIDDEN_HOST = "forbidden_host"
    #: A JSON body over the server's ``--max-json-bytes``.
    REQUEST_TOO_LARGE = "request_too_large"
    #: The request body stopped arriving for ``--body-timeout`` seconds.
    REQUEST_TIMEOUT = "request_timeout"
    #: The key (or the server) has as many requests in flight as it may.
    TOO_MANY_REQUESTS = "too_many_requests"
    #: The key is valid but its scope does not allow this (a viewer writing, an agent
    #: managing keys).
    INSUFFICIENT_SCOPE = "insufficient_scope"
    #: The key (its tenant) or the server is at a quota: sessions, running sessions or
    #: running jobs (``bastion serve --max-*-per-key``...).  Nothing was created.
    QUOTA_EXCEEDED = "quota_exceeded"
    #: A list's ``cursor`` is not one of its own ``next_cursor`` values.
    INVALID_CURSOR = "invalid_cursor"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL_ERROR = "internal_error"
    #: The server began to shut down while it held the request (a job ``wait``), or
    #: before it could start what was asked (a job, a terminal).  Retry once it is back.
    SERVER_SHUTDOWN = "server_shutdown"
    # sessions
    SESSION_NOT_FOUND = "session_not_found"
    SESSION_STATE = "session_state"
    #: An upload or download ended unfinished because its session was stopped or
    #: deleted meanwhile (nothing of an upload is written).
    SESSION_STOPPED = "session_stopped"
    SESSION_START_FAILED = "session_start_failed"
    #: The session is paused: resume it before running jobs or terminals or using files.
    SESSION_PAUSED = "session_paused"
    # snapshots
    SNAPSHOT_NOT_FOUND = "snapshot_not_found"
    #: The snapshot is not ready (still being made, or failed) for what was asked.
    SNAPSHOT_STATE = "snapshot_state"
    LIMIT_EXCEEDED = "limit_exceeded"
    # images
    IMAGE_NOT_FOUND = "image_not_found"
    #: The image cannot do this now: it is not ready (building, failed) for a session,
    #: or sessions (or images built over it) still use it for a delete.
    IMAGE_STATE = "image_state"
    #: A recipe that cannot be built as written; the message names the key.
    INVALID_RECIPE = "invalid_recipe"
    # jobs
    JOB_NOT_FOUND = "job_not_found"
    INVALID_COMMAND = "invalid_command"
    #: The job cannot do this now: stdin written to a job that ended, or that was not
    #: started with ``"stdin": true`` (or whose stdin was closed); a kill of an ended job.
    JOB_STATE = "job_state"
    # files
    INVALID_PATH = "invalid_path"
    FILE_NOT_FOUND = "file_not_found"
    NOT_A_DIRECTORY = "not_a_directory"
    IS_A_DIRECTORY = "is_a_directory"
    DIRECTORY_NOT_EMPTY = "directory_not_empty"
    FILE_TOO_LARGE = "file_too_large"
    DISK_FULL = "disk_full"
    FILE_OPERATION_FAILED = "file_operation_failed"
    PERMISSION_DENIED = "permission_denied"


#: The HTTP status each error code is sent with.
ERROR_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.MALFORMED_JSON: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN_HOST: 403,
    ErrorCode.REQUEST_TOO_LARGE: 413,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.TOO_MANY_REQUESTS: 429,
    ErrorCode.INSUFFICIENT_SCOPE: 403,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.INVALID_CURSOR: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.SERVER_SHUTDOWN: 503,
    ErrorCode.SESSION_NOT_FOUND: 404,
    ErrorCode.SESSION_STATE: 409,
    ErrorCode.SESSION_STOPPED: 409,
    ErrorCode.SESSION_START_FAILED: 500,
    ErrorCode.SESSION_PAUSED: 409,
    ErrorCode.SNAPSHOT_NOT_FOUND: 404,
    ErrorCode.SNAPSHOT_STATE: 409,
    ErrorCode.IMAGE_NOT_FOUND: 404,
    ErrorCode.IMAGE_STATE: 409,
    ErrorCode.INVALID_RECIPE: 400,
    ErrorCode.LIMIT_EXCEEDED: 422,
    ErrorCode.JOB_NOT_FOUND: 404,
    ErrorCode.INVALID_COMMAND: 422,
    ErrorCode.JOB_STATE: 409,
    ErrorCode.INVALID_PATH: 422,
    ErrorCode.FILE_NOT_FOUND: 404,
    ErrorCode.NOT_A_DIRECTORY: 409,
    ErrorCode.IS_A_DIRECTORY: 409,
    ErrorCode.DIRECTORY_NOT_EMPTY: 409,
    ErrorCode.FILE_TOO_LARGE: 413,
    ErrorCode.DISK_FULL: 507,
    ErrorCode.FILE_OPERATION_FAILED: 500,
    ErrorCode.PERMISSION_DENIED: 403,
}


class ErrorDetail(TypedDict):
    code: str
    message: str


class ErrorBody(TypedDict):
    error: ErrorDetail


# --------------------------------------------------------------------------- pages
#
# Every list (``GET /v1/sessions``, ``.../jobs``, ``.../files``) answers one page:
# ``?limit=N`` items at most (1 to MAX_PAGE_SIZE, default DEFAULT_PAGE_SIZE), in the
# list's fixed order, and ``next_cursor``.  Passing that back as ``?cursor=`` gives
# the items after the last one of the page: a cursor names a position in the order, not
# an offset, so items added or removed meanwhile never make one repeat or be skipped.
# ``next_cursor`` is null on the last page.  A cursor is opaque and works only for
# the list that made it (else 400 ``invalid_cursor``); a bad ``limit`` is 422.

#: Items in one page of a list whose request names no ``limit``.
DEFAULT_PAGE_SIZE = 100
#: The largest ``limit`` a list accepts.
MAX_PAGE_SIZE = 1000


class Page(TypedDict):
    """What every page of a list has besides its items (under the list's own key)."""

    #: Pass as ``cursor`` for the next page; None on the last page.
    next_cursor: str | None


# --------------------------------------------------------------------------- sessions


class SessionLimits(TypedDict, total=False):
    """Resource limits of one session; omitted fields take the server's defaults."""

    #: Memory (and memory+swap) in MiB; past it the kernel kills the biggest process.
    memory_mb: int
    #: Most processes and threads at once (a fork bomb stops here).
    pids: int
    #: CPU time as a number of cores (0.5 = half a core), enforced by CFS quota.
    cpus: float
    #: Size of the session's writable layer in MiB; writing past it fails with ENOSPC.
    disk_mb: int


ExpiryAction = Literal["stop", "delete"]


class NetworkRequest(TypedDict, total=False):
    """Outbound network for a session; off unless ``enabled``.

    Even with network on, a session never reaches the host itself (any of its
    addresses), loopback or link-local addresses.  ``allow`` narrows it further to
    these networks (CIDRs such as ``"203.0.113.0/24"``) and host names (resolved when
    the session starts); empty means any other destination.
    """

    enabled: bool
    #: At most 64 entries, each at most 253 characters.
    allow: list[str]


class NetworkInfo(TypedDict):
    enabled: bool
    allow: list[str]


class CreateSessionRequest(TypedDict, total=False):
    limits: SessionLimits
    #: Labels of your own: at most 64 pairs, each key and value at most 1024
    #: characters (``MAX_METADATA_ITEMS``, ``MAX_METADATA_LENGTH``).
    metadata: dict[str, str]
    #: Stop (or delete) the session after this many seconds without activity: no job
    #: or terminal running and no request touching it (at most a year).
    idle_timeout: float | None
    #: Stop (or delete) the session this many seconds after it was created (at most a
    #: year).
    max_lifetime: float | None
    #: Stop (or delete) the session once it has been paused this many seconds (none
    #: by default; at most a year).
    paused_timeout: float | None
    #: What happens when any of these timeouts passes (default "stop").
    on_timeout: ExpiryAction
    network: NetworkRequest
    #: Environment variables every job (and terminal) of the session gets, over the
    #: server's ``--env-file``; a job's own ``env`` overrides them.  Never shown back.
    env: dict[str, str]
    #: Start from this snapshot's files (a ``ready`` snapshot of the same key).
    snapshot: str
    #: The image to run (a ``ready`` image of the key's, or a shared one); default: the
    #: server's default image.
    image: str


class SessionImage(TypedDict):
    name: str
    #: ``sha256:<hex>``: what names the image's content.
    digest: str


class SessionUsage(TypedDict):
    """What a running session consumes now (None where the host cannot tell)."""

    cpu_seconds: float | None
    memory_bytes: int | None
    processes: int | None
    disk_bytes: int | None


class SessionInfo(TypedDict):
    session_id: str
    status: SessionStatusName
    created_at: str
    updated_at: str
    limits: SessionLimits
    metadata: dict[str, str]
    idle_timeout: float | None
    max_lifetime: float | None
    paused_timeout: float | None
    on_timeout: ExpiryAction
    network: NetworkInfo
    #: Why the session is in its state when the server changed it (restart, timeout).
    status_reason: str | None
    #: The snapshot its files started from (or were last restored to); None: the image.
    snapshot: NotRequired[str | None]
    #: The image it runs, as it was when the session was created.
    image: NotRequired[SessionImage]
    #: The node that holds the session for its whole life: a cluster's node
    #: (``bastion serve --ray``), else the name of the server that created it
    #: (``--node-name``, by default its host's name); None for a session an older
    #: server of one machine made (it recorded none).  A session whose node left the
    #: cluster is deleted, its status_reason starting with "lost:".
    node: NotRequired[str | None]
    #: Current consumption; only on a single running session's status.
    usage: NotRequired[SessionUsage | None]


class SessionList(Page):
    sessions: list[SessionInfo]


# --------------------------------------------------------------------------- images


class ImageStatus(StrEnum):
    #: Its recipe is being built (or it is being imported): follow its log.
    BUILDING = "building"
    READY = "ready"
    #: The build failed (``status_reason`` says why; the log has the rest); nothing of
    #: it was kept.
    FAILED = "failed"


ImageStatusName = Literal["building", "ready", "failed"]
ImageSourceName = Literal["stock", "build", "import", "pull"]


class ImageInfo(TypedDict):
    name: str
    status: ImageStatusName
    status_reason: str | None
    #: ``stock`` (the server's base image), ``build`` (a recipe), ``import``, ``pull``.
    source: ImageSourceName
    #: Whether every key may use it (stock images and those an admin key made), or
    #: only the key that made it.
    shared: bool
    #: ``sha256:<hex>`` once ready (None before).
    digest: str | None
    #: The image it extends (a recipe's ``from``), if any.
    parent: str | None
    #: Disk space its own layer takes: only what it adds to ``parent``.
    size_bytes: int
    #: The build's id: its log is ``GET /v1/images/{name}/log``.
    build_id: str
    created_at: str
    updated_at: str


class ImageList(Page):
    images: list[ImageInfo]


class PullImageRequest(TypedDict):
    #: The name it gets here.
    name: str
    #: ``registry[:port]/repository[:tag]`` (``localhost:5000/app:1``).
    ref: str


class BuildImageRequest(TypedDict, total=False):
    #: The recipe, as in a TOML recipe file (``files`` values are base64 of the bytes),
    #: or the name of a stock recipe (``"python"``, ``"build"``).
    recipe: dict[str, Any] | str
    #: Build again even if the same recipe over the same base is stored (no cache).
    no_cache: bool


# --------------------------------------------------------------------------- snapshots


class SnapshotStatus(StrEnum):
    #: Being copied; usable once ``ready``.
    CREATING = "creating"
    READY = "ready"
    #: The copy failed (``status_reason`` says why); it holds no space.
    FAILED = "failed"


SnapshotStatusName = Literal["creating", "ready", "failed"]


class SnapshotInfo(TypedDict):
    snapshot_id: str
    #: The session it was taken of (which may since have been deleted).
    session_id: str
    name: str | None
    status: SnapshotStatusName
    status_reason: str | None
    #: The snapshot the session's files stood on when it was taken, if any: this one
    #: holds only what changed since.
    parent: str | None
    #: Disk space its own layer takes (what counts against the key's snapshot quota).
    size_bytes: int
    created_at: str
    updated_at: str


class SnapshotList(Page):
    snapshots: list[SnapshotInfo]


class CreateSnapshotRequest(TypedDict, total=False):
    #: A label of your own (at most ``MAX_METADATA_LENGTH`` characters).
    name: str | None


class ForkRequest(TypedDict, total=False):
    #: How many running copies to make (1 to ``MAX_FORK_COUNT``; default 1).
    count: int
    name: str | None


class ForkResult(TypedDict):
    #: The snapshot the copies start from (kept: delete it when done).
    snapshot: SnapshotInfo
    sessions: list[SessionInfo]


class RestoreRequest(TypedDict):
    snapshot_id: str


#: Most copies one fork makes.
MAX_FORK_COUNT = 64


# --------------------------------------------------------------------------- jobs


class RunJobRequest(TypedDict):
    #: The program and its arguments: at most 4096 strings of 128 KiB (UTF-8) in all
    #: (``MAX_COMMAND_ARGS``, ``MAX_COMMAND_BYTES``), no NUL bytes.
    command: list[str]
    #: Variables added to the session's: at most 1024, of 128 KiB in all, each counted
    #: as ``NAME=value`` in UTF-8 (``MAX_ENV_VARS``, ``MAX_ENV_BYTES``).
    env: NotRequired[dict[str, str]]
    #: The working directory, an absolute path of at most 4096 bytes.
    cwd: NotRequired[str]
    #: Seconds after which the server kills the job's processes (at most 7 days);
    #: ``None`` = no limit.
    timeout: NotRequired[float | None]
    #: The job's stdin: ``true`` keeps it open, for ``POST .../jobs/{id}/stdin``;
    #: a string is the job's whole input (UTF-8, at most ``MAX_INLINE_STDIN`` bytes;
    #: more, or bytes that are not text, go through that endpoint); absent or
    #: ``false``: the job reads nothing (``/dev/null``).
    stdin: NotRequired[bool | str]
    #: Limits of this job alone, each within the session's own (``limit_exceeded``
    #: above them), each reported with its own ``failure_reason``.
    limits: NotRequired[JobLimitsRequest]
    #: ``"root"``: run as the sandbox's root (root of the session's own user namespace,
    #: never the host's), to install packages at run time; default ``"user"``.
    user: NotRequired[Literal["user", "root"]]


#: The most a run request carries inline as the job's stdin (bytes of UTF-8): well
#: within the server's JSON body limit, escapes included.
MAX_INLINE_STDIN = 256 * 1024


class JobLimitsRequest(TypedDict, total=False):
    #: Memory of the job's whole tree, in MiB (a cgroup of its own): ``oom``.
    memory_mb: int
    #: CPU seconds of each of its processes (an rlimit: SIGXCPU, then SIGKILL):
    #: ``cpu_time``.
    cpu_seconds: int
    #: Processes and threads of its tree at once (forks beyond fail): ``pids_limit``
    #: when the job then fails.
    pids: int
    #: Bytes of each output stream; the job is killed when one exceeds it:
    #: ``output_limit``.
    output_bytes: int


class JobUsageInfo(TypedDict):
    """What a finished job used: its main process and every descendant reaped."""

    wall_seconds: float
    user_cpu_seconds: float
    system_cpu_seconds: float
    #: The job cgroup's peak (with a ``memory_mb`` limit), else its largest process's
    #: peak resident memory; None if unknown.
    peak_memory_bytes: int | None


class JobOutput(TypedDict):
    console_output: str
    errout: str
    status_code: int | None


class JobResult(TypedDict):
    job_id: str
    status: JobStatusName
    output: JobOutput | None


class JobInfo(JobResult):
    session_id: str
    command: list[str]
    created_at: str
    started_at: str | None
    finished_at: str | None
    #: Why a failed job failed: "nonzero_exit" (its own exit status, in output.status_code),
    #: "not_found", "invalid_cwd" (its working directory is missing), "exec_failed",
    #: "start_failed", "timeout", "session_stopped", "session_deleted", "server_restarted"
    #: (the server restarted before the job started), "sandbox_lost" (its sandbox stopped
    #: while the server was down, and the job with it: a job whose sandbox runs on is
    #: taken up again by the next server), "lost", "internal_error" (the server itself
    #: failed while running the job; the job's errout ends with what failed), "killed"
    #: (``POST .../kill``), "oom" (the kernel's OOM killer ended it), "cpu_time" (its
    #: ``cpu_seconds`` limit), "pids_limit" (it failed after its ``pids`` limit refused a fork),
    #: "output_limit" (a stream exceeded its ``output_bytes``); None unless failed.
    failure_reason: str | None
    #: The signal that ended the job's main process ("SIGSEGV", "SIGKILL"), else None
    #: (then ``output.status_code`` is its exit status).  Absent from older servers.
    signal: NotRequired[str | None]
    #: What it used, once final (None for a job that never ran, or recorded by an
    #: older server).  Absent from older servers.
    usage: NotRequired[JobUsageInfo | None]


class JobList(Page):
    jobs: list[JobInfo]


class KillJobRequest(TypedDict):
    #: A signal name ("SIGTERM", the default, "SIGINT", "SIGKILL"...) or number;
    #: SIGKILL kills the job's whole tree at once, another is sent to every process.
    signal: NotRequired[str | int]


class StdinResult(TypedDict):
    #: Bytes of the body handed to the job (all of it, unless it ended meanwhile).
    written: int
    #: Whether the job's stdin is now closed.
    closed: bool


class ProcessInfo(TypedDict):
    """One process of a running session, as its sandbox names it."""

    pid: int
    #: Its parent's pid (0 for the sandbox's first process, or a parent outside it).
    ppid: int
    #: "root", "user", or the uid inside the sandbox as a string.
    user: str
    command: list[str]
    cpu_seconds: float
    memory_bytes: int
    #: The running job it belongs to; None for the agent's own processes (and what a
    #: finished job left running).
    job_id: str | None


class ProcessList(TypedDict):
    processes: list[ProcessInfo]


# --------------------------------------------------------------------------- files


class FileEntry(TypedDict):
    name: str
    path: str
    size: int
    type: FileType
    modified_at: str
    mode: str


class FileList(Page):
    path: str
    files: list[FileEntry]


class FileUploadResult(TypedDict):
    path: str
    size: int


class ArchiveUploadResult(TypedDict):
    """What ``POST .../files/archive`` extracted into ``path``."""

    path: str
    files: int
    directories: int
    symlinks: int
    bytes: int


class FileDeleteResult(TypedDict):
    path: str
    deleted: bool


# --------------------------------------------------------------------------- service


class HealthInfo(TypedDict):
    status: Literal["ok"]
    version: str
    runtime: str


# --------------------------------------------------------------------------- API keys


class KeyScope(StrEnum):
    """What a key may do: ``admin`` everything (keys included), ``agent`` work on its
    tenant's sessions, ``viewer`` only read them (GET requests, no terminals)."""

    ADMIN = "admin"
    AGENT = "agent"
    VIEWER = "viewer"


KeyScopeName = Literal["admin", "agent", "viewer"]


class CreateKeyRequest(TypedDict):
    scope: KeyScopeName
    #: Unique among the server's keys: letters, digits, ``.``, ``_``, ``-`` (1-64).
    name: NotRequired[str | None]
    #: The id of the key whose sessions this key works on (a viewer of an agent's
    #: sessions, or a key rotated in); default: a tenant of its own.
    tenant: NotRequired[str | None]


class KeyInfo(TypedDict):
    #: The key's fingerprint (``key_`` + 24 hex digits), as logs and the audit log
    #: name it; the key itself is never stored.
    key_id: str
    name: str | None
    scope: KeyScopeName
    #: The id of the tenant whose sessions the key works on (its own id by default).
    tenant: str
    #: "api" (made by ``POST /v1/keys``) or "config" (``--api-key``: admin, not revocable).
    source: Literal["api", "config"]
    created_at: str | None
    revoked_at: str | None


class CreatedKey(KeyInfo):
    #: The key itself: shown this once, never again.
    api_key: str


class KeyList(TypedDict):
    keys: list[KeyInfo]


def keys_path(key_id: str = "") -> str:
    return f"{API_PREFIX}/keys" + (f"/{key_id}" if key_id else "")


# --------------------------------------------------------------------------- limits

#: Longest path the file API accepts (bytes of UTF-8), as Linux's PATH_MAX.
MAX_PATH_LENGTH = 4096
#: Longest single path component (NAME_MAX).
MAX_NAME_LENGTH = 255
#: Most arguments of a job's command, and their total size in bytes of UTF-8.
MAX_COMMAND_ARGS = 4096
MAX_COMMAND_BYTES = 128 * 1024
#: Most variables of a job's env, and their total size (each ``NAME=value``, UTF-8).
MAX_ENV_VARS = 1024
MAX_ENV_BYTES = 128 * 1024
#: Most metadata pairs of a session, and the longest key or value (characters).
MAX_METADATA_ITEMS = 64
MAX_METADATA_LENGTH = 1024
#: Longest time (seconds) the server holds one ``GET .../jobs/{jid}/wait?timeout=S``
#: request before answering with the job in its current state; a larger ``timeout``
#: is capped to this.  ``timeout`` may be fractional.
JOB_WAIT_MAX_HOLD = 60.0


# --------------------------------------------------------------------------- URLs


def session_path(session_id: str = "") -> str:
    return f"{API_PREFIX}/sessions" + (f"/{session_id}" if session_id else "")


# Request bodies reject keys they do not define (a misspelt limit such as "memory" for
# "memory_mb" must be an error, not silently ignored) and values of the wrong type ("yes"
# is not a boolean).  The attribute is read by the server's validation (pydantic) and
# means nothing to anything else.
for _request_type in (
    SessionLimits,
    CreateSessionRequest,
    RunJobRequest,
    NetworkRequest,
    CreateKeyRequest,
):
    setattr(_request_type, "__pydantic_config__", {"extra": "forbid", "strict": True})  # noqa: B010


# --------------------------------------------------------------------------- terminal
#
# WebSocket at /v1/sessions/{session_id}/terminal?rows=24&cols=80, authenticated like
# every request (Authorization: Bearer KEY or X-API-Key).  Every frame is a JSON text
# message {"type": ..., "payload": {...}}.
#
# server -> client:
#   {"type": "init", "payload": TerminalInit}                 first message, once
#   {"type": "term_output", "payload": {"data": str}}          pty output, valid UTF-8
#   {"type": "exit", "payload": TerminalExit}                  last message, then close
#   {"type": "error", "payload": {"code": str, "message": str}}  before a 44xx close
#   {"type": "pong", "payload": {}}                            answer to a client ping
# client -> server:
#   {"type": "input", "payload": {"data": str}}
#   {"type": "resize", "payload": {"rows": int, "cols": int}}
#   {"type": "ping", "payload": {}}                            optional app-level ping
# The server also sends WebSocket pings (every 20 s) so idle terminals stay open.


class TerminalCloseCode:
    """WebSocket close codes of the terminal endpoint."""

    #: The shell exited (an "exit" message came first).
    NORMAL = 1000
    #: The server is shutting down: an "exit" with reason "server_shutdown" came first
    #: (or, for a terminal it refused to open, an "error" with code "server_shutdown").
    GOING_AWAY = 1001
    #: A server-side failure (the sandbox could not start the shell).
    INTERNAL_ERROR = 1011
    #: Missing or invalid API key.
    UNAUTHORIZED = 4001
    #: No such session (or it belongs to another key).
    SESSION_NOT_FOUND = 4004
    #: The session is not running, or was stopped or deleted while attached.
    SESSION_NOT_RUNNING = 4009
    #: The client sent a message the server cannot understand.
    BAD_MESSAGE = 4400
    #: The key's scope does not allow terminals (a viewer key).
    FORBIDDEN = 4003


TerminalMessageType = Literal["init", "term_output", "exit", "error", "pong"]


class TerminalInit(TypedDict):
    terminal_id: str
    session_id: str
    shell: str
    rows: int
    cols: int


class TerminalExit(TypedDict):
    exit_code: int | None
    #: "exited" when the shell ended by itself; else "session_stopped",
    #: "session_deleted", "server_shutdown" or "lost".
    reason: str


class TerminalMessage(TypedDict):
    type: str
    payload: dict[str, object]


# --------------------------------------------------------------------------- job events
#
# GET /v1/sessions/{session_id}/jobs/{job_id}/events streams the job as NDJSON (one JSON
# object per line, Content-Type application/x-ndjson).  A follower that comes late gets
# everything from the start (replay), then live events; the stream ends with "end",
# which always comes after the last byte of output.
#   {"type": "status", "status": "queued"|"running"|...}      each status change
#   {"type": "stdout", "data": str} / {"type": "stderr", "data": str}  output, in order
#   {"type": "end", "job": JobInfo}                            the final job, last line
# If the server begins to shut down before the job ends, the stream ends at once with
#   {"type": "end", "job": JobInfo, "reason": "server_shutdown"}
# where the job is as it was then (not final: it runs on in its sandbox, and the next
# server takes it up again; its stream can then be followed again from the start).


class JobEvent(TypedDict):
    type: Literal["status", "stdout", "stderr", "end"]
    status: NotRequired[JobStatusName]
    data: NotRequired[str]
    job: NotRequired[JobInfo]
    #: On an "end" that comes before the job ended: why ("server_shutdown").
    reason: NotRequired[str]
