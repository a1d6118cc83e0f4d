"""Errors a tunnel can end with, each naming what went wrong and the status it maps to.

Statuses and ``proxy-status`` error tokens follow PROTOCOL §6.
"""

from __future__ import annotations

from h2.errors import ErrorCodes

__all__ = [
    "HBoneError",
    "StreamReset",
    "TunnelAborted",
    "TunnelRefused",
    "HopUnreachable",
    "HopIdentityError",
    "RequestError",
    "AccessDenied",
    "ConnectTimeout",
    "ConnectLimit",
    "ResponseTimeout",
]


class HBoneError(Exception):
    """Base class. ``status`` and ``proxyError`` say how a server answers it."""

    status = 503
    proxyError = "destination_unavailable"


class RequestError(HBoneError):
    """A request that is not a valid HBONE CONNECT or POST form (400)."""

    status = 400
    proxyError = "http_request_error"


class AccessDenied(HBoneError):
    """The peer identity may not reach this destination (403)."""

    status = 403
    proxyError = "http_request_denied"


class ConnectTimeout(HBoneError):
    status = 504
    proxyError = "connection_timeout"


class ResponseTimeout(HBoneError):
    status = 504
    proxyError = "http_response_timeout"


class ConnectLimit(HBoneError):
    status = 503
    proxyError = "connection_limit_reached"


class StreamReset(HBoneError):
    """The peer reset the stream (RST_STREAM with ``errorCode``)."""

    status = 502
    proxyError = "proxy_internal_response"

    def __init__(self, errorCode: int, message: str | None = None) -> None:
        self.errorCode = errorCode
        try:
            name = ErrorCodes(errorCode).name
        except ValueError:
            name = f"0x{errorCode:x}"
        super().__init__(message or f"stream reset by peer ({name})")


class TunnelAborted(HBoneError):
    """We reset the tunnel ourselves (idle timeout, shutdown, a failed other half)."""


class TunnelRefused(HBoneError):
    """The HBONE peer answered with a status other than 200."""

    def __init__(self, status: int, proxyStatus: str | None, authority: str, peer: str) -> None:
        self.status = status
        self.proxyStatus = proxyStatus
        self.proxyError = _proxyErrorOf(proxyStatus) or "destination_unavailable"
        self.authority = authority
        self.peer = peer
        detail = f" ({proxyStatus})" if proxyStatus else ""
        super().__init__(f"{peer} refused the tunnel to {authority}: {status}{detail}")


class HopUnreachable(HBoneError):
    """The next hop could not be reached (TCP, TLS or HTTP/2 setup failed)."""

    def __init__(self, message: str, status: int = 503, proxyError: str = "destination_unavailable") -> None:
        super().__init__(message)
        self.status = status
        self.proxyError = proxyError


class HopIdentityError(HopUnreachable):
    """The next hop's certificate was refused (or it refused ours)."""


def _proxyErrorOf(proxyStatus: str | None) -> str | None:
    if not proxyStatus:
        return None
    for part in proxyStatus.split(";")[1:]:
        k, _, v = part.strip().partition("=")
        if k == "error" and v:
            return v.strip().strip('"')
    return None
