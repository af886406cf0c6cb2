"""What a job inside a real sandbox can and cannot see or do.

Every test here runs commands in a real crun sandbox behind a real `bastion serve`
and proves one isolation claim from the inside: the user it runs as, the files,
network, processes and namespaces it sees, the agent's private paths, and the
memory and pids limits.  Nothing here sends traffic to a non-loopback address.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServerProcess
from tests.security.helpers import Sessions, User, pid_holder, py, sh, sh_status

from bastion import Bastion, JobFailedError
from bastion_server.runtime.idmap import FIRST_BASE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SANDBOX_UID = 1000
#: The agent's command line: the static C agent (the only one there is).
AGENT_CMDLINES = {"/run/bastion-agent/bastion-agent"}


# --------------------------------------------------------------------------- helpers


def run_ok_eventually(client: Bastion, sid: str, script: str, within: float) -> str:
    """Retry ``script`` until one run succeeds; its stdout.  Fails with the last error."""
    deadline = time.monotonic() + within
    last = ""
    while True:
        try:
            result = client.jobs.run_and_wait(
                sid, ["sh", "-c", script], timeout=10, wait_timeout=30
            )
        except JobFailedError as exc:
            last = (
                f"status={exc.status_code} reason={exc.failure_reason} "
                f"stdout={exc.console_output[-300:]!r} stderr={exc.errout[-300:]!r}"
            )
        else:
            output = result["output"]
            assert output is not None
            return output["console_output"]
        if time.monotonic() > deadline:
            pytest.fail(
                f"session {sid} ran no job successfully within {within}s; last attempt: {last}"
            )
        time.sleep(0.5)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url) as c:
        yield c


@pytest.fixture(scope="module")
def shared_sid(client: Bastion) -> Iterator[str]:
    """One running session for read-only checks; no test leaves processes in it."""
    pool = Sessions(client)
    sid = pool.new()
    yield sid
    pool.delete_all()


def ps_lines(client: Bastion, sid: str) -> list[tuple[int, int, str, str]]:
    """(pid, ppid, user, args) of every process the job can see (including its own ps)."""
    out = sh(client, sid, "ps -eo pid=,ppid=,user=,args=")
    rows = []
    for line in out.splitlines():
        pid, ppid, user, args = line.split(None, 3)
        rows.append((int(pid), int(ppid), user, args))
    return rows


# --------------------------------------------------------------------------- identity


def test_job_runs_as_unprivileged_user(client: Bastion, shared_sid: str) -> None:
    out = sh(
        client,
        shared_sid,
        "id -u; id -g; id -un; id -G; grep -E '^(Uid|Gid):' /proc/self/status; echo $HOME",
    )
    uid, gid, name, groups, uid_line, gid_line, home = out.splitlines()
    assert (uid, gid, name) == (str(SANDBOX_UID), str(SANDBOX_UID), "user")
    assert "0" not in groups.split(), f"the job is in group root: {groups}"
    # real, effective, saved and filesystem ids: all the sandbox user's
    assert uid_line.split()[1:] == [str(SANDBOX_UID)] * 4, uid_line
    assert gid_line.split()[1:] == [str(SANDBOX_UID)] * 4, gid_line
    assert home == "/home/user"


def test_hostname_is_not_the_hosts(client: Bastion, shared_sid: str) -> None:
    inside = sh(client, shared_sid, "hostname; cat /proc/sys/kernel/hostname").split()
    assert inside[0] == inside[1]
    assert inside[0] not in (socket.gethostname(), Path("/etc/hostname").read_text().strip())


def test_user_namespace_maps_sandbox_root_to_unprivileged_host_id(
    client: Bastion, shared_sid: str
) -> None:
    out = sh(client, shared_sid, "cat /proc/self/uid_map; echo --; cat /proc/self/gid_map")
    uid_map, gid_map = out.split("--\n")
    for table in (uid_map, gid_map):
        rows = [tuple(int(x) for x in line.split()) for line in table.strip().splitlines()]
        # exactly one range: container 0.. -> the session's own host range, never host 0
        assert len(rows) == 1 and rows[0][0] == 0 and rows[0][2] == 65536, rows
        assert rows[0][1] >= FIRST_BASE, rows
        base = rows[0][1]
        for _inside, outside, count in rows:
            assert not (outside <= 0 < outside + count), "host root is mapped into the sandbox"
    # Seen from the host, the job's process runs as host uid base + 1000.
    tag = f"{secrets.randbelow(10**6)}.{secrets.randbelow(10**6) + 1}"
    job = client.jobs.run(shared_sid, ["sleep", tag], timeout=30)
    try:
        uids: list[str] = []
        deadline = time.monotonic() + 10
        while not uids and time.monotonic() < deadline:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if cmdline == f"sleep\0{tag}\0".encode():
                        status = Path(f"/proc/{pid}/status").read_text()
                        uids = re.findall(r"^Uid:\s+(.*)$", status, re.M)[0].split()
                except (OSError, IndexError):
                    continue
            time.sleep(0.05)
        assert uids == [str(base + SANDBOX_UID)] * 4, uids
    finally:
        with contextlib.suppress(JobFailedError):
            client.jobs.run_and_wait(shared_sid, ["pkill", "-x", "sleep"], wait_timeout=30)
        with contextlib.suppress(JobFailedError):
            client.jobs.wait(shared_sid, job["job_id"], timeout=60)


def test_job_has_no_capabilities_and_no_new_privileges(client: Bastion, shared_sid: str) -> None:
    out = sh(client, shared_sid, "grep -E '^(Cap(Inh|Prm|Eff|Amb)|NoNewPrivs):' /proc/self/status")
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert fields == {
        "CapInh": "0000000000000000",
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "1",
    }, fields


def test_job_runs_under_a_seccomp_filter(client: Bastion, shared_sid: str, as_user: User) -> None:
    out = sh(client, shared_sid, "grep -E '^Seccomp(_filters)?:' /proc/self/status", user=as_user)
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert fields.get("Seccomp") == "2", f"no seccomp filter on the job: {fields}"
    # New namespaces are a classic kernel attack surface; the job cannot make one.
    code, out, err = sh_status(client, shared_sid, "unshare -U true", user=as_user)
    assert code != 0, f"the job created a user namespace: {out!r} {err!r}"


def test_privileged_operations_fail_for_the_job(client: Bastion, shared_sid: str) -> None:
    code, _, err = sh_status(client, shared_sid, "hostname evil")
    assert code != 0, err
    code, _, _ = sh_status(client, shared_sid, "touch /etc/bastion-probe")
    assert code != 0
    assert sh(client, shared_sid, "hostname").strip() != "evil"


# --------------------------------------------------------------------------- host files


@pytest.fixture
def host_canaries(server: ServerProcess) -> Iterator[tuple[str, list[str]]]:
    """A random secret written to world-readable host files under /tmp and the data dir."""
    secret = "bastion-canary-" + secrets.token_hex(16)
    tmp_dir = tempfile.mkdtemp(prefix="bastion-canary-", dir="/tmp")
    os.chmod(tmp_dir, 0o755)
    paths = [
        os.path.join(tmp_dir, "secret.txt"),
        str(server.data_dir / f"canary-{secrets.token_hex(4)}.txt"),
        str(server.data_dir / "sessions" / f"canary-{secrets.token_hex(4)}.txt"),
    ]
    for path in paths:
        Path(path).write_text(secret + "\n")
        os.chmod(path, 0o644)
    try:
        yield secret, paths
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for path in paths[1:]:
            Path(path).unlink(missing_ok=True)


def test_host_files_are_invisible(
    client: Bastion, shared_sid: str, host_canaries: tuple[str, list[str]], as_user: User
) -> None:
    # As root of the session too, which reads every file of the sandbox's (dac_override).
    secret, paths = host_canaries
    for path in paths:
        assert Path(path).read_text().strip() == secret  # it is really there, on the host
        code, out, err = sh_status(client, shared_sid, 'cat "$P"', env={"P": path}, user=as_user)
        assert code != 0, f"{path} is readable inside the sandbox"
        assert secret not in out
        assert "No such file or directory" in err, err
    # The whole filesystem the job sees, except the kernel's pseudo filesystems.  The
    # secrets are passed in the environment, so only /proc (excluded) holds a copy.  A
    # control string planted inside the sandbox proves the search does find things.
    control = "bastion-control-" + secrets.token_hex(16)
    control_file = f"/home/user/control-{secrets.token_hex(4)}.txt"
    client.files.upload(shared_sid, control.encode(), control_file)
    try:
        out = sh(
            client,
            shared_sid,
            'timeout 90 grep -rlsF -e "$NEEDLE" -e "$CONTROL" --exclude-dir=proc '
            '--exclude-dir=sys --exclude-dir=dev / ; echo "grep-exit=$?"',
            env={"NEEDLE": secret, "CONTROL": control},
            user=as_user,
        )
    finally:
        client.files.delete(shared_sid, control_file)
    lines = out.strip().splitlines()
    assert lines[-1] in ("grep-exit=0", "grep-exit=2"), out  # 2: unreadable files skipped
    assert lines[:-1] == [control_file], f"host secret found in the sandbox: {out}"


def test_server_data_dir_is_not_in_the_sandbox(
    client: Bastion, shared_sid: str, server: ServerProcess, as_user: User
) -> None:
    code, out, err = sh_status(
        client, shared_sid, 'ls -a "$D"', env={"D": str(server.data_dir)}, user=as_user
    )
    assert code != 0 and "No such file or directory" in err, (out, err)
    # Only the agent's own read-only copy is shared: no database, logs or other sessions.
    listing = sh(client, shared_sid, "ls -A /run/bastion-agent", user=as_user).split()
    assert listing and set(listing) <= {"bastion-agent", "resolv.conf"}


# --------------------------------------------------------------------------- network


def test_only_loopback_and_no_route(client: Bastion, shared_sid: str) -> None:
    links = sh(client, shared_sid, "ip -o link").strip().splitlines()
    names = [line.split(":")[1].strip() for line in links]
    assert names == ["lo"], links
    assert sh(client, shared_sid, "ls /sys/class/net").split() == ["lo"]
    assert (
        sh(
            client,
            shared_sid,
            "ip route show table all | grep -v '^local\\|^broadcast' | grep -v 'dev lo' ; true",
        ).strip()
        == ""
    )
    assert sh(client, shared_sid, "ip -4 route").strip() == ""
    assert "default" not in sh(client, shared_sid, "ip -6 route 2>/dev/null; true")
    # the kernel's own table: a header line and no routes
    assert len(sh(client, shared_sid, "cat /proc/net/route").strip().splitlines()) <= 1


def test_host_api_port_is_not_reachable_from_the_sandbox(
    client: Bastion, shared_sid: str, server: ServerProcess, as_user: User
) -> None:
    # The host can reach the port ...
    assert httpx.get(server.url + "/v1/health", timeout=10).status_code == 200
    # ... the sandbox's 127.0.0.1 is another loopback: nothing listens there, and the
    # same port is free to bind, which it could not be if the host's stack were shared.
    out = py(
        client,
        shared_sid,
        f"""
