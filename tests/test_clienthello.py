"""The ClientHello parser and Istio SNI names (PROTOCOL §8; SECURITY S34, S35, S55)."""

from __future__ import annotations

import os
import ssl
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbone.clienthello import (MAX_HELLO, ClientHelloError, ClientHelloParser, IstioName,
                               checkServerName, parseIstioSni)


def realHello(serverName: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl, i.e. OpenSSL)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=serverName)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _len(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


def ext(kind: int, data: bytes) -> bytes:
    return _len(kind, 2) + _len(len(data), 2) + data


def sniExt(*entries: tuple[int, bytes]) -> bytes:
    body = b"".join(bytes([t]) + _len(len(n), 2) + n for t, n in entries)
    return ext(0, _len(len(body), 2) + body)


def handshake(*extensions: bytes, declared: int | None = None) -> bytes:
    """A ClientHello handshake message with these extensions."""
    exts = b"".join(extensions)
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32) + b"\x00\x04\x13\x01\x13\x02"
            + b"\x01\x00" + _len(len(exts), 2) + exts)
    return b"\x01" + _len(declared if declared is not None else len(body), 3) + body


def records(hs: bytes, *sizes: int) -> bytes:
    """``hs`` in TLS records of these payload sizes (the rest in the last)."""
    out, pos = b"", 0
    for size in list(sizes) + [len(hs)]:
        if pos >= len(hs):
            break
        chunk = hs[pos:pos + size]
        out += b"\x16\x03\x01" + _len(len(chunk), 2) + chunk
        pos += len(chunk)
    return out


def parse(data: bytes, step: int | None = None):
    p = ClientHelloParser()
    if step is None:
        return p.feed(data)
    result = None
    for i in range(0, len(data), step):
        result = p.feed(data[i:i + step])
    return result


# -- real hellos -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["example.com", "outbound_.9080_._.reviews.default.svc.cluster.local",
                                  "outbound_.9080_.v1_.reviews.default.svc.cluster.local", "Mixed.Case.Example"])
def test_realHello_oneRead_andOneByteAtATime(name):
    hello = realHello(name)
    whole = parse(hello)
    assert whole.serverName == name.lower()
    assert (whole.records, whole.helloBytes) == (1, len(hello))
    assert parse(hello, step=1) == whole


def test_realHello_withoutServerName():
    assert parse(realHello(None)).serverName is None


def test_realHello_splitIntoRecords_andBytesAfterIt():
    hello = realHello("example.com")
    hs = hello[5:]
    split = records(hs, 10, 100)
    result = parse(split + b"\x14\x03\x03\x00\x01\x01", step=7)  # a following record: kept, not parsed
    assert (result.serverName, result.records, result.helloBytes) == ("example.com", 3, len(split))


def test_feedKeepsEveryByteForTheReplay():
    hello = realHello("example.com")
    p = ClientHelloParser()
    for i in range(0, len(hello), 3):
        p.feed(hello[i:i + 3])
    p.feed(b"early data")
    assert bytes(p.raw) == hello + b"early data"


def test_postQuantumSizedHello():
    """~2 KB, as an X25519MLKEM768 key share makes it (OpenSSL 3.0 cannot send one)."""
    hs = handshake(sniExt((0, b"pq.example")), ext(51, os.urandom(1250)), ext(21, bytes(600)))
    data = records(hs)
    assert 1900 < len(data) < 2100
    assert parse(data, step=1).serverName == "pq.example"
    assert parse(records(hs, 1000, 500)).serverName == "pq.example"


def test_largestAllowedHello():
    hs = handshake(sniExt((0, b"big.example")), ext(21, bytes(16000)))
    hs = handshake(sniExt((0, b"big.example")), ext(21, bytes(16000 - (len(hs) - 4 - MAX_HELLO))))
    assert len(hs) - 4 == MAX_HELLO
    assert parse(records(hs, 16384)).serverName == "big.example"


# -- S35 and S36: what is refused, and how soon ---------------------------------------------


@pytest.mark.parametrize("data, kind, needle", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_tls", "not TLS"),
    (b"\x16\x02\x00", "not_tls", "version major 2"),
    (b"\x16\x03\x01\xff\xff", "too_large", "record length 65535"),
    (b"\x16\x03\x01\x00\x00", "malformed", "empty handshake record"),
    (b"\x16\x03\x01\x40\x00\x01\xff\xff\xff", "too_large", "declared hello length 16777215"),
    (records(handshake(sniExt((0, b"x.example")), ext(21, bytes(20000))), 16000), "too_large", "declared hello length"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "malformed", "handshake type 2"),
    (records(handshake(sniExt((0, b"a.example"), (0, b"b.example")))), "bad_name", "exactly one host_name"),
    (records(handshake(sniExt((1, b"a.example")))), "bad_name", "exactly one host_name"),
    (records(handshake(sniExt((0, b"a" * 300)))), "bad_name", "expected 1-253"),
    (records(handshake(sniExt((0, "bücher.example".encode())))), "bad_name", "not ASCII"),
    (records(handshake(sniExt((0, b"example.com.")))), "bad_name", "ends with a dot"),
    (records(handshake(sniExt((0, b"a..example")))), "bad_name", "empty label"),
    (records(handshake(sniExt((0, b"10.0.0.1")))), "bad_name", "IP literal"),
    (records(handshake(sniExt((0, b"x.example")), sniExt((0, b"y.example")))), "malformed", "appears twice"),
])
def test_refused(data, kind, needle):
    for step in (None, 1):
        with pytest.raises(ClientHelloError) as caught:
            parse(data, step)
        assert caught.value.kind == kind
        assert needle in str(caught.value)


