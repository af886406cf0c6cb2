"""An attacker inside a real session: each test tries one attack and proves it fails.

Every test runs its attack as a job in a real crun sandbox behind a real
`bastion serve`: system calls that reach kernel attack surface, writes to kernel and
system files, resource exhaustion (disk, output, CPU, processes), escaping a job's
timeout, outliving an idle timeout or a lifetime, racing the file API with symlink
swaps, and reaching another tenant's terminal.  Where an attack could fail for a
trivial reason (a typo, a missing tool), a benign control next to it must succeed,
so no test passes vacuously.  Nothing here sends traffic to a non-loopback address.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ServerProcess
from tests.security.helpers import Sessions, User, pid_holder, py, sh, sh_status

from bastion import (
    Bastion,
    FileError,
    JobFailedError,
    SessionInfo,
    SessionStateError,
    TerminalSessionNotFoundError,
)
from bastion_server.config import ServerConfig
from bastion_server.runtime.oci import OciRuntime

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.security]

MiB = 1024 * 1024
#: The server's own memory must stay under this while a session attacks it.
SERVER_RSS_LIMIT_MB = 300
#: Another session must answer a trivial job within this while one is under attack.
RESPONSIVE_WITHIN = 5.0
#: What the server keeps of each output stream (ServerConfig.max_output_bytes).
MAX_OUTPUT_BYTES = 16 * 1024 * 1024  # the server's default --max-output-bytes


# --------------------------------------------------------------------------- helpers


def assert_refused(
    client: Bastion,
    sid: str,
    scripts: Iterable[str],
    errors: tuple[str, ...] = (),
    user: User | None = None,
) -> None:
    """Each ``sh -c`` script (run as ``user``) must fail; with ``errors``, its stderr
    must name one of them."""
    for script in scripts:
        code, out, err = sh_status(client, sid, script, user=user)
        assert code != 0, f"{script!r} succeeded: {out!r}"
        if errors:
            assert any(error in err for error in errors), (script, err)


def elapsed_true(client: Bastion, sid: str) -> float:
    """Seconds a trivial job takes from request to result."""
    started = time.monotonic()
    client.jobs.run_and_wait(sid, ["true"], wait_timeout=60)
    return time.monotonic() - started


def reset_peak_rss(pid: int) -> None:
    """Reset the process's peak resident set size (VmHWM) to its current size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size since the last reset, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def server_pid(srv: ServerProcess) -> int:
    assert srv.proc is not None, "the server is not running"
    return srv.proc.pid


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def wait_for_status(
    client: Bastion, sid: str, wanted: str, within: float, poll: float = 0.2
) -> SessionInfo:
    """Poll the session until its status is ``wanted``; fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        info = client.sessions.get(sid)
        if info["status"] == wanted:
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"session {sid} is still {info['status']!r} after {within}s: {info}")
        time.sleep(poll)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Bastion]:
    with Bastion(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def sid(client: Bastion) -> Iterator[str]:
    """One running session for the attacks that leave nothing behind."""
    pool = Sessions(client, gone_ok=True)
    session_id = pool.new()
    yield session_id
    pool.delete_all()


@pytest.fixture
def sessions_gone_ok() -> bool:
    """Sessions with an idle timeout or a lifetime may be deleted before teardown."""
    return True


# --------------------------------------------------------------------------- 1. kernel surface

#: System call numbers of the attacks, per architecture (the generic table on aarch64).
SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {
        "getpid": 39, "clone": 56, "ptrace": 101, "chroot": 161, "pivot_root": 155,
        "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
        "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
        "init_module": 175, "delete_module": 176, "clock_settime": 227, "kexec_load": 246,
        "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
        "perf_event_open": 298, "setns": 308, "finit_module": 313, "kexec_file_load": 320,
        "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "open_tree": 428,
        "fsopen": 430,
    },
    "aarch64": {
        "getpid": 172, "clone": 220, "ptrace": 117, "chroot": 51, "pivot_root": 41,
        "acct": 89, "settimeofday": 170, "mount": 40, "umount2": 39, "swapon": 224,
        "swapoff": 225, "reboot": 142, "sethostname": 161, "setdomainname": 162,
        "init_module": 105, "delete_module": 106, "clock_settime": 112, "kexec_load": 104,
        "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97,
        "perf_event_open": 241, "setns": 268, "finit_module": 273, "kexec_file_load": 294,
        "bpf": 280, "userfaultfd": 282, "io_uring_setup": 425, "open_tree": 428,
        "fsopen": 430,
    },
}  # fmt: skip

# Runs inside the sandbox as the sandbox user.  Each attack is made so that it would be
# harmless if it succeeded (own child, own namespaces, unknown module, current time).
KERNEL_PROBE = r"""
import ctypes, errno, json, os, socket, struct, subprocess, time

NR = json.loads(__NR__)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWNS, SIGCHLD = 0x40000000, 0x10000000, 0x20000, 17


def raw(name, *args):
    ctypes.set_errno(0)
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return libc.syscall(ctypes.c_long(NR[name]), *conv), ctypes.get_errno()


def outcome(name, *args):
    ret, err = raw(name, *args)
    return "ok" if ret >= 0 else errno.errorcode.get(err, str(err))


def clone(flags):
    ret, err = raw("clone", flags | SIGCHLD, 0, 0, 0, 0)
    if ret == 0:
        os._exit(7)  # the child, had it been created
    if ret < 0:
        return errno.errorcode.get(err, str(err))
    return "ok:%d" % os.waitstatus_to_exitcode(os.waitpid(ret, 0)[1])


def sock(family, kind, proto=0):
    try:
        socket.socket(family, kind, proto).close()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


r = {}
target = subprocess.Popen(["sleep", "60"])
try:
    os.kill(target.pid, 0)
    r["control:ptrace target alive"] = "ok"
    r["ptrace PTRACE_ATTACH to own child"] = outcome("ptrace", 16, target.pid, 0, 0)
    r["ptrace PTRACE_TRACEME"] = outcome("ptrace", 0, 0, 0, 0)
finally:
    target.kill()
    target.wait()
