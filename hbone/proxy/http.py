"""The HTTP/1.1 proxy listener (``-L http://[user:pass@]host:port``), and the
listener machinery it shares with the SOCKS and ``auto`` listeners.

Layers, txtorcon-style:

* :class:`RequestHeadReader` and :func:`parseRequestHead` turn bytes into a
  :class:`ProxyRequest` or an :class:`HTTPRequestError` carrying the status to answer
  (``400``, ``431``); they know nothing about sockets.
* :class:`ProxyListenerProtocol` is the thin protocol every proxy listener runs: it
  feeds a *conversation* (HTTP, SOCKS, or the ``auto`` sniffer) until the client has
  said where to go, enforces the handshake deadline, then stops reading, dials
  through the listener's dialer (:func:`hbone.proxy.tcp.spliceThrough`), answers the
  client only once the outbound leg is connected, and splices. Bytes the client sent
  after its request are forwarded first, never lost.

HTTP specifics (SECURITY §4.1, §4.6; PROTOCOL §6 "Local listeners"):

* ``CONNECT host:port`` is answered ``200 Connection established`` once connected;
  an absolute-form request (``GET http://host:port/path``) is forwarded in origin
  form with hop-by-hop fields removed and ``Connection: close`` (one request per
  connection), then spliced;
* the head is at most 8 KiB and 32 fields (``431`` and close), must arrive within
  10 s (close), and may not carry both ``Content-Length`` and ``Transfer-Encoding``
  (``400`` and close);
* with credentials configured, a request without the right ``Proxy-Authorization:
  Basic`` gets ``407`` with ``Proxy-Authenticate: Basic realm="hbone"``, and nothing
  is dialed;
* dial failures map to ``400``/``403``/``502``/``503``/``504`` with a
  ``Proxy-Status`` header naming the RFC 9209 error.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from hbone.address import AddressError, Target, parseAuthority
from hbone.dialer import TunnelRequest
from hbone.logs import RejectionLog
from hbone.proxy.tcp import spliceThrough
from hbone.splice import SpliceProtocol, tuneTCP

__all__ = [
    "HTTPProxyFactory",
    "HTTPRequestError",
    "ProxyRequest",
    "RequestHeadReader",
    "parseRequestHead",
    "errorResponse",
    "httpStatusOf",
    "checkBindSafety",
    "ProxyListenerFactory",
    "ProxyListenerProtocol",
    "MAX_HEAD",
    "MAX_FIELDS",
    "HANDSHAKE_TIMEOUT",
]

#: Request head limits (SECURITY §4.6).
MAX_HEAD = 8192
MAX_FIELDS = 32
#: Seconds from accept until the request (HTTP head; SOCKS greeting, auth and
#: request) is complete (SECURITY §4.6).
HANDSHAKE_TIMEOUT = 10.0
#: After an error answer: seconds to keep reading (and discarding) before an abortive
#: close, so the client reads the answer rather than a reset.
LINGER_TIMEOUT = 2.0
#: What a paused connection may still deliver while its tunnel is being dialed.
_MAX_PENDING = 256 * 1024

PROXY_SCHEMES = frozenset({"http", "socks5", "socks4", "socks4a", "auto"})

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/1\.[01]")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_PROXY_ERROR = re.compile(r"[a-z0-9_]{1,64}")

#: Removed from a forwarded request (RFC 9110 §7.6.1), plus the proxy's own fields.
_HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "upgrade",
    "proxy-authorization", "proxy-authenticate", "host",
})
#: Never removed because ``Connection`` names them: that would change the framing.
_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})


# ---------------------------------------------------------------------------
# The request head: pure parsing


class HTTPRequestError(Exception):
    """A request head to refuse: answer ``status`` (400, 431) and close."""

    def __init__(self, status: int, reason: str, proxyError: str = "http_request_error") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.proxyError = proxyError


@dataclass(frozen=True)
class ProxyRequest:
    """A parsed proxy request head.

    ``form`` is ``"authority"`` (CONNECT) or ``"absolute"``; ``path`` is the origin
    form of an absolute-form target (``/index.html?q``); ``headers`` are the fields
    in order, names as sent."""

    method: str
    target: Target
    form: str
    version: str
    headers: tuple[tuple[str, str], ...] = ()
    path: str = ""
    hostField: str = ""

    def fields(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def proxyCredentials(self) -> tuple[bytes, bytes] | None:
        """The ``Proxy-Authorization: Basic`` user and password, if exactly one
        well-formed field is present."""
        values = self.fields("proxy-authorization")
        if len(values) != 1:
            return None
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, colon, password = decoded.partition(b":")
        if not colon:
            return None
        return user, password

    def originHead(self) -> bytes:
        """The head to send to the origin: origin-form target, ``Host`` from the
        target URI (RFC 9112 §3.2.2), hop-by-hop fields removed, ``Connection: close``."""
        listed = set()
        for value in self.fields("connection"):
            listed.update(t.strip().lower() for t in value.split(",") if t.strip())
        drop = _HOP_BY_HOP | (listed - _FRAMING)
        lines = [f"{self.method} {self.path} {self.version}", f"Host: {self.hostField}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in drop]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _parseAbsolute(uri: str) -> tuple[Target, str, str]:
    """``http://host[:port][/path][?query]`` -> (target, origin-form path, Host value)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() != "http":
        if sep and scheme.lower() == "https":
            raise HTTPRequestError(400, "an https:// URI needs CONNECT (this proxy does not originate TLS)")
        raise HTTPRequestError(400, "request target is neither host:port (CONNECT) nor an http:// URI")
    end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    path = path.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    if "@" in authority:
        raise HTTPRequestError(400, "userinfo in the request URI is not allowed")
    if authority.startswith("["):
        close = authority.find("]")
        hostPart, portPart = authority[: close + 1], authority[close + 1 :]
    else:
        hostPart, colon, portPart = authority.partition(":")
        portPart = colon + portPart
    if portPart in ("", ":"):
        portText = "80"
    elif portPart.startswith(":"):
        portText = portPart[1:]
    else:
        raise HTTPRequestError(400, "bad authority in the request URI")
    try:
        target = parseAuthority(f"{hostPart}:{portText}")
    except AddressError as e:
        raise HTTPRequestError(400, f"bad request URI: {e}") from None
    host = f"[{target.host}]" if ":" in target.host else target.host
    hostField = host if target.port == 80 else f"{host}:{target.port}"
    return target, path, hostField


