"""What the benchmark ran on: CPU, kernel, Python, libraries, and the peers' versions."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata

from bench.systems import REPO, findExecutable

__all__ = ["describe", "describeMarkdown"]

_LIBRARIES = ("Twisted", "h2", "hyperframe", "hpack", "pyOpenSSL", "cryptography")


def _cpuModel() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _firstLine(argv: list[str], pattern: str | None = None) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip()
    for line in text.splitlines():
        if pattern is None or re.search(pattern, line):
            return line.strip()
    return None


def describe(hboneTree=None) -> dict:
    """The machine and software, as a JSON-able dict (``hboneTree``: the source
    tree hbone runs from, default this checkout)."""
    libs = {}
    for name in _LIBRARIES:
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libs[name] = None
    try:
        from OpenSSL import SSL

        libs["OpenSSL (via pyOpenSSL)"] = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    except Exception:  # pragma: no cover - pyOpenSSL is a dependency
        libs["OpenSSL (via pyOpenSSL)"] = None
    peers = {}
    for label, names, argv, pattern in (
        ("socat", ("socat",), ["-V"], r"socat version"),
        ("stunnel", ("stunnel4", "stunnel"), ["-version"], r"^stunnel "),
        ("nghttpx", ("nghttpx",), ["--version"], None),
        ("tinyproxy", ("tinyproxy",), ["-v"], r"tinyproxy"),
    ):
        exe = findExecutable(*names)
        peers[label] = _firstLine([exe, *argv], pattern) if exe else None
    memTotal = None
    try:
        with open("/proc/meminfo") as f:
            memTotal = f.readline().split()[1] + " kB"
    except OSError:
        pass
    tree = str(hboneTree or REPO)
    commit = _firstLine(["git", "-C", tree, "rev-parse", "--short=12", "HEAD"])
    if commit:
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--", "hbone"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += " (hbone/ modified)" if dirty else ""
        if hboneTree is not None:
            commit += f" in {tree}"
    return {
        "hbone": commit,
        "nproc": os.cpu_count(),
        "cpu": _cpuModel(),
        "memory": memTotal,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libraries": libs,
        "peers": peers,
    }


def describeMarkdown(info: dict) -> str:
    """The description as a Markdown list (for docs/performance.md)."""
    lines = [
        f"- CPU: {info['cpu']}, `nproc` = {info['nproc']}; memory {info.get('memory')}",
        f"- kernel: Linux {info['kernel']}",
        f"- Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v),
        "- peers: " + "; ".join(f"{v}" for v in info["peers"].values() if v),
    ]
    if info.get("hbone"):
        lines.append(f"- hbone: commit {info['hbone']}")
    return "\n".join(lines)
