"""Process and listener resource limits (SECURITY §4.5, §4.6).

The per-connection HTTP/2 limits (SECURITY §4.4) live in
:class:`hbone.h2.connection.FrameAccounting`; this module holds what is shared
wider than one connection:

* :func:`raiseFileLimit`: RLIMIT_NOFILE raised at start to min(hard, 65 536).
* :func:`tuneMalloc`: glibc keeps the data path's buffers in its heap instead of
  mapping and unmapping them (page faults on every buffer otherwise).
* :class:`ProcessLimits`: counters shared by every listener of one process:
  inbound tunnels open (4 096, beyond which a new stream gets
  RST_STREAM(REFUSED_STREAM)) and upstream connects in progress (512, beyond which
  a request gets ``503 connection_limit_reached``).
* :class:`ListenerGate`: per listener, TLS handshakes in progress (128) and
  connections (1 024). At either cap the listener stops accepting and the kernel
  backlog holds the rest, until a handshake finishes or a connection closes.
* :class:`LimitedPort` (and :class:`LimitedServerEndpoint`, :func:`listenLimited`):
  a TCP port that obeys its gate, and that on EMFILE/ENFILE pauses accepting for
  1 s, logging at most once per 10 s, where Twisted's own port accepts and closes
  (or retries at once and spins: Twisted #5368).
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from hbone.tlsio import HBoneTLSFactory
from hbone.logs import RejectionLog

__all__ = [
    "DEFAULT_NOFILE",
    "GatedTLSMemoryBIOFactory",
    "LimitedPort",
    "LimitedServerEndpoint",
    "ListenerGate",
    "ProcessLimits",
    "listenLimited",
    "raiseFileLimit",
    "tuneMalloc",
]

DEFAULT_NOFILE = 65536

log = Logger(namespace="hbone.limits")


def raiseFileLimit(target: int = DEFAULT_NOFILE) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to min(hard limit, ``target``); never lower it.

    Returns the (soft, hard) limits in force afterwards. A refusal by the kernel is
    logged, not raised: the process still runs, with fewer descriptors."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warn(
                "cannot raise the open-file limit from {soft} to {want}: {error}",
                soft=soft, want=want, error=e,
            )
    return soft, hard


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`tuneMalloc` sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 2 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 8 * 1024 * 1024
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def tuneMalloc(environ=None) -> bool:
    """Keep buffers below 2 MiB in glibc's heap, and up to 8 MiB of free heap
    before returning it to the kernel.

    hbone's data path allocates and frees buffers of 16 KiB to 512 KiB per socket
    read (the read itself, decrypted records, frames). glibc's defaults serve the
    large ones with ``mmap``, and trim the heap's free top as soon as it passes a
    threshold that starts at 128 KiB: either way the next buffer lands on fresh
    pages, and every one of its pages is a page fault. That cost 30-40 % of the
    CPU of a bulk transfer (``bench/pipeline.py``; docs/performance.md). The
    price is at most 8 MiB of freed memory kept per process.

    Left alone when the environment sets glibc's own malloc tunables (the
    operator chose), and on a C library without ``mallopt``. Returns whether
    it changed anything."""
    import os

    environ = os.environ if environ is None else environ
    if any(name in environ for name in _MALLOC_ENV):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1 and ok
    return ok


class ProcessLimits:
    """Counters shared by every listener of one process (SECURITY §4.6).

    Create one per process (the node does) and pass it by constructor to each
    listener's :func:`hbone.h2.server.hboneServerFactory` and ``TunnelServer``.
    """

    def __init__(self, maxTunnels: int = 4096, maxPendingConnects: int = 512) -> None:
        self.maxTunnels = maxTunnels
        self.maxPendingConnects = maxPendingConnects
        self.openTunnels = 0
        self.pendingConnects = 0
        self.refusedTunnels = 0
        self.refusedConnects = 0

    def tunnelOpened(self) -> bool:
        """Count an inbound tunnel; False (and not counted) at the cap."""
        if self.openTunnels >= self.maxTunnels:
            self.refusedTunnels += 1
            return False
        self.openTunnels += 1
        return True

    def tunnelClosed(self) -> None:
        self.openTunnels -= 1

    def connectStarted(self) -> bool:
        """Count an upstream connect; False (and not counted) at the cap."""
        if self.pendingConnects >= self.maxPendingConnects:
            self.refusedConnects += 1
            return False
        self.pendingConnects += 1
        return True

    def connectFinished(self) -> None:
        self.pendingConnects -= 1


class ListenerGate:
    """Per listener: TLS handshakes in progress and open connections
    (SECURITY §4.5, §4.6).

    :class:`hbone.h2.connection.HBoneH2Protocol` reports to it (``opened``,
    ``handshakeDone``, ``closed``). Attached to a :class:`LimitedPort`, the gate
    stops the port's accepting at either cap and resumes it below. Without one
    (any other port), :class:`GatedTLSMemoryBIOFactory` still refuses connections
    over ``maxConnections`` by closing them at once.
    """

    def __init__(self, maxHandshakes: int = 128, maxConnections: int = 1024) -> None:
        self.maxHandshakes = maxHandshakes
        self.maxConnections = maxConnections
        self.handshaking = 0
        self.connections = 0
        self.peakHandshaking = 0
        self.peakConnections = 0
        self.refused = 0
        self.pauses = 0
        self.port = None

    @property
    def full(self) -> bool:
        return self.handshaking >= self.maxHandshakes or self.connections >= self.maxConnections

    def attach(self, port) -> None:
        """``port`` has ``pauseAccepting(reason)`` / ``resumeAccepting(reason)``."""
        self.port = port
        self._update()

    def detach(self, port) -> None:
        if self.port is port:
            self.port = None

    def admit(self) -> bool:
        """The hard connection cap, for a port that accepted past it anyway."""
        if self.connections >= self.maxConnections:
            self.refused += 1
            return False
        return True

    def opened(self) -> None:
        self.connections += 1
        self.handshaking += 1
        if self.connections > self.peakConnections:
            self.peakConnections = self.connections
        if self.handshaking > self.peakHandshaking:
            self.peakHandshaking = self.handshaking
        self._update()

    def handshakeDone(self) -> None:
        self.handshaking -= 1
        self._update()

    def closed(self, handshaking: bool) -> None:
        self.connections -= 1
        if handshaking:
            self.handshaking -= 1
        self._update()

    def _update(self) -> None:
        port = self.port
        if port is None:
            return
        if self.full:
            if port.pauseAccepting("gate"):
                self.pauses += 1
        else:
            port.resumeAccepting("gate")


class GatedTLSMemoryBIOFactory(HBoneTLSFactory):
    """:class:`hbone.tlsio.HBoneTLSFactory` carrying its listener's :class:`ListenerGate`
    (a :class:`LimitedPort` finds it as ``listenerGate``)."""

    def __init__(self, contextFactory, isClient, wrappedFactory, gate: ListenerGate, clock=None) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory, clock=clock)
        self.listenerGate = gate

    def buildProtocol(self, addr):
        if not self.listenerGate.admit():
            return None  # the port closes the socket
        return super().buildProtocol(addr)


_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_RETRY = {errno.EPERM, errno.ECONNABORTED}
_AGAIN = {errno.EAGAIN, errno.EWOULDBLOCK}


class LimitedPort(tcp.Port):
    """A listening TCP port that stops accepting when told to.

    * Its :class:`ListenerGate` (``gate``, or the factory's ``listenerGate``)
      pauses it at the handshake or connection cap.
    * EMFILE, ENFILE, ENOBUFS, ENOMEM on ``accept`` pause it for ``emfilePause``
      seconds and are logged at most once per ``logInterval`` per reason, with
      the count of repeats; the pending connections wait in the kernel backlog.
      Twisted's ``tcp.Port`` instead closes them through a reserved descriptor
      and logs each one, or, on ENFILE, retries on the next reactor turn.

    ``acceptAttempts`` counts ``accept`` calls, so a test can tell a pause from a
    busy loop without timing anything.
    """

    def __init__(self, port: int, factory, backlog: int = 50, interface: str = "", reactor=None,
                 gate: ListenerGate | None = None, emfilePause: float = 1.0,
                 logInterval: float = 10.0, reusePort: bool = False) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self.reusePort = reusePort  # SO_REUSEPORT: worker processes share the port (--workers)
        self.gate = gate if gate is not None else getattr(factory, "listenerGate", None)
        self.emfilePause = emfilePause
        self.rejections = RejectionLog(self.reactor, logInterval)
        self.acceptAttempts = 0
        self.resourceErrors = 0
        self._pausedBy: set[str] = set()
        self._resumeCall = None

    def createInternetSocket(self):
        s = super().createInternetSocket()
        if self.reusePort:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s

    def startListening(self) -> None:
        super().startListening()
        if self.gate is not None:
            self.gate.attach(self)

    # -- pausing ---------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return not self._pausedBy

    def pauseAccepting(self, reason: str) -> bool:
        """Stop calling ``accept`` until every reason is lifted; True if this paused it."""
        if reason in self._pausedBy:
            return False
        first = not self._pausedBy
        self._pausedBy.add(reason)
        if first and self.connected:
            self.stopReading()
        return first

    def resumeAccepting(self, reason: str) -> None:
        if reason not in self._pausedBy:
            return
        self._pausedBy.discard(reason)
        if not self._pausedBy and self.connected and not self.disconnecting:
            self.startReading()

    def _resumeAfterPause(self) -> None:
        self._resumeCall = None
        self.resumeAccepting("resources")

    # -- accepting --------------------------------------------------------------

    def doRead(self) -> None:
        if self._pausedBy or self.disconnecting:
            return
        accepted = 0
        try:
            for _ in range(self.numberAccepts):
                if self._pausedBy:
                    break
                self.acceptAttempts += 1
                try:
                    skt, addr = self.socket.accept()
                except OSError as e:
                    code = e.args[0]
                    if code in _AGAIN:
                        break
                    if code in _RETRY:
                        continue
                    if code in _OUT_OF_RESOURCES:
                        self._outOfResources(code)
                        break
                    raise
                accepted += 1
                if len(addr) == 4:  # IPv6: keep the scope id
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = tuple([host[0]] + list(addr[1:]))
                protocol = self.factory.buildProtocol(self._buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                transport = self.transport(skt, protocol, addr, self, s, self.reactor)
                protocol.makeConnection(transport)
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = max(1, accepted)
        except Exception:
            self._logger.failure("accept loop of port {port} failed", port=self._realPortNumber)

    def _outOfResources(self, code: int) -> None:
        self.resourceErrors += 1
        name = errno.errorcode.get(code, str(code))
        self.rejections.log(
            f"accept:{name}",
            "listener on port {port}: cannot accept a connection ({error}: {text}); "
            "pausing accepts for {pause:g}s",
            port=self._realPortNumber,
            error=name,
            text=os.strerror(code),
            pause=self.emfilePause,
        )
        self.pauseAccepting("resources")
        if self._resumeCall is None:
            self._resumeCall = self.reactor.callLater(self.emfilePause, self._resumeAfterPause)

    def connectionLost(self, reason) -> None:
        if self._resumeCall is not None and self._resumeCall.active():
            self._resumeCall.cancel()
        self._resumeCall = None
        if self.gate is not None:
            self.gate.detach(self)
        super().connectionLost(reason)


def listenLimited(reactor, port: int, factory, backlog: int = 50, interface: str = "",
                  **kw) -> LimitedPort:
    """``reactor.listenTCP``, with a :class:`LimitedPort`."""
    p = LimitedPort(port, factory, backlog, interface, reactor, **kw)
    p.startListening()
    return p


@implementer(IStreamServerEndpoint)
class LimitedServerEndpoint:
    """A TCP server endpoint (IPv4 or IPv6 by ``interface``) that listens with a
    :class:`LimitedPort`."""

    def __init__(self, reactor, port: int, backlog: int = 50, interface: str = "", **kw) -> None:
        self.reactor = reactor
        self.port = port
        self.backlog = backlog
        self.interface = interface
        self.kw = kw

    def listen(self, protocolFactory) -> defer.Deferred:
        return defer.execute(
            listenLimited, self.reactor, self.port, protocolFactory, self.backlog, self.interface,
            **self.kw
        )
