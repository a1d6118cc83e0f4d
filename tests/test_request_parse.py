"""parseTunnelRequest: the one parser of both request forms (PROTOCOL §4, §5, §6)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbone.address import isValidTraceparent
from hbone.errors import RequestError
from hbone.h2.server import parseTunnelRequest

GOOD_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def connect(authority: bytes = b"10.0.0.1:80", *extra):
    return [(b":method", b"CONNECT"), (b":authority", authority), *extra]


def post(path: bytes = b"/_hbone/10.0.0.1:80", *extra):
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"lb.example.com"),
        (b":path", path),
        (b"content-type", b"application/octet-stream"),
        *extra,
    ]


# -- accepted ------------------------------------------------------------------------

OK = [
    ("connect-ipv4", connect(), "10.0.0.1:80", "connect", None),
    ("connect-name", connect(b"reviews.default.svc.cluster.local:9080"),
     "reviews.default.svc.cluster.local:9080", "connect", None),
    ("connect-ipv6", connect(b"[2001:db8::1]:443"), "[2001:db8::1]:443", "connect", None),
    ("connect-unknown-header", connect(b"10.0.0.1:80", (b"x-istio-source", b"waypoint")),
     "10.0.0.1:80", "connect", None),
    ("post", post(), "10.0.0.1:80", "post", None),
    ("post-ipv6-canonical", post(b"/_hbone/%5B2001:db8::1%5D:443"), "[2001:db8::1]:443", "post", None),
    ("post-content-length", post(b"/_hbone/10.0.0.1:80", (b"content-length", b"12")),
     "10.0.0.1:80", "post", 12),
    ("post-content-length-0", post(b"/_hbone/10.0.0.1:80", (b"content-length", b"0")),
     "10.0.0.1:80", "post", 0),
]


@pytest.mark.parametrize("headers,authority,form,bodyLength", [c[1:] for c in OK], ids=[c[0] for c in OK])
def test_accepted(headers, authority, form, bodyLength):
    parsed = parseTunnelRequest(headers)
    assert parsed.target.authority() == authority
    assert parsed.form == form
    assert parsed.bodyLength == bodyLength


def test_post_port_only_needs_workload_address():
    parsed = parseTunnelRequest(post(b"/_hbone/8080"), "10.1.1.1")
    assert parsed.target.authority() == "10.1.1.1:8080"
    with pytest.raises(RequestError):
        parseTunnelRequest(post(b"/_hbone/8080"))


# -- refused with 400 ----------------------------------------------------------------

BAD = [
    ("protocol", connect(b"10.0.0.1:80", (b":protocol", b"websocket")), ":protocol"),
    ("protocol-on-post", post(b"/_hbone/10.0.0.1:80", (b":protocol", b"websocket")), ":protocol"),
    ("connect-content-length", connect(b"10.0.0.1:80", (b"content-length", b"0")), "content-length"),
    ("connect-no-authority", [(b":method", b"CONNECT")], ":authority"),
    ("get", [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/_hbone/10.0.0.1:80")],
     "GET"),
    ("lowercase-connect", [(b":method", b"connect"), (b":authority", b"10.0.0.1:80")], "connect"),
    ("post-other-path", post(b"/upload"), "/upload"),
    ("post-no-path", [(b":method", b"POST"), (b":authority", b"lb")], "POST"),
    ("post-h2r", post(b"/_h2r/10.0.0.1:80"), "/_h2r/"),
    ("post-tcp", post(b"/_hbone/tcp"), "tcp"),
    ("post-query", post(b"/_hbone/10.0.0.1:80?x=1"), None),
    ("post-extra-segment", post(b"/_hbone/10.0.0.1:80/x"), None),
    ("post-content-length-negative", post(b"/_hbone/10.0.0.1:80", (b"content-length", b"-1")), "content-length"),
    ("post-content-length-text", post(b"/_hbone/10.0.0.1:80", (b"content-length", b"abc")), "content-length"),
    ("post-content-length-space", post(b"/_hbone/10.0.0.1:80", (b"content-length", b" 5")), "content-length"),
    ("post-content-length-plus", post(b"/_hbone/10.0.0.1:80", (b"content-length", b"+5")), "content-length"),
    ("post-content-length-huge", post(b"/_hbone/10.0.0.1:80", (b"content-length", b"9" * 19)), "content-length"),
    ("post-content-length-empty", post(b"/_hbone/10.0.0.1:80", (b"content-length", b"")), "content-length"),
]


@pytest.mark.parametrize("headers,mentions", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_refused_400(headers, mentions):
    with pytest.raises(RequestError) as info:
        parseTunnelRequest(headers)
    assert info.value.status == 400
    assert info.value.proxyError == "http_request_error"
    if mentions is not None:
        assert mentions in str(info.value)


@pytest.mark.parametrize(
    "authority",
    [b"example.com", b"127.1:80", b"0x7f.0.0.1:80", b"2130706433:80", b"user@host:80", b"host:0",
     b"host:65536", b"host:080", b"exa mple.com:80", b"[fe80::1%eth0]:80", b"h%41st:80", b"host.:80",
     b"", b":80"],
)
def test_bad_authority_names_it(authority):
    with pytest.raises(RequestError) as info:
        parseTunnelRequest(connect(authority))
    assert info.value.status == 400
    message = str(info.value)
    assert ":authority" in message
    if authority:
        assert authority.decode() in message


# -- trace context, forwarded, baggage ---------------------------------------------


def test_valid_traceparent_kept():
    parsed = parseTunnelRequest(connect(b"10.0.0.1:80", (b"traceparent", GOOD_TP.encode())))
    assert parsed.traceparent == GOOD_TP


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"garbage",
        b"00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # uppercase
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # short
        b"\xff\xfe",
    ],
)
def test_invalid_traceparent_replaced(value):
    extra = [] if value is None else [(b"traceparent", value)]
    parsed = parseTunnelRequest(connect(b"10.0.0.1:80", *extra))
    assert isValidTraceparent(parsed.traceparent)
    assert parsed.traceparent.encode() != value
    again = parseTunnelRequest(connect(b"10.0.0.1:80", *extra))
    assert again.traceparent != parsed.traceparent  # fresh per tunnel


def test_forwarded_parsed_last_element():
    fwd = b'for="192.0.2.7:1234";host=svc.example, for="[2001:db8::9]:5"'
    parsed = parseTunnelRequest(connect(b"10.0.0.1:80", (b"forwarded", fwd)))
    assert parsed.forwardedFor == ("2001:db8::9", 5)
    parsed = parseTunnelRequest(connect(b"10.0.0.1:80", (b"forwarded", b'for="192.0.2.7:1234"')))
    assert parsed.forwardedFor == ("192.0.2.7", 1234)


@pytest.mark.parametrize("value", [b"garbage", b"for=", b'for="not an ip"', b"\xff"])
def test_malformed_forwarded_ignored(value):
    parsed = parseTunnelRequest(connect(b"10.0.0.1:80", (b"forwarded", value)))
    assert parsed.forwardedFor is None
    assert parsed.target.authority() == "10.0.0.1:80"


def test_absent_forwarded_and_baggage():
    parsed = parseTunnelRequest(connect())
    assert parsed.forwardedFor is None
    assert parsed.baggage is None


def test_baggage_passed_through():
    parsed = parseTunnelRequest(connect(b"10.0.0.1:80", (b"baggage", b"k8s.cluster.name=c1,service.name=r")))
    assert parsed.baggage == "k8s.cluster.name=c1,service.name=r"


# -- property: only RequestError, and a valid traceparent ------------------------------

_names = st.sampled_from(
    [b":method", b":authority", b":path", b":scheme", b":protocol", b"content-length", b"traceparent",
     b"forwarded", b"baggage", b"x-other"]
)
_values = st.one_of(
    st.sampled_from([b"CONNECT", b"POST", b"GET", b"10.0.0.1:80", b"/_hbone/10.0.0.1:80", b"/_hbone/%5B::1%5D:1",
                     b"5", b"-1", GOOD_TP.encode(), b'for="1.2.3.4:5"']),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=8))
def test_parser_total(headers):
    try:
        parsed = parseTunnelRequest(headers)
    except RequestError as e:
        assert e.status == 400
        return
    assert parsed.form in ("connect", "post")
    assert isValidTraceparent(parsed.traceparent)
    assert parsed.target.authority()
