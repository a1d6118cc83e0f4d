"""The shared fixture of the adversarial tests (SECURITY §5).

:class:`AdversarialCase` runs a real hbone server (mTLS, ``hboneServerFactory`` on
a :class:`hbone.limits.LimitedPort`, a ``TunnelServer`` with a real
``DirectDialer``) and real TCP targets on 127.0.0.1 in the test reactor; attackers
(:class:`tests.adversarial.attacker.Attacker`) run in threads. After every test
it checks the shared post-conditions of SECURITY §5: every connection the test
caused is closed, no stream, tunnel or gate count is left, and the process's open
file descriptors are back to their count before the test. Nothing waits on
wall-clock time; waits are on events, bounded by trial's timeout.
"""

from __future__ import annotations

import functools
import os

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from hbone.dialer import DirectDialer
from hbone.h2.connection import ConnectionSettings
from hbone.h2.server import TunnelServer, hboneServerFactory
from hbone.interfaces import IDialer
from hbone.limits import listenLimited
from hbone.policy import DestinationPolicy, PeerAuthorizer, ReactorResolver, parseAllowEntry
from hbone.splice import TunnelTracker
from tests import pki


def asyncTest(f):
    """Run an ``async def`` test method as a Deferred-returning trial test."""

    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.Deferred.fromCoroutine(f(self, *args, **kwargs))

    return wrapper


def countFDs() -> int:
    return len(os.listdir("/proc/self/fd"))


def fdTable() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


class LogCapture:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event) -> None:
        self.events.append(event)

    def messages(self) -> list[str]:
        out = []
        for event in self.events:
            try:
                out.append(formatEvent(event) or "")
            except Exception:  # pragma: no cover
                out.append(repr(event))
        return out

    def find(self, *needles: str) -> list[str]:
        return [m for m in self.messages() if all(n in m for n in needles)]

    def tracebacks(self) -> list[dict]:
        return [e for e in self.events if e.get("log_failure") is not None]


class Watch:
    """Keeps the protocols ``factory`` builds and a Deferred for each one's end."""

    def __init__(self, factory) -> None:
        self.protocols: list = []
        self.lost: list[defer.Deferred] = []
        self.reasons: list = []
        self.inner: list = []  # the wrapped protocol (TLSMemoryBIOProtocol drops it when lost)
        build = factory.buildProtocol

        def buildProtocol(addr):
            protocol = build(addr)
            if protocol is None:
                return None
            d = defer.Deferred()
            index = len(self.protocols)
            self.protocols.append(protocol)
            self.inner.append(getattr(protocol, "wrappedProtocol", protocol))
            self.lost.append(d)
            self.reasons.append(None)
            connectionLost = protocol.connectionLost

            def lost(reason):
                try:
                    return connectionLost(reason)
                finally:
                    self.reasons[index] = reason
                    if not d.called:
                        d.callback(None)

            protocol.connectionLost = lost
            return protocol

        factory.buildProtocol = buildProtocol

    @property
    def accepted(self) -> int:
        return len(self.protocols)

    def whenLost(self, index: int) -> defer.Deferred:
        d = defer.Deferred()
        self.lost[index].addBoth(lambda r: (d.callback(r), r)[1])
        return d

    async def allLost(self) -> None:
        while True:
            pending = [d for d in self.lost if not d.called]
            if not pending:
                return
            await defer.gatherResults([self.whenLost(self.lost.index(d)) for d in pending])


