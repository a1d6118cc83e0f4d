"""twistd wiring: ``Options`` and ``makeService`` (no logic of its own).

    twistd -n hbone --config conf/node.ini
    twistd -n hbone --certs ./server --allow 127.0.0.1:9000 -L hbone://127.0.0.1:15008

The options are the command line's (``hbone --help``); both build the same
:class:`hbone.service.Node`. Listeners bind in ``privilegedStartService``, so a port
that cannot be bound stops twistd with a message naming the listener.
"""

from __future__ import annotations

from twisted.python import usage

from hbone.cli import EPILOG


class Options(usage.Options):
    synopsis = "[options] -L URL [-L URL ...] [-F URL]"
    longdesc = "Run an hbone node.\n\n" + EPILOG
    optParameters = [
        ["config", "C", None, "a node config file (docs/config.md); replaces -L/-F and the other options"],
        ["certs", None, None, "identity directory (cert-chain.pem, key.pem, root-cert.pem)"],
        ["cert", None, None, "certificate chain (PEM); with --key and --ca"],
        ["key", None, None, "private key (PEM)"],
        ["ca", None, None, "trust bundle of our trust domain (PEM)"],
        ["connect-timeout", None, 10.0, "upstream TCP connect timeout, seconds", float],
        ["idle-timeout", None, 3600.0, "tunnel idle timeout, seconds", float],
        ["drain-timeout", None, 5.0, "on SIGTERM, seconds live tunnels get to finish", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listeners"] = []
        self["hops"] = []
        self["allow"] = []
        self["deny"] = []
        self["allowPeers"] = []

    def opt_L(self, value: str) -> None:
        """A listener URL, repeatable (tcp://[host]:port/target, hbone://[host]:port)."""
        self["listeners"].append(value)

    def opt_F(self, value: str) -> None:
        """Forward every tunnel through this HBONE hop (hbone://host:port?identity=...)."""
        self["hops"].append(value)

    def opt_allow(self, value: str) -> None:
        """Allow a destination the default policy denies (host:port, CIDR[:ports], .suffix); repeatable."""
        self["allow"].append(value)

    def opt_deny(self, value: str) -> None:
        """Refuse a destination even if otherwise allowed (same forms as --allow); repeatable."""
        self["deny"].append(value)

    def opt_allow_peer(self, value: str) -> None:
        """Also accept tunnels from this SPIFFE ID or spiffe://td/ns/N/*; repeatable."""
        self["allowPeers"].append(value)

    def postOptions(self) -> None:
        from hbone.service import NodeSpec
        from hbone.tls import Identity, IdentityConfigError
        from hbone.urls import URLError, parseHop, parseListener

        if self["config"]:
            from hbone.config import ConfigError, loadConfig

            if self["listeners"] or self["hops"]:
                raise usage.UsageError("--config describes the whole node; give -L/-F in the file")
            try:
                self["spec"] = loadConfig(self["config"])
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
            return
        if not self["listeners"]:
            raise usage.UsageError("give --config FILE, or at least one -L listener")
        try:
            listeners = tuple(parseListener(x) for x in self["listeners"])
            hops = tuple(parseHop(x) for x in self["hops"])
        except URLError as e:
            raise usage.UsageError(str(e)) from None
        identity = None
        try:
            if self["certs"]:
                identity = Identity.fromDirectory(self["certs"])
            elif self["cert"] or self["key"] or self["ca"]:
                if not (self["cert"] and self["key"] and self["ca"]):
                    raise IdentityConfigError("--cert, --key and --ca go together")
                identity = Identity.fromFiles(self["cert"], self["key"], self["ca"])
        except IdentityConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["spec"] = NodeSpec(
            listeners=listeners,
            hops=hops,
            identity=identity,
            allow=tuple(self["allow"]),
            deny=tuple(self["deny"]),
            allowPeers=tuple(self["allowPeers"]),
            connectTimeout=self["connect-timeout"],
            idleTimeout=self["idle-timeout"],
            drainTimeout=max(0.0, self["drain-timeout"]),
        )


def makeService(options: Options):
    from twisted.internet import reactor

    from hbone.limits import raiseFileLimit, tuneMalloc
    from hbone.service import Node, NodeConfigError

    raiseFileLimit()
    tuneMalloc()

    from twisted.application.service import MultiService

    from hbone.signals import SignalService

    try:
        node = Node(reactor, options["spec"])
    except NodeConfigError as e:
        raise usage.UsageError(str(e)) from None
    # SIGTERM drains and exits 0, SIGHUP reloads --config (hbone.signals)
    top = MultiService()
    node.setServiceParent(top)
    SignalService(reactor, [node], options["config"]).setServiceParent(top)
    return top
