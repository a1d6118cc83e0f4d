"""Small, dependency-free statistics for the benchmark (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile", "median", "ratio", "mbPerSecond", "MB", "MiB", "GiB", "KiB"]

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * 1024 * 1024
#: Throughput is reported in MB/s, 10**6 bytes per second (as iperf, socat and pv do).
MB = 1_000_000


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of ``values`` by linear interpolation between
    the closest ranks (numpy's default, "type 7"): ``percentile(xs, 50)`` is the
    median, 0 the minimum, 100 the maximum.

    Raises ``ValueError`` for an empty sequence or ``p`` outside 0..100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100 or math.isnan(p):
        raise ValueError(f"percentile {p!r} is not within 0..100")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def median(values: Sequence[float]) -> float:
    """The median (the 50th percentile, interpolated for an even count)."""
    return percentile(values, 50)


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def mbPerSecond(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (10**6 bytes per second)."""
    if seconds <= 0:
        raise ValueError("elapsed time must be positive")
    return nbytes / seconds / MB
