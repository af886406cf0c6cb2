"""The in-sandbox agent: PID 1 of every Bastion sandbox.

This one file is bind-mounted read-only into each sandbox and run by the image's own
``python3`` as the container's init.  It must therefore use nothing but the standard
library.  The server imports the same file for the frame codec, so both sides share it.

Why an agent instead of one ``crun exec`` per job: a runtime exec costs a fork/exec of
the runtime, a setns dance and a cgroup join (4-14 ms); the agent is already inside
every namespace and only forks (well under a millisecond).  It also gives us what
``exec`` cannot: the whole process tree of a job (the job's supervisor is a child
subreaper, so nothing a job starts can leave its tree before the job ends) and a pty
with full job control.

Process layout inside the sandbox::

    PID 1   reaper          reaps orphans; exits (ending the sandbox) if the agent dies
    └─ agent server         root of the user namespace, listens on /run/bastion/agent.sock
       └─ supervisor (one per job)  child subreaper, own session
          └─ the job        as the sandbox user, no capabilities

Wire protocol, one Unix stream connection per job: frames of
``type (1 byte) | length (4 bytes, big endian) | payload``.

* ``J`` a JSON object (requests from the server, events from the agent)
* ``O`` / ``E`` stdout / stderr bytes (agent -> server)
* ``I`` stdin bytes (server -> agent; pty input)

Requests: ``{"op": "exec", "argv", "env", "cwd", "timeout", "pty", "rows", "cols"}``,
then optionally ``{"op": "kill"}`` / ``{"op": "resize", "rows", "cols"}`` and input.
Events: ``{"event": "started", "pid"}``, output frames, and last
``{"event": "exit", "exit_code", "signal", "timed_out", "error"}``.
Closing the connection kills the job's whole tree: a job nobody watches does not run on.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import threading
import time
from typing import Any

FRAME_HEADER = struct.Struct(">cI")
FRAME_JSON = b"J"
FRAME_STDOUT = b"O"
FRAME_STDERR = b"E"
FRAME_STDIN = b"I"
MAX_FRAME = 16 * 1024 * 1024
READ_CHUNK = 256 * 1024

SOCKET_DIR = "/run/bastion"
SOCKET_NAME = "agent.sock"

_PR_SET_CHILD_SUBREAPER = 36
# Output still buffered in pipes after the job's main process exits is drained for at
# most this long: a background process that keeps the pipe open must not hold the job.
_DRAIN_AFTER_EXIT = 0.05


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(kind, len(payload)) + payload


def encode_json(obj: object) -> bytes:
    return encode_frame(FRAME_JSON, json.dumps(obj, separators=(",", ":")).encode())


class FrameReader:
    """Incremental frame decoder over a blocking or non-blocking socket."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= FRAME_HEADER.size:
            kind, length = FRAME_HEADER.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise ValueError("frame too large")
            end = FRAME_HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((kind, bytes(self._buf[FRAME_HEADER.size : end])))
            del self._buf[:end]
        return frames


# ----------------------------------------------------------------------------- process tree


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: parse after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(name))
    return children


