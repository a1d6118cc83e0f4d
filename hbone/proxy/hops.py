"""Client side of gost's ``http://`` and ``socks5://`` hops (``-F``).

:class:`HTTPConnectEndpoint` and :class:`SOCKS5Endpoint` are
``IStreamClientEndpoint``\\ s that open one tunnel to ``target`` through a proxy,
reached by *another* endpoint, ``via``: a TCP endpoint for the first hop, or the
endpoint of the previous hop (an HBONE stream, another proxy hop), so hops chain.

``connect(factory)`` connects a handshake protocol through ``via``, speaks the proxy's
handshake (pure state machines: :class:`HTTPConnectHandshake`,
:class:`SOCKS5Handshake`), and on success runs ``factory``'s protocol on the same
transport. The transport it sees is a thin :class:`HandoverTransport` over the real
one, so that bytes the proxy sent right after its reply (a server-first protocol's
banner) are delivered to the new protocol, in order, and only while it is not
paused: a protocol that pauses its transport in ``connectionMade`` (a splice half
waiting for its peer) gets them once it resumes. Half-close and resets pass through.

A hop that answers with anything but success errbacks with :class:`ProxyHopRefused`
(a :class:`~hbone.errors.HopUnreachable` and a :class:`~hbone.errors.TunnelRefused`:
the node answered, so a failover group does not retry it elsewhere), whose
``status``/``proxyError`` follow PROTOCOL §6, and whose message names the hop and
the target. A hop that closes, stalls past ``timeout`` or speaks garbage errbacks
with a plain :class:`~hbone.errors.HopUnreachable`.
"""

from __future__ import annotations

import base64
import re
from collections import deque

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from hbone.address import Target, parseAuthority
from hbone.errors import HBoneError, HopUnreachable, TunnelRefused

__all__ = [
    "HTTPConnectEndpoint",
    "SOCKS5Endpoint",
    "ProxyHopRefused",
    "HTTPConnectHandshake",
    "SOCKS5Handshake",
    "HandoverTransport",
    "RESPONSE_TIMEOUT",
]

#: Seconds a hop may take to answer (PROTOCOL §3: next-hop response headers).
RESPONSE_TIMEOUT = 15.0
#: Longest response head accepted from an HTTP proxy (1xx heads included).
MAX_RESPONSE_HEAD = 8192

_STATUS_LINE = re.compile(r"HTTP/1\.[01] ([0-9]{3})(?: (.*))?")
_PROXY_ERROR = re.compile(r"[a-z0-9_]{1,64}")


class ProxyHopRefused(TunnelRefused, HopUnreachable):
    """The proxy hop answered the tunnel request with a refusal."""

    def __init__(self, message: str, status: int, proxyError: str, authority: str, peer: str,
                 proxyStatus: str | None = None) -> None:
        Exception.__init__(self, message)
        self.status = status
        self.proxyError = proxyError
        self.proxyStatus = proxyStatus
        self.authority = authority
        self.peer = peer


def _proxyErrorIn(proxyStatus: str | None) -> str | None:
    """The ``error=`` parameter of a ``Proxy-Status`` value, if it is a sane token."""
    if not proxyStatus:
        return None
    for member in reversed(proxyStatus.split(",")):  # the last member is the nearest proxy
        for param in member.split(";")[1:]:
            key, _, value = param.strip().partition("=")
            value = value.strip().strip('"')
            if key.strip().lower() == "error" and _PROXY_ERROR.fullmatch(value):
                return value
    return None


# ---------------------------------------------------------------------------
# Handshakes: pure


