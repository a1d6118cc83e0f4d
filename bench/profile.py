"""Sampling profiles of the hbone processes during the bulk test (py-spy).

``py-spy record --format speedscope`` is attached to each process by pid while the
bulk transfers run, stopped with SIGINT afterwards, and each profile is summarised
as the top functions by self time and by inclusive time (percent of the samples in
which the process was on CPU; py-spy leaves out idle samples, e.g. ``epoll_wait``).

py-spy is not a dependency of hbone: ``pip install py-spy`` into the venv.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "findPySpy", "shortFile", "summarizeSpeedscope", "formatSummary"]


def findPySpy() -> str | None:
    script = Path(sys.executable).with_name("py-spy")
    if script.exists():
        return str(script)
    return shutil.which("py-spy")


def shortFile(path: str) -> str:
    """``.../site-packages/twisted/protocols/tls.py`` -> ``twisted/protocols/tls.py``."""
    for marker in ("site-packages/", "dist-packages/", "/lib/python3"):
        i = path.rfind(marker)
        if i >= 0:
            rest = path[i + len(marker):]
            if marker == "/lib/python3":
                rest = "stdlib/" + rest.split("/", 1)[-1]
            return rest
    for marker in ("/hbone/", "/bench/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1:]
    return path


#: Innermost frames that mean "waiting in epoll", not work: py-spy's idle filter
#: does not always catch them (e.g. with --nonblocking), so they are left out here.
IDLE_LEAVES = ("EPollReactor.doPoll", "epoll_wait", "select_epoll_poll_impl", "select_epoll_poll")


def summarizeSpeedscope(doc: dict, top: int = 15) -> dict:
    """Top functions of a speedscope document (all its sampled profiles, i.e. all
    threads, together).

    Returns ``{"samples": N, "idle": M, "bySelf": [(function, percent)], "byTotal":
    [(function, percent)]}``; a function is ``name (file)``, lines merged. Self time
    is the innermost frame of each sample; inclusive time counts a function once
    per sample however often it recurs in the stack. Samples waiting in epoll
    (:data:`IDLE_LEAVES`) are counted as ``idle`` and left out of the percentages."""
    frames = doc.get("shared", {}).get("frames", [])
    keys = [f"{f.get('name', '?')} ({shortFile(f.get('file') or '?')})" for f in frames]
    selfTime: Counter[str] = Counter()
    totalTime: Counter[str] = Counter()
    samples = idle = 0
    weightSum = 0.0
    idleKeys = {i for i, f in enumerate(frames) if f.get("name") in IDLE_LEAVES}
    for profile in doc.get("profiles", []):
        if profile.get("type") != "sampled":
            continue
        weights = profile.get("weights") or [1] * len(profile.get("samples", []))
        for stack, weight in zip(profile.get("samples", []), weights):
            if not stack:
                continue
            if stack[-1] in idleKeys:
                idle += 1
                continue
            samples += 1
            weightSum += weight
            selfTime[keys[stack[-1]]] += weight
            for key in {keys[i] for i in stack}:
                totalTime[key] += weight
    if not samples or not weightSum:
        return {"samples": 0, "idle": idle, "bySelf": [], "byTotal": []}

    def pct(counter: Counter) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / weightSum) for k, v in counter.most_common(top)]

    return {"samples": samples, "idle": idle, "bySelf": pct(selfTime), "byTotal": pct(totalTime)}


def formatSummary(title: str, summary: dict) -> str:
    lines = [f"{title}: {summary['samples']} samples on CPU ({summary.get('idle', 0)} in epoll left out)"]
    if summary.get("error"):
        lines.append(f"  no profile: {summary['error']}")
    for label, key in (("self", "bySelf"), ("inclusive", "byTotal")):
        lines.append(f"  top by {label} time:")
        for name, percent in summary[key]:
            lines.append(f"    {percent:5.1f}%  {name}")
    return "\n".join(lines)


class Profiler:
    """py-spy attached to some processes for the length of one step."""

    def __init__(self, outdir: Path, targets: dict[str, int], native: bool = False, rate: int = 250) -> None:
        self.outdir = outdir
        self.targets = targets
        self.native = native
        self.rate = rate
        self.pyspy = findPySpy()
        self.running: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, label: str) -> None:
        if self.pyspy is None:
            raise RuntimeError("py-spy not found: pip install py-spy (into this venv)")
        self.outdir.mkdir(parents=True, exist_ok=True)
        for role, pid in self.targets.items():
            out = self.outdir / f"{label}-{role}.speedscope.json"
            argv = [self.pyspy, "record", "--pid", str(pid), "--rate", str(self.rate),
                    "--format", "speedscope", "--output", str(out)]
            # --nonblocking: read the process's memory without pausing it (less
            # overhead); native (C) frames need the pause
            argv.append("--native" if self.native else "--nonblocking")
            log = open(self.outdir / f"{label}-{role}.py-spy.log", "wb")
            self.running[role] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL), out)
            log.close()
        time.sleep(0.5)  # let py-spy attach before the load starts

    def stop(self, top: int = 15) -> dict[str, dict]:
        """Stop every recorder (SIGINT writes the file); summaries by role."""
        out = {}
        for role, (popen, path) in self.running.items():
            if popen.poll() is None:
                popen.send_signal(signal.SIGINT)
            try:
                popen.wait(60)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                out[role] = {"samples": 0, "bySelf": [], "byTotal": [], "error": str(e), "file": str(path)}
                continue
            summary = summarizeSpeedscope(doc, top)
            summary["file"] = str(path)
            out[role] = summary
        self.running.clear()
        return out
