"""SECURITY S27 (on 15441), S39, S40, S43: the gateway side of H2R against raw and real
nodes."""

from __future__ import annotations

import random
import ssl

from h2.errors import ErrorCodes
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from hbone.h2r import Backoff
from hbone.service import Node, NodeSpec
from hbone.urls import parseHop, parseListener
from tests import pki
from tests.adversarial.attacker import Attacker, settingsFrame
from tests.adversarial.support import AdversarialCase, asyncTest, until

NODE_ID = f"spiffe://{pki.TD}/ns/default/sa/laptop"
GW_ID = f"spiffe://{pki.TD}/ns/default/sa/gw"


class Hold(Protocol):
    """An echo that remembers its connections (held open by the test)."""

    def connectionMade(self):
        self.factory.conns.append(self)
        self.lostD = defer.Deferred()

    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason=None):
        self.lostD.callback(None)


class H2RAbuseTests(AdversarialCase):
    timeout = 60

    async def gateway(self, maxInstances: int | None = None):
        node = Node(reactor, NodeSpec(listeners=(parseListener(f"h2r://127.0.0.1:0?bind=laptop={NODE_ID}"),),
                                      identity=pki.identity(GW_ID), drainTimeout=0))
        await node.startListening()
        node.startService()
        self.addCleanup(node.stopService)
        if maxInstances is not None:
            node.registry.maxInstances = maxInstances
        return node, list(node.boundPorts().values())[0]

    async def echo(self):
        factory = Factory.forProtocol(Hold)
        factory.conns = []
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def reverseNode(self, h2rPort: int, echoPort: int, identity):
        node = Node(reactor, NodeSpec(listeners=(parseListener(f"rtcp://laptop:22/127.0.0.1:{echoPort}"),),
                                      hops=(parseHop(f"h2r://127.0.0.1:{h2rPort}?identity={GW_ID}"),),
                                      identity=identity, drainTimeout=0))
        for c in node.connectors:
            c.backoff = Backoff(initial=0.05, cap=0.2, rng=random.Random(3))
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        return node

    async def tunnel(self, gw: Node):
        """A tunnel the gateway opens to laptop:22, with a protocol that collects."""
        from hbone.dialer import TunnelRequest
        from hbone.address import parseAuthority

        class Collect(Protocol):
            def connectionMade(self):
                self.data = b""

            def dataReceived(self, data):
                self.data += data

        endpoint = await gw.dialer.dial(TunnelRequest(parseAuthority("laptop:22")))
        return await endpoint.connect(Factory.forProtocol(Collect))

    @asyncTest
    async def test_S27_h2_offered_to_the_h2r_port(self) -> None:
        gw, port = await self.gateway()

        def attack():
            a = Attacker(port, pki.identity(NODE_ID), alpn=("h2",))
            try:
                a.connect()
            except ssl.SSLError as e:  # the alert, by name
                return (e.reason or str(e)).upper().replace(" ", "_")
            finally:
                a.close()
            return "handshake completed"

        self.assertIn("ALERT_NO_APPLICATION_PROTOCOL", await self.attack(attack))  # alert 120
        self.assertEqual(gw.registry.live("laptop"), [])

    @asyncTest
    async def test_S43_the_node_sends_HEADERS(self) -> None:
        """Role abuse: the node (HTTP/2 server) sends HEADERS on the H2R connection:
        GOAWAY(PROTOCOL_ERROR), and the registration is dropped."""
        gw, port = await self.gateway()
        registered = []

        def attack():
            with Attacker(port, pki.identity(NODE_ID), alpn=("h2r",)) as a:
                a.connect()
                while len(a._buffer) < 24:  # the gateway speaks first: the client preface
                    a._buffer += a._recv()
                assert bytes(a._buffer[:24]) == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                del a._buffer[:24]
                a.send(settingsFrame())  # the server's preface
                a.read(lambda f: f.type == 0x4 and "ACK" in f.flags)  # our SETTINGS acknowledged: live
                registered.append(True)
                a.send(a.headers(1, [(b":status", b"200")]))
                goaway = a.readUntilGoAway()
                a.readUntilClosed()
                return goaway.error_code

        d = self.attack(attack)
        await until(lambda: registered or d.called)
        await until(lambda: gw.registry.live("laptop") or d.called)
        code = await d
        self.assertEqual(code, ErrorCodes.PROTOCOL_ERROR)
        await until(lambda: not gw.registry.live("laptop") and not gw.registry.instances.get("laptop"))

    @asyncTest
    async def test_S39_same_instance_reconnects_with_three_live_streams(self) -> None:
        echo, echoPort = await self.echo()
        gw, port = await self.gateway()
        identity = pki.identity(NODE_ID)
        first = await self.reverseNode(port, echoPort, identity)
        await until(lambda: gw.registry.live("laptop"))
        (old,) = gw.registry.live("laptop")
        tunnels = [await self.tunnel(gw) for _ in range(3)]
        second = await self.reverseNode(port, echoPort, identity)  # the same key
        await until(lambda: gw.registry.live("laptop") and gw.registry.live("laptop")[0] is not old)
        (new,) = gw.registry.live("laptop")
        fresh = await self.tunnel(gw)
        self.assertIs(fresh.transport.connection, new)  # new streams go to the new connection
        self.assertFalse(old.closed)
        for i, t in enumerate(tunnels):  # the old streams complete
            t.transport.write(b"old %d" % i)
        await until(lambda: all(t.data == b"old %d" % i for i, t in enumerate(tunnels)))
        for t in tunnels:
            t.transport.loseConnection()
        await until(lambda: old.closed)  # after its last stream
        fresh.transport.loseConnection()
        self.assertEqual(len(gw.registry.live("laptop")), 1)
        self.assertEqual([k[0] for k, _ in gw.registry.instances["laptop"]], [NODE_ID])
        await first.stopService()
        await second.stopService()

    @asyncTest
    async def test_S40_replicas_least_loaded_and_the_instance_cap(self) -> None:
        echo, echoPort = await self.echo()
        gw, port = await self.gateway(maxInstances=2)
        a = await self.reverseNode(port, echoPort, pki.identity(NODE_ID))
        b = await self.reverseNode(port, echoPort, pki.identity(NODE_ID))  # same ID, another key
        await until(lambda: len(gw.registry.live("laptop")) == 2)
        t1 = await self.tunnel(gw)
        t2 = await self.tunnel(gw)
        self.assertIsNot(t1.transport.connection, t2.transport.connection)  # least loaded
        c = await self.reverseNode(port, echoPort, pki.identity(NODE_ID))  # over the cap (2 here)
        await until(lambda: c.connectors[0].state in ("refused", "retrying"))
        self.assertEqual(len(gw.registry.live("laptop")), 2)
        self.assertIn("instances for 'laptop' (the limit)", "\n".join(self.log.messages()))
        for t in (t1, t2):
            t.transport.loseConnection()
        for n in (a, b, c):
            await n.stopService()