r["mount tmpfs"] = outcome("mount", b"tmpfs", b"/tmp", b"tmpfs", 0, 0)
r["mount proc"] = outcome("mount", b"proc", b"/mnt", b"proc", 0, 0)
r["mount cgroup2"] = outcome("mount", b"cgroup2", b"/mnt", b"cgroup2", 0, 0)
r["umount2 /proc"] = outcome("umount2", b"/proc", 2)
r["unshare CLONE_NEWUSER"] = outcome("unshare", CLONE_NEWUSER)
r["unshare CLONE_NEWNS"] = outcome("unshare", CLONE_NEWNS)
r["unshare CLONE_NEWNET"] = outcome("unshare", CLONE_NEWNET)
ns = os.open("/proc/self/ns/net", os.O_RDONLY)
r["setns own net namespace"] = outcome("setns", ns, 0)
r["clone CLONE_NEWUSER"] = clone(CLONE_NEWUSER)
r["control:clone plain (fork)"] = clone(0)
r["init_module"] = outcome("init_module", b"\0" * 64, 64, b"")
r["finit_module"] = outcome("finit_module", ns, b"", 0)
r["delete_module"] = outcome("delete_module", b"bastion_no_such_module", 0)
r["bpf BPF_MAP_CREATE"] = outcome("bpf", 0, ctypes.create_string_buffer(128), 128)
r["add_key"] = outcome("add_key", b"user", b"bastion", b"v", 1, -2)
r["keyctl KEYCTL_GET_KEYRING_ID"] = outcome("keyctl", 0, -3, 0)
r["request_key"] = outcome("request_key", b"user", b"bastion", 0, 0)
attr = ctypes.create_string_buffer(struct.pack("II", 1, 128), 128)  # software, cpu clock
r["perf_event_open"] = outcome("perf_event_open", attr, 0, -1, -1, 0)
r["userfaultfd"] = outcome("userfaultfd", 0)
r["io_uring_setup"] = outcome("io_uring_setup", 4, ctypes.create_string_buffer(120))
r["kexec_load"] = outcome("kexec_load", 0, 0, 0, 0)
r["kexec_file_load"] = outcome("kexec_file_load", -1, -1, 0, b"", 0)
r["reboot (CAD off)"] = outcome("reboot", 0xFEE1DEAD, 672274793, 0, 0)
r["swapon"] = outcome("swapon", b"/home/user/swap", 0)
r["swapoff"] = outcome("swapoff", b"/home/user/swap")
now = time.time()
ts = ctypes.create_string_buffer(struct.pack("qq", int(now), 0))
r["clock_settime (to now)"] = outcome("clock_settime", 0, ts)
r["settimeofday (to now)"] = outcome("settimeofday", ts, 0)
r["sethostname"] = outcome("sethostname", b"evil", 4)
r["setdomainname"] = outcome("setdomainname", b"evil", 4)
r["pivot_root"] = outcome("pivot_root", b"/tmp", b"/tmp")
r["chroot"] = outcome("chroot", b"/tmp")
r["acct"] = outcome("acct", b"/tmp/acct")
r["fsopen"] = outcome("fsopen", b"tmpfs", 0)
r["open_tree"] = outcome("open_tree", -100, b"/tmp", 1)
r["socket AF_INET SOCK_RAW"] = sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
r["socket AF_INET6 SOCK_RAW"] = sock(socket.AF_INET6, socket.SOCK_RAW, 58)
r["socket AF_INET SOCK_PACKET"] = sock(socket.AF_INET, 10)
r["socket AF_PACKET SOCK_RAW"] = sock(17, socket.SOCK_RAW, 0x0300)
r["socket AF_PACKET SOCK_DGRAM"] = sock(17, socket.SOCK_DGRAM, 0x0300)
r["socket AF_VSOCK SOCK_STREAM"] = sock(40, socket.SOCK_STREAM)
r["control:socket AF_INET SOCK_STREAM"] = sock(socket.AF_INET, socket.SOCK_STREAM)
r["control:socket AF_INET SOCK_DGRAM"] = sock(socket.AF_INET, socket.SOCK_DGRAM)
r["control:socket AF_UNIX SOCK_STREAM"] = sock(socket.AF_UNIX, socket.SOCK_STREAM)
pid, err = raw("getpid")
r["control:raw getpid"] = "ok" if pid == os.getpid() else "wrong:%d" % pid
print(json.dumps(r))
"""

REFUSED = frozenset({"EPERM", "ENOSYS"})
#: A socket family the kernel lacks fails with EAFNOSUPPORT: also a failed attack.
SOCKET_REFUSED = frozenset({"EPERM", "EAFNOSUPPORT"})

KERNEL_ATTACKS: list[tuple[str, frozenset[str]]] = [
    ("mount tmpfs", REFUSED),
    ("mount proc", REFUSED),
    ("mount cgroup2", REFUSED),
    ("umount2 /proc", REFUSED),
    ("ptrace PTRACE_ATTACH to own child", REFUSED),
    ("ptrace PTRACE_TRACEME", REFUSED),
    ("unshare CLONE_NEWUSER", REFUSED),
    ("unshare CLONE_NEWNS", REFUSED),
    ("unshare CLONE_NEWNET", REFUSED),
    ("setns own net namespace", REFUSED),
    ("clone CLONE_NEWUSER", REFUSED),
    ("init_module", REFUSED),
    ("finit_module", REFUSED),
    ("delete_module", REFUSED),
    ("bpf BPF_MAP_CREATE", REFUSED),
    ("add_key", REFUSED),
    ("keyctl KEYCTL_GET_KEYRING_ID", REFUSED),
    ("request_key", REFUSED),
    ("perf_event_open", REFUSED | {"EACCES"}),
    ("userfaultfd", REFUSED),
    ("io_uring_setup", REFUSED),
    ("kexec_load", REFUSED),
    ("kexec_file_load", REFUSED),
    ("reboot (CAD off)", REFUSED),
    ("swapon", REFUSED),
    ("swapoff", REFUSED),
    ("clock_settime (to now)", REFUSED),
    ("settimeofday (to now)", REFUSED),
    ("sethostname", REFUSED),
    ("setdomainname", REFUSED),
    ("pivot_root", REFUSED),
    ("chroot", REFUSED),
    ("acct", REFUSED),
    ("fsopen", REFUSED),
    ("open_tree", REFUSED),
    ("socket AF_INET SOCK_RAW", SOCKET_REFUSED),
    ("socket AF_INET6 SOCK_RAW", SOCKET_REFUSED),
    ("socket AF_INET SOCK_PACKET", SOCKET_REFUSED),
    ("socket AF_PACKET SOCK_RAW", SOCKET_REFUSED),
    ("socket AF_PACKET SOCK_DGRAM", SOCKET_REFUSED),
    ("socket AF_VSOCK SOCK_STREAM", SOCKET_REFUSED),
]


@pytest.fixture(scope="module", params=["user", "root"])
def kernel_probe(client: Bastion, sid: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Every kernel attack's outcome (errno name, or "ok"), tried once in the session:
    as the sandbox user, and again as root of the session (``user="root"``), which
    must be refused all the same."""
    numbers = SYSCALL_NUMBERS.get(platform.machine())
    if numbers is None:
        pytest.skip(f"no system call numbers for {platform.machine()}")
    code = KERNEL_PROBE.replace("__NR__", repr(json.dumps(numbers)))
    out = py(client, sid, code, timeout=60, user=request.param)
    return dict(json.loads(out))


