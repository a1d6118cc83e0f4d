"""Nodes as a user runs them: chains, groups, the config file under twistd, hbone connect."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from hbone.events import TunnelClosed
from hbone.service import Node, NodeSpec
from hbone.urls import parseHop, parseListener
from tests import pki
from tests.protocols import Client, Echo
from tests.conftest import pickFreePorts

ROOT = Path(__file__).resolve().parents[1]






async def waitUntil(condition, step: float = 0.01) -> None:
    """Yield to the reactor until ``condition()``; the test's timeout bounds it."""
    from twisted.internet.task import deferLater

    while not condition():
        await deferLater(reactor, step, lambda: None)


class NodeTests(unittest.TestCase):
    timeout = 60

    async def startNode(self, identity, listeners, hops=(), allow=()):
        spec = NodeSpec(
            listeners=tuple(parseListener(l) for l in listeners),
            hops=tuple(parseHop(h) for h in hops),
            identity=identity,
            allow=tuple(allow),
        )
        node = Node(reactor, spec)
        events = []
        node.events.subscribe(events.append)
        await node.startListening()
        node.startService()
        self.addCleanup(node.stopService)
        return node, events

    async def echoPort(self) -> int:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def roundTrip(self, port: int, payload: bytes) -> bytes:
        proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(lambda: Client(payload)))
        return await proto.done

    def test_doubleHbone(self):
        """-F A -F B: the client's tunnel to B rides inside a stream through A; B sees
        the client's own identity (end-to-end mTLS), A only sees a tunnel to B:15008."""

        async def go():
            echo = await self.echoPort()
            b, bEvents = await self.startNode(pki.serverIdentity(), ["hbone://127.0.0.1:0"],
                                              allow=[f"127.0.0.1:{echo}"])
            bPort = b.listeners[0].port.getHost().port
            a, aEvents = await self.startNode(pki.identity("spiffe://cluster.local/ns/default/sa/gw-a"),
                                              ["hbone://127.0.0.1:0"], allow=[f"127.0.0.1:{bPort}"])
            aPort = a.listeners[0].port.getHost().port
            client, cEvents = await self.startNode(
                pki.clientIdentity(), [f"tcp://127.0.0.1:0/127.0.0.1:{echo}"],
                hops=[f"hbone://127.0.0.1:{aPort}?identity=spiffe://cluster.local/ns/default/sa/gw-a",
                      f"hbone://127.0.0.1:{bPort}?identity={pki.SERVER_ID}"])
            fwd = client.listeners[0].port.getHost().port
            for i in range(2):
                payload = os.urandom(1024 * 1024 + i)
                got = await self.roundTrip(fwd, payload)
                self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
            # the inner connection closes after its tunnel (TLS close_notify both ways)
            await waitUntil(lambda: len([e for e in aEvents if isinstance(e, TunnelClosed)]) == 2)
            await client.stopService()
            closedB = [e for e in bEvents if isinstance(e, TunnelClosed)]
            closedA = [e for e in aEvents if isinstance(e, TunnelClosed)]
            self.assertEqual([e.peer for e in closedB], [pki.CLIENT_ID] * 2)
            self.assertEqual({e.target for e in closedB}, {f"127.0.0.1:{echo}"})
            self.assertEqual({e.target for e in closedA}, {f"127.0.0.1:{bPort}"})
            self.assertEqual(len(closedA), 2)  # the inner connection is never pooled
            self.assertEqual([e.reason for e in closedA + closedB], [None] * 4)

        return defer.Deferred.fromCoroutine(go())

    def test_groupFailsOverFromADeadNode(self):
        async def go():
            echo = await self.echoPort()
            server, _ = await self.startNode(pki.serverIdentity(), ["hbone://127.0.0.1:0"],
                                             allow=[f"127.0.0.1:{echo}"])
            live = server.listeners[0].port.getHost().port
            dead = pickFreePorts(1)[0]
            client, events = await self.startNode(
                pki.clientIdentity(), [f"tcp://127.0.0.1:0/127.0.0.1:{echo}"],
                hops=[f"hbone://127.0.0.1:{dead},127.0.0.1:{live}"])
            fwd = client.listeners[0].port.getHost().port
            for i in range(4):  # each start node in turn, the dead one included
                payload = b"group %d" % i
                self.assertEqual(await self.roundTrip(fwd, payload), payload)

        return defer.Deferred.fromCoroutine(go())

    def test_refusedTunnelIsAnEventAndAReset(self):
        async def go():
            canary = await self.echoPort()
            server, sEvents = await self.startNode(pki.serverIdentity(), ["hbone://127.0.0.1:0"])
            sPort = server.listeners[0].port.getHost().port
            client, _ = await self.startNode(pki.clientIdentity(), [f"tcp://127.0.0.1:0/127.0.0.1:{canary}"],
                                             hops=[f"hbone://127.0.0.1:{sPort}"])
            fwd = client.listeners[0].port.getHost().port
            proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", fwd).connect(
                Factory.forProtocol(lambda: Client(b"x")))
            self.assertEqual(await proto.done, b"")
            self.assertFalse([e for e in sEvents if isinstance(e, TunnelClosed)])

        return defer.Deferred.fromCoroutine(go())


