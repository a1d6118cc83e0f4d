"""The SNI gateway (``-L sni://0.0.0.0:15443``, PROTOCOL §8, SECURITY §4.5).

An accepted connection is read, never written to, until one complete ClientHello
is parsed (:mod:`hbone.clienthello`); its server name picks a route; reading stops
while the route's tunnel is dialed (HBONE through a chain, or TCP); on success every
byte read so far is replayed unchanged and the two sides are spliced, so the client's
TLS runs end to end with the backend — the gateway never terminates or alters it.

Routing, first match wins:

1. an Istio name ``outbound_.<port>_.<subset>_.<fqdn>``: the routes are looked up by
   ``<fqdn>`` (and the subset, where a route names one); the tunnel goes to
   ``<fqdn>:<port>`` unless the route names a target;
2. a route whose ``match`` is the exact name;
3. a wildcard ``*.suffix`` (the longest suffix wins);
4. the default route (``match = *``), also for a hello without a server name;
5. nothing: a fatal ``unrecognized_name`` alert, then close.

A listener with a ``-F`` chain and no route table has one implicit route: Istio
names through that chain to ``<fqdn>:<port>``. Non-TLS or malformed input is closed
without a byte written, and no backend is dialed for it. A route's own target is
operator-fixed (not policy-checked); a target taken from the client's hello
(``<fqdn>:<port>``, ``<sni>:PORT``) goes through the destination policy when it is
dialed directly.

The peek is bounded: 10 s from accept to a complete hello, 1 024 connections
peeking per listener (beyond that a new one is closed at once), and the parser's
size caps.
"""

from __future__ import annotations

from dataclasses import dataclass

from hbone.address import AddressError, Target, parseAuthority
from hbone.clienthello import (UNRECOGNIZED_NAME_ALERT, ClientHelloError, ClientHelloParser,
                               checkServerName, parseIstioSni)
from hbone.proxy.http import ProxyListenerFactory, ProxyListenerProtocol

__all__ = ["Route", "RouteError", "Router", "SNIGatewayFactory", "parseRoute", "PEEK_TIMEOUT",
           "MAX_PEEKING"]

PEEK_TIMEOUT = 10.0  # SECURITY §4.5
MAX_PEEKING = 1024


