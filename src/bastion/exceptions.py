"""The SDK's exceptions, under their public module name.

``from bastion.exceptions import SessionError`` (as the product page writes it) and
``from bastion import SessionError`` give the same classes; they are defined in
``bastion._exceptions``, whose docstring draws the hierarchy.  This module exports
exactly that module's ``__all__``, so a class added there is public here too.
"""

from __future__ import annotations

from . import _exceptions
from ._exceptions import *  # noqa: F403  (the list is _exceptions.__all__)

__all__ = list(_exceptions.__all__)
__doc__ = f"{__doc__}\n{_exceptions.__doc__}"
