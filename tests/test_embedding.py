"""hbone as a library: the public façade, makeNode, the ``hbone:`` endpoint string
(its plugin, its errors, its shared pool), events with a failing user callback, and
the runnable example in ``examples/``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString, quoteStringArgument
from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin
from twisted.trial import unittest
from zope.interface.verify import verifyObject

import hbone
from hbone.endpoints import EndpointStringError, HBoneClientParser, parseClient
from tests import pki
from tests.protocols import Client, Echo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "serve_web_through_hbone.py"
SERVER_ID_ESCAPED = quoteStringArgument(pki.SERVER_ID)


def _env() -> dict:
    """The project root on sys.path (it holds ``hbone`` and ``twisted/plugins``)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _mint(directory: Path) -> dict[str, Path]:
    from hbone.ca import ensureDevIdentity

    return ensureDevIdentity(directory, pki.TD, {"server": pki.SERVER_ID, "client": pki.CLIENT_ID})


@pytest.fixture(autouse=True)
def _closeMemoryReactorPools():
    """Tests that parse strings for a MemoryReactor leave no pool behind."""
    yield
    from hbone import endpoints

    for r in list(endpoints._pools):
        if r is not reactor:
            hbone.closeEndpointPools(r)


# -- the example ----------------------------------------------------------------


