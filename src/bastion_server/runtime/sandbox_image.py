"""What a runtime needs to know of the image a sandbox's root filesystem stands on.

An image is a chain of read-only layers: a base root filesystem and the deltas each
image built over another added (see :mod:`bastion_server.image.store`).  Every layer
is a directory whose files are owned by *shifted* ids: container id ``n`` is host id
``uid_shift + n`` on disk.  The runtime mounts each one idmapped onto the session's
own id range and stacks them under the session's writable layer, top first, as an
overlay's ``lowerdir`` (``/proc/self/fd/a:/proc/self/fd/b:...``).

A delta layer is an overlay upper directory: its whiteouts (character devices 0/0)
and opaque directories (the ``trusted.overlay.opaque`` xattr) hide what the layers
below it hold, as they did in the sandbox that made it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The file in a session's directory that records the image it was created from.
SESSION_IMAGE_FILE = "image.json"


@dataclass(frozen=True)
class SandboxImage:
    """An image, as a runtime mounts it.

    Attributes:
        layers: The layer directories, top first (the overlay's lowerdir order); the
            last is the base root filesystem.
        uid_shift: Host id that container id 0 is in every layer's files.
        sandbox_uid: The ordinary sandbox user's uid inside the sandbox.
        sandbox_gid: Its gid.
        home: Its home directory (where a job starts unless it names a cwd).
        name: The image's name (``default``, ``python``, a user's).
        digest: What identifies its content (``sha256:...``): two images of one
            digest have the same layers.
        env: Environment every job of a session of this image starts with.
        workdir: Where jobs start unless they name a cwd (default: ``home``).
    """

    layers: tuple[str, ...]
    uid_shift: int
    sandbox_uid: int
    sandbox_gid: int
    home: str
    name: str = "default"
    digest: str = ""
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("an image has at least one layer")

    @property
    def rootfs(self) -> str:
        """The base layer (the root filesystem every other layer is a delta over)."""
        return self.layers[-1]

    @property
    def cwd(self) -> str:
        return self.workdir or self.home

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SandboxImage:
        data: dict[str, Any] = json.loads(text)
        data["layers"] = tuple(data["layers"])
        data["env"] = tuple((str(k), str(v)) for k, v in data.get("env", ()))
        return cls(**data)

    def save(self, session_dir: Path) -> None:
        """Record this as the image of the session whose directory is ``session_dir``
        (atomically: a crash leaves the old record or the new one)."""
        temp = session_dir / f".{SESSION_IMAGE_FILE}.tmp"
        temp.write_text(self.to_json())
        temp.replace(session_dir / SESSION_IMAGE_FILE)

    @classmethod
    def recorded(cls, session_dir: Path) -> SandboxImage | None:
        """The image a session's directory records (None: it predates images, or it
        has no directory)."""
        try:
            return cls.from_json((session_dir / SESSION_IMAGE_FILE).read_text())
        except FileNotFoundError:
            return None
