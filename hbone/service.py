"""A node: shared state on one reactor, and its listeners as services.

:class:`NodeSpec` is what the command line (and, later, the config file) compile
into; :class:`Node` builds everything from it: the identity, the destination
policy, the pool, the tunnel tracker, one dialer for the listeners (direct TCP, or
the ``-F`` hop), and a listener service per ``-L``. A listener that cannot bind
fails the start with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from hbone.chain import ChainDialer
from hbone.dialer import DirectDialer
from hbone.events import Events, LogObserver
from hbone.h2.client import Pool
from hbone.h2.connection import ConnectionSettings
from hbone.h2.server import TunnelServer, hboneServerFactory
from hbone.policy import DestinationPolicy, PeerAuthorizer, ReactorResolver, parseAllowEntry
from hbone.proxy.tcp import TCPForwardFactory
from hbone.limits import LimitedServerEndpoint, ProcessLimits
from hbone.rules import RuleSet
from hbone.splice import TunnelTracker
from hbone.urls import PROXY_LISTENERS, HopSpec, ListenerSpec

__all__ = ["NodeSpec", "Node", "ListenError", "NodeConfigError"]


class NodeConfigError(ValueError):
    """A node that cannot be built as specified; the message says what to change."""


class ListenError(Exception):
    """A listener that could not bind; the message names it."""


@dataclass(frozen=True)
class NodeSpec:
    listeners: tuple[ListenerSpec, ...] = ()
    hops: tuple[HopSpec, ...] = ()
    identity: object | None = None  # hbone.tls.Identity
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    allowPeers: tuple[str, ...] = ()
    rules: tuple = ()  # hbone.rules.Rule, per-stream authorization on HBONE listeners
    name: str = "hbone"
    connectTimeout: float = 10.0
    idleTimeout: float = 3600.0
    settings: ConnectionSettings = field(default_factory=ConnectionSettings)


class _ListenerService(Service):
    log = Logger()

    def __init__(self, spec: ListenerSpec, endpoint, factory, onBound) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.factory = factory
        self.onBound = onBound
        self.port = None
        self.setName(str(spec))

    def listen(self) -> defer.Deferred:
        if self.port is not None:
            return defer.succeed(self.port)
        d = self.endpoint.listen(self.factory)

        def bound(port):
            self.port = port
            self.onBound(self, port)
            return port

        def failed(f):
            raise ListenError(f"-L {self.spec}: cannot listen on {self.spec.host}:{self.spec.port}: {f.getErrorMessage()}")

        return d.addCallbacks(bound, failed)

    def stopService(self):
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)


class Node(MultiService):
    """Everything one hbone process runs, built from a :class:`NodeSpec`.

    Shared state, passed by constructor to whoever needs it: ``identity``,
    ``policy`` (destinations), ``authorizer`` (peer identities), ``pool``
    (outbound HBONE connections), ``tracker`` (live tunnels), ``events`` (the
    fan-out; the log subscribes to it, and so can an embedding program).
    """

    log = Logger()

    def __init__(self, reactor, spec: NodeSpec, events: Events | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.spec = spec
        chains = [spec.hops] + [l.chain for l in spec.listeners if l.chain]
        needsIdentity = any(l.scheme == "hbone" for l in spec.listeners) or any(
            h.scheme == "hbone" and h.option("tls", "mtls") == "mtls" for c in chains for h in c
        )
        if needsIdentity and spec.identity is None:
            raise NodeConfigError(
                "an hbone listener or a mutual-TLS hbone hop needs an identity: --certs DIR "
                "(cert-chain.pem, key.pem, root-cert.pem) or --cert/--key/--ca"
            )
        if spec.identity is None and any(l.scheme == "h2c" and l.option("insecure") not in ("1", "true", "yes")
                                         for l in spec.listeners) and not spec.allowPeers:
            raise NodeConfigError(
                "an h2c listener decides who may connect by identity: give --certs (peers of our "
                "trust domain and namespace are allowed) or --allow-peer spiffe://td/ns/N/*"
            )
        self.identity = spec.identity
        try:
            allow = [parseAllowEntry(a) for a in spec.allow]
        except ValueError as e:
            raise NodeConfigError(f"--allow: {e}") from None
        try:
            deny = [parseAllowEntry(a) for a in spec.deny]
        except ValueError as e:
            raise NodeConfigError(f"--deny: {e}") from None
        self.policy = DestinationPolicy(allow, deny=deny)
        try:
            self.authorizer = (
                PeerAuthorizer(self.identity.localId if self.identity is not None else None, spec.allowPeers)
                if self.identity is not None or spec.allowPeers else None
            )
        except ValueError as e:
            raise NodeConfigError(f"--allow-peer: {e}") from None
        self.rules = RuleSet(spec.rules)
        self.processLimits = ProcessLimits()
        self.events = events if events is not None else Events()
        self.events.subscribe(LogObserver())
        self.tracker = TunnelTracker(reactor, spec.idleTimeout, events=self.events)
        self.pool = Pool(reactor, self.identity, spec.settings, spec.connectTimeout, spec.name)
        self._dialers: dict = {}
        self.dialer = self._dialerFor(spec.hops)
        self.listeners: list[_ListenerService] = []
        for listener in spec.listeners:
            self.listeners.append(self._buildListener(listener))
        for service in self.listeners:
            service.setServiceParent(self)

    def _dialerFor(self, hops):
        """One dialer per distinct chain: direct TCP (with policy) when empty."""
        hops = tuple(hops or ())
        dialer = self._dialers.get(hops)
        if dialer is None:
            if hops:
                try:
                    dialer = ChainDialer(self.reactor, hops, self.pool, self.spec.connectTimeout)
                except ValueError as e:
                    raise NodeConfigError(str(e)) from None
            else:
                dialer = DirectDialer(self.reactor, self.policy, ReactorResolver(self.reactor),
                                      self.spec.connectTimeout)
            self._dialers[hops] = dialer
        return dialer

    def _endpoint(self, spec: ListenerSpec):
        return LimitedServerEndpoint(self.reactor, spec.port, backlog=1024, interface=spec.host)

    def _buildListener(self, spec: ListenerSpec) -> _ListenerService:
        dialer = self._dialerFor(spec.chain) if spec.chain is not None else self.dialer
        name = str(spec)
        if spec.scheme == "hbone":
            server = TunnelServer(self.reactor, dialer, self.authorizer, self.tracker,
                                  name=self.spec.name, rules=self.rules, limits=self.processLimits)
            factory = hboneServerFactory(self.reactor, self.identity, server, self.spec.settings,
                                         self.processLimits)
        elif spec.scheme == "h2c":
            factory = self._h2cFactory(spec, dialer)
        elif spec.scheme == "tcp":
            factory = TCPForwardFactory(spec.target, dialer, self.tracker, self.reactor, name=name)
        elif spec.scheme in PROXY_LISTENERS:
            factory = self._proxyFactory(spec, dialer)
        else:  # pragma: no cover - urls.py refuses the rest
            raise NodeConfigError(f"-L {spec}: unsupported scheme {spec.scheme}")
        return _ListenerService(spec, self._endpoint(spec), factory, self._bound)

    def _proxyFactory(self, spec: ListenerSpec, dialer):
        from hbone.proxy.auto import AutoProxyFactory
        from hbone.proxy.http import HTTPProxyFactory, checkBindSafety
        from hbone.proxy.socks import SOCKSProxyFactory

        try:
            checkBindSafety(spec.scheme, spec.host, spec.credentials)
        except ValueError as e:
            raise NodeConfigError(f"-L {spec}: {e}") from None
        cls = {"http": HTTPProxyFactory, "auto": AutoProxyFactory}.get(spec.scheme, SOCKSProxyFactory)
        return cls(dialer, self.tracker, self.reactor, credentials=spec.credentials, name=str(spec))

    def _h2cFactory(self, spec: ListenerSpec, dialer):
        from hbone.h2.server import checkH2cSafety, h2cServerFactory
        from hbone.jwt import JWKSVerifier

        jwks = spec.option("jwks")
        insecure = spec.option("insecure") in ("1", "true", "yes")
        try:
            verifier = JWKSVerifier(
                jwks, spec.option("audience"), self.reactor,
                trustDomain=self.identity.trustDomain if self.identity is not None else None,
            ) if jwks else None
            checkH2cSafety(spec.host, verifier, insecure)
        except (ValueError, OSError) as e:
            raise NodeConfigError(f"-L {spec}: {e}") from None
        server = TunnelServer(self.reactor, dialer, self.authorizer, self.tracker, name=self.spec.name,
                              rules=self.rules, limits=self.processLimits)
        return h2cServerFactory(self.reactor, server, self.spec.settings, verifier, insecure)

    def _bound(self, service: _ListenerService, port) -> None:
        address = port.getHost()
        # our own listening ports are never a tunnel destination (SECURITY §4.1)
        self.policy.addOwnPort(address.port)
        self.log.info("listening: {scheme} on {host}:{port}", scheme=service.spec.scheme,
                      host=address.host, port=address.port)

    def startListening(self) -> defer.Deferred:
        """Bind every listener; fails with :class:`ListenError` on the first that
        cannot bind (and closes the ones already bound)."""

        async def go():
            try:
                for service in self.listeners:
                    await service.listen()
            except Exception:
                for service in self.listeners:
                    if service.port is not None:
                        await defer.maybeDeferred(service.port.stopListening)
                        service.port = None
                raise

        return defer.Deferred.fromCoroutine(go())

    def _bindNow(self) -> None:
        """Bind what is not bound yet; raise :class:`ListenError` if a listener
        cannot bind (TCP ``listen()`` answers synchronously)."""
        failures = []
        self.startListening().addErrback(failures.append)
        if failures:
            raise failures[0].value

    def privilegedStartService(self) -> None:
        """Under twistd: bind here (before privileges are dropped), and stop the
        start if a listener cannot bind."""
        self._bindNow()
        super().privilegedStartService()

    def startService(self) -> None:
        """Binds any listener not bound yet (a node added to a running parent), then
        starts; ``await startListening()`` first to handle a bind error yourself."""
        self._bindNow()
        super().startService()

    def boundPorts(self) -> dict[str, int]:
        return {str(s.spec): s.port.getHost().port for s in self.listeners if s.port is not None}

    def stopService(self):
        d = defer.maybeDeferred(super().stopService)

        def after(_):
            self.tracker.abortAll("node stopping")
            self.tracker.stop()
            if self.pool is not None:
                return self.pool.closeAll()

        return d.addCallback(after)


