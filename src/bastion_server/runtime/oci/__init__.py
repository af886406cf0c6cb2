"""The OCI backend (crun, runc...): :class:`OciRuntime` and its parts, one concern a
module (see :mod:`.runtime`)."""

from bastion_server.runtime.oci.runtime import OciRuntime

__all__ = ["OciRuntime"]
