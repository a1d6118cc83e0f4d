"""H2R reverse tunnels (PROTOCOL §9, SECURITY S38-S44).

A node behind NAT dials a gateway on 15441 over mutual TLS offering ALPN ``h2r``;
after the handshake the HTTP/2 roles are reversed: the gateway is the HTTP/2 client
and opens a stream per tunnel, the node is the HTTP/2 server and serves it. The one
HTTP/2 protocol (:class:`hbone.h2.connection.HBoneH2Protocol`) takes its role as a
parameter, independent of the TLS role, so both sides are stock.

Gateway (``-L "h2r://0.0.0.0:15441?bind=laptop=spiffe://td/ns/default/sa/laptop"``):

* :class:`Registry`: name -> the SPIFFE IDs allowed to serve it (none by default), and
  the live registrations. A node registers for every name bound to its ID (or, if it
  sent one as SNI, for that one, which must be bound to it); otherwise it is refused
  before the gateway's preface and the refusal is logged with its ID and the name.
  Instances are keyed by (SPIFFE ID, SHA-256 of the leaf's SubjectPublicKeyInfo): the
  same key replaces the old connection (which finishes its streams and closes), a
  different key joins a pool of at most 8; a stream goes to the least-loaded one.
* :class:`RegistryDialer` wraps every dialer of the gateway process: a CONNECT host
  that is a bound name goes over a registered connection (waiting up to 5 s, at most
  64 waiting per name, for a node; then ``503 destination_unavailable``) and never to
  DNS; any other host goes to the wrapped dialer.

Node (``-L rtcp://laptop:22/127.0.0.1:22 -F "h2r://gw:15441?identity=..."``):

* :class:`ExportDialer`: the export table, (name, port) -> a local target, is the
  node's whole destination policy: anything else gets ``403`` and no socket is opened.
* :class:`ReverseConnector`: one connection per gateway, redialed with
  :class:`Backoff` (1 s doubling to 30 s, +-20 % jitter, reset once a registration
  stayed live 30 s; a refusal is retried at 30 s and logged as an error each time),
  driven by an injected clock; its state (connected, retrying in N s, refused
  because ...) is logged and emitted as :class:`H2RStatus` events.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hbone.address import Target, formatForwarded, newTraceparent, parseAuthority
from hbone.dialer import TunnelRequest
from hbone.errors import AccessDenied, HopUnreachable
from hbone.h2.connection import ConnectionSettings, HBoneH2Factory, HBoneH2Protocol
from hbone.identity import IdentityPattern
from hbone.interfaces import IDialer
from hbone.tlsio import TLSClientEndpoint

__all__ = ["ALPN_H2R", "Backoff", "Registry", "RegistryDialer", "ExportDialer", "ReverseConnector",
           "H2RStatus", "H2RRegistration", "H2RServerEndpoint", "parseBindings", "gatewayFactory"]

ALPN_H2R = b"h2r"
MAX_INSTANCES = 8
WAIT_FOR_NODE = 5.0
MAX_WAITING = 64


@dataclass(frozen=True)
class H2RStatus:
    """A node's view of one gateway: ``state`` is connected, retrying or refused."""

    gateway: str
    state: str
    detail: str
    retryIn: float | None


@dataclass(frozen=True)
class H2RRegistration:
    """A gateway's view: ``state`` is registered, replaced, lost or refused."""

    names: tuple[str, ...]
    identity: str
    state: str
    detail: str


def parseBindings(values) -> dict[str, tuple[IdentityPattern, ...]]:
    """``NAME=SPIFFEID`` entries (repeatable; a name may be bound to several IDs)."""
    out: dict[str, list[IdentityPattern]] = {}
    for value in values:
        name, eq, ident = value.partition("=")
        name = name.strip().lower()
        if not eq or not name or not ident.strip():
            raise ValueError(f"bind={value!r}: expected NAME=SPIFFEID, e.g. laptop=spiffe://td/ns/default/sa/laptop")
        try:
            parseAuthority(f"{name}:1")
        except ValueError:
            raise ValueError(f"bind={value!r}: {name!r} is not a host name") from None
        out.setdefault(name, []).append(IdentityPattern.parse(ident.strip()))
    return {k: tuple(v) for k, v in out.items()}


def _spkiHash(transport) -> str:
    try:
        cert = transport.getHandle().get_peer_certificate()
        spki = cert.to_cryptography().public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(spki).hexdigest()
    except Exception:
        return ""


# -- gateway ------------------------------------------------------------------------------


