"""S56, coverage-guided fuzzing of every parser (Long tier): ``make fuzz``, or
``python -m tests.adversarial.long.fuzz [--seconds 60] [--target NAME]``.

Each target feeds arbitrary bytes to one parser of peer-controlled input and
allows only that parser's own error; anything else escaping is a crash. With
atheris installed (``pip install atheris``; ``make fuzz`` installs it) each
target runs in its own process under libFuzzer for ``--seconds``, with
``-timeout=1`` (no input may take more than 1 s) and seeds from a few valid
inputs; a crash leaves its input in ``--artifacts``. Without atheris the same
targets run under hypothesis with ``--examples`` random inputs each (1 s
deadline per input).

Targets: ``:authority``, the ``/_hbone/`` path, ``forwarded``, ``traceparent``,
``baggage``, SPIFFE IDs and ID patterns, the HBONE request (pseudo-headers and
headers), the HTTP/1.1 proxy request head, the SOCKS5 handshake, hbone's HTTP/2
frame-header scanner, a whole server-role HBoneH2Protocol, the ClientHello parser
(fed in reads of 13 bytes) and Istio SNI names.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _text(data: bytes) -> str:
    return data.decode("latin-1")


def _headers(data: bytes) -> list[tuple[bytes, bytes]]:
    """Header pairs from bytes: lines, each ``name\\0value``."""
    out = []
    for line in data.split(b"\n")[:64]:
        name, _, value = line.partition(b"\0")
        out.append((name, value))
    return out


def targets() -> dict:
    """name -> (function of bytes, the exceptions it may raise, seed inputs)."""
    from hbone import address, identity
    from hbone.errors import HBoneError
    from hbone.h2.connection import ConnectionSettings, FrameAccounting
    from hbone.h2.server import parseTunnelRequest
    from hbone.proxy.http import HTTPRequestError, parseRequestHead
    from hbone.proxy.socks import SOCKSError, SOCKSServerMachine

    def authority(data):
        address.parseAuthority(data)

    def hbonePath(data):
        address.parseHbonePath(data, "10.0.0.1" if data[:1] == b"w" else None)

    def forwarded(data):
        address.parseForwardedFor(data)

    def traceparent(data):
        address.isValidTraceparent(data)

    def baggage(data):
        address.parseBaggage(data)

    def spiffeId(data):
        identity.SpiffeId.parse(data)

    def pattern(data):
        identity.IdentityPattern.parse(_text(data))

    def request(data):
        parseTunnelRequest(_headers(data), "10.0.0.1")

    def httpHead(data):
        parseRequestHead(data)

    def socks(data):
        machine = SOCKSServerMachine(("user", "pass") if data[:1] == b"a" else None)
        for i in range(0, len(data), 7):
            if machine.state in (machine.WAITING, machine.DONE):
                break
            machine.receive(data[i : i + 7])

    def frameScanner(data):
        acct = FrameAccounting(ConnectionSettings(), server=True)
        stream = PREFACE + data
        for i in range(0, len(stream), 37):  # reads of any size; here 37 bytes
            if acct.scan(stream[i : i + 37], i / 1000.0) is not None:
                break

    def h2Server(data):
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from hbone.h2.connection import HBoneH2Protocol

        def handler(stream, headers):
            stream.connection.respond(stream, 400 if len(headers) % 2 else 200)

        clock = MemoryReactorClock()
        proto = HBoneH2Protocol("server", clock, ConnectionSettings(), handler, expectALPN=None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(PREFACE + data)
        clock.advance(1.0)
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        proto.connectionLost(Failure(ConnectionLost()))
        clock.advance(0)
        assert proto.streams == {}, "a stream outlived its connection"

    from hbone.clienthello import ClientHelloError, ClientHelloParser, parseIstioSni

    def clientHello(data):
        parser = ClientHelloParser()
        for i in range(0, len(data), 13):
            if parser.feed(data[i : i + 13]) is not None:
                break

    def istioSni(data):
        parseIstioSni(_text(data))

    sniName = b"outbound_.9080_._.reviews.default.svc.cluster.local"
    sniExt = (b"\x00\x00" + (len(sniName) + 5).to_bytes(2, "big") + (len(sniName) + 3).to_bytes(2, "big")
              + b"\x00" + len(sniName).to_bytes(2, "big") + sniName)
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(sniExt).to_bytes(2, "big") + sniExt)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    helloSeed = b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs

    from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, SettingsFrame
    from hpack import Encoder

    def frames(*fs):
        return b"".join(f.serialize() for f in fs)

    enc = Encoder()
    connect = HeadersFrame(1, data=enc.encode([(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]))
    connect.flags.add("END_HEADERS")
    h2seed = frames(SettingsFrame(0), connect, DataFrame(1, data=b"hello"), PingFrame(0, opaque_data=b"12345678"))

    return {
        "authority": (authority, (address.AddressError,), [b"10.0.0.1:80", b"[2001:db8::1]:443", b"a.example:8080"]),
        "hbone_path": (hbonePath, (address.AddressError,), [b"/_hbone/10.0.0.1:80", b"/_hbone/%5B::1%5D:443", b"w/_hbone/80"]),
        "forwarded": (forwarded, (), [b'for="10.0.0.1:5555"', b"for=1.2.3.4;proto=https, for=[::1]"]),
        "traceparent": (traceparent, (), [b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]),
        "baggage": (baggage, (), [b"k8s.namespace.name=default,service.name=web;p=1"]),
        "spiffe_id": (spiffeId, (identity.SpiffeIdError,), [b"spiffe://cluster.local/ns/default/sa/web"]),
        "identity_pattern": (pattern, (ValueError,), [b"spiffe://cluster.local/ns/default/*"]),
        "request": (request, (HBoneError,), [b":method\0CONNECT\n:authority\010.0.0.1:80",
                                             b":method\0POST\n:path\0/_hbone/10.0.0.1:80\ncontent-length\05"]),
        "http_proxy_head": (httpHead, (HTTPRequestError,),
                            [b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n",
                             b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"]),
        "socks5": (socks, (SOCKSError,), [b"\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50",
                                          b"a\x05\x01\x02\x01\x04user\x04pass"]),
        "frame_scanner": (frameScanner, (), [h2seed]),
        "h2_server": (h2Server, (), [h2seed]),
        "client_hello": (clientHello, (ClientHelloError,), [helloSeed]),
        "istio_sni": (istioSni, (), [b"outbound_.9080_.v1_.reviews.default.svc.cluster.local",
                                     b"outbound_.443_._.a.example"]),
    }


def _check(fn, allowed):
    def one(data: bytes) -> None:
        try:
            fn(data)
        except allowed:
            pass

    return one


def runAtheris(name: str, seconds: float, artifacts: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["hbone", "h2", "hpack", "hyperframe"]):
        table = targets()
    fn, allowed, seeds = table[name]
    corpus = tempfile.mkdtemp(prefix=f"hbone-fuzz-{name}-")
    for i, seed in enumerate(seeds):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(seed)
    os.makedirs(artifacts, exist_ok=True)
    argv = [sys.argv[0], f"-max_total_time={int(seconds)}", "-timeout=1", "-rss_limit_mb=2048",
            f"-artifact_prefix={os.path.join(artifacts, name)}-", corpus]
    atheris.Setup(argv, _check(fn, allowed))
    atheris.Fuzz()


def runHypothesis(name: str, examples: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fn, allowed, seeds = targets()[name]
    check = _check(fn, allowed)
    data = st.one_of(st.binary(max_size=2048), st.sampled_from(seeds),
                     st.builds(lambda s, b, i: s[:i] + b + s[i:], st.sampled_from(seeds), st.binary(max_size=64),
                               st.integers(0, 256)))

    @settings(max_examples=examples, deadline=1000, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data)
    def run(value):
        check(value)

    run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="one target (default: all, each in its own process)")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target, with atheris")
    parser.add_argument("--examples", type=int, default=200_000, help="per target, with hypothesis")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--artifacts", default="fuzz-artifacts")
    args = parser.parse_args(argv)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            print("atheris is not installed (pip install atheris): using hypothesis", flush=True)
            engine = "hypothesis"
    if args.target:
        if engine == "atheris":
            runAtheris(args.target, args.seconds, args.artifacts)
        else:
            runHypothesis(args.target, args.examples)
        return 0
    results = []
    for name in targets():
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", "tests.adversarial.long.fuzz", "--target", name,
                                "--engine", engine, "--seconds", str(args.seconds),
                                "--examples", str(args.examples), "--artifacts", args.artifacts],
                               stdout=subprocess.DEVNULL if engine == "atheris" else None,
                               stderr=subprocess.DEVNULL if engine == "atheris" else None)
        results.append((name, code, time.monotonic() - started))
        print(f"  {'ok  ' if code == 0 else 'FAIL'}  {name:18s} {engine} {time.monotonic() - started:6.1f}s"
              + ("" if code == 0 else f"  (exit {code}; inputs in {args.artifacts}/)"), flush=True)
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
