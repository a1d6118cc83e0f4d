"""Tests for hbone.identity: SPIFFE IDs, identity patterns, X509-SVID leaf checks."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from hbone.ca import makeCA, makeIntermediate, makeLeaf
from hbone.identity import (
    IdentityPattern,
    SpiffeId,
    SpiffeIdError,
    SvidError,
    describeCertificate,
    svidFromCertificate,
)

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"


# SpiffeId.parse


VALID_IDS = [
    ("spiffe://td", "td", ""),
    (WEB, TD, "/ns/default/sa/web"),
    ("spiffe://a-b_c.9/X/y.z/-_", "a-b_c.9", "/X/y.z/-_"),
    ("spiffe://td/..a/.b/c..", "td", "/..a/.b/c.."),
    ("spiffe://td/...", "td", "/..."),
    ("spiffe://" + "a" * 255, "a" * 255, ""),
    # exactly 2048 bytes: 9 + 2 + 1 + 2036
    ("spiffe://td/" + "x" * 2036, "td", "/" + "x" * 2036),
]


@pytest.mark.parametrize(("text", "trustDomain", "path"), VALID_IDS)
def test_parseValid(text: str, trustDomain: str, path: str) -> None:
    """
    Valid IDs parse into their trust domain and path and print back unchanged.
    """
    parsed = SpiffeId.parse(text)
    assert (parsed.trustDomain, parsed.path) == (trustDomain, path)
    assert str(parsed) == text


def test_parseBytes() -> None:
    """
    ASCII bytes parse like text; other bytes are rejected with SpiffeIdError.
    """
    assert SpiffeId.parse(WEB.encode("ascii")) == SpiffeId.parse(WEB)
    with pytest.raises(SpiffeIdError, match="non-ASCII"):
        SpiffeId.parse(b"spiffe://td/\xff")


def test_idLengthLimitIsInBytes() -> None:
    """
    The 2048 limit counts bytes: 2048 is accepted, 2049 rejected with the size named.
    """
    assert len(str(SpiffeId.parse("spiffe://td/" + "x" * 2036))) == 2048
    with pytest.raises(SpiffeIdError, match="2049 bytes long"):
        SpiffeId.parse("spiffe://td/" + "x" * 2037)
    # 2049 bytes although fewer characters: still rejected on length first.
    with pytest.raises(SpiffeIdError, match="2049 bytes long"):
        SpiffeId.parse("spiffe://td/" + "x" * 2035 + "é")


INVALID_IDS = [
    ("spiffe://TD/x", "trust domain must be lowercase"),
    ("spiffe://Cluster.local/ns/a/sa/b", "trust domain must be lowercase"),
    ("spiffe://td/ns//sa/x", "empty segment"),
    ("spiffe://td//x", "empty segment"),
    ("spiffe://td/x/", "must not end with '/'"),
    ("spiffe://td/", "must not end with '/'"),
    ("spiffe://td/x?y=1", "query"),
    ("spiffe://td?x", "query"),
    ("spiffe://td/x#frag", "fragment"),
    ("spiffe://td:8080/x", "port"),
    ("spiffe://td:/x", "port"),
    ("spiffe://user@td/x", "userinfo"),
    ("spiffe://user:pw@td/x", "userinfo"),
    ("spiffe://td/" + "x" * 2037, "2049 bytes"),
    ("spiffe://" + "a" * 256, "256 bytes"),
    ("", "must start with 'spiffe://'"),
    ("td/x", "must start with 'spiffe://'"),
    ("https://td/x", "must start with 'spiffe://'"),
    ("spiffe:/td/x", "must start with 'spiffe://'"),
    (" spiffe://td/x", "must start with 'spiffe://'"),
    ("SPIFFE://td/x", "scheme must be lowercase"),
    ("Spiffe://td/x", "scheme must be lowercase"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe:///x", "trust domain is empty"),
    ("spiffe://td/./x", "'.' segment"),
    ("spiffe://td/x/..", "'..' segment"),
    ("spiffe://td/a b", "may contain only"),
    ("spiffe://td/x\n", "may contain only"),
    ("spiffe://td/x*", "may contain only"),
    ("spiffe://td/%41", "percent-encoding"),
    ("spiffe://tä/x", "may contain only a-z"),
    ("spiffe://t d/x", "may contain only a-z"),
    ("spiffe://[::1]/x", "port"),
    ("spiffe://td/é", "may contain only"),
]


@pytest.mark.parametrize(("text", "reason"), INVALID_IDS)
def test_parseInvalid(text: str, reason: str) -> None:
    """
    Invalid IDs raise SpiffeIdError naming the rule and quoting the value.
    """
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(text)
    message = str(info.value)
    assert reason in message
    assert repr(text[:40])[:-1] in message


def test_errorIsValueError() -> None:
    """
    SpiffeIdError is a ValueError, so generic config validation catches it.
    """
    with pytest.raises(ValueError):
        SpiffeId.parse("nope")


def test_nonTextRejected() -> None:
    """
    Neither None nor a number crashes with anything but SpiffeIdError.
    """
    for value in (None, 5, ["spiffe://td"]):
        with pytest.raises(SpiffeIdError, match="must be text"):
            SpiffeId.parse(value)  # type: ignore[arg-type]


def test_longValueQuotedShortly() -> None:
    """
    A long invalid value is cut in the message, which notes its full length.
    """
    text = "spiffe://td/" + "x" * 3000
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(text)
    assert len(str(info.value)) < 300
    assert "3012 characters" in str(info.value)


def test_constructorValidates() -> None:
    """
    An invalid SpiffeId cannot be built directly either.
    """
    with pytest.raises(SpiffeIdError, match="lowercase"):
        SpiffeId("TD", "/x")
    with pytest.raises(SpiffeIdError, match="must start with '/'"):
        SpiffeId("td", "x")
    with pytest.raises(SpiffeIdError, match="must not end"):
        SpiffeId("td", "/x/")


def test_frozenAndHashable() -> None:
    """
    SpiffeIds are immutable values: equal by fields, usable as dict keys.
    """
    a, b = SpiffeId.parse(WEB), SpiffeId.parse(WEB)
    assert a == b and hash(a) == hash(b)
    assert a != SpiffeId.parse(WEB + "x")
    assert {a: 1}[b] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.path = "/other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "namespace", "serviceAccount"),
    [
        ("spiffe://td/ns/default/sa/web", "default", "web"),
        ("spiffe://td/ns/a.b-c/sa/x_y", "a.b-c", "x_y"),
        ("spiffe://td", None, None),
        ("spiffe://td/ns/default", None, None),
        ("spiffe://td/ns/default/sa", None, None),
        ("spiffe://td/ns/default/sa/web/extra", None, None),
        ("spiffe://td/ns/default/xx/web", None, None),
        ("spiffe://td/NS/default/sa/web", None, None),
        ("spiffe://td/x/ns/default/sa/web", None, None),
    ],
)
def test_namespaceAndServiceAccount(text: str, namespace: str | None, serviceAccount: str | None) -> None:
    """
    Only the exact Istio form /ns/<ns>/sa/<sa> yields a namespace and service account.
    """
    parsed = SpiffeId.parse(text)
    assert parsed.namespace == namespace
    assert parsed.serviceAccount == serviceAccount


# Property tests

_ORACLE = re.compile(r"spiffe://[a-z0-9._-]{1,255}(/[A-Za-z0-9._-]+)*", re.ASCII)


def _oracleValid(text: str) -> bool:
    """
    An independent statement of the SPIFFE ID rules, for differential testing.
    """
    if len(text.encode("utf-8", "surrogatepass")) > 2048 or _ORACLE.fullmatch(text) is None:
        return False
    segments = text[len("spiffe://") :].split("/")[1:]
    return all(segment not in (".", "..") for segment in segments)


_segment = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
_trustDomain = st.text(alphabet="abcz09._-", min_size=1, max_size=40)


@st.composite
def _validIds(draw: st.DrawFn) -> str:
    trustDomain = draw(_trustDomain)
    segments = draw(st.lists(_segment, max_size=6))
    return "spiffe://" + trustDomain + "".join("/" + s for s in segments)


# Text built from the characters that matter, so hypothesis reaches the edges.
_nearIds = st.builds(
    lambda tail: "spiffe://" + tail,
    st.text(alphabet="aZ0.-_/:@?#%*é \n", max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), _nearIds, st.binary(max_size=60)))
def test_parseRaisesOnlySpiffeIdError(value: str | bytes) -> None:
    """
    Arbitrary input either parses or raises SpiffeIdError (nothing else), and the
    verdict agrees with an independent statement of the rules.
    """
    try:
        parsed = SpiffeId.parse(value)
    except SpiffeIdError:
        accepted = False
    else:
        accepted = True
        assert str(parsed) == (value.decode("ascii") if isinstance(value, bytes) else value)
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            assert not accepted
            return
    assert accepted == _oracleValid(value)


@settings(max_examples=300, deadline=None)
@given(_validIds())
def test_validIdsRoundTrip(text: str) -> None:
    """
    Every generated valid ID parses, and str() gives the same text back.
    """
    parsed = SpiffeId.parse(text)
    assert str(parsed) == text
    assert SpiffeId.parse(str(parsed)) == parsed
    assert SpiffeId(parsed.trustDomain, parsed.path) == parsed


# IdentityPattern


@pytest.mark.parametrize(
    ("pattern", "peer", "expected"),
    [
        (WEB, WEB, True),
        (WEB, WEB + "2", False),
        (WEB, "spiffe://other/ns/default/sa/web", False),
        ("spiffe://td/opaque/id", "spiffe://td/opaque/id", True),
        ("spiffe://td/opaque/id", "spiffe://td/opaque", False),
        (f"spiffe://{TD}/ns/default/*", WEB, True),
        (f"spiffe://{TD}/ns/default/*", f"spiffe://{TD}/ns/default/sa/other", True),
        (f"spiffe://{TD}/ns/default/*", f"spiffe://{TD}/ns/prod/sa/web", False),
        (f"spiffe://{TD}/ns/default/*", "spiffe://other.td/ns/default/sa/web", False),
        (f"spiffe://{TD}/ns/default/*", f"spiffe://{TD}/ns/default", False),
        (f"spiffe://{TD}/ns/default/*", f"spiffe://{TD}/ns/default/sa/web/x", False),
        (f"spiffe://{TD}/ns/default/*", f"spiffe://{TD}/ns/default/xx/web", False),
        (f"spiffe://{TD}/ns/default/*", f"spiffe://{TD}/ns/defaultx/sa/web", False),
        (f"spiffe://{TD}/*", WEB, True),
        (f"spiffe://{TD}/*", f"spiffe://{TD}", True),
        (f"spiffe://{TD}/*", f"spiffe://{TD}/anything/at/all", True),
        (f"spiffe://{TD}/*", "spiffe://cluster.localx/ns/default/sa/web", False),
        (f"spiffe://{TD}/*", "spiffe://other/ns/default/sa/web", False),
    ],
)
def test_patternMatches(pattern: str, peer: str, expected: bool) -> None:
    """
    Exact, namespace and trust-domain patterns match exactly what they name.
    """
    assert IdentityPattern.parse(pattern).matches(SpiffeId.parse(peer)) is expected


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("spiffe://td/ns/*/sa/x", "'*' is allowed only"),
        ("spiffe://td/*/x", "'*' is allowed only"),
        ("spiffe://td/x/*", "'*' is allowed only"),
        ("spiffe://td/ns/a/sa/*", "'*' is allowed only"),
        ("spiffe://td/ns/a*", "'*' is allowed only"),
        ("spiffe://td/**", "'*' is allowed only"),
        ("spiffe://*", "'*' is allowed only"),
        ("spiffe://td*", "'*' is allowed only"),
        ("spiffe://TD/*", "lowercase"),
        ("spiffe://td/ns//*", "empty segment"),
        ("spiffe://td/x/", "must not end"),
        ("td/ns/a/*", "must start with"),
    ],
)
def test_patternInvalid(pattern: str, reason: str) -> None:
    """
    Malformed patterns raise SpiffeIdError naming the problem.
    """
    with pytest.raises(SpiffeIdError, match=re.escape(reason)):
        IdentityPattern.parse(pattern)


@pytest.mark.parametrize("text", [WEB, f"spiffe://{TD}/ns/default/*", f"spiffe://{TD}/*"])
def test_patternTextAndEquality(text: str) -> None:
    """
    A pattern prints as its text and is equal and hashes equal by that text.
    """
    a, b = IdentityPattern.parse(text), IdentityPattern.parse(text)
    assert str(a) == text
    assert a == b and hash(a) == hash(b)
    assert {a: "pool"}[b] == "pool"
    assert a != IdentityPattern.parse("spiffe://other/*")
    assert a != text
    assert text in repr(a)


def test_patternAttributes() -> None:
    """
    The parsed shape is visible: exact ID, namespace or whole trust domain.
    """
    exact = IdentityPattern.parse(WEB)
    assert exact.exact == SpiffeId.parse(WEB) and exact.namespace is None and exact.trustDomain == TD
    namespace = IdentityPattern.parse(f"spiffe://{TD}/ns/default/*")
    assert namespace.exact is None and namespace.namespace == "default"
    domain = IdentityPattern.parse(f"spiffe://{TD}/*")
    assert domain.exact is None and domain.namespace is None and domain.trustDomain == TD
    assert IdentityPattern.forId(SpiffeId.parse(WEB)) == exact
    assert IdentityPattern(TD, namespace="default") == namespace
    with pytest.raises(SpiffeIdError):
        IdentityPattern(TD, namespace="a/b")


# svidFromCertificate: SECURITY.md S23


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, object]:
    return makeCA(TD, now=NOW - timedelta(days=30))


def _leaf(ca: tuple[x509.Certificate, object], **kwargs: object) -> x509.Certificate:
    caCert, caKey = ca
    kwargs.setdefault("uris", [WEB])
    kwargs.setdefault("now", NOW)
    cert, _ = makeLeaf(caCert, caKey, **kwargs)  # type: ignore[arg-type]
    return cert


def test_svidAccepted(ca) -> None:
    """
    A good leaf yields its SPIFFE ID; DNS and IP SANs are ignored.
    """
    assert svidFromCertificate(_leaf(ca), NOW) == SpiffeId.parse(WEB)
    cert = _leaf(ca, dns=["localhost", "web.example"], ips=["127.0.0.1", "::1"])
    assert svidFromCertificate(cert, NOW) == SpiffeId.parse(WEB)


def test_svidWithoutBasicConstraints(ca) -> None:
    """
    basicConstraints may be absent (then the certificate is not a CA).
    """
    assert svidFromCertificate(_leaf(ca, basicConstraints=False), NOW) == SpiffeId.parse(WEB)


S23_CASES = [
    ("expired", {"notAfter": NOW - timedelta(days=1)}, "expired at"),
    ("not yet valid", {"notBefore": NOW + timedelta(hours=1)}, "not yet valid"),
    ("cA=true", {"isCA": True}, "cA=true"),
    ("two URI SANs", {"uris": [WEB, WEB + "2"]}, "certificate has 2 URI SANs (exactly one spiffe:// URI is required)"),
    ("no URI SAN", {"uris": [], "dns": ["web.example"]}, "no URI SAN"),
    ("no SAN extension", {"uris": []}, "no URI SAN"),
    ("keyCertSign", {"keyCertSign": True}, "keyCertSign"),
    ("cRLSign", {"cRLSign": True}, "cRLSign"),
    ("no digitalSignature", {"digitalSignature": False}, "lacks keyUsage digitalSignature"),
    ("no keyUsage", {"keyUsage": False}, "no keyUsage extension"),
    ("uppercase trust domain", {"uris": ["spiffe://TD/x"]}, "lowercase"),
    ("empty segment", {"uris": ["spiffe://td/ns//sa/x"]}, "empty segment"),
    ("trailing slash", {"uris": ["spiffe://td/x/"]}, "must not end with '/'"),
    ("not spiffe", {"uris": ["https://web.example/"]}, "must start with 'spiffe://'"),
]


@pytest.mark.parametrize(("case", "kwargs", "reason"), S23_CASES, ids=[c[0] for c in S23_CASES])
def test_svidRejected(ca, case: str, kwargs: dict, reason: str) -> None:
    """
    Every bad leaf of S23 is rejected with SvidError naming the reason.
    """
    with pytest.raises(SvidError) as info:
        svidFromCertificate(_leaf(ca, **kwargs), NOW)
    assert reason in str(info.value)


def test_svidReasonNamesId(ca) -> None:
    """
    Once the ID is known, the reason names it (so a log line says whose it was).
    """
    with pytest.raises(SvidError, match=re.escape(WEB)):
        svidFromCertificate(_leaf(ca, isCA=True), NOW)
    with pytest.raises(SvidError, match="URI SAN is not a SPIFFE ID"):
        svidFromCertificate(_leaf(ca, uris=["spiffe://TD/x"]), NOW)


def test_svidValidityBoundaries(ca) -> None:
    """
    Validity is inclusive at both ends; naive `now` is UTC; other zones convert.
    """
    start, end = NOW - timedelta(hours=1), NOW + timedelta(hours=1)
    cert = _leaf(ca, notBefore=start, notAfter=end)
    assert svidFromCertificate(cert, start) == SpiffeId.parse(WEB)
    assert svidFromCertificate(cert, end) == SpiffeId.parse(WEB)
    with pytest.raises(SvidError, match="not yet valid"):
        svidFromCertificate(cert, start - timedelta(seconds=1))
    with pytest.raises(SvidError, match="expired at"):
        svidFromCertificate(cert, end + timedelta(seconds=1))
    with pytest.raises(SvidError, match="expired at"):
        svidFromCertificate(cert, (end + timedelta(seconds=1)).replace(tzinfo=None))
    tokyo = timezone(timedelta(hours=9))
    assert svidFromCertificate(cert, end.astimezone(tokyo)) == SpiffeId.parse(WEB)
    with pytest.raises(SvidError, match="expired at"):
        svidFromCertificate(cert, (end + timedelta(seconds=1)).astimezone(tokyo))


def test_svidDefaultNowIsTheClock(ca) -> None:
    """
    Without `now`, the current time is used.
    """
    caCert, caKey = ca
    past, _ = makeLeaf(caCert, caKey, uris=[WEB], notAfter=datetime.now(timezone.utc) - timedelta(minutes=1))
    with pytest.raises(SvidError, match="expired"):
        svidFromCertificate(past)
    current, _ = makeLeaf(caCert, caKey, uris=[WEB])
    assert svidFromCertificate(current) == SpiffeId.parse(WEB)


def test_chainCasesAreNotLeafChecks(ca) -> None:
    """
    "Other CA" and "intermediate missing" (S23) are chain failures, which the TLS
    layer detects; the leaf rules accept such leaves, so they must not be relied on
    for those cases.
    """
    otherCert, otherKey = makeCA("other.test", now=NOW - timedelta(days=1))
    other, _ = makeLeaf(otherCert, otherKey, uris=[WEB], now=NOW)
    caCert, caKey = ca
    intermediate, intermediateKey = makeIntermediate(caCert, caKey, TD, now=NOW)
    underIntermediate, _ = makeLeaf(intermediate, intermediateKey, uris=[WEB], now=NOW)
    assert svidFromCertificate(other, NOW) == SpiffeId.parse(WEB)
    assert svidFromCertificate(underIntermediate, NOW) == SpiffeId.parse(WEB)


def test_svidRejectsCACertificates(ca) -> None:
    """
    The roots and intermediates this project mints are never accepted as leaves.
    """
    caCert, caKey = ca
    intermediate, _ = makeIntermediate(caCert, caKey, TD, now=NOW)
    for cert in (caCert, intermediate):
        with pytest.raises(SvidError, match="cA=true"):
            svidFromCertificate(cert, NOW)


# describeCertificate


def test_describeCertificate(ca) -> None:
    """
    One line with CN, URI SANs, serial in hex and notAfter; no key material.
    """
    caCert, _ = ca
    line = describeCertificate(caCert)
    assert line.startswith(f"CN={TD}, URI=spiffe://{TD}, serial=")
    assert f"{caCert.serial_number:x}" in line
    assert caCert.not_valid_after_utc.strftime("notAfter=%Y-%m-%dT%H:%M:%SZ") in line
    leaf = _leaf(ca, uris=[WEB, "spiffe://td/two"], dns=["web.example"])
    line = describeCertificate(leaf)
    assert "CN=" not in line
    assert f"URI={WEB},spiffe://td/two" in line
    assert "web.example" not in line
    assert "KEY" not in line.upper()
    assert "URI=(none)" in describeCertificate(_leaf(ca, uris=[]))


def test_describeCertificateEscapesPeerText(ca) -> None:
    """
    Control characters from a peer's certificate are escaped and long values cut, so
    a log line stays one line of bounded length.
    """
    leaf = _leaf(ca, uris=["spiffe://td/x\n\x1b[31mFAKE LOG LINE", "spiffe://td/" + "y" * 3000])
    line = describeCertificate(leaf)
    assert "\n" not in line and "\x1b" not in line
    assert "\\x0a\\x1b" in line
    assert len(line) < 500


_nearPatterns = st.builds(
    lambda tail: "spiffe://" + tail,
    st.text(alphabet="ans/*.x-Z:", max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=40), _nearPatterns))
def test_patternParseRaisesOnlySpiffeIdError(value: str) -> None:
    """
    Arbitrary text either parses as a pattern that prints back unchanged, or raises
    SpiffeIdError; a '*' survives only as the last segment of the two wildcard forms.
    """
    try:
        pattern = IdentityPattern.parse(value)
    except SpiffeIdError:
        return
    assert str(pattern) == value
    if "*" in value:
        assert pattern.exact is None
        assert re.fullmatch(r"spiffe://[^/*]+(/ns/[^/*]+)?/\*", value)
    else:
        assert pattern.exact == SpiffeId.parse(value)