def test_kernel_probe_controls_succeed(kernel_probe: dict[str, str]) -> None:
    # The probe's mechanics work: a raw syscall, a fork by raw clone, ordinary sockets
    # and a live ptrace target.  So a refusal below is the sandbox's, not a probe bug.
    controls = {k: v for k, v in kernel_probe.items() if k.startswith("control:")}
    assert controls == {
        "control:ptrace target alive": "ok",
        "control:clone plain (fork)": "ok:7",
        "control:socket AF_INET SOCK_STREAM": "ok",
        "control:socket AF_INET SOCK_DGRAM": "ok",
        "control:socket AF_UNIX SOCK_STREAM": "ok",
        "control:raw getpid": "ok",
    }, controls


@pytest.mark.parametrize(("attack", "refusals"), KERNEL_ATTACKS, ids=[a for a, _ in KERNEL_ATTACKS])
def test_kernel_attack_surface_is_refused(
    kernel_probe: dict[str, str], attack: str, refusals: frozenset[str]
) -> None:
    got = kernel_probe[attack]
    assert got in refusals, f"{attack}: expected one of {sorted(refusals)}, got {got}"


def test_mount_and_umount_commands_fail(client: Bastion, sid: str, as_user: User) -> None:
    before = sh(client, sid, "cat /proc/self/mountinfo | wc -l")
    assert_refused(
        client,
        sid,
        (
            "mount -t proc proc /mnt",
            "mount -t tmpfs tmpfs /tmp",
            "mount -t cgroup2 none /mnt",
            "mount --bind / /mnt",
            "umount /proc",
            "umount -l /dev/shm",
            "umount /run/bastion-agent",
            "mount -o remount,rw /run/bastion-agent",
            "mount -o remount,rw /sys",
        ),
        errors=("must be superuser", "ermission denied", "not permitted"),
        user=as_user,
    )
    assert sh(client, sid, "cat /proc/self/mountinfo | wc -l") == before
    assert "bastion-agent" in sh(client, sid, "ls /run/bastion-agent").split()


# i386 system calls through `int 0x80` from a 64-bit process: the kernel checks them
# against the filter's x86 (32-bit) part, where socketcall(2) hides socket()'s
# arguments from seccomp.  Each call runs in a child of its own: a filter that kills
# foreign-architecture calls (SIGSYS) refuses them all; a kernel without IA32
# emulation (SIGSEGV or ENOSYS for getpid) skips the test.
COMPAT_PROBE = r"""
import ctypes, errno, json, mmap, os, signal, struct

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
MAP_32BIT = 0x40
page = libc.mmap(None, 4096, 7, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_32BIT, -1, 0)
assert page and page < 2**32, page
# f(nr, a, b, c): push rbx; mov eax,edi; mov ebx,esi; xchg edx,ecx; int 0x80; pop rbx;
# movsxd rax,eax; ret  -- eax=nr, ebx=a, ecx=b, edx=c as the i386 ABI wants them.
code = bytes.fromhex("5389f889f387cacd805b4863c0c3")
ctypes.memmove(page, code, len(code))
int80 = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                         ctypes.c_ulong)(page)
args = page + 2048  # a 32-bit addressable argument block


def call(nr, a=0, b=0, c=0, socket_args=None):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        if socket_args is not None:
            ctypes.memmove(args, struct.pack("<III", *socket_args), 12)
            b = args
        ret = int80(nr, a, b, c)
        if nr == 20:
            ret = 0 if ret == os.getpid() else -errno.ENOSYS
        os.write(w, b"ok" if ret >= 0 else errno.errorcode.get(-ret, str(-ret)).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode()
    os.close(r)
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        return "killed:" + signal.Signals(os.WTERMSIG(status)).name
    return out


r = {}
r["control:getpid"] = call(20)
r["control:socketcall AF_INET SOCK_STREAM"] = call(102, 1, socket_args=(2, 1, 0))
r["socketcall AF_VSOCK SOCK_STREAM"] = call(102, 1, socket_args=(40, 1, 0))
r["socketcall AF_PACKET SOCK_RAW"] = call(102, 1, socket_args=(17, 3, 0x0300))
r["socketcall AF_INET SOCK_RAW"] = call(102, 1, socket_args=(2, 3, 1))
r["socket(359) AF_VSOCK SOCK_STREAM"] = call(359, 40, 1, 0)
r["unshare CLONE_NEWUSER"] = call(310, 0x10000000)
r["ptrace PTRACE_TRACEME"] = call(26, 0)
r["keyctl"] = call(288, 0, 0xFFFFFFFD, 0)
r["bpf"] = call(357, 0, 0, 0)
r["userfaultfd"] = call(374, 0)
r["io_uring_setup"] = call(425, 4, 0, 0)
print(json.dumps(r))
"""


