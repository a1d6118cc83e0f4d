"""
Destination parsing and formatting for HBONE (pure: no reactor, no sockets).

What lives here:

- L{Target}, the one validated form of a tunnel destination, and the
  parsers that produce it from the wire: the CONNECT C{:authority}
  (PROTOCOL.md section 4) and the POST form's C{/_hbone/<target>} path
  (PROTOCOL.md section 5).
- L{parseHostPort} for operator-supplied addresses (command line, config).
- The request headers that travel with a tunnel: C{forwarded} (RFC 7239),
  C{traceparent} (W3C Trace Context) and C{baggage} (W3C Baggage).

Every wire parser is bounded in input length and raises only
L{AddressError} (the header helpers never raise at all), so a peer's bytes
can never surface as anything but a C{400} or an ignored header.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Callable, Final

__all__ = [
    "AddressError",
    "Target",
    "parseAuthority",
    "parseHbonePath",
    "isHbonePath",
    "parseHostPort",
    "formatForwarded",
    "parseForwardedFor",
    "newTraceparent",
    "isValidTraceparent",
    "parseBaggage",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HBONE_PATH_PREFIX: Final = "/_hbone/"

# Input bounds.  The longest valid :authority is a 253-byte name plus ":65535"
# (259 bytes); anything far beyond that is refused before any real work.
MAX_AUTHORITY_LENGTH: Final = 512
# A canonical path is at most 8 + 259 bytes; percent-encoding every byte of
# the longest target triples it.
MAX_HBONE_PATH_LENGTH: Final = 1024
MAX_FORWARDED_LENGTH: Final = 4096
MAX_FORWARDED_ELEMENTS: Final = 8
MAX_BAGGAGE_LENGTH: Final = 8192
MAX_BAGGAGE_MEMBERS: Final = 64

# How much of an offending value an error message quotes.
_SHOW_LIMIT = 80

_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)
_DIGITS_RE = re.compile(r"[0-9]+", re.ASCII)
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_IPV6_CHARS_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}", re.ASCII)
_ZONE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
_HEX = frozenset("0123456789abcdefABCDEF")
_TRACEPARENT_RE = re.compile(
    r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}", re.ASCII
)
# RFC 9110 section 5.6.2 token characters.
_TCHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789"
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
# W3C Baggage baggage-octet: printable ASCII except space, '"', ',', ';', '\'.
_BAGGAGE_VALUE_RE = re.compile(
    r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*", re.ASCII
)
# RFC 7239 section 6.3 obfport.
_OBFUSCATED_PORT_RE = re.compile(r"_[A-Za-z0-9._-]+", re.ASCII)
_OWS = " \t"


class AddressError(ValueError):
    """
    A target that is not a valid HBONE destination.

    C{str(e)} is a short human reason that names the bad value, for example
    C{"port 0 out of range 1-65535 in ':authority' 'h:0'"}.  Quoted values
    are truncated and escaped, so the message is safe to log.
    """


def _show(value: str) -> str:
    """
    Quote a possibly hostile value for an error message: escaped (C{repr})
    and truncated to a few dozen characters.
    """
    if len(value) > _SHOW_LIMIT:
        return repr(value[:_SHOW_LIMIT]) + "..."
    return repr(value)


def _asText(value: str | bytes, where: str) -> str:
    """
    Decode wire input as ASCII.

    @raise AddressError: if C{value} holds a non-ASCII byte or character,
        or is neither C{str} nor C{bytes}.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            shown = _show(raw.decode("ascii", "backslashreplace"))
            raise AddressError(f"non-ASCII byte in {where} {shown}") from None
    if not isinstance(value, str):
        raise AddressError(f"{where} must be str or bytes, not {type(value).__name__}")
    if not value.isascii():
        raise AddressError(f"non-ASCII character in {where} {_show(value)}")
    return value


def _canonicalIPv6(address: ipaddress.IPv6Address) -> str:
    """
    Canonical text of an IPv6 address: RFC 5952, compressed and lowercase.

    IPv4-mapped addresses use the RFC 5952 section 5 form
    (C{::ffff:192.0.2.1}), which is also what Python 3.13+ prints; spelling
    it out keeps the canonical form identical on every supported Python.
    The scope ID, if any, is dropped.
    """
    mapped = address.ipv4_mapped
    if mapped is not None:
        return f"::ffff:{mapped}"
    return ipaddress.IPv6Address(int(address)).compressed


