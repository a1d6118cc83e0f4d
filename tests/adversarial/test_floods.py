"""SECURITY §5.1, S01-S12: HTTP/2 floods and limits, each from a raw-frame
attacker over a real mTLS socket to a real hbone server with real TCP targets.

Counts are scaled down where the catalogue marks the case CI-s; the assertions
are the catalogue's: the frame hbone sends and its code, the connection closed,
the dial never made, and (in the shared post-conditions) no descriptor, stream
or tunnel left behind. Every case ends with a canary tunnel on a fresh
connection.
"""

from __future__ import annotations

import struct

from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import GoAwayFrame, PingFrame, SettingsFrame
from twisted.internet import reactor

from hbone.h2.connection import ConnectionSettings
from tests import pki
from tests.adversarial.attacker import (
    Attacker,
    connectHeaders,
    dataFrame,
    pingFrame,
    priorityFrame,
    rawFrame,
    rstFrame,
    settingsFrame,
    windowUpdateFrame,
)
from tests.adversarial.support import AdversarialCase, GatedDialer, asyncTest, until

EYC = ErrorCodes.ENHANCE_YOUR_CALM
#: Floods that go on after the GOAWAY end at the linger; shortened here.
FAST_CLOSE = ConnectionSettings(goAwayLinger=0.25)


def floodUntilRefused(a: Attacker, frames, limit: int, poll: bool = True) -> int:
    """Send ``frames`` (an iterable of bytes) in 64 KiB writes until ``limit``
    frames are out, the server's GOAWAY has arrived, or the server stops taking
    bytes; returns how many went out. ``poll=False``: never read between
    writes (a peer that does not read at all)."""
    batch, size, sent = [], 0, 0
    for frame in frames:
        batch.append(frame)
        size += len(frame)
        if size >= 65536:
            if not a.send(*batch):
                return sent
            sent += len(batch)
            batch, size = [], 0
            if poll:
                a.poll()
                if a.goaways() or a.closed:
                    return sent
        if sent + len(batch) >= limit:
            break
    if batch and a.send(*batch):
        sent += len(batch)
    return sent


