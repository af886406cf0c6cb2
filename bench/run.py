"""Bastion's benchmark suite: ``make bench``, or ``.venv/bin/python bench/run.py``.

Starts its own ``bastion serve`` (free port, data directory under /var/tmp), measures,
prints a table with the targets and writes ``bench/results.json``.  Every session it
made is deleted and the server stopped at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

# Run as a script, Python puts bench/ itself first on the path; the package needs the
# repository root there instead (and bench/'s modules must not shadow anything).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import (
    baselines,
    density,
    files,
    images,
    jobs,
    judge,
    lifecycle,
    load,
    parallel,
    report,
    snapshots,
    terminal,
)
from bench.context import Context
from bench.machine import git_info, loadavg, machine_info, timestamp
from bench.server import BenchServer

HERE = Path(__file__).resolve().parent

#: name -> (what it measures, function); run in this order.
MEASUREMENTS: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "baselines": ("host true, crun exec, podman exec / run --rm", baselines.run),
    "create": ("session create+start, first job, delete", lifecycle.run),
    "jobs": ("sequential run_and_wait(['true']) and its breakdown", jobs.run),
    "parallel": ("jobs/s with 1, 4 and 16 sessions in parallel", parallel.run),
    "files": ("upload and download of a 256 MiB file", files.run),
    "terminal": ("terminal echo round trip", terminal.run),
    "density": ("idle running sessions: memory per session, job latency", density.run),
    "load": ("100 concurrent creates, 3000 jobs by 64 concurrent callers, deletes", load.run),
    "judge": ("100 judged submissions, each with its own limits: warm and fresh", judge.run),
    "snapshots": ("snapshot of 100 MiB, fork(10), restore, pause and resume", snapshots.run),
    "images": (
        "image builds, cache hits, stock recipes, cold start of a layered image",
        images.run,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark Bastion against a bastion serve of its own.",
        epilog="Measurements: "
        + "; ".join(f"{name}: {what}" for name, (what, _) in MEASUREMENTS.items()),
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer runs and 100 idle sessions (about a minute)"
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help=f"run only these measurements (repeatable): {', '.join(MEASUREMENTS)}",
    )
    p.add_argument(
        "--sessions",
        type=int,
        default=None,
        metavar="N",
        help="idle sessions the density test tries to reach (default 500; 100 with --quick)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to `bastion serve` (repeatable), e.g. --server-arg=--pool-size=0",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=HERE / "results.json",
        help="where to write the results (default bench/results.json)",
    )
    p.add_argument(
        "--update-readme",
        action="store_true",
        help="also write the tables into bench/README.md (its 'last run' section)",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: print the tables of an earlier results file "
        "(with --update-readme, write them into the README)",
    )
    args = p.parse_args(argv)
    selected: list[str] = []
    for item in args.only or []:
        for name in filter(None, (n.strip() for n in item.split(","))):
            if name not in MEASUREMENTS:
                p.error(f"unknown measurement {name!r}; choose from {', '.join(MEASUREMENTS)}")
            if name not in selected:
                selected.append(name)
    args.selected = [n for n in MEASUREMENTS if n in selected] if selected else list(MEASUREMENTS)
    if args.sessions is None:
        args.sessions = 100 if args.quick else 500
    if args.sessions < 1:
        p.error("--sessions must be at least 1")
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "schema": 1,
        "timestamp": timestamp(),
        "machine": machine_info(),
        "git": git_info(),
        "config": {
            "quick": args.quick,
            "only": args.selected,
            "sessions": args.sessions,
            "server_args": args.server_arg,
        },
        "measurements": {},
        "errors": {},
    }
    began = time.monotonic()
    server = BenchServer(extra_args=tuple(args.server_arg))
    interrupted = False
    try:
        print(f"starting bastion serve on {server.url} (data in {server.parent})", file=sys.stderr)
        server.start()
        ctx = Context(server=server, quick=args.quick, density_target=args.sessions)
        for name in args.selected:
            what, fn = MEASUREMENTS[name]
            print(f"{name}: {what}", file=sys.stderr, flush=True)
            section_began = time.monotonic()
            try:
                results["measurements"][name] = fn(ctx)
            except Exception as exc:
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
                print(f"  {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
                if not server.alive():
                    results["errors"]["server"] = "bastion serve died:\n" + server.log_tail(2000)
                    break
            results["measurements"].setdefault(name, {})["seconds"] = round(
                time.monotonic() - section_began, 1
            )
    except KeyboardInterrupt:
        interrupted = True
        results["errors"]["interrupted"] = "the run was interrupted; results are partial"
        print("\ninterrupted: cleaning up", file=sys.stderr)
    finally:
        # A second Ctrl-C must not leave sandboxes behind: finish cleaning up first.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            print("deleting every session and stopping the server", file=sys.stderr)
            results["teardown"] = server.teardown()
        finally:
            signal.signal(signal.SIGINT, previous)
    results["machine"]["loadavg_at_end"] = loadavg()
    results["duration_s"] = round(time.monotonic() - began, 1)
    results["ratios"] = report.ratios(results)
    results["targets"] = report.targets(results)
    if interrupted:
        results["interrupted"] = True
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        if os.geteuid() != 0:
            print("bench/run.py: must run as root (bastion serve needs it)", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, _raise_interrupt)
        results = measure(args)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(report.header(results))
    print(report.render(results))
    missed = report.misses(results)
    if missed:
        print("Missed targets:")
        for t in missed:
            print(f"  - {t['name']}: {t['shown']} (target {t['target']})")
    left = results.get("teardown", {})
    if left.get("forced_containers") or left.get("forced_mounts") or left.get("still_mounted"):
        print(f"teardown had to force-remove leftovers: {left}")
    if args.render is None:
        print(f"\nresults written to {args.output} ({results['duration_s']} s)")
    if args.update_readme:
        readme = HERE / "README.md"
        if report.update_readme(readme, results):
            print(f"tables written into {readme}")
        else:
            print(f"{readme} has no '{report.START}' marker: not updated", file=sys.stderr)
    return 130 if results.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
