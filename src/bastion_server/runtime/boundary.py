"""The runtime boundary: a backend's public methods raise :class:`SandboxError` only.

A backend works with the host (files, mounts, sockets, subprocesses), where anything
may fail with an :class:`OSError`.  The service layer must not have to know that: it
catches ``SandboxError`` and nothing else.  :func:`sandbox_errors_only` is the one
place that translates, for every public method a backend class defines; the message
names the operation and the sandbox, and the error's cause, never a host path (the
text can reach a client).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from bastion_server.runtime.base import SandboxError

_C = TypeVar("_C", bound=type)


def _translated(name: str, args: tuple[Any, ...], exc: OSError) -> SandboxError:
    target = f"sandbox {args[0]}: " if args and isinstance(args[0], str) else ""
    cause = exc.strerror or type(exc).__name__
    return SandboxError(f"{target}{name.replace('_', ' ')} failed: {cause}")


def _wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_boundary(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(self, *args, **kwargs)
            except OSError as exc:
                raise _translated(name, args, exc) from exc

        return async_boundary

    @functools.wraps(method)
    def boundary(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            raise _translated(name, args, exc) from exc

    return boundary


def sandbox_errors_only(cls: _C) -> _C:
    """Class decorator: every public method ``cls`` defines raises an OSError as a
    :class:`SandboxError` (its cause kept as ``__cause__``).  Static and class methods
    and properties are left as they are (they are no sandbox operation)."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        setattr(cls, name, _wrap(name, member))
    return cls
