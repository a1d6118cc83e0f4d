"""H2R reverse tunnels (PROTOCOL §9; SECURITY S38-S44): a node behind NAT dials the
gateway and serves the tunnels the gateway opens over that connection."""

from __future__ import annotations

import hashlib
import os
import random
import time

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from hbone.h2r import Backoff, H2RRegistration, H2RStatus, parseBindings
from hbone.service import Node, NodeConfigError, NodeSpec
from hbone.urls import parseHop, parseListener
from tests import pki
from tests.protocols import Client, Echo, waitFor

NODE_ID = f"spiffe://{pki.TD}/ns/default/sa/laptop"
OTHER_ID = f"spiffe://{pki.TD}/ns/default/sa/intruder"
GW_ID = f"spiffe://{pki.TD}/ns/default/sa/gw"


# -- S44: backoff with a fake clock ---------------------------------------------------------


def test_S44_backoffSequence():
    b = Backoff(rng=random.Random(7))
    delays = [b.failure() for _ in range(7)]
    for got, base in zip(delays, [1, 2, 4, 8, 16, 30, 30]):
        assert base * 0.8 <= got <= base * 1.2, delays
    assert len({round(d / base, 3) for d, base in zip(delays, [1, 2, 4, 8, 16, 30, 30])}) > 1  # jittered
    # a registration that stayed live 30 s resets it; a shorter one does not
    assert 0.8 <= b.lost(30.0) <= 1.2
    assert 1.6 <= b.failure() <= 2.4
    assert 3.2 <= b.lost(29.0) <= 4.8
    # a refusal is retried at the cap
    assert 24 <= b.refused() <= 36
    assert 24 <= b.failure() <= 36


def test_bindings():
    got = parseBindings(["laptop=" + NODE_ID, "Laptop=spiffe://cluster.local/ns/x/*", "db=" + OTHER_ID])
    assert [str(p) for p in got["laptop"]] == [NODE_ID, "spiffe://cluster.local/ns/x/*"]
    for bad in ("laptop", "=x", "laptop=", "bad name=" + NODE_ID, "x=notanid"):
        with pytest.raises(ValueError):
            parseBindings([bad])


def test_nodeConfigErrors():
    with pytest.raises(NodeConfigError, match="rtcp exports need a gateway"):
        Node(task.Clock(), NodeSpec(listeners=(parseListener("rtcp://laptop:22/127.0.0.1:22"),),
                                    identity=pki.serverIdentity()))
    with pytest.raises(NodeConfigError, match="nothing is exported"):
        Node(task.Clock(), NodeSpec(listeners=(parseListener("tcp://127.0.0.1:0/127.0.0.1:9"),),
                                    hops=(parseHop("h2r://127.0.0.1:15441"),), identity=pki.serverIdentity()))








class _H2RCase(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.logs = []
        observer = lambda e: self.logs.append(e)  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def logText(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.logs)

    async def start(self, spec: NodeSpec) -> Node:
        node = Node(reactor, spec)
        await node.startListening()
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        return node

    async def echo(self):
        factory = Factory.forProtocol(Echo)
        factory.accepted = 0
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def gateway(self, h2rPort: int = 0, hbonePort: int = 0, bind=(f"laptop={NODE_ID}",)):
        query = "&".join(f"bind={b}" for b in bind)
        return await self.start(NodeSpec(
            listeners=(parseListener(f"h2r://127.0.0.1:{h2rPort}?{query}"),
                       parseListener(f"hbone://127.0.0.1:{hbonePort}")),
            identity=pki.identity(GW_ID), drainTimeout=0))

    def ports(self, gw: Node) -> tuple[int, int]:
        ports = list(gw.boundPorts().values())
        return ports[0], ports[1]

    async def reverseNode(self, h2rPort: int, exports, identity=None, settings=None):
        from hbone.h2.connection import ConnectionSettings

        spec = NodeSpec(listeners=tuple(parseListener(f"rtcp://{e}") for e in exports),
                        hops=(parseHop(f"h2r://127.0.0.1:{h2rPort}?identity={GW_ID}"),),
                        identity=identity or pki.identity(NODE_ID), drainTimeout=0,
                        settings=settings or ConnectionSettings())
        node = Node(reactor, spec)
        for c in node.connectors:  # fast, deterministic retries in tests
            c.backoff = Backoff(initial=0.05, cap=0.2, rng=random.Random(1))
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        return node

    async def client(self, hbonePort: int, target: str):
        return await self.start(NodeSpec(
            listeners=(parseListener(f"tcp://127.0.0.1:0/{target}"),),
            hops=(parseHop(f"hbone://127.0.0.1:{hbonePort}?identity={GW_ID}"),),
            identity=pki.clientIdentity(), drainTimeout=0))

    async def roundTrip(self, port: int, payload: bytes):
        proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(lambda: Client(payload)))
        return await proto.done, proto


