"""The HTTP/2 protocol for both roles: h2 state, send scheduling, flow control,
limits, keepalive PING and GOAWAY.

One :class:`HBoneH2Protocol` sits on one TLS (or, for tests and ``h2c``, plain)
transport. Its HTTP/2 role is a parameter, independent of the TLS role, so an H2R
node can be the HTTP/2 server on a connection it dialed.

It is the ``IPushProducer`` of its transport: when TCP backs up, stream DATA stops
being handed to h2 and waits in the streams (whose sources are paused); control
frames still go out, up to :attr:`ConnectionSettings.maxControlBytesWhilePaused`,
and a peer that makes us queue more is cut off (CVE-2019-9512/9514/9515).

Every per-connection limit lives in :class:`FrameAccounting` (SECURITY §4.4).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset as H2StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbone.errors import HopIdentityError, HopUnreachable, StreamReset, TunnelRefused
from hbone.h2.stream import H2TunnelStream

__all__ = [
    "ConnectionSettings",
    "FrameAccounting",
    "HBoneH2Connection",
    "HBoneH2Protocol",
    "HBoneH2Factory",
    "RefusedStream",
]

MAX_STREAM_ID = 2**31 - 1


@dataclass(frozen=True)
class ConnectionSettings:
    """Every HTTP/2 setting, limit and timer of PROTOCOL §3 and SECURITY §4.4/§4.5,
    by name, with its shipped default."""

    # advertised SETTINGS
    headerTableSize: int = 4096
    maxConcurrentStreams: int = 100
    initialWindowSize: int = 4 * 1024 * 1024
    connectionWindowSize: int = 16 * 1024 * 1024
    maxFrameSize: int = 1024 * 1024
    maxHeaderListSize: int = 8192
    # local caps
    maxStreamsPerConnection: int = 100  # client side: min(peer's MAX_CONCURRENT_STREAMS, this)
    maxControlBytesWhilePaused: int = 16 * 1024
    maxHeaderFields: int = 32
    # timers (seconds)
    handshakeTimeout: float = 10.0
    settingsTimeout: float = 10.0
    keepaliveInterval: float = 10.0
    pingTimeout: float = 20.0
    idleTimeout: float | None = None  # connection with no streams; None: role default
    goAwayLinger: float = 1.0

    def withIdle(self, role: str) -> "ConnectionSettings":
        if self.idleTimeout is not None:
            return self
        return replace(self, idleTimeout=300.0 if role == "client" else 600.0)


class RefusedStream(HopUnreachable):
    """The peer did not process this stream (GOAWAY below its id, or REFUSED_STREAM):
    safe to retry once on another connection."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503, "destination_unavailable")


class HBoneH2Connection(H2Connection):
    """h2's connection with hbone's settings in force from the first byte, and a
    GOAWAY that is reported rather than obeyed, and POST body lengths left to hbone.

    Stock h2 moves to CLOSED on a received GOAWAY and drops queued output
    (python-hyper/h2#1181), which would kill live tunnels on a draining peer. Here a
    GOAWAY only produces :class:`ConnectionTerminated`; the protocol stops opening
    streams and lets live ones finish. ``tests/test_h2_internals.py`` pins the h2
    internals this relies on.
    """

    def __init__(self, config: H2Configuration, settings: ConnectionSettings) -> None:
        super().__init__(config)
        values = {
            SettingCodes.HEADER_TABLE_SIZE: settings.headerTableSize,
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.maxConcurrentStreams,
            SettingCodes.INITIAL_WINDOW_SIZE: settings.initialWindowSize,
            SettingCodes.MAX_FRAME_SIZE: settings.maxFrameSize,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.maxHeaderListSize,
        }
        if config.client_side:
            values[SettingCodes.ENABLE_PUSH] = 0
        # In force at once (not only after the peer's ACK): the header list cap
        # applies from the first block (SECURITY §4.4).
        self.local_settings = Settings(client=config.client_side, initial_values=values)
        self.decoder.max_header_list_size = settings.maxHeaderListSize
        self.max_inbound_frame_size = settings.maxFrameSize
        self._frame_dispatch_table[GoAwayFrame] = self._receiveGoAwayReported

    def _receive_headers_frame(self, frame):
        # A POST body that runs long or ends early is a stream error, enforced by
        # H2TunnelStream.expectBodyLength (PROTOCOL §5); h2's own check would make
        # it a connection error and kill every other tunnel on the connection.
        frames, events = super()._receive_headers_frame(frame)
        stream = self.streams.get(frame.stream_id)
        if stream is not None:
            stream._expected_content_length = None
        return frames, events

    def _receiveGoAwayReported(self, frame: GoAwayFrame):
        event = ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class FrameAccounting:
    """The one place for per-connection frame limits (SECURITY §4.4).

    Enforced today: MAX_CONCURRENT_STREAMS (by h2, from the first frame), the 8 KiB
    header list (by hpack, from the first block), the header-field count (stream
    400), and the control bytes queued while the peer is not reading. The rate
    limits of the hardening work join here.
    """

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self.controlBytesWhilePaused = 0

    def controlWritten(self, n: int) -> bool:
        """Count bytes written while paused; False once over the cap."""
        self.controlBytesWhilePaused += n
        return self.controlBytesWhilePaused <= self.settings.maxControlBytesWhilePaused

    def resumed(self) -> None:
        self.controlBytesWhilePaused = 0

    def tooManyHeaderFields(self, headers) -> bool:
        regular = 0
        for name, _ in headers:
            if not name.startswith(b":"):
                regular += 1
        return regular > self.settings.maxHeaderFields


