"""Tests for hbone.policy: SECURITY §4.1 destination policy (S31, S32) and §4.2 peer authorization."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from hbone.policy import (
    AllowEntry,
    DestinationDenied,
    DestinationPolicy,
    DialError,
    DNSFailure,
    DNSTimeout,
    IDestinationPolicy,
    IPeerAuthorizer,
    IResolver,
    PeerAuthorizer,
    ReactorResolver,
    _parseFibTrie,
    _parseIfInet6,
    discoverLocalAddresses,
    parseAllowEntry,
)

# ---------------------------------------------------------------------------
# Helpers


@dataclass
class FakeId:
    """Duck-typed SPIFFE ID: .trustDomain, .namespace and str()."""

    text: str
    trustDomain: str
    namespace: str | None

    def __str__(self) -> str:
        return self.text


def sid(text: str) -> FakeId:
    """A FakeId whose attributes agree with its text, like hbone.identity.SpiffeId."""
    td, _, path = text[len("spiffe://") :].partition("/")
    parts = path.split("/")
    ns = parts[1] if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa" else None
    return FakeId(text, td, ns)


@dataclass
class StubResolver:
    """
    answers: host -> list of successive answers; each answer is a list of
    addresses, an Exception, or a Deferred to hand out as is.
    """

    answers: dict[str, list[Any]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def resolveHost(self, host: str) -> Deferred[list[str]]:
        self.calls.append(host)
        answer = self.answers[host].pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(list(answer))


def policy(*allow: str, ownPorts: tuple[int, ...] = (), local: tuple[str, ...] = ()) -> DestinationPolicy:
    return DestinationPolicy(
        allow=[parseAllowEntry(a) for a in allow], ownPorts=ownPorts, localAddresses=list(local)
    )


def run(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def result(d: Deferred[Any]) -> Any:
    """The synchronous result of d, or raise its failure; fail if it has not fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def resolve(p: DestinationPolicy, host: str, port: int, resolver: StubResolver, clock: Clock | None = None) -> Any:
    return result(run(p.resolveAndCheck(host, port, resolver, clock or Clock())))


def denied(p: DestinationPolicy, ip: str, port: int, hostname: str | None = None) -> DestinationDenied:
    with pytest.raises(DestinationDenied) as info:
        p.checkAddress(ip, port, hostname)
    return info.value


# ---------------------------------------------------------------------------
# Classification (SECURITY §4.1 table) and S31

S31 = [
    ("127.0.0.1", "always", "127.0.0.0/8"),
    ("0.0.0.0", "always", "0.0.0.0/8"),
    ("::", "always", "::/128"),
    ("::1", "always", "::1/128"),
    ("::ffff:127.0.0.1", "always", "127.0.0.0/8"),
    ("64:ff9b::7f00:1", "always", "127.0.0.0/8"),
    ("169.254.169.254", "always", "169.254.0.0/16"),
    ("fd00:ec2::254", "always", "fd00:ec2::254/128"),
    ("100.100.100.200", "always", "100.100.100.200/32"),
    ("224.0.0.1", "always", "224.0.0.0/4"),
    ("255.255.255.255", "always", "240.0.0.0/4"),
    ("fe80::1", "always", "fe80::/10"),
    ("10.0.0.1", "private", "10.0.0.0/8"),
]
S31_ALWAYS = [ip for ip, cls, _ in S31 if cls == "always"]


