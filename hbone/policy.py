"""Destination policy (SSRF defaults, SECURITY §4.1) and peer authorization (§4.2).

Nothing here touches a socket or the reactor. :class:`DestinationPolicy` decides
whether an address and port may be dialed; :meth:`DestinationPolicy.resolveAndCheck`
turns a CONNECT target into the one address that will be dialed, resolving a
hostname exactly once so that the address that was checked is the address that is
dialed (this defeats DNS rebinding). :class:`PeerAuthorizer` decides which
authenticated SPIFFE peers may open tunnels at all.

Refusals are :class:`DialError` subclasses that carry the HTTP status and the
RFC 9209 ``proxy-status`` error token of PROTOCOL §6, and a message that names the
address, the range that matched and what to configure instead. The caller logs the
refusal once; this module does not log.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence, Union

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import TimeoutError as InternetTimeout
from twisted.internet.interfaces import IReactorTime, IResolutionReceiver
from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.address import IPv6Address as TwistedIPv6Address
from zope.interface import Interface, implementer

from hbone.errors import HBoneError

__all__ = [
    "AllowEntry",
    "DNSFailure",
    "DNSTimeout",
    "DestinationDenied",
    "DestinationPolicy",
    "DialError",
    "IDestinationPolicy",
    "IPeerAuthorizer",
    "IResolver",
    "PeerAuthorizer",
    "ReactorResolver",
    "discoverLocalAddresses",
    "parseAllowEntry",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

ALWAYS = "always"
PRIVATE = "private"
PUBLIC = "public"

#: How long a hostname lookup may take (SECURITY §4.1, PROTOCOL §6).
DNS_TIMEOUT = 5.0


# ---------------------------------------------------------------------------
# Errors


class DialError(HBoneError):
    """
    A destination that will not be dialed.

    @ivar status: the HTTP status to answer with (PROTOCOL §6).
    @ivar proxyError: the RFC 9209 ``proxy-status`` error token.

    C{str(e)} is a human reason that names the address and, where there is one, the
    configuration that would change the outcome.
    """

    status: int = 503
    proxyError: str = "destination_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class DestinationDenied(DialError):
    """The destination policy refuses the address: C{403 destination_ip_prohibited}."""

    status = 403
    proxyError = "destination_ip_prohibited"


class DNSFailure(DialError):
    """The name does not exist or has no addresses: C{503 dns_error}."""

    status = 503
    proxyError = "dns_error"


class DNSTimeout(DialError):
    """The lookup did not finish within its deadline: C{504 dns_timeout}."""

    status = 504
    proxyError = "dns_timeout"


# ---------------------------------------------------------------------------
# The classification table (SECURITY §4.1)


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), name) for net, name in pairs)


#: Always denied; only an exact ``address:port`` allow entry re-enables one pair.
#: More specific networks come first so that the message names the closest range.
_ALWAYS_V4 = _nets(
    ("0.0.0.0/8", "this network"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, cloud metadata"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, broadcast"),
    ("100.100.100.200/32", "Alibaba Cloud metadata"),
)
_ALWAYS_V6 = _nets(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("fd00:ec2::254/128", "AWS metadata"),
)

#: Denied unless a CIDR entry or a hostname-suffix entry allows it.
_PRIVATE_V4 = _nets(
    ("10.0.0.0/8", "private, RFC 1918"),
    ("172.16.0.0/12", "private, RFC 1918"),
    ("192.168.0.0/16", "private, RFC 1918"),
    ("100.64.0.0/10", "shared address space, CGNAT"),
    ("198.18.0.0/15", "benchmarking"),
)
_PRIVATE_V6 = _nets(("fc00::/7", "unique local"))

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_EMBEDDING_NAMES = {
    _MAPPED: "IPv4-mapped",
    _NAT64: "NAT64",
    _NAT64_LOCAL: "local-use NAT64",
    _SIX_TO_FOUR: "6to4",
}

_SEVERITY = {PUBLIC: 0, PRIVATE: 1, ALWAYS: 2}

#: RFC 6052 §2.2 layouts for a NAT64 prefix of each length: the bit ranges (counted
#: from the most significant bit) that hold the 32 IPv4 bits, and where the suffix
#: that must be zero starts (128 when there is none). Bits 64-71 are always zero.
_RFC6052_LAYOUTS = {
    48: (((48, 64), (72, 88)), 88),
    56: (((56, 64), (72, 96)), 96),
    64: (((72, 104),), 104),
    96: (((96, 128),), 128),
}


def _bits(value: int, start: int, end: int) -> int:
    """Bits [start, end) of a 128-bit integer, counted from the most significant bit."""
    return (value >> (128 - end)) & ((1 << (end - start)) - 1)


def _nat64LocalReadings(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """
    Every IPv4 address a NAT64 under 64:ff9b:1::/48 could read out of C{ip}.

    The position of the IPv4 address depends on the prefix length the deployment
    uses (RFC 6052 §2.2), which hbone cannot know. A reading is plausible when the
    reserved bits 64-71 and its suffix are zero; if none is, every reading counts.
    The caller classifies by the most restrictive reading.
    """
    value = int(ip)
    plausible = []
    every = []
    for ranges, suffixStart in _RFC6052_LAYOUTS.values():
        v4 = 0
        for start, end in ranges:
            v4 = (v4 << (end - start)) | _bits(value, start, end)
        reading = ipaddress.IPv4Address(v4)
        every.append(reading)
        if _bits(value, 64, 72) == 0 and (suffixStart == 128 or _bits(value, suffixStart, 128) == 0):
            plausible.append(reading)
    return plausible or every


def _embeddedIPv4(ip: IPAddress) -> tuple[IPNetwork, list[ipaddress.IPv4Address]] | None:
    """The IPv4-embedding prefix C{ip} is in and the IPv4 address(es) it carries."""
    if ip.version != 6:
        return None
    value = int(ip)
    if ip in _MAPPED:
        return _MAPPED, [ipaddress.IPv4Address(value & 0xFFFFFFFF)]
    if ip in _NAT64:
        return _NAT64, [ipaddress.IPv4Address(value & 0xFFFFFFFF)]
    if ip in _NAT64_LOCAL:
        return _NAT64_LOCAL, _nat64LocalReadings(ip)  # type: ignore[arg-type]
    if ip in _SIX_TO_FOUR:
        return _SIX_TO_FOUR, [ipaddress.IPv4Address(_bits(value, 16, 48))]
    return None


def _classifyPlain(ip: IPAddress) -> tuple[str, str]:
    """Classify without looking at embedded IPv4 addresses."""
    always, private = (_ALWAYS_V4, _PRIVATE_V4) if ip.version == 4 else (_ALWAYS_V6, _PRIVATE_V6)
    for net, name in always:
        if ip in net:
            return ALWAYS, f"{net} ({name})"
    for net, name in private:
        if ip in net:
            return PRIVATE, f"{net} ({name})"
    return PUBLIC, "no special-purpose range (public)"


def _toAddress(ip: str | IPAddress) -> IPAddress:
    """Parse an address literal; brackets around IPv6 are tolerated."""
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return ipaddress.ip_address(text)


def _withoutScope(ip: IPAddress) -> IPAddress:
    if ip.version == 6 and ip.scope_id:  # type: ignore[union-attr]
        return ipaddress.IPv6Address(int(ip))
    return ip


def _effectiveAddresses(ip: IPAddress) -> list[IPAddress]:
    """C{ip} itself (without a zone) and every IPv4 address embedded in it."""
    plain = _withoutScope(ip)
    embedded = _embeddedIPv4(plain)
    return [plain] + (list(embedded[1]) if embedded else [])


def classify(ip: str | IPAddress) -> tuple[str, str]:
    """
    Classify an address per SECURITY §4.1.

    @return: C{(cls, why)} where C{cls} is C{"always"}, C{"private"} or
        C{"public"} and C{why} names the matching range, e.g.
        C{"127.0.0.0/8 (loopback)"}.
    @raise ValueError: C{ip} is not an address literal.
    """
    address = _withoutScope(_toAddress(ip))
    cls, why = _classifyPlain(address)
    if cls != PUBLIC:
        return cls, why
    embedded = _embeddedIPv4(address)
    if embedded is None:
        return cls, why
    prefix, readings = embedded
    worst: tuple[str, str, ipaddress.IPv4Address] | None = None
    for v4 in readings:
        innerCls, innerWhy = _classifyPlain(v4)
        if worst is None or _SEVERITY[innerCls] > _SEVERITY[worst[0]]:
            worst = (innerCls, innerWhy, v4)
    assert worst is not None
    innerCls, innerWhy, v4 = worst
    return innerCls, f"{innerWhy} through its embedded IPv4 {v4} ({prefix}, {_EMBEDDING_NAMES[prefix]})"


def _formatAddress(ip: IPAddress) -> str:
    """C{str(ip)}, but IPv4-mapped addresses keep their dotted quad (::ffff:127.0.0.1)."""
    if ip.version == 6 and ip in _MAPPED and not ip.scope_id:  # type: ignore[union-attr]
        return f"::ffff:{ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)}"
    return str(ip)


def _hostPort(ip: IPAddress, port: int) -> str:
    host = _formatAddress(ip)
    return f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}"


# ---------------------------------------------------------------------------
# Allow entries

_PORT = r"[1-9][0-9]{0,4}"
_PORT_RE = re.compile(rf"^{_PORT}$")
_PORT_RANGE_RE = re.compile(rf"^({_PORT})(?:-({_PORT}))?$")
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _parsePort(text: str, entry: str) -> int:
    if not _PORT_RE.match(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"allow entry {entry!r}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def _parsePorts(text: str, entry: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in text.split(","):
        match = _PORT_RANGE_RE.match(part)
        if match is None:
            raise ValueError(
                f"allow entry {entry!r}: {part!r} is not a port or a port range "
                f"(write ports as 80,443 or 1000-2000)"
            )
        low = _parsePort(match.group(1), entry)
        high = _parsePort(match.group(2), entry) if match.group(2) else low
        if high < low:
            raise ValueError(f"allow entry {entry!r}: port range {part!r} ends before it starts")
        ranges.append((low, high))
    return tuple(ranges)


def _parseAddressLiteral(text: str, entry: str) -> IPAddress:
    if "%" in text:
        raise ValueError(f"allow entry {entry!r}: zone IDs ({text!r}) are not allowed")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"allow entry {entry!r}: {text!r} is not an IPv4 or IPv6 address") from None


def _normalizeHostname(name: str) -> str:
    return name.strip().lower().rstrip(".")


@dataclass(frozen=True)
class AllowEntry:
    """
    One parsed allow-list entry (SECURITY §4.1). Build with :func:`parseAllowEntry`.

    @ivar kind: C{"exact"} (one address and port; re-enables even an always-denied
        pair), C{"cidr"} (a network, optionally limited to ports; lifts the private
        class only) or C{"suffix"} (a DNS suffix; lifts the private class for names
        under it).
    @ivar network: the network of an exact (a /32 or /128) or CIDR entry.
    @ivar ports: inclusive port ranges; empty means every port.
    @ivar suffix: the DNS suffix of a suffix entry, lower case, without dots at
        either end.
    @ivar text: the entry as written, for messages.
    """

    kind: str
    text: str
    network: IPNetwork | None = None
    ports: tuple[tuple[int, int], ...] = ()
    suffix: str | None = None

    def _portMatches(self, port: int) -> bool:
        return not self.ports or any(low <= port <= high for low, high in self.ports)

    def matchesExact(self, ip: IPAddress, port: int) -> bool:
        """Whether this is an exact entry for precisely C{ip} and C{port}."""
        return (
            self.kind == "exact"
            and self.network is not None
            and _withoutScope(ip) == self.network.network_address
            and self._portMatches(port)
        )

    def matchesNetwork(self, ip: IPAddress, port: int) -> bool:
        """Whether this CIDR entry covers C{ip} and C{port} (embedded IPv4 is not looked at here)."""
        if self.kind != "cidr" or self.network is None or not self._portMatches(port):
            return False
        ip = _withoutScope(ip)
        return ip.version == self.network.version and ip in self.network

    def matchesHostname(self, hostname: str) -> bool:
        """Whether this suffix entry covers C{hostname} (the name itself or a name under it)."""
        if self.kind != "suffix" or self.suffix is None:
            return False
        name = _normalizeHostname(hostname)
        return name == self.suffix or name.endswith("." + self.suffix)


def parseAllowEntry(text: str) -> AllowEntry:
    """
    Parse one allow entry.

    Forms:
      - exact: C{1.2.3.4:80}, C{[::1]:8080}. Re-enables that one pair, even an
        always-denied one.
      - CIDR with optional ports: C{10.0.0.0/8}, C{10.0.0.0/8:80,443},
        C{192.168.1.5/32:1000-2000}, C{fc00::/7}, C{fd00::/8:443} (or
        C{[fd00::/8]:443}). Lifts the private class; never an always-denied one.
      - hostname suffix: C{.corp.example} or C{corp.example}, both meaning the
        name and every name under it. Lifts the private class for those names.

    @raise ValueError: anything else, with a message that names the entry.
    """
    entry = text.strip()
    if not entry:
        raise ValueError("empty allow entry")
    if any(c.isspace() for c in entry):
        raise ValueError(f"allow entry {text!r} contains white space")

    body, ports = entry, ""
    bracketed = entry.startswith("[")
    if bracketed:
        close = entry.find("]")
        if close < 0:
            raise ValueError(f"allow entry {entry!r}: missing ']'")
        body, rest = entry[1:close], entry[close + 1 :]
        if rest:
            if not rest.startswith(":") or len(rest) == 1:
                raise ValueError(f"allow entry {entry!r}: expected ':PORT' after ']'")
            ports = rest[1:]
        elif "/" not in body:
            raise ValueError(f"allow entry {entry!r}: missing port; write [{body}]:PORT")

    if "/" in body:
        return _parseCidr(entry, body, ports, bracketed)
    if bracketed:
        address = _parseAddressLiteral(body, entry)
        if address.version != 6:
            raise ValueError(f"allow entry {entry!r}: brackets are for IPv6; write {address}:{ports}")
        return _exact(entry, address, ports)

    if entry.count(":") > 1:
        raise ValueError(
            f"allow entry {entry!r}: write an IPv6 address and port as [ADDRESS]:PORT, "
            f"or a network as ADDRESS/PREFIX"
        )
    if entry.count(":") == 1:
        host, port = entry.split(":")
        address = _parseAddressLiteral(host, entry)
        return _exact(entry, address, port)

    try:
        address = ipaddress.ip_address(entry)
    except ValueError:
        return _parseSuffix(entry)
    raise ValueError(
        f"allow entry {entry!r}: missing port; write {_hostPort(address, 0)[:-1]}PORT for one "
        f"address and port, or {address}/{address.max_prefixlen} for every port (private addresses only)"
    )


def _exact(entry: str, address: IPAddress, port: str) -> AllowEntry:
    number = _parsePort(port, entry)
    network = ipaddress.ip_network(f"{address}/{address.max_prefixlen}")
    return AllowEntry(kind="exact", text=entry, network=network, ports=((number, number),))


def _parseCidr(entry: str, body: str, ports: str, bracketed: bool) -> AllowEntry:
    address, _, prefixAndPorts = body.partition("/")
    if bracketed:
        prefix = prefixAndPorts
    else:
        prefix, colon, ports = prefixAndPorts.partition(":")
        if colon and not ports:
            raise ValueError(f"allow entry {entry!r}: empty port list after ':'")
    base = _parseAddressLiteral(address, entry)
    if not re.fullmatch(r"0|[1-9][0-9]{0,2}", prefix) or int(prefix) > base.max_prefixlen:
        raise ValueError(
            f"allow entry {entry!r}: prefix length {prefix!r} is not a number from 0 to {base.max_prefixlen}"
        )
    try:
        network = ipaddress.ip_network(f"{base}/{prefix}", strict=True)
    except ValueError:
        fixed = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
        raise ValueError(f"allow entry {entry!r}: {base}/{prefix} has host bits set; did you mean {fixed}?") from None
    portRanges = _parsePorts(ports, entry) if ports else ()
    always = _ALWAYS_V4 if network.version == 4 else _ALWAYS_V6
    for denied, name in always:
        if network.subnet_of(denied):  # type: ignore[arg-type]
            first = next(iter(network.hosts()), network.network_address)
            example = _hostPort(first, portRanges[0][0] if portRanges else 8080)
            raise ValueError(
                f"allow entry {entry!r}: {network} lies inside {denied} ({name}), which is always "
                f"denied and cannot be re-enabled by a network; use exact address:port entries "
                f"such as {example}"
            )
    return AllowEntry(kind="cidr", text=entry, network=network, ports=portRanges)


def _parseSuffix(entry: str) -> AllowEntry:
    name = entry.lower()
    if name.startswith("*."):
        raise ValueError(f"allow entry {entry!r}: write a hostname suffix without '*', as {name[1:]}")
    suffix = name[1:] if name.startswith(".") else name
    if suffix.endswith("."):
        suffix = suffix[:-1]
    labels = suffix.split(".")
    if not suffix or len(suffix) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise ValueError(
            f"allow entry {entry!r} is not an address:port, a CIDR (ADDRESS/PREFIX[:PORTS]) "
            f"or a hostname suffix such as .corp.example"
        )
    last = labels[-1]
    if last.isdigit() or last.startswith("0x"):
        raise ValueError(
            f"allow entry {entry!r}: {suffix!r} looks like a number or an address, not a hostname suffix"
        )
    if last == "localhost":
        raise ValueError(f"allow entry {entry!r}: localhost names are always denied (RFC 6761)")
    return AllowEntry(kind="suffix", text=entry, suffix=suffix)


# ---------------------------------------------------------------------------
# Local addresses (for "every local address on one of hbone's own ports")

_ALWAYS_LOCAL = frozenset(
    ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "0.0.0.0", "::")
)


def _parseFibTrie(text: str) -> set[ipaddress.IPv4Address]:
    """The IPv4 addresses marked C{/32 host LOCAL} in C{/proc/net/fib_trie}."""
    found: set[ipaddress.IPv4Address] = set()
    last: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip()
        elif last is not None and stripped.startswith("/32 host LOCAL"):
            try:
                found.add(ipaddress.IPv4Address(last))
            except ValueError:
                pass
    return found


def _parseIfInet6(text: str) -> set[ipaddress.IPv6Address]:
    """The IPv6 addresses listed in C{/proc/net/if_inet6} (32 hex digits per line)."""
    found: set[ipaddress.IPv6Address] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(ipaddress.IPv6Address(int(fields[0], 16)))
            except ValueError:
                pass
    return found


def _readText(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _ioctlInterfaceAddresses() -> set[ipaddress.IPv4Address]:
    """Each interface's primary IPv4 address, through SIOCGIFADDR (Linux)."""
    found: set[ipaddress.IPv4Address] = set()
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return found
    SIOCGIFADDR = 0x8915
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return found
    with sock:
        try:
            interfaces = socket.if_nameindex()
        except OSError:
            return found
        for _, name in interfaces:
            try:
                request = struct.pack("256s", name.encode("utf-8")[:15])
                reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
                found.add(ipaddress.IPv4Address(reply[20:24]))
            except (OSError, ValueError):
                continue
    return found


