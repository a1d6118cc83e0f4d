"""SECURITY S48: graceful drain (PROTOCOL §3 "GOAWAY and drain").

In-process: the connection-level sequence, frame by frame. With a real process: SIGTERM
while three 50 MiB transfers run and a client opens a CONNECT every 50 ms; and the
drain deadline, after which what is left is reset and the process still exits 0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from h2.errors import ErrorCodes
from hyperframe.frame import RstStreamFrame
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from tests import pki
from tests.adversarial.attacker import Attacker, connectHeaders, dataFrame, svidFiles
from tests.adversarial.support import AdversarialCase, asyncTest, until
from tests.conftest import pickFreePorts, waitForPort

MAX_ID = 2**31 - 1


@implementer(IHalfCloseableProtocol)
class HashSink(Protocol):
    """Reads to EOF, answers with the SHA-256 (hex) of what it read, and closes."""

    def connectionMade(self) -> None:
        self.hash = hashlib.sha256()
        self.n = 0
        self.reason = None
        self.lostD = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.n += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(self.hash.hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.lostD.callback(None)


class SinkFactory(Factory):
    noisy = False

    def __init__(self) -> None:
        self.protocols: list[HashSink] = []

    def buildProtocol(self, addr):
        p = HashSink()
        self.protocols.append(p)
        return p


def payloadOf(seed: int, size: int) -> bytes:
    block = hashlib.sha256(bytes([seed])).digest() * (65536 // 32)
    return (block * (size // len(block) + 1))[:size]


def pump(a: Attacker, streams: dict[int, bytes], sent: dict[int, int], chunk: int = 256 * 1024,
         until=None) -> None:
    """Send each stream's bytes within the flow-control windows (END_STREAM last),
    round robin, reading what arrives in between, until every stream is sent or
    ``until()`` is true."""
    while any(sent[s] <= len(p) for s, p in streams.items()):
        progressed = False
        for sid, payload in streams.items():
            if sent[sid] > len(payload):
                continue
            n = min(chunk, len(payload) - sent[sid], a.credit(sid))
            if n > 0 or sent[sid] == len(payload):
                end = sent[sid] + n == len(payload)
                a.sendData(sid, payload[sent[sid]:sent[sid] + n], end=end)
                sent[sid] += n + (1 if end else 0)
                progressed = True
        a.poll()
        if a.closed:
            raise AssertionError(f"server closed the connection ({a.closed}) mid-transfer")
        if until is not None and until():
            return
        if not progressed and not any(a.credit(s) > 0 for s, p in streams.items() if sent[s] < len(p)):
            a.read(lambda f: True, timeout=10)  # wait for a WINDOW_UPDATE


class DrainInProcessTests(AdversarialCase):
    @asyncTest
    async def test_S48_connection_sequence(self) -> None:
        """drain(): GOAWAY(NO_ERROR, 2^31-1), then (after the PING round trip)
        GOAWAY(NO_ERROR, last id); a stream opened after that is refused; the live
        tunnel finishes; the connection closes after its last stream."""
        target = self.target()
        server = self.server(allow=[target.portNumber])
        started = threading.Event()
        go = threading.Event()

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                assert a.openTunnel(1, target.authority).status == 200
                assert a.echo(1, b"before") == b"before"
                started.set()
                go.wait(10)
                first = a.readUntilGoAway()
                a.read(lambda f: len(a.goaways()) >= 2)
                second = a.goaways()[1]
                a.send(a.headers(3, connectHeaders(target.authority)))
                refused = a.response(3).reset
                echoed = a.echo(1, b"after")
                a.send(dataFrame(1, b"", end=True))
                a.readUntilClosed()
                return ((first.error_code, first.last_stream_id), (second.error_code, second.last_stream_id),
                        refused, echoed, (a.streams[1].ended, a.streams[1].reset, a.frames[-4:]), a.closed)

        d = self.attack(attack)
        await until(started.is_set)
        server.factory.wrappedFactory.drain()
        go.set()
        first, second, refused, echoed, ended, closed = await d
        self.assertEqual(first, (ErrorCodes.NO_ERROR, MAX_ID))
        self.assertEqual(second, (ErrorCodes.NO_ERROR, 1))
        self.assertEqual(refused, ErrorCodes.REFUSED_STREAM)
        self.assertEqual(echoed, b"after")
        self.assertEqual(ended[:2], (True, None), ended)
        self.assertTrue(closed)
        self.assertEqual(len(target.conns), 1)  # stream 3 never reached the target

    @asyncTest
    async def test_S48_cancelStreams(self) -> None:
        """The end of a drain: what is still open gets RST_STREAM(CANCEL), then the
        connection closes and the upstream is closed."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        a = Attacker(server.portNumber, pki.clientIdentity())

        def attack():
            a.connect().preface()
            assert a.openTunnel(1, target.authority).status == 200
            assert a.echo(1, b"x") == b"x"

        try:
            await self.attack(attack)
            (conn,) = server.connections
            conn.drain()
            server.tracker.abortAll("drain deadline")
            conn.cancelStreams()
            await self.attack(lambda: a.readUntilClosed())
            self.assertEqual(a.streams[1].reset, ErrorCodes.CANCEL)
        finally:
            a.close()
        await target.conns[0].lostD


