"""Every option of ``bastion serve``, once: its flag, environment variable, config file
key, type, default and help.

A setting comes from the first of these that has it:

1. the command line (``--max-upload-bytes 1000``);
2. the environment (``BASTION_MAX_UPLOAD_BYTES=1000``);
3. the config file, ``--config PATH`` (or ``BASTION_CONFIG``): TOML whose keys are
   the flags without their dashes, written with ``_`` or ``-`` alike
   (``max_upload_bytes = 1000``); ``--api-key`` is ``api_keys = ["...", ...]``, and a
   relative path in it is taken from the file's directory;
4. the default.

An unknown key in the file, or a value of the wrong type, is an error that names it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion_server.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_IMAGES_DIR,
    SHUTDOWN_POLICIES,
    ConfigError,
    Limits,
    ServerConfig,
    read_config_file,
)
from bastion_server.runtime.factory import BACKENDS

ENV_CONFIG = "BASTION_CONFIG"


@dataclass(frozen=True)
class Option:
    #: The config file key (and the attribute argparse stores it under).
    name: str
    kind: type
    default: Any
    help: str
    group: str | None = None
    choices: tuple[str, ...] | None = None
    #: The flag, when it is not ``--`` + the name with dashes.
    flag: str | None = None

    @property
    def option_string(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "BASTION_" + self.name.upper()


_LIMITS = "request-level limits"
_QUOTAS = "quotas (0: none; service/quotas.py)"
_LIFETIMES = "session lifetimes (seconds; 0: none)"
_OPERATOR = "operator"

OPTIONS: tuple[Option, ...] = (
    Option("host", str, "127.0.0.1", "address to listen on"),
    Option("port", int, 8080, "port"),
    Option("data_dir", Path, DEFAULT_DATA_DIR, "records, session files and job output"),
    Option("images_dir", Path, DEFAULT_IMAGES_DIR, "built sandbox images"),
    Option(
        "image",
        str,
        "default",
        "the base image sessions run unless they name one (built by `bastion image build`)",
    ),
    Option("build_timeout", float, 1800.0, "longest an image build may take (seconds)"),
    Option(
        "build_ca_file",
        Path,
        None,
        "a CA bundle handed to image builds (such as the host's trust store), for "
        "package indexes reached through a TLS-intercepting proxy",
    ),
    Option(
        "build_network_allow",
        list,
        (),
        "where image builds may connect (CIDRs or host names; repeat or comma-separate); "
        "default: anywhere public.  Name a proxy's private network here to open it",
    ),
    Option(
        "pool_images",
        list,
        (),
        "IMAGE=N: keep N sandboxes of a shared image started ahead of need too (repeat "
        "for several images), so its sessions start as fast as the default image's",
        flag="--pool",
    ),
    Option(
        "pull_registries",
        list,
        (),
        "registries (host[:port]) images may be pulled from; default: any",
        flag="--pull-registry",
    ),
    Option(
        "api_keys",
        list,
        (),
        "accept this API key, as an admin; repeat for several (comma-separated in "
        "BASTION_API_KEYS). Without any, only loopback addresses are served",
        flag="--api-key",
    ),
    Option(
        "backend",
        str,
        "oci",
        "what runs the sandboxes: oci (containers, by --runtime) or fake (in memory, "
        "no real commands: for trying the API)",
        choices=tuple(BACKENDS),
    ),
    Option("runtime", str, "crun", "OCI runtime binary: crun, runc, or another by name"),
    Option(
        "runtime_args",
        list,
        (),
        "give the OCI runtime binary this flag before every command (repeat for several), "
        "e.g. --runtime-arg=--systemd-cgroup",
        flag="--runtime-arg",
    ),
    Option("max_upload_bytes", int, 4 * 1024**3, "largest accepted upload"),
    Option(
        "default_memory_mb", int, 512, "memory (and memory+swap) of a session that asks for none"
    ),
    Option("default_pids", int, 256, "process limit of a session that asks for none"),
    Option("default_cpus", float, 1.0, "CPU cores of a session that asks for none"),
    Option(
        "default_disk_mb", int, 1024, "size of a session's writable layer when it asks for none"
    ),
    Option(
        "max_output_bytes",
        int,
        16 * 1024**2,
        "output kept per job and stream; the rest is counted and dropped",
    ),
    Option("max_memory_mb", int, 8192, "most memory a session may ask for"),
    Option("max_pids", int, 4096, "most processes a session may ask for"),
    Option("max_cpus", float, float(os.cpu_count() or 1), "most CPU cores a session may ask for"),
    Option("max_disk_mb", int, 65536, "largest writable layer a session may ask for"),
    Option(
        "pool_size",
        int,
        2,
        "sandboxes kept started ahead of need for fast session starts (0 turns the warm pool off)",
    ),
    Option("no_network", bool, False, "refuse sessions that ask for outbound network"),
    Option(
        "max_json_bytes",
        int,
        1024**2,
        "largest JSON request body; larger ones get 413 (uploads have --max-upload-bytes)",
        group=_LIMITS,
    ),
    Option(
        "max_json_depth",
        int,
        64,
        "deepest nesting of arrays and objects in a JSON request body",
        group=_LIMITS,
    ),
    Option(
        "header_timeout",
        float,
        10.0,
        "seconds a connection has to send a request's line and headers before it is closed",
        group=_LIMITS,
    ),
    Option(
        "body_timeout",
        float,
        30.0,
        "seconds a request body may go without a byte arriving before it is aborted with 408",
        group=_LIMITS,
    ),
    Option(
        "max_requests_per_key",
        int,
        256,
        "requests and terminals one API key may have in flight; more get 429",
        group=_LIMITS,
    ),
    Option(
        "max_connections",
        int,
        0,
        "open connections the server keeps; more are answered 429 and closed (0: half "
        "the open-file limit)",
        group=_LIMITS,
    ),
    Option(
        "max_sessions_per_key",
        int,
        0,
        "sessions (not deleted) one key's tenant may have",
        group=_QUOTAS,
    ),
    Option(
        "max_running_sessions_per_key",
        int,
        0,
        "sessions one key's tenant may have running at once",
        group=_QUOTAS,
    ),
    Option("max_running_sessions", int, 0, "sessions the server runs at once", group=_QUOTAS),
    Option("max_jobs_per_session", int, 0, "jobs running at once in one session", group=_QUOTAS),
    Option(
        "max_jobs_per_key",
        int,
        0,
        "jobs running at once over one key's tenant's sessions",
        group=_QUOTAS,
    ),
    Option(
        "max_snapshot_mb_per_key",
        int,
        0,
        "MiB of disk one key's tenant's snapshots may take",
        group=_QUOTAS,
    ),
    Option(
        "default_idle_timeout",
        float,
        0.0,
        "idle timeout of a session that sets none",
        group=_LIFETIMES,
    ),
    Option(
        "default_max_lifetime",
        float,
        0.0,
        "maximum lifetime of a session that sets none",
        group=_LIFETIMES,
    ),
    Option(
        "max_idle_timeout",
        float,
        0.0,
        "longest idle timeout a session may set (a session that sets none gets the "
        "default, else this)",
        group=_LIFETIMES,
    ),
    Option(
        "max_session_lifetime",
        float,
        0.0,
        "longest maximum lifetime a session may set (a session that sets none gets the "
        "default, else this)",
        group=_LIFETIMES,
    ),
    Option(
        "on_shutdown",
        str,
        "keep",
        "what happens to sessions when the server stops: keep them running (adopted at "
        "the next start), stop them (files kept) or delete them",
        group=_OPERATOR,
        choices=SHUTDOWN_POLICIES,
    ),
    Option(
        "env_file",
        Path,
        None,
        "NAME=value lines every session's jobs and terminals get (a session's env and a "
        "job's own override them)",
        group=_OPERATOR,
    ),
    Option(
        "audit_log",
        Path,
        None,
        "append one JSON line per job and per session change to this file",
        group=_OPERATOR,
    ),
    Option(
        "ray",
        str,
        None,
        "a Ray cluster's address (host:port, or auto): serve as the gateway of its nodes, "
        'each running its own sessions (needs the ray extra; README, "More than one '
        'machine")',
        flag="--ray",
    ),
    Option(
        "node_name",
        str,
        None,
        "this server's name, recorded on each session it creates as its node (default: "
        "the host's name; two servers sharing a store need two names)",
        group=_OPERATOR,
    ),
    Option(
        "log_level",
        str,
        "info",
        "server log level",
        choices=("debug", "info", "warning", "error"),
    ),
)
BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}


def _describe_default(option: Option) -> str:
    if option.kind is bool:
        return "off"
    if option.default is None or option.default == ():
        return "none"
    return str(option.default)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Every option, with ``SUPPRESS`` defaults: what is left out is looked up later."""
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"a TOML file of these settings (keys: the flags without dashes, e.g. "
        f"max_upload_bytes); flags and environment variables override it ({ENV_CONFIG})",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        target: Any = parser
        if option.group is not None:
            if option.group not in groups:
                groups[option.group] = parser.add_argument_group(option.group)
            target = groups[option.group]
        help_text = f"{option.help} ({option.env}; default {_describe_default(option)})"
        how: dict[str, Any] = {"type": option.kind, "choices": option.choices}
        if option.kind is bool:
            how = {"action": "store_true"}
        elif option.kind is list:
            how = {"action": "append", "metavar": "KEY"}
        target.add_argument(
            option.option_string,
            dest=option.name,
            default=argparse.SUPPRESS,
            help=help_text,
            **how,
        )


