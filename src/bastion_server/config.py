"""Server settings: one dataclass, filled from the command line, the environment and a
config file (``bastion serve --config bastion.toml``; see :mod:`bastion_server.cli`)."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("/var/lib/bastion")
DEFAULT_IMAGES_DIR = Path("/var/lib/bastion/images")
#: What ``on_shutdown`` may say happens to sessions when the server stops.
SHUTDOWN_POLICIES = ("keep", "stop", "delete")


class ConfigError(ValueError):
    """The settings cannot work together; the message says what to change."""


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    pids: int
    cpus: float
    disk_mb: int


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = DEFAULT_DATA_DIR
    images_dir: Path = DEFAULT_IMAGES_DIR
    image: str = "default"
    api_keys: tuple[str, ...] = ()
    #: Which backend runs the sandboxes (runtime/factory.py BACKENDS).
    backend: str = "oci"
    #: The OCI backend's runtime binary, and flags it is given before every command.
    runtime: str = "crun"
    runtime_args: tuple[str, ...] = ()
    #: Limits a session gets when it asks for none.
    default_limits: Limits = field(default_factory=lambda: Limits(512, 256, 1.0, 1024))
    #: The most a session may ask for.
    max_limits: Limits = field(
        default_factory=lambda: Limits(8192, 4096, float(os.cpu_count() or 1), 65536)
    )
    #: Sandboxes kept started ahead of need (default limits) so a create+start is a
    #: hand-over, not a container start.  0 turns the warm pool off.
    pool_size: int = 2
    #: Whether sessions may ask for outbound network at all.
    allow_network: bool = True
    # Image builds (service/images.py): each runs in a sandbox of its own.
    #: Longest a whole build may take (seconds).
    build_timeout: float = 1800.0
    #: Disk a build's sandbox gets (MiB; within max_limits.disk_mb).
    build_disk_mb: int = 8192
    #: A CA bundle (such as the host's trust store) handed to builds, for package
    #: indexes reached through a TLS-intercepting proxy; None: the image's own.
    build_ca_file: Path | None = None
    #: Hand the server's HTTP(S)_PROXY / NO_PROXY variables to builds.
    build_proxy_env: bool = True
    #: Where builds may connect (a network allow-list); empty: anywhere public.
    build_network_allow: tuple[str, ...] = ()
    #: Warm pools of other images than the default: ``"IMAGE=N"`` (a shared image).
    pool_images: tuple[str, ...] = ()
    #: Registries ``images.pull`` may fetch from (host[:port]); empty: any.
    pull_registries: tuple[str, ...] = ()
    #: How often the reaper looks for expired sessions and unowned sandboxes (seconds).
    reaper_interval: float = 1.0
    max_upload_bytes: int = 4 * 1024**3
    #: Output kept per job and stream; the rest is counted and dropped.
    max_output_bytes: int = 16 * 1024**2
    #: Longest a single ``/wait`` request is held open.
    max_wait_seconds: float = 60.0
    log_level: str = "info"
    # Request-level limits (docs/SECURITY.md, "Request-level limits").
    #: Largest JSON request body (uploads are not JSON: ``max_upload_bytes``).
    max_json_bytes: int = 1024**2
    #: Deepest nesting of arrays and objects a JSON request body may have.
    max_json_depth: int = 64
    #: Seconds a connection has to send a request's line and headers, from its opening
    #: and again after each response.
    header_timeout: float = 10.0
    #: Seconds a request body may go without a byte arriving before it is aborted (408).
    body_timeout: float = 30.0
    #: Requests (terminals included) one API key may have in flight at once.
    max_requests_per_key: int = 256
    #: Open connections the server keeps at once; 0: half the process's open-file limit.
    max_connections: int = 0
    # Quotas (service/quotas.py); 0 means none.
    #: Sessions (not deleted) one tenant may have.
    max_sessions_per_key: int = 0
    #: Sessions one tenant may have running at once.
    max_running_sessions_per_key: int = 0
    #: Sessions the whole server runs at once.
    max_running_sessions: int = 0
    #: Jobs running (or queued) at once in one session.
    max_jobs_per_session: int = 0
    #: Jobs running (or queued) at once over all of one tenant's sessions.
    max_jobs_per_key: int = 0
    #: MiB of disk one tenant's snapshots may take.
    max_snapshot_mb_per_key: int = 0
    # Session lifetimes, in seconds; 0 means none.
    #: Idle timeout of a session that sets none.
    default_idle_timeout: float = 0.0
    #: Maximum lifetime of a session that sets none.
    default_max_lifetime: float = 0.0
    #: Longest idle timeout a session may set (and the one it gets when it sets none).
    max_idle_timeout: float = 0.0
    #: Longest maximum lifetime a session may set (and the one it gets when it sets none).
    max_session_lifetime: float = 0.0
    #: What happens to sessions when the server stops: "keep" them running (adopted at
    #: the next start), "stop" them (files kept) or "delete" them.
    on_shutdown: str = "keep"
    #: Variables every session's jobs and terminals get (service/environment.py).
    env_file: Path | None = None
    #: Where the audit log is appended (service/audit.py); None: no audit log.
    audit_log: Path | None = None
    #: A Ray cluster's address (or "auto"): serve as the gateway of its nodes
    #: (bastion_server/cluster/); None: run sandboxes on this machine.
    ray: str | None = None
    #: This server's name, recorded on the sessions it creates (their ``node``); None:
    #: the host's name.  Two servers on one store need two names.
    node_name: str | None = None

    def check(self) -> None:
        """Refuse settings that would expose sandboxes to the network unauthenticated."""
        if not self.api_keys and not _is_loopback(self.host):
            raise ConfigError(
                f"refusing to serve on {self.host} without an API key: anyone who can reach "
                "it could run code on this machine. Pass --api-key (or BASTION_API_KEYS) "
                "or serve on a loopback address such as 127.0.0.1."
            )
        if any(not k or len(k) < 8 for k in self.api_keys):
            shortest = min(len(k) for k in self.api_keys)
            raise ConfigError(
                f"an API key of {shortest} characters was given: API keys must be at least "
                "8 characters long (make one with `openssl rand -hex 24`)"
            )
        d, m = self.default_limits, self.max_limits
        if not (
            32 <= d.memory_mb <= m.memory_mb
            and 8 <= d.pids <= m.pids
            and 0.01 <= d.cpus <= m.cpus
            and 16 <= d.disk_mb <= m.disk_mb
        ):
            raise ConfigError(f"default limits {d} must lie within the maxima {m}")
        for name in ("max_json_bytes", "max_json_depth", "max_requests_per_key"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be more than 0 seconds, not {getattr(self, name)}")
        if self.max_connections < 0:
            raise ConfigError(
                f"max_connections must be 0 (automatic) or more, not {self.max_connections}"
            )
        for name in (
            "max_sessions_per_key",
            "max_running_sessions_per_key",
            "max_running_sessions",
            "max_jobs_per_session",
            "max_jobs_per_key",
            "max_snapshot_mb_per_key",
            "default_idle_timeout",
            "default_max_lifetime",
            "max_idle_timeout",
            "max_session_lifetime",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (none) or more, not {getattr(self, name)}")
        for default, most in (
            ("default_idle_timeout", "max_idle_timeout"),
            ("default_max_lifetime", "max_session_lifetime"),
        ):
            if getattr(self, most) and getattr(self, default) > getattr(self, most):
                raise ConfigError(
                    f"{default} ({getattr(self, default):g}s) must not be above "
                    f"{most} ({getattr(self, most):g}s)"
                )
        if self.on_shutdown not in SHUTDOWN_POLICIES:
            raise ConfigError(
                f"on_shutdown must be one of {', '.join(SHUTDOWN_POLICIES)}, "
                f"not {self.on_shutdown!r}"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be between 1 and 65535, not {self.port}")


def connection_cap(configured: int) -> int:
    """``max_connections`` as used: 0 means half the soft open-file limit, leaving the
    other half to sandboxes' pipes, log files and the store."""
    if configured:
        return configured
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(soft // 2, 16)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_config_file(path: Path, known: Iterable[str]) -> dict[str, Any]:
    """The settings of a TOML config file, keys with ``_`` (``-`` is read as ``_``).

    A key that is not in ``known`` is an error that names it (a misspelt setting must
    not be ignored), as is a file that is not TOML; the values are checked by the
    caller, who knows their types.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    allowed = set(known)
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in allowed:
            raise ConfigError(
                f"{path}: unknown setting {key!r} (settings are the options of "
                "`bastion serve --help` without the dashes, e.g. max_upload_bytes)"
            )
        if name in settings:
            raise ConfigError(f"{path}: {key!r} is set twice")
        settings[name] = value
    return settings
