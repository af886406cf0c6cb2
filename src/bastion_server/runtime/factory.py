"""Which backend runs the sandboxes: chosen by configuration (``--backend``).

Each entry of :data:`BACKENDS` makes one backend's :class:`Runtime` from the server's
configuration.  Adding a backend is a module in ``runtime/`` (a :class:`Runtime`
subclass honouring the contract of :mod:`bastion_server.runtime.base`) and one line
here; nothing in ``api/`` or ``service/`` changes.  A backend that can hand sandboxes
over (:meth:`Runtime.hand_over`) gets the warm pool by wrapping itself in
:func:`with_warm_pool`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion_server.config import ServerConfig
    from bastion_server.runtime.base import Runtime
    from bastion_server.runtime.sandbox_image import SandboxImage


def with_warm_pool(runtime: Runtime, image: SandboxImage, config: ServerConfig) -> Runtime:
    """``runtime`` with the configured warm pools (``--pool-size``, ``--pool``): their
    sandboxes have the default limits, so a session that asks for none gets one."""
    from bastion_server.runtime.base import SandboxLimits
    from bastion_server.runtime.warm_pool import WarmPool

    d = config.default_limits
    limits = SandboxLimits(d.memory_mb, d.pids, d.cpus, d.disk_mb)
    return WarmPool(runtime, image, limits, config.pool_size)


def _oci(config: ServerConfig) -> Runtime:
    """OCI containers run by ``--runtime`` (crun, runc...) over the configured image
    (built by `bastion image build`)."""
    from bastion_server.image.store import ImageStore
    from bastion_server.runtime.oci import OciRuntime

    store = ImageStore(config.images_dir)
    image = store.sandbox_image(store.base(config.image))
    runtime = OciRuntime(
        config.data_dir, image, binary=config.runtime, global_args=config.runtime_args
    )
    return with_warm_pool(runtime, image, config)


def _fake(config: ServerConfig) -> Runtime:
    """Sandboxes as records in memory (runtime/fake.py): no isolation and no real
    commands, for trying the API and for tests."""
    from bastion_server.runtime.fake import FakeRuntime

    return FakeRuntime(config.data_dir / "fake")


#: Every backend, by its ``--backend`` name.
BACKENDS: dict[str, Callable[[ServerConfig], Runtime]] = {
    "oci": _oci,
    "fake": _fake,
}


def make_backend(config: ServerConfig) -> Runtime:
    """The configured backend's runtime (``config.backend``, one of :data:`BACKENDS`)."""
    try:
        make = BACKENDS[config.backend]
    except KeyError:
        raise ValueError(
            f"unknown backend {config.backend!r}: one of {', '.join(BACKENDS)}"
        ) from None
    return make(config)
