"""``hbone dev``: the embedded default that ``make run`` starts.

Everything on loopback, with development certificates minted into a state folder on
first run (and re-minted when they are about to expire):

    curl http://127.0.0.1:7000/
      -> tcp forwarder 127.0.0.1:7000        (identity .../sa/client)
      -> HBONE: mTLS HTTP/2 CONNECT to 127.0.0.1:15008
      -> HBONE server                        (identity .../sa/server)
      -> 127.0.0.1:7001, a small web page that says it was reached
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twisted.logger import Logger

log = Logger(namespace="hbone")

TRUST_DOMAIN = "cluster.local"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/server"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/client"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hbone dev",
        description="Run a complete HBONE tunnel on loopback with development certificates.",
        epilog=textwrap_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-C", metavar="FILE",
                   help="run this config file's node instead of the built-in pair, minting the "
                        "development identity its [node] certs names (e.g. conf/node.ini)")
    p.add_argument("--state", default=".hbone-state", metavar="DIR",
                   help="where the development CA and identities live (default .hbone-state)")
    p.add_argument("--hbone-port", type=int, default=15008, help="HBONE server port (default 15008)")
    p.add_argument("--forward-port", type=int, default=7000, help="forwarder port (default 7000)")
    p.add_argument("--target-port", type=int, default=7001, help="demo web target port (default 7001)")
    p.add_argument("--selftest", action="store_true",
                   help="fetch the page once through the tunnel, print the result and exit (0 = ok)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def textwrap_epilog() -> str:
    return (
        "example:\n"
        "  hbone dev                 # then: curl http://127.0.0.1:7000/\n"
        "  hbone dev --selftest      # one request through the tunnel, then exit\n"
    )


class _Hello:
    """The demo target: a tiny HTTP/1.1 page, served by twisted.web."""

    @staticmethod
    def site():
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Page(Resource):
            isLeaf = True

            def render_GET(self, request):
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return (
                    "hello from 127.0.0.1:%d, reached through an HBONE tunnel\n"
                    "(TCP -> mTLS HTTP/2 CONNECT -> TCP; see the hbone log for the tunnel summary)\n"
                    % request.getHost().port
                ).encode()

        site = Site(Page())
        site.noisy = False
        site.log = lambda request: None
        return site


def _startDemoTarget(reactor, port: int):
    """Serve the demo page on 127.0.0.1:``port`` until the reactor shuts down."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    d = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(_Hello.site())

    def listening(p):
        reactor.addSystemEventTrigger("before", "shutdown", p.stopListening)
        return p

    return d.addCallback(listening)


def devMain(argv: list[str]) -> int:
    options = _parser().parse_args(argv)
    if options.config:
        return _devConfig(options)
    from hbone.ca import ensureDevIdentity
    from hbone.cli import _run, _startLogging
    from hbone.service import Node, NodeSpec
    from hbone.tls import Identity
    from hbone.urls import parseHop, parseListener

    state = Path(options.state)
    paths = ensureDevIdentity(state, TRUST_DOMAIN, {"server": SERVER_ID, "client": CLIENT_ID})
    server = Identity.fromDirectory(paths["server"])
    client = Identity.fromDirectory(paths["client"])

    from twisted.internet import reactor

    hp, fp, tp = options.hbone_port, options.forward_port, options.target_port
    serverNode = Node(reactor, NodeSpec(
        listeners=(parseListener(f"hbone://127.0.0.1:{hp}"),),
        identity=server,
        allow=(f"127.0.0.1:{tp}",),
    ))
    clientNode = Node(reactor, NodeSpec(
        listeners=(parseListener(f"tcp://127.0.0.1:{fp}/127.0.0.1:{tp}"),),
        hops=(parseHop(f"hbone://127.0.0.1:{hp}?identity={SERVER_ID}"),),
        identity=client,
    ))
    _startLogging(options.verbose, False)

    def ready():
        d = _startDemoTarget(reactor, tp)

        def up(_):
            log.info("certificates in {state}/ (CA, server and client SVIDs)", state=str(state))
            log.info(
                "ready: TCP 127.0.0.1:{fp} -> HBONE mTLS HTTP/2 CONNECT via 127.0.0.1:{hp} "
                "({sid}) -> 127.0.0.1:{tp}",
                fp=fp, hp=hp, tp=tp, sid=SERVER_ID,
            )
            if options.selftest:
                return _selftest(reactor, fp)
            log.info("try:  curl http://127.0.0.1:{fp}/      (Ctrl-C stops)", fp=fp)
            return None

        def failed(f):
            sys.stderr.write(f"hbone: error: demo target on 127.0.0.1:{tp}: {f.getErrorMessage()}\n")
            return 1

        return d.addCallbacks(up, failed)

    return _run(reactor, [serverNode, clientNode], ready)


