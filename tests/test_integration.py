"""Integration tests: real reactor, real sockets on 127.0.0.1, real mutual TLS.

Every case runs the whole path -- ``HBoneClientEndpoint`` (or a plain TCP client
through ``TCPForwardFactory``) -> pooled mTLS HTTP/2 connection -> ``TunnelServer``
-> ``DirectDialer`` -> a TCP target -- and asserts what the far ends saw: SHA-256 of
every byte, where each end saw EOF, whether a close was clean or a reset, what the
server logged, and how many connections each listener accepted.

Each test closes its pools, waits for every connection it caused to be lost, and
stops its listeners; nothing waits on wall-clock time except the one connect
timeout case, which uses a shortened timer.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import struct
from datetime import datetime, timedelta, timezone

from h2.connection import H2Connection
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import StreamReset as H2StreamResetEvent
from OpenSSL import SSL, crypto
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from hbone.address import parseAuthority
from hbone.ca import makeCA, makeLeaf
from hbone.dialer import DirectDialer, HBoneDialer
from hbone.errors import HopIdentityError, StreamReset, TunnelRefused
from hbone.h2.client import HBoneClientEndpoint, HBoneHop, Pool
from hbone.h2.server import TunnelServer, hboneServerFactory
from hbone.identity import IdentityPattern
from hbone.interfaces import IDialer
from hbone.policy import DestinationPolicy, PeerAuthorizer, ReactorResolver, parseAllowEntry
from hbone.proxy.tcp import TCPForwardFactory
from hbone.splice import TunnelTracker
from hbone.tls import Identity

from tests import pki

MiB = 1024 * 1024
CHUNK = 128 * 1024
_BASE = os.urandom(CHUNK)


def asyncTest(f):
    """Run an ``async def`` test method as a Deferred-returning trial test."""

    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.Deferred.fromCoroutine(f(self, *args, **kwargs))

    return wrapper


def chunkOf(seed: int, index: int, size: int) -> bytes:
    """Chunk ``index`` of stream ``seed``: unique per position, so a reordered,
    duplicated or dropped chunk changes the hash."""
    return (struct.pack(">II", seed, index) + _BASE[8:])[:size]


def expectedDigest(seed: int, total: int) -> str:
    h = hashlib.sha256()
    i = sent = 0
    while sent < total:
        chunk = chunkOf(seed, i, min(CHUNK, total - sent))
        h.update(chunk)
        sent += len(chunk)
        i += 1
    return h.hexdigest()


# -- the byte source and sink ---------------------------------------------------


@implementer(IPushProducer)
class Sender:
    """Writes ``total`` bytes of stream ``seed`` to ``transport`` as fast as its
    back-pressure allows (a push producer registered on it)."""

    def __init__(self, transport, total: int, seed: int, onDone) -> None:
        self.transport = transport
        self.total = total
        self.seed = seed
        self.onDone = onDone
        self.sent = 0
        self.index = 0
        self.digest = hashlib.sha256()
        self.paused = False
        self.stopped = False
        self.done = False
        self._looping = False

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True

    def stop(self) -> None:
        """Stop writing (the test decided to reset or close the transport)."""
        self.stopped = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._looping:
            return
        self._looping = True
        try:
            while not self.paused and not self.stopped and self.sent < self.total:
                chunk = chunkOf(self.seed, self.index, min(CHUNK, self.total - self.sent))
                self.index += 1
                self.sent += len(chunk)
                self.digest.update(chunk)
                self.transport.write(chunk)
        finally:
            self._looping = False
        if self.sent >= self.total and not self.done and not self.stopped:
            self.done = True
            self.transport.unregisterProducer()
            self.onDone()


@implementer(IHalfCloseableProtocol)  # only: endpoints' _WrappingProtocol keeps one interface
class Peer(Protocol):
    """A tunnel end (client app or TCP target) that sends and hashes bytes.

    :param send: bytes to send as soon as connected (then ``afterSend``).
    :param sendAfterEOF: bytes to send once the peer's EOF is read (then close).
    :param afterSend: ``"halfclose"`` (loseWriteConnection; close when read EOF too),
        ``"close"`` or ``None``.
    """

    def __init__(self, send: int = 0, sendAfterEOF: int = 0, seed: int = 0,
                 afterSend: str | None = "halfclose") -> None:
        self.sendOnConnect = send
        self.sendAfterEOF = sendAfterEOF
        self.seed = seed
        self.afterSend = afterSend
        self.received = 0
        self.rxDigest = hashlib.sha256()
        self.eofAt: int | None = None
        self.sender: Sender | None = None
        self.reason = None
        self.made: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self._receiveWaiters: list[tuple[int, defer.Deferred]] = []

    # protocol callbacks

    def connectionMade(self) -> None:
        self.made.callback(self)
        if self.sendOnConnect:
            self.send(self.sendOnConnect, self.afterSend)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.rxDigest.update(data)
        if self._receiveWaiters:
            ready = [(n, d) for n, d in self._receiveWaiters if self.received >= n]
            self._receiveWaiters = [(n, d) for n, d in self._receiveWaiters if self.received < n]
            for _, d in ready:
                d.callback(self.received)

    def readConnectionLost(self) -> None:
        self.eofAt = self.received
        if self.sendAfterEOF:
            self.send(self.sendAfterEOF, "close")
        elif self.sender is None or self.sender.done:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.reason = reason
        if self.sender is not None:
            self.sender.stop()
        for _, d in self._receiveWaiters:
            d.errback(reason.value)
        self._receiveWaiters = []
        self.lost.callback(None)

    # test controls

    def send(self, total: int, then: str | None = "halfclose") -> None:
        def done():
            if then == "close" or (then == "halfclose" and self.eofAt is not None):
                self.transport.loseConnection()
            elif then == "halfclose":
                self.transport.loseWriteConnection()

        self.sender = Sender(self.transport, total, self.seed, done)
        self.sender.start()

    def whenReceived(self, n: int) -> defer.Deferred:
        if self.received >= n:
            return defer.succeed(self.received)
        if self.reason is not None:
            return defer.fail(self.reason)
        d = defer.Deferred()
        self._receiveWaiters.append((n, d))
        return d

    @property
    def sentDigest(self) -> str | None:
        return self.sender.digest.hexdigest() if self.sender else None


class PeerFactory(Factory):
    """Builds one :class:`Peer` per connection from ``makePeer``; keeps them in order."""

    noisy = False

    def __init__(self, makePeer=Peer) -> None:
        self.makePeer = makePeer
        self.peers: list[Peer] = []

    def buildProtocol(self, addr):
        p = self.makePeer()
        p.factory = self
        self.peers.append(p)
        return p


class Watch:
    """Counts the connections ``factory`` builds and tells when each is lost.

    Wraps ``buildProtocol`` of an existing factory (for TLS listeners, the outer
    TLS protocol's ``connectionLost`` is the socket's close)."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.accepted = 0
        self.protocols: list = []
        self._lost: list[defer.Deferred] = []
        build = factory.buildProtocol

        def buildProtocol(addr):
            protocol = build(addr)
            if protocol is None:
                return None
            self.accepted += 1
            self.protocols.append(protocol)
            lostD = defer.Deferred()
            self._lost.append(lostD)
            connectionLost = protocol.connectionLost

            def lost(reason):
                try:
                    return connectionLost(reason)
                finally:
                    if not lostD.called:
                        lostD.callback(None)

            protocol.connectionLost = lost
            return protocol

        factory.buildProtocol = buildProtocol

    def lostOf(self, index: int) -> defer.Deferred:
        d = defer.Deferred()
        self._lost[index].addBoth(lambda r: (d.callback(None), r)[1])
        return d

    async def allLost(self) -> None:
        while True:
            pending = [d for d in self._lost if not d.called]
            if not pending:
                return
            waits = []
            for d in pending:
                w = defer.Deferred()
                d.addBoth(lambda r, w=w: (w.callback(None), r)[1])
                waits.append(w)
            await defer.gatherResults(waits)


