"""Snapshots, forks, restore, pause and resume (issue 14's speed targets).

* ``copy_baseline``: ``cp -a`` of the session's writable layer (its upper directory:
  the same files a snapshot copies) to a scratch directory on the data directory's
  file system, by the benchmark itself: what any snapshot that copies files pays.
* ``snapshot_100mb``: ``sessions.snapshot`` of a running session with 100 MiB of
  random bytes written (freeze, copy, thaw, record), each deleted after.
* ``fork10``: ``sessions.fork(sid, 10)`` of that session, until ten running copies
  are answered (the snapshot and ten create+start), the copies deleted after.
* ``restore_small``: ``sessions.restore`` of a small running session to its snapshot,
  back to back: a restore mostly finds the standby the one before started
  (runtime/warm_pool.py) still starting, and is then the OCI runtime's own restore
  (processes killed, writes set aside, the container run anew on the kept disk).
* ``restore_reset_loop``: the RL reset loop: restore to the snapshot, then an episode
  (a job that checks the snapshot's file, writes and runs for ``_EPISODE_S``), again
  and again; only the restore is timed (its standby is up by then).
* ``pause`` / ``resume``: one call each on a running session; ``get_floor`` is a
  ``sessions.get`` of it, the cost of any request on the same server and load.

Also recorded: whether the data directory's file system can reflink (``cp
--reflink=always`` of a test file), which decides what a copy costs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.stats import summarize

_WRITE_100MB = "head -c 104857600 /dev/urandom > ~/data.bin && sync"
#: How long an episode of the reset loop runs (an RL step does real work in between).
_EPISODE_S = 0.3
_EPISODE = f'test "$(cat ~/state)" = small && echo step >> ~/state && sleep {_EPISODE_S}'


def run(ctx: Context) -> dict[str, Any]:
    rounds = 3 if ctx.quick else 5
    short = 20 if ctx.quick else 50
    data_dir: Path = ctx.server.data_dir
    out: dict[str, Any] = {"reflink": _can_reflink(data_dir)}
    with ctx.client(timeout=300) as client, ctx.sessions(client, 1) as (sid,):
        ctx.say("writing 100 MiB into a session")
        client.jobs.run_and_wait(sid, ["sh", "-c", _WRITE_100MB], wait_timeout=120)
        upper = data_dir / "sessions" / sid / "layer" / "upper"
        copies, snaps, forks = [], [], []
        for i in range(rounds):
            ctx.say(f"cp -a of the session's files, then a snapshot ({i + 1}/{rounds})")
            scratch = Path(tempfile.mkdtemp(dir=data_dir))
            try:
                with ctx.timed() as t:
                    subprocess.run(["cp", "-a", f"{upper}/.", str(scratch / "copy")], check=True)
                copies.append(t[0])
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            with ctx.timed() as t:
                snap = client.sessions.snapshot(sid)
            snaps.append(t[0])
            if snap["status"] != "ready":
                raise RuntimeError(f"snapshot failed: {snap['status_reason']}")
            client.snapshots.delete(snap["snapshot_id"])
        for i in range(max(2, rounds - 2)):
            ctx.say(f"fork(count=10) ({i + 1})")
            with ctx.timed() as t:
                forked = client.sessions.fork(sid, 10)
            forks.append(t[0])
            for copy in forked["sessions"]:
                ctx.remember(copy["session_id"])
                ctx.delete_session(client, copy["session_id"])
            client.snapshots.delete(forked["snapshot"]["snapshot_id"])
        out["copy_baseline"] = summarize(copies, "ms", 1)
        out["snapshot_100mb"] = summarize(snaps, "ms", 1)
        out["fork10"] = summarize(forks, "ms", 1)
    with ctx.client() as client, ctx.sessions(client, 1) as (sid,):
        client.jobs.run_and_wait(sid, ["sh", "-c", "echo small > ~/state"])
        snap = client.sessions.snapshot(sid)
        restores, loop, pauses, resumes = [], [], [], []
        ctx.say(f"restore of a small session, {short // 2} times back to back")
        for _ in range(short // 2):
            with ctx.timed() as t:
                client.sessions.restore(sid, snap["snapshot_id"])
            restores.append(t[0])
        ctx.say(f"reset loop: restore, then a {_EPISODE_S} s episode, {short // 2} times")
        for _ in range(short // 2):
            with ctx.timed() as t:
                client.sessions.restore(sid, snap["snapshot_id"])
            loop.append(t[0])
            done = client.jobs.run_and_wait(sid, ["sh", "-c", _EPISODE])
            if done["status"] != "completed":
                raise RuntimeError(f"a restore did not give the snapshot's files: {done}")
        ctx.say(f"pause and resume, {short} times (and a status read, the request floor)")
        gets = []
        for _ in range(short):
            with ctx.timed() as t:
                client.sessions.get(sid)
            gets.append(t[0])
            with ctx.timed() as t:
                client.sessions.pause(sid)
            pauses.append(t[0])
            with ctx.timed() as t:
                client.sessions.resume(sid)
            resumes.append(t[0])
        client.snapshots.delete(snap["snapshot_id"])
        out["restore_small"] = summarize(restores, "ms", 1)
        out["restore_reset_loop"] = summarize(loop, "ms", 1)
        out["pause"] = summarize(pauses, "ms", 2)
        out["resume"] = summarize(resumes, "ms", 2)
        out["get_floor"] = summarize(gets, "ms", 2)
    return out


def _can_reflink(directory: Path) -> bool:
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source = Path(scratch) / "a"
        source.write_bytes(b"x" * 4096)
        done = subprocess.run(
            ["cp", "--reflink=always", str(source), str(Path(scratch) / "b")],
            capture_output=True,
            check=False,
        )
        return done.returncode == 0
