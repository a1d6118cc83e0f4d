"""The one byte pump: joins two transports, both ways.

Every data path in hbone ends here: TCP <-> HTTP/2 stream on a server, TCP <-> stream
on a client forwarder, stream <-> stream on a relay. A :class:`Tunnel` is two
:class:`SpliceProtocol` halves, each the protocol of one transport:

* bytes read on one side are written to the other; each transport is registered as
  the other's streaming producer, so a slow reader pauses its writer (Twisted's
  ``portforward`` pattern);
* half-close is carried across: FIN read on one side becomes ``loseWriteConnection``
  on the other (END_STREAM on a stream, ``shutdown(SHUT_WR)`` on TCP), and a side is
  closed once both of its directions are done;
* a reset is carried across as a reset: an unclean end of one side aborts the other
  (RST_STREAM(CONNECT_ERROR) on a stream, SO_LINGER 0 + close on TCP, so a TCP RST
  goes out), never a clean FIN;
* bytes are counted, and reported once, when the tunnel closes;
* idle tunnels are found by :class:`TunnelTracker`'s periodic sweep, not by a timer
  per tunnel touched per chunk.
"""

from __future__ import annotations

import socket
import struct
from typing import Callable

from h2.errors import ErrorCodes
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbone.errors import TunnelAborted

__all__ = ["SpliceProtocol", "SpliceFactory", "Tunnel", "TunnelTracker", "abortTransport", "join"]


#: Bytes read from a socket at once (PROTOCOL §3 ``read_size``): one read becomes
#: one DATA frame where the window allows; Twisted's default is 64 KiB.
READ_SIZE = 256 * 1024


def tuneTCP(transport, readSize: int = READ_SIZE) -> None:
    """Set TCP_NODELAY and the read size on the TCP socket under ``transport``
    (through a TLS layer, if any). Without TCP_NODELAY a new tunnel's first small
    writes wait on Nagle and delayed ACKs (~40 ms each way).

    The socket's transport is found by type: a TLS layer forwards unknown
    attributes to the transport beneath it (``ProtocolWrapper.__getattr__``),
    so a duck-typed check would set the read size on the TLS layer instead.
    Its writes are then sent at once when nothing is queued (:func:`_sendAtOnce`)."""
    for _ in range(4):
        if transport is None:
            return
        if isinstance(transport, FileDescriptor):
            if hasattr(transport, "setTcpNoDelay") and hasattr(transport, "socket"):
                try:
                    transport.setTcpNoDelay(True)
                except OSError:
                    pass
                transport.bufferSize = readSize
                if type(transport) not in _SEND_AT_ONCE.values():
                    _sendAtOnce(transport)
            return
        transport = getattr(transport, "transport", None)


def _sendAtOnce(transport) -> None:
    """Make ``transport.write`` send at once when nothing is queued.

    Twisted's TCP ``write`` only queues: the ``send`` happens on a later reactor
    turn, after an ``epoll_ctl`` to watch for writability and before another to
    stop, and a write over the high-water mark pauses the producer (the source
    socket, through the TLS and HTTP/2 layers) until then. Here, when the queue is
    empty, the bytes go to the kernel now; what the kernel does not take is queued
    as before, so backpressure is Twisted's own from there. Errors are left to the
    queued path (the next ``doWrite`` finds them). Bulk CPU -20 % and more
    (docs/performance.md).

    The transport's class becomes a subclass of its own with this ``write`` (one
    per Twisted class, made once): nothing is added per connection."""
    cls = type(transport)
    sub = _SEND_AT_ONCE.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {
            "__module__": cls.__module__,
            "__doc__": cls.__doc__,
            "write": _writeAtOnce,
            "_queueWrite": cls.write,
        })
        _SEND_AT_ONCE[cls] = sub
    transport.__class__ = sub


_SEND_AT_ONCE: dict[type, type] = {}


def _writeAtOnce(self, data: bytes) -> None:
    if (
        not self._tempDataBuffer
        and self.offset == len(self.dataBuffer)
        and self.connected
        and not self.disconnecting
        and not self._writeDisconnecting
        and type(data) is bytes
    ):
        try:
            n = self.socket.send(data)
        except OSError:
            n = 0
        if n == len(data):
            return
        if n:
            data = data[n:]
    self._queueWrite(data)


