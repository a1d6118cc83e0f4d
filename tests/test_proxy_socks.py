"""The SOCKS listener (SECURITY S53; PROTOCOL §6 "Local listeners").

* :class:`SOCKSServerMachine`, pure: every S53 case, SOCKS4/4a, the reply table,
  and hypothesis properties (any split gives the same events; garbage raises
  nothing, ever, and the machine holds at most one message);
* the listener protocol against ``StringTransport`` and a ``Clock``: the 10 s
  deadline covers greeting, authentication and request together;
* real sockets: S53 with no dial in any case, a denied target with a canary that
  sees no accept, refused connections, hash-equal tunnels for SOCKS5 IPv4 / IPv6 /
  domain and SOCKS4 / 4a, RFC 1929 authentication, and curl.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from hbone.address import Target
from hbone.proxy.socks import (
    MAX_MESSAGE, Connect, Refuse, Send, SOCKSError, SOCKSProxyFactory, SOCKSServerMachine,
    encodeSOCKS5Request, socks5ReplyCode,
)
from tests.test_proxy_http import (
    Canary, ListenerUnitMixin, ProxyTestCase, StubResolver, asyncTest, chunked,
    ipv6Loopback, runPeer,
)

MiB = 1024 * 1024
FAIL_V4 = b"\x01\x00\x00\x00\x00\x00\x00"  # ATYP IPv4 0.0.0.0:0


def reply5(rep: int) -> bytes:
    return bytes([5, rep, 0]) + FAIL_V4


def request5(cmd: int, atyp: int, address: bytes, port: int = 80) -> bytes:
    return bytes([5, cmd, 0, atyp]) + address + struct.pack("!H", port)


def socks4(host: str, port: int, user: bytes = b"", name: bytes | None = None, cmd: int = 1) -> bytes:
    ip = ipaddress.IPv4Address(host).packed
    out = bytes([4, cmd]) + struct.pack("!H", port) + ip + user + b"\x00"
    if name is not None:
        out += name + b"\x00"
    return out


def run(machine: SOCKSServerMachine, *chunks: bytes) -> list:
    events = []
    for chunk in chunks:
        events += machine.receive(chunk)
    return events


# ---------------------------------------------------------------------------
# The machine


class TestSOCKS5Machine:
    def test_noAuthConnect(self):
        m = SOCKSServerMachine()
        assert m.receive(b"\x05\x02\x00\x02") == [Send(b"\x05\x00")]
        (event,) = m.receive(request5(1, 3, b"\x0bexample.com", 443) + b"early")
        assert event == Connect(Target("example.com", 443), 5, b"early")
        assert m.succeeded("192.0.2.5", 4242) == b"\x05\x00\x00\x01\xc0\x00\x02\x05\x10\x92"

    def test_ipv4AndIPv6(self):
        m = SOCKSServerMachine()
        (_, event) = run(m, b"\x05\x01\x00" + request5(1, 1, bytes([192, 0, 2, 1]), 22))
        assert event.target == Target("192.0.2.1", 22)
        m = SOCKSServerMachine()
        (_, event) = run(m, b"\x05\x01\x00" + request5(1, 4, ipaddress.IPv6Address("2001:db8::1").packed, 22))
        assert event.target == Target("2001:db8::1", 22)
        assert m.succeeded("2001:db8::2", 1)[:4] == b"\x05\x00\x00\x04"

    @pytest.mark.parametrize("request_, reply, key", [
        (request5(2, 1, b"\x7f\x00\x00\x01"), reply5(7), "socks_command"),  # BIND
        (request5(3, 1, b"\x7f\x00\x00\x01"), reply5(7), "socks_command"),  # UDP ASSOCIATE
        (request5(9, 1, b"\x7f\x00\x00\x01"), reply5(7), "socks_command"),
        (bytes([5, 1, 0, 5]) + b"\x00" * 6, reply5(8), "socks_atyp"),  # ATYP 0x05
        (bytes([5, 1, 0, 3, 0]) + b"\x00\x50", reply5(1), "socks_request"),  # empty domain
        (request5(1, 3, b"\x03a b"), reply5(1), "socks_target"),
        (request5(1, 3, b"\x04127.1"), reply5(1), "socks_target"),
        (request5(1, 3, b"\x02\xc3\xa9"), reply5(1), "socks_request"),
        (request5(1, 1, b"\x7f\x00\x00\x01", 0), reply5(1), "socks_target"),  # port 0
        (request5(1, 1, b"\x7f\x00\x00\x01").replace(b"\x05", b"\x04", 1), reply5(1), "socks_request"),
    ])
    def test_refusedRequests(self, request_, reply, key):
        """S53: each is answered, then closed; nothing to dial."""
        m = SOCKSServerMachine()
        events = run(m, b"\x05\x01\x00", request_)
        assert events[0] == Send(b"\x05\x00")
        assert len(events) == 2
        assert isinstance(events[1], Refuse)
        assert (events[1].data, events[1].key) == (reply, key)
        assert m.state == m.DONE
        with pytest.raises(SOCKSError):
            m.receive(b"more")

    @pytest.mark.parametrize("greeting", [b"\x05\x00", b"\x05\x01\x02", b"\x05\x02\x01\x80"])
    def test_noAcceptableMethod(self, greeting):
        (event,) = SOCKSServerMachine().receive(greeting)
        assert isinstance(event, Refuse) and event.data == b"\x05\xff"

    def test_credentialsRequired(self):
        (event,) = SOCKSServerMachine(("alice", "s3cret")).receive(b"\x05\x01\x00")
        assert event.data == b"\x05\xff"
        assert "requires username/password" in event.reason

    def test_authentication(self):
        m = SOCKSServerMachine(("alice", "s3cret"))
        assert m.receive(b"\x05\x02\x00\x02") == [Send(b"\x05\x02")]
        assert m.receive(b"\x01\x05alice\x06s3cret") == [Send(b"\x01\x00")]
        (event,) = m.receive(request5(1, 1, b"\xc0\x00\x02\x01", 80))
        assert isinstance(event, Connect)

    @pytest.mark.parametrize("auth", [
        b"\x01\x05alice\x05wrong", b"\x01\x03bob\x06s3cret", b"\x01\x05alice\x07s3cret!",
        b"\x01\x00\x00", b"\x02\x05alice\x06s3cret",
    ])
    def test_wrongPassword(self, auth):
        m = SOCKSServerMachine(("alice", "s3cret"))
        events = run(m, b"\x05\x01\x02", auth)
        assert events[0] == Send(b"\x05\x02")
        assert isinstance(events[1], Refuse) and events[1].data == b"\x01\x01"
        assert "s3cret" not in events[1].reason and "wrong" not in events[1].reason.split()[-1:]

    def test_notSOCKS(self):
        (event,) = SOCKSServerMachine().receive(b"GET / HTTP/1.1\r\n")
        assert isinstance(event, Refuse) and event.data == b""

    @pytest.mark.parametrize("status, proxyError, rep", [
        (200, None, 0x00), (400, "http_request_error", 0x01), (401, "http_request_denied", 0x02),
        (403, "destination_ip_prohibited", 0x02), (503, "connection_refused", 0x05),
        (503, "dns_error", 0x04), (503, "destination_unavailable", 0x04), (504, "connection_timeout", 0x04),
        (502, "proxy_internal_response", 0x01),
    ])
    def test_replyTable(self, status, proxyError, rep):
        assert socks5ReplyCode(status, proxyError) == rep
        if status != 200:
            m = SOCKSServerMachine()
            run(m, b"\x05\x01\x00", request5(1, 1, b"\xc0\x00\x02\x01"))
            assert m.failed(status, proxyError) == reply5(rep)
            with pytest.raises(SOCKSError):
                m.failed(status, proxyError)

    def test_credentialLimits(self):
        with pytest.raises(ValueError):
            SOCKSServerMachine(("a" * 256, "p"))
        with pytest.raises(ValueError):
            SOCKSServerMachine(("", "p"))


class TestSOCKS4Machine:
    def test_socks4(self):
        m = SOCKSServerMachine()
        (event,) = m.receive(socks4("192.0.2.9", 8080, b"user") + b"x")
        assert event == Connect(Target("192.0.2.9", 8080), 4, b"x")
        assert m.succeeded("127.0.0.1", 1) == b"\x00\x5a" + b"\x00" * 6

    def test_socks4a(self):
        m = SOCKSServerMachine()
        (event,) = run(m, socks4("0.0.0.1", 80, b"", b"Example.ORG")[:12], socks4("0.0.0.1", 80, b"", b"Example.ORG")[12:])
        assert event.target == Target("example.org", 80)
        assert m.failed(403, "destination_ip_prohibited") == b"\x00\x5b" + b"\x00" * 6

    @pytest.mark.parametrize("data, why", [
        (socks4("192.0.2.9", 80, cmd=2), "BIND"),
        (socks4("0.0.0.1", 80, b"", b""), "empty"),
        (socks4("0.0.0.1", 80, b"", b"127.1"), "target"),
        (socks4("192.0.2.9", 0), "target"),
        (bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"u" * 256, "user ID"),
        (bytes([4, 1, 0, 80, 0, 0, 0, 1, 0]) + b"n" * 256, "host name"),
    ])
    def test_rejected(self, data, why):
        (event,) = SOCKSServerMachine().receive(data)
        assert isinstance(event, Refuse) and event.data == b"\x00\x5b" + b"\x00" * 6
        assert why in event.reason

    def test_noPasswordInSOCKS4(self):
        (event,) = SOCKSServerMachine(("alice", "s3cret")).receive(socks4("192.0.2.9", 80, b"alice"))
        assert isinstance(event, Refuse) and event.data[1] == 0x5B


targets = st.one_of(
    st.builds(lambda a, p: Target(str(ipaddress.IPv4Address(a)), p), st.integers(0, 2**32 - 1), st.integers(1, 65535)),
    st.builds(lambda a, p: Target(str(ipaddress.IPv6Address(a)), p), st.integers(0, 2**128 - 1), st.integers(1, 65535)),
    st.builds(lambda labels, p: Target(".".join(labels) + ".example", p),
              st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True), min_size=1, max_size=5),
              st.integers(1, 65535)),
)


class TestMachineProperties:
    @settings(max_examples=300)
    @given(targets, st.lists(st.integers(1, 30), max_size=40), st.binary(max_size=40))
    def test_roundTripAnySplit(self, target, sizes, after):
        """Decoding the canonical request gives the target back, however split."""
        data = b"\x05\x01\x00" + encodeSOCKS5Request(target) + after
        m = SOCKSServerMachine()
        events = []
        for chunk in chunked(data, sizes):
            if m.state == m.WAITING:
                break
            events += m.receive(chunk)
        assert events[0] == Send(b"\x05\x00")
        assert events[1].target == target
        assert len(events) == 2

    @settings(max_examples=500)
    @given(st.lists(st.binary(max_size=700), max_size=10), st.none() | st.just(("user", "pw")))
    def test_garbage(self, chunks, credentials):
        """Any input: only events (or SOCKSError once finished); never more than one
        message buffered; a Refuse ends it."""
        m = SOCKSServerMachine(credentials)
        for chunk in chunks:
            if m.state in (m.WAITING, m.DONE):
                with pytest.raises(SOCKSError):
                    m.receive(chunk)
                break
            events = m.receive(chunk)
            for event in events:
                assert isinstance(event, (Send, Refuse, Connect))
            assert m.buffered <= MAX_MESSAGE
            if any(isinstance(e, Refuse) for e in events):
                assert isinstance(events[-1], Refuse)
                assert m.state == m.DONE


# ---------------------------------------------------------------------------
# The protocol, without sockets


class SOCKSListenerUnitTests(ListenerUnitMixin, unittest.SynchronousTestCase):
    factoryClass = SOCKSProxyFactory

    def test_connectAnsweredOnlyOnceConnected(self):
        proto = self.build()
        proto.dataReceived(b"\x05\x01\x00")
        proto.dataReceived(request5(1, 1, b"\xc0\x00\x02\x01", 443) + b"early")
        self.assertEqual(self.transport.value(), b"\x05\x00")
        (request,) = self.dialer.requests
        self.assertEqual(request.target, Target("192.0.2.1", 443))
        self.assertFalse(request.operatorFixed)
        _, outTransport = self.dialer.finish()
        # BND.ADDR/BND.PORT: the outbound transport's local address (StringTransport's 10.0.0.1:12345)
        self.assertEqual(self.transport.value(), b"\x05\x00" + b"\x05\x00\x00\x01\x0a\x00\x00\x01\x30\x39")
        self.assertEqual(outTransport.value(), b"early")

    def test_dialErrors(self):
        from hbone.errors import ConnectTimeout, HopUnreachable, StreamReset
        from hbone.policy import DestinationDenied

        for err, rep in [(DestinationDenied("no"), 2), (HopUnreachable("x", 503, "connection_refused"), 5),
                         (HopUnreachable("x", 503, "dns_error"), 4), (ConnectTimeout("x"), 4),
                         (StreamReset(0xA), 1)]:
            proto = self.build()
            proto.dataReceived(b"\x05\x01\x00" + request5(1, 1, b"\xc0\x00\x02\x01", 443))
            self.dialer.pending[0][1].errback(err)
            self.assertEqual(self.transport.value(), b"\x05\x00" + reply5(rep))
            self.assertTrue(self.transport.disconnecting)

    def test_deadlineCoversTheWholeHandshake(self):
        """Greeting at 0 s, auth at 9 s: still closed at 10 s."""
        proto = self.build(credentials=("alice", "s3cret"))
        proto.dataReceived(b"\x05\x01\x02")
        self.clock.advance(9)
        proto.dataReceived(b"\x01\x05alice\x06s3cret")
        self.assertEqual(self.transport.value(), b"\x05\x02\x01\x00")
        self.clock.advance(0.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.dialer.requests, [])

    def test_socks4a(self):
        proto = self.build()
        proto.dataReceived(socks4("0.0.0.1", 22, b"me", b"git.example"))
        self.assertEqual(self.dialer.requests[0].target, Target("git.example", 22))
        self.dialer.finish()
        self.assertEqual(self.transport.value(), b"\x00\x5a" + b"\x00" * 6)


# ---------------------------------------------------------------------------
# Real sockets


class SOCKSProxyTests(ProxyTestCase):
    async def expectRefusal(self, port: int, data: bytes, answer: bytes) -> None:
        received, reason = await self.talk(port, data)
        self.assertEqual(received, answer)
        self.assertClosedCleanly(reason)

    @asyncTest
    async def test_S53(self):
        """BIND, UDP ASSOCIATE, ATYP 0x05, an empty domain, a wrong password, no
        acceptable method: the reply, then a close; no dial in any case."""
        echo, echoPort = self.startEcho()
        allow = [f"127.0.0.1:{echoPort}"]
        _, port = self.startProxy(SOCKSProxyFactory, allow)
        _, authPort = self.startProxy(SOCKSProxyFactory, allow, credentials=("alice", "s3cret"))
        local = b"\x7f\x00\x00\x01"
        await self.expectRefusal(port, b"\x05\x01\x00" + request5(2, 1, local, echoPort), b"\x05\x00" + reply5(7))
        await self.expectRefusal(port, b"\x05\x01\x00" + request5(3, 1, local, echoPort), b"\x05\x00" + reply5(7))
        await self.expectRefusal(port, b"\x05\x01\x00" + bytes([5, 1, 0, 5]) + local + b"\x00\x50",
                                 b"\x05\x00" + reply5(8))
        await self.expectRefusal(port, b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50", b"\x05\x00" + reply5(1))
        await self.expectRefusal(authPort, b"\x05\x01\x02\x01\x05alice\x05wrong", b"\x05\x02\x01\x01")
        await self.expectRefusal(authPort, b"\x05\x01\x00", b"\x05\xff")
        await self.expectRefusal(port, b"\x05\x01\x02", b"\x05\xff")
        self.assertEqual(self.counting.connects, [])
        self.assertEqual(echo.watcher.opened, 0)

    @asyncTest
    async def test_deniedTarget(self):
        """S31 through SOCKS5: REP 0x02, and the canary sees no accept."""
        canary = Canary()
        canaryPort = self.listen(canary)
        _, port = self.startProxy(SOCKSProxyFactory, ["127.0.0.1:1"],
                                  resolver=StubResolver({"metadata.google.internal": ["169.254.169.254"]}))
        for req in (request5(1, 1, b"\x7f\x00\x00\x01", canaryPort),
                    request5(1, 3, b"\x09127.0.0.1", canaryPort),
                    request5(1, 3, b"\x09localhost", canaryPort),
                    request5(1, 3, b"\x18metadata.google.internal", 80),
                    request5(1, 4, ipaddress.IPv6Address("::ffff:127.0.0.1").packed, canaryPort)):
            await self.expectRefusal(port, b"\x05\x01\x00" + req, b"\x05\x00" + reply5(2))
        await self.expectRefusal(port, socks4("127.0.0.1", canaryPort), b"\x00\x5b" + b"\x00" * 6)
        self.assertEqual(self.counting.connects, [])
        self.assertEqual(canary.accepts, 0)

    @asyncTest
    async def test_connectionRefused(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        closedPort = probe.getsockname()[1]
        probe.close()
        _, port = self.startProxy(SOCKSProxyFactory, [f"127.0.0.1:{closedPort}"])
        await self.expectRefusal(port, b"\x05\x01\x00" + request5(1, 1, b"\x7f\x00\x00\x01", closedPort),
                                 b"\x05\x00" + reply5(5))

    async def roundTrip(self, port: int, handshake: bytes, replyLength: int, expectReply=None) -> None:
        payload = os.urandom(MiB)
        received, reason = await self.talk(port, handshake + payload, halfClose=True)
        if expectReply is not None:
            self.assertEqual(received[:replyLength], expectReply)
        body = received[replyLength:]
        self.assertEqual(len(body), len(payload))
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(payload).digest())
        self.assertClosedCleanly(reason)

    @asyncTest
    async def test_socks5Tunnels(self):
        """IPv4, domain (stub resolver) and, where ::1 works, IPv6: 1 MiB sent with
        the request, SHA-256 equal back; the reply carries the outbound's address."""
        echo, echoPort = self.startEcho()
        allow = [f"127.0.0.1:{echoPort}"]
        echo6Port = None
        if ipv6Loopback():
            echo6, echo6Port = self.startEcho("::1")
            allow.append(f"[::1]:{echo6Port}")
        _, port = self.startProxy(SOCKSProxyFactory, allow,
                                  resolver=StubResolver({"echo.test": ["127.0.0.1"]}))
        greeting = b"\x05\x01\x00"
        v4 = request5(1, 1, b"\x7f\x00\x00\x01", echoPort)
        await self.roundTrip(port, greeting + v4, 2 + 10)
        await self.roundTrip(port, greeting + request5(1, 3, b"\x09echo.test", echoPort), 2 + 10)
        await self.roundTrip(port, greeting + request5(1, 3, b"\x09127.0.0.1", echoPort), 2 + 10)
        expected = [("127.0.0.1", echoPort)] * 3
        if echo6Port is not None:
            await self.roundTrip(port, greeting + request5(1, 4, ipaddress.IPv6Address("::1").packed, echo6Port),
                                 2 + 22)
            expected.append(("::1", echo6Port))
        self.assertEqual(self.counting.connects, expected)
        # the reply's BND is the outbound socket's local address
        received, _ = await self.talk(port, greeting + v4, halfClose=True)
        self.assertEqual(received[2:6], b"\x05\x00\x00\x01")
        self.assertEqual(received[6:10], b"\x7f\x00\x00\x01")
        self.assertNotEqual(received[10:12], b"\x00\x00")

    @asyncTest
    async def test_socks4Tunnels(self):
        echo, echoPort = self.startEcho()
        _, port = self.startProxy(SOCKSProxyFactory, [f"127.0.0.1:{echoPort}"],
                                  resolver=StubResolver({"echo.test": ["127.0.0.1"]}))
        granted = b"\x00\x5a" + b"\x00" * 6
        await self.roundTrip(port, socks4("127.0.0.1", echoPort, b"me"), 8, granted)
        await self.roundTrip(port, socks4("0.0.0.9", echoPort, b"", b"echo.test"), 8, granted)
        self.assertEqual(echo.eofs, 2)

    @asyncTest
    async def test_authenticatedTunnel(self):
        echo, echoPort = self.startEcho()
        _, port = self.startProxy(SOCKSProxyFactory, [f"127.0.0.1:{echoPort}"], credentials=("alice", "s3cret"))
        handshake = b"\x05\x01\x02\x01\x05alice\x06s3cret" + request5(1, 1, b"\x7f\x00\x00\x01", echoPort)
        await self.roundTrip(port, handshake, 2 + 2 + 10)


