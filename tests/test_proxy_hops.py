"""Client side of ``http://`` and ``socks5://`` hops (:mod:`hbone.proxy.hops`).

* the handshakes, pure: requests as sent, replies mapped to PROTOCOL §6
  statuses, any split;
* the hand-over, against ``StringTransport``: bytes that came with the proxy's
  reply reach the new protocol only once it resumes, then the end, in order;
* real sockets: tunnels through hbone's own HTTP and SOCKS listeners (hash-equal),
  a chain (HTTP hop reached through a SOCKS5 hop), a server-first banner through a
  ``tcp`` forwarder whose dialer uses a hop, refusals, a stalled hop (Clock),
  cancellation, and Debian's tinyproxy.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hbone.address import Target
from hbone.chain import tcpEndpoint
from hbone.errors import HopUnreachable, TunnelRefused
from hbone.proxy.hops import (
    HTTPConnectEndpoint, HTTPConnectHandshake, ProxyHopRefused, SOCKS5Endpoint, SOCKS5Handshake,
)
from hbone.proxy.http import HTTPProxyFactory
from hbone.proxy.socks import SOCKSProxyFactory
from hbone.proxy.tcp import TCPForwardFactory
from tests.conftest import PeerProcess, pickFreePorts
from tests.test_proxy_http import (
    BannerFactory, LossWatcher, ProxyTestCase, StubResolver, asyncTest, chunked,
)

MiB = 1024 * 1024
TARGET = Target("192.0.2.7", 8443)


# ---------------------------------------------------------------------------
# Handshakes (pure)


class TestHTTPConnectHandshake:
    def test_request(self):
        assert HTTPConnectHandshake(Target("2001:db8::1", 443)).start() == (
            b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n")
        request = HTTPConnectHandshake(TARGET, ("alice", "pä:ss")).start()
        token = base64.b64encode("alice:pä:ss".encode()).decode()
        assert f"\r\nProxy-Authorization: Basic {token}\r\n".encode() in request

    @settings(max_examples=200)
    @given(st.lists(st.integers(1, 20), max_size=20), st.binary(max_size=50))
    def test_success(self, sizes, after):
        h = HTTPConnectHandshake(TARGET)
        done = False
        for chunk in chunked(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 Connection established\r\n"
                             b"Via: x\r\n\r\n" + after, sizes):
            if done:
                h.leftover += chunk
                continue
            send, done = h.receive(chunk)
            assert send == b""
        assert done
        assert h.leftover == after

    @pytest.mark.parametrize("response, status, proxyError, text", [
        (b"HTTP/1.1 403 Forbidden\r\nProxy-Status: hbone; error=destination_ip_prohibited\r\n\r\n",
         403, "destination_ip_prohibited", "403 Forbidden"),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", 403, "http_request_denied", "403"),
        (b"HTTP/1.1 401 Unauthorized\r\n\r\n", 403, "http_request_denied", "401"),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", 403, "http_request_denied",
         "write them in the hop URL as user:pass@"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", 400, "http_request_error", "400"),
        (b"HTTP/1.1 503 Service Unavailable\r\nProxy-Status: a; error=x, hbone; error=connection_refused\r\n\r\n",
         503, "connection_refused", "503"),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", 503, "destination_unavailable", "503"),
        (b"HTTP/1.1 504 Gateway Timeout\r\n\r\n", 504, "connection_timeout", "504"),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", 502, "proxy_internal_response", "502"),
        (b"HTTP/1.1 405 Method Not Allowed\r\n\r\n", 502, "proxy_internal_response", "405"),
    ])
    def test_refused(self, response, status, proxyError, text):
        h = HTTPConnectHandshake(TARGET, hop="http hop 198.51.100.1:3128")
        with pytest.raises(ProxyHopRefused) as info:
            h.receive(response)
        err = info.value
        assert (err.status, err.proxyError) == (status, proxyError)
        assert isinstance(err, HopUnreachable) and isinstance(err, TunnelRefused)
        message = str(err)
        assert message.startswith("http hop 198.51.100.1:3128 refused the tunnel to 192.0.2.7:8443: ")
        assert text in message

    @pytest.mark.parametrize("response", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n",
                                          b"x" * 9000])
    def test_garbage(self, response):
        with pytest.raises(HopUnreachable) as info:
            HTTPConnectHandshake(TARGET).receive(response)
        assert not isinstance(info.value, ProxyHopRefused)
        assert info.value.status == 502


class TestSOCKS5Handshake:
    def test_noAuth(self):
        h = SOCKS5Handshake(Target("git.example", 22))
        assert h.start() == b"\x05\x01\x00"
        assert h.receive(b"\x05\x00") == (b"\x05\x01\x00\x03\x0bgit.example\x00\x16", False)
        assert h.receive(b"\x05\x00\x00\x03\x04abcd\x01\xbbbanner") == (b"", True)
        assert h.leftover == b"banner"

    @settings(max_examples=200)
    @given(st.lists(st.integers(1, 7), max_size=20))
    def test_authAnySplit(self, sizes):
        h = SOCKS5Handshake(Target("::1", 80), ("alice", "s3cret"))
        assert h.start() == b"\x05\x02\x00\x02"
        sent, done = b"", False
        for chunk in chunked(b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x04" + b"\x00" * 16 + b"\x00\x50" + b"x",
                             sizes):
            if done:
                h.leftover += chunk
                continue
            out, done = h.receive(chunk)
            sent += out
        assert done and h.leftover == b"x"
        assert sent == b"\x01\x05alice\x06s3cret" + b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x00\x50"

    @pytest.mark.parametrize("replies, status, proxyError, text", [
        (b"\x05\xff", 403, "http_request_denied", "none of the offered methods"),
        (b"\x05\x00\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00", 403, "http_request_denied", "REP 0x02"),
        (b"\x05\x00\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00", 503, "connection_refused", "REP 0x05"),
        (b"\x05\x00\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00", 503, "destination_unavailable", "REP 0x04"),
        (b"\x05\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00", 503, "destination_ip_unroutable", "REP 0x03"),
        (b"\x05\x00\x05\x06\x00\x01\x00\x00\x00\x00\x00\x00", 504, "connection_timeout", "REP 0x06"),
        (b"\x05\x00\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00", 502, "proxy_internal_response", "REP 0x01"),
    ])
    def test_refused(self, replies, status, proxyError, text):
        h = SOCKS5Handshake(TARGET, hop="socks5 hop 198.51.100.1:1080")
        with pytest.raises(ProxyHopRefused) as info:
            h.receive(replies)
        assert (info.value.status, info.value.proxyError) == (status, proxyError)
        assert str(info.value).startswith("socks5 hop 198.51.100.1:1080 refused the tunnel to 192.0.2.7:8443: ")
        assert text in str(info.value)

    def test_wrongPassword(self):
        h = SOCKS5Handshake(TARGET, ("alice", "nope"))
        h.receive(b"\x05\x02")
        with pytest.raises(ProxyHopRefused) as info:
            h.receive(b"\x01\x01")
        assert info.value.status == 403 and "user:pass@" in str(info.value)

    @pytest.mark.parametrize("replies", [b"\x04\x00", b"\x05\x02", b"\x05\x00\x05\x00\x00\x09"])
    def test_garbage(self, replies):
        with pytest.raises(HopUnreachable) as info:
            SOCKS5Handshake(TARGET).receive(replies)
        assert not isinstance(info.value, ProxyHopRefused)


# ---------------------------------------------------------------------------
# The hand-over, without sockets


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Records what it is told; pauses its transport in connectionMade if asked."""

    def __init__(self, pause: bool = False) -> None:
        self.pause = pause
        self.events: list = []

    def connectionMade(self) -> None:
        self.events.append("made")
        if self.pause:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def readConnectionLost(self) -> None:
        self.events.append("eof")

    def writeConnectionLost(self) -> None:
        self.events.append("write-closed")

    def connectionLost(self, reason) -> None:
        self.events.append(("lost", reason.type))