import socket
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", {server.port}))
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
s.close()
b = socket.socket()
b.bind(("127.0.0.1", {server.port}))
b.listen()
c = socket.create_connection(("127.0.0.1", {server.port}), timeout=5)
print("own-listener-ok")
""",
        user=as_user,
    )
    assert out.split() == ["ConnectionRefusedError", "own-listener-ok"], out


# --------------------------------------------------------------------------- processes


def test_job_sees_only_its_own_sandbox_processes(client: Bastion, sessions: Sessions) -> None:
    sid = sessions.new()
    rows = ps_lines(client, sid)
    by_pid = {pid: (ppid, user, args) for pid, ppid, user, args in rows}
    assert by_pid[1][2] in AGENT_CMDLINES and by_pid[1][1] == "root", rows
    job_rows = [r for r in rows if r[3] not in AGENT_CMDLINES]
    # The agent (PID 1, its server, the job's supervisor) and the job: sh and ps.
    assert [r[3] for r in job_rows] == [
        "sh -c ps -eo pid=,ppid=,user=,args=",
        "ps -eo pid=,ppid=,user=,args=",
    ], rows
    assert all(r[2] == "user" for r in job_rows), rows
    assert len(rows) <= 6, rows
    host_pids = {os.getpid(), os.getppid()}
    text = "\n".join(r[3] for r in rows)
    for needle in ("pytest", "bastion serve", "crun", "systemd", "sshd", "uvicorn"):
        assert needle not in text, f"host process {needle!r} visible: {rows}"
    # PIDs are the sandbox's own numbering, starting at 1.
    assert max(by_pid) < min(host_pids), rows


def test_two_sessions_cannot_see_each_other(
    client: Bastion, sessions: Sessions, as_user: User
) -> None:
    # B looks for A as the sandbox user, then as root of B.
    a, b = sessions.new(), sessions.new()
    marker = secrets.token_hex(8)
    sh(client, a, f"echo {marker} > /home/user/a-{marker}.txt")
    # A background process that outlives its job (distinctive duration to find it).
    sh(client, a, "nohup sleep 317 >/dev/null 2>&1 & echo started")
    assert f"a-{marker}.txt" in sh(client, a, "ls /home/user")
    assert "sleep 317" in sh(client, a, "ps -eo args"), "precondition: A's sleep runs"

    code, out, _ = sh_status(client, b, f"cat /home/user/a-{marker}.txt", user=as_user)
    assert code != 0 and marker not in out
    code, out, _ = sh_status(
        client, b, f"grep -rlsF {marker} /home /tmp /var/tmp /root", user=as_user
    )
    assert out.strip() == "", out
    assert "sleep 317" not in sh(client, b, "ps -eo args", user=as_user)
    assert all(f"a-{marker}" not in f["name"] for f in client.files.list(b, "/home/user")["files"])

    kinds = ["pid", "net", "uts", "ipc", "mnt", "cgroup"]
    script = "for n in " + " ".join(kinds) + "; do readlink /proc/self/ns/$n; done"
    ns_a, ns_b = sh(client, a, script).split(), sh(client, b, script, user=as_user).split()
    host = [os.readlink(f"/proc/self/ns/{n}") for n in kinds]
    for kind, in_a, in_b, on_host in zip(kinds, ns_a, ns_b, host, strict=True):
        assert in_a.startswith(kind + ":"), in_a
        assert in_a != in_b, f"sessions share their {kind} namespace: {in_a}"
        assert on_host not in (in_a, in_b), f"a session shares the host's {kind} namespace"
    # Each sandbox has a UTS namespace of its own; neither carries the host's name.
    names = {sh(client, a, "hostname").strip(), sh(client, b, "hostname").strip()}
    assert socket.gethostname() not in names


# --------------------------------------------------------------------------- agent paths


def test_sandbox_user_cannot_reach_the_agent(client: Bastion, shared_sid: str) -> None:
    code, _, err = sh_status(client, shared_sid, "ls /run/bastion")
    assert code != 0 and "Permission denied" in err, err
    out = py(
        client,
        shared_sid,
        """
