"""SECURITY §4.4 limits, one by one, in FrameAccounting and HBoneH2Protocol: unit
tests over a fake transport with a real h2 peer and a MemoryReactorClock
(``tests/h2harness.py``), so every count is exact. The same attacks over real TLS
sockets are in ``test_floods.py``."""

from __future__ import annotations

import struct

import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import GoAwayFrame, RstStreamFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost

from hbone.h2.connection import DATA_FRAME_UNIT, ConnectionSettings, FrameAccounting
from hbone.limits import ProcessLimits
from tests.adversarial.attacker import (
    PREFACE,
    dataFrame,
    pingFrame,
    priorityFrame,
    rawFrame,
    rstFrame,
    settingsFrame,
    windowUpdateFrame,
)
from tests.h2harness import CONNECT, Harness, parseFrames

EYC = ErrorCodes.ENHANCE_YOUR_CALM


def server(settings: ConnectionSettings | None = None, **kw) -> Harness:
    h = Harness("server", settings=settings or ConnectionSettings(), **kw)
    h.handshake()
    h.transport.clear()
    return h


def sent(h: Harness, kind=None) -> list:
    frames = parseFrames(h.transport.value())
    return [f for f in frames if kind is None or isinstance(f, kind)]


def goaway(h: Harness) -> GoAwayFrame:
    goaways = sent(h, GoAwayFrame)
    assert len(goaways) == 1, goaways
    return goaways[0]


def assertCutOff(h: Harness, code: int = EYC, lastStreamID: int = 0) -> None:
    """GOAWAY(code, lastStreamID), then the close; the linger forces it."""
    g = goaway(h)
    assert (g.error_code, g.last_stream_id) == (code, lastStreamID)
    assert h.transport.disconnecting
    assert h.proto._h2Closed
    h.clock.advance(h.proto.settings.goAwayLinger)
    assert h.transport.closeStarted


def headers(encoder: Encoder, sid: int, block=CONNECT, end: bool = False, endHeaders: bool = True,
            padded: bool = False) -> bytes:
    payload = encoder.encode(block)
    flags = (0x1 if end else 0) | (0x4 if endHeaders else 0)
    return rawFrame(0x1, flags, sid, payload)


# -- the frame-header scanner ----------------------------------------------------------


def test_scan_skips_data_payloads_by_length():
    acct = FrameAccounting(ConnectionSettings(), server=True)
    big = dataFrame(1, b"x" * 100_000)
    stream = PREFACE + settingsFrame() + big + pingFrame()
    assert acct.scan(stream, 0.0) is None
    assert (acct.pingFrames, acct.settingsFrames) == (1, 1)


def test_scan_refuses_an_oversized_frame_from_its_header():
    """A frame over our MAX_FRAME_SIZE is refused from its 9-byte header alone,
    before h2 buffers any of it (h2 itself waits for the whole frame)."""
    h = server()
    header = rawFrame(0x0, 0, 1, length=2**24 - 1)  # a 16 MiB DATA frame: its header only
    h.send(header)
    assertCutOff(h, ErrorCodes.FRAME_SIZE_ERROR)
    assert len(h.proto._conn.incoming_buffer._data) == 0  # h2 never saw the header


def test_scan_one_byte_over_max_frame_size():
    s = ConnectionSettings()
    acct = FrameAccounting(s, server=False)
    assert acct.scan(rawFrame(0x0, 0, 1, length=s.maxFrameSize), 0.0) is None
    acct = FrameAccounting(s, server=False)
    verdict = acct.scan(rawFrame(0x0, 0, 1, length=s.maxFrameSize + 1), 0.0)
    assert verdict.code == ErrorCodes.FRAME_SIZE_ERROR and verdict.offset == 0


def test_bad_preface_is_left_to_h2():
    acct = FrameAccounting(ConnectionSettings(), server=True)
    assert acct.scan(b"GET / HTTP/1.1\r\n" + b"\xff" * 64, 0.0) is None
    assert acct.off


