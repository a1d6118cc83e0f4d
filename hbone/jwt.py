"""Bearer JWT-SVIDs for the load-balancer paths (PROTOCOL §2 "Bearer tokens").

Where a load balancer terminates TLS, the client certificate never reaches hbone;
each request on an ``h2c`` listener carries ``authorization: Bearer <JWT-SVID>``
instead, verified here. JOSE is PyJWT's; this module only decides which key and
which algorithms may be used and applies PROTOCOL §2's acceptance rules:

* ``alg`` is one of RS256/384/512, ES256/384, PS256/384/512 (``none`` and ``HS*``
  are refused before any key is looked at);
* ``sub`` is a SPIFFE ID, and its trust domain has a JWT bundle;
* the header's ``kid`` names a key of *that* trust domain's bundle, of a type that
  fits ``alg``, and the signature verifies with it;
* ``aud`` contains the listener audience (by default ``https://<:authority host>``);
* ``exp`` is in the future, and ``nbf`` (if present) in the past, with 60 s skew,
  on the injected clock.

The JWKS file (``?jwks=FILE``) is JSON in one of two forms:

* **per trust domain**, what ``hbone certs jwks`` writes::

      {"cluster.local": {"keys": [{"kty": "EC", "crv": "P-256", "kid": "...", ...}]},
       "other.example": {"keys": [...]}}

* **a plain JWKS** ``{"keys": [...]}``: the bundle of one trust domain, which must
  then be given to :class:`JWKSVerifier` (``trustDomain=``, normally the node's own).

Keys need a ``kid``; keys whose ``use`` is neither absent, ``sig`` nor ``jwt-svid``
(a SPIFFE bundle's ``x509-svid`` keys), and key types no allowed algorithm can use
(``oct``, ``OKP``, P-521), are skipped. A private key member (``d``) in the file is
an error: the verifier's file is public, and a signing key there is a leak.

Tokens are never logged (SECURITY §4.7): a :class:`TokenError` carries a fixed reason
code and a message that quotes nothing from the token but a validated ``alg``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from pathlib import Path

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.logger import Logger

from hbone.identity import SpiffeId, SpiffeIdError

__all__ = [
    "ALLOWED_ALGORITHMS",
    "CLOCK_SKEW",
    "JWKSError",
    "JWKSVerifier",
    "JWT_KEY_FILE",
    "TokenError",
    "bearerToken",
    "jwksDocument",
    "keyId",
    "loadSigningKey",
    "mintJWTSVID",
    "publicJWK",
    "signingAlgorithm",
]

#: PROTOCOL §2: the only algorithms accepted; ``none`` and ``HS*`` never are.
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512")
#: Seconds of clock skew allowed on ``exp`` and ``nbf``.
CLOCK_SKEW = 60
#: The JWT signing key that ``hbone certs jwt`` keeps in a CA directory.
JWT_KEY_FILE = "jwt-key.pem"
#: A token longer than this is refused unparsed (the header list is 8 KiB anyway).
MAX_TOKEN_BYTES = 8192

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": frozenset({"ES256"}), "P-384": frozenset({"ES384"})}
_TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_KEY_USES = (None, "sig", "jwt-svid")


class TokenError(Exception):
    """A bearer token that is missing or not acceptable (the listener answers 401).

    :ivar code: a fixed reason code, safe as a log key or metric label:
        ``missing``, ``malformed``, ``alg``, ``subject``, ``trust_domain``, ``kid``,
        ``signature``, ``audience``, ``expired``, ``not_yet_valid``.
    :ivar reason: a human message; it never contains the token or any part of it
        other than a validated algorithm name.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class JWKSError(ValueError):
    """A JWKS file that cannot be used; the message names the file and the problem."""


def bearerToken(headers) -> str | bytes | None:
    """The token of the one ``authorization: Bearer <token>`` header in ``headers``
    (bytes pairs, as h2 gives them).

    :raises TokenError: ``missing`` without such a header, ``malformed`` for
        several ``authorization`` headers or another scheme.
    """
    values = [v for n, v in headers if n == b"authorization"]
    if not values:
        raise TokenError("missing", "the request carries no bearer token")
    if len(values) > 1:
        raise TokenError("malformed", "more than one authorization header")
    scheme, _, rest = values[0].partition(b" ")
    if scheme.lower() != b"bearer":
        raise TokenError("malformed", "the authorization scheme is not Bearer")
    token = rest.strip(b" ")
    if not token:
        raise TokenError("missing", "empty bearer token")
    return token