def discoverLocalAddresses() -> frozenset[IPAddress]:
    """
    This host's addresses: loopback, the unspecified addresses, and every
    interface address, from C{/proc/net/fib_trie}, C{SIOCGIFADDR} and
    C{/proc/net/if_inet6}. Where neither C{/proc} file exists (not Linux) the
    host name's addresses from C{getaddrinfo} stand in. Failures are tolerated;
    the result always holds the loopback and unspecified addresses.

    Call it at start-up: the C{getaddrinfo} fallback may block.
    """
    found: set[IPAddress] = set(_ALWAYS_LOCAL)
    fib = _readText("/proc/net/fib_trie")
    inet6 = _readText("/proc/net/if_inet6")
    if fib is not None:
        found |= _parseFibTrie(fib)
    if inet6 is not None:
        found |= _parseIfInet6(inet6)
    found |= _ioctlInterfaceAddresses()
    if fib is None and inet6 is None:
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None):
                found.add(_withoutScope(ipaddress.ip_address(str(info[4][0]).split("%")[0])))
        except (OSError, ValueError, UnicodeError):
            pass
    return frozenset(found)


# ---------------------------------------------------------------------------
# Resolvers


class IResolver(Interface):
    """Resolves a hostname to every address (A and AAAA) in resolver order."""

    def resolveHost(host: str) -> Deferred[list[str]]:
        """
        Look up C{host} once.

        @return: a L{Deferred} firing with the address strings (possibly none), or
            failing if the lookup failed. Cancelling it abandons the lookup.
        """


