"""CPU cost of hbone's data path in one process, without sockets.

A client and a server :class:`~hbone.h2.connection.HBoneH2Protocol`, each over
hbone's TLS layer (TLS 1.3, SPIFFE certificates minted here), joined by memory
transports that hand bytes over in socket-read-sized pieces. One tunnel carries
``--mib`` MiB up (client to server) and then down; the figure is the process's
CPU seconds per GiB carried, both ends together, without the kernel's share.

It measures what the full benchmark cannot separate on a busy machine: a change
to the Python path (framing, TLS calls, copies) shows here as a few percent,
with run-to-run spread well under that, where the end-to-end figure moves by
±10 % between runs. It is not a substitute for ``python -m bench``: no
syscalls, no scheduling, no backpressure from real sockets.

    python bench/pipeline.py                       # this checkout
    python bench/pipeline.py --hbone-tree DIR      # another checkout (before/after)
    python bench/pipeline.py --reps 7 --mib 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

READ = 256 * 1024  # bytes per delivery, as a socket read of hbone's


def _run(mib: int) -> dict:
    from twisted.internet.protocol import Protocol
    from twisted.internet.task import Clock

    from hbone.ca import makeCA, makeLeaf
    from hbone.h2.connection import HBoneH2Factory
    from hbone.tls import Identity

    try:
        from hbone.tlsio import HBoneTLSFactory as TLSFactory
    except ImportError:  # a tree from before hbone.tlsio: Twisted's own TLS layer
        from twisted.protocols.tls import TLSMemoryBIOFactory as TLSFactory

    td = "cluster.local"
    caCert, caKey = makeCA(td)

    def ident(sa: str) -> Identity:
        cert, key = makeLeaf(caCert, caKey, uris=[f"spiffe://{td}/ns/bench/sa/{sa}"], ips=["127.0.0.1"])
        return Identity([cert], key, {td: [caCert]})

    server, client = ident("server"), ident("client")
    clock = Clock()

    class Sink(Protocol):
        received = 0

        def dataReceived(self, data):
            Sink.received += len(data)

    sinks = []

    def handler(stream, headers):
        stream.connection.respond(stream, 200)
        sink = Sink()
        sinks.append(sink)
        stream.makeConnection(sink)

    class Mem:
        """One direction of a connection: what one side writes, the other reads."""

        def __init__(self):
            self.out = []
            self.peer = None
            self.producer = None
            self.disconnecting = False
            self.connected = True

        def write(self, data):
            self.out.append(data)

        def writeSequence(self, seq):
            self.out.extend(seq)

        def registerProducer(self, producer, streaming):
            self.producer = producer

        def unregisterProducer(self):
            self.producer = None

        def getPeer(self):
            return None

        def getHost(self):
            return None

        def loseConnection(self):
            self.disconnecting = True

        def abortConnection(self):
            self.disconnecting = True

        def pauseProducing(self):
            pass

        def resumeProducing(self):
            pass

        def stopProducing(self):
            pass

    sFactory = TLSFactory(server.serverCreator(b"h2"), False,
                          HBoneH2Factory("server", clock, streamHandler=handler), clock=clock)
    cFactory = TLSFactory(client.clientCreator(alpn=b"h2"), True, HBoneH2Factory("client", clock), clock=clock)
    sTLS, cTLS = sFactory.buildProtocol(None), cFactory.buildProtocol(None)
    sT, cT = Mem(), Mem()

    def pump() -> int:
        """Move bytes both ways until both sides are quiet."""
        moved = 0
        while True:
            clock.advance(0)  # the TLS layer's aggregated small writes
            step = 0
            for src, dst in ((cT, sTLS), (sT, cTLS)):
                if src.out:
                    data = b"".join(src.out)
                    src.out = []
                    for i in range(0, len(data), READ):
                        dst.dataReceived(data[i:i + READ])
                    step += len(data)
            if not step:
                return moved
            moved += step

    sTLS.makeConnection(sT)
    cTLS.makeConnection(cT)
    pump()
    h2c = cTLS.wrappedProtocol
    assert h2c.ready, "the TLS/HTTP/2 handshake did not finish"
    stream, d = h2c.openTunnel([(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:9")], "127.0.0.1:9")
    pump()
    outcome = []
    d.addBoth(outcome.append)
    assert outcome and not hasattr(outcome[0], "getErrorMessage"), f"tunnel not opened: {outcome}"

    class Source(Protocol):
        received = 0

        def dataReceived(self, data):
            Source.received += len(data)

    stream.makeConnection(Source())
    total = mib * 1024 * 1024
    chunk = os.urandom(READ)
    serverStream = next(iter(sTLS.wrappedProtocol.streams.values()))

    def carry(writer, counter) -> float:
        start = counter.received
        t0 = time.process_time()
        sent = 0
        while sent < total:
            writer.write(chunk)
            sent += len(chunk)
            pump()
        assert counter.received - start == total, (counter.received - start, total)
        return time.process_time() - t0

    up = carry(stream, Sink)
    down = carry(serverStream, Source)
    gib = total / 2**30
    return {"up": up / gib, "down": down / gib}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=128, help="MiB each way per repetition (default 128)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (default 5); the table shows min and median")
    ap.add_argument("--hbone-tree", help="import hbone from this source tree")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc's malloc defaults (the hbone command tunes them: hbone.limits.tuneMalloc)")
    args = ap.parse_args(argv)
    if args.one:
        if not args.no_malloc_tuning:
            try:
                from hbone.limits import tuneMalloc
            except ImportError:  # an older tree
                pass
            else:
                tuneMalloc()
        r = _run(args.mib)
        print(f"{r['up']:.4f} {r['down']:.4f}")
        return 0
    tree = os.path.abspath(args.hbone_tree or os.path.join(os.path.dirname(__file__), ".."))
    env = dict(os.environ, PYTHONPATH=tree)
    ups, downs = [], []
    for _ in range(args.reps):
        extra = ["--no-malloc-tuning"] if args.no_malloc_tuning else []
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", "--mib", str(args.mib), *extra],
                             env=env, check=True, capture_output=True, text=True).stdout.split()
        ups.append(float(out[0]))
        downs.append(float(out[1]))
    malloc = "glibc defaults" if args.no_malloc_tuning else "malloc tuned as the hbone command does"
    print(f"hbone from {tree}: {args.reps} x {args.mib} MiB each way, {malloc}; CPU s/GiB (both ends, no kernel)")
    print(f"  up   min {min(ups):.3f}  median {statistics.median(ups):.3f}")
    print(f"  down min {min(downs):.3f}  median {statistics.median(downs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
