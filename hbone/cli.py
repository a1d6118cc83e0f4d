"""The ``hbone`` console script (gost-style ``-L``/``-F``), ``hbone certs`` and ``hbone dev``.

This module and ``tap.py`` are the only places that import the global reactor.
"""

from __future__ import annotations

import argparse
import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    globalLogBeginner,
)

from hbone import __version__

__all__ = ["main"]

log = Logger(namespace="hbone")

EPILOG = """\
examples:
  # development CA and two identities
  hbone certs init ./ca --trust-domain cluster.local
  hbone certs issue ./ca --spiffe spiffe://cluster.local/ns/default/sa/server --ip 127.0.0.1 --out ./server
  hbone certs issue ./ca --spiffe spiffe://cluster.local/ns/default/sa/client --out ./client

  # HBONE server on 15008 that may dial 127.0.0.1:9000 (loopback is denied unless allowed)
  hbone --certs ./server --allow 127.0.0.1:9000 -L hbone://127.0.0.1:15008

  # every TCP connection to 127.0.0.1:7000 becomes one CONNECT stream to 127.0.0.1:9000
  hbone --certs ./client -L tcp://127.0.0.1:7000/127.0.0.1:9000 \\
        -F "hbone://127.0.0.1:15008?identity=spiffe://cluster.local/ns/default/sa/server"

  # everything on loopback with minted development certificates
  hbone dev

  # HTTP + SOCKS proxy on 127.0.0.1:8080 whose tunnels go through an HBONE gateway
  hbone --certs ./client -L :8080 -F "hbone://gw.example:15008?identity=spiffe://cluster.local/ns/istio-system/sa/gw"

  # two hops: HBONE inside HBONE ("double HBONE")
  hbone --certs ./client -L tcp://:2222/10.0.0.5:22 -F hbone://gw-a:15008 -F hbone://gw-b:15008

  # ssh through a tunnel
  ssh -o ProxyCommand='hbone connect %h:%p --certs ./client -F hbone://gw.example:15008' user@host

  # the same node from a config file (see docs/config.md)
  hbone -C conf/node.ini

  # a laptop behind NAT serves its sshd through a gateway (docs/reverse-tunnels.md)
  hbone --certs ./laptop -L rtcp://laptop:22/127.0.0.1:22 -F "h2r://gw.example:15441?identity=ID"

  # live tunnels of a running node with an admin listener; SIGTERM drains, SIGHUP reloads
  hbone status --admin 127.0.0.1:15000

listeners (-L):  [auto://][user:pass@][host]:port   HTTP and SOCKS proxy, sniffed (also http://, socks5://, socks4://)
                 tcp://[host]:port/target            fixed-target forwarder
                 hbone://[host]:port                 HBONE server (CONNECT and POST /_hbone/ over mTLS HTTP/2)
                 h2c://[host]:port?jwks=F&audience=A HBONE over cleartext HTTP/2 behind a TLS-terminating
                                                     load balancer, bearer JWT-SVIDs (?insecure=1: loopback only)
                 sni://[host]:port                   SNI gateway: routes TLS by its server name, unterminated
                                                     (Istio names through -F; a route table in the config file)
                 h2r://[host]:port?bind=NAME=ID      reverse-tunnel gateway: nodes behind NAT register here
                 rtcp://NAME:PORT/target             export NAME:PORT through the -F h2r:// gateway(s)
                 admin://[host]:port                 metrics, health, live tunnels (page and JSON)
hops (-F):       hbone://host:port[?identity=ID-or-pattern][&method=post]
                 hbone://lb:443?tls=server&token=@FILE[&method=post]   toward a TLS-terminating load balancer
                 h2c://host:port?token=@FILE   http2://[user:pass@]host:port   http://..   socks5://..
                 h2r://gw:15441[,gw2:15441]?identity=ID   the gateway(s) rtcp:// exports register with
                 host1:port,host2:port in one hop: a group, one node per tunnel with failover
An omitted listener host binds 127.0.0.1 (gost binds every address); a proxy listener on another
address needs user:pass@. Quote URLs with ? or &. A hop without identity= accepts any SVID of our
own trust domain; naming it is recommended. Every -F is one hop, in dial order, for every listener.
"""