@pytest.mark.peers
class CurlSOCKSTests(ProxyTestCase):
    def setUp(self) -> None:
        from tests.conftest import requirePeer

        (self.curl,) = requirePeer("curl")
        super().setUp()

    @asyncTest
    async def test_curl(self):
        """``curl --socks5-hostname 127.0.0.1:P http://127.0.0.1:WEB/`` and friends."""
        webPort = self.startWeb()
        allow = [f"127.0.0.1:{webPort}"]
        _, port = self.startProxy(SOCKSProxyFactory, allow)
        _, authPort = self.startProxy(SOCKSProxyFactory, allow, credentials=("alice", "s3cret"))
        url = f"http://127.0.0.1:{webPort}/"
        base = ["-q", "--silent", "--show-error", "--max-time", "10"]
        for proxyArgs in (["--socks5-hostname", f"127.0.0.1:{port}"], ["--socks5", f"127.0.0.1:{port}"],
                          ["--socks4", f"127.0.0.1:{port}"], ["--socks4a", f"127.0.0.1:{port}"],
                          ["-x", f"socks5h://alice:s3cret@127.0.0.1:{authPort}"]):
            out, err, code = await runPeer(self.curl, base + proxyArgs + [url])
            self.assertEqual((code, out), (0, b"hello from the origin\n"), (proxyArgs, err))
        out, err, code = await runPeer(self.curl, base + ["-x", f"socks5h://alice:nope@127.0.0.1:{authPort}", url])
        self.assertNotEqual(code, 0)
        out, err, code = await runPeer(self.curl, base + ["--socks5-hostname", f"127.0.0.1:{port}",
                                                          "http://169.254.169.254/"])
        self.assertNotEqual(code, 0)
        self.assertEqual([p for _, p in self.counting.connects], [webPort] * 5)