def hostPort(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@pytest.mark.parametrize("ip, cls, rangeText", S31)
def test_s31Classification(ip: str, cls: str, rangeText: str) -> None:
    got, why = DestinationPolicy(localAddresses=[]).classify(ip)
    assert got == cls
    assert rangeText in why


@pytest.mark.parametrize("ip, cls, rangeText", S31)
def test_s31DeniedByDefault(ip: str, cls: str, rangeText: str) -> None:
    err = denied(policy(), ip, 443)
    assert (err.status, err.proxyError) == (403, "destination_ip_prohibited")
    assert isinstance(err, DialError)
    assert rangeText in str(err)
    assert hostPort(ip, 443) in str(err)
    assert ("always denied" if cls == "always" else "denied by default") in str(err)


@pytest.mark.parametrize("ip, cls, rangeText", S31)
def test_s31LiteralRefusedWithoutLookup(ip: str, cls: str, rangeText: str) -> None:
    resolver = StubResolver()
    host = f"[{ip}]" if ":" in ip else ip
    with pytest.raises(DestinationDenied, match=rangeText.replace(".", r"\.")):
        resolve(policy(), host, 80, resolver)
    assert resolver.calls == []


def test_loopbackMessageSuggestsExactEntry() -> None:
    assert str(denied(policy(), "127.0.0.1", 22)) == (
        "127.0.0.1:22 is in 127.0.0.0/8 (loopback), always denied; "
        "allow it with an exact 127.0.0.1:22 entry"
    )


@pytest.mark.parametrize(
    "ip, cls, rangeText",
    [
        # the rest of the always-denied table
        ("0.255.255.255", "always", "0.0.0.0/8"),
        ("127.255.0.9", "always", "127.0.0.0/8"),
        ("239.255.255.250", "always", "224.0.0.0/4"),
        ("240.0.0.1", "always", "240.0.0.0/4"),
        ("::7f00:1", "always", "::/96"),
        ("::a00:1", "always", "::/96"),
        ("fec0::1", "always", "fec0::/10"),
        ("ff02::1", "always", "ff00::/8"),
        ("100::1", "always", "100::/64"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "always", "2001::/32"),
        # private
        ("172.16.0.1", "private", "172.16.0.0/12"),
        ("172.31.255.254", "private", "172.16.0.0/12"),
        ("192.168.1.1", "private", "192.168.0.0/16"),
        ("100.64.0.1", "private", "100.64.0.0/10"),
        ("100.127.255.254", "private", "100.64.0.0/10"),
        ("198.18.0.1", "private", "198.18.0.0/15"),
        ("198.19.255.254", "private", "198.18.0.0/15"),
        ("fc00::1", "private", "fc00::/7"),
        ("fdff::1", "private", "fc00::/7"),
        ("fd00:ec2::253", "private", "fc00::/7"),
        # IPv4 embedded in IPv6, classified by the embedded address
        ("::ffff:10.1.2.3", "private", "10.0.0.0/8"),
        ("::ffff:169.254.169.254", "always", "169.254.0.0/16"),
        ("::ffff:8.8.8.8", "public", "8.8.8.8"),
        ("64:ff9b::a9fe:a9fe", "always", "169.254.0.0/16"),
        ("64:ff9b::c0a8:101", "private", "192.168.0.0/16"),
        ("64:ff9b::808:808", "public", "8.8.8.8"),
        ("2002:7f00:1::1", "always", "127.0.0.0/8"),
        ("2002:a00:1::", "private", "10.0.0.0/8"),
        ("2002:808:808::1", "public", "8.8.8.8"),
        ("64:ff9b:1::7f00:1", "always", "127.0.0.0/8"),  # /96 layout under the /48
        ("64:ff9b:1:7f00:0:100::", "always", "127.0.0.0/8"),  # /48 layout (RFC 6052)
        ("64:ff9b:1::808:808", "public", "8.8.8.8"),
        # just outside the special ranges
        ("8.8.8.8", "public", "public"),
        ("172.32.0.1", "public", "public"),
        ("172.15.255.255", "public", "public"),
        ("100.128.0.1", "public", "public"),
        ("100.63.255.255", "public", "public"),
        ("198.20.0.1", "public", "public"),
        ("100.100.100.201", "private", "100.64.0.0/10"),
        ("223.255.255.255", "public", "public"),
        ("1.0.0.0", "public", "public"),
        ("fbff::1", "public", "public"),
        ("fe00::1", "public", "public"),
        ("100:0:0:1::1", "public", "public"),
        ("2001:1::1", "public", "public"),
        ("2606:4700::1111", "public", "public"),
        ("::1:0:0:1", "public", "public"),
    ],
)
def test_classificationTable(ip: str, cls: str, rangeText: str) -> None:
    got, why = DestinationPolicy(localAddresses=[]).classify(ip)
    assert (got, rangeText in why) == (cls, True), why


def _nat64Local64(v4: str) -> str:
    """v4 in the RFC 6052 /64 layout under 64:ff9b:1::/48 (bits 72-103)."""
    return str(ipaddress.IPv6Address((0x64FF9B0001 << 80) | (int(ipaddress.IPv4Address(v4)) << 24)))


def test_localNat64IsClassifiedByItsMostRestrictiveReading() -> None:
    # The /64 reading is 8.8.8.127 (public), the /96 reading 127.0.0.0 (loopback).
    ip = _nat64Local64("8.8.8.127")
    cls, why = policy().classify(ip)
    assert (cls, "127.0.0.0/8" in why) == ("always", True), why
    # The /48 layout of 8.8.8.8 also reads as 0.0.0.0 under the /96 layout: refused.
    assert policy().classify("64:ff9b:1:808:8:800::")[0] == "always"


def test_cidrMustCoverEveryEmbeddedPrivateReading() -> None:
    # Readings: /64 layout 192.168.1.10, /96 layout 10.0.0.0; both private.
    ip = _nat64Local64("192.168.1.10")
    assert policy().classify(ip)[0] == "private"
    denied(policy("10.0.0.0/8"), ip, 80)
    denied(policy("192.168.0.0/16"), ip, 80)
    policy("10.0.0.0/8", "192.168.0.0/16").checkAddress(ip, 80)


def test_classifyAcceptsAddressObjectsAndBrackets() -> None:
    p = policy()
    assert p.classify(ipaddress.ip_address("127.0.0.1"))[0] == "always"
    assert p.classify("[::1]")[0] == "always"
    assert p.classify("fe80::1%eth0")[0] == "always"
    with pytest.raises(ValueError):
        p.classify("localhost")


def test_embeddedMessageNamesBoth() -> None:
    message = str(denied(policy(), "::ffff:127.0.0.1", 22))
    assert message.startswith("[::ffff:127.0.0.1]:22 is in 127.0.0.0/8 (loopback)")
    assert "::ffff:0:0/96" in message


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_portOutOfRangeDenied(port: int) -> None:
    with pytest.raises(DestinationDenied, match="1-65535"):
        policy().checkAddress("8.8.8.8", port)


@pytest.mark.parametrize("ip", ["8.8.8.8", "93.184.216.34", "2606:4700::1111"])
@pytest.mark.parametrize("port", [1, 22, 443, 65535])
def test_publicAllowed(ip: str, port: int) -> None:
    assert policy().checkAddress(ip, port) is None


# ---------------------------------------------------------------------------
# Allow entries


def test_exactEntryAdmitsOnlyThatPair() -> None:
    p = policy("127.0.0.1:8080", "[::1]:9090")
    p.checkAddress("127.0.0.1", 8080)
    p.checkAddress("::1", 9090)
    for ip, port in [
        ("127.0.0.1", 8081),
        ("127.0.0.2", 8080),
        ("::1", 8080),
        ("127.0.0.1", 9090),
        ("::ffff:127.0.0.1", 8080),
        ("0.0.0.0", 8080),
    ]:
        denied(p, ip, port)


@pytest.mark.parametrize("ip", S31_ALWAYS)
def test_exactEntryReEnablesEachAlwaysDenied(ip: str) -> None:
    p = policy(hostPort(ip, 7000))
    p.checkAddress(ip, 7000)
    denied(p, ip, 7001)


def test_exactEntryForPrivateAddress() -> None:
    p = policy("10.0.0.1:22")
    p.checkAddress("10.0.0.1", 22)
    denied(p, "10.0.0.1", 23)
    denied(p, "10.0.0.2", 22)


def test_cidrAdmitsPrivateButNoAlwaysDenied() -> None:
    p = policy("10.0.0.0/8")
    p.checkAddress("10.0.0.1", 80)
    p.checkAddress("10.255.255.254", 65535)
    p.checkAddress("::ffff:10.0.0.1", 80)  # embedded IPv4 is covered too
    denied(p, "192.168.1.1", 80)
    denied(p, "172.16.0.1", 80)
    for ip in S31_ALWAYS:
        assert "always denied" in str(denied(p, ip, 80))


def test_widestCidrsNeverReachAlwaysDenied() -> None:
    p = policy("0.0.0.0/0", "::/0")
    p.checkAddress("10.0.0.1", 80)
    p.checkAddress("fd12::1", 80)
    for ip in S31_ALWAYS:
        denied(p, ip, 80)


def test_cidrPorts() -> None:
    p = policy("10.0.0.0/8:80,443", "192.168.1.5/32:1000-2000", "fd00::/8:443")
    p.checkAddress("10.1.1.1", 80)
    p.checkAddress("10.1.1.1", 443)
    denied(p, "10.1.1.1", 22)
    p.checkAddress("192.168.1.5", 1000)
    p.checkAddress("192.168.1.5", 2000)
    denied(p, "192.168.1.5", 999)
    denied(p, "192.168.1.5", 2001)
    denied(p, "192.168.1.6", 1500)
    p.checkAddress("fd00::5", 443)
    denied(p, "fd00::5", 80)
    denied(p, "fc00::5", 443)


def test_privateMessageSuggestsEntry() -> None:
    message = str(denied(policy(), "10.0.0.1", 80, hostname="db.corp.example"))
    assert message.startswith("db.corp.example (10.0.0.1:80) is in 10.0.0.0/8 (private, RFC 1918)")
    assert "10.0.0.1/32:80" in message
    assert "db.corp.example" in message.split("allow it with", 1)[1]


def test_suffixLiftsPrivateForNamesUnderIt() -> None:
    for entry in (".corp.example", "corp.example"):
        p = policy(entry)
        p.checkAddress("10.0.0.5", 5432, hostname="db.corp.example")
        p.checkAddress("10.0.0.5", 5432, hostname="a.b.CORP.example.")
        p.checkAddress("fd00::5", 5432, hostname="corp.example")
        denied(p, "10.0.0.5", 5432)
        denied(p, "10.0.0.5", 5432, hostname="evilcorp.example")
        denied(p, "10.0.0.5", 5432, hostname="corp.example.evil")


def test_suffixNeverLiftsAlwaysDenied() -> None:
    p = policy(".corp.example")
    for ip in S31_ALWAYS:
        assert "always denied" in str(denied(p, ip, 80, hostname="x.corp.example"))


@pytest.mark.parametrize(
    "text, kind, network, ports, suffix",
    [
        ("1.2.3.4:80", "exact", "1.2.3.4/32", ((80, 80),), None),
        ("[::1]:8080", "exact", "::1/128", ((8080, 8080),), None),
        ("10.0.0.0/8", "cidr", "10.0.0.0/8", (), None),
        ("10.0.0.0/8:80,443", "cidr", "10.0.0.0/8", ((80, 80), (443, 443)), None),
        ("192.168.1.5/32:1000-2000", "cidr", "192.168.1.5/32", ((1000, 2000),), None),
        ("fc00::/7", "cidr", "fc00::/7", (), None),
        ("[fd00::/8]:443", "cidr", "fd00::/8", ((443, 443),), None),
        (".corp.example", "suffix", None, (), "corp.example"),
        ("Corp.Example", "suffix", None, (), "corp.example"),
    ],
)
def test_parseAllowEntryForms(text: str, kind: str, network: str | None, ports: Any, suffix: str | None) -> None:
    entry = parseAllowEntry(text)
    assert isinstance(entry, AllowEntry)
    assert entry.kind == kind
    assert entry.network == (ipaddress.ip_network(network) if network else None)
    assert entry.ports == ports
    assert entry.suffix == suffix
    with pytest.raises(Exception):
        entry.kind = "exact"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("1.2.3.4", "missing port"),
        ("1.2.3.4:0", "port"),
        ("1.2.3.4:65536", "1 to 65535"),
        ("1.2.3.4:080", "port"),
        ("01.2.3.4:80", "not an IPv4 or IPv6 address"),
        ("host.example:80", "not an IPv4 or IPv6 address"),
        ("::1", "[ADDRESS]:PORT"),
        ("[::1]", "missing port"),
        ("[::1]:", "':PORT'"),
        ("[::1", "missing ']'"),
        ("[1.2.3.4]:80", "brackets are for IPv6"),
        ("[fe80::1%eth0]:80", "zone"),
        ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
        ("10.0.0.0/33", "prefix length"),
        ("10.0.0.0/08", "prefix length"),
        ("10.0.0.0/8:", "empty port list"),
        ("10.0.0.0/8:443-80", "ends before it starts"),
        ("10.0.0.0/8:http", "not a port"),
        ("127.0.0.0/8", "always denied"),
        ("127.0.0.1/32:22", "exact address:port"),
        ("169.254.0.0/16:80", "always denied"),
        ("fe80::/64", "always denied"),
        ("*.corp.example", "without '*'"),
        ("localhost", "localhost"),
        (".localhost", "localhost"),
        ("127.1", "looks like a number"),
        ("corp.0x7f", "looks like a number"),
        ("corp..example", "hostname suffix"),
        ("-corp.example", "hostname suffix"),
        ("corp_example.com", "hostname suffix"),
        ("a b", "white space"),
    ],
)
def test_parseAllowEntryErrors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parseAllowEntry(text)
    assert fragment in str(info.value)
    if text.strip():
        assert repr(text) in str(info.value)


