"""The fixed-target forwarder (``-L tcp://:7000/host:port``).

Each accepted TCP connection becomes one tunnel to the fixed target, through the
listener's dialer: direct TCP, or an HBONE hop. The accepted socket is paused until
the far side answers (Twisted ``portforward``'s rule), so nothing is read that
could not be delivered; a refused tunnel resets the client connection.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from hbone.address import Target
from hbone.dialer import TunnelRequest
from hbone.logs import RejectionLog
from hbone.splice import SpliceFactory, SpliceProtocol, TunnelTracker, abortTransport, join

__all__ = ["TCPForwardFactory", "spliceThrough"]


def spliceThrough(inbound: SpliceProtocol, dialer, request: TunnelRequest,
                  tracker: TunnelTracker | None, info: dict,
                  onConnected: Callable[[SpliceProtocol], None] | None = None,
                  onFailed: Callable[[Failure], None] | None = None) -> defer.Deferred:
    """Dial ``request`` and join ``inbound`` (already connected, paused) to it.

    Fires with the :class:`Tunnel`, or fails with the dial error after resetting
    ``inbound``'s connection. If ``inbound`` closes first, the dial is cancelled.

    Hooks for listeners that speak a protocol before splicing (HTTP, SOCKS):
    ``onConnected(outbound)`` runs once the outbound leg is connected and before the
    halves are joined (answer the client, forward buffered bytes); ``onFailed(failure)``
    runs instead of the reset of ``inbound`` when the dial fails (answer with an
    error status). Neither runs when ``inbound`` closed first.
    """

    async def go():
        endpoint = await dialer.dial(request)
        return await endpoint.connect(SpliceFactory())

    d = defer.Deferred.fromCoroutine(go())
    inbound.onLost = lambda: (not d.called) and d.cancel()

    def connected(outbound):
        inbound.onLost = None
        if inbound.lost:
            abortTransport(outbound.transport)
            return None
        if onConnected is not None:
            onConnected(outbound)
        return join(inbound, outbound, tracker, info)

    def failed(f):
        inbound.onLost = None
        if not inbound.lost:
            if onFailed is not None:
                onFailed(f)
            else:
                abortTransport(inbound.transport)
        return f

    d.addCallbacks(connected, failed)
    return d


class _ForwardProtocol(SpliceProtocol):
    onLost = None

    def connectionMade(self) -> None:
        super().connectionMade()  # paused until joined
        factory = self.factory
        peer = self.transport.getPeer()
        request = TunnelRequest(
            target=factory.target, source=(peer.host, peer.port), operatorFixed=True
        )
        d = spliceThrough(
            self,
            factory.dialer,
            request,
            factory.tracker,
            {"direction": "outbound", "source": (peer.host, peer.port),
             "target": factory.target.authority(), "traceparent": request.traceparent,
             "listener": factory.name, "started": factory.clock.seconds()},
        )
        d.addErrback(factory._failed, peer)

    def connectionLost(self, reason) -> None:
        if self.onLost is not None:
            self.onLost()
        super().connectionLost(reason)


class TCPForwardFactory(Factory):
    """Accepts TCP and tunnels every connection to ``target`` through ``dialer``."""

    noisy = False
    log = Logger()

    def __init__(self, target: Target, dialer, tracker: TunnelTracker | None, clock,
                 name: str = "tcp") -> None:
        self.target = target
        self.dialer = dialer
        self.tracker = tracker
        self.name = name
        self.clock = clock
        self.rejections = RejectionLog(clock)

    def buildProtocol(self, addr):
        p = _ForwardProtocol()
        p.factory = self
        return p

    def _failed(self, failure, peer) -> None:
        if failure.check(defer.CancelledError):
            return None
        err = failure.value
        self.rejections.log(
            getattr(err, "proxyError", type(err).__name__),
            "{listener}: tunnel from {src} to {target} failed: {reason}",
            listener=self.name,
            src=f"{peer.host}:{peer.port}",
            target=self.target.authority(),
            reason=str(err) or type(err).__name__,
        )
        return None
