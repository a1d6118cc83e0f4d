"""Per-stream authorization rules (SECURITY §4.2): (peer pattern, destination, ports).

Each rule matches a stream by the peer's SPIFFE ID, the requested destination (a CIDR
for IP targets, a hostname or ``.suffix`` for names) and a port range. DENY rules are
evaluated first; if any ALLOW rule exists, a stream must match one (ztunnel's L4
policy order). A denial is ``403 http_request_denied``. Rules apply per stream, on
top of the peer authorizer and the destination policy, which still decide what an
address may be.

Rules are pure data, built from the config file's ``[rule:NAME]`` sections.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hbone.identity import IdentityPattern

__all__ = ["Rule", "RuleSet", "parseRule", "RuleError"]


class RuleError(ValueError):
    """A rule that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Rule:
    name: str
    action: str  # "allow" | "deny"
    peers: tuple[IdentityPattern, ...] = ()  # empty: any peer
    networks: tuple = ()  # ip_network objects
    names: tuple[str, ...] = ()  # exact names or ".suffix"
    ports: tuple[tuple[int, int], ...] = ()  # empty: any port

    def matches(self, peer, host: str, port: int) -> bool:
        if self.peers and (peer is None or not any(p.matches(peer) for p in self.peers)):
            return False
        if self.ports and not any(lo <= port <= hi for lo, hi in self.ports):
            return False
        if not self.networks and not self.names:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None:
            return any(ip in net for net in self.networks)
        host = host.lower()
        for name in self.names:
            if name.startswith("."):
                if host.endswith(name) or host == name[1:]:
                    return True
            elif host == name:
                return True
        return False


def _ports(text: str, name: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise RuleError(f"rule {name}: ports: {part!r} is not a port or a range like 8000-8080") from None
        if not (1 <= a <= b <= 65535):
            raise RuleError(f"rule {name}: ports: {part!r} is outside 1-65535")
        out.append((a, b))
    return tuple(out)


def parseRule(name: str, action: str, peers=(), destinations=(), ports: str = "") -> Rule:
    action = action.strip().lower()
    if action not in ("allow", "deny"):
        raise RuleError(f"rule {name}: action = {action!r}; expected allow or deny")
    try:
        patterns = tuple(IdentityPattern.parse(p) for p in peers)
    except ValueError as e:
        raise RuleError(f"rule {name}: peers: {e}") from None
    networks, names = [], []
    for d in destinations:
        d = d.strip()
        try:
            networks.append(ipaddress.ip_network(d, strict=False))
            continue
        except ValueError:
            pass
        label = d.lstrip(".")
        if not label or not all(part and all(c.isalnum() or c == "-" for c in part) for part in label.split(".")):
            raise RuleError(f"rule {name}: destinations: {d!r} is neither a CIDR nor a host name or .suffix")
        names.append(d.lower())
    return Rule(name, action, patterns, tuple(networks), tuple(names), _ports(ports, name))


class RuleSet:
    """Evaluates rules in SECURITY §4.2's order."""

    def __init__(self, rules=()) -> None:
        self.replace(rules)

    def replace(self, rules=()) -> None:
        """Use these rules from now on (a config reload)."""
        self.rules = tuple(rules)
        self._deny = tuple(r for r in self.rules if r.action == "deny")
        self._allow = tuple(r for r in self.rules if r.action == "allow")

    def __bool__(self) -> bool:
        return bool(self.rules)

    def check(self, peer, host: str, port: int) -> str | None:
        """None if the stream may proceed, else why not (for the 403 and the log)."""
        for rule in self._deny:
            if rule.matches(peer, host, port):
                return f"denied by rule {rule.name}"
        if self._allow and not any(r.matches(peer, host, port) for r in self._allow):
            return f"no allow rule matches {peer} to {host}:{port}"
        return None
