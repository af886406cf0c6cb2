"""Crash consistency: the server dies at a chosen point of an operation, then restarts.

Each test starts a server of its own with ``BASTION_FAULT`` naming a point (see
:mod:`bastion_server.faults`), does the operation, lets the server die there
(SIGKILL, or SIGTERM for ``sigterm:`` points), starts it again on the same data
directory and checks the invariants: every session is whole and usable (it starts and
runs a job) or absent, nothing is left on the host that no session owns (mounts, loop
devices, crun containers, cgroups, id-range registry entries, nftables rules), no
upload's temp file is visible, the database passes ``PRAGMA integrity_check``, and
every acknowledged job (and create) is still there.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import random
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServerProcess

from bastion_server.runtime.idmap import DEFAULT_REGISTRY, IdRangeRegistry
from bastion_server.runtime.oci import OciRuntime
from bastion_server.runtime.sandbox_fs import TEMP_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: How long a loop device may take to let go of its file after an unmount.
_SETTLE = 10.0


@dataclass
class Acknowledged:
    """What the server answered 2xx for before it died: it must all be there after."""

    sessions: set[str] = field(default_factory=set)
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> session id
    deleted: set[str] = field(default_factory=set)


def _client(srv: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=60)


def _die_and_restart(srv: ServerProcess, timeout: float = 30.0) -> int:
    """Wait for the server to die at its fault point, then start it without one."""
    assert srv.proc is not None
    try:
        srv.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not die at {srv.extra_env}:\n{srv.log_tail()}")
    code = srv.stop()
    assert code is not None
    srv.extra_env = {}
    srv.start()
    return code


def _start_with_fault(srv: ServerProcess, point: str) -> None:
    srv.extra_env = {"BASTION_FAULT": point}
    srv.start()


def _attempt(fn: object, *args: object, **kwargs: object) -> httpx.Response | None:
    """A request to a server that may die answering it: None if it did."""
    try:
        return fn(*args, **kwargs)  # type: ignore[operator,no-any-return]
    except httpx.TransportError:
        return None


# -- invariants -------------------------------------------------------------------------


def _tag(srv: ServerProcess) -> str:
    return OciRuntime._tag(srv.data_dir)


def _sessions_dir(srv: ServerProcess) -> Path:
    return srv.data_dir / "sessions"


def _container_name(srv: ServerProcess, sid: str) -> str:
    name_file = _sessions_dir(srv) / sid / "container"
    return name_file.read_text().strip() if name_file.exists() else sid


def _listed(c: httpx.Client) -> dict[str, dict[str, object]]:
    r = c.get("/v1/sessions")
    assert r.status_code == 200, r.text
    return {s["session_id"]: s for s in r.json()["sessions"]}


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4]
            if mountpoint.startswith(prefix):
                found.append(mountpoint)
    return found


def _loop_backing_files_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            text = Path(backing).read_text().strip()
        except OSError:
            continue
        if text.startswith(prefix):
            found.append(text)
    return found


def _containers(srv: ServerProcess) -> dict[str, str]:
    out = subprocess.run(
        ["crun", "--root", OciRuntime.state_root_for(srv.data_dir), "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    entries = json.loads(out) if out.strip() else []
    return {e["id"]: e["status"] for e in entries}


def _cgroups(srv: ServerProcess) -> set[str]:
    tag = _tag(srv)
    found = set()
    for pattern in (f"/sys/fs/cgroup/*/bastion/{tag}/*", f"/sys/fs/cgroup/bastion/{tag}/*"):
        found |= {os.path.basename(p) for p in glob.glob(pattern) if os.path.isdir(p)}
    return found


def _registry_owners(srv: ServerProcess) -> dict[str, int]:
    """Registry entries (host-wide) whose owner is one of this server's directories."""
    prefix = str(_sessions_dir(srv)) + "/"
    owners = {}
    for entry in DEFAULT_REGISTRY.glob("[0-9]*"):
        try:
            names = entry.read_text().split()
        except OSError:
            continue
        for owner in names:
            if owner.startswith(prefix):
                owners[owner] = int(entry.name)
    return owners


