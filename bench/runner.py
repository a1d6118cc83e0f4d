"""Runs every selected system through the same steps and reports.

Per system: start a fresh backend and the system, warm it up (tunnels until one
echoes, then a few more), then the steps in this order, each bounded by a count
and by time:

1. ``latency``: warm-up rounds (discarded), then N rounds of connect, 1-byte echo,
   close, one after the other; p50 and p99. First, so that it sees the system as
   a new client does (hbone: one pooled HTTP/2 connection, not the ten the idle
   step leaves behind).
2. ``idle``: memory (RSS and PSS of all the system's processes) before and after
   opening N tunnels that each did a 1-byte echo and then stay open; delta / N.
   Before the data steps, so that memory they free cannot hide the cost.
3. ``concurrent``: 100 tunnels set up, then each echoes 1 MiB at the same time;
   payload bytes / seconds from the first byte sent to the last echoed (median).
4. ``bulk``: one tunnel per transfer, an upload then a download per repetition,
   the median of the repetitions each way; the CPU seconds of the system's
   processes over the whole step divided by the GiB carried.

Peak RSS is the largest sum of ``VmHWM`` over the system's processes seen after
any step. Results go to stdout (a progress line per step, then the tables) and,
line by line as they are measured, to ``bench/results/<time>.jsonl``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import loadgen, procfs
from bench.cli import Config, parseArgs
from bench.machine import describe, describeMarkdown
from bench.profile import Profiler, findPySpy, formatSummary
from bench.report import GROUPS, formatTable, formatValue, ratioTable, summaryTable, targetRows, targetTable
from bench.stats import GiB, MB, median, percentile
from bench.systems import SYSTEMS, Context, makeCertificates, makeSystem, missingPackages

__all__ = ["main", "run"]

_START = time.monotonic()
#: A transfer or round started before its step's deadline may finish this much later.
GRACE_SECONDS = 30.0


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {message}", flush=True)


def _raiseFileLimit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def ensurePackages(systems: tuple[str, ...], allowInstall: bool) -> dict[str, str]:
    """Install the Debian packages of missing peers when root (apt-get); returns
    system -> why it is skipped, for those still missing."""
    missing = missingPackages(systems)
    if not missing:
        return {}
    packages = sorted({p for pkgs in missing.values() for p in pkgs})
    apt = shutil.which("apt-get")
    if allowInstall and apt and os.geteuid() == 0:
        progress(f"installing {' '.join(packages)} (apt-get, missing for {', '.join(missing)})")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = [apt, "install", "-y", "-q", "--no-install-recommends", *packages]
        try:
            done = subprocess.run(install, env=env, capture_output=True, timeout=600)
            if done.returncode != 0:
                subprocess.run([apt, "update", "-q"], env=env, capture_output=True, timeout=300)
                subprocess.run(install, env=env, capture_output=True, timeout=600)
        except subprocess.TimeoutExpired:
            progress("apt-get timed out")
        missing = missingPackages(systems)
    skipped = {}
    for name, pkgs in missing.items():
        how = f"apt-get install -y {' '.join(pkgs)}"
        why = f"not installed; install with: {'sudo ' if os.geteuid() else ''}{how}"
        progress(f"{name}: skipped, {why}")
        skipped[name] = why
    return skipped


class _Writer:
    """JSON lines, flushed per record, so an interrupted run keeps what it measured."""

    def __init__(self, path: Path, runId: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.runId = runId
        self.file = open(path, "a")

    def write(self, kind: str, **fields) -> None:
        record = {"type": kind, "run": self.runId, "time": datetime.now(timezone.utc).isoformat(), **fields}
        self.file.write(json.dumps(record, default=str) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _Backend:
    """The target process, with its listening socket bound here (no port race)."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.port = self.listener.getsockname()[1]
        fd = self.listener.fileno()
        self.log = workdir / f"{name}-backend.log"
        logFile = open(self.log, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.backend", "--fd", str(fd)],
            pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=logFile, stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent, start_new_session=True,
        )
        logFile.close()
        self.listener.close()  # the child has it
        time.sleep(0.2)
        self.baseFds = procfs.fdCount(self.popen.pid)

    def waitIdle(self, timeout: float = 15.0) -> bool:
        """Until every connection to the backend closed (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if procfs.fdCount(self.popen.pid) <= self.baseFds:
                return True
            time.sleep(0.05)
        return False

    def cpu(self) -> float:
        return procfs.cpuSeconds([self.popen.pid])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _selfCpu() -> float:
    t = os.times()
    return t.user + t.system


class SystemRun:
    """One system through the steps; fills ``figures`` (keys of report.FIGURES)."""

    def __init__(self, name: str, config: Config, certs: dict, workdir: Path, writer: _Writer,
                 deadline: float) -> None:
        self.name = name
        self.config = config
        self.certs = certs
        self.workdir = workdir
        self.writer = writer
        self.deadline = deadline
        self.figures: dict[str, float | None] = {}
        self.notes: list[str] = []
        self.loadgen: dict = {}
        self.peakHwm = 0
        self.peakPss = 0
        self.profiles: dict[str, dict] = {}  # step -> role -> summary
        self.roots: list[int] = []
        self._cpuAtBulkStart: dict[str, float] = {}

    # -- helpers -----------------------------------------------------------

    def stepDeadline(self, step: str) -> float | None:
        """When this step must end, or None if no time is left for it."""
        left = self.deadline - time.monotonic()
        if left < 5:
            return None
        return time.monotonic() + min(self.config.stepSeconds[step], left)

    def look(self) -> procfs.Sample | None:
        if not self.roots:
            return None
        s = procfs.sample(self.roots)
        self.peakHwm = max(self.peakHwm, s.hwm)
        self.peakPss = max(self.peakPss, s.pss)
        return s

    #: the steps profiled with --profile (hbone only)
    PROFILED_STEPS = ("latency", "bulk")

    @property
    def profiling(self) -> tuple[str, ...]:
        if self.config.profileDir is None or self.name != "hbone":
            return ()
        return tuple(s for s in self.PROFILED_STEPS if s in self.config.figures)

    def startProfiler(self, step: str) -> Profiler | None:
        if step not in self.profiling:
            return None
        profiler = Profiler(self.config.profileDir, self.system.roles(), native=self.config.profileNative,
                            rate=self.config.profileRate)
        profiler.start(step)
        return profiler

    def perProcessCpu(self, gib: float) -> dict:
        """CPU s/GiB of each started process (with its children) since the bulk
        step began, by name."""
        out = {}
        for p in self.system.processes:
            start = self._cpuAtBulkStart.get(p.name)
            if start is not None:
                out[p.name] = (procfs.cpuSeconds(procfs.descendants([p.pid])) - start) / gib
        return out

    def record(self, figure: str, value, unit: str, **details) -> None:
        self.figures[figure] = value
        self.writer.write("figure", system=self.name, figure=figure, value=value, unit=unit, **details)

    def note(self, text: str) -> None:
        self.notes.append(text)
        progress(f"{self.name:8} note: {text}")

    # -- the run -----------------------------------------------------------

    def run(self) -> None:
        self.backend = _Backend(self.workdir, self.name)
        self.system = makeSystem(self.name)
        try:
            ctx = Context(self.workdir, self.backend.port, self.certs, self.config.hboneTree)
            started = time.monotonic()
            self.port = self.system.start(ctx)
            self.roots = self.system.pids()
            self.writer.write("system", system=self.name, description=self.system.description,
                              commands=self.system.commands(), entryPort=self.port)
            self.warmUp()
            progress(f"{self.name:8} started and warm in {time.monotonic() - started:.1f}s "
                     f"({len(procfs.descendants(self.roots))} processes)")
            self.look()
            for step in GROUPS:
                if step not in self.config.figures:
                    continue
                stepDeadline = self.stepDeadline(step)
                if stepDeadline is None:
                    self.note(f"{step} skipped: the run's time limit is reached")
                    continue
                profiler = self.startProfiler(step)
                try:
                    getattr(self, f"step_{step}")(stepDeadline)
                except loadgen.LoadError as e:
                    self.note(f"{step} failed: {e}")
                    self.writer.write("error", system=self.name, step=step, error=str(e))
                finally:
                    if profiler is not None:
                        summaries = profiler.stop()
                        self.profiles[step] = summaries
                        for role, summary in summaries.items():
                            self.writer.write("profile", system=self.name, step=step, role=role, **summary)
                if not self.backend.waitIdle():
                    self.note(f"after {step}: connections to the backend still open after 15 s")
                self.look()
            if self.roots:
                self.record("peak_rss", self.peakHwm / 1024, "MiB", peakPssMiB=self.peakPss / 1024,
                            processes=len(procfs.descendants(self.roots)))
        finally:
            self.system.stop()
            self.backend.stop()

    def warmUp(self) -> None:
        deadline = time.monotonic() + 20
        last = None
        while time.monotonic() < deadline:
            try:
                loadgen.ping(self.port, deadline)
                break
            except (loadgen.LoadError, OSError) as e:
                last = e
                time.sleep(0.1)
        else:
            logs = "\n".join(f"--- {p.name} ---\n{p.logTail(1500)}" for p in self.system.processes)
            raise RuntimeError(f"{self.name}: no echo through the tunnel within 20 s ({last})\n{logs}")
        try:
            loadgen.setupLatency(self.port, 10, time.monotonic() + 10)
        except loadgen.LoadError as e:
            raise RuntimeError(f"{self.name}: warm-up tunnels failed: {e}") from e
        self.backend.waitIdle()

    def step_idle(self, deadline: float) -> None:
        before = self.look()
        # leave time to settle and measure within the step's time
        socks = loadgen.openIdle(self.port, self.config.idleTunnels, deadline - 5)
        n = len(socks)
        if n < self.config.idleTunnels:
            self.note(f"idle: {n} of {self.config.idleTunnels} tunnels opened in the time limit")
        if not n:
            raise loadgen.LoadError("no idle tunnel opened in time")
        try:
            time.sleep(1.0)  # let both sides settle (buffers, logs, lazy allocations)
            after = self.look()
        finally:
            loadgen.closeAbort(socks)
        if before is None or after is None:
            progress(f"{self.name:8} idle       {n} tunnels open (no processes to measure)")
            return
        rss = (after.rss - before.rss) / n
        pss = (after.pss - before.pss) / n
        self.record("idle_rss", rss, "KiB", tunnels=n, rssBeforeKiB=before.rss, rssAfterKiB=after.rss,
                    processesAfter=after.count)
        self.record("idle_pss", pss, "KiB", tunnels=n, pssBeforeKiB=before.pss, pssAfterKiB=after.pss)
        progress(f"{self.name:8} idle       {n} tunnels: {rss:.1f} KiB RSS, {pss:.1f} KiB PSS per tunnel "
                 f"({after.count} processes)")

    def step_latency(self, deadline: float) -> None:
        loadgen.setupLatency(self.port, self.config.latencyWarmup, deadline)
        before = self.look()
        samples = loadgen.setupLatency(self.port, self.config.latencyCount, deadline)
        after = self.look()
        if not samples:
            raise loadgen.LoadError("no latency round finished in time")
        if len(samples) < self.config.latencyCount:
            self.note(f"latency: {len(samples)} of {self.config.latencyCount} rounds in the time limit")
        ms = [s * 1000 for s in samples]
        p50, p99 = percentile(ms, 50), percentile(ms, 99)
        details = {"rounds": len(ms), "p90": percentile(ms, 90), "max": max(ms), "mean": sum(ms) / len(ms),
                   "profiled": "latency" in self.profiling}
        cpuText = ""
        if before is not None and after is not None:
            details["cpuMsPerTunnel"] = (after.cpu - before.cpu) * 1000 / len(ms)
            cpuText = f"; {details['cpuMsPerTunnel']:.2f} ms CPU per tunnel (all processes)"
        self.record("setup_p50", p50, "ms", **details)
        self.record("setup_p99", p99, "ms", **details, samplesMs=[round(x, 4) for x in ms])
        progress(f"{self.name:8} latency    {len(ms)} rounds: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                 f"max {max(ms):.2f} ms{cpuText}")

    def step_concurrent(self, deadline: float) -> None:
        n, size = self.config.tunnels, self.config.concurrentBytes
        rates = []
        lg0, be0, wall0 = _selfCpu(), self.backend.cpu(), time.monotonic()
        for i in range(self.config.concurrentReps):
            if i and time.monotonic() >= deadline:
                self.note(f"concurrent: {i} of {self.config.concurrentReps} rounds in the time limit")
                break
            seconds = loadgen.concurrentEcho(self.port, n, size, deadline + GRACE_SECONDS)
            rates.append(n * size / seconds / MB)
            self.backend.waitIdle()
        value = median(rates)
        cores = ((_selfCpu() - lg0) + (self.backend.cpu() - be0)) / (time.monotonic() - wall0)
        self.record("concurrent", value, "MB/s", tunnels=n, bytesEach=size, runs=rates, loadgenCores=cores)
        progress(f"{self.name:8} concurrent {n} x {size // 1024} KiB echoed: {value:.0f} MB/s "
                 f"(runs {', '.join(f'{r:.0f}' for r in rates)}); load generator {cores:.2f} cores")

    def step_bulk(self, deadline: float) -> None:
        size, reps = self.config.bulkBytes, self.config.bulkReps
        before = self.look()
        self._cpuAtBulkStart = {p.name: procfs.cpuSeconds(procfs.descendants([p.pid])) for p in self.system.processes}
        lg0, be0, wall0 = _selfCpu(), self.backend.cpu(), time.monotonic()
        ups, downs = [], []
        for i in range(reps):  # alternating, so a time limit leaves both directions measured
            if i and time.monotonic() >= deadline:
                self.note(f"bulk: {i} of {reps} transfers each way in the time limit")
                break
            ups.append(size / loadgen.bulkUpload(self.port, size, deadline + GRACE_SECONDS) / MB)
            self.backend.waitIdle()
            downs.append(size / loadgen.bulkDownload(self.port, size, deadline + GRACE_SECONDS) / MB)
            self.backend.waitIdle()
        wall = time.monotonic() - wall0
        after = self.look()
        carried = size * (len(ups) + len(downs))
        loadgenCpu = (_selfCpu() - lg0) + (self.backend.cpu() - be0)
        self.loadgen = {"cpuPerGiB": loadgenCpu / (carried / GiB), "cores": loadgenCpu / wall}
        extra = {"profiled": "bulk" in self.profiling}
        self.record("bulk_up", median(ups), "MB/s", runs=ups, bytes=size, **extra)
        self.record("bulk_down", median(downs), "MB/s", runs=downs, bytes=size, **extra)
        if before is not None and after is not None:
            cpu = after.cpu - before.cpu
            gib = carried / GiB
            self.record("cpu_per_gib", cpu / gib, "s/GiB", cpuSeconds=cpu, bytes=carried,
                        userPerGiB=(after.user - before.user) / gib,
                        systemPerGiB=(after.system - before.system) / gib,
                        perProcess=self.perProcessCpu(gib),
                        wallSeconds=wall, **extra)
        self.writer.write("loadgen", system=self.name, **self.loadgen, wallSeconds=wall)
        cpuText = ""
        if "cpu_per_gib" in self.figures:
            gib = carried / GiB
            cpuText = (f", {self.figures['cpu_per_gib']:.2f} CPU s/GiB (user {(after.user - before.user) / gib:.2f}, "
                       f"sys {(after.system - before.system) / gib:.2f})")
        progress(f"{self.name:8} bulk       {reps} x {size / 2**20:.0f} MiB: up {median(ups):.0f} MB/s "
                 f"(runs {', '.join(f'{r:.0f}' for r in ups)}), down {median(downs):.0f} MB/s "
                 f"(runs {', '.join(f'{r:.0f}' for r in downs)}){cpuText}; load generator "
                 f"{self.loadgen['cores']:.2f} cores")


def printReport(results: dict, systems: tuple[str, ...], loadgenInfo: dict, notes: dict,
                profiles: dict | None = None) -> str:
    """The final tables as text (also returned)."""
    out = []
    out.append("## Results (MB/s = 10^6 bytes/s; setup = connect + 1-byte echo + close; "
               "CPU = all processes of the system, user+sys)\n")
    out.append(summaryTable(results, systems))
    if "raw" in results:
        out.append("\n## Ratio to raw\n")
        out.append(ratioTable(results, systems, "raw"))
    if "stunnel" in results:
        out.append("\n## Ratio to stunnel\n")
        out.append(ratioTable(results, systems, "stunnel"))
    if "hbone" in results and "stunnel" in results:
        out.append("\n## hbone against the issue's targets\n")
        out.append(targetTable(results))
    if loadgenInfo:
        out.append("\n## Load generator during the bulk step (bench process + backend)\n")
        rows = [[name, formatValue(v.get("cpuPerGiB"), 2), formatValue(v.get("cores"), 2)]
                for name, v in loadgenInfo.items()]
        out.append(formatTable(["system", "CPU s/GiB", "cores busy"], rows))
    if profiles:
        out.append("\n## Profiles (py-spy)\n")
        for step, byRole in profiles.items():
            for role, summary in byRole.items():
                out.append(formatSummary(f"hbone {role}, {step} step", summary))
    flat = [f"- {name}: {n}" for name, ns in notes.items() for n in ns]
    if flat:
        out.append("\n## Notes\n")
        out.extend(flat)
    text = "\n".join(out)
    print("\n" + text, flush=True)
    return text


def reportFromFile(path: Path) -> int:
    results: dict = {}
    loadgenInfo: dict = {}
    notes: dict = {}
    systems: list[str] = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "figure":
            results.setdefault(rec["system"], {})[rec["figure"]] = rec["value"]
            if rec["system"] not in systems:
                systems.append(rec["system"])
        elif rec["type"] == "loadgen":
            loadgenInfo[rec["system"]] = rec
        elif rec["type"] == "error":
            notes.setdefault(rec["system"], []).append(f"{rec['step']} failed: {rec['error']}")
    order = tuple(s for s in SYSTEMS if s in systems)
    printReport(results, order, loadgenInfo, notes)
    return 0


def run(config: Config) -> int:
    _raiseFileLimit()
    info = describe(config.hboneTree)
    runId = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    writer = _Writer(config.outDir / f"{runId}.jsonl", runId)
    print(describeMarkdown(info), flush=True)
    progress(f"run {runId}: systems {','.join(config.systems)}; steps {','.join(config.figures)}; "
             f"bulk {config.bulkReps} x {config.bulkBytes / 2**20:g} MiB each way, latency "
             f"{config.latencyCount} rounds, {config.tunnels} x {config.concurrentBytes / 1024:g} KiB "
             f"concurrent x {config.concurrentReps}, {config.idleTunnels} idle; limit {config.timeLimit:g}s")
    deadline = time.monotonic() + config.timeLimit
    writer.write("meta", machine=info, config={k: str(v) for k, v in vars(config).items()}, argv=sys.argv[1:])
    if config.profileDir is not None and findPySpy() is None:
        progress("--profile: py-spy not found; install it with: pip install py-spy")
        return 2
    skipped = ensurePackages(tuple(s for s in config.systems if s != "raw"), config.install)
    workdir = Path(tempfile.mkdtemp(prefix="hbone-bench-"))
    results: dict[str, dict] = {}
    loadgenInfo: dict[str, dict] = {}
    notes: dict[str, list[str]] = {}
    profiles = None
    try:
        certs = makeCertificates(workdir)
        for name in config.systems:
            if name in skipped:
                notes[name] = [skipped[name]]
                writer.write("skipped", system=name, reason=skipped[name])
                continue
            if deadline - time.monotonic() < 10:
                notes[name] = ["not run: the time limit was reached"]
                progress(f"{name:8} not run: time limit")
                continue
            sr = SystemRun(name, config, certs, workdir, writer, deadline)
            try:
                sr.run()
            except Exception as e:  # one broken system must not end the run
                sr.notes.append(f"failed: {e}")
                progress(f"{name:8} FAILED: {e}")
                writer.write("error", system=name, step="start", error=str(e))
            results[name] = sr.figures
            notes[name] = sr.notes
            if sr.loadgen:
                loadgenInfo[name] = sr.loadgen
            if sr.profiles:
                profiles = sr.profiles
        text = printReport(results, config.systems, loadgenInfo,
                           {k: v for k, v in notes.items() if v}, profiles)
        writer.write("summary", results=results, targets=targetRows(results) if "hbone" in results else [],
                     loadgen=loadgenInfo, notes=notes, seconds=time.monotonic() - _START)
        if config.profileDir is not None:
            (config.profileDir / "summary.txt").write_text(text + "\n")
        progress(f"done in {time.monotonic() - _START:.0f}s; JSON lines: {writer.path}")
    finally:
        writer.close()
        if config.keep:
            progress(f"run directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parseArgs(argv)
    if config.describe:
        print(describeMarkdown(describe(config.hboneTree)))
        return 0
    if config.report is not None:
        return reportFromFile(config.report)
    try:
        return run(config)
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
