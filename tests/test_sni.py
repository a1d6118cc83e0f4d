"""The SNI gateway (PROTOCOL §8; SECURITY S34-S37): routing, and real TLS clients
through an sni listener, an HBONE hop and a second node to a real TLS server."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from hbone.ca import certificatePEM, makeCA, makeLeaf, privateKeyPEM
from hbone.clienthello import UNRECOGNIZED_NAME_ALERT
from hbone.h2.connection import ConnectionSettings
from hbone.service import Node, NodeSpec
from hbone.sni import Router, RouteError, parseRoute
from hbone.urls import parseHop, parseListener
from tests import pki
from tests.protocols import waitFor
from tests.conftest import pickFreePorts, requirePeer, waitForPort
from tests.test_clienthello import ext, handshake, records, sniExt

ISTIO = "outbound_.9080_._.reviews.default.svc.cluster.local"
ISTIO_V1 = "outbound_.9080_.v1_.reviews.default.svc.cluster.local"


# -- the route table (pure) ----------------------------------------------------------------


class _Dialers:
    def __init__(self):
        self.made = {}

    def __call__(self, hops):
        return self.made.setdefault(hops, f"dialer{len(self.made)}" if hops is not None else "listener")


def _route(name, match, target="", subset="", chain=None):
    return parseRoute(name, match, target, subset, chain)


def test_router_rulesInOrder():
    dialers = _Dialers()
    hops = (parseHop("hbone://gw-b:15008"),)
    router = Router([
        _route("reviews", "reviews.default.svc.cluster.local", chain=hops),
        _route("reviews-v1", "reviews.default.svc.cluster.local", target="10.1.0.1:9080", subset="v1"),
        _route("exact", "db.example.com", target="10.0.0.7:5432"),
        _route("short", "*.example.com", target="sni:443"),
        _route("long", "*.shop.example.com", target="10.0.0.9:8443"),
        _route("default", "*", target="10.0.0.1:443"),
    ], dialers, implicitChain=False)
    d = router.route(ISTIO)
    assert (d.target.authority(), d.route, d.operatorFixed, d.dialer) == (
        "reviews.default.svc.cluster.local:9080", "reviews", False, dialers.made[hops])
    d = router.route(ISTIO_V1)
    assert (d.target.authority(), d.route, d.operatorFixed) == ("10.1.0.1:9080", "reviews-v1", True)
    d = router.route("db.example.com")
    assert (d.target.authority(), d.route, d.operatorFixed, d.dialer) == ("10.0.0.7:5432", "exact", True, "listener")
    assert router.route("a.shop.example.com").route == "long"
    d = router.route("www.example.com")
    assert (d.target.authority(), d.route, d.operatorFixed) == ("www.example.com:443", "short", False)
    assert router.route("other.org").route == "default"
    assert router.route(None).route == "default"  # a hello without SNI
    assert router.route("outbound_.9080_._.ratings.default.svc.cluster.local").route == "default"


def test_router_withoutADefault_andIstioOnlyRoutes():
    router = Router([_route("reviews", "*.svc.cluster.local")], _Dialers(), implicitChain=True)
    assert router.route(ISTIO).target.authority() == "reviews.default.svc.cluster.local:9080"
    assert router.route("x.svc.cluster.local") is None  # no target: Istio names only
    assert router.route("unknown.example") is None
    assert router.route(None) is None


def test_router_implicitIstioRoute_onlyWithAChain():
    assert Router([], _Dialers(), implicitChain=True).route(ISTIO).route == "implicit"
    assert Router([], _Dialers(), implicitChain=True).route("reviews.example") is None
    assert Router([], _Dialers(), implicitChain=False).route(ISTIO) is None


@pytest.mark.parametrize("match, target, message", [
    ("", "", "match: empty"),
    ("*.", "", "match = '*.'"),
    ("bad name", "", "match = 'bad name'"),
    ("x.example", "sni:http", "expected sni:PORT"),
    ("x.example", "10.0.0.1", "expected host:port or sni:PORT"),
])
def test_parseRoute_errors(match, target, message):
    with pytest.raises(RouteError, match=message.replace("*", r"\*")):
        parseRoute("r", match, target)


# -- real TLS through the gateway ---------------------------------------------------------------


class TLSBackend:
    """A TLS echo server (Python ssl, in threads) with its own CA and certificate."""

    def __init__(self, directory: Path):
        caCert, caKey = makeCA("backend.example")
        cert, key = makeLeaf(caCert, caKey, dns=["backend.example"], ips=["127.0.0.1"])
        self.der = cert.public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                                fromlist=["Encoding"]).Encoding.DER)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cert.pem").write_bytes(certificatePEM(cert))
        (directory / "key.pem").write_bytes(privateKeyPEM(key))
        (directory / "ca.pem").write_bytes(certificatePEM(caCert))
        self.caFile = str(directory / "ca.pem")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw):
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                while data := s.recv(65536):
                    s.sendall(data)
        except (OSError, ssl.SSLError):
            pass

    def close(self):
        self.sock.close()


def tlsRoundTrip(port: int, serverName: str, caFile: str, payload: bytes) -> tuple[bytes, bytes]:
    """Python ssl client: handshake through the gateway, send ``payload``, read it back
    (one thread: an SSL socket must not be read and written from two threads)."""
    import select

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the SNI is a routing name; the certificate is compared below
    ctx.load_verify_locations(caFile)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname=serverName) as s:
            der = s.getpeercert(binary_form=True)
            got = bytearray()
            for i in range(0, len(payload), 65536):  # payload < the tunnel's windows: no deadlock
                s.sendall(payload[i:i + 65536])
                while s.pending() or select.select([s], [], [], 0)[0]:
                    data = s.recv(65536)
                    if not data:
                        break
                    got.extend(data)
            while len(got) < len(payload):
                data = s.recv(65536)
                if not data:
                    break
                got.extend(data)
            return der, bytes(got)


def oneBytePerSend(port: int, serverName: str, caFile: str, gap: float = 0.005) -> tuple[bytes, bytes]:
    """S34: the ClientHello written one byte per send(), then the handshake and an echo."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(caFile)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=serverName)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = True
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = outgoing.read()
            if first:
                for b in out:
                    s.send(bytes([b]))
                    time.sleep(gap)
                first = False
            elif out:
                s.sendall(out)
            if done:
                break
            incoming.write(s.recv(65536))
        tls.write(b"after a slow hello")
        s.sendall(outgoing.read())
        got = b""
        while len(got) < len(b"after a slow hello"):
            incoming.write(s.recv(65536))
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
        return tls.getpeercert(binary_form=True), got