class H2RTests(_H2RCase):
    def test_reverseTunnel_hashEqualBothWays_andTheExportIsThePolicy(self):
        async def go():
            echo, echoPort = await self.echo()
            gw = await self.gateway()
            h2rPort, hbonePort = self.ports(gw)
            node = await self.reverseNode(h2rPort, [f"laptop:22/127.0.0.1:{echoPort}"])
            await waitFor(lambda: gw.registry.live("laptop") and node.connectors[0].state == "connected")
            client = await self.client(hbonePort, "laptop:22")
            fwd = list(client.boundPorts().values())[0]
            for size in (1, 3 * 1024 * 1024):
                payload = os.urandom(size)
                got, _ = await self.roundTrip(fwd, payload)
                self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
            self.assertEqual(echo.accepted, 2)
            # S41: an unexported port and an S31 address: 403, and the node opens no socket
            for target in ("laptop:23", f"laptop:{echoPort}"):
                bad = await self.client(hbonePort, target)
                got, proto = await self.roundTrip(list(bad.boundPorts().values())[0], b"x")
                self.assertEqual(got, b"")
            self.assertEqual(echo.accepted, 2)
            self.assertIn("laptop:23 is not exported by this node", self.logText())
            # the gateway's tunnels were carried over the node's connection
            inbound = [t for t in node.tracker.tunnels]
            self.assertEqual(inbound, [])
            self.assertEqual(node.tracker.opened, 2)

        return defer.Deferred.fromCoroutine(go())

    def test_S38_aNameBoundToAnotherIdentity_isRefused(self):
        async def go():
            echo, echoPort = await self.echo()
            gw = await self.gateway(bind=(f"laptop={NODE_ID}",))
            h2rPort, hbonePort = self.ports(gw)
            good = await self.reverseNode(h2rPort, [f"laptop:22/127.0.0.1:{echoPort}"])
            await waitFor(lambda: gw.registry.live("laptop"))
            seen = []
            gw.events.subscribe(seen.append)
            intruder = await self.reverseNode(h2rPort, [f"laptop:22/127.0.0.1:{echoPort}"],
                                              identity=pki.identity(OTHER_ID))
            await waitFor(lambda: intruder.connectors[0].state == "refused")
            refused = [e for e in seen if isinstance(e, H2RRegistration) and e.state == "refused"]
            self.assertTrue(refused)
            self.assertIn(OTHER_ID, refused[0].detail)
            self.assertIn(f"H2R registration refused: no name is bound to {OTHER_ID}", self.logText())
            self.assertEqual(len(gw.registry.live("laptop")), 1)  # A untouched
            self.assertEqual(good.connectors[0].state, "connected")
            client = await self.client(hbonePort, "laptop:22")
            got, _ = await self.roundTrip(list(client.boundPorts().values())[0], b"still A")
            self.assertEqual(got, b"still A", self.logText())
            self.assertIn(f"refused us ({OTHER_ID}, for laptop:22)", self.logText())

        return defer.Deferred.fromCoroutine(go())

    def test_boundNameWithoutANode_waitsThen503_andNeverDNS(self):
        async def go():
            gw = await self.gateway(bind=(f"laptop={NODE_ID}",))
            gw.registry.waitForNode = 0.3
            h2rPort, hbonePort = self.ports(gw)
            client = await self.client(hbonePort, "laptop:22")
            seen = []
            client.events.subscribe(seen.append)
            started = time.monotonic()
            got, proto = await self.roundTrip(list(client.boundPorts().values())[0], b"x")
            self.assertEqual(got, b"")
            self.assertGreaterEqual(time.monotonic() - started, 0.3)
            self.assertIn("no node serves laptop now", self.logText())
            self.assertIn("503", self.logText())

        return defer.Deferred.fromCoroutine(go())

    def test_gatewayRestart_nodeReRegistersByItself_andLostNodeResetsTunnels(self):
        async def go():
            echo, echoPort = await self.echo()
            gw = await self.gateway()
            h2rPort, hbonePort = self.ports(gw)
            node = await self.reverseNode(h2rPort, [f"laptop:22/127.0.0.1:{echoPort}"])
            await waitFor(lambda: gw.registry.live("laptop"))
            await gw.stopService()
            await waitFor(lambda: node.connectors[0].state == "retrying")
            gw2 = await self.gateway(h2rPort, hbonePort)
            await waitFor(lambda: gw2.registry.live("laptop"))
            client = await self.client(hbonePort, "laptop:22")
            got, _ = await self.roundTrip(list(client.boundPorts().values())[0], b"after the restart")
            self.assertEqual(got, b"after the restart")
            self.assertEqual(node.connectors[0].state, "connected")

        return defer.Deferred.fromCoroutine(go())

    def test_S43_postFormOverH2R_is400(self):
        async def go():
            echo, echoPort = await self.echo()
            gw = await self.gateway()
            h2rPort, hbonePort = self.ports(gw)
            await self.reverseNode(h2rPort, [f"laptop:22/127.0.0.1:{echoPort}"])
            await waitFor(lambda: gw.registry.live("laptop"))
            (conn,) = gw.registry.live("laptop")
            headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"laptop:22"),
                       (b":path", b"/_hbone/laptop:22")]
            stream, response = conn.openTunnel(headers, "laptop:22")
            with self.assertRaises(Exception) as caught:
                await response
            self.assertIn("400", str(caught.exception))
            self.assertEqual(echo.accepted, 0)

        return defer.Deferred.fromCoroutine(go())


