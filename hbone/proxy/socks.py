"""The SOCKS listener (``-L socks5://[user:pass@]host:port``; ``socks4``, ``socks4a``).

Two layers, txtorcon-style:

* :class:`SOCKSServerMachine` is the whole server side of SOCKS5 (RFC 1928), its
  username/password sub-negotiation (RFC 1929), and SOCKS4/4a CONNECT, as a pure
  incremental state machine: bytes in, events out. It knows nothing about sockets,
  clocks or dialing; it raises nothing but :class:`SOCKSError`, and it never holds
  more than one handshake message (at most :data:`MAX_MESSAGE` bytes) while waiting.
* :class:`SOCKSProxyFactory` builds the thin protocol that feeds it and turns its
  ``Connect`` event into a dial through the listener's dialer (destination policy
  applies, SECURITY §4.1), then splices.

Replies follow PROTOCOL §6 "Local listeners": ``0x00`` success; ``0x01`` for a bad
request (400) or a reset; ``0x02`` for a denial (401/403); ``0x05`` for
``connection_refused``; ``0x04`` for other 503/504. BIND and UDP ASSOCIATE get
``0x07``, an unknown address type ``0x08``. SOCKS4 answers ``0x5A``/``0x5B``.
SOCKS4 carries no password, so a listener with credentials refuses it.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from dataclasses import dataclass

from hbone.address import AddressError, Target
from hbone.proxy.http import ProxyListenerFactory

__all__ = [
    "SOCKSError",
    "SOCKSServerMachine",
    "SOCKSProxyFactory",
    "Send",
    "Refuse",
    "Connect",
    "socks5ReplyCode",
    "encodeSOCKS5Request",
    "MAX_MESSAGE",
]

# RFC 1928 constants
SOCKS5 = 0x05
SOCKS4 = 0x04
AUTH_NONE = 0x00
AUTH_USERPASS = 0x02
AUTH_NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

SOCKS4_GRANTED = 0x5A
SOCKS4_REJECTED = 0x5B

#: The longest message a client sends in one step: a SOCKS4a request with a
#: 255-byte user ID and a 255-byte name (8 + 256 + 256), which is longer than any
#: SOCKS5 greeting (257), RFC 1929 request (513) or SOCKS5 request (262).
MAX_MESSAGE = 520
_MAX_SOCKS4_FIELD = 255  # user ID and SOCKS4a host name, without the NUL

_ZERO_V4 = bytes([ATYP_IPV4, 0, 0, 0, 0, 0, 0])


_CONTINUE = object()  # a step changed state without an event


class SOCKSError(Exception):
    """Misuse of the machine (input after it finished, a second answer)."""


@dataclass(frozen=True)
class Send:
    """Write ``data`` to the client and keep going."""

    data: bytes


@dataclass(frozen=True)
class Refuse:
    """Write ``data`` (maybe empty) to the client, then close. The machine is done.

    ``key`` is a fixed reason (for rate-limited logs and metrics); ``reason`` is for
    humans and never holds a password."""

    data: bytes
    key: str
    reason: str


@dataclass(frozen=True)
class Connect:
    """A complete CONNECT request. Answer it with :meth:`SOCKSServerMachine.succeeded`
    or :meth:`SOCKSServerMachine.failed`. ``leftover`` are bytes the client sent after
    the request (optimistic data), for the destination."""

    target: Target
    version: int  # 5 or 4 (4 covers 4a)
    leftover: bytes = b""


def socks5ReplyCode(status: int, proxyError: str | None) -> int:
    """The RFC 1928 REP code for a dial outcome (PROTOCOL §6 "Local listeners")."""
    if status == 200:
        return REP_SUCCEEDED
    if status in (401, 403):
        return REP_NOT_ALLOWED
    if status == 503 and proxyError == "connection_refused":
        return REP_CONNECTION_REFUSED
    if status in (503, 504):
        return REP_HOST_UNREACHABLE
    return REP_GENERAL_FAILURE  # 400, a reset before a response (502), anything else


def _socks5Reply(rep: int, bindHost: str | None = None, bindPort: int = 0) -> bytes:
    address = _ZERO_V4
    if bindHost is not None:
        try:
            ip = ipaddress.ip_address(bindHost)
        except ValueError:
            ip = None
        if ip is not None:
            atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
            address = bytes([atyp]) + ip.packed + struct.pack("!H", bindPort & 0xFFFF)
    return bytes([SOCKS5, rep, 0x00]) + address


def _socks4Reply(code: int) -> bytes:
    return bytes([0x00, code]) + b"\x00" * 6


def encodeSOCKS5Request(target: Target, command: int = CMD_CONNECT) -> bytes:
    """The canonical RFC 1928 request for ``target`` (IPv4, IPv6 or domain ATYP)."""
    port = struct.pack("!H", target.port)
    kind = target.kind
    if kind == "ipv4":
        address = bytes([ATYP_IPV4]) + ipaddress.IPv4Address(target.host).packed
    elif kind == "ipv6":
        address = bytes([ATYP_IPV6]) + ipaddress.IPv6Address(target.host).packed
    else:
        name = target.host.encode("ascii")
        address = bytes([ATYP_DOMAIN, len(name)]) + name
    return bytes([SOCKS5, command, 0x00]) + address + port


def _credentialBytes(credentials) -> tuple[bytes, bytes] | None:
    if credentials is None:
        return None
    user, password = credentials
    userBytes, passwordBytes = user.encode("utf-8"), password.encode("utf-8")
    if not 1 <= len(userBytes) <= 255 or len(passwordBytes) > 255:
        raise ValueError("SOCKS5 credentials: the user name must be 1-255 bytes and the "
                         "password at most 255 bytes (RFC 1929)")
    return userBytes, passwordBytes


class SOCKSServerMachine:
    """The server side of a SOCKS handshake, one client connection's worth.

    Feed bytes with :meth:`receive`; it returns a list of :class:`Send`,
    :class:`Refuse` and :class:`Connect` events. After ``Refuse`` the machine is
    finished; after ``Connect`` it waits for :meth:`succeeded` or :meth:`failed`,
    which return the reply bytes. Input is accepted in any split.

    :param credentials: ``(user, password)``: require RFC 1929 (method 0x02) and
        refuse SOCKS4, which cannot authenticate; ``None``: method 0x00 only.
    """

    # states
    START = "start"
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    SOCKS4_REQUEST = "socks4-request"
    WAITING = "waiting"  # Connect emitted, answer pending
    DONE = "done"

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self._credentials = _credentialBytes(credentials)
        self.state = self.START
        self.version: int | None = None
        self._buffer = b""

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a message (≤ :data:`MAX_MESSAGE`)."""
        return len(self._buffer)

    # -- input --------------------------------------------------------------------

    def receive(self, data: bytes) -> list:
        """Consume ``data``; return the events it completes (maybe none)."""
        if self.state in (self.WAITING, self.DONE):
            raise SOCKSError(f"no input expected in state {self.state}")
        self._buffer += bytes(data)
        events: list = []
        while self.state not in (self.WAITING, self.DONE):
            event = self._steps[self.state](self)
            if event is None:  # need more bytes
                break
            if event is not _CONTINUE:
                events.append(event)
        if self.state == self.DONE:
            self._buffer = b""
        return events

    def _refuse(self, data: bytes, key: str, reason: str) -> Refuse:
        self.state = self.DONE
        return Refuse(data, key, reason)

    def _start(self):
        if not self._buffer:
            return None
        first = self._buffer[0]
        if first == SOCKS5:
            self.version = 5
            self.state = self.GREETING
        elif first == SOCKS4:
            self.version = 4
            self.state = self.SOCKS4_REQUEST
        else:
            return self._refuse(b"", "socks_version", f"not a SOCKS4/5 client (first byte 0x{first:02x})")
        return _CONTINUE

    def _greeting(self):
        buf = self._buffer
        if len(buf) < 2:
            return None
        nmethods = buf[1]
        if len(buf) < 2 + nmethods:
            return None
        methods = set(buf[2 : 2 + nmethods])
        self._buffer = buf[2 + nmethods :]
        wanted = AUTH_USERPASS if self._credentials is not None else AUTH_NONE
        if wanted not in methods:
            why = ("this listener requires username/password (RFC 1929) authentication"
                   if self._credentials is not None else "this listener accepts no authentication")
            return self._refuse(bytes([SOCKS5, AUTH_NO_ACCEPTABLE]), "socks_no_method",
                                f"no acceptable authentication method offered; {why}")
        self.state = self.AUTH if wanted == AUTH_USERPASS else self.REQUEST
        return Send(bytes([SOCKS5, wanted]))

    def _auth(self):
        buf = self._buffer
        if len(buf) < 2:
            return None
        if buf[0] != 0x01:
            return self._refuse(b"\x01\x01", "socks_auth",
                                f"bad username/password sub-negotiation version 0x{buf[0]:02x}")
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return None
        user, password = buf[2 : 2 + ulen], buf[3 + ulen : end]
        self._buffer = buf[end:]
        expectedUser, expectedPassword = self._credentials
        # compare everything, always, in constant time per field
        ok = hmac.compare_digest(user, expectedUser) & hmac.compare_digest(password, expectedPassword)
        if not ok:
            return self._refuse(b"\x01\x01", "socks_auth", "wrong SOCKS5 username or password")
        self.state = self.REQUEST
        return Send(b"\x01\x00")

    def _request(self):
        buf = self._buffer
        if len(buf) < 4:
            return None
        version, command, atyp = buf[0], buf[1], buf[3]  # buf[2] is RSV
        if version != SOCKS5:
            return self._refuse(_socks5Reply(REP_GENERAL_FAILURE), "socks_request",
                                f"request with version 0x{version:02x}")
        if command != CMD_CONNECT:
            name = {CMD_BIND: "BIND", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}.get(command, f"0x{command:02x}")
            return self._refuse(_socks5Reply(REP_COMMAND_NOT_SUPPORTED), "socks_command",
                                f"SOCKS5 command {name} is not supported (only CONNECT)")
        if atyp == ATYP_IPV4:
            end = 4 + 4 + 2
            if len(buf) < end:
                return None
            host = str(ipaddress.IPv4Address(buf[4:8]))
        elif atyp == ATYP_IPV6:
            end = 4 + 16 + 2
            if len(buf) < end:
                return None
            host = str(ipaddress.IPv6Address(buf[4:20]))
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            length = buf[4]
            if length == 0:
                return self._refuse(_socks5Reply(REP_GENERAL_FAILURE), "socks_request",
                                    "empty domain name in SOCKS5 request")
            end = 5 + length + 2
            if len(buf) < end:
                return None
            try:
                host = buf[5 : 5 + length].decode("ascii")
            except UnicodeDecodeError:
                return self._refuse(_socks5Reply(REP_GENERAL_FAILURE), "socks_request",
                                    "non-ASCII domain name in SOCKS5 request")
        else:
            return self._refuse(_socks5Reply(REP_ADDRESS_TYPE_NOT_SUPPORTED), "socks_atyp",
                                f"SOCKS5 address type 0x{atyp:02x} is not supported")
        port = struct.unpack("!H", buf[end - 2 : end])[0]
        leftover, self._buffer = buf[end:], b""
        return self._connect(host, port, leftover, _socks5Reply(REP_GENERAL_FAILURE))

    def _connect(self, host: str, port: int, leftover: bytes, badReply: bytes):
        try:
            target = Target(host, port)
        except AddressError as e:
            return self._refuse(badReply, "socks_target", f"bad SOCKS{self.version} target: {e}")
        self.state = self.WAITING
        return Connect(target, self.version, leftover)

    def _socks4Request(self):
        buf = self._buffer
        rejected = _socks4Reply(SOCKS4_REJECTED)
        if len(buf) < 8:
            return None
        command = buf[1]
        if command != CMD_CONNECT:
            return self._refuse(rejected, "socks_command", "SOCKS4 BIND is not supported (only CONNECT)")
        if self._credentials is not None:
            return self._refuse(rejected, "socks_auth",
                                "SOCKS4 cannot authenticate and this listener requires credentials; use SOCKS5")
        port = struct.unpack("!H", buf[2:4])[0]
        ip = buf[4:8]
        userEnd = buf.find(b"\x00", 8, 8 + _MAX_SOCKS4_FIELD + 1)
        if userEnd < 0:
            if len(buf) > 8 + _MAX_SOCKS4_FIELD:
                return self._refuse(rejected, "socks_request", "SOCKS4 user ID longer than 255 bytes")
            return None
        end = userEnd + 1
        if ip[:3] == b"\x00\x00\x00" and ip[3] != 0:  # SOCKS4a: the name follows
            nameEnd = buf.find(b"\x00", end, end + _MAX_SOCKS4_FIELD + 1)
            if nameEnd < 0:
                if len(buf) > end + _MAX_SOCKS4_FIELD:
                    return self._refuse(rejected, "socks_request", "SOCKS4a host name longer than 255 bytes")
                return None
            raw = buf[end:nameEnd]
            end = nameEnd + 1
            if not raw:
                return self._refuse(rejected, "socks_request", "empty SOCKS4a host name")
            try:
                host = raw.decode("ascii")
            except UnicodeDecodeError:
                return self._refuse(rejected, "socks_request", "non-ASCII SOCKS4a host name")
        else:
            host = str(ipaddress.IPv4Address(ip))
        leftover, self._buffer = buf[end:], b""
        return self._connect(host, port, leftover, rejected)

    # -- the answer ---------------------------------------------------------------

    def succeeded(self, bindHost: str | None = None, bindPort: int = 0) -> bytes:
        """The success reply; ``bindHost``/``bindPort`` is the outbound socket's local
        address when it is an IP (RFC 1928 BND.ADDR), else zeros are sent."""
        self._answered()
        if self.version == 4:
            return _socks4Reply(SOCKS4_GRANTED)
        return _socks5Reply(REP_SUCCEEDED, bindHost, bindPort)

    def failed(self, status: int, proxyError: str | None = None) -> bytes:
        """The failure reply for a dial outcome (an HTTP status, PROTOCOL §6)."""
        self._answered()
        if self.version == 4:
            return _socks4Reply(SOCKS4_REJECTED)
        return _socks5Reply(socks5ReplyCode(status, proxyError))

    def _answered(self) -> None:
        if self.state != self.WAITING:
            raise SOCKSError(f"no request to answer in state {self.state}")
        self.state = self.DONE