class RecordingTunnelServer(TunnelServer):
    """TunnelServer that remembers every stream it was handed (and so every server
    connection that carried a request)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.streams: list = []

    def __call__(self, stream, headers) -> None:
        self.streams.append(stream)
        return super().__call__(stream, headers)


class Counted(list):
    """A list with a Deferred for "at least n items"."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def append(self, item) -> None:
        super().append(item)
        ready = [(n, d) for n, d in self._waiters if len(self) >= n]
        self._waiters = [(n, d) for n, d in self._waiters if len(self) < n]
        for _, d in ready:
            d.callback(list(self))

    def whenCount(self, n: int) -> defer.Deferred:
        if len(self) >= n:
            return defer.succeed(list(self))
        d = defer.Deferred()
        self._waiters.append((n, d))
        return d


class Server:
    def __init__(self, port, watch, tunnels, tracker, closedTunnels, policy) -> None:
        self.port = port
        self.watch = watch
        self.tunnels = tunnels
        self.tracker = tracker
        self.closedTunnels = closedTunnels
        self.policy = policy

    @property
    def portNumber(self) -> int:
        return self.port.getHost().port

    def hop(self, method: str = "connect", expect: str = pki.SERVER_ID) -> HBoneHop:
        return HBoneHop("127.0.0.1", self.portNumber, (IdentityPattern.parse(expect),), method)


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


