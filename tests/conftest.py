"""Shared fixtures: real `bastion serve` processes with real sandboxes.

Integration tests never mock the sandbox: each server here is the real CLI in a
subprocess, on a free loopback port, with its own data directory, using the image
that `make setup` built.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion_server.testing import IMAGES_DIR, ServerProcess, free_port

__all__ = ["IMAGES_DIR", "ServerProcess", "free_port"]


def pytest_configure(config: pytest.Config) -> None:
    """Run as from a terminal even when started in the background: a shell hands a
    background job SIGINT and SIGQUIT ignored, and every child (servers, CLIs) would keep
    them so, which tests of Ctrl-C cannot see through."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


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
    srv.delete_all_sessions()
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
    srv.delete_all_sessions()
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
    srv.delete_all_sessions()
    srv.stop()
