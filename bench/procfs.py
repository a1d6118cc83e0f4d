"""CPU time and memory of a set of processes and their descendants, from /proc.

CPU: ``utime + stime + cutime + cstime`` of every live process of the tree (fields
14-17 of ``/proc/<pid>/stat``; a process's line covers all its threads). A child
that exits between two samples is counted by the first sample in its own line and
by the second in its parent's ``cutime``/``cstime`` once reaped, so the difference
of two samples is the CPU the whole tree spent in between (socat forks a child per
connection; stunnel and tinyproxy use threads).

Memory: ``VmRSS`` and ``VmHWM`` from ``/proc/<pid>/status`` and ``Pss`` from
``/proc/<pid>/smaps_rollup`` (RSS counts a forked child's shared pages again in
every child; PSS divides them among the sharers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CLOCK_TICKS", "Sample", "cpuSeconds", "descendants", "fdCount", "parseStat", "parseStatTimes",
    "parseStatus", "sample",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parseStatTimes(text: str) -> tuple[int, float, float]:
    """``(ppid, user seconds, system seconds)``, reaped children included, from a
    ``/proc/<pid>/stat`` line.

    The command name (field 2) is in parentheses and may contain spaces or ``)``;
    fields are counted after the last ``)``."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): field n is rest[n - 3]
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ppid, (utime + cutime) / CLOCK_TICKS, (stime + cstime) / CLOCK_TICKS


def parseStat(text: str) -> tuple[int, float]:
    """``(ppid, cpu seconds: user + system, reaped children included)``."""
    ppid, user, system = parseStatTimes(text)
    return ppid, user + system


def parseStatus(text: str) -> dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/status`` (or ``smaps_rollup``), in KiB."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name.strip()] = int(parts[0])
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def descendants(roots: Iterable[int]) -> list[int]:
    """``roots`` (those still alive) and every live process descending from them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        text = _read(f"/proc/{entry}/stat")
        if text is None:
            continue
        try:
            ppid, _ = parseStat(text)
        except (ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo, seen = [], [r for r in roots if os.path.exists(f"/proc/{r}")], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return sorted(out)


def cpuSeconds(pids: Iterable[int]) -> float:
    """Total user+system CPU seconds of ``pids`` (with their reaped children)."""
    total = 0.0
    for pid in pids:
        text = _read(f"/proc/{pid}/stat")
        if text is not None:
            total += parseStat(text)[1]
    return total


@dataclass(frozen=True)
class Sample:
    """One look at a process tree: CPU seconds and memory (KiB), summed."""

    pids: tuple[int, ...]
    cpu: float
    user: float
    system: float
    rss: int
    hwm: int
    pss: int

    @property
    def count(self) -> int:
        return len(self.pids)


def sample(roots: Iterable[int]) -> Sample:
    """CPU and memory of ``roots`` and all their live descendants."""
    pids = descendants(roots)
    user = system = 0.0
    rss = hwm = pss = 0
    for pid in pids:
        stat = _read(f"/proc/{pid}/stat")
        if stat is None:
            continue
        _, u, k = parseStatTimes(stat)
        user += u
        system += k
        status = parseStatus(_read(f"/proc/{pid}/status") or "")
        rss += status.get("VmRSS", 0)
        hwm += status.get("VmHWM", 0)
        rollup = _read(f"/proc/{pid}/smaps_rollup")
        pss += parseStatus(rollup).get("Pss", 0) if rollup else status.get("VmRSS", 0)
    return Sample(tuple(pids), user + system, user, system, rss, hwm, pss)


def fdCount(pid: int) -> int:
    """Open file descriptors of ``pid`` (0 if gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