# -- keys --------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def publicJWK(publicKey, kid: str | None = None) -> dict:
    """The public JWK of an EC (P-256/P-384) or RSA key, with ``kid`` (by default the
    RFC 7638 thumbprint), ``use: jwt-svid`` and, for EC keys, its ``alg``."""
    if isinstance(publicKey, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        publicKey = publicKey.public_key()
    if isinstance(publicKey, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(publicKey, as_dict=True)
        alg = signingAlgorithm(publicKey)
    elif isinstance(publicKey, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(publicKey, as_dict=True)
        alg = None  # an RSA key may sign RS* and PS*
    else:
        raise TypeError(f"JWT-SVID keys are EC P-256/P-384 or RSA, not {type(publicKey).__name__}")
    jwk = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    jwk["kid"] = kid or keyId(publicKey)
    jwk["use"] = "jwt-svid"
    if alg is not None:
        jwk["alg"] = alg
    return jwk


def keyId(publicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of a public key: a ``kid``
    that changes exactly when the key does."""
    if isinstance(publicKey, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        publicKey = publicKey.public_key()
    if isinstance(publicKey, ec.EllipticCurvePublicKey):
        full = ECAlgorithm.to_jwk(publicKey, as_dict=True)
        members = {k: full[k] for k in ("crv", "kty", "x", "y")}
    elif isinstance(publicKey, rsa.RSAPublicKey):
        full = RSAAlgorithm.to_jwk(publicKey, as_dict=True)
        members = {k: full[k] for k in ("e", "kty", "n")}
    else:
        raise TypeError(f"JWT-SVID keys are EC P-256/P-384 or RSA, not {type(publicKey).__name__}")
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode("ascii")
    return _b64(hashlib.sha256(canonical).digest())


def signingAlgorithm(key) -> str:
    """The JWS ``alg`` hbone signs with for ``key``: ES256 (P-256), ES384 (P-384) or
    RS256 (RSA)."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        alg = {"secp256r1": "ES256", "secp384r1": "ES384"}.get(key.curve.name)
        if alg is None:
            raise TypeError(f"EC curve {key.curve.name} is not allowed for JWT-SVIDs (P-256 or P-384)")
        return alg
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RS256"
    raise TypeError(f"JWT-SVID keys are EC P-256/P-384 or RSA, not {type(key).__name__}")


def jwksDocument(bundles: dict[str, list]) -> dict:
    """The per-trust-domain JWKS document: ``{td: {"keys": [jwk, ...]}}`` from
    ``{td: [publicKey or (kid, publicKey), ...]}``."""
    out = {}
    for td, keys in bundles.items():
        jwks = []
        for entry in keys:
            kid, key = entry if isinstance(entry, tuple) else (None, entry)
            jwks.append(publicJWK(key, kid))
        out[td] = {"keys": jwks}
    return out


def mintJWTSVID(key, kid: str, spiffeId: SpiffeId | str, audience: str | list[str],
                ttl: float, now: float | None = None) -> str:
    """Sign a JWT-SVID: ``sub`` = ``spiffeId``, ``aud`` = ``audience`` (a string or a
    list), ``iat`` = ``now`` and ``exp`` = ``now + ttl``; header ``kid`` and ``typ:
    JWT``, ``alg`` from the key (:func:`signingAlgorithm`).

    For tests and ``hbone certs jwt``; a production deployment gets its JWT-SVIDs
    from its SPIFFE workload API."""
    sub = str(SpiffeId.parse(str(spiffeId)))
    if not audience:
        raise ValueError("a JWT-SVID needs an audience")
    if isinstance(audience, (list, tuple)):
        aud: str | list[str] = list(audience) if len(audience) > 1 else audience[0]
    else:
        aud = audience
    issued = int(time.time() if now is None else now)
    claims = {"sub": sub, "aud": aud, "iat": issued, "exp": issued + int(ttl)}
    return pyjwt.encode(claims, key, algorithm=signingAlgorithm(key), headers={"kid": kid, "typ": "JWT"})


def loadSigningKey(caDirectory: str | os.PathLike) -> tuple[object, str, str]:
    """The JWT signing key of a CA directory made by ``hbone certs init``:
    ``(private key, kid, trust domain)``. Created on first use (ES256, P-256,
    ``jwt-key.pem``, mode 0600); its ``kid`` is its RFC 7638 thumbprint.

    :raises hbone.ca.CAError: no CA there, or an unusable key file."""
    from hbone.ca import CAError, _loadCA, _lockedDirectory, _writeFile, privateKeyPEM

    directory = Path(caDirectory)
    _, _, trustDomain = _loadCA(directory)
    path = directory / JWT_KEY_FILE
    with _lockedDirectory(directory):
        if not path.exists():
            _writeFile(path, privateKeyPEM(ec.generate_private_key(ec.SECP256R1())), 0o600)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise CAError(f"{path} is not an unencrypted PEM private key (delete it to make a new one)") from None
    try:
        signingAlgorithm(key)
    except TypeError as e:
        raise CAError(f"{path}: {e}") from None
    return key, keyId(key), trustDomain


# -- verification ------------------------------------------------------------------


class _Key:
    __slots__ = ("key", "algs")

    def __init__(self, key, algs: frozenset[str]) -> None:
        self.key = key
        self.algs = algs


def _parseJWK(jwk, where: str) -> tuple[str, _Key] | str:
    """(kid, key) for a usable verification key, or why it is skipped."""
    if not isinstance(jwk, dict):
        raise JWKSError(f"{where}: a key is not a JSON object")
    if "d" in jwk or "p" in jwk or "k" in jwk:
        raise JWKSError(
            f"{where}: key {jwk.get('kid')!r} holds private key material; a JWKS for "
            "verification must hold public keys only (write it with 'hbone certs jwks')"
        )
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        return "a key without a kid"
    if jwk.get("use") not in _KEY_USES:
        return f"key {kid!r}: use {jwk.get('use')!r} is not for JWT signatures"
    kty = jwk.get("kty")
    if kty == "EC":
        algs = _EC_ALGS.get(jwk.get("crv"))
        if algs is None:
            return f"key {kid!r}: curve {jwk.get('crv')!r} is not allowed (P-256, P-384)"
    elif kty == "RSA":
        algs = _RSA_ALGS
    else:
        return f"key {kid!r}: key type {kty!r} is not allowed (EC, RSA)"
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in algs:
            return f"key {kid!r}: alg {alg!r} is not allowed for it"
        algs = frozenset({alg})
    try:
        key = pyjwt.PyJWK(jwk, algorithm=next(iter(sorted(algs)))).key
    except (pyjwt.PyJWKError, pyjwt.InvalidKeyError, ValueError, TypeError) as e:
        raise JWKSError(f"{where}: key {kid!r} cannot be loaded: {e}") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        return f"key {kid!r}: RSA keys under 2048 bits are not allowed"
    return kid, _Key(key, algs)


def _loadJWKS(path: Path, trustDomain: str | None) -> tuple[dict[str, dict[str, _Key]], list[str]]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise JWKSError(f"cannot read JWKS file {path}: {e.strerror}") from None
    except ValueError as e:
        raise JWKSError(f"JWKS file {path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise JWKSError(f"JWKS file {path}: expected a JSON object")
    if "keys" in data:
        if trustDomain is None:
            raise JWKSError(
                f"JWKS file {path} is a plain JWKS, which does not say its trust domain; "
                'write it per trust domain, {"<trust-domain>": {"keys": [...]}} '
                "(as 'hbone certs jwks' does)"
            )
        sets = {trustDomain: data}
    else:
        sets = data
    bundles: dict[str, dict[str, _Key]] = {}
    skipped: list[str] = []
    for td, jwks in sets.items():
        try:
            SpiffeId.parse(f"spiffe://{td}")
        except SpiffeIdError:
            raise JWKSError(f"JWKS file {path}: {td!r} is not a trust domain") from None
        keys = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(keys, list):
            raise JWKSError(f'JWKS file {path}: trust domain {td!r} needs {{"keys": [...]}}')
        bundle: dict[str, _Key] = {}
        for jwk in keys:
            parsed = _parseJWK(jwk, f"JWKS file {path}, trust domain {td!r}")
            if isinstance(parsed, str):
                skipped.append(f"{td}: {parsed}")
                continue
            kid, key = parsed
            if kid in bundle:
                raise JWKSError(f"JWKS file {path}: trust domain {td!r} has kid {kid!r} twice")
            bundle[kid] = key
        if bundle:
            bundles[td] = bundle
    if not bundles:
        raise JWKSError(
            f"JWKS file {path} has no usable key (EC P-256/P-384 or RSA with a kid)"
            + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
        )
    return bundles, skipped


def _validAlg(alg) -> bool:
    return isinstance(alg, str) and alg in ALLOWED_ALGORITHMS


class JWKSVerifier:
    """Verifies bearer JWT-SVIDs against a JWKS file (module docstring: format).

    :param jwksPath: the JWKS file. It is read now (errors raise :class:`JWKSError`)
        and re-read when its modification time changes, checked at most every
        ``reloadInterval`` seconds; a re-read that fails keeps the old keys.
    :param audience: the audience a token's ``aud`` must contain; None means
        ``https://<:authority host>`` of each request (costinm/hbone's convention).
    :param clock: an ``IReactorTime`` (``seconds()``) for ``exp``/``nbf``.
    :param trustDomain: the trust domain of a plain ``{"keys": [...]}`` JWKS.
    """

    log = Logger()

    def __init__(self, jwksPath: str | os.PathLike, audience: str | None, clock,
                 trustDomain: str | None = None, reloadInterval: float = 10.0) -> None:
        self.path = Path(jwksPath)
        self.audience = audience or None
        self.clock = clock
        self.trustDomain = trustDomain
        self.reloadInterval = reloadInterval
        self._mtime = self._stat()
        self.bundles, skipped = _loadJWKS(self.path, trustDomain)
        for why in skipped:
            self.log.warn("JWKS file {path}: skipped {why}", path=str(self.path), why=why)
        self._checked = clock.seconds()

    @property
    def trustDomains(self) -> frozenset[str]:
        return frozenset(self.bundles)

    def _stat(self):
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybeReload(self, now: float) -> None:
        if now - self._checked < self.reloadInterval:
            return
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self.bundles, _ = _loadJWKS(self.path, self.trustDomain)
        except JWKSError as e:
            self.log.warn("{error}; keeping the keys loaded before", error=str(e))
        else:
            self.log.info("reloaded JWKS file {path}", path=str(self.path))

    def audienceFor(self, authorityHost: str | None) -> str | None:
        if self.audience is not None:
            return self.audience
        if not authorityHost:
            return None
        host = authorityHost.lower()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"https://{host}"

    def verify(self, token: str | bytes, authorityHost: str | None) -> SpiffeId:
        """The SPIFFE ID (``sub``) of an acceptable token; else :class:`TokenError`.

        :param authorityHost: the request's ``:authority`` host (no port), for the
            default audience."""
        now = self.clock.seconds()
        self._maybeReload(now)
        if isinstance(token, str):
            try:
                token = token.encode("ascii")
            except UnicodeEncodeError:
                raise TokenError("malformed", "the token is not ASCII") from None
        if not token:
            raise TokenError("missing", "empty bearer token")
        if len(token) > MAX_TOKEN_BYTES or _TOKEN_RE.fullmatch(token) is None:
            raise TokenError("malformed", "not a compact JWS (header.payload.signature)")
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            raise TokenError("malformed", "the JWS header does not decode") from None
        alg = header.get("alg")
        if not _validAlg(alg):
            shown = alg if isinstance(alg, str) and re.fullmatch(r"[A-Za-z0-9]{1,10}", alg) else "?"
            raise TokenError(
                "alg", f"alg {shown!r} is not allowed (only {', '.join(ALLOWED_ALGORITHMS)})"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("kid", "the JWS header has no kid")
        try:
            unverified = pyjwt.decode(token, options={"verify_signature": False})
        except pyjwt.PyJWTError:
            raise TokenError("malformed", "the JWT claims do not decode") from None
        sub = unverified.get("sub")
        if not isinstance(sub, str):
            raise TokenError("subject", "no sub claim")
        try:
            peer = SpiffeId.parse(sub)
        except SpiffeIdError:
            raise TokenError("subject", "sub is not a SPIFFE ID") from None
        bundle = self.bundles.get(peer.trustDomain)
        if bundle is None:
            raise TokenError("trust_domain", f"no JWT bundle for trust domain {peer.trustDomain!r}")
        entry = bundle.get(kid)
        if entry is None:
            raise TokenError("kid", f"no key with that kid in the bundle of {peer.trustDomain!r}")
        if alg not in entry.algs:
            raise TokenError("alg", f"alg {alg!r} does not fit the key that kid names")
        audience = self.audienceFor(authorityHost)
        if audience is None:
            raise TokenError("audience", "no audience configured and no :authority to derive it from")
        try:
            claims = pyjwt.decode(
                token,
                entry.key,
                algorithms=[alg],
                audience=audience,
                options={
                    "verify_signature": True,
                    "verify_aud": True,
                    "verify_exp": False,  # checked below on the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["sub", "aud", "exp"],
                },
            )
        except pyjwt.InvalidSignatureError:
            raise TokenError("signature", "the signature does not verify") from None
        except pyjwt.InvalidAudienceError:
            raise TokenError("audience", f"aud does not contain {audience!r}") from None
        except pyjwt.MissingRequiredClaimError as e:
            code = "audience" if e.claim == "aud" else ("expired" if e.claim == "exp" else "subject")
            raise TokenError(code, f"no {e.claim} claim") from None
        except pyjwt.PyJWTError:
            raise TokenError("malformed", "the token does not verify") from None
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise TokenError("expired", "exp is not a number")
        if now >= exp + CLOCK_SKEW:
            raise TokenError("expired", "the token has expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if isinstance(nbf, bool) or not isinstance(nbf, (int, float)):
                raise TokenError("not_yet_valid", "nbf is not a number")
            if now + CLOCK_SKEW < nbf:
                raise TokenError("not_yet_valid", "the token is not valid yet (nbf)")
        if claims.get("sub") != sub:  # pragma: no cover - the same bytes decoded twice
            raise TokenError("subject", "sub changed")
        return peer
