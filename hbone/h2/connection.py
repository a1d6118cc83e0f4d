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
import struct
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Callable

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
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
from h2.stream import StreamState
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import DataFrame, GoAwayFrame
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbone.errors import HopIdentityError, HopUnreachable, StreamReset, TunnelRefused
from hbone.h2.stream import H2TunnelStream
from hbone.splice import tuneTCP
from hbone.logs import RejectionLog

__all__ = [
    "ConnectionSettings",
    "FrameAccounting",
    "LimitExceeded",
    "HBoneH2Connection",
    "HBoneH2Protocol",
    "HBoneH2Factory",
    "RefusedStream",
]

MAX_STREAM_ID = 2**31 - 1
_DRAIN_PING = b"hbdrain1"  # the opaque data of the drain's PING (its ACK ends the first phase)


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
    # abuse limits, enforced by FrameAccounting (SECURITY §4.4)
    maxHeaderBlockBytes: int = 16 * 1024  # HEADERS + CONTINUATION payload
    maxContinuationFrames: int = 8  # per header block
    maxPrematureResets: int = 50  # more than this in any window: GOAWAY(0xb)
    prematureResetWindow: float = 10.0
    prematureResetLifetime: float = 1.0  # a reset this soon after opening is premature even after the 200
    pingRate: float = 10.0  # PING frames received per second, sustained
    pingBurst: int = 50
    settingsRate: float = 10.0  # SETTINGS frames received per second, sustained
    settingsBurst: int = 50
    maxSettingsEntries: int = 32  # per SETTINGS frame
    maxConsecutiveEmptyData: int = 1  # empty DATA without END_STREAM tolerated in a row
    maxPriorityPerStream: int = 100  # PRIORITY frames <= this x (streams opened + 1)
    windowUpdateAllowance: int = 100  # WINDOW_UPDATE frames <= this + ratio x DATA frames sent
    windowUpdatesPerDataFrame: int = 10
    # listener caps (SECURITY §4.5, §4.6), enforced by hbone.limits.ListenerGate
    maxHandshakesPerListener: int = 128
    maxConnectionsPerListener: int = 1024
    # SNI gateway peek (SECURITY §4.5; the hello's size caps are hbone.clienthello's MAX_*)
    sniPeekTimeout: float = 10.0  # accept -> a complete ClientHello
    sniMaxPeeking: int = 1024  # connections still peeking per sni listener; beyond: closed at once
    # timers (seconds)
    handshakeTimeout: float = 10.0
    settingsTimeout: float = 10.0
    keepaliveInterval: float = 10.0
    pingTimeout: float = 20.0
    idleTimeout: float | None = None  # connection with no streams; None: role default
    goAwayLinger: float = 1.0
    drainGoAwayDelay: float = 1.0  # drain: first GOAWAY -> second, unless a PING returns sooner

    def withIdle(self, role: str) -> "ConnectionSettings":
        if self.idleTimeout is not None:
            return self
        return replace(self, idleTimeout=300.0 if role == "client" else 600.0)


