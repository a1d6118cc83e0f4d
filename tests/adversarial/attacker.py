"""A raw-frame HTTP/2 attacker over a real TLS socket (SECURITY §5, "Raw-frame
attackers are built from hyperframe and hpack over a TLS socket").

:class:`Attacker` is blocking, synchronous code (Python's :mod:`ssl`), meant to
run in a thread (``deferToThread``) while the hbone server under test runs in the
reactor thread. It writes whatever frames it is told to, legal or not, with its
own HPACK encoder, and reads back and parses every frame the server sends (with
its own HPACK decoder, so response headers can be asserted).

Every wait is bounded by ``timeout`` (a safety net: a test that reaches it fails
with a message, it never asserts on a duration).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import tempfile
import threading
from dataclasses import dataclass, field

from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from hbone.ca import certificatePEM, privateKeyPEM

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_files: dict[int, tuple[str, str, str]] = {}
_filesLock = threading.Lock()


def svidFiles(identity) -> tuple[str, str, str]:
    """PEM files (chain, key, CA bundle) of a :class:`hbone.tls.Identity`, written
    once per process into a private temporary directory."""
    with _filesLock:
        found = _files.get(id(identity))
        if found is not None:
            return found
        d = tempfile.mkdtemp(prefix="hbone-attacker-")
        chain, key, ca = (os.path.join(d, n) for n in ("chain.pem", "key.pem", "ca.pem"))
        with open(chain, "wb") as f:
            f.write(certificatePEM(*identity.chain))
        fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(privateKeyPEM(identity._key))
        with open(ca, "wb") as f:
            f.write(certificatePEM(*[c for certs in identity.trustBundles.values() for c in certs]))
        _files[id(identity)] = (chain, key, ca)
        return chain, key, ca


def rawFrame(ftype: int, flags: int, sid: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """Any frame, even one hyperframe refuses to build (a wrong length, an unknown
    type, stream 0 where it is not allowed). ``length`` overrides the header's."""
    n = len(payload) if length is None else length
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def settingsFrame(entries: dict[int, int] | None = None, ack: bool = False) -> bytes:
    f = SettingsFrame(0, settings=entries or {})
    if ack:
        f.flags.add("ACK")
    return f.serialize()


def dataFrame(sid: int, data: bytes = b"", end: bool = False, padding: int | None = None) -> bytes:
    f = DataFrame(sid, data=data)
    if end:
        f.flags.add("END_STREAM")
    if padding is not None:
        f.flags.add("PADDED")
        f.pad_length = padding
    return f.serialize()


def rstFrame(sid: int, code: int = 8) -> bytes:
    return RstStreamFrame(sid, error_code=code).serialize()


def windowUpdateFrame(sid: int, increment: int) -> bytes:
    if increment < 1 or increment > 2**31 - 1:  # hyperframe refuses these
        return rawFrame(0x8, 0, sid, struct.pack(">L", increment & 0xFFFFFFFF))
    return WindowUpdateFrame(sid, window_increment=increment).serialize()


def pingFrame(data: bytes = b"\0" * 8, ack: bool = False) -> bytes:
    f = PingFrame(0, opaque_data=data)
    if ack:
        f.flags.add("ACK")
    return f.serialize()


def priorityFrame(sid: int, dependsOn: int = 0, weight: int = 15) -> bytes:
    return rawFrame(0x2, 0, sid, struct.pack(">LB", dependsOn, weight))


def connectHeaders(authority: str, *extra) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"CONNECT"), (b":authority", authority.encode())] + list(extra)


def postHeaders(path: str, authority: str = "lb.example", *extra) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
    ] + list(extra)


@dataclass
class Response:
    """What one stream got back."""

    headers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int | None:
        for block in self.headers:
            for name, value in block:
                if name == b":status":
                    return int(value)
        return None

    def header(self, name: bytes) -> bytes | None:
        for block in self.headers:
            for n, v in block:
                if n == name:
                    return v
        return None


