"""The command line as a user meets it: real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hbone.cli import _normalizeFlags, main
from hbone.identity import IdentityPattern
from hbone.urls import URLError, parseHop, parseListener
from tests.conftest import pickFreePorts

HBONE = [sys.executable, "-m", "hbone.cli"]
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


# -- URLs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, scheme, host, port, target",
    [
        ("tcp://:7000/127.0.0.1:9000", "tcp", "127.0.0.1", 7000, "127.0.0.1:9000"),
        ("tcp://0.0.0.0:7000/db.internal:5432", "tcp", "0.0.0.0", 7000, "db.internal:5432"),
        ("tcp://[::1]:7000/[2001:db8::1]:22", "tcp", "::1", 7000, "[2001:db8::1]:22"),
        ("hbone://:15008", "hbone", "127.0.0.1", 15008, None),
        ("hbone://0.0.0.0:0", "hbone", "0.0.0.0", 0, None),
    ],
)
def test_parseListener(text, scheme, host, port, target):
    spec = parseListener(text)
    assert (spec.scheme, spec.host, spec.port) == (scheme, host, port)
    assert (spec.target.authority() if spec.target else None) == target


@pytest.mark.parametrize(
    "text, message",
    [
        ("tcp://:7000", "needs a fixed target"),
        ("tcp://:7000/127.1:80", "bad target"),
        ("hbone://:99999", "out of range"),
        ("hbone://:15008/x:1", "only tcp:// and rtcp:// listeners take a /target"),
        ("rtcp://:22/127.0.0.1:22", "an rtcp export needs the NAME it is reached by"),
        ("h2r://:15441?bind=laptop", "bind='laptop': expected NAME=SPIFFEID"),
        ("sni://:15443?route=x", "unknown option 'route'; it takes no options"),
        ("gopher://:70", "unknown scheme 'gopher'"),
        ("mtls://:443", "gost's multiplexed TLS"),
        ("hbone://:15008?foo=1", "unknown option 'foo'"),
        ("tcp://user:pw@:7000/h:1", "only http, socks and auto listeners take user:pass@"),
        ("http://user@:8080", "credentials must be user:pass@"),
    ],
)
def test_parseListener_errors(text, message):
    with pytest.raises(URLError) as e:
        parseListener(text)
    assert message in str(e.value)
    assert text in str(e.value)


@pytest.mark.parametrize(
    "text, scheme, credentials",
    [
        (":8080", "auto", None),
        ("http://bob:s3cret@0.0.0.0:8080", "http", ("bob", "s3cret")),
        ("socks5://:1080", "socks5", None),
        ("socks4a://:1080", "socks4a", None),
        ("h2c://:15009?insecure=1", "h2c", None),
    ],
)
def test_parseListener_proxySchemes(text, scheme, credentials):
    spec = parseListener(text)
    assert spec.scheme == scheme and spec.credentials == credentials
    assert spec.host in ("127.0.0.1", "0.0.0.0")


def test_parseHop_groupsAndDefaults():
    hop = parseHop("hbone://gw1:15008,10.0.0.2:15008,[::1]:15008")
    assert hop.nodes == (("gw1", 15008), ("10.0.0.2", 15008), ("::1", 15008))
    assert parseHop("1.2.3.4:8080").scheme == "http"  # gost: no scheme is an HTTP CONNECT hop
    assert parseHop("socks5://u:p%40ss@h:1080").credentials == ("u", "p@ss")
    lb = parseHop("hbone://lb.example:443?tls=server&token=@/run/jwt&method=post")
    assert (lb.option("tls"), lb.option("token"), lb.method) == ("server", "@/run/jwt", "post")


def test_parseHop():
    hop = parseHop(f"hbone://gw.example:15008?identity={SERVER_ID}&method=post")
    assert (hop.host, hop.port, hop.method) == ("gw.example", 15008, "post")
    assert hop.identities == (IdentityPattern.parse(SERVER_ID),)
    assert parseHop("hbone://10.0.0.1:15008").identities is None
    two = parseHop("hbone://10.0.0.1:15008?identity=spiffe://td/ns/a/*&identity=spiffe://td/ns/b/sa/c")
    assert [str(p) for p in two.identities] == ["spiffe://td/ns/a/*", "spiffe://td/ns/b/sa/c"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("hbone://gw:15008?identity=spiffe://TD/x", "identity="),
        ("hbone://gw:15008?method=get", "expected connect or post"),
        ("hbone://:15008", "missing host"),
        ("hbone://gw:15008?token=eyJhbGciOi", "token= takes @FILE"),
        ("hbone://gw:15008?tls=none", "expected mtls (default) or server"),
        ("hbone://u:p@gw:15008", "not user:pass@"),
        ("hbone://gw:15008?tls=server&identity=spiffe://td/ns/a/*", "identity= needs mutual TLS"),
        ("hbone://gw1:1,:2", "missing host"),
    ],
)
def test_parseHop_errors(text, message):
    with pytest.raises(URLError) as e:
        parseHop(text)
    assert message in str(e.value)


def test_normalizeFlags_gostEquals():
    assert _normalizeFlags(["-L=:8080", "-F=hbone://h:1", "-L", "x", "--allow=1"]) == [
        "-L", ":8080", "-F", "hbone://h:1", "-L", "x", "--allow=1",
    ]


# -- main() errors, in process ------------------------------------------------------


def test_main_noListener(capsys):
    assert main([]) == 2
    assert "give at least one -L listener" in capsys.readouterr().err


def test_main_badURL(capsys):
    assert main(["-L", "tcp://:7000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hbone: error: -L tcp://:7000: a tcp listener needs a fixed target")
    assert "Traceback" not in err


def test_main_hboneListenerWithoutIdentity(capsys):
    assert main(["-L", "hbone://:0"]) == 2
    assert "needs an identity: --certs DIR" in capsys.readouterr().err


def test_main_missingCertsDirectory(capsys, tmp_path):
    assert main(["--certs", str(tmp_path / "nope"), "-L", "hbone://:0"]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "hbone certs issue" in err


def test_main_badAllow(capsys, tmp_path):
    ids = _mintIdentities(tmp_path)
    assert main(["--certs", str(ids["server"]), "--allow", "nonsense!", "-L", "hbone://:0"]) == 2
    assert "--allow" in capsys.readouterr().err


def test_help_explainsEveryOption():
    out = subprocess.run(HBONE + ["--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for word in ("-L", "-F", "--certs", "--allow", "--allow-peer", "identity=", "method=post", "hbone certs init"):
        assert word in out.stdout, word


# -- real processes ----------------------------------------------------------------


def _mintIdentities(tmp_path: Path) -> dict[str, Path]:
    ca = tmp_path / "ca"
    assert main(["certs", "init", str(ca), "--trust-domain", "cluster.local"]) == 0
    out = {}
    for name, sid in (("server", SERVER_ID), ("client", CLIENT_ID)):
        out[name] = tmp_path / name
        args = ["certs", "issue", str(ca), "--spiffe", sid, "--out", str(out[name])]
        if name == "server":
            args += ["--ip", "127.0.0.1"]
        assert main(args) == 0
    return out


def _defaultSigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Proc:
    """A child process whose stderr is collected; killed and reaped at the end."""

    def __init__(self, args, cwd=None, env=None):
        # Ctrl-C is what stop() sends: a suite started in the background (SIGINT
        # ignored, as a shell does for '&') must not pass that on to the child
        self.p = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
                                  preexec_fn=_defaultSigint)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    def waitFor(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen; output:\n{''.join(self.lines)}")

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self._t.join(5)
        return self.p.returncode


class _Echo:
    """A threaded TCP echo server on 127.0.0.1 that half-closes after EOF."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with c:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                c.sendall(data)
            c.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


