"""Environment variables of a job: the server's env file, the session's, the job's own.

A job (and a terminal's shell) gets, each overriding the one before:

1. the operator's ``--env-file`` (the original server's ``env_path``), read once when
   the server starts;
2. the session's ``env``, given when it was created;
3. the job's own ``env``.

The env file has one ``NAME=value`` a line; blank lines and lines starting with ``#``
are skipped, a leading ``export`` is allowed, and a value in matching single or
double quotes is taken without them (nothing else is interpreted: no ``$`` expansion,
no escapes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bastion.wire import MAX_ENV_BYTES, MAX_ENV_VARS
from bastion_server.config import ConfigError
from bastion_server.service.errors import invalid

MAX_ENV = MAX_ENV_VARS
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def validate_env(env: Any, what: str = "env") -> None:
    """Raise ``invalid_request`` unless ``env`` is an object of NAME=value strings."""
    if env is None:
        return
    if not isinstance(env, dict) or len(env) > MAX_ENV:
        raise invalid(f"{what} must be an object of at most {MAX_ENV} strings")
    for k, v in env.items():
        if (
            not isinstance(k, str)
            or not isinstance(v, str)
            or not k
            or "=" in k
            or "\x00" in k
            or "\x00" in v
        ):
            raise invalid(f"{what} entry {k!r} is not a valid NAME=value pair")
    if sum(len(k.encode()) + len(v.encode()) + 1 for k, v in env.items()) > MAX_ENV_BYTES:
        raise invalid(f"{what} must hold at most {MAX_ENV_BYTES} bytes (NAME=value, UTF-8)")


def load_env_file(path: Path) -> dict[str, str]:
    """The variables of an env file; :class:`ConfigError` names the line that is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the env file {path}: {exc}") from exc
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not _NAME.fullmatch(name) or "\x00" in value:
            raise ConfigError(f"{path}, line {number}: expected NAME=value, got {raw.strip()!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name] = value
    if len(env) > MAX_ENV:
        raise ConfigError(f"{path}: at most {MAX_ENV} variables, not {len(env)}")
    return env


def merged_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """The layers in order, each overriding the ones before."""
    result: dict[str, str] = {}
    for layer in layers:
        result.update(layer)
    return result
