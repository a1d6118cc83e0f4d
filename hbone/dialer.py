"""Dialers: a destination plus metadata in, an ``IStreamClientEndpoint`` out.

:class:`DirectDialer` connects over TCP after the destination policy (SECURITY §4.1)
resolved and checked the address; the endpoint dials exactly the address that was
checked. :class:`HBoneDialer` sends the tunnel to an HBONE hop. Both are
``IDialer``; listeners and the HBONE server take either.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from zope.interface import implementer

from hbone.address import Target, newTraceparent
from hbone.errors import HBoneError, HopUnreachable
from hbone.interfaces import IDialer

__all__ = ["TunnelRequest", "DirectDialer", "HBoneDialer", "connectErrorOf"]


@dataclass
class TunnelRequest:
    """What a listener learned about a tunnel it is about to open."""

    target: Target
    source: tuple[str, int] | None = None  # the original client (forwarded: for=)
    peerIdentity: object | None = None  # SPIFFE ID of the HBONE peer, when there is one
    traceparent: str = field(default_factory=newTraceparent)
    baggage: str | None = None
    operatorFixed: bool = False  # a tcp forward target or a route: not policy-checked
    checkedAddress: str | None = None  # the address the destination policy allowed (DirectDialer)


def connectErrorOf(reason, what: str) -> HBoneError:
    """Map a Twisted connect failure to the status PROTOCOL §6 gives it."""
    exc = reason.value if hasattr(reason, "value") else reason
    if isinstance(exc, HBoneError) or hasattr(exc, "status"):
        return exc
    if isinstance(exc, error.ConnectionRefusedError):
        return HopUnreachable(f"{what}: connection refused", 503, "connection_refused")
    if isinstance(exc, (error.TimeoutError, error.TCPTimedOutError)):
        return HopUnreachable(f"{what}: connect timed out", 504, "connection_timeout")
    if isinstance(exc, error.NoRouteError):
        return HopUnreachable(f"{what}: no route to host", 503, "destination_ip_unroutable")
    if isinstance(exc, error.DNSLookupError):
        return HopUnreachable(f"{what}: DNS lookup failed", 503, "dns_error")
    if isinstance(exc, error.ConnectionLost):
        return HopUnreachable(f"{what}: connection reset during connect", 503, "connection_refused")
    return HopUnreachable(f"{what}: {exc}", 503, "destination_unavailable")


class _MappedEndpoint:
    """Wraps a TCP endpoint so connect failures carry PROTOCOL §6 statuses."""

    def __init__(self, endpoint, what: str) -> None:
        self._endpoint = endpoint
        self._what = what

    def connect(self, protocolFactory):
        d = self._endpoint.connect(protocolFactory)

        def mapped(f):
            f.trap(Exception)
            if f.check(defer.CancelledError):
                return f
            raise connectErrorOf(f, self._what)

        return d.addErrback(mapped)


@implementer(IDialer)
class DirectDialer:
    """TCP to the destination, after policy (unless the target is operator-fixed)."""

    def __init__(self, reactor, policy, resolver, connectTimeout: float = 10.0,
                 dnsTimeout: float = 5.0) -> None:
        self.reactor = reactor
        self.policy = policy
        self.resolver = resolver
        self.connectTimeout = connectTimeout
        self.dnsTimeout = dnsTimeout

    def dial(self, request: TunnelRequest) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._dial(request))

    async def _dial(self, request: TunnelRequest):
        target = request.target
        if request.operatorFixed:
            if target.ip is not None:
                address = target.host
            else:
                address = (await self.resolver.resolveHost(target.host) or [None])[0]
                if address is None:
                    raise HopUnreachable(f"{target.host}: no addresses", 503, "dns_error")
        else:
            address = await self.policy.resolveAndCheck(
                target.host, target.port, self.resolver, self.reactor, self.dnsTimeout
            )
            request.checkedAddress = address  # re-checked when a reload changes the policy
        ip = ipaddress.ip_address(address)
        cls = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
        endpoint = cls(self.reactor, str(ip), target.port, timeout=self.connectTimeout)
        return _MappedEndpoint(endpoint, f"{target.authority()}")


@implementer(IDialer)
class HBoneDialer:
    """Every destination goes through one HBONE hop (the last of a ``-F`` chain)."""

    def __init__(self, pool, hop, responseTimeout: float = 15.0) -> None:
        self.pool = pool
        self.hop = hop
        self.responseTimeout = responseTimeout

    def dial(self, request: TunnelRequest) -> defer.Deferred:
        from hbone.h2.client import HBoneClientEndpoint

        return defer.succeed(
            HBoneClientEndpoint(self.pool, self.hop, request.target, request, self.responseTimeout)
        )