class Registry:
    """Bindings and live registrations, shared by every listener of the gateway process."""

    log = Logger(namespace="hbone.h2r")

    def __init__(self, clock, bindings=None, maxInstances: int = MAX_INSTANCES,
                 waitForNode: float = WAIT_FOR_NODE, maxWaiting: int = MAX_WAITING, events=None) -> None:
        self.clock = clock
        self.bindings: dict[str, tuple[IdentityPattern, ...]] = dict(bindings or {})
        self.maxInstances = maxInstances
        self.waitForNode = waitForNode
        self.maxWaiting = maxWaiting
        self.events = events
        self.instances: dict[str, list[tuple[tuple, HBoneH2Protocol]]] = {}  # name -> [(key, conn)]
        self._waiters: dict[str, list[defer.Deferred]] = {}

    def replaceBindings(self, bindings) -> list[str]:
        """A reload: use ``bindings`` from now on; registrations no longer bound get
        GOAWAY and close once their streams end. Returns the names dropped."""
        from hbone.identity import SpiffeId

        self.bindings = dict(bindings)
        dropped = []
        for name, entries in list(self.instances.items()):
            for key, conn in list(entries):
                ids = self.bindings.get(name, ())
                if not any(p.matches(SpiffeId.parse(key[0])) for p in ids):
                    entries.remove((key, conn))
                    dropped.append(name)
                    conn._setGoingAway()
                    conn.goAway()
                    if not conn.streams:
                        conn.loseConnection()
                    self.log.info("H2R: {identity} no longer serves {name}: unbound by a reload",
                                  identity=key[0], name=name)
                    self._emit([name], key[0], "lost", "unbound by a reload")
        return dropped

    def isBound(self, name: str) -> bool:
        return name.lower() in self.bindings

    def namesFor(self, peerId, sniName: str | None) -> tuple[list[str], str | None]:
        """The names ``peerId`` may register, or ([], why not)."""
        names = [n for n, ids in self.bindings.items() if any(p.matches(peerId) for p in ids)]
        if sniName:
            sniName = sniName.lower()
            if sniName not in names:
                owner = "bound to another identity" if sniName in self.bindings else "not bound here"
                return [], f"{peerId} asked for {sniName!r}, which is {owner}"
            return [sniName], None
        if not names:
            return [], f"no name is bound to {peerId}"
        return names, None

    def _emit(self, names, identity, state, detail) -> None:
        if self.events is not None:
            self.events.emit(H2RRegistration(tuple(names), str(identity), state, detail))

    def refuse(self, peerId, why: str) -> None:
        self.log.error("H2R registration refused: {why}", why=why)
        self._emit((), peerId, "refused", why)

    def register(self, conn: HBoneH2Protocol, names: list[str], key: tuple) -> str | None:
        """Add ``conn`` for ``names``; returns why it was refused, or None."""
        for name in names:
            others = [(k, c) for k, c in self.instances.get(name, []) if k != key and not c.closed]
            if len(others) >= self.maxInstances:
                why = f"{key[0]} already has {len(others)} instances for {name!r} (the limit)"
                self.refuse(key[0], why)
                return why
        for name in names:
            entries = self.instances.setdefault(name, [])
            for k, old in list(entries):
                if k == key:  # the same instance reconnected: the new one replaces it
                    entries.remove((k, old))
                    old._setGoingAway()
                    if not old.streams:
                        old.loseConnection()
                    self._emit([name], key[0], "replaced", "the same instance reconnected")
            entries.append((key, conn))
            for d in self._waiters.pop(name, []):
                if not d.called:
                    d.callback(None)
        self.log.info("H2R: {identity} registered for {names}", identity=str(key[0]), names=", ".join(names))
        self._emit(names, key[0], "registered", "")
        return None

    def unregister(self, conn: HBoneH2Protocol, why: str = "connection closed") -> None:
        for name, entries in list(self.instances.items()):
            for k, c in list(entries):
                if c is conn:
                    entries.remove((k, c))
                    self.log.info("H2R: {identity} no longer serves {name}: {why}",
                                  identity=str(k[0]), name=name, why=why)
                    self._emit([name], k[0], "lost", why)

    def live(self, name: str) -> list[HBoneH2Protocol]:
        return [c for _, c in self.instances.get(name.lower(), []) if c.ready and not c.closed and not c.goingAway]

    async def connectionFor(self, name: str) -> HBoneH2Protocol:
        """The least-loaded live connection for ``name``; waits for a node up to
        ``waitForNode`` seconds (``maxWaiting`` requests at most), then 503."""
        name = name.lower()
        deadline = self.clock.seconds() + self.waitForNode
        while True:
            conns = [c for c in self.live(name) if c.capacity > 0]
            if conns:
                return min(conns, key=lambda c: len(c.streams))
            left = deadline - self.clock.seconds()
            waiting = self._waiters.setdefault(name, [])
            if left <= 0 or len(waiting) >= self.maxWaiting:
                raise HopUnreachable(f"no node serves {name} now", 503, "destination_unavailable")
            d = defer.Deferred()
            waiting.append(d)
            timer = self.clock.callLater(left, lambda: d.called or d.callback(None))
            try:
                await d
            finally:
                if timer.active():
                    timer.cancel()
                if d in waiting:
                    waiting.remove(d)


