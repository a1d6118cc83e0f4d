"""The DATA fast path of :class:`hbone.h2.connection.HBoneH2Protocol`.

Received payloads of plain DATA frames go straight to their stream and outgoing
DATA frames are framed by hbone (docs/performance.md). These tests hold it to
what h2 does with the same bytes:

* the same byte stream, cut anywhere (frame headers, the preface, payloads),
  gives the same tunnel bytes, ends and flow-control state as the stream fed
  whole through h2 alone (``fastPath = False``);
* a payload is handed on as it arrives, not when its frame completes;
* frames h2 must judge (over a window, on an unknown or closed stream, PADDED,
  END_STREAM, empty) get h2's answer, byte for byte the same as without the
  fast path;
* a stream closed in the middle of a frame gives the rest of the frame back to
  the connection window;
* what hbone sends is well-formed and in order (a response's HEADERS before its
  DATA), and never more than the peer's windows allow (the peer is a real h2
  that refuses overruns).
"""

from __future__ import annotations

import os

import pytest
from h2.errors import ErrorCodes
from h2.events import DataReceived, ResponseReceived
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame

from hbone.h2.connection import ConnectionSettings, HBoneH2Protocol
from tests.h2harness import CONNECT, PREFACE, HalfRecorder, Harness, Recorder, parseFrames


def _windows(proto: HBoneH2Protocol) -> dict:
    """Receive-window state as h2 keeps it: the window plus what was processed but
    not yet announced, per connection and per stream (the sum is what matters:
    when WINDOW_UPDATE goes out may differ with the size of the pieces)."""
    conn = proto._conn
    state = {0: conn._inbound_flow_control_window_manager}
    for sid, stream in conn.streams.items():
        if stream.open:  # a closed stream's window no longer matters (h2 stops crediting it)
            state[sid] = stream._inbound_window_manager
    return {sid: (m.current_window_size + m._bytes_processed) for sid, m in state.items()}


def _acceptAll(harness: Harness, count: int, half: bool = True) -> list:
    """``count`` tunnels, answered 200, each with a (half-closeable) recorder."""
    tunnels = []
    for _ in range(count):
        tunnels.append(harness.accept(protocol=HalfRecorder() if half else Recorder()))
    return tunnels


def _peerBytes(harness: Harness) -> bytes:
    return harness.peer.data_to_send()


def _pair(fast: bool, streams: int = 2, settings: ConnectionSettings = ConnectionSettings()) -> tuple[Harness, list]:
    h = Harness(settings=settings)
    h.proto.fastPath = fast
    h.handshake()
    return h, _acceptAll(h, streams)


# -- one byte stream, any cut ------------------------------------------------------

_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.integers(0, 1), st.integers(1, 40000), st.sampled_from([None, 0, 7])),
        st.tuples(st.just("end"), st.integers(0, 1), st.integers(0, 3000), st.just(None)),
        st.tuples(st.just("ping"), st.just(0), st.just(0), st.just(None)),
        st.tuples(st.just("window"), st.just(0), st.integers(1, 1000), st.just(None)),
        st.tuples(st.just("reset"), st.integers(0, 1), st.just(0), st.just(None)),
    ),
    min_size=1,
    max_size=12,
)


def _script(peer, sids: list[int], actions) -> None:
    """Drive a real h2 client through ``actions`` (skipping what it may not do)."""
    done = set()
    for kind, which, size, pad in actions:
        sid = sids[which]
        if kind == "ping":
            peer.ping(os.urandom(8))
        elif kind == "window":
            peer.increment_flow_control_window(size)
        elif sid in done:
            continue
        elif kind == "data":
            size = min(size, peer.local_flow_control_window(sid) - (pad + 1 if pad is not None else 0))
            if size > 0:
                peer.send_data(sid, os.urandom(size), pad_length=pad)
        elif kind == "end":
            size = min(size, peer.local_flow_control_window(sid))
            peer.send_data(sid, os.urandom(size), end_stream=True)
            done.add(sid)
        elif kind == "reset":
            peer.reset_stream(sid, ErrorCodes.CANCEL)
            done.add(sid)


def _outcome(harness: Harness, tunnels) -> dict:
    harness.clock.advance(0)
    return {
        "data": [p.received for _, _, p in tunnels],
        "readEnded": [p.readLost for _, _, p in tunnels],
        "lost": [p.lostReason is not None for _, _, p in tunnels],
        "windows": _windows(harness.proto),
        "closed": harness.proto.closed or harness.proto._h2Closed,
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=_ACTIONS, cuts=st.lists(st.integers(0, 1 << 20), max_size=20), data=st.data())
def test_anyCutOfTheStream_matchesH2Alone(actions, cuts, data) -> None:
    slow, slowTunnels = _pair(fast=False)
    fast, fastTunnels = _pair(fast=True)
    sids = [sid for sid, _, _ in slowTunnels]
    assert sids == [sid for sid, _, _ in fastTunnels]
    # one script, one byte stream: the same bytes to both
    _script(slow.peer, sids, actions)
    blob = _peerBytes(slow)
    slow.send(blob)
    points = sorted({c % (len(blob) + 1) for c in cuts})
    # plus a cut inside every frame header, somewhere
    points = sorted(set(points) | {min(len(blob), p + data.draw(st.integers(1, 8))) for p in points[:5]})
    last = 0
    for p in points + [len(blob)]:
        if p > last:
            fast.send(blob[last:p])
            last = p
    assert _outcome(fast, fastTunnels) == _outcome(slow, slowTunnels)


