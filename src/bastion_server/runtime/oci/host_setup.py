"""What the host needs before the OCI backend's first sandbox: the share every sandbox
bind-mounts, and paths the sandboxes' unprivileged roots can walk down.

Blocking functions, called once by :meth:`OciRuntime.prepare_host`.
"""

from __future__ import annotations

import os
from pathlib import Path

from bastion_server.runtime import host
from bastion_server.runtime.agent_build import BINARY_NAME

#: The resolver's configuration in every sandbox: slirp4netns answers DNS at 10.0.2.3.
RESOLV_CONF = b"nameserver 10.0.2.3\n"


def fill_share(share_dir: Path, agent: Path) -> None:
    """Mount (once per boot) and fill the tmpfs every sandbox bind-mounts: the agent
    (a private copy: the sandbox never sees the server's install tree) and the
    resolver's configuration."""
    share_dir.mkdir(mode=0o755, exist_ok=True)
    if not os.path.ismount(share_dir):
        host.mount(
            "bastion", str(share_dir), "tmpfs", "mode=0755,size=16m",
            host.MS_NOSUID | host.MS_NODEV,
        )  # fmt: skip
    os.chmod(share_dir, 0o755)
    files = {"resolv.conf": RESOLV_CONF, BINARY_NAME: agent.read_bytes()}
    for stale in share_dir.iterdir():  # what an earlier version put there
        if stale.name not in files:
            stale.unlink()
    for name, data in files.items():
        target = share_dir / name
        if target.exists() and target.read_bytes() == data:
            continue
        temp = share_dir / f".{name}.tmp"
        temp.write_bytes(data)
        os.chmod(temp, 0o755 if name == BINARY_NAME else 0o644)
        temp.replace(target)


def check_reachable(path: Path) -> None:
    """The sandbox's root is an unprivileged host uid: it must be able to walk down to
    its root filesystem and bind-mount sources (search permission, nothing more)."""
    for parent in [path.absolute(), *path.absolute().parents]:
        if parent.exists() and not os.stat(parent).st_mode & 0o001:
            raise host.HostNotReady(
                f"{parent} is not searchable by other users (mode "
                f"{oct(os.stat(parent).st_mode & 0o777)}), so sandboxes cannot reach "
                f"{path}; run `chmod o+x {parent}` or choose another directory"
            )