def _mint(tmp: Path) -> None:
    from hbone.ca import ensureDevIdentity

    ensureDevIdentity(tmp / "ids", "cluster.local", {
        "server": pki.SERVER_ID, "client": pki.CLIENT_ID})


class _EchoThread:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)
            c.shutdown(socket.SHUT_WR)


def test_twistdConfig_servesAndStopsCleanlyOnSIGTERM(tmp_path):
    twistd = Path(sys.executable).with_name("twistd")
    _mint(tmp_path)
    echo = _EchoThread()
    hp, fp = pickFreePorts(2)
    conf = tmp_path / "node.ini"
    conf.write_text(textwrap.dedent(f"""
        [node]
        certs = ids/server
        allow = 127.0.0.1:{echo.port}
        [chain:self]
        hops = hbone://127.0.0.1:{hp}?identity={pki.SERVER_ID}
        [listener:hbone]
        url = hbone://127.0.0.1:{hp}
        [listener:fwd]
        url = tcp://127.0.0.1:{fp}/127.0.0.1:{echo.port}
        chain = self
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([str(twistd), "-n", "--pidfile=", "hbone", "--config", str(conf)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = 30
        import time

        start = time.monotonic()
        while time.monotonic() - start < deadline:
            try:
                with socket.create_connection(("127.0.0.1", fp), timeout=1) as s:
                    s.sendall(b"through twistd")
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while data := s.recv(65536):
                        got += data
                    if got == b"through twistd":
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("twistd node did not serve")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        echo.sock.close()
    # hbone's SIGTERM handler drains and stops the reactor itself: twistd does not
    # re-raise the signal, so the exit status is 0
    assert proc.returncode == 0, out
    assert "Server Shut Down." in out
    assert "Traceback" not in out, out
    assert f"listening: tcp on 127.0.0.1:{fp}" in out


def test_twistdConfig_typoStopsTheStart(tmp_path):
    twistd = Path(sys.executable).with_name("twistd")
    conf = tmp_path / "node.ini"
    conf.write_text("[node]\nalow = 127.0.0.1:1\n[listener:a]\nurl = tcp://:1/h:1\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([str(twistd), "-n", "--pidfile=", "hbone", "--config", str(conf)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0
    assert "[node] unknown key 'alow'" in out.stdout + out.stderr


def test_hboneConnect_stdinStdout(tmp_path):
    _mint(tmp_path)
    echo = _EchoThread()
    hp = pickFreePorts(1)[0]
    server = subprocess.Popen(
        [sys.executable, "-m", "hbone.cli", "--certs", str(tmp_path / "ids/server"),
         "--allow", f"127.0.0.1:{echo.port}", "-L", f"hbone://127.0.0.1:{hp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # stopped with SIGINT below
    try:
        for line in server.stdout:
            if "ready:" in line:
                break
        payload = os.urandom(200_000)
        out = subprocess.run(
            [sys.executable, "-m", "hbone.cli", "connect", f"127.0.0.1:{echo.port}",
             "--certs", str(tmp_path / "ids/client"), "-F", f"hbone://127.0.0.1:{hp}?identity={pki.SERVER_ID}"],
            input=payload, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == payload
        refused = subprocess.run(
            [sys.executable, "-m", "hbone.cli", "connect", "127.0.0.1:1",
             "--certs", str(tmp_path / "ids/client"), "-F", f"hbone://127.0.0.1:{hp}"],
            input=b"x", capture_output=True, timeout=60)
        assert refused.returncode == 1
        assert b"403" in refused.stderr and b"destination_ip_prohibited" in refused.stderr
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(20)
        echo.sock.close()
