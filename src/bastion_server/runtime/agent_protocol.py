"""The wire protocol between the server and the agent inside each sandbox.

The agent (``agent_c/bastion-agent.c``, built by :mod:`.agent_build`) is PID 1 of every
sandbox and listens on a Unix socket, ``/run/bastion/agent.sock`` inside the sandbox
(bind-mounted from the session's ``run/`` directory on the host).  One stream
connection per job at a time, carrying frames of
``type (1 byte) | length (4 bytes, big endian) | payload``:

* ``J`` a JSON object (requests from the server, events from the agent)
* ``O`` / ``E`` stdout / stderr bytes (agent -> server)
* ``I`` stdin bytes (server -> agent; pty input)

Requests: ``{"op": "ping"}``, or ``{"op": "exec", "argv", "env", "cwd", "timeout",
"pty", "rows", "cols", "stdin", "user", "rlimits"}`` (cgroup.procs descriptors may
come with it as SCM_RIGHTS) then optionally ``{"op": "kill", "signal"}`` /
``{"op": "resize", "rows", "cols"}`` / ``{"op": "close_stdin"}`` and input.  Events:
``{"event": "pong", "pid"}``; ``{"event": "started", "pid"}``, output frames, and last
``{"event": "exit", "exit_code", "signal", "timed_out", "error", "message",
"kill_signal", "usage"}``.  The started event goes in the same send as the job's first
output or its exit, or by itself after 2 ms without either (one wake-up of the server
for a short job instead of two).  The C agent's header comment is the full reference.
Closing the connection kills the job's whole process tree, unless the job is
persistent (exec with ``"persist": true, "job_id", "spool_bytes"``: what lets a job
outlive the server): it runs on with its output spooled in the sandbox;
``{"op": "attach", "job_id", "stdout_offset", "stderr_offset"}`` on a new connection
replays the spool past those offsets and goes on live (or sends the kept exit event,
which then carries ``"output_bytes"``), and ``{"op": "forget"}`` after the exit event
lets the agent drop the job.

``"keep_open": true`` in an exec asks the agent to keep the connection after the job:
its exit event then says ``"keep_open": true``, and once the job's conversation is over
(after the exit event; for a persistent job after ``forget``) the same connection takes
the next request, which spares a connect per job (:mod:`.agent_connections`).  Control
frames and input still sent for the finished job are dropped there.

This module is the codec both sides of the Python code use: the server's client
(:mod:`.agent_client`) and the tests that speak to the agent directly.
"""

from __future__ import annotations

import json
import struct

FRAME_HEADER = struct.Struct(">cI")
FRAME_JSON = b"J"
FRAME_STDOUT = b"O"
FRAME_STDERR = b"E"
FRAME_STDIN = b"I"
#: The largest payload either side sends or accepts (the C agent's limit too).
MAX_FRAME = 16 * 1024 * 1024

#: Where the agent listens inside the sandbox.
SOCKET_DIR = "/run/bastion"
SOCKET_NAME = "agent.sock"


class FrameTooLarge(ValueError):
    """A frame header announced a payload over :data:`MAX_FRAME`."""


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(kind, len(payload)) + payload


def encode_json(obj: object) -> bytes:
    return encode_frame(FRAME_JSON, json.dumps(obj, separators=(",", ":")).encode())


def decode_header(header: bytes) -> tuple[bytes, int]:
    """``(kind, payload length)`` of a frame header; :class:`FrameTooLarge` past the limit."""
    kind, length = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameTooLarge(f"frame of {length} bytes, over the {MAX_FRAME}-byte limit")
    return kind, length


class FrameReader:
    """Incremental frame decoder: feed it bytes as they arrive, get whole frames back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= FRAME_HEADER.size:
            kind, length = decode_header(bytes(self._buf[: FRAME_HEADER.size]))
            end = FRAME_HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((kind, bytes(self._buf[FRAME_HEADER.size : end])))
            del self._buf[:end]
        return frames
