"""The HBONE server: CONNECT and ``POST /_hbone/<addr>`` -> policy -> dialer -> splice.

Both request forms go through one parser (:func:`parseTunnelRequest`) and one path
(:class:`TunnelServer`). Processing order is PROTOCOL §4's: parse (400) -> authorize
the peer identity (403) -> resolve and apply the destination policy (403/503/504) ->
connect (503/504) -> ``200``. ``200`` is sent only after the upstream connect; DATA
that arrives earlier waits in the stream, unacknowledged, and is forwarded after it.
"""

from __future__ import annotations

from h2.errors import ErrorCodes
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from hbone.address import (
    AddressError,
    isHbonePath,
    isValidTraceparent,
    newTraceparent,
    parseAuthority,
    parseForwardedFor,
    parseHbonePath,
)
from hbone.dialer import TunnelRequest, connectErrorOf
from hbone.errors import AccessDenied, ConnectLimit, HBoneError, RequestError
from hbone.h2.connection import ConnectionSettings, HBoneH2Factory
from hbone.logs import RejectionLog
from hbone.splice import SpliceFactory, SpliceProtocol, TunnelTracker, abortTransport, join

__all__ = ["parseTunnelRequest", "ParsedRequest", "TunnelServer", "hboneServerFactory"]


class ParsedRequest:
    __slots__ = ("target", "form", "bodyLength", "traceparent", "forwardedFor", "baggage")

    def __init__(self, target, form, bodyLength, traceparent, forwardedFor, baggage) -> None:
        self.target = target
        self.form = form
        self.bodyLength = bodyLength
        self.traceparent = traceparent
        self.forwardedFor = forwardedFor
        self.baggage = baggage


def parseTunnelRequest(headers, workloadAddress: str | None = None) -> ParsedRequest:
    """Parse a request's headers (bytes pairs, as h2 gives them) into a target.

    Raises :class:`RequestError` (400) for anything but an RFC 9113 CONNECT with a
    valid ``:authority`` or a valid POST form (PROTOCOL §4, §5)."""
    method = authority = path = None
    contentLength = None
    traceparent = forwarded = baggage = None
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b":authority":
            authority = value
        elif name == b":path":
            path = value
        elif name == b":protocol":
            raise RequestError(":protocol (extended CONNECT, RFC 8441) is not supported")
        elif name == b"content-length":
            contentLength = value
        elif name == b"traceparent":
            traceparent = value
        elif name == b"forwarded":
            forwarded = value
        elif name == b"baggage":
            baggage = value
    try:
        if method == b"CONNECT":
            if contentLength is not None:
                raise RequestError("content-length is not allowed on CONNECT")
            if authority is None:
                raise RequestError("CONNECT without :authority")
            target = parseAuthority(authority)
            form, bodyLength = "connect", None
        elif method == b"POST" and path is not None and isHbonePath(path):
            target = parseHbonePath(path, workloadAddress)
            form = "post"
            bodyLength = None
            if contentLength is not None:
                text = contentLength.decode("ascii", "replace")
                if not text.isdigit() or len(text) > 18:
                    raise RequestError(f"bad content-length {text[:40]!r}")
                bodyLength = int(text)
        else:
            shown = (method or b"?").decode("ascii", "replace")[:16]
            where = (path or b"").decode("ascii", "replace")[:64]
            raise RequestError(
                f"{shown} {where}".strip() + ": only CONNECT host:port and POST /_hbone/host:port are served"
            )
    except AddressError as e:
        raise RequestError(str(e)) from None
    tp = traceparent.decode("ascii", "replace") if traceparent else None
    if not tp or not isValidTraceparent(tp):
        tp = newTraceparent()
    fwd = parseForwardedFor(forwarded) if forwarded else None
    return ParsedRequest(
        target, form, bodyLength, tp, fwd, baggage.decode("latin-1") if baggage else None
    )


