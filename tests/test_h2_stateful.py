"""Stateful property test: random legal and illegal frame sequences into a
server-role HBoneH2Protocol over StringTransport, mixed with what the tunnels do
(answer, write, half-close, reset, pause), transport backpressure and time.

Legal traffic comes from a real h2 client (so flow control and stream states are
right and the run gets somewhere); illegal frames are built with hyperframe and
hpack and injected raw, now and then. Whatever arrives:

* ``dataReceived`` (and every timer) never raises;
* hbone's output is well-formed HTTP/2, and while the peer has seen only legal
  frames, the real h2 client accepts every byte of it and hbone never aborts the
  connection or sends an error GOAWAY; DATA never goes to a paused transport;
* once the transport is lost no stream is left behind: ``protocol.streams`` is
  empty, nothing is queued, no timer is pending, and every tunnel protocol got
  exactly one ``connectionLost``.
"""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from h2.stream import StreamState
from hpack import Encoder
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from hbone.h2.connection import ConnectionSettings
from tests.h2harness import FakeProducer, HalfRecorder, Harness, Recorder, feedFrames, parseFrames

REQUESTS = {
    "connect": [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")],
    "post": [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"lb"),
             (b":path", b"/_hbone/10.0.0.1:80"), (b"content-length", b"5")],
    "get": [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")],
    "many": [(b":method", b"CONNECT"), (b":authority", b"a.example:1")] + [(b"x-%d" % i, b"v") for i in range(40)],
}

RAW_HEADERS = {
    "connect-path": [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b":path", b"/")],
    "connect-no-authority": [(b":method", b"CONNECT")],
    "connection-header": [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"connection", b"close")],
    "status": [(b":status", b"200")],
    "huge": [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"x-big", b"v" * 9000)],
    **REQUESTS,
}

anyStream = st.sampled_from([0, 1, 2, 3, 5, 7, 101, 2**31 - 1])
anyCode = st.one_of(st.integers(0, 0xD), st.sampled_from([0x42, 2**32 - 1]))


def frame(cls, sid: int, **kw):
    """A frame on any stream id, 0 included (hyperframe refuses some at construction)."""
    f = cls(sid or 1, **kw)
    f.stream_id = sid
    return f


@st.composite
def illegalFrames(draw) -> bytes:
    kind = draw(st.sampled_from(
        ["headers", "continuation", "data", "rst", "window", "settings", "ping", "priority", "goaway", "push",
         "unknown", "garbage"]
    ))
    sid = draw(anyStream)
    if kind == "headers":
        f = frame(HeadersFrame, sid)
        f.data = Encoder().encode(RAW_HEADERS[draw(st.sampled_from(sorted(RAW_HEADERS)))])
        if draw(st.booleans()):
            f.flags.add("END_HEADERS")
        if draw(st.booleans()):
            f.flags.add("END_STREAM")
    elif kind == "continuation":
        f = frame(ContinuationFrame, sid, data=draw(st.binary(max_size=32)))
        if draw(st.booleans()):
            f.flags.add("END_HEADERS")
    elif kind == "data":
        f = frame(DataFrame, sid, data=b"d" * draw(st.sampled_from([0, 1, 70000, 2**20 + 1])))
        if draw(st.booleans()):
            f.flags.add("END_STREAM")
    elif kind == "rst":
        f = frame(RstStreamFrame, sid, error_code=draw(anyCode))
    elif kind == "window":
        f = frame(WindowUpdateFrame, sid, window_increment=draw(st.sampled_from([0, 2**31 - 1])))
    elif kind == "settings":
        f = SettingsFrame(0, settings=draw(st.dictionaries(
            st.integers(1, 9), st.sampled_from([0, 1, 16383, 2**24, 2**31]), min_size=1, max_size=3)))
        f.stream_id = sid
    elif kind == "ping":
        f = PingFrame(0, opaque_data=b"12345678")
        f.stream_id = sid
    elif kind == "priority":
        f = frame(PriorityFrame, sid, depends_on=sid, stream_weight=16)
    elif kind == "goaway":
        f = GoAwayFrame(0, last_stream_id=draw(anyStream), error_code=draw(anyCode))
        f.stream_id = sid
    elif kind == "push":
        f = frame(PushPromiseFrame, sid, promised_stream_id=2, data=Encoder().encode(REQUESTS["get"]))
        f.flags.add("END_HEADERS")
    elif kind == "unknown":
        f = ExtensionFrame(draw(st.integers(0x0B, 0xFF)), sid, flag_byte=0, body=draw(st.binary(max_size=16)))
    else:
        return draw(st.binary(min_size=1, max_size=40))
    return f.serialize()


