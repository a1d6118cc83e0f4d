"""One observer fan-out for lifecycle events: logs, metrics and user callbacks all
subscribe here (never calls scattered through the data path).

Events are small frozen records, emitted once per tunnel or per rejection — never
per chunk. A failing observer is logged and never breaks a tunnel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.logger import Logger

__all__ = ["Events", "TunnelOpened", "TunnelClosed", "TunnelRejected", "ConnectionOpened", "ConnectionClosed",
           "HandshakeFailed", "CONNECTION_CLOSE_REASONS", "HANDSHAKE_FAILURE_REASONS", "ConfigReloaded",
           "ConfigReloadFailed", "CertificateRotated", "CertificateRotationFailed", "LogObserver"]


@dataclass(frozen=True)
class TunnelOpened:
    direction: str  # "inbound" (an HBONE server dialed a target) or "outbound" (a listener opened a tunnel)
    listener: str
    peer: str | None  # the SPIFFE ID of the HBONE peer, where there is one
    source: tuple | None
    target: str
    traceparent: str | None
    setup: float | None = None  # seconds from the request to the splice, where known


@dataclass(frozen=True)
class TunnelClosed:
    direction: str
    listener: str
    peer: str | None
    source: tuple | None
    target: str
    traceparent: str | None
    bytesUp: int  # source -> target
    bytesDown: int  # target -> source
    duration: float
    reason: str | None  # None: both directions ended cleanly


@dataclass(frozen=True)
class TunnelRejected:
    """A tunnel that was not opened: policy denial, bad request, unreachable target."""

    listener: str
    peer: str | None
    source: tuple | None
    target: str | None
    status: int
    error: str  # the proxy-status error token (a fixed enum, never peer-controlled)
    reason: str


@dataclass(frozen=True)
class ConnectionOpened:
    """An HTTP/2 connection became usable (the peer's first SETTINGS arrived)."""

    role: str  # "server" (accepted) or "client" (dialed)
    peer: str | None  # the SPIFFE ID it proved


@dataclass(frozen=True)
class ConnectionClosed:
    """An HTTP/2 connection that was usable ended."""

    role: str
    peer: str | None
    reason: str  # one of CONNECTION_CLOSE_REASONS
    duration: float


#: Why an HTTP/2 connection ended (a fixed set: metrics label values).
CONNECTION_CLOSE_REASONS = ("closed", "idle", "keepalive_timeout", "drain", "goaway_error", "limit",
                            "protocol_error", "lost")


@dataclass(frozen=True)
class HandshakeFailed:
    """A connection to an HBONE listener that never became usable."""

    peer: str  # "ip:port"
    reason: str  # one of HANDSHAKE_FAILURE_REASONS
    detail: str  # for the log, never a metrics label


#: Why a handshake failed (a fixed set: metrics label values).
HANDSHAKE_FAILURE_REASONS = ("certificate", "alpn", "timeout", "no_settings", "tls")


@dataclass(frozen=True)
class ConfigReloaded:
    """A reload (SIGHUP) was applied."""

    source: str  # the config file
    changed: tuple[str, ...]  # what took effect, e.g. ("allow", "rules")
    ignored: tuple[str, ...]  # what changed but needs a restart, e.g. ("listeners",)
    reset: int  # live tunnels the new configuration no longer allows, reset


@dataclass(frozen=True)
class ConfigReloadFailed:
    """A reload was refused; the running configuration stays."""

    source: str
    error: str


@dataclass(frozen=True)
class CertificateRotated:
    """A renewed SVID was loaded from its files; new handshakes use it."""

    identity: str
    notAfter: float  # POSIX seconds
    source: str


@dataclass(frozen=True)
class CertificateRotationFailed:
    """The certificate files changed but do not load; the old SVID stays in use."""

    identity: str
    source: str
    error: str


class Events:
    """The fan-out. ``subscribe`` returns a function that unsubscribes."""

    log = Logger()

    def __init__(self) -> None:
        self._observers: list[Callable[[object], None]] = []

    def subscribe(self, observer: Callable[[object], None]) -> Callable[[], None]:
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def emit(self, event: object) -> None:
        for observer in tuple(self._observers):
            try:
                observer(event)
            except Exception:
                self.log.failure("event observer {observer!r} failed on {event}",
                                 observer=observer, event=type(event).__name__)


def _fmtSource(source) -> str:
    if not source:
        return "?"
    host, port = source[0], source[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class LogObserver:
    """The log lines: one per closed tunnel."""

    log = Logger(namespace="hbone")

    def __call__(self, event: object) -> None:
        if isinstance(event, TunnelClosed):
            self.log.info(
                "tunnel {direction} {source} -> {target}{peer} closed{how}: "
                "{up} bytes up, {down} bytes down, {secs:.1f}s",
                direction=event.direction,
                source=_fmtSource(event.source),
                target=event.target,
                peer=f" ({event.peer})" if event.peer and event.peer != "None" else "",
                how=f" ({event.reason})" if event.reason else "",
                up=event.bytesUp,
                down=event.bytesDown,
                secs=event.duration,
            )
