"""Test scaffolding for hbone's HTTP/2 code: no sockets, no real time.

:class:`Harness` runs one :class:`HBoneH2Protocol` (``expectALPN=None``, so no TLS)
over a :class:`FakeTransport`, with a real ``h2.connection.H2Connection`` as its peer
and a ``MemoryReactorClock`` as its clock. Bytes move only when a test calls
:meth:`Harness.pump` (or :meth:`toPeer` / :meth:`toProto`), so a test can look at
every frame in between.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset as H2StreamReset,
    WindowUpdated,
)
from hyperframe.frame import Frame
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from hbone.h2.connection import ConnectionSettings, HBoneH2Protocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

CONNECT = [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]


class FakeTransport(StringTransport):
    """A StringTransport that records how it was asked to close.

    ``loseConnection`` completes (``closeStarted``) only once no producer is
    registered, as ``TLSMemoryBIOProtocol.loseConnection`` does: over TLS, a
    protocol that stays registered as its transport's producer never gets its
    close_notify sent.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lenient = True  # like TCP, it may be paused while it is closing
        self.aborted = False
        self.closeStarted = False

    def loseConnection(self) -> None:
        self.disconnecting = True
        if self.producer is None:
            self.closeStarted = True

    def unregisterProducer(self) -> None:
        super().unregisterProducer()
        if self.disconnecting:
            self.closeStarted = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True
        self.closeStarted = True


def splitFrames(data: bytes) -> list[bytes]:
    """Raw HTTP/2 bytes, one frame per item (the client preface is its own item)."""
    chunks = []
    if data.startswith(PREFACE):
        chunks.append(PREFACE)
        data = data[len(PREFACE):]
    i = 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        assert i + 9 + length <= len(data), "truncated frame"
        chunks.append(data[i : i + 9 + length])
        i += 9 + length
    assert i == len(data), "trailing bytes"
    return chunks


def parseFrames(data: bytes) -> list[Frame]:
    """Split raw HTTP/2 bytes (optionally after the client preface) into frames."""
    frames = []
    for chunk in splitFrames(data):
        if chunk == PREFACE:
            continue
        frame, length = Frame.parse_frame_header(memoryview(chunk[:9]))
        frame.parse_body(memoryview(chunk[9:]))
        frames.append(frame)
    return frames


def feedFrames(conn, data: bytes) -> list:
    """Give ``data`` to an h2 connection one frame at a time. h2 applies an ACKed
    MAX_FRAME_SIZE only from its next ``receive_data`` call, so a bigger frame
    right behind the SETTINGS ACK, in the same call, would be refused."""
    events = []
    for chunk in splitFrames(data):
        events.extend(conn.receive_data(chunk))
    return events


