"""Outbound network for the sessions that ask for it: user-mode networking plus egress rules.

A session without network has only ``lo`` in a network namespace of its own: no route
anywhere.  A session with network gets a ``tap0`` served by ``slirp4netns`` (Debian's
package), a user-mode TCP/IP stack that turns the sandbox's packets into ordinary
sockets of its own on the host.  So the host's firewall sees the sandbox's traffic as
slirp4netns's sockets, and nftables can judge it.

Each server instance (one per data directory, named by the tag of its state directory)
has a table and a cgroup subtree of its own, and never touches another's:

* every slirp4netns runs in a cgroup (v2) of its own, ``bastion-net/<tag>/<session>``,
  and the table ``inet bastion_<tag>`` matches sockets by that cgroup
  (``socket cgroupv2``);
* traffic to any address of the host itself (``fib daddr type local``), to loopback,
  link-local (cloud metadata services live there), multicast, broadcast and the known
  metadata addresses elsewhere is rejected for every session, whatever its allow-list:
  a sandbox can never reach the host's own services;
* private, shared (CGNAT), benchmarking, documentation and reserved ranges
  (:data:`BLOCKED_V4`, :data:`BLOCKED_V6`) are rejected too, unless the session's
  allow-list names a network inside one of them (``10.1.2.0/24`` opens exactly that;
  ``0.0.0.0/0`` opens no private range);
* each networked session has one rule of its own in the chain ``sessions``: a session
  with an allow-list goes to a chain of its own (its sets, then reject), one without
  to ``public`` (anything not blocked above).  A sandbox socket of no known session is
  rejected: losing a session's rule closes its network, it never opens it.

The table outlives the server: :meth:`NetworkManager.prepare` creates what is missing
and refreshes the shared chains in one nftables transaction (no moment without rules),
keeping every session's rule; :meth:`NetworkManager.restore` re-checks an adopted
session's rule and slirp4netns (which runs in a session of its own, so it survives a
server restart) and puts back what is missing.

slirp4netns runs with ``--disable-host-loopback`` (its gateway alias for the host's
127.0.0.1 is off), ``--enable-sandbox`` (it drops its capabilities and pivots into an
empty root once the tap is up) and ``--enable-seccomp``.  It offers the sandbox no
IPv6 route; the IPv6 rules are there all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
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

_CGROUP_PARENT = "bastion-net"
_READY_TIMEOUT = 5.0

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _nets(*cidrs: str) -> list[_Net]:
    return [ipaddress.ip_network(c) for c in cidrs]


def _nat64(nets: list[_Net]) -> list[_Net]:
    """The well-known NAT64 prefix's image of IPv4 networks (64:ff9b::10.0.0.0/104...)."""
    base = int(_NAT64.network_address)
    return [
        ipaddress.IPv6Network((base + int(n.network_address), 96 + n.prefixlen))
        for n in nets
        if n.version == 4
    ]


def _collapse(nets: list[_Net]) -> list[_Net]:
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def _minus(universe: list[_Net], holes: list[_Net]) -> list[_Net]:
    """``universe`` without ``holes``, as the fewest CIDRs."""
    left = _collapse(universe)
    for hole in holes:
        out: list[_Net] = []
        for net in left:
            if net.version != hole.version or not net.overlaps(hole):
                out.append(net)
            elif not net.subnet_of(hole):  # type: ignore[arg-type]
                out.extend(net.address_exclude(hole))  # type: ignore[arg-type]
        left = out
    return _collapse(left)


#: Never reachable, whatever the allow-list says: the host's loopback, "this network",
#: link-local (AWS, GCP and Azure metadata at 169.254.169.254), multicast, broadcast,
#: Alibaba's metadata (100.100.100.200) and AWS's IPv6 one.
FLOOR_V4 = _nets(
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32",
    "100.100.100.200/32",
)  # fmt: skip
FLOOR_V6 = _nets(
    "::/128", "::1/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128",
    # IPv4-mapped addresses travel as IPv4 (judged as such); none is a destination.
    "::ffff:0:0/96",
) + _nat64(FLOOR_V4)  # fmt: skip

#: Blocked unless the allow-list names a network inside them: private (RFC 1918),
#: shared/CGNAT (100.64/10), IETF protocol assignments (192.0.0/24), documentation,
#: the deprecated 6to4 relay anycast, benchmarking (198.18/15), reserved (240/4).
BLOCKED_V4 = _minus(
    _nets(
        "10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
        "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
        "203.0.113.0/24", "240.0.0.0/4",
    ),
    [],
)  # fmt: skip
REACHABLE_V4 = _minus(_nets("0.0.0.0/0"), FLOOR_V4 + BLOCKED_V4)