class RouteError(ValueError):
    """A route that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Route:
    """One row of an SNI listener's route table.

    :param match: an exact server name, ``*.suffix``, or ``*`` (the default route).
    :param subset: for Istio names only: the subset this route serves ("" any).
    :param target: ``host:port`` (operator-fixed), ``sni:PORT`` (the client's server
        name on PORT, policy-checked), or "" (Istio names only: ``<fqdn>:<port>``).
    :param chain: the hops toward the target; None: the listener's chain.
    """

    name: str
    match: str
    subset: str = ""
    target: str = ""
    chain: tuple | None = None
    listener: str | None = None  # the [listener:NAME] it belongs to; None: every sni listener

    @property
    def isDefault(self) -> bool:
        return self.match == "*"

    @property
    def isWildcard(self) -> bool:
        return self.match.startswith("*.")


def parseRoute(name: str, match: str, target: str = "", subset: str = "", chain=None,
               listener: str | None = None) -> Route:
    match = match.strip().lower()
    if not match:
        raise RouteError(f"route {name}: match: empty; expected a server name, *.suffix or *")
    if match != "*":
        body = match[2:] if match.startswith("*.") else match
        try:
            checkServerName(body)
        except ClientHelloError as e:
            raise RouteError(f"route {name}: match = {match!r}: {e}") from None
    subset = subset.strip().lower()
    target = target.strip()
    if target:
        if target.lower().startswith("sni:"):
            port = target[4:]
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise RouteError(f"route {name}: target = {target!r}: expected sni:PORT, e.g. sni:443")
            target = f"sni:{int(port)}"
        else:
            try:
                parseAuthority(target)
            except AddressError as e:
                raise RouteError(f"route {name}: target = {target!r}: {e} (expected host:port or sni:PORT)") from None
    return Route(name, match, subset, target, chain, listener)


@dataclass(frozen=True)
class Decision:
    target: Target
    dialer: object
    operatorFixed: bool
    route: str  # the route's name, or "implicit"


class Router:
    """A listener's route table; :meth:`route` decides (pure, given the dialers).

    :param dialerFor: ``(hops or None) -> IDialer``; None is the listener's chain.
    :param implicitChain: whether the listener has a chain of its own for the
        implicit Istio route (used only when ``routes`` is empty).
    """

    def __init__(self, routes, dialerFor, implicitChain: bool) -> None:
        self.dialerFor = dialerFor
        self.implicitChain = implicitChain
        self.replace(routes)

    def replace(self, routes) -> None:
        routes = tuple(routes)
        self.routes = routes
        self._exact: dict[str, list[Route]] = {}
        self._wild: list[Route] = []
        self._default: list[Route] = []
        for r in routes:
            if r.isDefault:
                self._default.append(r)
            elif r.isWildcard:
                self._wild.append(r)
            else:
                self._exact.setdefault(r.match, []).append(r)
        self._wild.sort(key=lambda r: -len(r.match))
        # the dialers are made now, so a route's chain errors surface at start
        for r in routes:
            self.dialerFor(r.chain)

    def _lookup(self, name: str | None, subset: str | None) -> Route | None:
        """Within each tier (exact, wildcard, default) a route naming the Istio
        subset wins over one that serves any subset."""

        def pick(candidates) -> Route | None:
            if subset:
                for r in candidates:
                    if r.subset == subset:
                        return r
            for r in candidates:
                if not r.subset:
                    return r
            return None

        if name is not None:
            found = pick(self._exact.get(name, ()))
            if found is None:
                found = pick([r for r in self._wild if name.endswith(r.match[1:])])
            if found is not None:
                return found
        return pick(self._default)

    def route(self, serverName: str | None) -> Decision | None:
        istio = parseIstioSni(serverName) if serverName else None
        if istio is not None:
            if not self.routes:
                if not self.implicitChain:
                    return None
                return Decision(parseAuthority(istio.authority()), self.dialerFor(None), False, "implicit")
            r = self._lookup(istio.fqdn, istio.subset)
            if r is not None:
                return self._decide(r, serverName, istio.authority())
        r = self._lookup(serverName, None)
        if r is None:
            return None
        return self._decide(r, serverName, None)

    def _decide(self, r: Route, serverName: str | None, istioAuthority: str | None) -> Decision | None:
        if r.target.startswith("sni:"):
            if not serverName:
                return None
            host = parseIstioSni(serverName).fqdn if istioAuthority else serverName
            target, fixed = parseAuthority(f"{host}:{r.target[4:]}"), False
        elif r.target:
            target, fixed = parseAuthority(r.target), True
        elif istioAuthority is not None:
            target, fixed = parseAuthority(istioAuthority), False
        else:
            return None  # a route without a target serves Istio names only
        return Decision(target, self.dialerFor(r.chain), fixed, r.name)


class _Discard:
    def dataReceived(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass


class SNIConversation:
    """Peeks one ClientHello for :class:`ProxyListenerProtocol` and starts its tunnel."""

    def __init__(self, protocol: ProxyListenerProtocol, factory: "SNIGatewayFactory") -> None:
        self.protocol = protocol
        self.factory = factory
        self.parser = ClientHelloParser()
        self._done = False

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self.factory.peeking -= 1

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        try:
            hello = self.parser.feed(data)
        except ClientHelloError as e:
            self.finish()
            self.protocol.refuse(b"", f"sni:{e.kind}", f"{e} (closed without a reply)")
            return
        if hello is None:
            return
        self.finish()
        decision = self.factory.router.route(hello.serverName)
        shown = hello.serverName or "(no server_name)"
        if decision is None:
            self.protocol.refuse(UNRECOGNIZED_NAME_ALERT, "sni:unrecognized_name",
                                 f"no route for {shown}; sent unrecognized_name")
            return
        self.factory.log.debug("{listener}: {name} -> {target} (route {route})", listener=self.factory.name,
                               name=shown, target=decision.target.authority(), route=decision.route)
        self.protocol.startTunnel(
            decision.target, b"", lambda outbound: b"", lambda error: b"",
            upstreamHead=bytes(self.parser.raw), dialer=decision.dialer, operatorFixed=decision.operatorFixed,
        )


class _SNIProtocol(ProxyListenerProtocol):
    def connectionLost(self, reason) -> None:
        conversation = self.conversation
        if conversation is not None:
            conversation.finish()
        super().connectionLost(reason)


class SNIGatewayFactory(ProxyListenerFactory):
    """An ``sni`` listener: see the module docstring."""

    def __init__(self, router: Router, tracker, clock, name: str = "sni",
                 peekTimeout: float = PEEK_TIMEOUT, maxPeeking: int = MAX_PEEKING) -> None:
        super().__init__(None, tracker, clock, None, name, handshakeTimeout=peekTimeout)
        self.router = router
        self.maxPeeking = maxPeeking
        self.peeking = 0

    def buildProtocol(self, addr):
        return _SNIProtocol(self)

    def conversationFor(self, protocol):
        if self.peeking >= self.maxPeeking:
            self.rejections.log("sni:peek_limit", "{listener}: {n} connections already peeking (the limit); "
                                "closing a new one at once", listener=self.name, n=self.peeking)
            protocol.transport.abortConnection()
            return _Discard()
        self.peeking += 1
        return SNIConversation(protocol, self)