@pytest.mark.parametrize("cut", range(1, 9))
def test_frameHeaderSplitAnywhere(cut: int) -> None:
    h, [(sid, _, tunnel)] = _pair(fast=True, streams=1)
    h.peer.send_data(sid, b"a" * 1000)
    h.peer.send_data(sid, b"b" * 500)
    blob = _peerBytes(h)
    h.send(blob[:cut])
    assert tunnel.received == b""
    h.send(blob[cut:1009 + cut])
    h.send(blob[1009 + cut:])
    assert tunnel.received == b"a" * 1000 + b"b" * 500
    assert _windows(h.proto)[sid] == _windows(h.proto)[0] - (16 * 1024 * 1024 - 4 * 1024 * 1024)


@pytest.mark.parametrize("cut", [1, 5, 23, 24, 25, 33])
def test_prefaceSplit(cut: int) -> None:
    """The client preface is h2's to check, however it is cut."""
    h = Harness()
    h.peer.initiate_connection()
    blob = _peerBytes(h)
    assert blob.startswith(PREFACE)
    h.send(blob[:cut])
    h.send(blob[cut:])
    h.pump()
    assert h.proto.ready
    sid, _, tunnel = h.accept()
    h.peer.send_data(sid, b"x" * 70000)
    h.pump()
    assert tunnel.received == b"x" * 70000


@pytest.mark.parametrize(("fast", "early"), [(True, 10000), (False, 0)])
def test_bytesGoOnBeforeTheFrameEnds(fast: bool, early: int) -> None:
    """The fast path hands a payload on as it arrives; h2 alone (the comparison)
    waits for the whole 60 000-byte frame."""
    h, [(sid, _, tunnel)] = _pair(fast=fast, streams=1)
    h.peer.send_data(sid, b"q" * 60000)
    blob = _peerBytes(h)
    h.send(blob[:9 + 10000])
    assert tunnel.received == b"q" * early
    h.send(blob[9 + 10000:])
    assert tunnel.received == b"q" * 60000


# -- frames h2 must judge ------------------------------------------------------------


def _rawData(sid: int, payload: bytes, flags=(), pad: int | None = None) -> bytes:
    f = DataFrame(sid, data=payload)
    for flag in flags:
        f.flags.add(flag)
    if pad is not None:
        f.flags.add("PADDED")
        f.pad_length = pad
    return f.serialize()


def _sameAnswer(raw: bytes, setup=None, settings: ConnectionSettings = ConnectionSettings()) -> tuple[list, list]:
    """hbone's frames after ``raw``, with and without the fast path."""
    answers = []
    for fast in (False, True):
        h, tunnels = _pair(fast=fast, streams=1, settings=settings)
        if setup is not None:
            setup(h, tunnels)
        h.transport.clear()
        h.send(raw)
        h.clock.advance(0)
        answers.append([repr(f) for f in parseFrames(h.transport.value())])
    return answers[0], answers[1]


def test_overTheStreamWindow_getsH2sAnswer() -> None:
    # a 64 KiB stream window, and a 70 000-byte frame
    raw = _rawData(1, b"z" * 70000)
    slow, fast = _sameAnswer(raw, settings=ConnectionSettings(initialWindowSize=65535))
    assert slow == fast
    assert any("FLOW_CONTROL" in f or "error_code=3" in f for f in fast)


def test_onAStreamNeverOpened_getsH2sAnswer() -> None:
    slow, fast = _sameAnswer(_rawData(9, b"x" * 100))
    assert slow == fast
    assert any("GoAwayFrame" in f or "RstStreamFrame" in f for f in fast)


def test_onAStreamTheClientReset_getsH2sAnswer() -> None:
    raw = RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize() + _rawData(1, b"late" * 100)
    slow, fast = _sameAnswer(raw)
    assert slow == fast


def test_paddedData_deliveredWithoutPadding() -> None:
    h, [(sid, _, tunnel)] = _pair(fast=True, streams=1)
    h.send(_rawData(sid, b"payload", pad=20))
    assert tunnel.received == b"payload"
    assert _windows(h.proto)[0] == 16 * 1024 * 1024  # padding is flow-controlled, and given back


def test_endStreamData_isAHalfClose() -> None:
    h, [(sid, _, tunnel)] = _pair(fast=True, streams=1)
    h.send(_rawData(sid, b"last words", flags=("END_STREAM",)))
    assert tunnel.received == b"last words"
    assert tunnel.readLost