# -- targets --------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class TargetProtocol(Protocol):
    """A TCP target. ``mode``: ``"echo"``; ``"silent"`` (never reads: its
    transport is paused at once); ``"blast"`` (writes as fast as TCP allows, a
    push producer, until paused for good or closed)."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.received = bytearray()
        self.reason = None
        self.eof = False
        self.sent = 0
        self.paused = False
        self.pausedOnce: defer.Deferred = defer.Deferred()
        self.lostD: defer.Deferred = defer.Deferred()
        self._dataWaiters: list[tuple[int, defer.Deferred]] = []

    def connectionMade(self) -> None:
        if self.mode == "silent":
            self.transport.pauseProducing()
        elif self.mode == "blast":
            self.transport.registerProducer(_Blaster(self), True)
            self._blast()

    def wakeUp(self) -> None:
        """A silent target starts reading again (so it sees how it was closed)."""
        if self.mode == "silent" and self.reason is None:
            self.mode = "sink"
            self.transport.resumeProducing()

    def _blast(self) -> None:
        chunk = b"b" * 65536
        while not self.paused and self.reason is None:
            self.sent += len(chunk)
            self.transport.write(chunk)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.mode == "echo":
            self.transport.write(data)
        ready = [(n, d) for n, d in self._dataWaiters if len(self.received) >= n]
        self._dataWaiters = [(n, d) for n, d in self._dataWaiters if len(self.received) < n]
        for _, d in ready:
            d.callback(len(self.received))

    def whenReceived(self, n: int) -> defer.Deferred:
        if len(self.received) >= n:
            return defer.succeed(len(self.received))
        d = defer.Deferred()
        self._dataWaiters.append((n, d))
        return d

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.mode == "echo":
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.lostD.callback(None)

    @property
    def resetSeen(self) -> bool:
        """The connection ended other than cleanly (a TCP RST from hbone)."""
        return self.reason is not None and not self.reason.check(ConnectionDone)


@implementer(IPushProducer)
class _Blaster:
    def __init__(self, target: TargetProtocol) -> None:
        self.target = target

    def pauseProducing(self) -> None:
        self.target.paused = True
        if not self.target.pausedOnce.called:
            self.target.pausedOnce.callback(self.target.sent)

    def resumeProducing(self) -> None:
        self.target.paused = False
        reactor.callLater(0, self.target._blast)

    def stopProducing(self) -> None:
        self.target.paused = True


class TargetFactory(Factory):
    noisy = False

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.protocols: list[TargetProtocol] = []
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def buildProtocol(self, addr):
        p = TargetProtocol(self.mode)
        p.factory = self
        self.protocols.append(p)
        ready = [(n, d) for n, d in self._waiters if len(self.protocols) >= n]
        self._waiters = [(n, d) for n, d in self._waiters if len(self.protocols) < n]
        for _, d in ready:
            reactor.callLater(0, d.callback, list(self.protocols))
        return p

    def whenAccepted(self, n: int = 1) -> defer.Deferred:
        """Fires (on the next reactor turn) with the protocols once ``n`` exist."""
        if len(self.protocols) >= n:
            return defer.succeed(list(self.protocols))
        d = defer.Deferred()
        self._waiters.append((n, d))
        return d


class Target:
    def __init__(self, port, factory: TargetFactory) -> None:
        self.port = port
        self.factory = factory

    @property
    def portNumber(self) -> int:
        return self.port.getHost().port

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.portNumber}"

    @property
    def accepted(self) -> int:
        return len(self.factory.protocols)

    @property
    def conns(self) -> list[TargetProtocol]:
        return self.factory.protocols


# -- the server ------------------------------------------------------------------------


@implementer(IDialer)
class CountingDialer:
    """Any IDialer, with every request it was asked to dial kept in ``requests``."""

    def __init__(self, dialer) -> None:
        self.dialer = dialer
        self.requests: list = []

    def dial(self, request):
        self.requests.append(request)
        return self.dialer.dial(request)


@implementer(IDialer)
class GatedDialer:
    """Holds every dial until the test calls :meth:`release` (or forever): the
    upstream "accept delayed" of S21 and the early-DATA cases."""

    def __init__(self, dialer, hold: int | None = None) -> None:
        self.dialer = dialer
        self.hold = hold  # how many dials to hold (None: all); later ones go through
        self.held = 0
        self.pending: list[tuple[object, defer.Deferred]] = []
        self._waiters: list[defer.Deferred] = []

    def dial(self, request):
        if self.hold is not None and self.held >= self.hold:
            return self.dialer.dial(request)
        self.held += 1
        d = defer.Deferred()
        self.pending.append((request, d))
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(request)
        return d

    def whenDialed(self) -> defer.Deferred:
        if self.pending:
            return defer.succeed(self.pending[-1][0])
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for request, d in pending:
            if not d.called:
                self.dialer.dial(request).chainDeferred(d)


class RecordingTunnelServer(TunnelServer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.streams: list = []
        self.headers: list = []

    def serve(self, stream, headers, peer) -> None:
        self.streams.append(stream)
        self.headers.append(list(headers))
        return super().serve(stream, headers, peer)


class Server:
    def __init__(self, port, factory, watch: Watch, tunnels, tracker, dialer, settings) -> None:
        self.port = port
        self.factory = factory
        self.watch = watch
        self.tunnels = tunnels
        self.tracker = tracker
        self.dialer = dialer
        self.settings = settings

    @property
    def portNumber(self) -> int:
        return self.port.getHost().port

    @property
    def gate(self):
        return self.factory.listenerGate

    def connection(self, index: int = -1):
        """The HBoneH2Protocol of the ``index``-th accepted connection."""
        return self.watch.inner[index]

    @property
    def connections(self) -> list:
        return list(self.watch.inner)


class AdversarialCase(unittest.TestCase):
    timeout = 120  # a bound, not a speed check: floods on a loaded 2-core machine take their time

    def setUp(self) -> defer.Deferred:
        self._servers: list[Server] = []
        self._targets: list[Target] = []
        self._ports: list = []
        self._clientWatches: list[Watch] = []
        self.log = LogCapture()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._postConditions()))
        return deferLater0().addCallback(self._takeBaseline)

    def _takeBaseline(self, _) -> None:
        # Process-wide descriptors that appear once, lazily: the reactor's signal
        # waker (on its first run) and Twisted's EMFILE reserve (first listen).
        from twisted.internet.tcp import _reservedFD

        _reservedFD.reserve()
        self._baselineFDs = countFDs()

    # -- post-conditions (SECURITY §5, "every case") ----------------------------------

    async def _postConditions(self) -> None:
        for server in self._servers:
            await server.watch.allLost()
        for target in self._targets:
            for conn in target.conns:
                if conn.reason is None:
                    conn.wakeUp()
                    await conn.lostD
        for watch in self._clientWatches:
            await watch.allLost()
        for port in self._ports:
            await port.stopListening()
        for server in self._servers:
            server.tracker.stop()
            self.assertEqual(server.tracker.tunnels, set(), "tunnels left in the tracker")
            for conn in server.connections:
                self.assertEqual(conn.streams, {}, "streams left on a closed connection")
            self.assertEqual((server.gate.connections, server.gate.handshaking), (0, 0), "gate counts left")
        # the reactor closes a lost socket before connectionLost; give it one turn
        await deferLater0()
        self.assertEqual(countFDs(), self._baselineFDs, f"file descriptors leaked: {fdTable()}")
        self.assertEqual(self.log.tracebacks(), [], "a traceback was logged")

    # -- fixtures ---------------------------------------------------------------------

    def target(self, mode: str = "echo") -> Target:
        factory = TargetFactory(mode)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self._ports.append(port)
        target = Target(port, factory)
        self._targets.append(target)
        return target

    def server(self, settings: ConnectionSettings | None = None, allow=(), dialer=None,
               authorizer="default", identity=None, processLimits=None, idleTimeout: float = 3600.0,
               **tunnelKw) -> Server:
        settings = settings or ConnectionSettings()
        identity = identity or pki.serverIdentity()
        if dialer is None:
            policy = DestinationPolicy([parseAllowEntry(f"127.0.0.1:{p}") for p in allow])
            dialer = CountingDialer(DirectDialer(reactor, policy, ReactorResolver(reactor)))
        if authorizer == "default":
            authorizer = PeerAuthorizer(identity.localId)
        tracker = TunnelTracker(reactor, idleTimeout)
        tunnels = RecordingTunnelServer(reactor, dialer, authorizer, tracker, **tunnelKw)
        factory = hboneServerFactory(reactor, identity, tunnels, settings, processLimits)
        watch = Watch(factory)
        port = listenLimited(reactor, 0, factory, interface="127.0.0.1")
        self._ports.append(port)
        server = Server(port, factory, watch, tunnels, tracker, dialer, settings)
        self._servers.append(server)
        return server

    def policy(self, *targets: Target) -> DestinationPolicy:
        return DestinationPolicy([parseAllowEntry(t.authority) for t in targets])

    def directDialer(self, *targets: Target) -> DirectDialer:
        return DirectDialer(reactor, self.policy(*targets), ReactorResolver(reactor))

    def attack(self, fn, *args, **kw) -> defer.Deferred:
        """Run the blocking ``fn`` (an attacker) in a thread."""
        return threads.deferToThread(fn, *args, **kw)

    async def tcpClient(self, port: int, protocol: Protocol) -> Protocol:
        factory = Factory.forProtocol(lambda: protocol)
        watch = Watch(factory)
        self._clientWatches.append(watch)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        return protocol

    async def assertCanary(self, server: Server, target: Target) -> None:
        """A fresh, well-behaved connection still gets a tunnel that echoes."""
        from tests.adversarial.attacker import Attacker

        def canary():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                r = a.openTunnel(1, target.authority)
                assert r.status == 200, (r.status, r.headers)
                return a.echo(1, b"canary")

        self.assertEqual(await self.attack(canary), b"canary")


async def until(predicate, turns: int = 200000) -> None:
    """Wait, one reactor turn at a time, until ``predicate()`` holds (for states
    that have no event to wait on). Fails after ``turns`` turns, never on time."""
    for _ in range(turns):
        if predicate():
            return
        await deferLater0()
    raise AssertionError(f"{predicate} never held")


def deferLater0() -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    return d