def _frameSequence():
    """Random frames of the kinds the scanner counts, some over a limit."""
    frame = st.one_of(
        st.builds(lambda n, end: dataFrame(1, b"d" * n, end), st.sampled_from([0, 1, 5, 20000]), st.booleans()),
        st.builds(lambda n, pad: dataFrame(1, b"d" * n, padding=pad), st.sampled_from([0, 3]), st.sampled_from([0, 7])),
        st.just(pingFrame()),
        st.builds(lambda n: settingsFrame({i % 6 + 1: 1 for i in range(n)}), st.integers(0, 3)),
        st.builds(lambda n: rawFrame(0x4, 0, 0, b"\0" * 6 * n), st.sampled_from([1, 33])),
        st.just(priorityFrame(3)),
        st.just(windowUpdateFrame(0, 1)),
        st.builds(lambda n, end: rawFrame(0x1, 0x4 if end else 0, 1, b"h" * n), st.sampled_from([3, 17000]), st.booleans()),
        st.builds(lambda n, end: rawFrame(0x9, 0x4 if end else 0, 1, b"c" * n), st.sampled_from([0, 4000]), st.booleans()),
        st.just(rawFrame(0x0, 0, 1, length=2**20 + 1)),
    )
    return st.lists(frame, max_size=40)


@settings(max_examples=300, deadline=None)
@given(_frameSequence(), st.lists(st.integers(1, 200), max_size=30), st.booleans())
def test_scan_is_independent_of_read_boundaries(frames, cuts, server):
    """However TLS cuts the byte stream, the scanner finds the same first
    violation, at the same absolute offset, with the same counters: frame
    headers and pad-length bytes split across reads are reassembled."""
    data = (PREFACE if server else b"") + b"".join(frames)
    s = ConnectionSettings(pingBurst=3, settingsBurst=3)

    def run(pieces):
        acct = FrameAccounting(s, server=server)
        consumed = 0
        for piece in pieces:
            verdict = acct.scan(piece, 0.0)
            if verdict is not None:
                return (consumed + verdict.offset if verdict.offset else consumed, verdict.code, verdict.key), acct
            consumed += len(piece)
        return None, acct

    whole, ref = run([data])
    pieces, i = [], 0
    for cut in cuts:
        if i >= len(data):
            break
        pieces.append(data[i : i + cut])
        i += cut
    if i < len(data):
        pieces.append(data[i:])
    split, acct = run(pieces)
    if whole is None:
        assert split is None
    else:
        # a split read reports a frame that began in an earlier read at offset 0
        # of the read where its header (or its pad-length byte) completed
        assert split is not None and split[1:] == whole[1:]
        assert whole[0] <= split[0] <= whole[0] + 9
    counters = lambda a: (a.pingFrames, a.settingsFrames, a.priorityFrames, a.windowUpdates, a.streamsOpened)
    assert counters(acct) == counters(ref)


# -- PING and SETTINGS rates (S06) ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_burst_of_50_then_goaway(kind):
    frame = pingFrame() if kind == "ping" else settingsFrame()
    h = server()
    counter = "pingFrames" if kind == "ping" else "settingsFrames"
    before = getattr(h.proto.accounting, counter)  # the handshake's own SETTINGS
    allowed = 50 - before
    for _ in range(allowed):
        h.send(frame)
    assert not h.transport.disconnecting
    h.transport.clear()
    h.send(frame)
    assertCutOff(h, EYC)
    assert getattr(h.proto.accounting, counter) == before + allowed + 1


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_sustained_10_per_second_is_fine(kind):
    frame = pingFrame() if kind == "ping" else settingsFrame()
    h = server()
    for _ in range(2000):
        h.send(frame)
        h.clock.advance(0.1)
        h.transport.clear()
    assert not h.transport.disconnecting


def test_ping_rate_refills_the_burst():
    h = server()
    for _ in range(50):
        h.send(pingFrame())
    h.clock.advance(5.0)  # 50 tokens back
    for _ in range(50):
        h.send(pingFrame())
    assert not h.transport.disconnecting
    h.transport.clear()
    h.send(pingFrame())
    assertCutOff(h, EYC)