SOCKSServerMachine._steps = {
    SOCKSServerMachine.START: SOCKSServerMachine._start,
    SOCKSServerMachine.GREETING: SOCKSServerMachine._greeting,
    SOCKSServerMachine.AUTH: SOCKSServerMachine._auth,
    SOCKSServerMachine.REQUEST: SOCKSServerMachine._request,
    SOCKSServerMachine.SOCKS4_REQUEST: SOCKSServerMachine._socks4Request,
}


# ---------------------------------------------------------------------------
# The listener


def _bindAddress(outbound) -> tuple[str | None, int]:
    from twisted.internet.address import IPv4Address, IPv6Address

    try:
        host = outbound.transport.getHost()
    except Exception:
        return None, 0
    if isinstance(host, (IPv4Address, IPv6Address)):
        return host.host, host.port
    return None, 0


class SOCKSConversation:
    """Drives a :class:`SOCKSServerMachine` for one :class:`ProxyListenerProtocol`."""

    def __init__(self, protocol, credentials) -> None:
        self.protocol = protocol
        self.machine = SOCKSServerMachine(credentials)

    def dataReceived(self, data: bytes) -> None:
        proto = self.protocol
        for event in self.machine.receive(data):
            if isinstance(event, Send):
                proto.transport.write(event.data)
            elif isinstance(event, Refuse):
                proto.refuse(event.data, event.key, event.reason)
            else:
                machine = self.machine

                def reply(outbound):
                    return machine.succeeded(*_bindAddress(outbound))

                def refusal(err):
                    return machine.failed(getattr(err, "status", 502), getattr(err, "proxyError", None))

                proto.startTunnel(event.target, event.leftover, reply, refusal)


class SOCKSProxyFactory(ProxyListenerFactory):
    """SOCKS5 (with RFC 1929 when ``credentials`` are set), SOCKS4 and SOCKS4a.

    ``SOCKSProxyFactory(dialer, tracker, clock, credentials=None, name="socks5")``;
    each CONNECT is dialed through ``dialer`` with the client as the source and
    ``operatorFixed=False``, so a :class:`~hbone.dialer.DirectDialer` applies the
    destination policy. Greeting, authentication and request must arrive within
    ``handshakeTimeout`` (10 s, SECURITY §4.6)."""

    def __init__(self, dialer, tracker, clock, credentials: tuple[str, str] | None = None,
                 name: str = "socks5", **kw) -> None:
        _credentialBytes(credentials)  # RFC 1929 length limits, checked at start
        super().__init__(dialer, tracker, clock, credentials, name, **kw)

    def conversationFor(self, protocol):
        return SOCKSConversation(protocol, self.credentials)