def test_exampleServesAndFetchesThroughATunnel(tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "page: 200 hello from twisted.web, through an HBONE tunnel" in out.stdout
    assert f"event: TunnelClosed inbound {pki.CLIENT_ID} -> 127.0.0.1:" in out.stdout
    assert "reason=None" in out.stdout
    assert "Traceback" not in out.stderr


def test_exampleTakesCerts(tmp_path):
    _mint(tmp_path / "ids")
    out = subprocess.run([sys.executable, str(EXAMPLE), "--certs", str(tmp_path / "ids")], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "page: 200 hello" in out.stdout


def test_docsShowTheExampleAndTheStringVerbatim(tmp_path, monkeypatch):
    """docs/embedding.md carries the example file as is, and its copy-pasteable
    ``hbone:`` string parses (with ./client in the working directory)."""
    from hbone.endpoints import EXAMPLE as STRING

    doc = (ROOT / "docs" / "embedding.md").read_text()
    assert "```python\n" + EXAMPLE.read_text() + "```" in doc
    assert f'clientFromString(reactor, r"{STRING}")' in doc
    _mint(tmp_path)
    monkeypatch.chdir(tmp_path)
    ep = clientFromString(MemoryReactorClock(), STRING)
    assert (ep.hop.host, ep.hop.port, ep.target.authority()) == ("127.0.0.1", 15008, "127.0.0.1:9000")
    assert [str(i) for i in ep.hop.identities] == [pki.SERVER_ID]
    assert str(ep.pool.identity.localId) == pki.CLIENT_ID


# -- the public API -------------------------------------------------------------


def test_publicNamesImport_withoutAReactor():
    """Every name in ``hbone.__all__`` imports, and ``import hbone`` (or the plugin
    module) installs no reactor: twistd must still be free to choose one."""
    code = textwrap.dedent("""
        import sys
        import hbone
        import hbone.endpoints
        assert "twisted.internet.reactor" not in sys.modules, "import hbone imported a reactor"
        missing = [n for n in hbone.__all__ if getattr(hbone, n, None) is None]
        assert not missing, missing
        from hbone import *
        assert "twisted.internet.reactor" not in sys.modules, "a public name imported a reactor"
        print("ok", len(hbone.__all__))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_publicNamesAreTheRealOnes():
    from hbone import errors, events, h2, service

    assert hbone.Node is service.Node
    assert hbone.HBoneClientEndpoint is h2.client.HBoneClientEndpoint
    assert hbone.TunnelRefused is errors.TunnelRefused  # the exception
    assert hbone.TunnelRejected is events.TunnelRejected  # the event
    assert issubclass(hbone.HopIdentityError, hbone.HopUnreachable)
    assert issubclass(hbone.HopUnreachable, hbone.HBoneError)
    assert issubclass(hbone.EndpointStringError, ValueError)
    assert hbone.__version__
    with pytest.raises(AttributeError):
        hbone.NoSuchThing  # noqa: B018


def test_pluginIsDiscovered(tmp_path):
    """With the project root on sys.path, Twisted's plugin system finds the ``hbone``
    prefix, and ``clientFromString`` builds an HBoneClientEndpoint from it."""
    ids = _mint(tmp_path / "ids")
    description = (f"hbone:host=127.0.0.1:port=15008:target=127.0.0.1\\:9000"
                   f":certs={quoteStringArgument(str(ids['client']))}:identity={SERVER_ID_ESCAPED}")
    code = textwrap.dedent(f"""
        from twisted.plugin import getPlugins
        from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
        from twisted.internet.endpoints import clientFromString
        from twisted.internet.testing import MemoryReactor
        prefixes = [p.prefix for p in getPlugins(IStreamClientEndpointStringParserWithReactor)]
        assert "hbone" in prefixes, prefixes
        ep = clientFromString(MemoryReactor(), {description!r})
        print(type(ep).__name__, ep.hop.host, ep.hop.port, ep.target.authority(), *ep.hop.identities)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["HBoneClientEndpoint", "127.0.0.1", "15008", "127.0.0.1:9000", pki.SERVER_ID]


def test_parserProvidesThePluginInterfaces():
    parser = HBoneClientParser()
    verifyObject(IPlugin, parser)
    verifyObject(IStreamClientEndpointStringParserWithReactor, parser)
    assert parser.prefix == "hbone"


# -- the endpoint string --------------------------------------------------------


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    return _mint(tmp_path_factory.mktemp("ids"))


def _string(ids, **fields) -> str:
    base = {"host": "127.0.0.1", "port": "15008", "target": r"127.0.0.1\:9000",
            "certs": quoteStringArgument(str(ids["client"])), "identity": SERVER_ID_ESCAPED}
    base.update(fields)
    return "hbone:" + ":".join(f"{k}={v}" for k, v in base.items() if v is not None)


@pytest.mark.parametrize("fields, expected", [
    ({"target": "127.0.0.1:9000"}, ["stray field '9000'", r"'\:'"]),
    ({"identity": "spiffe://cluster.local/ns/default/sa/server"}, ["stray field '//cluster.local"]),
    ({"target": None}, ["target= missing"]),
    ({"target": "127.0.0.1"}, ["target='127.0.0.1'", "missing port"]),
    ({"target": r"127.0.0.1\:0"}, ["target=", "out of range"]),
    ({"host": None}, ["host= missing"]),
    ({"host": "bad host"}, ["host='bad host'"]),
    ({"port": "http"}, ["port='http'", "1-65535"]),
    ({"port": "70000"}, ["port='70000'"]),
    ({"tagret": "x"}, ["unknown field tagret="]),
    ({"method": "get"}, ["method='get'", "connect or post"]),
    ({"identity": "bob"}, ["identity='bob'"]),
    ({"certs": None}, ["no identity", "certs=DIR"]),
    ({"certs": "/nonexistent/hbone"}, ["certs=", "/nonexistent/hbone", "not a directory"]),
    ({"certs": None, "cert": "/x.pem"}, ["key= and ca= missing"]),
    ({"cert": "/x.pem"}, ["certs= or cert=, key= and ca=, not both"]),
    ({"tls": "none"}, ["tls='none'", "mtls (default) or server"]),
    ({"tls": "server"}, ["identity= needs tls=mtls"]),
    ({"token": "@/run/jwt"}, ["token= applies to tls=server"]),
    ({"tls": "server", "identity": None, "token": "eyJhbGciOi"}, ["token= takes @FILE", "never the token itself"]),
    ({"cafile": "/ca.pem"}, ["cafile= applies to tls=server"]),
])
def test_malformedStringNamesTheField(ids, fields, expected):
    description = _string(ids, **fields)
    with pytest.raises(EndpointStringError) as caught:
        clientFromString(MemoryReactorClock(), description)
    message = str(caught.value)
    assert message.startswith("hbone: endpoint string: ")
    for part in expected:
        assert part in message, message
    assert r"target=127.0.0.1\:9000" in message  # a correct example


def test_stringFields(ids):
    clock = MemoryReactorClock()
    ep = clientFromString(clock, _string(ids, host=r"[\:\:1]", port="443", target=r"[fd00\:\:1]\:22",
                                         method="POST",
                                         identity=quoteStringArgument(f"{pki.SERVER_ID},spiffe://cluster.local/ns/x/*")))
    assert isinstance(ep, hbone.HBoneClientEndpoint)
    assert (ep.hop.host, ep.hop.port, ep.hop.method) == ("::1", 443, "post")
    assert ep.target.authority() == "[fd00::1]:22"
    assert [str(i) for i in ep.hop.identities] == [pki.SERVER_ID, "spiffe://cluster.local/ns/x/*"]
    ep = clientFromString(clock, _string(ids, port=None, identity=None))
    assert (ep.hop.port, ep.hop.identities, ep.hop.method) == (15008, None, "connect")
    files = {k: quoteStringArgument(str(ids["client"] / n))
             for k, n in (("cert", "cert-chain.pem"), ("key", "key.pem"), ("ca", "root-cert.pem"))}
    ep = clientFromString(clock, _string(ids, certs=None, **files))
    assert str(ep.pool.identity.localId) == pki.CLIENT_ID


def test_stringFields_towardATLSTerminatingLoadBalancer(ids):
    clock = MemoryReactorClock()
    ep = clientFromString(clock, _string(ids, identity=None, certs=None, tls="server", token="@/run/hbone/jwt",
                                         servername="lb.example", cafile="/etc/lb-ca.pem", method="post"))
    hop = ep.hop
    assert (hop.tls, hop.token, hop.serverName, hop.caFile, hop.method) == (
        "server", "/run/hbone/jwt", "lb.example", "/etc/lb-ca.pem", "post")
    assert ep.pool.identity is None  # no SVID needed toward the load balancer
    ep = clientFromString(clock, _string(ids, identity=None, tls="server"))
    assert str(ep.pool.identity.localId) == pki.CLIENT_ID  # presented if the balancer asks


def test_endpointsShareOnePoolPerReactorAndIdentity(ids):
    a, b = MemoryReactorClock(), MemoryReactorClock()
    ep1 = parseClient(a, host="127.0.0.1", target="127.0.0.1:1", certs=str(ids["client"]))
    ep2 = clientFromString(a, _string(ids, host="10.0.0.1"))
    ep3 = clientFromString(b, _string(ids))
    ep4 = clientFromString(a, _string(ids, certs=quoteStringArgument(str(ids["server"]))))
    assert ep1.pool is ep2.pool
    assert ep3.pool is not ep1.pool
    assert ep4.pool is not ep1.pool
    # the pools close when the reactor shuts down
    assert [t for t in a.triggers["before"]["shutdown"] if t[0].__name__ == "_closeAtShutdown"]
    for r in (a, b):
        hbone.closeEndpointPools(r)
    ep5 = clientFromString(a, _string(ids))
    assert ep5.pool is not ep1.pool  # a closed pool is never handed out again
    hbone.closeEndpointPools(a)


# -- makeNode -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, expected", [
    ({"listen": ["bogus://x:1"]}, "listen bogus://x:1: unknown scheme"),
    ({"listen": "hbone://127.0.0.1:0", "forward": ["hbone://gw:15008?idenity=x"]}, "forward hbone://gw:15008?idenity=x: unknown option"),
    ({"listen": ["hbone://127.0.0.1:0"]}, "needs an identity"),
    ({}, "listen: give at least one listener URL"),
    ({"listen": ["tcp://:0/1.2.3.4:5"], "config": "node.ini"}, "config= describes the whole node; listen go in the file"),
    ({"listen": ["tcp://:0/1.2.3.4:5"], "certs": "/nonexistent"}, "certs: --certs /nonexistent: not a directory"),
    ({"listen": ["tcp://:0/1.2.3.4:5"], "cert": "c.pem"}, "key, ca: missing"),
])
def test_makeNodeErrorsNameTheArgument(kwargs, expected):
    with pytest.raises(hbone.NodeConfigError) as caught:
        hbone.makeNode(MemoryReactorClock(), **kwargs)
    assert expected in str(caught.value)


def test_makeNodeFromKeywordsAndFromConfig(ids, tmp_path):
    clock = MemoryReactorClock()
    events = hbone.Events()
    node = hbone.makeNode(clock, listen="hbone://127.0.0.1:0", forward=["hbone://10.0.0.1:15008"],
                          certs=ids["server"], allow=["127.0.0.1:9000"], allowPeers="spiffe://cluster.local/ns/x/*",
                          events=events, name="embedded")
    assert isinstance(node, hbone.Node)
    assert node.events is events
    assert [str(l.spec) for l in node.listeners] == ["hbone://127.0.0.1:0"]
    assert [str(h) for h in node.spec.hops] == ["hbone://10.0.0.1:15008"]
    assert (node.spec.allow, node.spec.allowPeers, node.spec.name) == (
        ("127.0.0.1:9000",), ("spiffe://cluster.local/ns/x/*",), "embedded")
    assert str(node.identity.localId) == pki.SERVER_ID
    ini = tmp_path / "node.ini"
    ini.write_text(f"[node]\ncerts = {ids['server']}\nallow = 127.0.0.1:9000\n\n"
                   "[listener:in]\nurl = hbone://127.0.0.1:0\n")
    node = hbone.makeNode(clock, config=ini)
    assert str(node.identity.localId) == pki.SERVER_ID
    assert node.spec.allow == ("127.0.0.1:9000",)
    ini.write_text("[node]\nalow = 1\n")
    with pytest.raises(hbone.NodeConfigError, match=r"\[node\] unknown key 'alow'"):
        hbone.makeNode(clock, config=ini)


# -- real tunnels ---------------------------------------------------------------






class Boom(Exception):
    pass


class EndpointStringTunnels(unittest.TestCase):
    """``clientFromString(reactor, "hbone:...")`` against a node, on the real reactor."""

    timeout = 60

    def setUp(self):
        scratch = tempfile.TemporaryDirectory(prefix="hbone-test-")  # not trial's mktemp: it writes into the cwd
        self.addCleanup(scratch.cleanup)
        self.ids = _mint(Path(scratch.name))

    async def serve(self, node=None):
        """An echo server, and a node with an HBONE listener allowed to reach it."""
        echo = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
        self.addCleanup(echo.stopListening)
        self.echoPort = echo.getHost().port
        node = hbone.makeNode(reactor, listen=["hbone://127.0.0.1:0"], certs=self.ids["server"],
                              allow=[f"127.0.0.1:{self.echoPort}"])
        await node.startListening()
        node.startService()
        self.addCleanup(node.stopService)
        # cleanups run last-in first-out: the client pools close before the node
        self.addCleanup(hbone.closeEndpointPools, reactor)
        self.hbonePort = node.boundPorts()["hbone://127.0.0.1:0"]
        return node

    def endpoint(self, **fields):
        base = {"host": "127.0.0.1", "port": self.hbonePort, "target": f"127.0.0.1\\:{self.echoPort}",
                "certs": quoteStringArgument(str(self.ids["client"])), "identity": SERVER_ID_ESCAPED}
        base.update(fields)
        return clientFromString(reactor, "hbone:" + ":".join(f"{k}={v}" for k, v in base.items() if v != ""))

    async def roundTrip(self, endpoint, payload: bytes) -> bytes:
        proto = await endpoint.connect(Factory.forProtocol(lambda: Client(payload)))
        return await proto.done

    def test_tunnelsShareOneConnection(self):
        async def go():
            await self.serve()
            ep1, ep2 = self.endpoint(), self.endpoint(method="post")
            self.assertIs(ep1.pool, ep2.pool)
            payload = os.urandom(256 * 1024)
            got = await defer.gatherResults([
                defer.Deferred.fromCoroutine(self.roundTrip(ep1, payload)),
                defer.Deferred.fromCoroutine(self.roundTrip(ep2, b"post form")),
            ])
            self.assertEqual(got, [payload, b"post form"])
            self.assertEqual(ep1.pool.connectionsOpened, 1)

        return defer.Deferred.fromCoroutine(go())

    def test_serverAuthTLS_checksTheNameAndCarriesTheTunnel(self):
        """tls=server: the peer is checked by name against cafile= (here the node's own
        listener, whose certificate carries IP 127.0.0.1), not by SPIFFE ID."""

        async def go():
            await self.serve()
            ca = quoteStringArgument(str(self.ids["client"] / "root-cert.pem"))
            ep = self.endpoint(identity="", tls="server", cafile=ca)
            self.assertEqual(await self.roundTrip(ep, b"by name"), b"by name")
            wrong = self.endpoint(identity="", tls="server", cafile=ca, servername="lb.example")
            with self.assertRaises(hbone.HopIdentityError) as caught:
                await self.roundTrip(wrong, b"x")
            self.assertIn("lb.example", str(caught.exception))

        return defer.Deferred.fromCoroutine(go())

    def test_wrongPeerIdentityIsAHopIdentityError(self):
        async def go():
            await self.serve()
            ep = self.endpoint(identity=quoteStringArgument("spiffe://cluster.local/ns/default/sa/other"))
            with self.assertRaises(hbone.HopIdentityError) as caught:
                await self.roundTrip(ep, b"x")
            self.assertIn("is not the expected spiffe://cluster.local/ns/default/sa/other", str(caught.exception))

        return defer.Deferred.fromCoroutine(go())

    def test_refusedTargetIsTunnelRefused(self):
        async def go():
            await self.serve()
            ep = self.endpoint(target="127.0.0.1\\:1")  # not allowed by the node's policy
            with self.assertRaises(hbone.TunnelRefused) as caught:
                await self.roundTrip(ep, b"x")
            self.assertEqual(caught.exception.status, 403)

        return defer.Deferred.fromCoroutine(go())

    def test_refusedTargetIsAnEvent(self):
        async def go():
            node = await self.serve()
            seen = []
            node.events.subscribe(seen.append)
            with self.assertRaises(hbone.TunnelRefused):
                await self.roundTrip(self.endpoint(target="127.0.0.1\\:1"), b"x")
            refused = [e for e in seen if isinstance(e, hbone.TunnelRejected)]
            self.assertEqual([(e.peer, e.target, e.status) for e in refused], [(pki.CLIENT_ID, "127.0.0.1:1", 403)])

        return defer.Deferred.fromCoroutine(go())

    def test_failingCallbackIsLoggedAndTheTunnelCompletes(self):
        async def go():
            node = await self.serve()
            seen = []
            closed = defer.Deferred()

            def broken(event):
                raise Boom(f"user callback failed on {type(event).__name__}")

            def watch(event):
                seen.append(event)
                if isinstance(event, hbone.TunnelClosed) and not closed.called:
                    closed.callback(event)

            unsubscribe = node.events.subscribe(broken)  # first: the fan-out must carry on past it
            self.addCleanup(unsubscribe)  # before the node stops (its connections close then)
            node.events.subscribe(watch)
            payload = os.urandom(64 * 1024)
            self.assertEqual(await self.roundTrip(self.endpoint(), payload), payload)
            event = await closed
            self.assertEqual((event.peer, event.target, event.reason), (pki.CLIENT_ID, f"127.0.0.1:{self.echoPort}", None))
            self.assertEqual((event.bytesUp, event.bytesDown), (len(payload), len(payload)))
            tunnelEvents = [e for e in seen if isinstance(e, (hbone.TunnelOpened, hbone.TunnelClosed))]
            self.assertIsInstance(tunnelEvents[0], hbone.TunnelOpened)
            failures = self.flushLoggedErrors(Boom)
            # each event the broken callback saw was logged: the connection and the tunnel
            self.assertEqual(sorted(str(f.value).rsplit(" ", 1)[1] for f in failures),
                             ["ConnectionOpened", "TunnelClosed", "TunnelOpened"])

        return defer.Deferred.fromCoroutine(go())

    def test_nodeInARunningMultiServiceBindsAndStops(self):
        async def go():
            echo = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
            self.addCleanup(echo.stopListening)
            self.echoPort = echo.getHost().port
            app = MultiService()
            app.privilegedStartService()
            app.startService()
            node = hbone.makeNode(reactor, listen=["hbone://127.0.0.1:0"], certs=self.ids["server"],
                                  allow=[f"127.0.0.1:{self.echoPort}"])
            node.setServiceParent(app)  # binds now: the parent is running
            self.addCleanup(hbone.closeEndpointPools, reactor)
            self.hbonePort = node.boundPorts()["hbone://127.0.0.1:0"]
            self.assertEqual(await self.roundTrip(self.endpoint(), b"in a service tree"), b"in a service tree")
            await hbone.closeEndpointPools(reactor)
            await app.stopService()
            self.assertEqual(node.boundPorts(), {})

        return defer.Deferred.fromCoroutine(go())
