"""``hbone --workers N``: N worker processes share every listening port.

One process is one reactor on one core (ARCHITECTURE, "Properties"); a node that
outgrows a core runs several. The supervisor (this module, no reactor) starts N
copies of the same command line, each marked ``--worker I``; a worker binds its
listeners with SO_REUSEPORT, so the kernel spreads new connections across them
(only processes of the same user can join a port). Each worker has its own HTTP/2
connections, pool and limits; tunnels never move between workers.

* SIGTERM/SIGINT to the supervisor go to every worker, which drain (PROTOCOL §3) and
  exit; the supervisor exits 0 when they all exited 0. A second one is forwarded
  too (the workers then stop at once).
* SIGHUP is forwarded: each worker reloads the config file.
* A worker that dies is restarted, after 1 s doubling to 30 s while it keeps dying
  within 10 s of its start. Three such quick deaths of one worker at start-up (a
  port that cannot be bound, a bad certificate) stop them all with exit status 1.

Only stateless roles can be spread this way: ports must be fixed (not 0), and roles
whose state lives in one process (reverse-tunnel registrations, the admin page's
figures) are refused by :func:`checkWorkers`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["checkWorkers", "runWorkers", "exitWithSupervisor", "SINGLE_PROCESS_SCHEMES"]

#: Listener schemes whose state lives in one process.
SINGLE_PROCESS_SCHEMES = {
    "h2r": "a reverse-tunnel registration lives in the one process its node dialed",
    "rtcp": "a node's registration with its gateway is one connection from one process",
    "admin": "metrics and the tunnels page would show one worker's figures",
}

QUICK = 10.0  # a worker that dies sooner than this after its start died "quickly"
MAX_QUICK_AT_START = 3  # quick deaths in a row that stop everything
MAX_DELAY = 30.0


def checkWorkers(n: int, listeners) -> None:
    """:raises ValueError: ``--workers n`` cannot run these listeners."""
    if n < 1 or n > 64:
        raise ValueError(f"--workers {n}: expected 1 to 64")
    if n == 1:
        return
    for spec in listeners:
        why = SINGLE_PROCESS_SCHEMES.get(spec.scheme)
        if why is not None:
            raise ValueError(f"--workers {n}: -L {spec} cannot be shared by worker processes: {why}; "
                             f"run it in a node of its own")
        if spec.port == 0:
            raise ValueError(f"--workers {n}: -L {spec} has port 0; worker processes share a port "
                             f"only when it is fixed")


def exitWithSupervisor() -> None:
    """In a worker: have the kernel send SIGTERM (a drain) if the supervisor dies,
    so a killed supervisor does not leave workers holding the ports (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() == 1:  # the supervisor is already gone
        os.kill(os.getpid(), signal.SIGTERM)


def _say(text: str) -> None:
    sys.stderr.write(f"hbone: {text}\n")
    sys.stderr.flush()


def runWorkers(argv: list[str], n: int, python: str = sys.executable) -> int:
    """Run ``hbone ARGV --worker I`` for I in 1..n until told to stop."""
    workers: dict[int, tuple[subprocess.Popen, float]] = {}
    quick = {i: 0 for i in range(1, n + 1)}
    codes: dict[int, int] = {}
    state = {"stopping": 0, "failed": False}

    def spawn(i: int) -> None:
        proc = subprocess.Popen([python, "-m", "hbone.cli", *argv, "--worker", str(i)])
        workers[i] = (proc, time.monotonic())

    def forward(sig: int) -> None:
        for proc, _ in list(workers.values()):
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def onStop(number, frame) -> None:
        state["stopping"] += 1
        forward(signal.SIGTERM)

    def onHangup(number, frame) -> None:
        forward(signal.SIGHUP)

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, onStop), (signal.SIGINT, onStop), (signal.SIGHUP, onHangup))}
    try:
        _say(f"starting {n} worker processes sharing the listening ports (SO_REUSEPORT); "
             f"supervisor pid {os.getpid()}")
        for i in range(1, n + 1):
            spawn(i)
        while workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            found = [i for i, (proc, _) in workers.items() if proc.pid == pid]
            if not found:
                continue
            i = found[0]
            proc, started = workers.pop(i)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
            if state["stopping"]:
                codes[i] = code
                continue
            lived = time.monotonic() - started
            quick[i] = quick[i] + 1 if lived < QUICK else 0
            if quick[i] >= MAX_QUICK_AT_START:
                _say(f"error: worker {i} exited with status {code} {quick[i]} times within {QUICK:g}s "
                     f"of its start; stopping every worker")
                state["failed"] = True
                state["stopping"] += 1
                forward(signal.SIGTERM)
                continue
            delay = min(MAX_DELAY, 2.0 ** max(0, quick[i] - 1)) if quick[i] else 1.0
            _say(f"worker {i} (pid {pid}) exited with status {code} after {lived:.1f}s; "
                 f"restarting it in {delay:g}s")
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not state["stopping"]:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if not state["stopping"]:
                spawn(i)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state["failed"]:
        return 1
    bad = {i: c for i, c in codes.items() if c != 0}
    if bad:
        _say(f"workers stopped; exit status {bad}")
        return 1
    _say(f"all {n} workers stopped")
    return 0