def test_settings_over_32_entries_on_the_first_frame():
    """S07: a SETTINGS frame of 33 entries is refused at once; 32 are fine."""
    h = server()
    h.send(rawFrame(0x4, 0, 0, struct.pack(">HL", 0x3, 100) * 32))
    assert not h.transport.disconnecting
    h.transport.clear()
    h.send(rawFrame(0x4, 0, 0, struct.pack(">HL", 0x3, 100) * 33) + pingFrame())
    assertCutOff(h, EYC)
    assert sent(h)[0].__class__ is GoAwayFrame  # the PING behind it was never answered


# -- empty DATA, PRIORITY, WINDOW_UPDATE (S08) ----------------------------------------------


def test_second_consecutive_empty_data_frame():
    h = server()
    sid, stream, proto = h.accept()
    h.transport.clear()
    h.send(dataFrame(sid, b""))
    assert not h.transport.disconnecting
    h.send(dataFrame(sid, b""))
    assertCutOff(h, EYC, sid)
    assert proto.received == b""


def test_empty_data_counter_resets_on_payload_and_end_stream_is_fine():
    h = server()
    sid, stream, proto = h.accept()
    for _ in range(100):
        h.send(dataFrame(sid, b""))
        h.send(dataFrame(sid, b"x"))
    h.send(dataFrame(sid, b"", end=True))
    assert not h.transport.disconnecting
    assert proto.received == b"x" * 100


def test_padded_empty_data_counts_as_empty_even_split_at_the_pad_byte():
    h = server()
    sid, stream, proto = h.accept()
    first = dataFrame(sid, b"", padding=5)
    h.send(first)
    assert not h.transport.disconnecting
    second = dataFrame(sid, b"", padding=5)
    h.transport.clear()
    h.send(second[:9])  # the header ends the read; the pad length comes next
    assert not h.transport.disconnecting
    h.send(second[9:])
    assertCutOff(h, EYC, sid)


def test_priority_frames_100_per_stream_opened_plus_one():
    h = server()
    for _ in range(100):
        h.send(priorityFrame(3))
    assert not h.transport.disconnecting
    sid, _, _ = h.accept()  # one stream opened: 200 in all
    for _ in range(100):
        h.send(priorityFrame(3))
    assert not h.transport.disconnecting
    h.transport.clear()
    h.send(priorityFrame(3))
    assertCutOff(h, EYC, sid)
    assert h.proto.accounting.priorityFrames == 201


def test_window_update_budget_grows_with_data_sent():
    h = server()
    sid, stream, proto = h.accept()
    h.transport.clear()
    base = h.proto.accounting.windowUpdates  # the peer's own after the preface
    for _ in range(100 - base):
        h.send(windowUpdateFrame(0, 1))
    assert not h.transport.disconnecting
    stream.write(b"x" * 10)  # one DATA frame: 10 more
    h.pump()
    for _ in range(10 - (h.proto.accounting.windowUpdates - 100)):
        h.send(windowUpdateFrame(0, 1))
    assert not h.transport.disconnecting
    h.transport.clear()
    h.send(windowUpdateFrame(0, 1))
    assertCutOff(h, EYC, sid)


def test_a_big_data_frame_counts_once_per_16k_started():
    acct = FrameAccounting(ConnectionSettings())
    acct.dataSent(1)
    acct.dataSent(DATA_FRAME_UNIT)
    acct.dataSent(DATA_FRAME_UNIT + 1)
    acct.dataSent(1024 * 1024)
    acct.dataSent(0)  # an empty END_STREAM
    assert acct.dataFramesSent == 1 + 1 + 2 + 64 + 1


# -- header blocks: CONTINUATION floods (S03, S04) -------------------------------------------


