"""A development certificate authority: SPIFFE roots and workload X509-SVIDs.

This backs C{hbone certs init|issue|jwt|jwks} and C{make run}'s self-provisioned identities,
and lets tests mint every certificate of SECURITY.md S23 (expired, not yet valid,
C{cA=true}, two URI SANs, ...). It is not a production CA: keys are written
unencrypted (mode 0600) and nothing is revoked.

Files use Istio's names, so a directory made here works as C{--certs DIR}:
C{cert-chain.pem} (the leaf), C{key.pem} (its PKCS#8 key) and C{root-cert.pem}
(the trust bundle). A CA directory holds C{ca-cert.pem} and C{ca-key.pem}, and C{jwt-key.pem}
(the JWT-SVID signing key) once C{hbone certs jwt} or C{jwks} has run.

All keys are ECDSA P-256; certificates are signed with SHA-256.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hbone.identity import SpiffeId, SpiffeIdError, SvidError, svidFromCertificate

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CERT_CHAIN_FILE",
    "KEY_FILE",
    "ROOT_CERT_FILE",
    "CAError",
    "certificatePEM",
    "certsMain",
    "checkKeyFilePermissions",
    "ensureDevIdentity",
    "initCA",
    "issueSVID",
    "makeCA",
    "makeIntermediate",
    "makeLeaf",
    "privateKeyPEM",
]

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
KEY_FILE = "key.pem"
ROOT_CERT_FILE = "root-cert.pem"

# Certificates may start a little in the past, so that a peer whose clock is a few
# minutes behind still accepts a freshly minted one.
CLOCK_SKEW = timedelta(minutes=5)
MAX_DAYS = 36500
MAX_JWT_TTL = 30 * 86400

_DNS_NAME_RE = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
    re.ASCII,
)


class CAError(Exception):
    """
    A development-CA operation that cannot be done; C{str(e)} says what is wrong
    and what to do, in one line.
    """


def _utcNow(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


def _isoTime(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _newKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _signatureHash(key: object) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _authorityKeyIdentifier(caCert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = caCert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(caCert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _checkDays(days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise CAError(f"days must be between 1 and {MAX_DAYS}, not {days}")


def _caName(trustDomain: str, role: str) -> x509.Name:
    commonName = trustDomain if role == "" else f"{trustDomain} {role}"
    if len(commonName) > 64:  # RFC 5280 ub-common-name
        commonName = commonName[:61] + "..."
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hbone dev CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, commonName),
        ]
    )


def _caExtensions(
    builder: x509.CertificateBuilder,
    trustDomain: str,
    key: ec.EllipticCurvePrivateKey,
    pathLength: int | None,
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=pathLength), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trustDomain}")]),
            critical=False,
        )
    )


def _trustDomainOf(trustDomain: str) -> str:
    """
    Validate a bare trust domain (C{"cluster.local"}) with the SPIFFE ID rules.

    @raise SpiffeIdError: naming the rule it breaks.
    """
    if "/" in trustDomain:
        raise SpiffeIdError(
            f"{trustDomain!r} is not a trust domain: give the bare name, e.g. 'cluster.local'"
        )
    return SpiffeId.parse(f"spiffe://{trustDomain}").trustDomain


def makeCA(
    trustDomain: str, days: int = 3650, now: datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """
    Mint a self-signed SPIFFE root for C{trustDomain}.

    The root has C{cA=true}, keyUsage C{keyCertSign} and C{cRLSign}, the URI SAN
    C{spiffe://<trustDomain>} (the SPIFFE convention for CA certificates), and the
    subject C{O=hbone dev CA, CN=<trustDomain>}.

    @param days: validity from C{now} (it starts 5 minutes earlier).
    @param now: the issuing time; defaults to the current time.
    @raise SpiffeIdError: if C{trustDomain} is not a valid trust domain.
    """
    _trustDomainOf(trustDomain)
    moment = _utcNow(now)
    key = _newKey()
    name = _caName(trustDomain, "")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(moment + timedelta(days=days))
    )
    builder = _caExtensions(builder, trustDomain, key, pathLength=None)
    return builder.sign(key, hashes.SHA256()), key


def makeIntermediate(
    caCert: x509.Certificate,
    caKey: ec.EllipticCurvePrivateKey,
    trustDomain: str,
    days: int = 365,
    now: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """
    Mint an intermediate CA under C{caCert} (path length 0: it signs leaves only).

    Tests use it for "intermediate missing": a leaf signed by the intermediate,
    presented without it, must not validate against the root.
    """
    _trustDomainOf(trustDomain)
    moment = _utcNow(now)
    key = _newKey()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_caName(trustDomain, "intermediate"))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(moment + timedelta(days=days))
        .add_extension(_authorityKeyIdentifier(caCert), critical=False)
    )
    builder = _caExtensions(builder, trustDomain, key, pathLength=0)
    return builder.sign(caKey, _signatureHash(caKey)), key


def makeLeaf(
    caCert: x509.Certificate,
    caKey: ec.EllipticCurvePrivateKey,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 90,
    notBefore: datetime | None = None,
    notAfter: datetime | None = None,
    isCA: bool = False,
    keyCertSign: bool = False,
    digitalSignature: bool = True,
    key: ec.EllipticCurvePrivateKey | None = None,
    *,
    cRLSign: bool = False,
    keyUsage: bool = True,
    basicConstraints: bool = True,
    now: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """
    Mint a leaf certificate signed by C{caCert}/C{caKey}.

    Nothing here is validated on purpose, so tests can mint the bad certificates of
    SECURITY.md S23; L{issueSVID} is the checked way to make a workload SVID.

    @param uris: URI SANs, written as given (e.g. C{["spiffe://td/ns/a/sa/b"]}).
    @param dns: DNS-name SANs.
    @param ips: IP-address SANs (text, IPv4 or IPv6).
    @param days: validity length used for whichever end is not given.
    @param notBefore: start of validity; defaults to 5 minutes before C{now}, or to
        C{notAfter - days} when an earlier C{notAfter} is given.
    @param notAfter: end of validity; defaults to C{days} after the later of
        C{notBefore} and C{now}.
    @param isCA: basicConstraints C{cA} value.
    @param keyCertSign: set keyUsage C{keyCertSign}.
    @param digitalSignature: set keyUsage C{digitalSignature}.
    @param key: the leaf's key; a new P-256 key by default.
    @param cRLSign: set keyUsage C{cRLSign}.
    @param keyUsage: include the keyUsage extension at all.
    @param basicConstraints: include the basicConstraints extension at all.
    @param now: the issuing time; defaults to the current time.
    @return: the certificate and its private key. Its subject is C{O=hbone dev
        workload}; its extendedKeyUsage is serverAuth and clientAuth.
    """
    moment = _utcNow(now)
    if notAfter is not None:
        notAfter = _utcNow(notAfter)
    if notBefore is not None:
        notBefore = _utcNow(notBefore)
    elif notAfter is not None and notAfter <= moment - CLOCK_SKEW:
        notBefore = notAfter - timedelta(days=days)
    else:
        notBefore = moment - CLOCK_SKEW
    if notAfter is None:
        notAfter = max(notBefore, moment) + timedelta(days=days)
    if key is None:
        key = _newKey()

    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
    names += [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]

    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hbone dev workload")]))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authorityKeyIdentifier(caCert), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if basicConstraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=isCA, path_length=None), critical=True)
    if keyUsage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=digitalSignature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=keyCertSign,
                crl_sign=cRLSign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(caKey, _signatureHash(caKey)), key


def certificatePEM(*certs: x509.Certificate) -> bytes:
    """
    The PEM encoding of C{certs}, concatenated in the order given.
    """
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def privateKeyPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    """
    The unencrypted PKCS#8 PEM encoding of C{key}.
    """
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _writeFile(path: Path, data: bytes, mode: int) -> None:
    """
    Replace C{path} atomically with C{data}, with permission bits C{mode}.

    The data goes to a temporary file in the same directory, created with mode
    0600, so a private key is never readable by others, not even for a moment, and a
    reader never sees half a file.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _makeDirectory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise CAError(f"{directory} exists and is not a directory") from None


def _samePublicKey(cert: x509.Certificate, key: object) -> bool:
    publicBytes = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        return cert.public_key().public_bytes(*publicBytes) == key.public_key().public_bytes(*publicBytes)  # type: ignore[attr-defined]
    except (AttributeError, ValueError, TypeError):
        return False


def _loadCA(caDirectory: str | os.PathLike[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
    """
    Load a CA made by L{initCA}.

    @return: its certificate, key and trust domain.
    @raise CAError: if the files are missing, unreadable, do not match, or the
        certificate does not name a trust domain.
    """
    directory = Path(caDirectory)
    certPath = directory / CA_CERT_FILE
    keyPath = directory / CA_KEY_FILE
    hint = f"create one with: hbone certs init {directory} --trust-domain TD"
    if not certPath.exists():
        raise CAError(f"no CA in {directory}: {certPath} does not exist; {hint}")
    try:
        cert = x509.load_pem_x509_certificate(certPath.read_bytes())
    except OSError as e:
        raise CAError(f"cannot read {certPath}: {e.strerror}") from None
    except ValueError:
        raise CAError(f"{certPath} is not a PEM certificate; {hint}") from None
    try:
        key = serialization.load_pem_private_key(keyPath.read_bytes(), password=None)
    except FileNotFoundError:
        raise CAError(f"{keyPath} does not exist (the CA key belongs next to {certPath.name})") from None
    except OSError as e:
        raise CAError(f"cannot read {keyPath}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise CAError(f"{keyPath} is not an unencrypted PEM private key") from None
    if not _samePublicKey(cert, key):
        raise CAError(f"{keyPath} is not the key of {certPath}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        trustDomain = SpiffeId.parse(uris[0]).trustDomain if len(uris) == 1 else None
    except (x509.ExtensionNotFound, SpiffeIdError, ValueError):
        trustDomain = None
    if trustDomain is None:
        raise CAError(f"{certPath} has no single spiffe://<trust-domain> URI SAN; {hint}")
    return cert, key, trustDomain  # type: ignore[return-value]


def initCA(
    directory: str | os.PathLike[str],
    trustDomain: str,
    days: int = 3650,
    force: bool = False,
    *,
    now: datetime | None = None,
) -> Path:
    """
    Create a development CA in C{directory}: C{ca-cert.pem} and C{ca-key.pem} (0600).

    @param force: replace an existing CA. Every SVID it issued stops validating.
    @param now: the issuing time; defaults to the current time.
    @return: the directory.
    @raise CAError: if a CA already exists there and C{force} is false, or C{days} is
        out of range.
    @raise SpiffeIdError: if C{trustDomain} is not a valid trust domain.
    """
    _checkDays(days)
    _trustDomainOf(trustDomain)
    target = Path(directory)
    existing = [target / name for name in (CA_CERT_FILE, CA_KEY_FILE) if (target / name).exists()]
    if existing and not force:
        raise CAError(
            f"{existing[0]} already exists; refusing to replace the CA "
            "(use --force to replace it: every certificate it issued stops validating)"
        )
    cert, key = makeCA(trustDomain, days=days, now=now)
    _makeDirectory(target)
    _writeFile(target / CA_KEY_FILE, privateKeyPEM(key), 0o600)
    _writeFile(target / CA_CERT_FILE, certificatePEM(cert), 0o644)
    return target


def _checkDNSName(name: str) -> None:
    if len(name) > 253 or _DNS_NAME_RE.fullmatch(name) is None:
        raise CAError(f"{name!r} is not a DNS name (expected e.g. 'localhost' or 'web.example.com')")


def _checkIPAddress(address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise CAError(f"{address!r} is not an IP address (expected e.g. '127.0.0.1' or '::1')") from None


def issueSVID(
    caDirectory: str | os.PathLike[str],
    spiffeId: str,
    outDirectory: str | os.PathLike[str],
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 90,
    *,
    now: datetime | None = None,
) -> Path:
    """
    Issue an X509-SVID for C{spiffeId} from the CA in C{caDirectory}.

    Writes Istio's file names into C{outDirectory}: C{cert-chain.pem} (the leaf),
    C{key.pem} (0600) and C{root-cert.pem} (the CA certificate). The leaf never
    outlives the CA.

    @param dns: extra DNS-name SANs, for non-mesh clients that check names (curl).
    @param ips: extra IP-address SANs.
    @param now: the issuing time; defaults to the current time.
    @return: C{outDirectory}.
    @raise SpiffeIdError: if C{spiffeId} is not a valid SPIFFE ID.
    @raise CAError: if the CA is missing or expired, the ID's trust domain is not the
        CA's, a SAN is malformed, or C{days} is out of range.
    """
    _checkDays(days)
    parsed = SpiffeId.parse(spiffeId)
    for name in dns:
        _checkDNSName(name)
    for address in ips:
        _checkIPAddress(address)
    caCert, caKey, trustDomain = _loadCA(caDirectory)
    if parsed.trustDomain != trustDomain:
        raise CAError(
            f"{parsed} is not in the CA's trust domain {trustDomain!r} "
            f"(the CA in {caDirectory} issues only spiffe://{trustDomain}/... IDs)"
        )
    moment = _utcNow(now)
    caNotAfter = caCert.not_valid_after_utc
    if caNotAfter <= moment:
        raise CAError(
            f"the CA in {caDirectory} expired at {_isoTime(caNotAfter)}; "
            f"make a new one with: hbone certs init {caDirectory} --trust-domain {trustDomain} --force"
        )
    notAfter = min(moment + timedelta(days=days), caNotAfter)
    cert, key = makeLeaf(caCert, caKey, uris=[str(parsed)], dns=dns, ips=ips, notAfter=notAfter, now=moment)
    target = Path(outDirectory)
    _makeDirectory(target)
    _writeFile(target / KEY_FILE, privateKeyPEM(key), 0o600)
    _writeFile(target / CERT_CHAIN_FILE, certificatePEM(cert), 0o644)
    _writeFile(target / ROOT_CERT_FILE, certificatePEM(caCert), 0o644)
    return target


@contextmanager
def _lockedDirectory(directory: Path) -> Iterator[None]:
    """
    Hold an exclusive lock on C{directory/.lock} (where C{fcntl} exists), so two
    processes started together by C{make run} do not mint over each other.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        yield
        return
    with open(directory / ".lock", "a") as lockFile:
        fcntl.flock(lockFile.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lockFile.fileno(), fcntl.LOCK_UN)


def _leafIsCurrent(
    directory: Path,
    expected: SpiffeId,
    caCert: x509.Certificate,
    moment: datetime,
    renewWithin: timedelta,
) -> bool:
    """
    Whether C{directory} holds a usable SVID for C{expected} from C{caCert} that does
    not expire within C{renewWithin} of C{moment}.
    """
    try:
        leaf = x509.load_pem_x509_certificate((directory / CERT_CHAIN_FILE).read_bytes())
        key = serialization.load_pem_private_key((directory / KEY_FILE).read_bytes(), password=None)
        root = x509.load_pem_x509_certificate((directory / ROOT_CERT_FILE).read_bytes())
    except (OSError, ValueError, TypeError):
        return False
    if root != caCert or not _samePublicKey(leaf, key):
        return False
    try:
        leaf.verify_directly_issued_by(caCert)
        if svidFromCertificate(leaf, moment) != expected:
            return False
    except (ValueError, TypeError, InvalidSignature, SvidError):
        return False
    return leaf.not_valid_after_utc - moment >= renewWithin


def ensureDevIdentity(
    stateDirectory: str | os.PathLike[str],
    trustDomain: str,
    spiffeIds: dict[str, str],
    renewWithin: timedelta = timedelta(days=7),
    *,
    now: datetime | None = None,
) -> dict[str, Path]:
    """
    Provision development identities under C{stateDirectory} (for C{make run}).

    Creates C{<state>/ca} on first use and C{<state>/<name>/} with Istio's file names
    for each C{name -> SPIFFE ID}. A leaf is re-minted when it is missing,
    unreadable, for another ID or another CA, or expires within C{renewWithin}; the
    CA and every leaf are re-minted when the CA is missing, unreadable, of another
    trust domain, or expires within C{renewWithin}. Leaves also carry the SANs DNS
    C{localhost} and IP C{127.0.0.1}, so curl can check them.

    @param spiffeIds: directory name -> SPIFFE ID, e.g.
        C{{"client": "spiffe://hbone.test/ns/default/sa/client"}}.
    @param now: the current time; defaults to the real one.
    @return: directory name -> the directory holding that identity's files.
    @raise SpiffeIdError: if an ID is not a valid SPIFFE ID or C{trustDomain} is not
        a valid trust domain.
    @raise CAError: if an ID is outside C{trustDomain} or a name is not a plain
        directory name.
    """
    _trustDomainOf(trustDomain)
    expected: dict[str, SpiffeId] = {}
    for name, value in spiffeIds.items():
        if name in ("", ".", "..", "ca") or "/" in name or os.sep in name or name.startswith("."):
            raise CAError(f"{name!r} cannot name an identity directory (use a plain name such as 'client')")
        spiffeId = SpiffeId.parse(value)
        if spiffeId.trustDomain != trustDomain:
            raise CAError(f"{spiffeId} ({name}) is not in the trust domain {trustDomain!r}")
        expected[name] = spiffeId

    moment = _utcNow(now)
    state = Path(stateDirectory)
    _makeDirectory(state)
    caDirectory = state / "ca"
    with _lockedDirectory(state):
        try:
            caCert, _, caTrustDomain = _loadCA(caDirectory)
            caCurrent = (
                caTrustDomain == trustDomain
                and caCert.not_valid_before_utc <= moment
                and caCert.not_valid_after_utc - moment >= renewWithin
            )
        except CAError:
            caCurrent = False
        if not caCurrent:
            initCA(caDirectory, trustDomain, force=True, now=moment)
            caCert, _, _ = _loadCA(caDirectory)
        result = {}
        for name, spiffeId in expected.items():
            directory = state / name
            if not caCurrent or not _leafIsCurrent(directory, spiffeId, caCert, moment, renewWithin):
                issueSVID(
                    caDirectory,
                    str(spiffeId),
                    directory,
                    dns=["localhost"],
                    ips=["127.0.0.1"],
                    now=moment,
                )
            result[name] = directory
    return result


def checkKeyFilePermissions(path: str | os.PathLike[str]) -> str | None:
    """
    Warn about a private key file that group or others can read (SECURITY.md §4.7).

    @return: the warning text, naming the file, its mode and the fix; C{None} if
        only the owner can read it (or on a platform without POSIX modes).
    @raise OSError: if the file cannot be examined.
    """
    if os.name != "posix":  # pragma: no cover
        return None
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        readers = " and ".join(
            who for who, bit in (("group", stat.S_IRGRP), ("others", stat.S_IROTH)) if mode & bit
        )
        return (
            f"private key file {os.fspath(path)} is readable by {readers} (mode {mode:04o}); "
            f"restrict it with: chmod 600 {os.fspath(path)}"
        )
    return None


# The command line: hbone certs init|issue|jwt|jwks


class _UsageError(Exception):
    """A command-line mistake; reported in one line, exit status 2."""


class _HelpShown(Exception):
    """argparse wanted to exit (after --help); carries the status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _CertsArgumentParser(argparse.ArgumentParser):
    """An argument parser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("hbone certs").strip()
        where = f"{command}: " if command else ""
        helpCommand = f"{self.prog} --help"
        raise _UsageError(f"{where}{message} (see '{helpCommand}')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _HelpShown(status)


def _daysArgument(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"{days} is out of range (1 to {MAX_DAYS} days)")
    return days


def _buildParser() -> _CertsArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _CertsArgumentParser(
        prog="hbone certs",
        description=(
            "A development certificate authority for hbone: a SPIFFE root (init),\n"
            "workload X509-SVIDs (issue) in Istio's file layout, and JWT-SVIDs (jwt)\n"
            "with the JWKS that verifies them (jwks). Not for production: keys are\n"
            "written unencrypted (mode 0600)."
        ),
        epilog=(
            "example:\n"
            "  hbone certs init ./ca --trust-domain cluster.local\n"
            "  hbone certs issue ./ca --spiffe spiffe://cluster.local/ns/default/sa/web --out ./web\n"
            "  hbone --certs ./web -L hbone://:15008\n"
            "  hbone certs jwt ./ca --spiffe spiffe://cluster.local/ns/default/sa/web \\\n"
            "      --audience https://lb.example --out ./web/jwt --jwks ./jwks.json\n"
        ),
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="create a CA: DIR/ca-cert.pem and DIR/ca-key.pem",
        description="Create a self-signed SPIFFE root CA in DIR: ca-cert.pem and ca-key.pem (mode 0600).",
        epilog="example:\n  hbone certs init ./ca --trust-domain cluster.local --days 365\n",
        formatter_class=formatter,
    )
    init.add_argument(
        "directory",
        metavar="DIR",
        help="directory for ca-cert.pem and ca-key.pem, created if missing (e.g. ./ca)",
    )
    init.add_argument(
        "--trust-domain",
        required=True,
        metavar="TD",
        help="SPIFFE trust domain: lowercase a-z 0-9 . - _ (e.g. --trust-domain cluster.local)",
    )
    init.add_argument(
        "--days",
        type=_daysArgument,
        default=3650,
        metavar="N",
        help="validity in days (default 3650; e.g. --days 365)",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA in DIR; everything it issued stops validating (e.g. --force)",
    )

    issue = commands.add_parser(
        "issue",
        help="issue a workload SVID: cert-chain.pem, key.pem, root-cert.pem",
        description=(
            "Issue an X509-SVID from the CA in CADIR, written with Istio's names into\n"
            "the --out directory: cert-chain.pem (leaf), key.pem (mode 0600) and\n"
            "root-cert.pem (the CA certificate). Use that directory as hbone --certs DIR."
        ),
        epilog=(
            "example:\n"
            "  hbone certs issue ./ca --spiffe spiffe://cluster.local/ns/default/sa/web \\\n"
            "      --out ./web --dns localhost --ip 127.0.0.1 --days 30\n"
        ),
        formatter_class=formatter,
    )
    issue.add_argument("ca_directory", metavar="CADIR", help="directory made by 'hbone certs init' (e.g. ./ca)")
    issue.add_argument(
        "--spiffe",
        required=True,
        metavar="ID",
        help="the SPIFFE ID, in the CA's trust domain (e.g. --spiffe spiffe://cluster.local/ns/default/sa/web)",
    )
    issue.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory, created if missing; existing files are replaced (e.g. --out ./web)",
    )
    issue.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="add a DNS-name SAN for clients that check names, such as curl; repeatable (e.g. --dns localhost)",
    )
    issue.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="add an IP-address SAN; repeatable (e.g. --ip 127.0.0.1 --ip ::1)",
    )
    issue.add_argument(
        "--days",
        type=_daysArgument,
        default=90,
        metavar="N",
        help="validity in days, capped at the CA's own expiry (default 90; e.g. --days 30)",
    )
    _addJWTCommands(commands, formatter)
    return parser


def _ttlArgument(text: str) -> int:
    try:
        ttl = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 1 <= ttl <= MAX_JWT_TTL:
        raise argparse.ArgumentTypeError(f"{ttl} is out of range (1 to {MAX_JWT_TTL} seconds)")
    return ttl


def _addJWTCommands(commands, formatter) -> None:
    jwtCommand = commands.add_parser(
        "jwt",
        help="mint a JWT-SVID (bearer token for h2c listeners and tls=server hops)",
        description=(
            "Mint a JWT-SVID for --spiffe with audience --audience, signed by the JWT\n"
            "signing key kept in CADIR (jwt-key.pem, ES256; created on first use), and\n"
            "write it to --out (mode 0600). Clients send it with ?token=@FILE; an h2c\n"
            "listener verifies it against the JWKS that 'hbone certs jwks' writes.\n"
            "The default audience of an h2c listener is https://<:authority host>."
        ),
        epilog=(
            "example:\n"
            "  hbone certs jwt ./ca --spiffe spiffe://cluster.local/ns/default/sa/web \\\n"
            "      --audience https://lb.example --ttl 3600 --out ./web/jwt --jwks ./jwks.json\n"
            "  hbone -L http://:8080 -F 'hbone://lb.example:443?tls=server&token=@./web/jwt'\n"
        ),
        formatter_class=formatter,
    )
    jwtCommand.add_argument("ca_directory", metavar="CADIR", help="directory made by 'hbone certs init' (e.g. ./ca)")
    jwtCommand.add_argument(
        "--spiffe",
        required=True,
        metavar="ID",
        help="the token's sub, in the CA's trust domain (e.g. --spiffe spiffe://cluster.local/ns/default/sa/web)",
    )
    jwtCommand.add_argument(
        "--audience",
        required=True,
        action="append",
        metavar="AUD",
        help="the token's aud; repeatable (e.g. --audience https://lb.example)",
    )
    jwtCommand.add_argument(
        "--ttl",
        type=_ttlArgument,
        default=3600,
        metavar="SECONDS",
        help=f"lifetime in seconds (default 3600, at most {MAX_JWT_TTL}; e.g. --ttl 600)",
    )
    jwtCommand.add_argument(
        "--out", required=True, metavar="FILE", help="token file, replaced if it exists (e.g. --out ./web/jwt)"
    )
    jwtCommand.add_argument(
        "--jwks",
        metavar="FILE",
        help="also write the JWKS that verifies it, as 'hbone certs jwks' does (e.g. --jwks ./jwks.json)",
    )

    jwks = commands.add_parser(
        "jwks",
        help="write the JWKS an h2c listener verifies JWT-SVIDs against",
        description=(
            "Write the public JWT signing key of CADIR (created on first use) as a JWKS\n"
            'per trust domain, {"<trust-domain>": {"keys": [...]}}, for an h2c listener\n'
            "(-L 'h2c://:15009?jwks=FILE&audience=AUD')."
        ),
        epilog=(
            "example:\n"
            "  hbone certs jwks ./ca --out ./jwks.json\n"
            "  hbone -L 'h2c://:15009?jwks=./jwks.json&audience=https://lb.example'\n"
        ),
        formatter_class=formatter,
    )
    jwks.add_argument("ca_directory", metavar="CADIR", help="directory made by 'hbone certs init' (e.g. ./ca)")
    jwks.add_argument(
        "--out", required=True, metavar="FILE", help="JWKS file, replaced if it exists (e.g. --out ./jwks.json)"
    )


def _writeJWKS(caDirectory: str, out: str) -> Path:
    import json

    from hbone.jwt import jwksDocument, loadSigningKey

    key, kid, trustDomain = loadSigningKey(caDirectory)
    path = Path(out)
    document = jwksDocument({trustDomain: [(kid, key.public_key())]})
    _writeFile(path, (json.dumps(document, indent=2) + "\n").encode("ascii"), 0o644)
    print(f"wrote {path} (JWKS of spiffe://{trustDomain}, kid {kid})")
    return path


def _runJWT(options: argparse.Namespace) -> None:
    from hbone.jwt import loadSigningKey, mintJWTSVID

    key, kid, trustDomain = loadSigningKey(options.ca_directory)
    spiffeId = SpiffeId.parse(options.spiffe)
    if spiffeId.trustDomain != trustDomain:
        raise CAError(
            f"--spiffe {options.spiffe}: the CA in {options.ca_directory} signs for "
            f"spiffe://{trustDomain}, not {spiffeId.trustDomain}"
        )
    for audience in options.audience:
        if not audience or any(c.isspace() for c in audience):
            raise CAError(f"--audience {audience!r}: expected a non-empty value without spaces")
    now = datetime.now(timezone.utc)
    token = mintJWTSVID(key, kid, spiffeId, options.audience, options.ttl, now=now.timestamp())
    path = Path(options.out)
    _writeFile(path, token.encode("ascii") + b"\n", 0o600)
    until = _isoTime(now + timedelta(seconds=options.ttl))
    print(f"wrote {path} (JWT-SVID for {spiffeId}, aud {', '.join(options.audience)}, valid until {until}, mode 0600)")
    if options.jwks:
        _writeJWKS(options.ca_directory, options.jwks)


def _runInit(options: argparse.Namespace) -> None:
    directory = initCA(options.directory, options.trust_domain, days=options.days, force=options.force)
    cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
    print(
        f"wrote {directory / CA_CERT_FILE} (CA certificate for spiffe://{options.trust_domain}, "
        f"valid until {_isoTime(cert.not_valid_after_utc)})"
    )
    print(f"wrote {directory / CA_KEY_FILE} (CA private key, mode 0600)")


def _runIssue(options: argparse.Namespace) -> None:
    directory = issueSVID(
        options.ca_directory,
        options.spiffe,
        options.out,
        dns=options.dns,
        ips=options.ip,
        days=options.days,
    )
    cert = x509.load_pem_x509_certificate((directory / CERT_CHAIN_FILE).read_bytes())
    extras = "".join(f", DNS {name}" for name in options.dns) + "".join(f", IP {ip}" for ip in options.ip)
    print(
        f"wrote {directory / CERT_CHAIN_FILE} ({options.spiffe}{extras}, "
        f"valid until {_isoTime(cert.not_valid_after_utc)})"
    )
    print(f"wrote {directory / KEY_FILE} (private key, mode 0600)")
    print(f"wrote {directory / ROOT_CERT_FILE} (CA certificate from {options.ca_directory})")


def certsMain(argv: list[str]) -> int:
    """
    Run C{hbone certs ...} with C{argv} (the arguments after C{certs}).

    @return: the exit status: 0 on success (or after C{--help}), 2 on any error,
        reported as one line C{"hbone certs: error: ..."} on stderr.
    """
    parser = _buildParser()
    try:
        options = parser.parse_args(argv)
        if options.command == "init":
            _runInit(options)
        elif options.command == "jwt":
            _runJWT(options)
        elif options.command == "jwks":
            _writeJWKS(options.ca_directory, options.out)
        else:
            _runIssue(options)
    except _HelpShown as e:
        return e.status
    except (_UsageError, CAError, SpiffeIdError) as e:
        print(f"hbone certs: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"hbone certs: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0