# -- real processes: node, gateway and client; a real sshd behind the node ----------------------

import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from hbone.ca import certificatePEM, privateKeyPEM  # noqa: E402
from tests.conftest import pickFreePorts, requirePeer, waitForPort  # noqa: E402


def _identityDir(directory: Path, spiffeId: str) -> Path:
    identity = pki.identity(spiffeId)
    directory.mkdir(parents=True)
    (directory / "cert-chain.pem").write_bytes(certificatePEM(*identity.chain))
    (directory / "key.pem").write_bytes(privateKeyPEM(identity._key))
    os.chmod(directory / "key.pem", 0o600)
    (directory / "root-cert.pem").write_bytes(certificatePEM(pki.ca()[0]))
    return directory


class _Proc:
    def __init__(self, argv):
        self.p = subprocess.Popen([sys.executable, "-m", "hbone.cli", *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True).start()

    def text(self) -> str:
        return "".join(self.lines)

    def waitFor(self, needle: str, count: int = 1, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while self.text().count(needle) < count:
            if time.monotonic() > deadline or self.p.poll() is not None:
                raise AssertionError(f"{needle!r} x{count} not seen:\n{self.text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        return self.p.returncode


@pytest.mark.peers
def test_processes_sshThroughAReverseTunnel_andAGatewayRestart(tmp_path):
    """The laptop/sshd walk-through of docs/reverse-tunnels.md, with real processes."""
    sshd, ssh, keygen = requirePeer("sshd", "ssh", "ssh-keygen")
    ids = {name: _identityDir(tmp_path / name, f"spiffe://{pki.TD}/ns/default/sa/{name}")
           for name in ("gw", "laptop", "me")}
    h2rPort, hbonePort, sshPort = pickFreePorts(3)
    for key in ("host", "client"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / key)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "client.pub").read_text())
    os.chmod(tmp_path / "authorized_keys", 0o600)
    config = tmp_path / "sshd_config"
    config.write_text(f"""Port {sshPort}
ListenAddress 127.0.0.1
HostKey {tmp_path / 'host'}
UsePAM no
PidFile none
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AuthorizedKeysFile {tmp_path / 'authorized_keys'}
""")
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    except PermissionError:
        pass  # not root: the package made it, or sshd says what is missing
    daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    gateway = node = None
    procs = []

    def startGateway():
        p = _Proc(["--certs", str(ids["gw"]), "-L", f"h2r://127.0.0.1:{h2rPort}?bind=laptop=spiffe://{pki.TD}/ns/default/sa/laptop",
                   "-L", f"hbone://127.0.0.1:{hbonePort}"])
        procs.append(p)
        waitForPort("127.0.0.1", hbonePort, 20, p.p)
        return p

    gwId = f"spiffe://{pki.TD}/ns/default/sa/gw"
    proxy = (f"{sys.executable} -m hbone.cli connect %h:%p --certs {ids['me']} "
             f"-F hbone://127.0.0.1:{hbonePort}?identity={gwId}")

    def sshRun(command: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run([ssh, "-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no",
                               "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                               "-i", str(tmp_path / "client"), "-p", "22", f"{os.environ.get('USER') or 'root'}@laptop",
                               command], input=stdin, capture_output=True, timeout=60)

    try:
        waitForPort("127.0.0.1", sshPort, 20, daemon)
        gateway = startGateway()
        node = _Proc(["--certs", str(ids["laptop"]), "-L", f"rtcp://laptop:22/127.0.0.1:{sshPort}",
                      "-F", f"h2r://127.0.0.1:{h2rPort}?identity={gwId}"])
        procs.append(node)
        node.waitFor("connected (as spiffe://")
        payload = os.urandom(512 * 1024)
        out = sshRun("cat", payload)
        assert out.returncode == 0, out.stderr.decode() + gateway.text() + node.text()
        assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(payload).digest()
        # the gateway restarts; the node registers again without anyone telling it to
        assert gateway.stop() == 0, gateway.text()
        node.waitFor("retrying in")
        gateway = startGateway()
        node.waitFor("connected (as spiffe://", count=2)
        out = sshRun("echo through-the-restarted-gateway")
        assert out.returncode == 0, out.stderr.decode() + gateway.text() + node.text()
        assert out.stdout.strip() == b"through-the-restarted-gateway"
    finally:
        codes = [p.stop() for p in procs]
        daemon.terminate()
        daemon.wait(10)
    assert codes[-1] == 0 and codes[-2] == 0, "".join(p.text() for p in procs)


class H2REndpointTests(_H2RCase):
    """``serverFromString(reactor, "h2r:...")``: any Twisted server behind NAT."""

    def test_aWebSiteServedThroughTheH2REndpoint(self):
        from twisted.internet.endpoints import serverFromString, quoteStringArgument
        from twisted.internet.threads import deferToThread
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        async def go():
            import tempfile

            scratch = tempfile.TemporaryDirectory(prefix="hbone-h2r-")
            self.addCleanup(scratch.cleanup)
            certs = _identityDir(Path(scratch.name) / "site", f"spiffe://{pki.TD}/ns/default/sa/site")
            gw = await self.gateway(bind=(f"site=spiffe://{pki.TD}/ns/default/sa/site",))
            h2rPort, hbonePort = self.ports(gw)
            class Page(Resource):
                isLeaf = True

                def render_GET(self, request):
                    request.setHeader(b"content-type", b"text/plain")
                    return b"served from behind NAT\n"

            root = Page()
            endpoint = serverFromString(
                reactor, f"h2r:host=127.0.0.1:port={h2rPort}:name=site:expose=80:certs={quoteStringArgument(str(certs))}"
                         f":identity={quoteStringArgument(GW_ID)}")
            port = await endpoint.listen(Site(root))
            self.addCleanup(port.stopListening)
            await waitFor(lambda: gw.registry.live("site"))
            client = await self.client(hbonePort, "site:80")
            fwd = list(client.boundPorts().values())[0]

            def get():
                import socket as s

                with s.create_connection(("127.0.0.1", fwd), timeout=10) as c:
                    c.sendall(b"GET / HTTP/1.0\r\nHost: site\r\n\r\n")
                    body = b""
                    while data := c.recv(65536):
                        body += data
                return body

            body = await deferToThread(get)
            self.assertTrue(body.startswith(b"HTTP/1.0 200"), body)
            self.assertTrue(body.endswith(b"served from behind NAT\n"))
            # an unexposed port of the same name: 403 at the node, nothing served
            bad = await self.client(hbonePort, "site:81")
            got, _ = await self.roundTrip(list(bad.boundPorts().values())[0], b"GET / HTTP/1.0\r\n\r\n")
            self.assertEqual(got, b"")

        return defer.Deferred.fromCoroutine(go())


def test_h2rEndpointStringErrors(tmp_path):
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactorClock

    from hbone.endpoints import EndpointStringError

    for text, message in [
        ("h2r:port=15441:name=x:expose=22:certs=/x", "host= missing"),
        ("h2r:host=gw:name=x:certs=/x", "expose= missing"),
        ("h2r:host=gw:expose=22:certs=/x", "name= missing"),
        ("h2r:host=gw:name=x:expose=ssh:certs=/x", "expected port numbers"),
        ("h2r:host=gw:name=x:expose=22:tagret=1", "unknown field tagret="),
        ("h2r:host=gw:name=x:expose=22", "no identity"),
        ("h2r:host=gw:name=x:expose=22:certs=/nonexistent", "not a directory"),
    ]:
        with pytest.raises(EndpointStringError) as caught:
            serverFromString(MemoryReactorClock(), text)
        assert message in str(caught.value), (text, str(caught.value))
        assert str(caught.value).startswith("h2r: endpoint string: ")


class H2RReloadAndMetricsTests(_H2RCase):
    def test_reloadUnbinds_andTheAdminShowsRegistrations(self):
        async def go():
            import json
            import urllib.request

            from twisted.internet.threads import deferToThread

            echo, echoPort = await self.echo()
            gw = await self.start(NodeSpec(
                listeners=(parseListener("h2r://127.0.0.1:0"), parseListener("admin://127.0.0.1:0")),
                h2rBindings=(f"laptop={NODE_ID}",), identity=pki.identity(GW_ID), drainTimeout=0))
            h2rPort, adminPort = list(gw.boundPorts().values())
            await self.reverseNode(h2rPort, [f"laptop:22/127.0.0.1:{echoPort}"])
            await waitFor(lambda: gw.registry.live("laptop"))

            def get(path):
                with urllib.request.urlopen(f"http://127.0.0.1:{adminPort}{path}", timeout=10) as r:
                    return r.read().decode()

            rows = json.loads(await deferToThread(get, "/h2r"))
            self.assertEqual([(r["name"], r["identity"], r["live"]) for r in rows["registrations"]],
                             [("laptop", NODE_ID, True)])
            metrics = await deferToThread(get, "/metrics")
            self.assertIn("hbone_h2r_registrations 1.0", metrics)
            self.assertIn('hbone_h2r_registration_events_total{state="registered"} 1.0', metrics)
            result = gw.reload(NodeSpec(listeners=gw.spec.listeners, identity=gw.identity, drainTimeout=0))
            self.assertIn("h2r bindings", result["changed"])
            await waitFor(lambda: not gw.registry.live("laptop"))
            self.assertIn("no longer serves laptop: unbound by a reload", self.logText())

        return defer.Deferred.fromCoroutine(go())


def _conchFactory(authorizedKey: bytes):
    """A minimal Twisted conch SSH server: public-key login for "me", and an exec
    that answers ``conch says: <command>``."""
    import struct

    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import rsa
    from twisted.conch.avatar import ConchUser
    from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
    from twisted.conch.interfaces import ISession
    from twisted.conch.ssh import keys, session
    from twisted.conch.ssh.factory import SSHFactory
    from twisted.cred.portal import IRealm, Portal
    from zope.interface import implementer as impl

    @impl(ISession)
    class Session:
        def __init__(self, avatar):
            self.avatar = avatar

        def execCommand(self, proto, command):
            proto.write(b"conch says: " + command + b"\n")
            proto.session.conn.sendRequest(proto.session, b"exit-status", struct.pack(">L", 0))
            proto.loseConnection()

        def getPty(self, *a):
            pass

        def openShell(self, proto):
            proto.loseConnection()

        def eofReceived(self):
            pass

        def closed(self):
            pass

    class User(ConchUser):
        def __init__(self, username):
            super().__init__()
            self.username = username
            self.channelLookup[b"session"] = session.SSHSession

    from twisted.python import components

    components.registerAdapter(Session, User, ISession)

    @impl(IRealm)
    class Realm:
        def requestAvatar(self, avatarId, mind, *interfaces):
            return interfaces[0], User(avatarId), lambda: None

    hostKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = hostKey.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL, ser.NoEncryption())
    factory = SSHFactory()
    factory.privateKeys = {b"ssh-rsa": keys.Key.fromString(pem)}
    factory.publicKeys = {b"ssh-rsa": keys.Key.fromString(pem).public()}
    factory.portal = Portal(Realm(), [SSHPublicKeyChecker(InMemorySSHKeyDB({b"me": [keys.Key.fromString(authorizedKey)]}))])
    return factory


class ConchThroughH2RTests(_H2RCase):
    @pytest.mark.peers
    def test_aConchSSHServerThroughTheH2REndpoint(self):
        """A Twisted conch SSH server behind NAT, served by the h2r: endpoint, reached
        by OpenSSH's ssh with hbone connect as its ProxyCommand."""
        (ssh, keygen) = requirePeer("ssh", "ssh-keygen")
        from twisted.internet.endpoints import quoteStringArgument, serverFromString
        from twisted.internet.threads import deferToThread

        async def go():
            import tempfile

            scratch = Path(tempfile.mkdtemp(prefix="hbone-conch-"))
            self.addCleanup(shutil.rmtree, scratch, True)
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(scratch / "me")], check=True)
            siteCerts = _identityDir(scratch / "site", f"spiffe://{pki.TD}/ns/default/sa/site")
            meCerts = _identityDir(scratch / "mine", f"spiffe://{pki.TD}/ns/default/sa/me")
            gw = await self.gateway(bind=(f"site=spiffe://{pki.TD}/ns/default/sa/site",))
            h2rPort, hbonePort = self.ports(gw)
            endpoint = serverFromString(
                reactor, f"h2r:host=127.0.0.1:port={h2rPort}:name=site:expose=22"
                         f":certs={quoteStringArgument(str(siteCerts))}:identity={quoteStringArgument(GW_ID)}")
            port = await endpoint.listen(_conchFactory((scratch / "me.pub").read_bytes()))
            self.addCleanup(port.stopListening)
            await waitFor(lambda: gw.registry.live("site"))
            proxy = (f"{sys.executable} -m hbone.cli connect %h:%p --certs {meCerts} "
                     f"-F hbone://127.0.0.1:{hbonePort}?identity={GW_ID}")
            out = await deferToThread(subprocess.run, [
                ssh, "-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-i", str(scratch / "me"), "-p", "22", "me@site", "hello"], capture_output=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr.decode() + self.logText())
            self.assertEqual(out.stdout, b"conch says: hello\n")

        return defer.Deferred.fromCoroutine(go())


