"""The target behind every system under test: one process, one thread, epoll.

Run as ``python -m bench.backend --fd N`` with a listening socket inherited as
file descriptor N (the bench binds it, so there is no port race). The first byte a
client sends picks what the connection does; every mode but ``e`` ends with the
backend closing the connection, so no measurement depends on a tunnel carrying a
half-close (nghttpx + tinyproxy do not pass the client's FIN on):

``p``
    ping: echo the ``p`` and close. The setup-latency probe.
``e``
    echo every byte, the ``e`` included, until EOF. The idle test holds these open
    (and ends them with a reset).
``c`` + 8-byte big-endian N
    answer ``c`` at once, echo the next N bytes, close. The concurrent test.
``u`` + 8-byte big-endian N
    read and discard N bytes (the upload), answer ``k``, close.
``d`` + 8-byte big-endian N
    send N bytes (the download), close.

Reads go into one 1 MiB buffer and writes come from one 1 MiB buffer, so Python
runs a handful of bytecodes per large syscall. An echo that cannot write stops
reading that connection until it can (no unbounded buffering).
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import socket
import struct
import sys

__all__ = ["HEADER", "main", "serve"]

HEADER = struct.Struct("!cQ")  # mode, byte count
CHUNK = 1024 * 1024
UNBOUNDED = -1

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


class _Conn:
    __slots__ = ("sock", "fd", "mode", "head", "left", "pending", "events")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.mode = b""
        self.head = b""
        self.left = 0  # bytes still to echo / read / send; UNBOUNDED for "e"
        self.pending = b""  # echo bytes not yet written
        self.events = _IN


def serve(listener: socket.socket, maxSeconds: float | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``maxSeconds`` without any event)."""
    listener.setblocking(False)
    ep = select.epoll()
    lfd = listener.fileno()
    ep.register(lfd, _IN)
    conns: dict[int, _Conn] = {}
    view = memoryview(bytearray(CHUNK))
    source = memoryview(os.urandom(CHUNK))
    running = [True]

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def close(c: _Conn) -> None:
        conns.pop(c.fd, None)
        try:
            ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    def setEvents(c: _Conn, events: int) -> None:
        if c.events != events:
            c.events = events
            ep.modify(c.fd, events)

    def onHeader(c: _Conn, data: bytes):
        """Consume header bytes; returns the bytes after the header (to echo or
        count), or None while the header is incomplete."""
        c.head += data
        mode = c.head[:1]
        if mode in (b"e", b"p"):
            c.mode, rest, c.head = mode, c.head, b""
            c.left = UNBOUNDED if mode == b"e" else 1
            return rest  # the mode byte is echoed too
        if mode in (b"c", b"u", b"d"):
            if len(c.head) < HEADER.size:
                return None
            _, c.left = HEADER.unpack(c.head[: HEADER.size])
            c.mode, rest, c.head = mode, c.head[HEADER.size:], b""
            if mode == b"d":
                setEvents(c, _OUT)
            elif mode == b"c":
                c.sock.send(b"c")
            return rest
        raise ValueError(f"unknown mode {mode!r}")

    def echo(c: _Conn, data) -> None:
        if c.left != UNBOUNDED:
            data = data[: c.left]
            c.left -= len(data)
        try:
            sent = c.sock.send(data) if data else 0
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            c.pending = bytes(data[sent:])
            setEvents(c, _OUT)  # stop reading until the echo drains
        elif c.left == 0:
            close(c)

    def readable(c: _Conn) -> None:
        try:
            n = c.sock.recv_into(view)
        except BlockingIOError:
            return
        if n == 0:
            close(c)  # the client is done (or gone): nothing more to do for it
            return
        data = view[:n]
        if not c.mode:
            data = onHeader(c, bytes(data))
            if data is None:
                return
        if c.mode in (b"e", b"p", b"c"):
            echo(c, data)
        elif c.mode == b"u" and c.left:
            c.left -= min(c.left, len(data))
            if c.left == 0:
                c.sock.send(b"k")
                close(c)
        elif c.mode == b"u" and not data:
            c.sock.send(b"k")  # a zero-byte upload
            close(c)

    def writable(c: _Conn) -> None:
        if c.mode == b"d":
            while c.left:
                try:
                    sent = c.sock.send(source[: min(c.left, CHUNK)])
                except BlockingIOError:
                    return
                c.left -= sent
            close(c)
            return
        try:
            sent = c.sock.send(c.pending)
        except BlockingIOError:
            return
        c.pending = c.pending[sent:]
        if not c.pending:
            if c.left == 0:
                close(c)
            else:
                setEvents(c, _IN)

    while running[0]:
        try:
            # a bounded wait, so a SIGTERM (which only sets a flag) ends the loop
            events = ep.poll(maxSeconds if maxSeconds is not None else 0.5)
        except InterruptedError:
            continue
        if not events:
            if maxSeconds is not None:
                break
            continue
        for fd, ev in events:
            if fd == lfd:
                for _ in range(256):  # bounded accept burst
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            break
                        raise
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    c = _Conn(sock)
                    conns[c.fd] = c
                    ep.register(c.fd, _IN)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            try:
                if ev & _OUT:
                    writable(c)
                elif ev & (_IN | select.EPOLLHUP | select.EPOLLERR):
                    readable(c)
            except (ConnectionError, OSError, ValueError):
                close(c)
    for c in list(conns.values()):
        close(c)
    ep.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__.split("\n\n")[0])
    p.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    options = p.parse_args(argv)
    listener = socket.socket(fileno=options.fd)
    try:
        serve(listener)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
