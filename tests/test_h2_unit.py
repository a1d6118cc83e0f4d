"""HBoneH2Protocol and H2TunnelStream against a real h2 peer, over StringTransport,
on a MemoryReactorClock (PROTOCOL §3-§7, SECURITY §4.4): no sockets, no real time."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from h2.events import PingReceived, RequestReceived
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
)
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from hbone.errors import HopUnreachable, StreamReset, TunnelAborted, TunnelRefused
from hbone.h2.connection import ConnectionSettings, RefusedStream
from tests.h2harness import (
    CONNECT,
    FakeProducer,
    HalfRecorder,
    Harness,
    Recorder,
    parseFrames,
)

MiB = 1024 * 1024
POST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"lb.example.com"),
    (b":path", b"/_hbone/10.0.0.1:80"),
]


def server(**kw) -> Harness:
    h = Harness("server", **kw)
    h.handshake()
    return h


def client(**kw) -> Harness:
    h = Harness("client", **kw)
    h.handshake()
    return h


def headersBlock(h: Harness, sid: int, headers, end: bool = False) -> bytes:
    """A HEADERS frame the h2 peer would refuse to send, encoded with the peer's own
    HPACK encoder so both sides' tables stay in step."""
    f = HeadersFrame(sid)
    f.data = h.peer.encoder.encode(headers)
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()


def sentFrames(h: Harness, kind, sid: int | None = None) -> list:
    return [f for f in h.frames if isinstance(f, kind) and (sid is None or f.stream_id == sid)]


# -- server role: accepting and answering ---------------------------------------------


