"""The ``h2c`` listener: HBONE over cleartext HTTP/2 behind a TLS-terminating load
balancer, authenticated by bearer JWT-SVIDs (PROTOCOL §2, SECURITY §4.2, §4.3, S29).

Real reactor, real sockets on 127.0.0.1. The S29 cases use a raw ``h2`` client so
the exact response headers are asserted; the end-to-end cases use hbone's own
client (an ``h2c`` hop with ``token=@FILE``). Every test closes its connections
and waits for every socket to close.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from hbone.dialer import DirectDialer
from hbone.errors import TunnelRefused
from hbone.h2.client import HBoneClientEndpoint, HBoneHop, Pool
from hbone.h2.server import (
    H2cAuthenticator,
    TunnelServer,
    checkH2cSafety,
    h2cServerFactory,
    hboneServerFactory,
)
from hbone.identity import IdentityPattern, SpiffeId
from hbone.interfaces import IDialer
from hbone.jwt import JWKSVerifier, jwksDocument, mintJWTSVID
from hbone.policy import DestinationPolicy, PeerAuthorizer, ReactorResolver, parseAllowEntry
from hbone.splice import TunnelTracker
from tests import pki
from tests.test_interop import EchoFactory, RoundTrip, TrackingFactory

SERVER_ID = pki.SERVER_ID
CLIENT_ID = pki.CLIENT_ID
OTHER_NS_ID = f"spiffe://{pki.TD}/ns/other/sa/client"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@implementer(IDialer)
class RecordingDialer:
    """A DirectDialer that remembers every request (and so the peer identity the
    server authorized)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.requests: list = []

    def dial(self, request):
        self.requests.append(request)
        return self.inner.dial(request)


class LogCapture:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event) -> None:
        self.events.append(event)

    def text(self) -> str:
        """Every event, formatted and as its raw dict (all fields, formatted or not)."""
        out = []
        for event in self.events:
            out.append(formatEvent(event) or "")
            out.append(repr(event))
        return "\n".join(out)


class RawH2cClient(protocol.Protocol):
    """A plain ``h2`` client over TCP (prior knowledge), for asserting the exact
    response of each request."""

    def __init__(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.responses: dict[int, defer.Deferred] = {}
        self.ends: dict[int, defer.Deferred] = {}
        self.data: dict[int, bytes] = {}
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def request(self, headers, endStream: bool = False) -> tuple[int, defer.Deferred]:
        sid = self.h2.get_next_available_stream_id()
        self.responses[sid] = defer.Deferred()
        self.ends[sid] = defer.Deferred()
        self.data[sid] = b""
        self.h2.send_headers(sid, headers, end_stream=endStream)
        self.flush()
        return sid, self.responses[sid]

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.h2.send_data(sid, data, end_stream=end)
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            sid = getattr(event, "stream_id", 0)
            if isinstance(event, ResponseReceived):
                self.responses[sid].callback(dict(event.headers))
            elif isinstance(event, DataReceived):
                self.data[sid] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, (StreamEnded, StreamReset)):
                d = self.ends.get(sid)
                if d is not None and not d.called:
                    d.callback(type(event).__name__)
        self.flush()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class H2cTestBase(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hbone-h2c-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.log = LogCapture()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwks = self.base / "jwks.json"
        self.jwks.write_text(json.dumps(jwksDocument({pki.TD: [("k1", self.key.public_key())]})))
        self.echo = EchoFactory()
        self.echoPort = self.listen(self.echo)
        self.addCleanup(self.echo.tracker.whenAllClosed)

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def token(self, sub: str = CLIENT_ID, aud: str = "https://127.0.0.1", ttl: float = 300,
              key=None, kid: str = "k1", now: float | None = None) -> str:
        return mintJWTSVID(key or self.key, kid, sub, aud, ttl, now=now)

    def tokenFile(self, token: str, name: str = "token") -> str:
        path = self.base / name
        path.write_text(token + "\n")
        return str(path)

    def startH2c(self, verifier="jwks", insecure: bool = False, audience: str | None = None):
        """An h2c listener allowing only the echo target; returns (port, dialer, tracking)."""
        if verifier == "jwks":
            verifier = JWKSVerifier(self.jwks, audience, reactor)
        policy = DestinationPolicy([parseAllowEntry(f"127.0.0.1:{self.echoPort}")])
        tracker = TunnelTracker(reactor)
        self.addCleanup(tracker.stop)
        dialer = RecordingDialer(DirectDialer(reactor, policy, ReactorResolver(reactor)))
        server = TunnelServer(reactor, dialer, PeerAuthorizer(SpiffeId.parse(SERVER_ID)), tracker)
        factory = TrackingFactory(h2cServerFactory(reactor, server, verifier=verifier, insecure=insecure))
        port = self.listen(factory)
        self.addCleanup(factory.tracker.whenAllClosed)
        return port, dialer, factory

    async def rawClient(self, port: int) -> RawH2cClient:
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            protocol.Factory.forProtocol(RawH2cClient)
        )

        def close():
            if client.transport.connected:
                client.transport.loseConnection()
            return client.lost

        self.addCleanup(close)
        return client

    def connect(self, token: str | None, authority: str | None = None) -> list:
        headers = [(b":method", b"CONNECT"),
                   (b":authority", (authority or f"127.0.0.1:{self.echoPort}").encode())]
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        return headers

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
        self.assertEqual(hashlib.sha256(echoed).hexdigest(), hashlib.sha256(payload).hexdigest())