def _descendants(root: int) -> list[int]:
    children = _children_map()
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(root: int) -> None:
    """SIGKILL every descendant of ``root`` (a child subreaper), then ``root`` itself.

    Orphans of killed processes re-parent to ``root`` because it is a subreaper, so
    repeating the sweep until it finds nothing catches processes forked mid-sweep.
    """
    for _ in range(200):
        pids = _descendants(root)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)
    try:
        os.kill(root, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- job start

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Job:
    """One running command: its supervisor, pipes (or pty) and status channel."""

    def __init__(self, request: dict[str, Any], uid: int, gid: int, home: str) -> None:
        self.pty = bool(request.get("pty"))
        argv = [str(a) for a in request["argv"]]
        env = {str(k): str(v) for k, v in (request.get("env") or {}).items()}
        cwd = request.get("cwd") or home
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if self.pty:
            master, slave = os.openpty()
            os.set_inheritable(slave, False)
            os.fchown(slave, uid, -1)
            _set_winsize(master, int(request.get("rows") or 24), int(request.get("cols") or 80))
            child_fds = (slave, slave, slave)
            self.out_fds = {master: FRAME_STDOUT}
            self.input_fd: int | None = master
            parent_close = [slave]
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            errout_r, errout_w = os.pipe2(os.O_CLOEXEC)
            null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            child_fds = (null, out_w, errout_w)
            self.out_fds = {out_r: FRAME_STDOUT, errout_r: FRAME_STDERR}
            self.input_fd = None
            parent_close = [null, out_w, errout_w]

        pid = os.fork()
        if pid == 0:  # supervisor
            try:
                self._supervise(argv, env, cwd, uid, gid, child_fds, status_w, err_w)
            finally:
                os._exit(255)
        self.pid = pid
        for fd in [*parent_close, status_w, err_w]:
            os.close(fd)
        self.status_fd = status_r
        # The error pipe closes on a successful exec; bytes on it are the exec errno.
        data = b""
        while True:
            chunk = os.read(err_r, 64)
            if not chunk:
                break
            data += chunk
        os.close(err_r)
        self.exec_errno = int(data) if data else 0

    def _supervise(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        uid: int,
        gid: int,
        fds: tuple[int, int, int],
        status_w: int,
        err_w: int,
    ) -> None:
        # Runs in the forked child of a threaded process: only simple os calls here.
        # Drop every descriptor another thread had open at the fork (other jobs' pipes
        # and sockets): a stray copy of a pipe's write end would hold off its EOF.
        keep = sorted({status_w, err_w, *fds})
        low = 3
        for fd in keep:
            if fd > low:
                os.closerange(low, fd)
            low = max(low, fd + 1)
        os.closerange(low, 1 << 20)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if not self.pty:
            os.setsid()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
        main = os.fork()
        if main == 0:
            try:
                if self.pty:
                    os.setsid()
                    fcntl.ioctl(fds[0], termios.TIOCSCTTY, 0)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target, inheritable=True)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                try:
                    os.chdir(cwd)
                except OSError as exc:  # negative: the working directory, not the command
                    os.write(err_w, str(-(exc.errno or errno.EIO)).encode())
                    os._exit(127)
                os.execvpe(argv[0], argv, env)
            except OSError as exc:
                os.write(err_w, str(exc.errno or errno.EIO).encode())
            os._exit(127)
        os.close(err_w)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(0)
            except InterruptedError:
                continue
            if pid == main:
                code = os.waitstatus_to_exitcode(status)
                os.write(status_w, str(code).encode())
                os._exit(0)


