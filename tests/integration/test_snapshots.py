"""Snapshots, forks and restore on real sandboxes: the files are the snapshot's
(image, writes, deletions), copies diverge, a restore resets files and ends jobs, and
a server that dies mid-snapshot leaves a whole snapshot or none."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import ServerProcess

from bastion import (
    Bastion,
    SessionStateError,
    SnapshotNotFoundError,
    SnapshotStateError,
)
from bastion_server.runtime.oci import OciRuntime

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _sh(client: Bastion, sid: str, script: str) -> str:
    result = client.jobs.run_and_wait(sid, ["sh", "-c", script])
    output = result["output"]
    assert result["status"] == "completed" and output is not None, result
    return output["console_output"]


@pytest.fixture
def cleanup(client: Bastion) -> Iterator[list[str]]:
    """Session ids to delete after the test, then every snapshot of the key."""
    made: list[str] = []
    yield made
    for sid in made:
        with contextlib.suppress(SessionStateError):
            client.sessions.delete(sid)
    for snap in client.snapshots.list()["snapshots"]:
        with contextlib.suppress(SnapshotNotFoundError, SnapshotStateError):
            client.snapshots.delete(snap["snapshot_id"])


def test_a_session_from_a_snapshot_has_exactly_its_files(
    client: Bastion, sid: str, cleanup: list[str]
) -> None:
    _sh(client, sid, "echo one > ~/state; mkdir -p ~/d && echo x > ~/d/f; rm ~/.bash_logout")
    snap = client.sessions.snapshot(sid, name="first")
    assert snap["status"] == "ready" and snap["name"] == "first", snap
    assert snap["size_bytes"] > 0 and snap["session_id"] == sid
    _sh(client, sid, "echo two > ~/state")  # after the snapshot: not in it
    copy = client.sessions.create(snapshot=snap["snapshot_id"])
    cleanup.append(copy["session_id"])
    assert copy["snapshot"] == snap["snapshot_id"]
    client.sessions.start(copy["session_id"])
    seen = _sh(client, copy["session_id"], "cat ~/state ~/d/f; test -e ~/.bash_logout || echo gone")
    assert seen == "one\nx\ngone\n"
    # A snapshot of the copy stands on the first, and has the copy's writes.
    _sh(client, copy["session_id"], "echo three >> ~/state")
    second = client.sessions.snapshot(copy["session_id"])
    assert second["parent"] == snap["snapshot_id"]
    third = client.sessions.create(snapshot=second["snapshot_id"])
    cleanup.append(third["session_id"])
    client.sessions.start(third["session_id"])
    assert _sh(client, third["session_id"], "cat ~/state") == "one\nthree\n"


def test_fork_copies_diverge_without_seeing_each_other(
    client: Bastion, sid: str, cleanup: list[str]
) -> None:
    _sh(client, sid, "echo base > ~/state")
    forked = client.sessions.fork(sid, 3)
    copies = [s["session_id"] for s in forked["sessions"]]
    cleanup.extend(copies)
    assert len(set(copies)) == 3 and all(s["status"] == "running" for s in forked["sessions"])
    for n, copy in enumerate(copies):
        _sh(client, copy, f"echo copy{n} > ~/state; echo mine > ~/only-{n}")
    for n, copy in enumerate(copies):
        assert _sh(client, copy, "cat ~/state; ls ~") == f"copy{n}\nonly-{n}\nstate\n"
    assert _sh(client, sid, "cat ~/state; ls ~") == "base\nstate\n"


def test_restore_resets_files_and_stops_jobs_first(
    client: Bastion, sid: str, cleanup: list[str]
) -> None:
    _sh(client, sid, "echo clean > ~/state")
    snap = client.sessions.snapshot(sid)
    _sh(client, sid, "echo dirty > ~/state; echo junk > ~/junk; rm ~/.profile")
    job = client.jobs.run(sid, ["sleep", "600"])
    restored = client.sessions.restore(sid, snap["snapshot_id"])
    assert restored["status"] == "running" and restored["snapshot"] == snap["snapshot_id"]
    ended = client.jobs.get(sid, job["job_id"])
    assert ended["status"] == "failed" and ended["failure_reason"] == "session_stopped"
    assert _sh(client, sid, "cat ~/state; ls ~; test -e ~/.profile && echo profile") == (
        "clean\nstate\nprofile\n"
    )


def test_a_restore_ends_every_process_and_frees_the_old_writes(
    client: Bastion, sid: str, cleanup: list[str]
) -> None:
    """The OCI runtime's own restore (the first of a session: no standby yet) keeps
    the disk mounted; what a stop and a start would give must be there all the same:
    no process of before (a detached one in a job cgroup of its own either), a fresh
    /run/bastion, the old writes' space given back."""
    snap = client.sessions.snapshot(sid)["snapshot_id"]
    _sh(client, sid, "head -c 64M /dev/zero > ~/big; setsid sleep 600 > /dev/null 2>&1 &")
    client.jobs.run_and_wait(
        sid, ["sh", "-c", "setsid sleep 700 &"], limits={"memory_mb": 64}, user="root"
    )
    client.jobs.run_and_wait(sid, ["touch", "/run/bastion/left-by-root"], user="root")
    before = {" ".join(p["command"]) for p in client.sessions.processes(sid)}
    assert {"sleep 600", "sleep 700"} <= before, before
    client.sessions.restore(sid, snap)
    after = [" ".join(p["command"]) for p in client.sessions.processes(sid)]
    assert not any(c.startswith("sleep") for c in after), after
    listed = client.jobs.run_and_wait(sid, ["ls", "-A", "/run/bastion"], user="root")
    assert "left-by-root" not in (listed["output"] or {}).get("console_output", "")
    deadline = time.monotonic() + 30
    while int(_sh(client, sid, "df -k --output=used / | tail -1")) > 32 * 1024:
        assert time.monotonic() < deadline, "the old writes' space was not given back"
        time.sleep(0.2)
    assert _sh(client, sid, "ls ~; echo ok") == "ok\n"