def _parsePort(text: str, allowZero: bool = False) -> int:
    """
    Parse a port: 1-5 ASCII digits, no leading zero, 1-65535 (or 0 when
    C{allowZero}).

    @raise AddressError: with a reason but no context.
    """
    if text == "":
        raise AddressError("missing port")
    if _PORT_RE.fullmatch(text) is None:
        raise AddressError(f"port {_show(text)} is not 1-5 decimal digits")
    port = int(text)
    if port == 0 and allowZero and text == "0":
        return 0
    if len(text) > 1 and text[0] == "0":
        raise AddressError(f"port {_show(text)} has a leading zero")
    if not 1 <= port <= 65535:
        raise AddressError(f"port {port} out of range 1-65535")
    return port


def _parseIPv4(text: str) -> str:
    """
    Validate a dotted quad of four decimal octets without leading zeros.

    @return: the address text (already canonical).
    @raise AddressError: with a reason but no context.
    """
    octets = text.split(".")
    if len(octets) != 4:
        raise AddressError(f"IPv4 address {_show(text)} does not have 4 octets")
    for octet in octets:
        if _DIGITS_RE.fullmatch(octet) is None or len(octet) > 3:
            raise AddressError(f"IPv4 octet {_show(octet)} is not 1-3 decimal digits")
        if len(octet) > 1 and octet[0] == "0":
            raise AddressError(
                f"IPv4 octet {_show(octet)} has a leading zero (read as octal by some resolvers)"
            )
        if int(octet) > 255:
            raise AddressError(f"IPv4 octet {octet} out of range 0-255")
    return text


def _parseIPv6(text: str) -> str:
    """
    Validate RFC 4291 IPv6 text (no brackets, no zone ID).

    @return: the canonical text (see L{_canonicalIPv6}).
    @raise AddressError: with a reason but no context.
    """
    if "%" in text:
        raise AddressError(f"IPv6 zone ID not allowed in {_show(text)}")
    if _IPV6_CHARS_RE.fullmatch(text) is None:
        raise AddressError(f"invalid IPv6 address {_show(text)}")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise AddressError(f"invalid IPv6 address {_show(text)}") from None
    return _canonicalIPv6(address)


def _parseName(text: str, allowTrailingDot: bool = False) -> str:
    """
    Validate a hostname: 1-253 bytes of LDH labels (1-63 bytes each, no
    leading or trailing C{-}), whose last label is neither all digits nor
    starts with C{0x} (WHATWG URL "ends in a number": C{127.1},
    C{2130706433} and C{0x7f.0.0.1} would be read as addresses).

    @param allowTrailingDot: accept (and keep) one trailing dot, for
        operator-written absolute names.
    @return: the lowercased name.
    @raise AddressError: with a reason but no context.
    """
    if text == "":
        raise AddressError("empty host")
    name = text.lower()
    body = name[:-1] if allowTrailingDot and name.endswith(".") else name
    if len(body) > 253:
        raise AddressError(f"hostname of {len(body)} bytes is longer than 253")
    labels = body.split(".")
    for label in labels:
        if label == "":
            if body.endswith("."):
                raise AddressError(f"trailing dot in hostname {_show(text)}")
            raise AddressError(f"empty label in hostname {_show(text)}")
        if len(label) > 63:
            raise AddressError(f"hostname label of {len(label)} bytes is longer than 63")
        if _LABEL_RE.fullmatch(label) is None:
            raise AddressError(f"invalid hostname {_show(text)}")
    last = labels[-1]
    if last.isdigit() or last.startswith("0x"):
        raise AddressError(
            f"hostname {_show(text)} ends in a number (not a valid IPv4 address either)"
        )
    return name


def _parseHost(text: str) -> str:
    """
    Canonicalize an unbracketed host of the PROTOCOL section 4 grammar:
    IPv4 dotted quad, IPv6 text, or hostname.

    @raise AddressError: with a reason but no context.
    """
    if ":" in text:
        return _parseIPv6(text)
    labels = text.split(".")
    if len(labels) == 4 and all(_DIGITS_RE.fullmatch(label) for label in labels):
        return _parseIPv4(text)
    return _parseName(text)


