"""An HTTP/2 CONNECT stream as a Twisted transport.

:class:`H2TunnelStream` offers what a TCP transport offers (``write``,
``writeSequence``, ``loseConnection``, ``loseWriteConnection``, ``abortConnection``,
``getPeer``/``getHost``, ``IConsumer`` + ``IPushProducer``), so any Twisted protocol —
a splice half, an SSH server, a web site — runs on a stream as it runs on TCP.

Flow control is end to end:

* inbound: DATA is handed to the protocol at once, but acknowledged to the peer
  (WINDOW_UPDATE) only while the consumer downstream is not paused; when it pauses
  us, acknowledgements stop, the peer's window runs out, and the peer stops. Memory
  per stream is bounded by the window.
* outbound: writes go out as far as the HTTP/2 windows and the connection's TCP
  buffer allow; the rest waits here, and while anything waits the registered
  producer (the source socket) is paused.

Half-close: the peer's END_STREAM is ``readConnectionLost`` for an
``IHalfCloseableProtocol`` (else the stream closes, as TCP does), and
``loseWriteConnection`` sends END_STREAM after every queued byte.
Resets are visible: a received RST_STREAM is ``connectionLost`` with
:class:`StreamReset`, and ``abortConnection`` sends RST_STREAM.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from hbone.errors import StreamReset, TunnelAborted

if TYPE_CHECKING:
    from hbone.h2.connection import HBoneH2Protocol

__all__ = ["H2TunnelStream", "HBoneAddress"]


class HBoneAddress:
    """The address of one end of a tunnel: the TCP address of the HTTP/2 connection,
    the SPIFFE identity proven there, and the tunnel's authority."""

    def __init__(self, tcp, identity, authority: str | None, streamID: int) -> None:
        self.tcp = tcp
        self.identity = identity
        self.authority = authority
        self.streamID = streamID

    @property
    def host(self):
        return getattr(self.tcp, "host", None)

    @property
    def port(self):
        return getattr(self.tcp, "port", None)

    def __repr__(self) -> str:
        return (
            f"HBoneAddress({self.tcp!r}, identity={str(self.identity) if self.identity else None!r}, "
            f"authority={self.authority!r}, stream={self.streamID})"
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, HBoneAddress) and (
            self.tcp,
            self.identity,
            self.authority,
            self.streamID,
        ) == (other.tcp, other.identity, other.authority, other.streamID)

    def __hash__(self) -> int:
        return hash((self.tcp, self.authority, self.streamID))