def test_ninth_continuation_refused_before_h2_buffers_it():
    h = server()
    enc = Encoder()
    block = enc.encode(CONNECT)
    h.send(rawFrame(0x1, 0, 1, block))  # HEADERS without END_HEADERS
    for _ in range(8):
        h.send(rawFrame(0x9, 0, 1, b""))
    assert not h.transport.disconnecting
    h.send(rawFrame(0x9, 0, 1, b""))
    assertCutOff(h, EYC)
    assert h.requests == []
    assert len(h.proto._conn.incoming_buffer._headers_buffer) == 9  # HEADERS + 8, not the 9th


def test_header_block_over_16k_refused_from_the_frame_header():
    h = server()
    h.send(rawFrame(0x1, 0, 1, b"\x00" * 8192))
    h.send(rawFrame(0x9, 0, 1, b"\x00" * 8192))
    assert not h.transport.disconnecting
    h.send(rawFrame(0x9, 0x4, 1, b"\x00" * 1)[:9])  # only the header of one byte more
    assertCutOff(h, EYC)
    assert h.requests == []


def test_one_headers_frame_over_16k():
    h = server()
    h.send(rawFrame(0x1, 0x4, 1, length=16 * 1024 + 1))
    assertCutOff(h, EYC)


def test_eight_continuations_within_16k_are_served():
    h = server()
    enc = Encoder()
    block = enc.encode(CONNECT + [(b"x-a", b"v" * 200)])
    size = -(-len(block) // 9)
    pieces = [block[i : i + size] for i in range(0, len(block), size)]
    assert len(pieces) == 9 and b"".join(pieces) == block
    h.send(rawFrame(0x1, 0, 1, pieces[0]))
    for i, piece in enumerate(pieces[1:]):
        h.send(rawFrame(0x9, 0x4 if i == 7 else 0, 1, piece))
    assert [s.streamID for s, _ in h.requests] == [1]
    assert not h.transport.disconnecting


# -- premature resets (S01, S02) ---------------------------------------------------------------


def _openAndReset(h: Harness, sid: int) -> None:
    h.peer.send_headers(sid, CONNECT)
    h.peer.reset_stream(sid, ErrorCodes.CANCEL)
    h.toProto()


def test_51st_premature_reset_is_goaway_naming_the_last_processed_stream():
    """Each request reset in the read that brought it: the handler never sees
    it (nothing to dial, nothing to refuse), and it counts."""
    h = server()
    for i in range(50):
        _openAndReset(h, 2 * i + 1)
    assert not h.transport.disconnecting
    h.transport.clear()
    _openAndReset(h, 101)
    assertCutOff(h, EYC, 101)
    assert h.requests == []


def test_resets_of_streams_being_served_count():
    """The request reached the handler (a dial would be in progress), and the
    reset came in a later read."""
    h = server()
    for i in range(51):
        h.openStream()
    assert len(h.requests) == 51
    h.transport.clear()
    for i in range(51):
        h.peer.reset_stream(2 * i + 1, ErrorCodes.CANCEL)
    h.toProto()
    assertCutOff(h, EYC, 101)
    assert all(stream.closed for stream, _ in h.requests)


def test_rapid_reset_in_one_read_stops_at_the_51st():
    """S01 in one read: GOAWAY at the 51st; no request reaches the handler."""
    h = server()
    enc = Encoder()
    burst = b"".join(headers(enc, 2 * i + 1) + rstFrame(2 * i + 1) for i in range(2000))
    h.send(burst)
    assertCutOff(h, EYC, 101)
    assert h.requests == []
    assert h.proto.accounting.prematureResets == 51


def test_h2_internal_closed_by_reset_is_pinned():
    """hbone asks h2 whether a stream it has not seen yet was already reset
    (``H2Connection._stream_is_closed_by_reset``): pin that private method."""
    h = server()
    h.peer.send_headers(1, CONNECT)
    h.peer.reset_stream(1, ErrorCodes.CANCEL)
    h.peer.send_headers(3, CONNECT)
    h.proto._conn.receive_data(h.peer.data_to_send())
    assert h.proto._conn._stream_is_closed_by_reset(1) is True
    assert h.proto._conn._stream_is_closed_by_reset(3) is False


def test_resets_after_the_200_and_1s_are_not_premature():
    h = server()
    accepted = [h.accept() for _ in range(60)]
    h.clock.advance(1.0)
    h.pump()
    for sid, _, _ in accepted:
        h.peer.reset_stream(sid, ErrorCodes.CANCEL)
    h.pump()
    assert not h.transport.disconnecting
    assert h.proto.accounting.prematureResets == 0


def test_resets_within_1s_of_the_200_are_premature():
    h = server()
    accepted = [h.accept() for _ in range(51)]
    h.clock.advance(0.5)
    for sid, _, _ in accepted:
        h.peer.reset_stream(sid, ErrorCodes.CANCEL)
    h.transport.clear()
    h.toProto()
    assertCutOff(h, EYC, accepted[-1][0])


def test_resets_before_the_200_are_premature_however_late():
    h = server()
    for i in range(51):
        h.openStream()
    h.clock.advance(30)
    h.pump()
    h.transport.clear()
    for i in range(51):
        h.peer.reset_stream(2 * i + 1, ErrorCodes.CANCEL)
    h.toProto()
    assertCutOff(h, EYC, 101)


def test_graceful_no_error_reset_after_end_stream_is_not_premature():
    """RST_STREAM(NO_ERROR) after the peer's END_STREAM, on an answered stream,
    is how hbone's own client closes a tunnel (RFC 9113 §8.1): not premature,
    however soon. Before the 200 it still counts."""
    h = server()
    for i in range(60):
        sid, stream, proto = h.accept()
        h.peer.end_stream(sid)
        h.peer.reset_stream(sid, ErrorCodes.NO_ERROR)
        h.pump()
    assert not h.transport.disconnecting
    assert h.proto.accounting.prematureResets == 0
    for i in range(51):
        sid = h.openStream(endStream=True)
        h.peer.reset_stream(sid, ErrorCodes.NO_ERROR)
        h.toProto()
    assert h.proto._h2Closed and h.proto.accounting.prematureResets == 51


def test_premature_reset_window_slides():
    h = server()
    sid = 1
    for _ in range(4):
        for _ in range(50):
            _openAndReset(h, sid)
            sid += 2
        h.clock.advance(10.0)
        h.pump()
    assert not h.transport.disconnecting
    assert h.proto.accounting.prematureResets == 200


def test_hbone_resets_for_upstream_failures_do_not_count():
    """CONNECT_ERROR (the upstream failed), CANCEL (idle), INTERNAL_ERROR: hbone's
    own resets are not the peer's doing."""
    h = server()
    for i in range(60):
        h.openStream()
        stream, _ = h.requests[-1]
        stream.resetStream([ErrorCodes.CONNECT_ERROR, ErrorCodes.CANCEL, ErrorCodes.INTERNAL_ERROR][i % 3])
        h.pump()
    assert not h.transport.disconnecting
    assert h.proto.accounting.prematureResets == 0


def test_made_you_reset_data_after_end_stream():
    """S02: CONNECT with END_STREAM, then DATA: h2 resets the stream
    (STREAM_CLOSED); the 51st such reset is GOAWAY(0xb)."""
    h = server()
    enc = Encoder()
    burst = b"".join(
        headers(enc, 2 * i + 1, end=True) + dataFrame(2 * i + 1, b"x") for i in range(60)
    )
    h.send(burst)
    assert sent(h, RstStreamFrame) == []  # h2's answers to the burst never go out
    assertCutOff(h, EYC, 101)
    assert h.requests == []  # h2 had reset each before hbone saw it
    assert h.proto.accounting.prematureResets == 51


def test_made_you_reset_on_a_stream_being_served():
    """h2 resets a stream hbone is serving (DATA after END_STREAM, in a later
    read): the StreamReset event counts, and the tunnel is closed."""
    h = server()
    sid = h.openStream(endStream=True)
    stream, _ = h.requests[0]
    h.send(dataFrame(sid, b"x"))
    h.toPeer()
    assert h.resets(sid) == [ErrorCodes.STREAM_CLOSED] and stream.closed
    assert h.proto.accounting.prematureResets == 1


def test_made_you_reset_window_overflow():
    """S02 variant: a stream WINDOW_UPDATE of 2^31-1 overflows the stream's send
    window; h2 resets it with FLOW_CONTROL_ERROR, which counts."""
    h = server()
    enc = Encoder()
    burst = b"".join(
        headers(enc, 2 * i + 1) + windowUpdateFrame(2 * i + 1, 2**31 - 1) for i in range(60)
    )
    h.send(burst)
    assertCutOff(h, EYC, 101)
    assert h.proto.accounting.prematureResets == 51


def test_made_you_reset_trailers_count():
    """hbone's own RST_STREAM(PROTOCOL_ERROR) for trailers on a tunnel counts."""
    h = server()
    enc = Encoder()
    burst = b"".join(
        headers(enc, 2 * i + 1) + headers(enc, 2 * i + 1, [(b"x-trailer", b"1")], end=True)
        for i in range(60)
    )
    h.send(burst)
    assertCutOff(h, EYC, 101)
    assert len(h.requests) == 51


# -- the control-frame queue (S06) ----------------------------------------------------------


def test_rst_stream_echo_to_a_peer_that_does_not_read_is_capped():
    """S06: DATA frames on a reset stream each make h2 answer RST_STREAM; with the
    transport paused, the connection is aborted once 16 KiB of them is queued,
    and never more than one write past the cap was counted."""
    h = server()
    sid, stream, proto = h.accept()
    h.peer.reset_stream(sid, ErrorCodes.CANCEL)
    h.pump()
    h.transport.clear()
    h.proto.pauseProducing()
    for i in range(5000):
        h.send(dataFrame(sid, b"x"))
        if h.transport.aborted:
            break
    assert h.transport.aborted
    cap = ConnectionSettings().maxControlBytesWhilePaused
    assert len(h.transport.value()) <= cap
    assert h.proto.accounting.peakControlBytesWhilePaused <= cap + 64
    assert isinstance(h.proto._failure.value, ConnectionLost)


# -- process tunnel cap (SECURITY §4.6) -----------------------------------------------------


def test_process_tunnel_cap_refuses_streams():
    limits = ProcessLimits(maxTunnels=3)
    h = server()
    h.proto.processLimits = limits  # the Harness builds the protocol without one
    for _ in range(3):
        h.openStream()
    assert limits.openTunnels == 3
    h.transport.clear()
    sid = h.openStream()
    assert h.resets(sid) == [ErrorCodes.REFUSED_STREAM]
    assert len(h.requests) == 3  # the handler never saw the fourth
    assert limits.refusedTunnels == 1
    stream, _ = h.requests[0]
    stream.resetStream(ErrorCodes.CANCEL)
    h.pump()
    assert limits.openTunnels == 2
    h.openStream()
    assert len(h.requests) == 4
    h.deliverLost()
    assert limits.openTunnels == 0


def test_after_the_goaway_input_is_dropped_then_not_read():
    """After an error GOAWAY nothing is parsed; a peer that keeps sending past
    64 KiB is no longer read (a peer that closes at once still gets its TLS
    close_notify read)."""
    h = server()
    h.transport._lenient = True  # a TCP transport may be paused while closing
    sid, stream, proto = h.accept()
    h.send(dataFrame(sid, b""))
    h.send(dataFrame(sid, b""))
    assert h.proto._h2Closed
    assert h.transport.producerState == "producing"
    for _ in range(7):
        h.send(dataFrame(sid, b"x" * 8192))
    assert h.transport.producerState == "producing"
    h.send(dataFrame(sid, b"x" * 16384))
    assert h.transport.producerState == "paused"
    assert proto.received == b""
