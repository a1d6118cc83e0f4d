"""Prometheus metrics for a node, fed from its event fan-out (``Node.events``).

Everything here is counted from events (one per tunnel, connection, rejection,
reload; never per chunk) or read from the node's state at scrape time (live tunnels,
certificate expiry). Label values come from fixed sets only — close reasons,
``proxy-status`` error tokens, directions, roles — never from anything a peer sends:
a peer-controlled string is mapped to ``other`` before it can become a label.
Each node has its own ``CollectorRegistry``, so several nodes in one process do not
collide. The exposition is ``prometheus_client``'s own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hbone.events import (CONNECTION_CLOSE_REASONS, HANDSHAKE_FAILURE_REASONS, CertificateRotated,
                          CertificateRotationFailed, ConfigReloaded, ConfigReloadFailed, ConnectionClosed,
                          ConnectionOpened, HandshakeFailed, TunnelClosed, TunnelOpened, TunnelRejected)
from hbone.h2r import H2RRegistration, H2RStatus

__all__ = ["NodeMetrics", "closeReasonOf", "TUNNEL_CLOSE_REASONS", "REJECTION_ERRORS"]

#: Why a tunnel ended (label values).
TUNNEL_CLOSE_REASONS = ("clean", "idle_timeout", "drain", "revoked", "shutdown", "reset", "error")
#: ``proxy-status`` error tokens hbone sends (PROTOCOL §6); anything else is "other".
REJECTION_ERRORS = frozenset({
    "http_request_error", "http_request_denied", "destination_not_found", "destination_unavailable",
    "destination_ip_prohibited", "destination_ip_unroutable", "connection_refused", "connection_terminated",
    "connection_timeout", "connection_limit_reached", "dns_error", "dns_timeout", "proxy_internal_error",
    "tls_protocol_error", "tls_certificate_error", "http_response_incomplete", "http_protocol_error",
})
_DIRECTIONS = frozenset({"inbound", "outbound"})
_H2R_STATES = frozenset({"registered", "replaced", "lost", "refused"})
_H2R_STATUS = frozenset({"connected", "retrying", "refused"})
_ROLES = frozenset({"server", "client"})
_SETUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


def closeReasonOf(reason: str | None) -> str:
    """A tunnel's close reason (free text) -> one of :data:`TUNNEL_CLOSE_REASONS`."""
    if reason is None:
        return "clean"
    if reason.startswith("idle for"):
        return "idle_timeout"
    if reason.startswith("drain deadline"):
        return "drain"
    if reason.startswith("revoked by reload"):
        return "revoked"
    if reason.startswith("node stopping"):
        return "shutdown"
    if "reset" in reason.lower() or "RST_STREAM" in reason:
        return "reset"
    return "error"


def _pick(value, allowed, other: str = "other") -> str:
    return value if value in allowed else other


class _StateCollector:
    """Gauges read at scrape time from the node's live state."""

    def __init__(self, node) -> None:
        self.node = node

    def describe(self):
        return []

    def collect(self):
        node = self.node
        live = GaugeMetricFamily("hbone_tunnels_active", "Tunnels open now", labels=["direction"])
        counts = {"inbound": 0, "outbound": 0}
        for tunnel in list(node.tracker.tunnels):
            direction = tunnel.info.get("direction")
            if direction in counts:
                counts[direction] += 1
        for direction, n in counts.items():
            live.add_metric([direction], n)
        yield live
        identity = node.identity
        if identity is not None:
            expiry = GaugeMetricFamily("hbone_certificate_expiry_timestamp_seconds",
                                       "When our SVID expires (POSIX seconds)")
            expiry.add_metric([], identity.notAfter.timestamp())
            yield expiry
        registry = getattr(node, "registry", None)
        if registry is not None:
            regs = GaugeMetricFamily("hbone_h2r_registrations", "Live H2R registrations (gateway)")
            regs.add_metric([], sum(len(registry.live(name)) for name in registry.bindings))
            yield regs
        connectors = getattr(node, "connectors", ())
        if connectors:
            up = GaugeMetricFamily("hbone_h2r_gateways_connected", "Gateways this node is registered with")
            up.add_metric([], sum(1 for c in connectors if c.state == "connected"))
            yield up
        draining = GaugeMetricFamily("hbone_draining", "1 while the node drains (SIGTERM)")
        draining.add_metric([], 1 if node.isDraining else 0)
        yield draining