class _GatewayProtocol(HBoneH2Protocol):
    """An accepted H2R connection: TLS server, HTTP/2 client. Registration is checked
    before our preface goes out (a refusal closes without an HTTP/2 byte)."""

    registry: Registry = None  # set by the factory

    def _startH2(self) -> None:
        sni = None
        try:
            raw = self.transport.getHandle().get_servername()
            sni = raw.decode("ascii") if raw else None
        except Exception:
            pass
        names, why = self.registry.namesFor(self.peerIdentity, sni)
        if not names:
            self.registry.refuse(self.peerIdentity, why)
            self._failure = None
            self.transport.abortConnection()
            return
        self._names = names
        super()._startH2()
        self.whenReady().addCallbacks(self._ready, lambda f: None)

    def _ready(self, _) -> None:
        key = (str(self.peerIdentity), _spkiHash(self.transport))
        why = self.registry.register(self, self._names, key)
        if why is not None:
            self.goAway()
            self.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if getattr(self, "_names", None):
            self.registry.unregister(self, reason.getErrorMessage())
        super().connectionLost(reason)


class _GatewayH2Factory(HBoneH2Factory):
    protocol = _GatewayProtocol

    def __init__(self, registry: Registry, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.registry = registry

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.registry = self.registry
        return p


def gatewayFactory(reactor, identity, registry: Registry, settings: ConnectionSettings = ConnectionSettings(),
                   events=None, name: str = "h2r"):
    """The protocol factory of an ``h2r`` listener (TLS server, ALPN ``h2r``)."""
    from hbone.limits import GatedTLSMemoryBIOFactory, ListenerGate

    gate = ListenerGate(settings.maxHandshakesPerListener, settings.maxConnectionsPerListener)
    inner = _GatewayH2Factory(registry, "client", reactor, settings, None, ALPN_H2R, identity.localId, name,
                              gate=gate, events=events)
    return GatedTLSMemoryBIOFactory(identity.serverCreator(ALPN_H2R), False, inner, gate, clock=reactor)


class _H2REndpoint:
    def __init__(self, registry: Registry, request: TunnelRequest, responseTimeout: float = 15.0) -> None:
        self.registry = registry
        self.request = request
        self.responseTimeout = responseTimeout

    def connect(self, protocolFactory) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory):
        from hbone.h2.client import awaitTunnel

        target = self.request.target
        conn = await self.registry.connectionFor(target.host)
        headers = [(b":method", b"CONNECT"), (b":authority", target.authority().encode("ascii"))]
        if self.request.source is not None:
            headers.append((b"forwarded", formatForwarded(*self.request.source).encode("ascii")))
        headers.append((b"traceparent", (self.request.traceparent or newTraceparent()).encode("ascii")))
        stream, response = conn.openTunnel(headers, target.authority())
        return await awaitTunnel(stream, response, protocolFactory, self.registry.clock, self.responseTimeout,
                                 f"H2R node {conn.peerIdentity}", target.authority())


@implementer(IDialer)
class RegistryDialer:
    """A bound name goes over its node's connection, never to DNS; the rest to ``inner``."""

    def __init__(self, registry: Registry, inner) -> None:
        self.registry = registry
        self.inner = inner

    def dial(self, request: TunnelRequest) -> defer.Deferred:
        if self.registry.isBound(request.target.host):
            return defer.succeed(_H2REndpoint(self.registry, request))
        return self.inner.dial(request)

    def __getattr__(self, name):  # connectTimeout and the like, for reloads
        return getattr(self.inner, name)


# -- node ------------------------------------------------------------------------------------


