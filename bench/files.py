"""Upload and download throughput of a large file, streamed both ways.

The file (random bytes, 256 MiB by default) is written to the benchmark's scratch
directory first; uploads stream it from disk (``files.upload(sid, fileobj, path)``),
downloads stream to a file on disk (``files.download_to``).  Both ends are in the
page cache, so this measures Bastion, not the disk.  The first round trip is checked
byte for byte (outside the timing).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.stats import summarize

MIB = 1024 * 1024
DEST = "/home/user/bench.bin"


def run(ctx: Context, size_mib: int = 256) -> dict[str, Any]:
    runs = 2 if ctx.quick else 3
    source = ctx.scratch / "upload.bin"
    target = ctx.scratch / "download.bin"
    ctx.say(f"writing a {size_mib} MiB file of random bytes to {source}")
    digest = _write_random(source, size_mib)
    size = source.stat().st_size
    up: list[float] = []
    down: list[float] = []
    try:
        with ctx.client(timeout=300) as client, ctx.sessions(client, 1) as (sid,):
            for i in range(runs):
                ctx.say(f"upload {size_mib} MiB ({i + 1}/{runs})")
                with open(source, "rb") as f, ctx.timed() as t:
                    result = client.files.upload(sid, f, DEST)
                if result["size"] != size:
                    raise RuntimeError(f"uploaded {result['size']} bytes, expected {size}")
                up.append(size / MIB / (t[0] / 1000))
                ctx.say(f"download {size_mib} MiB ({i + 1}/{runs})")
                with ctx.timed() as t:
                    got = client.files.download_to(sid, DEST, target)
                if got != size:
                    raise RuntimeError(f"downloaded {got} bytes, expected {size}")
                down.append(size / MIB / (t[0] / 1000))
                if i == 0 and _sha256(target) != digest:
                    raise RuntimeError("the downloaded file differs from the uploaded one")
                target.unlink()
    finally:
        for path in (source, target):
            path.unlink(missing_ok=True)
    return {
        "size_mib": size_mib,
        "upload": summarize(up, "MiB/s", 1),
        "download": summarize(down, "MiB/s", 1),
    }


def _write_random(path: Path, size_mib: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size_mib):
            chunk = os.urandom(MIB)
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()
