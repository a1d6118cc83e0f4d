"""Client hops that are not SPIFFE mTLS (PROTOCOL §2 "Bearer tokens", §10):

* ``hbone://…?tls=server&token=@FILE``: server-auth TLS toward a load balancer
  that terminates TLS in front of an ``h2c`` listener, with a bearer JWT-SVID;
* ``http2://host:port``: a CONNECT-over-h2 proxy (nghttpx ``--http2-proxy``,
  gost) with ordinary server-auth TLS, DNS-name/IP verification, no SPIFFE check.

The load balancer is first hbone's own ``h2c`` handler behind an in-process TLS
terminator (no outside program), then nghttpx as a real reverse proxy in front of
the ``h2c`` listener. Certificates are minted per test; the load balancer's has
no SPIFFE ID, only DNS/IP SANs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from hbone.ca import certificatePEM, makeCA, makeLeaf, privateKeyPEM
from hbone.dialer import DirectDialer
from hbone.errors import HopIdentityError, HopUnreachable, TunnelRefused
from hbone.h2.client import HBoneClientEndpoint, HBoneHop, Pool
from hbone.h2.server import TunnelServer, h2cServerFactory
from hbone.identity import IdentityPattern, SpiffeId
from hbone.jwt import JWKSVerifier, jwksDocument, mintJWTSVID
from hbone.policy import DestinationPolicy, PeerAuthorizer, ReactorResolver, parseAllowEntry
from hbone.splice import TunnelTracker
from hbone.tls import ServerAuthClientCreator, ServerName
from tests import pki
from tests.conftest import PeerProcess, pickFreePorts, requirePeer
from tests.test_h2c import RecordingDialer
from tests.test_interop import EchoFactory, RoundTrip, TrackingFactory

CLIENT_ID = pki.CLIENT_ID
MiB = 1024 * 1024


# -- HBoneHop: the options each mode takes ------------------------------------------


def test_hopDefaultsUnchanged() -> None:
    hop = HBoneHop("127.0.0.1", 15008)
    assert (hop.tls, hop.token, hop.serverName, hop.caFile, hop.basicAuth) == ("mtls", None, None, None, None)
    assert str(hop) == "hbone://127.0.0.1:15008"
    assert str(HBoneHop("::1", 1)) == "hbone://[::1]:1"


def test_hopStrings() -> None:
    assert str(HBoneHop("lb.example", 443, tls="server", token="/t")) == "hbone://lb.example:443?tls=server"
    assert str(HBoneHop("lb.example", 80, tls="none")) == "h2c://lb.example:80"


def test_hopReprHidesPassword() -> None:
    hop = HBoneHop("proxy.example", 443, tls="server", basicAuth=("user", "s3cret"))
    assert "s3cret" not in repr(hop)
    assert "s3cret" not in str(hop)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tls": "tls13"}, "tls='tls13'"),
        ({"method": "get"}, "method='get'"),
        ({"tls": "server", "identities": (IdentityPattern.parse(CLIENT_ID),)}, "identity= checks a SPIFFE"),
        ({"tls": "none", "identities": (IdentityPattern.parse(CLIENT_ID),)}, "identity= checks a SPIFFE"),
        ({"token": "/run/jwt"}, "not a mesh peer"),
        ({"basicAuth": ("u", "p")}, "not a mesh peer"),
        ({"caFile": "/ca.pem"}, "tls=server hops only"),
        ({"tls": "none", "serverName": "lb"}, "tls=server hops only"),
        ({"tls": "none", "token": ""}, "token=@FILE"),
        ({"tls": "server", "basicAuth": ("a:b", "c")}, "no ':' in the user"),
    ],
)
def test_hopRefusesOptionsOutsideItsMode(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        HBoneHop("127.0.0.1", 443, **kwargs)
    assert message in str(info.value)


def test_poolKeys() -> None:
    """The pool key holds the mode, address, server name, CA file, token file and
    credentials: hops differing in any of them never share a connection."""
    pool = Pool(reactor, None)
    base = HBoneHop("127.0.0.1", 443, tls="server", token="/a")
    variants = [
        HBoneHop("127.0.0.1", 443, tls="server", token="/b"),
        HBoneHop("127.0.0.1", 443, tls="server"),
        HBoneHop("127.0.0.1", 443, tls="server", token="/a", serverName="lb"),
        HBoneHop("127.0.0.1", 443, tls="server", token="/a", caFile="/ca"),
        HBoneHop("127.0.0.1", 443, tls="none", token="/a"),
        HBoneHop("127.0.0.1", 443, tls="server", token="/a", basicAuth=("u", "p")),
        HBoneHop("127.0.0.1", 443),
    ]
    keys = {pool._key(base)} | {pool._key(v) for v in variants}
    assert len(keys) == len(variants) + 1
    assert pool._key(base) == pool._key(HBoneHop("127.0.0.1", 443, tls="server", token="/a"))


def test_mtlsHopNeedsIdentity() -> None:
    pool = Pool(reactor, None)
    with pytest.raises(HopUnreachable, match="needs our SVID"):
        pool._creator(HBoneHop("127.0.0.1", 15008))


def test_serverAuthCreatorBadCAFile(tmp_path: Path) -> None:
    from hbone.tls import IdentityConfigError

    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(IdentityConfigError, match="holds no PEM certificate"):
        ServerAuthClientCreator("lb.example", tmp_path / "empty.pem")
    with pytest.raises(IdentityConfigError, match="cannot read certificate file"):
        ServerAuthClientCreator("lb.example", tmp_path / "missing.pem")


def test_serverName() -> None:
    assert str(ServerName("lb.example")) == "dns:lb.example"
    assert str(ServerName("127.0.0.1")) == "ip:127.0.0.1"
    assert str(ServerName("::1")) == "ip:::1"


# -- shared fixtures for the reactor tests ---------------------------------------


class LBPKI:
    """A non-SPIFFE CA and a load-balancer certificate (DNS lb.test, IP 127.0.0.1)
    written to ``base``, plus a second CA nobody trusts."""

    def __init__(self, base: Path) -> None:
        self.caCert, self.caKey = makeCA("lb-ca.test")
        self.cert, self.key = makeLeaf(self.caCert, self.caKey, dns=["lb.test"], ips=["127.0.0.1"])
        self.caFile = base / "lb-ca.pem"
        self.caFile.write_bytes(certificatePEM(self.caCert))
        self.certFile = base / "lb-cert.pem"
        self.certFile.write_bytes(certificatePEM(self.cert))
        self.keyFile = base / "lb-key.pem"
        self.keyFile.write_bytes(privateKeyPEM(self.key))
        self.keyFile.chmod(0o600)
        otherCert, _ = makeCA("other-ca.test")
        self.otherCAFile = base / "other-ca.pem"
        self.otherCAFile.write_bytes(certificatePEM(otherCert))


@implementer(IOpenSSLServerConnectionCreator)
class TerminatingTLS:
    """A load balancer's TLS: its own certificate, ALPN h2, optionally asking for
    (but not checking) a client certificate; records SNI and client certificates."""

    def __init__(self, lb: LBPKI, askClientCert: bool = False) -> None:
        self.snis: list = []
        self.clientCerts: dict = {}  # per TLS connection: the verify callback may run twice
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate(lb.cert)
        ctx.use_privatekey(lb.key)
        ctx.set_alpn_select_callback(lambda conn, offered: b"h2" if b"h2" in offered else SSL.NO_OVERLAPPING_PROTOCOLS)
        ctx.set_tlsext_servername_callback(lambda conn: self.snis.append(conn.get_servername()))
        if askClientCert:
            ctx.set_verify(SSL.VERIFY_PEER, self._record)
        self.ctx = ctx

    def _record(self, conn, cert, errno, depth, ok) -> bool:
        if depth == 0:
            self.clientCerts[id(conn)] = cert.to_cryptography()
        return True

    def serverConnectionForTLS(self, tlsProtocol):
        conn = SSL.Connection(self.ctx, None)
        conn.set_accept_state()
        return conn


class HalfCloseClient(protocol.Protocol):
    """Writes ``payload``, half-closes, and reads until the other side ends."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.done.callback((bytes(self.received), reason))