def test_32bit_system_calls_do_not_bypass_the_filter(
    client: Bastion, sid: str, as_user: User
) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the i386 system call entry exists on x86_64 only")
    result = json.loads(py(client, sid, COMPAT_PROBE, timeout=30, user=as_user))
    getpid = result.pop("control:getpid")
    inet = result.pop("control:socketcall AF_INET SOCK_STREAM")
    if getpid == "killed:SIGSYS":
        # The filter refuses the whole 32-bit entry: every call dies the same way.
        assert set(result.values()) | {inet} == {"killed:SIGSYS"}, result
        return
    if getpid != "ok":
        pytest.skip(f"no 32-bit system calls on this kernel (getpid: {getpid})")
    assert inet == "ok", "the probe's socketcall does not work"  # control
    refused = REFUSED | SOCKET_REFUSED | {"killed:SIGSYS"}
    allowed = {k: v for k, v in result.items() if v not in refused}
    assert not allowed, f"32-bit system calls the sandbox should refuse succeeded: {allowed}"


# --------------------------------------------------------------------------- 2. writes refused


def test_proc_sys_is_read_only(client: Bastion, sid: str, as_user: User) -> None:
    # Control: /proc/sys is there and readable.
    assert sh(client, sid, "cat /proc/sys/kernel/hostname").strip() == "sandbox"
    assert_refused(
        client,
        sid,
        [
            f'echo 1 > "{path}"'
            for path in (
                "/proc/sys/kernel/hostname",
                "/proc/sys/kernel/core_pattern",
                "/proc/sys/vm/drop_caches",
                "/proc/sys/net/ipv4/ip_forward",
            )
        ],
        errors=("Read-only file system", "Permission denied"),
        user=as_user,
    )
    assert sh(client, sid, "cat /proc/sys/kernel/hostname").strip() == "sandbox"
    assert "|" not in sh(client, sid, "cat /proc/sys/kernel/core_pattern")


def test_sysrq_trigger_cannot_be_written(client: Bastion, sid: str, as_user: User) -> None:
    code, out, err = sh_status(
        client, sid, "test -e /proc/sysrq-trigger && echo present || echo absent"
    )
    assert code == 0, err
    if out.strip() == "present":
        code, _, err = sh_status(client, sid, "echo h > /proc/sysrq-trigger", user=as_user)
        assert code != 0 and ("Read-only" in err or "Permission denied" in err), err
    else:  # this kernel has no sysrq; the write must still fail, not create a file
        code, _, _ = sh_status(client, sid, "echo h > /proc/sysrq-trigger", user=as_user)
        assert code != 0
        assert "absent" in sh(client, sid, "test -e /proc/sysrq-trigger && echo x || echo absent")


def test_sysfs_is_read_only(client: Bastion, sid: str, as_user: User) -> None:
    assert sh(client, sid, "cat /sys/kernel/address_bits").strip().isdigit()  # control
    assert "/sys sysfs ro," in sh(client, sid, "grep ' /sys ' /proc/mounts")
    assert_refused(
        client,
        sid,
        (
            "echo 1 > /sys/kernel/mm/ksm/run",
            "echo /tmp/x > /sys/kernel/uevent_helper",
            "echo 1 > /sys/kernel/profiling",
            "echo 9000 > /sys/class/net/lo/mtu",
            "touch /sys/kernel/bastion-probe",
            "mkdir /sys/kernel/bastion-probe",
        ),
        errors=("Read-only file system", "Permission denied", "No such file or directory"),
        user=as_user,
    )


def test_cgroup_limits_cannot_be_changed_from_inside(
    client: Bastion, sessions: Sessions, server: ServerProcess, as_user: User
) -> None:
    sid = sessions.new({"memory_mb": 96, "pids": 48})
    # The host-side truth: the session's cgroup with its limits (v1 or v2 layout).
    cgroup = f"/bastion/{OciRuntime._tag(server.data_dir)}/{sid}"
    v1 = Path("/sys/fs/cgroup/memory" + cgroup, "memory.limit_in_bytes")
    v2 = Path("/sys/fs/cgroup" + cgroup, "memory.max")
    limit_file = v1 if v1.exists() else v2
    pids_file = Path(
        "/sys/fs/cgroup/pids" + cgroup if v1.exists() else "/sys/fs/cgroup" + cgroup, "pids.max"
    )
    assert limit_file.read_text().strip() == str(96 * MiB), limit_file
    assert pids_file.read_text().strip() == "48"
    # Inside: the cgroup filesystem is not mounted (an empty read-only sysfs dir) or
    # read-only; no write to a limit, no new cgroup, no mount of it.
    mounts = sh(client, sid, "grep -E '^[^ ]+ /sys/fs/cgroup' /proc/mounts; true")
    for line in mounts.splitlines():
        assert "ro" in line.split()[3].split(","), f"a writable cgroup mount: {line}"
    if not mounts.strip():  # not mounted: an empty directory of the read-only sysfs
        assert sh(client, sid, "ls -A /sys/fs/cgroup").strip() == ""
    assert_refused(
        client,
        sid,
        (
            "echo max > /sys/fs/cgroup/memory.max",
            "echo -1 > /sys/fs/cgroup/memory/memory.limit_in_bytes",
            "echo max > /sys/fs/cgroup/pids.max",
            "echo $$ > /sys/fs/cgroup/cgroup.procs",
            "mkdir /sys/fs/cgroup/escape",
            "mount -t cgroup2 none /mnt",
            "mount -t cgroup -o memory none /mnt",
        ),
        user=as_user,
    )
    assert limit_file.read_text().strip() == str(96 * MiB)
    assert pids_file.read_text().strip() == "48"


