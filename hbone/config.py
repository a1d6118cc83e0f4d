"""``conf/*.ini`` -> :class:`hbone.service.NodeSpec` (validated once, frozen).

Every section and key is checked against an explicit list (tahoe-lafs style): a typo
stops the start with one line naming the file, the section, the key and what is
expected. File paths are relative to the config file. The format is documented in
``docs/config.md``; ``conf/`` has commented examples.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import replace
from pathlib import Path

from hbone.address import parseAuthority
from hbone.urls import HopSpec, ListenerSpec, URLError, parseHop, parseListener

__all__ = ["ConfigError", "loadConfig", "NODE_KEYS", "LISTENER_KEYS", "CHAIN_KEYS", "RULE_KEYS", "ROUTE_KEYS",
           "ADMIN_KEYS", "H2R_KEYS"]

#: [node] keys and what each expects.
NODE_KEYS = {
    "name": "a short name for proxy-status and logs (letters, digits, - _ .)",
    "certs": "a directory with cert-chain.pem, key.pem, root-cert.pem",
    "cert": "a PEM certificate chain file (with key and ca)",
    "key": "a PEM private key file (with cert and ca)",
    "ca": "a PEM trust bundle file (with cert and key)",
    "allow": "destinations past the default policy: host:port, CIDR[:ports] or .suffix, comma or newline separated",
    "deny": "destinations refused even if otherwise allowed, in the forms allow takes",
    "allow_peers": "extra peer identities: spiffe://td/ns/N/sa/S or spiffe://td/ns/N/*, comma or newline separated",
    "chain": "the [chain:NAME] that listeners without their own chain use",
    "connect_timeout": "seconds, a number > 0 (default 10)",
    "idle_timeout": "seconds, a number > 0 (default 3600)",
    "drain_timeout": "seconds live tunnels get to finish on SIGTERM, a number >= 0 (default 5)",
    "cert_check_interval": "seconds between looks at the certificate files for a renewed SVID, "
                           "a number >= 0; 0 turns it off (default 5)",
}
#: [listener:NAME] keys.
LISTENER_KEYS = {
    "url": "a listener URL, e.g. hbone://0.0.0.0:15008 or tcp://:7000/10.0.0.5:22",
    "chain": "the [chain:NAME] this listener's tunnels go through, or 'none' to dial directly",
}
#: [rule:NAME] keys (per-stream authorization on HBONE listeners, SECURITY §4.2).
RULE_KEYS = {
    "action": "allow or deny (deny rules are evaluated first)",
    "peers": "SPIFFE IDs or patterns (spiffe://td/ns/N/*) the rule applies to; absent: every peer",
    "destinations": "CIDRs, host names or .suffixes the rule applies to; absent: every destination",
    "ports": "ports or ranges, e.g. 80,443,8000-8080; absent: every port",
}
#: [route:NAME] keys (the route table of sni listeners, PROTOCOL §8).
ROUTE_KEYS = {
    "match": "the server name: an exact name, *.suffix, or * (the default route, also for hellos without one)",
    "target": "host:port (fixed), or sni:PORT (the client's server name on PORT); absent: Istio names only, "
              "to their <fqdn>:<port>",
    "subset": "Istio names only: the subset this route serves (outbound_.PORT_.SUBSET_.FQDN); absent: any",
    "chain": "the [chain:NAME] toward the target, or 'none' to dial directly; absent: the listener's chain",
    "listener": "the [listener:NAME] (an sni:// listener) whose table this route is in; absent: every sni listener",
}
#: [h2r] keys (reverse tunnels, PROTOCOL §9).
H2R_KEYS = {
    "bind": "gateway: NAME=SPIFFEID, one per line: the identities allowed to serve each name (none by default)",
    "export": "node: NAME:PORT TARGET, one per line, e.g. laptop:22 127.0.0.1:22: what the gateway may "
              "open here (the node's whole destination policy)",
    "gateways": "node: h2r://host:port?identity=SPIFFEID, one per line: the gateways to register with",
}
#: [admin] keys.
ADMIN_KEYS = {
    "listen": "[host]:port of the admin listener (metrics, health, the tunnels page); the host defaults "
              "to 127.0.0.1, e.g. 127.0.0.1:15000",
}
#: [chain:NAME] keys.
CHAIN_KEYS = {
    "hops": "hop URLs in dial order, one per line, e.g. hbone://gw.example:15008?identity=...",
}


class ConfigError(ValueError):
    """One line: file, section, key, what is wrong and what is expected."""


def _list(value: str) -> tuple[str, ...]:
    """Comma or newline separated; a bare port or port range after a comma continues
    the entry before it (``10.0.0.0/8:80,443`` is one allow entry)."""
    items: list[str] = []
    for line in value.splitlines():
        for part in line.split(","):
            part = part.strip()
            if not part:
                continue
            if items and re.fullmatch(r"\d{1,5}(-\d{1,5})?", part) and ":" in items[-1]:
                items[-1] += "," + part
            else:
                items.append(part)
    return tuple(items)


def _number(path, section, key, value, zero: bool = False) -> float:
    try:
        n = float(value)
    except ValueError:
        n = -1
    if not (n >= 0 if zero else n > 0) or n != n or n == float("inf"):
        raise ConfigError(f"{path}: [{section}] {key} = {value!r}: expected {NODE_KEYS[key]}")
    return n


def _resolve(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p))


def _relativeOptions(base: Path, options, keys=("jwks", "ca")):
    out = []
    for k, v in options:
        if k in keys and v:
            v = _resolve(base, v)
        elif k == "token" and v.startswith("@"):
            v = "@" + _resolve(base, v[1:])
        out.append((k, v))
    return tuple(out)


def loadConfig(path: str | os.PathLike, identityLoader=None):
    """Read and validate ``path``; return a NodeSpec.

    :param identityLoader: ``(certs, cert, key, ca) -> Identity`` (tests swap it);
        the default loads the files with :class:`hbone.tls.Identity`.
    """
    from hbone.service import NodeSpec

    path = Path(path)
    base = path.resolve().parent
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"),
                                       empty_lines_in_values=False, default_section="\0none")
    parser.optionxform = str  # keys are case-sensitive: a typo is an error, not a guess
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None

    node: dict[str, str] = {}
    listeners: dict[str, dict[str, str]] = {}
    chains: dict[str, dict[str, str]] = {}
    rules: dict[str, dict[str, str]] = {}
    routes: dict[str, dict[str, str]] = {}
    admin: dict[str, str] = {}
    h2r: dict[str, str] = {}
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if section == "node":
            allowed, target = NODE_KEYS, node
        elif kind == "listener" and name:
            allowed, target = LISTENER_KEYS, listeners.setdefault(name, {})
        elif kind == "chain" and name:
            allowed, target = CHAIN_KEYS, chains.setdefault(name, {})
        elif kind == "rule" and name:
            allowed, target = RULE_KEYS, rules.setdefault(name, {})
        elif kind == "route" and name:
            allowed, target = ROUTE_KEYS, routes.setdefault(name, {})
        elif section == "admin":
            allowed, target = ADMIN_KEYS, admin
        elif section == "h2r":
            allowed, target = H2R_KEYS, h2r
        else:
            raise ConfigError(f"{path}: unknown section [{section}]; expected [node], "
                              f"[listener:NAME], [chain:NAME], [rule:NAME], [route:NAME], [h2r] or [admin]")
        for key, value in parser.items(section):
            if key not in allowed:
                raise ConfigError(f"{path}: [{section}] unknown key {key!r}; expected one of "
                                  f"{', '.join(sorted(allowed))}")
            target[key] = value.strip()

    def chainOf(section: str, key: str, name: str) -> tuple[HopSpec, ...] | None:
        if name == "none":
            return ()
        if name not in chains:
            known = ", ".join(sorted(chains)) or "none defined"
            raise ConfigError(f"{path}: [{section}] {key} = {name}: no [chain:{name}] section ({known})")
        hopsText = chains[name].get("hops")
        if not hopsText:
            raise ConfigError(f"{path}: [chain:{name}] hops: missing; expected {CHAIN_KEYS['hops']}")
        hops = []
        for text in hopsText.splitlines():  # one hop per line (a comma is a group)
            text = text.strip()
            if not text:
                continue
            try:
                hop = parseHop(text)
            except URLError as e:
                raise ConfigError(f"{path}: [chain:{name}] hops: {e}") from None
            hops.append(replace(hop, options=_relativeOptions(base, hop.options)))
        return tuple(hops)

    # identity
    for k in ("cert", "key", "ca"):
        if k in node and "certs" in node:
            raise ConfigError(f"{path}: [node] {k}: give either certs or cert/key/ca, not both")
    if any(k in node for k in ("cert", "key", "ca")) and not all(k in node for k in ("cert", "key", "ca")):
        missing = [k for k in ("cert", "key", "ca") if k not in node]
        raise ConfigError(f"{path}: [node] {', '.join(missing)}: missing; cert, key and ca go together")
    identity = None
    if "certs" in node or "cert" in node:
        from hbone.tls import IdentityConfigError

        loader = identityLoader or _loadIdentity
        try:
            identity = loader(
                _resolve(base, node["certs"]) if "certs" in node else None,
                *(_resolve(base, node[k]) if k in node else None for k in ("cert", "key", "ca")),
            )
        except IdentityConfigError as e:
            key = "certs" if "certs" in node else "cert"
            raise ConfigError(f"{path}: [node] {key}: {e}") from None

    defaultChain = chainOf("node", "chain", node["chain"]) if "chain" in node else ()
    specs: list[ListenerSpec] = []
    for name, values in listeners.items():
        section = f"listener:{name}"
        if "url" not in values:
            raise ConfigError(f"{path}: [{section}] url: missing; expected {LISTENER_KEYS['url']}")
        try:
            spec = parseListener(values["url"])
        except URLError as e:
            raise ConfigError(f"{path}: [{section}] url: {e}") from None
        chain = chainOf(section, "chain", values["chain"]) if "chain" in values else None
        specs.append(replace(spec, options=_relativeOptions(base, spec.options), chain=chain,
                             text=f"{spec.text} [{section}]", name=name))
    bindings, exports, gateways = _h2rSection(path, h2r)
    if not specs and not exports:
        raise ConfigError(f"{path}: no [listener:NAME] section; a node needs at least one listener")
    if admin:
        if "listen" not in admin:
            raise ConfigError(f"{path}: [admin] listen: missing; expected {ADMIN_KEYS['listen']}")
        try:
            adminSpec = parseListener(f"admin://{admin['listen']}")
        except URLError as e:
            raise ConfigError(f"{path}: [admin] listen = {admin['listen']!r}: {e}") from None
        specs.append(replace(adminSpec, text=f"{adminSpec.text} [admin]", name="admin"))
    name = node.get("name", "hbone")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"{path}: [node] name = {name!r}: expected {NODE_KEYS['name']}")
    for key in ("allow", "deny", "allow_peers"):
        if key in node:
            try:
                _validateList(key, _list(node[key]))
            except ValueError as e:
                raise ConfigError(f"{path}: [node] {key}: {e}") from None
    from hbone.rules import RuleError, parseRule

    ruleList = []
    for rname, values in rules.items():
        if "action" not in values:
            raise ConfigError(f"{path}: [rule:{rname}] action: missing; expected {RULE_KEYS['action']}")
        try:
            ruleList.append(parseRule(rname, values["action"], _list(values.get("peers", "")),
                                      _list(values.get("destinations", "")), values.get("ports", "")))
        except RuleError as e:
            raise ConfigError(f"{path}: [rule:{rname}] {e}") from None
    from hbone.sni import RouteError, parseRoute

    sniListeners = {s.name for s in specs if s.scheme == "sni"}
    routeList = []
    for rname, values in routes.items():
        section = f"route:{rname}"
        if "match" not in values:
            raise ConfigError(f"{path}: [{section}] match: missing; expected {ROUTE_KEYS['match']}")
        listener = values.get("listener")
        if not sniListeners:
            raise ConfigError(f"{path}: [{section}]: routes need an sni:// listener ([listener:NAME] "
                              f"with url = sni://0.0.0.0:15443)")
        if listener is not None and listener not in sniListeners:
            raise ConfigError(f"{path}: [{section}] listener = {listener}: not an sni listener "
                              f"({', '.join(sorted(sniListeners))})")
        chain = chainOf(section, "chain", values["chain"]) if "chain" in values else None
        try:
            routeList.append(parseRoute(rname, values["match"], values.get("target", ""),
                                        values.get("subset", ""), chain, listener))
        except RouteError as e:
            raise ConfigError(f"{path}: [{section}] {e}") from None
    return NodeSpec(
        h2rBindings=bindings,
        exports=exports,
        gateways=gateways,
        routes=tuple(routeList),
        rules=tuple(ruleList),
        listeners=tuple(specs),
        hops=defaultChain,
        identity=identity,
        allow=_list(node.get("allow", "")),
        deny=_list(node.get("deny", "")),
        allowPeers=_list(node.get("allow_peers", "")),
        name=name,
        connectTimeout=_number(path, "node", "connect_timeout", node["connect_timeout"]) if "connect_timeout" in node else 10.0,
        idleTimeout=_number(path, "node", "idle_timeout", node["idle_timeout"]) if "idle_timeout" in node else 3600.0,
        drainTimeout=_number(path, "node", "drain_timeout", node["drain_timeout"], zero=True)
        if "drain_timeout" in node else 5.0,
        certCheckInterval=_number(path, "node", "cert_check_interval", node["cert_check_interval"], zero=True)
        if "cert_check_interval" in node else 5.0,
    )


def _h2rSection(path, h2r: dict[str, str]):
    from hbone.address import AddressError

    bindings = tuple(line.strip() for line in h2r.get("bind", "").splitlines() if line.strip())
    if bindings:
        from hbone.h2r import parseBindings

        try:
            parseBindings(bindings)
        except ValueError as e:
            raise ConfigError(f"{path}: [h2r] bind: {e}") from None
    exports = []
    for line in h2r.get("export", "").splitlines():
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise AddressError("expected NAME:PORT TARGET")
            exported, target = parseAuthority(parts[0]), parseAuthority(parts[1])
        except AddressError as e:
            raise ConfigError(f"{path}: [h2r] export: {line.strip()!r}: {e} (e.g. laptop:22 127.0.0.1:22)") from None
        exports.append((exported.host, exported.port, target))
    gateways = []
    for line in h2r.get("gateways", "").splitlines():
        if not line.strip():
            continue
        try:
            hop = parseHop(line.strip())
        except URLError as e:
            raise ConfigError(f"{path}: [h2r] gateways: {e}") from None
        if hop.scheme != "h2r":
            raise ConfigError(f"{path}: [h2r] gateways: {line.strip()!r} is not an h2r:// URL")
        gateways.append(hop)
    if exports and not gateways:
        raise ConfigError(f"{path}: [h2r] export needs gateways = h2r://gw:15441?identity=... to register with")
    if gateways and not exports:
        raise ConfigError(f"{path}: [h2r] gateways: nothing is exported (add export = NAME:PORT TARGET)")
    return bindings, tuple(exports), tuple(gateways)


def _validateList(key: str, items) -> None:
    if key in ("allow", "deny"):
        from hbone.policy import parseAllowEntry

        for item in items:
            parseAllowEntry(item)
    else:
        from hbone.identity import IdentityPattern

        for item in items:
            IdentityPattern.parse(item)


def _loadIdentity(certs, cert, key, ca):
    from hbone.tls import Identity

    if certs:
        return Identity.fromDirectory(certs)
    return Identity.fromFiles(cert, key, ca)