class S29Tests(H2cTestBase):
    """S29: no token; expired; wrong aud; alg none; HS256 signed with the public
    key; unknown kid -> 401 + www-authenticate: Bearer; a valid one -> 200; no
    authorization value in the logs."""

    def forgedTokens(self) -> dict[str, str]:
        now = time.time()
        claims = {"sub": CLIENT_ID, "aud": "https://127.0.0.1", "exp": int(now) + 300}

        def handMade(header, sign):
            signingInput = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
            return f"{signingInput}.{b64(sign(signingInput.encode()))}"

        pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {
            "expired": self.token(now=now - 3600, ttl=60),
            "wrong aud": self.token(aud="https://lb.elsewhere"),
            "alg none": handMade({"alg": "none", "kid": "k1", "typ": "JWT"}, lambda data: b""),
            "HS256 with the public key": handMade(
                {"alg": "HS256", "kid": "k1"}, lambda data: hmac.new(pem, data, hashlib.sha256).digest()
            ),
            "unknown kid": self.token(kid="k2"),
        }

    def test_s29(self):
        async def run():
            port, dialer, _ = self.startH2c()
            client = await self.rawClient(port)
            tokens = self.forgedTokens()
            cases = [("no token", None), *tokens.items()]
            for name, token in cases:
                sid, response = client.request(self.connect(token))
                headers = await response
                self.assertEqual(headers[b":status"], b"401", name)
                self.assertEqual(headers[b"www-authenticate"], b"Bearer", name)
                self.assertEqual(headers[b"proxy-status"], b"hbone; error=http_request_denied", name)
                await client.ends[sid]
            self.assertEqual(dialer.requests, [], "a refused request was dialed")
            self.assertEqual(self.echo.tracker.opened, 0)

            valid = self.token()
            sid, response = client.request(self.connect(valid))
            headers = await response
            self.assertEqual(headers[b":status"], b"200")
            client.send(sid, b"ping through h2c", end=True)
            self.assertEqual(await client.ends[sid], "StreamEnded")
            self.assertEqual(client.data[sid], b"ping through h2c")
            (request,) = dialer.requests
            self.assertEqual(request.peerIdentity, SpiffeId.parse(CLIENT_ID))

            logs = self.log.text()
            self.assertIn("bearer token refused", logs)
            for token in [valid, *tokens.values()]:
                for part in token.split("."):
                    if len(part) > 8:
                        self.assertNotIn(part, logs)
            self.assertNotIn("Bearer ey", logs)
            self.assertNotIn("authorization': b", logs)

        return defer.Deferred.fromCoroutine(run())

    def test_postFormNeedsTokenToo(self):
        """The POST form is authenticated the same way; 401 comes before the
        request is even parsed (a bad path without a token is 401, not 400)."""

        async def run():
            port, dialer, _ = self.startH2c()
            client = await self.rawClient(port)
            post = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:80"),
                    (b":path", f"/_hbone/127.0.0.1:{self.echoPort}".encode())]
            sid, response = client.request(post)
            self.assertEqual((await response)[b":status"], b"401")
            bad = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x:1"), (b":path", b"/")]
            sid, response = client.request(bad, endStream=True)
            self.assertEqual((await response)[b":status"], b"401")
            sid, response = client.request(bad + [(b"authorization", f"Bearer {self.token(aud='https://x')}".encode())],
                                           endStream=True)
            self.assertEqual((await response)[b":status"], b"400")
            sid, response = client.request(post + [(b"authorization", f"Bearer {self.token()}".encode())])
            headers = await response
            self.assertEqual(headers[b":status"], b"200")
            self.assertEqual(headers[b"content-type"], b"application/octet-stream")
            client.send(sid, b"posted", end=True)
            await client.ends[sid]
            self.assertEqual(client.data[sid], b"posted")
            self.assertEqual(len(dialer.requests), 1)

        return defer.Deferred.fromCoroutine(run())

    def test_subIsThePeerForAuthorization(self):
        """A valid token's sub is authorized like a certificate's ID: another
        namespace than the server's gets 403, and nothing is dialed."""

        async def run():
            port, dialer, _ = self.startH2c()
            client = await self.rawClient(port)
            sid, response = client.request(self.connect(self.token(sub=OTHER_NS_ID)))
            headers = await response
            self.assertEqual(headers[b":status"], b"403")
            self.assertNotIn(b"www-authenticate", headers)
            self.assertEqual(dialer.requests, [])

        return defer.Deferred.fromCoroutine(run())

    def test_configuredAudience(self):
        """?audience=AUD replaces the https://<:authority host> default."""

        async def run():
            port, dialer, _ = self.startH2c(audience="https://lb.example")
            client = await self.rawClient(port)
            sid, response = client.request(self.connect(self.token()))
            self.assertEqual((await response)[b":status"], b"401")
            sid, response = client.request(self.connect(self.token(aud="https://lb.example")))
            self.assertEqual((await response)[b":status"], b"200")
            client.send(sid, b"", end=True)
            await client.ends[sid]

        return defer.Deferred.fromCoroutine(run())

    def test_h2cHopWithToken(self):
        """hbone's own h2c hop (tls=none, token=@FILE, no identity at all) carries
        hash-equal bytes with CONNECT and with the POST form; the hop without a
        token gets TunnelRefused(401)."""

        async def run():
            port, dialer, _ = self.startH2c()
            pool = self.pool()
            tokenFile = self.tokenFile(self.token())
            await self.roundTrip(pool, HBoneHop("127.0.0.1", port, tls="none", token=tokenFile))
            await self.roundTrip(pool, HBoneHop("127.0.0.1", port, method="post", tls="none", token=tokenFile))
            self.assertEqual(pool.connectionsOpened, 1)  # same hop, same token: one connection
            self.assertEqual([r.peerIdentity for r in dialer.requests], [SpiffeId.parse(CLIENT_ID)] * 2)
            with self.assertRaises(TunnelRefused) as info:
                await self.roundTrip(pool, HBoneHop("127.0.0.1", port, tls="none"))
            self.assertEqual(info.exception.status, 401)
            self.assertEqual(info.exception.proxyError, "http_request_denied")
            self.assertEqual(len(dialer.requests), 2)

        return defer.Deferred.fromCoroutine(run())

    def test_tokenFileReadPerTunnel(self):
        """The token file is read for each tunnel: a rewritten (rotated) token is
        used by the next tunnel on the same pooled connection; a missing file fails
        the tunnel naming the file, without connecting."""

        async def run():
            port, dialer, _ = self.startH2c()
            pool = self.pool()
            tokenFile = self.tokenFile(self.token(aud="https://wrong"))
            hop = HBoneHop("127.0.0.1", port, tls="none", token=tokenFile)
            with self.assertRaises(TunnelRefused):
                await self.roundTrip(pool, hop)
            self.tokenFile(self.token())
            await self.roundTrip(pool, hop)
            self.assertEqual(pool.connectionsOpened, 1)
            from hbone.h2.client import TokenFileError

            missing = HBoneHop("127.0.0.1", port, tls="none", token=str(self.base / "missing"))
            with self.assertRaises(TokenFileError) as info:
                await self.roundTrip(pool, missing)
            self.assertIn(str(self.base / "missing"), str(info.exception))
            self.assertEqual(pool.connections(missing), [])
            Path(tokenFile).write_text("not a jwt")
            with self.assertRaises(TokenFileError) as info:
                await self.roundTrip(pool, hop)
            self.assertNotIn("not a jwt", str(info.exception))

        return defer.Deferred.fromCoroutine(run())

    def test_poolKeySeparatesTokens(self):
        """Hops that differ only in their token file do not share a connection
        (PROTOCOL §3 pooling: token-carrying hops key on it)."""

        async def run():
            port, dialer, _ = self.startH2c()
            pool = self.pool()
            a = HBoneHop("127.0.0.1", port, tls="none", token=self.tokenFile(self.token(), "a"))
            b = HBoneHop("127.0.0.1", port, tls="none", token=self.tokenFile(self.token(), "b"))
            await self.roundTrip(pool, a)
            await self.roundTrip(pool, b)
            self.assertEqual(pool.connectionsOpened, 2)
            self.assertEqual(len(pool.connections(a)), 1)
            self.assertEqual(len(pool.connections(b)), 1)
            self.assertIsNot(pool.connections(a)[0], pool.connections(b)[0])

        return defer.Deferred.fromCoroutine(run())


