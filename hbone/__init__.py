"""hbone: HBONE tunnels (HTTP/2 CONNECT over mutual TLS) on Twisted.

The public API is what ``__all__`` names; every other module is internal and may
change. ``docs/embedding.md`` shows how to use it::

    import hbone

    node = hbone.makeNode(reactor, listen=["hbone://127.0.0.1:15008"],
                          certs="./server", allow=["127.0.0.1:9000"])
    node.events.subscribe(print)
    node.setServiceParent(application)

and, for one tunnel in any Twisted program::

    clientFromString(reactor, r"hbone:host=127.0.0.1:port=15008:target=127.0.0.1\\:9000"
                              r":certs=./client:identity=spiffe\\://cluster.local/ns/default/sa/server")

Names are imported on first use, so ``import hbone`` is cheap and never imports
(or installs) a reactor.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> (module, name in that module)
_EXPORTS = {
    # a node: listeners, chains, policy, pool, events (a MultiService)
    "Node": ("hbone.service", "Node"),
    "NodeSpec": ("hbone.service", "NodeSpec"),
    "makeNode": ("hbone.api", "makeNode"),
    "NodeConfigError": ("hbone.service", "NodeConfigError"),
    "ListenError": ("hbone.service", "ListenError"),
    # identities
    "Identity": ("hbone.tls", "Identity"),
    "IdentityConfigError": ("hbone.tls", "IdentityConfigError"),
    "IdentityPattern": ("hbone.identity", "IdentityPattern"),
    "SpiffeId": ("hbone.identity", "SpiffeId"),
    # the client: one tunnel per connect(), on pooled connections
    "HBoneClientEndpoint": ("hbone.h2.client", "HBoneClientEndpoint"),
    "HBoneHop": ("hbone.h2.client", "HBoneHop"),
    "Pool": ("hbone.h2.client", "Pool"),
    "EndpointStringError": ("hbone.endpoints", "EndpointStringError"),
    "closeEndpointPools": ("hbone.endpoints", "closeEndpointPools"),
    # events
    "Events": ("hbone.events", "Events"),
    "TunnelOpened": ("hbone.events", "TunnelOpened"),
    "TunnelClosed": ("hbone.events", "TunnelClosed"),
    "TunnelRejected": ("hbone.events", "TunnelRejected"),
    # errors a tunnel fails with
    "HBoneError": ("hbone.errors", "HBoneError"),
    "TunnelRefused": ("hbone.errors", "TunnelRefused"),
    "HopUnreachable": ("hbone.errors", "HopUnreachable"),
    "HopIdentityError": ("hbone.errors", "HopIdentityError"),
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from hbone.api import makeNode
    from hbone.endpoints import EndpointStringError, closeEndpointPools
    from hbone.errors import HBoneError, HopIdentityError, HopUnreachable, TunnelRefused
    from hbone.events import Events, TunnelClosed, TunnelOpened
    from hbone.events import TunnelRejected
    from hbone.h2.client import HBoneClientEndpoint, HBoneHop, Pool
    from hbone.identity import IdentityPattern, SpiffeId
    from hbone.service import ListenError, Node, NodeConfigError, NodeSpec
    from hbone.tls import Identity, IdentityConfigError


def __getattr__(name: str):
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'hbone' has no attribute {name!r}") from None
    value = getattr(import_module(module), attribute)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
