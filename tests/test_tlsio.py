"""hbone's TLS layer (:mod:`hbone.tlsio`) and socket tuning (:func:`hbone.splice.tuneTCP`).

Real TLS 1.3 with SPIFFE certificates over real sockets on 127.0.0.1:

* a large write is one ``SSL_write`` and arrives intact; decrypted records are
  handed on together, not one ``dataReceived`` per 16 KiB record;
* small writes are still aggregated; writes keep their order across the two
  paths; data before the peer's close_notify is delivered before
  ``connectionLost``;
* ``tuneTCP`` reaches the socket under a TLS layer; a write with nothing queued is
  sent at once, and past what the kernel takes, Twisted's queue and producer
  pause take over (bytes in order, none lost);
* the Twisted internals :class:`hbone.tlsio.HBoneTLSProtocol` overrides or calls
  are still there (a Twisted upgrade that moves them fails here first).
"""

from __future__ import annotations

import hashlib
import os
import socket

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import tls as twistedTLS
from twisted.trial import unittest
from zope.interface import implementer

from hbone.splice import READ_SIZE, tuneTCP
from hbone.tlsio import LARGE_WRITE, HBoneTLSFactory, HBoneTLSProtocol, TLSClientEndpoint
from tests import pki
from tests.protocols import waitFor

MiB = 1024 * 1024


def test_twistedInternalsStillThere() -> None:
    base = twistedTLS.TLSMemoryBIOProtocol
    for name in ("_write", "_flushSendBIO", "_flushReceiveBIO", "_shutdownTLS", "_tlsShutdownFinished",
                 "_bufferedWrite", "_unbufferPendingWrites", "dataReceived"):
        assert callable(getattr(base, name, None)), name
    for name in ("_lostTLSConnection", "_aborted"):
        assert hasattr(base, name), name
    assert twistedTLS.TLSMemoryBIOFactory.protocol is twistedTLS.BufferingTLSTransport
    assert issubclass(HBoneTLSProtocol, twistedTLS.BufferingTLSTransport)
    agg = twistedTLS._AggregateSmallWrites(lambda data: None, reactor)
    assert callable(agg.write) and callable(agg.flush)


class Collector(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost = defer.Deferred()
        self.dataAfterLost = False

    def dataReceived(self, data: bytes) -> None:
        if self.lost.called:
            self.dataAfterLost = True
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Tuned(Protocol):
    def connectionMade(self) -> None:
        tuneTCP(self.transport)


class TLSLayerTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = pki.serverIdentity()
        self.client = pki.clientIdentity()
        self.received: list[Collector] = []

        def build() -> Collector:
            c = Collector()
            self.received.append(c)
            return c

        inner = Factory.forProtocol(build)
        self.port = reactor.listenTCP(0, HBoneTLSFactory(self.server.serverCreator(b"h2"), False, inner),
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def _connect(self, protocol: Protocol) -> Protocol:
        endpoint = TLSClientEndpoint(self.client.clientCreator(alpn=b"h2"),
                                     TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), reactor)
        proto = await endpoint.connect(Factory.forProtocol(lambda: protocol))
        self.addCleanup(lambda: proto.transport.abortConnection() if proto.transport.connected else None)
        return proto

    async def test_aLargeWriteIsOneSSLWriteAndArrivesIntact(self) -> None:
        client = await self._connect(Protocol())
        tlsConn = client.transport._tlsConnection
        calls = []
        real = tlsConn.send

        class Counting:
            def __getattr__(self, name):
                return getattr(tlsConn, name)

            def send(self, data, *args):
                calls.append(len(data))
                return real(data, *args)

        client.transport._tlsConnection = Counting()
        payload = os.urandom(4 * MiB)
        client.transport.write(payload)
        client.transport._tlsConnection = tlsConn
        assert calls == [4 * MiB]  # Twisted's own layer: 256 calls of 16 KiB
        client.transport.loseConnection()
        await waitFor(lambda: self.received and self.received[0].lost.called, 20)
        got = self.received[0]
        assert hashlib.sha256(got.data).digest() == hashlib.sha256(payload).digest()
        # 256 records of 16 KiB; handed on a socket read (or more) at a time
        assert len(got.chunks) < 256 // 2, len(got.chunks)
        assert not got.dataAfterLost

    async def test_smallWritesAreAggregatedAndOrderIsKept(self) -> None:
        client = await self._connect(Protocol())
        pieces = [b"small-%03d;" % i for i in range(100)]
        big = os.urandom(LARGE_WRITE * 3)
        for p in pieces[:50]:
            client.transport.write(p)
        client.transport.write(big)  # flushes the 50 small ones first
        for p in pieces[50:]:
            client.transport.write(p)
        client.transport.loseConnection()
        await waitFor(lambda: self.received and self.received[0].lost.called, 20)
        assert self.received[0].data == b"".join(pieces[:50]) + big + b"".join(pieces[50:])

    async def test_tinyWritesInOneTurnAreOneRecord(self) -> None:
        client = await self._connect(Protocol())
        await waitFor(lambda: self.received, 10)
        for i in range(40):
            client.transport.write(b"%02d" % i)
        expected = b"".join(b"%02d" % i for i in range(40))
        await waitFor(lambda: self.received[0].data == expected, 10)
        assert len(self.received[0].chunks) == 1

    async def test_tuneTCPReachesTheSocketUnderTLS(self) -> None:
        client = await self._connect(Tuned())
        tlsLayer = client.transport
        tcp = tlsLayer.transport
        assert tcp.bufferSize == READ_SIZE
        assert tcp.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert "bufferSize" not in vars(tlsLayer)  # not set on the TLS layer by mistake
        assert type(tcp).write is not type(tcp).__mro__[1].write  # sends at once
        assert "write" not in vars(tcp)  # nothing added per connection


class Stalled(Protocol):
    """Does not read until told to; then collects."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


@implementer(IPushProducer)
class Source:
    def __init__(self) -> None:
        self.paused = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class SendAtOnceTests(unittest.TestCase):
    timeout = 60

    async def test_sentAtOnceThenQueuedWithBackpressure(self) -> None:
        servers: list[Stalled] = []
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: servers.append(Stalled()) or servers[-1]),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Tuned))
        tcp = client.transport
        self.addCleanup(tcp.abortConnection)
        source = Source()
        tcp.registerProducer(source, True)
        tcp.write(b"first")
        assert tcp._tempDataBuffer == [] and tcp.dataBuffer == b""  # in the kernel already
        sent = [b"first"]
        for i in range(128):  # 32 MiB: far more than the socket buffers hold
            piece = bytes([i]) * (256 * 1024)
            tcp.write(piece)
            sent.append(piece)
        queued = len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
        assert queued > 8 * MiB  # the rest waits in Twisted's queue...
        assert source.paused  # ...and the producer was told to pause
        await waitFor(lambda: servers, 10)
        servers[0].transport.resumeProducing()
        await waitFor(lambda: sum(map(len, servers[0].chunks)) == sum(map(len, sent)), 30)
        assert b"".join(servers[0].chunks) == b"".join(sent)