def _hostKind(host: str) -> str:
    """
    Classify a canonical host: C{"ipv6"}, C{"ipv4"} or C{"name"}.

    Valid names never end in an all-digit label, so one means a dotted
    quad.
    """
    if ":" in host:
        return "ipv6"
    if host.rpartition(".")[2].isdigit():
        return "ipv4"
    return "name"


@dataclass(frozen=True, slots=True)
class Target:
    """
    A validated HBONE destination.

    Construction canonicalizes and validates: C{Target("2001:DB8::0001",
    443).host == "2001:db8::1"}, C{Target("Svc.NS", 80).host == "svc.ns"},
    and an invalid host or port raises L{AddressError}.  A C{Target}
    therefore always satisfies the PROTOCOL section 4 grammar.

    @ivar host: a lowercased hostname, a dotted-quad IPv4 address, or a
        compressed IPv6 address without brackets (RFC 5952; IPv4-mapped
        addresses as C{::ffff:a.b.c.d}).
    @ivar port: 1-65535.
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str):
            raise TypeError(f"Target host must be str, not {type(self.host).__name__}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TypeError(f"Target port must be int, not {type(self.port).__name__}")
        if not 1 <= self.port <= 65535:
            raise AddressError(f"port {self.port} out of range 1-65535")
        host = _asText(self.host, "host")
        if len(host) > 253:
            raise AddressError(f"host of {len(host)} bytes is longer than 253")
        canonical = _parseHost(host)
        if canonical != self.host:
            object.__setattr__(self, "host", canonical)

    @property
    def kind(self) -> str:
        """
        C{"ipv4"}, C{"ipv6"} or C{"name"}.
        """
        return _hostKind(self.host)

    @property
    def ip(self) -> IPAddress | None:
        """
        The address, for an IP target; L{None} for a hostname.
        """
        if self.kind == "name":
            return None
        return ipaddress.ip_address(self.host)

    def authority(self) -> str:
        """
        The CONNECT C{:authority}: C{"10.0.0.1:80"}, C{"[2001:db8::1]:443"},
        C{"svc.ns:80"}.
        """
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def hbonePath(self) -> str:
        """
        The canonical POST form path (PROTOCOL section 5): one segment, IPv6
        brackets written as C{%5B}/C{%5D}, nothing else encoded.
        """
        if ":" in self.host:
            return f"{HBONE_PATH_PREFIX}%5B{self.host}%5D:{self.port}"
        return f"{HBONE_PATH_PREFIX}{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.authority()


def _splitAuthority(text: str) -> tuple[str, str]:
    """
    Split C{host ":" port} or C{"[" IPv6 "]" ":" port} into the host text
    (without brackets; IPv6 already canonical) and the port text.

    @raise AddressError: with a reason but no context.
    """
    if "@" in text:
        raise AddressError("userinfo not allowed")
    if "%" in text:
        raise AddressError("percent-encoding and IPv6 zone IDs not allowed")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AddressError("unclosed '['")
        inner, rest = text[1:close], text[close + 1 :]
        if rest == "":
            raise AddressError("missing port")
        if rest[0] != ":":
            raise AddressError("expected ':' and a port after ']'")
        if ":" not in inner:
            raise AddressError(f"{_show(inner)} in brackets is not an IPv6 address")
        return _parseIPv6(inner), rest[1:]
    if "]" in text:
        raise AddressError("unbalanced ']'")
    host, colon, port = text.rpartition(":")
    if not colon:
        raise AddressError("missing port")
    if ":" in host:
        raise AddressError("IPv6 address must be in brackets")
    if host == "":
        raise AddressError("empty host")
    return _parseHost(host), port


def _authorityTarget(text: str) -> Target:
    """
    Apply the PROTOCOL section 4 grammar to ASCII text.

    @raise AddressError: with a reason but no context.
    """
    host, portText = _splitAuthority(text)
    return Target(host, _parsePort(portText))


def parseAuthority(value: str | bytes) -> Target:
    """
    Parse a CONNECT C{:authority} by the PROTOCOL section 4 grammar exactly.

    @param value: the header value; C{bytes} are decoded as ASCII.
    @raise AddressError: for anything outside the grammar (the caller
        answers C{400} and dials nothing).
    """
    text = _asText(value, "':authority'")
    if len(text) > MAX_AUTHORITY_LENGTH:
        raise AddressError(
            f"':authority' of {len(text)} bytes is too long {_show(text)}"
        )
    try:
        return _authorityTarget(text)
    except AddressError as e:
        raise AddressError(f"{e} in ':authority' {_show(text)}") from None


def isHbonePath(path: str | bytes) -> bool:
    """
    Cheap check whether a C{:path} asks for the POST form: it starts with
    C{/_hbone/} (case-sensitive).  Whether it is valid is
    L{parseHbonePath}'s business.
    """
    if isinstance(path, str):
        return path.startswith(HBONE_PATH_PREFIX)
    if isinstance(path, (bytes, bytearray)):
        return path.startswith(b"/_hbone/")
    return False


# Characters that must not appear once the path is decoded (PROTOCOL
# section 5): a surviving '%' is a double encoding such as %255B.
_PATH_FORBIDDEN = {"%": "'%'", "/": "'/'", "\\": "'\\'", "@": "'@'", " ": "space"}


def _percentDecode(raw: str) -> str:
    """
    One percent-decoding pass (either hex case) over an ASCII segment,
    refusing bad escapes and the characters PROTOCOL section 5 forbids
    after decoding.

    @raise AddressError: with a reason but no context.
    """
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c == "%":
            hexText = raw[i + 1 : i + 3]
            if len(hexText) != 2 or not (hexText[0] in _HEX and hexText[1] in _HEX):
                raise AddressError(f"bad percent escape {_show(raw[i : i + 3])}")
            c = chr(int(hexText, 16))
            i += 3
        else:
            i += 1
        code = ord(c)
        if code < 0x20 or code == 0x7F:
            raise AddressError(f"control byte 0x{code:02x} in target")
        if code >= 0x80:
            raise AddressError(f"non-ASCII byte 0x{code:02x} in target")
        if c in _PATH_FORBIDDEN:
            raise AddressError(f"{_PATH_FORBIDDEN[c]} in decoded target")
        out.append(c)
    return "".join(out)


def _checkPathShape(raw: str) -> None:
    """
    Refuse everything but one non-empty segment after C{/_hbone/}.

    @raise AddressError: with a reason but no context.
    """
    if "?" in raw:
        raise AddressError("query not allowed")
    if "#" in raw:
        raise AddressError("fragment not allowed")
    segments = raw.split("/")
    if any(segment in (".", "..") for segment in segments):
        raise AddressError("dot segment not allowed")
    if len(segments) > 1:
        if "//" in raw or raw.startswith("/"):
            raise AddressError("empty segment ('//') not allowed")
        if raw.endswith("/"):
            raise AddressError("trailing '/' not allowed")
        raise AddressError("extra path segment not allowed")
    if raw == "":
        raise AddressError("empty target")


def _workloadHost(workloadAddress: str) -> str:
    """
    Canonicalize the configured workload address (operator input).

    @raise ValueError: (not L{AddressError}: this is a configuration
        error, not a bad request) if it is not an IP address.
    """
    try:
        address = ipaddress.ip_address(workloadAddress)
    except ValueError:
        raise ValueError(
            f"workload address {_show(str(workloadAddress))} is not an IP address"
        ) from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            raise ValueError(
                f"workload address {_show(workloadAddress)} must not have a zone ID"
            )
        return _canonicalIPv6(address)
    return str(address)


def parseHbonePath(path: str | bytes, workloadAddress: str | None = None) -> Target:
    """
    Parse a POST form C{:path} (PROTOCOL section 5).

    Accepts C{/_hbone/<target>} (C{/_hbone/} matched case-sensitively), with
    C{<target>} percent-decoded exactly once (either hex case) and then
    parsed by the section 4 grammar; this includes the canonical
    C{/_hbone/%5B2001:db8::1%5D:443} and the legacy raw-bracket form
    C{/_hbone/[2001:db8::1]:443}.  The legacy port-only form
    C{/_hbone/<port>} is accepted only when C{workloadAddress} is given, and
    means C{<workloadAddress>:<port>}.

    @param path: the C{:path}; C{bytes} are decoded as ASCII.
    @param workloadAddress: the mesh-inbound listener's workload IP, or
        L{None} anywhere else.
    @raise AddressError: for a path that is not a valid HBONE path (the
        caller answers C{400}).
    @raise ValueError: if C{workloadAddress} is not an IP address.
    """
    workloadHost = None if workloadAddress is None else _workloadHost(workloadAddress)
    text = _asText(path, "':path'")
    if len(text) > MAX_HBONE_PATH_LENGTH:
        raise AddressError(f"':path' of {len(text)} bytes is too long {_show(text)}")
    try:
        if not text.startswith(HBONE_PATH_PREFIX):
            raise AddressError("not an HBONE path (expected '/_hbone/<host>:<port>')")
        raw = text[len(HBONE_PATH_PREFIX) :]
        _checkPathShape(raw)
        target = _percentDecode(raw)
        if target in (".", ".."):
            raise AddressError("dot segment not allowed")
        if target.lower() in ("tcp", "mtls"):
            raise AddressError(
                f"costinm/hbone {_show(target)} mode is not supported"
            )
        if ":" not in target and "[" not in target:
            if _DIGITS_RE.fullmatch(target) is None:
                raise AddressError("missing port")
            port = _parsePort(target)
            if workloadHost is None:
                raise AddressError(
                    "port-only form needs a mesh-inbound listener with a workload address"
                )
            return Target(workloadHost, port)
        return _authorityTarget(target)
    except AddressError as e:
        raise AddressError(f"{e} in ':path' {_show(text)}") from None


def parseHostPort(
    value: str, defaultHost: str | None = None, allowPortZero: bool = False
) -> tuple[str, int]:
    """
    Parse an operator-written address (command line, config file):
    C{host:port}, C{[v6]:port} or C{:port}.

    Looser than L{parseAuthority} where operator input warrants it: a
    hostname may end in one dot (an absolute name, kept as written), and a
    bracketed IPv6 address may carry a zone ID (C{[fe80::1%eth0]:15008}) for
    link-local binds.  Names are still LDH only (no underscores), and
    numeric-looking names (C{127.1}) are still refused.

    @param defaultHost: the host for C{:port}; returned as given.
    @param allowPortZero: accept port 0 ("any free port", for listeners).
    @return: C{(host, port)}, the host lowercased and without brackets.
    @raise AddressError: naming the bad value.
    """
    text = _asText(value, "address")
    if len(text) > MAX_AUTHORITY_LENGTH:
        raise AddressError(f"address of {len(text)} bytes is too long {_show(text)}")
    try:
        if "@" in text:
            raise AddressError("userinfo not allowed here")
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise AddressError("unclosed '['")
            inner, rest = text[1:close], text[close + 1 :]
            if rest[:1] != ":":
                raise AddressError("expected ':' and a port after ']'")
            addressText, percent, zone = inner.partition("%")
            host = _parseIPv6(addressText)
            if percent:
                if _ZONE_RE.fullmatch(zone) is None:
                    raise AddressError(f"invalid IPv6 zone ID {_show(zone)}")
                host = f"{host}%{zone}"
            portText = rest[1:]
        else:
            if "]" in text:
                raise AddressError("unbalanced ']'")
            hostText, colon, portText = text.rpartition(":")
            if not colon:
                raise AddressError("missing port")
            if ":" in hostText:
                raise AddressError("IPv6 address must be in brackets")
            if hostText == "":
                if defaultHost is None:
                    raise AddressError("missing host")
                host = defaultHost
            else:
                labels = hostText.split(".")
                if len(labels) == 4 and all(_DIGITS_RE.fullmatch(label) for label in labels):
                    host = _parseIPv4(hostText)
                else:
                    host = _parseName(hostText, allowTrailingDot=True)
        return host, _parsePort(portText, allowZero=allowPortZero)
    except AddressError as e:
        raise AddressError(f"{e} in address {_show(text)}") from None


def formatForwarded(host: str, port: int | None) -> str:
    """
    Format one RFC 7239 C{forwarded} element naming a peer:
    C{for="10.0.0.1:5555"}, or C{for="[2001:db8::1]:5555"} for IPv6
    (ztunnel C{build_forwarded}).

    An IPv4-mapped IPv6 peer (from a dual-stack socket) is written as the
    IPv4 address it is; a zone ID is dropped.  A port of L{None} omits the
    port.

    @param host: the peer's IP address (never a name: this text goes on the
        wire, so it is validated here).
    @raise ValueError: if C{host} is not an IP address or C{port} is out of
        range.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"forwarded host {_show(str(host))} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        node = str(mapped) if mapped is not None else f"[{_canonicalIPv6(address)}]"
    else:
        node = str(address)
    if port is None:
        return f'for="{node}"'
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"forwarded port {port!r} out of range 0-65535")
    return f'for="{node}:{port}"'


