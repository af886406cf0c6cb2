"""The runtime boundary (runtime/boundary.py): a backend's public methods raise
SandboxError only, so the service layer never has to catch OSError."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from bastion_server.runtime.base import Runtime, SandboxError, SandboxNotRunning
from bastion_server.runtime.boundary import sandbox_errors_only
from bastion_server.runtime.idmap import IdRangeRegistry
from bastion_server.runtime.oci import OciRuntime
from bastion_server.runtime.sandbox_image import SandboxImage
from bastion_server.runtime.warm_pool import WarmPool


@sandbox_errors_only
class _Backend:
    async def create(self, session_id: str) -> None:
        open(f"/nonexistent-bastion-dir/{session_id}")

    def files(self, session_id: str) -> None:
        raise PermissionError(13, "Permission denied", "/var/lib/secret/host/path")

    async def stop(self, session_id: str) -> None:
        raise SandboxNotRunning(f"sandbox {session_id} is not running")

    def _private(self) -> None:
        raise OSError(5, "Input/output error")

    @staticmethod
    def helper() -> None:
        raise OSError(5, "Input/output error")


def test_an_os_error_of_a_coroutine_method_leaves_as_a_sandbox_error() -> None:
    with pytest.raises(SandboxError) as caught:
        asyncio.run(_Backend().create("s1"))
    assert str(caught.value) == "sandbox s1: create failed: No such file or directory"
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_an_os_error_of_a_plain_method_leaves_as_a_sandbox_error_without_a_host_path() -> None:
    with pytest.raises(SandboxError) as caught:
        _Backend().files("s2")
    assert str(caught.value) == "sandbox s2: files failed: Permission denied"
    assert "/var/lib" not in str(caught.value)


def test_sandbox_errors_pass_as_they_are() -> None:
    with pytest.raises(SandboxNotRunning, match="s3 is not running"):
        asyncio.run(_Backend().stop("s3"))


def test_private_and_static_methods_are_no_boundary() -> None:
    with pytest.raises(OSError):
        _Backend()._private()
    with pytest.raises(OSError):
        _Backend.helper()


@pytest.mark.parametrize("backend", [OciRuntime, WarmPool])
def test_every_public_method_of_the_backends_is_behind_the_boundary(backend: type) -> None:
    contract = {name for name, m in vars(Runtime).items() if inspect.isfunction(m)}
    public = {n for n in contract if not n.startswith("_")}
    defined = public & set(vars(backend))
    assert defined, backend
    for name in defined:
        assert hasattr(vars(backend)[name], "__wrapped__"), f"{backend.__name__}.{name}"


def test_the_oci_backend_turns_a_host_failure_into_a_sandbox_error(tmp_path: Path) -> None:
    image = SandboxImage(layers=(str(tmp_path / "rootfs"),), uid_shift=100000,
                         sandbox_uid=1000, sandbox_gid=1000, home="/home/user")  # fmt: skip
    runtime = OciRuntime(tmp_path, image, id_ranges=IdRangeRegistry(tmp_path / "ranges"))
    # No such session directory: recording its layers fails on the host.
    with pytest.raises(SandboxError) as caught:
        asyncio.run(runtime.set_layers("gone", []))
    assert str(caught.value) == "sandbox gone: set layers failed: No such file or directory"
    assert isinstance(caught.value.__cause__, FileNotFoundError)