def abortTransport(transport, streamErrorCode: int = ErrorCodes.CONNECT_ERROR) -> None:
    """Close ``transport`` so the far end sees a reset, not an end.

    An HTTP/2 stream gets RST_STREAM(``streamErrorCode``); a TCP socket gets
    SO_LINGER 0 before the close, so the kernel sends RST (PROTOCOL §7).
    """
    reset = getattr(transport, "resetStream", None)
    if reset is not None:
        reset(streamErrorCode)
        return
    try:
        handle = transport.getHandle()
        if isinstance(handle, socket.socket):
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except Exception:
        pass
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:  # e.g. StandardIO: no reset to send, only an end
        transport.loseConnection()


@implementer(IPushProducer)
class _PeerProducer:
    """A transport as the producer of its peer's transport, without ``stopProducing``.

    When a TCP transport dies, Twisted calls its producer's ``stopProducing``
    *before* the protocol's ``connectionLost``; for an HTTP/2 stream that is
    RST_STREAM(CANCEL), which would pre-empt the half's own decision: a clean end,
    or RST_STREAM(CONNECT_ERROR) for a socket error (PROTOCOL §7). The half's
    ``connectionLost`` always follows and ends the peer the right way.
    """

    __slots__ = ("transport",)

    def __init__(self, transport) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class SpliceProtocol(Protocol):
    """One half of a tunnel. Until its peer half exists, its transport is paused."""

    def __init__(self) -> None:
        self.peer: SpliceProtocol | None = None
        self.tunnel: Tunnel | None = None
        self.bytesIn = 0
        self.readDone = False
        self.writeDone = False
        self.lost = False
        self.lostReason: Failure | None = None
        self._pausedWaiting = False
        self._earlyEnd = False
        self._early: list[bytes] = []

    def connectionMade(self) -> None:
        tuneTCP(self.transport)
        if self.peer is None:
            self.transport.pauseProducing()
            self._pausedWaiting = True

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        peer = self.peer
        if peer is None:
            # a transport that delivers although paused: keep it for the join
            self._early.append(data)
        elif not peer.lost:
            peer.transport.write(data)

    def readConnectionLost(self) -> None:
        self.readDone = True
        peer = self.peer
        if peer is None:
            self._earlyEnd = True
            return
        if not peer.lost:
            # Nothing more will come from this side: stop being the peer's producer
            # first (Twisted's TCP half-close waits on a paused producer otherwise).
            peer.transport.unregisterProducer()
            peer.transport.loseWriteConnection()
        self._checkDone()

    def writeConnectionLost(self) -> None:
        self.writeDone = True
        self._checkDone()

    def _checkDone(self) -> None:
        if self.readDone and self.writeDone and not self.lost:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        self.lostReason = reason
        clean = reason.check(ConnectionDone) is not None and self.readDone
        peer = self.peer
        if peer is not None and not peer.lost:
            peer.transport.unregisterProducer()
            if clean:
                # both directions of this side ended in order; the peer finishes
                # writing what it has and closes when its own read side ends
                if not peer.writeDone:
                    peer.transport.loseWriteConnection()
            else:
                abortTransport(peer.transport)
        if self.tunnel is not None:
            self.tunnel._halfLost(self, reason, clean)


class SpliceFactory(Factory):
    """For endpoint ``connect``: builds the outbound half, paused until joined."""

    noisy = False
    protocol = SpliceProtocol

    def buildProtocol(self, addr):
        return SpliceProtocol()


class Tunnel:
    """Two joined halves, their counters, and their end."""

    def __init__(self, a: SpliceProtocol, b: SpliceProtocol, tracker: "TunnelTracker | None",
                 info: dict | None = None) -> None:
        self.a = a
        self.b = b
        self.tracker = tracker
        self.info = info or {}
        self.closed = False
        self.reason: str | None = None
        self._lastSeen = (0, 0)
        self._idleTicks = 0
        self.openedAt = tracker.clock.seconds() if tracker is not None else 0.0
        self.id = 0  # set by the tracker

    @property
    def bytesAtoB(self) -> int:
        return self.a.bytesIn

    @property
    def bytesBtoA(self) -> int:
        return self.b.bytesIn

    def _halfLost(self, half: SpliceProtocol, reason: Failure, clean: bool) -> None:
        if self.reason is None and not clean:
            self.reason = reason.getErrorMessage()
        if self.a.lost and self.b.lost and not self.closed:
            self.closed = True
            if self.tracker is not None:
                self.tracker._closed(self)

    def abort(self, why: str) -> None:
        """Reset both sides (idle timeout, drain deadline, revoked authorization)."""
        if self.reason is None:
            self.reason = why
        for half in (self.a, self.b):
            if not half.lost:
                abortTransport(half.transport, ErrorCodes.CANCEL)