class InsecureTests(H2cTestBase):
    """``?insecure=1``: loopback only, anonymous, with a warning at start."""

    def test_insecureServesAnonymously(self):
        """Without a verifier, requests are served (an authorization header, even
        garbage, is ignored) with no peer identity; the start logs a warning."""

        async def run():
            port, dialer, _ = self.startH2c(verifier=None, insecure=True)
            self.assertIn("WITHOUT bearer-token authentication", self.log.text())
            pool = self.pool()
            await self.roundTrip(pool, HBoneHop("127.0.0.1", port, tls="none"))
            client = await self.rawClient(port)
            sid, response = client.request(self.connect("garbage"))
            self.assertEqual((await response)[b":status"], b"200")
            client.send(sid, b"", end=True)
            await client.ends[sid]
            self.assertEqual([r.peerIdentity for r in dialer.requests], [None, None])

        return defer.Deferred.fromCoroutine(run())

    def test_noWarningWithVerifier(self):
        self.startH2c()
        self.assertNotIn("WITHOUT bearer-token", self.log.text())

    def test_authenticatorRefusesNoVerifierUnlessInsecure(self):
        with self.assertRaises(ValueError):
            H2cAuthenticator(object(), None, insecure=False)
        with self.assertRaises(ValueError):
            h2cServerFactory(reactor, object(), verifier=None, insecure=False)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_insecureOnLoopback(host: str) -> None:
    checkH2cSafety(host, None, True)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.1", "lb.example"])
