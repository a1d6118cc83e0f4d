"""Reload, certificate rotation and drain as units (the fake clock drives the
watcher); the real processes and signals are in tests/adversarial/test_drain.py and
test_reload.py."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from twisted.internet import task

from hbone.ca import certificatePEM, makeLeaf, privateKeyPEM
from hbone.certwatch import IdentityWatcher, expiryState
from hbone.config import ConfigError, loadConfig
from hbone.events import (CertificateRotated, CertificateRotationFailed, ConfigReloaded,
                          ConfigReloadFailed, Events)
from hbone.rules import parseRule
from hbone.service import Node, NodeConfigError, NodeSpec
from hbone.tls import Identity, IdentityConfigError, ServerAuthClientCreator
from hbone.urls import parseHop, parseListener
from tests import pki


def write(directory: Path, identity, key=True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert-chain.pem").write_bytes(certificatePEM(*identity.chain))
    if key:
        (directory / "key.pem").write_bytes(privateKeyPEM(identity._key))
        os.chmod(directory / "key.pem", 0o600)
    (directory / "root-cert.pem").write_bytes(certificatePEM(*pki.ca()[:1]))


def bump(directory: Path) -> None:
    """Make sure the files look changed even within one mtime tick."""
    for name in ("cert-chain.pem", "key.pem"):
        st = os.stat(directory / name)
        os.utime(directory / name, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.fixture
def watched(tmp_path):
    write(tmp_path, pki.identity(pki.SERVER_ID))
    identity = Identity.fromDirectory(tmp_path)
    clock = task.Clock()
    clock.advance(datetime.now(timezone.utc).timestamp())
    events = Events()
    seen = []
    events.subscribe(seen.append)
    watcher = IdentityWatcher(clock, identity, interval=1.0, events=events)
    watcher.start()
    yield tmp_path, identity, clock, watcher, seen
    watcher.stop()


def test_rotation_newCertificateForNewHandshakes(watched):
    directory, identity, clock, watcher, seen = watched
    oldLeaf = identity.chain[0]
    oldContext = identity.serverContext()
    renewed = pki.identity(pki.SERVER_ID)
    write(directory, renewed)
    bump(directory)
    clock.advance(1.0)
    assert identity.chain[0] == renewed.chain[0] != oldLeaf
    assert identity.serverContext() is not oldContext  # new handshakes: the new certificate
    assert identity.generation == 1 and watcher.rotations == 1
    assert [type(e) for e in seen] == [CertificateRotated]
    assert seen[0].identity == pki.SERVER_ID
    clock.advance(5.0)  # nothing changed since: no second rotation
    assert watcher.rotations == 1


def test_rotation_halfWrittenFiles_keepTheOldThenRetry(watched):
    directory, identity, clock, watcher, seen = watched
    oldLeaf = identity.chain[0]
    renewed = pki.identity(pki.SERVER_ID)
    write(directory, renewed, key=False)  # the certificate is new, the key not yet
    bump(directory)
    clock.advance(1.0)
    assert identity.chain[0] == oldLeaf
    assert isinstance(seen[-1], CertificateRotationFailed)
    assert "does not match" in seen[-1].error
    write(directory, renewed)
    bump(directory)
    clock.advance(1.0)
    assert identity.chain[0] == renewed.chain[0]
    assert isinstance(seen[-1], CertificateRotated)


def test_rotation_anotherIdentity_isRefused(watched):
    directory, identity, clock, watcher, seen = watched
    write(directory, pki.identity(f"spiffe://{pki.TD}/ns/default/sa/intruder"))
    bump(directory)
    clock.advance(1.0)
    assert str(identity.localId) == pki.SERVER_ID
    assert isinstance(seen[-1], CertificateRotationFailed)
    assert "restart to change identity" in seen[-1].error
    with pytest.raises(IdentityConfigError):
        identity.rotate(pki.clientIdentity())


def test_rotation_serverAuthCreatorRebuildsItsContext(watched):
    directory, identity, clock, watcher, seen = watched
    creator = ServerAuthClientCreator("lb.example", identity=identity)
    before = creator.context
    creator.clientConnectionForTLS(None)
    assert creator.context is before
    write(directory, pki.identity(pki.SERVER_ID))
    bump(directory)
    clock.advance(1.0)
    creator.clientConnectionForTLS(None)
    assert creator.context is not before


def test_expiry_states():
    caCert, caKey = pki.ca()
    now = datetime.now(timezone.utc)
    cert, key = makeLeaf(caCert, caKey, uris=[pki.SERVER_ID], notBefore=now - timedelta(hours=20),
                         notAfter=now + timedelta(hours=4))
    identity = Identity([cert], key, {pki.TD: [caCert]})
    t = now.timestamp()
    assert expiryState(identity, t - 12 * 3600) == "valid"
    assert expiryState(identity, t) == "expiring"  # the last 20 % of a 24 h lifetime
    assert expiryState(identity, t + 5 * 3600) == "expired"


def test_watcher_logsExpiryOncePerState(tmp_path):
    from twisted.logger import globalLogPublisher

    caCert, caKey = pki.ca()
    now = datetime.now(timezone.utc)
    cert, key = makeLeaf(caCert, caKey, uris=[pki.SERVER_ID], notBefore=now - timedelta(hours=1),
                         notAfter=now + timedelta(minutes=30))
    write(tmp_path, Identity([cert], key, {pki.TD: [caCert]}))
    identity = Identity.fromDirectory(tmp_path)
    clock = task.Clock()
    clock.advance(now.timestamp())
    messages = []
    observer = lambda e: messages.append(e.get("log_format", ""))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        watcher = IdentityWatcher(clock, identity, interval=60.0)
        watcher.start()
        clock.advance(60.0)
        clock.advance(60.0)
        assert sum("expires at" in m for m in messages) == 1
        clock.advance(3600.0)
        assert sum("EXPIRED" in m for m in messages) == 1
        watcher.stop()
    finally:
        globalLogPublisher.removeObserver(observer)


def test_watcher_needsFiles():
    with pytest.raises(ValueError, match="not loaded from files"):
        IdentityWatcher(task.Clock(), pki.serverIdentity())


# -- reload --------------------------------------------------------------------------


def node(**kw) -> Node:
    spec = NodeSpec(listeners=(parseListener("tcp://127.0.0.1:0/127.0.0.1:9"),), **kw)
    return Node(task.Clock(), spec)


def test_reload_appliesPolicyRulesAndTimeouts():
    n = node(identity=pki.serverIdentity(), allow=("127.0.0.1:9",))
    seen = []
    n.events.subscribe(seen.append)
    rule = parseRule("r", "deny", [pki.CLIENT_ID], ["10.0.0.0/8"])
    result = n.reload(NodeSpec(listeners=n.spec.listeners, identity=n.identity, allow=("127.0.0.1:10",),
                               allowPeers=("spiffe://other.td/ns/x/*",), rules=(rule,),
                               idleTimeout=60.0, connectTimeout=3.0))
    assert result["changed"] == ["allow/deny", "allow_peers", "rules", "idle_timeout", "connect_timeout"]
    assert result["ignored"] == [] and result["reset"] == 0
    assert n.rules.rules == (rule,)
    assert n.tracker.idleTimeout == 60.0
    assert n.dialer.connectTimeout == 3.0
    from hbone.identity import SpiffeId

    assert n.authorizer.isAllowed(SpiffeId.parse("spiffe://other.td/ns/x/sa/y"))
    n.policy.checkAddress("127.0.0.1", 10)  # now allowed
    from hbone.policy import DestinationDenied

    with pytest.raises(DestinationDenied):
        n.policy.checkAddress("127.0.0.1", 9)  # no longer allowed
    assert isinstance(seen[-1], ConfigReloaded) and seen[-1].changed == tuple(result["changed"])


def test_reload_invalidSpec_changesNothing():
    n = node(identity=pki.serverIdentity(), allow=("127.0.0.1:9",))
    with pytest.raises(NodeConfigError, match="allow"):
        n.reload(NodeSpec(listeners=n.spec.listeners, identity=n.identity, allow=("999.1.1.1:9",),
                          rules=(parseRule("r", "deny"),)))
    assert n.spec.allow == ("127.0.0.1:9",)
    assert not n.rules
    with pytest.raises(NodeConfigError, match="allow_peers"):
        n.reload(NodeSpec(listeners=n.spec.listeners, identity=n.identity, allowPeers=("not-an-id",)))


def test_reload_listenerAndChainChanges_needARestart():
    n = node()
    result = n.reload(NodeSpec(listeners=(parseListener("tcp://127.0.0.1:0/127.0.0.1:10"),),
                               hops=(parseHop("http://127.0.0.1:3128"),)))
    assert result["ignored"] == ["listeners", "chain"]
    assert n.spec.listeners[0].target.port == 9  # the running listeners stay


def test_reloadFromFile_refusesABadFile(tmp_path):
    n = node()
    seen = []
    n.events.subscribe(seen.append)
    conf = tmp_path / "node.ini"
    conf.write_text("[node]\nalow = 1.2.3.4:5\n[listener:a]\nurl = tcp://127.0.0.1:0/127.0.0.1:9\n")
    assert n.reloadFromFile(conf) is None
    assert isinstance(seen[-1], ConfigReloadFailed) and "alow" in seen[-1].error
    conf.write_text("[node]\nallow = 1.2.3.4:5\n[listener:a]\nurl = tcp://127.0.0.1:0/127.0.0.1:9\n")
    assert n.reloadFromFile(conf)["changed"] == ["allow/deny"]


def test_config_drainTimeoutAndCertCheckInterval(tmp_path):
    conf = tmp_path / "node.ini"
    base = "[listener:a]\nurl = tcp://127.0.0.1:0/127.0.0.1:9\n"
    conf.write_text("[node]\ndrain_timeout = 0\ncert_check_interval = 0\n" + base)
    spec = loadConfig(conf)
    assert (spec.drainTimeout, spec.certCheckInterval) == (0.0, 0.0)
    conf.write_text("[node]\ndrain_timeout = -1\n" + base)
    with pytest.raises(ConfigError, match=r"\[node\] drain_timeout = '-1'"):
        loadConfig(conf)
    conf.write_text("[node]\n" + base)
    assert loadConfig(conf).drainTimeout == 5.0


# -- drain of a node with nothing live -------------------------------------------------


def test_drain_withNothingLive_isImmediate():
    from twisted.internet import reactor

    n = Node(reactor, NodeSpec(listeners=(parseListener("tcp://127.0.0.1:0/127.0.0.1:9"),)))
    results = []
    n.drain().addCallback(results.append)
    assert results == [{"finished": 0, "reset": 0, "seconds": 0.0}]
    n.drain().addCallback(results.append)  # again: the same summary
    assert results[1] is results[0]