def test_restores_of_a_paused_session_between_two_snapshots(
    client: Bastion, sid: str, cleanup: list[str]
) -> None:
    """In place, the layers change from one restore to the next (A, B, A): each gives
    exactly its snapshot's files; a paused session with a job running is thawed, the
    job ended, and the session runs again."""
    _sh(client, sid, "echo a > ~/state")
    a = client.sessions.snapshot(sid)["snapshot_id"]
    _sh(client, sid, "echo b > ~/state; echo only-b > ~/b")
    b = client.sessions.snapshot(sid)["snapshot_id"]
    job = client.jobs.run(sid, ["sleep", "600"])
    client.sessions.pause(sid)
    assert client.sessions.restore(sid, a)["status"] == "running"
    ended = client.jobs.get(sid, job["job_id"])
    assert ended["status"] == "failed" and ended["failure_reason"] == "session_stopped"
    for snap, files in ((a, "a\nstate\n"), (b, "b\nb\nstate\n"), (a, "a\nstate\n")):
        _sh(client, sid, "echo later > ~/state; echo junk > ~/junk")
        restored = client.sessions.restore(sid, snap)
        assert restored["status"] == "running" and restored["snapshot"] == snap
        assert _sh(client, sid, "cat ~/state; ls ~") == files


def test_snapshot_of_stopped_and_paused_sessions(
    client: Bastion, sid: str, cleanup: list[str]
) -> None:
    _sh(client, sid, "echo kept > ~/state")
    client.sessions.pause(sid)
    paused = client.sessions.snapshot(sid)
    assert paused["status"] == "ready"
    assert client.sessions.get(sid)["status"] == "paused"  # still paused
    client.sessions.resume(sid)
    client.sessions.stop(sid)
    stopped = client.sessions.snapshot(sid)
    assert stopped["status"] == "ready"
    client.sessions.delete(sid)  # a snapshot outlives its session
    copy = client.sessions.create(snapshot=stopped["snapshot_id"])
    cleanup.append(copy["session_id"])
    client.sessions.start(copy["session_id"])
    assert _sh(client, copy["session_id"], "cat ~/state") == "kept\n"


def test_snapshot_of_a_full_disk_succeeds(client: Bastion, cleanup: list[str]) -> None:
    sid = client.sessions.create(limits={"disk_mb": 32})["session_id"]
    cleanup.append(sid)
    client.sessions.start(sid)
    client.jobs.run_and_wait(sid, ["sh", "-c", "cat /dev/urandom > ~/fill; true"])
    snap = client.sessions.snapshot(sid)
    assert snap["status"] == "ready" and snap["size_bytes"] > 20 * 1024 * 1024, snap
    copy = client.sessions.create(snapshot=snap["snapshot_id"])
    cleanup.append(copy["session_id"])
    client.sessions.start(copy["session_id"])
    size = int(_sh(client, copy["session_id"], "stat -c %s ~/fill"))
    assert size > 20 * 1024 * 1024
    # The copy's own disk is whole: the snapshot's bytes are below it, not in it.
    assert _sh(client, copy["session_id"], "echo more > ~/more && cat ~/more") == "more\n"


