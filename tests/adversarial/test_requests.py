"""SECURITY §5.2, S13-S15, S17, S18, S20, S21: CONNECT and POST semantics against
real TCP upstreams, driven by a raw-frame client over real mTLS.

Semantic rejections stay per stream (``400``/``403`` with ``proxy-status``), so
every case that expects one also checks that the connection still carries a
tunnel afterwards. "No dial" is asserted twice: the dialer was never asked, and
the target never accepted.
"""

from __future__ import annotations

import socket
import struct

from h2.errors import ErrorCodes
from twisted.internet import reactor

from hbone.dialer import HBoneDialer
from hbone.h2.client import HBoneHop, Pool
from hbone.identity import IdentityPattern
from tests import pki
from tests.adversarial.attacker import Attacker, connectHeaders, dataFrame, postHeaders, rstFrame
from tests.adversarial.support import AdversarialCase, GatedDialer, asyncTest

#: S14: every one is 400 http_request_error at parse time, never dialed.
BAD_AUTHORITIES = [
    "10.0.0.1",
    "h:0",
    "h:65536",
    "[::1",
    "a b:80",
    "a" * 300 + ":80",
    "%31.2.3.4:80",
    "127.1:80",
    "0x7f.0.0.1:80",
    "h.:80",
    "[fe80::1%25eth0]:80",
    "u@h:80",
]


def canonicalPath(authority: str) -> str:
    """The POST form of ``authority``, decoding (once) back to exactly it."""
    out = authority.replace("%", "%25").replace(" ", "%20").replace("[", "%5B").replace("]", "%5D")
    return "/_hbone/" + out


