"""Shared fixtures: real `bastion serve` processes with real sandboxes.

Integration tests never mock the sandbox: each server here is the real CLI in a
subprocess, on a free loopback port, with its own data directory, using the image
that `make setup` built.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

IMAGES_DIR = Path(os.environ.get("BASTION_IMAGES_DIR", "/var/lib/bastion/images"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A `bastion serve` subprocess that can be stopped and started again."""

    data_dir: Path
    api_keys: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-server.log"

    def start(self, timeout: float = 60.0) -> None:
        args = [
            sys.executable,
            "-m",
            "bastion",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--images-dir",
            str(IMAGES_DIR),
            *self.extra_args,
        ]
        for key in self.api_keys:
            args += ["--api-key", key]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"bastion serve exited with {self.proc.returncode}:\n" + self.log_tail()
                )
            try:
                if httpx.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("bastion serve did not answer in time:\n" + self.log_tail())

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def cleanup_sandboxes(self) -> None:
        """Delete every session left behind, so no sandbox outlives the test run."""
        headers_list = [{"Authorization": f"Bearer {k}"} for k in self.api_keys] or [{}]
        for headers in headers_list:
            try:
                sessions = httpx.get(self.url + "/v1/sessions", headers=headers, timeout=30).json()[
                    "sessions"
                ]
                for s in sessions:
                    httpx.delete(
                        f"{self.url}/v1/sessions/{s['session_id']}", headers=headers, timeout=60
                    )
            except (httpx.HTTPError, KeyError, ValueError):
                pass


@pytest.fixture(scope="session")
def data_root() -> Iterator[Path]:
    """A parent for servers' data dirs that sandboxes can reach (pytest's tmp is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="bastion-test-", dir="/var/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _require_image() -> None:
    if not IMAGES_DIR.is_dir():
        pytest.fail(f"no sandbox image under {IMAGES_DIR}: run `make setup` first")


@pytest.fixture(scope="session")
def server(data_root: Path) -> Iterator[ServerProcess]:
    """One unauthenticated server (loopback only) for the whole run."""
    _require_image()
    srv = ServerProcess(data_root / "shared")
    srv.start()
    yield srv
    srv.cleanup_sandboxes()
    srv.stop()


KEY_A = "test-key-alpha-0123456789"
KEY_B = "test-key-bravo-9876543210"


@pytest.fixture(scope="session")
def auth_server(data_root: Path) -> Iterator[ServerProcess]:
    """A server with two API keys (two tenants)."""
    _require_image()
    srv = ServerProcess(data_root / "auth", api_keys=(KEY_A, KEY_B))
    srv.start()
    yield srv
    srv.cleanup_sandboxes()
    srv.stop()


@pytest.fixture
def private_server(data_root: Path) -> Iterator[ServerProcess]:
    """A server of this test's own (for restarts and settings of its own); not started."""
    _require_image()
    parent = Path(tempfile.mkdtemp(dir=data_root))
    parent.chmod(0o711)
    srv = ServerProcess(parent / "data")
    yield srv
    if srv.proc is None:
        try:
            srv.start()
        except RuntimeError:
            return
    srv.cleanup_sandboxes()
    srv.stop()