class Attacker:
    """One TLS connection to a server under test, driven frame by frame."""

    def __init__(self, port: int, identity=None, host: str = "127.0.0.1", alpn=("h2",),
                 tlsVersions=(ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
                 rcvbuf: int | None = None, timeout: float = 15.0, autoAck: bool = True) -> None:
        self.port = port
        self.host = host
        self.identity = identity
        self.alpn = alpn
        self.tlsVersions = tlsVersions
        self.rcvbuf = rcvbuf
        self.timeout = timeout
        self.autoAck = autoAck  # answer SETTINGS with an ACK and PING with a PING ACK
        self.sock: ssl.SSLSocket | None = None
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.decoder.max_header_list_size = 1 << 20
        self.frames: list[Frame] = []
        self.streams: dict[int, Response] = {}
        self.closed: str | None = None  # "eof" or "reset" once the server closed
        self.sendError: OSError | None = None
        self.bytesSent = 0
        self._buffer = bytearray()
        self._block: list = []  # a HEADERS + CONTINUATION block being received
        # send windows granted by the server (RFC 9113 §6.9)
        self._connWindow = 65535
        self._initialWindow = 65535
        self._streamWindows: dict[int, int] = {}

    # -- connecting ---------------------------------------------------------------

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version, ctx.maximum_version = self.tlsVersions
        if self.alpn:
            ctx.set_alpn_protocols(list(self.alpn))
        if self.identity is not None:
            chain, key, _ = svidFiles(self.identity)
            ctx.load_cert_chain(chain, key)
        return ctx

    def connect(self) -> "Attacker":
        """TCP connect and the TLS handshake (raises :class:`ssl.SSLError` on an alert)."""
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        raw.settimeout(self.timeout)
        try:
            raw.connect((self.host, self.port))
            self.sock = self.context().wrap_socket(raw, server_hostname=None)
        except BaseException:
            raw.close()
            raise
        return self

    @property
    def negotiated(self) -> str | None:
        return self.sock.selected_alpn_protocol() if self.sock else None

    def preface(self, settings: dict[int, int] | None = None, window: int = 2**30) -> "Attacker":
        """The client preface and SETTINGS. Receive windows are opened wide
        (``window`` for the connection and, unless ``settings`` names
        INITIAL_WINDOW_SIZE, for every stream): the attacker never acknowledges
        DATA, and echoes must not stall."""
        entries = {0x4: min(window, 2**31 - 1)}
        entries.update(settings or {})
        out = PREFACE + settingsFrame(entries)
        if window > 65535:
            out += windowUpdateFrame(0, window - 65535)
        self.send(out)
        return self

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def __enter__(self) -> "Attacker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending --------------------------------------------------------------------

    def send(self, *items) -> bool:
        """Write frames (bytes or hyperframe Frames); False if the server has
        closed or stopped taking bytes (the error is kept in ``sendError``)."""
        data = b"".join(i if isinstance(i, (bytes, bytearray)) else i.serialize() for i in items)
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            self.sendError = e
            return False
        self.bytesSent += len(data)
        return True

    def headers(self, sid: int, headers, end: bool = False, endHeaders: bool = True) -> bytes:
        """A HEADERS frame encoded with this connection's HPACK encoder."""
        f = HeadersFrame(sid, data=self.encoder.encode(headers))
        if endHeaders:
            f.flags.add("END_HEADERS")
        if end:
            f.flags.add("END_STREAM")
        return f.serialize()

    def continuation(self, sid: int, block: bytes, endHeaders: bool = False) -> bytes:
        f = ContinuationFrame(sid, data=block)
        if endHeaders:
            f.flags.add("END_HEADERS")
        return f.serialize()

    # -- reading --------------------------------------------------------------------

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            data = b""
        except ConnectionResetError:
            self.closed = "reset"
            return b""
        except ssl.SSLError as e:  # e.g. a record cut by a reset
            self.closed = f"tls error: {e}"
            return b""
        if not data:
            self.closed = "eof"
        return data

    def read(self, until=None, timeout: float | None = None) -> list[Frame]:
        """Read frames until ``until(frame)`` is true for one of them, or the
        server closes. Raises ``TimeoutError`` after ``timeout`` seconds."""
        self.sock.settimeout(timeout or self.timeout)
        new: list[Frame] = []
        while True:
            for frame in self._parse():
                new.append(frame)
                if until is not None and until(frame):
                    return new
            if self.closed:
                return new
            try:
                data = self._recv()
            except socket.timeout:
                raise TimeoutError(
                    f"no frame satisfied the wait within {timeout or self.timeout}s; got {new!r}"
                ) from None
            if not data:
                return new
            self._buffer += data

    def poll(self) -> list[Frame]:
        """Read and parse whatever has arrived, without waiting."""
        import select

        new: list[Frame] = []
        while not self.closed and (self.sock.pending() or select.select([self.sock], [], [], 0)[0]):
            data = self._recv()
            if not data:
                break
            self._buffer += data
            new.extend(self._parse())
        return new

    def readUntilClosed(self, timeout: float | None = None) -> list[Frame]:
        return self.read(None, timeout)

    def readUntilGoAway(self, timeout: float | None = None) -> GoAwayFrame:
        self.read(lambda f: isinstance(f, GoAwayFrame), timeout)
        goaways = self.goaways()
        if not goaways:
            raise AssertionError(f"connection {self.closed or 'open'} without a GOAWAY: {self.frames!r}")
        return goaways[0]

    def response(self, sid: int, timeout: float | None = None) -> Response:
        """Wait for the final response HEADERS (or a reset) of stream ``sid``."""

        def done(frame=None):
            r = self.streams.get(sid)
            return r is not None and (r.status is not None or r.reset is not None)

        if not done():
            self.read(done, timeout)
        return self.streams.setdefault(sid, Response())

    def _parse(self):
        buf = self._buffer
        while len(buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(buf[9 : 9 + length])))
            del buf[: 9 + length]
            self.frames.append(frame)
            self._track(frame)
            yield frame

    def _track(self, frame: Frame) -> None:
        r = self.streams.setdefault(frame.stream_id, Response()) if frame.stream_id else None
        if isinstance(frame, (HeadersFrame, ContinuationFrame)):
            self._block.append(frame.data)
            if "END_HEADERS" in frame.flags:
                r.headers.append(self.decoder.decode(b"".join(self._block), raw=True))
                self._block = []
            if "END_STREAM" in frame.flags:
                r.ended = True
        elif isinstance(frame, DataFrame):
            r.data += frame.data
            if "END_STREAM" in frame.flags:
                r.ended = True
        elif isinstance(frame, RstStreamFrame):
            r.reset = frame.error_code
        elif isinstance(frame, WindowUpdateFrame):
            if frame.stream_id == 0:
                self._connWindow += frame.window_increment
            else:
                self._streamWindows[frame.stream_id] = self.window(frame.stream_id) + frame.window_increment
        elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            new = frame.settings.get(0x4)
            if new is not None:
                delta = new - self._initialWindow
                self._initialWindow = new
                for sid in self._streamWindows:
                    self._streamWindows[sid] += delta
            if self.autoAck:
                self.send(settingsFrame(ack=True))
        elif self.autoAck and isinstance(frame, PingFrame) and "ACK" not in frame.flags:
            self.send(pingFrame(frame.opaque_data, ack=True))

    # -- flow control ------------------------------------------------------------------

    def window(self, sid: int) -> int:
        """What may be sent on ``sid`` now: the stream's send window."""
        return self._streamWindows.get(sid, self._initialWindow)

    def credit(self, sid: int) -> int:
        return min(self._connWindow, self.window(sid))

    def sendData(self, sid: int, data: bytes, end: bool = False) -> bool:
        """DATA within the windows (the caller checks :meth:`credit`)."""
        self._connWindow -= len(data)
        self._streamWindows[sid] = self.window(sid) - len(data)
        return self.send(dataFrame(sid, data, end))

    # -- what came back ----------------------------------------------------------------

    def goaways(self) -> list[GoAwayFrame]:
        return [f for f in self.frames if isinstance(f, GoAwayFrame)]

    def framesOf(self, kind, sid: int | None = None) -> list:
        return [f for f in self.frames if isinstance(f, kind) and (sid is None or f.stream_id == sid)]

    # -- conveniences ----------------------------------------------------------------

    def openTunnel(self, sid: int, authority: str, timeout: float | None = None) -> Response:
        """CONNECT ``authority`` on stream ``sid`` and wait for the response."""
        self.send(self.headers(sid, connectHeaders(authority)))
        return self.response(sid, timeout)

    def echo(self, sid: int, payload: bytes, timeout: float | None = None) -> bytes:
        """Send ``payload`` on an open tunnel to an echo target; wait for it back."""
        start = len(self.streams.setdefault(sid, Response()).data)
        self.send(dataFrame(sid, payload))
        want = start + len(payload)
        done = lambda f=None: len(self.streams[sid].data) >= want or self.streams[sid].reset is not None
        if not done():
            self.read(done, timeout)
        return bytes(self.streams[sid].data[start:want])