def test_kernel_memory_and_keys_are_masked(client: Bastion, sid: str, as_user: User) -> None:
    # Control: /proc itself works.
    assert "Name:" in sh(client, sid, "cat /proc/self/status")
    out = py(
        client,
        sid,
        """
import json
r = {}
for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
             "/proc/latency_stats", "/sys/firmware"):
    try:
        with open(path, "rb") as f:
            r[path] = len(f.read(4096))
    except IsADirectoryError:
        import os
        r[path] = len(os.listdir(path))
    except OSError as exc:
        r[path] = type(exc).__name__
print(json.dumps(r))
""",
        user=as_user,
    )
    seen = json.loads(out)
    leaks = {path: got for path, got in seen.items() if isinstance(got, int) and got > 0}
    assert not leaks, f"masked kernel files show content: {leaks} (all: {seen})"
    # /proc/keys: the host keyring list, if it exists there, is not what the job reads.
    assert seen["/proc/keys"] in (0, "FileNotFoundError", "PermissionError"), seen


def test_clock_cannot_be_set(client: Bastion, sid: str, as_user: User) -> None:
    code, _, err = sh_status(client, sid, "date -s '2001-01-01 00:00:00'", user=as_user)
    assert code != 0 and "Operation not permitted" in err, err
    code, _, err = sh_status(client, sid, "date -s @$(( $(date +%s) + 3600 ))", user=as_user)
    assert code != 0, err
    inside = int(sh(client, sid, "date +%s"))
    assert abs(inside - time.time()) < 30, "the sandbox's clock moved"


def test_hostname_cannot_be_set(client: Bastion, sid: str, as_user: User) -> None:
    out = py(
        client,
        sid,
        """
import socket
try:
    socket.sethostname("evil")
    print("changed")
except PermissionError:
    print("EPERM")
print(socket.gethostname())
""",
        user=as_user,
    )
    assert out.split() == ["EPERM", "sandbox"], out
    code, _, err = sh_status(client, sid, "hostname evil", user=as_user)
    assert code != 0 and ("not permitted" in err or "must be root" in err), err
    assert sh(client, sid, "hostname; cat /proc/sys/kernel/hostname").split() == [
        "sandbox",
        "sandbox",
    ]


def test_system_files_cannot_be_chowned_or_chmodded(client: Bastion, sid: str) -> None:
    before = sh(client, sid, "stat -c '%u %g %a %s' /etc/passwd /etc/shadow /usr/bin/python3")
    assert_refused(
        client,
        sid,
        (
            "chmod 666 /etc/passwd",
            "chmod u+s /usr/bin/python3",
            "chown user /etc/passwd",
            "chgrp user /etc/shadow",
            "echo 'evil::0:0::/:/bin/sh' >> /etc/passwd",
            "mv /etc/passwd /etc/passwd.old",
            "ln -sf /home/user/p /etc/passwd",
        ),
        errors=("not permitted", "Permission denied"),
    )
    assert sh(client, sid, "stat -c '%u %g %a %s' /etc/passwd /etc/shadow /usr/bin/python3") == (
        before
    )
    assert "evil" not in sh(client, sid, "cat /etc/passwd")
    # Control: the same operations on the user's own file work.
    assert sh(
        client, sid, "f=/home/user/own-$$; touch $f; chmod 600 $f; stat -c %a $f; rm $f"
    ).strip() == ("600")


def test_root_changes_system_files_in_its_own_session_only(
    client: Bastion, sessions: Sessions
) -> None:
    # Root of the session owns its root filesystem: what the sandbox user is refused
    # above, root may do.  It must change the session's files and nothing else: not the
    # host's, not the image every session stands on, not another session's.
    sid, other = sessions.new(), sessions.new()
    stat_cmd = "stat -c '%u %g %a %s' /etc/passwd /etc/shadow /usr/bin/python3"
    before = sh(client, other, stat_cmd)
    sh(
        client,
        sid,
        "chmod 666 /etc/passwd && echo 'evil::0:0::/:/bin/sh' >> /etc/passwd && "
        "chown 1000 /etc/shadow && chmod u+s /usr/bin/python3 && "
        "echo evil > /usr/lib/bastion-root-probe",
        user="root",
    )
    changed = sh(client, sid, stat_cmd).splitlines()
    assert changed[0].split()[2] == "666" and changed[1].split()[0] == "1000", changed  # control
    assert "evil::0:0" in sh(client, sid, "cat /etc/passwd")
    assert sh(client, other, stat_cmd) == before
    assert "evil" not in sh(client, other, "cat /etc/passwd")
    code, _, _ = sh_status(client, other, "test -e /usr/lib/bastion-root-probe")
    assert code == 1
    assert b"evil::0:0" not in Path("/etc/passwd").read_bytes()
    assert not Path("/usr/lib/bastion-root-probe").exists()
    # The sandbox user still does not become root through root's changes (no su or
    # setuid program works under no-new-privileges).
    out = sh(client, sid, "python3 -c 'import os; print(os.geteuid())'")
    assert out.strip() == "1000", out


def test_no_way_to_become_root(client: Bastion, sid: str) -> None:
    # No setuid or setgid file anywhere (the kernel's pseudo filesystems aside).
    out = sh(
        client,
        sid,
        r"find / \( -path /proc -o -path /sys \) -prune -o -type f "
        r"\( -perm -4000 -o -perm -2000 \) -print 2>/dev/null; "
        r"echo --; find /usr/bin -name su -type f -perm -0755 2>/dev/null",
    )
    privileged, control = out.split("--\n")
    assert privileged.strip() == "", f"setuid/setgid files in the sandbox: {privileged}"
    assert control.strip() == "/usr/bin/su", out  # find does see the files
    code, out, err = sh_status(client, sid, "su -c 'id -u' root < /dev/null")
    assert code != 0 and out.strip() != "0", (out, err)
    code, out, err = sh_status(client, sid, "sudo -n id -u")
    assert code != 0 and out.strip() != "0", (out, err)
    out = py(
        client,
        sid,
        """
import os
for call in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setgroups([0])):
    try:
        call()
        print("became", os.getuid())
    except PermissionError:
        print("EPERM")
print(os.getuid(), os.geteuid())
""",
    )
    assert out.split() == ["EPERM", "EPERM", "EPERM", "1000", "1000"], out


# --------------------------------------------------------------------------- 3. resources