def _from_env(option: Option, raw: str) -> Any:
    try:
        if option.kind is bool:
            return raw not in ("", "0")
        if option.kind is list:
            return tuple(k.strip() for k in raw.split(",") if k.strip())
        value = option.kind(raw)
    except ValueError:
        raise ConfigError(f"{option.env}={raw!r} is not a valid {option.kind.__name__}") from None
    _check_choice(option, value, option.env)
    return value


def _env_value(option: Option, environ: Mapping[str, str]) -> str | None:
    raw = environ.get(option.env) or None
    if raw is None and option.name == "api_keys":
        raw = environ.get("BASTION_API_KEY") or None
    return raw


def _from_file(option: Option, value: Any, path: Path) -> Any:
    where = f"{path}: {option.name}"
    kind = option.kind
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # str, Path
        ok = isinstance(value, str)
    if not ok:
        names: dict[type, str] = {list: "a list of strings", Path: "a path (a string)"}
        expected = names.get(kind, kind.__name__)
        raise ConfigError(f"{where} must be {expected}, not {value!r}")
    if kind is Path:
        value = path.parent / value  # relative to the file; an absolute path stays
    _check_choice(option, value, where)
    return value


def _check_choice(option: Option, value: Any, where: str) -> None:
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{where} must be one of {', '.join(option.choices)}, not {value!r}")


