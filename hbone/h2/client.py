"""The HBONE client: a connection pool and the ``hbone`` client endpoint.

:class:`Pool` keeps outbound HTTP/2 connections keyed by (local SPIFFE ID, TLS mode,
expected peer identities, peer address, and for token-carrying hops the server
name, CA file and token file) (PROTOCOL §3 "Pooling"):

* up to min(peer MAX_CONCURRENT_STREAMS, 100) streams on one connection;
* one connection attempt in flight per key, others wait for it (ztunnel#931);
* a new connection only when every pooled one is full;
* a connection is usable only after the server's first SETTINGS;
* a connection leaves the pool on GOAWAY (its live tunnels finish), on a missed
  PING ACK, on a transport error, or after 5 minutes without streams.

A hop's ``tls`` mode says how its connections are secured:

* ``"mtls"``: SPIFFE mutual TLS, the server's SVID checked against the hop's
  identities (15008; the default);
* ``"server"``: ordinary server-auth TLS, the certificate checked against a CA
  bundle and the hop's DNS name or IP (a load balancer that terminates TLS, or a
  gost/nghttpx ``http2://`` proxy); our SVID is presented if the server asks;
* ``"none"``: cleartext HTTP/2 with prior knowledge (an ``h2c`` hop).

Requests on a hop with a ``token`` file carry ``authorization: Bearer <JWT-SVID>``
(the file is read for each tunnel, so a rotated token is picked up); a hop with
``basicAuth`` carries ``proxy-authorization: Basic`` (gost).

:class:`HBoneClientEndpoint` is an ``IStreamClientEndpoint``: ``connect(factory)``
opens one CONNECT (or POST form) stream and, on ``200``, runs ``factory``'s protocol
on it. A stream the peer did not process (GOAWAY below it, REFUSED_STREAM) is
retried once on another connection.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field

from h2.errors import ErrorCodes
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from hbone.address import Target, formatForwarded, newTraceparent, parseAuthority
from hbone.dialer import TunnelRequest, connectErrorOf
from hbone.errors import HopUnreachable, ResponseTimeout
from hbone.splice import tuneTCP
from hbone.h2.connection import ConnectionSettings, HBoneH2Factory, RefusedStream
from hbone.tlsio import TLSClientEndpoint

__all__ = ["HBoneHop", "Pool", "HBoneClientEndpoint", "TokenFileError", "readToken", "TLS_MODES"]

_TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


TLS_MODES = ("mtls", "server", "none")
METHODS = ("connect", "post")


@dataclass(frozen=True)
class HBoneHop:
    """An HBONE peer: its address, how it is secured and authenticated, the form.

    :param identities: IdentityPattern objects (``tls="mtls"`` only); None means
        "any SVID of our own trust domain" (SECURITY §4.2), logged once per
        connection.
    :param method: ``"connect"`` or ``"post"`` (the ``/_hbone/`` form).
    :param via: how to reach ``host:port``: ``via(host, port)`` returns an
        ``IStreamClientEndpoint`` (the previous hop of a chain). None: TCP. A
        connection made through ``via`` is never pooled: it carries one tunnel and
        closes with it (double HBONE, ztunnel#1429).
    :param tls: ``"mtls"`` (SPIFFE mTLS), ``"server"`` (server-auth TLS, DNS-name or
        IP check, ALPN h2) or ``"none"`` (cleartext h2c, prior knowledge).
    :param token: path of a file holding a JWT-SVID, sent as ``authorization:
        Bearer`` on every request (``tls="server"`` or ``"none"``).
    :param serverName: ``tls="server"``: the name the certificate must match and
        the SNI sent (default: ``host``); also the POST form's ``:authority``.
    :param caFile: ``tls="server"``: PEM CA bundle (default: the system's).
    :param basicAuth: ``(user, password)`` sent as ``proxy-authorization: Basic``
        (gost ``http2://``); never shown in ``repr``.

    :raises ValueError: for an option that does not apply to the mode.
    """

    host: str
    port: int
    identities: tuple | None = None
    method: str = "connect"
    via: object | None = field(default=None, compare=False, hash=False)
    tls: str = "mtls"
    token: str | None = None
    serverName: str | None = None
    caFile: str | None = None
    basicAuth: tuple[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls={self.tls!r}: expected one of {', '.join(TLS_MODES)}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected connect or post")
        if self.tls != "mtls" and self.identities is not None:
            raise ValueError(
                f"identity= checks a SPIFFE certificate and applies to tls=mtls hops only, "
                f"not tls={self.tls} (a tls=server hop checks the DNS name or IP instead)"
            )
        if self.tls == "mtls":
            for name, value in (("token", self.token), ("basicAuth", self.basicAuth)):
                if value is not None:
                    raise ValueError(
                        f"{name} is for load balancers and proxies (tls=server or h2c), not a "
                        "mesh peer on 15008, which ignores it"
                    )
        if self.tls != "server":
            for name, value in (("serverName", self.serverName), ("caFile", self.caFile)):
                if value is not None:
                    raise ValueError(f"{name} applies to tls=server hops only, not tls={self.tls}")
        if self.token is not None and not self.token:
            raise ValueError("token: expected a file path (token=@FILE)")
        if self.basicAuth is not None and (len(self.basicAuth) != 2 or ":" in self.basicAuth[0]):
            raise ValueError("basicAuth: expected (user, password), with no ':' in the user")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.tls == "none":
            return f"h2c://{host}:{self.port}"
        if self.tls == "server":
            return f"hbone://{host}:{self.port}?tls=server"
        return f"hbone://{host}:{self.port}"

    @property
    def serverAuthName(self) -> str:
        """The name a ``tls="server"`` hop's certificate must match."""
        return self.serverName or self.host


class TokenFileError(HopUnreachable):
    """A hop's token file cannot be read or holds no token (the message names the
    file, never its content)."""


def readToken(path: str) -> bytes:
    """The JWT-SVID in ``path`` (surrounding whitespace stripped).

    :raises TokenFileError: unreadable, empty, too long, or not a compact JWS."""
    try:
        with open(path, "rb") as f:
            data = f.read(16385)
    except OSError as e:
        raise TokenFileError(f"cannot read token file {path}: {e.strerror}") from None
    token = data.strip()
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    if len(token) > 16384 or not _TOKEN_RE.fullmatch(token):
        raise TokenFileError(f"token file {path} does not hold a JWT (header.payload.signature)")
    return token


class _Entry:
    __slots__ = ("hop", "conns", "connecting", "waiters")

    def __init__(self, hop: HBoneHop) -> None:
        self.hop = hop
        self.conns: list = []
        self.connecting: defer.Deferred | None = None
        self.waiters: deque[defer.Deferred] = deque()


class Pool:
    """Outbound HBONE connections, shared by every tunnel of this node."""

    log = Logger()

    def __init__(self, reactor, identity=None, settings: ConnectionSettings = ConnectionSettings(),
                 connectTimeout: float = 10.0, name: str = "hbone") -> None:
        """:param identity: our :class:`hbone.tls.Identity`; needed for ``tls="mtls"``
        hops, presented on request on ``tls="server"`` ones, unused for h2c."""
        self.reactor = reactor
        self.identity = identity
        self.settings = settings
        self.connectTimeout = connectTimeout
        self.name = name
        self._entries: dict[tuple, _Entry] = {}
        self.connectionsOpened = 0
        self._closing = False
        # every open connection, pooled or draining (left the pool on GOAWAY but
        # still carrying tunnels): closeAll must reach them all
        self._live: set = set()
        self.events = None  # hbone.events.Events for connection opened/closed (the node sets it)
        self._serverAuthCreators: dict[tuple, object] = {}

    def _key(self, hop: HBoneHop) -> tuple:
        local = str(self.identity.localId) if self.identity is not None else None
        return (local, hop.tls, hop.identities, hop.host, hop.port, hop.serverName, hop.caFile,
                hop.token, hop.basicAuth)

    def connections(self, hop: HBoneHop) -> list:
        entry = self._entries.get(self._key(hop))
        return list(entry.conns) if entry else []

    def acquire(self, hop: HBoneHop) -> defer.Deferred:
        """A Deferred firing with a ready connection that has a stream slot reserved
        for the caller (who must then call ``openTunnel`` and drop the reservation)."""
        if self._closing:
            return defer.fail(HopUnreachable("the pool is shutting down"))
        if hop.via is not None:
            return defer.Deferred.fromCoroutine(self._dedicated(hop))
        key = self._key(hop)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(hop)

        def cancel(d):
            try:
                entry.waiters.remove(d)
            except ValueError:
                pass

        d = defer.Deferred(cancel)
        entry.waiters.append(d)
        self._service(key)
        return d

    def _service(self, key: tuple) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        while entry.waiters:
            best = None
            for conn in entry.conns:
                if conn.capacity > 0 and (best is None or conn.capacity > best.capacity):
                    best = conn
            if best is None:
                break
            d = entry.waiters.popleft()
            best.reserved += 1
            d.callback(best)
        if entry.waiters and entry.connecting is None:
            self._startConnect(key, entry)
        if not entry.waiters and not entry.conns and entry.connecting is None:
            self._entries.pop(key, None)

    def _startConnect(self, key: tuple, entry: _Entry) -> None:
        d = defer.Deferred.fromCoroutine(self._connect(entry.hop))
        entry.connecting = d

        def connected(conn):
            entry.connecting = None
            self.connectionsOpened += 1
            entry.conns.append(conn)
            self._live.add(conn)
            conn.onCapacity = lambda c: self._service(key)
            conn.onGoingAway = lambda c: self._remove(key, c)
            conn.onClosed = lambda c, reason: self._closed(key, c)
            if entry.hop.tls == "mtls" and conn.peerIdentity is not None and entry.hop.identities is None:
                self.log.info(
                    "{hop} presented {identity} (no identity= configured for this hop; "
                    "naming it is recommended)",
                    hop=str(entry.hop),
                    identity=str(conn.peerIdentity),
                )
            self._service(key)

        def failed(f):
            entry.connecting = None
            waiters, entry.waiters = entry.waiters, deque()
            for w in waiters:
                w.errback(f)
            self._service(key)

        d.addCallbacks(connected, failed)

    def _closed(self, key: tuple, conn) -> None:
        self._live.discard(conn)
        self._remove(key, conn)

    def _remove(self, key: tuple, conn) -> None:
        entry = self._entries.get(key)
        if entry is not None and conn in entry.conns:
            entry.conns.remove(conn)
            self._service(key)

    async def _dedicated(self, hop: HBoneHop):
        """A connection of its own through ``hop.via``, closed when its tunnel ends."""
        conn = await self._connect(hop)
        self._live.add(conn)
        conn.reserved += 1

        def capacity(c):
            if not c.streams and not c.reserved and not c.closed:
                c.loseConnection()

        conn.onCapacity = capacity
        conn.onClosed = lambda c, reason: self._live.discard(c)
        return conn

    async def _connect(self, hop: HBoneHop):
        what = f"{hop}"
        if hop.via is not None:
            tcp = hop.via(hop.host, hop.port)
        elif ":" in hop.host:
            tcp = TCP6ClientEndpoint(self.reactor, hop.host, hop.port, timeout=self.connectTimeout)
        else:
            try:
                parseAuthority(f"{hop.host}:{hop.port}")
                isIPv4 = all(p.isdigit() for p in hop.host.split("."))
            except Exception:
                isIPv4 = False
            if isIPv4:
                tcp = TCP4ClientEndpoint(self.reactor, hop.host, hop.port, timeout=self.connectTimeout)
            else:
                tcp = HostnameEndpoint(self.reactor, hop.host, hop.port, timeout=self.connectTimeout)
        if hop.tls == "none":
            endpoint, alpn = tcp, None
        else:
            endpoint, alpn = TLSClientEndpoint(self._creator(hop), tcp, self.reactor), b"h2"
        localId = self.identity.localId if self.identity is not None else None
        factory = HBoneH2Factory("client", self.reactor, self.settings, None, alpn, localId, self.name,
                                 events=self.events)
        try:
            conn = await endpoint.connect(factory)
        except Exception as e:
            raise connectErrorOf(e, what) from None
        tuneTCP(conn.transport)
        try:
            return await conn.whenReady()
        except BaseException:
            # cancelled (closeAll) during the handshake: do not leave it open
            if not conn.closed and conn.transport is not None:
                conn.transport.abortConnection()
            raise

    def _creator(self, hop: HBoneHop):
        """The TLS connection creator for a ``tls="mtls"`` or ``"server"`` hop."""
        if hop.tls == "mtls":
            if self.identity is None:
                raise HopUnreachable(f"{hop}: mutual TLS needs our SVID (--certs DIR)")
            return self.identity.clientCreator(hop.identities, b"h2")
        key = (hop.serverAuthName, hop.caFile)
        creator = self._serverAuthCreators.get(key)
        if creator is None:
            from hbone.tls import IdentityConfigError, ServerAuthClientCreator

            allowTLS12 = bool(self.identity is not None and self.identity.allowTLS12)
            try:
                creator = ServerAuthClientCreator(hop.serverAuthName, hop.caFile, self.identity,
                                                  b"h2", allowTLS12)
            except (IdentityConfigError, OSError) as e:
                raise HopUnreachable(f"{hop}: {e}") from None
            self._serverAuthCreators[key] = creator
        return creator

    def closeAll(self) -> defer.Deferred:
        """GOAWAY and close every pooled connection (their tunnels end)."""
        self._closing = True
        ds = []
        for entry in list(self._entries.values()):
            for w in list(entry.waiters):
                w.errback(HopUnreachable("the pool is shutting down"))
            entry.waiters.clear()
            if entry.connecting is not None:
                entry.connecting.cancel()
        # pooled connections and draining ones (GOAWAY received, tunnels still live)
        for conn in list(self._live):
            if not conn.closed and conn.transport is not None:
                d = defer.Deferred()
                prev = conn.onClosed
                conn.onClosed = lambda c, r, d=d, prev=prev: (prev and prev(c, r), d.callback(None))
                ds.append(d)
                conn.goAway(ErrorCodes.NO_ERROR)
                # not transport.loseConnection(): the connection is its transport's
                # producer, and TLS never shuts down while one is registered
                conn.loseConnection()
        self._live.clear()
        self._entries.clear()
        return defer.DeferredList(ds)


@implementer(IStreamClientEndpoint)
async def awaitTunnel(stream, response, protocolFactory, clock, responseTimeout: float, what: str,
                      authority: str):
    """The rest of opening a tunnel once its HEADERS are out (``conn.openTunnel``):
    wait for the ``200`` (at most ``responseTimeout``: then RST_STREAM(CANCEL) and
    :class:`ResponseTimeout`), then connect ``protocolFactory``'s protocol to the
    stream. Used by :class:`HBoneClientEndpoint` and the H2R gateway."""
    timedOut = []

    def expire():
        timedOut.append(True)
        response.cancel()

    timer = clock.callLater(responseTimeout, expire)
    try:
        await response
    except defer.CancelledError:
        stream.resetStream(ErrorCodes.CANCEL)
        if timedOut:
            raise ResponseTimeout(f"{what} sent no response for {authority} within {responseTimeout:g}s") from None
        raise
    finally:
        if timer.active():
            timer.cancel()
    protocol = protocolFactory.buildProtocol(stream.getPeer())
    if protocol is None:
        stream.resetStream(ErrorCodes.CANCEL)
        raise HopUnreachable("the protocol factory refused the tunnel")
    stream.makeConnection(protocol)
    return protocol


class HBoneClientEndpoint:
    """One tunnel to ``target`` through ``hop`` per ``connect()``."""

    log = Logger()

    def __init__(self, pool: Pool, hop: HBoneHop, target: Target | str,
                 request: TunnelRequest | None = None, responseTimeout: float = 15.0) -> None:
        self.pool = pool
        self.hop = hop
        self.target = parseAuthority(target) if isinstance(target, str) else target
        self.request = request
        self.responseTimeout = responseTimeout

    def _headers(self, token: bytes | None = None) -> list[tuple[bytes, bytes]]:
        request = self.request
        hop = self.hop
        if hop.method == "post":
            host = hop.serverName or hop.host
            hostport = f"[{host}]:{hop.port}" if ":" in host else f"{host}:{hop.port}"
            headers = [
                (b":method", b"POST"),
                (b":scheme", b"http" if hop.tls == "none" else b"https"),
                (b":authority", hostport.encode("ascii")),
                (b":path", self.target.hbonePath().encode("ascii")),
                (b"content-type", b"application/octet-stream"),
            ]
        else:
            headers = [
                (b":method", b"CONNECT"),
                (b":authority", self.target.authority().encode("ascii")),
            ]
        if request is not None and request.source is not None:
            headers.append((b"forwarded", formatForwarded(*request.source).encode("ascii")))
        tp = request.traceparent if request is not None else newTraceparent()
        headers.append((b"traceparent", tp.encode("ascii")))
        if request is not None and request.baggage:
            headers.append((b"baggage", request.baggage.encode("latin-1")))
        # h2 sends both as never-indexed HPACK literals (h2.utilities.SECURE_HEADERS)
        if token is not None:
            headers.append((b"authorization", b"Bearer " + token))
        if hop.basicAuth is not None:
            user, password = hop.basicAuth
            credentials = base64.b64encode(f"{user}:{password}".encode("utf-8"))
            headers.append((b"proxy-authorization", b"Basic " + credentials))
        return headers

    def connect(self, protocolFactory) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory):
        clock = self.pool.reactor
        # read before connecting: a missing token fails the tunnel, not a connection
        token = readToken(self.hop.token) if self.hop.token is not None else None
        headers = self._headers(token)
        for attempt in (1, 2):
            conn = await self.pool.acquire(self.hop)
            conn.reserved -= 1
            try:
                stream, response = conn.openTunnel(headers, self.target.authority())
            except RefusedStream:
                if attempt == 2:
                    raise
                continue
            try:
                return await awaitTunnel(stream, response, protocolFactory, clock, self.responseTimeout,
                                         f"{self.hop}", self.target.authority())
            except RefusedStream:
                if attempt == 2:
                    raise
                continue
        raise HopUnreachable(f"{self.hop}: stream refused twice")  # pragma: no cover