@implementer(IResolutionReceiver)
class _AddressCollector:
    """Collects every address of one C{IHostnameResolver} resolution."""

    def __init__(self, done: Deferred[list[str]]) -> None:
        self._done = done
        self._addresses: list[str] = []

    def resolutionBegan(self, resolutionInProgress: object) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        if isinstance(address, (TwistedIPv4Address, TwistedIPv6Address)) and address.host not in self._addresses:
            self._addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if not self._done.called:  # a cancelled (timed-out) lookup finishes unheard
            self._done.callback(list(self._addresses))


@implementer(IResolver)
class ReactorResolver:
    """
    L{IResolver} over C{reactor.nameResolver} (L{IHostnameResolver}): one
    lookup for A and AAAA with TCP semantics, every address collected.
    """

    def __init__(self, reactor: object) -> None:
        self._reactor = reactor

    def resolveHost(self, host: str) -> Deferred[list[str]]:
        done: Deferred[list[str]] = Deferred()
        self._reactor.nameResolver.resolveHostName(  # type: ignore[attr-defined]
            _AddressCollector(done),
            host,
            0,
            [TwistedIPv4Address, TwistedIPv6Address],
            "TCP",
        )
        return done


class _Clock(Protocol):
    def callLater(self, delay: float, callable: object, *args: object, **kw: object) -> object: ...