class Recorder(Protocol):
    """A protocol on a stream that records what it is given."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.made = False
        self.lostReason: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        assert self.lostReason is None, "connectionLost called twice"
        self.lostReason = reason

    @property
    def received(self) -> bytes:
        return b"".join(self.data)


@implementer(IHalfCloseableProtocol)
class HalfRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.readLost = 0
        self.writeLost = 0

    def readConnectionLost(self) -> None:
        self.readLost += 1

    def writeConnectionLost(self) -> None:
        self.writeLost += 1


@implementer(IPushProducer)
class FakeProducer:
    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        self.stopped = True


class Harness:
    """One HBoneH2Protocol, its transport, its clock and a real h2 peer."""

    def __init__(
        self,
        role: str = "server",
        settings: ConnectionSettings = ConnectionSettings(),
        handler=None,
        expectALPN: bytes | None = None,
        peerConfig: dict | None = None,
        start: bool = True,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.requests: list = []
        if handler is None and role == "server":
            handler = self._record
        self.proto = HBoneH2Protocol(role, self.clock, settings, streamHandler=handler, expectALPN=expectALPN)
        self.transport = FakeTransport()
        self.peer = H2Connection(
            H2Configuration(client_side=(role == "server"), header_encoding=None, **(peerConfig or {}))
        )
        self.events: list = []  # every event the peer saw
        self.frames: list[Frame] = []  # every frame hbone sent
        self.lostDelivered = False
        if start:
            self.proto.makeConnection(self.transport)

    def _record(self, stream, headers) -> None:
        self.requests.append((stream, headers))

    # -- moving bytes ---------------------------------------------------------

    def toPeer(self) -> list:
        """Hand what hbone wrote to the peer; return the peer's events."""
        data = self.transport.value()
        self.transport.clear()
        if not data:
            return []
        self.frames.extend(parseFrames(data))
        events = feedFrames(self.peer, data)
        self.events.extend(events)
        return events

    def toProto(self) -> bytes:
        """Hand what the peer queued to hbone."""
        data = self.peer.data_to_send()
        if data and not self.proto.closed:
            self.proto.dataReceived(data)
        return data

    def send(self, data: bytes) -> None:
        """Raw bytes to hbone, as if from the peer."""
        self.proto.dataReceived(data)

    def pump(self) -> list:
        """Move bytes both ways until both sides are quiet; return new peer events."""
        new = []
        for _ in range(100):
            # closes a protocol asked for are reported from the reactor (callLater(0))
            self.clock.advance(0)
            events = self.toPeer()
            new.extend(events)
            sent = self.toProto()
            if not sent and not self.transport.value():
                return new
        raise AssertionError("pump did not settle")

    def handshake(self) -> None:
        self.peer.initiate_connection()
        self.pump()
        assert self.proto.ready

    def deliverLost(self, reason: Failure | None = None) -> None:
        """What the transport does after loseConnection/abortConnection completes."""
        assert not self.lostDelivered
        self.lostDelivered = True
        if reason is None:
            reason = Failure(ConnectionLost("aborted") if self.transport.aborted else ConnectionDone())
        self.proto.connectionLost(reason)

    # -- the peer ---------------------------------------------------------------

    def openStream(self, headers=CONNECT, endStream: bool = False) -> int:
        """Peer (client) opens a stream; returns its id after hbone saw it."""
        sid = self.peer.get_next_available_stream_id()
        self.peer.send_headers(sid, headers, end_stream=endStream)
        self.pump()
        return sid

    def accept(self, headers=CONNECT, protocol=None):
        """Peer opens a stream; hbone answers 200 and attaches ``protocol``."""
        sid = self.openStream(headers)
        stream, _ = self.requests[-1]
        assert stream.streamID == sid
        self.proto.respond(stream, 200)
        if protocol is None:
            protocol = Recorder()
        stream.makeConnection(protocol)
        self.pump()
        return sid, stream, protocol

    # -- reading the peer's events --------------------------------------------

    def eventsOf(self, kind, streamID: int | None = None) -> list:
        return [
            e for e in self.events
            if isinstance(e, kind) and (streamID is None or getattr(e, "stream_id", None) == streamID)
        ]

    def dataFor(self, streamID: int) -> bytes:
        return b"".join(e.data for e in self.eventsOf(DataReceived, streamID))

    def ended(self, streamID: int) -> bool:
        return bool(self.eventsOf(StreamEnded, streamID))

    def resets(self, streamID: int) -> list[int]:
        return [e.error_code for e in self.eventsOf(H2StreamReset, streamID)]

    def windowUpdates(self, streamID: int) -> list:
        return self.eventsOf(WindowUpdated, streamID)

    def responses(self, streamID: int) -> list:
        return self.eventsOf(ResponseReceived, streamID)

    def goaways(self) -> list:
        return self.eventsOf(ConnectionTerminated)


__all__ = [
    "CONNECT",
    "PREFACE",
    "FakeProducer",
    "FakeTransport",
    "HalfRecorder",
    "Harness",
    "Recorder",
    "feedFrames",
    "parseFrames",
    "splitFrames",
]