class FloodTests(AdversarialCase):
    def cutOff(self, a: Attacker, code: int = EYC):
        """Read until the GOAWAY, then until the close; check the code."""
        goaway = a.readUntilGoAway()
        a.readUntilClosed()
        assert goaway.error_code == code, goaway
        assert a.closed, "still open"
        return goaway

    # -- S01 rapid reset ----------------------------------------------------------

    @asyncTest
    async def test_S01_rapid_reset(self) -> None:
        """S01 (CI-s, 2 000 pairs): CONNECT + RST_STREAM(CANCEL) written at once.
        GOAWAY(0xb) after the 51st premature reset, naming the last stream
        processed; the connection closes; the target saw at most 150 connects."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                burst = []
                for i in range(2000):
                    burst += [a.headers(2 * i + 1, connectHeaders(target.authority)), rstFrame(2 * i + 1)]
                a.send(*burst)
                return self.cutOff(a)

        goaway = await self.attack(attack)
        self.assertEqual(goaway.last_stream_id, 101)  # the 51st, the last one processed
        # each request was reset in the read that brought it: none was served
        self.assertEqual(server.tunnels.streams, [])
        self.assertLessEqual(target.accepted, 150)
        self.assertEqual(server.connection(0).accounting.prematureResets, 51)
        self.assertEqual(len(self.log.find("premature resets")), 1)  # logged once, no traceback
        await self.assertCanary(server, target)

    # -- S02 MadeYouReset -------------------------------------------------------------

    async def _madeYouReset(self, second) -> None:
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                burst = []
                for i in range(1000):
                    sid = 2 * i + 1
                    burst += second(a, sid)
                a.send(*burst)
                return self.cutOff(a)

        goaway = await self.attack(attack)
        self.assertEqual(goaway.last_stream_id, 101)
        self.assertLessEqual(len(server.tunnels.streams), 51)
        self.assertLessEqual(target.accepted, 51)
        self.assertEqual(server.connection(0).accounting.prematureResets, 51)
        await self.assertCanary(server, target)
        return server

    @asyncTest
    async def test_S02_made_you_reset_data_after_end_stream(self) -> None:
        """S02 (CI-s, 1 000): CONNECT with END_STREAM, then one DATA: h2 resets
        each stream (STREAM_CLOSED); they count as premature resets."""
        await self._madeYouReset(
            lambda a, sid: [a.headers(sid, connectHeaders("127.0.0.1:9"), end=True), dataFrame(sid, b"x")]
        )

    @asyncTest
    async def test_S02_made_you_reset_window_overflow(self) -> None:
        """S02 variant: a stream WINDOW_UPDATE of 2^31-1 (FLOW_CONTROL_ERROR reset)."""
        await self._madeYouReset(
            lambda a, sid: [a.headers(sid, connectHeaders("127.0.0.1:9")), windowUpdateFrame(sid, 2**31 - 1)]
        )

    # -- S03 CONTINUATION flood ------------------------------------------------------

    async def _continuationFlood(self, payload: bytes) -> Attacker:
        target = self.target()
        server = self.server(FAST_CLOSE, allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                a.send(a.headers(1, connectHeaders(target.authority), endHeaders=False))
                sent = floodUntilRefused(a, (a.continuation(1, payload) for _ in range(10000)), 10000)
                goaway = self.cutOff(a)
                return goaway, sent

        goaway, sent = await self.attack(attack)
        self.assertEqual(server.tunnels.streams, [])  # no stream started
        self.assertEqual(server.dialer.requests, [])
        self.assertEqual(goaway.last_stream_id, 0)
        await self.assertCanary(server, target)
        return server

    @asyncTest
    async def test_S03_continuation_flood_empty(self) -> None:
        """S03: HEADERS without END_HEADERS, then 10 000 empty CONTINUATION frames:
        GOAWAY(0xb) at the 9th; nothing after it is parsed."""
        server = await self._continuationFlood(b"")
        acct = server.connection(0).accounting
        self.assertEqual(acct._continuations, 9)

    @asyncTest
    async def test_S03_continuation_flood_16k_each(self) -> None:
        """S03: CONTINUATION frames of 16 KiB each: GOAWAY(0xb) as the block passes
        16 KiB, decided from the frame header before the payload is buffered."""
        server = await self._continuationFlood(b"\x00" * 16384)
        acct = server.connection(0).accounting
        self.assertEqual(acct._continuations, 1)

    # -- S04 HPACK bombs ----------------------------------------------------------------

    @asyncTest
    async def test_S04_hpack_crumb_bomb(self) -> None:
        """S04: a 2 KB block of 1 900 one-byte indexed references (each a 42-byte
        ``:method GET`` entry decoded): GOAWAY(0xb) once the decoded list passes
        8 KiB; no dial."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                enc = Encoder()
                block = enc.encode(connectHeaders(target.authority)) + b"\x82" * 1900
                assert len(block) < 2100
                a.send(rawFrame(0x1, 0x4, 1, block))
                return self.cutOff(a)

        await self.attack(attack)
        self.assertEqual(server.tunnels.streams, [])
        self.assertEqual(target.accepted, 0)
        await self.assertCanary(server, target)

    @asyncTest
    async def test_S04_70k_value_over_continuation(self) -> None:
        """S04: one 70 KiB header value spread over CONTINUATION frames: the S03
        block cap (16 KiB) answers with GOAWAY(0xb); no dial."""
        target = self.target()
        server = self.server(FAST_CLOSE, allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                block = Encoder().encode(connectHeaders(target.authority, (b"x-big", b"v" * 70 * 1024)))
                pieces = [block[i : i + 8192] for i in range(0, len(block), 8192)]
                frames = [rawFrame(0x1, 0, 1, pieces[0])]
                frames += [rawFrame(0x9, 0x4 if i == len(pieces) - 2 else 0, 1, p) for i, p in enumerate(pieces[1:])]
                a.send(*frames)
                return self.cutOff(a)

        await self.attack(attack)
        self.assertEqual(server.tunnels.streams, [])
        self.assertEqual(target.accepted, 0)
        await self.assertCanary(server, target)

    # -- S05 header count ------------------------------------------------------------------

    @asyncTest
    async def test_S05_33_header_fields_then_a_good_connect(self) -> None:
        """S05: 33 small distinct header fields: stream ``400``; the next CONNECT
        on the same connection gets its tunnel."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                extra = [(b"x-f%d" % i, b"v") for i in range(33)]
                a.send(a.headers(1, connectHeaders(target.authority, *extra)))
                bad = a.response(1)
                good = a.openTunnel(3, target.authority)
                return bad, good, a.echo(3, b"still usable"), a.goaways()

        bad, good, echoed, goaways = await self.attack(attack)
        self.assertEqual(bad.status, 400)
        self.assertEqual(bad.header(b"proxy-status"), b"hbone; error=http_request_error")
        self.assertTrue(bad.ended)
        self.assertEqual(good.status, 200)
        self.assertEqual(echoed, b"still usable")
        self.assertEqual(goaways, [])
        self.assertEqual(target.accepted, 1)

    # -- S06 a client that never reads -----------------------------------------------------

    async def _neverReads(self, flood: bytes, count: int) -> tuple:
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity(), rcvbuf=4096) as a:
                a.connect().preface()
                floodUntilRefused(a, (flood for _ in range(count)), count)
                return self.cutOff(a), a

        goaway, a = await self.attack(attack)
        acks = [f for f in a.frames if isinstance(f, (PingFrame, SettingsFrame)) and "ACK" in f.flags]
        await self.assertCanary(server, target)
        return goaway, acks, server

    @asyncTest
    async def test_S06_ping_flood_never_reading(self) -> None:
        """S06 (CI-s, 2 000 PINGs): GOAWAY(0xb) at the rate limit (burst 50), then
        the close; at most the burst was answered."""
        goaway, acks, server = await self._neverReads(pingFrame(), 2000)
        self.assertLessEqual(len(acks), 50 + 1)  # + the ACK of our SETTINGS
        self.assertLessEqual(server.connection(0).accounting.pingFrames, 60)

    @asyncTest
    async def test_S06_settings_flood_never_reading(self) -> None:
        """S06 (CI-s, 2 000 empty SETTINGS): GOAWAY(0xb) at the rate limit."""
        goaway, acks, server = await self._neverReads(settingsFrame(), 2000)
        self.assertLessEqual(len(acks), 50)
        self.assertLessEqual(server.connection(0).accounting.settingsFrames, 60)

    @asyncTest
    async def test_S06_rst_stream_echo_never_reading(self) -> None:
        """S06 (CI-s, up to 1 000 000 DATA frames on a stream the client reset,
        SO_RCVBUF 4 KiB, nothing read): each makes h2 answer RST_STREAM. The
        answers go to the kernel first (its send buffer grows to 4 MiB on
        loopback), then queue in Twisted; once that queue is over the 256 KiB
        high-water mark the transport is paused, and 16 KiB more of them aborts
        the connection (the queue size is asserted)."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity(), rcvbuf=4096) as a:
                a.connect().preface()
                a.openTunnel(1, target.authority)
                a.send(rstFrame(1))
                sent = floodUntilRefused(a, (dataFrame(1, b"x") for _ in range(1000000)), 1000000, poll=False)
                a.readUntilClosed()
                return sent, a.closed

        sent, closed = await self.attack(attack)
        conn = server.connection(0)
        await server.watch.whenLost(0)
        self.assertIn("peer stopped reading", str(conn._failure.value))
        cap = ConnectionSettings().maxControlBytesWhilePaused
        self.assertGreater(conn.accounting.peakControlBytesWhilePaused, cap)  # the cap tripped...
        self.assertLessEqual(conn.accounting.peakControlBytesWhilePaused, cap + 13 * 2048)  # ...within a read
        await self.assertCanary(server, target)

    # -- S07 SETTINGS entries -------------------------------------------------------------

    @asyncTest
    async def test_S07_settings_of_2400_entries(self) -> None:
        """S07: SETTINGS frames of 2 400 entries, 200 of them: GOAWAY(0xb) on the
        first; no further frame is processed."""
        target = self.target()
        server = self.server(FAST_CLOSE, allow=[target.portNumber])
        huge = rawFrame(0x4, 0, 0, struct.pack(">HL", 0x3, 100) * 2400)

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                floodUntilRefused(a, (huge for _ in range(200)), 200)
                return self.cutOff(a)

        goaway = await self.attack(attack)
        self.assertEqual(goaway.last_stream_id, 0)
        self.assertEqual(server.connection(0).accounting.settingsFrames, 2)  # the preface's and the first huge one
        await self.assertCanary(server, target)

    # -- S08 empty DATA, PRIORITY, WINDOW_UPDATE on an open tunnel ---------------------------

    async def _onOpenTunnel(self, flood: bytes, count: int):
        target = self.target()
        server = self.server(FAST_CLOSE, allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                assert a.openTunnel(1, target.authority).status == 200
                floodUntilRefused(a, (flood for _ in range(count)), count)
                return self.cutOff(a)

        goaway = await self.attack(attack)
        self.assertEqual(goaway.last_stream_id, 1)
        (conn,) = target.conns
        await conn.lostD
        self.assertEqual(bytes(conn.received), b"")  # empty frames forward nothing
        self.assertTrue(conn.resetSeen)  # the tunnel was aborted with the connection
        await self.assertCanary(server, target)
        return server.connection(0).accounting

    @asyncTest
    async def test_S08_empty_data_flood(self) -> None:
        """S08: 10 000 empty DATA frames without END_STREAM: GOAWAY(0xb) at the 2nd."""
        acct = await self._onOpenTunnel(dataFrame(1, b""), 10000)
        self.assertEqual(acct.emptyData, 2)

    @asyncTest
    async def test_S08_priority_flood(self) -> None:
        """S08: 10 000 PRIORITY frames on a connection with one stream: GOAWAY(0xb)
        above 100 x (1 + 1)."""
        acct = await self._onOpenTunnel(priorityFrame(1), 10000)
        self.assertEqual(acct.priorityFrames, 201)

    @asyncTest
    async def test_S08_window_update_flood(self) -> None:
        """S08: 10 000 WINDOW_UPDATE +1 on stream 0: GOAWAY(0xb) above 100 + 10 x
        DATA frames sent."""
        acct = await self._onOpenTunnel(windowUpdateFrame(0, 1), 10000)
        self.assertEqual(acct.windowUpdates, 100 + 10 * acct.dataFramesSent + 1)

    # -- S09 MAX_CONCURRENT_STREAMS ----------------------------------------------------------

    @asyncTest
    async def test_S09_101_streams_at_once(self) -> None:
        """S09: 101 CONNECTs in one write: h2 refuses the 101st with
        GOAWAY(PROTOCOL_ERROR) before hbone sees any of them; nothing is dialed."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                a.send(*[a.headers(2 * i + 1, connectHeaders(target.authority)) for i in range(101)])
                return self.cutOff(a, ErrorCodes.PROTOCOL_ERROR)

        await self.attack(attack)
        self.assertLessEqual(target.accepted, 100)
        await self.assertCanary(server, target)

    @asyncTest
    async def test_S09_101st_stream_on_100_open_tunnels(self) -> None:
        """S09: 100 open tunnels, then a 101st CONNECT: GOAWAY(PROTOCOL_ERROR) and
        every upstream socket of that connection is closed (reset)."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                a.send(*[a.headers(2 * i + 1, connectHeaders(target.authority)) for i in range(100)])
                for i in range(100):
                    assert a.response(2 * i + 1).status == 200
                a.send(a.headers(201, connectHeaders(target.authority)))
                return self.cutOff(a, ErrorCodes.PROTOCOL_ERROR)

        await self.attack(attack)
        self.assertEqual(target.accepted, 100)
        for conn in target.conns:
            await conn.lostD
            self.assertTrue(conn.resetSeen)
        await self.assertCanary(server, target)

    @asyncTest
    async def test_S09_compliant_client_waits_for_a_slot(self) -> None:
        """S09 companion: a client that keeps within MAX_CONCURRENT_STREAMS (100)
        and opens the 101st tunnel once one ended gets all 101."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                a.send(*[a.headers(2 * i + 1, connectHeaders(target.authority)) for i in range(100)])
                statuses = [a.response(2 * i + 1).status for i in range(100)]
                a.send(dataFrame(1, b"bye", end=True))  # tunnel 1 ends both ways (the echo closes)
                a.read(lambda f: a.streams[1].ended)
                statuses.append(a.openTunnel(201, target.authority).status)
                return statuses, a.echo(201, b"101st"), a.goaways()

        statuses, echoed, goaways = await self.attack(attack)
        self.assertEqual(statuses, [200] * 101)
        self.assertEqual(echoed, b"101st")
        self.assertEqual(goaways, [])

    # -- S10 frame size and flow control ----------------------------------------------------

    async def _afterSettings(self, attackFrames, code: int, server=None, target=None):
        target = target or self.target()
        server = server or self.server(FAST_CLOSE, allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                a.read(lambda f: isinstance(f, SettingsFrame) and "ACK" in f.flags)  # the exchange
                floodUntilRefused(a, iter(attackFrames(a)), 1000)
                return self.cutOff(a, code)

        await self.attack(attack)
        await self.assertCanary(server, target)
        return server

    @asyncTest
    async def test_S10_frame_one_byte_over_max_frame_size(self) -> None:
        """S10: a DATA frame of MAX_FRAME_SIZE + 1: GOAWAY(FRAME_SIZE_ERROR), from
        its header."""
        size = ConnectionSettings().maxFrameSize + 1
        await self._afterSettings(
            lambda a: [a.headers(1, connectHeaders("127.0.0.1:9")), rawFrame(0x0, 0, 1, b"x" * size)],
            ErrorCodes.FRAME_SIZE_ERROR,
        )

    @asyncTest
    async def test_S10_data_beyond_the_stream_window(self) -> None:
        """S10: DATA beyond the 4 MiB stream window (the upstream connect is held,
        so nothing is acknowledged): GOAWAY(FLOW_CONTROL_ERROR)."""
        target = self.target()
        dialer = GatedDialer(self.directDialer(target), hold=1)
        server = self.server(FAST_CLOSE, dialer=dialer)
        window = ConnectionSettings().initialWindowSize
        mib = b"x" * (1024 * 1024)
        await self._afterSettings(
            lambda a: [a.headers(1, connectHeaders(target.authority))]
            + [dataFrame(1, mib)] * (window // len(mib))
            + [dataFrame(1, b"x")],
            ErrorCodes.FLOW_CONTROL_ERROR,
            server,
            target,
        )
        self.assertEqual(target.accepted, 1)  # only the canary's

    @asyncTest
    async def test_S10_window_update_overflow_on_stream_0(self) -> None:
        """S10: WINDOW_UPDATE on stream 0 that takes the window past 2^31-1:
        GOAWAY(FLOW_CONTROL_ERROR)."""
        await self._afterSettings(lambda a: [windowUpdateFrame(0, 2**31 - 1)], ErrorCodes.FLOW_CONTROL_ERROR)

    # -- S11 zero windows both ways ------------------------------------------------------

    @asyncTest
    async def test_S11_zero_window_upstream_writes(self) -> None:
        """S11 (CI-s): the client advertises INITIAL_WINDOW_SIZE 0 while the
        upstream writes as fast as it can: hbone stops reading the upstream after
        one read (asserted through the transport's reading state and the bytes
        queued on the stream); after the (shortened) idle timeout, RST_STREAM(CANCEL)
        to the client and an abortive close of the upstream."""
        target = self.target("blast")
        server = self.server(allow=[target.portNumber], idleTimeout=0.4)

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface({0x4: 0})  # SETTINGS_INITIAL_WINDOW_SIZE = 0
                assert a.openTunnel(1, target.authority).status == 200
                a.read(lambda f: a.streams[1].reset is not None)
                return a.streams[1].reset, len(a.streams[1].data)

        attacking = self.attack(attack)
        (conn,) = await target.factory.whenAccepted(1)
        await until(lambda: server.tracker.tunnels)
        (tunnel,) = server.tracker.tunnels
        stream, upstream = tunnel.a.transport, tunnel.b.transport
        await until(lambda: stream._producerPaused or stream.closed)  # no window: the source is paused
        self.assertFalse(stream.closed)
        await conn.pausedOnce  # and the upstream's own buffers have filled
        self.assertNotIn(upstream, reactor.getReaders())
        self.assertLessEqual(stream._outbytes, 256 * 1024)  # at most one read queued
        reset, received = await attacking
        self.assertEqual(reset, ErrorCodes.CANCEL)
        self.assertEqual(received, 0)
        await conn.lostD
        self.assertTrue(conn.resetSeen)

    @asyncTest
    async def test_S11_upstream_never_reads(self) -> None:
        """S11 (CI-s) reverse: the client sends as fast as the windows allow to an
        upstream that never reads: hbone stops granting WINDOW_UPDATE, with at
        most one stream window (4 MiB) unacknowledged and the upstream's buffer
        bounded by it; after the idle timeout, RST_STREAM(CANCEL) and an abortive
        upstream close."""
        target = self.target("silent")
        server = self.server(allow=[target.portNumber], idleTimeout=0.6)
        window = ConnectionSettings().initialWindowSize
        snapshot: dict = {}
        sweep = server.tracker._sweepIdle

        def sweepAndLook():  # what is held at each idle sweep, the last one before the abort
            for tunnel in server.tracker.tunnels:
                stream, upstream = tunnel.a.transport, tunnel.b.transport
                snapshot.update(
                    unacked=stream._unacked,
                    paused=stream._consumerPaused,
                    upstreamBuffer=len(upstream.dataBuffer) + upstream._tempDataLen,
                )
            sweep()

        server.tracker._sweepIdle = sweepAndLook
        chunk = b"u" * 65536

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                assert a.openTunnel(1, target.authority).status == 200
                sent = 0
                while a.streams[1].reset is None and sent < 100 * 1024 * 1024:
                    n = min(len(chunk), a.credit(1))
                    if n > 0:
                        a.sendData(1, chunk[:n])
                        sent += n
                    else:  # wait for a grant, or (once hbone stops granting) the idle reset
                        a.read(lambda f: a.streams[1].reset is not None or a.credit(1) > 0)
                return sent, a.streams[1].reset

        sent, reset = await self.attack(attack)
        self.assertEqual(reset, ErrorCodes.CANCEL)
        self.assertLess(sent, 100 * 1024 * 1024)  # the grants stopped
        self.assertTrue(snapshot["paused"])
        self.assertLessEqual(snapshot["unacked"], window)
        self.assertLessEqual(snapshot["upstreamBuffer"], window + 2 * 65536)
        (conn,) = target.conns
        conn.wakeUp()  # read again, to see how hbone closed it
        await conn.lostD
        self.assertTrue(conn.resetSeen)

    # -- S12 protocol smoke -------------------------------------------------------------

    SMOKE = {
        # case: (bytes after the preface and SETTINGS, GOAWAY code or None (closed without one))
        "SETTINGS ACK with a payload": (lambda a: rawFrame(0x4, 0x1, 0, b"\0" * 6), ErrorCodes.PROTOCOL_ERROR),
        "HEADERS on stream 0": (lambda a: rawFrame(0x1, 0x4, 0, a.encoder.encode(connectHeaders("h:1"))),
                                ErrorCodes.PROTOCOL_ERROR),
        "HEADERS on an even id": (lambda a: a.headers(2, connectHeaders("h:1")), ErrorCodes.PROTOCOL_ERROR),
        "HEADERS on a decreasing id": (
            lambda a: a.headers(5, connectHeaders("127.0.0.1:9")) + a.headers(3, connectHeaders("127.0.0.1:9")),
            ErrorCodes.PROTOCOL_ERROR),
        "DATA on an idle stream": (lambda a: dataFrame(1, b"x"), ErrorCodes.PROTOCOL_ERROR),
        "PRIORITY self-dependency": (lambda a: priorityFrame(3, 3), ErrorCodes.PROTOCOL_ERROR),
        "invalid padding": (
            lambda a: a.headers(1, connectHeaders("127.0.0.1:9")) + rawFrame(0x0, 0x8, 1, b"\x10abc"),
            ErrorCodes.PROTOCOL_ERROR),
    }

    @asyncTest
    async def test_S12_protocol_smoke(self) -> None:
        """S12: RFC 9113 violations get the codes h2 emits (pinned here: h2 answers
        a SETTINGS ACK with a payload and a PRIORITY self-dependency with
        PROTOCOL_ERROR where the RFC names FRAME_SIZE_ERROR and a stream error);
        never an unhandled exception (the post-conditions check the log)."""
        target = self.target()
        server = self.server(allow=[target.portNumber])
        for name, (frames, code) in self.SMOKE.items():

            def attack():
                with Attacker(server.portNumber, pki.clientIdentity()) as a:
                    a.connect().preface()
                    a.send(frames(a))
                    a.readUntilClosed()
                    return [g.error_code for g in a.goaways()]

            self.assertEqual(await self.attack(attack), [code], name)
        await self.assertCanary(server, target)

    @asyncTest
    async def test_S12_bad_preface_is_closed(self) -> None:
        """S12: a bad preface: the connection is closed (h2 raises before its state
        machine runs, so no GOAWAY is written: pinned)."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect()
                a.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                a.readUntilClosed()
                return a.frames, a.closed

        frames, closed = await self.attack(attack)
        self.assertTrue(closed)
        self.assertEqual(a_goaways(frames), [])  # only the server's own preface went out
        await self.assertCanary(server, target)

    @asyncTest
    async def test_S12_unknown_frame_type_is_ignored(self) -> None:
        """S12: an unknown frame type is ignored; the connection carries a tunnel."""
        target = self.target()
        server = self.server(allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                a.send(rawFrame(0x42, 0xFF, 0, b"whatever"), rawFrame(0xEE, 0, 7, b""))
                assert a.openTunnel(1, target.authority).status == 200
                return a.echo(1, b"after unknown frames"), a.goaways()

        echoed, goaways = await self.attack(attack)
        self.assertEqual((echoed, goaways), (b"after unknown frames", []))


def a_goaways(frames) -> list:
    return [f for f in frames if isinstance(f, GoAwayFrame)]