def _splitForwarded(text: str) -> list[list[tuple[str, str]]] | None:
    """
    Tokenize an RFC 7239 C{Forwarded} field value into elements of
    C{(lowercased name, unquoted value)} pairs.

    Empty list elements are skipped (RFC 9110 section 5.6.1).

    @return: the elements, or L{None} if the value is malformed or has more
        than L{MAX_FORWARDED_ELEMENTS} elements.
    """
    elements: list[list[tuple[str, str]]] = []
    pairs: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while True:
        while i < n and text[i] in _OWS:
            i += 1
        if i >= n or text[i] in ",;":
            # An empty pair or element.
            pass
        else:
            start = i
            while i < n and text[i] in _TCHARS:
                i += 1
            name = text[start:i]
            if name == "" or i >= n or text[i] != "=":
                return None
            i += 1
            if i < n and text[i] == '"':
                i += 1
                chars: list[str] = []
                while True:
                    if i >= n:
                        return None
                    c = text[i]
                    if c == '"':
                        i += 1
                        break
                    if c == "\\":
                        i += 1
                        if i >= n:
                            return None
                        c = text[i]
                    if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F:
                        return None
                    chars.append(c)
                    i += 1
                pairValue = "".join(chars)
            else:
                start = i
                while i < n and text[i] in _TCHARS:
                    i += 1
                pairValue = text[start:i]
                if pairValue == "":
                    return None
            pairs.append((name.lower(), pairValue))
            while i < n and text[i] in _OWS:
                i += 1
        if i >= n:
            break
        if text[i] == ";":
            i += 1
            continue
        if text[i] == ",":
            i += 1
            if pairs:
                elements.append(pairs)
                pairs = []
                if len(elements) > MAX_FORWARDED_ELEMENTS:
                    return None
            continue
        return None
    if pairs:
        elements.append(pairs)
    if len(elements) > MAX_FORWARDED_ELEMENTS:
        return None
    return elements


