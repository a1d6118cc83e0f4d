"""Mutual TLS for HBONE: pyOpenSSL contexts with per-connection SPIFFE verification.

``service_identity`` checks DNS names and cannot check SPIFFE IDs, so peer
verification is our own: OpenSSL validates the chain against the trust bundles, and
the verify callback, at the leaf, applies the X509-SVID rules (PROTOCOL §2) through
:func:`hbone.identity.svidFromCertificate`, checks that the trust domain of the SAN is
the one whose bundle anchored the chain, and (clients) that the ID is one the hop
expects. A refusal fails the handshake with an alert; the reason is kept on the
connection's :class:`VerifyState` so the log can name the certificate and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from hbone.identity import (
    IdentityPattern,
    SpiffeId,
    SvidError,
    describeCertificate,
    svidFromCertificate,
)

__all__ = [
    "ALPN_H2",
    "ALPN_H2R",
    "Identity",
    "IdentityConfigError",
    "ServerAuthClientCreator",
    "ServerName",
    "VerifyState",
    "serverAuthClientContext",
    "verifyStateOf",
]

ALPN_H2 = b"h2"
ALPN_H2R = b"h2r"

#: The only TLS 1.3 suites ztunnel offers (PROTOCOL §2).
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"

#: Istio's file names inside a ``--certs`` directory.
CERT_CHAIN = "cert-chain.pem"
KEY = "key.pem"
ROOT_CERT = "root-cert.pem"


class IdentityConfigError(Exception):
    """Certificates or keys that cannot be used; the message names the file and the fix."""


def _verifyErrorText(errno: int) -> str:
    try:
        from OpenSSL._util import ffi, lib  # private, but only for a message

        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")
    except Exception:  # pragma: no cover - message only
        return f"X509 verify error {errno}"


@dataclass
class VerifyState:
    """What the verify callback learned about one TLS connection's peer."""

    peerId: SpiffeId | None = None
    reason: str | None = None
    certificate: str | None = None
    anchorDomains: frozenset[str] = frozenset()
    chainDepth: int = -1
    role: str = ""
    #: server-auth (non-SPIFFE) connections: the DNS name or IP the server must match
    expectedName: str | None = None


def _chainChecked(state: "VerifyState", cert, errno: int, depth: int, ok: int):
    """The shared part of both verify callbacks: record OpenSSL's chain verdict.

    Returns the leaf (a cryptography certificate) when it is the leaf's turn and the
    chain is valid; None otherwise (the caller answers ``ok and depth != 0``)."""
    if not ok:
        if state.reason is None:
            state.reason = _verifyErrorText(errno)
            state.certificate = describeCertificate(cert.to_cryptography())
        return None
    if depth != 0:
        return None
    leaf = cert.to_cryptography()
    state.certificate = describeCertificate(leaf)
    return leaf