#: IPv6 reaches only global unicast (2000::/3) less its special blocks (IETF protocol
#: assignments 2001::/23 with Teredo, 6to4 2002::/16, documentation 2001:db8::/32 and
#: 3fff::/20), plus the NAT64 image of reachable IPv4.  Everything else (ULA fc00::/7,
#: site-local, discard 100::/64, local NAT64 64:ff9b:1::/48, the NAT64 image of the
#: blocked IPv4 ranges, reserved space) is blocked.
REACHABLE_V6 = _minus(
    _minus(_nets("2000::/3"), _nets("2001::/23", "2001:db8::/32", "2002::/16", "3fff::/20"))
    + _minus([_NAT64], _nat64(FLOOR_V4 + BLOCKED_V4)),
    [],
)

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


def _within_reach(net: _Net) -> list[_Net]:
    """What an allow-list entry opens: a network wholly inside blocked space names that
    space and opens exactly itself; one reaching into public space opens only its public
    part (``0.0.0.0/0`` opens no private range)."""
    reachable = REACHABLE_V4 if net.version == 4 else REACHABLE_V6
    inside: list[_Net] = []
    for public in reachable:
        if net.subnet_of(public):  # type: ignore[arg-type]
            return [net]
        if public.subnet_of(net):  # type: ignore[arg-type]
            inside.append(public)
    return inside or [net]


def allowed_networks(entries: list[str]) -> tuple[list[str], list[str]]:
    """The IPv4 and IPv6 networks an allow-list opens, without overlaps (see
    :func:`parse_allow` for the entries, :func:`_within_reach` for blocked ranges)."""
    v4, v6 = parse_allow(entries)
    nets = _collapse([n for e in v4 + v6 for n in _within_reach(ipaddress.ip_network(e))])
    return [str(n) for n in nets if n.version == 4], [str(n) for n in nets if n.version == 6]