def _parseForwardedNode(node: str) -> tuple[str, int | None] | None:
    """
    Parse an RFC 7239 section 6 node (C{nodename [":" node-port]}) whose
    nodename is an IP address.

    @return: C{(canonical IP, port or None)}; L{None} for C{unknown}, an
        obfuscated node name, or anything malformed.  An obfuscated port
        (C{_abc}) gives a port of L{None}.
    """
    if node.startswith("["):
        close = node.find("]")
        if close < 0:
            return None
        try:
            host = _parseIPv6(node[1:close])
        except AddressError:
            return None
        rest = node[close + 1 :]
    else:
        hostText, colon, portText = node.partition(":")
        try:
            host = _parseIPv4(hostText)
        except AddressError:
            return None
        rest = colon + portText
    if rest == "":
        return host, None
    if rest[0] != ":":
        return None
    portText = rest[1:]
    if _OBFUSCATED_PORT_RE.fullmatch(portText) is not None:
        return host, None
    try:
        return host, _parsePort(portText)
    except AddressError:
        return None


def parseForwardedFor(value: str | bytes) -> tuple[str, int | None] | None:
    """
    Extract the peer named by the last element of an RFC 7239 C{forwarded}
    header.

    At most L{MAX_FORWARDED_ELEMENTS} elements are parsed; more, a value
    longer than L{MAX_FORWARDED_LENGTH}, any syntax error, a repeated
    parameter, a last element without C{for=}, or a C{for=} that is not an
    IP node (C{unknown}, obfuscated names) all give L{None}.  Values may be
    tokens or quoted strings.  Never raises: a malformed header is ignored,
    never rejected (PROTOCOL section 4).

    @return: C{(canonical IP without brackets, port or None)}, or L{None}.
    """
    try:
        if isinstance(value, (bytes, bytearray)):
            if len(value) > MAX_FORWARDED_LENGTH:
                return None
            text = bytes(value).decode("ascii")
        elif isinstance(value, str):
            if len(value) > MAX_FORWARDED_LENGTH or not value.isascii():
                return None
            text = value
        else:
            return None
        elements = _splitForwarded(text)
        if not elements:
            return None
        last = elements[-1]
        names = [name for name, _ in last]
        if len(set(names)) != len(names):
            return None
        for name, nodeValue in last:
            if name == "for":
                return _parseForwardedNode(nodeValue)
        return None
    except Exception:
        # Belt and braces: a header is never worth an exception.
        return None