class RequestTests(AdversarialCase):
    def connection(self, server, fn):
        """Run ``fn(attacker)`` on a fresh connection, in a thread."""

        def run():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                return fn(a)

        return self.attack(run)

    def assertRefused(self, response, status: int, error: str) -> None:
        self.assertEqual(response.status, status, response.headers)
        self.assertEqual(response.header(b"proxy-status"), f"hbone; error={error}".encode())
        self.assertTrue(response.ended, "no END_STREAM")

    # -- S13 -----------------------------------------------------------------------

    @asyncTest
    async def test_S13_malformed_connect_is_a_connection_error(self) -> None:
        """S13: CONNECT with ``:path``, with ``:scheme``, without ``:authority``,
        with ``connection: keep-alive``: GOAWAY(PROTOCOL_ERROR) (h2's checks);
        nothing dialed. That h2 >= 4.4.1 accepts a plain RFC 9113 CONNECT is
        pinned in tests/test_h2_internals.py (test_h2_version_floor,
        test_rfc9113_connect_accepted)."""
        target = self.target()
        server = self.server(allow=[target.portNumber])
        cases = [
            connectHeaders(target.authority, (b":path", b"/")),
            connectHeaders(target.authority, (b":scheme", b"https")),
            [(b":method", b"CONNECT")],
            connectHeaders(target.authority, (b"connection", b"keep-alive")),
        ]
        for headers in cases:

            def attack(a, headers=headers):
                a.send(a.headers(1, headers))
                goaway = a.readUntilGoAway()
                a.readUntilClosed()
                return goaway.error_code

            self.assertEqual(await self.connection(server, attack), ErrorCodes.PROTOCOL_ERROR, headers)
        self.assertEqual(server.tunnels.streams, [])
        self.assertEqual(target.accepted, 0)
        await self.assertCanary(server, target)

    # -- S14 -----------------------------------------------------------------------

    @asyncTest
    async def test_S14_bad_authorities_are_400_per_stream(self) -> None:
        """S14: twelve malformed ``:authority`` values, one stream each on one
        connection: ``400`` + END_STREAM with ``http_request_error``; nothing
        dialed; then a good CONNECT on the same connection echoes."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack(a):
            responses = []
            for i, authority in enumerate(BAD_AUTHORITIES):
                a.send(a.headers(2 * i + 1, connectHeaders(authority)))
                responses.append(a.response(2 * i + 1))
            sid = 2 * len(BAD_AUTHORITIES) + 1
            good = a.openTunnel(sid, target.authority)
            return responses, good.status, a.echo(sid, b"usable"), a.goaways()

        responses, status, echoed, goaways = await self.connection(server, attack)
        for authority, response in zip(BAD_AUTHORITIES, responses):
            with self.subTest(authority=authority[:40]):
                self.assertRefused(response, 400, "http_request_error")
        self.assertEqual((status, echoed, goaways), (200, b"usable", []))
        self.assertEqual(len(server.dialer.requests), 1)
        self.assertEqual(target.accepted, 1)

    # -- S15 -----------------------------------------------------------------------

    @asyncTest
    async def test_S15_other_methods_and_forms_are_400(self) -> None:
        """S15: GET and POST to a non-``/_hbone/`` path, ``GET /_hbone/h:1``, and
        CONNECT with ``content-length``: ``400`` on that stream only."""
        target = self.target()
        server = self.server(allow=[target.portNumber])
        cases = [
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")],
            postHeaders("/upload"),
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/_hbone/h:1")],
            connectHeaders(target.authority, (b"content-length", b"0")),
        ]

        def attack(a):
            responses = []
            for i, headers in enumerate(cases):
                a.send(a.headers(2 * i + 1, headers))
                responses.append(a.response(2 * i + 1))
            good = a.openTunnel(99, target.authority)
            return responses, good.status, a.goaways()

        responses, status, goaways = await self.connection(server, attack)
        for response in responses:
            self.assertRefused(response, 400, "http_request_error")
        self.assertEqual((status, goaways), (200, []))
        self.assertEqual(target.accepted, 1)

    @asyncTest
    async def test_S15_protocol_pseudo_header(self) -> None:
        """S15: ``:protocol`` (RFC 8441). PROTOCOL §4 answers it with ``400``, but
        h2 refuses it first, since hbone never sends ENABLE_CONNECT_PROTOCOL:
        GOAWAY(PROTOCOL_ERROR), nothing dialed (pinned: the stricter answer)."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack(a):
            a.send(a.headers(1, connectHeaders(target.authority, (b":protocol", b"websocket"))))
            goaway = a.readUntilGoAway()
            a.readUntilClosed()
            return goaway.error_code

        self.assertEqual(await self.connection(server, attack), ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(target.accepted, 0)

    @asyncTest
    async def test_S15_trailers_on_an_open_tunnel(self) -> None:
        """S15: a trailers HEADERS on an open tunnel: RST_STREAM(PROTOCOL_ERROR)
        for that stream, an abortive upstream close; the connection lives on."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack(a):
            assert a.openTunnel(1, target.authority).status == 200
            assert a.echo(1, b"before") == b"before"
            a.send(a.headers(1, [(b"x-trailer", b"1")], end=True))
            a.read(lambda f: a.streams[1].reset is not None)
            good = a.openTunnel(3, target.authority)
            return a.streams[1].reset, good.status, a.echo(3, b"after")

        reset, status, echoed = await self.connection(server, attack)
        self.assertEqual(reset, ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual((status, echoed), (200, b"after"))
        first = target.conns[0]
        await first.lostD
        self.assertTrue(first.resetSeen)

    # -- S17, S18 --------------------------------------------------------------------

    @asyncTest
    async def test_S17_client_reset_mid_transfer(self) -> None:
        """S17: RST_STREAM(CANCEL) mid-transfer: the upstream sees a reset
        (abortive close), and nothing sent after the reset reaches it."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack(a):
            assert a.openTunnel(1, target.authority).status == 200
            a.echo(1, b"x" * 100_000)
            a.send(rstFrame(1, ErrorCodes.CANCEL), dataFrame(1, b"late" * 1000))
            good = a.openTunnel(3, target.authority)  # a round trip after the reset
            return good.status

        self.assertEqual(await self.connection(server, attack), 200)
        first = target.conns[0]
        await first.lostD
        self.assertTrue(first.resetSeen)
        self.assertEqual(len(first.received), 100_000)

    @asyncTest
    async def test_S18_upstream_reset_mid_transfer(self) -> None:
        """S18: the upstream sends a TCP RST mid-transfer: the client gets
        RST_STREAM(CONNECT_ERROR), never END_STREAM; the other tunnel on the
        connection keeps echoing."""
        target = self.target()
        server = self.server(allow=[target.portNumber])
        a = Attacker(server.portNumber, pki.clientIdentity())

        def phase1():
            a.connect().preface()
            for sid in (1, 3):
                assert a.openTunnel(sid, target.authority).status == 200
                assert a.echo(sid, b"x" * 50_000) == b"x" * 50_000

        def phase2():
            try:
                a.read(lambda f: a.streams[1].reset is not None)
                return a.streams[1].reset, a.streams[1].ended, a.echo(3, b"unaffected")
            finally:
                a.close()

        try:
            await self.attack(phase1)
            first = target.conns[0]
            first.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            first.transport.abortConnection()
            reset, ended, echoed = await self.attack(phase2)
        finally:
            a.close()
        self.assertEqual(reset, ErrorCodes.CONNECT_ERROR)
        self.assertFalse(ended)
        self.assertEqual(echoed, b"unaffected")

    # -- S20 -----------------------------------------------------------------------------

    @asyncTest
    async def test_S20_post_forms_of_the_s14_targets_are_400(self) -> None:
        """S20: each S14 target in the POST form (decoding once to exactly that
        target): the same ``400`` as the CONNECT."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack(a):
            out = []
            for i, authority in enumerate(BAD_AUTHORITIES):
                a.send(a.headers(2 * i + 1, postHeaders(canonicalPath(authority))))
                out.append(a.response(2 * i + 1))
            return out

        for authority, response in zip(BAD_AUTHORITIES, await self.connection(server, attack)):
            with self.subTest(authority=authority[:40]):
                self.assertRefused(response, 400, "http_request_error")
        self.assertEqual(server.dialer.requests, [])

    @asyncTest
    async def test_S20_post_path_matrix(self) -> None:
        """S20: IPv6 in brackets, encoded or raw, is the same target as the
        CONNECT (``[::1]``: 403 destination_ip_prohibited); a dot segment, a
        trailing ``/``, a query, double encoding, a bare port without a workload
        address, ``/_hbone/mtls``, and an ``x-tun`` header alone are ``400``."""
        target = self.target()
        server = self.server(allow=[target.portNumber])
        cases = [
            (postHeaders("/_hbone/%5B::1%5D:80"), 403, "destination_ip_prohibited"),
            (postHeaders("/_hbone/[::1]:80"), 403, "destination_ip_prohibited"),
            (connectHeaders("[::1]:80"), 403, "destination_ip_prohibited"),
            (postHeaders("/_hbone/a/../b:80"), 400, "http_request_error"),
            (postHeaders("/_hbone/h:80/"), 400, "http_request_error"),
            (postHeaders("/_hbone/h:80?x"), 400, "http_request_error"),
            (postHeaders("/_hbone/%255B::1%255D:80"), 400, "http_request_error"),
            (postHeaders(f"/_hbone/{target.portNumber}"), 400, "http_request_error"),
            (postHeaders("/_hbone/mtls"), 400, "http_request_error"),
            (postHeaders("/", "lb", (b"x-tun", target.authority.encode())), 400, "http_request_error"),
        ]

        def attack(a):
            out = []
            for i, (headers, _, _) in enumerate(cases):
                a.send(a.headers(2 * i + 1, headers))
                out.append(a.response(2 * i + 1))
            return out

        for (headers, status, error), response in zip(cases, await self.connection(server, attack)):
            with self.subTest(headers=headers):
                self.assertRefused(response, status, error)
        self.assertEqual(target.accepted, 0)

    @asyncTest
    async def test_S20_bare_port_with_a_workload_address(self) -> None:
        """S20: ``/_hbone/<port>`` on a listener with a workload address means
        that address and port: the tunnel works, with the POST form's headers."""
        target = self.target()
        server = self.server(allow=[target.portNumber], workloadAddress="127.0.0.1")

        def attack(a):
            a.send(a.headers(1, postHeaders(f"/_hbone/{target.portNumber}")))
            r = a.response(1)
            return r.status, r.header(b"content-type"), r.header(b"cache-control"), a.echo(1, b"via port")

        self.assertEqual(
            await self.connection(server, attack),
            (200, b"application/octet-stream", b"no-store", b"via port"),
        )

    @asyncTest
    async def test_S20_content_length_body(self) -> None:
        """S20: with ``content-length: N`` the upstream reads EOF after exactly N
        bytes (a half-close) and answers in full; a body that ends short, or runs
        long, resets the stream (PROTOCOL_ERROR) and aborts the upstream."""
        target = self.target()
        server = self.server(allow=[target.portNumber])
        path = canonicalPath(target.authority)

        def attack(a):
            a.send(a.headers(1, postHeaders(path, "lb", (b"content-length", b"1000"))))
            assert a.response(1).status == 200
            a.send(dataFrame(1, b"b" * 600), dataFrame(1, b"b" * 400))
            a.read(lambda f: a.streams[1].ended or a.streams[1].reset is not None)
            exact = (bytes(a.streams[1].data), a.streams[1].ended, a.streams[1].reset)
            a.send(a.headers(3, postHeaders(path, "lb", (b"content-length", b"10"))))
            assert a.response(3).status == 200
            a.send(dataFrame(3, b"short", end=True))
            a.read(lambda f: a.streams[3].reset is not None)
            a.send(a.headers(5, postHeaders(path, "lb", (b"content-length", b"5"))))
            assert a.response(5).status == 200
            a.send(dataFrame(5, b"too long"))
            a.read(lambda f: a.streams[5].reset is not None)
            return exact, a.streams[3].reset, a.streams[5].reset

        exact, short, long = await self.connection(server, attack)
        self.assertEqual(exact, (b"b" * 1000, True, None))
        self.assertEqual((short, long), (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.PROTOCOL_ERROR))
        first, second, third = target.conns
        for conn in (first, second, third):
            await conn.lostD
        self.assertTrue(first.eof and not first.resetSeen)
        self.assertEqual(len(first.received), 1000)
        self.assertTrue(second.resetSeen and third.resetSeen)

    # -- S21 -----------------------------------------------------------------------------

    @asyncTest
    async def test_S21_no_200_before_the_upstream_connect(self) -> None:
        """S21: the upstream connect is held: no response HEADERS goes out before
        it completes; DATA sent early waits (unacknowledged) and reaches the
        upstream after the connect."""
        target = self.target()
        dialer = GatedDialer(self.directDialer(target))
        server = self.server(dialer=dialer)
        a = Attacker(server.portNumber, pki.clientIdentity())

        def phase1():
            a.connect().preface()
            a.send(a.headers(1, connectHeaders(target.authority)), dataFrame(1, b"early bytes"))

        def phase2():
            try:
                r = a.response(1)
                a.read(lambda f: len(a.streams[1].data) >= len(b"early bytes"))  # the early bytes' echo
                return r.status, a.echo(1, b"+late")
            finally:
                a.close()

        try:
            await self.attack(phase1)
            await dialer.whenDialed()
            (stream,) = server.tunnels.streams
            self.assertFalse(stream.responseReceived)  # no 200 sent
            self.assertEqual(target.accepted, 0)
            dialer.release()
            status, echoed = await self.attack(phase2)
        finally:
            a.close()
        self.assertEqual(status, 200)
        self.assertEqual(bytes(target.conns[0].received[:11]), b"early bytes")
        self.assertEqual(echoed, b"+late")

    @asyncTest
    async def test_S21_relay_waits_for_the_next_hops_200(self) -> None:
        """S21: a relay whose next hop holds its upstream connect sends no ``200``
        before the next hop's; then the tunnel works end to end."""
        target = self.target()
        gated = GatedDialer(self.directDialer(target))
        far = self.server(dialer=gated)
        pool = Pool(reactor, pki.serverIdentity())
        self.addCleanup(pool.closeAll)
        hop = HBoneHop("127.0.0.1", far.portNumber, (IdentityPattern.parse(pki.SERVER_ID),), "connect")
        relay = self.server(dialer=HBoneDialer(pool, hop))
        a = Attacker(relay.portNumber, pki.clientIdentity())

        def phase1():
            a.connect().preface()
            a.send(a.headers(1, connectHeaders(target.authority)))

        def phase2():
            try:
                return a.response(1).status, a.echo(1, b"through two hops")
            finally:
                a.close()

        try:
            await self.attack(phase1)
            await gated.whenDialed()
            (relayed,) = relay.tunnels.streams
            self.assertFalse(relayed.responseReceived)  # the relay has not answered
            gated.release()
            status, echoed = await self.attack(phase2)
        finally:
            a.close()
        self.assertEqual((status, echoed), (200, b"through two hops"))
