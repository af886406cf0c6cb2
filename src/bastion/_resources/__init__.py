"""The sub-APIs of :class:`bastion.Bastion` and :class:`bastion.AsyncBastion`.

One module per resource (``sessions``, ``jobs``, ``files``, ``keys``, ``snapshots``,
``images``): first the requests of its endpoints (path, parameters, body, whether a
repeat is safe) and how their answers are read, shared by both clients; then its
sync class and its async twin, which only send those requests.  Jobs, the largest,
keeps its requests in ``job_requests`` and the following of a job to its result
(deadlines, status changes, events) in ``job_follow``.
"""

from .files import Files
from .jobs import Jobs
from .sessions import Sessions

__all__ = ["Files", "Jobs", "Sessions"]