def test_server_calls_stream_handler_for_connect():
    h = server()
    sid = h.openStream(CONNECT + [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
    [(stream, headers)] = h.requests
    assert stream.streamID == sid == 1
    assert (b":authority", b"example.com:443") in headers
    assert h.proto.streams == {1: stream}
    assert not h.responses(1)  # nothing is answered before the handler says so


def test_respond_200_then_data_both_ways():
    h = server()
    sid, stream, proto = h.accept()
    [resp] = h.responses(sid)
    assert dict(resp.headers)[b":status"] == b"200"
    assert not resp.stream_ended
    assert proto.made
    h.peer.send_data(sid, b"client to target")
    h.pump()
    assert proto.received == b"client to target"
    stream.write(b"target to client")
    stream.writeSequence([b" and ", b"more"])
    h.pump()
    assert h.dataFor(sid) == b"target to client and more"
    assert stream.bytesReceived == len(b"client to target")
    assert stream.bytesSent == len(b"target to client and more")
    assert stream.getPeer().streamID == sid


@pytest.mark.parametrize(
    "status,error", [(400, "http_request_error"), (403, "http_request_denied"), (503, "connection_refused"),
                     (504, "connection_timeout")]
)
def test_error_response_is_one_headers_with_end_stream(status, error):
    h = server()
    h.openStream()
    stream, _ = h.requests[0]
    closed = []
    stream.notifyClose(closed.append)
    h.frames.clear()
    h.proto.respond(stream, status, error=error)
    h.pump()
    headers = sentFrames(h, HeadersFrame)
    assert len(headers) == 1
    assert {"END_STREAM", "END_HEADERS"} <= headers[0].flags
    assert not sentFrames(h, ContinuationFrame)
    assert not sentFrames(h, DataFrame)
    [resp] = h.responses(1)
    fields = dict(resp.headers)
    assert fields[b":status"] == str(status).encode()
    assert fields[b"proxy-status"] == f"hbone; error={error}".encode()
    assert resp.stream_ended is not None
    # the request body will not be read: RST_STREAM(NO_ERROR) after the response
    assert [f.error_code for f in sentFrames(h, RstStreamFrame)] == [ErrorCodes.NO_ERROR]
    assert stream.closed and h.proto.streams == {}
    assert len(closed) == 1 and closed[0].check(ConnectionDone)


def test_error_response_after_request_end_needs_no_reset():
    h = server()
    h.openStream(endStream=True)
    stream, _ = h.requests[0]
    h.frames.clear()
    h.proto.respond(stream, 400, error="http_request_error")
    h.pump()
    assert len(sentFrames(h, HeadersFrame)) == 1
    assert not sentFrames(h, RstStreamFrame)


def test_node_name_in_proxy_status():
    h = Harness("server")
    h.proto.nodeName = "gw-1"
    h.handshake()
    h.openStream()
    h.proto.respond(h.requests[0][0], 403, error="http_request_denied")
    h.pump()
    assert dict(h.responses(1)[0].headers)[b"proxy-status"] == b"gw-1; error=http_request_denied"


def test_33_header_fields_400_and_next_stream_works():
    """S05: more than 32 regular header fields is a stream 400, not a connection error."""
    h = server()
    many = CONNECT + [(b"x-h%d" % i, b"v") for i in range(33)]
    h.openStream(many)
    assert h.requests == []  # the handler never saw it
    [resp] = h.responses(1)
    assert dict(resp.headers)[b":status"] == b"400"
    assert dict(resp.headers)[b"proxy-status"] == b"hbone; error=http_request_error"
    assert resp.stream_ended is not None
    assert not h.goaways()
    assert h.proto.streams == {}
    # exactly 32 is fine, on the same connection
    sid, stream, proto = h.accept(CONNECT + [(b"x-h%d" % i, b"v") for i in range(32)])
    assert sid == 3
    assert dict(h.responses(3)[0].headers)[b":status"] == b"200"
    h.peer.send_data(3, b"ok")
    h.pump()
    assert proto.received == b"ok"


def test_101st_concurrent_stream_is_goaway_protocol_error():
    """S09: the advertised MAX_CONCURRENT_STREAMS (100) is enforced from the first frame."""
    h = server()
    for _ in range(100):
        h.openStream()
    assert len(h.requests) == 100
    assert not h.goaways()
    h.send(headersBlock(h, 201, CONNECT))
    assert len(h.requests) == 100
    h.toPeer()
    [goaway] = h.goaways()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert goaway.last_stream_id == 199
    assert h.transport.disconnecting
    # live streams are told; the connection is closed within the linger
    assert all(s.closed for s, _ in h.requests)
    assert not h.transport.aborted
    h.clock.advance(1.0)
    assert h.transport.aborted
    h.deliverLost()
    assert h.proto.streams == {}


def test_stream_limit_counts_open_streams_only():
    h = server()
    for _ in range(100):
        h.openStream()
    h.proto.respond(h.requests[0][0], 503, error="connection_refused")
    h.pump()
    h.openStream()  # stream 201 fits again
    assert len(h.requests) == 101
    assert not h.goaways()


# -- early data (S21) ------------------------------------------------------------------


def test_early_data_buffered_unacked_then_delivered():
    settings = ConnectionSettings(initialWindowSize=16384)
    h = server(settings=settings)
    sid = h.openStream()
    stream, _ = h.requests[0]
    h.peer.send_data(sid, b"e" * 10000)
    h.peer.send_data(sid, b"E" * 6384)
    h.pump()
    assert h.peer.local_flow_control_window(sid) == 0
    assert not h.windowUpdates(sid)  # not acknowledged while nobody consumes it
    assert not h.responses(sid)
    h.proto.respond(stream, 200)
    proto = Recorder()
    stream.makeConnection(proto)
    h.pump()
    assert proto.received == b"e" * 10000 + b"E" * 6384
    assert h.windowUpdates(sid)  # acknowledged once written downstream
    assert h.peer.local_flow_control_window(sid) == 16384


def test_early_data_with_end_stream_delivers_read_end():
    h = server()
    sid = h.openStream()
    stream, _ = h.requests[0]
    h.peer.send_data(sid, b"hello", end_stream=True)
    h.pump()
    h.proto.respond(stream, 200)
    proto = HalfRecorder()
    stream.makeConnection(proto)
    assert proto.received == b"hello"
    assert proto.readLost == 1
    assert not stream.closed


def test_early_data_dropped_if_tunnel_fails():
    h = server()
    sid = h.openStream()
    stream, _ = h.requests[0]
    h.peer.send_data(sid, b"x" * 1000)
    h.pump()
    h.proto.respond(stream, 503, error="connection_refused")
    h.pump()
    assert stream.closed
    assert h.proto.streams == {}
    assert stream._early is None


def test_dropped_early_data_returns_connection_window():
    """Early DATA of refused tunnels is given back to the connection window; else
    each refusal shrinks it for good and the connection stalls (16 MiB / 1 MiB)."""
    h = server()
    for _ in range(9):
        sid = h.openStream()
        stream, _ = h.requests[-1]
        h.peer.send_data(sid, b"x" * MiB)
        h.pump()
        h.proto.respond(stream, 503, error="connection_refused")
        h.pump()
    assert h.windowUpdates(0)
    # 8 MiB credited back in one WINDOW_UPDATE; h2 holds the 9th until it is half the window
    assert h.peer.outbound_flow_control_window == 15 * MiB


def test_reset_stream_with_paused_consumer_returns_connection_window():
    h = server()
    for _ in range(9):
        sid, stream, proto = h.accept()
        stream.pauseProducing()
        h.peer.send_data(sid, b"y" * MiB)
        h.pump()
        assert not h.windowUpdates(sid)
        h.peer.reset_stream(sid, ErrorCodes.CANCEL)
        h.pump()
        assert proto.lostReason.check(StreamReset)
    # 8 MiB credited back in one WINDOW_UPDATE; h2 holds the 9th until it is half the window
    assert h.peer.outbound_flow_control_window == 15 * MiB


# -- inbound flow control -----------------------------------------------------------------


def test_paused_consumer_stops_acks_and_bounds_memory():
    """With the default 4 MiB stream window: DATA delivered to a protocol whose
    consumer paused the stream is not acknowledged, so the peer stops at 4 MiB."""
    h = server()
    sid, stream, proto = h.accept()
    stream.pauseProducing()  # e.g. the target socket's send buffer is full
    chunk = b"z" * MiB
    sent = 0
    while h.peer.local_flow_control_window(sid) > 0:
        n = min(len(chunk), h.peer.local_flow_control_window(sid))
        h.peer.send_data(sid, chunk[:n])
        sent += n
        h.pump()
    assert sent == 4 * MiB
    assert len(proto.received) == 4 * MiB
    assert not h.windowUpdates(sid)
    assert h.peer.local_flow_control_window(sid) == 0
    # the connection window (16 MiB) is not what stopped it
    assert h.peer.outbound_flow_control_window == 12 * MiB
    stream.resumeProducing()
    h.pump()
    assert h.windowUpdates(sid)
    assert h.peer.local_flow_control_window(sid) == 4 * MiB


def test_ack_only_after_resume_small_window():
    h = server(settings=ConnectionSettings(initialWindowSize=16384))
    sid, stream, proto = h.accept()
    h.peer.send_data(sid, b"a" * 16384)
    h.pump()
    assert h.peer.local_flow_control_window(sid) == 16384  # acked at once when not paused
    stream.pauseProducing()
    h.peer.send_data(sid, b"b" * 16384)
    h.pump()
    assert h.peer.local_flow_control_window(sid) == 0
    updates = len(h.windowUpdates(sid))
    h.clock.advance(60)  # time does not ack either
    h.pump()
    assert len(h.windowUpdates(sid)) == updates
    stream.resumeProducing()
    h.pump()
    assert len(h.windowUpdates(sid)) == updates + 1
    assert h.peer.local_flow_control_window(sid) == 16384


def test_padding_counts_toward_flow_control():
    h = server(settings=ConnectionSettings(initialWindowSize=16384))
    sid, stream, proto = h.accept()
    stream.pauseProducing()
    h.peer.send_data(sid, b"p" * 1000, pad_length=255)
    h.pump()
    assert h.peer.local_flow_control_window(sid) == 16384 - 1256
    assert stream._unacked == 1256
    stream.resumeProducing()
    assert stream._unacked == 0


# -- outbound flow control ------------------------------------------------------------------


def zeroWindowServer(**kw) -> Harness:
    h = server(**kw)
    h.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
    h.pump()
    return h


def test_write_queues_at_zero_window_and_pauses_producer():
    h = zeroWindowServer()
    sid, stream, proto = h.accept()
    producer = FakeProducer()
    stream.registerProducer(producer, True)
    stream.write(b"w" * 1000)
    h.pump()
    assert h.dataFor(sid) == b""
    assert producer.paused and producer.pauses == 1
    assert stream._outbytes == 1000
    h.peer.increment_flow_control_window(400, stream_id=sid)
    h.pump()
    assert h.dataFor(sid) == b"w" * 400
    assert producer.paused  # still 600 waiting
    h.peer.increment_flow_control_window(600, stream_id=sid)
    h.pump()
    assert h.dataFor(sid) == b"w" * 1000
    assert not producer.paused and producer.resumes == 1
    assert stream._outbytes == 0


def test_registering_a_producer_while_output_waits_pauses_it():
    h = zeroWindowServer()
    sid, stream, proto = h.accept()
    stream.write(b"w")
    producer = FakeProducer()
    stream.registerProducer(producer, True)
    assert producer.paused
    with pytest.raises(RuntimeError):
        stream.registerProducer(FakeProducer(), True)


def test_connection_window_blocks_and_window_update_on_stream_0_resumes():
    h = server()
    sid, stream, proto = h.accept()
    producer = FakeProducer()
    stream.registerProducer(producer, True)
    h.peer.increment_flow_control_window(MiB, stream_id=sid)
    h.pump()
    # the peer never granted more than 65535 on the connection
    stream.write(b"c" * 70000)
    h.pump()
    assert len(h.dataFor(sid)) == 65535
    assert producer.paused
    h.peer.increment_flow_control_window(10000)
    h.pump()
    assert len(h.dataFor(sid)) == 70000
    assert not producer.paused


def test_settings_window_change_rechecks_blocked_streams():
    h = zeroWindowServer()
    sid, stream, proto = h.accept()
    stream.write(b"s" * 100)
    h.pump()
    assert h.dataFor(sid) == b""
    h.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    h.pump()
    assert h.dataFor(sid) == b"s" * 100


def test_large_write_split_to_peer_max_frame_size():
    h = server()
    h.peer.update_settings({SettingCodes.MAX_FRAME_SIZE: 32768})
    h.peer.increment_flow_control_window(MiB)
    h.pump()
    sid, stream, proto = h.accept()
    h.peer.increment_flow_control_window(MiB, stream_id=sid)
    h.pump()
    h.frames.clear()
    stream.write(b"L" * 100000)
    h.pump()
    sizes = [len(f.data) for f in sentFrames(h, DataFrame, sid)]
    assert sizes == [32768, 32768, 32768, 100000 - 3 * 32768]


def test_one_read_one_frame_when_peer_allows():
    h = server()
    h.peer.update_settings({SettingCodes.MAX_FRAME_SIZE: MiB})
    h.peer.increment_flow_control_window(MiB)
    h.pump()
    sid, stream, proto = h.accept()
    h.peer.increment_flow_control_window(MiB, stream_id=sid)
    h.pump()
    h.frames.clear()
    stream.write(b"R" * 65536)
    h.pump()
    assert [len(f.data) for f in sentFrames(h, DataFrame, sid)] == [65536]


def test_round_robin_between_blocked_streams():
    h = server()
    sid1, s1, _ = h.accept()
    sid3, s3, _ = h.accept()
    s1.write(b"1" * 65535)
    h.pump()
    s3.write(b"3" * 1000)
    h.pump()
    assert h.dataFor(sid3) == b""  # connection window spent on stream 1
    h.peer.increment_flow_control_window(1000)
    h.pump()
    assert h.dataFor(sid3) == b"3" * 1000


# -- the connection's own producer: transport backpressure ---------------------------------


def test_paused_transport_stops_stream_data():
    h = server()
    sid, stream, proto = h.accept()
    producer = FakeProducer()
    stream.registerProducer(producer, True)
    assert h.transport.producer is h.proto
    h.proto.pauseProducing()
    stream.write(b"queued while TCP is full")
    assert h.transport.value() == b""
    assert producer.paused
    h.proto.resumeProducing()
    h.pump()
    assert h.dataFor(sid) == b"queued while TCP is full"
    assert not producer.paused


def test_control_frames_while_paused_are_capped():
    """S06 variant: a peer that keeps sending PINGs while not reading makes us queue
    PING ACKs; past 16 KiB of them the connection is aborted. The PINGs come at
    10/s, within any PING rate limit, so only the control-queue cap can trip."""
    h = server()
    h.proto.pauseProducing()
    ackSize = 9 + 8
    limit = ConnectionSettings().maxControlBytesWhilePaused
    allowed = limit // ackSize
    for i in range(allowed):
        h.send(PingFrame(0, opaque_data=b"%08d" % i).serialize())
        h.clock.advance(0.1)
    assert not h.transport.aborted
    assert len(h.transport.value()) == allowed * ackSize
    h.send(PingFrame(0, opaque_data=b"overflow").serialize())
    assert h.transport.aborted
    assert len(h.transport.value()) == allowed * ackSize  # the last one was not written
    h.deliverLost()
    assert h.proto.closed


def test_control_cap_resets_on_resume():
    h = server()
    ackSize = 17
    limit = ConnectionSettings().maxControlBytesWhilePaused
    for round in range(3):
        h.proto.pauseProducing()
        for i in range(limit // ackSize):
            h.send(PingFrame(0, opaque_data=b"%08d" % i).serialize())
            h.clock.advance(0.1)
        h.proto.resumeProducing()
        h.transport.clear()
    assert not h.transport.aborted


# -- half-close ---------------------------------------------------------------------------------


def test_peer_end_stream_is_read_connection_lost():
    h = server()
    sid, stream, proto = h.accept(protocol=HalfRecorder())
    h.peer.send_data(sid, b"last bytes", end_stream=True)
    h.pump()
    assert proto.received == b"last bytes"
    assert proto.readLost == 1
    assert proto.lostReason is None and not stream.closed
    # the other direction still works
    stream.write(b"reply")
    stream.loseWriteConnection()
    h.pump()
    assert h.dataFor(sid) == b"reply"
    assert h.ended(sid)
    assert proto.writeLost == 1
    assert stream.closed
    assert proto.lostReason.check(ConnectionDone)
    assert h.proto.streams == {}
    assert not h.resets(sid)


def test_peer_end_stream_closes_plain_protocol():
    h = server()
    sid, stream, proto = h.accept(protocol=Recorder())
    h.peer.send_data(sid, b"bye", end_stream=True)
    h.pump()
    assert proto.received == b"bye"
    assert h.ended(sid)  # our END_STREAM, as TCP close would send FIN
    assert proto.lostReason.check(ConnectionDone)
    assert not h.resets(sid)


def test_lose_write_connection_after_queued_bytes():
    h = zeroWindowServer()
    sid, stream, proto = h.accept(protocol=HalfRecorder())
    stream.write(b"q" * 300)
    stream.loseWriteConnection()
    stream.write(b"ignored after loseWriteConnection")
    h.pump()
    assert not h.ended(sid)
    h.peer.increment_flow_control_window(100, stream_id=sid)
    h.pump()
    assert h.dataFor(sid) == b"q" * 100
    assert not h.ended(sid)
    assert proto.writeLost == 0
    h.peer.increment_flow_control_window(200, stream_id=sid)
    h.pump()
    assert h.dataFor(sid) == b"q" * 300
    assert h.ended(sid)
    assert proto.writeLost == 1
    assert not stream.closed  # the peer's direction is still open
    h.peer.send_data(sid, b"more from peer")
    h.pump()
    assert proto.received == b"more from peer"


def test_empty_end_stream_when_nothing_queued():
    h = server()
    sid, stream, proto = h.accept(protocol=HalfRecorder())
    h.frames.clear()
    stream.loseWriteConnection()
    h.pump()
    [frame] = sentFrames(h, DataFrame, sid)
    assert frame.data == b"" and "END_STREAM" in frame.flags


def test_lose_connection_while_peer_sending_resets_no_error():
    h = server()
    sid, stream, proto = h.accept(protocol=HalfRecorder())
    stream.write(b"done")
    stream.loseConnection()
    h.pump()
    assert h.dataFor(sid) == b"done"
    assert h.ended(sid)
    assert h.resets(sid) == [ErrorCodes.NO_ERROR]
    assert proto.lostReason.check(ConnectionDone)


# -- resets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [ErrorCodes.CONNECT_ERROR, ErrorCodes.CANCEL, ErrorCodes.INTERNAL_ERROR, 0x42])
def test_rst_stream_received_is_stream_reset(code):
    h = server()
    sid, stream, proto = h.accept(protocol=HalfRecorder())
    producer = FakeProducer()
    stream.registerProducer(producer, True)
    h.peer.reset_stream(sid, code)
    h.pump()
    assert proto.lostReason.check(StreamReset)
    assert proto.lostReason.value.errorCode == code
    assert stream.closed and h.proto.streams == {}
    stream.write(b"after reset")  # ignored, no crash
    h.pump()
    assert h.dataFor(sid) == b""


def test_rst_no_error_without_end_stream_is_a_reset():
    h = server()
    sid, stream, proto = h.accept(protocol=HalfRecorder())
    h.peer.reset_stream(sid, ErrorCodes.NO_ERROR)
    h.pump()
    assert proto.lostReason.check(StreamReset)
    assert proto.lostReason.value.errorCode == ErrorCodes.NO_ERROR


def test_rst_no_error_after_end_stream_is_clean_close():
    h = zeroWindowServer()
    sid, stream, proto = h.accept(protocol=HalfRecorder())
    stream.write(b"never sent")  # blocked by the zero window
    h.peer.send_data(sid, b"all of it", end_stream=True)
    h.pump()
    assert proto.readLost == 1
    h.peer.reset_stream(sid, ErrorCodes.NO_ERROR)
    h.pump()
    assert proto.received == b"all of it"
    assert proto.lostReason.check(ConnectionDone)
    assert proto.writeLost == 1
    assert stream.closed and h.proto.streams == {}
    assert h.dataFor(sid) == b""


def test_abort_connection_sends_rst_cancel():
    h = server()
    sid, stream, proto = h.accept()
    stream.abortConnection()
    h.pump()
    assert h.resets(sid) == [ErrorCodes.CANCEL]
    assert proto.lostReason.check(TunnelAborted)
    assert stream.closed and h.proto.streams == {}
    stream.abortConnection()  # idempotent
    h.pump()
    assert h.resets(sid) == [ErrorCodes.CANCEL]


def test_reset_stream_connect_error():
    h = server()
    sid, stream, proto = h.accept()
    stream.resetStream(ErrorCodes.CONNECT_ERROR)
    h.pump()
    assert h.resets(sid) == [ErrorCodes.CONNECT_ERROR]


def test_stop_producing_resets():
    h = server()
    sid, stream, proto = h.accept()
    stream.stopProducing()
    h.pump()
    assert h.resets(sid) == [ErrorCodes.CANCEL]


def test_trailers_get_rst_protocol_error():
    h = server()
    sid, stream, proto = h.accept()
    h.peer.send_data(sid, b"body")
    h.peer.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    h.pump()
    assert proto.received == b"body"
    assert h.resets(sid) == [ErrorCodes.PROTOCOL_ERROR]
    assert stream.closed
    assert not h.goaways()
    sid2, _, proto2 = h.accept()  # the connection lives on
    h.peer.send_data(sid2, b"x")
    h.pump()
    assert proto2.received == b"x"


def test_stream_handler_exception_resets_internal_error():
    def boom(stream, headers):
        raise RuntimeError("handler bug")

    h = server(handler=boom)
    h.openStream()
    assert h.resets(1) == [ErrorCodes.INTERNAL_ERROR]
    assert h.proto.streams == {}


# -- client role ----------------------------------------------------------------------------------


def test_client_ready_only_after_peer_settings():
    h = Harness("client")
    fired = []
    h.proto.whenReady().addCallback(fired.append)
    h.toPeer()  # our preface reaches the peer
    assert fired == [] and not h.proto.ready
    assert h.proto.capacity == 0
    h.peer.initiate_connection()
    h.toProto()
    assert fired == [h.proto]
    assert h.proto.capacity == 100
    d = h.proto.whenReady()
    assert d.called


def test_client_open_tunnel_200():
    h = client()
    stream, d = h.proto.openTunnel(CONNECT, "example.com:443")
    got = []
    d.addCallback(got.append)
    [req] = h.pump()
    assert isinstance(req, RequestReceived)
    assert req.headers[:2] == CONNECT
    assert got == []
    h.peer.send_headers(stream.streamID, [(b":status", b"200")])
    h.pump()
    assert got == [stream]
    assert h.proto.capacity == 99
    proto = Recorder()
    stream.makeConnection(proto)
    stream.write(b"up")
    h.peer.send_data(stream.streamID, b"down")
    h.pump()
    assert proto.received == b"down"
    assert h.dataFor(stream.streamID) == b"up"


def test_client_non_200_is_tunnel_refused():
    h = client()
    stream, d = h.proto.openTunnel(CONNECT, "example.com:443")
    h.pump()
    h.peer.send_headers(
        stream.streamID,
        [(b":status", b"503"), (b"proxy-status", b"ztunnel; error=connection_refused")],
        end_stream=True,
    )
    h.pump()
    failures = []
    d.addErrback(failures.append)
    [f] = failures
    assert f.check(TunnelRefused)
    assert f.value.status == 503
    assert f.value.proxyStatus == "ztunnel; error=connection_refused"
    assert f.value.proxyError == "connection_refused"
    assert f.value.authority == "example.com:443"
    assert stream.closed and h.proto.streams == {}


def test_client_non_200_without_end_stream_is_cancelled():
    h = client()
    stream, d = h.proto.openTunnel(CONNECT, "example.com:443")
    h.pump()
    h.peer.send_headers(stream.streamID, [(b":status", b"401"), (b"www-authenticate", b"Bearer")])
    h.pump()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].value.status == 401
    assert h.resets(stream.streamID) == [ErrorCodes.CANCEL]


def test_client_ignores_1xx():
    h = client()
    stream, d = h.proto.openTunnel(CONNECT, "example.com:443")
    h.pump()
    h.peer.send_headers(stream.streamID, [(b":status", b"100")])
    h.pump()
    assert not d.called
    h.peer.send_headers(stream.streamID, [(b":status", b"200")])
    h.pump()
    assert d.called


def test_client_refused_stream_is_refused_stream():
    h = client()
    stream, d = h.proto.openTunnel(CONNECT, "example.com:443")
    h.pump()
    h.peer.reset_stream(stream.streamID, ErrorCodes.REFUSED_STREAM)
    h.pump()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(RefusedStream)
    assert failures[0].value.status == 503
    assert h.proto.streams == {}


def test_client_reset_before_response_is_stream_reset():
    h = client()
    stream, d = h.proto.openTunnel(CONNECT, "example.com:443")
    h.pump()
    h.peer.reset_stream(stream.streamID, ErrorCodes.CONNECT_ERROR)
    h.pump()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(StreamReset)
    assert failures[0].value.errorCode == ErrorCodes.CONNECT_ERROR


def test_client_data_after_refusal_is_discarded_and_window_returned():
    h = client()
    for _ in range(9):
        stream, d = h.proto.openTunnel(CONNECT, "example.com:443")
        d.addErrback(lambda f: None)
        h.pump()
        h.peer.send_headers(stream.streamID, [(b":status", b"503")])
        h.peer.send_data(stream.streamID, b"x" * MiB)
        h.pump()
        assert h.resets(stream.streamID) == [ErrorCodes.CANCEL]
    assert h.proto.streams == {}
    # 8 MiB credited back in one WINDOW_UPDATE; h2 holds the 9th until it is half the window
    assert h.peer.outbound_flow_control_window == 15 * MiB


def test_client_lost_connection_fails_pending_and_open_tunnels():
    h = client()
    s1, d1 = h.proto.openTunnel(CONNECT, "example.com:443")
    h.pump()
    h.peer.send_headers(s1.streamID, [(b":status", b"200")])
    h.pump()
    p1 = Recorder()
    s1.makeConnection(p1)
    s3, d3 = h.proto.openTunnel(CONNECT, "example.com:443")
    h.pump()
    h.deliverLost(Failure(ConnectionLost("reset by peer")))
    failures = []
    d3.addErrback(failures.append)
    assert failures[0].check(HopUnreachable)
    assert p1.lostReason.check(ConnectionLost)
    assert h.proto.streams == {}
    with pytest.raises(RefusedStream):
        h.proto.openTunnel(CONNECT, "example.com:443")


def test_client_ready_fails_if_closed_before_settings():
    h = Harness("client")
    errors = []
    h.proto.whenReady().addErrback(errors.append)
    h.deliverLost(Failure(ConnectionDone()))
    assert errors[0].check(HopUnreachable)
    later = []
    h.proto.whenReady().addErrback(later.append)
    assert later[0].check(HopUnreachable)


def test_client_capacity_follows_peer_max_concurrent_streams():
    h = client()
    assert h.proto.capacity == 100
    calls = []
    h.proto.onCapacity = calls.append
    h.peer.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    h.pump()
    assert calls == [h.proto]
    assert h.proto.capacity == 2
    s1, d1 = h.proto.openTunnel(CONNECT, "example.com:443")
    assert h.proto.capacity == 1
    h.proto.reserved = 1
    assert h.proto.capacity == 0
    h.proto.reserved = 0
    h.pump()
    h.peer.send_headers(s1.streamID, [(b":status", b"200")])
    h.pump()
    s1.abortConnection()
    assert calls == [h.proto, h.proto]  # a slot came free
    assert h.proto.capacity == 2
    h.peer.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
    h.pump()
    assert h.proto.capacity == 100  # never more than maxStreamsPerConnection


def test_client_role_refuses_a_stream_opened_by_the_server():
    """Role confusion: HEADERS on an even (server-initiated) stream toward a
    client is a connection error, not a tunnel."""
    h = client()
    # the peer is an h2 server and cannot send a request through h2; craft one
    f = HeadersFrame(2)
    f.data = h.peer.encoder.encode([(b":status", b"200")])
    f.flags.add("END_HEADERS")
    h.send(f.serialize())
    h.toPeer()
    assert h.goaways()  # h2 refuses an even stream from the server as a connection error


# -- GOAWAY from the peer ---------------------------------------------------------------------------


def test_graceful_goaway_lets_streams_below_last_finish():
    h = client()
    gone = []
    h.proto.onGoingAway = gone.append
    s1, d1 = h.proto.openTunnel(CONNECT, "a:1")
    h.pump()
    h.peer.send_headers(1, [(b":status", b"200")])
    h.pump()
    p1 = HalfRecorder()
    s1.makeConnection(p1)
    s3, d3 = h.proto.openTunnel(CONNECT, "a:3")
    s5, d5 = h.proto.openTunnel(CONNECT, "a:5")
    h.pump()
    failed = {}
    d3.addErrback(lambda f: failed.update({3: f}))
    d5.addErrback(lambda f: failed.update({5: f}))
    h.send(GoAwayFrame(0, last_stream_id=1, error_code=ErrorCodes.NO_ERROR).serialize())
    assert gone == [h.proto]
    assert failed[3].check(RefusedStream) and failed[5].check(RefusedStream)
    assert set(h.proto.streams) == {1}
    assert h.proto.capacity == 0
    with pytest.raises(RefusedStream):
        h.proto.openTunnel(CONNECT, "a:7")
    assert not h.transport.disconnecting
    # stream 1 runs to completion, both ways
    s1.write(b"request")
    h.peer.send_data(1, b"response")
    h.pump()
    assert p1.received == b"response"
    assert h.dataFor(1) == b"request"
    h.peer.send_data(1, b"", end_stream=True)
    h.pump()
    assert p1.readLost == 1
    assert not h.transport.disconnecting
    s1.loseWriteConnection()
    h.pump()
    assert h.ended(1)
    assert p1.lostReason.check(ConnectionDone)
    # the last stream ended: the connection closes (and can close over TLS)
    assert h.transport.disconnecting
    assert h.transport.closeStarted
    assert not h.transport.aborted
    h.deliverLost()
    assert h.proto.closed


def test_graceful_goaway_without_streams_closes_at_once():
    h = client()
    h.send(GoAwayFrame(0, last_stream_id=0).serialize())
    assert h.proto.goingAway
    assert h.transport.disconnecting and h.transport.closeStarted
    assert not h.transport.aborted


def test_two_step_drain_goaway():
    """A drain sends GOAWAY(2^31-1) then GOAWAY(last): nothing fails on the first."""
    h = client()
    s1, d1 = h.proto.openTunnel(CONNECT, "a:1")
    s3, d3 = h.proto.openTunnel(CONNECT, "a:3")
    h.pump()
    h.send(GoAwayFrame(0, last_stream_id=2**31 - 1).serialize())
    assert not d1.called and not d3.called
    h.send(GoAwayFrame(0, last_stream_id=1).serialize())
    assert not d1.called
    failures = []
    d3.addErrback(failures.append)
    assert failures[0].check(RefusedStream)
    h.peer.send_headers(1, [(b":status", b"200")])
    h.pump()
    assert d1.called


def test_server_role_receiving_goaway_keeps_its_streams():
    h = server()
    sid, stream, proto = h.accept()
    h.send(GoAwayFrame(0, last_stream_id=0).serialize())
    assert h.proto.streams == {1: stream}  # inbound streams are not refused
    stream.write(b"still flowing")
    h.toPeer()
    assert h.dataFor(1) == b"still flowing"


@pytest.mark.parametrize("code", [ErrorCodes.INTERNAL_ERROR, ErrorCodes.ENHANCE_YOUR_CALM, 0x99])
def test_error_goaway_aborts_all_streams(code):
    h = client()
    s1, d1 = h.proto.openTunnel(CONNECT, "a:1")
    h.pump()
    h.peer.send_headers(1, [(b":status", b"200")])
    h.pump()
    p1 = Recorder()
    s1.makeConnection(p1)
    s3, d3 = h.proto.openTunnel(CONNECT, "a:3")
    h.pump()
    gone = []
    h.proto.onGoingAway = gone.append
    h.send(GoAwayFrame(0, last_stream_id=3, error_code=code).serialize())
    assert gone == [h.proto]
    assert h.transport.aborted
    h.deliverLost(Failure(ConnectionLost("aborted")))
    assert p1.lostReason.check(ConnectionLost)
    assert "GOAWAY" in p1.lostReason.getErrorMessage()
    failures = []
    d3.addErrback(failures.append)
    assert failures[0].check(HopUnreachable)
    assert h.proto.streams == {}


# -- sending GOAWAY ---------------------------------------------------------------------------------


def rawSent(h: Harness) -> list:
    """hbone's output, parsed but not given to the stock h2 peer (which refuses
    everything after a GOAWAY it received: python-hyper/h2#1181)."""
    data = h.transport.value()
    h.transport.clear()
    return parseFrames(data)


def test_our_goaway_keeps_live_streams_flowing():
    h = server()
    sid, stream, proto = h.accept()
    h.proto.goAway(ErrorCodes.NO_ERROR)
    [goaway] = rawSent(h)
    assert isinstance(goaway, GoAwayFrame)
    assert goaway.last_stream_id == 1 and goaway.error_code == 0
    # our own GOAWAY did not close h2 for us: the live stream flows both ways
    stream.write(b"after our GOAWAY")
    [data] = rawSent(h)
    assert isinstance(data, DataFrame) and data.data == b"after our GOAWAY"
    h.send(DataFrame(sid, data=b"from peer").serialize())
    assert proto.received == b"from peer"


def test_drain_goaway_serves_streams_up_to_the_last_id():
    """GOAWAY(2^31-1) first: streams already in flight are still served; after
    GOAWAY(last), streams above last get REFUSED_STREAM (PROTOCOL §3)."""
    h = server()
    h.accept()
    h.proto.goAway(ErrorCodes.NO_ERROR, lastStreamID=2**31 - 1)
    rawSent(h)
    h.send(headersBlock(h, 3, CONNECT))
    assert [s.streamID for s, _ in h.requests] == [1, 3]
    assert not [f for f in rawSent(h) if isinstance(f, RstStreamFrame)]
    h.proto.goAway(ErrorCodes.NO_ERROR)
    [goaway] = rawSent(h)
    assert goaway.last_stream_id == 3
    h.proto.goAway(ErrorCodes.NO_ERROR, lastStreamID=2**31 - 1)
    [goaway] = rawSent(h)
    assert goaway.last_stream_id == 3  # it never goes up again
    h.send(headersBlock(h, 5, CONNECT))
    assert [s.streamID for s, _ in h.requests] == [1, 3]
    [rst] = rawSent(h)
    assert isinstance(rst, RstStreamFrame) and rst.stream_id == 5
    assert rst.error_code == ErrorCodes.REFUSED_STREAM


# -- protocol errors --------------------------------------------------------------------------------


def test_protocol_error_goaway_then_close_within_linger():
    h = server()
    sid, stream, proto = h.accept()
    h.send(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WINDOW_UPDATE increment 0 on stream 0
    h.toPeer()
    [goaway] = h.goaways()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert proto.lostReason is not None and proto.lostReason.check(ConnectionLost)
    assert h.transport.disconnecting and not h.transport.aborted
    assert h.proto.goingAway
    assert h.proto.capacity == 0
    h.clock.advance(0.99)
    assert not h.transport.aborted
    h.clock.advance(0.01)
    assert h.transport.aborted
    h.deliverLost()
    assert h.clock.getDelayedCalls() == []


def test_data_after_protocol_error_ignored():
    h = server()
    h.send(b"\x00\x00\x07\x06\x00\x00\x00\x00\x00" + b"7 bytes")  # a PING of 7 bytes
    assert h.transport.disconnecting
    h.send(headersBlock(h, 1, CONNECT))  # ignored, no exception
    assert h.requests == []


# -- keepalive and timers ---------------------------------------------------------------------------


def test_keepalive_ping_after_silence_and_close_without_ack():
    h = server()
    h.frames.clear()
    h.clock.advance(9.9)
    h.toPeer()
    assert not sentFrames(h, PingFrame)
    h.clock.advance(0.1)
    h.toPeer()
    [ping] = sentFrames(h, PingFrame)
    assert "ACK" not in ping.flags
    assert h.eventsOf(PingReceived)
    # the peer's ACK is never delivered
    h.peer.clear_outbound_data_buffer()
    h.clock.advance(19.9)
    assert not h.transport.disconnecting
    h.clock.advance(0.1)
    assert h.transport.aborted
    h.deliverLost(Failure(ConnectionLost("aborted")))
    assert h.proto.closed


def test_keepalive_ack_keeps_connection():
    h = server()
    sid, stream, proto = h.accept()
    for _ in range(20):
        h.clock.advance(5)
        h.pump()  # PINGs answered
    assert not h.transport.disconnecting
    assert len(sentFrames(h, PingFrame)) >= 9
    assert stream in h.proto.streams.values()


def test_keepalive_missed_ack_aborts_tunnels():
    h = server()
    sid, stream, proto = h.accept()
    h.clock.advance(10)
    h.toPeer()
    h.peer.clear_outbound_data_buffer()
    h.clock.advance(20)
    assert h.transport.aborted
    h.deliverLost(Failure(ConnectionLost("aborted")))
    assert proto.lostReason.check(ConnectionLost)
    assert "PING" in proto.lostReason.getErrorMessage()


def test_traffic_postpones_ping():
    h = server()
    sid, stream, proto = h.accept()
    h.frames.clear()
    for _ in range(10):
        h.clock.advance(6)
        h.peer.send_data(sid, b"tick")
        h.pump()
    assert not sentFrames(h, PingFrame)


def test_settings_deadline_closes_silent_connection():
    h = Harness("server")  # the peer never sends its preface
    errors = []
    h.proto.whenReady().addErrback(errors.append)
    h.clock.advance(9.9)
    assert not h.transport.disconnecting
    h.clock.advance(0.1)
    assert h.transport.aborted
    h.deliverLost(Failure(ConnectionLost("aborted")))
    assert errors[0].check(HopUnreachable)
    assert errors[0].value.status == 504
    assert "SETTINGS" in errors[0].getErrorMessage()


def test_settings_deadline_met_by_peer():
    h = Harness("server")
    h.clock.advance(5)
    h.handshake()
    h.clock.advance(6)
    h.pump()
    assert not h.transport.disconnecting


def test_handshake_deadline_closes_silent_tls_connection():
    h = Harness("client", expectALPN=b"h2")  # no TLS handshake ever completes
    assert h.transport.value() == b""  # nothing before the handshake
    errors = []
    h.proto.whenReady().addErrback(errors.append)
    h.clock.advance(10)
    assert h.transport.aborted
    h.deliverLost(Failure(ConnectionLost("aborted")))
    assert errors[0].check(HopUnreachable)
    assert "TLS handshake" in errors[0].getErrorMessage()


@pytest.mark.parametrize("role,idle", [("server", 600.0), ("client", 300.0)])
def test_idle_connection_goaway_and_close(role, idle):
    h = Harness(role)
    h.handshake()
    gone = []
    h.proto.onGoingAway = gone.append
    t = 0.0
    while t < idle - 5:
        h.clock.advance(5)
        t += 5
        h.pump()  # PINGs answered: only idleness can close it
    assert not h.transport.disconnecting
    h.clock.advance(5)
    h.toPeer()
    [goaway] = h.goaways()
    assert goaway.error_code == ErrorCodes.NO_ERROR
    assert h.transport.disconnecting and h.transport.closeStarted
    assert not h.transport.aborted
    assert gone == [h.proto]


def test_connection_with_streams_is_not_idle():
    h = server(settings=ConnectionSettings(idleTimeout=30))
    sid, stream, proto = h.accept()
    for _ in range(20):
        h.clock.advance(5)
        h.pump()
    assert not h.transport.disconnecting
    stream.loseConnection()
    h.peer.end_stream(sid)
    h.pump()
    assert h.proto.streams == {}
    for _ in range(5):
        h.clock.advance(5)
        h.pump()
    assert not h.transport.disconnecting
    h.clock.advance(5)
    h.toPeer()
    assert h.goaways() and h.transport.disconnecting


def test_no_timers_left_after_close():
    h = server()
    h.accept()
    h.deliverLost(Failure(ConnectionLost("gone")))
    assert h.clock.getDelayedCalls() == []


# -- POST form with content-length ---------------------------------------------------------------


def postServer(length: int, **kw):
    h = server(**kw)
    sid = h.openStream(POST + [(b"content-length", str(length).encode())])
    stream, _ = h.requests[0]
    return h, sid, stream


def attachPost(h, stream, length):
    h.proto.respond(stream, 200)
    stream.expectBodyLength(length)
    proto = HalfRecorder()
    stream.makeConnection(proto)
    h.pump()
    return proto


def test_post_body_length_ends_client_direction():
    h, sid, stream = postServer(10)
    proto = attachPost(h, stream, 10)
    h.peer.send_data(sid, b"0123")
    h.pump()
    assert proto.readLost == 0
    h.peer.send_data(sid, b"456789")
    h.pump()
    assert proto.received == b"0123456789"
    assert proto.readLost == 1  # a half-close, before END_STREAM
    h.peer.end_stream(sid)
    h.pump()
    assert not h.resets(sid)
    stream.write(b"response body")
    stream.loseWriteConnection()
    h.pump()
    assert h.dataFor(sid) == b"response body"
    assert proto.lostReason.check(ConnectionDone)
    assert not h.goaways()


def test_post_body_counted_with_early_data():
    h, sid, stream = postServer(6)
    h.peer.send_data(sid, b"early")
    h.pump()
    proto = attachPost(h, stream, 6)
    assert proto.received == b"early"
    assert proto.readLost == 0
    h.peer.send_data(sid, b"!", end_stream=True)
    h.pump()
    assert proto.received == b"early!"
    assert proto.readLost == 1
    assert not h.resets(sid)


def test_post_body_of_zero_is_ended_at_once():
    h, sid, stream = postServer(0)
    proto = attachPost(h, stream, 0)
    assert proto.readLost == 1


def test_post_body_running_long_resets_protocol_error():
    h, sid, stream = postServer(4)
    proto = attachPost(h, stream, 4)
    h.peer.send_data(sid, b"12345")
    h.pump()
    assert h.resets(sid) == [ErrorCodes.PROTOCOL_ERROR]
    assert proto.lostReason is not None and not proto.lostReason.check(ConnectionDone)
    assert not h.goaways()  # a stream error, not a connection error
    sid2, _, p2 = h.accept()
    h.peer.send_data(sid2, b"fine")
    h.pump()
    assert p2.received == b"fine"


def test_post_body_ending_early_resets_protocol_error():
    h, sid, stream = postServer(10)
    proto = attachPost(h, stream, 10)
    h.peer.send_data(sid, b"short", end_stream=True)
    h.pump()
    assert h.resets(sid) == [ErrorCodes.PROTOCOL_ERROR]
    assert proto.readLost == 0
    assert proto.lostReason is not None and not proto.lostReason.check(ConnectionDone)
    assert not h.goaways()


def test_post_early_body_running_long_resets():
    h, sid, stream = postServer(3)
    h.peer.send_data(sid, b"too long")
    h.pump()
    h.proto.respond(stream, 200)
    stream.expectBodyLength(3)
    h.pump()
    assert h.resets(sid) == [ErrorCodes.PROTOCOL_ERROR]
    assert stream.closed
    assert not h.goaways()


def test_post_early_body_ending_early_resets():
    h, sid, stream = postServer(10)
    h.peer.send_data(sid, b"short", end_stream=True)
    h.pump()
    h.proto.respond(stream, 200)
    stream.expectBodyLength(10)
    proto = HalfRecorder()
    stream.makeConnection(proto)
    h.pump()
    assert h.resets(sid) == [ErrorCodes.PROTOCOL_ERROR]
    assert proto.readLost == 0
    assert not h.goaways()


def test_stream_window_update_while_transport_paused_sends_nothing():
    """A WINDOW_UPDATE for a blocked stream must not push DATA into a paused
    transport (which would also count it against the control-frame cap)."""
    h = zeroWindowServer()
    sid, stream, proto = h.accept()
    stream.write(b"b" * 60000)
    h.pump()
    h.proto.pauseProducing()
    h.peer.increment_flow_control_window(60000, stream_id=sid)
    h.toProto()
    assert not [f for f in parseFrames(h.transport.value()) if isinstance(f, DataFrame)]
    assert not h.transport.disconnecting
    h.proto.resumeProducing()
    h.pump()
    assert h.dataFor(sid) == b"b" * 60000


def test_no_end_stream_while_window_negative():
    """RFC 9113 §6.9.2: after the peer shrinks INITIAL_WINDOW_SIZE below what is in
    flight, nothing flow-controlled is sent (not even an empty END_STREAM DATA)
    until WINDOW_UPDATE makes the window non-negative again; an h2 peer treats it
    as FLOW_CONTROL_ERROR for the whole connection."""
    h = server()
    sid, stream, proto = h.accept(protocol=HalfRecorder())
    stream.write(b"w")
    h.pump()
    h.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
    h.pump()
    assert h.proto._conn.local_flow_control_window(sid) == -1
    stream.loseWriteConnection()
    h.pump()
    assert not h.ended(sid)
    assert not h.goaways()
    h.peer.increment_flow_control_window(1, stream_id=sid)
    h.pump()
    assert h.ended(sid)
    assert proto.writeLost == 1
    assert not h.goaways()


def test_header_list_over_8k_is_goaway_enhance_your_calm():
    h = server()
    sid, stream, proto = h.accept()
    big = CONNECT + [(b"x-pad-%d" % i, b"v" * 1000) for i in range(9)]
    h.peer.send_headers(3, big)
    h.pump()
    [goaway] = h.goaways()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert [s.streamID for s, _ in h.requests] == [1]
    assert proto.lostReason.check(ConnectionLost)
    assert h.transport.disconnecting
