"""S51, the soak (Long tier): ``make soak`` or
``python -m tests.adversarial.long.soak [--seconds 600] [--rate 200]``.

One process runs an hbone server (mTLS on a LimitedPort, a TunnelServer, a
DirectDialer), an echo target and the hbone client (a Pool and
HBoneClientEndpoint), all on one reactor. For ``--seconds`` it opens ``--rate``
tunnels per second, at most ``--concurrency`` at once, each one of:

* ``clean``: send 1 KiB-1 MiB of random bytes, half-close, read the echo to the
  end; the SHA-256 both ways must match;
* ``reset``: hold 1-2 s, send some bytes, then reset the tunnel
  (RST_STREAM(CANCEL)); a few (``--early-resets`` per second) reset at once,
  which is a premature reset (SECURITY §4.4: more than 50 in 10 s on one
  connection is GOAWAY(0xb), so legitimate traffic stays below that);
* ``idle``: open, hold 0-2 s without a byte, then close;

and, for 1 % of the starts, one attack of S01-S11 from a raw-frame attacker on
a separate connection (in a thread), each of which must end in its GOAWAY.
Afterwards (all tunnels ended, the pool closed, the server's connections
gone) it checks: open file descriptors back to the baseline, RSS growth
< 20 MB, no traceback logged, no hash mismatch, every attack answered. It prints
a table and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import os
import random
import struct
import sys
import time

from h2.errors import ErrorCodes
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

RSS_LIMIT = 20 * 1024 * 1024


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """The target: echoes, and closes after the client's end (half-close)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """One tunnel's application end."""

    def __init__(self, kind: str, size: int, hold: float, clock) -> None:
        self.kind = kind
        self.size = size
        self.hold = hold
        self.clock = clock
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.received = 0
        self.done: defer.Deferred = defer.Deferred()
        self.reason = None

    def connectionMade(self) -> None:
        if self.kind == "idle":
            self.clock.callLater(self.hold, self.transport.loseConnection)
            return
        if self.kind == "reset":
            self.clock.callLater(1.0 + self.hold / 2, self._send)
            return
        self._send()

    def _send(self) -> None:
        if self.reason is not None:
            return
        payload = os.urandom(self.size)
        self.sent.update(payload)
        self.transport.write(payload)
        if self.kind in ("reset", "early-reset"):
            self.transport.abortConnection()
        else:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.got.update(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.done.callback(None)


def attackOnce(name: str, port: int, identity, target: str) -> int | None:
    """One S01-S11 attack on a fresh connection; returns the GOAWAY code."""
    from tests.adversarial.attacker import (
        Attacker,
        connectHeaders,
        dataFrame,
        pingFrame,
        priorityFrame,
        rawFrame,
        rstFrame,
        windowUpdateFrame,
    )

    with Attacker(port, identity) as a:
        a.connect().preface()
        if name == "S01":
            a.send(*[f for i in range(300) for f in (a.headers(2 * i + 1, connectHeaders(target)), rstFrame(2 * i + 1))])
        elif name == "S02":
            a.send(*[f for i in range(300) for f in (a.headers(2 * i + 1, connectHeaders(target), end=True),
                                                     dataFrame(2 * i + 1, b"x"))])
        elif name == "S03":
            a.send(a.headers(1, connectHeaders(target), endHeaders=False), *[a.continuation(1, b"")] * 20)
        elif name == "S06":
            a.send(*[pingFrame()] * 300)
        elif name == "S07":
            a.send(rawFrame(0x4, 0, 0, struct.pack(">HL", 3, 100) * 2400))
        elif name == "S08":
            a.openTunnel(1, target)
            a.send(*[priorityFrame(1)] * 500)
        elif name == "S10":
            a.send(windowUpdateFrame(0, 2**31 - 1))
        goaway = a.readUntilGoAway()
        a.readUntilClosed()
        return goaway.error_code


EXPECTED = {
    "S01": ErrorCodes.ENHANCE_YOUR_CALM, "S02": ErrorCodes.ENHANCE_YOUR_CALM,
    "S03": ErrorCodes.ENHANCE_YOUR_CALM, "S06": ErrorCodes.ENHANCE_YOUR_CALM,
    "S07": ErrorCodes.ENHANCE_YOUR_CALM, "S08": ErrorCodes.ENHANCE_YOUR_CALM,
    "S10": ErrorCodes.FLOW_CONTROL_ERROR,
}


async def soak(reactor, args) -> None:
    from hbone.dialer import DirectDialer
    from hbone.h2.client import HBoneClientEndpoint, HBoneHop, Pool
    from hbone.h2.server import TunnelServer, hboneServerFactory
    from hbone.identity import IdentityPattern
    from hbone.limits import listenLimited, raiseFileLimit
    from hbone.policy import DestinationPolicy, PeerAuthorizer, ReactorResolver, parseAllowEntry
    from hbone.splice import TunnelTracker
    from tests import pki

    raiseFileLimit()
    failures: list[dict] = []
    goawayLines: list[str] = []

    def observe(event) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)
        elif "sending GOAWAY" in (event.get("log_format") or ""):
            goawayLines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)

    echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    targetAuthority = f"127.0.0.1:{echo.getHost().port}"
    serverIdentity, clientIdentity = pki.serverIdentity(), pki.clientIdentity()
    policy = DestinationPolicy([parseAllowEntry(targetAuthority)])
    tracker = TunnelTracker(reactor)
    tunnels = TunnelServer(reactor, DirectDialer(reactor, policy, ReactorResolver(reactor)),
                           PeerAuthorizer(serverIdentity.localId), tracker)
    factory = hboneServerFactory(reactor, serverIdentity, tunnels)
    port = listenLimited(reactor, 0, factory, backlog=1024, interface="127.0.0.1")
    hop = HBoneHop("127.0.0.1", port.getHost().port, (IdentityPattern.parse(pki.SERVER_ID),), "connect")

    counts = {"clean": 0, "reset": 0, "early-reset": 0, "idle": 0, "refused": 0, "mismatch": 0}
    attacks: dict[str, list] = {}
    reasons: dict[str, int] = {}
    live: set = set()
    pending: list[defer.Deferred] = []
    rng = random.Random(args.seed)
    interval = 1.0 / args.rate
    pools = [Pool(reactor, clientIdentity)]

    async def one(kind: str) -> None:
        size = rng.choice([1024, 16384, 65536, 262144, 1048576]) if kind != "idle" else 0
        c = Client(kind, size, rng.uniform(0, 2.0), reactor)
        try:
            await HBoneClientEndpoint(pools[-1], hop, targetAuthority).connect(Factory.forProtocol(lambda: c))
        except Exception as e:
            counts["refused"] += 1
            why = f"refused: {type(e).__name__}: {e}"
            reasons[why] = reasons.get(why, 0) + 1
            return
        await c.done
        counts[kind] += 1
        if kind == "clean" and (c.received != c.size or c.got.hexdigest() != c.sent.hexdigest()):
            counts["mismatch"] += 1
            why = f"mismatch: {c.reason.getErrorMessage() if c.reason else '?'}"
            reasons[why] = reasons.get(why, 0) + 1

    def tick() -> None:
        if len(live) >= args.concurrency:
            return
        if rng.random() < 0.01:
            name = rng.choice(sorted(EXPECTED))
            d = threads.deferToThread(attackOnce, name, port.getHost().port, clientIdentity, targetAuthority)
            d.addBoth(lambda r, name=name: attacks.setdefault(name, []).append(r))
            pending.append(d)
        if rng.random() < args.early_resets / args.rate:
            kind = "early-reset"
        else:
            kind = rng.choices(["clean", "reset", "idle"], [0.7, 0.2, 0.1])[0]
        d = defer.Deferred.fromCoroutine(one(kind))
        live.add(d)
        d.addBoth(lambda r, d=d: (live.discard(d), r)[1])

    async def load(seconds: float, label: str) -> None:
        loop = task.LoopingCall(tick)
        loop.clock = reactor
        looping = loop.start(interval)
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            await task.deferLater(reactor, min(5.0, seconds), lambda: None)
            print(f"{label} {time.monotonic() - start:6.0f}s  live {len(live):4d}  {counts}  fds {fds()}  "
                  f"rss {rss() / 1e6:.1f} MB", flush=True)
        loop.stop()
        await looping
        await defer.DeferredList(list(live) + pending)

    async def quiesce() -> tuple[int, int]:
        """Everything ended and closed: the process's descriptors and RSS."""
        await pools[-1].closeAll()
        pools.append(Pool(reactor, clientIdentity))  # a closed pool refuses new tunnels
        await task.deferLater(reactor, 2.0, lambda: None)  # the server sees the closes
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS means something
        except OSError:
            pass
        return fds(), rss()

    # The baseline is taken after a warm-up under the same load, so the
    # allocator's working set (1 MiB buffers, threads) is already in it.
    warmup = min(max(10.0, args.seconds / 10), args.seconds)
    await load(warmup, "warm-up")
    baseFDs, baseRSS = await quiesce()
    await load(args.seconds, "soak")
    endFDs, endRSS = await quiesce()
    await pools[-1].closeAll()
    await port.stopListening()
    await echo.stopListening()
    tracker.stop()

    wrong = {n: [r for r in rs if r != EXPECTED[n]] for n, rs in attacks.items()}
    checks = [
        ("file descriptors back to the baseline", endFDs <= baseFDs, f"{baseFDs} -> {endFDs}"),
        ("RSS growth < 20 MB", endRSS - baseRSS < RSS_LIMIT, f"{(endRSS - baseRSS) / 1e6:+.1f} MB"),
        ("no traceback logged", not failures, f"{len(failures)}"),
        ("every clean tunnel hash-verified", counts["mismatch"] == 0, f"{counts['mismatch']} mismatches"),
        ("no tunnel refused", counts["refused"] == 0, f"{counts['refused']}"),
        ("every attack answered with its GOAWAY", not any(wrong.values()),
         ", ".join(f"{n}: {len(rs)}" for n, rs in sorted(attacks.items())) or "none ran"),
        ("no tunnel left in the tracker", not tracker.tunnels, f"{len(tracker.tunnels)}"),
    ]
    print(f"\nsoak: {args.seconds:g}s at {args.rate}/s: {counts}")
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {name:42s} {detail}")
    attackPorts = set()  # (the attacks' GOAWAYs are expected; print the others)
    for line in goawayLines:
        if "spiffe://cluster.local/ns/default/sa/client" in line and "premature" not in line:
            attackPorts.add(line)
    for line in sorted(set(goawayLines))[:10]:
        print(f"        server: {line[:160]}")
    for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]:
        print(f"        {n:6d} x {why[:150]}")
    for failure in failures[:3]:
        print(failure["log_failure"].getTraceback())
    if not all(ok for _, ok, _ in checks):
        raise SystemExit(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=200.0, help="tunnels opened per second")
    parser.add_argument("--concurrency", type=int, default=400)
    parser.add_argument("--early-resets", type=float, default=2.0,
                        help="tunnels per second reset right after opening (premature resets)")
    parser.add_argument("--seed", type=int, default=51)
    args = parser.parse_args(argv)
    # exits the process: 0, or 1 when a check failed (SystemExit from soak)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(soak(reactor, args)))
    return 1


if __name__ == "__main__":
    sys.exit(main())
