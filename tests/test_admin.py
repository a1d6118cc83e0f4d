"""The admin listener: metrics (parsed with prometheus_client's own parser), health,
readiness, the tunnels JSON, the page in a real browser, ``hbone status``, JSON logs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from hbone.events import (ConnectionClosed, Events, HandshakeFailed, TunnelClosed, TunnelOpened,
                          TunnelRejected)
from hbone.metrics import NodeMetrics, closeReasonOf
from hbone.service import Node, NodeSpec
from hbone.urls import parseHop, parseListener
from tests import pki
from tests.protocols import waitFor
from tests.adversarial.attacker import svidFiles
from tests.conftest import pickFreePorts, requirePeer, waitForPort


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Holder(Protocol):
    def connectionMade(self):
        self.factory.conns.append(self)
        self.got = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.got += data

    def connectionLost(self, reason):
        self.lost.callback(None)


class AdminTests(unittest.TestCase):
    timeout = 90

    async def nodes(self):
        echo = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
        self.addCleanup(echo.stopListening)
        self.echoPort = echo.getHost().port
        server = Node(reactor, NodeSpec(
            listeners=(parseListener("hbone://127.0.0.1:0"), parseListener("admin://127.0.0.1:0")),
            identity=pki.serverIdentity(), allow=(f"127.0.0.1:{self.echoPort}",), drainTimeout=0))
        await server.startListening()
        server.startService()
        self.addCleanup(server.stopService)
        ports = list(server.boundPorts().values())
        self.hbonePort, self.adminPort = ports
        self.admin = f"http://127.0.0.1:{self.adminPort}"
        client = Node(reactor, NodeSpec(
            listeners=(parseListener(f"tcp://127.0.0.1:0/127.0.0.1:{self.echoPort}"),
                       parseListener("tcp://127.0.0.1:0/127.0.0.1:1")),
            hops=(parseHop(f"hbone://127.0.0.1:{self.hbonePort}?identity={pki.SERVER_ID}"),),
            identity=pki.clientIdentity(), drainTimeout=0))
        await client.startListening()
        client.startService()
        self.addCleanup(client.stopService)
        self.fwd, self.denied = list(client.boundPorts().values())
        return server, client

    async def openTunnel(self):
        factory = Factory.forProtocol(Holder)
        factory.conns = []
        proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", self.fwd).connect(factory)
        proto.transport.write(b"hello")
        await waitFor(lambda: proto.got == b"hello")
        return proto

    async def scrape(self) -> dict:
        status, body = await threads.deferToThread(fetch, f"{self.admin}/metrics")
        self.assertEqual(status, 200)
        return samples(body.decode())

    def test_metricsMoveAsTunnelsOpenAndClose(self):
        async def go():
            server, client = await self.nodes()
            before = await self.scrape()
            self.assertEqual(before[("hbone_tunnels_active", (("direction", "inbound"),))], 0)
            proto = await self.openTunnel()
            live = await self.scrape()
            self.assertEqual(live[("hbone_tunnels_active", (("direction", "inbound"),))], 1)
            self.assertEqual(live[("hbone_tunnels_opened_total", (("direction", "inbound"),))], 1)
            self.assertEqual(live[("hbone_http2_connections_active", (("role", "server"),))], 1)
            self.assertEqual(live[("hbone_tunnel_setup_seconds_count", (("direction", "inbound"),))], 1)
            proto.transport.loseConnection()
            await waitFor(lambda: not server.tracker.tunnels)
            after = await self.scrape()
            self.assertEqual(after[("hbone_tunnels_active", (("direction", "inbound"),))], 0)
            self.assertEqual(after[("hbone_tunnels_closed_total", (("direction", "inbound"), ("reason", "clean")))], 1)
            self.assertEqual(after[("hbone_tunnel_bytes_total", (("direction", "inbound"), ("way", "up")))], 5)
            self.assertEqual(after[("hbone_tunnel_bytes_total", (("direction", "inbound"), ("way", "down")))], 5)
            self.assertEqual(after[("hbone_tunnel_duration_seconds_count", (("direction", "inbound"),))], 1)
            expiry = after[("hbone_certificate_expiry_timestamp_seconds", ())]
            self.assertAlmostEqual(expiry, pki.serverIdentity().notAfter.timestamp())
            # a denied destination: a policy denial with its fixed reason
            def refused():
                with socket.create_connection(("127.0.0.1", self.denied), timeout=10) as s:
                    s.sendall(b"x")
                    try:
                        s.recv(10)
                    except ConnectionResetError:
                        pass

            await threads.deferToThread(refused)
            await waitFor(lambda: server.metrics.rejections._metrics)
            denied = await self.scrape()
            self.assertEqual(denied[("hbone_tunnels_rejected_total",
                                     (("error", "destination_ip_prohibited"), ("status", "403")))], 1)

        return defer.Deferred.fromCoroutine(go())

    def test_handshakeFailuresByReason(self):
        async def go():
            server, client = await self.nodes()

            def noCertificate():
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.set_alpn_protocols(["h2"])
                with socket.create_connection(("127.0.0.1", self.hbonePort), timeout=10) as raw:
                    with ctx.wrap_socket(raw) as s:
                        try:
                            s.recv(1)
                        except (ssl.SSLError, OSError):
                            pass

            def wrongAlpn():
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                chain, key, _ = svidFiles(pki.clientIdentity())
                ctx.load_cert_chain(chain, key)
                ctx.set_alpn_protocols(["http/1.1"])
                with socket.create_connection(("127.0.0.1", self.hbonePort), timeout=10) as raw:
                    try:
                        with ctx.wrap_socket(raw) as s:
                            s.recv(1)
                    except (ssl.SSLError, OSError):
                        pass

            await threads.deferToThread(noCertificate)
            await threads.deferToThread(wrongAlpn)
            await waitFor(lambda: sum(s.value for m in server.metrics.handshakeFailures.collect()
                                      for s in m.samples if s.name.endswith("_total")) >= 2)
            got = await self.scrape()
            self.assertEqual(got[("hbone_handshake_failures_total", (("reason", "certificate"),))], 1)
            self.assertEqual(got[("hbone_handshake_failures_total", (("reason", "alpn"),))], 1)

        return defer.Deferred.fromCoroutine(go())

    def test_healthReadinessTunnelsConnections(self):
        async def go():
            server, client = await self.nodes()
            status, body = await threads.deferToThread(fetch, f"{self.admin}/healthz")
            self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))
            status, body = await threads.deferToThread(fetch, f"{self.admin}/readyz")
            ready = json.loads(body)
            self.assertEqual((status, ready["ready"]), (200, True))
            self.assertEqual(ready["checks"]["certificate"]["state"], "valid")
            proto = await self.openTunnel()
            status, body = await threads.deferToThread(fetch, f"{self.admin}/tunnels")
            (row,) = json.loads(body)
            self.assertEqual((row["direction"], row["peer"], row["target"], row["bytesUp"], row["bytesDown"]),
                             ("inbound", pki.CLIENT_ID, f"127.0.0.1:{self.echoPort}", 5, 5))
            status, body = await threads.deferToThread(fetch, f"{self.admin}/connections")
            (conn,) = json.loads(body)
            self.assertEqual((conn["role"], conn["peer"], conn["streams"]), ("server", pki.CLIENT_ID, 1))
            status, body = await threads.deferToThread(fetch, f"{self.admin}/")
            self.assertEqual(status, 200)
            self.assertIn(b"<title>hbone</title>", body)
            self.assertNotIn(b"http://", body.replace(b"http://www.w3.org/2000/svg", b""))  # nothing from elsewhere
            status, _ = await threads.deferToThread(fetch, f"{self.admin}/nope")
            self.assertEqual(status, 404)
            # draining: not ready
            proto.transport.loseConnection()
            await waitFor(lambda: not server.tracker.tunnels)
            await server.drain()
            status, body = await threads.deferToThread(fetch, f"{self.admin}/readyz")
            self.assertEqual((status, json.loads(body)["checks"]["draining"]["ok"]), (503, False))

        return defer.Deferred.fromCoroutine(go())

    def test_browserShowsALiveTunnelAndItsEnd(self):
        chromium, chromedriver = requirePeer("chromium", "chromedriver")

        async def go():
            server, client = await self.nodes()
            proto = await self.openTunnel()
            profile = tempfile.mkdtemp(prefix="hbone-chromium-")
            self.addCleanup(shutil.rmtree, profile, True)

            def browse(step):
                from selenium import webdriver
                from selenium.webdriver.chrome.service import Service

                options = webdriver.ChromeOptions()
                options.binary_location = chromium
                for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={profile}"):
                    options.add_argument(flag)
                driver = webdriver.Chrome(service=Service(chromedriver), options=options)
                try:
                    driver.set_page_load_timeout(20)
                    driver.get(f"{self.admin}/")

                    def rows():  # read in one script: the page re-renders the table every second
                        return driver.execute_script(
                            "return [...document.querySelectorAll('#tunnels tbody tr')]"
                            ".map(tr => [...tr.cells].map(td => td.textContent))")

                    deadline = time.monotonic() + 20
                    while not rows() and time.monotonic() < deadline:
                        time.sleep(0.2)
                    shown = rows()
                    step()  # the test closes the tunnel
                    deadline = time.monotonic() + 20
                    while rows() and time.monotonic() < deadline:
                        time.sleep(0.2)
                    return shown, rows(), driver.execute_script(
                        "return document.getElementById('tunnelCount').textContent")
                finally:
                    driver.quit()

            def closeTunnel():
                reactor.callFromThread(proto.transport.loseConnection)

            shown, after, count = await threads.deferToThread(browse, closeTunnel)
            self.assertEqual(len(shown), 1, shown)
            self.assertIn(pki.CLIENT_ID, shown[0])
            self.assertIn(f"127.0.0.1:{self.echoPort}", shown[0])
            self.assertEqual((after, count), ([], "0"))

        return defer.Deferred.fromCoroutine(go())




# -- label safety (unit) ----------------------------------------------------------------


class _FakeNode:
    def __init__(self):
        self.events = Events()
        self.tracker = type("T", (), {"tunnels": set()})()
        self.identity = None
        self.isDraining = False


def test_noPeerControlledLabel():
    node = _FakeNode()
    metrics = NodeMetrics(node)
    evil = "evil\"} injected{x=\"1"
    node.events.emit(TunnelRejected("l", evil, None, evil, 403, evil, evil))
    node.events.emit(TunnelOpened(evil, "l", evil, None, evil, None, 0.01))
    node.events.emit(TunnelClosed("inbound", "l", evil, None, evil, None, 1, 2, 0.5, evil))
    node.events.emit(HandshakeFailed(evil, evil, evil))
    node.events.emit(ConnectionClosed(evil, evil, evil, 1.0))
    text = metrics.exposition().decode()
    assert "evil" not in text
    got = samples(text)
    assert got[("hbone_tunnels_rejected_total", (("error", "other"), ("status", "403")))] == 1
    assert got[("hbone_tunnels_closed_total", (("direction", "inbound"), ("reason", "error")))] == 1
    assert got[("hbone_handshake_failures_total", (("reason", "other"),))] == 1
    assert got[("hbone_tunnels_opened_total", (("direction", "other"),))] == 1


@pytest.mark.parametrize("reason, expected", [
    (None, "clean"), ("idle for 3600s", "idle_timeout"), ("drain deadline (5s)", "drain"),
    ("revoked by reload: denied by rule x", "revoked"), ("node stopping", "shutdown"),
    ("stream reset by the peer", "reset"), ("Connection was refused by other side", "error"),
])
def test_closeReasons(reason, expected):
    assert closeReasonOf(reason) == expected


# -- real processes: hbone status, JSON logs --------------------------------------------------


def test_statusAgainstARunningNode_andJsonLogs(tmp_path):
    chain, key, ca = svidFiles(pki.serverIdentity())
    hbonePort, adminPort = pickFreePorts(2)
    proc = subprocess.Popen([sys.executable, "-m", "hbone.cli", "--cert", chain, "--key", key, "--ca", ca,
                             "--log-format", "json", "-L", f"hbone://127.0.0.1:{hbonePort}",
                             "-L", f"admin://127.0.0.1:{adminPort}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        waitForPort("127.0.0.1", adminPort, 20, proc)
        out = subprocess.run([sys.executable, "-m", "hbone.cli", "status", "--admin", f"127.0.0.1:{adminPort}"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("hbone: ready, 0 live tunnels"), out.stdout
        bad = subprocess.run([sys.executable, "-m", "hbone.cli", "status", "--admin", "127.0.0.1:1"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1 and "is the node running with an admin listener" in bad.stderr
    finally:
        proc.terminate()
        logs, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, logs
    lines = [json.loads(line) for line in logs.splitlines() if line.strip()]
    ready = [l for l in lines if l["message"].startswith("ready:")]
    assert ready and ready[0]["level"] == "info" and ready[0]["process"] == "hbone"
    assert all({"time", "level", "logger", "message"} <= set(l) for l in lines)


def test_statusTable():
    from hbone.status import formatTable

    table = formatTable([{"id": 3, "direction": "inbound", "peer": pki.CLIENT_ID, "source": "10.0.0.1:5555",
                          "target": "db:5432", "bytesUp": 2048, "bytesDown": 5 * 1048576, "age": 75.0}])
    header, row = table.splitlines()
    assert header.split() == ["ID", "DIR", "PEER", "SOURCE", "TARGET", "UP", "DOWN", "AGE"]
    assert row.split() == ["3", "inb", pki.CLIENT_ID, "10.0.0.1:5555", "db:5432", "2.0", "KiB", "5.0", "MiB", "1.2m"]


def test_S46_S47_visibleInMetrics():
    """Idle timers and missed keepalives are counted by reason (the events come from
    the connection and the tracker; S46/S47 themselves are tests/adversarial)."""
    from hbone.events import ConnectionOpened

    node = _FakeNode()
    metrics = NodeMetrics(node)
    for reason in ("idle", "keepalive_timeout"):
        node.events.emit(ConnectionOpened("server", pki.CLIENT_ID))
        node.events.emit(ConnectionClosed("server", pki.CLIENT_ID, reason, 30.0))
    node.events.emit(TunnelClosed("inbound", "l", None, None, "t:1", None, 0, 0, 3600.0, "idle for 3600s"))
    got = samples(metrics.exposition().decode())
    assert got[("hbone_http2_connections_closed_total", (("reason", "idle"), ("role", "server")))] == 1
    assert got[("hbone_http2_connections_closed_total", (("reason", "keepalive_timeout"), ("role", "server")))] == 1
    assert got[("hbone_http2_connections_active", (("role", "server"),))] == 0
    assert got[("hbone_tunnels_closed_total", (("direction", "inbound"), ("reason", "idle_timeout")))] == 1


def test_twistdJsonLogger(tmp_path):
    twistd = Path(sys.executable).with_name("twistd")
    chain, key, ca = svidFiles(pki.serverIdentity())
    (port,) = pickFreePorts(1)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.Popen([str(twistd), "-n", "--pidfile=", "--logger", "hbone.logs.jsonLogger", "hbone",
                             "--cert", chain, "--key", key, "--ca", ca, "-L", f"hbone://127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    try:
        waitForPort("127.0.0.1", port, 30, proc)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(l["message"] == f"listening: hbone on 127.0.0.1:{port}" for l in lines), out
    assert all(l["process"] == "twistd" for l in lines)
