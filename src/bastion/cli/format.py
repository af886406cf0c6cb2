"""Human-readable output of the ``bastion`` command line: sizes, times, tables.

Pure functions over the wire dicts, so the formatting is tested without a server.
Every function copes with missing or malformed fields (an older or newer server, a
test double): what cannot be read is shown as ``-`` or as it came, never raised.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = [
    "command_text",
    "details",
    "elapsed",
    "format_duration",
    "format_size",
    "format_time",
    "format_time_ago",
    "job_details",
    "job_duration",
    "job_exit_text",
    "limits_text",
    "metadata_text",
    "network_text",
    "number_text",
    "parse_duration",
    "parse_time",
    "session_details",
    "table",
    "write_json",
    "write_text",
]

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(size: object) -> str:
    """``1536`` -> ``"1.5 KiB"``; bytes below 1 KiB exactly; ``-`` when unknown."""
    if isinstance(size, bool) or not isinstance(size, int | float) or size < 0:
        return "-"
    if size < 1024:
        return f"{int(size)} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: object) -> str:
    """``0.25`` -> ``"0.25s"``, ``75`` -> ``"1m15s"``, ``600`` -> ``"10m"``,
    ``5400`` -> ``"1h30m"``; ``-`` when unknown."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    if seconds < 60:
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"
    whole = int(seconds)
    for big, big_unit, small, small_unit, width in (
        (86400, "d", 3600, "h", 2),
        (3600, "h", 60, "m", 2),
        (60, "m", 1, "s", 2),
    ):
        if whole >= big:
            rest = whole % big // small
            return f"{whole // big}{big_unit}" + (f"{rest:0{width}d}{small_unit}" if rest else "")
    raise AssertionError("unreachable")


def parse_time(value: object) -> datetime | None:
    """A wire timestamp (ISO 8601, ``Z`` for UTC) as an aware datetime, else ``None``."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def format_time(value: object) -> str:
    """A wire timestamp in local time, to the second: ``"2024-05-01 10:22:03"``."""
    parsed = parse_time(value)
    if parsed is None:
        return value if isinstance(value, str) and value else "-"
    return parsed.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_time_ago(value: object, now: datetime | None = None) -> str:
    """How long ago a wire timestamp was: ``"just now"``, ``"5m ago"``, ``"3d ago"``;
    the date past a month."""
    parsed = parse_time(value)
    if parsed is None:
        return value if isinstance(value, str) and value else "-"
    now = now or datetime.now(UTC)
    seconds = (now - parsed).total_seconds()
    if seconds < 0:
        seconds = 0  # a server clock a little ahead of ours
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h ago"
    if seconds < 30 * 86400:
        return f"{int(seconds // 86400)}d ago"
    return parsed.astimezone().strftime("%Y-%m-%d")


def elapsed(start: object, end: object) -> float | None:
    """Seconds between two wire timestamps, ``None`` if either is missing."""
    first, last = parse_time(start), parse_time(end)
    if first is None or last is None:
        return None
    return max(0.0, (last - first).total_seconds())


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"1.5"``, ``"90s"``, ``"10m"``, ``"1h30m"`` or ``"2d"``.

    Raises:
        ValueError: Not a non-negative duration.
    """
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"not a duration: {text!r} (e.g. 30, 90s, 10m, 1h30m)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"not a duration: {text!r} (must be a finite number >= 0)")
    return seconds


def command_text(command: object) -> str:
    """An argv as a shell would take it (``["sh", "-c", "a b"]`` -> ``sh -c 'a b'``)."""
    if isinstance(command, list) and all(isinstance(arg, str) for arg in command):
        return shlex.join(command)
    return "-" if command is None else str(command)


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: Iterable[str] = (),
    max_width: int | None = None,
) -> list[str]:
    """Aligned columns, two spaces apart; ``right`` names the right-aligned ones.

    With ``max_width`` the last column is cut (ending in ``…``) so that no line is
    wider: long commands and metadata do not wrap a terminal's table.
    """
    rows = [list(row) for row in rows]
    right_aligned = {headers.index(name) for name in right if name in headers}
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = []
        for i, cell in enumerate(row):
            if i == len(row) - 1 and i not in right_aligned:
                cells.append(cell)  # no trailing spaces after the last column
            elif i in right_aligned:
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell.ljust(widths[i]))
        line = "  ".join(cells)
        if max_width is not None and len(line) > max_width > 20:
            line = line[: max_width - 1] + "…"
        lines.append(line)
    return lines