@implementer(IStreamClientEndpoint)
class StringVia:
    """An endpoint that 'connects' to a StringTransport."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol = None

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


class TestHandover:
    def connect(self, endpointClass=HTTPConnectEndpoint, pause=True, clock=None):
        via = StringVia()
        recorder = Recorder(pause)
        endpoint = endpointClass(via, TARGET, clock=clock)
        d = endpoint.connect(Factory.forProtocol(lambda: recorder))
        return via, recorder, d

    def test_leftoverWaitsForResume(self):
        via, recorder, d = self.connect()
        assert via.transport.value() == b"CONNECT 192.0.2.7:8443 HTTP/1.1\r\nHost: 192.0.2.7:8443\r\n\r\n"
        via.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nBANNER")
        result = []
        d.addCallback(result.append)
        assert result == [recorder]
        assert recorder.events == ["made"]
        assert via.transport.producerState == "paused"
        via.protocol.dataReceived(b"-more")  # an h2 stream may deliver while paused
        via.protocol.readConnectionLost()
        assert recorder.events == ["made"]
        recorder.transport.resumeProducing()
        assert recorder.events == ["made", b"BANNER", b"-more", "eof"]
        assert via.transport.producerState == "producing"
        recorder.transport.write(b"up")
        assert via.transport.value().endswith(b"\r\n\r\nup")

    def test_unpausedGetsLeftoverAtOnce(self):
        via, recorder, d = self.connect(pause=False)
        via.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nBANNER")
        assert recorder.events == ["made", b"BANNER"]
        via.protocol.dataReceived(b"x")
        assert recorder.events[-1] == b"x"

    def test_lostWhilePaused(self):
        """The connection ends while the protocol is paused: the bytes, then the end."""
        via, recorder, d = self.connect(SOCKS5Endpoint)
        via.protocol.dataReceived(b"\x05\x00")
        via.protocol.dataReceived(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50tail")
        via.protocol.connectionLost(Failure(error.ConnectionDone()))
        assert recorder.events == ["made", b"tail", ("lost", error.ConnectionDone)]

    def test_abortReachesTheRealTransport(self):
        via, recorder, d = self.connect(pause=False)
        via.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        assert recorder.transport.getPeer() == via.transport.getPeer()
        recorder.transport.abortConnection()
        assert via.transport.disconnecting

    def test_failureClosesAndErrbacks(self):
        via, recorder, d = self.connect()
        failures = []
        d.addErrback(failures.append)
        via.protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        assert via.transport.disconnecting
        (f,) = failures
        assert f.check(ProxyHopRefused)
        assert recorder.events == []

    def test_closedBeforeAnswer(self):
        via, recorder, d = self.connect()
        failures = []
        d.addErrback(failures.append)
        via.protocol.connectionLost(Failure(error.ConnectionDone()))
        assert failures[0].check(HopUnreachable) and not failures[0].check(ProxyHopRefused)
        assert "closed the connection before answering" in str(failures[0].value)

    def test_timeout(self):
        clock = task.Clock()
        via, recorder, d = self.connect(clock=clock)
        failures = []
        d.addErrback(failures.append)
        clock.advance(14.9)
        assert failures == []
        clock.advance(0.2)
        assert failures[0].value.status == 504
        assert failures[0].value.proxyError == "http_response_timeout"
        assert via.transport.disconnecting

    def test_cancel(self):
        via, recorder, d = self.connect()
        d.cancel()
        assert via.transport.disconnecting
        failures = []
        d.addErrback(failures.append)
        assert failures[0].check(defer.CancelledError)
        via.protocol.connectionLost(Failure(error.ConnectionLost()))  # no second result

    def test_endpointInterface(self):
        verifyObject(IStreamClientEndpoint, HTTPConnectEndpoint(StringVia(), TARGET))
        verifyObject(IStreamClientEndpoint, SOCKS5Endpoint(StringVia(), TARGET))
        with pytest.raises(ValueError):
            SOCKS5Endpoint(StringVia(), TARGET, ("", "x"))


# ---------------------------------------------------------------------------
# Real sockets


class RoundTrip(Protocol):
    """Sends ``payload``, reads until as many bytes came back, then closes."""

    def __init__(self, payload: bytes, expect: int | None = None) -> None:
        self.payload = payload
        self.expect = len(payload) if expect is None else expect
        self.received = bytearray()
        self.echoed = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expect and not self.echoed.called:
            self.echoed.callback(bytes(self.received))
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.echoed.called:
            self.echoed.errback(reason)
        self.lost.callback(None)


class Silent(Protocol):
    """Reads and never answers; fires ``factory.heard`` on the first bytes."""

    def connectionMade(self) -> None:
        self.factory.watcher.opening(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.factory.heard.called:
            self.factory.heard.callback(data)

    def connectionLost(self, reason) -> None:
        self.factory.watcher.closed(self)


class SilentFactory(Factory):
    protocol = Silent
    noisy = False

    def __init__(self) -> None:
        self.heard = defer.Deferred()
        self.watcher = LossWatcher()


class HopDialer:
    """An IDialer whose endpoints go through an HTTP hop (what ChainDialer does)."""

    def __init__(self, proxyPort: int) -> None:
        self.proxyPort = proxyPort

    def dial(self, request):
        via = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort)
        return defer.succeed(HTTPConnectEndpoint(via, request.target))


class HopTests(ProxyTestCase):
    def via(self, port: int):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", port)

    async def roundTrip(self, endpoint, size: int = MiB) -> None:
        payload = os.urandom(size)
        proto = await endpoint.connect(Factory.forProtocol(lambda: RoundTrip(payload)))
        echoed = await proto.echoed
        await proto.lost
        self.assertEqual(hashlib.sha256(echoed).digest(), hashlib.sha256(payload).digest())

    @asyncTest
    async def test_httpHop(self):
        echo, echoPort = self.startEcho()
        _, proxyPort = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{echoPort}"], credentials=("alice", "s3cret"))
        await self.roundTrip(HTTPConnectEndpoint(self.via(proxyPort), Target("127.0.0.1", echoPort),
                                                 ("alice", "s3cret"), clock=reactor))
        self.assertEqual(echo.bytesIn, MiB)

    @asyncTest
    async def test_socks5Hop(self):
        echo, echoPort = self.startEcho()
        _, proxyPort = self.startProxy(SOCKSProxyFactory, [f"127.0.0.1:{echoPort}"], credentials=("alice", "s3cret"),
                                       resolver=StubResolver({"echo.test": ["127.0.0.1"]}))
        await self.roundTrip(SOCKS5Endpoint(self.via(proxyPort), Target("echo.test", echoPort), ("alice", "s3cret")))
        await self.roundTrip(SOCKS5Endpoint(self.via(proxyPort), Target("127.0.0.1", echoPort), ("alice", "s3cret")))
        self.assertEqual(echo.bytesIn, 2 * MiB)

    @asyncTest
    async def test_chain(self):
        """An HTTP hop reached through a SOCKS5 hop: each proxy's policy admits
        exactly the next step."""
        echo, echoPort = self.startEcho()
        _, httpPort = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{echoPort}"])
        _, socksPort = self.startProxy(SOCKSProxyFactory, [f"127.0.0.1:{httpPort}"])
        first = SOCKS5Endpoint(self.via(socksPort), Target("127.0.0.1", httpPort))
        await self.roundTrip(HTTPConnectEndpoint(first, Target("127.0.0.1", echoPort)))
        self.assertEqual(self.counting.connects, [("127.0.0.1", httpPort), ("127.0.0.1", echoPort)])
        # the SOCKS hop may not reach the echo directly
        with self.assertRaises(ProxyHopRefused):
            await SOCKS5Endpoint(self.via(socksPort), Target("127.0.0.1", echoPort)).connect(
                Factory.forProtocol(Protocol))

    @asyncTest
    async def test_serverFirstThroughForwarder(self):
        """``tcp`` forwarder -> HTTP hop -> banner server: the banner, sent by the
        server the moment it accepts, reaches the client first; then the echo."""
        banner = BannerFactory(b"SSH-2.0-hbone-test\r\n")
        bannerPort = self.listen(banner)
        self.addCleanup(banner.watcher.whenAllClosed)
        _, proxyPort = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{bannerPort}"])
        forwarder = TCPForwardFactory(Target("127.0.0.1", bannerPort), HopDialer(proxyPort), self.tracker, reactor)
        self.watcher.track(forwarder)
        forwardPort = self.listen(forwarder)
        proto = RoundTrip(b"ping", expect=len(banner.banner) + 4)
        await self.talkWith(forwardPort, proto)
        received = await proto.echoed
        self.assertEqual(received, banner.banner + b"ping")
        await proto.lost

    async def talkWith(self, port, proto):
        from twisted.internet.endpoints import connectProtocol

        return await connectProtocol(self.via(port), proto)

    @asyncTest
    async def test_refusals(self):
        echo, echoPort = self.startEcho()
        _, httpPort = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{echoPort}"], credentials=("alice", "s3cret"))
        _, socksPort = self.startProxy(SOCKSProxyFactory, [f"127.0.0.1:{echoPort}"])
        _, socksAuthPort = self.startProxy(SOCKSProxyFactory, [f"127.0.0.1:{echoPort}"], credentials=("u", "p"))
        cases = [
            (HTTPConnectEndpoint(self.via(httpPort), Target("169.254.169.254", 80), ("alice", "s3cret")),
             403, "destination_ip_prohibited", f"http hop 127.0.0.1:{httpPort} refused the tunnel to 169.254.169.254:80"),
            (HTTPConnectEndpoint(self.via(httpPort), Target("127.0.0.1", echoPort), ("alice", "wrong")),
             403, "http_request_denied", "it refused this hop's user:pass@"),
            (HTTPConnectEndpoint(self.via(httpPort), Target("127.0.0.1", echoPort)),
             403, "http_request_denied", "write them in the hop URL"),
            (SOCKS5Endpoint(self.via(socksPort), Target("10.0.0.1", 80)),
             403, "http_request_denied", f"socks5 hop 127.0.0.1:{socksPort} refused the tunnel to 10.0.0.1:80"),
            (SOCKS5Endpoint(self.via(socksAuthPort), Target("127.0.0.1", echoPort), name="-F socks5://x"),
             403, "http_request_denied", "-F socks5://x refused the tunnel to 127.0.0.1:"),
            (SOCKS5Endpoint(self.via(socksAuthPort), Target("127.0.0.1", echoPort), ("u", "bad")),
             403, "http_request_denied", "rejected the username/password"),
        ]
        for endpoint, status, proxyError, text in cases:
            try:
                await endpoint.connect(Factory.forProtocol(Protocol))
            except ProxyHopRefused as e:
                self.assertEqual((e.status, e.proxyError), (status, proxyError), str(e))
                self.assertIn(text, str(e))
            else:
                self.fail(f"{endpoint} connected")
        self.assertEqual(echo.watcher.opened, 0)
        self.assertEqual(self.counting.connects, [])

    @asyncTest
    async def test_viaUnreachable(self):
        import socket

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        closedPort = probe.getsockname()[1]
        probe.close()
        endpoint = HTTPConnectEndpoint(tcpEndpoint(reactor, "127.0.0.1", closedPort), TARGET)
        with self.assertRaises(HopUnreachable) as info:
            await endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual((info.exception.status, info.exception.proxyError), (503, "connection_refused"))

    @asyncTest
    async def test_stalledHop(self):
        silent = SilentFactory()
        port = self.listen(silent)
        self.addCleanup(silent.watcher.whenAllClosed)
        clock = task.Clock()
        d = SOCKS5Endpoint(self.via(port), TARGET, clock=clock, timeout=5).connect(Factory.forProtocol(Protocol))
        greeting = await silent.heard
        self.assertEqual(greeting, b"\x05\x01\x00")
        clock.advance(5)
        with self.assertRaises(HopUnreachable) as info:
            await d
        self.assertEqual(info.exception.status, 504)
        await silent.watcher.whenAllClosed()

    @asyncTest
    async def test_cancelDuringHandshake(self):
        silent = SilentFactory()
        port = self.listen(silent)
        d = HTTPConnectEndpoint(self.via(port), TARGET).connect(Factory.forProtocol(Protocol))
        await silent.heard
        self.assertEqual(len(silent.watcher.live), 1)
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        await silent.watcher.whenAllClosed()


@pytest.mark.peers
class TinyproxyHopTests(ProxyTestCase):
    """HTTPConnectEndpoint through Debian's tinyproxy."""

    def setUp(self) -> None:
        from tests.conftest import requirePeer

        (self.tinyproxy,) = requirePeer("tinyproxy")
        super().setUp()
        self.base = Path(tempfile.mkdtemp(prefix="hbone-hops-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.echo, self.echoPort = self.startEcho()
        (self.proxyPort,) = pickFreePorts(1)
        conf = self.base / "tinyproxy.conf"
        conf.write_text(
            f"Port {self.proxyPort}\n"
            "Listen 127.0.0.1\n"
            "Allow 127.0.0.1\n"
            f"ConnectPort {self.echoPort}\n"
            "MaxClients 16\n"
            "LogLevel Info\n"
        )
        self.process = PeerProcess([self.tinyproxy, "-d", "-c", conf], self.proxyPort, self.base / "tinyproxy.log")
        self.addCleanup(self.process.stop)

    @asyncTest
    async def test_tunnelAndRefusal(self):
        via = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort)
        payload = os.urandom(MiB)
        proto = await HTTPConnectEndpoint(via, Target("127.0.0.1", self.echoPort), clock=reactor).connect(
            Factory.forProtocol(lambda: RoundTrip(payload)))
        echoed = await proto.echoed
        await proto.lost
        self.assertEqual(hashlib.sha256(echoed).digest(), hashlib.sha256(payload).digest(), self.process.log())
        # a port outside tinyproxy's ConnectPort list: it answers 403
        with self.assertRaises(ProxyHopRefused) as info:
            await HTTPConnectEndpoint(via, Target("127.0.0.1", 9), clock=reactor).connect(Factory.forProtocol(Protocol))
        self.assertEqual(info.exception.status, 403, str(info.exception))
        self.assertIn(f"127.0.0.1:{self.proxyPort}", str(info.exception))


class NodeChainTests(ProxyTestCase):
    """As a user writes it: ``-F http://…`` / ``-F socks5://…`` hops carrying an HBONE
    hop (mTLS + HTTP/2 over the hop's tunnel), served by ``-L http``/``-L socks5``
    listeners of other nodes."""

    timeout = 60

    async def startNode(self, identity, listeners, hops=(), allow=()):
        from hbone.service import Node, NodeSpec
        from hbone.urls import parseHop, parseListener

        spec = NodeSpec(listeners=tuple(parseListener(x) for x in listeners),
                        hops=tuple(parseHop(h) for h in hops), identity=identity, allow=tuple(allow))
        node = Node(reactor, spec)
        await node.startListening()
        node.startService()
        self.addCleanup(node.stopService)
        return node, node.listeners[0].port.getHost().port

    @asyncTest
    async def test_hboneThroughProxyHops(self):
        from tests import pki

        echo, echoPort = self.startEcho()
        _, bPort = await self.startNode(pki.serverIdentity(), ["hbone://127.0.0.1:0"], allow=[f"127.0.0.1:{echoPort}"])
        _, httpPort = await self.startNode(pki.clientIdentity(), ["http://alice:s3cret@127.0.0.1:0"],
                                           allow=[f"127.0.0.1:{bPort}"])
        _, socksPort = await self.startNode(pki.clientIdentity(), ["socks5://127.0.0.1:0"],
                                            allow=[f"127.0.0.1:{bPort}"])
        for hop in (f"http://alice:s3cret@127.0.0.1:{httpPort}", f"socks5://127.0.0.1:{socksPort}"):
            _, fwdPort = await self.startNode(
                pki.clientIdentity(), [f"tcp://127.0.0.1:0/127.0.0.1:{echoPort}"],
                hops=[hop, f"hbone://127.0.0.1:{bPort}?identity={pki.SERVER_ID}"])
            payload = os.urandom(MiB)
            received, reason = await self.talk(fwdPort, payload, halfClose=True)
            self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(payload).digest(), hop)
            self.assertClosedCleanly(reason)
        self.assertEqual(echo.eofs, 2)
