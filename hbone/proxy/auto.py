"""The ``auto`` listener (``-L :8080``, ``-L auto://...``): HTTP and SOCKS on one port.

The first byte decides, as gost does: ``0x05`` is a SOCKS5 greeting, ``0x04`` a
SOCKS4/4a request, anything else an HTTP/1.1 request. Credentials, limits and the
destination policy are those of the chosen protocol (:mod:`hbone.proxy.http`,
:mod:`hbone.proxy.socks`); the 10 s handshake deadline counts from the accept.
"""

from __future__ import annotations

from hbone.proxy.http import HTTPConversation, ProxyListenerFactory
from hbone.proxy.socks import SOCKSConversation

__all__ = ["AutoProxyFactory", "SniffingConversation"]


class SniffingConversation:
    """Waits for the first byte, then hands the connection to the right conversation."""

    def __init__(self, protocol, credentials) -> None:
        self.protocol = protocol
        self.credentials = credentials

    def dataReceived(self, data: bytes) -> None:
        if not data:
            return
        if data[0] in (0x04, 0x05):
            chosen = SOCKSConversation(self.protocol, self.credentials)
        else:
            chosen = HTTPConversation(self.protocol, self.credentials)
        self.protocol.conversation = chosen
        chosen.dataReceived(data)


class AutoProxyFactory(ProxyListenerFactory):
    """HTTP proxy, SOCKS5 and SOCKS4/4a on one listener, sniffed from the first byte.

    ``AutoProxyFactory(dialer, tracker, clock, credentials=None, name="auto")``."""

    def __init__(self, dialer, tracker, clock, credentials: tuple[str, str] | None = None,
                 name: str = "auto", **kw) -> None:
        if credentials is not None:
            from hbone.proxy.socks import _credentialBytes

            _credentialBytes(credentials)
        super().__init__(dialer, tracker, clock, credentials, name, **kw)

    def conversationFor(self, protocol):
        return SniffingConversation(protocol, self.credentials)