def rawExchange(port: int, data: bytes, chunks: int = 1) -> tuple[bytes, str]:
    """Send ``data`` and read until the gateway closes: (what came back, how it ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        step = max(1, len(data) // chunks)
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
            return got, "eof"
        except ConnectionResetError:
            return got, "reset"


class Recorder(Protocol):
    def connectionMade(self):
        self.factory.conns.append(self)
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class SNIGatewayTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        scratch = tempfile.TemporaryDirectory(prefix="hbone-sni-")
        self.addCleanup(scratch.cleanup)
        self.dir = Path(scratch.name)
        self.backend = TLSBackend(self.dir / "backend")
        self.addCleanup(self.backend.close)

    async def node(self, spec: NodeSpec) -> Node:
        node = Node(reactor, spec)
        await node.startListening()
        node.startService()
        self.addCleanup(node.stopService)
        return node

    async def recorder(self):
        factory = Factory.forProtocol(Recorder)
        factory.conns = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def gatewayPair(self, routes=(), settings=ConnectionSettings(), allow=()):
        """Node B (HBONE server, may reach the backend) and gateway A (sni listener,
        chain to B)."""
        b = await self.node(NodeSpec(listeners=(parseListener("hbone://127.0.0.1:0"),),
                                     identity=pki.serverIdentity(),
                                     allow=(f"127.0.0.1:{self.backend.port}", *allow)))
        bPort = b.listeners[0].port.getHost().port
        sni = parseListener("sni://127.0.0.1:0")
        from dataclasses import replace

        sni = replace(sni, name="gw")
        a = await self.node(NodeSpec(
            listeners=(sni,), identity=pki.identity(f"spiffe://{pki.TD}/ns/default/sa/gw-a"),
            hops=(parseHop(f"hbone://127.0.0.1:{bPort}?identity={pki.SERVER_ID}"),),
            routes=tuple(routes), settings=settings, allow=tuple(allow)))
        return a, a.listeners[0].port.getHost().port, b

    def test_istioName_endToEnd_backendCertificate_hashEqual(self):
        async def go():
            a, port, b = await self.gatewayPair()
            name = f"outbound_.{self.backend.port}_._.127.0.0.1"
            payload = os.urandom(2 * 1024 * 1024)
            der, got = await threads.deferToThread(tlsRoundTrip, port, name, self.backend.caFile, payload)
            self.assertEqual(der, self.backend.der)  # the backend's own certificate, end to end
            self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
            # the tunnel crossed B as an HBONE tunnel from the gateway's identity
            self.assertEqual(b.tracker.opened, 1)

        return defer.Deferred.fromCoroutine(go())

    def test_S34_helloOneBytePerSend(self):
        async def go():
            a, port, b = await self.gatewayPair()
            name = f"outbound_.{self.backend.port}_._.127.0.0.1"
            der, got = await threads.deferToThread(oneBytePerSend, port, name, self.backend.caFile)
            self.assertEqual((der, got), (self.backend.der, b"after a slow hello"))

        return defer.Deferred.fromCoroutine(go())

    def test_S34_routesAndTheByteIdenticalStream(self):
        """A ~2 KB hello in two records, then more bytes: the route's backend gets
        exactly what the client sent; the Istio subset picks the route."""

        async def go():
            plain, plainPort = await self.recorder()
            v1, v1Port = await self.recorder()
            routes = [parseRoute("reviews", "reviews.default.svc.cluster.local", f"127.0.0.1:{plainPort}", chain=()),
                      parseRoute("reviews-v1", "reviews.default.svc.cluster.local", f"127.0.0.1:{v1Port}",
                                 subset="v1", chain=())]
            a, port, b = await self.gatewayPair(routes)
            for name, factory in ((ISTIO, plain), (ISTIO_V1, v1)):
                hs = handshake(sniExt((0, name.encode())), ext(51, os.urandom(1250)), ext(21, bytes(600)))
                wire = records(hs, 1000) + b"\x14\x03\x03\x00\x01\x01" + os.urandom(3000)
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    for i in range(0, len(wire), 300):
                        s.sendall(wire[i:i + 300])
                    deadline = time.monotonic() + 10
                    while (not factory.conns or len(factory.conns[-1].data) < len(wire)) and time.monotonic() < deadline:
                        await _sleep(0.01)
                self.assertEqual(factory.conns[-1].data, wire)
            self.assertEqual((len(plain.conns), len(v1.conns)), (1, 1))

        return defer.Deferred.fromCoroutine(go())

    def test_S35_malformed_closedWithoutWriting_noBackendDialed(self):
        async def go():
            factory, backendPort = await self.recorder()
            routes = [parseRoute("all", "*", f"127.0.0.1:{backendPort}", chain=())]
            a, port, b = await self.gatewayPair(routes)
            cases = [
                b"\x16\x03\x01\xff\xff" + bytes(100),
                b"\x16\x03\x01\x40\x00\x01\xff\xff\xff",
                records(handshake(sniExt((0, b"x.example")), ext(21, bytes(20000))), 16000),
                records(handshake(sniExt((0, b"x.example")), ext(21, bytes(100))), 10, 10, 10, 10),
                records(handshake(sniExt((0, b"a.example"), (0, b"b.example")))),
                records(handshake(sniExt((0, b"a" * 300)))),
                records(handshake(sniExt((0, "bücher.example".encode())))),
                records(handshake(sniExt((0, b"example.com.")))),
                records(handshake(sniExt((0, b"10.0.0.1")))),
            ]
            truncated = bytearray(handshake(sniExt((0, b"x.example"))))
            truncated[-16:-14] = (40).to_bytes(2, "big")
            cases.append(records(bytes(truncated)))
            await threads.deferToThread(lambda: None)  # the thread pool's own descriptors, once
            baseline = len(os.listdir("/proc/self/fd"))
            for data in cases:
                got, how = await threads.deferToThread(rawExchange, port, data)
                self.assertEqual(got, b"", data[:40])
            self.assertEqual(factory.conns, [])  # no backend was ever dialed
            self.assertEqual(a.tracker.opened, 0)
            await waitFor(lambda: len(os.listdir("/proc/self/fd")) <= baseline)  # every socket released
            self.assertEqual(a.listeners[0].factory.peeking, 0)

        return defer.Deferred.fromCoroutine(go())

    def test_S36_unknownName_noSni_plaintext(self):
        async def go():
            factory, backendPort = await self.recorder()
            routes = [parseRoute("only", "known.example", f"127.0.0.1:{backendPort}", chain=())]
            a, port, b = await self.gatewayPair(routes)
            for hello in (records(handshake(sniExt((0, b"unknown.example")))), records(handshake())):
                got, how = await threads.deferToThread(rawExchange, port, hello)
                self.assertEqual(got, UNRECOGNIZED_NAME_ALERT)
                self.assertEqual(got.hex(), "15030300020270")
            got, how = await threads.deferToThread(rawExchange, port, b"GET / HTTP/1.1\r\nHost: known.example\r\n\r\n")
            self.assertEqual(got, b"")
            self.assertEqual(factory.conns, [])
            # and the known name is routed
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(records(handshake(sniExt((0, b"known.example")))))
                deadline = time.monotonic() + 10
                while not factory.conns and time.monotonic() < deadline:
                    await _sleep(0.01)
            self.assertEqual(len(factory.conns), 1)

        return defer.Deferred.fromCoroutine(go())

    def test_S37_peekSlowloris(self):
        """Shortened: a 1.5 s peek deadline and a cap of 20 peeking connections."""

        async def go():
            factory, backendPort = await self.recorder()
            routes = [parseRoute("legit", "legit.example", f"127.0.0.1:{backendPort}", chain=())]
            settings = ConnectionSettings(sniPeekTimeout=1.5, sniMaxPeeking=20)
            a, port, b = await self.gatewayPair(routes, settings)
            hello = records(handshake(sniExt((0, b"legit.example"))))

            def stall(n):
                socks, refused = [], 0
                for _ in range(n):
                    try:
                        s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    except ConnectionResetError:  # beyond the cap, closed that fast
                        refused += 1
                        continue
                    try:
                        s.sendall(hello[:10])
                    except (ConnectionResetError, BrokenPipeError):
                        pass  # closed at once; counted below
                    socks.append(s)
                stall.refused = refused
                return socks

            def closedWithin(s, seconds):
                s.settimeout(seconds)
                try:
                    return s.recv(1) == b""
                except ConnectionResetError:
                    return True
                except socket.timeout:
                    return False

            stalled = await threads.deferToThread(stall, 15)
            await waitFor(lambda: a.listeners[0].factory.peeking == 15)
            # a legitimate client is routed meanwhile
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(hello)
                await waitFor(lambda: len(factory.conns) == 1)
            more = await threads.deferToThread(stall, 10)
            await waitFor(lambda: a.listeners[0].factory.peeking == 20)
            # beyond the cap: closed at once (the others wait for the peek deadline)

            def closedNow(socks):
                import select

                time.sleep(0.3)
                readable, _, _ = select.select(socks, [], [], 0)
                return sum(closedWithin(s, 0.1) for s in readable)

            self.assertEqual(await threads.deferToThread(closedNow, more) + stall.refused, 5)
            started = time.monotonic()
            results = await threads.deferToThread(lambda: [closedWithin(s, 5) for s in stalled])
            self.assertTrue(all(results))
            self.assertLess(time.monotonic() - started, 3)
            await waitFor(lambda: a.listeners[0].factory.peeking == 0)
            for s in stalled + more:
                s.close()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(hello)
                await waitFor(lambda: len(factory.conns) == 2)
            self.assertEqual(len(factory.conns), 2)  # the stalled ones never reached the backend

        return defer.Deferred.fromCoroutine(go())






# -- real processes: the command line and the config file, with openssl as client and server -----


def _mint(directory: Path) -> dict[str, Path]:
    out = {}
    for name in ("gw", "server"):
        identity = pki.identity(f"spiffe://{pki.TD}/ns/default/sa/{name}")
        d = directory / name
        d.mkdir(parents=True)
        (d / "cert-chain.pem").write_bytes(certificatePEM(*identity.chain))
        (d / "key.pem").write_bytes(privateKeyPEM(identity._key))
        os.chmod(d / "key.pem", 0o600)
        (d / "root-cert.pem").write_bytes(certificatePEM(pki.ca()[0]))
        out[name] = d
    return out


class _Proc:
    def __init__(self, argv, port):
        self.p = subprocess.Popen([sys.executable, "-m", "hbone.cli", *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True).start()
        waitForPort("127.0.0.1", port, 20, self.p)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        return self.p.returncode


def _sClient(openssl, port, name, caFile) -> str:
    out = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name, "-CAfile", caFile,
         "-verify_return_error", "-ign_eof"],
        input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


@pytest.mark.peers
@pytest.mark.parametrize("mode", ["command line", "config file"])
def test_processes_opensslThroughTheGateway(tmp_path, mode):
    (openssl,) = requirePeer("openssl")
    ids = _mint(tmp_path / "ids")
    backend = tmp_path / "backend"
    caCert, caKey = makeCA("backend.example")
    cert, key = makeLeaf(caCert, caKey, dns=["backend.example"], ips=["127.0.0.1"])
    backend.mkdir()
    (backend / "cert.pem").write_bytes(certificatePEM(cert))
    (backend / "key.pem").write_bytes(privateKeyPEM(key))
    (backend / "ca.pem").write_bytes(certificatePEM(caCert))
    sniPort, hbonePort, backendPort = pickFreePorts(3)
    server = subprocess.Popen([openssl, "s_server", "-accept", f"127.0.0.1:{backendPort}", "-cert",
                               str(backend / "cert.pem"), "-key", str(backend / "key.pem"), "-www"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = []
    try:
        waitForPort("127.0.0.1", backendPort, 20, server)
        procs.append(_Proc(["--certs", str(ids["server"]), "--allow", f"127.0.0.1:{backendPort}",
                            "-L", f"hbone://127.0.0.1:{hbonePort}"], hbonePort))
        hop = f"hbone://127.0.0.1:{hbonePort}?identity={pki.SERVER_ID}"
        if mode == "command line":
            procs.append(_Proc(["--certs", str(ids["gw"]), "-L", f"sni://127.0.0.1:{sniPort}", "-F", hop], sniPort))
            name = f"outbound_.{backendPort}_._.127.0.0.1"
        else:
            conf = tmp_path / "sni-gateway.ini"
            conf.write_text(textwrap.dedent(f"""
                [node]
                certs = ids/gw
                [chain:b]
                hops = {hop}
                [listener:gw]
                url = sni://127.0.0.1:{sniPort}
                chain = b
                [route:backend]
                match = backend.example
                target = 127.0.0.1:{backendPort}
            """))
            procs.append(_Proc(["-C", str(conf)], sniPort))
            name = "backend.example"
        text = _sClient(openssl, sniPort, name, str(backend / "ca.pem"))
        assert "Verify return code: 0 (ok)" in text, text
        assert "HTTP/1.0 200 ok" in text, text  # s_server -www answered through the tunnel
        unknown = _sClient(openssl, sniPort, "nowhere.example", str(backend / "ca.pem"))
        assert "unrecognized name" in unknown or "unrecognized_name" in unknown, unknown
    finally:
        codes = [p.stop() for p in procs]
        server.terminate()
        server.wait(10)
    assert codes == [0] * len(procs), "".join(l for p in procs for l in p.lines)


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)
