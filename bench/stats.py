"""Summaries of repeated measurements: median, p95 and friends, as plain dicts."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

Summary = dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float], unit: str, digits: int = 3) -> Summary:
    """``{"unit", "n", "median", "p95", "p99", "mean", "min", "max", "stdev"}`` of ``values``."""
    if not values:
        return {"unit": unit, "n": 0}

    def r(x: float) -> float:
        return round(x, digits)

    return {
        "unit": unit,
        "n": len(values),
        "median": r(statistics.median(values)),
        "p95": r(percentile(values, 95)),
        "p99": r(percentile(values, 99)),
        "mean": r(statistics.fmean(values)),
        "min": r(min(values)),
        "max": r(max(values)),
        "stdev": r(statistics.stdev(values)) if len(values) > 1 else 0.0,
    }


def time_ms(fn: Callable[[], object], runs: int, warmup: int = 0) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times; milliseconds each."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the block's duration in ms."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append((time.perf_counter() - start) * 1000.0)
