"""Outbound network for the sessions that ask for it: user-mode networking plus egress rules.

A session without network has only ``lo`` in a network namespace of its own: no route
anywhere.  A session with network gets a ``tap0`` served by ``slirp4netns`` (Debian's
package), a user-mode TCP/IP stack that turns the sandbox's packets into ordinary
sockets of its own on the host.  So the host's firewall sees the sandbox's traffic as
slirp4netns's sockets, and nftables can judge it:

* every slirp4netns runs in a cgroup (v2) of its own under ``bastion-net/``, and the
  table ``inet bastion`` matches sockets by that cgroup (``socket cgroupv2``);
* traffic to any address of the host itself (``fib daddr type local``), to loopback,
  link-local (cloud metadata services live there) and multicast is rejected, so a
  sandbox can never reach the host's own services, whatever interface they listen on;
* a session created with an allow-list gets a set of its own: anything else is rejected.

slirp4netns runs with ``--disable-host-loopback`` (its gateway alias for the host's
127.0.0.1 is off), ``--enable-sandbox`` (it drops its capabilities and pivots into an
empty root once the tap is up) and ``--enable-seccomp``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from bastion_server.runtime import host
from bastion_server.runtime.base import SandboxError

log = logging.getLogger("bastion.network")

TABLE = "bastion"
_CGROUP_PARENT = "bastion-net"
_BLOCKED_V4 = "127.0.0.0/8, 169.254.0.0/16, 0.0.0.0/8, 224.0.0.0/4, 255.255.255.255/32"
_BLOCKED_V6 = "::1/128, fe80::/10, ff00::/8, ::/128"
_READY_TIMEOUT = 5.0


@dataclass(frozen=True)
class NetworkPolicy:
    """Whether a sandbox may reach out, and where to (empty ``allow`` = anywhere public)."""

    enabled: bool = False
    allow: tuple[str, ...] = field(default_factory=tuple)


class NetworkUnavailable(SandboxError):
    """This host cannot give sandboxes a network (a package or kernel feature is missing)."""


def parse_allow(entries: list[str]) -> tuple[list[str], list[str]]:
    """Split an allow-list into IPv4 and IPv6 networks; host names are resolved now.

    Raises ValueError naming the first entry that is neither a network nor a name
    that resolves.
    """
    v4: list[str] = []
    v6: list[str] = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            try:
                infos = socket.getaddrinfo(entry, None, proto=socket.IPPROTO_TCP)
            except OSError as exc:
                raise ValueError(f"cannot resolve {entry!r}: {exc}") from exc
            for info in infos:
                address = ipaddress.ip_address(info[4][0])
                (v4 if address.version == 4 else v6).append(str(address))
            continue
        (v4 if net.version == 4 else v6).append(str(net))
    return sorted(set(v4)), sorted(set(v6))


def _cgroup2_root() -> Path | None:
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.procs").exists() and (
            candidate / "cgroup.subtree_control"
        ).exists():
            return candidate
    return None


async def _nft(script: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nft",
        "-f",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(script.encode())
    if proc.returncode != 0:
        raise SandboxError(f"nft failed: {out.decode(errors='replace').strip()}")


class NetworkManager:
    """Starts and stops the user-mode network of sandboxes, and keeps the egress rules."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._cgroups = _cgroup2_root()
        self._ready = False
        self._problem: str | None = None

    @property
    def cgroup_parent(self) -> Path | None:
        return self._cgroups / _CGROUP_PARENT if self._cgroups else None

    async def prepare(self) -> None:
        """Create the nftables table and cgroup parent; remember why if impossible."""
        missing = [tool for tool in ("slirp4netns", "nft") if shutil.which(tool) is None]
        if missing:
            self._problem = f"missing on the host: {', '.join(missing)} (run `make setup`)"
            return
        if self.cgroup_parent is None:
            self._problem = "no cgroup v2 hierarchy to tell sandbox traffic apart"
            return
        self.cgroup_parent.mkdir(exist_ok=True)
        try:
            self._expose_to_nft()
        except OSError as exc:
            self._problem = f"cannot expose the network cgroup to nftables: {exc}"
            return
        try:
            await _nft(
                f"table inet {TABLE}\n"
                f"delete table inet {TABLE}\n"
                f"table inet {TABLE} {{\n"
                f"  chain output {{\n"
                f"    type filter hook output priority 0; policy accept;\n"
                f'    socket cgroupv2 level 1 "{_CGROUP_PARENT}" jump sandbox_egress\n'
                f"  }}\n"
                f"  chain sandbox_egress {{\n"
                f"{self._dns_exceptions()}"
                f"    fib daddr type local reject\n"
                f"    ip daddr {{ {_BLOCKED_V4} }} reject\n"
                f"    ip6 daddr {{ {_BLOCKED_V6} }} reject\n"
                f"  }}\n"
                f"}}\n"
            )
        except SandboxError as exc:
            self._problem = str(exc)
            return
        self._ready = True

    def _expose_to_nft(self) -> None:
        """nft names cgroup-v2 paths relative to /sys/fs/cgroup.  On a hybrid host the
        v2 hierarchy sits at /sys/fs/cgroup/unified, so bind our subtree where nft
        looks (the bind keeps the cgroup's identity, which is what rules match)."""
        assert self.cgroup_parent is not None
        where_nft_looks = Path("/sys/fs/cgroup") / _CGROUP_PARENT
        if where_nft_looks == self.cgroup_parent or os.path.ismount(where_nft_looks):
            return
        where_nft_looks.mkdir(exist_ok=True)
        host.mount(str(self.cgroup_parent), str(where_nft_looks), "", "", host.MS_BIND)

    @staticmethod
    def _dns_exceptions() -> str:
        """slirp4netns answers the sandbox's DNS (10.0.2.3) by asking the host's resolvers,
        which may well be local (a stub on 127.0.0.53): those, on port 53 only, pass."""
        rules = ""
        try:
            lines = Path("/etc/resolv.conf").read_text().splitlines()
        except OSError:
            return rules
        for line in lines:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    address = ipaddress.ip_address(parts[1])
                except ValueError:
                    continue
                family = "ip" if address.version == 4 else "ip6"
                for proto in ("udp", "tcp"):
                    rules += f"    {family} daddr {address} {proto} dport 53 accept\n"
        return rules

    def _session_cgroup(self, session_id: str) -> Path:
        assert self.cgroup_parent is not None
        return self.cgroup_parent / session_id

    def _pid_file(self, session_id: str) -> Path:
        return self.state_dir / f"{session_id}.slirp.pid"

    async def attach(self, session_id: str, sandbox_pid: int, policy: NetworkPolicy) -> None:
        """Give a running sandbox its tap0 and the egress rules of its policy."""
        if not self._ready:
            raise NetworkUnavailable(f"sandbox networking is unavailable: {self._problem}")
        await self.detach(session_id)  # a leftover from a crash must not linger
        group = self._session_cgroup(session_id)
        group.mkdir(exist_ok=True)
        if policy.allow:
            v4, v6 = parse_allow(list(policy.allow))
            name = session_id.replace("-", "_")
            rules = [
                f"add set inet {TABLE} a4_{name} {{ type ipv4_addr; flags interval; }}",
                f"add set inet {TABLE} a6_{name} {{ type ipv6_addr; flags interval; }}",
            ]
            if v4:
                rules.append(f"add element inet {TABLE} a4_{name} {{ {', '.join(v4)} }}")
            if v6:
                rules.append(f"add element inet {TABLE} a6_{name} {{ {', '.join(v6)} }}")
            where = f'socket cgroupv2 level 2 "{_CGROUP_PARENT}/{session_id}"'
            rules += [
                f"add rule inet {TABLE} sandbox_egress {where} ip daddr != @a4_{name} reject",
                f"add rule inet {TABLE} sandbox_egress {where} ip6 daddr != @a6_{name} reject",
            ]
            await _nft("\n".join(rules) + "\n")
        netns_fd = os.open(f"/proc/{sandbox_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        ready_r, ready_w = os.pipe()
        try:
            # Joining the cgroup before exec: every socket it ever opens is judged.
            launcher = (
                f'echo $$ > "{group}/cgroup.procs" && exec slirp4netns --configure '
                f"--mtu=65520 --disable-host-loopback --enable-sandbox --enable-seccomp "
                f"--ready-fd={ready_w} --netns-type=path /proc/self/fd/{netns_fd} tap0"
            )
            proc = await asyncio.create_subprocess_exec(
                "sh",
                "-c",
                launcher,
                pass_fds=(netns_fd, ready_w),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(netns_fd)
            os.close(ready_w)
        try:
            loop = asyncio.get_running_loop()
            ready = await asyncio.wait_for(
                loop.run_in_executor(None, os.read, ready_r, 1), _READY_TIMEOUT
            )
        except TimeoutError:
            ready = b""
        finally:
            os.close(ready_r)
        if ready != b"1":
            proc.kill()
            await self.detach(session_id)
            raise SandboxError("slirp4netns did not bring the sandbox's network up")
        self._pid_file(session_id).write_text(str(proc.pid))
        log.info("network attached", extra={"session_id": session_id, "allow": policy.allow})

    async def detach(self, session_id: str) -> None:
        """Stop the sandbox's slirp4netns and drop its rules (idempotent)."""
        pid_file = self._pid_file(session_id)
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid = 0
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            pid_file.unlink(missing_ok=True)
        if not self._ready or self.cgroup_parent is None:
            return
        group = self._session_cgroup(session_id)
        if not group.exists():
            # Never networked (or already cleaned): its rules, made only while its
            # cgroup exists and dropped before it goes, cannot exist.  Every stop of
            # every session comes through here, so no nft process for those.
            return
        name = session_id.replace("-", "_")
        listing = await asyncio.create_subprocess_exec(
            "nft",
            "-a",
            "list",
            "chain",
            "inet",
            TABLE,
            "sandbox_egress",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await listing.communicate()
        handles = [
            line.rsplit("# handle ", 1)[1].strip()
            for line in out.decode().splitlines()
            if f'/{session_id}"' in line and "# handle " in line
        ]
        script = [f"delete rule inet {TABLE} sandbox_egress handle {h}" for h in handles]
        if handles:
            script += [f"delete set inet {TABLE} a4_{name}", f"delete set inet {TABLE} a6_{name}"]
            await _nft("\n".join(script) + "\n")
        for _ in range(50):
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # the killed slirp4netns is still leaving the cgroup
                await asyncio.sleep(0.01)