class HopTestBase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hbone-hops-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.lb = LBPKI(self.base)
        self.jwtKey = ec.generate_private_key(ec.SECP256R1())
        self.jwks = self.base / "jwks.json"
        self.jwks.write_text(json.dumps(jwksDocument({pki.TD: [("k1", self.jwtKey.public_key())]})))
        self.echo = EchoFactory()
        self.echoPort = self.listen(self.echo)
        self.addCleanup(self.echo.tracker.whenAllClosed)
        self.logEvents: list = []
        globalLogPublisher.addObserver(self.logEvents.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logEvents.append)

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def tokenFile(self, aud: str = "https://127.0.0.1", sub: str = CLIENT_ID) -> str:
        path = self.base / "token"
        path.write_text(mintJWTSVID(self.jwtKey, "k1", sub, aud, 300) + "\n")
        path.chmod(0o600)
        return str(path)

    def h2cFactory(self, audience: str | None = None):
        """hbone's h2c listener factory (JWT-SVIDs from our JWKS), echo allowed."""
        policy = DestinationPolicy([parseAllowEntry(f"127.0.0.1:{self.echoPort}")])
        tracker = TunnelTracker(reactor)
        self.addCleanup(tracker.stop)
        self.dialer = RecordingDialer(DirectDialer(reactor, policy, ReactorResolver(reactor)))
        server = TunnelServer(reactor, self.dialer, PeerAuthorizer(SpiffeId.parse(pki.SERVER_ID)), tracker)
        verifier = JWKSVerifier(self.jwks, audience, reactor)
        return h2cServerFactory(reactor, server, verifier=verifier)

    def startH2c(self, audience: str | None = None) -> int:
        factory = TrackingFactory(self.h2cFactory(audience))
        port = self.listen(factory)
        self.addCleanup(factory.tracker.whenAllClosed)
        return port

    def pool(self, identity=None) -> Pool:
        pool = Pool(reactor, identity)
        self.addCleanup(pool.closeAll)
        return pool

    async def roundTrip(self, pool: Pool, hop: HBoneHop, size: int = 256 * 1024) -> None:
        payload = os.urandom(size)
        endpoint = HBoneClientEndpoint(pool, hop, f"127.0.0.1:{self.echoPort}")
        proto = await endpoint.connect(protocol.Factory.forProtocol(lambda: RoundTrip(payload)))
        echoed = await proto.echoed
        await proto.lost
        self.assertEqual(len(echoed), size)
        self.assertEqual(hashlib.sha256(echoed).hexdigest(), hashlib.sha256(payload).hexdigest())

    def logText(self) -> str:
        return "\n".join((formatEvent(e) or "") + repr(e) for e in self.logEvents)