class Agent:
    def __init__(self, uid: int, gid: int, home: str) -> None:
        self.uid, self.gid, self.home = uid, gid, home

    def serve(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(128)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # out of descriptors or memory: the agent itself must live on
                time.sleep(0.05)
                continue
            try:
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
            except RuntimeError:
                # Threads count against the sandbox's process limit; when a job has
                # used it up, refuse this request rather than die with the sandbox.
                self._refuse(conn, "the session's process limit is reached; try again later")

    @staticmethod
    def _refuse(conn: socket.socket, message: str) -> None:
        try:
            conn.sendall(
                encode_json(
                    {
                        "event": "exit",
                        "exit_code": None,
                        "signal": None,
                        "timed_out": False,
                        "error": "start_failed",
                        "message": message,
                    }
                )
            )
        except OSError:
            pass
        conn.close()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                reader = FrameReader()
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    frames = reader.feed(data)
                    if frames:
                        break
                kind, payload = frames[0]
                request = json.loads(payload) if kind == FRAME_JSON else {}
                op = request.get("op")
                if op == "ping":
                    conn.sendall(encode_json({"event": "pong", "pid": os.getpid()}))
                elif op == "exec":
                    self._exec(conn, request, reader, frames[1:])
                else:
                    conn.sendall(encode_json({"event": "error", "message": f"unknown op {op!r}"}))
        except Exception as exc:  # one bad connection must never take the agent down
            print(f"bastion-agent: connection failed: {exc!r}", file=sys.stderr, flush=True)

    def _exec(
        self,
        conn: socket.socket,
        request: dict[str, Any],
        reader: FrameReader,
        pending: list[tuple[bytes, bytes]],
    ) -> None:
        try:
            job = Job(request, self.uid, self.gid, self.home)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            conn.sendall(
                encode_json(
                    {
                        "event": "exit",
                        "exit_code": None,
                        "signal": None,
                        "timed_out": False,
                        "error": "start_failed",
                        "message": str(exc),
                    }
                )
            )
            return
        if job.exec_errno:
            os.waitpid(job.pid, 0)
            for fd in [*job.out_fds, job.status_fd]:
                os.close(fd)
            if job.exec_errno < 0:
                conn.sendall(
                    encode_json(
                        {
                            "event": "exit",
                            "exit_code": 126,
                            "signal": None,
                            "timed_out": False,
                            "error": "invalid_cwd",
                            "message": f"working directory: {os.strerror(-job.exec_errno)}",
                        }
                    )
                )
                return
            conn.sendall(
                encode_json(
                    {
                        "event": "exit",
                        "exit_code": 127 if job.exec_errno == errno.ENOENT else 126,
                        "signal": None,
                        "timed_out": False,
                        "error": "not_found" if job.exec_errno == errno.ENOENT else "exec_failed",
                        "message": f"{request['argv'][0]}: {os.strerror(job.exec_errno)}",
                    }
                )
            )
            return
        conn.sendall(encode_json({"event": "started", "pid": job.pid}))
        timeout = request.get("timeout")
        deadline = time.monotonic() + float(timeout) if timeout else None
        self._pump(conn, job, reader, pending, deadline)

    def _pump(
        self,
        conn: socket.socket,
        job: Job,
        reader: FrameReader,
        pending: list[tuple[bytes, bytes]],
        deadline: float | None,
    ) -> None:
        sel = selectors.DefaultSelector()
        for fd in job.out_fds:
            sel.register(fd, selectors.EVENT_READ, "out")
        sel.register(job.status_fd, selectors.EVENT_READ, "status")
        sel.register(conn, selectors.EVENT_READ, "conn")
        exit_code: int | None = None
        timed_out = killed = False
        drain_until: float | None = None
        open_outputs = set(job.out_fds)

        def handle_frames(frames: list[tuple[bytes, bytes]]) -> bool:
            nonlocal killed
            for kind, payload in frames:
                if kind == FRAME_STDIN and job.input_fd is not None:
                    os.write(job.input_fd, payload)
                elif kind == FRAME_JSON:
                    msg = json.loads(payload)
                    if msg.get("op") == "kill":
                        killed = True
                        kill_tree(job.pid)
                    elif msg.get("op") == "resize" and job.input_fd is not None:
                        _set_winsize(job.input_fd, int(msg["rows"]), int(msg["cols"]))
                        # The foreground process group learns of it by SIGWINCH.
            return True

        handle_frames(pending)
        try:
            while True:
                now = time.monotonic()
                if exit_code is not None and (not open_outputs or now >= (drain_until or now)):
                    break
                waits = []
                if deadline is not None and exit_code is None:
                    waits.append(deadline - now)
                if drain_until is not None:
                    waits.append(drain_until - now)
                timeout_s = max(0.0, min(waits)) if waits else None
                if deadline is not None and exit_code is None and now >= deadline:
                    timed_out = True
                    kill_tree(job.pid)
                    deadline = None
                    continue
                for key, _ in sel.select(timeout_s):
                    if key.data == "out":
                        try:
                            data = os.read(key.fd, READ_CHUNK)
                        except OSError:  # EIO: pty closed by its last holder
                            data = b""
                        if data:
                            conn.sendall(encode_frame(job.out_fds[key.fd], data))
                        else:
                            sel.unregister(key.fd)
                            open_outputs.discard(key.fd)
                    elif key.data == "status":
                        raw = os.read(job.status_fd, 64)
                        sel.unregister(job.status_fd)
                        os.waitpid(job.pid, 0)
                        exit_code = int(raw) if raw else -signal.SIGKILL
                        drain_until = time.monotonic() + _DRAIN_AFTER_EXIT
                    else:
                        data = conn.recv(65536)
                        if not data:  # the server went away: nobody owns this job now
                            kill_tree(job.pid)
                            if exit_code is None:
                                os.waitpid(job.pid, 0)
                            return
                        handle_frames(reader.feed(data))
        finally:
            sel.close()
            for fd in [*job.out_fds, job.status_fd]:
                try:
                    os.close(fd)
                except OSError:
                    pass
        signum = -exit_code if exit_code is not None and exit_code < 0 else None
        conn.sendall(
            encode_json(
                {
                    "event": "exit",
                    "exit_code": 128 + signum if signum else exit_code,
                    "signal": signum,
                    "timed_out": timed_out,
                    "error": "timeout" if timed_out else ("killed" if killed else None),
                }
            )
        )


def _reap_forever(agent_pid: int) -> None:
    """PID 1: reap every orphan; end the sandbox when the agent server dies."""
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == agent_pid:
            print("bastion-agent: agent server exited", file=sys.stderr, flush=True)
            os._exit(1)


def main() -> None:
    uid, gid = (
        int(os.environ.get("BASTION_UID", "1000")),
        int(os.environ.get("BASTION_GID", "1000")),
    )
    home = os.environ.get("BASTION_HOME", "/")
    sock_dir = os.environ.get("BASTION_SOCKET_DIR", SOCKET_DIR)
    agent_pid = os.fork()
    if agent_pid:
        _reap_forever(agent_pid)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    Agent(uid, gid, home).serve(os.path.join(sock_dir, SOCKET_NAME))


if __name__ == "__main__":
    main()
