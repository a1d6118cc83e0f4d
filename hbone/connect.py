"""``hbone connect HOST:PORT``: join stdin/stdout to one tunnel.

For ``ssh -o ProxyCommand='hbone connect %h:%p --certs DIR -F hbone://gw:15008'``.
stdin's EOF is the tunnel's half-close; the tunnel's end closes stdout. Logs go to
stderr, warnings and errors only unless ``-v``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["connectMain"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hbone connect",
        description="Join stdin/stdout to one tunnel to HOST:PORT (through the -F chain, if any).",
        epilog=(
            "example:\n"
            "  ssh -o ProxyCommand='hbone connect %h:%p --certs ./me "
            "-F hbone://gw.example:15008' user@laptop\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="HOST:PORT")
    p.add_argument("-F", dest="hops", action="append", default=[], metavar="URL",
                   help="hop, repeatable, in dial order (as for hbone)")
    p.add_argument("--certs", metavar="DIR")
    p.add_argument("--cert", metavar="FILE")
    p.add_argument("--key", metavar="FILE")
    p.add_argument("--ca", metavar="FILE")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def connectMain(argv: list[str]) -> int:
    from hbone.cli import _fail, _loadIdentity, _normalizeFlags, _startLogging
    from hbone.address import AddressError, parseAuthority
    from hbone.tls import IdentityConfigError
    from hbone.urls import URLError, parseHop

    options = _parser().parse_args(_normalizeFlags(argv))
    try:
        target = parseAuthority(options.target)
        hops = tuple(parseHop(h) for h in options.hops)
        identity = _loadIdentity(options)
    except (AddressError, URLError, IdentityConfigError) as e:
        return _fail(str(e))
    from twisted.internet import defer, reactor
    from twisted.internet.stdio import StandardIO

    from hbone.chain import ChainDialer
    from hbone.dialer import DirectDialer, TunnelRequest
    from hbone.h2.client import Pool
    from hbone.policy import DestinationPolicy, ReactorResolver
    from hbone.proxy.tcp import spliceThrough
    from hbone.splice import SpliceProtocol, TunnelTracker

    if any(h.scheme == "hbone" and h.option("tls", "mtls") == "mtls" for h in hops) and identity is None:
        return _fail("a mutual-TLS hbone hop needs an identity: --certs DIR or --cert/--key/--ca")
    _startLogging(options.verbose, not options.verbose)
    pool = Pool(reactor, identity)
    if hops:
        try:
            dialer = ChainDialer(reactor, hops, pool, options.connect_timeout)
        except ValueError as e:
            return _fail(str(e))
    else:
        dialer = DirectDialer(reactor, DestinationPolicy(), ReactorResolver(reactor), options.connect_timeout)
    status = {"code": 0}
    done = defer.Deferred()

    class Stdio(SpliceProtocol):
        def _checkDone(self):
            # StandardIO never reports connectionLost once stdin and stdout were
            # closed one after the other; end it ourselves.
            if self.readDone and self.writeDone and not self.lost:
                from twisted.internet.error import ConnectionDone
                from twisted.python.failure import Failure

                self.transport.connectionLost(Failure(ConnectionDone()))

        def connectionLost(self, reason):
            super().connectionLost(reason)
            if not done.called:
                done.callback(None)

    def onClose(tunnel):
        if tunnel.reason:
            sys.stderr.write(f"hbone connect: tunnel to {target} ended: {tunnel.reason}\n")
            status["code"] = 1

    tracker = TunnelTracker(reactor, 0, onClose)
    inbound = Stdio()

    def start():
        StandardIO(inbound, reactor=reactor)
        d = spliceThrough(inbound, dialer, TunnelRequest(target=target, operatorFixed=True), tracker,
                          {"direction": "outbound", "target": target.authority(), "listener": "connect"})

        def failed(f):
            sys.stderr.write(f"hbone connect: {target}: {f.getErrorMessage()}\n")
            status["code"] = 1
            if not done.called:
                done.callback(None)

        d.addErrback(failed)

        def finish(_):
            closing = pool.closeAll()
            closing.addBoth(lambda _: reactor.stop())

        done.addCallback(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    return status["code"]
