"""Build the C agent (``agent_c/bastion-agent.c``) into a static binary.

A static binary runs as PID 1 of any image, whatever libc (if any) the image has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "agent_c" / "bastion-agent.c"
BINARY_NAME = "bastion-agent"
_CFLAGS = ("-O2", "-static")


class AgentBuildError(RuntimeError):
    """The agent could not be compiled (no compiler, no static libc, a compile error)."""


def build_agent(dest_dir: Path, source: Path = SOURCE) -> Path:
    """Compile ``source`` into ``dest_dir/bastion-agent`` unless that is up to date.

    The binary is rebuilt only if it is missing or older than the source; it is
    compiled under a temporary name and renamed into place, so a reader never sees a
    half-written file and two concurrent builds do not collide.
    """
    dest = dest_dir / BINARY_NAME
    try:
        if dest.stat().st_mtime >= source.stat().st_mtime:
            return dest
    except FileNotFoundError:
        if not source.exists():
            raise AgentBuildError(f"agent source {source} is missing") from None
    gcc = shutil.which("gcc")
    if gcc is None:
        raise AgentBuildError(
            "gcc is not installed, so the sandbox agent cannot be built: "
            "install gcc and a static libc (Debian/Ubuntu: apt-get install gcc libc6-dev)"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{BINARY_NAME}-", dir=dest_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proc = subprocess.run(
            [gcc, *_CFLAGS, "-o", str(tmp), str(source)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            detail = proc.stderr.strip()
            if "cannot find -lc" in detail or "libc.a" in detail:
                raise AgentBuildError(
                    "static libc is missing, so the sandbox agent cannot be linked "
                    "statically: install it (Debian/Ubuntu: apt-get install libc6-dev; "
                    f"Fedora: dnf install glibc-static)\n{detail}"
                )
            raise AgentBuildError(f"compiling {source} failed:\n{detail}")
        tmp.chmod(0o755)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