class H2RNodeStoppedTests(AdversarialCase):
    timeout = 60

    @asyncTest
    async def test_S42_node_sigstopped_then_sigcont(self) -> None:
        """Shortened: PING every 0.3 s, 1 s for its ACK, 1 s waiting for a node."""
        import os
        import signal
        import subprocess
        import sys
        import time

        from hbone.address import parseAuthority
        from hbone.dialer import TunnelRequest
        from hbone.errors import HopUnreachable
        from hbone.h2.connection import ConnectionSettings
        from tests.adversarial.attacker import svidFiles

        factory = Factory.forProtocol(Hold)
        factory.conns = []
        echoPort = (await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory))
        self._ports.append(echoPort)
        gw = Node(reactor, NodeSpec(listeners=(parseListener(f"h2r://127.0.0.1:0?bind=laptop={NODE_ID}"),),
                                    identity=pki.identity(GW_ID), drainTimeout=0,
                                    settings=ConnectionSettings(keepaliveInterval=0.3, pingTimeout=1.0)))
        await gw.startListening()
        gw.startService()
        self.addCleanup(gw.stopService)
        gw.registry.waitForNode = 1.0
        port = list(gw.boundPorts().values())[0]
        chain, key, ca = svidFiles(pki.identity(NODE_ID))
        import tempfile

        logPath = tempfile.mktemp(prefix="hbone-s42-")
        self.addCleanup(lambda: os.path.exists(logPath) and os.unlink(logPath))
        proc = subprocess.Popen([sys.executable, "-m", "hbone.cli", "--cert", chain, "--key", key, "--ca", ca,
                                 "-L", f"rtcp://laptop:22/127.0.0.1:{echoPort.getHost().port}",
                                 "-F", f"h2r://127.0.0.1:{port}?identity={GW_ID}"],
                                stdout=open(logPath, "wb"), stderr=subprocess.STDOUT)

        def cleanup():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)

        self.addCleanup(cleanup)
        await until(lambda: gw.registry.live("laptop") or proc.poll() is not None, turns=2_000_000)
        self.assertIsNone(proc.poll())

        class Collect(Protocol):
            def connectionMade(self):
                self.lostD = defer.Deferred()

            def connectionLost(self, reason=None):
                self.reason = reason
                self.lostD.callback(None)

        endpoint = await gw.dialer.dial(TunnelRequest(parseAuthority("laptop:22")))
        tunnel = await endpoint.connect(Factory.forProtocol(Collect))
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        await tunnel.lostD  # its tunnel is reset when the gateway gives up on the node
        self.assertLess(time.monotonic() - stopped, 5)
        self.assertFalse(tunnel.reason.check(__import__("twisted.internet.error", fromlist=["x"]).ConnectionDone))
        self.assertEqual(gw.registry.live("laptop"), [])
        started = time.monotonic()
        with self.assertRaises(HopUnreachable) as caught:
            endpoint = await gw.dialer.dial(TunnelRequest(parseAuthority("laptop:22")))
            await endpoint.connect(Factory.forProtocol(Collect))
        self.assertEqual(caught.exception.status, 503)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        os.kill(proc.pid, signal.SIGCONT)
        await until(lambda: gw.registry.live("laptop"), turns=5_000_000)  # it registers again by itself
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(await self.attack(proc.wait, 20), 0)