@implementer(IOpenSSLClientConnectionCreator)
class RawClientCreator:
    """A TLS 1.3 client that is not hbone: optional certificate (any content, even
    one hbone's Identity would refuse to load), no server verification."""

    def __init__(self, cert=None, key=None, alpn: bytes = b"h2") -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        if cert is not None:
            ctx.use_certificate(crypto.X509.from_cryptography(cert))
            ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        ctx.set_alpn_protos([alpn])
        self.ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol):
        conn = SSL.Connection(self.ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_connect_state()
        return conn


@implementer(IHandshakeListener)
class RawH2Client(Protocol):
    """Sends the HTTP/2 preface, SETTINGS and a CONNECT as soon as TLS allows, and
    records everything that comes back."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.handshakeDone = False
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()
        self.reason = None

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        h2.initiate_connection()
        h2.send_headers(1, [(b":method", b"CONNECT"), (b":authority", self.authority.encode())])
        h2.send_data(1, b"hello")
        self.transport.write(h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IDialer)
class FailingDialer:
    """A dialer whose endpoint fails its connect with ``exc`` after the attempt
    started (what a TCP connector does when its connect timer fires)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.dials = 0

    def dial(self, request):
        self.dials += 1
        exc = self.exc

        class Endpoint:
            def connect(self, factory):
                d = defer.Deferred()
                reactor.callLater(0, d.errback, exc)
                return d

        return defer.succeed(Endpoint())


class ResetCounter:
    """Counts RST_STREAM frames one HBoneH2Protocol receives and sends (through its
    h2 connection object), so "no reset anywhere" is asserted on the wire level."""

    def __init__(self, conn) -> None:
        self.received: list[tuple[int, int]] = []
        self.sent: list[tuple[int, int]] = []
        h2conn = conn._conn
        receive, reset = h2conn.receive_data, h2conn.reset_stream

        def receiveData(data):
            events = receive(data)
            for event in events:
                if isinstance(event, H2StreamResetEvent):
                    self.received.append((event.stream_id, event.error_code))
            return events

        def resetStream(streamID, errorCode=0):
            self.sent.append((streamID, errorCode))
            return reset(streamID, errorCode)

        h2conn.receive_data = receiveData
        h2conn.reset_stream = resetStream


def whenClosed(conn) -> defer.Deferred:
    """Fires once the HBoneH2Protocol ``conn`` has lost its connection (chains the
    pool's ``onClosed`` hook)."""
    d = defer.Deferred()
    if conn.closed:
        d.callback(None)
        return d
    previous = conn.onClosed

    def onClosed(c, reason):
        if previous is not None:
            previous(c, reason)
        d.callback(None)

    conn.onClosed = onClosed
    return d


def abortive(transport) -> None:
    """TCP RST: SO_LINGER 0, then close."""
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abortConnection()


# -- the test case ----------------------------------------------------------------


class IntegrationTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self._pools: list[Pool] = []
        self._watches: list[Watch] = []
        self._ports: list = []
        self._trackers: list[TunnelTracker] = []
        self.log = LogCapture()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._teardown()))

    async def _teardown(self) -> None:
        for pool in self._pools:
            await pool.closeAll()
        for watch in self._watches:
            await watch.allLost()
        for port in self._ports:
            await port.stopListening()
        for tracker in self._trackers:
            tracker.stop()

    # -- fixtures --

    def listen(self, factory) -> tuple:
        watch = Watch(factory)
        self._watches.append(watch)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self._ports.append(port)
        return port, watch

    def target(self, makePeer=Peer) -> tuple:
        """A TCP target on 127.0.0.1; returns (port number, PeerFactory, Watch)."""
        factory = PeerFactory(makePeer)
        port, watch = self.listen(factory)
        return port.getHost().port, factory, watch

    def server(self, allow=(), identity=None, dialer=None, authorizer="default") -> Server:
        identity = identity or pki.serverIdentity()
        policy = DestinationPolicy([parseAllowEntry(f"127.0.0.1:{p}") for p in allow])
        closed = Counted()
        tracker = TunnelTracker(reactor, onClose=closed.append)
        self._trackers.append(tracker)
        if dialer is None:
            dialer = DirectDialer(reactor, policy, ReactorResolver(reactor))
        if authorizer == "default":
            authorizer = PeerAuthorizer(identity.localId)
        tunnels = RecordingTunnelServer(reactor, dialer, authorizer, tracker)
        port, watch = self.listen(hboneServerFactory(reactor, identity, tunnels))
        return Server(port, watch, tunnels, tracker, closed, policy)

    def pool(self, identity=None, **kw) -> Pool:
        pool = Pool(reactor, identity or pki.clientIdentity(), **kw)
        self._pools.append(pool)
        return pool

    async def tcpClient(self, port: int, peer: Peer) -> Peer:
        factory = PeerFactory(lambda: peer)
        watch = Watch(factory)
        self._watches.append(watch)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        return peer

    async def rawTLSClient(self, port: int, creator, authority: str) -> RawH2Client:
        client = RawH2Client(authority)
        factory = PeerFactory(lambda: client)
        watch = Watch(factory)
        self._watches.append(watch)
        await wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port)).connect(factory)
        return client

    def tunnel(self, pool, hop, targetPort: int, peer: Peer) -> defer.Deferred:
        endpoint = HBoneClientEndpoint(pool, hop, f"127.0.0.1:{targetPort}")
        return endpoint.connect(PeerFactory(lambda: peer))

    # -- assertions --

    def assertClean(self, peer: Peer) -> None:
        self.assertIsNotNone(peer.reason, "connection not closed")
        self.assertTrue(
            peer.reason.check(error.ConnectionDone),
            f"expected a clean close, got {peer.reason.value!r}",
        )

    def assertTransfer(self, src: Peer, dst: Peer, total: int) -> None:
        self.assertEqual(src.sender.sent, total)
        self.assertEqual(dst.received, total)
        self.assertEqual(dst.rxDigest.hexdigest(), src.sentDigest)
        self.assertEqual(src.sentDigest, expectedDigest(src.seed, total))

    # -- 1. bulk transfers ----------------------------------------------------------

    async def _bulkThroughEndpoint(self, method: str, size: int) -> None:
        targetPort, targets, _ = self.target(lambda: Peer(send=size, seed=2))
        server = self.server(allow=[targetPort])
        pool = self.pool()
        client = Peer(send=size, seed=1)
        await self.tunnel(pool, server.hop(method), targetPort, client)
        await client.lost
        (target,) = targets.peers
        await target.lost
        self.assertTransfer(client, target, size)
        self.assertTransfer(target, client, size)
        self.assertEqual((client.eofAt, target.eofAt), (size, size))
        self.assertClean(client)
        self.assertClean(target)
        (tunnel,) = await server.closedTunnels.whenCount(1)
        self.assertIsNone(tunnel.reason)
        self.assertEqual((tunnel.bytesAtoB, tunnel.bytesBtoA), (size, size))
        self.assertEqual(pool.connectionsOpened, 1)

    @asyncTest
    async def test_bulkConnect(self) -> None:
        """64 MiB each way through CONNECT, hash-equal, clean ends both sides."""
        await self._bulkThroughEndpoint("connect", 64 * MiB)

    @asyncTest
    async def test_bulkPost(self) -> None:
        """64 MiB each way through the POST /_hbone/ form."""
        await self._bulkThroughEndpoint("post", 64 * MiB)

    @asyncTest
    async def test_bulkTCPForwarder(self) -> None:
        """Plain TCP client -> TCPForwardFactory(HBoneDialer) -> HBONE -> TCP target."""
        size = 64 * MiB
        targetPort, targets, _ = self.target(lambda: Peer(send=size, seed=2))
        server = self.server(allow=[targetPort])
        pool = self.pool()
        forwardTracker = TunnelTracker(reactor)
        self._trackers.append(forwardTracker)
        forwarder = TCPForwardFactory(
            parseAuthority(f"127.0.0.1:{targetPort}"),
            HBoneDialer(pool, server.hop()),
            forwardTracker,
            reactor,
        )
        fport, _ = self.listen(forwarder)
        client = await self.tcpClient(fport.getHost().port, Peer(send=size, seed=1))
        await client.lost
        (target,) = targets.peers
        await target.lost
        self.assertTransfer(client, target, size)
        self.assertTransfer(target, client, size)
        self.assertEqual((client.eofAt, target.eofAt), (size, size))
        self.assertClean(client)
        self.assertClean(target)
        (tunnel,) = await server.closedTunnels.whenCount(1)
        self.assertIsNone(tunnel.reason)

    # -- 2. half-close (S16) -----------------------------------------------------------

    async def _halfClose(self, client: Peer, target: Peer, start) -> tuple:
        """Open one tunnel from ``client`` to ``target``, install reset counters on
        both HTTP/2 ends, then ``start()`` the exchange and wait for both ends."""
        targetPort, targets, _ = self.target(lambda: target)
        server = self.server(allow=[targetPort])
        pool = self.pool()
        await self.tunnel(pool, server.hop(), targetPort, client)
        (clientConn,) = pool.connections(server.hop())
        (stream,) = server.tunnels.streams
        counters = ResetCounter(clientConn), ResetCounter(stream.connection)
        start()
        await client.lost
        await target.lost
        (tunnel,) = await server.closedTunnels.whenCount(1)
        for counter in counters:
            self.assertEqual((counter.received, counter.sent), ([], []), "RST_STREAM seen")
        self.assertIsNone(tunnel.reason)
        self.assertClean(client)
        self.assertClean(target)
        return tunnel

    @asyncTest
    async def test_halfCloseClientFirst(self) -> None:
        """S16: the client sends 10 MiB and half-closes; the upstream reads EOF only
        after all of it, then answers 10 MiB and closes; the client gets all 10 MiB,
        then END_STREAM. No RST_STREAM, no TCP reset."""
        size = 10 * MiB
        client = Peer(seed=1)
        target = Peer(sendAfterEOF=size, seed=2)
        await self._halfClose(client, target, lambda: client.send(size, "halfclose"))
        self.assertEqual(target.eofAt, size)
        self.assertTransfer(client, target, size)
        self.assertEqual(client.eofAt, size)
        self.assertTransfer(target, client, size)

    @asyncTest
    async def test_halfCloseUpstreamFirst(self) -> None:
        """S16, the other order: the upstream sends 10 MiB and half-closes first; the
        client reads all of it then END_STREAM, answers 10 MiB and ends; the upstream
        reads EOF after all 10 MiB."""
        size = 10 * MiB
        client = Peer(sendAfterEOF=size, seed=1)
        target = Peer(seed=2)
        await self._halfClose(client, target, lambda: target.send(size, "halfclose"))
        self.assertEqual(client.eofAt, size)
        self.assertTransfer(target, client, size)
        self.assertEqual(target.eofAt, size)
        self.assertTransfer(client, target, size)

    @asyncTest
    async def test_upstreamClosesFully(self) -> None:
        """The upstream sends 10 MiB and closes its socket (no half-close); the
        client gets all of it, then a clean end."""
        size = 10 * MiB
        client = Peer(seed=1)
        target = Peer(seed=2)
        await self._halfClose(client, target, lambda: target.send(size, "close"))
        self.assertEqual(client.eofAt, size)
        self.assertTransfer(target, client, size)
        self.assertEqual(target.received, 0)

    # -- 3. resets (S17, S18) --------------------------------------------------------

    @asyncTest
    async def test_clientResetMidTransfer(self) -> None:
        """S17: RST_STREAM from the client mid-upload -> the upstream socket is reset
        (ECONNRESET), never closed cleanly."""
        targetPort, targets, _ = self.target(lambda: Peer(seed=2))
        server = self.server(allow=[targetPort])
        pool = self.pool()
        client = Peer(seed=1)
        await self.tunnel(pool, server.hop(), targetPort, client)
        (stream,) = server.tunnels.streams
        serverResets = ResetCounter(stream.connection)
        client.send(1024 * MiB, None)
        (target,) = targets.peers
        await target.whenReceived(4 * MiB)
        client.sender.stop()
        client.transport.abortConnection()
        await client.lost
        await target.lost
        self.assertTrue(
            target.reason.check(error.ConnectionLost),
            f"upstream saw {target.reason.value!r}, not a reset",
        )
        self.assertFalse(target.reason.check(error.ConnectionDone))
        self.assertIsNone(target.eofAt, "the upstream read a clean EOF")
        self.assertLess(target.received, client.sender.sent)
        self.assertEqual([code for _, code in serverResets.received], [ErrorCodes.CANCEL])
        (tunnel,) = await server.closedTunnels.whenCount(1)
        self.assertIsNotNone(tunnel.reason)

    @asyncTest
    async def test_upstreamResetMidTransfer(self) -> None:
        """S18: a TCP RST from the upstream mid-download -> the client's stream ends
        with RST_STREAM(CONNECT_ERROR), never END_STREAM; another tunnel on the same
        connection is unaffected."""
        streaming = Peer(seed=2)
        echo = Peer(sendAfterEOF=1 * MiB, seed=4)
        order = iter([streaming, echo])
        targetPort, _, _ = self.target(lambda: next(order))
        server = self.server(allow=[targetPort])
        pool = self.pool()
        victim = Peer(seed=1)
        other = Peer(seed=3)
        await self.tunnel(pool, server.hop(), targetPort, victim)
        await self.tunnel(pool, server.hop(), targetPort, other)
        self.assertIs(victim.transport.connection, other.transport.connection)
        streaming.send(1024 * MiB, None)
        await victim.whenReceived(4 * MiB)
        streaming.sender.stop()
        abortive(streaming.transport)
        await victim.lost
        self.assertTrue(victim.reason.check(StreamReset), f"client saw {victim.reason.value!r}")
        self.assertEqual(victim.reason.value.errorCode, ErrorCodes.CONNECT_ERROR)
        self.assertIsNone(victim.eofAt, "the client read END_STREAM")
        self.assertLess(victim.received, streaming.sender.sent)
        # the other tunnel, same connection, still works both ways
        other.send(1 * MiB, "halfclose")
        await other.lost
        await echo.lost
        self.assertTransfer(other, echo, 1 * MiB)
        self.assertTransfer(echo, other, 1 * MiB)
        self.assertClean(other)
        self.assertClean(echo)
        self.assertEqual(pool.connectionsOpened, 1)
        self.assertEqual(server.watch.accepted, 1)

    # -- 4. refused and timed-out upstream connects (S19) ---------------------------------

    @asyncTest
    async def test_upstreamRefused(self) -> None:
        """S19: a closed port -> 503 connection_refused, never 200."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closedPort = s.getsockname()[1]
        s.close()
        server = self.server(allow=[closedPort])
        pool = self.pool()
        client = Peer()
        failure = await self.assertFailure(self.tunnel(pool, server.hop(), closedPort, client), TunnelRefused)
        self.assertEqual(failure.status, 503)
        self.assertEqual(failure.proxyError, "connection_refused")
        self.assertIn("error=connection_refused", failure.proxyStatus)
        self.assertFalse(client.made.called)
        self.assertEqual(server.tracker.opened, 0)

    @asyncTest
    async def test_upstreamConnectTimeout(self) -> None:
        """S19: the upstream never completes the TCP handshake (a local listener
        whose accept queue is full) and DirectDialer's shortened connect timeout
        fires -> 504 connection_timeout, never 200."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler = socket.socket()
        self.addCleanup(filler.close)
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))  # takes the one slot of the accept queue
        policy = DestinationPolicy([parseAllowEntry(f"127.0.0.1:{port}")])
        dialer = DirectDialer(reactor, policy, ReactorResolver(reactor), connectTimeout=0.5)
        server = self.server(dialer=dialer)
        pool = self.pool()
        client = Peer()
        failure = await self.assertFailure(self.tunnel(pool, server.hop(), port, client), TunnelRefused)
        self.assertEqual((failure.status, failure.proxyError), (504, "connection_timeout"))
        self.assertFalse(client.made.called)

    @asyncTest
    async def test_dialerEndpointTimeout(self) -> None:
        """S19 through the IDialer seam: an endpoint that fails with Twisted's
        TimeoutError (as a connector does when its timer fires) -> 504
        connection_timeout; a refused one -> 503 connection_refused."""
        pool = self.pool()
        for exc, status, token in [
            (error.TimeoutError(), 504, "connection_timeout"),
            (error.ConnectionRefusedError(), 503, "connection_refused"),
        ]:
            dialer = FailingDialer(exc)
            server = self.server(dialer=dialer)
            client = Peer()
            failure = await self.assertFailure(self.tunnel(pool, server.hop(), 9, client), TunnelRefused)
            self.assertEqual((failure.status, failure.proxyError), (status, token))
            self.assertEqual(dialer.dials, 1)
            self.assertFalse(client.made.called)

    # -- 5. identities (S22-S25) ---------------------------------------------------------

    async def _refusedClient(self, creator, *reason: str, server=None) -> RawH2Client:
        """A raw TLS 1.3 client (``creator``) sends the preface and a CONNECT as soon as
        its handshake finishes; the server must refuse it during the handshake, log
        ``reason``, start no HTTP/2 and dial nothing."""
        targetPort, _, targetWatch = self.target()
        server = server or self.server(allow=[targetPort])
        index = server.watch.accepted
        streams = len(server.tunnels.streams)
        client = await self.rawTLSClient(server.portNumber, creator, f"127.0.0.1:{targetPort}")
        await client.lost
        await server.watch.lostOf(index)
        self.assertEqual(server.watch.accepted, index + 1)
        self.assertEqual(client.received, b"", "the server sent application data")
        self.assertTrue(
            client.reason.check(SSL.Error, error.ConnectionLost, error.ConnectionDone),
            repr(client.reason.value),
        )
        self.assertEqual(len(server.tunnels.streams), streams, "a request reached the stream handler")
        self.assertEqual(targetWatch.accepted, 0)
        logged = self.log.find("TLS handshake with 127.0.0.1:", *reason)
        self.assertEqual(len(logged), 1, f"no log line naming {reason}: {self.log.messages()}")
        return client

    def _leaf(self, caPair=None, uris=(pki.CLIENT_ID,), **options):
        caCert, caKey = caPair or pki.ca(pki.TD)
        return makeLeaf(caCert, caKey, uris=list(uris), ips=["127.0.0.1"], **options)

    @asyncTest
    async def test_clientWithoutCertificate(self) -> None:
        """S22: a TLS 1.3 client with no certificate fails the handshake; it reads
        no HTTP/2 byte and the server logs why."""
        client = await self._refusedClient(RawClientCreator(), "failed")
        self.assertTrue(client.reason.check(SSL.Error), repr(client.reason.value))
        self.assertIn("certificate required", str(client.reason.value))

    @asyncTest
    async def test_clientCertificateExpired(self) -> None:
        """S23: an expired client certificate."""
        now = datetime.now(timezone.utc)
        cert, key = self._leaf(notBefore=now - timedelta(days=10), notAfter=now - timedelta(days=1))
        await self._refusedClient(RawClientCreator(cert, key), "refused", "expired")

    @asyncTest
    async def test_clientCertificateNotYetValid(self) -> None:
        """S23: a client certificate that is not yet valid."""
        now = datetime.now(timezone.utc)
        cert, key = self._leaf(notBefore=now + timedelta(days=1), notAfter=now + timedelta(days=10))
        await self._refusedClient(RawClientCreator(cert, key), "refused", "not yet valid")

    @asyncTest
    async def test_clientCertificateOtherCA(self) -> None:
        """S23: a well-formed SVID of our trust domain issued by another CA."""
        cert, key = self._leaf(caPair=makeCA(pki.TD))
        await self._refusedClient(RawClientCreator(cert, key), "refused", "unable to get local issuer")

    @asyncTest
    async def test_clientCertificateIsCA(self) -> None:
        """S23: basicConstraints cA=true on the leaf."""
        cert, key = self._leaf(isCA=True)
        await self._refusedClient(RawClientCreator(cert, key), "refused", "cA=true")

    @asyncTest
    async def test_clientCertificateTwoURISANs(self) -> None:
        """S23: two URI SANs."""
        cert, key = self._leaf(uris=(pki.CLIENT_ID, "spiffe://cluster.local/ns/default/sa/other"))
        await self._refusedClient(RawClientCreator(cert, key), "refused", "2 URI SANs")

    @asyncTest
    async def test_clientCertificateNoURISAN(self) -> None:
        """S23: no URI SAN at all (DNS and IP SANs only)."""
        cert, key = self._leaf(uris=(), dns=["client.example"])
        await self._refusedClient(RawClientCreator(cert, key), "refused", "no URI SAN")

    @asyncTest
    async def test_clientCertificateKeyCertSign(self) -> None:
        """S23: keyUsage keyCertSign on a leaf."""
        cert, key = self._leaf(keyCertSign=True)
        await self._refusedClient(RawClientCreator(cert, key), "refused", "keyCertSign")

    @asyncTest
    async def test_clientCertificateBadSpiffeID(self) -> None:
        """S23: a URI SAN that is not a valid SPIFFE ID (empty path segment)."""
        cert, key = self._leaf(uris=("spiffe://cluster.local/ns//sa/client",))
        await self._refusedClient(RawClientCreator(cert, key), "refused", "not a SPIFFE ID")

    @asyncTest
    async def test_otherTrustDomainRefusedThenFederated(self) -> None:
        """S24: a valid SVID of another trust domain is refused; once the server
        federates that domain with its own bundle, the same client gets a tunnel;
        a cluster.local ID issued by the federated CA is still refused."""
        otherCA = makeCA("other.example")
        otherId = "spiffe://other.example/ns/default/sa/client"
        cert, key = makeLeaf(*otherCA, uris=[otherId], ips=["127.0.0.1"])
        await self._refusedClient(RawClientCreator(cert, key), "refused", "unable to get local issuer")

        federated = pki.identity(pki.SERVER_ID, federated={"other.example": [otherCA[0]]})
        targetPort, targets, _ = self.target(lambda: Peer(sendAfterEOF=1000, seed=2))
        server = self.server(
            allow=[targetPort],
            identity=federated,
            authorizer=PeerAuthorizer(federated.localId, [otherId]),
        )
        identity = Identity([cert], key, {"other.example": [otherCA[0]], pki.TD: [pki.ca(pki.TD)[0]]})
        pool = self.pool(identity)
        client = Peer(send=1000, seed=1)
        await self.tunnel(pool, server.hop(), targetPort, client)
        await client.lost
        (target,) = targets.peers
        self.assertTransfer(client, target, 1000)
        self.assertTransfer(target, client, 1000)
        self.assertEqual(str(server.tunnels.streams[0].connection.peerIdentity), otherId)

        # a cluster.local identity minted by the other domain's CA
        forged, forgedKey = makeLeaf(*otherCA, uris=[pki.CLIENT_ID], ips=["127.0.0.1"])
        await self._refusedClient(
            RawClientCreator(forged, forgedKey), "refused", "chains to a root of another trust domain",
            server=server,
        )

    @asyncTest
    async def test_serverIdentityMismatch(self) -> None:
        """S25: the server's SVID is valid but not the expected one -> the client
        fails with HopIdentityError before any HEADERS; the target sees nothing."""
        targetPort, _, targetWatch = self.target()
        server = self.server(allow=[targetPort])
        pool = self.pool()
        hop = server.hop(expect="spiffe://cluster.local/ns/default/sa/other")
        failure = await self.assertFailure(self.tunnel(pool, hop, targetPort, Peer()), HopIdentityError)
        self.assertIn(pki.SERVER_ID, str(failure))
        self.assertIn("spiffe://cluster.local/ns/default/sa/other", str(failure))
        await server.watch.allLost()
        self.assertEqual(server.watch.accepted, 1)
        self.assertEqual(server.tunnels.streams, [])
        self.assertEqual(targetWatch.accepted, 0)
        self.assertEqual(pool.connections(hop), [])

    # -- 6. destination policy (S31) -------------------------------------------------------

    @asyncTest
    async def test_destinationPolicy(self) -> None:
        """S31: loopback targets that are not allow-listed get 403
        destination_ip_prohibited and no socket is created (the canary listener sees
        no accept), in both request forms; the exact allow-listed pair gets 200."""
        canaryPort, _, canary = self.target()
        allowedPort, targets, _ = self.target(lambda: Peer(sendAfterEOF=100, seed=2))
        server = self.server(allow=[allowedPort])
        pool = self.pool()
        for method in ("connect", "post"):
            for authority in [
                f"127.0.0.1:{canaryPort}",
                f"0.0.0.0:{canaryPort}",
                f"[::ffff:127.0.0.1]:{canaryPort}",
                f"127.0.0.1:{server.portNumber}",
            ]:
                endpoint = HBoneClientEndpoint(pool, server.hop(method), authority)
                client = Peer()
                failure = await self.assertFailure(endpoint.connect(PeerFactory(lambda: client)), TunnelRefused)
                self.assertEqual(
                    (failure.status, failure.proxyError), (403, "destination_ip_prohibited"),
                    f"{method} {authority}",
                )
                self.assertFalse(client.made.called)
        self.assertEqual(canary.accepted, 0)
        self.assertEqual(server.watch.accepted, 1)  # only the pool's one connection
        self.assertEqual(server.tracker.opened, 0)
        for method in ("connect", "post"):
            client = Peer(send=100, seed=1)
            await self.tunnel(pool, server.hop(method), allowedPort, client)
            await client.lost
            self.assertTransfer(client, targets.peers[-1], 100)
            self.assertTransfer(targets.peers[-1], client, 100)
        self.assertEqual(canary.accepted, 0)
        self.assertEqual(pool.connectionsOpened, 1)

    # -- 7. pool (S50) ------------------------------------------------------------------------

    @asyncTest
    async def test_poolOneConnectionForHundredTunnels(self) -> None:
        """S50: 100 concurrent tunnels to one peer share exactly one TCP connection
        (one attempt in flight for all of them); a 101st concurrent tunnel opens a
        second connection. All 101 carry data."""
        targetPort, targets, targetWatch = self.target(lambda: Peer(sendAfterEOF=1000, seed=7))
        server = self.server(allow=[targetPort])
        pool = self.pool()
        hop = server.hop()
        clients = [Peer(seed=i) for i in range(101)]
        opening = [self.tunnel(pool, hop, targetPort, c) for c in clients[:100]]
        # every request is waiting on the same, single connection attempt
        self.assertEqual(server.watch.accepted, 0)
        self.assertEqual(pool.connectionsOpened, 0)
        await defer.gatherResults(opening)
        self.assertEqual(server.watch.accepted, 1)
        self.assertEqual(pool.connectionsOpened, 1)
        first = clients[0].transport.connection
        self.assertTrue(all(c.transport.connection is first for c in clients[:100]))
        self.assertEqual(len(first.streams), 100)
        await self.tunnel(pool, hop, targetPort, clients[100])
        self.assertEqual(server.watch.accepted, 2)
        self.assertEqual(pool.connectionsOpened, 2)
        self.assertIsNot(clients[100].transport.connection, first)
        self.assertEqual(len(pool.connections(hop)), 2)
        self.assertEqual(targetWatch.accepted, 101)
        for c in clients:
            c.send(1000, "halfclose")
        await defer.gatherResults([c.lost for c in clients])
        await defer.gatherResults([t.lost for t in targets.peers])
        byClientSeed = {}
        for c in clients:
            self.assertClean(c)
            self.assertEqual((c.received, c.eofAt), (1000, 1000))
            byClientSeed[c.sentDigest] = c
        for t in targets.peers:
            self.assertIn(t.rxDigest.hexdigest(), byClientSeed)
            self.assertEqual(t.eofAt, 1000)
        self.assertEqual(len({t.rxDigest.hexdigest() for t in targets.peers}), 101)

    # -- 8. GOAWAY from the server (S49) --------------------------------------------------

    @asyncTest
    async def test_goAwayWithLiveTunnels(self) -> None:
        """S49: the server sends GOAWAY(NO_ERROR, 2^31-1) while 3 tunnels are live;
        they complete (SHA-256 both ways), a new tunnel opens on a new connection,
        and the old connection closes once its streams have ended."""
        size = 8 * MiB
        targetPort, targets, _ = self.target(lambda: Peer(seed=100 + len(targets.peers)))
        server = self.server(allow=[targetPort])
        pool = self.pool()
        hop = server.hop()
        clients = [Peer(seed=i) for i in range(3)]
        for c in clients:
            await self.tunnel(pool, hop, targetPort, c)
        (old,) = pool.connections(hop)
        oldClosed = whenClosed(old)
        serverConn = server.tunnels.streams[0].connection
        self.assertTrue(all(s.connection is serverConn for s in server.tunnels.streams))
        self.assertEqual(len(targets.peers), 3)
        oldLost = server.watch.lostOf(0)

        serverConn.goAway(ErrorCodes.NO_ERROR, 2**31 - 1)
        # the targets' first bytes travel behind the GOAWAY on the same connection
        for t in targets.peers:
            t.send(size, "halfclose")
        await clients[0].whenReceived(1)
        self.assertTrue(old.goingAway)
        self.assertEqual(pool.connections(hop), [])
        for c in clients:
            c.send(size, "halfclose")

        fresh = Peer(send=1000, seed=50)
        await self.tunnel(pool, hop, targetPort, fresh)
        self.assertIsNot(fresh.transport.connection, old)
        self.assertEqual(pool.connectionsOpened, 2)
        self.assertEqual(server.watch.accepted, 2)
        self.assertFalse(old.closed, "closed while its tunnels were live")

        await defer.gatherResults([c.lost for c in clients])
        await defer.gatherResults([t.lost for t in targets.peers[:3]])
        for c, t in zip(clients, targets.peers):
            self.assertClean(c)
            self.assertClean(t)
            self.assertTransfer(c, t, size)
            self.assertTransfer(t, c, size)
        # the old connection goes once its streams are done: both ends of its socket
        await oldClosed
        await oldLost
        self.assertTrue(serverConn.closed)
        # the new connection is untouched
        self.assertFalse(fresh.transport.connection.closed)
        fresh.transport.loseConnection()
        await fresh.lost
