"""The HTTP/1.1 proxy listener and the ``auto`` listener (SECURITY S52, S54).

* the request-head parser, pure: forms, limits, framing, rewriting (with
  hypothesis for splits and garbage);
* the listener protocol against ``StringTransport`` with a fake dialer and a
  ``Clock``: ``200`` only once the outbound leg is connected, buffered bytes
  forwarded, dial errors mapped per PROTOCOL §6, the 10 s head deadline;
* real sockets on 127.0.0.1: S52 (policy denials with a canary that must see no
  accept, ``400``/``431``/``407`` + close, no dial), hash-equal CONNECT tunnels,
  absolute-form GET to a twisted.web site, the ``auto`` sniffer, and curl.

Helpers used by ``test_proxy_socks`` and ``test_proxy_hops`` live here too.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, ProcessProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from hbone.address import Target
from hbone.dialer import DirectDialer
from hbone.errors import (
    AccessDenied, ConnectTimeout, HopUnreachable, RequestError, StreamReset, TunnelRefused,
)
from hbone.policy import DestinationDenied, DestinationPolicy, DNSTimeout, ReactorResolver, parseAllowEntry
from hbone.proxy.auto import AutoProxyFactory
from hbone.proxy.http import (
    ESTABLISHED, MAX_FIELDS, MAX_HEAD, HTTPProxyFactory, HTTPRequestError, RequestHeadReader,
    checkBindSafety, errorResponse, httpStatusOf, parseRequestHead,
)
from hbone.splice import TunnelTracker

MiB = 1024 * 1024
PEER_ENV = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "HOME": "/nonexistent"}


def asyncTest(f):
    """Run an ``async def`` test method as a Deferred-returning trial test."""

    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.Deferred.fromCoroutine(f(self, *args, **kwargs))

    return wrapper


def ipv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Shared helpers (no Test prefix: imported by the other proxy test modules)


class CountingReactor:
    """The real reactor, counting outbound TCP connects (a dial that creates no
    socket leaves ``connects`` at 0)."""

    def __init__(self, real=reactor) -> None:
        self._real = real
        self.connects: list[tuple[str, int]] = []

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        self.connects.append((host, port))
        return self._real.connectTCP(host, port, factory, timeout, bindAddress)

    def __getattr__(self, name):
        return getattr(self._real, name)


class StubResolver:
    """Names from a table; anything else fails."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHost(self, host: str):
        self.asked.append(host)
        if host in self.table:
            return defer.succeed(list(self.table[host]))
        return defer.fail(error.DNSLookupError(host))


class Canary(Factory):
    """Counts accepts and closes each connection at once."""

    noisy = False

    def __init__(self) -> None:
        self.accepts = 0

    def buildProtocol(self, addr):
        self.accepts += 1
        return None