@implementer(IDialer)
class ExportDialer:
    """The node's export table, (name, port) -> target: its whole destination policy."""

    def __init__(self, reactor, exports: dict[tuple[str, int], Target], connectTimeout: float = 10.0) -> None:
        self.reactor = reactor
        self.exports = {(n.lower(), p): t for (n, p), t in exports.items()}
        self.connectTimeout = connectTimeout

    def dial(self, request: TunnelRequest) -> defer.Deferred:
        from hbone.chain import tcpEndpoint

        key = (request.target.host.lower(), request.target.port)
        target = self.exports.get(key)
        if target is None:
            return defer.fail(AccessDenied(f"{request.target.authority()} is not exported by this node"))
        return defer.succeed(tcpEndpoint(self.reactor, target.host, target.port, self.connectTimeout))


class Backoff:
    """PROTOCOL §9: 1 s doubling to 30 s, +-20 % jitter; reset after 30 s live."""

    def __init__(self, initial: float = 1.0, cap: float = 30.0, jitter: float = 0.2, resetAfter: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self.resetAfter = resetAfter
        self.rng = rng or random.Random()
        self._base = initial

    def _jittered(self, base: float) -> float:
        return base * (1 + self.rng.uniform(-self.jitter, self.jitter))

    def failure(self) -> float:
        """The delay before the next attempt after a failure."""
        base = self._base
        self._base = min(self.cap, self._base * 2)
        return self._jittered(base)

    def refused(self) -> float:
        """A refusal is retried at the cap interval."""
        self._base = self.cap
        return self._jittered(self.cap)

    def lost(self, liveFor: float) -> float:
        """A live registration ended after ``liveFor`` seconds."""
        if liveFor >= self.resetAfter:
            self._base = self.initial
        return self.failure()


class ReverseConnector(Service):
    """Keeps one registration with one gateway (PROTOCOL §9 "Reconnect")."""

    log = Logger(namespace="hbone.h2r")

    def __init__(self, reactor, identity, host: str, port: int, identities, tunnelServer,
                 settings: ConnectionSettings = ConnectionSettings(), events=None, backoff: Backoff | None = None,
                 connectTimeout: float = 10.0, name: str = "hbone", endpointFactory=None,
                 names: tuple[str, ...] = ()) -> None:
        self.names = tuple(names)  # the names this node exports (for the log)
        self.reactor = reactor
        self.identity = identity
        self.host = host
        self.port = port
        self.identities = identities
        self.tunnelServer = tunnelServer
        self.settings = settings
        self.events = events
        self.backoff = backoff or Backoff()
        self.connectTimeout = connectTimeout
        self.nodeName = name
        self.endpointFactory = endpointFactory  # tests: (host, port) -> a TCP endpoint
        self.conn: HBoneH2Protocol | None = None
        self.state = "idle"
        self._timer = None
        self._attempt = None
        self._liveSince: float | None = None
        self.gateway = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    def _status(self, state: str, detail: str, retryIn: float | None = None) -> None:
        self.state = state
        if state == "refused":
            self.log.error("H2R gateway {gw} refused us ({identity}, for {names}): {detail}; retrying in {t:.1f}s",
                           gw=self.gateway, identity=str(self.identity.localId),
                           names=", ".join(self.names) or "any name bound to us", detail=detail, t=retryIn)
        elif state == "retrying":
            self.log.info("H2R gateway {gw}: {detail}; retrying in {t:.1f}s", gw=self.gateway, detail=detail,
                          t=retryIn)
        else:
            self.log.info("H2R gateway {gw}: {state}{detail}", gw=self.gateway, state=state,
                          detail=f" ({detail})" if detail else "")
        if self.events is not None:
            self.events.emit(H2RStatus(self.gateway, state, detail, retryIn))

    def startService(self) -> None:
        super().startService()
        self._dial()

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._attempt is not None and not self._attempt.called:
            self._attempt.cancel()
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            d = defer.Deferred()
            previous = conn.onClosed
            conn.onClosed = lambda c, r: (previous and previous(c, r), d.called or d.callback(None))
            conn.goAway()
            conn.loseConnection()
            return d
        return None

    def _tcp(self):
        if self.endpointFactory is not None:
            return self.endpointFactory(self.host, self.port)
        if ":" in self.host:
            return TCP6ClientEndpoint(self.reactor, self.host, self.port, timeout=self.connectTimeout)
        if all(p.isdigit() for p in self.host.split(".")):
            return TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=self.connectTimeout)
        return HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.connectTimeout)

    def _dial(self) -> None:
        self._timer = None
        if not self.running:
            return
        self._attempt = defer.Deferred.fromCoroutine(self._connect())
        self._attempt.addErrback(self._failed)

    async def _connect(self):
        creator = self.identity.clientCreator(self.identities, ALPN_H2R)
        factory = HBoneH2Factory("server", self.reactor, self.settings, self.tunnelServer, ALPN_H2R,
                                 self.identity.localId, self.nodeName, events=self.events)
        conn = await TLSClientEndpoint(creator, self._tcp(), self.reactor).connect(factory)
        try:
            await conn.whenReady()
        except BaseException:
            if not conn.closed and conn.transport is not None:
                conn.transport.abortConnection()
            raise
        self.conn = conn
        self._liveSince = self.reactor.seconds()
        conn.onClosed = self._lost
        self._status("connected", f"as {self.identity.localId}")

    def _failed(self, failure) -> None:
        if failure.check(defer.CancelledError) or not self.running:
            return
        from hbone.errors import HopIdentityError

        message = failure.getErrorMessage()
        refused = failure.check(HopIdentityError) or "before its HTTP/2 SETTINGS" in message
        if refused:
            delay = self.backoff.refused()
            self._status("refused", message, delay)
        else:
            delay = self.backoff.failure()
            self._status("retrying", message, delay)
        self._timer = self.reactor.callLater(delay, self._dial)

    def _lost(self, conn, reason) -> None:
        if self.conn is conn:
            self.conn = None
        if not self.running:
            return
        liveFor = self.reactor.seconds() - (self._liveSince or self.reactor.seconds())
        delay = self.backoff.lost(liveFor)
        self._status("retrying", f"connection lost after {liveFor:.0f}s: {reason.getErrorMessage()}", delay)
        self._timer = self.reactor.callLater(delay, self._dial)


