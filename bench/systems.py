"""The systems under test: how each is started, which processes are its own, how
it stops, and the Debian packages it needs.

Every system forwards ``127.0.0.1:<entry port>`` to the backend, and the load
generator only ever talks to the entry port, so each is measured the same way:

``raw``      the backend itself (no tunnel): the ceiling of generator + backend
``socat``    ``socat TCP-LISTEN:...,fork TCP:backend``: a plain relay, a process per connection
``stunnel``  stunnel4 client -> stunnel4 server, TLS 1.3 both ways verified (mTLS)
``nghttpx``  hbone's client -> ``nghttpx --http2-proxy`` (client certificates
             required) -> tinyproxy (CONNECT to the backend)
``hbone``    hbone's client (``-L tcp://... -F hbone://...``) -> hbone's server,
             two processes started with the ``hbone`` command as a user would

Each process runs in its own session (process group), logs to a file in the run's
directory, and is stopped with SIGTERM to its group, then SIGKILL after 5 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SYSTEMS",
    "Context",
    "Process",
    "System",
    "findExecutable",
    "freePort",
    "listening",
    "makeCertificates",
    "makeSystem",
    "missingPackages",
    "waitForPort",
]

REPO = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "cluster.local"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/server"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/client"
NGHTTPX_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/nghttpx"
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

#: Names of the systems, in table order.
SYSTEMS = ("raw", "socat", "stunnel", "nghttpx", "hbone")


def findExecutable(*names: str) -> str | None:
    """The first of ``names`` found on PATH or in the sbin directories."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def freePort() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for programs that take
    a port number rather than port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (read from /proc/net/tcp,
    without connecting: a test connection to a tunnel's entry would open a tunnel,
    and one whose FIN the system does not carry through stays open)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
                    return True
    except OSError:
        pass
    return False