def _node(args, port: int, logPath) -> subprocess.Popen:
    log = open(logPath, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "hbone.cli", *args], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    waitForPort("127.0.0.1", port, 20, proc)
    return proc


class DrainProcessTests(AdversarialCase):
    timeout = 90

    def sink(self):
        factory = SinkFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self._ports.append(port)
        return factory, port.getHost().port

    def startNode(self, drainTimeout: float, sinkPort: int):
        chain, key, ca = svidFiles(pki.serverIdentity())
        (port,) = pickFreePorts(1)
        tmp = tempfile.mkdtemp(prefix="hbone-drain-")
        self.addCleanup(shutil.rmtree, tmp, True)
        logPath = os.path.join(tmp, "node.log")
        proc = _node(["--cert", chain, "--key", key, "--ca", ca, "--allow", f"127.0.0.1:{sinkPort}",
                      "--drain-timeout", str(drainTimeout), "-L", f"hbone://127.0.0.1:{port}"], port, logPath)

        def cleanup():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        self.addCleanup(cleanup)
        return proc, port, logPath

    @asyncTest
    async def test_S48_sigterm_drains_transfers_and_exits_0(self) -> None:
        """SIGTERM with 3 tunnels mid 50 MiB transfer while a client opens a CONNECT
        every 50 ms: the listener closes; GOAWAY(NO_ERROR, 2^31-1) then
        GOAWAY(NO_ERROR, last id); the transfers complete (SHA-256); later CONNECTs
        get REFUSED_STREAM; exit 0."""
        sinks, sinkPort = self.sink()
        proc, port, logPath = self.startNode(30, sinkPort)
        authority = f"127.0.0.1:{sinkPort}"
        size = 50 * 1024 * 1024
        payloads = {sid: payloadOf(sid, size) for sid in (1, 3, 5)}
        midway = threading.Event()

        def attack():
            with Attacker(port, pki.clientIdentity(), timeout=30) as a:
                a.connect().preface()
                for sid in payloads:
                    assert a.openTunnel(sid, authority).status == 200
                sent = {sid: 0 for sid in payloads}
                extra: list[int] = []
                state = {"next": 7, "at": 0.0, "refusedAfter": 0, "listenerClosed": None}

                def connectEvery50ms():
                    now = time.monotonic()
                    if now - state["at"] >= 0.05 and (len(a.goaways()) < 2 or state["refusedAfter"] < 3):
                        sid = state["next"]
                        state["next"] += 2
                        state["at"] = now
                        a.send(a.headers(sid, connectHeaders(authority), end=False))
                        a.send(dataFrame(sid, b"", end=True))  # nothing to send: the sink answers and closes
                        extra.append(sid)
                        if len(a.goaways()) >= 2:
                            state["refusedAfter"] += 1
                    if a.goaways() and state["listenerClosed"] is None:
                        try:
                            socket.create_connection(("127.0.0.1", port), timeout=5).close()
                            state["listenerClosed"] = False
                        except ConnectionRefusedError:
                            state["listenerClosed"] = True
                    if min(sent.values()) > 8 * 1024 * 1024:
                        midway.set()
                    return False

                pump(a, payloads, sent, until=connectEvery50ms)
                # everything is sent; keep opening until the refusals were seen
                while len(a.goaways()) < 2 or state["refusedAfter"] < 3:
                    connectEvery50ms()
                    a.read(lambda f: True, timeout=10)
                a.read(lambda f: all(a.streams[s].ended or a.streams[s].reset is not None for s in payloads),
                       timeout=30)
                a.read(lambda f: all(a.streams.get(s) and (a.streams[s].ended or a.streams[s].reset is not None)
                                     for s in extra), timeout=30)
                a.readUntilClosed(timeout=30)
                return a, extra, state["listenerClosed"]

        d = self.attack(attack)
        await until(lambda: midway.is_set() or d.called)
        os.kill(proc.pid, signal.SIGTERM)
        a, extra, listenerClosed = await d
        code = await self.attack(proc.wait, 40)
        log = open(logPath, encoding="utf-8", errors="replace").read()
        self.assertEqual(code, 0, log)
        goaways = [(g.error_code, g.last_stream_id) for g in a.goaways()]
        self.assertEqual(goaways[0], (ErrorCodes.NO_ERROR, MAX_ID), log)
        self.assertEqual(goaways[1][0], ErrorCodes.NO_ERROR)
        last = goaways[1][1]
        self.assertGreaterEqual(last, 5)
        for sid, payload in payloads.items():
            self.assertIsNone(a.streams[sid].reset, f"stream {sid} was reset: {log}")
            self.assertEqual(a.streams[sid].data, hashlib.sha256(payload).hexdigest().encode())
        after = [s for s in extra if s > last]
        self.assertGreaterEqual(len(after), 3)
        for sid in after:  # (the END_STREAM right behind the HEADERS may add a STREAM_CLOSED)
            self.assertEqual(a.framesOf(RstStreamFrame, sid)[0].error_code, ErrorCodes.REFUSED_STREAM, sid)
            self.assertEqual(a.streams[sid].headers, [], sid)
        for sid in extra:
            if sid <= last:  # accepted before the final GOAWAY: served to the end
                self.assertIsNone(a.streams[sid].reset, sid)
        self.assertTrue(listenerClosed, "the listener still accepted connections while draining")
        self.assertRegex(log, r"draining: \d+ tunnels, 1 HTTP/2 connections")
        self.assertIn(" 0 reset at the deadline", log)
        # every sink connection ended cleanly after its EOF
        await until(lambda: all(p.reason is not None for p in sinks.protocols))
        self.assertEqual(sorted(p.n for p in sinks.protocols)[-3:], [size] * 3)

    @asyncTest
    async def test_S48_deadline_resets_and_exits_0(self) -> None:
        """A tunnel that does not finish within the drain deadline gets
        RST_STREAM(CANCEL), its upstream is closed, and the process exits 0."""
        sinks, sinkPort = self.sink()
        proc, port, logPath = self.startNode(0.5, sinkPort)
        opened = threading.Event()

        def attack():
            with Attacker(port, pki.clientIdentity(), timeout=20) as a:
                a.connect().preface()
                assert a.openTunnel(1, f"127.0.0.1:{sinkPort}").status == 200
                a.sendData(1, b"still here")
                opened.set()
                a.read(lambda f: a.streams[1].reset is not None, timeout=20)
                t = time.monotonic()
                a.readUntilClosed(timeout=20)
                return a.streams[1].reset, [g.last_stream_id for g in a.goaways()], time.monotonic() - t

        d = self.attack(attack)
        await until(opened.is_set)
        await until(lambda: sinks.protocols and sinks.protocols[0].n == 10)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        reset, lastIds, closeDelay = await d
        code = await self.attack(proc.wait, 30)
        log = open(logPath, encoding="utf-8", errors="replace").read()
        self.assertEqual(code, 0, log)
        self.assertEqual(reset, ErrorCodes.CANCEL)
        self.assertEqual(lastIds, [MAX_ID, 1])
        self.assertLess(time.monotonic() - started, 15)
        self.assertIn("1 reset at the deadline", log)
        await sinks.protocols[0].lostD