@pytest.mark.parametrize("point", ["snapshot.before_rename", "snapshot.after_rename"])
def test_a_server_dying_mid_snapshot_leaves_none(private_server: ServerProcess, point: str) -> None:
    srv = private_server
    srv.extra_env = {"BASTION_FAULT": point}
    srv.start()
    with Bastion(base_url=srv.url, max_retries=0) as c:
        sid = c.sessions.create()["session_id"]
        c.sessions.start(sid)
        c.jobs.run_and_wait(sid, ["sh", "-c", "echo x > ~/x"])
        with contextlib.suppress(Exception):
            c.sessions.snapshot(sid)  # the server dies answering
    assert srv.proc is not None
    try:
        srv.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not die at {point}:\n{srv.log_tail()}")
    srv.stop()
    srv.extra_env = {}
    srv.start()
    with Bastion(base_url=srv.url) as c:
        snaps = c.snapshots.list()["snapshots"]
        assert len(snaps) == 1 and snaps[0]["status"] == "failed", snaps
        assert "stopped" in (snaps[0]["status_reason"] or "")
        assert list((srv.data_dir / "snapshots").iterdir()) == []  # nothing half made
        # The session was frozen for the copy: it is thawed again, and works.
        assert c.sessions.get(sid)["status"] == "running"
        assert (
            c.jobs.run_and_wait(sid, ["cat", "/home/user/x"])["output"]["console_output"] == "x\n"
        )  # type: ignore[index]
        assert c.sessions.snapshot(sid)["status"] == "ready"


#: The torn-snapshot test's directories: each has 1 MiB of filler and a clock file.
_CLOCKS = 60

#: Each round writes the round's number to every clock in turn (a temp file renamed
#: into place: a clock is always whole), as fast as it can.
_CLOCK_WRITER = f"""
import os
dirs = [os.path.expanduser(f"~/clocks/d{{k}}") for k in range({_CLOCKS})]
i = 0
while True:
    i += 1
    for d in dirs:
        with open(d + "/.c", "w") as f:
            f.write(str(i))
        os.replace(d + "/.c", d + "/c")
"""


def test_a_snapshot_of_a_writing_session_is_never_torn(
    client: Bastion, sid: str, cleanup: list[str]
) -> None:
    # Frozen at any instant, the clocks read the round in progress up to some clock and
    # the round before after it.  Each clock's directory has 1 MiB of filler, so a copy
    # made while the writer runs, in whatever order it visits the directories, reads
    # the first and last of them at least 58 MiB (many rounds) apart.
    fill = (
        f"for k in $(seq 0 {_CLOCKS - 1}); do mkdir -p ~/clocks/d$k &&"
        " head -c 1048576 /dev/urandom > ~/clocks/d$k/fill || exit 1; done"
    )
    _sh(client, sid, fill)
    client.jobs.run(sid, ["python3", "-c", _CLOCK_WRITER])
    last = f"~/clocks/d{_CLOCKS - 1}/c"
    deadline = time.monotonic() + 120
    # Until the writer has gone round once (under load, its start may take a while).
    while not _sh(client, sid, f"cat {last} 2>/dev/null; true"):
        assert time.monotonic() < deadline, "the writer never wrote its last clock"
        time.sleep(0.2)
    read = f"for k in $(seq 0 {_CLOCKS - 1}); do cat ~/clocks/d$k/c; echo; done"
    for _ in range(2):
        snap = client.sessions.snapshot(sid)
        copy = client.sessions.create(snapshot=snap["snapshot_id"])["session_id"]
        cleanup.append(copy)
        client.sessions.start(copy)
        clocks = [int(v) for v in _sh(client, copy, read).split()]
        assert len(clocks) == _CLOCKS, clocks
        in_order = all(a >= b for a, b in itertools.pairwise(clocks))
        assert in_order and clocks[0] - clocks[-1] <= 1, f"torn: {clocks}"
        client.sessions.delete(copy)


# Standbys (runtime/warm_pool.py): after a restore of a running session, a sandbox of
# the snapshot's files is started ahead for the next restore to the same snapshot.


