"""Interop with peers hbone did not write, on 127.0.0.1 (PROTOCOL §5, §10).

* hbone's client through ``nghttpx --http2-proxy`` (client certificates required)
  and Debian's tinyproxy as nghttpx's backend HTTP/1.1 proxy, to an echo server;
* curl's ``POST /_hbone/<target>`` (with ``content-length``) against hbone's server;
* ``openssl s_client`` offering the wrong ALPN or TLS 1.2 to hbone's server.

Every test is a trial ``TestCase`` running the real reactor: hbone and the echo
server live in the test's reactor, the peers are subprocesses. Certificates are
minted per test with :mod:`hbone.ca` in Istio's file layout. Teardown stops the
peers, closes hbone's connections and waits for every socket to close.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from zope.interface import implementer

from hbone.ca import CA_CERT_FILE, CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, initCA, issueSVID
from hbone.dialer import DirectDialer
from hbone.errors import HopUnreachable
from hbone.h2.client import HBoneClientEndpoint, HBoneHop, Pool
from hbone.h2.server import TunnelServer, hboneServerFactory
from hbone.identity import IdentityPattern
from hbone.policy import DestinationPolicy, PeerAuthorizer, ReactorResolver, parseAllowEntry
from hbone.splice import TunnelTracker
from hbone.tls import Identity
from tests.conftest import PeerProcess, pickFreePorts, requirePeer

pytestmark = pytest.mark.peers

TD = "cluster.local"
NGHTTPX_ID = f"spiffe://{TD}/ns/default/sa/nghttpx"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"

MiB = 1024 * 1024

#: A clean environment for peers: no curlrc, no OPENSSL_CONF surprises.
PEER_ENV = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "HOME": "/nonexistent"}


# ---------------------------------------------------------------------------
# In-reactor helpers


class ClosedTracker:
    """Counts connections of one listener and fires when all of them closed."""

    def __init__(self) -> None:
        self.opened = 0
        self.live: set = set()
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
        """Fires once no connection is open; aborts stragglers after ``grace`` s."""
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


class TrackingFactory(WrappingFactory):
    """Wraps a (TLS) server factory to know when every accepted connection closed.

    ``ProtocolWrapper`` does not forward half-close, so wrap only protocols that
    do not need it (TLS does its own close)."""

    noisy = False

    def __init__(self, wrappedFactory) -> None:
        super().__init__(wrappedFactory)
        self.tracker = ClosedTracker()

    def registerProtocol(self, p) -> None:
        super().registerProtocol(p)
        self.tracker.opening(p)

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        self.tracker.closed(p)


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(protocol.Protocol):
    """Echoes; on EOF finishes writing, sends FIN, and closes."""

    def connectionMade(self) -> None:
        self.factory.tracker.opening(self)
        self.transport.registerProducer(self.transport, True)  # echo backpressure

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
        self.factory.tracker.closed(self)


class EchoFactory(protocol.Factory):
    protocol = HalfCloseEcho
    noisy = False

    def __init__(self) -> None:
        self.tracker = ClosedTracker()
        self.bytesIn = 0
        self.eofs = 0


class RoundTrip(protocol.Protocol):
    """Sends ``payload``, reads until as many bytes came back, then closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.echoed = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.payload) and not self.echoed.called:
            self.echoed.callback(bytes(self.received))
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.echoed.called:
            self.echoed.errback(reason)
        self.lost.callback(None)


class _Collect(protocol.ProcessProtocol):
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
    """Run a peer program in the reactor (which keeps serving meanwhile) with stdin
    closed; fires with ``(stdout, stderr, exit code or a description)``. The
    process is SIGKILLed after ``timeout`` seconds and always reaped."""
    d = defer.Deferred()
    reactor.spawnProcess(_Collect(d, timeout), executable, [executable, *map(str, args)], env=PEER_ENV)
    return d


def mint(base: Path) -> dict[str, Path]:
    """A CA and the SVIDs of the tests, as ``hbone certs`` writes them."""
    ca = initCA(base / "ca", TD)
    dirs = {
        "ca": ca,
        "server": issueSVID(ca, SERVER_ID, base / "server", ips=["127.0.0.1"]),
        "client": issueSVID(ca, CLIENT_ID, base / "client"),
        "nghttpx": issueSVID(ca, NGHTTPX_ID, base / "nghttpx", ips=["127.0.0.1"]),
    }
    other = initCA(base / "other-ca", TD)
    dirs["foreign"] = issueSVID(other, CLIENT_ID, base / "foreign")
    return dirs