import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("/run/bastion/agent.sock")
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
""",
    )
    assert out.strip() == "PermissionError", out
    code, _, err = sh_status(client, shared_sid, "touch /run/bastion/x")
    assert code != 0, err
    code, _, err = sh_status(client, shared_sid, "touch /run/bastion-agent/x")
    assert code != 0 and ("Read-only" in err or "Permission denied" in err), err
    code, _, err = sh_status(client, shared_sid, "echo x >> /run/bastion-agent/bastion-agent")
    assert code != 0, err
    code, _, _ = sh_status(client, shared_sid, "rm -f /run/bastion-agent/bastion-agent")
    assert "bastion-agent" in sh(client, shared_sid, "ls /run/bastion-agent").split()


# --------------------------------------------------------------------------- limits


def test_memory_hog_is_killed_and_session_survives(
    client: Bastion, sessions: Sessions, shared_sid: str, as_user: User
) -> None:
    sid = sessions.new({"memory_mb": 128})
    assert client.sessions.get(sid)["limits"]["memory_mb"] == 128
    hog = "b = b'x' * (256 * 1024 * 1024)\nprint('survived', len(b))"
    started = time.monotonic()
    with pytest.raises(JobFailedError) as info:
        client.jobs.run_and_wait(
            sid, ["python3", "-c", hog], timeout=60, wait_timeout=90, user=as_user
        )
    err = info.value
    assert err.status_code == 137 or "MemoryError" in err.errout, repr(dict(err))
    assert "survived" not in err.console_output
    assert time.monotonic() - started < 60, "the hog was not stopped by the limit"
    # Same session: still there, still runs jobs, files still work.
    assert client.sessions.get(sid)["status"] == "running"
    assert sh(client, sid, "echo alive").strip() == "alive"
    client.files.upload(sid, b"ok", "/home/user/after-oom.txt")
    assert client.files.download(sid, "/home/user/after-oom.txt") == b"ok"
    # Under the limit is fine.
    assert py(client, sid, "b = b'x' * (32 * 1024 * 1024)\nprint(len(b))").strip() == str(
        32 * 1024 * 1024
    )
    assert sh(client, shared_sid, "echo other").strip() == "other"


def test_pids_limit_caps_the_number_of_processes(
    client: Bastion, sessions: Sessions, as_user: User
) -> None:
    sid = sessions.new({"pids": 64})
    out = py(
        client,
        sid,
        """
