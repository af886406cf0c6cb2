"""The OCI backend's hand-over of a warm pool's sandbox to a session (no root needed:
directories and the id-range registry only), and the sandbox reference the session
records in the store: the container's own name."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from bastion_server.runtime.idmap import IdRangeRegistry
from bastion_server.runtime.oci import OciRuntime
from bastion_server.runtime.sandbox_image import SandboxImage


def _runtime(tmp_path: Path) -> tuple[OciRuntime, SandboxImage]:
    image = SandboxImage(layers=(str(tmp_path / "rootfs"),), uid_shift=100000,
                         sandbox_uid=1000, sandbox_gid=1000, home="/home/user")  # fmt: skip
    registry = IdRangeRegistry(tmp_path / "ranges")
    runtime = OciRuntime(tmp_path / "data", image, id_ranges=registry)
    runtime.sessions_dir.mkdir(parents=True)
    return runtime, image


def test_a_sessions_sandbox_is_its_own_container_by_default(tmp_path: Path) -> None:
    runtime, _ = _runtime(tmp_path)
    (runtime.sessions_dir / "ses_1").mkdir()
    assert runtime.sandbox_ref("ses_1") == "ses_1"


def test_a_handed_over_sandbox_keeps_its_container_and_id_range(tmp_path: Path) -> None:
    runtime, image = _runtime(tmp_path)
    pooled = runtime.sessions_dir / "pool_ab12"
    pooled.mkdir()
    rng = runtime.id_ranges.take(pooled)
    image.save(pooled)
    renamed = dataclasses.replace(image, name="mine", env=(("A", "1"),))  # same layers
    asyncio.run(runtime.hand_over("pool_ab12", "ses_2", renamed))
    session = runtime.sessions_dir / "ses_2"
    assert not pooled.exists() and session.is_dir()
    assert (session / "container").read_text() == "pool_ab12"
    assert runtime.sandbox_ref("ses_2") == "pool_ab12"
    assert runtime.image_of("ses_2") == renamed
    assert IdRangeRegistry.recorded(session) == rng
    # A server started afresh finds the same from the directory alone.
    again = OciRuntime(tmp_path / "data", image, id_ranges=runtime.id_ranges)
    assert again.sandbox_ref("ses_2") == "pool_ab12"
    assert again.image_of("ses_2") == renamed
    assert again.id_range("ses_2") == rng