def newTraceparent(randbytes: Callable[[int], bytes] = os.urandom) -> str:
    """
    Make a fresh W3C C{traceparent} (version 00, sampled flag set):
    C{"00-<32 hex>-<16 hex>-01"}, with non-zero trace and span IDs.

    @param randbytes: the random source, called as C{randbytes(16)} for the
        trace ID and C{randbytes(8)} for the span ID (injectable for tests).
        An all-zero draw is retried a few times, then forced non-zero.
    """

    def draw(size: int) -> bytes:
        for _ in range(4):
            data = bytes(randbytes(size))
            if len(data) != size:
                raise ValueError(f"randbytes({size}) returned {len(data)} bytes")
            if any(data):
                return data
        return bytes(size - 1) + b"\x01"

    traceID = draw(16)
    spanID = draw(8)
    return f"00-{traceID.hex()}-{spanID.hex()}-01"


def isValidTraceparent(value: str | bytes) -> bool:
    """
    Whether C{value} is a valid version-00 W3C C{traceparent}: lowercase,
    55 characters, C{00-<32 hex>-<16 hex>-<2 hex>}, with non-zero trace and
    span IDs.  Never raises.
    """
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 55:
            return False
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return False
    if not isinstance(value, str) or len(value) != 55:
        return False
    match = _TRACEPARENT_RE.fullmatch(value)
    if match is None:
        return False
    traceID, spanID = match.groups()
    return traceID != "0" * 32 and spanID != "0" * 16


