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
from hbone.events import TunnelRejected
from hbone.errors import AccessDenied, ConnectLimit, HBoneError, RequestError
from hbone.h2.connection import ConnectionSettings, HBoneH2Factory
from hbone.logs import RejectionLog
from hbone.splice import SpliceFactory, SpliceProtocol, TunnelTracker, abortTransport, join

__all__ = [
    "parseTunnelRequest",
    "ParsedRequest",
    "TunnelServer",
    "hboneServerFactory",
    "H2cAuthenticator",
    "h2cServerFactory",
    "checkH2cSafety",
]


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
        rules=None,
        limits=None,
        connectOnly: bool = False,
    ) -> None:
        self.connectOnly = connectOnly  # H2R nodes: the POST form gets 400 (PROTOCOL §9)
        self.reactor = reactor
        self.dialer = dialer
        self.authorizer = authorizer
        self.tracker = tracker
        self.maxPendingConnects = maxPendingConnects
        self.workloadAddress = workloadAddress
        self.trustedForwarders = tuple(trustedForwarders)
        self.name = name
        self.rules = rules  # hbone.rules.RuleSet: per-stream (peer, destination, port) rules
        self.limits = limits  # hbone.limits.ProcessLimits: connects in progress per process
        self.pendingConnects = 0
        self.rejections = RejectionLog(reactor)

    def __call__(self, stream, headers) -> None:
        """The stream handler of an mTLS listener: the peer is the certificate's
        SPIFFE ID. An ``authorization`` header is ignored here and never overrides
        the certificate (PROTOCOL §2)."""
        self.serve(stream, headers, stream.connection.peerIdentity)

    def serve(self, stream, headers, peer) -> None:
        """Serve one request from ``peer`` (a SpiffeId, or None for an anonymous
        ``h2c?insecure=1`` client, which the authorizer does not see)."""
        conn = stream.connection
        parsed = None
        try:
            parsed = parseTunnelRequest(headers, self.workloadAddress)
            if self.connectOnly and parsed.form != "connect":
                raise RequestError("only CONNECT is served on a reverse (H2R) connection")
            if self.authorizer is not None and peer is not None and not self.authorizer.isAllowed(peer):
                raise AccessDenied(self.authorizer.explain(peer))
            if self.rules:
                why = self.rules.check(peer, parsed.target.host, parsed.target.port)
                if why is not None:
                    raise AccessDenied(why)
            if self.pendingConnects >= self.maxPendingConnects or (
                self.limits is not None and not self.limits.connectStarted()
            ):
                raise ConnectLimit(f"{self.pendingConnects} upstream connects already in progress")
        except HBoneError as e:
            self._reject(stream, e, peer, parsed.target if parsed is not None else None)
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
                if self.limits is not None:
                    self.limits.connectFinished()
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
                "request": request,  # re-checked when a reload changes policy or rules
                "started": getattr(stream, "openedAt", None),  # the request arrived
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
        events = self.tracker.events if self.tracker is not None else None
        if events is not None:
            source = None
            try:
                tcp = stream.connection.transport.getPeer()
                source = (tcp.host, tcp.port)
            except Exception:
                pass
            events.emit(TunnelRejected(
                self.name, str(peer) if peer is not None else None, source,
                target.authority() if target is not None else None, status, proxyError, str(error),
            ))


def hboneServerFactory(reactor, identity, tunnelServer: TunnelServer,
                       settings: ConnectionSettings = ConnectionSettings(),
                       processLimits=None, events=None):
    """The protocol factory of an mTLS HBONE listener (ALPN ``h2``).

    It carries the listener's :class:`hbone.limits.ListenerGate` (handshakes in
    progress and connections, from ``settings``) as ``listenerGate``; listen with
    :class:`hbone.limits.LimitedServerEndpoint` (or ``listenLimited``) so the port
    stops accepting at those caps and pauses on EMFILE. ``processLimits`` (one
    :class:`hbone.limits.ProcessLimits` per process) caps the open tunnels."""
    from hbone.limits import GatedTLSMemoryBIOFactory, ListenerGate

    gate = ListenerGate(settings.maxHandshakesPerListener, settings.maxConnectionsPerListener)
    inner = HBoneH2Factory(
        "server", reactor, settings, tunnelServer, b"h2", identity.localId, tunnelServer.name,
        gate=gate, processLimits=processLimits, events=events,
    )
    return GatedTLSMemoryBIOFactory(identity.serverCreator(b"h2"), False, inner, gate, clock=reactor)


def serverEndpoint(reactor, host: str, port: int, backlog: int = 1024):
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)


# -- h2c: cleartext HTTP/2 behind a TLS-terminating load balancer (PROTOCOL §2) --------