def _roundTrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
        sender.join(20)
    return b"".join(chunks)


def test_issueExample_endToEnd(tmp_path):
    """The README's usage: certs, a server process, a forwarder process, bytes both ways."""
    ids = _mintIdentities(tmp_path)
    echo = _Echo()
    hbonePort, forwardPort = pickFreePorts(2)
    server = _Proc(HBONE + ["--certs", str(ids["server"]), "--allow", f"127.0.0.1:{echo.port}",
                            "-L", f"hbone://127.0.0.1:{hbonePort}"])
    client = None
    try:
        server.waitFor("ready:")
        client = _Proc(HBONE + ["--certs", str(ids["client"]),
                                f"-L=tcp://127.0.0.1:{forwardPort}/127.0.0.1:{echo.port}",
                                "-F", f"hbone://127.0.0.1:{hbonePort}?identity={SERVER_ID}"])
        client.waitFor("ready:")
        payload = os.urandom(3 * 1024 * 1024 + 17)
        got = _roundTrip(forwardPort, payload)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        client.waitFor("closed: 3145745 bytes up, 3145745 bytes down")
        # a destination the server's policy does not allow: the tunnel is refused
        denied = pickFreePorts(1)[0]
        client.stop()
        client = _Proc(HBONE + ["--certs", str(ids["client"]),
                                "-L", f"tcp://127.0.0.1:{forwardPort}/127.0.0.1:{denied}",
                                "-F", f"hbone://127.0.0.1:{hbonePort}"])
        client.waitFor("ready:")
        # a refused tunnel resets the client connection: an error, never a clean empty reply
        with pytest.raises(ConnectionResetError):
            _roundTrip(forwardPort, b"hello")
        client.waitFor("403")
        client.waitFor(f"presented {SERVER_ID}")  # no identity= on the hop: logged once
        server.waitFor("destination_ip_prohibited")
    finally:
        if client is not None:
            assert client.stop() in (0, -2, 1), "".join(client.lines)
        server.stop()
        echo.close()
    assert echo.accepted == 1


