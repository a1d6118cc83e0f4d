"""Tests for hbone.ca: the development CA, its files and `hbone certs`."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from hbone.ca import (
    CAError,
    certificatePEM,
    certsMain,
    checkKeyFilePermissions,
    ensureDevIdentity,
    initCA,
    issueSVID,
    makeCA,
    makeIntermediate,
    makeLeaf,
    privateKeyPEM,
)
from hbone.identity import SpiffeId, SpiffeIdError, svidFromCertificate

TD = "hbone.test"
WEB = f"spiffe://{TD}/ns/default/sa/web"
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _extension(cert: x509.Certificate, kind: type) -> object:
    return cert.extensions.get_extension_for_class(kind).value


@pytest.fixture
def looseUmask() -> Iterator[None]:
    """
    Run with umask 0, so file modes come from the code, not from the environment.
    """
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# makeCA, makeLeaf, makeIntermediate


def test_makeCA() -> None:
    """
    The root is a self-signed P-256 CA with the SPIFFE CA URI SAN and dev subject.
    """
    cert, key = makeCA(TD, days=10, now=NOW)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "hbone dev CA"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == TD
    assert _extension(cert, x509.BasicConstraints).ca is True
    usage = _extension(cert, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    san = _extension(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    assert cert.not_valid_after_utc == NOW + timedelta(days=10)
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    cert.verify_directly_issued_by(cert)


@pytest.mark.parametrize("bad", ["TD", "", "a b", "hbone.test/x", "spiffe://hbone.test", "td:80"])
def test_makeCABadTrustDomain(bad: str) -> None:
    """
    A trust domain that breaks the SPIFFE rules is refused.
    """
    with pytest.raises(SpiffeIdError):
        makeCA(bad)


def test_makeLeafDefaults() -> None:
    """
    A default leaf is a valid X509-SVID: EKU serverAuth+clientAuth, signed by the CA,
    valid from 5 minutes before `now` for `days`.
    """
    caCert, caKey = makeCA(TD, now=NOW)
    cert, key = makeLeaf(caCert, caKey, uris=[WEB], dns=["localhost"], ips=["127.0.0.1", "::1"], days=3, now=NOW)
    cert.verify_directly_issued_by(caCert)
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=3)
    assert list(_extension(cert, x509.ExtendedKeyUsage)) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    san = _extension(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert svidFromCertificate(cert, NOW) == SpiffeId.parse(WEB)


def test_makeLeafValidityWindow() -> None:
    """
    A notAfter in the past moves the default notBefore before it; a notBefore in
    the future moves the default notAfter after it.
    """
    caCert, caKey = makeCA(TD, now=NOW)
    expired, _ = makeLeaf(caCert, caKey, uris=[WEB], days=2, notAfter=NOW - timedelta(days=1), now=NOW)
    assert expired.not_valid_before_utc == NOW - timedelta(days=3)
    future, _ = makeLeaf(caCert, caKey, uris=[WEB], days=2, notBefore=NOW + timedelta(days=1), now=NOW)
    assert future.not_valid_after_utc == NOW + timedelta(days=3)


def test_makeLeafReusesKey() -> None:
    """
    A given key is used instead of a new one.
    """
    caCert, caKey = makeCA(TD, now=NOW)
    first, key = makeLeaf(caCert, caKey, uris=[WEB])
    second, sameKey = makeLeaf(caCert, caKey, uris=[WEB], key=key)
    assert sameKey is key and second.public_key() == first.public_key()


def test_makeLeafBadFlags() -> None:
    """
    The flags for S23's bad certificates set exactly what they say.
    """
    caCert, caKey = makeCA(TD, now=NOW)
    cert, _ = makeLeaf(caCert, caKey, uris=[WEB, WEB], isCA=True, keyCertSign=True, cRLSign=True, digitalSignature=False)
    assert _extension(cert, x509.BasicConstraints).ca is True
    usage = _extension(cert, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert len(_extension(cert, x509.SubjectAlternativeName)) == 2
    bare, _ = makeLeaf(caCert, caKey, keyUsage=False, basicConstraints=False)
    kinds = {type(e.value) for e in bare.extensions}
    assert x509.KeyUsage not in kinds and x509.BasicConstraints not in kinds
    assert x509.SubjectAlternativeName not in kinds


def test_pemHelpers() -> None:
    """
    certificatePEM concatenates in order; privateKeyPEM is unencrypted PKCS#8.
    """
    caCert, caKey = makeCA(TD, now=NOW)
    leaf, leafKey = makeLeaf(caCert, caKey, uris=[WEB])
    assert x509.load_pem_x509_certificates(certificatePEM(leaf, caCert)) == [leaf, caCert]
    pem = privateKeyPEM(leafKey)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert loaded.public_key() == leafKey.public_key()


def _verifier(root: x509.Certificate, at: datetime = NOW):
    return PolicyBuilder().store(Store([root])).time(at).build_client_verifier()


def test_chainsWithStrictVerifier() -> None:
    """
    Under cryptography's strict RFC 5280 verifier: a direct leaf validates, a leaf
    under an intermediate validates only with the intermediate (S23 "intermediate
    missing"), and a leaf of another CA does not validate (S23 "other CA").
    """
    caCert, caKey = makeCA(TD, now=NOW)
    verifier = _verifier(caCert)
    direct, _ = makeLeaf(caCert, caKey, uris=[WEB], now=NOW)
    assert verifier.verify(direct, []).subjects == [x509.UniformResourceIdentifier(WEB)]

    intermediate, intermediateKey = makeIntermediate(caCert, caKey, TD, now=NOW)
    assert _extension(intermediate, x509.BasicConstraints).path_length == 0
    indirect, _ = makeLeaf(intermediate, intermediateKey, uris=[WEB], now=NOW)
    verifier.verify(indirect, [intermediate])
    with pytest.raises(VerificationError):
        verifier.verify(indirect, [])

    otherCert, otherKey = makeCA("other.test", now=NOW)
    foreign, _ = makeLeaf(otherCert, otherKey, uris=[WEB], now=NOW)
    with pytest.raises(VerificationError):
        verifier.verify(foreign, [])


# initCA


def test_initCA(tmp_path: Path, looseUmask: None) -> None:
    """
    initCA writes the CA certificate (0644) and key (0600), creating the directory.
    """
    directory = initCA(tmp_path / "new" / "ca", TD, days=30)
    assert directory == tmp_path / "new" / "ca"
    assert sorted(p.name for p in directory.iterdir()) == ["ca-cert.pem", "ca-key.pem"]
    assert _mode(directory / "ca-key.pem") == 0o600
    assert _mode(directory / "ca-cert.pem") == 0o644
    assert _mode(directory) == 0o700
    cert = _cert(directory / "ca-cert.pem")
    key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_after_utc - datetime.now(timezone.utc) < timedelta(days=30, minutes=1)
    assert _extension(cert, x509.SubjectAlternativeName).get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [f"spiffe://{TD}"]


def test_initCARefusesToOverwrite(tmp_path: Path) -> None:
    """
    An existing CA is kept unless force is given; then it is replaced.
    """
    initCA(tmp_path, TD)
    before = (tmp_path / "ca-cert.pem").read_bytes(), (tmp_path / "ca-key.pem").read_bytes()
    with pytest.raises(CAError, match="already exists; refusing to replace the CA"):
        initCA(tmp_path, TD)
    assert ((tmp_path / "ca-cert.pem").read_bytes(), (tmp_path / "ca-key.pem").read_bytes()) == before
    initCA(tmp_path, TD, force=True)
    assert (tmp_path / "ca-cert.pem").read_bytes() != before[0]
    assert (tmp_path / "ca-key.pem").read_bytes() != before[1]


def test_initCARefusesWhenOnlyKeyExists(tmp_path: Path) -> None:
    """
    Even a lone key file is not overwritten without force.
    """
    (tmp_path / "ca-key.pem").write_bytes(b"precious")
    with pytest.raises(CAError, match="ca-key.pem already exists"):
        initCA(tmp_path, TD)
    assert (tmp_path / "ca-key.pem").read_bytes() == b"precious"


def test_initCABadArguments(tmp_path: Path) -> None:
    """
    A bad trust domain or day count writes nothing.
    """
    with pytest.raises(SpiffeIdError):
        initCA(tmp_path / "a", "Bad.TD")
    with pytest.raises(CAError, match="days must be between"):
        initCA(tmp_path / "b", TD, days=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_initCAForceTightensKeyMode(tmp_path: Path) -> None:
    """
    Replacing a key file that was world-readable leaves it 0600.
    """
    initCA(tmp_path, TD)
    os.chmod(tmp_path / "ca-key.pem", 0o644)
    initCA(tmp_path, TD, force=True)
    assert _mode(tmp_path / "ca-key.pem") == 0o600


# issueSVID


@pytest.fixture
def caDir(tmp_path: Path) -> Path:
    return initCA(tmp_path / "ca", TD)


def test_issueSVID(caDir: Path, tmp_path: Path, looseUmask: None) -> None:
    """
    issueSVID writes Istio's three files; the leaf is an SVID for the ID, from the CA.
    """
    out = issueSVID(caDir, WEB, tmp_path / "web", dns=["localhost"], ips=["127.0.0.1"], days=10)
    assert out == tmp_path / "web"
    assert sorted(p.name for p in out.iterdir()) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
    assert _mode(out / "key.pem") == 0o600
    assert _mode(out / "cert-chain.pem") == 0o644
    assert (out / "root-cert.pem").read_bytes() == (caDir / "ca-cert.pem").read_bytes()
    chain = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())
    assert len(chain) == 1
    leaf = chain[0]
    leaf.verify_directly_issued_by(_cert(caDir / "ca-cert.pem"))
    assert svidFromCertificate(leaf) == SpiffeId.parse(WEB)
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert leaf.public_key() == key.public_key()
    san = _extension(leaf, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert leaf.not_valid_after_utc - datetime.now(timezone.utc) < timedelta(days=10, minutes=1)
    verified = _verifier(_cert(caDir / "ca-cert.pem"), datetime.now(timezone.utc)).verify(leaf, [])
    assert x509.UniformResourceIdentifier(WEB) in verified.subjects


def test_issueSVIDWrongTrustDomain(caDir: Path, tmp_path: Path) -> None:
    """
    The CA issues only IDs of its own trust domain.
    """
    with pytest.raises(CAError, match="not in the CA's trust domain 'hbone.test'"):
        issueSVID(caDir, "spiffe://other.test/ns/a/sa/b", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "reason"),
    [
        ({"spiffeId": "spiffe://hbone.test/x/"}, SpiffeIdError, "must not end with '/'"),
        ({"spiffeId": "spiffe://HBONE.test/x"}, SpiffeIdError, "lowercase"),
        ({"dns": ["bad name"]}, CAError, "'bad name' is not a DNS name"),
        ({"dns": ["-x.example"]}, CAError, "is not a DNS name"),
        ({"ips": ["1.2.3"]}, CAError, "'1.2.3' is not an IP address"),
        ({"days": 0}, CAError, "days must be between"),
    ],
)
def test_issueSVIDBadArguments(caDir: Path, tmp_path: Path, kwargs: dict, error: type, reason: str) -> None:
    """
    Bad IDs, SANs and day counts are refused before anything is written.
    """
    arguments = {"spiffeId": WEB, **kwargs}
    with pytest.raises(error, match=reason):
        issueSVID(caDir, outDirectory=tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_issueSVIDWildcardDNS(caDir: Path, tmp_path: Path) -> None:
    """
    A wildcard DNS name is a legitimate SAN.
    """
    out = issueSVID(caDir, WEB, tmp_path / "out", dns=["*.example.com"])
    leaf = _cert(out / "cert-chain.pem")
    assert _extension(leaf, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == ["*.example.com"]


def test_issueSVIDMissingCA(tmp_path: Path) -> None:
    """
    A missing CA is reported with the command that creates one.
    """
    with pytest.raises(CAError, match="hbone certs init"):
        issueSVID(tmp_path / "nothing", WEB, tmp_path / "out")


def test_issueSVIDMismatchedCAKey(caDir: Path, tmp_path: Path) -> None:
    """
    A CA key that does not belong to the CA certificate is refused.
    """
    other = initCA(tmp_path / "other", TD)
    shutil.copy(other / "ca-key.pem", caDir / "ca-key.pem")
    with pytest.raises(CAError, match="is not the key of"):
        issueSVID(caDir, WEB, tmp_path / "out")


def test_issueSVIDCappedAtCAExpiry(tmp_path: Path) -> None:
    """
    A leaf never outlives its CA; an expired CA issues nothing.
    """
    caDir = initCA(tmp_path / "ca", TD, days=5, now=NOW)
    out = issueSVID(caDir, WEB, tmp_path / "out", days=90, now=NOW)
    assert _cert(out / "cert-chain.pem").not_valid_after_utc == NOW + timedelta(days=5)
    with pytest.raises(CAError, match="expired at .*--force"):
        issueSVID(caDir, WEB, tmp_path / "late", now=NOW + timedelta(days=6))


# Stock tools


def _openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        if os.environ.get("HBONE_REQUIRE_PEERS") == "1":
            pytest.fail("openssl is not installed and HBONE_REQUIRE_PEERS=1")
        pytest.skip("openssl is not installed: the stock-tool checks of issued SVIDs did not run")
    return path


@pytest.mark.peers
@pytest.mark.parametrize("extra", [[], ["-x509_strict", "-purpose", "sslserver"], ["-x509_strict", "-purpose", "sslclient"]])
def test_opensslVerifiesIssuedSVID(caDir: Path, tmp_path: Path, extra: list[str]) -> None:
    """
    `openssl verify -CAfile root-cert.pem cert-chain.pem` accepts an issued SVID,
    also in strict mode and for both TLS roles; it refuses one from another CA.
    """
    openssl = _openssl()
    out = issueSVID(caDir, WEB, tmp_path / "web")
    result = subprocess.run(
        [openssl, "verify", *extra, "-CAfile", str(out / "root-cert.pem"), str(out / "cert-chain.pem")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{out / 'cert-chain.pem'}: OK"

    other = initCA(tmp_path / "other", TD)
    refused = subprocess.run(
        [openssl, "verify", *extra, "-CAfile", str(other / "ca-cert.pem"), str(out / "cert-chain.pem")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0
    assert ": OK" not in refused.stdout


@pytest.mark.peers
def test_opensslIntermediateChain(tmp_path: Path) -> None:
    """
    With stock openssl, a leaf under an intermediate verifies only when the
    intermediate is supplied (S23 "intermediate missing").
    """
    openssl = _openssl()
    caCert, caKey = makeCA(TD)
    intermediate, intermediateKey = makeIntermediate(caCert, caKey, TD)
    leaf, _ = makeLeaf(intermediate, intermediateKey, uris=[WEB])
    (tmp_path / "root.pem").write_bytes(certificatePEM(caCert))
    (tmp_path / "intermediate.pem").write_bytes(certificatePEM(intermediate))
    (tmp_path / "leaf.pem").write_bytes(certificatePEM(leaf))
    base = [openssl, "verify", "-x509_strict", "-CAfile", str(tmp_path / "root.pem")]
    good = subprocess.run(
        [*base, "-untrusted", str(tmp_path / "intermediate.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert good.returncode == 0 and good.stdout.strip().endswith(": OK"), good.stderr
    missing = subprocess.run([*base, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0
    assert "unable to get local issuer certificate" in missing.stdout + missing.stderr


@pytest.mark.peers
def test_opensslShowsURISAN(caDir: Path, tmp_path: Path) -> None:
    """
    `openssl x509 -noout -ext subjectAltName` shows the SPIFFE URI SAN of the leaf.
    """
    openssl = _openssl()
    out = issueSVID(caDir, WEB, tmp_path / "web", dns=["localhost"], ips=["127.0.0.1"])
    result = subprocess.run(
        [openssl, "x509", "-noout", "-ext", "subjectAltName", "-in", str(out / "cert-chain.pem")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    names = [name.strip() for name in result.stdout.splitlines()[-1].split(",")]
    assert names == [f"URI:{WEB}", "DNS:localhost", "IP Address:127.0.0.1"]


@pytest.mark.peers
def test_opensslReadsKey(caDir: Path, tmp_path: Path) -> None:
    """
    The key file is a PKCS#8 EC key that openssl reads without a passphrase.
    """
    openssl = _openssl()
    out = issueSVID(caDir, WEB, tmp_path / "web")
    result = subprocess.run(
        [openssl, "pkey", "-in", str(out / "key.pem"), "-noout", "-text_pub", "-passin", "pass:"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "prime256v1" in result.stdout or "P-256" in result.stdout


# ensureDevIdentity

IDS = {
    "client": f"spiffe://{TD}/ns/default/sa/client",
    "server": f"spiffe://{TD}/ns/default/sa/server",
}


def _snapshot(state: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(state)): p.read_bytes()
        for p in sorted(state.rglob("*.pem"))
    }


def test_ensureDevIdentityFirstRun(tmp_path: Path) -> None:
    """
    The first run creates the CA and one Istio directory per name, with the SPIFFE
    ID and the localhost SANs.
    """
    state = tmp_path / "state"
    result = ensureDevIdentity(state, TD, IDS)
    assert result == {"client": state / "client", "server": state / "server"}
    root = _cert(state / "ca" / "ca-cert.pem")
    for name, spiffeId in IDS.items():
        leaf = _cert(state / name / "cert-chain.pem")
        assert svidFromCertificate(leaf) == SpiffeId.parse(spiffeId)
        leaf.verify_directly_issued_by(root)
        san = _extension(leaf, x509.SubjectAlternativeName)
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert _mode(state / name / "key.pem") == 0o600
        assert _cert(state / name / "root-cert.pem") == root
    assert _mode(state / "ca" / "ca-key.pem") == 0o600


def test_ensureDevIdentityIsStable(tmp_path: Path) -> None:
    """
    A second run with nothing to renew changes no file.
    """
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    before = _snapshot(tmp_path)
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW + timedelta(days=30))
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["delete cert", "delete key", "corrupt key", "other key", "delete root"])
def test_ensureDevIdentityRepairsLeaf(tmp_path: Path, damage: str) -> None:
    """
    A missing or unreadable leaf file, or a key of another certificate, re-mints
    that leaf only; the CA and the other leaf are kept.
    """
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    before = _snapshot(tmp_path)
    client = tmp_path / "client"
    if damage == "delete cert":
        (client / "cert-chain.pem").unlink()
    elif damage == "delete key":
        (client / "key.pem").unlink()
    elif damage == "corrupt key":
        (client / "key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    elif damage == "other key":
        shutil.copy(tmp_path / "server" / "key.pem", client / "key.pem")
    else:
        (client / "root-cert.pem").unlink()
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    after = _snapshot(tmp_path)
    assert after["client/cert-chain.pem"] != before["client/cert-chain.pem"]
    assert {k: v for k, v in after.items() if not k.startswith("client/")} == {
        k: v for k, v in before.items() if not k.startswith("client/")
    }
    leaf = _cert(client / "cert-chain.pem")
    key = serialization.load_pem_private_key((client / "key.pem").read_bytes(), None)
    assert leaf.public_key() == key.public_key()


def test_ensureDevIdentityChangedId(tmp_path: Path) -> None:
    """
    A leaf for another ID than the one asked for is re-minted.
    """
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    before = _snapshot(tmp_path)
    changed = {**IDS, "client": f"spiffe://{TD}/ns/other/sa/client"}
    ensureDevIdentity(tmp_path, TD, changed, now=NOW)
    assert svidFromCertificate(_cert(tmp_path / "client" / "cert-chain.pem"), NOW) == SpiffeId.parse(changed["client"])
    assert _snapshot(tmp_path)["server/cert-chain.pem"] == before["server/cert-chain.pem"]


def test_ensureDevIdentityRenewsExpiringLeaf(tmp_path: Path) -> None:
    """
    A leaf that expires within renewWithin is re-minted; the CA is kept.
    """
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    before = _snapshot(tmp_path)
    later = NOW + timedelta(days=84)  # the 90-day leaves have 6 days left
    ensureDevIdentity(tmp_path, TD, IDS, now=later)
    after = _snapshot(tmp_path)
    assert after["ca/ca-cert.pem"] == before["ca/ca-cert.pem"]
    for name in IDS:
        assert after[f"{name}/cert-chain.pem"] != before[f"{name}/cert-chain.pem"]
        assert _cert(tmp_path / name / "cert-chain.pem").not_valid_after_utc == later + timedelta(days=90)
    # With a shorter renewal window the same leaves would have been kept.
    ensureDevIdentity(tmp_path / "b", TD, IDS, now=NOW)
    kept = _snapshot(tmp_path / "b")
    ensureDevIdentity(tmp_path / "b", TD, IDS, renewWithin=timedelta(days=5), now=later)
    assert _snapshot(tmp_path / "b") == kept


def test_ensureDevIdentityRenewsExpiredLeaf(tmp_path: Path) -> None:
    """
    An already expired leaf is replaced by a valid one.
    """
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    later = NOW + timedelta(days=200)
    ensureDevIdentity(tmp_path, TD, IDS, now=later)
    for name, spiffeId in IDS.items():
        assert svidFromCertificate(_cert(tmp_path / name / "cert-chain.pem"), later) == SpiffeId.parse(spiffeId)


def test_ensureDevIdentityRenewsExpiringCA(tmp_path: Path) -> None:
    """
    A CA that expires within renewWithin is replaced, and every leaf with it.
    """
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    before = _snapshot(tmp_path)
    later = NOW + timedelta(days=3650 - 3)
    ensureDevIdentity(tmp_path, TD, IDS, now=later)
    after = _snapshot(tmp_path)
    assert after["ca/ca-cert.pem"] != before["ca/ca-cert.pem"]
    root = _cert(tmp_path / "ca" / "ca-cert.pem")
    assert root.not_valid_after_utc == later + timedelta(days=3650)
    for name in IDS:
        assert after[f"{name}/cert-chain.pem"] != before[f"{name}/cert-chain.pem"]
        assert _cert(tmp_path / name / "root-cert.pem") == root
        _cert(tmp_path / name / "cert-chain.pem").verify_directly_issued_by(root)


def test_ensureDevIdentityReMintsAllLeavesWithNewCA(tmp_path: Path) -> None:
    """
    Leaves that are otherwise fine are re-minted when the CA is replaced (here, for a
    new trust domain), so they always chain to the current root.
    """
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    before = _snapshot(tmp_path)
    moved = {name: value.replace(TD, "moved.test") for name, value in IDS.items()}
    ensureDevIdentity(tmp_path, "moved.test", moved, now=NOW)
    after = _snapshot(tmp_path)
    assert all(after[key] != before[key] for key in before if key.endswith("cert-chain.pem"))
    assert _extension(_cert(tmp_path / "ca" / "ca-cert.pem"), x509.SubjectAlternativeName).get_values_for_type(
        x509.UniformResourceIdentifier
    ) == ["spiffe://moved.test"]


def test_ensureDevIdentityReplacesForeignRoot(tmp_path: Path) -> None:
    """
    A leaf directory whose files came from another CA is re-minted.
    """
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    other = initCA(tmp_path / "elsewhere", TD)
    issueSVID(other, IDS["client"], tmp_path / "client")
    ensureDevIdentity(tmp_path, TD, IDS, now=NOW)
    root = _cert(tmp_path / "ca" / "ca-cert.pem")
    _cert(tmp_path / "client" / "cert-chain.pem").verify_directly_issued_by(root)
    assert _cert(tmp_path / "client" / "root-cert.pem") == root


@pytest.mark.parametrize(
    ("trustDomain", "ids", "error", "reason"),
    [
        (TD, {"client": "spiffe://other.test/x"}, CAError, "not in the trust domain"),
        (TD, {"ca": f"spiffe://{TD}/x"}, CAError, "cannot name an identity directory"),
        (TD, {"../x": f"spiffe://{TD}/x"}, CAError, "cannot name an identity directory"),
        (TD, {".hidden": f"spiffe://{TD}/x"}, CAError, "cannot name an identity directory"),
        (TD, {"client": f"spiffe://{TD}/x/"}, SpiffeIdError, "must not end"),
        ("Bad", {}, SpiffeIdError, "lowercase"),
    ],
)
def test_ensureDevIdentityBadArguments(tmp_path: Path, trustDomain: str, ids: dict, error: type, reason: str) -> None:
    """
    Bad names, IDs and trust domains are refused before anything is written.
    """
    with pytest.raises(error, match=reason):
        ensureDevIdentity(tmp_path / "state", trustDomain, ids)
    assert not (tmp_path / "state").exists()


# checkKeyFilePermissions


@pytest.mark.parametrize(
    ("mode", "readers"),
    [(0o600, None), (0o400, None), (0o700, None), (0o620, None), (0o640, "group"), (0o604, "others"), (0o644, "group and others")],
)
def test_checkKeyFilePermissions(tmp_path: Path, mode: int, readers: str | None) -> None:
    """
    A warning names the file, who can read it, its mode and the fix.
    """
    key = tmp_path / "key.pem"
    key.write_bytes(b"secret")
    os.chmod(key, mode)
    warning = checkKeyFilePermissions(key)
    if readers is None:
        assert warning is None
    else:
        assert warning is not None
        assert f"{key} is readable by {readers} (mode {mode:04o})" in warning
        assert f"chmod 600 {key}" in warning
        assert "secret" not in warning


def test_checkKeyFilePermissionsMissing(tmp_path: Path) -> None:
    """
    A missing key file is an OSError, not a silent pass.
    """
    with pytest.raises(OSError):
        checkKeyFilePermissions(tmp_path / "absent.pem")


def test_issuedKeysPassThePermissionCheck(caDir: Path, tmp_path: Path) -> None:
    """
    The keys this module writes never trigger the warning.
    """
    out = issueSVID(caDir, WEB, tmp_path / "web")
    assert checkKeyFilePermissions(out / "key.pem") is None
    assert checkKeyFilePermissions(caDir / "ca-key.pem") is None


# certsMain


def test_certsMainInitAndIssue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    `init` then `issue` succeed, print each file written and leave working files.
    """
    caDir, out = tmp_path / "ca", tmp_path / "web"
    assert certsMain(["init", str(caDir), "--trust-domain", TD, "--days", "30"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    assert f"wrote {caDir / 'ca-cert.pem'}" in printed.out
    assert f"wrote {caDir / 'ca-key.pem'}" in printed.out
    root = _cert(caDir / "ca-cert.pem")
    assert root.not_valid_after_utc - datetime.now(timezone.utc) < timedelta(days=30, minutes=1)

    argv = ["issue", str(caDir), "--spiffe", WEB, "--out", str(out), "--dns", "localhost", "--dns", "web.local"]
    assert certsMain([*argv, "--ip", "127.0.0.1", "--ip", "::1", "--days", "7"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        assert f"wrote {out / name}" in printed.out
    assert WEB in printed.out
    leaf = _cert(out / "cert-chain.pem")
    san = _extension(leaf, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "web.local"]
    assert len(san.get_values_for_type(x509.IPAddress)) == 2
    assert leaf.not_valid_after_utc - datetime.now(timezone.utc) < timedelta(days=7, minutes=1)


def test_certsMainIssueDefaultDays(caDir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    Without --days an SVID is valid for 90 days.
    """
    assert certsMain(["issue", str(caDir), "--spiffe", WEB, "--out", str(tmp_path / "w")]) == 0
    leaf = _cert(tmp_path / "w" / "cert-chain.pem")
    length = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(days=90) <= length <= timedelta(days=90, minutes=6)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    printed = capsys.readouterr()
    assert printed.out == ""
    lines = printed.err.splitlines()
    assert len(lines) == 1, printed.err
    assert lines[0].startswith("hbone certs: error: ")
    assert "Traceback" not in printed.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        ([], "required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["init"], "init: the following arguments are required: DIR, --trust-domain"),
        (["init", "{tmp}/x"], "required: --trust-domain"),
        (["init", "{tmp}/x", "--trust-domain", "Bad"], "the trust domain must be lowercase"),
        (["init", "{tmp}/x", "--trust-domain", "spiffe://hbone.test"], "give the bare name"),
        (["init", "{tmp}/x", "--trust-domain", TD, "--days", "0"], "--days: 0 is out of range"),
        (["init", "{tmp}/x", "--trust-domain", TD, "--days", "ten"], "'ten' is not a whole number"),
        (["init", "{tmp}/x", "--trust-domain", TD, "--nope"], "unrecognized arguments: --nope"),
        (["init", "{ca}", "--trust-domain", TD], "already exists; refusing to replace the CA (use --force"),
        (["issue", "{ca}"], "required: --spiffe, --out"),
        (["issue", "{ca}", "--spiffe", "spiffe://hbone.test/x/", "--out", "{tmp}/o"], "must not end with '/'"),
        (["issue", "{ca}", "--spiffe", "spiffe://other.test/x", "--out", "{tmp}/o"], "not in the CA's trust domain"),
        (["issue", "{tmp}/none", "--spiffe", WEB, "--out", "{tmp}/o"], "does not exist; create one with: hbone certs init"),
        (["issue", "{ca}", "--spiffe", WEB, "--out", "{tmp}/o", "--ip", "999.1.1.1"], "is not an IP address"),
        (["issue", "{ca}", "--spiffe", WEB, "--out", "{tmp}/o", "--dns", "a b"], "is not a DNS name"),
        (["issue", "{ca}", "--spiffe", WEB, "--out", "{ca}/ca-cert.pem"], "is not a directory"),
    ],
)
def test_certsMainErrors(caDir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], reason: str) -> None:
    """
    Every mistake is one line "hbone certs: error: ..." on stderr and status 2.
    """
    argv = [a.format(tmp=tmp_path, ca=caDir) for a in argv]
    assert certsMain(argv) == 2
    assert reason in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_certsMainUnwritableDirectory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    An OS error (here: a directory we may not write) is one line too, naming the path.
    """
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "ca"  # a path under a regular file: fails even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "ca"
    assert certsMain(["init", str(target), "--trust-domain", TD]) == 2
    line = _error(capsys)
    assert str(target.parent) in line


def test_certsMainForce(caDir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    --force replaces an existing CA.
    """
    before = (caDir / "ca-cert.pem").read_bytes()
    assert certsMain(["init", str(caDir), "--trust-domain", TD, "--force"]) == 0
    assert (caDir / "ca-cert.pem").read_bytes() != before


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], ["usage: hbone certs", "init", "issue", "example:", "hbone certs init ./ca --trust-domain"]),
        (
            ["init", "--help"],
            ["usage: hbone certs init", "--trust-domain TD", "--days N", "--force", "DIR", "example:", "--days 365"],
        ),
        (
            ["issue", "-h"],
            ["usage: hbone certs issue", "CADIR", "--spiffe ID", "--out DIR", "--dns NAME", "--ip ADDR", "--days N",
             "default 90", "example:", "--dns localhost --ip 127.0.0.1"],
        ),
    ],
)
def test_certsMainHelp(capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[str]) -> None:
    """
    --help exits 0 and explains each option, with an example.
    """
    assert certsMain(argv) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    for text in expected:
        assert text in printed.out


def test_certsMainHelpHasExamplePerOption(capsys: pytest.CaptureFixture[str]) -> None:
    """
    Every option's help line carries an "e.g." example.
    """
    for command in ("init", "issue"):
        certsMain([command, "--help"])
        text = capsys.readouterr().out
        options = text.split("options:")[1].split("example:")[0]
        entries = [e for e in options.split("\n  -") if e.strip() and not e.lstrip().startswith("h, --help")]
        positional = text.split("positional arguments:")[1].split("options:")[0]
        for entry in [*entries, positional]:
            assert "e.g." in entry, entry
