"""SECURITY S26 (a policy reload revokes live tunnels) and certificate rotation, with
a real node process, its config file and signals."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import textwrap
import threading
import time

from h2.errors import ErrorCodes
from twisted.internet import reactor

from hbone.ca import certificatePEM, privateKeyPEM
from tests import pki
from tests.adversarial.attacker import Attacker, dataFrame, svidFiles
from tests.adversarial.support import AdversarialCase, asyncTest, until
from tests.adversarial.test_drain import SinkFactory, _node, payloadOf, pump
from tests.conftest import pickFreePorts

A_ID = f"spiffe://{pki.TD}/ns/default/sa/a"
B_ID = f"spiffe://{pki.TD}/ns/default/sa/b"


def writeCerts(directory: str, identity) -> None:
    """Istio's layout, as a renewal writes it: cert-chain.pem, key.pem, root-cert.pem."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "cert-chain.pem"), "wb") as f:
        f.write(certificatePEM(*identity.chain))
    fd = os.open(os.path.join(directory, "key.pem"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(privateKeyPEM(identity._key))
    with open(os.path.join(directory, "root-cert.pem"), "wb") as f:
        f.write(certificatePEM(*[c for certs in identity.trustBundles.values() for c in certs]))


class ReloadTests(AdversarialCase):
    timeout = 90

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="hbone-reload-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        return super().setUp()

    def startNode(self, config: str):
        path = os.path.join(self.tmp, "node.ini")
        with open(path, "w") as f:
            f.write(textwrap.dedent(config))
        port = int(config.split("hbone://127.0.0.1:")[1].split()[0])
        logPath = os.path.join(self.tmp, "node.log")
        proc = _node(["-C", path], port, logPath)

        def cleanup():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        self.addCleanup(cleanup)
        return proc, port, path, logPath

    def nodeLog(self, logPath: str) -> str:
        with open(logPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    async def waitForLog(self, logPath: str, text: str, count: int = 1, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while self.nodeLog(logPath).count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged {count}x within {seconds}s:\n{self.nodeLog(logPath)}")
            await self.attack(time.sleep, 0.05)

    def config(self, port: int, t1: int, t2: int, denied: tuple[str, ...]) -> str:
        chain, key, ca = svidFiles(pki.serverIdentity())
        return f"""
            [node]
            cert = {chain}
            key = {key}
            ca = {ca}
            allow = 127.0.0.1:{t1}, 127.0.0.1:{t2}
            [listener:hbone]
            url = hbone://127.0.0.1:{port}
            [rule:guarded]
            action = deny
            peers = {", ".join(denied)}
            destinations = 127.0.0.1
            ports = {t1}
        """

    @asyncTest
    async def test_S26_reload_revokes_live_tunnels(self) -> None:
        """A is denied the guarded destination (403 on that stream only), B is
        allowed; a reload that also denies B resets B's live tunnel there with
        RST_STREAM(CANCEL) within 1 s and leaves its other tunnel alone; a config
        that does not validate is refused and the running one stays."""
        t1, t2 = self.target(), self.target()
        (port,) = pickFreePorts(1)
        proc, port, path, logPath = self.startNode(self.config(port, t1.portNumber, t2.portNumber, (A_ID,)))
        a = Attacker(port, pki.identity(A_ID))
        b = Attacker(port, pki.identity(B_ID))
        self.addCleanup(a.close)
        self.addCleanup(b.close)

        def before():
            a.connect().preface()
            denied = a.openTunnel(1, t1.authority)
            other = a.openTunnel(3, t2.authority)
            b.connect().preface()
            assert b.openTunnel(1, t1.authority).status == 200
            assert b.echo(1, b"guarded") == b"guarded"
            assert b.openTunnel(3, t2.authority).status == 200
            return denied.status, denied.header(b"proxy-status"), other.status, a.echo(3, b"ok")

        status, proxyStatus, otherStatus, echoed = await self.attack(before)
        self.assertEqual(status, 403)
        self.assertIn(b"http_request_denied", proxyStatus)
        self.assertEqual((otherStatus, echoed), (200, b"ok"))

        # a file that does not validate: refused, logged, the old configuration stays
        with open(path, "w") as f:
            f.write(textwrap.dedent(self.config(port, t1.portNumber, t2.portNumber, (A_ID, B_ID))) + "typo = 1\n")
        os.kill(proc.pid, signal.SIGHUP)
        await self.waitForLog(logPath, "refused, the running configuration stays")
        self.assertEqual(await self.attack(b.echo, 1, b"still"), b"still")

        with open(path, "w") as f:
            f.write(textwrap.dedent(self.config(port, t1.portNumber, t2.portNumber, (A_ID, B_ID))))
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)

        def revoked():
            b.read(lambda f: b.streams[1].reset is not None, timeout=10)
            return b.streams[1].reset, time.monotonic() - sent, b.echo(3, b"untouched")

        code, seconds, untouched = await self.attack(revoked)
        self.assertEqual(code, ErrorCodes.CANCEL)
        self.assertLess(seconds, 1.0)
        self.assertEqual(untouched, b"untouched")
        self.assertIsNone(b.closed)
        await self.waitForLog(logPath, "1 live tunnels reset")
        self.assertIn("reloaded", self.nodeLog(logPath))
        # and new streams follow the new rule
        again = await self.attack(b.openTunnel, 5, t1.authority)
        self.assertEqual(again.status, 403)
        for conn in t1.conns:  # B's revoked upstream was closed
            await conn.lostD
        a.close()
        b.close()
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(await self.attack(proc.wait, 30), 0, self.nodeLog(logPath))

    @asyncTest
    async def test_rotation_during_a_transfer(self) -> None:
        """The certificate files are replaced while a 64 MiB transfer runs: the
        transfer finishes intact on its connection, and a new connection is served
        with the new certificate."""
        sinks = SinkFactory()
        sinkPort = reactor.listenTCP(0, sinks, interface="127.0.0.1")
        self._ports.append(sinkPort)
        sink = sinkPort.getHost().port
        certs = os.path.join(self.tmp, "certs")
        writeCerts(certs, pki.identity(pki.SERVER_ID))
        (port,) = pickFreePorts(1)
        proc, port, path, logPath = self.startNode(f"""
            [node]
            certs = {certs}
            cert_check_interval = 0.1
            allow = 127.0.0.1:{sink}
            [listener:hbone]
            url = hbone://127.0.0.1:{port}
        """)
        renewed = pki.identity(pki.SERVER_ID)
        from cryptography.hazmat.primitives.serialization import Encoding

        newDER = renewed.chain[0].public_bytes(Encoding.DER)
        size = 64 * 1024 * 1024
        payload = payloadOf(7, size)
        halfway = threading.Event()
        rotated = threading.Event()

        def transfer():
            with Attacker(port, pki.clientIdentity(), timeout=30) as a:
                a.connect().preface()
                oldDER = a.sock.getpeercert(binary_form=True)
                assert a.openTunnel(1, f"127.0.0.1:{sink}").status == 200
                sent = {1: 0}
                pump(a, {1: payload}, sent, until=lambda: sent[1] >= size // 2)
                halfway.set()
                rotated.wait(30)
                pump(a, {1: payload}, sent)
                a.read(lambda f: a.streams[1].ended or a.streams[1].reset is not None, timeout=30)
                return oldDER, a.streams[1].data, a.streams[1].reset

        d = self.attack(transfer)
        await until(lambda: halfway.is_set() or d.called)
        writeCerts(certs, renewed)
        await self.waitForLog(logPath, "certificate rotated")

        def newConnection():
            with Attacker(port, pki.clientIdentity()) as fresh:
                fresh.connect().preface()
                der = fresh.sock.getpeercert(binary_form=True)
                ok = fresh.openTunnel(1, f"127.0.0.1:{sink}").status
                fresh.send(dataFrame(1, b"new", end=True))
                fresh.read(lambda f: fresh.streams[1].ended, timeout=10)
                return der, ok, fresh.streams[1].data

        der, ok, digest = await self.attack(newConnection)
        rotated.set()
        oldDER, data, reset = await d
        self.assertEqual(der, newDER)
        self.assertNotEqual(oldDER, newDER)
        self.assertEqual((ok, digest), (200, hashlib.sha256(b"new").hexdigest().encode()))
        self.assertIsNone(reset)
        self.assertEqual(data, hashlib.sha256(payload).hexdigest().encode())
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(await self.attack(proc.wait, 30), 0, self.nodeLog(logPath))
        await until(lambda: all(p.reason is not None for p in sinks.protocols))