class HTTPConnectHandshake:
    """``CONNECT target HTTP/1.1`` and its response, as a state machine.

    :meth:`start` gives the request; :meth:`receive` consumes response bytes and
    returns ``(bytesToSend, done)``; once done, :attr:`leftover` holds what followed
    the response head (tunnel bytes). Failures raise :class:`ProxyHopRefused`
    (the proxy answered non-2xx) or :class:`HopUnreachable` (garbage, too long)."""

    def __init__(self, target: Target, credentials: tuple[str, str] | None = None,
                 hop: str = "HTTP proxy hop") -> None:
        self.target = target
        self.credentials = credentials
        self.hop = hop
        self.leftover = b""
        self._buffer = b""
        self._seen = 0  # bytes of 1xx heads already skipped

    def start(self) -> bytes:
        authority = self.target.authority()
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self.credentials is not None:
            user, password = self.credentials
            token = base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
            lines.append(f"Proxy-Authorization: Basic {token}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def _garbage(self, why: str) -> HopUnreachable:
        return HopUnreachable(f"{self.hop}: {why} (tunnel to {self.target.authority()})",
                              502, "http_protocol_error")

    def receive(self, data: bytes) -> tuple[bytes, bool]:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if self._seen + len(self._buffer) > MAX_RESPONSE_HEAD:
                    raise HopUnreachable(
                        f"{self.hop}: response head longer than {MAX_RESPONSE_HEAD} bytes "
                        f"(tunnel to {self.target.authority()})", 502, "http_response_header_section_size")
                return b"", False
            head, rest = self._buffer[:end], self._buffer[end + 4 :]
            lines = head.decode("latin-1").split("\r\n")
            match = _STATUS_LINE.fullmatch(lines[0])
            if match is None:
                raise self._garbage("not an HTTP/1.x response")
            code = int(match.group(1))
            if 100 <= code < 200:  # interim response: skip it
                self._seen += end + 4
                self._buffer = rest
                if self._seen > MAX_RESPONSE_HEAD:
                    raise self._garbage("too many interim responses")
                continue
            if 200 <= code < 300:
                self.leftover, self._buffer = rest, b""
                return b"", True
            proxyStatus = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "proxy-status":
                    proxyStatus = value.strip()
            raise self._refused(code, (match.group(2) or "").strip(), proxyStatus)

    def _refused(self, code: int, reason: str, proxyStatus: str | None) -> ProxyHopRefused:
        carried = _proxyErrorIn(proxyStatus)
        hint = ""
        if code == 400:
            status, proxyError = 400, "http_request_error"
        elif code in (401, 403):
            status, proxyError = 403, "http_request_denied"
        elif code == 407:
            status, proxyError = 403, "http_request_denied"
            hint = ("; the hop wants credentials: write them in the hop URL as user:pass@"
                    if self.credentials is None else "; it refused this hop's user:pass@")
        elif code == 503:
            status, proxyError = 503, "destination_unavailable"
        elif code == 504:
            status, proxyError = 504, "connection_timeout"
        else:
            status, proxyError = 502, "proxy_internal_response"
        if carried is not None and code != 407:
            proxyError = carried
        authority = self.target.authority()
        text = f"{code} {reason}".strip()
        return ProxyHopRefused(f"{self.hop} refused the tunnel to {authority}: {text}{hint}",
                               status, proxyError, authority, self.hop, proxyStatus)


_SOCKS5_REPLIES = {
    0x01: (502, "proxy_internal_response", "general SOCKS server failure"),
    0x02: (403, "http_request_denied", "connection not allowed by ruleset"),
    0x03: (503, "destination_ip_unroutable", "network unreachable"),
    0x04: (503, "destination_unavailable", "host unreachable"),
    0x05: (503, "connection_refused", "connection refused"),
    0x06: (504, "connection_timeout", "TTL expired"),
    0x07: (502, "proxy_internal_response", "command not supported"),
    0x08: (502, "proxy_internal_response", "address type not supported"),
}


class SOCKS5Handshake:
    """An RFC 1928 CONNECT (with RFC 1929 username/password when ``credentials``
    are given), as a state machine with the interface of :class:`HTTPConnectHandshake`."""

    METHOD, AUTH, REPLY, DONE = "method", "auth", "reply", "done"

    def __init__(self, target: Target, credentials: tuple[str, str] | None = None,
                 hop: str = "SOCKS5 hop") -> None:
        self.target = target
        self.hop = hop
        self.leftover = b""
        self.state = self.METHOD
        self._buffer = b""
        self._credentials = None
        if credentials is not None:
            user, password = (c.encode("utf-8") for c in credentials)
            if not 1 <= len(user) <= 255 or len(password) > 255:
                raise ValueError("SOCKS5 credentials: the user name must be 1-255 bytes and "
                                 "the password at most 255 bytes (RFC 1929)")
            self._credentials = (user, password)

    def start(self) -> bytes:
        methods = b"\x00\x02" if self._credentials is not None else b"\x00"
        return bytes([0x05, len(methods)]) + methods

    def _request(self) -> bytes:
        from hbone.proxy.socks import encodeSOCKS5Request

        return encodeSOCKS5Request(self.target)

    def _garbage(self, why: str) -> HopUnreachable:
        return HopUnreachable(f"{self.hop}: {why} (tunnel to {self.target.authority()})",
                              502, "http_protocol_error")

    def _refused(self, status: int, proxyError: str, why: str) -> ProxyHopRefused:
        authority = self.target.authority()
        return ProxyHopRefused(f"{self.hop} refused the tunnel to {authority}: {why}",
                               status, proxyError, authority, self.hop)

    def receive(self, data: bytes) -> tuple[bytes, bool]:
        self._buffer += data
        out = b""
        while True:
            buf = self._buffer
            if self.state == self.METHOD:
                if len(buf) < 2:
                    return out, False
                version, method = buf[0], buf[1]
                self._buffer = buf[2:]
                if version != 0x05:
                    raise self._garbage(f"not a SOCKS5 server (version 0x{version:02x})")
                if method == 0xFF:
                    offered = "no authentication or username/password" if self._credentials else "no authentication"
                    hint = "" if self._credentials else "; write credentials in the hop URL as user:pass@"
                    raise self._refused(403, "http_request_denied",
                                        f"it accepts none of the offered methods ({offered}){hint}")
                if method == 0x02 and self._credentials is not None:
                    user, password = self._credentials
                    out += bytes([0x01, len(user)]) + user + bytes([len(password)]) + password
                    self.state = self.AUTH
                elif method == 0x00:
                    out += self._request()
                    self.state = self.REPLY
                else:
                    raise self._garbage(f"it chose authentication method 0x{method:02x}, which was not offered")
            elif self.state == self.AUTH:
                if len(buf) < 2:
                    return out, False
                self._buffer = buf[2:]
                if buf[1] != 0x00:
                    raise self._refused(403, "http_request_denied",
                                        "it rejected the username/password (check the hop's user:pass@)")
                out += self._request()
                self.state = self.REPLY
            elif self.state == self.REPLY:
                if len(buf) < 4:
                    return out, False
                version, rep, atyp = buf[0], buf[1], buf[3]
                if version != 0x05:
                    raise self._garbage(f"reply with version 0x{version:02x}")
                if rep != 0x00:
                    status, proxyError, why = _SOCKS5_REPLIES.get(
                        rep, (502, "proxy_internal_response", "unknown reply code"))
                    raise self._refused(status, proxyError, f"REP 0x{rep:02x} ({why})")
                if atyp == 0x01:
                    end = 4 + 4 + 2
                elif atyp == 0x04:
                    end = 4 + 16 + 2
                elif atyp == 0x03:
                    if len(buf) < 5:
                        return out, False
                    end = 5 + buf[4] + 2
                else:
                    raise self._garbage(f"reply with address type 0x{atyp:02x}")
                if len(buf) < end:
                    return out, False
                self.leftover, self._buffer = buf[end:], b""
                self.state = self.DONE
                return out, True
            else:
                return out, True


# ---------------------------------------------------------------------------
# The hand-over


class HandoverTransport:
    """The transport a hop's caller sees: the real transport, but incoming bytes are
    delivered only while the protocol has not paused it, in order, with the bytes
    that arrived with the proxy's reply first.

    Every attribute not defined here (``write``, ``loseConnection``,
    ``abortConnection``, ``resetStream``, ``getHandle``, ``registerProducer``...) is
    the real transport's, and the real transport's interfaces are provided."""

    def __init__(self, transport, protocol, pending: bytes = b"") -> None:
        self._transport = transport
        self.protocol = protocol
        self._paused = False
        self._queue: deque = deque([pending] if pending else [])
        self._eofPending = False
        self._lostPending: Failure | None = None
        self._delivering = False
        self._done = False
        directlyProvides(self, providedBy(transport))

    def __getattr__(self, name):
        if name.startswith("__") or name == "_transport":
            raise AttributeError(name)
        return getattr(self._transport, name)

    def __repr__(self) -> str:
        return f"<HandoverTransport over {self._transport!r}>"

    # -- IPushProducer, as seen by the protocol -----------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._done:
            self._transport.resumeProducing()
        self._flush()

    def stopProducing(self) -> None:
        self._transport.stopProducing()

    # -- from the real transport ---------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._paused or self._queue or self._delivering:
            self._queue.append(data)
            self._flush()
        else:
            self.protocol.dataReceived(data)

    def readConnectionLost(self) -> None:
        self._eofPending = True
        self._flush()

    def writeConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is not None:
            half.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        self._done = True
        self._lostPending = reason
        self._paused = False  # the connection is gone: deliver what is left, then the end
        self._flush()

    def _flush(self) -> None:
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._queue and not self._paused:
                self.protocol.dataReceived(self._queue.popleft())
            if self._queue or (self._paused and self._lostPending is None):
                return  # the end is delivered after the bytes, and not while paused
            if self._eofPending:
                self._eofPending = False
                half = IHalfCloseableProtocol(self.protocol, None)
                if half is not None:
                    half.readConnectionLost()
                elif self._lostPending is None:
                    self._transport.loseConnection()
            if self._lostPending is not None:
                reason, self._lostPending = self._lostPending, None
                self.protocol.connectionLost(reason)
        finally:
            self._delivering = False


@implementer(IHalfCloseableProtocol)
class _HandshakeProtocol(Protocol):
    """Speaks one hop's handshake, then forwards everything to the new protocol."""

    def __init__(self, attempt: "_Attempt") -> None:
        self.attempt = attempt
        self.handover: HandoverTransport | None = None
        self.failed = False
        self._timer = None

    def connectionMade(self) -> None:
        attempt = self.attempt
        attempt.protocol = self
        handshake = attempt.handshake
        if attempt.endpoint.name is None:
            handshake.hop = _describe(attempt.endpoint.scheme, self.transport)
        clock = attempt.endpoint.clock
        if clock is not None and attempt.endpoint.timeout:
            self._timer = clock.callLater(attempt.endpoint.timeout, self._expired)
        self.transport.write(handshake.start())

    def _expired(self) -> None:
        self._timer = None
        handshake = self.attempt.handshake
        self._fail(HopUnreachable(
            f"{handshake.hop} did not answer within {self.attempt.endpoint.timeout:g}s "
            f"(tunnel to {handshake.target.authority()})", 504, "http_response_timeout"), abort=True)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fail(self, err: Exception, abort: bool = False) -> None:
        if self.failed:
            return
        self.failed = True
        self._cancelTimer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
        self.attempt.fail(err)

    def dataReceived(self, data: bytes) -> None:
        if self.handover is not None:
            self.handover.dataReceived(data)
            return
        if self.failed:
            return
        try:
            send, done = self.attempt.handshake.receive(data)
        except HBoneError as e:
            self._fail(e)
            return
        if send:
            self.transport.write(send)
        if done:
            self._handOver()

    def _handOver(self) -> None:
        self._cancelTimer()
        attempt = self.attempt
        try:
            protocol = attempt.factory.buildProtocol(self.transport.getPeer())
        except Exception as e:
            self._fail(e, abort=True)
            return
        if protocol is None:
            self._fail(HopUnreachable(f"{attempt.handshake.hop}: the protocol factory refused the connection"),
                       abort=True)
            return
        self.handover = HandoverTransport(self.transport, protocol, attempt.handshake.leftover)
        protocol.makeConnection(self.handover)
        attempt.succeed(protocol)
        self.handover._flush()

    def readConnectionLost(self) -> None:
        if self.handover is not None:
            self.handover.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.handover is not None:
            self.handover.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._cancelTimer()
        if self.handover is not None:
            self.handover.connectionLost(reason)
            return
        if not self.failed:
            self.failed = True
            handshake = self.attempt.handshake
            self.attempt.fail(HopUnreachable(
                f"{handshake.hop} closed the connection before answering "
                f"(tunnel to {handshake.target.authority()}): {reason.getErrorMessage()}",
                502, "http_response_incomplete"))


def _describe(scheme: str, transport) -> str:
    try:
        peer = transport.getPeer()
    except Exception:
        return f"{scheme} hop"
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"{scheme} hop {host}:{port}" if ":" not in host else f"{scheme} hop [{host}]:{port}"
    return f"{scheme} hop"


class _HandshakeFactory(Factory):
    """Builds the handshake protocol of one attempt, for ``via.connect``."""

    noisy = False

    def __init__(self, attempt: "_Attempt") -> None:
        self.attempt = attempt

    def buildProtocol(self, addr):
        return _HandshakeProtocol(self.attempt)


class _Attempt:
    """One ``connect()``: the Deferred the caller holds, and what it is waiting on."""

    def __init__(self, endpoint, handshake, factory) -> None:
        self.endpoint = endpoint
        self.handshake = handshake
        self.factory = factory
        self.protocol: _HandshakeProtocol | None = None
        self.viaDeferred: defer.Deferred | None = None
        self.result = defer.Deferred(self._cancel)

    def _cancel(self, d) -> None:
        if self.protocol is not None:
            if self.protocol.handover is None and not self.protocol.failed:
                self.protocol.failed = True
                self.protocol._cancelTimer()
                self.protocol.transport.abortConnection()
        elif self.viaDeferred is not None:
            self.viaDeferred.cancel()

    def succeed(self, protocol) -> None:
        if not self.result.called:
            self.result.callback(protocol)

    def fail(self, err) -> None:
        if not self.result.called:
            self.result.errback(err if isinstance(err, Failure) else Failure(err))


class _ProxyHopEndpoint:
    scheme = "proxy"

    def __init__(self, via, target: Target | str, credentials: tuple[str, str] | None = None,
                 clock=None, timeout: float = RESPONSE_TIMEOUT, name: str | None = None) -> None:
        self.via = via
        self.target = parseAuthority(target) if isinstance(target, str) else target
        self.credentials = credentials
        self.clock = clock
        self.timeout = timeout
        self.name = name
        self._handshake(None)  # check the credentials now, not per connection

    def _handshake(self, hop):  # pragma: no cover - abstract
        raise NotImplementedError

    def connect(self, protocolFactory) -> defer.Deferred:
        attempt = _Attempt(self, self._handshake(self.name or f"{self.scheme} hop"), protocolFactory)
        try:
            d = attempt.viaDeferred = self.via.connect(_HandshakeFactory(attempt))
        except Exception as e:
            return defer.fail(e)

        def viaFailed(f):
            attempt.viaDeferred = None
            if f.check(defer.CancelledError):
                return None  # our own cancel: the result is already failing
            attempt.fail(f)
            return None

        def viaConnected(_):
            attempt.viaDeferred = None

        d.addCallbacks(viaConnected, viaFailed)
        return attempt.result


@implementer(IStreamClientEndpoint)
class HTTPConnectEndpoint(_ProxyHopEndpoint):
    """A tunnel to ``target`` through an HTTP/1.1 proxy reached by ``via``.

    ``HTTPConnectEndpoint(via, target, credentials=None, clock=None, timeout=15.0,
    name=None)``: ``credentials`` are sent as ``Proxy-Authorization: Basic``; with a
    ``clock`` the proxy must answer within ``timeout`` seconds (``504``); ``name``
    names the hop in errors (default: its address)."""

    scheme = "http"

    def _handshake(self, hop):
        return HTTPConnectHandshake(self.target, self.credentials, hop or "http hop")


@implementer(IStreamClientEndpoint)
class SOCKS5Endpoint(_ProxyHopEndpoint):
    """A tunnel to ``target`` through a SOCKS5 proxy reached by ``via``; the same
    arguments as :class:`HTTPConnectEndpoint` (``credentials`` use RFC 1929).
    Hostname targets are sent as names (the proxy resolves them)."""

    scheme = "socks5"

    def _handshake(self, hop):
        return SOCKS5Handshake(self.target, self.credentials, hop or "socks5 hop")