@implementer(IHandshakeListener, IPushProducer)
class HBoneH2Protocol(Protocol):
    """One HBONE HTTP/2 connection, client or server role.

    :param role: ``"client"`` (opens streams) or ``"server"`` (accepts them).
    :param streamHandler: server role: called as ``streamHandler(stream, headers)``
        for each request; it must answer with ``stream``'s connection's
        :meth:`respond` and attach a protocol, or reject.
    :param expectALPN: the ALPN token the TLS layer must have negotiated, or None
        on a plain transport.
    """

    log = Logger()

    def __init__(
        self,
        role: str,
        clock,
        settings: ConnectionSettings = ConnectionSettings(),
        streamHandler: Callable | None = None,
        expectALPN: bytes | None = b"h2",
        localIdentity=None,
        name: str = "hbone",
    ) -> None:
        assert role in ("client", "server")
        self.role = role
        self.clock = clock
        self.settings = settings.withIdle(role)
        self.streamHandler = streamHandler
        self.expectALPN = expectALPN
        self.localIdentity = localIdentity
        self.nodeName = name
        self.peerIdentity = None
        self.accounting = FrameAccounting(self.settings)
        self._conn = HBoneH2Connection(
            H2Configuration(client_side=(role == "client"), header_encoding=None),
            self.settings,
        )
        self.streams: dict[int, H2TunnelStream] = {}
        self._responses: dict[int, defer.Deferred] = {}
        self._blocked: OrderedDict[int, H2TunnelStream] = OrderedDict()
        self._paused = False
        self._inReceive = False
        self.h2Started = False
        self.ready = False
        self._readyWaiters: list[defer.Deferred] = []
        self.goingAway = False  # no new streams on this connection
        self.sentGoAway = False
        self.goAwayLastStreamID = MAX_STREAM_ID  # the lowest last_stream_id we sent
        self._registered = False  # as our transport's producer
        self._h2Closed = False  # h2 hit a protocol error and queued its GOAWAY
        self.closed = False
        self._failure: Failure | None = None
        self._timer = None
        self._deadline: float | None = None
        self._deadlineWhat = ""
        self._lastReceived = 0.0
        self._pingSentAt: float | None = None
        self._idleSince: float | None = None
        self._closeTimer = None
        self.reserved = 0  # client: streams promised to callers but not yet opened
        # pool hooks
        self.onCapacity: Callable[["HBoneH2Protocol"], None] | None = None
        self.onGoingAway: Callable[["HBoneH2Protocol"], None] | None = None
        self.onClosed: Callable[["HBoneH2Protocol", Failure], None] | None = None

    # -- setup -------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self._registered = True
        now = self.clock.seconds()
        self._lastReceived = now
        if self.expectALPN is None:
            self._startH2()
        else:
            self._setDeadline(self.settings.handshakeTimeout, "TLS handshake")
        self._schedule()

    def handshakeCompleted(self) -> None:
        tls = self.transport.getHandle()
        from hbone.tls import verifyStateOf

        state = verifyStateOf(tls)
        self.peerIdentity = state.peerId if state else None
        negotiated = tls.get_alpn_proto_negotiated() or None
        if negotiated != self.expectALPN:
            self._failure = Failure(
                HopUnreachable(
                    f"ALPN {negotiated.decode('ascii', 'replace') if negotiated else 'none'!s} "
                    f"negotiated, {self.expectALPN.decode()} required"
                )
            )
            self.log.info(
                "closing connection from {peer}: {reason}",
                peer=_fmtPeer(self.transport),
                reason=self._failure.getErrorMessage(),
            )
            self.transport.abortConnection()
            return
        if self.peerIdentity is None:  # pragma: no cover - the verify callback guarantees it
            self._failure = Failure(HopIdentityError("peer presented no SPIFFE identity"))
            self.transport.abortConnection()
            return
        self._startH2()

    def _startH2(self) -> None:
        self.h2Started = True
        self._conn.initiate_connection()
        extra = self.settings.connectionWindowSize - 65535
        if extra > 0:
            self._conn.increment_flow_control_window(extra)
        self._flush()
        self._setDeadline(self.settings.settingsTimeout, "HTTP/2 preface and SETTINGS")

    def whenReady(self) -> defer.Deferred:
        """Fires with self once the peer's first SETTINGS arrived (PROTOCOL §2
        readiness), or fails with why the connection did not come up."""
        if self.ready:
            return defer.succeed(self)
        if self.closed:
            return defer.fail(self._readyFailure(self._failure or Failure(ConnectionDone())))
        d = defer.Deferred()
        self._readyWaiters.append(d)
        return d

    # -- timers: handshake/settings deadline, keepalive, idle ----------------------

    def _setDeadline(self, seconds: float, what: str) -> None:
        self._deadline = self.clock.seconds() + seconds
        self._deadlineWhat = what
        self._schedule()

    def _schedule(self) -> None:
        if self.closed:
            return
        now = self.clock.seconds()
        candidates = []
        if self._deadline is not None:
            candidates.append(self._deadline)
        if self.ready:
            if self._pingSentAt is not None:
                candidates.append(self._pingSentAt + self.settings.pingTimeout)
            else:
                candidates.append(self._lastReceived + self.settings.keepaliveInterval)
            if self._idleSince is not None:
                candidates.append(self._idleSince + self.settings.idleTimeout)
        if not candidates:
            return
        when = max(min(candidates), now)
        if self._timer is not None and self._timer.active():
            if abs(self._timer.getTime() - when) < 0.001:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(when - now, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed or self._h2Closed:
            return
        now = self.clock.seconds()
        if self._deadline is not None and now >= self._deadline:
            what = self._deadlineWhat
            self.log.info(
                "closing connection with {peer}: no {what} within the deadline",
                peer=_fmtPeer(self.transport),
                what=what,
            )
            self._abort(HopUnreachable(f"{what} did not finish within the deadline", 504, "connection_timeout"))
            return
        if self.ready:
            if self._pingSentAt is not None:
                if now >= self._pingSentAt + self.settings.pingTimeout:
                    self.log.info(
                        "closing connection with {peer} ({identity}): no PING ACK in {t}s",
                        peer=_fmtPeer(self.transport),
                        identity=str(self.peerIdentity),
                        t=self.settings.pingTimeout,
                    )
                    self._abort(ConnectionLost("missed PING ACK"))
                    return
            elif now >= self._lastReceived + self.settings.keepaliveInterval:
                self._pingSentAt = now
                self._conn.ping(os.urandom(8))
                self._flush()
            if (
                self._idleSince is not None
                and not self.streams
                and now >= self._idleSince + self.settings.idleTimeout
            ):
                self.log.debug("closing idle connection to {peer}", peer=_fmtPeer(self.transport))
                self.goAway(ErrorCodes.NO_ERROR)
                self._setGoingAway()
                self.loseConnection()
                return
        self._schedule()

    # -- receiving -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed or self._h2Closed:
            return
        self._lastReceived = self.clock.seconds()
        self._inReceive = True
        try:
            try:
                events = self._conn.receive_data(data)
            except ProtocolError as e:
                self._protocolError(e)
                return
            for event in events:
                handler = self._handlers.get(type(event))
                if handler is not None:
                    handler(self, event)
                if self.closed:
                    return
        finally:
            self._inReceive = False
        self._flush()
        if self._pingSentAt is None and self._timer is None:
            self._schedule()

    def _protocolError(self, error: ProtocolError) -> None:
        code = getattr(error, "error_code", ErrorCodes.PROTOCOL_ERROR)
        self.log.info(
            "HTTP/2 protocol error from {peer} ({identity}): {error}; sending GOAWAY({code})",
            peer=_fmtPeer(self.transport),
            identity=str(self.peerIdentity),
            error=str(error),
            code=ErrorCodes(code).name if isinstance(code, int) else code,
        )
        # h2 has already queued its GOAWAY
        self._inReceive = False
        self._flush()
        self._h2Closed = True
        self.sentGoAway = True
        self._failure = Failure(ConnectionLost(f"HTTP/2 protocol error: {error}"))
        self._closeAfterGoAway()

    def _onRemoteSettings(self, event: RemoteSettingsChanged) -> None:
        if not self.ready:
            self.ready = True
            self._deadline = None
            if not self.streams:
                self._idleSince = self.clock.seconds()
            waiters, self._readyWaiters = self._readyWaiters, []
            for d in waiters:
                d.callback(self)
            self._schedule()
        changed = event.changed_settings
        if SettingCodes.INITIAL_WINDOW_SIZE in changed or SettingCodes.MAX_FRAME_SIZE in changed:
            self._sendBlocked()
        if SettingCodes.MAX_CONCURRENT_STREAMS in changed and self.onCapacity:
            self.onCapacity(self)

    def _onRequest(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self.role != "server" or self.streamHandler is None:
            self._conn.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        if self.sentGoAway and sid > self.goAwayLastStreamID:
            # above the last id we promised to process (RFC 9113 §6.8)
            self._conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        headers = event.headers
        stream = H2TunnelStream(self, sid, None, headers)
        self.streams[sid] = stream
        self._idleSince = None
        if self.accounting.tooManyHeaderFields(headers):
            self.respond(stream, 400, error="http_request_error")
            return
        try:
            self.streamHandler(stream, headers)
        except Exception:
            self.log.failure("stream handler failed for stream {sid}", sid=sid)
            if not stream.closed:
                stream._reset(ErrorCodes.INTERNAL_ERROR)

    def _onResponse(self, event: ResponseReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        d = self._responses.pop(sid, None)
        if stream is None or d is None:
            return
        status = None
        proxyStatus = None
        for name, value in event.headers:
            if name == b":status":
                status = int(value)
            elif name == b"proxy-status":
                proxyStatus = value.decode("latin-1")
        stream.responseHeaders = event.headers
        if status == 200:
            stream.responseReceived = True
            d.callback(stream)
        else:
            # error responses end the stream; drop it quietly
            if not event.stream_ended:
                try:
                    self._conn.reset_stream(sid, ErrorCodes.CANCEL)
                except StreamClosedError:
                    pass
            stream._close(Failure(ConnectionDone(f"refused with {status}")))
            d.errback(
                TunnelRefused(status or 0, proxyStatus, stream.authority or "?", _fmtPeer(self.transport))
            )

    def _onInformational(self, event) -> None:
        pass  # 1xx is ignored (PROTOCOL §6)

    def _onTrailers(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream._reset(ErrorCodes.PROTOCOL_ERROR)

    def _onData(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or (self.role == "client" and not stream.responseReceived):
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream._dataReceived(event.data, event.flow_controlled_length)

    def _onStreamEnded(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream._remoteEnd()

    def _onStreamReset(self, event: H2StreamReset) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        d = self._responses.pop(sid, None)
        if stream is None:
            return
        if d is not None:
            stream._close(Failure(StreamReset(event.error_code)))
            if event.error_code == ErrorCodes.REFUSED_STREAM:
                d.errback(RefusedStream(f"{_fmtPeer(self.transport)} refused stream {sid}"))
            else:
                d.errback(StreamReset(event.error_code))
            return
        stream._remoteReset(event.error_code)

    def _onWindowUpdated(self, event: WindowUpdated) -> None:
        if event.stream_id == 0:
            self._sendBlocked()
        elif not self._paused:  # else resumeProducing sends it
            stream = self._blocked.get(event.stream_id)
            if stream is not None:
                self._sendStream(stream)

    def _onPingAck(self, event: PingAckReceived) -> None:
        self._pingSentAt = None
        self._schedule()

    def _onGoAway(self, event: ConnectionTerminated) -> None:
        code = event.error_code
        last = event.last_stream_id
        self._setGoingAway()
        if code != ErrorCodes.NO_ERROR:
            name = code.name if isinstance(code, ErrorCodes) else str(code)
            self.log.info(
                "{peer} ({identity}) sent GOAWAY({code}); closing its {n} tunnels",
                peer=_fmtPeer(self.transport),
                identity=str(self.peerIdentity),
                code=name,
                n=len(self.streams),
            )
            self._abort(ConnectionLost(f"peer sent GOAWAY({name})"))
            return
        # Graceful: streams above last_stream_id were not processed (retryable);
        # the rest run to completion.
        mine = 1 if self.role == "client" else 0
        for sid in sorted(self.streams):
            if sid > last and sid % 2 == mine:
                stream = self.streams[sid]
                d = self._responses.pop(sid, None)
                refused = RefusedStream(f"{_fmtPeer(self.transport)} is going away")
                stream._close(Failure(refused))
                if d is not None:
                    d.errback(refused)
        if not self.streams and not self.closed:
            self.loseConnection()

    _handlers = {
        RemoteSettingsChanged: _onRemoteSettings,
        RequestReceived: _onRequest,
        ResponseReceived: _onResponse,
        InformationalResponseReceived: _onInformational,
        TrailersReceived: _onTrailers,
        DataReceived: _onData,
        StreamEnded: _onStreamEnded,
        H2StreamReset: _onStreamReset,
        WindowUpdated: _onWindowUpdated,
        PingAckReceived: _onPingAck,
        ConnectionTerminated: _onGoAway,
    }

    # -- opening and answering streams -----------------------------------------

    @property
    def capacity(self) -> int:
        """Client role: how many more streams this connection may carry."""
        if not self.ready or self.goingAway or self.closed:
            return 0
        peerMax = self._conn.remote_settings.max_concurrent_streams
        limit = min(peerMax, self.settings.maxStreamsPerConnection)
        return limit - len(self.streams) - self.reserved

    def openTunnel(self, headers: list[tuple[bytes, bytes]], authority: str) -> tuple[H2TunnelStream, defer.Deferred]:
        """Client role: send the request HEADERS; the Deferred fires with the stream
        on ``200`` and fails with :class:`TunnelRefused`, :class:`StreamReset` or
        :class:`RefusedStream` otherwise."""
        if self.goingAway or self.closed:
            raise RefusedStream("connection is going away")
        sid = self._conn.get_next_available_stream_id()
        stream = H2TunnelStream(self, sid, authority, headers)
        self.streams[sid] = stream
        self._idleSince = None
        d = defer.Deferred()
        self._responses[sid] = d
        self._conn.send_headers(sid, headers, end_stream=False)
        self._flush()
        return stream, d

    def respond(
        self,
        stream: H2TunnelStream,
        status: int,
        headers: list[tuple[bytes, bytes]] = (),
        error: str | None = None,
    ) -> None:
        """Server role: send the response HEADERS. Anything but 200 ends the stream."""
        if stream.closed:
            return
        out = [(b":status", str(status).encode("ascii"))]
        if status != 200:
            out.append((b"proxy-status", f"{self.nodeName}; error={error or 'proxy_internal_response'}".encode("ascii")))
        out.extend(headers)
        end = status != 200
        try:
            self._conn.send_headers(stream.streamID, out, end_stream=end)
        except (StreamClosedError, ProtocolError):
            stream._close(Failure(ConnectionDone()))
            return
        stream.responseReceived = True
        if end:
            stream.localEnded = True
            if not stream.remoteEnded:
                # we will not read the request body: RST_STREAM(NO_ERROR) (RFC 9113 §8.1)
                try:
                    self._conn.reset_stream(stream.streamID, ErrorCodes.NO_ERROR)
                except (StreamClosedError, ProtocolError):
                    pass
            stream._close(Failure(ConnectionDone(f"answered {status}")))
        self._flush()

    # -- sending stream data ----------------------------------------------------

    def _streamHasData(self, stream: H2TunnelStream) -> None:
        if self._paused or self.closed:
            self._blocked[stream.streamID] = stream
            if stream._outbuf:
                stream._pauseProducer()
            return
        self._sendStream(stream)
        self._flush()

    def _sendStream(self, stream: H2TunnelStream) -> None:
        if stream.closed:
            self._blocked.pop(stream.streamID, None)
            return
        conn = self._conn
        sid = stream.streamID
        buf = stream._outbuf
        ended = False
        try:
            while buf:
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                n = min(window, conn.max_outbound_frame_size)
                chunk = buf[0]
                if len(chunk) <= n:
                    buf.popleft()
                    stream._outbytes -= len(chunk)
                    end = stream._endPending and not buf
                    conn.send_data(sid, chunk, end_stream=end)
                    ended = ended or end
                else:
                    conn.send_data(sid, chunk[:n])
                    buf[0] = chunk[n:]
                    stream._outbytes -= n
            # an empty END_STREAM DATA is flow-controlled too: not while the peer's
            # SETTINGS has made the window negative (RFC 9113 §6.9.2)
            if not buf and stream._endPending and not ended and conn.local_flow_control_window(sid) >= 0:
                conn.end_stream(sid)
                ended = True
        except StreamClosedError:
            self._blocked.pop(sid, None)
            return
        self._blocked.pop(sid, None)
        if buf:
            self._blocked[sid] = stream  # at the back: round robin
            stream._pauseProducer()
        else:
            if stream._endPending and not ended:
                self._blocked[sid] = stream  # END_STREAM waits for WINDOW_UPDATE
            stream._drained()
        if ended:
            stream._sentEnd()

    def _sendBlocked(self) -> None:
        if self._paused or not self._blocked:
            return
        for stream in list(self._blocked.values()):
            if self._paused:
                break
            if self._conn.outbound_flow_control_window <= 0:
                break
            self._sendStream(stream)
        self._flush()

    def _acknowledge(self, stream: H2TunnelStream, n: int) -> None:
        if self.closed or self._h2Closed:
            return
        self._conn.acknowledge_received_data(n, stream.streamID)
        if not self._inReceive:
            self._flush()

    def _resetStream(self, stream: H2TunnelStream, code: int) -> None:
        self._responses.pop(stream.streamID, None)
        if self.closed:
            return
        try:
            self._conn.reset_stream(stream.streamID, code)
        except (StreamClosedError, ProtocolError):
            return
        if not self._inReceive:
            self._flush()

    def _streamClosed(self, stream: H2TunnelStream) -> None:
        sid = stream.streamID
        if self.streams.pop(sid, None) is None:
            return
        self._blocked.pop(sid, None)
        if not self.streams:
            self._idleSince = self.clock.seconds()
            if self.goingAway and not self.closed and self.transport is not None:
                self.loseConnection()
                return
            self._schedule()
        if self.onCapacity is not None and not self.closed:
            self.onCapacity(self)

    def _flush(self) -> None:
        if self._inReceive or self.transport is None:
            return
        data = self._conn.data_to_send()
        if not data:
            return
        if self._paused and not self.accounting.controlWritten(len(data)):
            self.log.info(
                "{peer} ({identity}) is not reading: over {cap} bytes of control frames queued; aborting",
                peer=_fmtPeer(self.transport),
                identity=str(self.peerIdentity),
                cap=self.settings.maxControlBytesWhilePaused,
            )
            self._abort(ConnectionLost("peer stopped reading"))
            return
        self.transport.write(data)

    # -- GOAWAY ----------------------------------------------------------------

    def goAway(self, code: int = ErrorCodes.NO_ERROR, lastStreamID: int | None = None) -> None:
        """Send GOAWAY without moving h2 to CLOSED, so live streams keep flowing."""
        if lastStreamID is None:
            lastStreamID = self._conn.highest_inbound_stream_id
        lastStreamID = min(lastStreamID, self.goAwayLastStreamID)  # it may only go down
        frame = GoAwayFrame(0, last_stream_id=lastStreamID, error_code=code)
        self.sentGoAway = True
        self.goAwayLastStreamID = lastStreamID
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.write(frame.serialize())

    def _closeAfterGoAway(self) -> None:
        self._setGoingAway()
        for stream in list(self.streams.values()):
            stream._connectionLost(self._failure)
        self.loseConnection()
        if self._closeTimer is None:
            self._closeTimer = self.clock.callLater(self.settings.goAwayLinger, self._forceClose)

    def _setGoingAway(self) -> None:
        """No new streams here; tell the pool once."""
        if self.goingAway:
            return
        self.goingAway = True
        if self.onGoingAway is not None:
            self.onGoingAway(self)

    def _abort(self, why: Exception) -> None:
        self._failure = Failure(why)
        self._setGoingAway()
        self.transport.abortConnection()

    def loseConnection(self) -> None:
        """Close the connection after what is queued (send GOAWAY first).

        Callers must use this, not ``transport.loseConnection()``: this protocol is
        its transport's producer, and ``TLSMemoryBIOProtocol`` does not begin its
        TLS shutdown (so never closes) while a producer is registered."""
        if self.transport is None or self.closed:
            return
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _forceClose(self) -> None:
        self._closeTimer = None
        if not self.closed:
            self.transport.abortConnection()

    # -- IPushProducer (for our transport) ------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.accounting.resumed()
        self._sendBlocked()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    # -- teardown ----------------------------------------------------------------

    def _readyFailure(self, reason: Failure) -> Failure:
        if isinstance(reason.value, HopUnreachable):
            return reason
        tls = None
        try:
            tls = self.transport.getHandle()
        except Exception:
            pass
        from hbone.tls import verifyStateOf

        state = verifyStateOf(tls) if tls is not None else None
        peer = _fmtPeer(self.transport)
        if state is not None and state.reason:
            msg = f"TLS handshake with {peer} refused: {state.reason}"
            if state.certificate:
                msg += f" (certificate: {state.certificate})"
            return Failure(HopIdentityError(msg))
        if not self.h2Started and self.expectALPN is not None:
            return Failure(
                HopIdentityError(f"TLS handshake with {peer} failed: {reason.getErrorMessage()}")
            )
        return Failure(
            HopUnreachable(
                f"{peer} closed the connection before its HTTP/2 SETTINGS "
                f"(did it refuse our certificate?): {reason.getErrorMessage()}"
            )
        )

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.closed:
            return
        self.closed = True
        self.goingAway = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self._closeTimer = None
        failure = self._failure or reason
        if not self.ready:
            rf = self._readyFailure(failure)
            if self.role == "server" and self.expectALPN is not None and not self.h2Started:
                self.log.info("{msg}", msg=rf.getErrorMessage())
            waiters, self._readyWaiters = self._readyWaiters, []
            for d in waiters:
                d.errback(rf)
        lost = failure if not failure.check(ConnectionDone) else Failure(ConnectionLost("HTTP/2 connection closed"))
        for sid, d in list(self._responses.items()):
            self._responses.pop(sid, None)
            stream = self.streams.pop(sid, None)
            if stream is not None:
                stream.closed = True
            d.errback(HopUnreachable(f"connection to {_fmtPeer(self.transport)} lost: {lost.getErrorMessage()}"))
        for stream in list(self.streams.values()):
            stream._connectionLost(lost)
        self.streams.clear()
        self._blocked.clear()
        if self.onClosed is not None:
            self.onClosed(self, failure)


def _fmtPeer(transport) -> str:
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is None:
        return str(peer)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class HBoneH2Factory(Factory):
    """Builds :class:`HBoneH2Protocol` for one role (wrapped in TLS by the caller)."""

    noisy = False

    def __init__(self, role: str, clock, settings: ConnectionSettings = ConnectionSettings(),
                 streamHandler=None, expectALPN: bytes | None = b"h2", localIdentity=None,
                 name: str = "hbone") -> None:
        self.role = role
        self.clock = clock
        self.settings = settings
        self.streamHandler = streamHandler
        self.expectALPN = expectALPN
        self.localIdentity = localIdentity
        self.name = name

    def buildProtocol(self, addr):
        p = HBoneH2Protocol(
            self.role,
            self.clock,
            self.settings,
            self.streamHandler,
            self.expectALPN,
            self.localIdentity,
            self.name,
        )
        p.factory = self
        return p