class H2ServerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness("server", settings=ConnectionSettings(initialWindowSize=65535), handler=self.handler)
        self.tunnels: list = []  # [stream, protocol or None]
        self.protocols: list[Recorder] = []
        self.peerOpen: list[int] = []  # streams the peer may still send on
        self.tainted = False  # the peer's h2 no longer knows what hbone saw
        write = self.h.transport.write

        def checkedWrite(data: bytes) -> None:
            if self.h.proto._paused:
                # a paused transport gets control frames only, never stream DATA
                assert not [f for f in parseFrames(data) if isinstance(f, DataFrame)]
            write(data)

        self.h.transport.write = checkedWrite
        self.h.peer.initiate_connection()
        self.h.peer.increment_flow_control_window(2**24 - 65535)  # as ztunnel and hbone do
        self.sync()

    def handler(self, stream, headers) -> None:
        self.tunnels.append([stream, None])

    # -- moving bytes -----------------------------------------------------------

    def sync(self) -> None:
        """hbone's output to the peer (checked by the real h2 while the run is
        legal), the peer's output to hbone, until quiet."""
        h = self.h
        for _ in range(20):
            data = h.transport.value()
            h.transport.clear()
            frames = parseFrames(data)
            if not self.tainted:
                # a peer that sent only legal frames is never cut off
                assert [f.error_code for f in frames if isinstance(f, GoAwayFrame) and f.error_code] == []
            if data and not self.tainted:
                events = feedFrames(h.peer, data)  # hbone's output is legal HTTP/2
                for e in events:
                    if isinstance(e, DataReceived):
                        h.peer.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, (StreamEnded, StreamReset)):
                        self._peerDone(e.stream_id, isinstance(e, StreamReset))
                    elif isinstance(e, ConnectionTerminated):
                        self.tainted = True  # stock h2 accepts nothing more (h2#1181)
            out = b"" if self.tainted else h.peer.data_to_send()
            if out:
                h.proto.dataReceived(out)
            if not out and not h.transport.value():
                return

    def _peerDone(self, sid: int, reset: bool) -> None:
        if reset and sid in self.peerOpen:
            self.peerOpen.remove(sid)

    def peerStream(self, i: int):
        live = []
        for sid in self.peerOpen:
            stream = self.h.peer.streams.get(sid)
            if stream is not None and stream.state_machine.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
                live.append(sid)
        return live[i % len(live)] if live else None

    def peerDo(self, action) -> None:
        if self.tainted:
            return
        try:
            action()
        except ProtocolError:
            return  # h2 would not let a client send this; not a case
        self.sync()

    def live(self, index: int):
        open_ = [t for t in self.tunnels if not t[0].closed]
        return open_[index % len(open_)] if open_ else None

    # -- a legal peer --------------------------------------------------------------

    @rule(which=st.sampled_from(sorted(REQUESTS)), end=st.sampled_from([False, False, False, True]))
    def openStream(self, which, end):
        def go():
            sid = self.h.peer.get_next_available_stream_id()
            self.h.peer.send_headers(sid, REQUESTS[which], end_stream=end)
            self.peerOpen.append(sid)

        self.peerDo(go)

    @rule(half=st.booleans(), which=st.sampled_from(["connect", "connect", "post"]))
    def openAndAccept(self, half, which):
        before = len(self.tunnels)
        self.openStream(which, False)
        if len(self.tunnels) > before:
            self.answer(len(self.tunnels) - 1, 200, half, 5 if which == "post" else None)

    @rule(i=st.integers(0, 10), size=st.sampled_from([0, 1, 100, 16384, 65535]), end=st.booleans(),
          pad=st.one_of(st.none(), st.integers(0, 255)))
    def peerData(self, i, size, end, pad):
        sid = self.peerStream(i)
        if sid is None:
            return
        room = self.h.peer.local_flow_control_window(sid) - (0 if pad is None else pad + 1)
        size = max(0, min(size, room, self.h.peer.max_outbound_frame_size - 256))
        if size == 0 and not end and pad is None:
            return
        self.peerDo(lambda: self.h.peer.send_data(sid, b"p" * size, end_stream=end, pad_length=pad))

    @rule(i=st.integers(0, 10))
    def peerEnd(self, i):
        sid = self.peerStream(i)
        if sid is not None:
            self.peerDo(lambda: self.h.peer.end_stream(sid))

    @rule(i=st.integers(0, 10))
    def peerTrailers(self, i):
        sid = self.peerStream(i)
        if sid is not None:
            self.peerDo(lambda: self.h.peer.send_headers(sid, [(b"x-t", b"1")], end_stream=True))

    @rule(i=st.integers(0, 10), code=st.sampled_from(list(ErrorCodes)))
    def peerReset(self, i, code):
        sid = self.peerStream(i)
        if sid is not None:
            self.peerDo(lambda: self.h.peer.reset_stream(sid, code))

    @rule(i=st.one_of(st.none(), st.integers(0, 10)), inc=st.sampled_from([1, 1000, 65535, 2**20]))
    def peerWindow(self, i, inc):
        sid = None if i is None else self.peerStream(i)
        if i is not None and sid is None:
            return
        if sid is None and self.h.peer.inbound_flow_control_window + inc > 2**31 - 1:
            return
        self.peerDo(lambda: self.h.peer.increment_flow_control_window(inc, stream_id=sid))

    @rule(iws=st.sampled_from([None, 0, 100, 65535, 2**20]), mfs=st.sampled_from([None, 16384, 2**20]),
          mcs=st.sampled_from([None, 0, 100]))
    def peerSettings(self, iws, mfs, mcs):
        new = {k: v for k, v in (
            (SettingCodes.INITIAL_WINDOW_SIZE, iws), (SettingCodes.MAX_FRAME_SIZE, mfs),
            (SettingCodes.MAX_CONCURRENT_STREAMS, mcs)) if v is not None}
        if new:
            self.peerDo(lambda: self.h.peer.update_settings(new))

    @rule()
    def peerPing(self):
        self.peerDo(lambda: self.h.peer.ping(b"pingpong"))

    @rule(last=st.sampled_from([0, 1, 3, 2**31 - 1]))
    def peerGoAway(self, last):
        # raw, so the peer's h2 stays usable (it would move to CLOSED)
        self.h.proto.dataReceived(GoAwayFrame(0, last_stream_id=last).serialize())
        self.sync()

    # -- an illegal one, now and then ------------------------------------------------------

    @rule(gate=st.integers(0, 3), raw=illegalFrames())
    def illegal(self, gate, raw):
        if gate:
            return
        self.tainted = True
        self.h.proto.dataReceived(raw)
        self.sync()

    @rule(cut=st.integers(1, 8), size=st.sampled_from([1, 20000]))
    def splitDelivery(self, cut, size):
        sid = self.peerStream(0)
        if sid is None or self.tainted or self.h.peer.local_flow_control_window(sid) < size:
            return
        self.h.peer.send_data(sid, b"s" * size)
        data = self.h.peer.data_to_send()
        self.h.proto.dataReceived(data[:cut])
        self.h.proto.dataReceived(data[cut:])
        self.sync()

    # -- what the tunnels do -----------------------------------------------------------

    @rule(i=st.integers(0, 10), status=st.sampled_from([200, 200, 400, 503]), half=st.booleans(),
          body=st.sampled_from([None, None, 0, 5]))
    def answer(self, i, status, half, body):
        t = self.tunnels[i] if i < len(self.tunnels) and not self.tunnels[i][0].closed else self.live(i)
        if t is None or t[1] is not None or t[0].responseReceived:
            return
        stream = t[0]
        self.h.proto.respond(stream, status, error=None if status == 200 else "destination_unavailable")
        if status == 200 and not stream.closed:
            if body is not None:
                stream.expectBodyLength(body)
            proto = HalfRecorder() if half else Recorder()
            t[1] = proto
            self.protocols.append(proto)
            stream.makeConnection(proto)
        self.sync()

    @rule(i=st.integers(0, 10), size=st.sampled_from([1, 1000, 100000]))
    def write(self, i, size):
        t = self.live(i)
        if t is not None and t[1] is not None:
            t[0].write(b"w" * size)
            self.sync()

    @rule(i=st.integers(0, 10), op=st.sampled_from(["loseWrite", "lose", "abort", "pause", "resume", "producer"]))
    def streamOp(self, i, op):
        t = self.live(i)
        if t is None or t[1] is None:
            return
        stream = t[0]
        if op == "loseWrite":
            stream.loseWriteConnection()
        elif op == "lose":
            stream.loseConnection()
        elif op == "abort":
            stream.abortConnection()
        elif op == "pause":
            stream.pauseProducing()
        elif op == "resume":
            stream.resumeProducing()
        elif op == "producer" and stream.producer is None:
            stream.registerProducer(FakeProducer(), True)
        self.sync()

    @rule(paused=st.booleans())
    def transportBackpressure(self, paused):
        if self.h.transport.producer is None:
            return
        if paused:
            self.h.proto.pauseProducing()
        else:
            self.h.proto.resumeProducing()
        self.sync()

    @rule(seconds=st.sampled_from([0.5, 1.0, 10.0, 30.0]))
    def time(self, seconds):
        self.h.clock.advance(seconds)
        self.sync()

    # -- checks -------------------------------------------------------------------------------

    @invariant()
    def legalPeerNotAborted(self):
        if not self.tainted:
            assert not self.h.transport.aborted

    @invariant()
    def tableMatchesStreams(self):
        proto = self.h.proto
        assert len(proto.streams) <= 100
        for sid, stream in proto.streams.items():
            assert stream.streamID == sid
            assert not stream.closed
        for stream, _ in self.tunnels:
            if stream.closed:
                assert stream.streamID not in proto.streams

    def teardown(self):
        h = self.h
        if not h.lostDelivered:
            h.deliverLost(Failure(ConnectionLost("test over")))
        # a close the protocol asked for is reported from the reactor, never
        # re-entrantly (as TCP does)
        h.clock.advance(0)
        proto = h.proto
        assert proto.closed
        assert proto.streams == {}
        assert not proto._blocked
        assert not proto._responses
        for stream, _ in self.tunnels:
            assert stream.closed
            assert not stream._outbuf
        for p in self.protocols:
            assert p.lostReason is not None  # Recorder asserts it came only once
        assert h.clock.getDelayedCalls() == []


H2ServerMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestH2ServerMachine = H2ServerMachine.TestCase