def test_insecureRefusedOffLoopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback address only") as info:
        checkH2cSafety(host, None, True)
    assert host in str(info.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_noVerifierNoInsecure(host: str) -> None:
    with pytest.raises(ValueError, match=r"\?jwks=FILE"):
        checkH2cSafety(host, None, False)


def test_verifierAnywhere() -> None:
    checkH2cSafety("0.0.0.0", object(), False)
    with pytest.raises(ValueError, match="contradict"):
        checkH2cSafety("127.0.0.1", object(), True)


class MTLSIgnoresAuthorizationTests(H2cTestBase):
    """On an mTLS listener the authorization header is ignored: it never overrides
    the certificate, and a garbage one does not fail the request."""

    def test_certificateWins(self):
        async def run():
            policy = DestinationPolicy([parseAllowEntry(f"127.0.0.1:{self.echoPort}")])
            tracker = TunnelTracker(reactor)
            self.addCleanup(tracker.stop)
            dialer = RecordingDialer(DirectDialer(reactor, policy, ReactorResolver(reactor)))
            identity = pki.serverIdentity()
            server = TunnelServer(reactor, dialer, PeerAuthorizer(identity.localId), tracker)
            factory = TrackingFactory(hboneServerFactory(reactor, identity, server))
            port = self.listen(factory)
            self.addCleanup(factory.tracker.whenAllClosed)
            pool = self.pool(pki.clientIdentity())
            hop = HBoneHop("127.0.0.1", port, (IdentityPattern.parse(SERVER_ID),))
            admin = self.token(sub=f"spiffe://{pki.TD}/ns/default/sa/admin")
            for value in (f"Bearer {admin}", "Bearer garbage", "Basic dXNlcjpwYXNz"):
                endpoint = _ExtraHeaders(pool, hop, f"127.0.0.1:{self.echoPort}",
                                         [(b"authorization", value.encode())])
                payload = os.urandom(1024)
                proto = await endpoint.connect(protocol.Factory.forProtocol(lambda: RoundTrip(payload)))
                self.assertEqual(await proto.echoed, payload)
                await proto.lost
            self.assertEqual([str(r.peerIdentity) for r in dialer.requests], [CLIENT_ID] * 3)

        return defer.Deferred.fromCoroutine(run())


class _ExtraHeaders(HBoneClientEndpoint):
    """hbone's client endpoint with extra request headers (what a misconfigured or
    hostile client might send on 15008)."""

    def __init__(self, pool, hop, target, extra) -> None:
        super().__init__(pool, hop, target)
        self.extra = extra

    def _headers(self, token=None):
        return super()._headers(token) + self.extra