# ---------------------------------------------------------------------------
# Destination policy


class IDestinationPolicy(Interface):
    """Decides which destinations a request may make hbone dial (SECURITY §4.1)."""

    def checkAddress(ip: str, port: int, hostname: str | None = None) -> None:
        """Raise L{DestinationDenied} unless C{ip}:C{port} may be dialed."""

    def addOwnPort(port: int) -> None:
        """Register a port one of hbone's listeners is bound to."""

    def resolveAndCheck(
        host: str, port: int, resolver: IResolver, clock: IReactorTime, timeout: float = DNS_TIMEOUT
    ) -> str:
        """Coroutine: the one address to dial for C{host}:C{port}, or a L{DialError}."""


def _isLocalhostName(host: str) -> bool:
    name = _normalizeHostname(host)
    return name == "localhost" or name.endswith(".localhost")


@implementer(IDestinationPolicy)
class DestinationPolicy:
    """
    The SSRF defaults of SECURITY §4.1 with the configured allow entries.

    An address is checked in this order:
      1. an exact entry for the pair allows it;
      2. an always-denied address is refused;
      3. a local address on one of hbone's own listening ports is refused;
      4. a private address is allowed only by a CIDR entry covering it and the
         port, or a suffix entry covering the hostname it was resolved from;
      5. everything else is allowed (ports 1-65535).

    Deny entries (same forms as allow entries: ``--deny``) are checked first and
    refuse what they match, whatever the allow entries say.
    """

    def __init__(
        self,
        allow: Sequence[AllowEntry] = (),
        ownPorts: Iterable[int] = (),
        localAddresses: Iterable[str] | None = None,
        deny: Sequence[AllowEntry] = (),
    ) -> None:
        """
        @param allow: parsed allow entries (L{parseAllowEntry}).
        @param ownPorts: ports hbone's listeners are bound to; more are added
            with L{addOwnPort} as listeners start.
        @param localAddresses: this host's addresses; L{None} discovers them now
            (L{discoverLocalAddresses}). Loopback and the unspecified addresses
            are always included.
        """
        self.replaceEntries(allow, deny)
        self._ownPorts: set[int] = set()
        for port in ownPorts:
            self.addOwnPort(port)
        if localAddresses is None:
            local = discoverLocalAddresses()
        else:
            local = frozenset(_withoutScope(_toAddress(a)) for a in localAddresses) | _ALWAYS_LOCAL
        self._localAddresses: frozenset[IPAddress] = local

    def replaceEntries(self, allow: Sequence[AllowEntry] = (), deny: Sequence[AllowEntry] = ()) -> None:
        """Use these allow and deny entries from now on (a config reload); own ports
        and local addresses stay."""
        self._deny = tuple(deny)
        self._allow = tuple(allow)
        self._exact = tuple(e for e in self._allow if e.kind == "exact")
        self._cidrs = tuple(e for e in self._allow if e.kind == "cidr")
        self._suffixes = tuple(e for e in self._allow if e.kind == "suffix")

    @property
    def ownPorts(self) -> frozenset[int]:
        """The ports registered as hbone's own."""
        return frozenset(self._ownPorts)

    @property
    def localAddresses(self) -> frozenset[IPAddress]:
        """The addresses treated as this host's."""
        return self._localAddresses

    def addOwnPort(self, port: int) -> None:
        """Deny every local address on C{port} from now on (a listener bound to it)."""
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"own port {port!r} is not a number from 1 to 65535")
        self._ownPorts.add(port)

    def classify(self, ip: str | IPAddress) -> tuple[str, str]:
        """See the module-level L{classify}."""
        return classify(ip)

    def _isLocal(self, ip: IPAddress) -> bool:
        return any(
            a in self._localAddresses or a.is_loopback or a.is_unspecified
            for a in _effectiveAddresses(ip)
        )

    def checkAddress(self, ip: str | IPAddress, port: int, hostname: str | None = None) -> None:
        """
        Refuse C{ip}:C{port} unless the policy allows it.

        @param hostname: the name C{ip} was resolved from, for suffix entries and
            messages.
        @raise DestinationDenied: with a message naming the address and the range.
        @raise ValueError: C{ip} is not an address literal.
        """
        address = _toAddress(ip)
        where = _hostPort(address, port)
        if hostname:
            where = f"{hostname} ({where})"
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise DestinationDenied(f"{where}: port {port!r} is outside 1-65535")
        for e in self._deny:
            if (
                (e.kind == "exact" and e.matchesExact(address, port))
                or (e.kind == "cidr" and any(e.matchesNetwork(a, port) for a in _effectiveAddresses(address)))
                or (e.kind == "suffix" and hostname and e.matchesHostname(hostname))
            ):
                raise DestinationDenied(f"{where} is denied by the deny entry {e.text}")
        if any(e.matchesExact(address, port) for e in self._exact):
            return
        exactHint = f"allow it with an exact {_hostPort(_withoutScope(address), port)} entry"
        cls, why = classify(address)
        if cls == ALWAYS:
            raise DestinationDenied(f"{where} is in {why}, always denied; {exactHint}")
        if port in self._ownPorts and self._isLocal(address):
            raise DestinationDenied(
                f"{where} is a local address on port {port}, one of hbone's own listening ports, "
                f"always denied; {exactHint}"
            )
        if cls == PUBLIC:
            return
        # Every private address involved (the address, or the IPv4 addresses embedded
        # in it) must be covered by a CIDR entry.
        privates = [a for a in _effectiveAddresses(address) if _classifyPlain(a)[0] == PRIVATE]
        if privates and all(any(e.matchesNetwork(a, port) for e in self._cidrs) for a in privates):
            return
        if hostname and any(e.matchesHostname(hostname) for e in self._suffixes):
            return
        example = _withoutScope(privates[0] if privates else address)
        suggestion = f"a CIDR allow entry such as {example}/{example.max_prefixlen}:{port}"
        if hostname:
            suggestion += f" or a hostname-suffix entry for {_normalizeHostname(hostname)}"
        raise DestinationDenied(f"{where} is in {why}, denied by default; allow it with {suggestion}")

    async def resolveAndCheck(
        self,
        host: str,
        port: int,
        resolver: IResolver,
        clock: IReactorTime | _Clock,
        timeout: float = DNS_TIMEOUT,
    ) -> str:
        """
        The address to dial for C{host}:C{port}.

        An IP literal is checked and returned without a lookup. C{localhost} and
        C{*.localhost} are refused without a lookup (RFC 6761 §6.3). Any other
        name is resolved once, with a deadline of C{timeout} seconds on C{clock};
        every address is classified, and the first allowed one in resolver order
        is returned. That string is the one to dial: there is no second lookup.

        @raise DestinationDenied: the literal, the localhost name, or every
            resolved address is refused.
        @raise DNSTimeout: the lookup did not finish in time.
        @raise DNSFailure: the lookup failed or gave no addresses.
        """
        literal = host.strip()
        if literal.startswith("[") and literal.endswith("]"):
            literal = literal[1:-1]
        try:
            address = ipaddress.ip_address(literal)
        except ValueError:
            address = None
        if address is not None:
            self.checkAddress(address, port)
            return str(address)

        if _isLocalhostName(host):
            raise DestinationDenied(
                f"{host}:{port}: localhost names are always denied, without a lookup (RFC 6761 §6.3)"
            )

        lookup = maybeDeferred(resolver.resolveHost, host)
        lookup.addTimeout(timeout, clock)  # type: ignore[arg-type]
        try:
            answers = await lookup
        except (DeferredTimeout, InternetTimeout):
            raise DNSTimeout(f"{host}: DNS lookup did not finish within {timeout:g} s") from None
        except CancelledError:
            raise
        except Exception as e:
            detail = str(e) or type(e).__name__
            raise DNSFailure(f"{host}: DNS lookup failed ({detail})") from None

        addresses: list[tuple[str, IPAddress]] = []
        for answer in answers or ():
            try:
                parsed = _toAddress(answer)
            except (ValueError, TypeError):
                continue
            if all(parsed != seen for _, seen in addresses):
                addresses.append((answer if isinstance(answer, str) else str(answer), parsed))
        if not addresses:
            raise DNSFailure(f"{host}: DNS lookup returned no addresses")

        reasons = []
        for text, parsed in addresses:
            try:
                self.checkAddress(parsed, port, hostname=host)
            except DestinationDenied as denied:
                reasons.append(str(denied))
                continue
            return text
        listed = ", ".join(text for text, _ in addresses)
        raise DestinationDenied(
            f"{host} resolved to {listed} and none may be dialed: " + "; ".join(reasons)
        )


