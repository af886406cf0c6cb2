"""The seccomp profile every sandbox runs under: an allow-list of system calls.

Modelled on the container engines' default profiles (Docker/Podman): everything an
ordinary Linux program uses is allowed; what only serves to attack or escape the
kernel is refused with EPERM.  Stricter than those defaults where a sandbox for
untrusted code has no use for the call:

* no ``ptrace``/``process_vm_*`` at all (they need no capability inside a user
  namespace, and debugging other processes is not a sandbox's job);
* no ``io_uring_*`` (a large, often-exploited kernel surface, and blind to seccomp);
* no new namespaces: ``unshare``/``setns`` refused, ``clone`` only without namespace
  flags, ``clone3`` answers ENOSYS so libc falls back to ``clone``;
* no mount API, kernel modules, keyrings, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``kexec``, ``reboot``, ``swapon``, ``acct``, clock setting;
* sockets only of the families and types ordinary programs use (unix, IPv4/IPv6
  stream and datagram, netlink): no raw, packet, vsock or other sockets;
* only the native system call table (no 32-bit entry from a 64-bit process).
"""

from __future__ import annotations

import errno
import platform
from typing import Any

_ALLOWED = """
accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32
clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep
clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3
epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2
execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate
fchdir fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr
flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64
fsync ftruncate ftruncate64 futex futex_time64 futex_waitv futimesat getcpu getcwd
getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups
getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom
getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid
getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr
inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy
io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit
ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32
lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr
lstat lstat64 madvise membarrier memfd_create mincore mkdir mkdirat mknod mknodat mlock
mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl msgget
msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat _newselect open openat
openat2 pause pidfd_open pidfd_send_signal pipe pipe2 poll ppoll ppoll_time64 prctl
pread64 preadv preadv2 prlimit64 pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read
readahead readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg
remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq
rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr
sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler
sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity sched_setattr
sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop
semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid
setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid
setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid
setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address
setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd
signalfd4 sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs statfs64
statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times
tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat
utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
""".split()

#: machine -> (libseccomp architecture, calls only that architecture has)
_ARCH = {
    "x86_64": ("SCMP_ARCH_X86_64", ["arch_prctl", "modify_ldt"]),
    "aarch64": ("SCMP_ARCH_AARCH64", []),
}

# clone flags that create namespaces: CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_CLONE_NAMESPACE_FLAGS = 0x7E020000
_SOCK_TYPE_MASK = 0xF
_STREAM, _DGRAM, _RAW, _SEQPACKET = 1, 2, 3, 5
#: family -> socket types allowed: unix, IPv4/IPv6 TCP and UDP (and ICMP echo, which is
#: SOCK_DGRAM), netlink (as `ip` uses it, confined to the sandbox's network namespace).
_SOCKETS = {
    1: (_STREAM, _DGRAM, _SEQPACKET),  # AF_UNIX
    2: (_STREAM, _DGRAM),  # AF_INET
    10: (_STREAM, _DGRAM),  # AF_INET6
    16: (_RAW, _DGRAM),  # AF_NETLINK
}
# personality(2) values programs legitimately set (Linux default, UNAME26, READ_IMPLIES_EXEC
# variants and the query value 0xffffffff), as the engines' profiles allow.
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


def profile() -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object for this machine's architecture."""
    arch, arch_calls = _ARCH.get(platform.machine(), _ARCH["x86_64"])
    eperm = errno.EPERM
    syscalls: list[dict[str, Any]] = [
        {"names": sorted(_ALLOWED + arch_calls), "action": "SCMP_ACT_ALLOW"},
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {
                    "index": 0,
                    "value": _CLONE_NAMESPACE_FLAGS,
                    "valueTwo": 0,
                    "op": "SCMP_CMP_MASKED_EQ",
                }
            ],
        },
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
        *(
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}],
            }
            for value in _PERSONALITIES
        ),
        # socket(): only the families and types ordinary programs use.  Everything else
        # (packet, vsock, raw IP, bluetooth, ...) stays refused by the default action.
        *(
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": 0, "value": family, "op": "SCMP_CMP_EQ"},
                    {
                        "index": 1,
                        "value": _SOCK_TYPE_MASK,
                        "valueTwo": kind,
                        "op": "SCMP_CMP_MASKED_EQ",
                    },
                ],
            }
            for family, kinds in _SOCKETS.items()
            for kind in kinds
        ),
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": eperm,
        # Only the native system call table: a 64-bit process calling the 32-bit entry
        # (int 0x80, socketcall) would otherwise reach calls under other numbers.
        "architectures": [arch],
        "syscalls": syscalls,
    }