@implementer(ITransport, IConsumer, IPushProducer)
class H2TunnelStream:
    """One HBONE tunnel: an HTTP/2 stream carrying raw bytes both ways."""

    disconnecting = False
    connected = False

    def __init__(
        self,
        connection: "HBoneH2Protocol",
        streamID: int,
        authority: str | None = None,
        requestHeaders: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.connection = connection
        self.streamID = streamID
        self.authority = authority
        self.requestHeaders = requestHeaders or []
        self.protocol = None
        # outbound
        self._outbuf: deque[bytes] = deque()
        self._outbytes = 0
        self._endPending = False
        self.localEnded = False
        # inbound
        self.remoteEnded = False
        self._early: list[bytes] | None = []  # data before a protocol is attached
        self._unacked = 0
        self._consumerPaused = False
        self._readEndDelivered = False
        # producer registered on us (the source of what we send)
        self.producer = None
        self._producerPaused = False
        # lifecycle
        self.closed = False
        self._closeReason: Failure | None = None
        self._closeWatchers: list = []
        self.responseReceived = False
        self.bytesReceived = 0
        self.bytesSent = 0
        self._bodyRemaining: int | None = None
        self._calls = 0  # >0 while the protocol is inside one of our methods
        # accounting (SECURITY §4.4, §4.6), set by the connection
        self.openedAt = 0.0
        self._processCounted = False  # counted in the process's open tunnels

    # -- addresses -----------------------------------------------------------

    def getPeer(self) -> HBoneAddress:
        return HBoneAddress(
            self.connection.transport.getPeer() if self.connection.transport else None,
            self.connection.peerIdentity,
            self.authority,
            self.streamID,
        )

    def getHost(self) -> HBoneAddress:
        return HBoneAddress(
            self.connection.transport.getHost() if self.connection.transport else None,
            self.connection.localIdentity,
            self.authority,
            self.streamID,
        )

    # -- attaching a protocol ----------------------------------------------------

    def makeConnection(self, protocol) -> None:
        """Attach ``protocol``; deliver what arrived early, then keep delivering."""
        if self.closed:
            protocol.makeConnection(self)
            protocol.connectionLost(self._closeReason or Failure(ConnectionDone()))
            return
        self.protocol = protocol
        self.connected = True
        protocol.makeConnection(self)
        early, self._early = self._early, None
        for chunk in early or ():
            if self.protocol is None or self.closed:
                break
            self.protocol.dataReceived(chunk)
        self._maybeAck()
        if (self.remoteEnded or self._bodyRemaining == 0) and not self.closed:
            self._deliverReadEnd()

    def expectBodyLength(self, length: int) -> None:
        """POST form with ``content-length``: the client->target direction ends after
        exactly ``length`` bytes (a half-close); a body that runs long, or ends
        early, resets the stream (PROTOCOL §5)."""
        self._bodyRemaining = length - self.bytesReceived
        if self._bodyRemaining < 0 or (self._bodyRemaining and self.remoteEnded):
            self._reset(ErrorCodes.PROTOCOL_ERROR)
        elif self._bodyRemaining == 0 and self.protocol is not None:
            self._deliverReadEnd()

    def notifyClose(self, callback) -> None:
        """Call ``callback(reason)`` once when the stream closes (tests, servers
        waiting on a dial, the tracker)."""
        if self.closed:
            callback(self._closeReason)
        else:
            self._closeWatchers.append(callback)

    # -- ITransport ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.localEnded or self._endPending or self.closed or not data:
            return
        self.bytesSent += len(data)
        self._outbuf.append(data)
        self._outbytes += len(data)
        self.connection._streamHasData(self)

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def loseWriteConnection(self) -> None:
        """END_STREAM after every queued byte."""
        self._calls += 1
        try:
            self._loseWriteConnection()
        finally:
            self._calls -= 1

    def _loseWriteConnection(self) -> None:
        if self.localEnded or self._endPending or self.closed:
            return
        self._endPending = True
        self.connection._streamHasData(self)

    def loseConnection(self) -> None:
        """Like TCP's: finish writing, END_STREAM, and stop reading. If the peer is
        still sending, it is told to stop with RST_STREAM(NO_ERROR) (RFC 9113 §8.1)."""
        self._calls += 1
        try:
            self._loseConnection()
        finally:
            self._calls -= 1

    def _loseConnection(self) -> None:
        if self.closed or self.disconnecting:
            return
        self.disconnecting = True
        self._loseWriteConnection()
        self._checkDone()

    def abortConnection(self, errorCode: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM (CANCEL by default): a reset, never a clean end."""
        self.resetStream(errorCode)

    def resetStream(self, errorCode: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM(``errorCode``); the protocol's ``connectionLost`` follows from
        the reactor."""
        self._calls += 1
        try:
            self._reset(errorCode)
        finally:
            self._calls -= 1

    def _reset(self, errorCode: int) -> None:
        """RST_STREAM from inside hbone (a protocol violation seen while receiving)."""
        if self.closed:
            return
        self.connection._resetStream(self, errorCode)
        self._close(Failure(TunnelAborted(f"stream reset locally ({ErrorCodes(errorCode).name})")))

    def _deliver(self, f, *args) -> None:
        """Call a protocol callback now, or, when the protocol itself is inside one
        of our methods, from the reactor: like TCP, a transport never calls
        ``connectionLost``/``writeConnectionLost`` re-entrantly (TLS over a stream
        relies on it)."""
        if self._calls:
            self.connection.clock.callLater(0, f, *args)
        else:
            f(*args)

    # -- IConsumer ---------------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered on this stream")
        self.producer = producer
        self._producerPaused = False
        if self._outbuf and self.producer is not None:
            self._pauseProducer()

    def unregisterProducer(self) -> None:
        self.producer = None

    def _pauseProducer(self) -> None:
        if self.producer is not None and not self._producerPaused:
            self._producerPaused = True
            self.producer.pauseProducing()

    def _resumeProducer(self) -> None:
        if self.producer is not None and self._producerPaused:
            self._producerPaused = False
            self.producer.resumeProducing()

    # -- IPushProducer (we produce what the peer sends us) -------------------------

    def pauseProducing(self) -> None:
        self._consumerPaused = True

    def resumeProducing(self) -> None:
        self._consumerPaused = False
        self._maybeAck()

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- called by the connection ------------------------------------------------

    def _dataReceived(self, data: bytes, flowControlled: int) -> None:
        self._unacked += flowControlled
        if self.closed or (self.disconnecting and self._readEndDelivered):
            self._maybeAck()
            return
        self.bytesReceived += len(data)
        if self._bodyRemaining is not None and data:
            self._bodyRemaining -= len(data)
            if self._bodyRemaining < 0:
                self._reset(ErrorCodes.PROTOCOL_ERROR)
                return
        if self.protocol is None:
            if data:
                self._early.append(data)
            return
        if data:
            self.protocol.dataReceived(data)
        self._maybeAck()
        if self._bodyRemaining == 0 and not self.closed:
            self._deliverReadEnd()

    def _maybeAck(self) -> None:
        if self._unacked and not self._consumerPaused and not self.closed and (
            self.protocol is not None or self.disconnecting
        ):
            n, self._unacked = self._unacked, 0
            self.connection._acknowledge(self, n)

    def _remoteEnd(self) -> None:
        if self._bodyRemaining:  # END_STREAM before content-length bytes
            self._reset(ErrorCodes.PROTOCOL_ERROR)
            return
        self.remoteEnded = True
        if self._readEndDelivered:
            self._checkDone()
        elif self.protocol is not None:
            self._deliverReadEnd()

    def _deliverReadEnd(self) -> None:
        if self._readEndDelivered:
            return
        self._readEndDelivered = True
        if self.disconnecting:
            self._checkDone()
            return
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is not None:
            half.readConnectionLost()
            self._checkDone()
        else:
            self._loseConnection()

    def _sentEnd(self) -> None:
        """The connection sent our END_STREAM."""
        self.localEnded = True
        self._endPending = False
        if self.protocol is not None and not self.disconnecting:
            half = IHalfCloseableProtocol(self.protocol, None)
            if half is not None:
                self._deliver(half.writeConnectionLost)
        self._checkDone()

    def _drained(self) -> None:
        """Everything queued was handed to HTTP/2."""
        self._resumeProducer()

    def _checkDone(self) -> None:
        if self.closed:
            return
        if self.localEnded and (self.remoteEnded or self.disconnecting):
            if not self.remoteEnded:
                # we are done but the peer is still sending: tell it to stop
                self.connection._resetStream(self, ErrorCodes.NO_ERROR)
            self._close(Failure(ConnectionDone("tunnel closed cleanly")))

    def _remoteReset(self, errorCode: int) -> None:
        if self.closed:
            return
        if errorCode == ErrorCodes.NO_ERROR and self.remoteEnded:
            # RFC 9113 §8.1: stop sending, close normally once received data is written
            self._outbuf.clear()
            self._outbytes = 0
            self.localEnded = True
            self._endPending = False
            if self.protocol is not None and not self.disconnecting:
                half = IHalfCloseableProtocol(self.protocol, None)
                if half is not None:
                    half.writeConnectionLost()
            self._close(Failure(ConnectionDone("peer ended the tunnel (RST_STREAM NO_ERROR)")))
            return
        self._close(Failure(StreamReset(errorCode)))

    def _connectionLost(self, reason: Failure) -> None:
        self._close(reason)

    def _close(self, reason: Failure) -> None:
        if self.closed:
            return
        if self._unacked:
            # never delivered (early data of a refused tunnel, a paused consumer):
            # give the bytes back to the connection window, or it shrinks for good
            n, self._unacked = self._unacked, 0
            self.connection._acknowledge(self, n)
        self.closed = True
        self.connected = False
        self._closeReason = reason
        self._outbuf.clear()
        self._outbytes = 0
        self._early = None
        self.connection._streamClosed(self)
        producer, self.producer = self.producer, None
        protocol = self.protocol
        watchers, self._closeWatchers = self._closeWatchers, []
        self._deliver(self._notifyClosed, protocol, producer, watchers, reason)

    @staticmethod
    def _notifyClosed(protocol, producer, watchers, reason) -> None:
        if protocol is not None:
            protocol.connectionLost(reason)
        elif producer is not None:
            producer.stopProducing()
        for w in watchers:
            w(reason)