def test_fiveRecords_areRefused():
    hs = handshake(sniExt((0, b"x.example")), ext(21, bytes(100)))
    with pytest.raises(ClientHelloError, match="more than 4 records"):
        parse(records(hs, 10, 10, 10, 10))
    assert parse(records(hs, 10, 10, 10)).serverName == "x.example"  # four are fine


def test_truncatedExtensionBlock():
    hs = bytearray(handshake(sniExt((0, b"x.example"))))
    hs[-16:-14] = (40).to_bytes(2, "big")  # the SNI extension claims more bytes than the hello holds
    with pytest.raises(ClientHelloError) as caught:
        parse(records(bytes(hs)))
    assert caught.value.kind == "malformed" and "truncated" in str(caught.value)


def test_aForeignRecordInsideTheHello():
    hs = handshake(sniExt((0, b"x.example")))
    data = records(hs[:20]) + b"\x17\x03\x03\x00\x01\x00"
    with pytest.raises(ClientHelloError, match="record of type 23 inside the hello"):
        parse(data)


def test_plaintextIsRefusedOnItsFirstByte():
    p = ClientHelloParser()
    with pytest.raises(ClientHelloError) as caught:
        p.feed(b"G")
    assert caught.value.kind == "not_tls"


def test_anOversizeDeclarationIsRefusedBeforeTheRecordArrives():
    p = ClientHelloParser()
    assert p.feed(b"\x16\x03\x01\x40\x00") is None
    with pytest.raises(ClientHelloError, match="declared hello length"):
        p.feed(b"\x01\x01\x00\x00")  # 65 536, announced in the first bytes of the record


def test_needsMoreUntilComplete():
    hello = realHello("example.com")
    p = ClientHelloParser()
    assert all(p.feed(hello[i:i + 1]) is None for i in range(len(hello) - 1))
    assert p.feed(hello[-1:]).serverName == "example.com"


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("outbound_.9080_._.reviews.default.svc.cluster.local", IstioName(9080, "", "reviews.default.svc.cluster.local")),
    ("outbound_.9080_.v1_.reviews.default.svc.cluster.local", IstioName(9080, "v1", "reviews.default.svc.cluster.local")),
    ("outbound_.443_.V2_.Shop.Example", IstioName(443, "v2", "shop.example")),
    ("outbound_.15443_._.127.0.0.1", IstioName(15443, "", "127.0.0.1")),
    ("outbound_.9080._.reviews.local", None),  # the port label must end in _
    ("outbound_.0_._.reviews.local", None),
    ("outbound_.65536_._.reviews.local", None),
    ("outbound_.080_._.reviews.local", None),
    ("outbound_.9080_.v1.reviews.local", None),  # the subset label must end in _
    ("outbound_.9080_._.", None),
    ("outbound_.9080_._", None),
    ("inbound_.9080_._.reviews.local", None),
    ("reviews.default.svc.cluster.local", None),
])
def test_istioNames(name, expected):
    assert parseIstioSni(name) == expected


@given(port=st.integers(1, 65535), subset=st.from_regex(r"[a-z0-9-]{0,10}", fullmatch=True),
       labels=st.lists(st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_property_istioNameRoundTrip(port, subset, labels):
    fqdn = ".".join(labels)
    name = f"outbound_.{port}_.{subset or ''}_.{fqdn}"
    parsed = parseIstioSni(name)
    assert parsed == IstioName(port, subset, fqdn)
    assert parsed.authority() == f"{fqdn}:{port}"


@given(st.binary(max_size=3000))
@settings(max_examples=300, deadline=None)
def test_property_anyBytes_onlyItsOwnError(data):
    p = ClientHelloParser()
    started = time.monotonic()
    try:
        p.feed(data)
    except ClientHelloError:
        pass
    assert time.monotonic() - started < 0.5


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_property_anySplitOfAHello_sameAnswer(data):
    hs = handshake(sniExt((0, b"split.example")), ext(21, bytes(data.draw(st.integers(0, 3000)))))
    sizes = data.draw(st.lists(st.integers(1, 2000), max_size=3))
    wire = records(hs, *sizes)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    p = ClientHelloParser()
    result, last = None, 0
    for cut in cuts + [len(wire)]:
        result = p.feed(wire[last:cut])
        last = cut
    assert result.serverName == "split.example"
    assert bytes(p.raw) == wire


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_property_checkServerName(raw):
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return
    try:
        checked = checkServerName(name)
    except ClientHelloError as e:
        assert e.kind == "bad_name"
        return
    assert checked == name.lower() and 1 <= len(name) <= 253 and not name.endswith(".")