def verifyStateOf(tlsConnection: SSL.Connection) -> VerifyState | None:
    """The :class:`VerifyState` of a connection made by our creators.

    Twisted's TLS layer sets the connection's app data to its protocol, so the
    state is kept on that protocol; a bare ``SSL.Connection`` keeps it as app data."""
    data = tlsConnection.get_app_data()
    if isinstance(data, VerifyState):
        return data
    state = getattr(data, "hboneVerifyState", None)
    return state if isinstance(state, VerifyState) else None


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def _loadPEMCertificates(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IdentityConfigError(f"cannot read certificate file {path}: {e.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise IdentityConfigError(f"{path} holds no PEM certificate")
    return certs


class Identity:
    """This node's SVID, key and trust bundles; builds TLS connection creators.

    :param chain: leaf first, then any intermediates.
    :param trustBundles: trust domain -> CA certificates. The local trust domain
        (the leaf's) must be present; any other entry is a federated domain.
    """

    log = Logger()

    def __init__(
        self,
        chain: Sequence[x509.Certificate],
        key,
        trustBundles: dict[str, Sequence[x509.Certificate]],
        allowTLS12: bool = False,
        source: str = "<memory>",
    ) -> None:
        if not chain:
            raise IdentityConfigError(f"{source}: no certificate")
        try:
            self.localId = svidFromCertificate(chain[0])
        except SvidError as e:
            raise IdentityConfigError(
                f"{source}: our own certificate is not a usable X509-SVID: {e}"
            ) from None
        if self.localId.trustDomain not in trustBundles:
            raise IdentityConfigError(
                f"{source}: no trust bundle for our own trust domain {self.localId.trustDomain!r}"
            )
        self.chain = list(chain)
        self._key = key
        self.trustBundles = {td: list(certs) for td, certs in trustBundles.items()}
        self.allowTLS12 = allowTLS12
        self.source = source
        self._anchors: dict[bytes, set[str]] = {}
        for td, certs in self.trustBundles.items():
            for cert in certs:
                self._anchors.setdefault(_fingerprint(cert), set()).add(td)
        self._contexts: dict[tuple, SSL.Context] = {}
        self.files: tuple | None = None  # (chain, key, roots, federated) when loaded from files
        self.generation = 0  # bumped by rotate(): creators holding a context rebuild it

    @property
    def trustDomain(self) -> str:
        return self.localId.trustDomain

    @property
    def notAfter(self):
        return self.chain[0].not_valid_after_utc

    # -- loading ---------------------------------------------------------

    @classmethod
    def fromFiles(
        cls,
        certChain: str | os.PathLike,
        key: str | os.PathLike,
        roots: str | os.PathLike,
        federated: dict[str, str | os.PathLike] | None = None,
        allowTLS12: bool = False,
    ) -> "Identity":
        certChain, key, roots = Path(certChain), Path(key), Path(roots)
        chain = _loadPEMCertificates(certChain)
        try:
            keyData = key.read_bytes()
        except OSError as e:
            raise IdentityConfigError(f"cannot read private key {key}: {e.strerror}") from None
        try:
            privateKey = serialization.load_pem_private_key(keyData, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityConfigError(f"{key} is not an unencrypted PEM private key: {e}") from None
        try:
            mode = key.stat().st_mode
            if mode & 0o077:
                cls.log.warn(
                    "private key {key} is readable by group or others (mode {mode:o}); chmod 600 it",
                    key=str(key),
                    mode=mode & 0o777,
                )
        except OSError:
            pass
        rootCerts = _loadPEMCertificates(roots)
        try:
            leafId = svidFromCertificate(chain[0])
        except SvidError as e:
            raise IdentityConfigError(f"{certChain}: not a usable X509-SVID: {e}") from None
        bundles: dict[str, list[x509.Certificate]] = {leafId.trustDomain: rootCerts}
        for td, path in (federated or {}).items():
            bundles[td] = _loadPEMCertificates(Path(path))
        leafKey = chain[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ownKey = privateKey.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if leafKey != ownKey:
            raise IdentityConfigError(f"{key} does not match the certificate in {certChain}")
        identity = cls(chain, privateKey, bundles, allowTLS12=allowTLS12, source=str(certChain))
        identity.files = (certChain, key, roots, dict(federated or {}))
        return identity

    def reloaded(self) -> "Identity":
        """A new Identity from the same files (for rotation); this one is unchanged.

        :raises IdentityConfigError: the files do not load, or hold another SPIFFE ID."""
        if self.files is None:
            raise IdentityConfigError(f"{self.source}: not loaded from files; nothing to reload")
        chain, key, roots, federated = self.files
        new = Identity.fromFiles(chain, key, roots, federated, allowTLS12=self.allowTLS12)
        if new.localId != self.localId:
            raise IdentityConfigError(
                f"{chain}: the new certificate is for {new.localId}, not {self.localId}; "
                f"restart to change identity"
            )
        return new

    def rotate(self, new: "Identity") -> None:
        """Use ``new``'s certificate, key and trust bundles for every handshake from
        now on; connections already made keep theirs (PROTOCOL §2)."""
        if new.localId != self.localId:
            raise IdentityConfigError(f"cannot rotate {self.localId} to another identity ({new.localId})")
        self.chain = list(new.chain)
        self._key = new._key
        self.trustBundles = {td: list(certs) for td, certs in new.trustBundles.items()}
        self._anchors = dict(new._anchors)
        self._contexts = {}
        self.generation += 1

    @classmethod
    def fromDirectory(cls, directory: str | os.PathLike, **kw) -> "Identity":
        """Istio's layout: cert-chain.pem, key.pem, root-cert.pem."""
        d = Path(directory)
        if not d.is_dir():
            raise IdentityConfigError(
                f"--certs {d}: not a directory (expected {CERT_CHAIN}, {KEY}, {ROOT_CERT}; "
                f"make one with 'hbone certs issue')"
            )
        return cls.fromFiles(d / CERT_CHAIN, d / KEY, d / ROOT_CERT, **kw)

    # -- contexts ----------------------------------------------------------

    def _baseContext(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION if self.allowTLS12 else SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_tls13_ciphersuites(TLS13_SUITES)
        if self.allowTLS12:
            ctx.set_cipher_list(b"ECDHE+AESGCM")
        ctx.set_options(
            SSL.OP_NO_TICKET
            | SSL.OP_NO_RENEGOTIATION
            | SSL.OP_NO_COMPRESSION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
        )
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.use_certificate(self.chain[0])
        for extra in self.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(self._key)
        ctx.check_privatekey()
        store = ctx.get_cert_store()
        seen = set()
        for certs in self.trustBundles.values():
            for cert in certs:
                fp = _fingerprint(cert)
                if fp not in seen:
                    seen.add(fp)
                    store.add_cert(crypto.X509.from_cryptography(cert))
        return ctx

    def _verifier(self, expected: tuple[IdentityPattern, ...] | None):
        anchors = self._anchors
        localTD = self.trustDomain
        allowed = set(self.trustBundles)

        def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
            state = verifyStateOf(conn)
            if state is None:  # pragma: no cover - defensive
                return False
            if state.chainDepth < depth:
                state.chainDepth = depth
                state.anchorDomains = frozenset(anchors.get(_fingerprint(cert.to_cryptography()), ()))
            leaf = _chainChecked(state, cert, errno, depth, ok)
            if leaf is None:
                return bool(ok) and depth != 0
            try:
                peer = svidFromCertificate(leaf)
            except SvidError as e:
                state.reason = str(e)
                return False
            if peer.trustDomain not in allowed:
                state.reason = (
                    f"trust domain {peer.trustDomain!r} is neither ours ({localTD!r}) nor federated"
                )
                return False
            if peer.trustDomain not in state.anchorDomains:
                state.reason = (
                    f"{peer} chains to a root of another trust domain "
                    f"({', '.join(sorted(state.anchorDomains)) or 'none'})"
                )
                return False
            if expected is not None:
                if not any(p.matches(peer) for p in expected):
                    state.reason = (
                        f"server identity {peer} is not the expected "
                        f"{' or '.join(str(p) for p in expected)}"
                    )
                    return False
            elif state.role == "client" and peer.trustDomain != localTD:
                state.reason = f"server identity {peer} is not of our trust domain {localTD!r}"
                return False
            state.peerId = peer
            return True

        return verify

    def serverContext(self, alpn: bytes = ALPN_H2) -> SSL.Context:
        key = ("server", alpn)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._baseContext()
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(None))

            def select(conn: SSL.Connection, offered: list[bytes]):
                if alpn in offered:
                    return alpn
                reason = (
                    f"client offered ALPN {b','.join(offered).decode('ascii', 'replace')!r}, "
                    f"this listener speaks only {alpn.decode()!r}"
                )
                state = verifyStateOf(conn)
                if state is not None and state.reason is None:
                    state.reason = reason
                # An exception (not NO_OVERLAPPING_PROTOCOLS, which pyOpenSSL turns
                # into "carry on without ALPN") aborts the handshake with alert 120,
                # no_application_protocol (RFC 7301 §3.2). Twisted unpacks SSL.Error
                # arguments as (lib, func, reason) triples.
                raise SSL.Error([("hbone", "alpn_select", reason)])

            ctx.set_alpn_select_callback(select)
            self._contexts[key] = ctx
        return ctx

    def clientContext(
        self, expected: Iterable[IdentityPattern] | None = None, alpn: bytes = ALPN_H2
    ) -> SSL.Context:
        exp = tuple(expected) if expected is not None else None
        key = ("client", alpn, exp)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._baseContext()
            ctx.set_verify(SSL.VERIFY_PEER, self._verifier(exp))
            ctx.set_alpn_protos([alpn])
            self._contexts[key] = ctx
        return ctx

    def serverCreator(self, alpn: bytes = ALPN_H2) -> "ServerCreator":
        return ServerCreator(self, alpn)

    def clientCreator(
        self, expected: Iterable[IdentityPattern] | None = None, alpn: bytes = ALPN_H2
    ) -> "ClientCreator":
        return ClientCreator(self, tuple(expected) if expected is not None else None, alpn)


@implementer(IOpenSSLServerConnectionCreator)
class ServerCreator:
    def __init__(self, identity: Identity, alpn: bytes) -> None:
        self.identity = identity
        self.alpn = alpn

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.identity.serverContext(self.alpn), None)
        state = VerifyState(role="server")
        conn.set_app_data(state)
        if tlsProtocol is not None:
            tlsProtocol.hboneVerifyState = state
        conn.set_accept_state()
        return conn


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    def __init__(self, identity: Identity, expected, alpn: bytes) -> None:
        self.identity = identity
        self.expected = expected
        self.alpn = alpn

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.identity.clientContext(self.expected, self.alpn), None)
        state = VerifyState(role="client")
        conn.set_app_data(state)
        if tlsProtocol is not None:
            tlsProtocol.hboneVerifyState = state
        conn.set_connect_state()
        # No SNI toward mesh peers (PROTOCOL §2).
        return conn


def negotiatedProtocol(tlsTransport) -> bytes | None:
    try:
        return tlsTransport.getHandle().get_alpn_proto_negotiated() or None
    except Exception:
        return None


# -- server-auth TLS toward non-mesh peers (PROTOCOL §2, §10) ----------------------


def _isIPAddress(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ServerName:
    """The verified name of a server-auth TLS peer (a load balancer, nghttpx, gost):
    a DNS name or IP address its certificate matched, not a SPIFFE identity. It
    takes the place of the peer SPIFFE ID on such connections."""

    name: str

    def __str__(self) -> str:
        return f"{'ip' if _isIPAddress(self.name) else 'dns'}:{self.name}"


def _serverAuthVerify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import (
        verify_certificate_hostname,
        verify_certificate_ip_address,
    )

    state = verifyStateOf(conn)
    if state is None or state.expectedName is None:  # pragma: no cover - defensive
        return False
    leaf = _chainChecked(state, cert, errno, depth, ok)
    if leaf is None:
        return bool(ok) and depth != 0
    name = state.expectedName
    try:
        if _isIPAddress(name):
            verify_certificate_ip_address(leaf, name)
        else:
            verify_certificate_hostname(leaf, name)
    except (VerificationError, CertificateError) as e:
        state.reason = f"the server certificate is not valid for {name}: {e}"
        return False
    state.peerId = ServerName(name)
    return True


def serverAuthClientContext(caFile: str | os.PathLike | None = None, identity: "Identity | None" = None,
                            alpn: bytes = ALPN_H2, allowTLS12: bool = False) -> SSL.Context:
    """A client context for ordinary server-auth TLS (``tls=server`` and ``http2://``
    hops): the chain must validate against ``caFile`` (PEM) or, without one, the
    system's trust store; the name check is per connection
    (:class:`ServerAuthClientCreator`). With ``identity``, its SVID is presented
    when the server asks for a client certificate (TLS 1.3 sends it encrypted, and
    only on request). TLS 1.3 only unless ``allowTLS12``; no session resumption."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION if allowTLS12 else SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    if allowTLS12:
        ctx.set_cipher_list(b"ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if caFile is not None:
        path = Path(caFile)
        certs = _loadPEMCertificates(path)  # a clear error for a missing or empty file
        store = ctx.get_cert_store()
        for cert in certs:
            store.add_cert(crypto.X509.from_cryptography(cert))
    else:
        ctx.set_default_verify_paths()
    if identity is not None:
        ctx.use_certificate(identity.chain[0])
        for extra in identity.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(identity._key)
        ctx.check_privatekey()
    ctx.set_verify(SSL.VERIFY_PEER, _serverAuthVerify)
    ctx.set_alpn_protos([alpn])
    return ctx


@implementer(IOpenSSLClientConnectionCreator)
class ServerAuthClientCreator:
    """Server-auth TLS client connections to ``serverName`` (a DNS name, checked
    against the certificate's DNS SANs, or an IP address, checked against its IP
    SANs, by ``service_identity``). A DNS name is sent as SNI; an IP is not (RFC
    6066 §3). No SPIFFE check: this is for load balancers and ``http2://`` proxies,
    and is weaker than a SPIFFE identity (SECURITY §4.2)."""

    def __init__(self, serverName: str, caFile: str | os.PathLike | None = None,
                 identity: "Identity | None" = None, alpn: bytes = ALPN_H2,
                 allowTLS12: bool = False) -> None:
        name = serverName.strip("[]")
        if not name:
            raise IdentityConfigError("server-auth TLS needs a server name")
        self.serverName = name if _isIPAddress(name) else name.lower().rstrip(".")
        self._args = (caFile, identity, alpn, allowTLS12)
        self._generation = identity.generation if identity is not None else 0
        self.context = serverAuthClientContext(caFile, identity, alpn, allowTLS12)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        identity = self._args[1]
        if identity is not None and identity.generation != self._generation:  # rotated
            self._generation = identity.generation
            self.context = serverAuthClientContext(*self._args)
        conn = SSL.Connection(self.context, None)
        state = VerifyState(role="client", expectedName=self.serverName)
        conn.set_app_data(state)
        if tlsProtocol is not None:
            tlsProtocol.hboneVerifyState = state
        if not _isIPAddress(self.serverName):
            conn.set_tlsext_host_name(self.serverName.encode("idna"))
        conn.set_connect_state()
        return conn