def _set(nets: list[_Net]) -> str:
    return "{ " + ", ".join(str(n) for n in nets) + " }"


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
    """Starts and stops the user-mode network of sandboxes, and keeps the egress rules.

    ``state_dir`` is this server instance's own (``/run/bastion/<tag>``): its name is
    the tag that keys the instance's nftables table and cgroup subtree.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.tag = state_dir.name
        self.table = f"bastion_{self.tag}"
        self._cgroups = _cgroup2_root()
        self._ready = False
        self._problem: str | None = None

    @property
    def cgroup_parent(self) -> Path | None:
        """The cgroup every sandbox's slirp4netns of this instance lives under."""
        return self._cgroups / _CGROUP_PARENT / self.tag if self._cgroups else None

    async def prepare(self) -> None:
        """Create the table and cgroup subtree if missing; remember why if impossible.

        What the sessions own (``sessions``, their chains and sets) is kept as it is, so
        sandboxes still running from before a restart keep their rules.  The shared
        chains are refreshed (the host's resolvers may have changed) in one nftables
        transaction: a packet sees the old rules or the new, never none.
        """
        missing = [tool for tool in ("slirp4netns", "nft") if shutil.which(tool) is None]
        if missing:
            self._problem = f"missing on the host: {', '.join(missing)} (run `make setup`)"
            return
        if self.cgroup_parent is None:
            self._problem = "no cgroup v2 hierarchy to tell sandbox traffic apart"
            return
        try:
            self.cgroup_parent.parent.mkdir(exist_ok=True)
            self._expose_to_nft()
            self.cgroup_parent.mkdir(exist_ok=True)
        except OSError as exc:
            self._problem = f"cannot expose the network cgroup to nftables: {exc}"
            return
        t = f"inet {self.table}"
        try:
            await _nft(
                f"add table {t}\n"
                f"add chain {t} output {{ type filter hook output priority 0; policy accept; }}\n"
                f"add chain {t} sandbox_egress\n"
                f"add chain {t} sessions\n"
                f"add chain {t} public\n"
                f"flush chain {t} output\n"
                f"flush chain {t} sandbox_egress\n"
                f"flush chain {t} public\n"
                f'add rule {t} output socket cgroupv2 level 2 "{self._nft_path()}"'
                f" jump sandbox_egress\n"
                f"{self._dns_exceptions(t)}"
                f"add rule {t} sandbox_egress fib daddr type local reject\n"
                f"add rule {t} sandbox_egress ip daddr {_set(FLOOR_V4)} reject\n"
                f"add rule {t} sandbox_egress ip6 daddr {_set(FLOOR_V6)} reject\n"
                f"add rule {t} sandbox_egress jump sessions\n"
                # A sandbox socket of no session known here: its rule is lost, so no
                # way out (a lost rule must close a session's network, not open it).
                f"add rule {t} sandbox_egress reject\n"
                f"add rule {t} public ip daddr {_set(BLOCKED_V4)} reject\n"
                f"add rule {t} public ip6 daddr != {_set(REACHABLE_V6)} reject\n"
                f"add rule {t} public accept\n"
            )
        except SandboxError as exc:
            self._problem = str(exc)
            return
        self._ready = True

    async def close(self) -> None:
        """On shutdown, remove the table and cgroup subtree if no session uses them.

        A networked sandbox still running keeps both (its rules must outlive the
        server); otherwise a stopped instance would leave its table hooked on every
        packet the host sends, until the next start."""
        if not self._ready or self.cgroup_parent is None:
            return
        listing = await asyncio.create_subprocess_exec(
            "nft", "list", "chain", "inet", self.table, "sessions",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await listing.communicate()
        if listing.returncode != 0 or 'comment "' in out.decode():
            return
        try:
            self.cgroup_parent.rmdir()  # fails while any session's cgroup is left
        except OSError:
            return
        await _nft(f"delete table inet {self.table}\n")
        self._ready = False

    def _nft_path(self, session_id: str | None = None) -> str:
        """A cgroup as nft names it (relative to /sys/fs/cgroup)."""
        path = f"{_CGROUP_PARENT}/{self.tag}"
        return f"{path}/{session_id}" if session_id else path

    def _expose_to_nft(self) -> None:
        """nft names cgroup-v2 paths relative to /sys/fs/cgroup.  On a hybrid host the
        v2 hierarchy sits at /sys/fs/cgroup/unified, so bind the shared ``bastion-net``
        where nft looks (the bind keeps the cgroups' identity, which is what rules match)."""
        assert self.cgroup_parent is not None
        shared = self.cgroup_parent.parent
        where_nft_looks = Path("/sys/fs/cgroup") / _CGROUP_PARENT
        if where_nft_looks == shared or os.path.ismount(where_nft_looks):
            return
        where_nft_looks.mkdir(exist_ok=True)
        host.mount(str(shared), str(where_nft_looks), "", "", host.MS_BIND)

    @staticmethod
    def _dns_exceptions(table: str) -> str:
        """slirp4netns answers the sandbox's DNS (10.0.2.3) by asking the host's resolvers,
        which may well be local (a stub on 127.0.0.53) or private: those, on port 53
        only, pass."""
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
                    rules += (
                        f"add rule {table} sandbox_egress {family} daddr {address}"
                        f" {proto} dport 53 accept\n"
                    )
        return rules

    def _session_cgroup(self, session_id: str) -> Path:
        assert self.cgroup_parent is not None
        return self.cgroup_parent / session_id

    def _pid_file(self, session_id: str) -> Path:
        return self.state_dir / f"{session_id}.slirp.pid"

    async def _session_rules(self, session_id: str) -> dict[str, str]:
        """The session's rules in ``sessions``: handle -> rule text."""
        listing = await asyncio.create_subprocess_exec(
            "nft", "-a", "list", "chain", "inet", self.table, "sessions",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await listing.communicate()
        if listing.returncode != 0:
            raise SandboxError(f"nft failed: {err.decode(errors='replace').strip()}")
        rules: dict[str, str] = {}
        for line in out.decode().splitlines():
            # Rules are known by their comment: nft's listing of cgroup paths is not
            # reliable on a hybrid cgroup host.
            if f'comment "{session_id}"' in line and "# handle " in line:
                text, handle = line.rsplit("# handle ", 1)
                rules[handle.strip()] = text.strip()
        return rules

    async def _install_rules(
        self, session_id: str, policy: NetworkPolicy, replacing: dict[str, str]
    ) -> None:
        """Give the session the rules of its policy, in place of ``replacing``, in one
        transaction.  Host names in the allow-list are resolved now."""
        t, name = f"inet {self.table}", session_id.replace("-", "_")
        script = [f"delete rule {t} sessions handle {h}" for h in replacing]
        where = f'socket cgroupv2 level 3 "{self._nft_path(session_id)}"'
        if policy.allow:
            v4, v6 = await asyncio.to_thread(allowed_networks, list(policy.allow))
            chain = f"s_{name}"
            for family, addresses in (("4", v4), ("6", v6)):
                script += [
                    f"add set {t} a{family}_{name} {{ type ipv{family}_addr; flags interval; }}",
                    f"flush set {t} a{family}_{name}",
                ]
                if addresses:
                    script.append(f"add element {t} a{family}_{name} {{ {', '.join(addresses)} }}")
            script += [
                f"add chain {t} {chain}",
                f"flush chain {t} {chain}",
                f"add rule {t} {chain} ip daddr @a4_{name} accept",
                f"add rule {t} {chain} ip6 daddr @a6_{name} accept",
                f"add rule {t} {chain} reject",
            ]
        else:
            chain = "public"
        script.append(f'add rule {t} sessions {where} goto {chain} comment "{session_id}"')
        await _nft("\n".join(script) + "\n")

    async def _drop_rules(self, session_id: str) -> None:
        t, name = f"inet {self.table}", session_id.replace("-", "_")
        handles = await self._session_rules(session_id)
        script = [f"delete rule {t} sessions handle {h}" for h in handles]
        # Created first so that deleting cannot fail for a session without them.
        script += [
            f"add chain {t} s_{name}",
            f"flush chain {t} s_{name}",
            f"delete chain {t} s_{name}",
        ]
        for family in ("4", "6"):
            script += [
                f"add set {t} a{family}_{name} {{ type ipv{family}_addr; flags interval; }}",
                f"delete set {t} a{family}_{name}",
            ]
        await _nft("\n".join(script) + "\n")

    async def attach(self, session_id: str, sandbox_pid: int, policy: NetworkPolicy) -> None:
        """Give a running sandbox its tap0 and the egress rules of its policy."""
        if not self._ready:
            raise NetworkUnavailable(f"sandbox networking is unavailable: {self._problem}")
        await self.detach(session_id)  # a leftover from a crash must not linger
        self._session_cgroup(session_id).mkdir(exist_ok=True)
        await self._install_rules(session_id, policy, {})
        await self._start_slirp(session_id, sandbox_pid)
        log.info("network attached", extra={"session_id": session_id, "allow": policy.allow})

    async def restore(self, session_id: str, sandbox_pid: int, policy: NetworkPolicy) -> None:
        """Check the network of a sandbox adopted after a restart; put back what is gone.

        The session's rule is kept if it is there for this policy (so an allow-list's
        host names are not resolved again) and installed again otherwise; a
        slirp4netns that did not survive is started again.  Raises if either cannot
        be done: the caller must then stop the sandbox.
        """
        if not self._ready:
            raise NetworkUnavailable(f"sandbox networking is unavailable: {self._problem}")
        group = self._session_cgroup(session_id)
        group.mkdir(exist_ok=True)
        rules = await self._session_rules(session_id)
        chain = f"s_{session_id.replace('-', '_')}" if policy.allow else "public"
        intact = len(rules) == 1 and next(iter(rules.values())).split(" comment ")[0].endswith(
            f"goto {chain}"
        )
        if not intact:
            await self._install_rules(session_id, policy, rules)
            log.warning("network rules restored", extra={"session_id": session_id})
        if self._slirp_alive(session_id):
            return
        self._kill_group(group)
        await self._start_slirp(session_id, sandbox_pid)
        log.warning("network helper restarted", extra={"session_id": session_id})

    def _slirp_alive(self, session_id: str) -> bool:
        """Whether the recorded slirp4netns runs, in the session's cgroup, not a zombie."""
        try:
            pid = self._pid_file(session_id).read_text().strip()
            members = (self._session_cgroup(session_id) / "cgroup.procs").read_text().split()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return pid in members and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    @staticmethod
    def _kill_group(group: Path) -> None:
        try:
            members = (group / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    async def _start_slirp(self, session_id: str, sandbox_pid: int) -> None:
        group = self._session_cgroup(session_id)
        netns_fd = os.open(f"/proc/{sandbox_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        ready_r, ready_w = os.pipe()
        try:
            # Joining the cgroup before exec: every socket it ever opens is judged.
            # A session of its own: it outlives a restart of the server.
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
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await self.detach(session_id)
            raise SandboxError("slirp4netns did not bring the sandbox's network up")
        self._pid_file(session_id).write_text(str(proc.pid))

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
        self._kill_group(group)
        await self._drop_rules(session_id)
        for _ in range(50):
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # the killed slirp4netns is still leaving the cgroup
                await asyncio.sleep(0.01)