def details(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """``key  value`` lines with the values aligned (a single record)."""
    pairs = list(pairs)
    width = max((len(key) for key, _ in pairs), default=0)
    return [f"{key.ljust(width)}  {value}" for key, value in pairs]


# --------------------------------------------------------------------------- records


def limits_text(limits: object) -> str:
    if not isinstance(limits, Mapping) or not limits:
        return "server defaults"
    parts = []
    if "memory_mb" in limits:
        parts.append(f"memory {format_size(_mib(limits['memory_mb']))}")
    if "pids" in limits:
        parts.append(f"{limits['pids']} processes")
    if "cpus" in limits:
        parts.append(f"{number_text(limits['cpus'])} CPU")
    if "disk_mb" in limits:
        parts.append(f"disk {format_size(_mib(limits['disk_mb']))}")
    return ", ".join(parts) or "server defaults"


def network_text(network: object) -> str:
    if not isinstance(network, Mapping) or not network.get("enabled"):
        return "off"
    allow = network.get("allow") or []
    return "on, to " + ", ".join(str(a) for a in allow) if allow else "on"


def metadata_text(metadata: object) -> str:
    if not isinstance(metadata, Mapping) or not metadata:
        return "-"
    return ", ".join(f"{k}={v}" for k, v in metadata.items())


def _timeouts_text(session: Mapping[str, Any]) -> str:
    idle, lifetime = session.get("idle_timeout"), session.get("max_lifetime")
    if idle is None and lifetime is None:
        return "none"
    parts = []
    if idle is not None:
        parts.append(f"idle {format_duration(idle)}")
    if lifetime is not None:
        parts.append(f"lifetime {format_duration(lifetime)}")
    return ", ".join(parts) + f", then {session.get('on_timeout') or 'stop'}"


def _usage_text(usage: object) -> str | None:
    if not isinstance(usage, Mapping):
        return None
    parts = []
    if usage.get("cpu_seconds") is not None:
        parts.append(f"cpu {format_duration(usage['cpu_seconds'])}")
    if usage.get("memory_bytes") is not None:
        parts.append(f"memory {format_size(usage['memory_bytes'])}")
    if usage.get("processes") is not None:
        parts.append(f"{usage['processes']} processes")
    if usage.get("disk_bytes") is not None:
        parts.append(f"disk {format_size(usage['disk_bytes'])}")
    return ", ".join(parts) or None


def session_details(session: Mapping[str, Any]) -> list[str]:
    created = session.get("created_at")
    pairs = [
        ("session", str(session.get("session_id", "-"))),
        ("status", str(session.get("status", "-"))),
    ]
    if session.get("status_reason"):
        pairs.append(("reason", str(session["status_reason"])))
    if session.get("node"):
        # A cluster's node, or the server's own name (an older server's: none).
        pairs.append(("node", str(session["node"])))
    pairs += [
        ("created", f"{format_time(created)} ({format_time_ago(created)})"),
        ("limits", limits_text(session.get("limits"))),
        ("timeouts", _timeouts_text(session)),
        ("network", network_text(session.get("network"))),
        ("metadata", metadata_text(session.get("metadata"))),
    ]
    usage = _usage_text(session.get("usage"))
    if usage is not None:
        pairs.append(("usage", usage))
    return details(pairs)


def job_exit_text(job: Mapping[str, Any]) -> str:
    output = job.get("output")
    if isinstance(output, Mapping) and output.get("status_code") is not None:
        return str(output["status_code"])
    return "-"


def job_duration(job: Mapping[str, Any], now: datetime | None = None) -> float | None:
    """Run time: started -> finished, or -> now while running."""
    start = job.get("started_at")
    if job.get("finished_at"):
        return elapsed(start, job["finished_at"])
    if job.get("status") == "running" and parse_time(start) is not None:
        return elapsed(start, (now or datetime.now(UTC)).isoformat())
    return None


def job_details(job: Mapping[str, Any]) -> list[str]:
    status = str(job.get("status", "-"))
    if job.get("failure_reason"):
        status += f" ({job['failure_reason']})"
    pairs = [
        ("job", str(job.get("job_id", "-"))),
        ("session", str(job.get("session_id", "-"))),
        ("status", status),
        ("exit status", job_exit_text(job)),
        ("command", command_text(job.get("command"))),
        ("created", format_time(job.get("created_at"))),
        ("started", format_time(job.get("started_at"))),
        ("finished", format_time(job.get("finished_at"))),
        ("duration", format_duration(job_duration(job))),
    ]
    output = job.get("output")
    if isinstance(output, Mapping):
        for key, name in (("console_output", "stdout"), ("errout", "stderr")):
            text = output.get(key)
            if isinstance(text, str):
                pairs.append((name, format_size(len(text.encode("utf-8", "replace")))))
    return details(pairs)


def _mib(value: object) -> object:
    return value * 1024 * 1024 if isinstance(value, int | float) else value


def number_text(value: object) -> str:
    """``1.0`` -> ``"1"``, ``0.5`` -> ``"0.5"``, ``None`` -> ``"-"``."""
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------- writing


def write_text(stream: TextIO, text: str) -> None:
    """Write text as it arrives: as UTF-8 to the byte stream when there is one (the
    local locale must not break on remote output), flushed at once."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(text)
    else:
        stream.flush()
        buffer.write(text.encode("utf-8", "replace"))
        buffer.flush()
    stream.flush()


def write_json(stream: TextIO, value: object, *, indent: int | None = 2) -> None:
    """``value`` as JSON (UTF-8, non-ASCII kept) and a newline."""
    write_text(stream, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")