def test_closedMidFrame_restGoesBackToTheConnectionWindow() -> None:
    h, [(sid, stream, tunnel)] = _pair(fast=True, streams=1)
    h.peer.send_data(sid, b"r" * 50000)
    blob = _peerBytes(h)
    h.send(blob[:9 + 20000])
    assert tunnel.received == b"r" * 20000
    stream.abortConnection()
    h.send(blob[9 + 20000:])
    h.clock.advance(0)
    assert tunnel.received == b"r" * 20000
    assert _windows(h.proto)[0] == 16 * 1024 * 1024  # nothing lost for good
    # and the connection still carries a full window on a new stream
    sid2, _, tunnel2 = h.accept()
    for _ in range(3):
        h.peer.send_data(sid2, b"s" * 60000)
        h.pump()
    assert tunnel2.received == b"s" * 180000


def test_pausedConsumer_holdsBackAcknowledgement() -> None:
    """Backpressure through the fast path: while the tunnel's reader is paused,
    no WINDOW_UPDATE goes out for its bytes, so the peer runs out of window."""
    h, [(sid, stream, tunnel)] = _pair(fast=True, streams=1)
    stream.pauseProducing()
    sent = 0
    while h.peer.local_flow_control_window(sid) > 0:
        n = min(100000, h.peer.local_flow_control_window(sid))
        h.peer.send_data(sid, b"p" * n)
        sent += n
        h.pump()
    assert sent == 4 * 1024 * 1024  # exactly the stream window, then the peer stopped
    assert len(tunnel.received) == sent
    stream.resumeProducing()
    h.pump()
    assert h.peer.local_flow_control_window(sid) > 0


def test_clientRole_dataBeforeTheResponse_isDroppedAndCredited() -> None:
    h = Harness(role="client")
    h.handshake()
    stream, d = h.proto.openTunnel(CONNECT, "example.com:443")
    h.pump()
    sid = stream.streamID
    h.transport.clear()
    h.send(_rawData(sid, b"early" * 1000))
    assert stream.bytesReceived == 0
    assert _windows(h.proto)[0] == 16 * 1024 * 1024


# -- sending ---------------------------------------------------------------------------


def test_responseHeadersBeforeDataWrittenInTheHandler() -> None:
    """A handler that answers and writes at once, inside the receive: HEADERS go
    out first (h2 queues them, hbone frames the DATA after them)."""

    def handler(stream, headers):
        stream.connection.respond(stream, 200)
        stream.makeConnection(Recorder())
        stream.write(b"hello from the handler")

    h = Harness(handler=handler)
    h.handshake()
    h.transport.clear()
    sid = h.peer.get_next_available_stream_id()
    h.peer.send_headers(sid, CONNECT)
    h.send(_peerBytes(h))
    frames = [f for f in parseFrames(h.transport.value()) if f.stream_id == sid]
    assert [type(f) for f in frames] == [HeadersFrame, DataFrame]
    events = h.toPeer()
    kinds = [type(e) for e in events if getattr(e, "stream_id", None) == sid]
    assert kinds == [ResponseReceived, DataReceived]


@pytest.mark.parametrize("binding", ["connection", "stream"])
def test_sendingStaysInsideThePeersWindows(binding: str) -> None:
    """The peer is a real h2 connection with the default 64 KiB windows (or a
    large connection window, so the stream's binds): it refuses a byte beyond
    them (FlowControlError), and hbone's own bookkeeping agrees with it."""
    h, [(sid, stream, _)] = _pair(fast=True, streams=1)
    if binding == "stream":
        h.peer.increment_flow_control_window(8 * 1024 * 1024)
        h.pump()
    payload = os.urandom(300000)
    stream.write(payload)
    got = b""
    for _ in range(50):
        events = h.toPeer()
        for e in events:
            if isinstance(e, DataReceived):
                got += e.data
                h.peer.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        h.toProto()  # the peer's WINDOW_UPDATEs; hbone may answer with more DATA
        inFlight = sum(len(f.data) for f in parseFrames(h.transport.value()) if isinstance(f, DataFrame))
        ours = h.proto._conn.local_flow_control_window(sid)
        assert ours == min(h.peer._inbound_flow_control_window_manager.current_window_size,
                           h.peer.streams[sid]._inbound_window_manager.current_window_size) - inFlight
        if len(got) == len(payload):
            break
    assert got == payload
    assert not h.goaways()


def test_fastFramesAreWellFormed() -> None:
    h, [(sid, stream, _)] = _pair(fast=True, streams=1)
    h.transport.clear()
    stream.write(b"abc")
    stream.write(b"defgh")
    frames = parseFrames(h.transport.value())
    assert [(type(f), f.stream_id, f.data, set(f.flags)) for f in frames] == [
        (DataFrame, sid, b"abc", set()),
        (DataFrame, sid, b"defgh", set()),
    ]
    stream.loseWriteConnection()
    end = parseFrames(h.transport.value())[-1]
    assert (type(end), set(end.flags)) == (DataFrame, {"END_STREAM"})
