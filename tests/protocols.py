"""Test pieces shared by the suites: a half-closing echo, a one-shot client, and
``waitFor`` (yield to the reactor until a condition holds, bounded in time)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

__all__ = ["Echo", "Client", "waitFor"]


async def waitFor(condition, seconds: float = 20.0, step: float = 0.01) -> None:
    """Yield to the reactor until ``condition()``; fail after ``seconds``."""
    import time

    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{condition} did not hold within {seconds}s")
        await deferLater(reactor, step, lambda: None)


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes; answers the peer's FIN with its own once everything is written.
    Counts connections on ``factory.accepted`` when the factory has one."""

    def connectionMade(self):
        if hasattr(self.factory, "accepted"):
            self.factory.accepted += 1

    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        self.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """Sends a payload, half-closes, collects the answer until the far end closes."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.chunks = []
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.chunks.append(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback(b"".join(self.chunks))
