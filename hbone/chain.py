"""``-F`` chains: endpoint composition.

A chain ``-F A -F B`` reaches a target through A, then B: hop N is opened *through*
hop N-1's stream. Each hop kind is an endpoint that takes a ``via`` (how to reach
the hop itself) and a target:

* ``hbone``/``h2c``/``http2``: :class:`hbone.h2.client.HBoneClientEndpoint` on an
  :class:`HBoneHop`; the first hop's connections are pooled, later hops get a
  connection of their own inside the previous hop's stream (double HBONE);
* ``http``: HTTP/1.1 CONNECT; ``socks5``: SOCKS5 — both over any transport.

A hop with several nodes (``-F hbone://gw1:15008,gw2:15008``) is a group: each
tunnel starts at the next node in turn and fails over to the others when a node
cannot be reached (a refusal by a reachable node is final).
"""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from hbone.address import Target
from hbone.dialer import TunnelRequest, _MappedEndpoint
from hbone.errors import HopUnreachable, TunnelRefused
from hbone.interfaces import IDialer
from hbone.urls import HopSpec

__all__ = ["ChainDialer", "FailoverEndpoint", "tcpEndpoint"]


def tcpEndpoint(reactor, host: str, port: int, timeout: float = 10.0):
    """A TCP client endpoint for an operator-written host (IP literal or name)."""
    if ":" in host:
        ep = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    elif host.replace(".", "").isdigit():
        ep = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        ep = HostnameEndpoint(reactor, host, port, timeout=timeout)
    return _MappedEndpoint(ep, f"{host}:{port}")


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Try each endpoint in turn until one connects; a refusal (the node answered
    with a status) is not retried elsewhere."""

    def __init__(self, endpoints: list) -> None:
        self.endpoints = endpoints

    def connect(self, protocolFactory) -> defer.Deferred:
        async def go():
            last = None
            for endpoint in self.endpoints:
                try:
                    return await endpoint.connect(protocolFactory)
                except TunnelRefused:
                    raise
                except HopUnreachable as e:
                    last = e
            raise last

        return defer.Deferred.fromCoroutine(go())


@implementer(IDialer)
class ChainDialer:
    """Every tunnel goes through ``hops``, in order."""

    def __init__(self, reactor, hops: tuple[HopSpec, ...], pool=None, connectTimeout: float = 10.0,
                 responseTimeout: float = 15.0) -> None:
        if not hops:
            raise ValueError("a chain needs at least one hop")
        needsPool = any(h.scheme in ("hbone", "h2c", "http2") for h in hops)
        if needsPool and pool is None:
            raise ValueError("hbone, h2c and http2 hops need a pool")
        for hop in hops:  # an option that does not fit the hop's mode fails now, not at dial time
            if hop.scheme in ("hbone", "h2c", "http2"):
                try:
                    hboneHopOf(hop, hop.host, hop.port)
                except ValueError as e:
                    raise ValueError(f"-F {hop}: {e}") from None
        self.reactor = reactor
        self.hops = tuple(hops)
        self.pool = pool
        self.connectTimeout = connectTimeout
        self.responseTimeout = responseTimeout
        self._turn = [itertools.count() for _ in hops]

    def dial(self, request: TunnelRequest) -> defer.Deferred:
        return defer.succeed(self.endpointFor(len(self.hops) - 1, request.target, request))

    def endpointFor(self, index: int, target: Target, request: TunnelRequest | None = None):
        """The endpoint that reaches ``target`` through hops ``0..index``."""
        hop = self.hops[index]
        nodes = list(hop.nodes or ((hop.host, hop.port),))
        if len(nodes) > 1:
            start = next(self._turn[index]) % len(nodes)
            nodes = nodes[start:] + nodes[:start]
            return FailoverEndpoint([self._nodeEndpoint(index, hop, n, target, request) for n in nodes])
        return self._nodeEndpoint(index, hop, nodes[0], target, request)

    def _via(self, index: int):
        """How hop ``index`` reaches a node: TCP for the first, else through the chain."""
        if index == 0:
            return lambda host, port: tcpEndpoint(self.reactor, host, port, self.connectTimeout)
        return lambda host, port: self.endpointFor(index - 1, Target(host, port))

    def _nodeEndpoint(self, index: int, hop: HopSpec, node: tuple[str, int], target: Target,
                      request: TunnelRequest | None):
        host, port = node
        via = self._via(index)
        if hop.scheme in ("hbone", "h2c", "http2"):
            from hbone.h2.client import HBoneClientEndpoint

            return HBoneClientEndpoint(
                self.pool, hboneHopOf(hop, host, port, via if index > 0 else None),
                target, request, self.responseTimeout,
            )
        if hop.scheme == "http":
            from hbone.proxy.hops import HTTPConnectEndpoint

            return HTTPConnectEndpoint(via(host, port), target, hop.credentials, clock=self.reactor,
                                       timeout=self.responseTimeout, name=f"-F {hop}")
        if hop.scheme == "socks5":
            from hbone.proxy.hops import SOCKS5Endpoint

            return SOCKS5Endpoint(via(host, port), target, hop.credentials, clock=self.reactor,
                                  timeout=self.responseTimeout, name=f"-F {hop}")
        raise ValueError(f"-F {hop}: unsupported hop scheme {hop.scheme}")  # pragma: no cover


def hboneHopOf(hop: HopSpec, host: str, port: int, via=None):
    """The :class:`HBoneHop` for one node of an ``hbone``/``h2c``/``http2`` hop spec."""
    from hbone.h2.client import HBoneHop

    kwargs = {}
    token = hop.option("token")
    if hop.scheme == "hbone":
        tls = hop.option("tls", "mtls")
    elif hop.scheme == "h2c":
        tls = "none"
    else:  # http2: gost / nghttpx CONNECT-over-h2 proxies, server-auth TLS
        tls = "server"
        if hop.credentials is not None:
            kwargs["basicAuth"] = hop.credentials
    if tls != "mtls":
        kwargs["tls"] = tls
    if token:
        kwargs["token"] = token[1:]
    if hop.option("ca"):
        kwargs["caFile"] = hop.option("ca")
    if hop.option("servername"):
        kwargs["serverName"] = hop.option("servername")
    return HBoneHop(host, port, hop.identities, hop.method, via=via, **kwargs)
