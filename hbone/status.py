"""``hbone status --admin 127.0.0.1:15000``: a running node's live tunnels as a table."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

__all__ = ["statusMain", "formatTable"]


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _age(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"


def formatTable(tunnels: list[dict]) -> str:
    header = ("ID", "DIR", "PEER", "SOURCE", "TARGET", "UP", "DOWN", "AGE")
    rows = [(str(t["id"]), t["direction"][:3], t.get("peer") or "-", t.get("source") or "-", t["target"],
             _bytes(t["bytesUp"]), _bytes(t["bytesDown"]), _age(t["age"])) for t in tunnels]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {0, 5, 6, 7}
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


def statusMain(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hbone status", description="A running node's live tunnels, "
                                "from its admin listener (-L admin://127.0.0.1:15000 or [admin] listen).")
    p.add_argument("--admin", default="127.0.0.1:15000", metavar="HOST:PORT",
                   help="the node's admin listener (default 127.0.0.1:15000)")
    p.add_argument("--json", action="store_true", help="print the JSON as the node gives it")
    options = p.parse_args(argv)
    base = options.admin if "://" in options.admin else f"http://{options.admin}"
    try:
        with urllib.request.urlopen(f"{base}/tunnels", timeout=10) as r:
            tunnels = json.load(r)
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as r:
            ready = json.load(r)
    except urllib.error.HTTPError as e:
        if e.code != 503:
            sys.stderr.write(f"hbone status: {base}: HTTP {e.code}\n")
            return 1
        ready = json.load(e)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"hbone status: cannot read {base}/tunnels: {e} "
                         f"(is the node running with an admin listener there?)\n")
        return 1
    if options.json:
        print(json.dumps(tunnels, indent=1))
        return 0
    state = "ready" if ready.get("ready") else "NOT READY"
    print(f"{ready.get('node', 'hbone')}: {state}, {len(tunnels)} live tunnels")
    if tunnels:
        print(formatTable(tunnels))
    return 0