# ---------------------------------------------------------------------------
# Peer authorization (SECURITY §4.2)

_MESH_ID_RE = re.compile(r"^spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)$")
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class IPeerAuthorizer(Interface):
    """Decides which authenticated peers may open tunnels on a listener."""

    def isAllowed(peerId: object) -> bool:
        """Whether the peer (a SPIFFE ID) may connect."""

    def explain(peerId: object) -> str:
        """Why the peer is allowed or denied, for the log and the 403 text."""


def _meshParts(spiffeId: object) -> tuple[str, str] | None:
    """C{(trustDomain, namespace)} of an ID of the form C{/ns/<ns>/sa/<sa>}, else None."""
    match = _MESH_ID_RE.match(str(spiffeId))
    if match is None:
        return None
    trustDomain = getattr(spiffeId, "trustDomain", None)
    namespace = getattr(spiffeId, "namespace", None)
    if trustDomain != match.group(1) or namespace != match.group(2):
        return None
    return trustDomain, namespace


@dataclass(frozen=True)
class _PeerEntry:
    """One C{allow_peers} entry: an exact SPIFFE ID, or C{spiffe://<td>/ns/<ns>/*}."""

    text: str
    trustDomain: str
    namespace: str | None  # set for a namespace pattern; None for an exact ID

    @classmethod
    def parse(cls, text: str) -> _PeerEntry:
        if not text.startswith("spiffe://"):
            raise ValueError(f"allow_peers entry {text!r} is not a SPIFFE ID (spiffe://...)")
        trustDomain, slash, path = text[len("spiffe://") :].partition("/")
        if not _TRUST_DOMAIN_RE.match(trustDomain):
            raise ValueError(f"allow_peers entry {text!r}: trust domain {trustDomain!r} is not valid")
        segments = path.split("/") if slash else []
        if not segments:
            raise ValueError(f"allow_peers entry {text!r} has no path; write spiffe://{trustDomain}/ns/NS/*")
        if len(segments) == 3 and segments[0] == "ns" and segments[2] == "*":
            if not _SEGMENT_RE.match(segments[1]) or segments[1] in (".", ".."):
                raise ValueError(f"allow_peers entry {text!r}: namespace {segments[1]!r} is not valid")
            return cls(text, trustDomain, segments[1])
        if "*" in text:
            raise ValueError(
                f"allow_peers entry {text!r}: the only pattern is spiffe://<td>/ns/<ns>/*"
            )
        if any(not _SEGMENT_RE.match(s) or s in (".", "..") for s in segments) or len(text) > 2048:
            raise ValueError(f"allow_peers entry {text!r} is not a valid SPIFFE ID")
        return cls(text, trustDomain, None)

    def matches(self, peerId: object) -> bool:
        if self.namespace is None:
            return str(peerId) == self.text
        return _meshParts(peerId) == (self.trustDomain, self.namespace)


