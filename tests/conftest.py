"""Shared test helpers for tests that run outside peers (nghttpx, curl, openssl...).

Plain functions, so trial ``TestCase``s (which cannot take pytest fixtures) use
them too; the fixtures below are thin wrappers for plain pytest tests.

* :func:`requirePeer` skips a test, loudly, when a peer program is not installed;
  with ``HBONE_REQUIRE_PEERS=1`` (CI) it fails instead, so CI cannot pass by
  skipping.
* :func:`pickFreePorts` picks free TCP ports on 127.0.0.1 for programs that take a
  port number rather than port 0.
* :class:`PeerProcess` starts a program, waits (bounded) until its port accepts,
  and always kills and reaps it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

#: The Debian package that provides each peer program, for the skip message.
PEER_PACKAGES = {
    "nghttpx": "nghttp2-proxy",
    "tinyproxy": "tinyproxy",
    "curl": "curl",
    "openssl": "openssl",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
}

#: Daemons live in sbin, which is not on every user's PATH.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def requirePeers() -> bool:
    """Whether missing peers must fail the test run (``HBONE_REQUIRE_PEERS=1``)."""
    return os.environ.get("HBONE_REQUIRE_PEERS", "") == "1"


def requirePeer(*commands: str) -> tuple[str, ...]:
    """The absolute paths of ``commands``, in order.

    A missing command skips the calling test with the package to install, or,
    when ``HBONE_REQUIRE_PEERS=1``, fails it."""
    found, missing = [], []
    searchPath = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
    for command in commands:
        path = shutil.which(command, path=searchPath)
        if path is None:
            missing.append(command)
        found.append(path)
    if missing:
        reason = "; ".join(
            f"{c} not installed: apt-get install {PEER_PACKAGES.get(c, c)}" for c in missing
        )
        if requirePeers():
            pytest.fail(f"{reason} (HBONE_REQUIRE_PEERS=1 forbids skipping)", pytrace=False)
        pytest.skip(f"PEER MISSING, test not run: {reason}")
    return tuple(found)


def pickFreePorts(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago.

    All are bound at once (so they differ) and released before returning; a
    program started right after binds them. Prefer port 0 wherever the thing
    under test can report the port it got."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def waitForPort(host: str, port: int, timeout: float = 10.0, process: subprocess.Popen | None = None) -> None:
    """Poll until ``host:port`` accepts a TCP connection; bounded by ``timeout``.

    Raises ``RuntimeError`` when the time runs out or ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before {host}:{port} accepted")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{host}:{port} did not accept a connection within {timeout:g}s")
        time.sleep(0.02)  # bounded readiness polling


class PeerProcess:
    """One outside program: started, waited for, and always killed and reaped.

    Its stdout and stderr go to ``logPath`` (never a pipe, which could fill up
    and stall it); :meth:`log` returns the text for assertion messages."""

    def __init__(self, argv, port: int, logPath: str | os.PathLike, host: str = "127.0.0.1",
                 timeout: float = 10.0, cwd: str | os.PathLike | None = None, env=None) -> None:
        self.argv = [str(a) for a in argv]
        self.host = host
        self.port = port
        self.logPath = Path(logPath)
        self.name = Path(self.argv[0]).name
        self._logFile = open(self.logPath, "wb")
        try:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._logFile, stderr=subprocess.STDOUT,
                cwd=cwd, env=env,
            )
        except BaseException:
            self._logFile.close()
            raise
        try:
            waitForPort(host, port, timeout, self.process)
        except BaseException as e:
            self.stop()
            raise RuntimeError(
                f"{self.name} did not start: {e}\ncommand: {' '.join(self.argv)}\n"
                f"--- {self.logPath} ---\n{self.log()[-4000:]}"
            ) from None

    def log(self) -> str:
        try:
            return self.logPath.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; always reaps. Safe to call twice."""
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not self._logFile.closed:
            self._logFile.close()


@pytest.fixture
def freePorts():
    """:func:`pickFreePorts`: ``freePorts(count=1)`` is a list of free 127.0.0.1 ports."""
    return pickFreePorts


@pytest.fixture
def peerProcess(tmp_path):
    """A function ``peerProcess(argv, port, **kw)`` that starts a :class:`PeerProcess`
    (log in ``tmp_path``) and stops it when the test ends."""
    started: list[PeerProcess] = []

    def start(argv, port, **kw):
        kw.setdefault("logPath", tmp_path / f"{Path(str(argv[0])).name}-{len(started)}.log")
        process = PeerProcess(argv, port, **kw)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()
