"""The Bastion server: HTTP API -> services -> store and OCI runtime.

Layers, each ignorant of the one above: ``api`` (routes, auth, the error table),
``service`` (session state machine, jobs, files), ``store`` (SQLite records, job
logs) and ``runtime`` (sandboxes: the OCI runtime and the in-sandbox agent).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bastion-py-sdk")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
