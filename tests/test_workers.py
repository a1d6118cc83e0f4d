"""``hbone --workers N``: real worker processes sharing a port with SO_REUSEPORT."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hbone.cli import main
from hbone.workers import checkWorkers
from hbone.urls import parseListener
from tests.conftest import pickFreePorts


class _Echo:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)


class _Supervisor:
    def __init__(self, argv):
        self.p = subprocess.Popen([sys.executable, "-m", "hbone.cli", *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def waitFor(self, pattern: str, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.text())) < count:
            if time.monotonic() > deadline or self.p.poll() is not None and not self._t.is_alive():
                raise AssertionError(f"{pattern!r} x{count} not seen:\n{self.text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self._t.join(5)
        return self.p.returncode


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _roundTrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while data := s.recv(65536):
            got += data
        return got


def test_workers_shareThePort_restartADeadOne_andStopTogether():
    echo = _Echo()
    (port,) = pickFreePorts(1)
    sup = _Supervisor(["--workers", "2", "--allow", f"127.0.0.1:{echo.port}",
                       "-L", f"tcp://127.0.0.1:{port}/127.0.0.1:{echo.port}"])
    try:
        sup.waitFor(r"hbone\[\d\]: ready:", 2)
        workers = _children(sup.p.pid)
        assert len(workers) == 2, sup.text()
        for i in range(40):
            assert _roundTrip(port, b"ping %d" % i) == b"ping %d" % i
        # the kernel spread the connections: both workers carried tunnels
        sup.waitFor(r"hbone\[1\]: tunnel outbound")
        sup.waitFor(r"hbone\[2\]: tunnel outbound")
        # a worker that dies is restarted; the port keeps serving meanwhile
        os.kill(workers[0], signal.SIGKILL)
        sup.waitFor(r"worker \d \(pid %d\) exited with status -9" % workers[0])
        assert _roundTrip(port, b"meanwhile") == b"meanwhile"
        sup.waitFor(r"hbone\[\d\]: ready:", 3)
        assert len(_children(sup.p.pid)) == 2
    finally:
        code = sup.stop()
    assert code == 0, sup.text()
    assert "all 2 workers stopped" in sup.text()
    assert "Traceback" not in sup.text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    echo.sock.close()


def test_workers_aPortThatCannotBeBound_stopsEverythingWithStatus1():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)  # no SO_REUSEPORT: the workers cannot join it
    port = blocker.getsockname()[1]
    try:
        sup = _Supervisor(["--workers", "2", "-L", f"tcp://127.0.0.1:{port}/127.0.0.1:9"])
        code = sup.p.wait(60)
        sup._t.join(5)
    finally:
        blocker.close()
    assert code == 1, sup.text()
    assert "times within 10s of its start; stopping every worker" in sup.text()
    assert f"cannot listen on 127.0.0.1:{port}" in sup.text()


@pytest.mark.parametrize("url, message", [
    ("tcp://127.0.0.1:0/127.0.0.1:9", "has port 0; worker processes share a port only when it is fixed"),
])
def test_workers_refusedWhereStateLivesInOneProcess(url, message, capsys):
    assert main(["--workers", "2", "-L", url]) == 2
    assert message in capsys.readouterr().err


def test_checkWorkers():
    checkWorkers(1, [parseListener("tcp://127.0.0.1:0/127.0.0.1:9")])  # one process: anything goes
    with pytest.raises(ValueError, match="expected 1 to 64"):
        checkWorkers(0, [])
    from dataclasses import replace

    spec = replace(parseListener("tcp://127.0.0.1:7000/127.0.0.1:9"), scheme="h2r")
    with pytest.raises(ValueError, match="reverse-tunnel registration lives in the one process"):
        checkWorkers(2, [spec])