def test_disk_filler_is_contained(private_server: ServerProcess, as_user: User) -> None:
    private_server.start()
    pid = server_pid(private_server)
    with Bastion(base_url=private_server.url, timeout=120) as c:
        pool = Sessions(c, gone_ok=True)
        try:
            full = pool.new({"disk_mb": 64})
            other = pool.new()
            reset_peak_rss(pid)
            free_before = free_bytes(private_server.data_dir)
            code, _, err = sh_status(
                c, full, "dd if=/dev/zero of=/home/user/fill bs=1M count=200", user=as_user
            )
            assert code != 0 and "No space left on device" in err, (code, err)
            free_after = free_bytes(private_server.data_dir)
            usage = c.sessions.get(full)["usage"]
            assert usage is not None and usage["disk_bytes"] is not None, usage
            assert 0.7 * 64 * MiB <= usage["disk_bytes"] <= 64 * MiB, usage
            # The host's disk paid at most the session's quota.
            consumed = free_before - free_after
            assert consumed < 100 * MiB, f"the host lost {consumed / MiB:.0f} MiB to a 64 MiB quota"
            # The API cannot be used to write past the quota either.
            with pytest.raises(FileError):
                c.files.upload(full, os.urandom(4 * MiB), "/home/user/more.bin")
            # Other sessions are unaffected and answer quickly.
            assert elapsed_true(c, other) < RESPONSIVE_WITHIN
            assert sh(
                c, other, "dd if=/dev/zero of=/home/user/x bs=1M count=32 2>/dev/null && echo ok"
            ).strip() == ("ok")
            # Deleting the file gives the space back, and the full session writes again.
            sh(c, full, "rm /home/user/fill", user=as_user)
            freed = c.sessions.get(full)["usage"]
            assert freed is not None and freed["disk_bytes"] is not None
            assert freed["disk_bytes"] < 8 * MiB, freed
            assert sh(
                c, full, "dd if=/dev/zero of=/home/user/y bs=1M count=16 2>/dev/null && echo ok"
            ).strip() == ("ok")
            assert peak_rss_mb(pid) < SERVER_RSS_LIMIT_MB
        finally:
            pool.delete_all()


def test_output_flood_is_contained(private_server: ServerProcess) -> None:
    private_server.start()
    pid = server_pid(private_server)
    with (
        Bastion(base_url=private_server.url, timeout=120) as c,
        Bastion(base_url=private_server.url, timeout=120) as probe,
    ):
        pool = Sessions(c, gone_ok=True)
        try:
            flooder, other = pool.new(), pool.new()
            reset_peak_rss(pid)
            latencies: list[float] = []
            stop = threading.Event()

            def keep_probing() -> None:
                while not stop.is_set():
                    latencies.append(elapsed_true(probe, other))
                    stop.wait(0.2)

            prober = threading.Thread(target=keep_probing, daemon=True)
            started = time.monotonic()
            job = c.jobs.run(flooder, ["sh", "-c", "head -c 1000000000 /dev/zero"], timeout=120)
            prober.start()
            try:
                # While it runs (output None until final): the server's memory so far.
                while True:
                    info = c.jobs.get(flooder, job["job_id"])
                    if info["status"] not in ("queued", "running"):
                        break
                    rss_running = peak_rss_mb(pid)
                    latency_running = max(latencies, default=0.0)
                    time.sleep(0.25)
                ran_for = time.monotonic() - started
                # That last get was the first to carry the (truncated) result.
                rss_result = peak_rss_mb(pid)
            finally:
                stop.set()
                prober.join(timeout=60)
            output = info["output"]
            assert output is not None
            assert info["status"] == "completed", info["failure_reason"]
            assert len(output["console_output"]) == MAX_OUTPUT_BYTES
            assert "truncated" in output["errout"], output["errout"][-500:]
            problems = []
            if ran_for > 60:
                problems.append(f"the flood took {ran_for:.0f}s to finish")
            if latency_running > RESPONSIVE_WITHIN:
                problems.append(f"another session waited {latency_running:.1f}s during the flood")
            if max(latencies, default=0.0) > RESPONSIVE_WITHIN:
                problems.append(
                    f"another session waited {max(latencies):.1f}s while the result was served"
                )
            if rss_running > SERVER_RSS_LIMIT_MB:
                problems.append(f"server peak RSS {rss_running:.0f} MB while the flood ran")
            if rss_result > SERVER_RSS_LIMIT_MB:
                problems.append(
                    f"server peak RSS {rss_result:.0f} MB serving one GET of the job "
                    f"(64 MiB of NUL bytes kept, answered as JSON)"
                )
            assert not problems, "; ".join(problems)
        finally:
            pool.delete_all()


CPU_HOG = """
import os, time
end = time.monotonic() + 3
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        while time.monotonic() < end:
            pass
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print(sum(os.times()[2:4]))
"""