# -- the h2r: server endpoint (embedding) ---------------------------------------------------


class _FactoryStreams:
    """A node's stream handler that hands each exported stream to a Twisted factory
    (no socket: the stream is the transport)."""

    log = Logger(namespace="hbone.h2r")

    def __init__(self, exports, factory, events=None) -> None:
        self.exports = {(n.lower(), p) for n, p in exports}
        self.factory = factory
        self.events = events

    def __call__(self, stream, headers) -> None:
        from hbone.errors import RequestError
        from hbone.h2.server import parseTunnelRequest

        conn = stream.connection
        try:
            parsed = parseTunnelRequest(headers)
            if parsed.form != "connect":
                raise RequestError("only CONNECT is served on a reverse (H2R) connection")
        except RequestError as e:
            self.log.info("H2R stream refused: 400 {reason}", reason=str(e))
            conn.respond(stream, 400, error="http_request_error")
            return
        target = parsed.target
        if (target.host.lower(), target.port) not in self.exports:
            self.log.info("H2R stream refused: 403 {target} is not exported", target=target.authority())
            conn.respond(stream, 403, error="http_request_denied")
            return
        protocol = self.factory.buildProtocol(stream.getPeer())
        if protocol is None:
            conn.respond(stream, 503, error="destination_unavailable")
            return
        stream.authority = target.authority()
        conn.respond(stream, 200)
        stream.makeConnection(protocol)


class _H2RPort:
    """What ``H2RServerEndpoint.listen`` returns: ``stopListening`` ends the registrations."""

    def __init__(self, connectors, factory) -> None:
        self.connectors = connectors
        self.factory = factory

    def getHost(self):
        return self.connectors[0].gateway if self.connectors else None

    def stopListening(self) -> defer.Deferred:
        ds = [defer.maybeDeferred(c.stopService) for c in self.connectors if c.running]
        self.factory.doStop()
        return defer.DeferredList(ds)


@implementer(IStreamServerEndpoint)
class H2RServerEndpoint:
    """``listen(factory)`` registers with the gateway(s) and serves every stream the
    gateway opens for an exported (name, port) with ``factory``'s protocol; any
    Twisted server can be reached through the gateway without opening a port."""

    def __init__(self, reactor, identity, gateways, identities, exports, settings=ConnectionSettings(),
                 events=None, name: str = "hbone") -> None:
        self.reactor = reactor
        self.identity = identity
        self.gateways = list(gateways)
        self.identities = identities
        self.exports = list(exports)
        self.settings = settings
        self.events = events
        self.name = name

    def listen(self, protocolFactory) -> defer.Deferred:
        protocolFactory.doStart()
        handler = _FactoryStreams(self.exports, protocolFactory, self.events)
        connectors = []
        for host, port in self.gateways:
            c = ReverseConnector(self.reactor, self.identity, host, port, self.identities, handler, self.settings,
                                 self.events, name=self.name)
            c.startService()
            connectors.append(c)
        return defer.succeed(_H2RPort(connectors, protocolFactory))