def parseRequestHead(head: bytes) -> ProxyRequest:
    """Parse a complete request head (ending in CRLF CRLF, at most :data:`MAX_HEAD`).

    :raises HTTPRequestError: ``431`` for more than :data:`MAX_FIELDS` fields,
        ``400`` for anything malformed, a ``Content-Length`` with a
        ``Transfer-Encoding``, or a target that is neither ``host:port`` for CONNECT
        nor an ``http://`` URI."""
    if len(head) > MAX_HEAD:
        raise HTTPRequestError(431, f"request head longer than {MAX_HEAD} bytes")
    if not head.endswith(b"\r\n\r\n"):
        raise HTTPRequestError(400, "incomplete request head")
    text = head[:-4].decode("latin-1")
    lines = text.split("\r\n")
    if any("\r" in line or "\n" in line for line in lines):
        raise HTTPRequestError(400, "bare CR or LF in the request head")
    requestLine, fieldLines = lines[0], lines[1:]
    if len(fieldLines) > MAX_FIELDS:
        raise HTTPRequestError(431, f"more than {MAX_FIELDS} header fields")
    parts = requestLine.split(" ")
    if len(parts) != 3:
        raise HTTPRequestError(400, "malformed request line")
    method, uri, version = parts
    if not _TOKEN.fullmatch(method) or not _VERSION.fullmatch(version):
        raise HTTPRequestError(400, "malformed request line")
    if not uri or _BAD_TARGET.search(uri):
        raise HTTPRequestError(400, "malformed request target")
    headers = []
    for line in fieldLines:
        if line[:1] in (" ", "\t"):
            raise HTTPRequestError(400, "obsolete line folding in a header field")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HTTPRequestError(400, "malformed header field")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise HTTPRequestError(400, "control character in a header field")
        headers.append((name, value))

    lower = [(k.lower(), v) for k, v in headers]
    lengths = [v for k, v in lower if k == "content-length"]
    codings = [v for k, v in lower if k == "transfer-encoding"]
    if lengths and codings:
        raise HTTPRequestError(400, "Content-Length together with Transfer-Encoding")
    if lengths:
        values = {part.strip() for v in lengths for part in v.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit() or not next(iter(values)).isascii():
            raise HTTPRequestError(400, "invalid Content-Length")
    if codings:
        if version == "HTTP/1.0":
            raise HTTPRequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        last = [c.strip().lower() for v in codings for c in v.split(",") if c.strip()]
        if not last or last[-1] != "chunked":
            raise HTTPRequestError(400, "Transfer-Encoding that does not end in chunked")
    if len([1 for k, _ in lower if k == "host"]) > 1:
        raise HTTPRequestError(400, "more than one Host field")

    if method == "CONNECT":
        try:
            target = parseAuthority(uri)
        except AddressError as e:
            raise HTTPRequestError(400, f"bad CONNECT target: {e}") from None
        return ProxyRequest(method, target, "authority", version, tuple(headers))
    target, path, hostField = _parseAbsolute(uri)
    return ProxyRequest(method, target, "absolute", version, tuple(headers), path, hostField)


class RequestHeadReader:
    """Collects a request head from any split of bytes.

    :meth:`feed` returns the :class:`ProxyRequest` once the head is complete (then
    :attr:`leftover` holds the bytes after it), ``None`` while more is needed, and
    raises :class:`HTTPRequestError` (``431`` as soon as :data:`MAX_HEAD` bytes
    went by without the end of the head). It never holds more than
    :data:`MAX_HEAD` bytes plus one read."""

    def __init__(self) -> None:
        self._buffer = b""
        self.leftover = b""
        self.done = False

    def feed(self, data: bytes) -> ProxyRequest | None:
        if self.done:
            raise HTTPRequestError(400, "request head already complete")
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self.done = True
                raise HTTPRequestError(431, f"request head longer than {MAX_HEAD} bytes")
            return None
        self.done = True
        head, self.leftover = self._buffer[: end + 4], self._buffer[end + 4 :]
        self._buffer = b""
        return parseRequestHead(head)


# ---------------------------------------------------------------------------
# Answers


def httpStatusOf(err) -> tuple[int, str]:
    """The HTTP status and ``Proxy-Status`` error for a dial failure (PROTOCOL §6
    "Local listeners"): 400 -> 400, 401/403 -> 403, 503/504 keep their code, a
    reset before a response (and anything unexpected) -> 502."""
    status = getattr(err, "status", None)
    proxyError = getattr(err, "proxyError", None) or "proxy_internal_error"
    if status in (401, 403):
        return 403, proxyError
    if status in (400, 502, 503, 504):
        return status, proxyError
    return 502, proxyError


def errorResponse(status: int, proxyError: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete, closing error response with ``Proxy-Status: hbone; error=...``."""
    if not _PROXY_ERROR.fullmatch(proxyError or ""):
        proxyError = "proxy_internal_error"
    reason = _REASONS.get(status, "Error")
    body = f"{status} {reason} ({proxyError})\n".encode("ascii")
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Proxy-Status: hbone; error={proxyError}",
        *(f"{k}: {v}" for k, v in extra),
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def checkBindSafety(scheme: str, host: str, credentials, listener: str | None = None) -> None:
    """Refuse a proxy listener that would be an open relay (SECURITY §4.3).

    An ``http``/``socks5``/``socks4``/``socks4a``/``auto`` listener on a non-loopback
    address needs ``user:pass@`` credentials; ``socks4``/``socks4a`` cannot check
    credentials at all, so they refuse them. Other schemes pass.

    :param host: the bind host (``""`` or ``None``: omitted, which binds 127.0.0.1).
    :param listener: the listener as written, to prefix the message with ``-L ...:``.
    :raises ValueError: naming the listener and what to do.
    """
    if scheme not in PROXY_SCHEMES:
        return
    prefix = f"-L {listener}: " if listener else ""
    if credentials is not None and scheme in ("socks4", "socks4a"):
        raise ValueError(
            f"{prefix}SOCKS4 has no authentication, so user:pass@ cannot be enforced; "
            f"use socks5://user:pass@ (which also serves SOCKS4 clients on loopback without them)"
        )
    if credentials is not None and any(credentials):
        return
    if _isLoopback(host):
        return
    raise ValueError(
        f"{prefix}a proxy listener on a non-loopback address needs user:pass@ credentials "
        f"(SECURITY §4.3)"
    )


def _isLoopback(host: str | None) -> bool:
    if not host or host.lower() in ("localhost", "localhost."):
        return True
    text = host.strip("[]").partition("%")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


# ---------------------------------------------------------------------------
# The shared listener protocol

HANDSHAKE, DIALING, SPLICED, CLOSING = "handshake", "dialing", "spliced", "closing"


class ProxyListenerProtocol(SpliceProtocol):
    """One accepted client of a proxy listener.

    Phases: *handshake* (bytes go to the conversation, under the deadline) ->
    *dialing* (not reading; a tunnel is being opened) -> *spliced* (a
    :class:`~hbone.splice.SpliceProtocol` half) or *closing* (an error answer was
    written; the write side is shut, input is discarded until the client closes or
    the linger time ends).

    The conversation calls back :meth:`startTunnel` or :meth:`refuse`."""

    onLost = None  # set by spliceThrough while dialing

    def __init__(self, factory: "ProxyListenerFactory") -> None:
        super().__init__()
        self.factory = factory
        self.phase = HANDSHAKE
        self.conversation = None
        self.source: tuple[str, int] | None = None
        self._timer = None
        self._pending = b""

    # -- connection events --------------------------------------------------------

    def connectionMade(self) -> None:
        # not SpliceProtocol.connectionMade: the handshake must be read first
        tuneTCP(self.transport)
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        if isinstance(host, str) and isinstance(port, int):
            self.source = (host, port)
        self._setTimer(self.factory.handshakeTimeout, self._handshakeExpired)
        self.conversation = self.factory.conversationFor(self)

    def dataReceived(self, data: bytes) -> None:
        phase = self.phase
        if phase == SPLICED:
            SpliceProtocol.dataReceived(self, data)
        elif phase == HANDSHAKE:
            try:
                self.conversation.dataReceived(data)
            except Exception:
                self.factory.log.failure("{listener}: proxy handshake failed", listener=self.factory.name)
                self.transport.abortConnection()
        elif phase == DIALING:
            self._pending += data
            if len(self._pending) > _MAX_PENDING:
                self.transport.abortConnection()
        # CLOSING: discard

    def readConnectionLost(self) -> None:
        if self.phase in (HANDSHAKE, CLOSING):
            self.phase = CLOSING
            self.transport.loseConnection()
        else:
            super().readConnectionLost()

    def writeConnectionLost(self) -> None:
        if self.phase != CLOSING:
            super().writeConnectionLost()

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)  # first: a cancelled dial sees ``lost``
        if self.onLost is not None:
            self.onLost()
        self._cancelTimer()

    # -- timers -------------------------------------------------------------------

    def _setTimer(self, delay: float, f) -> None:
        self._cancelTimer()
        if delay:
            self._timer = self.factory.clock.callLater(delay, f)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _handshakeExpired(self) -> None:
        self._timer = None
        if self.phase != HANDSHAKE or self.lost:
            return
        self.factory.rejections.log(
            "handshake_timeout", "{listener}: client {src} did not finish its request within {timeout:g}s",
            listener=self.factory.name, src=self._src(), timeout=self.factory.handshakeTimeout,
        )
        self.phase = CLOSING
        self.transport.loseConnection()

    def _lingerExpired(self) -> None:
        self._timer = None
        if not self.lost:
            self.transport.abortConnection()

    # -- called by conversations ------------------------------------------------

    def refuse(self, answer: bytes, key: str, reason: str) -> None:
        """Log (rate-limited), write ``answer``, and close."""
        self.factory.rejections.log(
            key, "{listener}: refused client {src}: {reason}",
            listener=self.factory.name, src=self._src(), reason=reason,
        )
        self._closeWith(answer)

    def _closeWith(self, answer: bytes) -> None:
        self.phase = CLOSING
        if self.lost:
            return
        if answer:
            self.transport.write(answer)
        if self._pausedWaiting:  # keep reading, so the close is a FIN, not a reset
            self._pausedWaiting = False
            self.transport.resumeProducing()
        halfClose = getattr(self.transport, "loseWriteConnection", None)
        if halfClose is not None:
            halfClose()
        else:
            self.transport.loseConnection()
        self._setTimer(self.factory.lingerTimeout, self._lingerExpired)

    def startTunnel(self, target: Target, leftover: bytes, reply, refusal,
                    upstreamHead: bytes = b"", dialer=None, operatorFixed: bool = False) -> defer.Deferred:
        """Stop reading and dial ``target``. Once connected, ``reply(outbound)`` is
        written to the client, then ``upstreamHead`` and the client's buffered bytes
        to the destination, and the two are spliced. On failure ``refusal(error)``
        is written to the client, which is then closed. ``dialer`` (default: the
        listener's) and ``operatorFixed`` (a route's fixed target) are for the SNI gateway."""
        self._cancelTimer()
        self.phase = DIALING
        self._pending = leftover
        self.transport.pauseProducing()
        self._pausedWaiting = True
        factory = self.factory
        request = TunnelRequest(target=target, source=self.source, operatorFixed=operatorFixed)
        info = {"direction": "outbound", "source": self.source, "target": target.authority(),
                "traceparent": request.traceparent, "listener": factory.name, "request": request,
                "started": factory.clock.seconds()}

        def connected(outbound) -> None:
            self.phase = SPLICED
            answer = reply(outbound)
            if answer:
                self.transport.write(answer)
            first, self._pending = upstreamHead + self._pending, b""
            if first:
                self.bytesIn += len(first)
                outbound.transport.write(first)

        def failed(f) -> None:
            self._closeWith(refusal(f.value))

        d = spliceThrough(self, dialer or factory.dialer, request, factory.tracker, info,
                          onConnected=connected, onFailed=failed)
        d.addErrback(factory._dialFailed, self._src(), target)
        return d

    def _src(self) -> str:
        if self.source is None:
            return "?"
        host, port = self.source
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ProxyListenerFactory(Factory):
    """Base of the proxy listener factories: the dialer, tracker, clock,
    credentials, limits and the rate-limited rejection log. Subclasses say which
    conversation a new client starts with (:meth:`conversationFor`)."""

    noisy = False
    log = Logger()

    def __init__(self, dialer, tracker, clock, credentials: tuple[str, str] | None = None,
                 name: str = "proxy", handshakeTimeout: float = HANDSHAKE_TIMEOUT,
                 lingerTimeout: float = LINGER_TIMEOUT) -> None:
        if credentials is not None:
            user, password = credentials
            if not isinstance(user, str) or not isinstance(password, str):
                raise TypeError("credentials must be a (user, password) pair of str")
            credentials = (user, password)
        self.dialer = dialer
        self.tracker = tracker
        self.clock = clock
        self.credentials = credentials
        self.name = name
        self.handshakeTimeout = handshakeTimeout
        self.lingerTimeout = lingerTimeout
        self.rejections = RejectionLog(clock)

    def buildProtocol(self, addr):
        return ProxyListenerProtocol(self)

    def conversationFor(self, protocol):  # pragma: no cover - abstract
        raise NotImplementedError

    def _dialFailed(self, failure, src: str, target: Target) -> None:
        if failure.check(defer.CancelledError):
            return None
        err = failure.value
        self.rejections.log(
            getattr(err, "proxyError", type(err).__name__),
            "{listener}: tunnel from {src} to {target} failed: {reason}",
            listener=self.name, src=src, target=target.authority(),
            reason=str(err) or type(err).__name__,
        )
        return None


# ---------------------------------------------------------------------------
# HTTP


class HTTPConversation:
    """Reads one request head and starts its tunnel (see the module docstring)."""

    def __init__(self, protocol: ProxyListenerProtocol, credentials) -> None:
        self.protocol = protocol
        self.reader = RequestHeadReader()
        self.credentials = (
            None if credentials is None
            else (credentials[0].encode("utf-8"), credentials[1].encode("utf-8"))
        )

    def dataReceived(self, data: bytes) -> None:
        proto = self.protocol
        try:
            request = self.reader.feed(data)
        except HTTPRequestError as e:
            proto.refuse(errorResponse(e.status, e.proxyError), f"http_{e.status}", e.reason)
            return
        if request is None:
            return
        if self.credentials is not None and not self._authorized(request):
            proto.refuse(
                errorResponse(407, "http_request_denied",
                              (("Proxy-Authenticate", 'Basic realm="hbone"'),)),
                "http_407", "missing or wrong Proxy-Authorization",
            )
            return

        def refusal(err) -> bytes:
            return errorResponse(*httpStatusOf(err))

        if request.form == "authority":
            proto.startTunnel(request.target, self.reader.leftover, lambda outbound: ESTABLISHED, refusal)
        else:
            proto.startTunnel(request.target, self.reader.leftover, lambda outbound: b"", refusal,
                              upstreamHead=request.originHead())

    def _authorized(self, request: ProxyRequest) -> bool:
        got = request.proxyCredentials()
        if got is None:
            return False
        user, password = self.credentials
        return hmac.compare_digest(got[0], user) & hmac.compare_digest(got[1], password)


class HTTPProxyFactory(ProxyListenerFactory):
    """The HTTP/1.1 proxy: CONNECT and absolute-form requests, dialed through
    ``dialer`` with the client as the source and ``operatorFixed=False`` (so a
    :class:`~hbone.dialer.DirectDialer` applies the destination policy)."""

    def __init__(self, dialer, tracker, clock, credentials: tuple[str, str] | None = None,
                 name: str = "http", **kw) -> None:
        super().__init__(dialer, tracker, clock, credentials, name, **kw)

    def conversationFor(self, protocol):
        return HTTPConversation(protocol, self.credentials)
