"""The config file: every documented key round-trips; every mistake is one line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hbone.config import (ADMIN_KEYS, CHAIN_KEYS, H2R_KEYS, LISTENER_KEYS, NODE_KEYS, ROUTE_KEYS, RULE_KEYS, ConfigError,
                          loadConfig)
from hbone.identity import IdentityPattern

ROOT = Path(__file__).resolve().parents[1]


class FakeIdentity:
    localId = None


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.ini"
    p.write_text(textwrap.dedent(text))
    return p


def load(path: Path, calls=None):
    def loader(certs, cert, key, ca):
        if calls is not None:
            calls.append((certs, cert, key, ca))
        return FakeIdentity()

    return loadConfig(path, identityLoader=loader)


FULL = """
    [node]
    name = edge-1
    certs = ids/node
    allow = 127.0.0.1:9000, 10.0.0.0/8:80,443
            .corp.example
    allow_peers = spiffe://cluster.local/ns/other/*
    chain = gw
    connect_timeout = 2.5
    idle_timeout = 60

    [chain:gw]
    hops = hbone://gw1.example:15008,gw2.example:15008?identity=spiffe://cluster.local/ns/gw/sa/gw&method=post
           http://proxy.example:3128

    [listener:fwd]
    url = tcp://:7000/10.0.0.5:22
    chain = none

    [listener:proxy]
    url = socks5://u:p@0.0.0.0:1080

    [listener:edge]
    url = h2c://:15009?jwks=keys/jwks.json&audience=https://lb.example