class RefusedStream(HopUnreachable):
    """The peer did not process this stream (GOAWAY below its id, or REFUSED_STREAM):
    safe to retry once on another connection."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503, "destination_unavailable")


class _QuietDataFrame(DataFrame):
    """A received DATA frame whose ``repr`` does not hex-dump the payload.

    h2 builds ``repr(frame)`` for a trace log on every received frame, and
    hyperframe hex-encodes a whole DATA payload for it: 15-20 % of a receiver's CPU
    (docs/performance.md)."""

    __slots__ = ()

    def _body_repr(self) -> str:
        return f"<{len(self.data)} bytes>"


class _QuietFrameBuffer(FrameBuffer):
    def _update_header_buffer(self, f):
        f = super()._update_header_buffer(f)
        if f is not None and f.__class__ is DataFrame:
            f.__class__ = _QuietDataFrame
        return f


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
        self.incoming_buffer = _QuietFrameBuffer(server=not config.client_side)
        self._frame_dispatch_table[_QuietDataFrame] = self._receive_data_frame

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


# frame types and flags (RFC 9113 §6)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = range(10)
_END_STREAM = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_NOT_FAST = _END_STREAM | _PADDED  # DATA frames with these flags go to h2
_RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)  # h2 stream states that accept DATA
_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)  # ... and that may send it
_FRAME_HEADER = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: After an error GOAWAY, incoming bytes are dropped, and past this many the
#: transport stops reading (a peer that closes at once still gets a clean close).
DISCARD_AFTER_GOAWAY = 65536
#: DATA frames sent are counted in units of at most this many bytes for the
#: WINDOW_UPDATE budget: peers acknowledge per read, not per frame, and hbone's
#: frames go up to 1 MiB (Envoy's ratio of 10 assumes 16 KiB frames).
DATA_FRAME_UNIT = 16384
#: Bytes of frames h2 is given at once (whole frames; DATA on the fast path is
#: not counted): what it answers is checked against the control-queue cap
#: after each piece, as it was when TLS delivered one 16 KiB record at a time.
H2_SEGMENT = 16384


class LimitExceeded(tuple):
    """A verdict of :meth:`FrameAccounting.scan`: ``(offset, code, key, reason)``:
    the offending frame starts at ``offset`` in the bytes scanned (0 when it began in
    an earlier read); the connection ends with GOAWAY(``code``); ``key`` names the
    limit (a fixed set, for rate-limited logging); ``reason`` says what happened."""

    __slots__ = ()

    def __new__(cls, offset: int, code: int, key: str, reason: str):
        return tuple.__new__(cls, (offset, code, key, reason))

    offset = property(lambda self: self[0])
    code = property(lambda self: self[1])
    key = property(lambda self: self[2])
    reason = property(lambda self: self[3])


class FrameAccounting:
    """The one place for per-connection frame limits (SECURITY §4.4).

    ===================================  =============================  =======================
    limit (:class:`ConnectionSettings`)  default                        answer
    ===================================  =============================  =======================
    MAX_CONCURRENT_STREAMS               100 (h2, from the first frame)  GOAWAY(PROTOCOL_ERROR)
    decoded header list                  8 KiB (hpack, first block)      GOAWAY(ENHANCE_YOUR_CALM)
    ``maxHeaderFields``                  32 regular fields               stream ``400``
    ``maxHeaderBlockBytes``              16 KiB of HEADERS+CONTINUATION  GOAWAY(0xb), from the
    ``maxContinuationFrames``            8 per block                     frame header (scan)
    ``maxFrameSize``                     1 MiB                           GOAWAY(FRAME_SIZE_ERROR),
                                                                         from the frame header
    ``maxPrematureResets``               > 50 in ``prematureResetWindow``  GOAWAY(0xb)
                                         (10 s); premature: before the
                                         ``200``, or within
                                         ``prematureResetLifetime`` (1 s)
    ``pingRate``/``pingBurst``           10/s, burst 50                  GOAWAY(0xb)
    ``settingsRate``/``settingsBurst``   10/s, burst 50                  GOAWAY(0xb)
    ``maxSettingsEntries``               32 per frame                    GOAWAY(0xb), first frame
    ``maxConsecutiveEmptyData``          1 (the 2nd in a row trips)      GOAWAY(0xb)
    ``maxPriorityPerStream``             100 x (streams opened + 1)      GOAWAY(0xb)
    ``windowUpdateAllowance`` +          100 + 10 x DATA frames sent     GOAWAY(0xb)
    ``windowUpdatesPerDataFrame``        (a frame counts once per
                                         started 16 KiB)
    ``maxControlBytesWhilePaused``       16 KiB                          abort the connection
    ===================================  =============================  =======================

    :meth:`scan` reads only the 9-byte frame headers of what arrives, before h2
    sees (and buffers) a byte of it: DATA payloads are skipped by their length, so
    its cost is per frame, not per byte. A frame that breaks a limit is never given
    to h2, nor is anything after it. Premature resets are counted from h2's events
    and hbone's own stream errors (:meth:`prematureReset`).
    """

    def __init__(self, settings: ConnectionSettings, server: bool = True, now: float = 0.0) -> None:
        self.settings = settings
        self.controlBytesWhilePaused = 0
        self.peakControlBytesWhilePaused = 0
        # the frame-header scanner
        self._preface = _PREFACE if server else b""
        self._peerParity = 1 if server else 0  # stream ids the peer opens
        self._skip = 0  # payload bytes of the current frame still to come
        self._partial = b""  # a frame header split across reads
        self._padPending: tuple[int, int] | None = None  # PADDED DATA awaiting its pad-length byte
        self.off = False  # a bad preface: h2 answers it, nothing is scanned
        self._inBlock = False
        self._blockBytes = 0
        self._continuations = 0
        # counters
        self.streamsOpened = 0
        self._highestStream = 0
        self.priorityFrames = 0
        self.windowUpdates = 0
        self.dataFramesSent = 0
        self.emptyData = 0
        self.pingFrames = 0
        self.settingsFrames = 0
        self._pingTokens = float(settings.pingBurst)
        self._pingAt = now
        self._settingsTokens = float(settings.settingsBurst)
        self._settingsAt = now
        self._resets: deque[float] = deque()
        self.prematureResets = 0

    # -- the control-frame queue while the peer is not reading ------------------

    def controlWritten(self, n: int) -> bool:
        """Count bytes written while paused; False once over the cap."""
        self.controlBytesWhilePaused += n
        if self.controlBytesWhilePaused > self.peakControlBytesWhilePaused:
            self.peakControlBytesWhilePaused = self.controlBytesWhilePaused
        return self.controlBytesWhilePaused <= self.settings.maxControlBytesWhilePaused

    def resumed(self) -> None:
        self.controlBytesWhilePaused = 0

    # -- per request -------------------------------------------------------------

    def tooManyHeaderFields(self, headers) -> bool:
        regular = 0
        for name, _ in headers:
            if not name.startswith(b":"):
                regular += 1
        return regular > self.settings.maxHeaderFields

    def prematureReset(self, now: float) -> bool:
        """Count one premature reset; True once more than ``maxPrematureResets`` fell
        within the last ``prematureResetWindow`` seconds."""
        self.prematureResets += 1
        resets = self._resets
        resets.append(now)
        horizon = now - self.settings.prematureResetWindow
        while resets[0] <= horizon:
            resets.popleft()
        return len(resets) > self.settings.maxPrematureResets

    def isPremature(self, stream: H2TunnelStream, now: float, code: int | None = None) -> bool:
        """Reset before its ``200``, or within ``prematureResetLifetime`` of opening.
        Not RST_STREAM(NO_ERROR) after the peer's END_STREAM on an answered
        stream: that is a graceful end (RFC 9113 §8.1; hbone's own client closes
        a tunnel that way), and it cannot come before the response, where the
        work (the dial) is."""
        if not stream.responseReceived:
            return True
        if code == ErrorCodes.NO_ERROR and stream.remoteEnded:
            return False
        return now - stream.openedAt < self.settings.prematureResetLifetime

    # -- frame headers -------------------------------------------------------------

    def scan(self, data: bytes, now: float) -> LimitExceeded | None:
        """Account for the frame headers in ``data`` (the next bytes from the peer)."""
        if self.off:
            return None
        n = len(data)
        pos = self._skip
        if self._preface:
            k = min(n, len(self._preface))
            if data[:k] != self._preface[:k]:
                self.off = True  # not HTTP/2: h2 sends GOAWAY(PROTOCOL_ERROR)
                return None
            self._preface = self._preface[k:]
            pos = k
        if self._padPending is not None and n:
            # the pad-length byte of a PADDED DATA frame whose header ended the last read
            length, flags = self._padPending
            self._padPending = None
            verdict = self._dataFrame(length - 1 - data[0], flags)
            if verdict is not None:
                return LimitExceeded(0, *verdict)
        if pos >= n:
            self._skip = pos - n
            return None
        if self._partial:
            need = 9 - len(self._partial)
            head = self._partial + data[:need]
            if len(head) < 9:
                self._partial = head
                self._skip = 0
                return None
            self._partial = b""
            hi, lo, ftype, flags, sid = _FRAME_HEADER.unpack(head)
            length = (hi << 16) | lo
            verdict = self._frame(length, ftype, flags, sid & 0x7FFFFFFF, data[need] if need < n else -1, now)
            if verdict is not None:
                return LimitExceeded(0, *verdict)
            pos = need + length
        unpack = _FRAME_HEADER.unpack_from
        maxFrameSize = self.settings.maxFrameSize
        while pos + 9 <= n:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            length = (hi << 16) | lo
            if ftype == _DATA and 0 < length <= maxFrameSize and not flags & _PADDED and not self._inBlock:
                self.emptyData = 0  # the bulk path: a DATA frame with data
                pos += 9 + length
                continue
            payload = pos + 9
            verdict = self._frame(length, ftype, flags, sid & 0x7FFFFFFF, data[payload] if payload < n else -1, now)
            if verdict is not None:
                return LimitExceeded(pos, *verdict)
            pos = payload + length
        if pos < n:
            self._partial = data[pos:]
            self._skip = 0
        else:
            self._skip = pos - n
        return None

    def _frame(self, length: int, ftype: int, flags: int, sid: int, firstByte: int, now: float):
        """One frame header; ``firstByte`` is the payload's first byte, or -1 when it
        is not in this read. Returns ``(code, key, reason)`` for a violation."""
        s = self.settings
        if length > s.maxFrameSize:
            return (ErrorCodes.FRAME_SIZE_ERROR, "frame_size",
                    f"a {length}-byte frame (type {ftype}) exceeds MAX_FRAME_SIZE {s.maxFrameSize}")
        if self._inBlock:
            if ftype != _CONTINUATION:
                self._inBlock = False  # h2 refuses it (PROTOCOL_ERROR)
                return None
            self._continuations += 1
            self._blockBytes += length
            if self._continuations > s.maxContinuationFrames:
                return (ErrorCodes.ENHANCE_YOUR_CALM, "continuation_flood",
                        f"more than {s.maxContinuationFrames} CONTINUATION frames in one header block")
            if self._blockBytes > s.maxHeaderBlockBytes:
                return (ErrorCodes.ENHANCE_YOUR_CALM, "header_block_size",
                        f"a header block of more than {s.maxHeaderBlockBytes} bytes")
            if flags & _END_HEADERS:
                self._inBlock = False
            if length:
                self.emptyData = 0
            return None
        if ftype == _DATA:
            if flags & _PADDED and length:
                if firstByte < 0:
                    self._padPending = (length, flags)
                    return None
                return self._dataFrame(length - 1 - firstByte, flags)
            return self._dataFrame(length, flags)
        if length:
            self.emptyData = 0
        if ftype == _HEADERS or ftype == _PUSH_PROMISE:
            if length > s.maxHeaderBlockBytes:
                return (ErrorCodes.ENHANCE_YOUR_CALM, "header_block_size",
                        f"a header block of more than {s.maxHeaderBlockBytes} bytes")
            if not flags & _END_HEADERS:
                self._inBlock = True
                self._blockBytes = length
                self._continuations = 0
            if ftype == _HEADERS and sid > self._highestStream and sid & 1 == self._peerParity:
                self._highestStream = sid
                self.streamsOpened += 1
        elif ftype == _WINDOW_UPDATE:
            self.windowUpdates += 1
            if self.windowUpdates > s.windowUpdateAllowance + s.windowUpdatesPerDataFrame * self.dataFramesSent:
                return (ErrorCodes.ENHANCE_YOUR_CALM, "window_update_flood",
                        f"{self.windowUpdates} WINDOW_UPDATE frames against {self.dataFramesSent} DATA frames sent")
        elif ftype == _PING:
            self.pingFrames += 1
            tokens = self._pingTokens + (now - self._pingAt) * s.pingRate
            self._pingAt = now
            if tokens > s.pingBurst:
                tokens = s.pingBurst
            if tokens < 1:
                return (ErrorCodes.ENHANCE_YOUR_CALM, "ping_flood",
                        f"PING frames faster than {s.pingRate:g}/s (burst {s.pingBurst})")
            self._pingTokens = tokens - 1
        elif ftype == _SETTINGS:
            self.settingsFrames += 1
            if length // 6 > s.maxSettingsEntries:
                return (ErrorCodes.ENHANCE_YOUR_CALM, "settings_entries",
                        f"a SETTINGS frame of {length // 6} entries (at most {s.maxSettingsEntries})")
            tokens = self._settingsTokens + (now - self._settingsAt) * s.settingsRate
            self._settingsAt = now
            if tokens > s.settingsBurst:
                tokens = s.settingsBurst
            if tokens < 1:
                return (ErrorCodes.ENHANCE_YOUR_CALM, "settings_flood",
                        f"SETTINGS frames faster than {s.settingsRate:g}/s (burst {s.settingsBurst})")
            self._settingsTokens = tokens - 1
        elif ftype == _PRIORITY:
            self.priorityFrames += 1
            if self.priorityFrames > s.maxPriorityPerStream * (self.streamsOpened + 1):
                return (ErrorCodes.ENHANCE_YOUR_CALM, "priority_flood",
                        f"{self.priorityFrames} PRIORITY frames for {self.streamsOpened} streams")
        return None

    def _dataFrame(self, dataLength: int, flags: int):
        if dataLength == 0 and not flags & _END_STREAM:
            self.emptyData += 1
            if self.emptyData > self.settings.maxConsecutiveEmptyData:
                return (ErrorCodes.ENHANCE_YOUR_CALM, "empty_data",
                        f"{self.emptyData} empty DATA frames without END_STREAM in a row")
        else:
            self.emptyData = 0
        return None

    def dataSent(self, n: int) -> None:
        """One DATA frame of ``n`` bytes sent (it earns WINDOW_UPDATE budget)."""
        self.dataFramesSent += 1 + (n - 1) // DATA_FRAME_UNIT if n > 0 else 1

    def localStreamOpened(self) -> None:
        self.streamsOpened += 1


@implementer(IHandshakeListener, IPushProducer)
class HBoneH2Protocol(Protocol):
    """One HBONE HTTP/2 connection, client or server role.

    :param role: ``"client"`` (opens streams) or ``"server"`` (accepts them).
    :param streamHandler: server role: called as ``streamHandler(stream, headers)``
        for each request; it must answer with ``stream``'s connection's
        :meth:`respond` and attach a protocol, or reject.
    :param expectALPN: the ALPN token the TLS layer must have negotiated, or None
        on a plain transport.
    :param gate: server role: the listener's :class:`hbone.limits.ListenerGate`,
        told when this connection opens, finishes its handshake and closes.
    :param processLimits: server role: the process's
        :class:`hbone.limits.ProcessLimits`; a stream over its tunnel cap gets
        RST_STREAM(REFUSED_STREAM).
    :param rejections: the listener's :class:`hbone.logs.RejectionLog` (one per
        connection if None): every refusal is logged through it, rate-limited.
    """

    log = Logger()
    #: The DATA fast path (:meth:`_split`, :meth:`_sendData`); False sends every
    #: frame through h2 (for comparison in tests and measurements).
    fastPath = True

    def __init__(
        self,
        role: str,
        clock,
        settings: ConnectionSettings = ConnectionSettings(),
        streamHandler: Callable | None = None,
        expectALPN: bytes | None = b"h2",
        localIdentity=None,
        name: str = "hbone",
        gate=None,
        processLimits=None,
        rejections: RejectionLog | None = None,
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
        self.gate = gate
        self._gated = False  # counted by the gate: opened, not yet closed
        self._handshaking = False  # counted by the gate as a handshake in progress
        self.processLimits = processLimits
        self.rejections = rejections if rejections is not None else RejectionLog(clock)
        self.accounting = FrameAccounting(self.settings, role == "server", clock.seconds())
        self._lastProcessed = 0  # the highest stream id handed to the stream handler
        self._conn = HBoneH2Connection(
            H2Configuration(client_side=(role == "client"), header_encoding=None),
            self.settings,
        )
        self.streams: dict[int, H2TunnelStream] = {}
        self._responses: dict[int, defer.Deferred] = {}
        self._blocked: OrderedDict[int, H2TunnelStream] = OrderedDict()
        # the DATA fast path (see _receive and _sendData)
        self._openState = ConnectionState.CLIENT_OPEN if role == "client" else ConnectionState.SERVER_OPEN
        self._rxPreface = len(_PREFACE) if role == "server" else 0  # preface bytes h2 still checks
        self._rxHead = b""  # a frame header split across reads
        self._rxRemain = 0  # bytes of the current frame still to come
        self._rxFast = 0  # the stream whose DATA frame is being delivered directly (0: h2 has it)
        self._out: list[bytes] = []  # output in order: h2's, and DATA frames framed here
        self._outControl = 0  # bytes of h2's output in _out (the control-queue cap counts them)
        self._paused = False
        self._inReceive = False
        self.h2Started = False
        self.ready = False
        self._readyWaiters: list[defer.Deferred] = []
        self.goingAway = False  # no new streams on this connection
        self.sentGoAway = False
        self.goAwayLastStreamID = MAX_STREAM_ID  # the lowest last_stream_id we sent
        self._registered = False  # as our transport's producer
        self._h2Closed = False  # an error GOAWAY is out: nothing more is parsed
        self._discarded = 0  # bytes dropped since
        self._readingStopped = False
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
        self.events = None  # hbone.events.Events: connection opened/closed, handshake failed
        self._closeWhy: str | None = None  # a CONNECTION_CLOSE_REASONS value, when hbone chose it
        self._readyAt = 0.0
        self.draining = False  # drain() began: the first GOAWAY (2^31-1) is out
        self._drainTimer = None
        # pool hooks
        self.onCapacity: Callable[["HBoneH2Protocol"], None] | None = None
        self.onGoingAway: Callable[["HBoneH2Protocol"], None] | None = None
        self.onClosed: Callable[["HBoneH2Protocol", Failure], None] | None = None

    # -- setup -------------------------------------------------------------------

    def connectionMade(self) -> None:
        tuneTCP(self.transport)  # TCP_NODELAY and read size on the socket under TLS
        self.transport.registerProducer(self, True)
        self._registered = True
        now = self.clock.seconds()
        self._lastReceived = now
        if self.gate is not None:
            self._gated = self._handshaking = True
            self.gate.opened()
        if self.expectALPN is None:
            self._handshakeDone()
            self._startH2()
        else:
            self._setDeadline(self.settings.handshakeTimeout, "TLS handshake")
        self._schedule()

    def _handshakeDone(self) -> None:
        if self._handshaking:
            self._handshaking = False
            self.gate.handshakeDone()

    def handshakeCompleted(self) -> None:
        self._handshakeDone()
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
            self._closeWhy = "alpn"
            self.rejections.log(
                "alpn",
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
            self.rejections.log(
                f"deadline:{what}",
                "closing connection with {peer}: no {what} within the deadline",
                peer=_fmtPeer(self.transport),
                what=what,
            )
            self._closeWhy = "timeout"
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
                    self._closeWhy = "keepalive_timeout"
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
                self._closeWhy = "idle"
                self.goAway(ErrorCodes.NO_ERROR)
                self._setGoingAway()
                self.loseConnection()
                return
        self._schedule()

    # -- receiving -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        if self._h2Closed:
            # after our error GOAWAY: dropped. A peer that closes gets a clean
            # close; one that keeps sending is no longer read at all.
            self._discarded += len(data)
            if self._discarded > DISCARD_AFTER_GOAWAY and not self._readingStopped:
                self._readingStopped = True
                self.transport.pauseProducing()
            return
        now = self._lastReceived = self.clock.seconds()
        verdict = self.accounting.scan(data, now)
        if verdict is not None:
            # what came before the offending frame is served; it and the rest are not
            if verdict.offset:
                self._receive(data[: verdict.offset])
            if not (self.closed or self._h2Closed):
                self._limitExceeded(verdict.code, verdict.key, verdict.reason)
            return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        self._inReceive = True
        try:
            if not self._split(data):
                return
        finally:
            self._inReceive = False
        self._flush()
        if self._pingSentAt is None and self._timer is None:
            self._schedule()

    def _split(self, data: bytes) -> bool:
        """Hand ``data`` to h2, except the payload of DATA frames on open streams,
        which goes straight to the stream (the DATA fast path).

        h2 parses a frame by copying it three times (into its buffer, out as a
        slice, into ``bytes``) and builds objects per frame; the payload of a plain
        DATA frame needs none of that. A frame takes the fast path when its header
        says DATA, not PADDED, not END_STREAM, not empty, on a stream open both
        here and in h2, within both receive windows (h2's window managers are
        charged as h2 would charge them); its payload is then delivered as it
        arrives, without waiting for the rest of the frame. Every other frame,
        and any frame h2 must refuse, goes to h2 whole and in order, so h2 only
        ever sees complete frames between fast ones. Limits were checked on the
        frame headers already (:meth:`FrameAccounting.scan`). False once the
        connection closed or stopped parsing."""
        n = len(data)
        pos = start = 0  # data[start:pos] is queued for h2
        if self._rxPreface:  # server: the client preface is h2's to check
            pos = min(self._rxPreface, n)
            self._rxPreface -= pos
        if self.accounting.off or not self.fastPath:
            return self._toH2(data)
        streams = self.streams
        while pos < n:
            remain = self._rxRemain
            if remain:
                take = n - pos if remain > n - pos else remain
                self._rxRemain = remain - take
                sid = self._rxFast
                pos += take
                if sid:
                    if not self._fastData(sid, data if take == n else data[pos - take:pos]):
                        return False
                    start = pos
                continue
            hdrStart = pos
            if hdrStart - start >= H2_SEGMENT:
                # h2 answers what it parses (PING ACKs, RST_STREAMs...) into its
                # queue; feed it a piece at a time so a peer that is not reading
                # is caught within a piece, not a whole read (SECURITY §4.4)
                if not self._toH2(data[start:hdrStart]) or not self._controlQueueOK():
                    return False
                start = hdrStart
            head = self._rxHead
            if head:
                need = 9 - len(head)
                if n - pos < need:
                    self._rxHead = head + data[pos:]
                    return True
                head += data[pos:pos + need]
                self._rxHead = b""
                pos += need
                hi, lo, ftype, flags, sid = _FRAME_HEADER.unpack(head)
            else:
                if n - pos < 9:
                    self._rxHead = data[pos:]  # held back until the header is whole
                    return self._toH2(data[start:pos]) if pos > start else True
                hi, lo, ftype, flags, sid = _FRAME_HEADER.unpack_from(data, pos)
                pos += 9
            length = (hi << 16) | lo
            self._rxRemain = length
            self._rxFast = 0
            sid &= 0x7FFFFFFF
            if ftype == _DATA and length and not flags & _NOT_FAST and sid in streams:
                if hdrStart > start:  # what precedes may change this stream
                    if not self._toH2(data[start:hdrStart]):
                        return False
                    start = hdrStart
                if self._fastAccept(sid, length):
                    self._rxFast = sid
                    start = pos
                    continue
            if head:  # the header's first bytes came with the last read
                if not self._toH2(data[start:hdrStart] + head if hdrStart > start else head):
                    return False
                start = pos
        return self._toH2(data[start:pos]) if pos > start else True

    def _controlQueueOK(self) -> bool:
        """While our transport is paused: is what h2 queued within
        ``maxControlBytesWhilePaused``? If not, the connection is aborted."""
        if not self._paused:
            return True
        queued = self._conn.data_to_send()
        if queued:
            self._out.append(queued)
            self._outControl += len(queued)
        if self.accounting.controlBytesWhilePaused + self._outControl <= self.settings.maxControlBytesWhilePaused:
            return True
        self.accounting.controlWritten(self._outControl)  # the peak, for the record
        self._controlQueueExceeded()
        return False

    def _controlQueueExceeded(self) -> None:
        self.rejections.log(
            "h2:control_queue",
            "{peer} ({identity}) is not reading: over {cap} bytes of control frames queued; aborting",
            peer=_fmtPeer(self.transport),
            identity=str(self.peerIdentity),
            cap=self.settings.maxControlBytesWhilePaused,
        )
        self._abort(ConnectionLost("peer stopped reading"))

    def _toH2(self, data: bytes) -> bool:
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as e:
            self._protocolError(e)
            return False
        handlers = self._handlers
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None:
                handler(self, event)
            if self.closed or self._h2Closed:
                return False
        return True

    def _fastAccept(self, sid: int, length: int) -> bool:
        """May this DATA frame bypass h2? If so, charge h2's receive windows as its
        ``_receive_data_frame`` would (a frame over a window goes to h2, which
        answers FLOW_CONTROL_ERROR)."""
        conn = self._conn
        if conn.state_machine.state is not self._openState:
            return False
        h2stream = conn.streams.get(sid)
        if h2stream is None or h2stream.state_machine.state not in _RECEIVING:
            return False
        connWindow = conn._inbound_flow_control_window_manager
        streamWindow = h2stream._inbound_window_manager
        if length > connWindow.current_window_size or length > streamWindow.current_window_size:
            return False
        connWindow.current_window_size -= length
        streamWindow.current_window_size -= length
        return True

    def _fastData(self, sid: int, payload: bytes) -> bool:
        """Part of a fast-path DATA frame's payload, as :meth:`_onData` would take it."""
        stream = self.streams.get(sid)
        if stream is None or (self.role == "client" and not stream.responseReceived):
            self._conn.acknowledge_received_data(len(payload), sid)  # credit the connection
        else:
            stream._dataReceived(payload, len(payload))
        return not (self.closed or self._h2Closed)

    def _limitExceeded(self, code: int, key: str, reason: str) -> None:
        """A SECURITY §4.4 limit tripped: GOAWAY(``code``) naming the last stream
        processed, parse nothing more, close (at the latest after the linger)."""
        try:
            name = ErrorCodes(code).name
        except ValueError:
            name = str(code)
        self.rejections.log(
            f"h2:{key}",
            "{peer} ({identity}): {reason}; sending GOAWAY({code})",
            peer=_fmtPeer(self.transport),
            identity=str(self.peerIdentity),
            reason=reason,
            code=name,
        )
        self._inReceive = False
        # Nothing more is parsed: dataReceived drops every later byte, and stops
        # reading after DISCARD_AFTER_GOAWAY of them. Reading goes on until then so
        # that TLS sees the close_notify of a peer that closes at once.
        self._h2Closed = True
        self._failure = Failure(ConnectionLost(f"HTTP/2 limit exceeded: {reason}"))
        # h2 has answered the whole read at once (its RST_STREAMs for a MadeYouReset
        # burst, PING ACKs...); none of that goes out, only the GOAWAY
        self._conn.clear_outbound_data_buffer()
        self._out = []
        self._outControl = 0
        self.goAway(code, self._lastProcessed)
        self._closeWhy = self._closeWhy or "limit"
        self._closeAfterGoAway()

    def _protocolError(self, error: ProtocolError) -> None:
        code = getattr(error, "error_code", ErrorCodes.PROTOCOL_ERROR)
        name = ErrorCodes(code).name if isinstance(code, int) else str(code)
        self.rejections.log(
            f"h2:protocol_error:{name}",
            "HTTP/2 protocol error from {peer} ({identity}): {error}; sending GOAWAY({code})",
            peer=_fmtPeer(self.transport),
            identity=str(self.peerIdentity),
            error=str(error),
            code=name,
        )
        # h2 has already queued its GOAWAY
        self._inReceive = False
        self._flush()
        self._h2Closed = True
        self.sentGoAway = True
        self._failure = Failure(ConnectionLost(f"HTTP/2 protocol error: {error}"))
        self._closeWhy = self._closeWhy or "protocol_error"
        self._closeAfterGoAway()

    def _onRemoteSettings(self, event: RemoteSettingsChanged) -> None:
        if not self.ready:
            self.ready = True
            self._deadline = None
            self._readyAt = self.clock.seconds()
            if self.events is not None:
                from hbone.events import ConnectionOpened

                self.events.emit(ConnectionOpened(self.role, _idText(self.peerIdentity)))
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
        if self._conn._stream_is_closed_by_reset(sid):
            # Reset (by the peer, or by h2 for the peer's misbehaviour) in the same
            # read, before hbone even saw the request: nothing is served, and it is
            # a premature reset (Rapid Reset with requests that would be refused
            # at once must count too).
            self._lastProcessed = sid
            if self.accounting.prematureReset(self.clock.seconds()):
                self._prematureResetLimit()
            return
        limits = self.processLimits
        if limits is not None and not limits.tunnelOpened():
            self.rejections.log(
                "process_tunnels",
                "stream {sid} from {peer} ({identity}) refused: {n} tunnels open in this process "
                "(the limit); RST_STREAM(REFUSED_STREAM)",
                sid=sid,
                peer=_fmtPeer(self.transport),
                identity=str(self.peerIdentity),
                n=limits.openTunnels,
            )
            self._conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        headers = event.headers
        stream = H2TunnelStream(self, sid, None, headers)
        stream.openedAt = self.clock.seconds()
        stream._processCounted = limits is not None
        self.streams[sid] = stream
        self._lastProcessed = sid
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
        # The peer reset it (Rapid Reset), or made h2 reset it (MadeYouReset)
        if sid & 1 == self.accounting._peerParity and self._countReset(stream, event.error_code):
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
        if event.ping_data == _DRAIN_PING:
            self._drainFinalGoAway()
            return
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
            self._closeWhy = "goaway_error"
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
        stream.openedAt = self.clock.seconds()
        self.accounting.localStreamOpened()
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
        accounting = self.accounting
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
                    if end:
                        conn.send_data(sid, chunk, end_stream=True)
                    else:
                        self._sendData(sid, chunk)
                    accounting.dataSent(len(chunk))
                    ended = ended or end
                else:
                    self._sendData(sid, chunk[:n])
                    accounting.dataSent(n)
                    buf[0] = chunk[n:]
                    stream._outbytes -= n
            # an empty END_STREAM DATA is flow-controlled too: not while the peer's
            # SETTINGS has made the window negative (RFC 9113 §6.9.2)
            if not buf and stream._endPending and not ended and conn.local_flow_control_window(sid) >= 0:
                conn.end_stream(sid)
                accounting.dataSent(0)
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

    def _sendData(self, sid: int, chunk: bytes) -> None:
        """One DATA frame without END_STREAM, within the windows and the peer's
        frame size (the caller checked): framed here, h2's windows charged as its
        ``send_data`` would, queued after whatever h2 has queued. h2 would build a
        frame object and copy the payload twice; here it is a 9-byte header.
        Anything unusual (a stream h2 no longer sends on) goes through h2."""
        conn = self._conn
        h2stream = conn.streams.get(sid)
        if (
            h2stream is None
            or not self.fastPath
            or conn.state_machine.state is not self._openState
            or h2stream.state_machine.state not in _SENDING
        ):
            conn.send_data(sid, chunk)
            return
        size = len(chunk)
        conn.outbound_flow_control_window -= size
        h2stream.outbound_flow_control_window -= size
        out = self._out
        queued = conn.data_to_send()
        if queued:
            out.append(queued)
            self._outControl += len(queued)
        out.append(_FRAME_HEADER.pack(size >> 16, size & 0xFFFF, _DATA, 0, sid))
        out.append(chunk)

    def _takeOutput(self) -> tuple[list[bytes], int]:
        """Everything queued to send, in order (a list, for ``writeSequence``: a
        DATA payload is not copied here), and how much of it is h2's own
        (control frames and h2-framed DATA)."""
        data = self._conn.data_to_send()
        out = self._out
        if not out:
            return ([data] if data else []), len(data)
        control = self._outControl + len(data)
        if data:
            out.append(data)
        self._out = []
        self._outControl = 0
        return out, control

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
        if (
            code == ErrorCodes.PROTOCOL_ERROR  # the peer broke the stream's rules (MadeYouReset)
            and stream.streamID & 1 == self.accounting._peerParity
            and not self._h2Closed
            and self._countReset(stream)
        ):
            return
        if not self._inReceive:
            self._flush()

    def _countReset(self, stream: H2TunnelStream, code: int | None = None) -> bool:
        """Count a premature reset of a peer-opened stream; True if that tripped
        the limit (and the connection is going away)."""
        now = self.clock.seconds()
        if not self.accounting.isPremature(stream, now, code):
            return False
        if not self.accounting.prematureReset(now):
            return False
        self._prematureResetLimit()
        return True

    def _prematureResetLimit(self) -> None:
        s = self.settings
        self._limitExceeded(
            ErrorCodes.ENHANCE_YOUR_CALM,
            "premature_resets",
            f"premature resets: more than {s.maxPrematureResets} streams reset before their response "
            f"or within {s.prematureResetLifetime:g}s of opening in {s.prematureResetWindow:g}s",
        )

    def _streamClosed(self, stream: H2TunnelStream) -> None:
        if stream._processCounted:
            stream._processCounted = False
            self.processLimits.tunnelClosed()
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
        data, control = self._takeOutput()
        if not data:
            return
        if self._paused and not self.accounting.controlWritten(control):
            self._controlQueueExceeded()
            return
        if len(data) == 1:
            self.transport.write(data[0])
        else:
            self.transport.writeSequence(data)

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

    def drain(self) -> None:
        """Server role: close gracefully (PROTOCOL §3 "GOAWAY and drain").

        GOAWAY(NO_ERROR, 2^31-1) at once, so the peer stops opening streams here;
        then, after a PING round trip (or ``drainGoAwayDelay``, whichever comes
        first), GOAWAY(NO_ERROR, the last stream processed): streams opened after
        that get RST_STREAM(REFUSED_STREAM), the rest run to completion, and the
        connection closes once the last one ends. The deadline for that is the
        caller's (:meth:`hbone.service.Node.drain`)."""
        if self.closed or self.draining or self.transport is None:
            return
        self.draining = True
        self._closeWhy = "drain"
        self.goAway(ErrorCodes.NO_ERROR, MAX_STREAM_ID)
        if self.ready and not self._h2Closed:
            self._conn.ping(_DRAIN_PING)
            self._flush()
        self._drainTimer = self.clock.callLater(self.settings.drainGoAwayDelay, self._drainFinalGoAway)

    def _drainFinalGoAway(self) -> None:
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.cancel()
        self._drainTimer = None
        if self.closed or not self.draining or self.goingAway:
            return
        self.goAway(ErrorCodes.NO_ERROR, self._lastProcessed)
        self._setGoingAway()
        if not self.streams:
            self.loseConnection()

    def cancelStreams(self) -> None:
        """RST_STREAM(CANCEL) every stream still open, then close (the end of a drain)."""
        for stream in list(self.streams.values()):
            if not stream.closed:
                stream._reset(ErrorCodes.CANCEL)
        self._setGoingAway()
        self.loseConnection()
        if self._closeTimer is None and not self.closed:
            self._closeTimer = self.clock.callLater(self.settings.goAwayLinger, self._forceClose)

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
        if not self._h2Closed:
            pending, _ = self._takeOutput()  # e.g. the END_STREAM that ended the last stream
            if pending:
                self.transport.writeSequence(pending)
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

    def _emitClosed(self, failure: Failure) -> None:
        events = self.events
        if events is None:
            return
        from hbone.events import ConnectionClosed, HandshakeFailed

        if self.ready:
            why = self._closeWhy or ("closed" if failure.check(ConnectionDone) else "lost")
            events.emit(ConnectionClosed(self.role, _idText(self.peerIdentity), why,
                                         self.clock.seconds() - self._readyAt))
            return
        if self.role != "server" or self.expectALPN is None:
            return  # a client's failed dial is the dialer's error, reported with the tunnel
        from hbone.tls import verifyStateOf

        state = None
        try:
            state = verifyStateOf(self.transport.getHandle())
        except Exception:
            pass
        message = failure.getErrorMessage()
        if self._closeWhy == "alpn" or state is not None and state.reason and "ALPN" in state.reason:
            why, detail = "alpn", (state.reason if state is not None and state.reason else message)
        elif state is not None and state.reason:
            why, detail = "certificate", state.reason
        elif "certificate" in message:  # e.g. OpenSSL's "peer did not return a certificate"
            why, detail = "certificate", message
        elif self._closeWhy == "timeout":
            why, detail = "timeout", f"no {self._deadlineWhat} within the deadline"
        elif self.h2Started:
            why, detail = "no_settings", message
        else:
            why, detail = "tls", message
        events.emit(HandshakeFailed(_fmtPeer(self.transport), why, detail))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.closed:
            return
        self.closed = True
        self.goingAway = True
        if self._gated:
            self._gated = False
            handshaking, self._handshaking = self._handshaking, False
            self.gate.closed(handshaking)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self._closeTimer = None
        if self._drainTimer is not None and self._drainTimer.active():
            self._drainTimer.cancel()
        self._drainTimer = None
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.connections.discard(self)
        failure = self._failure or reason
        self._emitClosed(failure)
        if not self.ready:
            rf = self._readyFailure(failure)
            if self.role == "server" and self.expectALPN is not None and not self.h2Started:
                # a handshake flood must not flood the log: once per 10 s per kind
                # (the key is a fixed word: the message holds what the peer sent)
                refused = " refused: " in rf.getErrorMessage()
                self.rejections.log("tls:refused" if refused else "tls:failed", "{msg}", msg=rf.getErrorMessage())
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


