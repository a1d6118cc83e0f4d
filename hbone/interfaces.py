"""The seams of hbone: each is a zope Interface that tests and deployments swap."""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IDialer", "IAuthorizer", "ITunnelObserver"]


class IDialer(Interface):
    """Decides *where* a tunnel goes; endpoints decide *how* it gets there."""

    def dial(request):
        """Return a Deferred firing with an ``IStreamClientEndpoint`` for
        ``request`` (a :class:`hbone.dialer.TunnelRequest`), after policy said yes;
        or failing with an error carrying ``status`` and ``proxyError``
        (PROTOCOL §6)."""


class IAuthorizer(Interface):
    """Which peer identities may open tunnels (SECURITY §4.2)."""

    def isAllowed(peerId):
        """True if ``peerId`` (a SpiffeId) may open tunnels here."""

    def explain(peerId):
        """Why ``peerId`` is refused, for the log and the 403."""


class ITunnelObserver(Interface):
    """Told once when a tunnel closes (logs, metrics, user callbacks)."""

    def tunnelClosed(tunnel):
        """``tunnel`` is a :class:`hbone.splice.Tunnel` with counters and ``info``."""

    name = Attribute("a short name for logs")