def _standby_of(srv: ServerProcess, snapshot_id: str) -> Path | None:
    """The running standby sandbox over ``snapshot_id``'s files, if any."""
    for base in (srv.data_dir / "sessions").glob("pool_*"):
        with contextlib.suppress(OSError):
            layers = (base / "snapshot-layers").read_text().split()
            if layers[:1] == [snapshot_id] and (base / "agent.log").exists():
                if (base / "run" / "agent.sock").exists():
                    return base
    return None


def _wait_for_standby(srv: ServerProcess, snapshot_id: str) -> Path:
    deadline = time.monotonic() + 60
    while (found := _standby_of(srv, snapshot_id)) is None:
        assert time.monotonic() < deadline, "no standby was started"
        time.sleep(0.05)
    return found


def _leftovers(srv: ServerProcess) -> dict[str, list[str]]:
    """This server's containers, mounts under its data dir and sandbox directories."""
    state_root = OciRuntime.state_root_for(srv.data_dir)
    listed = subprocess.run(
        ["crun", "--root", state_root, "list", "--quiet"], capture_output=True, text=True
    )
    prefix = f"{srv.data_dir.resolve()}/"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    sessions = srv.data_dir / "sessions"
    dirs = sorted(p.name for p in sessions.iterdir()) if sessions.is_dir() else []
    return {"containers": listed.stdout.split(), "mounts": mounts, "dirs": dirs}


def _wait_until_clean(srv: ServerProcess) -> None:
    deadline = time.monotonic() + 60
    while any((left := _leftovers(srv)).values()):
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.1)


@pytest.fixture
def standby_server(private_server: ServerProcess) -> ServerProcess:
    """A server of its own with no warm pool: every pool_* sandbox is a standby."""
    private_server.extra_args = ("--pool-size", "0")
    private_server.start()
    return private_server


def test_a_restore_served_by_the_standby_has_exactly_the_snapshots_files(
    standby_server: ServerProcess,
) -> None:
    srv = standby_server
    with Bastion(base_url=srv.url) as c:
        sid = c.sessions.create(limits={"memory_mb": 384, "pids": 200})["session_id"]
        c.sessions.start(sid)
        _sh(c, sid, "echo clean > ~/state; rm ~/.profile")
        snap = c.sessions.snapshot(sid)["snapshot_id"]
        c.sessions.restore(sid, snap)  # the first: a start of its own, then a standby
        for n in range(2):
            standby = _wait_for_standby(srv, snap)
            _sh(c, sid, f"echo dirty{n} > ~/state; echo junk > ~/junk{n}; touch ~/.profile")
            restored = c.sessions.restore(sid, snap)
            assert restored["status"] == "running"
            # The standby's sandbox is the session's now (its container name).
            container = (srv.data_dir / "sessions" / sid / "container").read_text()
            assert container == standby.name
            seen = _sh(c, sid, "cat ~/state; ls -A ~ | grep -c junk; test -e ~/.profile || echo no")
            assert seen == "clean\n0\nno\n"
            # The session's own limits (what crun ran it with), not the server's defaults.
            config = json.loads(
                (srv.data_dir / "sessions" / sid / "bundle" / "config.json").read_text()
            )
            resources = config["linux"]["resources"]
            assert resources["memory"]["limit"] == 384 * 1024 * 1024
            assert resources["pids"]["limit"] == 200
        c.sessions.delete(sid)
        _wait_until_clean(srv)  # no standby, no old sandbox: nothing of it at all


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["restart", "crash"])
def test_a_restart_with_a_standby_leaves_nothing_behind(
    standby_server: ServerProcess, how: signal.Signals
) -> None:
    srv = standby_server
    with Bastion(base_url=srv.url) as c:
        sid = c.sessions.create()["session_id"]
        c.sessions.start(sid)
        snap = c.sessions.snapshot(sid)["snapshot_id"]
        c.sessions.restore(sid, snap)
        _wait_for_standby(srv, snap)
    srv.stop(how)
    srv.start()
    with Bastion(base_url=srv.url) as c:
        deadline = time.monotonic() + 60
        while _standby_of(srv, snap) is not None or any(
            p.name.startswith("pool_") for p in (srv.data_dir / "sessions").iterdir()
        ):
            assert time.monotonic() < deadline, _leftovers(srv)
            time.sleep(0.1)
        if c.sessions.get(sid)["status"] != "running":
            c.sessions.start(sid)
        c.sessions.restore(sid, snap)  # works as before: a start of its own
        assert _sh(c, sid, "echo ok") == "ok\n"
        c.sessions.delete(sid)
        _wait_until_clean(srv)
