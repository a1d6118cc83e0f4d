"""S57, a TLS scan of a running hbone listener (Long tier): ``make tlsscan``, or
``python -m tests.adversarial.long.tlsscan --sslyze PATH``.

It mints a CA and two SVIDs, starts ``hbone -L hbone://127.0.0.1:PORT`` (the real
command line, in a child process), and scans it:

* with sslyze, presenting the client SVID (``--cert``/``--key``): SSL 2/3 and
  TLS 1.0-1.2 accept no suite; TLS 1.3 accepts exactly hbone's configured suites
  (``hbone.tls.TLS13_SUITES``); no session resumption, no TLS 1.3 early data,
  no compression; (renegotiation does not exist in TLS 1.3: sslyze's check is
  reported as it answers);
* with ``openssl s_client``: ALPN ``h2`` is negotiated; ``http/1.1`` and ``h2r``
  are refused with alert 120; a TLS 1.2 client gets alert 70.

The H2R listener (15441) joins when H2R lands. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def mint(directory: str) -> tuple[str, str]:
    """A CA, a server SVID directory and client PEMs; returns (serverDir, clientDir)."""
    from hbone.ca import certificatePEM, makeCA, makeLeaf, privateKeyPEM

    caCert, caKey = makeCA("cluster.local")
    out = []
    for name, sid in (("server", "spiffe://cluster.local/ns/default/sa/server"),
                      ("client", "spiffe://cluster.local/ns/default/sa/client")):
        cert, key = makeLeaf(caCert, caKey, uris=[sid], ips=["127.0.0.1"], dns=["localhost"])
        d = os.path.join(directory, name)
        os.makedirs(d)
        for filename, data in (("cert-chain.pem", certificatePEM(cert)), ("key.pem", privateKeyPEM(key)),
                               ("root-cert.pem", certificatePEM(caCert))):
            with open(os.path.join(d, filename), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(d, filename), 0o600)
        out.append(d)
    return out[0], out[1]


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, child: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"hbone exited with {child.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"hbone did not listen on {port} within {timeout:g}s")


def sslyzeChecks(sslyze: str, port: int, client: str) -> list[tuple[str, bool, str]]:
    from hbone.tls import TLS13_SUITES

    out = os.path.join(client, "sslyze.json")
    cmd = [sslyze, "--quiet", "--cert", os.path.join(client, "cert-chain.pem"), "--key",
           os.path.join(client, "key.pem"), "--json_out", out, "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1",
           "--tlsv1_2", "--tlsv1_3", "--reneg", "--resum", "--early_data", "--compression",
           f"127.0.0.1:{port}"]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=600)
    with open(out) as f:
        report = json.load(f)
    (scan,) = report["server_scan_results"]
    if scan.get("scan_status") != "COMPLETED":
        return [("sslyze connected with the client SVID", False, str(scan.get("connectivity_error_trace"))[:300])]
    results = scan["scan_result"]
    checks = [("sslyze connected with the client SVID", True, "")]

    def accepted(command):
        attempt = results[command]
        if attempt["status"] != "COMPLETED":
            return None, attempt.get("error_reason") or attempt["status"]
        return sorted(s["cipher_suite"]["name"] for s in attempt["result"]["accepted_cipher_suites"]), ""

    for command in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites",
                    "tls_1_1_cipher_suites", "tls_1_2_cipher_suites"):
        suites, error = accepted(command)
        checks.append((f"{command}: none accepted", suites == [], error or ", ".join(suites or [])))
    suites, error = accepted("tls_1_3_cipher_suites")
    configured = sorted(TLS13_SUITES.decode().split(":"))
    checks.append(("tls_1_3_cipher_suites: exactly the configured ones", suites == configured,
                   error or ", ".join(suites or [])))

    def flag(command, path, want, label):
        """``want``: the acceptable values (a tuple)."""
        attempt = results.get(command, {})
        if attempt.get("status") != "COMPLETED":
            checks.append((label, None, f"sslyze: {attempt.get('status')} {attempt.get('error_reason') or ''}"))
            return
        value = attempt["result"]
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        checks.append((label, value in want, f"{'.'.join(path)} = {value}"))

    flag("tls_1_3_early_data", ["supports_early_data"], (False,), "no TLS 1.3 early data (0-RTT)")
    flag("tls_compression", ["supports_compression"], (False,), "no compression")
    # TLS 1.2 resumption and renegotiation cannot exist on a TLS 1.3-only server;
    # TLS 1.3 resumption is probed with openssl below
    flag("session_resumption", ["session_id_resumption_result"], ("NOT_SUPPORTED", "SERVER_IS_TLS_1_3_ONLY"),
         "no session-id resumption")
    flag("session_resumption", ["tls_ticket_resumption_result"], ("NOT_SUPPORTED", "SERVER_IS_TLS_1_3_ONLY"),
         "no TLS 1.2 ticket resumption")
    flag("session_renegotiation", ["is_vulnerable_to_client_renegotiation_dos"], (False,),
         "no client-initiated renegotiation")
    return checks


def opensslChecks(port: int, client: str) -> list[tuple[str, bool, str]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        return [("openssl s_client available", None, "not installed: apt-get install openssl")]
    base = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-cert", os.path.join(client, "cert-chain.pem"),
            "-key", os.path.join(client, "key.pem")]

    def run(*extra) -> str:
        p = subprocess.run(base + list(extra), input=b"", capture_output=True, timeout=30)
        return (p.stdout + p.stderr).decode(errors="replace")

    checks = []
    text = run("-alpn", "h2")
    checks.append(("ALPN h2 negotiated", "ALPN protocol: h2" in text, ""))
    for token in ("http/1.1", "h2r"):
        text = run("-alpn", token)
        refused = "no application protocol" in text or "alert number 120" in text
        checks.append((f"ALPN {token} refused with alert 120", refused, "" if refused else text[-200:]))
    text = run("-tls1_2")
    refused = "protocol version" in text or "alert number 70" in text
    checks.append(("TLS 1.2 refused with alert 70", refused, "" if refused else text[-200:]))
    # TLS 1.3 resumption (and so 0-RTT): no ticket is issued, a second handshake is new
    session = os.path.join(client, "session.pem")
    first = run("-alpn", "h2", "-sess_out", session)
    second = run("-alpn", "h2", "-sess_in", session) if os.path.exists(session) else first
    resumed = "Reused," in second
    checks.append(("no TLS 1.3 resumption (no ticket, no 0-RTT)", not resumed,
                   "a second handshake is " + ("resumed" if resumed else "new")))
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sslyze", default=shutil.which("sslyze"), help="the sslyze command")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="hbone-tlsscan-")
    server, client = mint(work)
    port = freePort()
    child = subprocess.Popen([sys.executable, "-m", "hbone.cli", "-q", "--certs", server,
                              "-L", f"hbone://127.0.0.1:{port}"], cwd=REPO)
    try:
        waitForPort(port, child)
        checks = opensslChecks(port, client)
        if args.sslyze:
            checks = sslyzeChecks(args.sslyze, port, client) + checks
        else:
            checks.insert(0, ("sslyze available", False, "not installed: make tlsscan installs it"))
    finally:
        child.terminate()
        child.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntlsscan of hbone://127.0.0.1:{port} (S57; the H2R listener joins when H2R lands)")
    for name, ok, detail in checks:
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[ok]
        print(f"  {mark}  {name:52s} {detail}")
    return 1 if any(ok is False for _, ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