def _normalizeFlags(argv: list[str]) -> list[str]:
    """Accept gost's ``-L=:8080`` as well as ``-L :8080``."""
    out = []
    for arg in argv:
        if len(arg) > 3 and arg[0] == "-" and arg[1] in "LFC" and arg[2] == "=":
            out.extend([arg[:2], arg[3:]])
        else:
            out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hbone",
        description=(
            "HBONE tunnels: TCP carried as HTTP/2 CONNECT streams inside mutual TLS with SPIFFE "
            "identities (Istio ambient mesh's protocol). Sub-commands: 'hbone certs --help' "
            "(development CA), 'hbone dev --help' (a working local tunnel)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-L", dest="listeners", action="append", default=[], metavar="URL",
                   help="a listener, repeatable (see below)")
    p.add_argument("-F", dest="hops", action="append", default=[], metavar="URL",
                   help="forward every tunnel through this hop; repeat for a chain, in dial order")
    p.add_argument("-C", "--config", metavar="FILE",
                   help="run the node of a config file (the same as twistd -n hbone --config FILE)")
    p.add_argument("--certs", metavar="DIR",
                   help="identity directory with Istio's names: cert-chain.pem, key.pem, root-cert.pem")
    p.add_argument("--cert", metavar="FILE", help="certificate chain (PEM, leaf first); with --key and --ca")
    p.add_argument("--key", metavar="FILE", help="private key (PEM, unencrypted)")
    p.add_argument("--ca", metavar="FILE", help="trust bundle of our trust domain (PEM)")
    p.add_argument("--allow", action="append", default=[], metavar="ENTRY",
                   help="allow a destination the default policy denies: an exact host:port "
                        "(127.0.0.1:9000), a CIDR with optional ports (10.0.0.0/8:80,443), or a "
                        "hostname suffix (.corp.example); repeatable")
    p.add_argument("--deny", action="append", default=[], metavar="ENTRY",
                   help="refuse a destination even if otherwise allowed (same forms as --allow); repeatable")
    p.add_argument("--allow-peer", dest="allowPeers", action="append", default=[], metavar="ID",
                   help="also accept tunnels from this SPIFFE ID or spiffe://td/ns/N/* (by default: "
                        "same trust domain and namespace as ours); repeatable")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="upstream TCP connect timeout (default 10)")
    p.add_argument("--idle-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="reset a tunnel with no bytes either way for this long (default 3600)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N worker processes sharing every listening port (SO_REUSEPORT), for "
                        "a node that outgrows one core; ports must be fixed (default 1)")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # set by the supervisor
    p.add_argument("--drain-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM, how long live tunnels get to finish before they are reset (default 5)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text lines (default), or one JSON object per line for log shippers")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--version", action="version", version=f"hbone {__version__}")
    return p


_LOG_PREFIX = ["hbone"]  # "hbone[2]" in worker 2 of --workers


def _startLogging(verbose: bool, quiet: bool, logFormat: str = "text") -> None:
    level = LogLevel.debug if verbose else LogLevel.warn if quiet else LogLevel.info

    def emit(event):
        ns = event.get("log_namespace", "")
        if (ns.startswith("twisted.") or ns == "log_legacy") and event["log_level"] < LogLevel.warn:
            return  # Twisted's own port/factory chatter
        if logFormat == "json":
            from hbone.logs import jsonLine

            sys.stderr.write(jsonLine(event, _LOG_PREFIX[0]) + "\n")
            sys.stderr.flush()
            return
        text = formatEvent(event)
        if event.get("log_failure") is not None and event["log_level"] >= LogLevel.error:
            text += "\n" + event["log_failure"].getTraceback()
        sys.stderr.write(f"{_LOG_PREFIX[0]}: {text}\n")
        sys.stderr.flush()

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(emit, [predicate])], redirectStandardIO=False)


def _fail(message: str) -> int:
    sys.stderr.write(f"hbone: error: {message}\n")
    return 2


def _loadIdentity(options):
    from hbone.tls import Identity, IdentityConfigError

    try:
        if options.certs:
            if options.cert or options.key or options.ca:
                raise IdentityConfigError("give either --certs DIR or --cert/--key/--ca, not both")
            return Identity.fromDirectory(options.certs)
        if options.cert or options.key or options.ca:
            if not (options.cert and options.key and options.ca):
                raise IdentityConfigError("--cert, --key and --ca go together")
            return Identity.fromFiles(options.cert, options.key, options.ca)
    except IdentityConfigError:
        raise
    return None


def _specFromOptions(options):
    """-L/-F and the global options -> (NodeSpec, hops); ValueError names the argument."""
    from hbone.service import NodeSpec
    from hbone.tls import IdentityConfigError
    from hbone.urls import parseHop, parseListener

    listeners = tuple(parseListener(x) for x in options.listeners)
    hops = tuple(parseHop(x) for x in options.hops)
    try:
        identity = _loadIdentity(options)
    except IdentityConfigError as e:
        raise ValueError(str(e)) from None
    spec = NodeSpec(
        listeners=listeners,
        hops=hops,
        identity=identity,
        allow=tuple(options.allow),
        deny=tuple(options.deny),
        allowPeers=tuple(options.allowPeers),
        connectTimeout=options.connect_timeout,
        idleTimeout=options.idle_timeout,
        drainTimeout=max(0.0, options.drain_timeout),
    )
    return spec, hops