def _unquoteBaggage(value: str) -> str:
    """
    Percent-decode a baggage value as UTF-8, replacing invalid sequences
    with U+FFFD (W3C Baggage); a C{%} not followed by two hex digits is
    kept as is.
    """
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == "%" and i + 2 < n and value[i + 1] in _HEX and value[i + 2] in _HEX:
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(c))
            i += 1
    return out.decode("utf-8", "replace")


def parseBaggage(value: str | bytes) -> dict[str, str]:
    """
    Parse a W3C C{baggage} header into C{{key: decoded value}}, for
    telemetry only.

    Tolerant: malformed members are dropped, member properties (after
    C{;}) are ignored, a later duplicate key wins.  At most
    L{MAX_BAGGAGE_MEMBERS} members are read; of a value longer than
    L{MAX_BAGGAGE_LENGTH}, only the whole members within that length are
    read.  Never raises.
    """
    try:
        if isinstance(value, (bytes, bytearray)):
            text = bytes(value[: MAX_BAGGAGE_LENGTH + 1]).decode("ascii", "replace")
        elif isinstance(value, str):
            text = value[: MAX_BAGGAGE_LENGTH + 1]
        else:
            return {}
        if len(text) > MAX_BAGGAGE_LENGTH:
            text = text[:MAX_BAGGAGE_LENGTH]
            cut = text.rfind(",")
            text = text[:cut] if cut >= 0 else ""
        result: dict[str, str] = {}
        members = 0
        for member in text.split(","):
            if member.strip(_OWS) == "":
                continue
            members += 1
            if members > MAX_BAGGAGE_MEMBERS:
                break
            keyValue = member.split(";", 1)[0]
            key, equals, rawValue = keyValue.partition("=")
            key = key.strip(_OWS)
            rawValue = rawValue.strip(_OWS)
            if not equals or _TOKEN_RE.fullmatch(key) is None:
                continue
            if _BAGGAGE_VALUE_RE.fullmatch(rawValue) is None:
                continue
            result[key] = _unquoteBaggage(rawValue)
        return result
    except Exception:
        return {}