def _selftest(reactor, port: int):
    from twisted.internet import defer

    async def go():
        ok = await _fetch(reactor, port, b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        sys.stdout.write(f"selftest tcp 127.0.0.1:{port}: {'ok' if ok else 'FAILED'}\n")
        return 0 if ok else 1

    return defer.Deferred.fromCoroutine(go())


def _devConfig(options) -> int:
    """``hbone dev --config FILE``: mint the identity FILE's ``[node] certs`` names
    (spiffe://cluster.local/ns/default/sa/<directory name>), serve the demo page,
    run FILE's node."""
    import configparser

    from hbone.ca import ensureDevIdentity
    from hbone.cli import _run, _startLogging
    from hbone.config import ConfigError, loadConfig
    from hbone.service import Node, NodeConfigError

    path = Path(options.config)
    raw = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        raw.read(path, encoding="utf-8")
        certs = raw.get("node", "certs")
    except (configparser.Error, OSError):
        sys.stderr.write(f"hbone: error: {path}: hbone dev needs a [node] certs directory to mint\n")
        return 2
    certsDir = (path.resolve().parent / certs).resolve()
    name = certsDir.name
    ensureDevIdentity(certsDir.parent, TRUST_DOMAIN, {name: f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{name}"})
    try:
        spec = loadConfig(path)
        from twisted.internet import reactor

        node = Node(reactor, spec)
    except (ConfigError, NodeConfigError) as e:
        sys.stderr.write(f"hbone: error: {e}\n")
        return 2
    _startLogging(options.verbose, False)
    tp = options.target_port

    def ready():
        d = _startDemoTarget(reactor, tp)

        def up(_):
            log.info("identity {id}, certificates in {d}/", id=str(spec.identity.localId), d=str(certsDir))
            tries = []
            for l in spec.listeners:
                port = node.boundPorts().get(str(l))
                if l.scheme == "tcp":
                    tries.append(f"curl http://127.0.0.1:{port}/")
                elif l.scheme in ("auto", "http"):
                    tries.append(f"curl -x http://127.0.0.1:{port} http://127.0.0.1:{tp}/")
                if l.scheme in ("auto", "socks5"):
                    tries.append(f"curl --socks5-hostname 127.0.0.1:{port} http://127.0.0.1:{tp}/")
                if l.scheme == "admin":
                    tries.append(f"hbone status --admin 127.0.0.1:{port}   (or a browser on "
                                 f"http://127.0.0.1:{port}/; metrics on /metrics)")
            if options.selftest:
                return _selftestAll(reactor, node, spec, tp)
            log.info("ready; the demo page is 127.0.0.1:{tp}. Try (Ctrl-C stops):", tp=tp)
            for t in tries:
                log.info("  {t}", t=t)
            return None

        def failed(f):
            sys.stderr.write(f"hbone: error: demo target on 127.0.0.1:{tp}: {f.getErrorMessage()}\n")
            return 1

        return d.addCallbacks(up, failed)

    return _run(reactor, [node], ready)


def _selftestAll(reactor, node, spec, targetPort: int):
    """One request through every tcp listener and every HTTP-capable proxy listener."""
    from twisted.internet import defer

    async def go():
        code = 0
        for l in spec.listeners:
            port = node.boundPorts().get(str(l))
            if l.scheme == "tcp":
                request = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
            elif l.scheme in ("auto", "http"):
                request = f"GET http://127.0.0.1:{targetPort}/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()
            elif l.scheme == "admin":
                ok = await _fetch(reactor, port, b"GET /metrics HTTP/1.0\r\n\r\n", b"hbone_tunnels_opened_total")
                sys.stdout.write(f"selftest admin 127.0.0.1:{port}: {'ok' if ok else 'FAILED'}\n")
                code = code or (0 if ok else 1)
                continue
            else:
                continue
            ok = await _fetch(reactor, port, request)
            sys.stdout.write(f"selftest {l.scheme} 127.0.0.1:{port}: {'ok' if ok else 'FAILED'}\n")
            code = code or (0 if ok else 1)
        return code

    return defer.Deferred.fromCoroutine(go())


async def _fetch(reactor, port: int, request: bytes, expect: bytes = b"reached through an HBONE tunnel") -> bool:
    from twisted.internet import defer
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    class Get(Protocol):
        def connectionMade(self):
            self.chunks = []
            self.done = defer.Deferred()
            self.transport.write(request)

        def dataReceived(self, data):
            self.chunks.append(data)

        def connectionLost(self, reason):
            self.done.callback(b"".join(self.chunks))

    try:
        p = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10).connect(Factory.forProtocol(Get))
        body = await p.done
    except Exception as e:
        sys.stderr.write(f"hbone: selftest: 127.0.0.1:{port}: {e}\n")
        return False
    return b" 200 " in body.split(b"\r\n", 1)[0] and expect in body