class TunnelServer:
    """The stream handler of an HBONE listener (``HBoneH2Protocol.streamHandler``)."""

    log = Logger()

    def __init__(
        self,
        reactor,
        dialer,
        authorizer=None,
        tracker: TunnelTracker | None = None,
        maxPendingConnects: int = 512,
        workloadAddress: str | None = None,
        trustedForwarders=(),
        name: str = "hbone",
    ) -> None:
        self.reactor = reactor
        self.dialer = dialer
        self.authorizer = authorizer
        self.tracker = tracker
        self.maxPendingConnects = maxPendingConnects
        self.workloadAddress = workloadAddress
        self.trustedForwarders = tuple(trustedForwarders)
        self.name = name
        self.pendingConnects = 0
        self.rejections = RejectionLog(reactor)

    def __call__(self, stream, headers) -> None:
        conn = stream.connection
        peer = conn.peerIdentity
        try:
            parsed = parseTunnelRequest(headers, self.workloadAddress)
            if self.authorizer is not None and peer is not None and not self.authorizer.isAllowed(peer):
                raise AccessDenied(self.authorizer.explain(peer))
            if self.pendingConnects >= self.maxPendingConnects:
                raise ConnectLimit(f"{self.pendingConnects} upstream connects already in progress")
        except HBoneError as e:
            self._reject(stream, e, peer)
            return
        stream.authority = parsed.target.authority()
        source = None
        try:
            tcpPeer = conn.transport.getPeer()
            source = (tcpPeer.host, tcpPeer.port)
        except Exception:
            pass
        if parsed.forwardedFor and any(p.matches(peer) for p in self.trustedForwarders if peer):
            source = parsed.forwardedFor
        request = TunnelRequest(
            target=parsed.target,
            source=source,
            peerIdentity=peer,
            traceparent=parsed.traceparent,
            baggage=parsed.baggage,
        )
        self.pendingConnects += 1
        d = defer.Deferred.fromCoroutine(self._serve(stream, request, parsed))

        def streamGone(reason):
            if not d.called:
                d.cancel()

        stream.notifyClose(streamGone)
        d.addErrback(self._unexpected, stream)

    def _unexpected(self, failure, stream) -> None:
        if failure.check(defer.CancelledError):
            return
        self.log.failure("serving stream {sid} failed", failure, sid=stream.streamID)
        if not stream.closed:
            stream.resetStream(ErrorCodes.INTERNAL_ERROR)

    async def _serve(self, stream, request: TunnelRequest, parsed: ParsedRequest) -> None:
        try:
            try:
                endpoint = await self.dialer.dial(request)
                outbound = await endpoint.connect(SpliceFactory())
            finally:
                self.pendingConnects -= 1
        except defer.CancelledError:
            return  # the client went away while we dialed
        except Exception as e:
            if stream.closed:
                return
            # any IDialer's endpoint may fail with a bare Twisted connect error;
            # map it here too, so a timeout is 504 connection_timeout (PROTOCOL §6)
            error = connectErrorOf(e, request.target.authority())
            self._reject(stream, error, request.peerIdentity, request.target)
            return
        if stream.closed:
            abortTransport(outbound.transport)
            return
        headers = []
        if parsed.form == "post":
            headers = [
                (b"content-type", b"application/octet-stream"),
                (b"cache-control", b"no-store"),
            ]
        stream.connection.respond(stream, 200, headers)
        if parsed.bodyLength is not None:
            stream.expectBodyLength(parsed.bodyLength)
        inbound = SpliceProtocol()
        inbound.peer = outbound  # early DATA flows straight through once attached
        stream.makeConnection(inbound)
        join(
            inbound,
            outbound,
            self.tracker,
            {
                "direction": "inbound",
                "peer": str(request.peerIdentity),
                "source": request.source,
                "target": request.target.authority(),
                "traceparent": request.traceparent,
            },
        )

    def _reject(self, stream, error: Exception, peer, target=None) -> None:
        status = getattr(error, "status", 503)
        proxyError = getattr(error, "proxyError", "destination_unavailable")
        self.rejections.log(
            proxyError,
            "stream {sid} from {peer}{to}: {status} {error}: {reason}",
            sid=stream.streamID,
            peer=str(peer),
            to=f" to {target.authority()}" if target is not None else "",
            status=status,
            error=proxyError,
            reason=str(error),
        )
        stream.connection.respond(stream, status, error=proxyError)


def hboneServerFactory(reactor, identity, tunnelServer: TunnelServer,
                       settings: ConnectionSettings = ConnectionSettings()):
    """The protocol factory of an mTLS HBONE listener (ALPN ``h2``)."""
    inner = HBoneH2Factory(
        "server", reactor, settings, tunnelServer, b"h2", identity.localId, tunnelServer.name
    )
    return TLSMemoryBIOFactory(identity.serverCreator(b"h2"), False, inner, clock=reactor)


def serverEndpoint(reactor, host: str, port: int, backlog: int = 1024):
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)