"""


def test_everyDocumentedKey_roundTrips(tmp_path):
    calls = []
    spec = load(write(tmp_path, FULL), calls)
    assert calls == [(str(tmp_path / "ids/node"), None, None, None)]
    assert spec.name == "edge-1"
    assert spec.allow == ("127.0.0.1:9000", "10.0.0.0/8:80,443", ".corp.example")
    assert spec.allowPeers == ("spiffe://cluster.local/ns/other/*",)
    assert (spec.connectTimeout, spec.idleTimeout) == (2.5, 60.0)
    gw, proxy = spec.hops
    assert gw.nodes == (("gw1.example", 15008), ("gw2.example", 15008))
    assert gw.identities == (IdentityPattern.parse("spiffe://cluster.local/ns/gw/sa/gw"),)
    assert gw.method == "post" and proxy.scheme == "http"
    byScheme = {l.scheme: l for l in spec.listeners}
    assert byScheme["tcp"].chain == () and byScheme["tcp"].target.authority() == "10.0.0.5:22"
    assert byScheme["socks5"].chain is None and byScheme["socks5"].credentials == ("u", "p")
    assert byScheme["h2c"].option("jwks") == str(tmp_path / "keys/jwks.json")
    assert byScheme["h2c"].option("audience") == "https://lb.example"
    # the documentation lists exactly the keys the loader accepts
    doc = (ROOT / "docs" / "config.md").read_text()
    for key in list(NODE_KEYS) + list(LISTENER_KEYS) + list(CHAIN_KEYS) + list(RULE_KEYS) + list(ROUTE_KEYS) + list(ADMIN_KEYS) + list(H2R_KEYS):
        assert f"`{key}`" in doc, key


def test_allowListSplitsOnCommasAndLines(tmp_path):
    spec = load(write(tmp_path, """
        [node]
        allow = 127.0.0.1:9000, 10.0.0.0/8
                .corp.example
        [listener:a]
        url = tcp://:7000/10.0.0.5:22
    """))
    assert spec.allow == ("127.0.0.1:9000", "10.0.0.0/8", ".corp.example")
    assert spec.identity is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("[node]\nalow = 1\n[listener:a]\nurl = tcp://:1/h:1\n", "[node] unknown key 'alow'; expected one of allow,"),
        ("[nodes]\n", "unknown section [nodes]; expected [node], [listener:NAME], [chain:NAME], [rule:NAME], [route:NAME], [h2r] or [admin]"),
        ("[listener:a]\nurl = tcp://:7000\n", "[listener:a] url: -L tcp://:7000: a tcp listener needs a fixed target"),
        ("[listener:a]\nport = 1\n", "[listener:a] unknown key 'port'; expected one of chain, url"),
        ("[listener:a]\nchain = x\n", "[listener:a] url: missing"),
        ("[listener:a]\nurl = tcp://:1/h:1\nchain = x\n", "[listener:a] chain = x: no [chain:x] section"),
        ("[chain:x]\n[listener:a]\nurl = tcp://:1/h:1\nchain = x\n", "[chain:x] hops: missing"),
        ("[chain:x]\nhops = gopher://h:1\n[listener:a]\nurl = tcp://:1/h:1\nchain = x\n", "[chain:x] hops: -F gopher://h:1: unknown scheme"),
        ("[node]\nconnect_timeout = soon\n[listener:a]\nurl = tcp://:1/h:1\n", "[node] connect_timeout = 'soon': expected seconds"),
        ("[node]\nidle_timeout = -1\n[listener:a]\nurl = tcp://:1/h:1\n", "[node] idle_timeout = '-1'"),
        ("[node]\nallow = nonsense!\n[listener:a]\nurl = tcp://:1/h:1\n", "[node] allow:"),
        ("[node]\nallow_peers = spiffe://TD/x\n[listener:a]\nurl = tcp://:1/h:1\n", "[node] allow_peers:"),
        ("[node]\ncert = a.pem\n[listener:a]\nurl = tcp://:1/h:1\n", "[node] key, ca: missing; cert, key and ca go together"),
        ("[node]\nname = bad name\n[listener:a]\nurl = tcp://:1/h:1\n", "[node] name = 'bad name'"),
        ("[node]\nname = x\n", "no [listener:NAME] section"),
        ("[node\n", "File contains no section headers" ),
    ],
)
def test_mistakes_areOneLine(tmp_path, text, message):
    p = tmp_path / "bad.ini"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(p)
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith(str(p)), line
    assert message in line, line


def test_missingCertificates_nameTheKey(tmp_path):
    p = write(tmp_path, """
        [node]
        certs = nowhere
        [listener:a]
        url = hbone://:0
    """)
    with pytest.raises(ConfigError) as e:
        loadConfig(p)
    assert "[node] certs: --certs" in str(e.value) and "not a directory" in str(e.value)


def test_unreadableFile(tmp_path):
    with pytest.raises(ConfigError) as e:
        loadConfig(tmp_path / "missing.ini")
    assert "cannot read" in str(e.value)


@pytest.mark.parametrize("name", ["node.ini", "gateway.ini", "client.ini", "sni-gateway.ini"])
def test_shippedExamplesParse(name):
    spec = load(ROOT / "conf" / name)
    assert spec.listeners


def test_denyKey(tmp_path):
    spec = load(write(tmp_path, """
        [node]
        deny = 10.9.0.0/16:22,80
               .secret.example
        [listener:a]
        url = tcp://:7000/10.0.0.5:22
    """))
    assert spec.deny == ("10.9.0.0/16:22,80", ".secret.example")


def test_shippedSniGateway_routes():
    spec = load(ROOT / "conf" / "sni-gateway.ini")
    assert [(r.name, r.match, r.target) for r in spec.routes] == [
        ("reviews", "reviews.default.svc.cluster.local", ""),
        ("db", "db.example.com", "127.0.0.1:5432"),
        ("shop", "*.shop.example.com", "sni:443"),
    ]
    assert spec.routes[1].chain == () and spec.routes[0].chain is None


@pytest.mark.parametrize("text, message", [
    ("[listener:a]\nurl = tcp://:7000/10.0.0.5:22\n[route:r]\nmatch = x.example\ntarget = 10.0.0.1:443\n",
     "routes need an sni:// listener"),
    ("[listener:s]\nurl = sni://:15443\n[route:r]\ntarget = 10.0.0.1:443\n", "[route:r] match: missing"),
    ("[listener:s]\nurl = sni://:15443\n[route:r]\nmatch = x.example\nlistener = t\n",
     "[route:r] listener = t: not an sni listener (s)"),
    ("[listener:s]\nurl = sni://:15443\n[route:r]\nmatch = x.example\ntarget = sni:https\n", "expected sni:PORT"),
    ("[listener:s]\nurl = sni://:15443\n[route:r]\nmatch = x.example\nchain = nope\n", "no [chain:nope] section"),
    ("[listener:s]\nurl = sni://:15443\n[route:r]\nmatch = x.example\ntagret = 1.2.3.4:5\n", "unknown key 'tagret'"),
])
def test_routeMistakes_areOneLine(tmp_path, text, message):
    conf = tmp_path / "bad.ini"
    conf.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(conf)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_h2rSection(tmp_path):
    conf = tmp_path / "node.ini"
    conf.write_text("[h2r]\nexport = laptop:22 127.0.0.1:22\n    laptop:80 10.0.0.5:8080\n"
                    "gateways = h2r://gw.example:15441?identity=spiffe://cluster.local/ns/default/sa/gw\n")
    spec = load(conf)
    assert [(n, p, t.authority()) for n, p, t in spec.exports] == [("laptop", 22, "127.0.0.1:22"),
                                                                   ("laptop", 80, "10.0.0.5:8080")]
    assert [str(g) for g in spec.gateways] == ["h2r://gw.example:15441?identity=spiffe://cluster.local/ns/default/sa/gw"]
    conf.write_text("[listener:r]\nurl = h2r://0.0.0.0:15441\n[h2r]\nbind = laptop=spiffe://cluster.local/ns/default/sa/laptop\n")
    assert load(conf).h2rBindings == ("laptop=spiffe://cluster.local/ns/default/sa/laptop",)


@pytest.mark.parametrize("text, message", [
    ("[h2r]\nexport = laptop:22\ngateways = h2r://gw:15441\n", "[h2r] export: 'laptop:22': expected NAME:PORT TARGET"),
    ("[h2r]\nexport = laptop:22 127.0.0.1:22\n", "export needs gateways"),
    ("[h2r]\nexport = laptop:22 127.0.0.1:22\ngateways = hbone://gw:15008\n", "is not an h2r:// URL"),
    ("[listener:r]\nurl = h2r://:15441\n[h2r]\nbind = laptop\n", "[h2r] bind: bind='laptop': expected NAME=SPIFFEID"),
    ("[listener:r]\nurl = h2r://:15441\n[h2r]\nbnd = x=y\n", "[h2r] unknown key 'bnd'"),
])
def test_h2rMistakes_areOneLine(tmp_path, text, message):
    conf = tmp_path / "bad.ini"
    conf.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(conf)
    assert message in str(e.value)