def resolve_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Every option's value: command line, else environment, else file, else default."""
    environ = os.environ if environ is None else environ
    given = vars(args)
    config_path: Path | None = given.get("config")
    if config_path is None and environ.get(ENV_CONFIG):
        config_path = Path(environ[ENV_CONFIG])
    from_file = read_config_file(config_path, BY_NAME) if config_path is not None else {}
    settings: dict[str, Any] = {}
    for option in OPTIONS:
        raw_env = _env_value(option, environ)
        if option.name in given:
            value = given[option.name]
            value = tuple(value) if option.kind is list else value
        elif raw_env is not None:
            value = _from_env(option, raw_env)
        elif option.name in from_file and config_path is not None:
            value = _from_file(option, from_file[option.name], config_path)
        else:
            value = option.default
        settings[option.name] = value
    return settings


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.absolute()


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """The server's configuration from its command line, environment and config file."""
    s = resolve_settings(args, environ)
    return ServerConfig(
        host=s["host"],
        port=s["port"],
        data_dir=s["data_dir"].absolute(),
        images_dir=s["images_dir"].absolute(),
        image=s["image"],
        build_timeout=s["build_timeout"],
        build_ca_file=_absolute(s["build_ca_file"]),
        build_network_allow=tuple(s["build_network_allow"]),
        pull_registries=tuple(s["pull_registries"]),
        pool_images=tuple(s["pool_images"]),
        api_keys=tuple(s["api_keys"]),
        backend=s["backend"],
        runtime=s["runtime"],
        runtime_args=tuple(s["runtime_args"]),
        max_upload_bytes=s["max_upload_bytes"],
        log_level=s["log_level"],
        allow_network=not s["no_network"],
        max_output_bytes=s["max_output_bytes"],
        pool_size=s["pool_size"],
        max_json_bytes=s["max_json_bytes"],
        max_json_depth=s["max_json_depth"],
        header_timeout=s["header_timeout"],
        body_timeout=s["body_timeout"],
        max_requests_per_key=s["max_requests_per_key"],
        max_connections=s["max_connections"],
        max_limits=Limits(s["max_memory_mb"], s["max_pids"], s["max_cpus"], s["max_disk_mb"]),
        default_limits=Limits(
            s["default_memory_mb"], s["default_pids"], s["default_cpus"], s["default_disk_mb"]
        ),
        max_sessions_per_key=s["max_sessions_per_key"],
        max_running_sessions_per_key=s["max_running_sessions_per_key"],
        max_running_sessions=s["max_running_sessions"],
        max_jobs_per_session=s["max_jobs_per_session"],
        max_jobs_per_key=s["max_jobs_per_key"],
        max_snapshot_mb_per_key=s["max_snapshot_mb_per_key"],
        default_idle_timeout=s["default_idle_timeout"],
        default_max_lifetime=s["default_max_lifetime"],
        max_idle_timeout=s["max_idle_timeout"],
        max_session_lifetime=s["max_session_lifetime"],
        on_shutdown=s["on_shutdown"],
        env_file=_absolute(s["env_file"]),
        audit_log=_absolute(s["audit_log"]),
        ray=s["ray"],
        node_name=s["node_name"],
    )


def check_operator_files(config: ServerConfig) -> None:
    """Fail before the server starts, with a plain message, when the env file cannot be
    read or is malformed, or the audit log cannot be appended to."""
    from bastion_server.service.environment import load_env_file

    if config.env_file is not None:
        load_env_file(config.env_file)
    if config.audit_log is not None:
        try:
            fd = os.open(config.audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot append to the audit log {config.audit_log}: {exc.strerror or exc}"
            ) from exc
        os.close(fd)