def test_listenerThatCannotBind_failsTheStart(tmp_path):
    ids = _mintIdentities(tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        out = subprocess.run(HBONE + ["--certs", str(ids["server"]), "-L", f"hbone://127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=30)
    finally:
        blocker.close()
    assert out.returncode == 1
    assert f"-L hbone://127.0.0.1:{port}: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_dev_selftest(tmp_path):
    """What `make run` starts, checked once through the tunnel (`hbone dev --selftest`)."""
    hp, fp, tp = pickFreePorts(3)
    out = subprocess.run(
        HBONE + ["dev", "--selftest", "--state", str(tmp_path / "state"),
                 "--hbone-port", str(hp), "--forward-port", str(fp), "--target-port", str(tp)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"selftest tcp 127.0.0.1:{fp}: ok" in out.stdout
    assert (tmp_path / "state" / "server" / "cert-chain.pem").exists()
    assert "Traceback" not in out.stderr


def test_twistd_listsHbone_andRunsANode(tmp_path):
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        pytest.skip("twistd is not installed beside this Python")
    # twistd finds dropins on sys.path; the project root holds twisted/plugins
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    listed = subprocess.run([str(twistd), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert "hbone" in listed.stdout
    ids = _mintIdentities(tmp_path)
    port = pickFreePorts(1)[0]
    proc = _Proc([str(twistd), "-n", "--pidfile=", "hbone", "--certs", str(ids["server"]),
                  "-L", f"hbone://127.0.0.1:{port}"], cwd=tmp_path, env=env)
    try:
        proc.waitFor(f"listening: hbone on 127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    finally:
        proc.stop()


def test_dev_keepsServingUntilInterrupted(tmp_path):
    """`hbone dev` (what `make run` starts) serves until Ctrl-C, then exits 0."""
    hp, fp, tp = pickFreePorts(3)
    proc = _Proc(HBONE + ["dev", "--state", str(tmp_path / "state"), "--hbone-port", str(hp),
                          "--forward-port", str(fp), "--target-port", str(tp)])
    try:
        proc.waitFor("try:")
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", fp), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                body = b""
                while data := s.recv(65536):
                    body += data
            assert b"reached through an HBONE tunnel" in body
    finally:
        code = proc.stop()
    assert code == 0, "".join(proc.lines)
    assert "Traceback" not in "".join(proc.lines)


def test_main_publicProxyWithoutCredentials_refusesToStart(capsys):
    assert main(["-L", "http://0.0.0.0:0"]) == 2
    err = capsys.readouterr().err
    assert "-L http://0.0.0.0:0: a proxy listener on a non-loopback address needs user:pass@" in err


def test_main_badDeny(capsys):
    assert main(["--deny", "not an entry", "-L", "tcp://:0/10.0.0.5:22"]) == 2
    assert "--deny" in capsys.readouterr().err
