"""The sub-APIs of :class:`bastion.Bastion`: ``sessions``, ``jobs`` and ``files``."""

from .files import Files
from .jobs import Jobs
from .sessions import Sessions

__all__ = ["Files", "Jobs", "Sessions"]
