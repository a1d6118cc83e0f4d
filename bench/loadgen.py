"""The client side of the load: plain blocking or epoll sockets, large buffers.

Every function takes a deadline (``time.monotonic()`` value) and a count, and
raises :class:`LoadError` when the deadline passes or the far end misbehaves;
nothing here loops without both bounds. Payloads are random bytes made once.

How cheap this is matters: on 2 cores the load generator shares the CPU with the
system under test. A bulk transfer is one ``sendall``/``recv_into`` of up to
1 MiB per syscall, so Python's per-call overhead is a few microseconds per MiB;
``raw`` (no tunnel) measures what this generator and the backend can do.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

from bench.backend import HEADER

__all__ = [
    "LoadError", "bulkUpload", "bulkDownload", "closeAbort", "connectEcho", "concurrentEcho", "openIdle",
    "ping", "setupLatency",
]

CHUNK = 1024 * 1024
_PAYLOAD = memoryview(os.urandom(CHUNK))
HOST = "127.0.0.1"


class LoadError(Exception):
    """A load step failed or ran out of time."""


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise LoadError("time limit reached")
    return left


def _connect(port: int, deadline: float) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(min(10.0, _remaining(deadline)))
        s.connect((HOST, port))
    except BaseException:
        s.close()
        raise
    return s


def bulkUpload(port: int, nbytes: int, deadline: float) -> float:
    """One tunnel: send ``nbytes``; the backend answers once it has read them all.
    Returns the seconds from ``connect`` to that answer."""
    start = time.perf_counter()
    s = _connect(port, deadline)
    try:
        s.sendall(HEADER.pack(b"u", nbytes))
        left = nbytes
        while left:
            n = min(left, CHUNK)
            s.settimeout(min(10.0, _remaining(deadline)))
            s.sendall(_PAYLOAD[:n])
            left -= n
        s.settimeout(min(30.0, _remaining(deadline)))
        if s.recv(1) != b"k":
            raise LoadError("upload: the backend did not confirm the bytes")
        return time.perf_counter() - start
    except (OSError, socket.timeout) as e:
        raise LoadError(f"upload failed: {e}") from e
    finally:
        s.close()


def bulkDownload(port: int, nbytes: int, deadline: float) -> float:
    """One tunnel: the backend sends ``nbytes``. Returns the seconds from
    ``connect`` to the last byte."""
    start = time.perf_counter()
    s = _connect(port, deadline)
    buf = memoryview(bytearray(CHUNK))
    try:
        s.sendall(HEADER.pack(b"d", nbytes))
        left = nbytes
        while left:
            s.settimeout(min(10.0, _remaining(deadline)))
            n = s.recv_into(buf, min(left, CHUNK))
            if n == 0:
                raise LoadError(f"download: EOF with {left} bytes missing")
            left -= n
        return time.perf_counter() - start
    except (OSError, socket.timeout) as e:
        raise LoadError(f"download failed: {e}") from e
    finally:
        s.close()


def _handshake(port: int, deadline: float, hello: bytes, answer: bytes) -> socket.socket:
    s = _connect(port, deadline)
    try:
        s.sendall(hello)
        if s.recv(1) != answer:
            raise LoadError(f"no {answer!r} back through the tunnel")
    except (OSError, socket.timeout) as e:
        s.close()
        raise LoadError(f"echo failed: {e}") from e
    except BaseException:
        s.close()
        raise
    return s


def connectEcho(port: int, deadline: float) -> socket.socket:
    """A new tunnel in echo mode with its 1-byte echo done (the whole path exists);
    it stays open until the caller closes it (see :func:`closeAbort`)."""
    return _handshake(port, deadline, b"e", b"e")


def ping(port: int, deadline: float) -> None:
    """Connect, 1-byte echo, close (the backend closes its end too)."""
    _handshake(port, deadline, b"p", b"p").close()


def closeAbort(socks) -> None:
    """Close with a reset (SO_LINGER 0): ends idle echo tunnels without depending on
    a half-close reaching the backend."""
    linger = struct.pack("ii", 1, 0)
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        s.close()


#: How long one tunnel may take to open and echo before the step fails.
ROUND_SECONDS = 10.0


def setupLatency(port: int, count: int, deadline: float) -> list[float]:
    """Up to ``count`` times: connect, 1-byte echo, close. Seconds per round; stops
    starting rounds (and returns what it has) once ``deadline`` passed. A round
    that takes over :data:`ROUND_SECONDS` fails the step."""
    samples: list[float] = []
    for _ in range(count):
        if time.monotonic() >= deadline:
            break
        start = time.perf_counter()
        ping(port, time.monotonic() + ROUND_SECONDS)
        samples.append(time.perf_counter() - start)
    return samples


def concurrentEcho(port: int, tunnels: int, nbytes: int, deadline: float) -> float:
    """``tunnels`` tunnels, set up first (each answered once), then each sends
    ``nbytes`` and reads them back, all at once on one epoll loop. Returns the
    seconds from the first byte sent to the last byte echoed."""
    socks = []
    try:
        for _ in range(tunnels):
            socks.append(_handshake(port, deadline, HEADER.pack(b"c", nbytes), b"c"))
        ep = select.epoll()
        sent = {}
        got = {}
        byFd = {}
        for s in socks:
            s.setblocking(False)
            byFd[s.fileno()] = s
            sent[s.fileno()] = 0
            got[s.fileno()] = 0
            ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
        buf = memoryview(bytearray(CHUNK))
        done = 0
        start = time.perf_counter()
        while done < len(socks):
            for fd, ev in ep.poll(min(1.0, _remaining(deadline))):
                s = byFd[fd]
                if ev & select.EPOLLOUT and sent[fd] < nbytes:
                    try:
                        n = s.send(_PAYLOAD[: min(nbytes - sent[fd], 256 * 1024)])
                    except BlockingIOError:
                        n = 0
                    sent[fd] += n
                    if sent[fd] >= nbytes:
                        ep.modify(fd, select.EPOLLIN)
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    try:
                        n = s.recv_into(buf)
                    except BlockingIOError:
                        continue
                    if n == 0:
                        raise LoadError(f"concurrent echo: EOF after {got[fd]} of {nbytes} bytes")
                    got[fd] += n
                    if got[fd] >= nbytes:
                        done += 1
                        ep.unregister(fd)
        elapsed = time.perf_counter() - start
        ep.close()
        return elapsed
    except OSError as e:
        raise LoadError(f"concurrent echo failed: {e}") from e
    finally:
        for s in socks:
            s.close()


def openIdle(port: int, tunnels: int, deadline: float) -> list[socket.socket]:
    """Up to ``tunnels`` open tunnels, each with its 1-byte echo done (fewer if
    ``deadline`` passes first); the caller closes them (:func:`closeAbort`). On
    failure the ones opened are closed and the error raised."""
    socks = []
    try:
        for _ in range(tunnels):
            if time.monotonic() >= deadline:
                break
            socks.append(connectEcho(port, time.monotonic() + ROUND_SECONDS))
    except BaseException:
        closeAbort(socks)
        raise
    return socks