def _nft_rule_owners(srv: ServerProcess) -> set[str]:
    listing = subprocess.run(
        ["nft", "list", "chain", "inet", f"bastion_{_tag(srv)}", "sessions"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    owners = set()
    for line in listing.splitlines():
        if 'comment "' in line:
            owners.add(line.split('comment "', 1)[1].split('"', 1)[0])
    return owners


def _temp_files(srv: ServerProcess, sid: str) -> list[str]:
    upper = _sessions_dir(srv) / sid / "layer" / "upper"
    return [
        os.path.join(root, name)
        for root, dirs, files in os.walk(upper)
        for name in dirs + files
        if name.startswith(TEMP_PREFIX)
    ]


def _pool_size(srv: ServerProcess) -> int:
    args = list(srv.extra_args)
    return int(args[args.index("--pool-size") + 1]) if "--pool-size" in args else 2


def _wait_for_pool(srv: ServerProcess) -> None:
    """Until the warm pool is full (its sandboxes' agents are up), so that none is
    being made while the host is looked at."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = list(_sessions_dir(srv).glob("pool_*/run/*"))
        if len(ready) >= _pool_size(srv):
            time.sleep(0.5)  # handed to the pool a moment after its agent is up
            return
        time.sleep(0.1)
    pytest.fail(f"the warm pool did not fill:\n{srv.log_tail()}")


def _check_host(srv: ServerProcess, listed: dict[str, dict[str, object]]) -> None:
    """Nothing on the host that no live session (or the warm pool) owns."""
    _wait_for_pool(srv)
    running = {sid for sid, s in listed.items() if s["status"] == "running"}
    on_disk = {p.name for p in _sessions_dir(srv).iterdir() if p.is_dir()}
    pool = {name for name in on_disk if name.startswith("pool_")}
    assert len(pool) <= _pool_size(srv), f"warm pool sandboxes of an earlier run: {pool}"
    assert on_disk - pool <= set(listed), (
        f"session dirs of no session: {on_disk - pool - set(listed)}"
    )
    live_dirs = {str(_sessions_dir(srv) / name) for name in set(listed) | pool}
    active_dirs = {str(_sessions_dir(srv) / name) for name in running | pool}

    deadline = time.monotonic() + _SETTLE
    while True:
        stray_mounts = [
            m for m in _mounts_under(_sessions_dir(srv)) if os.path.dirname(m) not in active_dirs
        ]
        stray_loops = [
            f
            for f in _loop_backing_files_under(srv.data_dir)
            if os.path.dirname(f) not in active_dirs
        ]
        if not (stray_mounts or stray_loops) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not stray_mounts, (
        f"mounts of no running session: {stray_mounts}; containers: {_containers(srv)}"
    )
    assert not stray_loops, f"loop devices of no running session: {stray_loops}"

    containers = _containers(srv)
    expected = {_container_name(srv, sid) for sid in running} | pool
    assert set(containers) <= expected, (
        f"containers of no running session: {set(containers) - expected}"
    )
    assert all(status == "running" for status in containers.values()), containers
    cgroups = _cgroups(srv)
    assert cgroups <= expected, f"cgroups of no running session: {cgroups - expected}"

    for owner, index in _registry_owners(srv).items():
        assert owner in live_dirs, f"id range {index} registered to absent {owner}"
        recorded = IdRangeRegistry.recorded(Path(owner))
        assert recorded is not None, f"{owner} holds range {index} but does not record it"
    for name in set(listed) | pool:
        assert IdRangeRegistry.recorded(_sessions_dir(srv) / name) is not None, name

    assert _nft_rule_owners(srv) <= running, "nft rules of sessions not running"


def _check_database(srv: ServerProcess) -> None:
    db = sqlite3.connect(f"file:{srv.data_dir / 'bastion.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def _check_usable(c: httpx.Client, srv: ServerProcess, sid: str) -> None:
    status = c.get(f"/v1/sessions/{sid}").json()["status"]
    if status != "running":
        r = c.post(f"/v1/sessions/{sid}/start")
        assert r.status_code == 200, f"{sid} ({status}) cannot start: {r.text}"
    r = c.post(
        f"/v1/sessions/{sid}/jobs",
        params={"wait": 30},
        json={"command": ["sh", "-c", "echo usable > /tmp/probe && cat /tmp/probe"]},
    )
    assert r.status_code in (200, 202), r.text
    job = r.json()
    if job["status"] not in ("completed", "failed"):
        job = c.get(f"/v1/sessions/{sid}/jobs/{job['job_id']}/wait", params={"timeout": 30}).json()
    assert job["status"] == "completed", job
    assert job["output"]["console_output"] == "usable\n"
    assert not _temp_files(srv, sid), f"temp files visible in {sid}: {_temp_files(srv, sid)}"


def check_invariants(srv: ServerProcess, ack: Acknowledged) -> dict[str, dict[str, object]]:
    """Every invariant after a restart; returns the sessions listed."""
    with _client(srv) as c:
        listed = _listed(c)
        for sid in ack.sessions - ack.deleted:
            assert sid in listed, f"acknowledged session {sid} is gone"
        for sid in ack.deleted:
            r = c.get(f"/v1/sessions/{sid}")
            assert r.status_code == 404 or r.json()["status"] == "deleted", r.text
            assert sid not in listed
        for job_id, sid in ack.jobs.items():
            if sid in ack.deleted:
                continue
            r = c.get(f"/v1/sessions/{sid}/jobs/{job_id}")
            assert r.status_code == 200, f"acknowledged job {job_id}: {r.text}"
        _check_host(srv, listed)
        _check_database(srv)
        for sid in listed:
            _check_usable(c, srv, sid)
        _check_host(srv, _listed(c))
    return listed


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def pooled(private_server: ServerProcess) -> Iterator[ServerProcess]:
    """A private server with the default warm pool."""
    yield private_server
    private_server.extra_env = {}
    print(private_server.log_tail(20000))  # shown when the test failed


@pytest.fixture
def srv(pooled: ServerProcess) -> ServerProcess:
    """A private server without the warm pool (so create allocates in the request)."""
    pooled.extra_args = ("--pool-size", "0")
    return pooled


def _create(c: httpx.Client, key: str | None = None, **body: object) -> httpx.Response | None:
    headers = {"Idempotency-Key": key} if key else {}
    return _attempt(c.post, "/v1/sessions", json=body, headers=headers)


def _running_session(c: httpx.Client, ack: Acknowledged, **body: object) -> str:
    r = _create(c, **body)
    assert r is not None and r.status_code == 201, r
    sid = str(r.json()["session_id"])
    ack.sessions.add(sid)
    assert c.post(f"/v1/sessions/{sid}/start").status_code == 200
    return sid


# -- create -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point",
    [
        "create.after_insert",
        "create.before_mkfs",
        "create.after_storage",
        "create.after_commit",
        "sigterm:create.before_mkfs",
    ],
)
def test_create_interrupted_leaves_nothing_half_made(srv: ServerProcess, point: str) -> None:
    _start_with_fault(srv, point)
    ack = Acknowledged()
    key = f"crash-{uuid.uuid4()}"
    with _client(srv) as c:
        first = _create(c, key, metadata={"name": "interrupted"})
        if first is not None and first.status_code == 201:  # SIGTERM lets it finish
            ack.sessions.add(first.json()["session_id"])
    _die_and_restart(srv)
    listed = check_invariants(srv, ack)
    assert len(listed) <= 1
    with _client(srv) as c:
        # A replay of the create never hands back a half-made session.
        replay = _create(c, key, metadata={"name": "interrupted"})
        assert replay is not None and replay.status_code in (200, 201), replay
        sid = replay.json()["session_id"]
        assert set(listed) <= {sid}
        _check_usable(c, srv, sid)


def test_create_acknowledged_survives_and_replays(srv: ServerProcess) -> None:
    _start_with_fault(srv, "start.before_record")
    ack = Acknowledged()
    key = f"crash-{uuid.uuid4()}"
    with _client(srv) as c:
        r = _create(c, key)
        assert r is not None and r.status_code == 201
        sid = r.json()["session_id"]
        ack.sessions.add(sid)
        assert _attempt(c.post, f"/v1/sessions/{sid}/start") is None
    _die_and_restart(srv)
    check_invariants(srv, ack)
    with _client(srv) as c:
        replay = _create(c, key)
        assert replay is not None and replay.json()["session_id"] == sid


def test_create_from_warm_pool_interrupted(pooled: ServerProcess) -> None:
    srv = pooled
    srv.extra_args = ("--pool-size", "1")
    _start_with_fault(srv, "create.mid_claim")
    _wait_for_pool(srv)
    with _client(srv) as c:
        assert _create(c) is None
    _die_and_restart(srv)
    check_invariants(srv, Acknowledged())
    srv.extra_env = {}


# -- start ------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["start.after_mounts", "start.before_record"])
def test_start_interrupted_leaves_a_startable_session(srv: ServerProcess, point: str) -> None:
    _start_with_fault(srv, point)
    ack = Acknowledged()
    with _client(srv) as c:
        r = _create(c, network={"enabled": True})
        assert r is not None and r.status_code == 201
        sid = r.json()["session_id"]
        ack.sessions.add(sid)
        assert _attempt(c.post, f"/v1/sessions/{sid}/start") is None
    _die_and_restart(srv)
    listed = check_invariants(srv, ack)
    assert set(listed) == {sid}


# -- delete -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point",
    [
        "delete.after_record",
        "delete.after_halt",
        "delete.after_stop",
        "delete.mid_remove",
        "sigterm:delete.after_stop",
    ],
)
def test_delete_interrupted_completes_after_restart(srv: ServerProcess, point: str) -> None:
    _start_with_fault(srv, point)
    ack = Acknowledged()
    with _client(srv) as c:
        doomed = _running_session(c, ack, network={"enabled": True})
        kept = _running_session(c, ack)
        job = c.post(f"/v1/sessions/{doomed}/jobs", json={"command": ["sleep", "60"]})
        assert job.status_code == 202
        ack.jobs[job.json()["job_id"]] = doomed
        ack.deleted.add(doomed)  # asked for: it must be carried through
        _attempt(c.delete, f"/v1/sessions/{doomed}")
    _die_and_restart(srv)
    listed = check_invariants(srv, ack)
    assert set(listed) == {kept}
    assert not (_sessions_dir(srv) / doomed).exists()


def test_delete_of_stopped_session_interrupted(srv: ServerProcess) -> None:
    _start_with_fault(srv, "delete.after_stop")
    ack = Acknowledged()
    with _client(srv) as c:
        sid = _running_session(c, ack)
        assert c.post(f"/v1/sessions/{sid}/stop").status_code == 200
        ack.deleted.add(sid)
        assert _attempt(c.delete, f"/v1/sessions/{sid}") is None
    _die_and_restart(srv)
    assert check_invariants(srv, ack) == {}


# -- upload -----------------------------------------------------------------------------


def _slow_body(total: int, then: threading.Event) -> Iterator[bytes]:
    chunk = b"x" * (256 * 1024)
    sent = 0
    while sent < total:
        yield chunk
        sent += len(chunk)
    then.wait(30)  # keep the request open until the server is gone


@pytest.mark.parametrize("point", ["upload.mid_write", "upload.after_link"])
def test_upload_interrupted_leaves_no_partial_file(srv: ServerProcess, point: str) -> None:
    _start_with_fault(srv, point)
    ack = Acknowledged()
    with _client(srv) as c:
        sid = _running_session(c, ack)
        files = f"/v1/sessions/{sid}/files"
        target = {"path": "/home/user/big.bin"}
        # The old file is made by a job: the fault point is on the upload path.
        r = c.post(
            f"/v1/sessions/{sid}/jobs",
            params={"wait": 30},
            json={"command": ["sh", "-c", "printf old > /home/user/big.bin"]},
        )
        assert r.json()["status"] == "completed", r.text
        done = threading.Event()
        size = 4 * 1024 * 1024 if point == "upload.mid_write" else 64 * 1024
        body = _slow_body(size, done) if point == "upload.mid_write" else b"y" * size
        thread = threading.Thread(
            target=_attempt, args=(c.put, files), kwargs={"params": target, "content": body},
        )  # fmt: skip
        thread.start()
        assert srv.proc is not None
        srv.proc.wait(timeout=30)
        done.set()
        thread.join(30)
    _die_and_restart(srv)
    check_invariants(srv, ack)
    with _client(srv) as c:
        listing = c.get(f"/v1/sessions/{sid}/files", params={"path": "/home/user"})
        assert listing.status_code == 200, listing.text
        names = [e["name"] for e in listing.json()["files"]]
        assert not [n for n in names if n.startswith(TEMP_PREFIX)], names
        download = c.get(f"/v1/sessions/{sid}/files/content", params=target)
        assert download.content == b"old"


# -- jobs -------------------------------------------------------------------------------


_INTERRUPTED = ["sh", "-c", "echo out; sleep 2"]


@pytest.mark.parametrize("point", ["job.after_insert", "job.after_start", "job.after_output"])
def test_job_interrupted_is_recorded_failed_or_taken_up(srv: ServerProcess, point: str) -> None:
    """A job the crash caught before it started is failed; one that started runs on in
    its sandbox and ends as it would have, taken up by the next server."""
    _start_with_fault(srv, point)
    ack = Acknowledged()
    with _client(srv) as c:
        sid = _running_session(c, ack)
        r = _attempt(c.post, f"/v1/sessions/{sid}/jobs", json={"command": _INTERRUPTED})
        if r is not None:
            assert r.status_code == 202
            ack.jobs[r.json()["job_id"]] = sid
    _die_and_restart(srv)
    check_invariants(srv, ack)
    with _client(srv) as c:
        jobs = c.get(f"/v1/sessions/{sid}/jobs").json()["jobs"]
        interrupted = [j for j in jobs if j["command"] == _INTERRUPTED]
        assert len(interrupted) == 1
        path = f"/v1/sessions/{sid}/jobs/{interrupted[0]['job_id']}/wait"
        job = c.get(path, params={"timeout": 30}, timeout=40).json()
        if point == "job.after_insert":  # it never started
            assert job["status"] == "failed" and job["failure_reason"] == "server_restarted"
        else:  # it was running: it ran on, and keeps its start time
            assert job["status"] == "completed", job
            assert job["output"]["console_output"] == "out\n"
            assert job["started_at"] is not None, job
            assert job["created_at"] <= job["started_at"] <= job["finished_at"]
        assert job["finished_at"]


def test_job_start_time_survives_sigkill(srv: ServerProcess) -> None:
    """A job a restart takes up again keeps the time it really started."""
    srv.start()
    ack = Acknowledged()
    with _client(srv) as c:
        sid = _running_session(c, ack)
        r = c.post(f"/v1/sessions/{sid}/jobs", json={"command": ["sleep", "30"]})
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 10
        while c.get(f"/v1/sessions/{sid}/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = c.get(f"/v1/sessions/{sid}/jobs/{job_id}").json()["started_at"]
    assert srv.proc is not None
    srv.proc.kill()
    srv.proc.wait()
    srv.stop()
    srv.start()
    with _client(srv) as c:
        job = c.get(f"/v1/sessions/{sid}/jobs/{job_id}").json()
    assert job["status"] == "running", job
    assert job["started_at"] == started


# -- randomized -------------------------------------------------------------------------


def test_kill_during_concurrent_creates(pooled: ServerProcess) -> None:
    """The issue's run: many creates at once, kill -9 at a random moment, restart."""
    srv = pooled
    srv.start()
    count, concurrency = 80, 16
    keys = [f"storm-{uuid.uuid4()}" for _ in range(count)]
    ack = Acknowledged()
    lock = threading.Lock()
    flowing = threading.Event()

    def create(key: str) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = _create(c, key)
        if r is not None and r.status_code == 201:
            with lock:
                ack.sessions.add(r.json()["session_id"])
            flowing.set()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    futures = [pool.submit(create, key) for key in keys]
    flowing.wait(60)  # creates are being answered: kill in the thick of them
    time.sleep(random.uniform(0.3, 0.8))
    assert srv.proc is not None
    srv.proc.kill()
    concurrent.futures.wait(futures, timeout=60)
    pool.shutdown()
    srv.stop()
    srv.start()
    listed = check_invariants(srv, ack)
    rolled_back = srv.log_tail(10**7).count("session create rolled back")
    print(f"{len(ack.sessions)} creates answered, {len(listed)} kept, {rolled_back} rolled back")
    with _client(srv) as c:
        before = set(listed)
        for key in keys:
            replay = _create(c, key)
            assert replay is not None and replay.status_code in (200, 201), replay
            sid = replay.json()["session_id"]
            assert sid in before or sid not in ack.sessions
        # The replays made what the crash had rolled back; all of them are whole.
        after = _listed(c)
        assert len(after) == count
        for sid in random.sample(sorted(set(after) - before), k=min(3, len(set(after) - before))):
            _check_usable(c, srv, sid)


# -- restore ----------------------------------------------------------------------------


def _aside(srv: ServerProcess, sid: str) -> list[str]:
    """A restore's old writes still on the session's disk (if it is mounted)."""
    return glob.glob(str(_sessions_dir(srv) / sid / "layer" / ".restored-*"))


def test_restore_interrupted_leaves_the_snapshots_files_and_no_old_writes(
    srv: ServerProcess,
) -> None:
    _start_with_fault(srv, "restore.after_set_aside")
    ack = Acknowledged()
    with _client(srv) as c:
        sid = _running_session(c, ack)
        write = {"command": ["sh", "-c", "echo clean > ~/state"]}
        assert c.post(f"/v1/sessions/{sid}/jobs", params={"wait": 30}, json=write).is_success
        snap = c.post(f"/v1/sessions/{sid}/snapshots").json()["snapshot_id"]
        dirty = {"command": ["sh", "-c", "echo dirty > ~/state; head -c 8M /dev/zero > ~/big"]}
        assert c.post(f"/v1/sessions/{sid}/jobs", params={"wait": 30}, json=dirty).is_success
        restore = {"snapshot_id": snap}
        assert _attempt(c.post, f"/v1/sessions/{sid}/restore", json=restore) is None
    _die_and_restart(srv)
    check_invariants(srv, ack)  # started again if it had to be, and usable
    with _client(srv) as c:
        probe = {"command": ["sh", "-c", "cat ~/state; ls ~"]}
        r = c.post(f"/v1/sessions/{sid}/jobs", params={"wait": 30}, json=probe)
        assert r.json()["output"]["console_output"] == "clean\nstate\n"
    assert _aside(srv, sid) == []