# -- tls=server toward hbone's h2c handler behind an in-process TLS terminator ---------


class ServerAuthTests(HopTestBase):
    """``tls=server``: chain against the CA file, name against the certificate's
    DNS/IP SANs, ALPN h2, bearer token on each request."""

    def startLB(self, askClientCert: bool = False) -> tuple[int, TerminatingTLS]:
        tls = TerminatingTLS(self.lb, askClientCert)
        # The plain WrappingFactory hides the h2c protocol's IHandshakeListener from
        # the TLS layer: this TLS belongs to the "load balancer", not to hbone.
        inner = WrappingFactory(self.h2cFactory())
        factory = TrackingFactory(TLSMemoryBIOFactory(tls, False, inner))
        port = self.listen(factory)
        self.addCleanup(factory.tracker.whenAllClosed)
        return port, tls

    def test_ipAddressVerified(self):
        """Toward 127.0.0.1 the IP SAN is checked, no SNI is sent, and the
        connection's peer is the verified address (no SPIFFE identity)."""

        async def run():
            port, tls = self.startLB()
            pool = self.pool()
            hop = HBoneHop("127.0.0.1", port, tls="server", token=self.tokenFile(), caFile=str(self.lb.caFile))
            await self.roundTrip(pool, hop, 4 * MiB)
            await self.roundTrip(pool, HBoneHop("127.0.0.1", port, method="post", tls="server",
                                                token=self.tokenFile(), caFile=str(self.lb.caFile)))
            (conn,) = pool.connections(hop)
            self.assertEqual(conn.peerIdentity, ServerName("127.0.0.1"))
            self.assertEqual(tls.snis, [None])  # one pooled connection, no SNI for an IP
            self.assertEqual([str(r.peerIdentity) for r in self.dialer.requests], [CLIENT_ID] * 2)
            self.assertNotIn("Bearer ey", self.logText())

        return defer.Deferred.fromCoroutine(run())

    def test_dnsNameVerified(self):
        """With serverName the DNS SAN is checked and sent as SNI; the POST form's
        :authority is that name (and so is the default audience)."""

        async def run():
            port, tls = self.startLB()
            pool = self.pool()
            hop = HBoneHop("127.0.0.1", port, method="post", tls="server", serverName="lb.test",
                           token=self.tokenFile(aud="https://lb.test"), caFile=str(self.lb.caFile))
            await self.roundTrip(pool, hop)
            self.assertEqual(tls.snis, [b"lb.test"])
            self.assertEqual(pool.connections(hop)[0].peerIdentity, ServerName("lb.test"))

        return defer.Deferred.fromCoroutine(run())

    def test_nameMismatchRefused(self):
        """A certificate not valid for the name fails the handshake with the name
        in the error; nothing is dialed."""

        async def run():
            port, _ = self.startLB()
            pool = self.pool()
            for name in ("other.test", "127.0.0.2"):
                hop = HBoneHop("127.0.0.1", port, tls="server", serverName=name,
                               token=self.tokenFile(), caFile=str(self.lb.caFile))
                with self.assertRaises(HopIdentityError) as info:
                    await self.roundTrip(pool, hop)
                self.assertIn(f"not valid for {name}", str(info.exception))
                self.assertEqual(pool.connections(hop), [])
            self.assertEqual(self.dialer.requests, [])

        return defer.Deferred.fromCoroutine(run())

    def test_untrustedCARefused(self):
        """A chain to a CA that is not in the CA file, or not in the system store
        (no caFile), is refused."""

        async def run():
            port, _ = self.startLB()
            pool = self.pool()
            for caFile in (str(self.lb.otherCAFile), None):
                hop = HBoneHop("127.0.0.1", port, tls="server", token=self.tokenFile(), caFile=caFile)
                with self.assertRaises(HopIdentityError) as info:
                    await self.roundTrip(pool, hop)
                self.assertIn("local issuer certificate", str(info.exception))
            self.assertEqual(self.dialer.requests, [])

        return defer.Deferred.fromCoroutine(run())

    def test_clientCertificateOnRequest(self):
        """Our SVID goes to a server that asks for a client certificate when the
        pool has an identity, and none goes without one."""

        async def run():
            port, tls = self.startLB(askClientCert=True)
            hop = HBoneHop("127.0.0.1", port, tls="server", token=self.tokenFile(), caFile=str(self.lb.caFile))
            await self.roundTrip(self.pool(pki.clientIdentity()), hop)
            await self.roundTrip(self.pool(), hop)
            (cert,) = tls.clientCerts.values()  # the second pool presented none
            from hbone.identity import svidFromCertificate

            self.assertEqual(str(svidFromCertificate(cert)), CLIENT_ID)

        return defer.Deferred.fromCoroutine(run())

    def test_tokenRefusedBehindTLS(self):
        """A wrong-audience token through the load balancer: TunnelRefused(401)."""

        async def run():
            port, _ = self.startLB()
            hop = HBoneHop("127.0.0.1", port, tls="server", token=self.tokenFile(aud="https://x"),
                           caFile=str(self.lb.caFile))
            with self.assertRaises(TunnelRefused) as info:
                await self.roundTrip(self.pool(), hop)
            self.assertEqual(info.exception.status, 401)

        return defer.Deferred.fromCoroutine(run())


