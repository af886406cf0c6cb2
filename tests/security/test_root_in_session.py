"""Root of a session (``jobs.run(..., user="root")``) attacks what only root could.

Root inside a session is root of the session's user namespace: it owns the session's
files and may change them, but holds only the agent's few capabilities (no
CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_MKNOD, CAP_SYS_PTRACE...), runs under the same
seccomp filter, with no new privileges, in the session's cgroup.  Each test tries an
attack that the sandbox user could not even begin, and proves it has no effect
outside the sandbox.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import IMAGES_DIR, ServerProcess
from tests.security.helpers import Sessions, py, run_ok, run_status

from bastion import Bastion, SessionStateError

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.security]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url, timeout=120) as c:
        yield c


def root_sh(client: Bastion, sid: str, script: str) -> str:
    return run_ok(client, sid, ["sh", "-c", script], user="root")


@pytest.fixture
def host_listener() -> Iterator[tuple[str, list[bytes]]]:
    """A Unix socket on the host that anyone may connect to, recording what it gets."""
    tmp = tempfile.mkdtemp(prefix="bastion-h7-", dir="/tmp")
    os.chmod(tmp, 0o755)
    path = os.path.join(tmp, "host.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(8)
    server.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(2)
            try:
                got.append(conn.recv(65536))
            except OSError:
                got.append(b"")
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield path, got
    finally:
        stop.set()
        thread.join(5)
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


def swap_agent_socket_for_link(client: Bastion, sid: str, target: str) -> None:
    """As root of the session: put a link to ``target`` in the agent socket's place."""
    listing = root_sh(
        client,
        sid,
        f"ln -sfn {target} /run/bastion/agent.sock.new && "
        "mv -fT /run/bastion/agent.sock.new /run/bastion/agent.sock && "
        "ls -l /run/bastion/agent.sock",
    )
    assert f"-> {target}" in listing, listing  # control: the link is in place