def join(a: SpliceProtocol, b: SpliceProtocol, tracker: "TunnelTracker | None" = None,
         info: dict | None = None) -> Tunnel:
    """Join two connected halves: producers registered both ways, then reading resumes."""
    a.peer, b.peer = b, a
    tunnel = Tunnel(a, b, tracker, info)
    a.tunnel = b.tunnel = tunnel
    if tracker is not None:
        tracker._opened(tunnel)
    for half in (a, b):
        if half.lost:
            other = half.peer
            if not other.lost:
                half.connectionLost(half.lostReason)
            return tunnel
    a.transport.registerProducer(_PeerProducer(b.transport), True)
    b.transport.registerProducer(_PeerProducer(a.transport), True)
    for half in (a, b):
        if half._early:
            early, half._early = half._early, []
            half.peer.transport.write(b"".join(early))
        if half._earlyEnd:
            half.readConnectionLost()
        if half._pausedWaiting and not half.lost:
            half._pausedWaiting = False
            half.transport.resumeProducing()
    return tunnel


class TunnelTracker:
    """Live tunnels; the idle sweep; one report per closed tunnel.

    The sweep runs every ``idleTimeout / 4`` and aborts (RST_STREAM(CANCEL) +
    abortive close) a tunnel whose byte counters have not moved for the whole
    timeout, so the hot path only counts bytes.
    """

    log = Logger()

    def __init__(self, clock, idleTimeout: float = 3600.0,
                 onClose: Callable[[Tunnel], None] | None = None, events=None) -> None:
        self.clock = clock
        self.idleTimeout = idleTimeout
        self.onClose = onClose
        self.events = events  # hbone.events.Events: TunnelOpened / TunnelClosed
        self.tunnels: set[Tunnel] = set()
        self._sweep = None
        self.opened = 0

    def _opened(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        self.opened += 1
        tunnel.id = self.opened
        if self.events is not None:
            from hbone.events import TunnelOpened

            info = tunnel.info
            started = info.get("started")
            self.events.emit(TunnelOpened(
                info.get("direction", ""), info.get("listener", ""), info.get("peer"),
                info.get("source"), info.get("target", "?"), info.get("traceparent"),
                tunnel.openedAt - started if started is not None else None,
            ))
        if self._sweep is None and self.idleTimeout:
            self._sweep = self.clock.callLater(self.idleTimeout / 4, self._sweepIdle)

    def _closed(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        if self.events is not None:
            from hbone.events import TunnelClosed

            info = tunnel.info
            self.events.emit(TunnelClosed(
                info.get("direction", ""), info.get("listener", ""), info.get("peer"),
                info.get("source"), info.get("target", "?"), info.get("traceparent"),
                tunnel.bytesAtoB, tunnel.bytesBtoA, self.clock.seconds() - tunnel.openedAt,
                tunnel.reason,
            ))
        if self.onClose is not None:
            try:
                self.onClose(tunnel)
            except Exception:
                self.log.failure("tunnel close observer failed")

    def _sweepIdle(self) -> None:
        self._sweep = None
        for tunnel in list(self.tunnels):
            seen = (tunnel.a.bytesIn, tunnel.b.bytesIn)
            if seen != tunnel._lastSeen:
                tunnel._lastSeen = seen
                tunnel._idleTicks = 0
                continue
            tunnel._idleTicks += 1
            if tunnel._idleTicks >= 4:
                tunnel.abort(f"idle for {self.idleTimeout:g}s")
        if self.tunnels:
            self._sweep = self.clock.callLater(self.idleTimeout / 4, self._sweepIdle)

    def abortAll(self, why: str) -> None:
        for tunnel in list(self.tunnels):
            tunnel.abort(why)

    def stop(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