def _idText(identity) -> str | None:
    return str(identity) if identity is not None else None


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
    """Builds :class:`HBoneH2Protocol` for one role (wrapped in TLS by the caller).

    A server-role factory is one listener: its protocols share one
    :class:`~hbone.logs.RejectionLog` (rejections are rate-limited per listener,
    SECURITY §4.7), and ``gate`` and ``processLimits`` when given (see
    :class:`HBoneH2Protocol`)."""

    noisy = False

    def __init__(self, role: str, clock, settings: ConnectionSettings = ConnectionSettings(),
                 streamHandler=None, expectALPN: bytes | None = b"h2", localIdentity=None,
                 name: str = "hbone", gate=None, processLimits=None, events=None) -> None:
        self.events = events
        self.role = role
        self.clock = clock
        self.settings = settings
        self.streamHandler = streamHandler
        self.expectALPN = expectALPN
        self.localIdentity = localIdentity
        self.name = name
        self.gate = gate
        self.processLimits = processLimits
        self.rejections = RejectionLog(clock)
        self.connections: weakref.WeakSet[HBoneH2Protocol] = weakref.WeakSet()  # live ones (drain)

    def drain(self) -> None:
        """Drain every live connection of this factory (see :meth:`HBoneH2Protocol.drain`)."""
        for conn in list(self.connections):
            conn.drain()

    protocol = None  # a subclass of HBoneH2Protocol; None: HBoneH2Protocol itself

    def buildProtocol(self, addr):
        p = (self.protocol or HBoneH2Protocol)(
            self.role,
            self.clock,
            self.settings,
            self.streamHandler,
            self.expectALPN,
            self.localIdentity,
            self.name,
            gate=self.gate,
            processLimits=self.processLimits,
            rejections=self.rejections,
        )
        p.factory = self
        p.events = self.events
        self.connections.add(p)
        return p