@implementer(IPeerAuthorizer)
class PeerAuthorizer:
    """
    SECURITY §4.2 "Who may connect to 15008 (default)".

    A peer is allowed if its trust domain is the local one and it is in the local
    identity's namespace (both IDs of the form C{/ns/<ns>/sa/<sa>}), or if it
    matches an C{allow_peers} entry: an exact SPIFFE ID or a
    C{spiffe://<td>/ns/<ns>/*} pattern. If the local ID has no namespace, only
    explicit entries apply.

    Identities are duck-typed: anything with C{.trustDomain}, C{.namespace} and a
    C{str()} that is the SPIFFE ID.
    """

    def __init__(self, localId: object, allowPeers: Sequence[str] = ()) -> None:
        """
        @raise ValueError: an C{allowPeers} entry is not a SPIFFE ID or pattern.
        """
        self._localId = localId
        self._local = _meshParts(localId)
        self._entries = tuple(_PeerEntry.parse(text) for text in allowPeers)

    @staticmethod
    def checkEntries(allowPeers: Sequence[str]) -> None:
        """@raise ValueError: an entry is not a SPIFFE ID or pattern."""
        for text in allowPeers:
            _PeerEntry.parse(text)

    def replaceEntries(self, allowPeers: Sequence[str] = ()) -> None:
        """Use these ``allow_peers`` entries from now on (a config reload).

        @raise ValueError: an entry is not a SPIFFE ID or pattern (nothing changes).
        """
        self._entries = tuple(_PeerEntry.parse(text) for text in allowPeers)

    def _sameNamespace(self, peerId: object) -> bool:
        return self._local is not None and _meshParts(peerId) == self._local

    def _matchingEntry(self, peerId: object) -> _PeerEntry | None:
        for entry in self._entries:
            if entry.matches(peerId):
                return entry
        return None

    def isAllowed(self, peerId: object) -> bool:
        """Whether C{peerId} may connect."""
        return self._sameNamespace(peerId) or self._matchingEntry(peerId) is not None

    def explain(self, peerId: object) -> str:
        """Why C{peerId} is allowed or denied, naming the rule and the fix."""
        if self._sameNamespace(peerId):
            assert self._local is not None
            return f"peer {peerId} is allowed: same trust domain {self._local[0]} and namespace {self._local[1]}"
        entry = self._matchingEntry(peerId)
        if entry is not None:
            return f"peer {peerId} is allowed by allow_peers entry {entry.text}"
        parts = _meshParts(peerId)
        if self._local is None:
            why = f"the local identity {self._localId} has no namespace, so only allow_peers entries apply"
        elif parts is None:
            why = "it is not of the form spiffe://<td>/ns/<ns>/sa/<sa>"
        elif parts[0] != self._local[0]:
            why = f"its trust domain {parts[0]} is not the local {self._local[0]}"
        else:
            why = f"its namespace {parts[1]} is not the local namespace {self._local[1]}"
        hint = f"allow_peers = {peerId}"
        if parts is not None:
            hint += f" (or spiffe://{parts[0]}/ns/{parts[1]}/*)"
        return f"peer {peerId} is not authorized: {why}, and it matches no allow_peers entry; to allow it add {hint}"