# ---------------------------------------------------------------------------
# Own ports


LOCAL = ("192.0.2.10", "2001:db8::10", "10.1.2.3")


def test_ownPortsOnEveryLocalAddress() -> None:
    p = policy(ownPorts=(15008,), local=LOCAL)
    for ip in list(LOCAL) + ["127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", "::", "::ffff:192.0.2.10"]:
        denied(p, ip, 15008)
    for ip in p.localAddresses:
        denied(p, str(ip), 15008)
    assert "own listening ports" in str(denied(p, "192.0.2.10", 15008))
    p.checkAddress("192.0.2.10", 15009)
    p.checkAddress("192.0.2.11", 15008)


def test_addOwnPort() -> None:
    p = policy(local=LOCAL)
    p.checkAddress("192.0.2.10", 15441)
    p.addOwnPort(15441)
    assert 15441 in p.ownPorts
    assert "own listening ports" in str(denied(p, "192.0.2.10", 15441))
    p.checkAddress("192.0.2.10", 15442)
    with pytest.raises(ValueError):
        p.addOwnPort(0)
    with pytest.raises(ValueError):
        p.addOwnPort(70000)


def test_ownPortBeatsCidrAndSuffixButNotExact() -> None:
    p = policy("10.0.0.0/8", ".corp.example", ownPorts=(15008,), local=LOCAL)
    p.checkAddress("10.1.2.3", 80)
    denied(p, "10.1.2.3", 15008)
    denied(p, "10.1.2.3", 15008, hostname="me.corp.example")
    q = policy("10.1.2.3:15008", ownPorts=(15008,), local=LOCAL)
    q.checkAddress("10.1.2.3", 15008)


