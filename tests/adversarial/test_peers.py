"""SECURITY §5.3, S26, S27, S30: identities, TLS versions and ALPN, and who may
say where a tunnel came from. (S22-S25 are in tests/test_integration.py.)"""

from __future__ import annotations

import ssl

from twisted.internet import reactor

from hbone.dialer import HBoneDialer
from hbone.h2.client import HBoneHop, Pool
from hbone.identity import IdentityPattern
from tests import pki
from tests.adversarial.attacker import Attacker, connectHeaders
from tests.adversarial.support import AdversarialCase, CountingDialer, asyncTest

OTHER_NS = "spiffe://cluster.local/ns/other/sa/a"


class PeerTests(AdversarialCase):
    # -- S26 -----------------------------------------------------------------------

    @asyncTest
    async def test_S26_per_identity_403(self) -> None:
        """S26: identity A (another namespace, not allowed by default) gets ``403
        http_request_denied`` on each stream, and its connection stays up; B, on
        the same listener, gets its tunnel. The denial is logged with A's ID.
        (The policy-reload half of S26 is not applicable yet: no reload.)"""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def asA():
            with Attacker(server.portNumber, pki.identity(OTHER_NS)) as a:
                a.connect().preface()
                first = a.openTunnel(1, target.authority)
                second = a.openTunnel(3, target.authority)
                return first, second, a.goaways(), a.closed

        def asB():
            with Attacker(server.portNumber, pki.clientIdentity()) as b:
                b.connect().preface()
                return b.openTunnel(1, target.authority).status, b.echo(1, b"B is allowed")

        first, second, goaways, closed = await self.attack(asA)
        for r in (first, second):
            self.assertEqual(r.status, 403)
            self.assertEqual(r.header(b"proxy-status"), b"hbone; error=http_request_denied")
        self.assertEqual((goaways, closed), ([], None))
        self.assertEqual(await self.attack(asB), (200, b"B is allowed"))
        self.assertEqual(target.accepted, 1)
        self.assertEqual(len(self.log.find("403", OTHER_NS)), 1)  # the second is rate-limited

    # -- S27 -----------------------------------------------------------------------

    async def _handshakeRefused(self, **attackerOptions) -> str:
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity(), **attackerOptions) as a:
                try:
                    a.connect()
                except ssl.SSLError as e:  # the alert, by name (with or without a reason code)
                    return (e.reason or str(e)).upper().replace(" ", "_")
                return f"handshake completed: {a.negotiated!r}"

        reason = await self.attack(attack)
        self.assertEqual(server.tunnels.streams, [])
        return reason

    @asyncTest
    async def test_S27_tls12_only_client(self) -> None:
        """S27: a TLS 1.2-only client: alert 70 (protocol_version)."""
        reason = await self._handshakeRefused(tlsVersions=(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2))
        self.assertIn("ALERT_PROTOCOL_VERSION", reason)  # alert 70

    @asyncTest
    async def test_S27_http11_only_alpn(self) -> None:
        """S27: TLS 1.3 offering only ``http/1.1``: alert 120 (no_application_protocol)."""
        reason = await self._handshakeRefused(alpn=("http/1.1",))
        self.assertIn("ALERT_NO_APPLICATION_PROTOCOL", reason)  # alert 120

    @asyncTest
    async def test_S27_h2r_offered_to_the_hbone_port(self) -> None:
        """S27: ``h2r`` offered to the HBONE listener: alert 120."""
        reason = await self._handshakeRefused(alpn=("h2r",))
        self.assertIn("ALERT_NO_APPLICATION_PROTOCOL", reason)  # alert 120

    @asyncTest
    async def test_S27_no_alpn(self) -> None:
        """S27: no ALPN at all: OpenSSL completes the handshake (no selection
        callback runs), and hbone closes before any application byte: the
        client's HTTP/2 preface and CONNECT are never parsed."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity(), alpn=()) as a:
                a.connect()
                a.preface()
                a.send(a.headers(1, connectHeaders(target.authority)))
                a.readUntilClosed()
                return a.negotiated, a.frames, a.closed

        negotiated, frames, closed = await self.attack(attack)
        self.assertEqual((negotiated, frames), (None, []))
        self.assertTrue(closed)
        self.assertEqual(server.tunnels.streams, [])
        self.assertEqual(target.accepted, 0)
        self.assertFalse(server.connection(0).h2Started)

    # -- S30 -----------------------------------------------------------------------

    def _forwardingServer(self, target, trusted: bool):
        patterns = (IdentityPattern.parse(pki.CLIENT_ID),) if trusted else ()
        dialer = CountingDialer(self.directDialer(target))
        return self.server(dialer=dialer, trustedForwarders=patterns)

    async def _sourceSeen(self, server, target, forwarded: bytes):
        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                a.send(a.headers(1, connectHeaders(target.authority, (b"forwarded", forwarded))))
                return a.response(1).status, a.sock.getsockname()[1]

        status, port = await self.attack(attack)
        return status, port, server.dialer.requests[-1].source

    @asyncTest
    async def test_S30_forwarded_from_an_untrusted_peer_is_ignored(self) -> None:
        """S30: ``forwarded: for=10.9.9.9`` from a peer that is not a trusted
        forwarder: ignored; the tunnel's source is the peer's own address."""
        target = self.target()
        server = self._forwardingServer(target, trusted=False)
        status, port, source = await self._sourceSeen(server, target, b'for="10.9.9.9:1234"')
        self.assertEqual((status, source), (200, ("127.0.0.1", port)))

    @asyncTest
    async def test_S30_forwarded_from_a_trusted_forwarder_is_used(self) -> None:
        """S30: the same header from a trusted forwarder is the tunnel's source."""
        target = self.target()
        server = self._forwardingServer(target, trusted=True)
        status, port, source = await self._sourceSeen(server, target, b'for="10.9.9.9:1234"')
        self.assertEqual((status, source), (200, ("10.9.9.9", 1234)))

    @asyncTest
    async def test_S30_malformed_forwarded_is_ignored(self) -> None:
        """S30: a 4 KB malformed ``forwarded`` from a trusted forwarder: ignored
        (never rejected); the stream succeeds with the peer's own address."""
        target = self.target()
        server = self._forwardingServer(target, trusted=True)
        junk = b"for=" + b'"\\' * 2048
        status, port, source = await self._sourceSeen(server, target, junk[:4096])
        self.assertEqual((status, source), (200, ("127.0.0.1", port)))

    @asyncTest
    async def test_S30_relay_emits_one_element(self) -> None:
        """S30: a relay emits one ``forwarded`` element to its next hop: the
        peer's own address for an untrusted peer, the incoming ``for=`` for a
        trusted one."""
        target = self.target()
        far = self.server(dialer=CountingDialer(self.directDialer(target)))
        pool = Pool(reactor, pki.serverIdentity())
        self.addCleanup(pool.closeAll)
        hop = HBoneHop("127.0.0.1", far.portNumber, (IdentityPattern.parse(pki.SERVER_ID),), "connect")
        seen = []
        for trusted in (False, True):
            patterns = (IdentityPattern.parse(pki.CLIENT_ID),) if trusted else ()
            relay = self.server(dialer=HBoneDialer(pool, hop), trustedForwarders=patterns)

            def attack(relay=relay):
                with Attacker(relay.portNumber, pki.clientIdentity()) as a:
                    a.connect().preface()
                    headers = connectHeaders(target.authority, (b"forwarded", b'for="10.9.9.9:1234"'))
                    a.send(a.headers(1, headers))
                    return a.response(1).status, a.sock.getsockname()[1]

            status, port = await self.attack(attack)
            self.assertEqual(status, 200)
            forwarded = [v for n, v in far.tunnels.headers[-1] if n == b"forwarded"]
            seen.append((forwarded, port))
        (untrusted, port), (trusted, _) = seen
        self.assertEqual(untrusted, [f'for="127.0.0.1:{port}"'.encode()])
        self.assertEqual(trusted, [b'for="10.9.9.9:1234"'])