def fresh_agent_connections(
    client: Bastion, sid: str, argv: list[str], wait: float = 30
) -> list[str]:
    """Run ``argv`` so that the server connects to the agent anew: jobs with limits of
    their own (their cgroup goes with the request, on a connection of its own), and
    more at once than the idle connections kept.  Each job's outcome."""
    jobs = [client.jobs.run(sid, argv, limits={"memory_mb": 64}) for _ in range(3)]
    jobs += [client.jobs.run(sid, argv) for _ in range(6)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(client.jobs.wait(sid, job["job_id"], timeout=wait)["status"])
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


def test_agent_socket_swapped_for_a_link_to_a_host_socket_is_not_followed(
    client: Bastion, sessions: Sessions, host_listener: tuple[str, list[bytes]]
) -> None:
    path, got = host_listener
    # Control: the host socket takes connections and records them.
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)
        probe.sendall(b"control")
    deadline = time.monotonic() + 5
    while got != [b"control"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == [b"control"], got
    got.clear()
    sid = sessions.new()
    swap_agent_socket_for_link(client, sid, path)
    outcomes = fresh_agent_connections(client, sid, ["echo", "hello"])
    time.sleep(0.5)
    assert got == [], f"the server connected to a host socket the sandbox named: {got[:1]}"
    # The jobs that needed a new connection failed (the session broke its own agent).
    assert "completed" not in outcomes[:3], outcomes


def test_agent_socket_swapped_for_a_link_to_another_session_runs_nothing_there(
    client: Bastion, sessions: Sessions, server: ServerProcess
) -> None:
    attacker, victim = sessions.new(), sessions.new()
    victim_socket = server.data_dir / "sessions" / victim / "run" / "agent.sock"
    assert victim_socket.is_socket(), victim_socket
    swap_agent_socket_for_link(client, attacker, str(victim_socket))
    marker = f"/tmp/planted-{secrets.token_hex(4)}"
    fresh_agent_connections(client, attacker, ["sh", "-c", f"echo x > {marker}"])
    victim_tmp = run_ok(client, victim, ["ls", "-A", "/tmp"])
    assert marker.rsplit("/", 1)[1] not in victim_tmp, "a job of one session ran in another"


# --------------------------------------------------------------------------- what only root tries

# Runs as root of the session.  Each attack is one the sandbox user could not begin; an
# attack that "works" is harmless to the host by construction (own files, own network
# namespace, own agent), so the test can report it rather than suffer it.
ROOT_PROBE = r"""
import ctypes, errno, json, os, resource, signal, socket, stat, struct, time

libc = ctypes.CDLL(None, use_errno=True)
r = {}


def name(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))


def attempt(key, fn):
    try:
        fn()
        r[key] = "ok"
    except OSError as exc:
        r[key] = name(exc)


def write(path, data):
    with open(path, "w") as f:
        f.write(data)


def mount(source, target, fstype, flags, data=None):
    ctypes.set_errno(0)
    if libc.mount(source, target, fstype, ctypes.c_ulong(flags), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()


r["control:uid"] = os.getuid()
r["control:CapEff"] = status("CapEff")
r["control:NoNewPrivs"] = status("NoNewPrivs")
attempt("control:write own /etc", lambda: write("/etc/bastion-root-probe", "mine\n"))

# Devices: make one (block: the host's disk; char: kernel memory), or find one to open.
def mknod(path, kind, major, minor):
    return lambda: os.mknod(path, kind | 0o600, os.makedev(major, minor))


attempt("mknod block 8:0", mknod("/tmp/sda", stat.S_IFBLK, 8, 0))
attempt("mknod char 1:1 (mem)", mknod("/tmp/mem", stat.S_IFCHR, 1, 1))
attempt("mknod char 0:0 (whiteout)", mknod("/tmp/wh", stat.S_IFCHR, 0, 0))
r["block devices in /dev"] = sorted(
    os.path.join(d, f) for d, _, fs in os.walk("/dev") for f in fs
    if stat.S_ISBLK(os.lstat(os.path.join(d, f)).st_mode)
)
attempt("open /dev/kmsg", lambda: os.close(os.open("/dev/kmsg", os.O_RDONLY)))
attempt("open /proc/kmsg", lambda: os.close(os.open("/proc/kmsg", os.O_RDONLY)))

# Mounts: the root filesystem and the agent's read-only mounts made writable; the
# kernel's filesystems mounted afresh (to reach the host's view of them).
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
attempt("remount / rw", lambda: mount(b"none", b"/", None, MS_REMOUNT | MS_BIND))
attempt("remount /run/bastion-agent rw",
        lambda: mount(b"none", b"/run/bastion-agent", None, MS_REMOUNT | MS_BIND))
attempt("remount /sys rw", lambda: mount(b"none", b"/sys", None, MS_REMOUNT | MS_BIND))
attempt("remount /proc/sys rw", lambda: mount(b"none", b"/proc/sys", None, MS_REMOUNT | MS_BIND))
attempt("mount sysfs", lambda: mount(b"sysfs", b"/mnt", b"sysfs", 0))
attempt("mount proc", lambda: mount(b"proc", b"/mnt", b"proc", 0))
attempt("mount cgroup2", lambda: mount(b"none", b"/mnt", b"cgroup2", 0))
attempt("bind / on /mnt", lambda: mount(b"/", b"/mnt", None, MS_BIND))

# Kernel settings and the session's own limits.
for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
             "/proc/sys/vm/overcommit_memory", "/proc/sys/net/ipv4/ip_forward",
             "/proc/sysrq-trigger", "/sys/kernel/uevent_helper", "/sys/kernel/mm/ksm/run",
             "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/pids.max",
             "/sys/fs/cgroup/cgroup.procs"):
    attempt("write " + path, lambda path=path: write(path, "1\n"))
attempt("oom_score_adj -1000", lambda: write("/proc/self/oom_score_adj", "-1000\n"))


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1))
    except ValueError:  # Python's word for EPERM here
        raise PermissionError(errno.EPERM, "not allowed to raise maximum limit")


attempt("raise RLIMIT_NOFILE hard", raise_nofile)

# The shared, read-only files every session sees (one tmpfs for all sessions).
attempt("write /run/bastion-agent/x", lambda: write("/run/bastion-agent/x", "x"))
attempt("write /etc/resolv.conf", lambda: write("/etc/resolv.conf", "nameserver 127.0.0.9\n"))
attempt("rename over /etc/resolv.conf", lambda: (write("/tmp/resolv", "x"),
                                                 os.rename("/tmp/resolv", "/etc/resolv.conf")))

# File capabilities: a binary that would grant capabilities to whoever runs it.
attempt("setxattr security.capability", lambda: os.setxattr(
    "/etc/bastion-root-probe", "security.capability",
    struct.pack("<IIIII", 0x02000001, 0xFFFFFFFF, 0, 0xFFFFFFFF, 0)))
# Ids outside the session's range do not exist for it.
attempt("chown to an unmapped id", lambda: os.chown("/etc/bastion-root-probe", 70000, 70000))
attempt("setuid to an unmapped id", lambda: os.setresuid(70000, 70000, 70000))


# Network administration over raw netlink (no tools needed): an address on lo, and a
# nftables table (the host's filtering is nftables; this namespace is the session's).
def netlink(protocol, messages):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        s.bind((0, 0))
        s.sendall(b"".join(messages))
        s.settimeout(2)
        while True:
            data = s.recv(65536)
            while data:
                length, kind = struct.unpack("=IH", data[:6])
                if kind == 2:  # NLMSG_ERROR
                    code = struct.unpack("=i", data[16:20])[0]
                    return "ok" if code == 0 else errno.errorcode.get(-code, str(-code))
                data = data[(length + 3) & ~3:]
    except OSError as exc:
        return name(exc)
    finally:
        s.close()


def nlmsg(kind, flags, seq, payload):
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def rtattr(kind, value):
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


REQ_ACK_CREATE = 0x1 | 0x4 | 0x400 | 0x200
addr = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, socket.if_nametoindex("lo"))
addr += rtattr(2, socket.inet_aton("10.99.0.1")) + rtattr(1, socket.inet_aton("10.99.0.1"))
r["netlink RTM_NEWADDR on lo"] = netlink(0, [nlmsg(20, REQ_ACK_CREATE, 1, addr)])
link = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, socket.if_nametoindex("lo"), 0, 0)
r["netlink RTM_SETLINK lo down"] = netlink(0, [nlmsg(19, 0x1 | 0x4, 2, link)])
nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(10))  # NFNL_SUBSYS_NFTABLES
table = struct.pack("=BBH", 1, 0, 0) + rtattr(1, b"bastion_probe\0")  # NFPROTO_INET
r["netlink nftables NEWTABLE"] = netlink(12, [
    nlmsg(0x10, 0x1, 3, nfgen),  # NFNL_MSG_BATCH_BEGIN
    nlmsg((10 << 8) | 0, REQ_ACK_CREATE, 4, table),  # NFT_MSG_NEWTABLE
    nlmsg(0x11, 0x1, 5, nfgen),  # NFNL_MSG_BATCH_END
])
attempt("socket AF_PACKET", lambda: socket.socket(17, socket.SOCK_RAW, 0x0300).close())
attempt("socket AF_INET SOCK_RAW", lambda: socket.socket(
    socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())

# The agent (PID 1): reading its memory (process_vm_readv), stopping or killing it.
buf = ctypes.create_string_buffer(8)
local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
remote = (ctypes.c_void_p * 2)(0x400000, 8)
ctypes.set_errno(0)
ret = libc.process_vm_readv(1, local, 1, remote, 1, 0)
r["process_vm_readv of the agent"] = "ok" if ret >= 0 else errno.errorcode.get(
    ctypes.get_errno(), "?")
# The agent's processes (PID 1, its server, each job's supervisor: forks that never
# exec, so their command line is the agent's): their memory (to take one over), their
# descriptors (the host's log file, the spools of jobs, cgroup descriptors from the
# host) and their environment.
agents = sorted(
    int(p) for p in os.listdir("/proc") if p.isdigit()
    and open(f"/proc/{p}/cmdline", "rb").read().startswith(b"/run/bastion-agent/")
)
r["control:agent processes"] = len(agents)
for i, pid in enumerate(agents[:3]):
    who = "agent" if pid == 1 else f"agent process {i}"
    attempt(f"open /proc/<{who}>/mem rw", lambda pid=pid: os.close(
        os.open(f"/proc/{pid}/mem", os.O_RDWR)))
    attempt(f"list /proc/<{who}>/fd", lambda pid=pid: [
        os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")])
    attempt(f"read /proc/<{who}>/environ", lambda pid=pid: open(
        f"/proc/{pid}/environ", "rb").read())
for sig in ("SIGSTOP", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGKILL"):
    attempt("kill agent " + sig, lambda sig=sig: os.kill(1, getattr(signal, sig)))
time.sleep(0.3)
r["agent state after the signals"] = open("/proc/1/stat").read().rsplit(")", 1)[1].split()[0]
print(json.dumps(r))
"""

#: What each root attack must come to (``"ok"`` only where the effect stays inside).
ROOT_EXPECTED: dict[str, frozenset[str]] = {
    "mknod block 8:0": frozenset({"EPERM"}),
    "mknod char 1:1 (mem)": frozenset({"EPERM"}),
    "mknod char 0:0 (whiteout)": frozenset({"EPERM"}),
    "open /dev/kmsg": frozenset({"ENOENT", "EPERM", "EACCES"}),
    "open /proc/kmsg": frozenset({"ENOENT", "EPERM", "EACCES"}),
    "remount / rw": frozenset({"EPERM"}),
    "remount /run/bastion-agent rw": frozenset({"EPERM"}),
    "remount /sys rw": frozenset({"EPERM"}),
    "remount /proc/sys rw": frozenset({"EPERM"}),
    "mount sysfs": frozenset({"EPERM"}),
    "mount proc": frozenset({"EPERM"}),
    "mount cgroup2": frozenset({"EPERM"}),
    "bind / on /mnt": frozenset({"EPERM"}),
    "write /proc/sys/kernel/core_pattern": frozenset({"EROFS"}),
    "write /proc/sys/kernel/modprobe": frozenset({"EROFS", "ENOENT"}),
    "write /proc/sys/vm/overcommit_memory": frozenset({"EROFS"}),
    "write /proc/sys/net/ipv4/ip_forward": frozenset({"EROFS"}),
    "write /proc/sysrq-trigger": frozenset({"EROFS", "ENOENT"}),
    "write /sys/kernel/uevent_helper": frozenset({"EROFS", "ENOENT"}),
    "write /sys/kernel/mm/ksm/run": frozenset({"EROFS", "ENOENT"}),
    "write /sys/fs/cgroup/memory.max": frozenset({"EROFS", "ENOENT"}),
    "write /sys/fs/cgroup/pids.max": frozenset({"EROFS", "ENOENT"}),
    "write /sys/fs/cgroup/cgroup.procs": frozenset({"EROFS", "ENOENT"}),
    "oom_score_adj -1000": frozenset({"EACCES", "EPERM"}),
    "raise RLIMIT_NOFILE hard": frozenset({"EPERM"}),
    "write /run/bastion-agent/x": frozenset({"EROFS"}),
    "write /etc/resolv.conf": frozenset({"EROFS"}),
    "rename over /etc/resolv.conf": frozenset({"EBUSY"}),
    "setxattr security.capability": frozenset({"EPERM"}),
    "chown to an unmapped id": frozenset({"EINVAL"}),
    "setuid to an unmapped id": frozenset({"EINVAL"}),
    "netlink RTM_NEWADDR on lo": frozenset({"EPERM"}),
    "netlink RTM_SETLINK lo down": frozenset({"EPERM"}),
    "netlink nftables NEWTABLE": frozenset({"EPERM"}),
    "socket AF_PACKET": frozenset({"EPERM", "EAFNOSUPPORT"}),
    "socket AF_INET SOCK_RAW": frozenset({"EPERM"}),
    "process_vm_readv of the agent": frozenset({"EPERM"}),
    "open /proc/<agent>/mem rw": frozenset({"EACCES", "EPERM"}),
    "list /proc/<agent>/fd": frozenset({"EACCES", "EPERM"}),
    "read /proc/<agent>/environ": frozenset({"EACCES", "EPERM"}),
    "open /proc/<agent process 1>/mem rw": frozenset({"EACCES", "EPERM"}),
    "list /proc/<agent process 1>/fd": frozenset({"EACCES", "EPERM"}),
    "read /proc/<agent process 1>/environ": frozenset({"EACCES", "EPERM"}),
    # Signals to PID 1 from inside its PID namespace: the kernel drops those PID 1 has
    # no handler for (all of these), so the "ok" of kill(2) changes nothing.
    "kill agent SIGSTOP": frozenset({"ok"}),
    "kill agent SIGTERM": frozenset({"ok"}),
    "kill agent SIGINT": frozenset({"ok"}),
    "kill agent SIGHUP": frozenset({"ok"}),
    "kill agent SIGQUIT": frozenset({"ok"}),
    "kill agent SIGKILL": frozenset({"ok"}),
}


@pytest.fixture(scope="module")
def root_probe(client: Bastion) -> Iterator[tuple[str, dict[str, Any]]]:
    """The session the root probe ran in, and every attack's outcome."""
    pool = Sessions(client)
    sid = pool.new()
    try:
        out = py(client, sid, ROOT_PROBE, timeout=60, user="root")
        yield sid, dict(json.loads(out))
    finally:
        pool.delete_all()


def test_root_probe_runs_as_root_of_the_session(root_probe: tuple[str, dict[str, Any]]) -> None:
    _, got = root_probe
    # Root of the namespace with the agent's capabilities (chown, dac_override, fowner,
    # kill, setgid, setuid) and no more; no new privileges; its own files writable.
    assert got["control:uid"] == 0
    assert got["control:CapEff"] == "00000000000000eb", got["control:CapEff"]
    assert got["control:NoNewPrivs"] == "1"
    assert got["control:write own /etc"] == "ok"
    assert got["block devices in /dev"] == []
    assert got["control:agent processes"] >= 2, got  # PID 1 and the agent's server


@pytest.mark.parametrize("attack", sorted(ROOT_EXPECTED))
def test_root_attack_has_no_effect_outside(
    root_probe: tuple[str, dict[str, Any]], attack: str
) -> None:
    _, got = root_probe
    assert got[attack] in ROOT_EXPECTED[attack], f"{attack}: got {got[attack]}"


def test_the_agent_outlives_roots_signals_and_the_host_keeps_its_files(
    client: Bastion, root_probe: tuple[str, dict[str, Any]], server: ServerProcess
) -> None:
    sid, got = root_probe
    assert got["agent state after the signals"] in ("S", "R"), got
    # The agent still serves jobs, as both users.
    assert run_ok(client, sid, ["id", "-u"]).strip() == "1000"
    assert run_ok(client, sid, ["id", "-u"], user="root").strip() == "0"
    # Root's write to /etc stayed in the session's own layer: not in the image.
    images = [p for p in Path(IMAGES_DIR).glob("*/rootfs") if p.is_dir()]
    assert images, f"no image root filesystems under {IMAGES_DIR}"
    for rootfs in images:
        assert not (rootfs / "etc" / "bastion-root-probe").exists(), rootfs
    # The shared resolver configuration is what the server wrote.
    assert "127.0.0.9" not in run_ok(client, sid, ["cat", "/etc/resolv.conf"])


def test_a_setuid_file_root_made_gives_the_user_nothing(
    client: Bastion, sessions: Sessions
) -> None:
    sid = sessions.new()
    # Root of the session may make a setuid-root program (its own file)...
    root_sh(client, sid, "cp /usr/bin/id /tmp/id-suid && chmod 4755 /tmp/id-suid")
    mode = run_ok(client, sid, ["stat", "-c", "%a %u", "/tmp/id-suid"]).split()
    assert mode == ["4755", "0"], mode
    # ... but no new privileges: run by the sandbox user it stays the sandbox user.
    assert run_ok(client, sid, ["/tmp/id-suid", "-u"]).strip() == "1000"
    assert run_ok(client, sid, ["/tmp/id-suid", "-u"], user="root").strip() == "0"  # control


def test_root_killing_the_agent_stops_its_own_session_only(
    client: Bastion, sessions: Sessions
) -> None:
    # PID 1 ignores signals from inside (above), but the agent's server is an ordinary
    # process of the session's root: root may kill it, which ends the sandbox.  That is
    # the session's own loss: it is reported stopped, with why, starts again with its
    # files, and no other session notices.
    sid, other = sessions.new(), sessions.new()
    run_ok(client, sid, ["sh", "-c", "echo kept > /home/user/kept.txt"])
    kill = "for p in $(pgrep -f /run/bastion-agent/); do [ $p = 1 ] || kill -9 $p; done"
    code, _, err = run_status(client, sid, ["sh", "-c", kill], user="root")
    assert code is None and "went away" in err, (code, err)  # its own job went with it
    # The next job finds no agent, or the session already being stopped for it (the
    # server saw its sandbox gone when the job before was lost): it does not run.
    try:
        code, _, err = run_status(client, sid, ["true"])
    except SessionStateError:  # recorded stopped before it came
        pass
    else:
        gone = ("unreachable", "went away", "stopped while the job ran")
        assert code is None and any(why in err for why in gone), (code, err)
    deadline = time.monotonic() + 15
    while (info := client.sessions.get(sid))["status"] != "stopped":
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert "exited unexpectedly" in (info["status_reason"] or ""), info
    assert run_ok(client, other, ["echo", "fine"]) == "fine\n"
    client.sessions.start(sid)
    assert run_ok(client, sid, ["cat", "/home/user/kept.txt"]) == "kept\n"


# A fake agent root may put in the real one's place: to every connection it answers a
# frame that announces 2 GiB, or one of garbage, and hangs up.
FAKE_AGENT = r"""
import os, socket, struct
path = "/run/bastion/agent.sock"
os.unlink(path)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(16)
print("listening", flush=True)
n = 0
while True:
    conn, _ = listener.accept()
    n += 1
    if n % 2:
        conn.sendall(b"J" + struct.pack(">I", 2**31))
    else:
        conn.sendall(b"J" + struct.pack(">I", 9) + b"not json!")
    conn.close()
"""


def test_a_fake_agent_put_in_place_by_root_fails_its_own_jobs_only(
    client: Bastion, sessions: Sessions, server: ServerProcess
) -> None:
    sid, other = sessions.new(), sessions.new()
    fake = client.jobs.run(sid, ["python3", "-c", FAKE_AGENT], user="root", timeout=60)
    with client.jobs.stream(sid, fake["job_id"]) as events:
        for event in events:
            if "listening" in str(event.get("data", "")):
                break
    started = time.monotonic()
    outcomes = fresh_agent_connections(client, sid, ["echo", "hello"], wait=20)
    # No job "succeeds" against the fake; the server answers and stays small.
    assert "completed" not in outcomes[:3], outcomes
    assert time.monotonic() - started < 60, outcomes
    assert httpx.get(f"{server.url}/v1/health", timeout=10).status_code == 200
    assert run_ok(client, other, ["echo", "fine"]) == "fine\n"