def test_parseFibTrie() -> None:
    text = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
"""
    assert _parseFibTrie(text) == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("192.0.2.2")}


def test_parseIfInet6() -> None:
    text = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
        "bogus\n"
    )
    assert _parseIfInet6(text) == {ipaddress.ip_address("::1"), ipaddress.ip_address("fe80::fc:ff:fe00:1")}


def test_discoverLocalAddresses() -> None:
    found = discoverLocalAddresses()
    assert isinstance(found, frozenset)
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "0.0.0.0", "::")} <= found
    assert DestinationPolicy(ownPorts=(15008,)).localAddresses == found


# ---------------------------------------------------------------------------
# Hostnames: S32


@pytest.mark.parametrize("host", ["localhost", "a.localhost", "LOCALHOST", "b.a.localhost.", "localhost."])
def test_s32LocalhostNamesRefusedWithoutLookup(host: str) -> None:
    resolver = StubResolver({host: [["8.8.8.8"]]})
    with pytest.raises(DestinationDenied, match="RFC 6761") as info:
        resolve(policy(".localhost.example"), host, 80, resolver)
    assert info.value.status == 403
    assert resolver.calls == []


def test_s32NotLocalhost() -> None:
    resolver = StubResolver({"localhost.example": [["8.8.8.8"]], "mylocalhost": [["8.8.4.4"]]})
    assert resolve(policy(), "localhost.example", 80, resolver) == "8.8.8.8"
    assert resolve(policy(), "mylocalhost", 80, resolver) == "8.8.4.4"


def test_s32MetadataName() -> None:
    resolver = StubResolver({"metadata.google.internal": [["169.254.169.254"]]})
    with pytest.raises(DestinationDenied) as info:
        resolve(policy(), "metadata.google.internal", 80, resolver)
    assert "metadata.google.internal" in str(info.value)
    assert "169.254.0.0/16" in str(info.value)
    assert resolver.calls == ["metadata.google.internal"]


def test_s32RebindingResolvedOnce() -> None:
    resolver = StubResolver({"rebind.example": [["8.8.8.8"], ["127.0.0.1"]]})
    assert resolve(policy(), "rebind.example", 443, resolver) == "8.8.8.8"
    assert resolver.calls == ["rebind.example"]


def test_s32DialedAddressIsTheCheckedOne() -> None:
    checked: list[tuple[str, int, str | None]] = []

    class Recording(DestinationPolicy):
        def checkAddress(self, ip: Any, port: int, hostname: str | None = None) -> None:
            checked.append((str(ip), port, hostname))
            super().checkAddress(ip, port, hostname)

    p = Recording(localAddresses=[])
    resolver = StubResolver({"www.example": [["127.0.0.1", "::1", "93.184.216.34", "8.8.8.8"]]})
    assert resolve(p, "www.example", 443, resolver) == "93.184.216.34"
    assert checked[-1] == ("93.184.216.34", 443, "www.example")
    assert [c[0] for c in checked] == ["127.0.0.1", "::1", "93.184.216.34"]


def test_s32MixedPrivateAndPublicDialsPublic() -> None:
    resolver = StubResolver({"mixed.example": [["10.0.0.1", "93.184.216.34"]]})
    assert resolve(policy(), "mixed.example", 80, resolver) == "93.184.216.34"
    assert resolver.calls == ["mixed.example"]


def test_s32FirstAllowedInResolverOrder() -> None:
    resolver = StubResolver({"mixed.example": [["10.0.0.1", "93.184.216.34"]]})
    assert resolve(policy("10.0.0.0/8"), "mixed.example", 80, resolver) == "10.0.0.1"
    resolver = StubResolver({"v6first.example": [["2606:4700::1111", "1.1.1.1"]]})
    assert resolve(policy(), "v6first.example", 80, resolver) == "2606:4700::1111"


def test_s32AllRefusedNamesEveryAddress() -> None:
    resolver = StubResolver({"inside.example": [["10.0.0.1", "127.0.0.1", "10.0.0.1"]]})
    with pytest.raises(DestinationDenied) as info:
        resolve(policy(), "inside.example", 80, resolver)
    message = str(info.value)
    assert message.startswith("inside.example resolved to 10.0.0.1, 127.0.0.1 and none")
    assert "10.0.0.0/8" in message and "127.0.0.0/8" in message


def test_s32SuffixEntryThroughResolution() -> None:
    resolver = StubResolver({"db.corp.example": [["127.0.0.1", "10.0.0.5"]], "db.other.example": [["10.0.0.5"]]})
    p = policy(".corp.example")
    assert resolve(p, "db.corp.example", 5432, resolver) == "10.0.0.5"
    with pytest.raises(DestinationDenied):
        resolve(p, "db.other.example", 5432, resolver)


def test_s32IpLiteralsNeedNoLookup() -> None:
    resolver = StubResolver()
    assert resolve(policy(), "8.8.8.8", 53, resolver) == "8.8.8.8"
    assert resolve(policy(), "[2606:4700::1111]", 443, resolver) == "2606:4700::1111"
    assert resolve(policy("10.0.0.0/8"), "10.0.0.1", 22, resolver) == "10.0.0.1"
    assert resolver.calls == []


def test_s32Timeout() -> None:
    clock = Clock()
    pending: Deferred[list[str]] = Deferred()
    resolver = StubResolver({"slow.example": [pending]})
    d = run(policy().resolveAndCheck("slow.example", 80, resolver, clock))
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    with pytest.raises(DNSTimeout) as info:
        result(d)
    assert (info.value.status, info.value.proxyError) == (504, "dns_timeout")
    assert "slow.example" in str(info.value)
    assert pending.called  # the lookup was abandoned (cancelled)
    assert resolver.calls == ["slow.example"]


def test_s32CustomTimeout() -> None:
    clock = Clock()
    resolver = StubResolver({"slow.example": [Deferred()]})
    d = run(policy().resolveAndCheck("slow.example", 80, resolver, clock, timeout=1.0))
    clock.advance(1.0)
    with pytest.raises(DNSTimeout):
        result(d)


def test_s32AnswerBeforeDeadline() -> None:
    clock = Clock()
    pending: Deferred[list[str]] = Deferred()
    resolver = StubResolver({"ok.example": [pending]})
    d = run(policy().resolveAndCheck("ok.example", 80, resolver, clock))
    clock.advance(4)
    pending.callback(["93.184.216.34"])
    assert result(d) == "93.184.216.34"
    assert clock.getDelayedCalls() == []  # the deadline was cancelled


def test_s32EmptyAnswerIsDnsFailure() -> None:
    resolver = StubResolver({"nx.example": [[]]})
    with pytest.raises(DNSFailure) as info:
        resolve(policy(), "nx.example", 80, resolver)
    assert (info.value.status, info.value.proxyError) == (503, "dns_error")
    assert "nx.example" in str(info.value)


def test_s32LookupErrorIsDnsFailure() -> None:
    resolver = StubResolver({"nx.example": [DNSLookupError("nx.example")]})
    with pytest.raises(DNSFailure):
        resolve(policy(), "nx.example", 80, resolver)


def test_s32GarbageAnswersIgnored() -> None:
    resolver = StubResolver({"odd.example": [["not-an-ip", "93.184.216.34"]], "bad.example": [["nope"]]})
    assert resolve(policy(), "odd.example", 80, resolver) == "93.184.216.34"
    with pytest.raises(DNSFailure):
        resolve(policy(), "bad.example", 80, resolver)


def test_callerCancellationIsNotDnsFailure() -> None:
    clock = Clock()
    resolver = StubResolver({"slow.example": [Deferred()]})
    d = run(policy().resolveAndCheck("slow.example", 80, resolver, clock))
    d.cancel()
    with pytest.raises(CancelledError):
        result(d)
    assert clock.getDelayedCalls() == []


# ---------------------------------------------------------------------------
# ReactorResolver


class FakeNameResolver:
    def __init__(self) -> None:
        self.requests: list[tuple[Any, ...]] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> object:
        self.requests.append((receiver, hostName, portNumber, addressTypes, transportSemantics))
        resolution = object()
        receiver.resolutionBegan(resolution)
        return resolution


class FakeReactor:
    def __init__(self) -> None:
        self.nameResolver = FakeNameResolver()


def test_reactorResolverCollectsEveryAddress() -> None:
    reactor = FakeReactor()
    resolver = ReactorResolver(reactor)
    verifyObject(IResolver, resolver)
    d = resolver.resolveHost("www.example")
    [(receiver, host, _, types, semantics)] = reactor.nameResolver.requests
    assert host == "www.example"
    assert set(types) == {IPv4Address, IPv6Address}
    assert semantics == "TCP"
    assert not d.called
    receiver.addressResolved(IPv4Address("TCP", "93.184.216.34", 0))
    receiver.addressResolved(IPv6Address("TCP", "2606:2800::1", 0))
    receiver.addressResolved(IPv4Address("TCP", "93.184.216.34", 0))
    receiver.resolutionComplete()
    assert result(d) == ["93.184.216.34", "2606:2800::1"]


def test_reactorResolverNoAddresses() -> None:
    reactor = FakeReactor()
    d = ReactorResolver(reactor).resolveHost("nx.example")
    reactor.nameResolver.requests[0][0].resolutionComplete()
    assert result(d) == []


def test_reactorResolverLateAnswerAfterTimeout() -> None:
    reactor = FakeReactor()
    clock = Clock()
    d = run(policy().resolveAndCheck("slow.example", 80, ReactorResolver(reactor), clock))
    clock.advance(5)
    with pytest.raises(DNSTimeout):
        result(d)
    receiver = reactor.nameResolver.requests[0][0]
    receiver.addressResolved(IPv4Address("TCP", "93.184.216.34", 0))
    receiver.resolutionComplete()  # must not raise AlreadyCalledError


def test_interfaces() -> None:
    verifyObject(IDestinationPolicy, policy())
    verifyObject(IPeerAuthorizer, PeerAuthorizer(sid("spiffe://td/ns/a/sa/x")))


# ---------------------------------------------------------------------------
# PeerAuthorizer (SECURITY §4.2)


def test_peerSameNamespaceAllowed() -> None:
    auth = PeerAuthorizer(sid("spiffe://cluster.local/ns/app/sa/server"))
    assert auth.isAllowed(sid("spiffe://cluster.local/ns/app/sa/client"))
    assert auth.isAllowed(sid("spiffe://cluster.local/ns/app/sa/server"))
    assert "namespace app" in auth.explain(sid("spiffe://cluster.local/ns/app/sa/client"))


@pytest.mark.parametrize(
    "peer, fragment",
    [
        ("spiffe://cluster.local/ns/other/sa/client", "namespace other is not the local namespace app"),
        ("spiffe://evil.example/ns/app/sa/client", "trust domain evil.example is not the local cluster.local"),
        ("spiffe://cluster.local/app/client", "not of the form"),
        ("spiffe://cluster.local/ns/app/sa/client/extra", "not of the form"),
    ],
)
def test_peerDenied(peer: str, fragment: str) -> None:
    auth = PeerAuthorizer(sid("spiffe://cluster.local/ns/app/sa/server"))
    assert not auth.isAllowed(sid(peer))
    explanation = auth.explain(sid(peer))
    assert fragment in explanation
    assert peer in explanation
    assert "allow_peers" in explanation


def test_peerAttributesMustAgreeWithId() -> None:
    auth = PeerAuthorizer(sid("spiffe://cluster.local/ns/app/sa/server"))
    liar = FakeId("spiffe://cluster.local/ns/other/sa/x", "cluster.local", "app")
    assert not auth.isAllowed(liar)
    opaque = FakeId("spiffe://cluster.local/app", "cluster.local", "app")
    assert not auth.isAllowed(opaque)


def test_peerExactEntry() -> None:
    auth = PeerAuthorizer(
        sid("spiffe://cluster.local/ns/app/sa/server"),
        ["spiffe://cluster.local/ns/ops/sa/debug", "spiffe://partner.example/batch/job"],
    )
    assert auth.isAllowed(sid("spiffe://cluster.local/ns/ops/sa/debug"))
    assert auth.isAllowed(sid("spiffe://partner.example/batch/job"))
    assert "spiffe://cluster.local/ns/ops/sa/debug" in auth.explain(sid("spiffe://cluster.local/ns/ops/sa/debug"))
    assert not auth.isAllowed(sid("spiffe://cluster.local/ns/ops/sa/other"))
    assert not auth.isAllowed(sid("spiffe://partner.example/batch/job2"))


def test_peerNamespacePattern() -> None:
    auth = PeerAuthorizer(sid("spiffe://cluster.local/ns/app/sa/server"), ["spiffe://partner.example/ns/shop/*"])
    assert auth.isAllowed(sid("spiffe://partner.example/ns/shop/sa/cart"))
    assert "spiffe://partner.example/ns/shop/*" in auth.explain(sid("spiffe://partner.example/ns/shop/sa/cart"))
    assert not auth.isAllowed(sid("spiffe://partner.example/ns/shopping/sa/cart"))
    assert not auth.isAllowed(sid("spiffe://partner.example/ns/shop"))
    assert not auth.isAllowed(sid("spiffe://cluster.local/ns/shop/sa/cart"))
    assert not auth.isAllowed(sid("spiffe://partner.example.evil/ns/shop/sa/cart"))


def test_localWithoutNamespaceOnlyEntries() -> None:
    local = sid("spiffe://cluster.local/gateway")
    assert local.namespace is None
    auth = PeerAuthorizer(local)
    assert not auth.isAllowed(sid("spiffe://cluster.local/gateway"))
    assert not auth.isAllowed(sid("spiffe://cluster.local/ns/app/sa/x"))
    assert "has no namespace" in auth.explain(sid("spiffe://cluster.local/ns/app/sa/x"))
    auth = PeerAuthorizer(local, ["spiffe://cluster.local/ns/app/*"])
    assert auth.isAllowed(sid("spiffe://cluster.local/ns/app/sa/x"))
    assert not auth.isAllowed(sid("spiffe://cluster.local/ns/web/sa/x"))


@pytest.mark.parametrize(
    "entry",
    [
        "cluster.local/ns/app/sa/x",
        "spiffe://Cluster.local/ns/app/*",
        "spiffe://cluster.local",
        "spiffe://cluster.local/*",
        "spiffe://cluster.local/ns/*/sa/x",
        "spiffe://cluster.local/ns/app/sa/*",
        "spiffe://cluster.local/ns/app/sa/../x",
        "spiffe://cluster.local/ns/app/sa/x/",
        "spiffe://cluster.local/ns/../*",
    ],
)
def test_allowPeersErrors(entry: str) -> None:
    with pytest.raises(ValueError) as info:
        PeerAuthorizer(sid("spiffe://cluster.local/ns/app/sa/server"), [entry])
    assert repr(entry) in str(info.value)


# ---------------------------------------------------------------------------
# Properties

_ALWAYS_NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "100.100.100.200/32",
        "::/128", "::1/128", "::/96", "fe80::/10", "fec0::/10", "ff00::/8", "100::/64", "2001::/32",
        "fd00:ec2::254/128",
    )
]
_V4_ALWAYS = [n for n in _ALWAYS_NETWORKS if n.version == 4]
_EMBEDDINGS = [
    lambda v4: ipaddress.IPv6Address((0xFFFF << 32) | int(v4)),  # ::ffff:0:0/96
    lambda v4: ipaddress.IPv6Address((0x64FF9B << 96) | int(v4)),  # 64:ff9b::/96
    lambda v4: ipaddress.IPv6Address((0x64FF9B0001 << 80) | int(v4)),  # 64:ff9b:1::/96 layout
    lambda v4: ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80)),  # 2002::/16
]


@st.composite
def alwaysDeniedAddresses(draw: st.DrawFn) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    net = draw(st.sampled_from(_ALWAYS_NETWORKS + _V4_ALWAYS))
    inside = net[draw(st.integers(0, net.num_addresses - 1))]
    if inside.version == 4 and draw(st.booleans()):
        return draw(st.sampled_from(_EMBEDDINGS))(inside)
    return inside


_BROAD = policy("0.0.0.0/0", "::/0", ".corp.example")


@settings(max_examples=300)
@given(ip=st.ip_addresses())
def test_classifyNeverRaises(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    for form in (ip, str(ip)):
        cls, why = _BROAD.classify(form)
        assert cls in {"always", "private", "public"}
        assert why


@settings(max_examples=300)
@given(ip=alwaysDeniedAddresses(), port=st.integers(1, 65535), hostname=st.sampled_from([None, "x.corp.example"]))
def test_alwaysDeniedForEveryPort(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, hostname: str | None
) -> None:
    assert _BROAD.classify(ip)[0] == "always"
    with pytest.raises(DestinationDenied):
        _BROAD.checkAddress(str(ip), port, hostname)


def test_peerAuthorizerWithRealSpiffeId() -> None:
    """The duck typing agrees with hbone.identity.SpiffeId (skipped if that module is unavailable)."""
    identity = pytest.importorskip("hbone.identity")
    parse = identity.SpiffeId.parse
    auth = PeerAuthorizer(parse("spiffe://cluster.local/ns/app/sa/server"), ["spiffe://partner.example/ns/shop/*"])
    assert auth.isAllowed(parse("spiffe://cluster.local/ns/app/sa/client"))
    assert auth.isAllowed(parse("spiffe://partner.example/ns/shop/sa/cart"))
    assert not auth.isAllowed(parse("spiffe://cluster.local/ns/other/sa/client"))
    assert not auth.isAllowed(parse("spiffe://cluster.local/ns/app/sa/client/extra"))


# -- deny entries (--deny) ------------------------------------------------------------


def test_denyEntries_refuseWhatAllowWouldAdmit():
    policy = DestinationPolicy(
        allow=[parseAllowEntry("10.0.0.0/8"), parseAllowEntry(".corp.example")],
        deny=[parseAllowEntry("10.9.0.0/16"), parseAllowEntry("93.184.216.34:443"),
              parseAllowEntry(".secret.corp.example")],
        localAddresses=(),
    )
    policy.checkAddress("10.1.2.3", 80)  # allowed by the CIDR entry
    with pytest.raises(DestinationDenied) as e:
        policy.checkAddress("10.9.1.1", 80)
    assert "deny entry 10.9.0.0/16" in str(e.value)
    policy.checkAddress("93.184.216.34", 80)  # public, other port
    with pytest.raises(DestinationDenied):
        policy.checkAddress("93.184.216.34", 443)
    policy.checkAddress("10.1.1.1", 80, hostname="db.corp.example")
    with pytest.raises(DestinationDenied) as e:
        policy.checkAddress("10.1.1.1", 80, hostname="vault.secret.corp.example")
    assert ".secret.corp.example" in str(e.value)
    with pytest.raises(DestinationDenied):  # an embedded IPv4 address is denied too
        policy.checkAddress("::ffff:10.9.1.1", 80)