def waitForPort(port: int, timeout: float, process: "Process | None" = None) -> None:
    """Poll (every 20 ms, at most ``timeout`` s) until 127.0.0.1:port listens."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode} before port {port} "
                               f"listened; log:\n{process.logTail()}")
        if listening(port):
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"port {port} did not listen within {timeout:g} s"
                               + (f"; {process.name} log:\n{process.logTail()}" if process else ""))
        time.sleep(0.02)


class Process:
    """A started program: own session, output to ``log``, always stopped and reaped."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = log
        self._logFile = open(log, "wb")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._logFile, stderr=subprocess.STDOUT,
                env=env, cwd=cwd, start_new_session=True,
            )
        except BaseException:
            self._logFile.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def logTail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the process group (socat's forked children included), then
        SIGKILL after ``grace`` seconds; reaps. Safe to call twice."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(grace)
        else:
            # the leader is gone; make sure no forked child outlives it
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not self._logFile.closed:
            self._logFile.close()


@dataclass
class Context:
    """What every system needs to start: a directory, certificates, the backend."""

    workdir: Path
    backendPort: int
    certs: dict[str, Path] = field(default_factory=dict)
    #: run hbone from this source tree (another checkout) instead of this one
    hboneTree: Path | None = None

    def path(self, name: str) -> Path:
        return self.workdir / name


def makeCertificates(workdir: Path) -> dict[str, Path]:
    """A development CA and SVIDs for the server, the client and nghttpx (Istio
    file names), made with hbone's own CA code (what ``hbone certs`` runs)."""
    from hbone.ca import initCA, issueSVID

    ca = initCA(workdir / "ca", TRUST_DOMAIN)
    return {
        "ca": ca,
        "server": issueSVID(ca, SERVER_ID, workdir / "server", ips=["127.0.0.1"]),
        "client": issueSVID(ca, CLIENT_ID, workdir / "client"),
        "nghttpx": issueSVID(ca, NGHTTPX_ID, workdir / "nghttpx", ips=["127.0.0.1"]),
    }


def hboneCommand(tree: Path | None = None) -> list[str]:
    """The ``hbone`` console script of this interpreter's environment, or
    ``python -m hbone.cli`` (the same code) when it is not installed as a script
    or another source tree is asked for."""
    script = Path(sys.executable).with_name("hbone")
    if script.exists() and tree is None:
        return [str(script)]
    return [sys.executable, "-m", "hbone.cli"]


def childEnv(tree: Path | None = None) -> dict[str, str]:
    """The environment for started programs: the ``hbone`` package of ``tree``
    (default: this checkout) first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree or REPO), env.get("PYTHONPATH")]))
    return env


class System:
    """One system under test. ``start`` returns the entry port."""

    name = "?"
    description = ""
    #: (executable names, Debian package) for each outside program it needs
    tools: tuple[tuple[tuple[str, ...], str], ...] = ()

    def __init__(self) -> None:
        self.processes: list[Process] = []

    def missing(self) -> list[str]:
        """Debian packages of tools that are not installed."""
        return [pkg for names, pkg in self.tools if findExecutable(*names) is None]

    def exe(self, *names: str) -> str:
        found = findExecutable(*names)
        if found is None:
            raise RuntimeError(f"{names[0]} is not installed")
        return found

    def spawn(self, ctx: Context, name: str, argv: list, env: dict | None = None) -> Process:
        p = Process(name, argv, ctx.path(f"{self.name}-{name}.log"), env=env, cwd=ctx.workdir)
        self.processes.append(p)
        return p

    def start(self, ctx: Context) -> int:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def commands(self) -> list[str]:
        return [" ".join(p.argv) for p in self.processes]

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


class Raw(System):
    name = "raw"
    description = "no tunnel: the load generator talks to the backend directly"

    def start(self, ctx: Context) -> int:
        return ctx.backendPort


class Socat(System):
    name = "socat"
    description = "socat TCP-LISTEN,fork -> TCP (plain relay, a process per connection, default 8 KiB buffer)"
    tools = ((("socat",), "socat"),)

    def start(self, ctx: Context) -> int:
        port = freePort()
        p = self.spawn(ctx, "relay", [
            self.exe("socat"),
            f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
            f"TCP:127.0.0.1:{ctx.backendPort}",
        ])
        waitForPort(port, 10, p)
        return port


class Stunnel(System):
    name = "stunnel"
    description = "stunnel4 client -> stunnel4 server, TLS 1.3, both certificates verified (mTLS)"
    tools = ((("stunnel4", "stunnel"), "stunnel4"),)

    def start(self, ctx: Context) -> int:
        exe = self.exe("stunnel4", "stunnel")
        serverPort, clientPort = freePort(), freePort()
        server, client = ctx.certs["server"], ctx.certs["client"]
        # stderr goes to the run's log file; syslog = no, else (no syslog daemon
        # here) stunnel writes every line to /dev/console too, at ~1-5 ms a line
        common = "foreground = yes\npid =\nsyslog = no\n"
        tls = "sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\nverifyChain = yes\n"
        serverConf = ctx.path("stunnel-server.conf")
        serverConf.write_text(
            common + "[hbone-bench]\n"
            f"accept = 127.0.0.1:{serverPort}\nconnect = 127.0.0.1:{ctx.backendPort}\n"
            f"cert = {server / 'cert-chain.pem'}\nkey = {server / 'key.pem'}\n"
            f"CAfile = {server / 'root-cert.pem'}\nrequireCert = yes\n" + tls
        )
        clientConf = ctx.path("stunnel-client.conf")
        clientConf.write_text(
            common + "[hbone-bench]\nclient = yes\n"
            f"accept = 127.0.0.1:{clientPort}\nconnect = 127.0.0.1:{serverPort}\n"
            f"cert = {client / 'cert-chain.pem'}\nkey = {client / 'key.pem'}\n"
            f"CAfile = {client / 'root-cert.pem'}\ncheckIP = 127.0.0.1\n" + tls
        )
        s = self.spawn(ctx, "server", [exe, serverConf])
        waitForPort(serverPort, 10, s)
        c = self.spawn(ctx, "client", [exe, clientConf])
        waitForPort(clientPort, 10, c)
        return clientPort


class Nghttpx(System):
    name = "nghttpx"
    description = ("hbone client -> nghttpx --http2-proxy (mTLS, client certificates required) "
                   "-> tinyproxy -> backend")
    tools = ((("nghttpx",), "nghttp2-proxy"), (("tinyproxy",), "tinyproxy"))

    def start(self, ctx: Context) -> int:
        proxyPort, frontPort, clientPort = freePort(), freePort(), freePort()
        conf = ctx.path("tinyproxy.conf")
        # LogLevel Warning: tinyproxy fsyncs every log line, and at Info it writes
        # about eight per CONNECT, which would measure the disk, not the proxy
        conf.write_text(
            f"Port {proxyPort}\nListen 127.0.0.1\nAllow 127.0.0.1\n"
            f"ConnectPort {ctx.backendPort}\nMaxClients 4096\nLogLevel Warning\n"
        )
        t = self.spawn(ctx, "tinyproxy", [self.exe("tinyproxy"), "-d", "-c", conf])
        waitForPort(proxyPort, 10, t)
        ng = ctx.certs["nghttpx"]
        n = self.spawn(ctx, "nghttpx", [
            self.exe("nghttpx"),
            "--conf=/dev/null",
            "--single-process",
            "--workers=1",
            "--http2-proxy",
            f"--frontend=127.0.0.1,{frontPort}",
            f"--backend=127.0.0.1,{proxyPort}",
            "--no-ocsp",
            "--tls-min-proto-version=TLSv1.3",
            "--tls-max-proto-version=TLSv1.3",
            "--verify-client",
            f"--verify-client-cacert={ctx.certs['ca'] / 'ca-cert.pem'}",
            # defaults of 8 backend connections per host and 64 KiB windows would
            # measure configuration, not nghttpx: the same windows as hbone's
            "--backend-connections-per-host=4096",
            "--frontend-http2-window-size=4194304",
            "--frontend-http2-connection-window-size=16777216",
            "--rlimit-nofile=16384",
            ng / "key.pem",
            ng / "cert-chain.pem",
        ])
        waitForPort(frontPort, 10, n)
        c = self.spawn(ctx, "hbone-client", [
            *hboneCommand(ctx.hboneTree), "--certs", ctx.certs["client"],
            "-L", f"tcp://127.0.0.1:{clientPort}/127.0.0.1:{ctx.backendPort}",
            "-F", f"hbone://127.0.0.1:{frontPort}?identity={NGHTTPX_ID}",
        ], env=childEnv(ctx.hboneTree))
        waitForPort(clientPort, 20, c)
        return clientPort


class HBone(System):
    name = "hbone"
    description = "hbone client (-L tcp:// -F hbone://) -> hbone server (-L hbone://), mTLS, two processes"

    def start(self, ctx: Context) -> int:
        serverPort, clientPort = freePort(), freePort()
        env = childEnv(ctx.hboneTree)
        s = self.spawn(ctx, "server", [
            *hboneCommand(ctx.hboneTree), "--certs", ctx.certs["server"],
            "--allow", f"127.0.0.1:{ctx.backendPort}",
            "-L", f"hbone://127.0.0.1:{serverPort}",
        ], env=env)
        waitForPort(serverPort, 20, s)
        c = self.spawn(ctx, "client", [
            *hboneCommand(ctx.hboneTree), "--certs", ctx.certs["client"],
            "-L", f"tcp://127.0.0.1:{clientPort}/127.0.0.1:{ctx.backendPort}",
            "-F", f"hbone://127.0.0.1:{serverPort}?identity={SERVER_ID}",
        ], env=env)
        waitForPort(clientPort, 20, c)
        return clientPort

    def roles(self) -> dict[str, int]:
        """Role name -> pid, for the profiler."""
        return {p.name: p.pid for p in self.processes}


_CLASSES = {cls.name: cls for cls in (Raw, Socat, Stunnel, Nghttpx, HBone)}


def makeSystem(name: str) -> System:
    return _CLASSES[name]()


def missingPackages(names) -> dict[str, list[str]]:
    """System name -> Debian packages it lacks (only systems that lack some)."""
    out = {}
    for name in names:
        missing = makeSystem(name).missing()
        if missing:
            out[name] = missing
    return out
