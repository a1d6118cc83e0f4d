"""Per-stream rules: evaluation order, matching, the config section, and a real 403."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from hbone.config import RULE_KEYS, ConfigError, loadConfig
from hbone.errors import TunnelRefused
from hbone.h2.client import HBoneClientEndpoint, HBoneHop, Pool
from hbone.identity import SpiffeId
from hbone.rules import RuleError, RuleSet, parseRule
from hbone.service import Node, NodeSpec
from hbone.urls import parseListener
from tests import pki

WEB = SpiffeId.parse("spiffe://cluster.local/ns/web/sa/frontend")
OPS = SpiffeId.parse("spiffe://cluster.local/ns/ops/sa/admin")


def test_denyFirst_thenAllowRequired():
    rules = RuleSet([
        parseRule("web-db", "allow", ["spiffe://cluster.local/ns/web/*"], ["10.20.0.0/16", ".db.example"], "5432"),
        parseRule("no-ssh", "deny", ["spiffe://cluster.local/ns/web/*"], [], "22"),
        parseRule("ops", "allow", ["spiffe://cluster.local/ns/ops/*"]),
    ])
    assert rules.check(WEB, "10.20.1.2", 5432) is None
    assert rules.check(WEB, "pg.db.example", 5432) is None
    assert rules.check(WEB, "db.example", 5432) is None
    assert rules.check(WEB, "evil-db.example", 5432) is not None  # suffix on a label boundary
    assert rules.check(WEB, "10.21.0.1", 5432) == "no allow rule matches spiffe://cluster.local/ns/web/sa/frontend to 10.21.0.1:5432"
    assert rules.check(WEB, "10.20.1.2", 22) == "denied by rule no-ssh"  # deny wins over nothing
    assert rules.check(OPS, "10.20.1.2", 22) is None
    assert rules.check(None, "10.20.1.2", 5432) is not None  # an anonymous peer matches no peer pattern


def test_noRules_allowEverything():
    assert not RuleSet()
    assert RuleSet().check(WEB, "1.2.3.4", 1) is None


def test_onlyDenyRules_allowTheRest():
    rules = RuleSet([parseRule("d", "deny", [], ["192.0.2.0/24"])])
    assert rules.check(WEB, "192.0.2.9", 80) == "denied by rule d"
    assert rules.check(WEB, "198.51.100.1", 80) is None


@pytest.mark.parametrize("args, message", [
    (("r", "permit"), "expected allow or deny"),
    (("r", "allow", ["spiffe://TD/x"]), "peers:"),
    (("r", "allow", [], ["not a host!"]), "destinations:"),
    (("r", "allow", [], [], "0"), "outside 1-65535"),
    (("r", "allow", [], [], "http"), "not a port"),
])
def test_badRules(args, message):
    with pytest.raises(RuleError) as e:
        parseRule(*args)
    assert message in str(e.value)


def test_configSection(tmp_path):
    p = tmp_path / "n.ini"
    p.write_text(textwrap.dedent("""
        [rule:web-db]
        action = allow
        peers = spiffe://cluster.local/ns/web/*
        destinations = 10.20.0.0/16, .db.example
        ports = 5432, 6000-6010
        [listener:a]
        url = tcp://:1/10.0.0.1:1
    """))
    spec = loadConfig(p)
    (rule,) = spec.rules
    assert rule.action == "allow" and rule.ports == ((5432, 5432), (6000, 6010))
    assert set(RULE_KEYS) == {"action", "peers", "destinations", "ports"}
    p.write_text("[rule:x]\naction = allow\nport = 1\n[listener:a]\nurl = tcp://:1/h:1\n")
    with pytest.raises(ConfigError) as e:
        loadConfig(p)
    assert "[rule:x] unknown key 'port'" in str(e.value)


class Discard(Protocol):
    pass


class RuleOverTheWire(unittest.TestCase):
    timeout = 30

    def test_ruleDenial_is403_andOtherStreamsGoOn(self):
        async def go():
            target = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Discard))
            self.addCleanup(target.stopListening)
            tport = target.getHost().port
            spec = NodeSpec(
                listeners=(parseListener("hbone://127.0.0.1:0"),),
                identity=pki.serverIdentity(),
                allow=(f"127.0.0.1:{tport}",),
                rules=(parseRule("no-client", "deny", [pki.CLIENT_ID], [], str(tport)),),
            )
            node = Node(reactor, spec)
            await node.startListening()
            node.startService()
            self.addCleanup(node.stopService)
            pool = Pool(reactor, pki.clientIdentity())
            self.addCleanup(pool.closeAll)
            hop = HBoneHop("127.0.0.1", node.listeners[0].port.getHost().port)
            with self.assertRaises(TunnelRefused) as caught:
                await HBoneClientEndpoint(pool, hop, f"127.0.0.1:{tport}").connect(Factory.forProtocol(Discard))
            self.assertEqual(caught.exception.status, 403)
            self.assertEqual(caught.exception.proxyError, "http_request_denied")
            # the same connection still serves: a policy 403 for another port, not a reset
            with self.assertRaises(TunnelRefused) as second:
                await HBoneClientEndpoint(pool, hop, "127.0.0.1:1").connect(Factory.forProtocol(Discard))
            self.assertEqual(second.exception.proxyError, "destination_ip_prohibited")
            self.assertEqual(pool.connectionsOpened, 1)

        return defer.Deferred.fromCoroutine(go())
