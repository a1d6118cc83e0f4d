"""A node: shared state on one reactor, and its listeners as services.

:class:`NodeSpec` is what the command line (and, later, the config file) compile
into; :class:`Node` builds everything from it: the identity, the destination
policy, the pool, the tunnel tracker, one dialer for the listeners (direct TCP, or
the ``-F`` hop), and a listener service per ``-L``. A listener that cannot bind
fails the start with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

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
    drainTimeout: float = 5.0  # SIGTERM / stopService: live tunnels get this long to finish
    certCheckInterval: float = 5.0  # seconds between looks at the certificate files; 0: never
    reusePort: bool = False  # SO_REUSEPORT on every listener (worker processes, hbone --workers)
    routes: tuple = ()  # hbone.sni.Route: the SNI listeners' route tables
    h2rBindings: tuple[str, ...] = ()  # gateway: NAME=SPIFFEID (besides ?bind= on h2r listeners)
    exports: tuple = ()  # node: (name, port, Target) (besides rtcp:// listeners)
    gateways: tuple = ()  # node: h2r HopSpecs (besides h2r:// hops in ``hops``)
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

    def stopListening(self) -> defer.Deferred:
        """Close the listening port (idempotent); live connections are untouched."""
        if self.port is None:
            return defer.succeed(None)
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)

    def stopService(self):
        Service.stopService(self)
        return self.stopListening()


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
        gateways = tuple(spec.gateways) + tuple(h for h in spec.hops if h.scheme == "h2r")
        if gateways:  # h2r hops are where this node registers, not a chain
            spec = replace(spec, hops=tuple(h for h in spec.hops if h.scheme != "h2r"))
            self.spec = spec
        exports = list(spec.exports) + [(l.host, l.port, l.target) for l in spec.listeners if l.scheme == "rtcp"]
        if exports and not gateways:
            raise NodeConfigError("rtcp exports need a gateway to register with: -F h2r://gw:15441?identity=...")
        if gateways and not exports:
            raise NodeConfigError("-F h2r://... registers this node with a gateway, but nothing is exported: "
                                  "add -L rtcp://NAME:PORT/TARGET")
        chains = [spec.hops] + [l.chain for l in spec.listeners if l.chain]
        needsIdentity = any(l.scheme in ("hbone", "h2r") for l in spec.listeners) or bool(gateways) or any(
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
        self.pool.events = self.events
        self.metrics = None  # hbone.metrics.NodeMetrics, once enableMetrics() (an admin listener) made it
        self.readinessChecks: dict = {}  # name -> () -> (ok, detail), for /readyz
        # H2R gateway: one registry for every listener of this process (PROTOCOL §9)
        self.registry = None
        bindings = list(spec.h2rBindings) + [v for l in spec.listeners if l.scheme == "h2r"
                                             for k, v in l.options if k == "bind"]
        if any(l.scheme == "h2r" for l in spec.listeners) or bindings:
            from hbone.h2r import Registry, parseBindings

            try:
                self.registry = Registry(reactor, parseBindings(bindings), events=self.events)
            except ValueError as e:
                raise NodeConfigError(f"h2r bindings: {e}") from None
            self.readinessChecks["h2r"] = lambda: (True, f"{sum(len(self.registry.live(n)) for n in self.registry.bindings)} "
                                                         f"registrations for {len(self.registry.bindings)} bound names")
        self.certWatcher = None
        if self.identity is not None and getattr(self.identity, "files", None) is not None:
            from hbone.certwatch import IdentityWatcher

            self.certWatcher = IdentityWatcher(reactor, self.identity, spec.certCheckInterval, self.events)
        self._dialers: dict = {}
        self.dialer = self._dialerFor(spec.hops)
        self.listeners: list[_ListenerService] = []
        self.h2Factories: list = []  # the HTTP/2 server factories of the listeners (drain)
        self.reloadHooks: list = [self._reloadRoutes, self._reloadBindings]  # (NodeSpec) -> what changed
        self._routers: list = []  # (ListenerSpec, hbone.sni.Router) of the sni listeners
        self._drainWaiters: list[defer.Deferred] = []
        self._drainSummary: dict | None = None
        self._drainNow = None  # set while draining: ends the wait at once
        for listener in spec.listeners:
            if listener.scheme != "rtcp":  # an export, not a port
                self.listeners.append(self._buildListener(listener))
        for service in self.listeners:
            service.setServiceParent(self)
        self.connectors: list = []  # H2R node: one ReverseConnector per gateway
        if gateways:
            self._buildConnectors(gateways, exports)

    def _buildConnectors(self, gateways, exports) -> None:
        from hbone.h2r import ExportDialer, ReverseConnector

        dialer = ExportDialer(self.reactor, {(n, p): t for n, p, t in exports}, self.spec.connectTimeout)
        server = TunnelServer(self.reactor, dialer, None, self.tracker, name=self.spec.name,
                              limits=self.processLimits, connectOnly=True)
        for hop in gateways:
            for host, port in hop.nodes or ((hop.host, hop.port),):
                connector = ReverseConnector(self.reactor, self.identity, host, port, hop.identities, server,
                                             self.spec.settings, self.events, connectTimeout=self.spec.connectTimeout,
                                             name=self.spec.name,
                                             names=tuple(sorted({f"{n}:{p}" for n, p, _ in exports})))
                connector.setServiceParent(self)
                self.connectors.append(connector)
        self.readinessChecks["h2r"] = lambda: (
            all(c.state == "connected" for c in self.connectors),
            "; ".join(f"{c.gateway}: {c.state}" for c in self.connectors))

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
            if self.registry is not None:  # a bound name never falls through to DNS
                from hbone.h2r import RegistryDialer

                dialer = RegistryDialer(self.registry, dialer)
            self._dialers[hops] = dialer
        return dialer

    def _endpoint(self, spec: ListenerSpec):
        return LimitedServerEndpoint(self.reactor, spec.port, backlog=1024, interface=spec.host,
                                     reusePort=self.spec.reusePort)

    def _buildListener(self, spec: ListenerSpec) -> _ListenerService:
        dialer = self._dialerFor(spec.chain) if spec.chain is not None else self.dialer
        name = str(spec)
        if spec.scheme == "hbone":
            server = TunnelServer(self.reactor, dialer, self.authorizer, self.tracker,
                                  name=self.spec.name, rules=self.rules, limits=self.processLimits)
            factory = hboneServerFactory(self.reactor, self.identity, server, self.spec.settings,
                                         self.processLimits, events=self.events)
        elif spec.scheme == "h2c":
            factory = self._h2cFactory(spec, dialer)
        elif spec.scheme == "tcp":
            factory = TCPForwardFactory(spec.target, dialer, self.tracker, self.reactor, name=name)
        elif spec.scheme == "sni":
            factory = self._sniFactory(spec, dialer)
        elif spec.scheme == "admin":
            from hbone.admin import adminSite

            factory = adminSite(self)
        elif spec.scheme == "h2r":
            from hbone.h2r import gatewayFactory

            factory = gatewayFactory(self.reactor, self.identity, self.registry, self.spec.settings,
                                     events=self.events, name=self.spec.name)
        elif spec.scheme in PROXY_LISTENERS:
            factory = self._proxyFactory(spec, dialer)
        else:  # pragma: no cover - urls.py refuses the rest
            raise NodeConfigError(f"-L {spec}: unsupported scheme {spec.scheme}")
        h2 = _h2FactoryOf(factory)
        if h2 is not None:
            self.h2Factories.append(h2)
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

    def _sniFactory(self, spec: ListenerSpec, dialer):
        from hbone.sni import Router, SNIGatewayFactory

        chain = spec.chain if spec.chain is not None else self.spec.hops

        def dialerFor(hops):
            return dialer if hops is None else self._dialerFor(hops)

        router = Router(self._routesFor(spec, self.spec.routes), dialerFor, implicitChain=bool(chain))
        self._routers.append((spec, router))
        settings = self.spec.settings
        return SNIGatewayFactory(router, self.tracker, self.reactor, name=str(spec),
                                 peekTimeout=settings.sniPeekTimeout, maxPeeking=settings.sniMaxPeeking)

    @staticmethod
    def _routesFor(spec: ListenerSpec, routes) -> tuple:
        return tuple(r for r in routes if r.listener is None or r.listener == spec.name)

    def _reloadRoutes(self, spec: NodeSpec) -> list[str]:
        if spec.routes == self.spec.routes:
            return []
        for listener, router in self._routers:
            router.replace(self._routesFor(listener, spec.routes))
        return ["routes"]

    def _reloadBindings(self, spec: NodeSpec) -> list[str]:
        if self.registry is None or spec.h2rBindings == self.spec.h2rBindings:
            return []
        from hbone.h2r import parseBindings

        listenerBinds = [v for l in self.spec.listeners if l.scheme == "h2r" for k, v in l.options if k == "bind"]
        self.registry.replaceBindings(parseBindings(list(spec.h2rBindings) + listenerBinds))
        return ["h2r bindings"]

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
        factory = h2cServerFactory(self.reactor, server, self.spec.settings, verifier, insecure)
        factory.events = self.events
        return factory

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
        if self.certWatcher is not None:
            self.certWatcher.start()

    def boundPorts(self) -> dict[str, int]:
        return {str(s.spec): s.port.getHost().port for s in self.listeners if s.port is not None}

    # -- reload (SIGHUP) -------------------------------------------------------

    def reload(self, spec: NodeSpec, source: str = "<spec>") -> dict:
        """Apply what can change without a restart: the destination policy (allow,
        deny), ``allow_peers``, per-stream rules, timeouts, and whatever the
        ``reloadHooks`` apply (routes, bindings). Live tunnels that the new
        configuration no longer allows are reset (RST_STREAM(CANCEL)) at once;
        the rest are untouched. Listeners, chains and the identity files need a
        restart (certificates rotate on their own: :class:`hbone.certwatch.IdentityWatcher`).

        :raises NodeConfigError: ``spec`` does not validate; nothing was changed.
        :returns: ``{"changed": [...], "ignored": [...], "reset": n}``
        """
        from hbone.events import ConfigReloaded

        old = self.spec
        try:
            allow = [parseAllowEntry(a) for a in spec.allow]
            deny = [parseAllowEntry(a) for a in spec.deny]
        except ValueError as e:
            raise NodeConfigError(f"allow/deny: {e}") from None
        if spec.allowPeers != old.allowPeers and self.authorizer is None:
            raise NodeConfigError("allow_peers: this node started without peer authorization "
                                  "(no identity); restart to add it")
        if self.authorizer is not None:
            try:
                PeerAuthorizer.checkEntries(spec.allowPeers)
            except ValueError as e:
                raise NodeConfigError(f"allow_peers: {e}") from None
        changed, ignored = [], []
        if (spec.allow, spec.deny) != (old.allow, old.deny):
            self.policy.replaceEntries(allow, deny)
            changed.append("allow/deny")
        if spec.allowPeers != old.allowPeers:
            self.authorizer.replaceEntries(spec.allowPeers)
            changed.append("allow_peers")
        if spec.rules != old.rules:
            self.rules.replace(spec.rules)
            changed.append("rules")
        if spec.idleTimeout != old.idleTimeout:
            self.tracker.idleTimeout = spec.idleTimeout
            changed.append("idle_timeout")
        if spec.drainTimeout != old.drainTimeout:
            changed.append("drain_timeout")
        if spec.connectTimeout != old.connectTimeout:
            for dialer in self._dialers.values():
                dialer = getattr(dialer, "inner", dialer)  # a RegistryDialer wraps the real one
                if hasattr(dialer, "connectTimeout"):
                    dialer.connectTimeout = spec.connectTimeout
            changed.append("connect_timeout")
        for hook in self.reloadHooks:
            changed.extend(hook(spec))
        if _listenerKey(spec.listeners) != _listenerKey(old.listeners):
            ignored.append("listeners")
        if spec.hops != old.hops:
            ignored.append("chain")
        if spec.name != old.name:
            ignored.append("name")
        if spec.settings != old.settings:
            ignored.append("settings")
        self.spec = replace(old, allow=spec.allow, deny=spec.deny, allowPeers=spec.allowPeers,
                            rules=spec.rules, idleTimeout=spec.idleTimeout, drainTimeout=spec.drainTimeout,
                            connectTimeout=spec.connectTimeout, certCheckInterval=spec.certCheckInterval,
                            routes=spec.routes, h2rBindings=spec.h2rBindings)
        reset = self.recheckTunnels()
        self.log.info("reloaded {source}: {changed}{ignored}; {reset} live tunnels reset",
                      source=source, changed=", ".join(changed) or "nothing changed",
                      ignored=f" (not applied, restart needed: {', '.join(ignored)})" if ignored else "",
                      reset=reset)
        self.events.emit(ConfigReloaded(source, tuple(changed), tuple(ignored), reset))
        return {"changed": changed, "ignored": ignored, "reset": reset}

    def reloadFromFile(self, path) -> dict | None:
        """SIGHUP: read ``path`` again and :meth:`reload`; a file that does not
        validate is refused with the error logged, and the running one stays."""
        from hbone.config import ConfigError, loadConfig
        from hbone.events import ConfigReloadFailed

        try:
            spec = loadConfig(path)
            return self.reload(spec, str(path))
        except (ConfigError, NodeConfigError) as e:
            self.log.error("reload of {path} refused, the running configuration stays: {error}",
                           path=str(path), error=str(e))
            self.events.emit(ConfigReloadFailed(str(path), str(e)))
            return None

    def recheckTunnels(self) -> int:
        """Reset every live tunnel the current policy, peer authorizer or rules no
        longer allow; returns how many."""
        n = 0
        for tunnel in list(self.tracker.tunnels):
            why = self._denial(tunnel.info)
            if why is not None:
                self.log.info("resetting tunnel {source} -> {target} ({peer}): no longer allowed: {why}",
                              source=tunnel.info.get("source"), target=tunnel.info.get("target"),
                              peer=tunnel.info.get("peer"), why=why)
                tunnel.abort(f"revoked by reload: {why}")
                n += 1
        return n

    def _denial(self, info: dict) -> str | None:
        from hbone.policy import DestinationDenied

        request = info.get("request")
        if request is None:
            return None
        peer = request.peerIdentity
        if info.get("direction") == "inbound" and peer is not None:
            if self.authorizer is not None and not self.authorizer.isAllowed(peer):
                return self.authorizer.explain(peer)
            if self.rules:
                why = self.rules.check(peer, request.target.host, request.target.port)
                if why is not None:
                    return why
        if request.checkedAddress is not None and not request.operatorFixed:
            hostname = None if request.target.ip is not None else request.target.host
            try:
                self.policy.checkAddress(request.checkedAddress, request.target.port, hostname)
            except DestinationDenied as e:
                return str(e)
        return None

    def drain(self, timeout: float | None = None) -> defer.Deferred:
        """Stop gracefully (PROTOCOL §3): close the listening ports, send every HTTP/2
        server connection GOAWAY(2^31-1) then GOAWAY(last id), let live tunnels
        finish for up to ``timeout`` seconds (``NodeSpec.drainTimeout``), then
        RST_STREAM(CANCEL) and abort what is left. Fires with a summary dict
        (``finished``, ``reset``, ``seconds``). Called again while draining, it
        returns the same drain; :meth:`drainNow` ends the wait early."""
        if self._drainSummary is not None:
            return defer.succeed(self._drainSummary)
        d = defer.Deferred()
        self._drainWaiters.append(d)
        if len(self._drainWaiters) == 1:
            def done(result):
                if not isinstance(result, Failure):
                    self._drainSummary = result
                waiters, self._drainWaiters = self._drainWaiters, []
                for w in waiters:
                    w.errback(result) if isinstance(result, Failure) else w.callback(result)

            defer.Deferred.fromCoroutine(
                self._drain(self.spec.drainTimeout if timeout is None else timeout)).addBoth(done)
        return d

    @property
    def isDraining(self) -> bool:
        return bool(self._drainWaiters) or self._drainSummary is not None

    def enableMetrics(self):
        """The node's :class:`hbone.metrics.NodeMetrics` (made on first call), fed from
        ``events``; an admin listener serves it on ``/metrics``."""
        if self.metrics is None:
            from hbone.metrics import NodeMetrics

            self.metrics = NodeMetrics(self)
        return self.metrics

    def drainNow(self) -> None:
        """End a drain's wait at once (a second SIGTERM): what is left is reset."""
        if self._drainNow is not None and not self._drainNow.called:
            self._drainNow.callback(None)

    def _liveConnections(self) -> int:
        return sum(len(f.connections) for f in self.h2Factories)

    async def _drain(self, timeout: float) -> dict:
        clock = self.reactor
        started = clock.seconds()
        for service in self.listeners:
            if service.spec.scheme != "admin":  # the admin page stays up to show the drain
                await service.stopListening()
        for factory in self.h2Factories:
            factory.drain()
        tunnels = len(self.tracker.tunnels)
        opened = self.tracker.opened
        if tunnels or self._liveConnections():
            self.log.info("draining: {n} tunnels, {c} HTTP/2 connections; up to {t:g}s for them to finish",
                          n=tunnels, c=self._liveConnections(), t=timeout)
        self._drainNow = defer.Deferred()
        deadline = started + timeout
        while (self.tracker.tunnels or self._liveConnections()) and not self._drainNow.called:
            left = deadline - clock.seconds()
            if left <= 0:
                break
            tick = deferLater(clock, min(0.05, left), lambda: None)
            await defer.DeferredList([tick, self._drainNow], fireOnOneCallback=True, consumeErrors=True)
            if not tick.called:
                tick.cancel()
        reset = len(self.tracker.tunnels)
        if reset:
            self.tracker.abortAll(f"drain deadline ({timeout:g}s)")
        for factory in self.h2Factories:
            for conn in list(factory.connections):
                conn.cancelStreams()
        # let the RST_STREAMs and close_notify reach the sockets (the reactor stops next)
        linger = clock.seconds() + self.spec.settings.goAwayLinger + 0.5
        while self._liveConnections() and clock.seconds() < linger:
            await deferLater(clock, 0.02, lambda: None)
        summary = {
            "finished": tunnels + (self.tracker.opened - opened) - reset,
            "reset": reset,
            "seconds": round(clock.seconds() - started, 3),
        }
        if tunnels or reset:
            self.log.info("drained in {seconds:.1f}s: {finished} tunnels finished, {reset} reset at the deadline",
                          **summary)
        return summary

    def stopService(self):
        """Drain (up to ``drainTimeout``), then stop: what still runs is aborted."""

        async def stop():
            if self.certWatcher is not None:
                self.certWatcher.stop()
            await self.drain()
            await defer.maybeDeferred(super(Node, self).stopService)
            self.tracker.abortAll("node stopping")
            self.tracker.stop()
            if self.pool is not None:
                await self.pool.closeAll()

        return defer.Deferred.fromCoroutine(stop())


def _listenerKey(listeners) -> tuple:
    return tuple((l.scheme, l.host, l.port, l.target, l.options, l.credentials, l.chain) for l in listeners)


def _h2FactoryOf(factory):
    """The :class:`HBoneH2Factory` inside a listener's factory (TLS wraps it), if any."""
    from hbone.h2.connection import HBoneH2Factory

    seen = 0
    while factory is not None and seen < 4:
        if isinstance(factory, HBoneH2Factory):
            return factory
        factory = getattr(factory, "wrappedFactory", None)
        seen += 1
    return None
