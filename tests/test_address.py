"""
Tests for L{hbone.address}: the PROTOCOL section 4 C{:authority} grammar,
the section 5 C{/_hbone/} path grammar, operator addresses, and the
C{forwarded}, C{traceparent} and C{baggage} helpers.

Covers SECURITY.md S14 and S20 (parser decisions; the status codes and
"no dial" are the server's tests) and the S55 property tests.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Callable
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from hbone.address import (
    AddressError,
    Target,
    formatForwarded,
    isHbonePath,
    isValidTraceparent,
    newTraceparent,
    parseAuthority,
    parseBaggage,
    parseForwardedFor,
    parseHbonePath,
    parseHostPort,
)

PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def rejects(parse: Callable[..., object], value: object, *args: object, fragment: str) -> str:
    """
    Assert that C{parse(value, *args)} raises L{AddressError} (and nothing
    else) whose message contains C{fragment}; return the message.
    """
    with pytest.raises(AddressError) as info:
        parse(value, *args)
    assert type(info.value) is AddressError
    message = str(info.value)
    assert fragment in message, message
    return message


# --- S14: :authority rejections ------------------------------------------

S14_AUTHORITIES = [
    ("10.0.0.1", "missing port"),
    ("h:0", "port 0 out of range 1-65535"),
    ("h:65536", "port 65536 out of range 1-65535"),
    ("[::1", "unclosed '['"),
    ("a b:80", "invalid hostname 'a b'"),
    ("a" * 300 + ":80", "hostname of 300 bytes is longer than 253"),
    ("%31.2.3.4:80", "percent-encoding"),
    ("127.1:80", "ends in a number"),
    ("0x7f.0.0.1:80", "ends in a number"),
    ("h.:80", "trailing dot"),
    ("[fe80::1%25eth0]:80", "zone ID"),
    ("u@h:80", "userinfo not allowed"),
]


@pytest.mark.parametrize(
    "authority, fragment", S14_AUTHORITIES, ids=[a[:24] for a, _ in S14_AUTHORITIES]
)
def test_s14AuthorityRejected(authority: str, fragment: str) -> None:
    """
    Every S14 C{:authority} is refused, with a reason that names the value,
    whether it arrives as C{str} or as C{bytes}.
    """
    message = rejects(parseAuthority, authority, fragment=fragment)
    assert "in ':authority' " in message
    assert repr(authority[:20])[:-1] in message
    rejects(parseAuthority, authority.encode("ascii"), fragment=fragment)


def test_errorMessageExample() -> None:
    """
    The message has the documented shape.
    """
    with pytest.raises(AddressError) as info:
        parseAuthority("h:0")
    assert str(info.value) == "port 0 out of range 1-65535 in ':authority' 'h:0'"


def test_errorMessageBoundedAndEscaped() -> None:
    """
    A long or hostile value is truncated and escaped in the message, so it
    is safe to log.
    """
    with pytest.raises(AddressError) as info:
        parseAuthority("a\r\nb" + "x" * 4000 + ":80")
    message = str(info.value)
    assert len(message) < 200
    assert "\r" not in message and "\n" not in message
    assert "'a\\r\\nb" in message


# --- S20: the POST matrix ------------------------------------------------


@pytest.mark.parametrize(
    "authority, fragment", S14_AUTHORITIES, ids=[a[:24] for a, _ in S14_AUTHORITIES]
)
def test_s20CanonicalFormOfS14Rejected(authority: str, fragment: str) -> None:
    """
    Every S14 target, written as a POST path (percent-encoded so that one
    decoding pass gives the S14 text back), is refused as well.
    """
    path = "/_hbone/" + quote(authority, safe=":")
    message = rejects(parseHbonePath, path, fragment="in ':path' ")
    assert message.endswith(repr(path[:80]) + ("..." if len(path) > 80 else ""))


S20_ACCEPTED = [
    ("/_hbone/%5B::1%5D:80", None, Target("::1", 80)),
    ("/_hbone/[::1]:80", None, Target("::1", 80)),
    ("/_hbone/%5b::1%5d:80", None, Target("::1", 80)),
    ("/_hbone/80", "10.0.0.5", Target("10.0.0.5", 80)),
    ("/_hbone/80", "2001:DB8::5", Target("2001:db8::5", 80)),
    ("/_hbone/10.0.0.1:8080", None, Target("10.0.0.1", 8080)),
    ("/_hbone/reviews.default.svc.cluster.local:9080", None,
     Target("reviews.default.svc.cluster.local", 9080)),
    ("/_hbone/%5B2001:db8::1%5D:443", None, Target("2001:db8::1", 443)),
    # Other targets are unaffected by a workload address.
    ("/_hbone/10.0.0.1:80", "10.0.0.5", Target("10.0.0.1", 80)),
    # One decoding pass: any byte may be escaped, in either hex case.
    ("/_hbone/%31.2.3.4:80", None, Target("1.2.3.4", 80)),
    ("/_hbone/%68%3A8%30", None, Target("h", 80)),
    (b"/_hbone/Svc.NS:80", None, Target("svc.ns", 80)),
]


@pytest.mark.parametrize(
    "path, workload, expected", S20_ACCEPTED, ids=[str(p) for p, _, _ in S20_ACCEPTED]
)
def test_s20Accepted(path: str | bytes, workload: str | None, expected: Target) -> None:
    """
    Canonical, legacy raw-bracket and (with a workload address) port-only
    paths decode to the expected target.
    """
    assert parseHbonePath(path, workload) == expected


S20_REJECTED = [
    ("/_hbone/a/../b:80", None, "dot segment not allowed"),
    ("/_hbone/h:80/", None, "trailing '/' not allowed"),
    ("/_hbone/h:80?x", None, "query not allowed"),
    ("/_hbone/%255B::1%255D:80", None, "'%' in decoded target"),
    ("/_hbone/80", None, "port-only form needs a mesh-inbound listener"),
    ("/_hbone/mtls", None, "'mtls' mode is not supported"),
    ("/_hbone/mtls", "10.0.0.5", "'mtls' mode is not supported"),
    ("/_hbone/tcp", None, "'tcp' mode is not supported"),
    ("/_hbone/h:80#frag", None, "fragment not allowed"),
    ("/_hbone/?", None, "query not allowed"),
    ("/_hbone//h:80", None, "empty segment ('//') not allowed"),
    ("/_hbone/a//b:80", None, "empty segment ('//') not allowed"),
    ("/_hbone/a/b:80", None, "extra path segment not allowed"),
    ("/_hbone/.", None, "dot segment not allowed"),
    ("/_hbone/..", None, "dot segment not allowed"),
    ("/_hbone/%2e%2E", None, "dot segment not allowed"),
    ("/_hbone/", None, "empty target"),
    ("/_hbone/%", None, "bad percent escape"),
    ("/_hbone/h:8%3", None, "bad percent escape"),
    ("/_hbone/%G0:80", None, "bad percent escape"),
    ("/_hbone/%+1:80", None, "bad percent escape"),
    ("/_hbone/% 1:80", None, "bad percent escape"),
    ("/_hbone/h%2F:80", None, "'/' in decoded target"),
    ("/_hbone/h%5C:80", None, "'\\' in decoded target"),
    ("/_hbone/h\\x:80", None, "'\\' in decoded target"),
    ("/_hbone/u%40h:80", None, "'@' in decoded target"),
    ("/_hbone/u@h:80", None, "'@' in decoded target"),
    ("/_hbone/a%20b:80", None, "space in decoded target"),
    ("/_hbone/a b:80", None, "space in decoded target"),
    ("/_hbone/h%00:80", None, "control byte 0x00"),
    ("/_hbone/h%0d%0a:80", None, "control byte 0x0d"),
    ("/_hbone/h\t:80", None, "control byte 0x09"),
    ("/_hbone/h%7F:80", None, "control byte 0x7f"),
    ("/_hbone/h%C3%A9:80", None, "non-ASCII byte 0xc3"),
    ("/_hbone/h\u00e9:80", None, "non-ASCII character"),
    (b"/_hbone/h\xc3\xa9:80", None, "non-ASCII byte"),
    ("/_hbone/%5Bfe80::1%25eth0%5D:80", None, "'%' in decoded target"),
    ("/_hbone/h", None, "missing port"),
    ("/_hbone/080", "10.0.0.5", "leading zero"),
    ("/_hbone/0", "10.0.0.5", "port 0 out of range"),
    ("/_hbone/65536", "10.0.0.5", "port 65536 out of range"),
    ("/_hbone/[::1]", None, "missing port"),
    ("/_hbone/127.1:80", None, "ends in a number"),
    ("/_HBONE/h:80", None, "not an HBONE path"),
    ("/_hbone", None, "not an HBONE path"),
    ("/tun/h:80", None, "not an HBONE path"),
    ("/h2r/h:80", None, "not an HBONE path"),
    ("/_h2r/h:80", None, "not an HBONE path"),
    ("_hbone/h:80", None, "not an HBONE path"),
    ("/_hbone/" + "a" * 2000 + ":80", None, "too long"),
]


@pytest.mark.parametrize(
    "path, workload, fragment",
    S20_REJECTED,
    ids=[str(p)[:40] for p, _, _ in S20_REJECTED],
)
def test_s20Rejected(path: str | bytes, workload: str | None, fragment: str) -> None:
    """
    Each PROTOCOL section 5 rejection is refused with its own reason.
    """
    rejects(parseHbonePath, path, workload, fragment=fragment)


@pytest.mark.parametrize("workload", ["not-an-ip", "10.0.0.300", "fe80::1%eth0", ""])
def test_badWorkloadAddressIsAConfigError(workload: str) -> None:
    """
    A bad workload address is the operator's mistake, not the peer's: it
    raises a plain L{ValueError}, not L{AddressError}.
    """
    with pytest.raises(ValueError) as info:
        parseHbonePath("/_hbone/80", workload)
    assert not isinstance(info.value, AddressError)
    assert "workload address" in str(info.value)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/_hbone/h:80", True),
        ("/_hbone/", True),
        (b"/_hbone/h:80", True),
        ("/_hbone", False),
        ("/_HBONE/h:80", False),
        (b"/_Hbone/h:80", False),
        ("/tun/h:80", False),
        ("", False),
        (b"", False),
        ("//_hbone/h:80", False),
    ],
)
def test_isHbonePath(path: str | bytes, expected: bool) -> None:
    """
    L{isHbonePath} is a case-sensitive prefix check.
    """
    assert isHbonePath(path) is expected


# --- :authority: accepted values and further rejections -----------------

VALID_AUTHORITIES = [
    ("10.0.0.1:80", "10.0.0.1", 80, "ipv4"),
    ("0.0.0.0:1", "0.0.0.0", 1, "ipv4"),
    ("255.255.255.255:65535", "255.255.255.255", 65535, "ipv4"),
    ("[2001:db8::1]:443", "2001:db8::1", 443, "ipv6"),
    ("[2001:DB8:0:0:0:0:0:0001]:443", "2001:db8::1", 443, "ipv6"),
    ("[::]:9", "::", 9, "ipv6"),
    ("[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1", 80, "ipv6"),
    ("[::FFFF:7f00:1]:80", "::ffff:127.0.0.1", 80, "ipv6"),
    ("[64:ff9b::7f00:1]:80", "64:ff9b::7f00:1", 80, "ipv6"),
    ("svc.ns:80", "svc.ns", 80, "name"),
    ("Reviews.Default.SVC.cluster.local:9080", "reviews.default.svc.cluster.local", 9080, "name"),
    ("localhost:8080", "localhost", 8080, "name"),
    ("h:1", "h", 1, "name"),
    ("a1:80", "a1", 80, "name"),
    ("1a.2b:80", "1a.2b", 80, "name"),
    ("127.0.0.1.nip.io:80", "127.0.0.1.nip.io", 80, "name"),
    ("xn--bcher-kva.example:443", "xn--bcher-kva.example", 443, "name"),
    ("a-b.c--d:80", "a-b.c--d", 80, "name"),
    ("x" * 63 + ".y:80", "x" * 63 + ".y", 80, "name"),
    (".".join(["a" * 63] * 3 + ["b" * 61]) + ":80", ".".join(["a" * 63] * 3 + ["b" * 61]), 80, "name"),
]


@pytest.mark.parametrize(
    "authority, host, port, kind", VALID_AUTHORITIES, ids=[a[:30] for a, *_ in VALID_AUTHORITIES]
)
def test_validAuthority(authority: str, host: str, port: int, kind: str) -> None:
    """
    Valid authorities parse to the canonical host, and that host formats
    back to a canonical authority that parses to the same target.
    """
    target = parseAuthority(authority)
    assert (target.host, target.port, target.kind) == (host, port, kind)
    assert parseAuthority(authority.encode("ascii")) == target
    assert parseAuthority(target.authority()) == target
    assert parseHbonePath(target.hbonePath()) == target


BAD_AUTHORITIES = [
    ("", "missing port"),
    (":80", "empty host"),
    ("h:", "missing port"),
    ("h:+80", "not 1-5 decimal digits"),
    ("h: 80", "not 1-5 decimal digits"),
    ("h:80 ", "not 1-5 decimal digits"),
    ("h:8\u0660", "non-ASCII character"),
    ("h:080", "leading zero"),
    ("h:00", "leading zero"),
    ("h:123456", "not 1-5 decimal digits"),
    ("h:99999", "port 99999 out of range"),
    ("h:80\n", "not 1-5 decimal digits"),
    ("::1:80", "IPv6 address must be in brackets"),
    ("[::1]80", "expected ':' and a port after ']'"),
    ("[::1]", "missing port"),
    ("[::1]:80]", "not 1-5 decimal digits"),
    ("h]:80", "unbalanced ']'"),
    ("[]:80", "is not an IPv6 address"),
    ("[1.2.3.4]:80", "is not an IPv6 address"),
    ("[h]:80", "is not an IPv6 address"),
    ("[::g]:80", "invalid IPv6 address"),
    ("[1::2::3]:80", "invalid IPv6 address"),
    ("[::ffff:01.2.3.4]:80", "invalid IPv6 address"),
    ("[ ::1]:80", "invalid IPv6 address"),
    ("1.2.3.04:80", "leading zero"),
    ("01.2.3.4:80", "leading zero"),
    ("1.2.3.256:80", "octet 256 out of range"),
    ("1.2.3.1000:80", "not 1-3 decimal digits"),
    ("1.2.3:80", "ends in a number"),
    ("1.2.3.4.5:80", "ends in a number"),
    ("2130706433:80", "ends in a number"),
    ("0x7f000001:80", "ends in a number"),
    ("foo.0x1f:80", "ends in a number"),
    ("foo.0X:80", "ends in a number"),
    ("a.b.1:80", "ends in a number"),
    ("a..b:80", "empty label"),
    (".a:80", "empty label"),
    ("-a:80", "invalid hostname"),
    ("a-:80", "invalid hostname"),
    ("a_b:80", "invalid hostname"),
    ("*.a:80", "invalid hostname"),
    ("a/b:80", "invalid hostname"),
    ("x" * 64 + ".y:80", "label of 64 bytes is longer than 63"),
    ("\uff48:80", "non-ASCII character"),
    ("b\u00fccher.example:80", "non-ASCII character"),
    (b"h\xff:80", "non-ASCII byte"),
    ("h" * 600 + ":80", "too long"),
]


@pytest.mark.parametrize(
    "authority, fragment", BAD_AUTHORITIES, ids=[str(a)[:30] for a, _ in BAD_AUTHORITIES]
)
def test_badAuthority(authority: str | bytes, fragment: str) -> None:
    """
    Each departure from the section 4 grammar is refused with its reason.
    """
    rejects(parseAuthority, authority, fragment=fragment)


def test_authorityWrongType() -> None:
    """
    A value that is neither C{str} nor C{bytes} is an L{AddressError} too.
    """
    rejects(parseAuthority, 80, fragment="must be str or bytes, not int")


# --- Target --------------------------------------------------------------


def test_targetFormats() -> None:
    """
    A L{Target} formats as C{:authority}, canonical POST path and C{str}.
    """
    v4 = Target("10.0.0.1", 80)
    v6 = Target("2001:db8::1", 443)
    name = Target("svc.ns", 80)
    assert (v4.authority(), v4.hbonePath(), str(v4)) == (
        "10.0.0.1:80",
        "/_hbone/10.0.0.1:80",
        "10.0.0.1:80",
    )
    assert (v6.authority(), v6.hbonePath(), str(v6)) == (
        "[2001:db8::1]:443",
        "/_hbone/%5B2001:db8::1%5D:443",
        "[2001:db8::1]:443",
    )
    assert (name.authority(), name.hbonePath(), str(name)) == (
        "svc.ns:80",
        "/_hbone/svc.ns:80",
        "svc.ns:80",
    )


def test_targetKindAndIp() -> None:
    """
    C{kind} and C{ip} classify the host.
    """
    assert Target("10.0.0.1", 80).kind == "ipv4"
    assert Target("10.0.0.1", 80).ip == ipaddress.IPv4Address("10.0.0.1")
    assert Target("::1", 80).kind == "ipv6"
    assert Target("::1", 80).ip == ipaddress.IPv6Address("::1")
    assert Target("svc2", 80).kind == "name"
    assert Target("svc2", 80).ip is None
    assert Target("a.b-9", 80).kind == "name"


def test_targetCanonicalizes() -> None:
    """
    Construction canonicalizes the host, so equal destinations compare and
    hash equal.
    """
    assert Target("2001:DB8:0::0001", 443).host == "2001:db8::1"
    assert Target("::FFFF:10.0.0.1", 1).host == "::ffff:10.0.0.1"
    assert Target("::ffff:a00:1", 1).host == "::ffff:10.0.0.1"
    assert Target("Svc.NS", 80) == Target("svc.ns", 80)
    assert len({Target("Svc.NS", 80), Target("svc.ns", 80)}) == 1


@pytest.mark.parametrize(
    "host, port, error",
    [
        ("[::1]", 80, AddressError),
        ("fe80::1%eth0", 80, AddressError),
        ("127.1", 80, AddressError),
        ("h.", 80, AddressError),
        ("", 80, AddressError),
        ("h", 0, AddressError),
        ("h", 65536, AddressError),
        ("h", True, TypeError),
        ("h", "80", TypeError),
        (b"h", 80, TypeError),
    ],
)
def test_targetValidates(host: object, port: object, error: type) -> None:
    """
    An invalid host or port cannot make a L{Target}.
    """
    with pytest.raises(error):
        Target(host, port)  # type: ignore[arg-type]


def test_targetFrozen() -> None:
    """
    A L{Target} is immutable.
    """
    target = Target("h", 80)
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.port = 81  # type: ignore[misc]
    assert target.port == 80


# --- parseHostPort -------------------------------------------------------


@pytest.mark.parametrize(
    "value, default, expected",
    [
        ("127.0.0.1:15008", None, ("127.0.0.1", 15008)),
        (":8080", "127.0.0.1", ("127.0.0.1", 8080)),
        (":8080", "::", ("::", 8080)),
        ("[::]:15008", None, ("::", 15008)),
        ("[2001:DB8::1]:443", None, ("2001:db8::1", 443)),
        ("[fe80::1%eth0]:15008", None, ("fe80::1%eth0", 15008)),
        ("localhost:80", None, ("localhost", 80)),
        ("Gw.Example.com:15008", None, ("gw.example.com", 15008)),
        ("gw.example.com.:15008", None, ("gw.example.com.", 15008)),
        ("0.0.0.0:1080", None, ("0.0.0.0", 1080)),
    ],
)
def test_parseHostPort(value: str, default: str | None, expected: tuple[str, int]) -> None:
    """
    Operator addresses parse to (host without brackets, port).
    """
    assert parseHostPort(value, default) == expected


@pytest.mark.parametrize(
    "value, fragment",
    [
        (":8080", "missing host"),
        ("h", "missing port"),
        ("h:0", "port 0 out of range"),
        ("h:65536", "port 65536 out of range"),
        ("a_b:80", "invalid hostname"),
        ("127.1:80", "ends in a number"),
        ("127.1.:80", "ends in a number"),
        ("h..:80", "trailing dot"),
        ("::1:80", "IPv6 address must be in brackets"),
        ("[::1]", "expected ':' and a port"),
        ("[::1", "unclosed '['"),
        ("[fe80::1%]:80", "invalid IPv6 zone ID"),
        ("[fe80::1%a/b]:80", "invalid IPv6 zone ID"),
        ("u:p@h:80", "userinfo not allowed"),
        ("01.2.3.4:80", "leading zero"),
        ("h:00", "leading zero"),
    ],
)
def test_parseHostPortRejects(value: str, fragment: str) -> None:
    """
    Operator addresses are still checked, and the message names the value.
    """
    message = rejects(parseHostPort, value, fragment=fragment)
    assert f"in address {value!r}" in message


def test_parseHostPortPortZero() -> None:
    """
    Port 0 ("any free port") is accepted only on request, and only as C{0}.
    """
    assert parseHostPort("127.0.0.1:0", allowPortZero=True) == ("127.0.0.1", 0)
    assert parseHostPort(":0", "127.0.0.1", allowPortZero=True) == ("127.0.0.1", 0)
    rejects(parseHostPort, "127.0.0.1:0", fragment="port 0 out of range")
    with pytest.raises(AddressError, match="leading zero"):
        parseHostPort("127.0.0.1:00", allowPortZero=True)


# --- forwarded -----------------------------------------------------------


@pytest.mark.parametrize(
    "host, port, expected",
    [
        ("10.0.0.1", 5555, 'for="10.0.0.1:5555"'),
        ("2001:db8::1", 5555, 'for="[2001:db8::1]:5555"'),
        ("2001:DB8:0::1", 443, 'for="[2001:db8::1]:443"'),
        ("::ffff:10.0.0.1", 5555, 'for="10.0.0.1:5555"'),
        ("fe80::1%eth0", 1, 'for="[fe80::1]:1"'),
        ("10.0.0.1", None, 'for="10.0.0.1"'),
    ],
)
def test_formatForwarded(host: str, port: int | None, expected: str) -> None:
    """
    One RFC 7239 element in ztunnel's form.
    """
    assert formatForwarded(host, port) == expected


@pytest.mark.parametrize(
    "host, port", [("svc.ns", 80), ('1.2.3.4"\r\nx: y', 80), ("10.0.0.1", 65536), ("10.0.0.1", -1)]
)
def test_formatForwardedRefusesNonAddresses(host: str, port: int) -> None:
    """
    Nothing but an IP address and a port reaches the wire.
    """
    with pytest.raises(ValueError):
        formatForwarded(host, port)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("for=10.9.9.9", ("10.9.9.9", None)),
        (b"for=10.9.9.9", ("10.9.9.9", None)),
        ('for="10.0.0.1:5555"', ("10.0.0.1", 5555)),
        ('for="[2001:DB8::1]:5555"', ("2001:db8::1", 5555)),
        ('for="[2001:db8::1]"', ("2001:db8::1", None)),
        ('For="10.0.0.1:80"', ("10.0.0.1", 80)),
        ('for="10.0.0.1:_hidden"', ("10.0.0.1", None)),
        ('for="\\1\\0.0.0.1:80"', ("10.0.0.1", 80)),
        ('for=1.1.1.1, for="2.2.2.2:80";proto=http;by=3.3.3.3', ("2.2.2.2", 80)),
        ("for=1.1.1.1 , for=2.2.2.2", ("2.2.2.2", None)),
        ("for=1.1.1.1,,for=2.2.2.2,", ("2.2.2.2", None)),
        ('proto=https;for="10.0.0.1:1";host=svc.ns', ("10.0.0.1", 1)),
        ('for="a,b", for=2.2.2.2', ("2.2.2.2", None)),
        (", ".join(["for=1.1.1.1"] * 7 + ["for=8.8.8.8"]), ("8.8.8.8", None)),
        # Not an address: ignored.
        ("for=unknown", None),
        ("for=_hidden", None),
        ('for="svc.ns:80"', None),
        ('for="010.0.0.1"', None),
        ('for="10.0.0.1:0"', None),
        ('for="10.0.0.1:65536"', None),
        ('for="[fe80::1%eth0]:80"', None),
        ('for="[::1]:80:81"', None),
        ('for="10.0.0.1:80:81"', None),
        # The last element decides, even when it has no for=.
        ("for=1.1.1.1, by=2.2.2.2", None),
        # Malformed: ignored.
        ("", None),
        ("   ", None),
        ("for=", None),
        ("for", None),
        ("=1.1.1.1", None),
        ("for=10.0.0.1:80", None),
        ('for="10.0.0.1', None),
        ('for="10.0.0.1"x', None),
        ("for=1.1.1.1 x", None),
        ("for=1.1.1.1;for=2.2.2.2", None),
        ("for=1.1.1.1;FOR=2.2.2.2", None),
        ('for="1.1.1.1\x00"', None),
        ("for=1.1.1.1\u00e9", None),
        (b"for=1.1.1.1\xff", None),
        (", ".join(["for=1.1.1.1"] * 9), None),
        ("for=1.1.1.1;" + "x" * 5000, None),
        ("for=" + "1" * 4093, None),
        (None, None),
    ],
)
def test_parseForwardedFor(value: str | bytes, expected: tuple[str, int | None] | None) -> None:
    """
    The last element's C{for=} node, or L{None} for anything else.
    """
    assert parseForwardedFor(value) == expected  # type: ignore[arg-type]


def test_parseForwardedForLengthBound() -> None:
    """
    A value at the length bound is parsed; one byte more is ignored.
    """
    padding = " " * (4096 - len("for=1.1.1.1"))
    assert parseForwardedFor(padding + "for=1.1.1.1") == ("1.1.1.1", None)
    assert parseForwardedFor(" " + padding + "for=1.1.1.1") is None


# --- traceparent ---------------------------------------------------------


def test_newTraceparentUsesRandbytes() -> None:
    """
    The IDs are the injected random bytes, trace ID first.
    """
    draws = iter([bytes(range(1, 17)), bytes(range(0xF0, 0xF8))])
    requested: list[int] = []

    def randbytes(n: int) -> bytes:
        requested.append(n)
        return next(draws)

    value = newTraceparent(randbytes)
    assert value == "00-0102030405060708090a0b0c0d0e0f10-f0f1f2f3f4f5f6f7-01"
    assert requested == [16, 8]
    assert isValidTraceparent(value)


def test_newTraceparentNeverZero() -> None:
    """
    All-zero draws are retried, and an endless zero source still gives
    valid (non-zero) IDs.
    """
    draws = iter([bytes(16), b"\x00" * 15 + b"\x07", bytes(8), b"\x09" * 8])
    assert newTraceparent(lambda n: next(draws)) == (
        "00-00000000000000000000000000000007-0909090909090909-01"
    )
    value = newTraceparent(lambda n: bytes(n))
    assert value == "00-00000000000000000000000000000001-0000000000000001-01"
    assert isValidTraceparent(value)


def test_newTraceparentDefaultIsRandom() -> None:
    """
    The default source gives valid, distinct values.
    """
    values = {newTraceparent() for _ in range(8)}
    assert len(values) == 8
    assert all(isValidTraceparent(v) for v in values)


def test_newTraceparentShortRead() -> None:
    """
    A random source that returns the wrong length is a programming error.
    """
    with pytest.raises(ValueError):
        newTraceparent(lambda n: b"\x01")


VALID_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value, expected",
    [
        (VALID_TP, True),
        (VALID_TP.encode(), True),
        (VALID_TP[:-2] + "00", True),
        (VALID_TP[:-2] + "ff", True),
        (VALID_TP.upper(), False),
        (VALID_TP[:10] + "A" + VALID_TP[11:], False),
        ("01" + VALID_TP[2:], False),
        ("ff" + VALID_TP[2:], False),
        (VALID_TP + "-00", False),
        (VALID_TP[:-1], False),
        (VALID_TP + "\n", False),
        ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", False),
        (VALID_TP.replace("-", "_"), False),
        (VALID_TP[:-2] + "0g", False),
        (VALID_TP[:3] + "\u00e9" + VALID_TP[4:], False),
        (b"\xff" * 55, False),
        ("", False),
        (None, False),
    ],
)
def test_isValidTraceparent(value: str | bytes, expected: bool) -> None:
    """
    Only lowercase version-00 values with non-zero IDs are valid.
    """
    assert isValidTraceparent(value) is expected  # type: ignore[arg-type]


# --- baggage -------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (
            "k8s.cluster.name=c1,k8s.namespace.name=ns,k8s.deployment.name=web,"
            "service.name=web,service.version=v1,cloud.region=r,cloud.availability_zone=z",
            {
                "k8s.cluster.name": "c1",
                "k8s.namespace.name": "ns",
                "k8s.deployment.name": "web",
                "service.name": "web",
                "service.version": "v1",
                "cloud.region": "r",
                "cloud.availability_zone": "z",
            },
        ),
        (b"a=1", {"a": "1"}),
        ("a = 1 ,\tb=2", {"a": "1", "b": "2"}),
        ("a=1;prop=x;flag, b=2", {"a": "1", "b": "2"}),
        ("a=hello%20world%21", {"a": "hello world!"}),
        ("a=%E2%9C%93", {"a": "\u2713"}),
        ("a=%FF", {"a": "\ufffd"}),
        ("a=50%", {"a": "50%"}),
        ("a=", {"a": ""}),
        ("a=1,a=2", {"a": "2"}),
        ("a=1,,b=2,", {"a": "1", "b": "2"}),
        ("bad key=1,b=2", {"b": "2"}),
        ("=1,b=2", {"b": "2"}),
        ("novalue,b=2", {"b": "2"}),
        ('a="q",b=2', {"b": "2"}),
        ("a=x y,b=2", {"b": "2"}),
        ("a=\\,b=2", {"b": "2"}),
        ("a=\u00e9,b=2", {"b": "2"}),
        (b"a=\xff,b=2", {"b": "2"}),
        ("", {}),
        (None, {}),
    ],
)
def test_parseBaggage(value: str | bytes, expected: dict[str, str]) -> None:
    """
    W3C baggage members, decoded; malformed members dropped.
    """
    assert parseBaggage(value) == expected  # type: ignore[arg-type]


def test_parseBaggageMemberCap() -> None:
    """
    At most 64 members are read, counting malformed ones.
    """
    value = ",".join(f"k{i}=v{i}" for i in range(100))
    result = parseBaggage(value)
    assert result == {f"k{i}": f"v{i}" for i in range(64)}
    value = ",".join(["bad key=1"] * 64 + ["late=1"])
    assert parseBaggage(value) == {}


def test_parseBaggageLengthBound() -> None:
    """
    Of an overlong value, only the whole members within 8192 bytes are
    read.
    """
    value = "a=1,b=" + "x" * 8186 + ",c=3"
    assert len(value) > 8192
    assert parseBaggage(value) == {"a": "1"}
    assert parseBaggage("a=1," + "x" * 9000) == {"a": "1"}
    assert parseBaggage("x" * 9000) == {}
    exact = "a=" + "x" * 8190
    assert parseBaggage(exact) == {"a": "x" * 8190}


# --- property tests (S55) ------------------------------------------------

ports = st.integers(min_value=1, max_value=65535)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


def _validName(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return len(name) <= 253 and not last.isdigit() and not last.startswith("0x")


names = st.lists(labels, min_size=1, max_size=6).map(".".join).filter(_validName)
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)
targets = st.one_of(
    st.builds(Target, ipv4s.map(str), ports),
    st.builds(Target, ipv6s.map(str), ports),
    st.builds(Target, names, ports),
)

# Text weighted toward the characters the grammars care about.
grammarText = st.lists(
    st.sampled_from(
        list("0123456789abcdefxX.:[]%@/\\ -_?#Hh\x00\t\u00e9") + ["%5B", "%5D", "%25", "%2F", "%3a"]
    ),
    max_size=40,
).map("".join)


@PROPERTY
@given(targets)
def test_propertyAuthorityRoundTrip(target: Target) -> None:
    """
    Parsing a target's C{:authority} gives the target back, also from
    C{bytes}, and formatting is stable.
    """
    authority = target.authority()
    parsed = parseAuthority(authority)
    assert parsed == target
    assert parseAuthority(authority.encode("ascii")) == target
    assert parsed.authority() == authority
    assert str(parsed) == authority


@PROPERTY
@given(targets, st.randoms(use_true_random=False))
def test_propertyHbonePathRoundTrip(target: Target, rnd) -> None:
    """
    The canonical path, the legacy raw-bracket path and any percent-encoded
    spelling of the target all decode to the same target.
    """
    path = target.hbonePath()
    assert parseHbonePath(path) == target
    assert parseHbonePath(path.encode("ascii")) == target
    assert isHbonePath(path)
    assert parseHbonePath("/_hbone/" + target.authority()) == target
    spelled = "".join(
        (f"%{ord(c):02X}" if rnd.random() < 0.5 else f"%{ord(c):02x}")
        if rnd.random() < 0.3
        else c
        for c in target.authority()
    )
    assert parseHbonePath("/_hbone/" + spelled) == target
    if target.kind == "ipv6":
        assert "%5B" in path and "[" not in path
    else:
        assert path == "/_hbone/" + target.authority()


@PROPERTY
@given(ipv4s, ports)
def test_propertyIPv4(address: ipaddress.IPv4Address, port: int) -> None:
    """
    Every IPv4 address is accepted in dotted-quad form and classified.
    """
    target = parseAuthority(f"{address}:{port}")
    assert (target.host, target.port, target.kind, target.ip) == (str(address), port, "ipv4", address)


@PROPERTY
@given(ipv6s, ports, st.booleans())
def test_propertyIPv6(address: ipaddress.IPv6Address, port: int, upper: bool) -> None:
    """
    Every IPv6 address is accepted in exploded or compressed, upper or
    lower case form, and lands on one canonical host.
    """
    text = address.exploded
    text = text.upper() if upper else text
    target = parseAuthority(f"[{text}]:{port}")
    assert target.ip == address
    assert target.kind == "ipv6"
    assert target == parseAuthority(f"[{address.compressed}]:{port}")
    assert ipaddress.IPv6Address(target.host) == address
    assert target.host == target.host.lower()


@PROPERTY
@given(names, ports)
def test_propertyNameCaseInsensitive(name: str, port: int) -> None:
    """
    Hostnames are case-insensitive and stored lowercased.
    """
    target = parseAuthority(f"{name.upper()}:{port}")
    assert (target.host, target.port, target.kind, target.ip) == (name, port, "name", None)


@PROPERTY
@given(st.lists(st.integers(0, 999), min_size=4, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4))
def test_propertyDottedQuadOracle(octets: list[int], pad: list[bool]) -> None:
    """
    A dotted quad is accepted exactly when every octet is 0-255 and written
    without leading zeros (compared against L{ipaddress}).
    """
    parts = [("0" + str(o)) if p else str(o) for o, p in zip(octets, pad)]
    text = ".".join(parts)
    try:
        expected = str(ipaddress.IPv4Address(text))
    except ValueError:
        expected = None
    try:
        got = parseAuthority(text + ":80").host
    except AddressError:
        got = None
    assert got == expected


def _onlyAddressError(parse: Callable[[str | bytes], Target], value: str | bytes) -> None:
    try:
        result = parse(value)
    except AddressError:
        return
    # Anything accepted is a valid target that re-parses to itself.
    assert isinstance(result, Target)
    assert parseAuthority(result.authority()) == result
    assert parseHbonePath(result.hbonePath()) == result


@PROPERTY
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80), grammarText))
@example("[::1]:80")
@example("\x00:80")
@example(b"\x80")
def test_propertyAuthorityRaisesOnlyAddressError(value: str | bytes) -> None:
    """
    Arbitrary input either parses to a valid target or raises
    L{AddressError}, never anything else.
    """
    _onlyAddressError(parseAuthority, value)


@PROPERTY
@given(
    st.one_of(
        st.text(max_size=80),
        st.binary(max_size=80),
        grammarText.map(lambda s: "/_hbone/" + s),
        st.binary(max_size=40).map(lambda b: b"/_hbone/" + b),
    )
)
@example("/_hbone/%")
@example("/_hbone/%5")
def test_propertyHbonePathRaisesOnlyAddressError(value: str | bytes) -> None:
    """
    Arbitrary paths either parse to a valid target or raise
    L{AddressError}; with a workload address as well.
    """
    _onlyAddressError(parseHbonePath, value)
    _onlyAddressError(lambda v: parseHbonePath(v, "10.0.0.5"), value)


@PROPERTY
@given(st.one_of(st.text(max_size=60), grammarText))
def test_propertyHostPortRaisesOnlyAddressError(value: str) -> None:
    """
    Arbitrary operator input gives C{(str, int)} or L{AddressError}.
    """
    try:
        host, port = parseHostPort(value, "127.0.0.1")
    except AddressError:
        return
    assert isinstance(host, str) and host
    assert 1 <= port <= 65535


@PROPERTY
@given(targets)
def test_propertyHostPortAcceptsAuthorities(target: Target) -> None:
    """
    Every valid C{:authority} is also a valid operator address.
    """
    assert parseHostPort(target.authority()) == (target.host, target.port)


forwardedText = st.text(
    alphabet=st.sampled_from(list('for=by;,"\\ \t[]:._1234567890abcdefFOR\x00\u00e9')),
    max_size=60,
)


@PROPERTY
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), forwardedText))
@example("for=" * 2000)
@example('"' * 5000)
def test_propertyForwardedNeverRaises(value: str | bytes) -> None:
    """
    C{parseForwardedFor} never raises, and anything it returns is a
    canonical IP address with an optional valid port.
    """
    result = parseForwardedFor(value)
    if result is not None:
        host, port = result
        assert Target(host, 1).host == host
        assert port is None or 1 <= port <= 65535


@PROPERTY
@given(
    st.one_of(ipv4s, ipv6s),
    ports,
    st.lists(st.one_of(ipv4s, ipv6s).map(lambda a: formatForwarded(str(a), 1)), max_size=7),
)
def test_propertyForwardedRoundTrip(address, port: int, earlier: list[str]) -> None:
    """
    What L{formatForwarded} writes, L{parseForwardedFor} reads back, also
    as the last of up to 8 elements.
    """
    element = formatForwarded(str(address), port)
    expectedHost = Target(str(address), port).host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        expectedHost = str(address.ipv4_mapped)
    assert parseForwardedFor(element) == (expectedHost, port)
    assert parseForwardedFor(", ".join(earlier + [element])) == (expectedHost, port)


@PROPERTY
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8))
def test_propertyTraceparentRoundTrip(traceID: bytes, spanID: bytes) -> None:
    """
    A generated traceparent is valid and carries the drawn IDs.
    """
    assume(any(traceID) and any(spanID))
    draws = iter([traceID, spanID])
    value = newTraceparent(lambda n: next(draws))
    assert isValidTraceparent(value)
    assert isValidTraceparent(value.encode("ascii"))
    assert value == f"00-{traceID.hex()}-{spanID.hex()}-01"
    assert not isValidTraceparent(value.upper())


@PROPERTY
@given(st.one_of(st.text(max_size=70), st.binary(max_size=70)))
def test_propertyTraceparentValidation(value: str | bytes) -> None:
    """
    C{isValidTraceparent} never raises and accepts only the exact form.
    """
    result = isValidTraceparent(value)
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    pattern = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}", text)
    expected = pattern is not None and set(pattern[1]) != {"0"} and set(pattern[2]) != {"0"}
    assert result is expected


baggageKeys = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)


@PROPERTY
@given(st.dictionaries(baggageKeys, st.text(max_size=20), max_size=64))
def test_propertyBaggageRoundTrip(members: dict[str, str]) -> None:
    """
    Percent-encoded members decode back to the original values.
    """
    value = ",".join(f"{k}={quote(v, safe='')}" for k, v in members.items())
    assert parseBaggage(value) == members


@PROPERTY
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_propertyBaggageNeverRaises(value: str | bytes) -> None:
    """
    C{parseBaggage} never raises and returns at most 64 string members.
    """
    result = parseBaggage(value)
    assert len(result) <= 64
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in result.items())