class H2RSharingTests(_H2RCase):
    def test_severalGatewaysAndNames_andTheSNIGatewayReachesAnH2RName(self):
        """A node registers with two gateways (``-F h2r://gw1,gw2``) for two names; the
        registry serves every listener of its gateway process: an SNI route whose
        target is a bound name goes over the node's connection."""

        async def go():
            import socket as socketlib

            from twisted.internet.threads import deferToThread

            from hbone.sni import parseRoute
            from tests.test_clienthello import handshake, records, sniExt

            echo, echoPort = await self.echo()
            binds = (f"laptop={NODE_ID}", f"files={NODE_ID}")
            gw1 = await self.gateway(bind=binds)
            gw2Spec = NodeSpec(
                listeners=(parseListener("h2r://127.0.0.1:0?" + "&".join(f"bind={b}" for b in binds)),
                           parseListener("sni://127.0.0.1:0")),
                identity=pki.identity(GW_ID), drainTimeout=0,
                routes=(parseRoute("ssh", "ssh.example", "laptop:22", chain=()),))
            gw2 = await self.start(gw2Spec)
            p1 = self.ports(gw1)[0]
            p2, sniPort = list(gw2.boundPorts().values())
            spec = NodeSpec(listeners=(parseListener(f"rtcp://laptop:22/127.0.0.1:{echoPort}"),
                                       parseListener(f"rtcp://files:22/127.0.0.1:{echoPort}")),
                            hops=(parseHop(f"h2r://127.0.0.1:{p1},127.0.0.1:{p2}?identity={GW_ID}"),),
                            identity=pki.identity(NODE_ID), drainTimeout=0)
            node = Node(reactor, spec)
            node.startService()
            self.addCleanup(lambda: node.running and node.stopService())
            self.assertEqual(len(node.connectors), 2)
            await waitFor(lambda: all(g.registry.live(n) for g in (gw1, gw2) for n in ("laptop", "files")))
            hello = records(handshake(sniExt((0, b"ssh.example"))))

            def through():
                with socketlib.create_connection(("127.0.0.1", sniPort), timeout=10) as s:
                    s.sendall(hello)
                    got = b""
                    while len(got) < len(hello):
                        got += s.recv(65536)
                    return got

            self.assertEqual(await deferToThread(through), hello)  # the echo behind the node answered
            self.assertEqual(echo.accepted, 1)

        return defer.Deferred.fromCoroutine(go())