# -- real peers: nghttpx ----------------------------------------------------------------


NGHTTPX_COMMON = ["--conf=/dev/null", "--single-process", "--workers=1", "--no-ocsp",
                  "--tls-min-proto-version=TLSv1.3", "--log-level=INFO"]


@pytest.mark.peers
class NghttpxLoadBalancerTests(HopTestBase):
    """hbone client -> nghttpx (reverse proxy, terminates TLS, backend h2c with
    prior knowledge) -> hbone h2c listener -> echo, with a bearer JWT-SVID end to
    end (``hbone://…?tls=server&token=@FILE``)."""

    def setUp(self) -> None:
        (self.nghttpx,) = requirePeer("nghttpx")
        super().setUp()
        self.h2cPort = self.startH2c()
        (front,) = pickFreePorts(1)
        self.front = front
        self.proc = PeerProcess(
            [self.nghttpx, *NGHTTPX_COMMON, f"--frontend=127.0.0.1,{front}",
             f"--backend=127.0.0.1,{self.h2cPort};;proto=h2", self.lb.keyFile, self.lb.certFile],
            front, self.base / "nghttpx.log",
        )
        self.addCleanup(self.proc.stop)

    def hop(self, method: str, **kw) -> HBoneHop:
        kw.setdefault("token", self.tokenFile())
        return HBoneHop("127.0.0.1", self.front, method=method, tls="server", caFile=str(self.lb.caFile), **kw)

    def test_postThroughNghttpx(self):
        """The POST form (PROTOCOL §5, what an L7 load balancer passes) carries
        hash-equal bytes both ways; the h2c listener authorized the token's sub."""

        async def run():
            pool = self.pool()
            await self.roundTrip(pool, self.hop("post"), 4 * MiB)
            self.assertEqual([str(r.peerIdentity) for r in self.dialer.requests], [CLIENT_ID])

        return defer.Deferred.fromCoroutine(run())

    def test_postHalfCloseThroughNghttpx(self):
        """The client's END_STREAM crosses nghttpx as the echo server's EOF, and the
        echo's FIN comes back as a clean end: half-close survives this load
        balancer (PROTOCOL §5 "Half-close")."""

        async def run():
            payload = os.urandom(1 * MiB)
            endpoint = HBoneClientEndpoint(self.pool(), self.hop("post"), f"127.0.0.1:{self.echoPort}")
            client = await endpoint.connect(protocol.Factory.forProtocol(lambda: HalfCloseClient(payload)))
            received, reason = await client.done
            self.assertEqual(hashlib.sha256(received).hexdigest(), hashlib.sha256(payload).hexdigest())
            self.assertTrue(reason.check(ConnectionDone), reason)
            await self.echo.tracker.whenAllClosed()
            self.assertEqual(self.echo.eofs, 1, self.proc.log()[-2000:])

        return defer.Deferred.fromCoroutine(run())

    def test_connectThroughNghttpx(self):
        """nghttpx's reverse-proxy mode forwards an RFC 9113 CONNECT to an h2
        backend: the tunnel arrives authenticated by the token (whose aud is
        https://127.0.0.1, the default audience for :authority 127.0.0.1:port) and
        carries hash-equal bytes. A listener behind a load balancer should set
        ?audience=, since a CONNECT's :authority is the target."""

        async def run():
            pool = self.pool()
            await self.roundTrip(pool, self.hop("connect"), 4 * MiB)
            self.assertEqual([str(r.peerIdentity) for r in self.dialer.requests], [CLIENT_ID])

        return defer.Deferred.fromCoroutine(run())

    def test_missingTokenRefusedThroughNghttpx(self):
        """Without a token the h2c listener's 401 comes back through nghttpx."""

        async def run():
            pool = self.pool()
            hop = HBoneHop("127.0.0.1", self.front, method="post", tls="server", caFile=str(self.lb.caFile))
            with self.assertRaises(TunnelRefused) as info:
                await self.roundTrip(pool, hop)
            self.assertEqual(info.exception.status, 401, self.proc.log()[-2000:])
            self.assertEqual(self.dialer.requests, [])

        return defer.Deferred.fromCoroutine(run())


