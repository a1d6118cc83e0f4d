"""SECURITY §5.7, S46 and S47: idle timers and a client that stops answering,
with the timers shortened through their settings."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from hbone.ca import certificatePEM, privateKeyPEM
from hbone.h2.client import HBoneClientEndpoint, HBoneHop, Pool
from hbone.h2.connection import ConnectionSettings
from hbone.identity import IdentityPattern
from tests import pki
from tests.adversarial.attacker import Attacker, dataFrame
from tests.adversarial.support import AdversarialCase, asyncTest, until
from tests.conftest import pickFreePorts, waitForPort

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred = defer.Deferred()
        self.waiters: list = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for n, d in [w for w in self.waiters if len(self.data) >= w[0]]:
            self.waiters.remove((n, d))
            d.callback(self.data)

    def whenReceived(self, n: int) -> defer.Deferred:
        if len(self.data) >= n:
            return defer.succeed(self.data)
        d = defer.Deferred()
        self.waiters.append((n, d))
        return d

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.lost.callback(None)


def recordGoAways(conn) -> list:
    """The GOAWAY events ``conn`` (an HBoneH2Protocol) receives from now on."""
    seen = []
    original = conn._handlers[ConnectionTerminated]

    def record(self, event):
        seen.append(event)
        return original(self, event)

    conn._handlers = dict(conn._handlers)
    conn._handlers[ConnectionTerminated] = record
    return seen


class LifecycleTests(AdversarialCase):
    @asyncTest
    async def test_S46_idle_tunnel(self) -> None:
        """S46: a tunnel with no bytes either way for the (shortened) idle timeout:
        RST_STREAM(CANCEL) to the client, an abortive close of the upstream."""
        target = self.target()
        server = self.server(allow=[target.portNumber], idleTimeout=0.4)

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                assert a.openTunnel(1, target.authority).status == 200
                a.read(lambda f: a.streams[1].reset is not None)
                return a.streams[1].reset, a.goaways()

        self.assertEqual(await self.attack(attack), (ErrorCodes.CANCEL, []))
        (conn,) = target.conns
        await conn.lostD
        self.assertTrue(conn.resetSeen)

    @asyncTest
    async def test_S46_idle_server_connection(self) -> None:
        """S46: a server connection without streams for its (shortened) idle
        timeout: GOAWAY(NO_ERROR), then the close."""
        target = self.target()
        server = self.server(ConnectionSettings(idleTimeout=0.3), allow=[target.portNumber])

        def attack():
            with Attacker(server.portNumber, pki.clientIdentity()) as a:
                a.connect().preface()
                assert a.openTunnel(1, target.authority).status == 200
                a.send(dataFrame(1, b"", end=True))  # the echo target closes on our end
                a.read(lambda f: a.streams[1].ended)
                goaway = a.readUntilGoAway()
                a.readUntilClosed()
                return goaway.error_code, goaway.last_stream_id, a.closed

        code, last, closed = await self.attack(attack)
        self.assertEqual((code, last), (ErrorCodes.NO_ERROR, 1))
        self.assertTrue(closed)

    @asyncTest
    async def test_S46_idle_pooled_client_connection(self) -> None:
        """S46: a pooled client connection without streams for its (shortened)
        idle timeout sends GOAWAY(NO_ERROR) and closes; the pool forgets it."""
        target = self.target()
        server = self.server(allow=[target.portNumber])
        pool = Pool(reactor, pki.clientIdentity(), ConnectionSettings(idleTimeout=0.3))
        self.addCleanup(pool.closeAll)
        hop = HBoneHop("127.0.0.1", server.portNumber, (IdentityPattern.parse(pki.SERVER_ID),), "connect")
        app = Collect()
        await HBoneClientEndpoint(pool, hop, target.authority).connect(Factory.forProtocol(lambda: app))
        await until(lambda: server.watch.accepted == 1 and server.connection(0).ready)
        goaways = recordGoAways(server.connection(0))
        app.transport.write(b"ping")
        await app.whenReceived(4)
        app.transport.loseConnection()
        await app.lost
        await server.watch.whenLost(0)
        self.assertEqual([g.error_code for g in goaways], [ErrorCodes.NO_ERROR])
        self.assertEqual(pool.connections(hop), [])

    @asyncTest
    async def test_S47_sigstopped_client(self) -> None:
        """S47 (CI-s: PING after 0.3 s of silence, ACK within 0.6 s): a real hbone
        client process is SIGSTOPped with a tunnel open; the server's PING goes
        unanswered, it closes the connection and the upstream socket."""
        target = self.target()
        server = self.server(ConnectionSettings(keepaliveInterval=0.3, pingTimeout=0.6),
                             allow=[target.portNumber])
        certs = tempfile.mkdtemp(prefix="hbone-s47-")
        self.addCleanup(shutil.rmtree, certs, True)
        identity = pki.clientIdentity()
        for name, data in (("cert-chain.pem", certificatePEM(*identity.chain)),
                           ("key.pem", privateKeyPEM(identity._key)),
                           ("root-cert.pem", certificatePEM(pki.ca()[0]))):
            with open(os.path.join(certs, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(certs, name), 0o600)
        (listen,) = pickFreePorts(1)
        child = subprocess.Popen(
            [sys.executable, "-m", "hbone.cli", "-q", "--certs", certs,
             "-L", f"tcp://127.0.0.1:{listen}/{target.authority}",
             "-F", f"hbone://127.0.0.1:{server.portNumber}?identity={pki.SERVER_ID}"],
            cwd=REPO, stdin=subprocess.DEVNULL,
        )

        def stopChild():
            if child.poll() is None:
                child.terminate()
                os.kill(child.pid, signal.SIGCONT)
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()

        self.addCleanup(stopChild)
        from twisted.internet import threads
        from twisted.internet.endpoints import TCP4ClientEndpoint

        await threads.deferToThread(waitForPort, "127.0.0.1", listen, 15.0, child)
        app = Collect()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", listen).connect(Factory.forProtocol(lambda: app))
        app.transport.write(b"hello")
        await app.whenReceived(5)
        (upstream,) = [c for c in target.conns if bytes(c.received) == b"hello"]
        conn = server.connection(0)
        os.kill(child.pid, signal.SIGSTOP)
        await upstream.lostD
        self.assertTrue(upstream.resetSeen)  # the tunnel was aborted, not ended
        await server.watch.whenLost(0)
        self.assertIn("missed PING ACK", str(conn._failure.value))
        self.assertIsNotNone(conn._pingSentAt)
        os.kill(child.pid, signal.SIGCONT)
        app.transport.abortConnection()
        await app.lost
        stopChild()