class _ReactorTest(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        # not self.mktemp(): under pytest that lands in the working directory
        self.base = Path(tempfile.mkdtemp(prefix="hbone-interop-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.certs = mint(self.base)

    def listen(self, factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def startEcho(self) -> tuple[EchoFactory, int]:
        echo = EchoFactory()
        port = self.listen(echo)
        self.addCleanup(echo.tracker.whenAllClosed)
        return echo, port

    def startHBoneServer(self, allow) -> tuple[TrackingFactory, int]:
        """hbone's server (mTLS, ALPN h2) with ``allow`` entries, its own SVID from
        ``server/`` (IP SAN 127.0.0.1)."""
        identity = Identity.fromDirectory(self.certs["server"])
        policy = DestinationPolicy([parseAllowEntry(a) for a in allow])
        tracker = TunnelTracker(reactor)
        self.addCleanup(tracker.stop)
        server = TunnelServer(
            reactor,
            DirectDialer(reactor, policy, ReactorResolver(reactor)),
            PeerAuthorizer(identity.localId),
            tracker,
        )
        factory = TrackingFactory(hboneServerFactory(reactor, identity, server))
        port = self.listen(factory)
        # cleanups run last-in first-out: this one runs before stopListening
        self.addCleanup(factory.tracker.whenAllClosed)
        return factory, port


# ---------------------------------------------------------------------------
# a. hbone client -> nghttpx --http2-proxy -> tinyproxy -> echo


class NghttpxTests(_ReactorTest):
    """hbone's client through nghttpx in HTTP/2 proxy mode (PROTOCOL §10)."""

    def setUp(self) -> None:
        self.nghttpx, self.tinyproxy = requirePeer("nghttpx", "tinyproxy")
        super().setUp()
        self.echo, self.echoPort = self.startEcho()
        proxyPort, frontPort = pickFreePorts(2)
        conf = self.base / "tinyproxy.conf"
        conf.write_text(
            f"Port {proxyPort}\n"
            "Listen 127.0.0.1\n"
            "Allow 127.0.0.1\n"
            f"ConnectPort {self.echoPort}\n"
            "MaxClients 16\n"
            "LogLevel Info\n"
        )
        self.tinyproxyProcess = PeerProcess(
            [self.tinyproxy, "-d", "-c", conf], proxyPort, self.base / "tinyproxy.log"
        )
        self.addCleanup(self.tinyproxyProcess.stop)
        ng = self.certs["nghttpx"]
        self.nghttpxArgv = [
            self.nghttpx,
            "--conf=/dev/null",  # not /etc/nghttpx/nghttpx.conf
            "--single-process",  # one pid to kill
            "--workers=1",
            "--http2-proxy",
            f"--frontend=127.0.0.1,{frontPort}",
            f"--backend=127.0.0.1,{proxyPort}",
            "--no-ocsp",
            "--tls-min-proto-version=TLSv1.3",
            "--tls-max-proto-version=TLSv1.3",
            "--verify-client",
            f"--verify-client-cacert={self.certs['ca'] / CA_CERT_FILE}",
            "--log-level=INFO",
            ng / KEY_FILE,
            ng / CERT_CHAIN_FILE,
        ]
        self.nghttpxProcess = PeerProcess(self.nghttpxArgv, frontPort, self.base / "nghttpx.log")
        self.addCleanup(self.nghttpxProcess.stop)
        self.hop = HBoneHop("127.0.0.1", frontPort, (IdentityPattern.parse(NGHTTPX_ID),))

    def pool(self, identity: Identity) -> Pool:
        pool = Pool(reactor, identity)
        self.addCleanup(pool.closeAll)
        return pool

    def logs(self) -> str:
        return (
            f"\n--- nghttpx ---\n{self.nghttpxProcess.log()[-3000:]}"
            f"\n--- tinyproxy ---\n{self.tinyproxyProcess.log()[-2000:]}"
        )

    async def _roundTrip(self, pool: Pool, size: int) -> None:
        payload = os.urandom(size)
        endpoint = HBoneClientEndpoint(pool, self.hop, f"127.0.0.1:{self.echoPort}")
        proto = await endpoint.connect(protocol.Factory.forProtocol(lambda: RoundTrip(payload)))
        echoed = await proto.echoed
        await proto.lost
        self.assertEqual(len(echoed), size, self.logs())
        self.assertEqual(hashlib.sha256(echoed).hexdigest(), hashlib.sha256(payload).hexdigest())

    def test_tunnelThroughNghttpx(self):
        """CONNECT through nghttpx and tinyproxy reaches the echo server; 4 MiB
        come back unchanged, and nghttpx presented the expected SPIFFE ID."""
        pool = self.pool(Identity.fromDirectory(self.certs["client"]))

        async def run():
            await self._roundTrip(pool, 4 * MiB)
            self.assertEqual(self.echo.bytesIn, 4 * MiB)
            (conn,) = pool.connections(self.hop)
            self.assertEqual(str(conn.peerIdentity), NGHTTPX_ID)
            # a second tunnel reuses the pooled connection
            await self._roundTrip(pool, 64 * 1024)
            self.assertEqual(pool.connectionsOpened, 1)
            self.assertEqual(self.echo.tracker.opened, 2)

        return defer.Deferred.fromCoroutine(run())

    def test_foreignClientCertificateRefused(self):
        """nghttpx refuses a client SVID from another CA: the pool's connection fails
        with HopUnreachable naming the hop, and nothing reaches the backend."""
        foreign = self.certs["foreign"]
        identity = Identity.fromFiles(
            foreign / CERT_CHAIN_FILE, foreign / KEY_FILE, self.certs["ca"] / CA_CERT_FILE
        )
        pool = self.pool(identity)

        async def run():
            endpoint = HBoneClientEndpoint(pool, self.hop, f"127.0.0.1:{self.echoPort}")
            try:
                await endpoint.connect(protocol.Factory.forProtocol(lambda: RoundTrip(b"x")))
            except HopUnreachable as e:
                message = str(e)
            else:
                self.fail("a tunnel opened with a client certificate nghttpx does not trust" + self.logs())
            self.assertIn(f"127.0.0.1:{self.hop.port}", message)
            # TLS 1.3: the client's handshake is done before nghttpx checks its
            # certificate, so the refusal arrives as an alert on first read
            self.assertIn("alert unknown ca", message)
            self.assertEqual(pool.connections(self.hop), [])
            self.assertEqual(self.echo.tracker.opened, 0)

        return defer.Deferred.fromCoroutine(run())


# ---------------------------------------------------------------------------
# b. curl's POST form against hbone's server


class CurlTests(_ReactorTest):
    """``curl --http2 -X POST --data-binary @file https://.../_hbone/host:port``."""

    def setUp(self) -> None:
        (self.curl,) = requirePeer("curl")
        super().setUp()
        self.echo, self.echoPort = self.startEcho()
        self.server, self.port = self.startHBoneServer([f"127.0.0.1:{self.echoPort}"])

    def curlArgs(self, target: str, body: Path, clientCert: bool = True) -> list:
        client = self.certs["client"]
        args = [
            "-q",  # no ~/.curlrc; must come first
            "--silent",
            "--show-error",
            "--http2",
            "--max-time", "15",
            "--cacert", client / ROOT_CERT_FILE,
        ]
        if clientCert:
            args += ["--cert", client / CERT_CHAIN_FILE, "--key", client / KEY_FILE]
        return args + [
            "-X", "POST",
            "--data-binary", f"@{body}",
            "-H", "content-type: application/octet-stream",
            f"https://127.0.0.1:{self.port}/_hbone/{target}",
        ]

    def payload(self, size: int) -> tuple[Path, bytes]:
        data = os.urandom(size)
        path = self.base / "payload.bin"
        path.write_bytes(data)
        return path, data

    async def _curl(self, *args):
        out, err, code = await runPeer(self.curl, args)
        await self.server.tracker.whenAllClosed()
        return out, err, code

    def test_postEchoes(self):
        """curl's content-length ends the upload: the echo server sees EOF, echoes
        everything and closes, and curl's output equals the file."""
        path, data = self.payload(3 * MiB + 12345)
        output = self.base / "out.bin"

        async def run():
            out, err, code = await self._curl(
                *self.curlArgs(f"127.0.0.1:{self.echoPort}", path),
                "--output", output, "--write-out", "%{http_code} %{http_version}",
            )
            self.assertEqual(code, 0, err.decode(errors="replace"))
            self.assertEqual(out, b"200 2")
            got = output.read_bytes()
            self.assertEqual(len(got), len(data))
            self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest())
            self.assertEqual(self.echo.eofs, 1)

        return defer.Deferred.fromCoroutine(run())

    def test_noClientCertificate(self):
        """Without a client certificate curl fails and no byte comes back."""
        path, _ = self.payload(1024)
        output = self.base / "out.bin"

        async def run():
            out, err, code = await self._curl(
                *self.curlArgs(f"127.0.0.1:{self.echoPort}", path, clientCert=False),
                "--output", output,
            )
            self.assertNotEqual(code, 0, out)
            self.assertFalse(output.exists() and output.stat().st_size, "curl received bytes")
            self.assertEqual(self.echo.tracker.opened, 0)
            self.assertEqual(self.server.tracker.opened, 1)

        return defer.Deferred.fromCoroutine(run())

    def test_destinationProhibited(self):
        """A loopback port that is not allow-listed gets 403 with
        ``proxy-status: hbone; error=destination_ip_prohibited``.

        The body is empty (``content-length: 0``, END_STREAM on the request): with a
        body still uploading, hbone's complete 403 plus RST_STREAM(NO_ERROR) (RFC
        9113 §8.1) races curl 7.88's upload and curl sometimes exits 92 although it
        got the whole response (curl/curl#22984)."""
        path, _ = self.payload(0)
        (closed,) = pickFreePorts(1)

        async def run():
            out, err, code = await self._curl(
                *self.curlArgs(f"127.0.0.1:{closed}", path),
                "--dump-header", "-", "--output", os.devnull, "--write-out", "%{http_code}",
            )
            text = out.decode("latin-1")
            self.assertEqual(code, 0, err.decode(errors="replace"))
            self.assertTrue(text.startswith("HTTP/2 403"), text)
            self.assertTrue(text.endswith("403"), text)
            self.assertRegex(text, r"(?im)^proxy-status: hbone; error=destination_ip_prohibited\r?$")
            self.assertEqual(self.echo.tracker.opened, 0)

        return defer.Deferred.fromCoroutine(run())


# ---------------------------------------------------------------------------
# c. openssl s_client: ALPN and TLS version refusals


class OpenSSLTests(_ReactorTest):
    """``openssl s_client`` with a valid client certificate against hbone's server."""

    def setUp(self) -> None:
        (self.openssl,) = requirePeer("openssl")
        super().setUp()
        self.server, self.port = self.startHBoneServer([])

    async def sClient(self, *extra):
        client = self.certs["client"]
        out, err, code = await runPeer(
            self.openssl,
            [
                "s_client",
                "-connect", f"127.0.0.1:{self.port}",
                "-CAfile", client / ROOT_CERT_FILE,
                "-verify_return_error",
                "-cert", client / CERT_CHAIN_FILE,
                "-key", client / KEY_FILE,
                *extra,
            ],
        )
        await self.server.tracker.whenAllClosed()
        return (out + err).decode(errors="replace"), code

    def test_alpnH2Accepted(self):
        """Control: the same command with ALPN h2 completes the handshake."""

        async def run():
            text, code = await self.sClient("-alpn", "h2")
            self.assertEqual(code, 0, text)
            self.assertIn("ALPN protocol: h2", text)
            self.assertIn("New, TLSv1.3", text)

        return defer.Deferred.fromCoroutine(run())

    def test_alpnHttp11Refused(self):
        """ALPN http/1.1 is refused in the handshake with no_application_protocol (120)."""

        async def run():
            text, code = await self.sClient("-alpn", "http/1.1")
            self.assertNotEqual(code, 0, text)
            self.assertRegex(text, r"alert no application protocol.*SSL alert number 120", text)
            self.assertNotIn("New, TLSv1.3", text)

        return defer.Deferred.fromCoroutine(run())

    def test_noAlpnClosed(self):
        """A client that offers no ALPN completes the handshake (OpenSSL does not
        call the select callback) and is then closed by hbone, unread."""

        async def run():
            # -ign_eof: keep reading after stdin ends, until the server closes
            text, code = await self.sClient("-ign_eof")
            self.assertIsInstance(code, int, text)  # exited by itself: the server closed
            self.assertIn("No ALPN negotiated", text)
            self.assertNotEqual(code, 0, text)

        return defer.Deferred.fromCoroutine(run())

    def test_tls12Refused(self):
        """TLS 1.2 is refused with a protocol_version alert (70)."""

        async def run():
            text, code = await self.sClient("-tls1_2", "-alpn", "h2")
            self.assertNotEqual(code, 0, text)
            self.assertRegex(text, r"alert protocol version.*SSL alert number 70", text)
            self.assertNotIn("New, TLSv1.2", text)

        return defer.Deferred.fromCoroutine(run())