class NodeMetrics:
    """Subscribe to ``node.events`` and expose :meth:`exposition`."""

    def __init__(self, node) -> None:
        self.node = node
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.tunnelsOpened = Counter("hbone_tunnels_opened", "Tunnels opened", ["direction"], registry=r)
        self.tunnelsClosed = Counter("hbone_tunnels_closed", "Tunnels closed, by why",
                                     ["direction", "reason"], registry=r)
        self.tunnelBytes = Counter("hbone_tunnel_bytes", "Bytes carried by closed tunnels",
                                   ["direction", "way"], registry=r)
        self.tunnelSetup = Histogram("hbone_tunnel_setup_seconds", "Request to splice",
                                     ["direction"], buckets=_SETUP_BUCKETS, registry=r)
        self.tunnelDuration = Histogram("hbone_tunnel_duration_seconds", "Tunnel lifetime",
                                        ["direction"], buckets=_DURATION_BUCKETS, registry=r)
        self.rejections = Counter("hbone_tunnels_rejected", "Tunnels refused (policy, limits, upstream)",
                                  ["status", "error"], registry=r)
        self.connections = Gauge("hbone_http2_connections_active", "HTTP/2 connections open now",
                                 ["role"], registry=r)
        self.connectionsClosed = Counter("hbone_http2_connections_closed", "HTTP/2 connections closed, by why",
                                         ["role", "reason"], registry=r)
        self.handshakeFailures = Counter("hbone_handshake_failures", "Connections to HBONE listeners that "
                                         "never became usable, by why", ["reason"], registry=r)
        self.reloads = Counter("hbone_config_reloads", "Config reloads (SIGHUP)", ["result"], registry=r)
        self.h2rEvents = Counter("hbone_h2r_registration_events", "H2R registrations (gateway) by what happened",
                                 ["state"], registry=r)
        self.h2rStatus = Counter("hbone_h2r_gateway_events", "This node's H2R connections by what happened",
                                 ["state"], registry=r)
        self.rotations = Counter("hbone_certificate_rotations", "Certificate files loaded after a change",
                                 ["result"], registry=r)
        for role in _ROLES:
            self.connections.labels(role)
            for reason in CONNECTION_CLOSE_REASONS:
                self.connectionsClosed.labels(role, reason)
        for reason in HANDSHAKE_FAILURE_REASONS:
            self.handshakeFailures.labels(reason)
        for direction in _DIRECTIONS:
            self.tunnelsOpened.labels(direction)
            for reason in TUNNEL_CLOSE_REASONS:
                self.tunnelsClosed.labels(direction, reason)
        r.register(_StateCollector(node))
        self.unsubscribe = node.events.subscribe(self.observe)

    def observe(self, event) -> None:
        if isinstance(event, TunnelOpened):
            direction = _pick(event.direction, _DIRECTIONS)
            self.tunnelsOpened.labels(direction).inc()
            if event.setup is not None and event.setup >= 0:
                self.tunnelSetup.labels(direction).observe(event.setup)
        elif isinstance(event, TunnelClosed):
            direction = _pick(event.direction, _DIRECTIONS)
            self.tunnelsClosed.labels(direction, closeReasonOf(event.reason)).inc()
            self.tunnelBytes.labels(direction, "up").inc(event.bytesUp)
            self.tunnelBytes.labels(direction, "down").inc(event.bytesDown)
            self.tunnelDuration.labels(direction).observe(max(0.0, event.duration))
        elif isinstance(event, TunnelRejected):
            status = str(event.status) if isinstance(event.status, int) and 100 <= event.status <= 599 else "other"
            self.rejections.labels(status, _pick(event.error, REJECTION_ERRORS)).inc()
        elif isinstance(event, ConnectionOpened):
            self.connections.labels(_pick(event.role, _ROLES)).inc()
        elif isinstance(event, ConnectionClosed):
            role = _pick(event.role, _ROLES)
            self.connections.labels(role).dec()
            self.connectionsClosed.labels(role, _pick(event.reason, CONNECTION_CLOSE_REASONS)).inc()
        elif isinstance(event, HandshakeFailed):
            self.handshakeFailures.labels(_pick(event.reason, HANDSHAKE_FAILURE_REASONS)).inc()
        elif isinstance(event, ConfigReloaded):
            self.reloads.labels("applied").inc()
        elif isinstance(event, ConfigReloadFailed):
            self.reloads.labels("refused").inc()
        elif isinstance(event, H2RRegistration):
            self.h2rEvents.labels(_pick(event.state, _H2R_STATES)).inc()
        elif isinstance(event, H2RStatus):
            self.h2rStatus.labels(_pick(event.state, _H2R_STATUS)).inc()
        elif isinstance(event, CertificateRotated):
            self.rotations.labels("rotated").inc()
        elif isinstance(event, CertificateRotationFailed):
            self.rotations.labels("failed").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