def _run(reactor, nodes, ready, configPath=None) -> int:
    """Bind every node's listeners, start them, run the reactor; 1 if a bind failed.

    SIGTERM/SIGINT drain and exit 0, SIGHUP reloads ``configPath`` (hbone.signals)."""
    from twisted.internet import defer

    from hbone.signals import SignalHandlers

    handlers = SignalHandlers(reactor, nodes, configPath)
    reactor.callWhenRunning(handlers.install)

    status = {"code": 0}

    def stop():
        if not status.get("stopping"):
            status["stopping"] = True
            reactor.callLater(0, reactor.stop)

    async def start():
        started = []
        try:
            for node in nodes:
                await node.startListening()
                node.startService()
                started.append(node)
        except Exception as e:
            sys.stderr.write(f"hbone: error: {e}\n")
            status["code"] = 1
            for node in started:
                await node.stopService()
            stop()
            return
        for node in nodes:
            reactor.addSystemEventTrigger("before", "shutdown", node.stopService)
        result = ready()
        if isinstance(result, defer.Deferred):
            result = await result
        if isinstance(result, int):  # an exit code (selftest): stop; None: keep serving
            status["code"] = result
            stop()

    def boom(f):
        sys.stderr.write(f"hbone: error: {f.getErrorMessage()}\n")
        status["code"] = 1
        stop()

    from hbone.limits import raiseFileLimit, tuneMalloc

    raiseFileLimit()
    tuneMalloc()
    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(start()).addErrback(boom))
    reactor.run()
    return status["code"]


def _withoutWorkers(argv: list[str]) -> list[str]:
    """The command line a worker runs: the same, without --workers N."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "certs":
        from hbone.ca import certsMain

        return certsMain(argv[1:])
    if argv and argv[0] == "dev":
        from hbone.dev import devMain

        return devMain(argv[1:])
    if argv and argv[0] == "connect":
        from hbone.connect import connectMain

        return connectMain(argv[1:])
    if argv and argv[0] == "status":
        from hbone.status import statusMain

        return statusMain(argv[1:])
    parser = _parser()
    options = parser.parse_args(_normalizeFlags(argv))
    if options.config:
        if options.listeners or options.hops:
            return _fail("-C FILE describes the whole node; give -L/-F in the file, not beside it")
        from hbone.config import ConfigError, loadConfig

        try:
            spec = loadConfig(options.config)
        except ConfigError as e:
            return _fail(str(e))
        hops = spec.hops
    else:
        if not options.listeners:
            parser.print_usage(sys.stderr)
            return _fail("nothing to do: give at least one -L listener, e.g. -L tcp://:7000/10.0.0.5:22 "
                         "(see hbone --help), or try 'hbone dev'")
        try:
            spec, hops = _specFromOptions(options)
        except ValueError as e:
            return _fail(str(e))
    from hbone.workers import checkWorkers

    try:
        checkWorkers(options.workers, spec.listeners)
    except ValueError as e:
        return _fail(str(e))
    if options.worker:
        from dataclasses import replace

        spec = replace(spec, reusePort=True)
        _LOG_PREFIX[0] = f"hbone[{options.worker}]"
        from hbone.workers import exitWithSupervisor

        exitWithSupervisor()
    from hbone.service import Node, NodeConfigError
    from twisted.internet import reactor

    try:
        node = Node(reactor, spec)
    except NodeConfigError as e:
        return _fail(str(e))
    if options.workers > 1 and not options.worker:  # checked above: the workers run this node
        from hbone.workers import runWorkers

        return runWorkers(_withoutWorkers(argv), options.workers)
    _startLogging(options.verbose, options.quiet, options.log_format)
    identity = spec.identity
    if identity is not None:
        log.info("identity {id} (certificate valid until {until})", id=str(identity.localId),
                 until=identity.notAfter.strftime("%Y-%m-%d %H:%M UTC"))

    def ready():
        bound = ", ".join(f"{k} (port {v})" for k, v in node.boundPorts().items())
        via = f" via {' -> '.join(str(h) for h in hops)}" if hops else ""
        log.info("ready: {bound}{via}", bound=bound, via=via)

    return _run(reactor, [node], ready, configPath=options.config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