import contextlib
import os
import re
r, w = os.pipe()
children, failure = [], None
for _ in range(500):
    try:
        pid = os.fork()
    except OSError as exc:
        failure = exc.errno
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    children.append(pid)
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
print(len(children), failure)
""",
        timeout=60,
        user=as_user,
    )
    forked, failure = out.split()
    assert failure == "11", out  # EAGAIN
    assert 0 < int(forked) < 64, out
    assert sh(client, sid, "echo alive").strip() == "alive"


def test_fork_bomb_is_contained(
    client: Bastion, sessions: Sessions, shared_sid: str, server: ServerProcess, as_user: User
) -> None:
    sid = sessions.new({"pids": 64})
    # The classic bash bomb, started by a job that stays alive, so every bomb process
    # stays in the job's tree and the server-side timeout must kill all of them.
    bomb = (
        "import subprocess, time\n"
        "subprocess.Popen(['bash', '-c', ':(){ :|:& };:'])\n"
        "time.sleep(120)\n"
    )
    started = time.monotonic()
    with pytest.raises(JobFailedError) as info:
        client.jobs.run_and_wait(
            sid, ["python3", "-c", bomb], timeout=10, wait_timeout=60, user=as_user
        )
    elapsed = time.monotonic() - started
    assert info.value.failure_reason == "timeout", repr(dict(info.value))
    assert elapsed < 40, f"the bomb's job took {elapsed:.1f}s to end"
    # While and after the bomb: the server and other sessions answer.
    assert httpx.get(server.url + "/v1/health", timeout=10).status_code == 200
    assert sh(client, shared_sid, "echo other").strip() == "other"
    # The same session runs jobs again and nothing of the bomb is left.
    out = run_ok_eventually(client, sid, "echo alive; ps -eo args", within=20)
    assert out.startswith("alive\n"), out
    assert "bash" not in out, f"bomb processes survived the job: {out}"
    assert client.sessions.get(sid)["status"] == "running"


def test_job_arriving_while_pids_are_exhausted_does_not_kill_the_session(
    client: Bastion, sessions: Sessions, shared_sid: str
) -> None:
    sid = sessions.new({"pids": 64})
    # Hold every free pid of the session until the server-side timeout kills the tree.
    hold = pid_holder(seconds=120)
    holder = client.jobs.run(sid, ["python3", "-c", hold], timeout=8)
    time.sleep(3)  # the holder has filled the pids limit by now
    # A second job now may fail to start (no pid is free), but it must get an answer
    # and must not take the session down with it.
    try:
        client.jobs.run_and_wait(sid, ["true"], timeout=5, wait_timeout=30)
    except JobFailedError:
        pass
    with pytest.raises(JobFailedError) as info:
        client.jobs.wait(sid, holder["job_id"], timeout=60)
    assert info.value.failure_reason == "timeout", (
        "the holder job should end by its server-side timeout; instead the sandbox went "
        f"away under it (agent crashed?): {dict(info.value)!r}"
    )
    assert int(info.value.console_output.split()[0]) < 64
    out = run_ok_eventually(client, sid, "echo alive", within=15)
    assert out == "alive\n"
    assert sh(client, shared_sid, "echo other").strip() == "other"


def test_detached_fork_bomb_is_contained(
    client: Bastion, sessions: Sessions, shared_sid: str, server: ServerProcess
) -> None:
    sid = sessions.new({"pids": 64})
    # The bomb outlives its job at once (the job's shell returns immediately); the pids
    # limit alone must contain it, and the session must come back once it burns out.
    started = time.monotonic()
    try:
        client.jobs.run_and_wait(sid, ["bash", "-c", ":(){ :|:& };:"], timeout=10, wait_timeout=60)
    except JobFailedError:
        pass  # failing is as fine as finishing; hanging is not
    assert time.monotonic() - started < 40
    assert httpx.get(server.url + "/v1/health", timeout=10).status_code == 200
    assert sh(client, shared_sid, "echo other").strip() == "other"
    out = run_ok_eventually(client, sid, "echo alive", within=60)
    assert out == "alive\n"
    assert client.sessions.get(sid)["status"] == "running"