def test_cpu_hog_is_held_to_its_quota(
    client: Bastion, sessions: Sessions, server: ServerProcess, as_user: User
) -> None:
    sid = sessions.new({"cpus": 0.5})
    cgroup = f"/bastion/{OciRuntime._tag(server.data_dir)}/{sid}"
    v1 = Path("/sys/fs/cgroup/cpu" + cgroup)
    cpu_dir = v1 if v1.is_dir() else Path("/sys/fs/cgroup" + cgroup)

    def throttled() -> int:
        for line in (cpu_dir / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "nr_throttled":
                return int(value)
        raise AssertionError(f"no nr_throttled in {cpu_dir}/cpu.stat")

    throttled_before = throttled()
    # Two busy processes for 3 s: 6 s of CPU if nothing held them back.
    result = client.jobs.run_and_wait(
        sid, ["python3", "-c", CPU_HOG], timeout=30, wait_timeout=60, user=as_user
    )
    assert result["output"] is not None
    reported_by_job = float(result["output"]["console_output"])
    usage = client.sessions.get(sid)["usage"]
    assert usage is not None and usage["cpu_seconds"] is not None, usage
    burnt = usage["cpu_seconds"]
    # 3 s at half a core is 1.5 s of CPU (plus the agent's start); the session's figure
    # includes what the job itself saw its processes burn.
    assert burnt <= 2.2, f"{burnt:.2f} s of CPU in 3 s at cpus=0.5"
    assert 0.5 <= reported_by_job <= burnt + 0.1, (reported_by_job, burnt)
    # The kernel held the busy loop back: the quota, not an idle job, kept it low.
    assert throttled() > throttled_before


def test_process_count_is_capped_and_reported(
    client: Bastion, sessions: Sessions, as_user: User
) -> None:
    limit = 32
    sid = sessions.new({"pids": limit})
    idle = client.sessions.get(sid)["usage"]
    assert idle is not None and idle["processes"] is not None and idle["processes"] < 8, idle
    hold = pid_holder(seconds=60)
    job = client.jobs.run(sid, ["python3", "-c", hold], timeout=5, user=as_user)
    seen = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        usage = client.sessions.get(sid)["usage"]
        assert usage is not None
        seen.append(usage["processes"])
        if usage["processes"] == limit:
            break
        time.sleep(0.1)
    assert max(p or 0 for p in seen) == limit, f"processes reported: {seen}"
    with pytest.raises(JobFailedError) as info:
        client.jobs.wait(sid, job["job_id"], timeout=60)
    assert info.value.failure_reason == "timeout"
    assert int(info.value.console_output.split()[0]) < limit
    # Once the job's tree is gone, the count falls back.
    deadline = time.monotonic() + 10
    while True:
        usage = client.sessions.get(sid)["usage"]
        assert usage is not None and usage["processes"] is not None
        if usage["processes"] < 8:
            break
        assert time.monotonic() < deadline, usage
        time.sleep(0.2)


# --------------------------------------------------------------------------- 4. time

ESCAPING_TREE = r"""
setsid sh -c 'trap "" TERM HUP INT; while :; do sleep 1; done' >/dev/null 2>&1 &
( ( setsid nohup sh -c 'trap "" TERM HUP INT; exec sleep 1001' >/dev/null 2>&1 & ) & )
nohup python3 -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1002)' >/dev/null 2>&1 &
sleep 0.5
ps -eo sid=,args=
trap '' TERM HUP INT
sleep 1003
"""  # noqa: E501


def test_job_timeout_kills_an_escaping_tree(
    client: Bastion, sessions: Sessions, as_user: User
) -> None:
    sid = sessions.new()
    started = time.monotonic()
    with pytest.raises(JobFailedError) as info:
        client.jobs.run_and_wait(
            sid, ["sh", "-c", ESCAPING_TREE], timeout=3, wait_timeout=60, user=as_user
        )
    assert info.value.failure_reason == "timeout", dict(info.value)
    assert time.monotonic() - started < 20
    # Control: the escape attempts were real (running, some in sessions of their own).
    during = info.value.console_output
    for marker in ("sleep 1", "sleep 1001", "time.sleep(1002)"):
        assert marker in during, during
    job_sid = next(line.split()[0] for line in during.splitlines() if "ps -eo" in line)
    escaped = [line for line in during.splitlines() if line.split()[0] != job_sid]
    assert any("sleep 1001" in line for line in escaped), during
    # Afterwards nothing of the tree is left.
    after = sh(client, sid, "ps -eo args=")
    for marker in ("sleep", "while :", "python3 -c import signal"):
        assert marker not in after, f"{marker!r} survived the timeout:\n{after}"


def test_idle_session_is_stopped(
    client: Bastion, sessions: Sessions, server: ServerProcess
) -> None:
    sid = sessions.new(idle_timeout=2)
    started = time.monotonic()
    assert client.sessions.get(sid)["idle_timeout"] == 2
    info = wait_for_status(client, sid, "stopped", within=8)
    idle_for = time.monotonic() - started
    assert idle_for >= 1.5, f"stopped after only {idle_for:.1f}s"
    assert "idle" in (info["status_reason"] or ""), info
    # Nothing of it runs any more: jobs are refused and the root is unmounted.
    with pytest.raises(SessionStateError):
        client.jobs.run(sid, ["true"])
    assert not os.path.ismount(server.data_dir / "sessions" / sid / "rootfs")


def test_busy_session_is_not_idle(client: Bastion, sessions: Sessions) -> None:
    sid = sessions.new(idle_timeout=2)
    job = client.jobs.run(sid, ["sleep", "6"])
    while client.jobs.get(sid, job["job_id"])["status"] in ("queued", "running"):
        info = client.sessions.get(sid)
        assert info["status"] == "running", f"stopped while a job ran: {info}"
        time.sleep(0.5)
    result = client.jobs.get(sid, job["job_id"])
    assert result["status"] == "completed", result
    # Control: the same session does go idle once the job is over.
    info = wait_for_status(client, sid, "stopped", within=6)
    assert "idle" in (info["status_reason"] or ""), info


def test_max_lifetime_deletes_the_session(
    client: Bastion, sessions: Sessions, server: ServerProcess
) -> None:
    sid = sessions.new(max_lifetime=3, on_timeout="delete")
    assert sh(client, sid, "echo alive").strip() == "alive"
    # The waits are generous (a loaded host answers slowly); the bound is the server's
    # own: the delete is recorded when the reaper decides, so never before the lifetime
    # and within a reaper round (plus a loaded host's delay) after it.
    info = wait_for_status(client, sid, "deleted", within=60)
    lived = _epoch(info["updated_at"]) - _epoch(info["created_at"])
    latest = 3 + ServerConfig.reaper_interval + 2.5
    assert 3 <= lived <= latest, f"deleted {lived:.1f}s after it was created"
    assert "lifetime" in (info["status_reason"] or ""), info
    assert sid not in [s["session_id"] for s in client.sessions.list()["sessions"]]
    # Its sandbox and files are removed after the record says deleted.
    files = server.data_dir / "sessions" / sid
    deadline = time.monotonic() + 60
    while files.exists():
        assert time.monotonic() < deadline, "its files are still on the host"
        time.sleep(0.2)


def _epoch(timestamp: str) -> float:
    """An API timestamp (ISO 8601, UTC) in seconds since the epoch."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- 5. file API races


@pytest.fixture
def host_canary_dir() -> Iterator[tuple[Path, str]]:
    """A world-writable host dir with a secret: an escaped write or read would hit it."""
    secret = "host-secret-" + secrets.token_hex(16)
    path = Path(tempfile.mkdtemp(prefix="bastion-race-", dir="/tmp"))
    path.chmod(0o777)
    (path / "secret").write_text(secret + "\n")
    (path / "secret").chmod(0o666)
    try:
        yield path, secret
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_file_api_races_with_symlink_swaps_stay_inside(
    client: Bastion, sessions: Sessions, host_canary_dir: tuple[Path, str], as_user: User
) -> None:
    canary, secret = host_canary_dir
    sid = sessions.new()
    sandbox_hostname = client.files.download(sid, "/etc/hostname")
    host_hostname = Path("/etc/hostname").read_bytes()
    token = secrets.token_hex(6)
    name = f"x-{token}.txt"
    swapper = client.jobs.run(
        sid,
        [
            "sh",
            "-c",
            "cd /home/user; while [ ! -e stop ]; do "
            "rm -rf race; mkdir race; rm -rf race; ln -s / race; done",
        ],
        timeout=60,
        user=as_user,  # root's links are followed where the user's might not be
    )
    uploads = [f"/home/user/race/{name}", f"/home/user/race/etc/{name}"]
    uploads.append(f"/home/user/race{canary}/{name}")
    downloads = ["/home/user/race/etc/hostname", f"/home/user/race{canary}/secret"]
    ok: dict[str, int] = {p: 0 for p in uploads + downloads}
    failures: dict[str, int] = {}
    got_hostname: set[bytes] = set()
    try:
        for i in range(100):
            path = uploads[i % len(uploads)]
            try:
                client.files.upload(sid, f"upload {token}\n".encode(), path)
                ok[path] += 1
            except FileError as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            for path in downloads:
                try:
                    data = client.files.download(sid, path)
                except FileError as exc:
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    continue
                ok[path] += 1
                assert secret.encode() not in data, "the host's canary came back"
                if path.endswith("hostname"):
                    got_hostname.add(data)
    finally:
        client.files.upload(sid, b"", "/home/user/stop")
        client.jobs.wait(sid, swapper["job_id"], timeout=60)
    # The race really was run: operations succeeded through both states of `race`.
    assert ok["/home/user/race/etc/hostname"] > 0, (ok, failures)
    assert sum(ok[p] for p in uploads) > 0, (ok, failures)
    # Every successful download was the sandbox's own file ...
    assert got_hostname <= {sandbox_hostname}, got_hostname
    if host_hostname != sandbox_hostname:
        assert host_hostname not in got_hostname
    assert ok[f"/home/user/race{canary}/secret"] == 0, "a host path was read"
    # ... and nothing was written on the host.
    for host_path in (Path("/", name), Path("/etc", name), canary / name):
        assert not host_path.exists(), f"an upload escaped to the host: {host_path}"
    assert sorted(os.listdir(canary)) == ["secret"]
    assert (canary / "secret").read_text() == secret + "\n"


def test_hard_link_to_shadow_leaks_nothing_of_the_host(
    client: Bastion, sid: str, as_user: User
) -> None:
    host_shadow = Path("/etc/shadow").read_bytes()
    host_first = host_shadow.splitlines()[0]
    sandbox_shadow = client.files.download(sid, "/etc/shadow", user="root")
    assert sandbox_shadow.splitlines()[0] != host_first, "precondition: the two files differ"
    link = f"/home/user/h-{secrets.token_hex(4)}"
    code, _, err = sh_status(client, sid, f"ln /etc/shadow {link}", user=as_user)
    try:
        if code != 0:
            # fs.protected_hardlinks: no link to a file the user can neither read nor write.
            assert "Operation not permitted" in err, err
            with pytest.raises(FileError):
                client.files.download(sid, link, user="root")
        else:
            # Were it allowed, the link could only name the sandbox's own file.
            data = client.files.download(sid, link, user="root")
            assert data.splitlines()[0] != host_first, "the host's /etc/shadow came back"
            assert data == sandbox_shadow
        # Control: a hard link the user may make works, and the API follows it.
        sh(client, sid, f"echo mine > {link}.own && ln {link}.own {link}.own2")
        assert client.files.download(sid, f"{link}.own2") == b"mine\n"
    finally:
        sh(client, sid, f"rm -f {link} {link}.own {link}.own2")


# --------------------------------------------------------------------------- 6. tenancy


def test_foreign_terminal_is_refused_like_a_missing_session(auth_server: ServerProcess) -> None:
    key_a, key_b = auth_server.api_keys
    with (
        Bastion(base_url=auth_server.url, api_key=key_a) as a,
        Bastion(base_url=auth_server.url, api_key=key_b) as b,
    ):
        pool = Sessions(a, gone_ok=True)
        try:
            a_sid = pool.new()
            missing = "ses_" + "0" * 24
            with pytest.raises(TerminalSessionNotFoundError) as foreign:
                b.terminal.connect(session_id=a_sid, on_message=None, open_timeout=15)
            with pytest.raises(TerminalSessionNotFoundError) as absent:
                b.terminal.connect(session_id=missing, on_message=None, open_timeout=15)
            assert foreign.value.close_code == absent.value.close_code, (
                foreign.value,
                absent.value,
            )
            assert getattr(foreign.value, "status_code", None) == getattr(
                absent.value, "status_code", None
            )
            assert str(foreign.value).replace(a_sid, "ID") == str(absent.value).replace(
                missing, "ID"
            )
            assert b.terminal.current is None
            # No shell was started in A's session on B's behalf.
            out = sh(a, a_sid, "ps -eo args=")
            assert not any(arg.split()[0].endswith(("bash", "-sh")) for arg in out.splitlines())
            # Control: A itself can open a terminal on its session.
            seen: list[dict[str, Any]] = []
            terminal = a.terminal.connect(session_id=a_sid, on_message=seen.append)
            try:
                assert terminal.info is not None
                assert seen and seen[0]["type"] == "init"
            finally:
                terminal.close()
        finally:
            pool.delete_all()