def test_S44_connectorBackoff_withAFakeClock():
    """The node's redial schedule, driven by a fake clock: failures 1, 2, 4, 8, 16,
    30, 30 s (+-20 %); after a registration that stayed live 30 s, 1 s again; a
    refusal is retried at 30 s and logged as an error every time."""
    from twisted.internet import error as terror
    from twisted.internet.defer import fail

    from hbone.errors import HopIdentityError

    clock = task.Clock()
    outcomes = []

    class Failing:
        def connect(self, factory):
            return fail(outcomes.pop(0))

    from hbone.h2r import ReverseConnector

    connector = ReverseConnector(clock, pki.identity(NODE_ID), "127.0.0.1", 15441, None, None,
                                 backoff=Backoff(rng=random.Random(5)), endpointFactory=lambda h, p: Failing())
    seen = []
    connector.events = type("E", (), {"emit": staticmethod(seen.append)})()
    logged = []
    observer = lambda e: logged.append(e)  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        outcomes.extend(terror.ConnectionRefusedError() for _ in range(7))
        connector.startService()
        delays = []
        for _ in range(7):
            (call,) = clock.getDelayedCalls()
            delays.append(call.getTime() - clock.seconds())
            if len(delays) < 7:
                clock.advance(delays[-1])
        for got, base in zip(delays, [1, 2, 4, 8, 16, 30, 30]):
            assert base * 0.8 <= got <= base * 1.2, delays
        # a registration that stayed live 30 s, then lost: back to 1 s
        clock.getDelayedCalls()[0].cancel()
        connector._liveSince = clock.seconds() - 30
        connector._lost(None, __import__("twisted.python.failure", fromlist=["Failure"]).Failure(
            terror.ConnectionLost("gone")))
        (call,) = clock.getDelayedCalls()
        assert 0.8 <= call.getTime() - clock.seconds() <= 1.2
        # refusals: at the cap, an error logged each time
        outcomes.extend(HopIdentityError("refused") for _ in range(2))
        for _ in range(2):
            clock.advance(call.getTime() - clock.seconds())
            (call,) = clock.getDelayedCalls()
            assert 24 <= call.getTime() - clock.seconds() <= 36
        errors = [e for e in logged if "refused us" in e.get("log_format", "")]
        assert len(errors) == 2
        assert [s.state for s in seen][-2:] == ["refused", "refused"]
        assert isinstance(seen[0], H2RStatus) and seen[0].retryIn is not None
    finally:
        globalLogPublisher.removeObserver(observer)
        connector.running = False
        for call in clock.getDelayedCalls():
            call.cancel()


def test_reloadReachesTheDialerInsideTheRegistryWrapper():
    node = Node(task.Clock(), NodeSpec(listeners=(parseListener("h2r://127.0.0.1:0"),
                                                  parseListener("tcp://127.0.0.1:0/127.0.0.1:9")),
                                       identity=pki.identity(GW_ID)))
    node.reload(NodeSpec(listeners=node.spec.listeners, identity=node.identity, connectTimeout=2.5))
    assert node.dialer.inner.connectTimeout == 2.5
