"""SECURITY §4.5, §4.6, §5.7: handshake and connection caps per listener, EMFILE,
RLIMIT_NOFILE, and the process caps on tunnels; S28 and S45."""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import subprocess
import sys
import threading

from h2.errors import ErrorCodes
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from hbone.h2.connection import ConnectionSettings
from hbone.limits import (
    LimitedPort,
    ListenerGate,
    ProcessLimits,
    raiseFileLimit,
)
from tests import pki
from tests.adversarial.attacker import Attacker, svidFiles
from tests.adversarial.support import AdversarialCase, LogCapture, asyncTest, until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- unit: the gate, the port, the counters --------------------------------------------


class FakePort:
    def __init__(self) -> None:
        self.paused: set[str] = set()
        self.log: list[str] = []

    def pauseAccepting(self, reason: str) -> bool:
        first = not self.paused
        self.paused.add(reason)
        self.log.append("pause")
        return first

    def resumeAccepting(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            self.log.append("resume")


def test_gate_pauses_at_the_handshake_cap_and_resumes_below():
    gate = ListenerGate(maxHandshakes=2, maxConnections=10)
    port = FakePort()
    gate.attach(port)
    gate.opened()
    assert not port.paused
    gate.opened()
    assert port.paused == {"gate"}
    gate.handshakeDone()
    assert not port.paused
    gate.closed(handshaking=False)
    gate.closed(handshaking=True)
    assert (gate.connections, gate.handshaking, gate.peakHandshaking) == (0, 0, 2)


def test_gate_pauses_at_the_connection_cap():
    gate = ListenerGate(maxHandshakes=100, maxConnections=3)
    port = FakePort()
    gate.attach(port)
    for _ in range(3):
        gate.opened()
        gate.handshakeDone()
    assert port.paused == {"gate"}
    assert not gate.admit()  # a port that accepted past the cap anyway: refused
    gate.closed(handshaking=False)
    assert not port.paused and gate.admit()


class FakeListeningSocket:
    """``accept`` fails with the given errnos, in order, then EAGAIN."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.calls = 0

    def accept(self):
        self.calls += 1
        code = self.errors.pop(0) if self.errors else errno.EAGAIN
        raise OSError(code, os.strerror(code))

    def fileno(self) -> int:
        return -1

    def shutdown(self, how) -> None:
        pass

    def close(self) -> None:
        pass


def limitedPort(sock, **kw) -> tuple[LimitedPort, MemoryReactorClock]:
    clock = MemoryReactorClock()
    port = LimitedPort(0, Factory.forProtocol(Protocol), reactor=clock, **kw)
    port.socket = sock
    port.fileno = sock.fileno
    port.numberAccepts = 100
    port.connected = True
    port._realPortNumber = 15008
    port.startReading()
    return port, clock


def rejectionLines(capture: LogCapture) -> list[str]:
    return [m for m in capture.messages() if "cannot accept" in m]


def test_emfile_pauses_accepting_for_1s_and_logs_once_per_10s():
    """S45 unit: on EMFILE the port stops reading for 1 s (no accept is tried
    meanwhile: no busy loop), then tries once; the log says so once per 10 s,
    with the count of repeats, never as a traceback."""
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        sock = FakeListeningSocket(*[errno.EMFILE] * 100)
        port, clock = limitedPort(sock)
        port.doRead()
        assert sock.calls == 1 and port.acceptAttempts == 1
        assert port not in clock.readers and not port.accepting
        clock.advance(0.999)
        assert port not in clock.readers
        clock.advance(0.001)
        assert port in clock.readers
        for _ in range(20):  # the reactor calls doRead whenever the socket is readable
            port.doRead()
            clock.advance(1.0)
        assert port.acceptAttempts == 21 == port.resourceErrors  # one accept per second
        lines = rejectionLines(capture)
        assert len(lines) == 3  # at 0 s, 10 s and 20 s
        assert "EMFILE" in lines[0] and "pausing accepts for 1s" in lines[0]
        assert "9 more like it suppressed" in lines[1]
        assert capture.tracebacks() == []
    finally:
        globalLogPublisher.removeObserver(capture)


def test_enfile_pauses_too():
    sock = FakeListeningSocket(errno.ENFILE)
    port, clock = limitedPort(sock)
    port.doRead()
    assert not port.accepting and port.resourceErrors == 1
    clock.advance(1.0)
    assert port.accepting
    port.doRead()
    assert sock.calls == 2  # EAGAIN: nothing more waiting


def test_gate_and_emfile_pauses_are_independent():
    sock = FakeListeningSocket(errno.EMFILE)
    gate = ListenerGate(maxHandshakes=1, maxConnections=10)
    port, clock = limitedPort(sock, gate=gate)
    gate.attach(port)
    port.doRead()
    gate.opened()  # now the gate holds it too
    clock.advance(1.0)
    assert not port.accepting and port not in clock.readers
    gate.handshakeDone()
    assert port.accepting and port in clock.readers


def test_stopping_the_port_cancels_the_resume():
    sock = FakeListeningSocket(errno.EMFILE)
    port, clock = limitedPort(sock)
    port.doRead()
    port.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_raise_file_limit_to_min_of_hard_and_target():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowered = min(soft, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        target = lowered + 100
        newSoft, newHard = raiseFileLimit(target)
        expected = target if hard == resource.RLIM_INFINITY else min(hard, target)
        assert (newSoft, newHard) == (expected, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
        assert raiseFileLimit(lowered) == (expected, hard)  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_process_limits_counters():
    limits = ProcessLimits(maxTunnels=2, maxPendingConnects=1)
    assert limits.tunnelOpened() and limits.tunnelOpened() and not limits.tunnelOpened()
    limits.tunnelClosed()
    assert limits.tunnelOpened()
    assert limits.connectStarted() and not limits.connectStarted()
    limits.connectFinished()
    assert limits.connectStarted()
    assert (limits.refusedTunnels, limits.refusedConnects) == (1, 1)


# -- over real sockets ---------------------------------------------------------------------


class ResourceTests(AdversarialCase):
    @asyncTest
    async def test_S28_handshake_slowloris(self) -> None:
        """S28 (CI-s: 24 connections, cap 8, deadline 0.3 s): connections that
        send 0-5 bytes and stall are each closed at the handshake deadline; at
        most 8 handshakes are ever in progress (the listener stops accepting at
        the cap); a canary handshake queued behind them still completes."""
        target = self.target()
        settings = ConnectionSettings(handshakeTimeout=0.3, maxHandshakesPerListener=8)
        server = self.server(settings, allow=[target.portNumber])

        def slowloris():
            socks = []
            try:
                for i in range(24):
                    s = socket.create_connection(("127.0.0.1", server.portNumber))
                    s.sendall(b"\x16\x03\x01\x00\xff"[: i % 6])
                    socks.append(s)
                with Attacker(server.portNumber, pki.clientIdentity()) as a:  # the canary
                    a.connect().preface()
                    canary = a.openTunnel(1, target.authority).status, a.echo(1, b"canary")
                closedByServer = 0
                for s in socks:
                    s.settimeout(15)
                    try:
                        closedByServer += s.recv(1) == b""
                    except ConnectionResetError:
                        closedByServer += 1
                return canary, closedByServer
            finally:
                for s in socks:
                    s.close()

        canary, closedByServer = await self.attack(slowloris)
        self.assertEqual(canary, (200, b"canary"))
        self.assertEqual(closedByServer, 24)
        self.assertEqual(server.gate.peakHandshaking, 8)
        self.assertGreaterEqual(server.gate.pauses, 1)
        # 24 refusals, each kind logged once (rate-limited per listener, SECURITY §4.7)
        self.assertEqual(len(self.log.find("no TLS handshake within the deadline")), 1)
        self.assertEqual(len(self.log.find("did not finish within the deadline")), 1)

    @asyncTest
    async def test_connections_per_listener_cap(self) -> None:
        """SECURITY §4.6 (scaled: 3): at the cap the listener stops accepting; a
        4th client waits in the backlog and is served once one closes."""
        target = self.target()
        server = self.server(ConnectionSettings(maxConnectionsPerListener=3), allow=[target.portNumber])
        held = [Attacker(server.portNumber, pki.clientIdentity()) for _ in range(3)]
        fourth = Attacker(server.portNumber, pki.clientIdentity())
        try:
            for a in held:
                await self.attack(lambda a=a: a.connect().preface().openTunnel(1, target.authority))
            self.assertEqual((server.gate.connections, server.port.accepting), (3, False))

            def late():
                fourth.connect().preface()
                return fourth.openTunnel(1, target.authority).status, fourth.echo(1, b"4th")

            waiting = self.attack(late)
            held[0].close()
            self.assertEqual(await waiting, (200, b"4th"))
            self.assertEqual(server.gate.peakConnections, 3)
        finally:
            for a in held + [fourth]:
                a.close()

    @asyncTest
    async def test_process_tunnel_cap_refuses_streams(self) -> None:
        """SECURITY §4.6 (scaled: 2 tunnels per process, over two listeners):
        the next stream gets RST_STREAM(REFUSED_STREAM) and is never dialed; a
        tunnel that ends frees its slot."""
        target = self.target()
        limits = ProcessLimits(maxTunnels=2)
        one = self.server(allow=[target.portNumber], processLimits=limits)
        two = self.server(allow=[target.portNumber], processLimits=limits)
        a = Attacker(one.portNumber, pki.clientIdentity())
        b = Attacker(two.portNumber, pki.clientIdentity())
        try:
            await self.attack(lambda: a.connect().preface().openTunnel(1, target.authority))
            self.assertEqual(limits.openTunnels, 1)

            def onTwo():
                b.connect().preface()
                first = b.openTunnel(1, target.authority).status
                refused = b.openTunnel(3, target.authority).reset
                return first, refused

            self.assertEqual(await self.attack(onTwo), (200, ErrorCodes.REFUSED_STREAM))
            self.assertEqual(target.accepted, 2)
            self.assertEqual(len(two.tunnels.streams), 1)  # the refused one never reached the handler
            a.close()
            await until(lambda: limits.openTunnels == 1)
            self.assertEqual(await self.attack(lambda: b.openTunnel(5, target.authority).status), 200)
        finally:
            a.close()
            b.close()
        await until(lambda: limits.openTunnels == 0)

    @asyncTest
    async def test_S45_emfile(self) -> None:
        """S45 (CI-s: a child process with 20 spare descriptors, 60 idle
        connections): accepting pauses on EMFILE (each 0.2 s pause costs exactly
        one failed accept: no busy loop), the log says so once, an established
        tunnel keeps working, and accepting resumes once the idle connections
        close."""
        chain, key, ca = svidFiles(pki.serverIdentity())

        def run():
            child = subprocess.Popen(
                [sys.executable, "-m", "tests.adversarial.emfile_node", chain, key, ca, "20", "0.2"],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            socks: list[socket.socket] = []
            tunnel = None
            try:
                ports = json.loads(child.stdout.readline())

                def stats():
                    child.stdin.write("stats\n")
                    child.stdin.flush()
                    return json.loads(child.stdout.readline())

                def waitFor(predicate):
                    for _ in range(400):
                        s = stats()
                        if predicate(s):
                            return s
                        threading.Event().wait(0.05)
                    raise AssertionError(f"child never reached the state: {s}")

                authority = f"127.0.0.1:{ports['target']}"
                tunnel = Attacker(ports["port"], pki.clientIdentity()).connect().preface()
                assert tunnel.openTunnel(1, authority).status == 200
                before = tunnel.echo(1, b"before")
                for _ in range(60):
                    socks.append(socket.create_connection(("127.0.0.1", ports["port"])))
                first = waitFor(lambda s: s["resourceErrors"] >= 1)
                later = waitFor(lambda s: s["resourceErrors"] >= first["resourceErrors"] + 3)
                during = tunnel.echo(1, b"during")
                for s in socks:
                    s.close()
                socks = []
                fresh = Attacker(ports["port"], pki.clientIdentity()).connect().preface()
                with fresh:
                    after = fresh.openTunnel(1, authority).status, fresh.echo(1, b"after")
                final = stats()
                return before, during, after, first, later, final
            finally:
                for s in socks:
                    s.close()
                if tunnel is not None:
                    tunnel.close()
                try:
                    child.stdin.write("quit\n")
                    child.stdin.flush()
                except OSError:
                    pass
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                child.stdin.close()
                child.stdout.close()

        before, during, after, first, later, final = await self.attack(run)
        self.assertEqual((before, during, after), (b"before", b"during", (200, b"after")))
        attempts = later["acceptAttempts"] - first["acceptAttempts"]
        errors = later["resourceErrors"] - first["resourceErrors"]
        accepted = later["accepted"] - first["accepted"]
        self.assertEqual(attempts, errors + accepted)  # every try after a pause: no spinning
        emfile = [line for line in final["logLines"] if "EMFILE" in line]
        self.assertEqual(len(emfile), 1, final["logLines"])
        self.assertNotIn("Traceback", "".join(final["logLines"]))