def _isLoopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def checkH2cSafety(host: str, verifier, insecure: bool) -> None:
    """Refuse an ``h2c`` listener that would serve anonymous clients where it
    should not (SECURITY §4.2, §4.3).

    With a verifier (``?jwks=``) every request needs a bearer JWT-SVID and
    ``insecure`` must not be set. Without one it starts only with
    ``insecure=True`` on a loopback address.

    :raises ValueError: with the reason and what to write instead."""
    if verifier is not None:
        if insecure:
            raise ValueError(
                "?insecure=1 and ?jwks= contradict each other: with a JWKS every request "
                "needs a bearer JWT-SVID; drop insecure=1"
            )
        return
    if not insecure:
        raise ValueError(
            "an h2c listener needs bearer JWT-SVIDs: add ?jwks=FILE (from 'hbone certs jwks') "
            "and optionally &audience=AUD; ?insecure=1 serves without tokens, on a loopback "
            "address only (e.g. h2c://127.0.0.1:15009?insecure=1)"
        )
    if not _isLoopback(host):
        raise ValueError(
            f"?insecure=1 is allowed on a loopback address only, not {host}: bind "
            "127.0.0.1 or ::1, or verify tokens with ?jwks=FILE"
        )


def _authorityHost(headers) -> str | None:
    for name, value in headers:
        if name == b":authority":
            text = value.decode("ascii", "replace")
            if text.startswith("["):
                end = text.find("]")
                return text[1:end] if end > 0 else None
            return text.rsplit(":", 1)[0] if ":" in text else text
    return None


class H2cAuthenticator:
    """The stream handler of an ``h2c`` listener: authenticates each request by its
    bearer JWT-SVID, then hands it to the :class:`TunnelServer` with the token's
    ``sub`` as the peer identity (which the authorizer then checks as it would a
    certificate's).

    A missing or unacceptable token gets ``401`` with ``www-authenticate: Bearer``
    and ``proxy-status: …; error=http_request_denied``, before the request is
    parsed or anything is dialed. Without a verifier (``insecure``) requests are
    served anonymously. The token is never logged, and the ``authorization``
    header is dropped from the stream's recorded request headers.
    """

    def __init__(self, tunnelServer: TunnelServer, verifier=None, insecure: bool = False) -> None:
        if verifier is None and not insecure:
            raise ValueError("an h2c listener without a verifier must be insecure=True")
        self.tunnelServer = tunnelServer
        self.verifier = verifier
        self.insecure = insecure

    def __call__(self, stream, headers) -> None:
        from hbone.jwt import TokenError, bearerToken

        if any(name == b"authorization" for name, _ in headers):
            stream.requestHeaders = [(n, v) for n, v in headers if n != b"authorization"]
        if self.verifier is None:
            self.tunnelServer.serve(stream, stream.requestHeaders, None)
            return
        try:
            peer = self.verifier.verify(bearerToken(headers), _authorityHost(headers))
        except TokenError as e:
            self._unauthenticated(stream, e)
            return
        self.tunnelServer.serve(stream, stream.requestHeaders, peer)

    def _unauthenticated(self, stream, error) -> None:
        source = "?"
        try:
            tcpPeer = stream.connection.transport.getPeer()
            source = f"{tcpPeer.host}:{tcpPeer.port}"
        except Exception:
            pass
        self.tunnelServer.rejections.log(
            f"token:{error.code}",
            "stream {sid} from {source}: 401 http_request_denied: bearer token refused: {reason}",
            sid=stream.streamID,
            source=source,
            reason=error.reason,
        )
        stream.connection.respond(
            stream, 401, [(b"www-authenticate", b"Bearer")], error="http_request_denied"
        )


class H2cServerFactory(HBoneH2Factory):
    """:class:`HBoneH2Factory` for an ``h2c`` listener; warns when it starts
    listening without token verification."""

    log = Logger()

    def __init__(self, reactor, settings, handler: H2cAuthenticator, name: str) -> None:
        super().__init__("server", reactor, settings, handler, None, None, name)
        self.handler = handler

    def startFactory(self) -> None:
        if self.handler.verifier is None:
            self.log.warn(
                "h2c listener serving WITHOUT bearer-token authentication (?insecure=1): "
                "every local process may open tunnels through it as an anonymous peer"
            )


def h2cServerFactory(reactor, tunnelServer: TunnelServer,
                     settings: ConnectionSettings = ConnectionSettings(),
                     verifier=None, insecure: bool = False):
    """The protocol factory of an ``h2c`` listener: HBONE (CONNECT and the POST
    form) over cleartext HTTP/2 with prior knowledge, each request authenticated by
    a bearer JWT-SVID checked by ``verifier`` (a :class:`hbone.jwt.JWKSVerifier`).

    Call :func:`checkH2cSafety` with the bind address first; this refuses only a
    missing verifier without ``insecure``."""
    handler = H2cAuthenticator(tunnelServer, verifier, insecure)
    return H2cServerFactory(reactor, settings, handler, tunnelServer.name)