@pytest.mark.peers
class Http2ProxyTests(HopTestBase):
    """The ``http2://`` hop: HBoneHop(tls="server", method="connect") toward
    ``nghttpx --http2-proxy`` with ordinary server-auth TLS (no client
    certificate, no SPIFFE ID anywhere), tinyproxy as nghttpx's backend."""

    def setUp(self) -> None:
        self.nghttpx, self.tinyproxy = requirePeer("nghttpx", "tinyproxy")
        super().setUp()
        proxyPort, self.front = pickFreePorts(2)
        conf = self.base / "tinyproxy.conf"
        conf.write_text(
            f"Port {proxyPort}\nListen 127.0.0.1\nAllow 127.0.0.1\nConnectPort {self.echoPort}\n"
            "MaxClients 16\nLogLevel Info\nBasicAuth hbone s3cret\n"
        )
        self.tinyproxyProcess = PeerProcess([self.tinyproxy, "-d", "-c", conf], proxyPort,
                                            self.base / "tinyproxy.log")
        self.addCleanup(self.tinyproxyProcess.stop)
        self.proc = PeerProcess(
            [self.nghttpx, *NGHTTPX_COMMON, "--http2-proxy", f"--frontend=127.0.0.1,{self.front}",
             f"--backend=127.0.0.1,{proxyPort}", self.lb.keyFile, self.lb.certFile],
            self.front, self.base / "nghttpx.log",
        )
        self.addCleanup(self.proc.stop)

    def logs(self) -> str:
        return f"\n--- nghttpx ---\n{self.proc.log()[-3000:]}\n--- tinyproxy ---\n{self.tinyproxyProcess.log()[-2000:]}"

    def hop(self, **kw) -> HBoneHop:
        kw.setdefault("basicAuth", ("hbone", "s3cret"))
        kw.setdefault("caFile", str(self.lb.caFile))
        return HBoneHop("127.0.0.1", self.front, tls="server", **kw)

    def test_http2HopThroughNghttpx(self):
        """Hash-equal bytes both ways, twice on one pooled connection; the peer is
        the verified IP, and proxy-authorization reached tinyproxy."""

        async def run():
            pool = self.pool()
            hop = self.hop()
            await self.roundTrip(pool, hop, 4 * MiB)
            await self.roundTrip(pool, hop, 64 * 1024)
            self.assertEqual(pool.connectionsOpened, 1)
            self.assertEqual(self.echo.tracker.opened, 2)
            (conn,) = pool.connections(hop)
            self.assertEqual(conn.peerIdentity, ServerName("127.0.0.1"))
            self.assertNotIn("s3cret", self.logText())

        return defer.Deferred.fromCoroutine(run())

    def test_dnsNameThroughNghttpx(self):
        async def run():
            await self.roundTrip(self.pool(), self.hop(serverName="lb.test"))

        return defer.Deferred.fromCoroutine(run())

    def test_wrongPasswordRefused(self):
        """tinyproxy's 407 to a bad password comes back as a refusal (not 200)."""

        async def run():
            with self.assertRaises(TunnelRefused) as info:
                await self.roundTrip(self.pool(), self.hop(basicAuth=("hbone", "wrong")))
            self.assertNotEqual(info.exception.status, 200, self.logs())
            self.assertEqual(self.echo.tracker.opened, 0)

        return defer.Deferred.fromCoroutine(run())

    def test_wrongNameRefused(self):
        async def run():
            with self.assertRaises(HopIdentityError) as info:
                await self.roundTrip(self.pool(), self.hop(serverName="proxy.example"))
            self.assertIn("not valid for proxy.example", str(info.exception))
            self.assertEqual(self.echo.tracker.opened, 0)

        return defer.Deferred.fromCoroutine(run())
