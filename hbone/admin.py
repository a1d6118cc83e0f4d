"""The admin listener (``-L admin://127.0.0.1:15000``, ``[admin] listen = ...``).

A small twisted.web site in the node's own process:

``/metrics``      Prometheus text format (:class:`hbone.metrics.NodeMetrics`)
``/healthz``      liveness: 200 while the reactor answers
``/readyz``       readiness (JSON): every listener bound, the certificate valid, not
                  draining; 503 otherwise. An expiring certificate is reported but
                  still ready.
``/tunnels``      live tunnels (JSON): id, direction, listener, peer identity, source,
                  target, bytes each way, age
``/connections``  live HTTP/2 connections (JSON): role, peer identity, address, streams, age
``/throughput``   bytes per second each way, sampled every 5 s over the last 10 minutes
``/``             a static page reading those (no build step, nothing from elsewhere)

It binds 127.0.0.1 unless told otherwise and has no authentication (SECURITY §4.3).
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Site

__all__ = ["AdminSite", "adminSite", "tunnelRows", "readiness"]

PAGE = Path(__file__).with_name("static") / "admin.html"
SAMPLE_EVERY = 5.0
SAMPLES = 120


def _fmtAddress(source) -> str | None:
    if not source:
        return None
    host, port = source[0], source[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def tunnelRows(node) -> list[dict]:
    now = node.reactor.seconds()
    rows = []
    for t in sorted(node.tracker.tunnels, key=lambda t: t.id):
        info = t.info
        peer = info.get("peer")
        rows.append({
            "id": t.id,
            "direction": info.get("direction", ""),
            "listener": info.get("listener", ""),
            "peer": peer if peer and peer != "None" else None,
            "source": _fmtAddress(info.get("source")),
            "target": info.get("target", "?"),
            "bytesUp": t.bytesAtoB,
            "bytesDown": t.bytesBtoA,
            "age": round(now - t.openedAt, 3),
        })
    return rows


def connectionRows(node) -> list[dict]:
    now = node.reactor.seconds()
    conns = [c for f in node.h2Factories for c in list(f.connections)]
    conns += [c for c in list(getattr(node.pool, "_live", ())) if c not in conns]
    rows = []
    for c in conns:
        if c.closed or not c.ready:
            continue
        try:
            peer = c.transport.getPeer()
            address = _fmtAddress((peer.host, peer.port))
        except Exception:
            address = None
        rows.append({
            "role": c.role,
            "peer": str(c.peerIdentity) if c.peerIdentity is not None else None,
            "address": address,
            "streams": len(c.streams),
            "age": round(now - c._readyAt, 3),
        })
    return rows


def h2rRows(node) -> dict:
    """Gateway: the registrations by name; node: its gateways and their state."""
    now = node.reactor.seconds()
    out = {"registrations": [], "gateways": []}
    registry = getattr(node, "registry", None)
    if registry is not None:
        for name in sorted(registry.bindings):
            for key, conn in registry.instances.get(name, []):
                out["registrations"].append({
                    "name": name, "identity": key[0], "instance": key[1][:16],
                    "streams": len(conn.streams), "live": bool(conn.ready and not conn.closed and not conn.goingAway),
                    "age": round(now - conn._readyAt, 3) if conn.ready else 0.0})
    for c in getattr(node, "connectors", ()):
        out["gateways"].append({"gateway": c.gateway, "state": c.state})
    return out


def readiness(node) -> tuple[bool, dict]:
    checks = {}
    unbound = [str(s.spec) for s in node.listeners if s.port is None and s.spec.scheme != "admin"]
    checks["listeners"] = {"ok": not unbound,
                           "detail": f"not bound: {', '.join(unbound)}" if unbound else
                           f"{len(node.listeners)} bound"}
    identity = node.identity
    if identity is not None:
        from hbone.certwatch import expiryState

        state = expiryState(identity, node.reactor.seconds())
        until = identity.notAfter.strftime("%Y-%m-%d %H:%M:%S UTC")
        checks["certificate"] = {"ok": state != "expired", "state": state,
                                 "detail": f"{identity.localId} {state}, valid until {until}"}
    checks["draining"] = {"ok": not node.isDraining,
                          "detail": "draining (SIGTERM)" if node.isDraining else "not draining"}
    for name, check in node.readinessChecks.items():
        ok, detail = check()
        checks[name] = {"ok": bool(ok), "detail": detail}
    return all(c["ok"] for c in checks.values()), checks


class _Json(Resource):
    isLeaf = True

    def __init__(self, produce) -> None:
        super().__init__()
        self.produce = produce

    def render_GET(self, request):
        status, body = self.produce()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=1).encode() + b"\n"


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()


class _Page(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return PAGE.read_bytes()


class Throughput:
    """Bytes per second each way, every ``every`` seconds, the last ``keep`` samples."""

    def __init__(self, node, every: float = SAMPLE_EVERY, keep: int = SAMPLES) -> None:
        self.node = node
        self.every = every
        self.samples: deque = deque(maxlen=keep)
        self._closedUp = self._closedDown = 0
        self._last: tuple[float, int, int] | None = None
        self._loop = LoopingCall(self.sample)
        self._loop.clock = node.reactor
        node.events.subscribe(self._observe)

    def _observe(self, event) -> None:
        from hbone.events import TunnelClosed

        if isinstance(event, TunnelClosed):
            self._closedUp += event.bytesUp
            self._closedDown += event.bytesDown

    def totals(self) -> tuple[int, int]:
        up, down = self._closedUp, self._closedDown
        for t in list(self.node.tracker.tunnels):
            up += t.bytesAtoB
            down += t.bytesBtoA
        return up, down

    def sample(self) -> None:
        now = self.node.reactor.seconds()
        up, down = self.totals()
        if self._last is not None:
            then, lastUp, lastDown = self._last
            span = max(1e-6, now - then)
            self.samples.append({"t": round(now, 3), "up": max(0, up - lastUp) / span,
                                 "down": max(0, down - lastDown) / span})
        self._last = (now, up, down)

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.every, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


class AdminSite(Site):
    noisy = False

    def __init__(self, node) -> None:
        self.node = node
        self.metrics = node.enableMetrics()
        self.throughput = Throughput(node)
        root = _Root()
        root.putChild(b"", _Page())
        root.putChild(b"metrics", _Metrics(self.metrics))
        root.putChild(b"healthz", _Json(lambda: (200, {"status": "ok", "time": time.time()})))

        def ready():
            ok, checks = readiness(node)
            return (200 if ok else 503), {"ready": ok, "node": node.spec.name, "checks": checks}

        root.putChild(b"readyz", _Json(ready))
        root.putChild(b"tunnels", _Json(lambda: (200, tunnelRows(node))))
        root.putChild(b"connections", _Json(lambda: (200, connectionRows(node))))
        root.putChild(b"h2r", _Json(lambda: (200, h2rRows(node))))
        root.putChild(b"throughput", _Json(lambda: (200, {"every": self.throughput.every,
                                                          "samples": list(self.throughput.samples)})))
        super().__init__(root)

    def startFactory(self) -> None:
        super().startFactory()
        self.throughput.start()

    def stopFactory(self) -> None:
        self.throughput.stop()
        super().stopFactory()

    def log(self, request) -> None:
        pass  # no access log line per scrape


class _Root(Resource):
    def getChild(self, path, request):
        from twisted.web.pages import notFound

        return notFound("Not found", "Try /, /metrics, /healthz, /readyz, /tunnels, /connections or /throughput.")


def adminSite(node) -> AdminSite:
    return AdminSite(node)
