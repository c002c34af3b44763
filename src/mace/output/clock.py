"""Time as reports show it: CLOCK_MONOTONIC stamps on the wall clock, durations in µs.

Example::

    offset = wall_offset_ns()            # once per run: the reports keep their spacing
    wall(report.t0 + offset, 6)          # '1552589043.315681'
"""

from __future__ import annotations

import time


def wall_offset_ns() -> int:
    """What turns a CLOCK_MONOTONIC stamp (the rings' clock) into wall-clock ns, as of now."""
    return time.time_ns() - time.monotonic_ns()


def wall(ns: int, digits: int = 9) -> str:
    """Wall-clock ns as seconds since the epoch with `digits` decimals, rounded, from the
    integer (a double holds only about 0.2 µs of a present-day timestamp)."""
    if digits < 9:
        step = 10 ** (9 - digits)
        ns = (ns + step // 2) // step * step
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"[:11 + digits]


def us(ns) -> str:
    """ns as µs with one decimal; "-" for None (nothing measured)."""
    return "-" if ns is None else f"{ns / 1000:.1f}"
