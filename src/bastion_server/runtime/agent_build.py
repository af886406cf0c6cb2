"""Build the sandbox agent (``agent_c/bastion-agent.c``) into a static binary, at set-up.

A static binary runs as PID 1 of any image, whatever libc (if any) the image has.  It
is built by set-up, like any other dependency, never by the server:

* in a source checkout, ``make setup`` (which runs ``python -m
  bastion_server.runtime.agent_build``);
* for a server installed from a wheel, ``bastion image build`` (the set-up such a
  server needs anyway; it builds the agent even when the image is already there).

``bastion serve`` only looks for the binary (:func:`find_agent`) and refuses to start,
naming that fix, when it is missing or was built from another source.  Building needs
gcc and a static libc (Debian/Ubuntu: ``apt-get install gcc libc6-dev``).

The binary lives beside its source, named after a digest of the source and the
compiler flags (``agent_c/bastion-agent-<digest>``): each installation finds its own,
and a changed source leaves no binary of its digest, so a stale build is never taken
for a current one (modification times, which a checkout or a wheel install sets as it
likes, are not consulted).  A build removes the binaries of other digests.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bastion_server.runtime.host import HostNotReady

SOURCE = Path(__file__).resolve().parent / "agent_c" / "bastion-agent.c"
#: Where set-up puts the binary and the server looks for it: beside the source.
AGENT_DIR = SOURCE.parent
#: The binary's name inside the sandbox (and the prefix of its name on the host).
BINARY_NAME = "bastion-agent"
CFLAGS = ("-O2", "-static")
_BUILD_NAME = re.compile(re.escape(BINARY_NAME) + r"-[0-9a-f]{16}")
#: What every message about a missing or stale agent tells the operator to run.
FIX = (
    "run `make setup` (in a source checkout) or `bastion image build` (an installed "
    "server); building it needs gcc and a static libc (apt-get install gcc libc6-dev)"
)


class AgentBuildError(RuntimeError):
    """The agent could not be compiled (no compiler, no static libc, a compile error)."""


class AgentNotBuilt(HostNotReady):
    """The server found no agent binary built from the current source."""


def build_id(source: Path = SOURCE) -> str:
    """The digest naming a build of ``source``: its bytes and the compiler flags."""
    digest = hashlib.sha256("\0".join(CFLAGS).encode() + b"\0")
    try:
        digest.update(source.read_bytes())
    except FileNotFoundError:
        raise AgentBuildError(f"agent source {source} is missing") from None
    return digest.hexdigest()[:16]


def binary_path(dest_dir: Path = AGENT_DIR, source: Path = SOURCE) -> Path:
    """Where the build of ``source`` in ``dest_dir`` is (whether it exists or not)."""
    return dest_dir / f"{BINARY_NAME}-{build_id(source)}"


def _builds(dest_dir: Path) -> list[Path]:
    """Every agent binary in ``dest_dir``, of any source."""
    return sorted(p for p in dest_dir.glob(f"{BINARY_NAME}-*") if _BUILD_NAME.fullmatch(p.name))


def find_agent(dest_dir: Path = AGENT_DIR, source: Path = SOURCE) -> Path:
    """The binary built from ``source`` as it is now; :class:`AgentNotBuilt` if none is."""
    try:
        dest = binary_path(dest_dir, source)
    except AgentBuildError as exc:
        raise AgentNotBuilt(f"{exc}: the installation is incomplete, reinstall it") from None
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    if _builds(dest_dir):
        raise AgentNotBuilt(
            f"the sandbox agent in {dest_dir} was built from another version of "
            f"{source.name} (stale): {FIX}"
        )
    raise AgentNotBuilt(f"the sandbox agent is not built (no {dest.name} in {dest_dir}): {FIX}")


def build_agent(dest_dir: Path = AGENT_DIR, source: Path = SOURCE) -> Path:
    """Compile ``source`` into ``dest_dir`` unless its build is already there.

    It is compiled under a temporary name and renamed into place, so a reader never
    sees a half-written file and two concurrent builds do not collide; the builds of
    other sources in ``dest_dir`` are removed after.
    """
    dest = binary_path(dest_dir, source)
    if dest.is_file():
        return dest
    gcc = shutil.which("gcc")
    if gcc is None:
        raise AgentBuildError(
            "gcc is not installed, so the sandbox agent cannot be built: "
            "install gcc and a static libc (Debian/Ubuntu: apt-get install gcc libc6-dev)"
        )
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{BINARY_NAME}-", dir=dest_dir)
    except OSError as exc:
        raise AgentBuildError(f"cannot write the sandbox agent into {dest_dir}: {exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proc = subprocess.run(
            [gcc, *CFLAGS, "-o", str(tmp), str(source)],
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
    for old in _builds(dest_dir):
        if old != dest:
            old.unlink(missing_ok=True)
    return dest


def set_up(report: Callable[[str], None]) -> Path:
    """Build the agent where the server looks for it unless it is there; ``report`` a
    line when it had to be built.  What ``make setup`` and ``bastion image build`` do."""
    dest = binary_path()
    if dest.is_file():
        return dest
    dest = build_agent()
    report(f"built the sandbox agent {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m bastion_server.runtime.agent_build``: build the agent unless built."""
    parser = argparse.ArgumentParser(
        prog="python -m bastion_server.runtime.agent_build",
        description="Build the static sandbox agent from its C source, unless a build of "
        "the current source is already there (where `bastion serve` looks for it).",
    )
    parser.parse_args(argv)
    try:
        set_up(lambda line: print(f"setup: {line}"))
    except AgentBuildError as exc:
        print(f"setup: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
