"""Test support: a real ``bastion serve`` in a subprocess, and the in-memory runtime.

:class:`FakeRuntime` (from :mod:`bastion_server.runtime.fake`) backs service-level
tests that need no root and no sandbox.  :class:`ServerProcess` is a real
``bastion serve`` in a subprocess, for tests and benchmarks.

A ServerProcess starts the server on a free loopback port with a data directory of
its own, waits for ``/v1/health``, and stops it with SIGTERM.  The data directory must
be reachable by the sandboxes' unprivileged root (every directory above it searchable
by others), so callers create it under a mode-0711 parent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bastion.wire import MAX_PAGE_SIZE
from bastion_server.runtime.agent_build import build_agent
from bastion_server.runtime.fake import FakeRuntime

__all__ = ["IMAGES_DIR", "FakeRuntime", "ServerProcess", "free_port"]

IMAGES_DIR = Path(os.environ.get("BASTION_IMAGES_DIR", "/var/lib/bastion/images"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A ``bastion serve`` subprocess that can be stopped and started again."""

    data_dir: Path
    api_keys: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    #: Start the server in a process group of its own (a Ctrl-C meant for the caller
    #: then does not reach it, so the caller can clean up through the API first).
    own_process_group: bool = False
    #: Environment variables for the server on top of the caller's (whose BASTION_*
    #: are dropped), such as ``{"BASTION_FAULT": "create.after_insert"}``; read at
    #: every start.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-server.log"

    def start(self, timeout: float = 60.0) -> None:
        # What `make setup` does first, for a test run that skipped it: the sandbox agent
        # built from the source as it is now (`bastion serve` itself never builds it).
        build_agent()
        args = [
            sys.executable, "-m", "bastion", "serve", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--images-dir", str(IMAGES_DIR),
            *self.extra_args,
        ]  # fmt: skip
        for key in self.api_keys:
            args += ["--api-key", key]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL,
                start_new_session=self.own_process_group,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"bastion serve exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("bastion serve did not answer in time:\n" + self.log_tail())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the server (a graceful shutdown); returns its exit status."""
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

    def _session_ids(self, headers: dict[str, str]) -> list[str]:
        """The ids of the key's sessions not deleted, from every page of the list."""
        ids: list[str] = []
        params = {"limit": str(MAX_PAGE_SIZE)}
        while True:
            page = httpx.get(
                self.url + "/v1/sessions", params=params, headers=headers, timeout=60
            ).json()
            ids += [s["session_id"] for s in page["sessions"] if s.get("status") != "deleted"]
            if not page.get("next_cursor"):
                return ids
            params["cursor"] = page["next_cursor"]

    def delete_all_sessions(self, workers: int = 8) -> int:
        """Delete every session of every configured key; returns how many went.

        So that no sandbox outlives a test run or a benchmark."""
        if not self.alive():
            return 0
        deleted = 0
        for headers in [{"Authorization": f"Bearer {k}"} for k in self.api_keys] or [{}]:
            try:
                ids = self._session_ids(headers)
            except (httpx.HTTPError, KeyError, ValueError):
                continue

            def delete(sid: str, headers: dict[str, str] = headers) -> bool:
                try:
                    r = httpx.delete(f"{self.url}/v1/sessions/{sid}", headers=headers,
                                     timeout=120)  # fmt: skip
                except httpx.HTTPError:
                    return False
                return r.status_code < 300

            with ThreadPoolExecutor(max_workers=workers) as pool:
                deleted += sum(pool.map(delete, ids))
        return deleted
