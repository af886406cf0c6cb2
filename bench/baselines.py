"""Baselines measured in the same run: the floor, and what users would pick instead.

* ``host_true``: ``subprocess.run(["true"])`` on the host (the floor of any exec).
* ``crun_exec``: ``crun --root <state root> exec <session> true`` into a running Bastion
  sandbox (what a runtime that shells out to crun per job would pay).
* ``podman_exec`` / ``podman_run``: ``podman exec`` into a running container and
  ``podman run --rm`` of an image imported from the same root filesystem: what
  Docker-style sandbox tools pay per command.

Podman runs entirely from private directories under the benchmark's own directory
(storage, run root, tmp, network config, ``containers.conf`` through
``CONTAINERS_CONF``), so nothing system-wide changes; if it cannot be made to work the
reason is recorded instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bastion import Bastion
from bench.context import Context
from bench.stats import summarize, time_ms

PODMAN_IMAGE = "bastion-bench"
PODMAN_CONTAINER = "bastion-bench-exec"
#: Places podman may touch whatever its configuration says (netavark's run directory is
#: fixed for root); the ones this run creates are removed again when they hold nothing
#: but lock files.
SYSTEM_PATHS = (
    "/run/containers/networks",
    "/run/containers",
    "/run/libpod",
    "/etc/containers/networks",
    "/var/lib/containers",
)


def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n_host = 100 if ctx.quick else 300
    ctx.say(f"host subprocess.run(['true']) x{n_host}")
    out["host_true"] = summarize(
        time_ms(lambda: subprocess.run(["true"], check=True), n_host, warmup=10), "ms"
    )
    try:
        out["crun_exec"] = _crun_exec(ctx)
    except (OSError, subprocess.SubprocessError) as exc:
        out["crun_exec"] = {"error": f"{type(exc).__name__}: {exc}"}
    out.update(_podman(ctx))
    return out


def container_name(ctx: Context, sid: str) -> str:
    """The session's OCI container: named after the session, or, for a sandbox taken
    from the server's warm pool, the pool name the runtime recorded in its directory."""
    try:
        return (ctx.server.data_dir / "sessions" / sid / "container").read_text().strip()
    except OSError:
        return sid


def _crun_exec(ctx: Context) -> dict[str, Any]:
    runs = 30 if ctx.quick else 100
    crun = shutil.which("crun")
    if crun is None:
        return {"error": "crun is not installed"}
    ctx.say(f"crun exec into a running Bastion sandbox x{runs}")
    with Bastion(base_url=ctx.server.url) as client:
        sid = ctx.new_session(client)
        try:
            argv = [crun, "--root", ctx.server.state_root, "exec", container_name(ctx, sid), "true"]
            samples = time_ms(lambda: subprocess.run(argv, check=True), runs, warmup=3)
        finally:
            ctx.delete_session(client, sid)
    return summarize(samples, "ms")


# -- podman ------------------------------------------------------------------------------


class Podman:
    """The ``podman`` command with every piece of state in a private directory."""

    def __init__(self, home: Path) -> None:
        self.home = home
        for sub in ("root", "runroot", "tmp", "networks", "volumes", "copytmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        conf = home / "containers.conf"
        conf.write_text(
            "[containers]\n"
            # The host's hard limits (no CAP_SYS_RESOURCE here): podman's default of
            # 1048576 open files would make every container start fail.
            'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            "[network]\n"
            f'network_config_dir = "{home / "networks"}"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{home / "events.log"}"\n'
            f'tmp_dir = "{home / "tmp"}"\n'
            f'volume_path = "{home / "volumes"}"\n'
            f'static_dir = "{home / "root" / "libpod"}"\n'
            f'image_copy_tmp_dir = "{home / "copytmp"}"\n'
            'runtime = "crun"\n'
        )
        storage = home / "storage.conf"
        storage.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{home / "root"}"\n'
            f'runroot = "{home / "runroot"}"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
            "TMPDIR": str(home / "copytmp"),
        }
        self.prefix = [
            "podman",
            "--root",
            str(home / "root"),
            "--runroot",
            str(home / "runroot"),
            "--tmpdir",
            str(home / "tmp"),
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            self.argv(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            raise PodmanError(f"podman {' '.join(args[:2])} failed: {detail[-2000:]}")
        return proc.stdout

    def import_rootfs(self, rootfs: str) -> None:
        """``tar -C ROOTFS -c . | podman import - NAME``."""
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        try:
            proc = subprocess.run(
                self.argv("import", "-", PODMAN_IMAGE),
                stdin=tar.stdout,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
        if proc.returncode != 0 or tar.returncode != 0:
            raise PodmanError(f"podman import failed: {proc.stderr.strip()[-2000:]}")

    def cleanup(self) -> None:
        for args in (("rm", "--force", "--time", "0", "--all"), ("rmi", "--all", "--force")):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.run(*args, check=False)


def _remove_new(paths: list[str]) -> None:
    """Remove these directories (created by this run) if only lock files are in them."""
    for path in paths:
        p = Path(path)
        with contextlib.suppress(OSError):
            for child in p.iterdir():
                if child.is_file() and child.name.endswith(".lock"):
                    child.unlink()
            p.rmdir()


class PodmanError(Exception):
    pass


def ensure_podman(ctx: Context) -> str | None:
    """Install Debian's podman when missing; returns why it is unavailable, or None."""
    if shutil.which("podman"):
        return None
    if not shutil.which("apt-get"):
        return "podman is not installed and there is no apt-get to install it"
    ctx.say("podman is missing: installing it (apt-get install -y podman), this takes a minute")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ("install", "update+install"):
        if attempt == "update+install":
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "podman"],
            capture_output=True,
            text=True,
            env=env,
            timeout=1200,
        )
        if proc.returncode == 0 and shutil.which("podman"):
            return None
    return f"apt-get install podman failed: {(proc.stderr or proc.stdout).strip()[-1000:]}"


def _podman(ctx: Context) -> dict[str, Any]:
    problem = ensure_podman(ctx)
    if problem is not None:
        return {"podman_error": problem}
    with contextlib.suppress(Exception):
        from bastion_server.runtime import host

        host.fix_hybrid_cgroups()  # the server has done it already; harmless again
    existed = {p for p in SYSTEM_PATHS if os.path.lexists(p)}
    podman = Podman(ctx.server.parent / "podman")
    out: dict[str, Any] = {}
    n_exec, n_run = (20, 10) if ctx.quick else (60, 40)
    try:
        ctx.say("podman import of the sandbox image's root filesystem")
        with ctx.timed() as t:
            podman.import_rootfs(ctx.rootfs)
        out["podman_import_s"] = round(t[0] / 1000, 2)
        # Like a Bastion sandbox: no network but loopback.
        image = ("--network", "none", PODMAN_IMAGE)
        ctx.say(f"podman run --rm x{n_run}")
        out["podman_run"] = summarize(
            time_ms(lambda: podman.run("run", "--rm", *image, "true"), n_run, warmup=2), "ms"
        )
        podman.run("run", "-d", "--name", PODMAN_CONTAINER, *image, "sleep", "infinity")
        ctx.say(f"podman exec x{n_exec}")
        out["podman_exec"] = summarize(
            time_ms(lambda: podman.run("exec", PODMAN_CONTAINER, "true"), n_exec, warmup=2),
            "ms",
        )
    except (PodmanError, OSError, subprocess.SubprocessError) as exc:
        out["podman_error"] = str(exc)
    finally:
        podman.cleanup()
        _remove_new([p for p in SYSTEM_PATHS if p not in existed])
    return out
