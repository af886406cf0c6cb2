"""What every measurement gets: the server, the run's settings, progress output."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bastion import Bastion, BastionError
from bastion_server.testing import IMAGES_DIR
from bench.server import BenchServer
from bench.stats import stopwatch


def image_rootfs() -> str:
    """The root filesystem of the image the server runs sandboxes from."""
    try:
        from bastion_server.image import resolve_image

        return str(resolve_image(IMAGES_DIR).rootfs)
    except Exception:  # any failure: fall back to the newest build of the default image
        builds = sorted(IMAGES_DIR.glob("default-*/rootfs"), key=lambda p: p.stat().st_mtime)
        if not builds:
            raise RuntimeError(f"no sandbox image under {IMAGES_DIR}: run `make setup`") from None
        return str(builds[-1])


@dataclass
class Context:
    server: BenchServer
    quick: bool
    #: Idle sessions the density test tries to reach.
    density_target: int
    rootfs: str = field(default_factory=image_rootfs)
    started: float = field(default_factory=time.monotonic)
    #: Sessions this run created and has not deleted yet (teardown deletes the rest).
    live: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def scratch(self) -> Path:
        return self.server.scratch

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"  [{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    @staticmethod
    def timed() -> contextlib.AbstractContextManager[list[float]]:
        return stopwatch()

    def client(self, timeout: float = 120.0) -> Bastion:
        return Bastion(base_url=self.server.url, timeout=timeout)

    def remember(self, sid: str) -> None:
        """Note a session this run created (from any thread)."""
        with self._lock:
            self.live.add(sid)

    def forget(self, sid: str) -> None:
        """Note that a session this run created is deleted."""
        with self._lock:
            self.live.discard(sid)

    def new_session(self, client: Bastion) -> str:
        """A created and started session, remembered for cleanup."""
        sid = client.sessions.create()["session_id"]
        self.remember(sid)
        client.sessions.start(sid)
        return sid

    def delete_session(self, client: Bastion, sid: str) -> None:
        with contextlib.suppress(BastionError):
            client.sessions.delete(sid)
        self.forget(sid)

    @contextlib.contextmanager
    def sessions(self, client: Bastion, count: int) -> Iterator[list[str]]:
        """``count`` running sessions for the block, deleted after it."""
        sids: list[str] = []
        try:
            for _ in range(count):
                sids.append(self.new_session(client))
            yield sids
        finally:
            for sid in sids:
                self.delete_session(client, sid)