class LossWatcher:
    """Fires when every tracked protocol has seen ``connectionLost``."""

    def __init__(self) -> None:
        self.live: set = set()
        self.opened = 0
        self._waiters: list[defer.Deferred] = []

    def opening(self, proto) -> None:
        self.opened += 1
        self.live.add(proto)

    def closed(self, proto) -> None:
        self.live.discard(proto)
        if not self.live:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def whenAllClosed(self, grace: float = 5.0) -> defer.Deferred:
        if not self.live:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)

        def abort():
            for proto in list(self.live):
                proto.transport.abortConnection()

        timer = reactor.callLater(grace, abort)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    def track(self, factory) -> None:
        """Wrap ``factory.buildProtocol`` so its protocols are tracked."""
        build = factory.buildProtocol

        def buildProtocol(addr):
            proto = build(addr)
            if proto is None:
                return None
            self.opening(proto)
            lost = proto.connectionLost

            def connectionLost(reason):
                try:
                    lost(reason)
                finally:
                    self.closed(proto)

            proto.connectionLost = connectionLost
            return proto

        factory.buildProtocol = buildProtocol


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Protocol):
    """Echoes; on EOF finishes writing, sends FIN, and closes."""

    def connectionMade(self) -> None:
        self.factory.watcher.opening(self)
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.factory.bytesIn += len(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.factory.eofs += 1
        self.transport.unregisterProducer()
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.factory.watcher.closed(self)


class EchoFactory(Factory):
    protocol = HalfCloseEcho
    noisy = False

    def __init__(self) -> None:
        self.watcher = LossWatcher()
        self.bytesIn = 0
        self.eofs = 0


class BannerServer(Protocol):
    """Writes the factory's banner at once, then echoes."""

    def connectionMade(self) -> None:
        self.factory.watcher.opening(self)
        self.transport.write(self.factory.banner)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.factory.watcher.closed(self)


class BannerFactory(Factory):
    protocol = BannerServer
    noisy = False

    def __init__(self, banner: bytes) -> None:
        self.banner = banner
        self.watcher = LossWatcher()


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """Writes ``data`` (then FIN when ``halfClose``), collects everything until the
    connection ends; ``done`` fires with ``(received, reason)``."""

    def __init__(self, data: bytes = b"", halfClose: bool = False) -> None:
        self.data = data
        self.halfClose = halfClose
        self.received = bytearray()
        self.done = defer.Deferred()
        self.eof = False
        self.writeDone = False
        self.reason = None

    def connectionMade(self) -> None:
        if self.data:
            self.transport.write(self.data)
        if self.halfClose:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof = True
        if not self.halfClose or self.writeDone:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.writeDone = True
        if self.eof:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback((bytes(self.received), reason))


class CollectProcess(ProcessProtocol):
    def __init__(self, done: defer.Deferred, timeout: float) -> None:
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.timeout = timeout
        self.timer = None
        self.killed = False

    def connectionMade(self) -> None:
        self.transport.closeStdin()
        self.timer = reactor.callLater(self.timeout, self._kill)

    def _kill(self) -> None:
        self.killed = True
        self.transport.signalProcess("KILL")

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        code = reason.value.exitCode
        if self.killed:
            code = f"killed after {self.timeout:g}s"
        elif code is None:
            code = f"signal {reason.value.signal}"
        self.done.callback((b"".join(self.out), b"".join(self.err), code))


def runPeer(executable: str, args, timeout: float = 20.0) -> defer.Deferred:
    """Run a program while the reactor keeps serving; fires with (stdout, stderr, code)."""
    d = defer.Deferred()
    reactor.spawnProcess(CollectProcess(d, timeout), executable, [executable, *map(str, args)],
                         env=PEER_ENV)
    return d


class Page(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        return self.body


def web() -> server.Site:
    root = resource.Resource()
    root.putChild(b"", Page(b"hello from the origin\n"))
    root.putChild(b"big", Page(BIG_BODY))
    site = server.Site(root)
    site.noisy = False
    return site


BIG_BODY = os.urandom(512 * 1024)


class ProxyTestCase(unittest.TestCase):
    """Real reactor; listeners on 127.0.0.1 port 0; every connection closed at the end."""

    timeout = 30

    def setUp(self) -> None:
        self.watcher = LossWatcher()
        self.counting = CountingReactor()
        self.tracker = TunnelTracker(reactor, idleTimeout=0)
        self.addCleanup(self.tracker.stop)
        # cleanups run last-in first-out: this one runs after the tests' own
        self.addCleanup(self.watcher.whenAllClosed)

    def listen(self, factory, host: str = "127.0.0.1") -> int:
        port = reactor.listenTCP(0, factory, interface=host)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def startEcho(self, host: str = "127.0.0.1") -> tuple[EchoFactory, int]:
        echo = EchoFactory()
        port = self.listen(echo, host)
        self.addCleanup(echo.watcher.whenAllClosed)
        return echo, port

    def startWeb(self) -> int:
        site = web()
        port = self.listen(site)
        return port

    def dialer(self, allow=(), resolver=None) -> DirectDialer:
        policy = DestinationPolicy([parseAllowEntry(a) for a in allow])
        return DirectDialer(self.counting, policy, resolver or ReactorResolver(reactor))

    def startProxy(self, cls, allow=(), credentials=None, resolver=None, **kw) -> tuple[object, int]:
        factory = cls(self.dialer(allow, resolver), self.tracker, reactor, credentials=credentials, **kw)
        self.watcher.track(factory)
        return factory, self.listen(factory)

    def talk(self, port: int, data: bytes, halfClose: bool = False, host: str = "127.0.0.1"):
        """Connect to ``port``, write ``data``; fires with (received, reason)."""
        cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        client = Client(data, halfClose)
        d = connectProtocol(cls(reactor, host, port), client)
        d.addCallback(lambda _: client.done)
        return d

    def assertClosedCleanly(self, reason) -> None:
        self.assertTrue(reason.check(error.ConnectionDone), f"not a clean close: {reason.value!r}")


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in sizes:
        if i >= len(data):
            break
        out.append(data[i : i + n])
        i += n
    if i < len(data):
        out.append(data[i:])
    return out


# ---------------------------------------------------------------------------
# The head parser (pure)


class TestParseRequestHead:
    def test_connect(self):
        req = parseRequestHead(b"CONNECT [2001:DB8::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert req.form == "authority"
        assert req.target == Target("2001:db8::1", 443)
        assert req.method == "CONNECT"

    def test_absolute(self):
        req = parseRequestHead(b"GET http://Example.COM:8080/a/b?c=d#frag HTTP/1.1\r\nAccept: */*\r\n\r\n")
        assert req.form == "absolute"
        assert req.target == Target("example.com", 8080)
        assert req.path == "/a/b?c=d"
        assert req.hostField == "example.com:8080"

    def test_absoluteDefaults(self):
        req = parseRequestHead(b"GET http://example.com HTTP/1.0\r\n\r\n")
        assert req.target == Target("example.com", 80)
        assert (req.path, req.hostField) == ("/", "example.com")
        req = parseRequestHead(b"GET http://[::1]?q HTTP/1.1\r\n\r\n")
        assert req.target == Target("::1", 80)
        assert (req.path, req.hostField) == ("/?q", "[::1]")

    @pytest.mark.parametrize("head, status, why", [
        (b"GET / HTTP/1.1\r\n\r\n", 400, "neither"),
        (b"GET https://example.com/ HTTP/1.1\r\n\r\n", 400, "CONNECT"),
        (b"GET http://u:p@example.com/ HTTP/1.1\r\n\r\n", 400, "userinfo"),
        (b"GET http://example.com/ HTTP/2.0\r\n\r\n", 400, "request line"),
        (b"GET  http://example.com/ HTTP/1.1\r\n\r\n", 400, "request line"),
        (b"GET http://example.com/ HTTP/1.1\r\nA: b\r\n  folded\r\n\r\n", 400, "folding"),
        (b"GET http://example.com/ HTTP/1.1\r\nA : b\r\n\r\n", 400, "malformed header"),
        (b"GET http://example.com/ HTTP/1.1\r\nA: b\nC: d\r\n\r\n", 400, "bare"),
        (b"GET http://example.com/ HTTP/1.1\r\nA: b\x00\r\n\r\n", 400, "control"),
        (b"POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
         400, "Content-Length together with Transfer-Encoding"),
        (b"POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400,
         "Content-Length"),
        (b"POST http://example.com/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
        (b"POST http://example.com/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "chunked"),
        (b"POST http://example.com/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
        (b"GET http://example.com/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Host"),
        (b"CONNECT 127.1:80 HTTP/1.1\r\n\r\n", 400, "CONNECT target"),
        (b"CONNECT example.com HTTP/1.1\r\n\r\n", 400, "CONNECT target"),
        (b"CONNECT h:0 HTTP/1.1\r\n\r\n", 400, "CONNECT target"),
        (b"CONNECT u@h:80 HTTP/1.1\r\n\r\n", 400, "CONNECT target"),
        (b"GET http://h:65536/ HTTP/1.1\r\n\r\n", 400, "URI"),
    ])
    def test_refused(self, head, status, why):
        with pytest.raises(HTTPRequestError) as info:
            parseRequestHead(head)
        assert info.value.status == status
        assert why in info.value.reason

    def test_fieldLimit(self):
        fields = b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_FIELDS))
        assert len(parseRequestHead(b"CONNECT h:1 HTTP/1.1\r\n" + fields + b"\r\n").headers) == MAX_FIELDS
        with pytest.raises(HTTPRequestError) as info:
            parseRequestHead(b"CONNECT h:1 HTTP/1.1\r\n" + fields + b"X-G: v\r\n\r\n")
        assert info.value.status == 431

    def test_sizeLimit(self):
        line = b"CONNECT h:1 HTTP/1.1\r\n"
        pad = MAX_HEAD - len(line) - len(b"X: \r\n\r\n")
        exact = line + b"X: " + b"a" * pad + b"\r\n\r\n"
        assert len(exact) == MAX_HEAD
        reader = RequestHeadReader()
        assert reader.feed(exact) is not None
        reader = RequestHeadReader()
        with pytest.raises(HTTPRequestError) as info:
            reader.feed(exact[:-4] + b"a\r\n\r\n")
        assert info.value.status == 431
        # no terminator: refused as soon as more than MAX_HEAD bytes went by
        reader = RequestHeadReader()
        assert reader.feed(b"x" * MAX_HEAD) is None
        with pytest.raises(HTTPRequestError):
            reader.feed(b"x")

    def test_originHead(self):
        req = parseRequestHead(
            b"POST http://example.com:8080/p?q HTTP/1.1\r\n"
            b"Host: evil.example\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Connection: keep-alive, X-Drop, Content-Length\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"X-Drop: 1\r\n"
            b"X-Keep: 2\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        assert req.originHead() == (
            b"POST /p?q HTTP/1.1\r\n"
            b"Host: example.com:8080\r\n"
            b"X-Keep: 2\r\n"
            b"Content-Length: 5\r\n"
            b"Connection: close\r\n\r\n"
        )

    def test_proxyCredentials(self):
        token = base64.b64encode(b"alice:pa:ss").decode()
        req = parseRequestHead(f"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: basic {token}\r\n\r\n".encode())
        assert req.proxyCredentials() == (b"alice", b"pa:ss")
        for bad in ("Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode()):
            req = parseRequestHead(f"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: {bad}\r\n\r\n".encode())
            assert req.proxyCredentials() is None
        twice = f"Proxy-Authorization: Basic {token}\r\n" * 2
        assert parseRequestHead(f"CONNECT h:1 HTTP/1.1\r\n{twice}\r\n".encode()).proxyCredentials() is None

    @settings(max_examples=200)
    @given(st.lists(st.integers(min_value=1, max_value=40), max_size=30), st.binary(max_size=64))
    def test_anySplit(self, sizes, after):
        """The same request and leftover however the bytes are split."""
        head = (b"GET http://example.com:81/x HTTP/1.1\r\nHost: example.com\r\n"
                b"Content-Length: 64\r\nX-A: b\r\n\r\n")
        reader = RequestHeadReader()
        result = None
        for chunk in chunked(head + after, sizes):
            if result is None:
                result = reader.feed(chunk)
            else:
                reader.leftover += chunk
        assert result == parseRequestHead(head)
        assert reader.leftover == after

    @settings(max_examples=300)
    @given(st.lists(st.binary(max_size=3000), max_size=8))
    def test_garbage(self, chunks):
        """Garbage raises only HTTPRequestError, never buffers past the limit."""
        reader = RequestHeadReader()
        for chunk in chunks:
            try:
                if reader.feed(chunk) is not None:
                    break
            except HTTPRequestError as e:
                assert e.status in (400, 431)
                break
            assert len(reader._buffer) <= MAX_HEAD


class TestAnswers:
    @pytest.mark.parametrize("err, status, token", [
        (DestinationDenied("x"), 403, "destination_ip_prohibited"),
        (AccessDenied("x"), 403, "http_request_denied"),
        (TunnelRefused(401, None, "h:1", "peer"), 403, "destination_unavailable"),
        (RequestError("x"), 400, "http_request_error"),
        (HopUnreachable("x", 503, "connection_refused"), 503, "connection_refused"),
        (HopUnreachable("x", 503, "dns_error"), 503, "dns_error"),
        (ConnectTimeout("x"), 504, "connection_timeout"),
        (DNSTimeout("x"), 504, "dns_timeout"),
        (StreamReset(0xA), 502, "proxy_internal_response"),
        (ValueError("bug"), 502, "proxy_internal_error"),
    ])
    def test_httpStatusOf(self, err, status, token):
        assert httpStatusOf(err) == (status, token)

    def test_errorResponse(self):
        data = errorResponse(403, "destination_ip_prohibited")
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 403 Forbidden"
        assert b"Proxy-Status: hbone; error=destination_ip_prohibited" in lines
        assert b"Connection: close" in lines
        assert f"Content-Length: {len(body)}".encode() in lines
        # a token that is not an RFC 9209 sf-token never reaches the wire
        assert b"error=proxy_internal_error" in errorResponse(502, "bad token\r\nX: y")


class TestCheckBindSafety:
    """S54: a proxy listener on a public address without credentials refuses to start."""

    @pytest.mark.parametrize("scheme", ["http", "socks5", "socks4", "socks4a", "auto"])
    @pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.0.2.7", "proxy.example", "fe80::1%eth0"])
    def test_publicWithoutCredentials(self, scheme, host):
        with pytest.raises(ValueError) as info:
            checkBindSafety(scheme, host, None, listener=f"{scheme}://{host}:8080")
        message = str(info.value)
        assert message.startswith(f"-L {scheme}://{host}:8080: ")
        assert "needs user:pass@ credentials (SECURITY §4.3)" in message

    def test_message(self):
        with pytest.raises(ValueError) as info:
            checkBindSafety("http", "0.0.0.0", None)
        assert str(info.value) == (
            "a proxy listener on a non-loopback address needs user:pass@ credentials (SECURITY §4.3)"
        )

    @pytest.mark.parametrize("host", ["", None, "127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost",
                                      "::ffff:127.0.0.1"])
    def test_loopback(self, host):
        for scheme in ("http", "socks5", "auto"):
            checkBindSafety(scheme, host, None)

    def test_credentials(self):
        checkBindSafety("http", "0.0.0.0", ("bob", "s3cret"))
        checkBindSafety("socks5", "::", ("bob", "s3cret"))
        checkBindSafety("auto", "0.0.0.0", ("bob", "s3cret"))
        with pytest.raises(ValueError):
            checkBindSafety("http", "0.0.0.0", ("", ""))

    def test_socks4CannotAuthenticate(self):
        for host in ("127.0.0.1", "0.0.0.0"):
            with pytest.raises(ValueError, match="SOCKS4 has no authentication"):
                checkBindSafety("socks4", host, ("bob", "s3cret"))

    def test_otherSchemes(self):
        for scheme in ("tcp", "hbone", "h2c", "sni"):
            checkBindSafety(scheme, "0.0.0.0", None)


# ---------------------------------------------------------------------------
# The listener protocol, without sockets


class FakeDialer:
    """Records requests; each ``connect`` waits for the test to finish it."""

    def __init__(self) -> None:
        self.requests = []
        self.pending: list[tuple[Factory, defer.Deferred]] = []
        self.cancelled = 0

    def dial(self, request):
        self.requests.append(request)
        return defer.succeed(self)

    def connect(self, factory):
        def cancel(d):
            self.cancelled += 1

        d = defer.Deferred(cancel)
        self.pending.append((factory, d))
        return d

    def finish(self, index: int = 0):
        """Connect pending dial ``index``; returns (outbound protocol, its transport)."""
        factory, d = self.pending[index]
        outbound = factory.buildProtocol(None)
        transport = StringTransport()
        outbound.makeConnection(transport)
        d.callback(outbound)
        return outbound, transport


class ListenerUnitMixin:
    factoryClass = HTTPProxyFactory

    def build(self, credentials=None, factoryClass=None):
        self.clock = task.Clock()
        self.dialer = FakeDialer()
        self.tracker = TunnelTracker(self.clock, idleTimeout=0)
        cls = factoryClass or self.factoryClass
        self.factory = cls(self.dialer, self.tracker, self.clock, credentials=credentials)
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.proto.makeConnection(self.transport)
        return self.proto


class HTTPListenerUnitTests(ListenerUnitMixin, unittest.SynchronousTestCase):
    def test_connectAnsweredOnlyOnceConnected(self):
        """S21 for the local listener: nothing is written before the outbound leg
        connects; then 200, then the bytes that came with the head go out first."""
        proto = self.build()
        proto.dataReceived(b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\nEARLY")
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.transport.producerState, "paused")
        (request,) = self.dialer.requests
        self.assertEqual(request.target, Target("192.0.2.1", 443))
        self.assertEqual(request.source, ("127.0.0.1", 40000))
        self.assertFalse(request.operatorFixed)
        proto.dataReceived(b"-MORE")  # read while pausing: kept, in order
        outbound, outTransport = self.dialer.finish()
        self.assertEqual(self.transport.value(), ESTABLISHED)
        self.assertEqual(outTransport.value(), b"EARLY-MORE")
        self.assertEqual(self.transport.producerState, "producing")
        proto.dataReceived(b"later")
        self.assertEqual(outTransport.value(), b"EARLY-MORElater")
        outbound.dataReceived(b"reply")
        self.assertEqual(self.transport.value(), ESTABLISHED + b"reply")
        self.assertEqual(len(self.tracker.tunnels), 1)

    def test_absoluteForm(self):
        proto = self.build()
        proto.dataReceived(b"POST http://origin.example:8080/up?x=1 HTTP/1.1\r\nHost: x\r\n"
                           b"Proxy-Connection: keep-alive\r\nContent-Length: 4\r\n\r\nbo")
        proto.dataReceived(b"dy")
        self.assertEqual(self.dialer.requests[0].target, Target("origin.example", 8080))
        _, outTransport = self.dialer.finish()
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(outTransport.value(),
                         b"POST /up?x=1 HTTP/1.1\r\nHost: origin.example:8080\r\nContent-Length: 4\r\n"
                         b"Connection: close\r\n\r\nbody")

    def test_headSplitByteByByte(self):
        proto = self.build()
        for i in range(len(head := b"CONNECT h.example:22 HTTP/1.1\r\n\r\n")):
            proto.dataReceived(head[i : i + 1])
        self.assertEqual(self.dialer.requests[0].target, Target("h.example", 22))

    def dialFailure(self, err) -> bytes:
        proto = self.build()
        proto.dataReceived(b"CONNECT 192.0.2.1:443 HTTP/1.1\r\n\r\n")
        self.dialer.pending[0][1].errback(err)
        self.assertTrue(self.transport.disconnecting)
        return self.transport.value()

    def test_dialErrors(self):
        """PROTOCOL §6 local-listener table, with the error in Proxy-Status."""
        for err, line, token in [
            (DestinationDenied("no"), b"HTTP/1.1 403 Forbidden", b"destination_ip_prohibited"),
            (TunnelRefused(401, None, "h:1", "peer"), b"HTTP/1.1 403 Forbidden", b"destination_unavailable"),
            (RequestError("bad"), b"HTTP/1.1 400 Bad Request", b"http_request_error"),
            (HopUnreachable("x", 503, "connection_refused"), b"HTTP/1.1 503 Service Unavailable",
             b"connection_refused"),
            (HopUnreachable("x", 503, "dns_error"), b"HTTP/1.1 503 Service Unavailable", b"dns_error"),
            (ConnectTimeout("slow"), b"HTTP/1.1 504 Gateway Timeout", b"connection_timeout"),
            (StreamReset(0xA), b"HTTP/1.1 502 Bad Gateway", b"proxy_internal_response"),
        ]:
            answer = self.dialFailure(err)
            self.assertTrue(answer.startswith(line + b"\r\n"), answer)
            self.assertIn(b"\r\nProxy-Status: hbone; error=" + token + b"\r\n", answer)
            self.assertEqual(len(self.tracker.tunnels), 0)

    def test_headDeadline(self):
        proto = self.build()
        proto.dataReceived(b"CONNECT h.example:22 HTTP/1.1\r\n")
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.dialer.requests, [])

    def test_deadlineEndsWithTheHead(self):
        """The 10 s are for the head; a slow dial is the dialer's business."""
        proto = self.build()
        proto.dataReceived(b"CONNECT h.example:22 HTTP/1.1\r\n\r\n")
        self.clock.advance(60)
        self.assertFalse(self.transport.disconnecting)
        self.dialer.finish()
        self.assertEqual(self.transport.value(), ESTABLISHED)

    def test_clientGoneWhileDialing(self):
        proto = self.build()
        proto.dataReceived(b"CONNECT h.example:22 HTTP/1.1\r\n\r\n")
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.dialer.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_authRequired(self):
        proto = self.build(credentials=("alice", "s3cret"))
        proto.dataReceived(b"CONNECT h.example:22 HTTP/1.1\r\n\r\n")
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"))
        self.assertIn(b'\r\nProxy-Authenticate: Basic realm="hbone"\r\n', answer)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.dialer.requests, [])

    def test_authChecked(self):
        for creds, ok in [(b"alice:s3cret", True), (b"alice:wrong", False), (b"bob:s3cret", False),
                          (b"alice:s3cret2", False), (b"alic:s3cret", False)]:
            proto = self.build(credentials=("alice", "s3cret"))
            token = base64.b64encode(creds)
            proto.dataReceived(b"CONNECT h.example:22 HTTP/1.1\r\nProxy-Authorization: Basic " + token + b"\r\n\r\n")
            self.assertEqual(len(self.dialer.requests), 1 if ok else 0, creds)

    def test_lingerThenAbort(self):
        """After an error answer the write side is shut; a client that never
        closes is aborted after the linger time."""
        proto = self.build()
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 "))
        proto.dataReceived(b"ignored")
        self.assertEqual(self.dialer.requests, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)


class AutoListenerUnitTests(ListenerUnitMixin, unittest.SynchronousTestCase):
    factoryClass = AutoProxyFactory

    def test_sniff(self):
        for first, expect in [(b"\x05\x01\x00", b"\x05\x00"), (b"\x04\x01\x00\x16\xc0\x00\x02\x01\x00", b""),
                              (b"CONNECT h.example:22 HTTP/1.1\r\n\r\n", b"")]:
            self.build()
            self.proto.dataReceived(first)
            self.assertEqual(self.transport.value(), expect)
            if first[0] != 5:
                self.assertEqual(len(self.dialer.requests), 1)


# ---------------------------------------------------------------------------
# Real sockets


class HTTPProxyTests(ProxyTestCase):
    """S52 and the happy paths, through a real listener and DirectDialer."""

    @asyncTest
    async def test_connectRoundTrip(self):
        """CONNECT with 1 MiB sent right behind the head (before the 200), then FIN:
        the echo gets it all, the client gets 200 and the same bytes, SHA-256 equal."""
        echo, echoPort = self.startEcho()
        proxy, port = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{echoPort}"])
        payload = os.urandom(MiB)
        head = f"CONNECT 127.0.0.1:{echoPort} HTTP/1.1\r\nHost: 127.0.0.1:{echoPort}\r\n\r\n".encode()
        received, reason = await self.talk(port, head + payload, halfClose=True)
        self.assertTrue(received.startswith(ESTABLISHED), received[:100])
        body = received[len(ESTABLISHED):]
        self.assertEqual(len(body), MiB)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(payload).digest())
        self.assertClosedCleanly(reason)
        self.assertEqual(echo.eofs, 1)
        self.assertEqual(self.counting.connects, [("127.0.0.1", echoPort)])
        await self.watcher.whenAllClosed()
        self.assertEqual(self.tracker.opened, 1)

    @asyncTest
    async def test_absoluteGet(self):
        webPort = self.startWeb()
        _, port = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{webPort}"])
        request = (f"GET http://127.0.0.1:{webPort}/big HTTP/1.1\r\nHost: wrong\r\n"
                   f"Proxy-Connection: keep-alive\r\n\r\n").encode()
        received, reason = await self.talk(port, request)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"), head)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(BIG_BODY).digest())
        self.assertClosedCleanly(reason)

    @asyncTest
    async def test_connectDeniedTargets(self):
        """S52/S31: CONNECT to targets the policy refuses: 403 with
        destination_ip_prohibited, no socket created, canaries see no accept."""
        canary = Canary()
        canaryPort = self.listen(canary)
        targets = [f"127.0.0.1:{canaryPort}", f"0.0.0.0:{canaryPort}", "169.254.169.254:80",
                   "10.0.0.1:80", "100.100.100.200:80", "224.0.0.1:80", "255.255.255.255:80",
                   "[::ffff:127.0.0.1]:80", "[64:ff9b::7f00:1]:80", "[fd00:ec2::254]:80", "[fe80::1]:80",
                   "[::]:80", "localhost:80"]
        canary6 = Canary()
        if ipv6Loopback():
            targets.append(f"[::1]:{self.listen(canary6, '::1')}")
        _, port = self.startProxy(HTTPProxyFactory, ["127.0.0.1:1"])  # allows only another port
        for target in targets:
            received, reason = await self.talk(port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
            self.assertTrue(received.startswith(b"HTTP/1.1 403 Forbidden\r\n"), (target, received))
            self.assertIn(b"Proxy-Status: hbone; error=destination_ip_prohibited\r\n", received)
            self.assertClosedCleanly(reason)
        self.assertEqual(self.counting.connects, [])
        self.assertEqual((canary.accepts, canary6.accepts), (0, 0))

    @asyncTest
    async def test_absoluteMetadataDenied(self):
        _, port = self.startProxy(HTTPProxyFactory)
        received, reason = await self.talk(port, b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\n"
                                                 b"Host: 169.254.169.254\r\n\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 403 Forbidden\r\n"), received)
        self.assertIn(b"error=destination_ip_prohibited", received)
        self.assertEqual(self.counting.connects, [])

    @asyncTest
    async def test_contentLengthWithTransferEncoding(self):
        echo, echoPort = self.startEcho()
        _, port = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{echoPort}"])
        received, reason = await self.talk(
            port, f"POST http://127.0.0.1:{echoPort}/ HTTP/1.1\r\nContent-Length: 5\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(received.startswith(b"HTTP/1.1 400 Bad Request\r\n"), received)
        self.assertIn(b"Connection: close\r\n", received)
        self.assertClosedCleanly(reason)
        self.assertEqual(self.counting.connects, [])
        self.assertEqual(echo.watcher.opened, 0)

    @asyncTest
    async def test_headTooLarge(self):
        _, port = self.startProxy(HTTPProxyFactory)
        head = b"GET http://192.0.2.1/ HTTP/1.1\r\nX-Pad: " + b"a" * (9 * 1024) + b"\r\n\r\n"
        received, reason = await self.talk(port, head)
        self.assertTrue(received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), received)
        self.assertClosedCleanly(reason)
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_FIELDS + 1))
        received, reason = await self.talk(port, b"CONNECT 192.0.2.1:80 HTTP/1.1\r\n" + fields + b"\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 431 "), received)
        self.assertClosedCleanly(reason)
        self.assertEqual(self.counting.connects, [])

    @asyncTest
    async def test_authRequired(self):
        echo, echoPort = self.startEcho()
        _, port = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{echoPort}"], credentials=("alice", "s3cret"))
        connect = f"CONNECT 127.0.0.1:{echoPort} HTTP/1.1\r\n".encode()
        for extra in (b"", b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:wrong") + b"\r\n"):
            received, reason = await self.talk(port, connect + extra + b"\r\n")
            self.assertTrue(received.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"), received)
            self.assertIn(b'Proxy-Authenticate: Basic realm="hbone"\r\n', received)
            self.assertClosedCleanly(reason)
        self.assertEqual(self.counting.connects, [])
        good = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:s3cret") + b"\r\n"
        received, reason = await self.talk(port, connect + good + b"\r\nping", halfClose=True)
        self.assertEqual(received, ESTABLISHED + b"ping")

    @asyncTest
    async def test_connectionRefused(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        closedPort = probe.getsockname()[1]
        probe.close()
        _, port = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{closedPort}"])
        received, reason = await self.talk(port, f"CONNECT 127.0.0.1:{closedPort} HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), received)
        self.assertIn(b"Proxy-Status: hbone; error=connection_refused\r\n", received)
        self.assertClosedCleanly(reason)


class AutoProxyTests(ProxyTestCase):
    @asyncTest
    async def test_sniffedProtocols(self):
        """One port: HTTP CONNECT, SOCKS5 and SOCKS4 all reach the echo."""
        echo, echoPort = self.startEcho()
        _, port = self.startProxy(AutoProxyFactory, [f"127.0.0.1:{echoPort}"])
        received, _ = await self.talk(port, f"CONNECT 127.0.0.1:{echoPort} HTTP/1.1\r\n\r\nhttp".encode(),
                                      halfClose=True)
        self.assertEqual(received, ESTABLISHED + b"http")
        received, _ = await self.talk(
            port, b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echoPort.to_bytes(2, "big") + b"socks5",
            halfClose=True)
        self.assertEqual(received[:2], b"\x05\x00")
        self.assertEqual(received[2:4], b"\x05\x00")
        self.assertEqual(received[-6:], b"socks5")
        received, _ = await self.talk(
            port, b"\x04\x01" + echoPort.to_bytes(2, "big") + b"\x7f\x00\x00\x01user\x00socks4", halfClose=True)
        self.assertEqual(received, b"\x00\x5a" + b"\x00" * 6 + b"socks4")
        self.assertEqual(echo.eofs, 3)


@pytest.mark.peers
class CurlHTTPTests(ProxyTestCase):
    def setUp(self) -> None:
        from tests.conftest import requirePeer

        (self.curl,) = requirePeer("curl")
        super().setUp()

    @asyncTest
    async def test_curlAbsoluteAndTunnel(self):
        """``curl -x http://127.0.0.1:P http://127.0.0.1:WEB/``, plain and with
        ``-p`` (CONNECT), with and without proxy credentials."""
        webPort = self.startWeb()
        _, port = self.startProxy(HTTPProxyFactory, [f"127.0.0.1:{webPort}"])
        _, authPort = self.startProxy(AutoProxyFactory, [f"127.0.0.1:{webPort}"], credentials=("u", "p w"))
        url = f"http://127.0.0.1:{webPort}/"
        base = ["-q", "--silent", "--show-error", "--max-time", "10"]
        for proxyArgs in (["-x", f"http://127.0.0.1:{port}"], ["-p", "-x", f"http://127.0.0.1:{port}"],
                          ["-x", f"http://127.0.0.1:{authPort}", "-U", "u:p w"],
                          ["-p", "-x", f"http://127.0.0.1:{authPort}", "-U", "u:p w"]):
            out, err, code = await runPeer(self.curl, base + proxyArgs + [url])
            self.assertEqual((code, out), (0, b"hello from the origin\n"), (proxyArgs, err))
        out, err, code = await runPeer(
            self.curl, base + ["-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{authPort}", url])
        self.assertEqual(out, b"407", err)
        out, err, code = await runPeer(
            self.curl, base + ["-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}",
                               "http://169.254.169.254/"])
        self.assertEqual(out, b"403", err)
        self.assertEqual([p for _, p in self.counting.connects], [webPort] * 4)
