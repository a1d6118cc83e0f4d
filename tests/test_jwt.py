"""Bearer JWT-SVIDs: :mod:`hbone.jwt` (PROTOCOL §2 acceptance rules, the JWKS file)
and ``hbone certs jwt|jwks``. No sockets; the clock is a ``twisted`` ``Clock``.

The wire-level S29 cases (401 + ``www-authenticate: Bearer`` from a live ``h2c``
listener, and the logs) are in ``tests/test_h2c.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.task import Clock

from hbone.ca import certsMain, initCA
from hbone.identity import SpiffeId
from hbone.jwt import (
    ALLOWED_ALGORITHMS,
    JWKSError,
    JWKSVerifier,
    JWT_KEY_FILE,
    TokenError,
    bearerToken,
    jwksDocument,
    keyId,
    loadSigningKey,
    mintJWTSVID,
    publicJWK,
)

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"
AUD = "https://lb.example"
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def handMade(header: dict, claims: dict, sign=None) -> str:
    """A compact JWS built by hand (attacks PyJWT would refuse to produce)."""
    signingInput = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = sign(signingInput.encode("ascii")) if sign else b""
    return f"{signingInput}.{b64(signature)}"


def claims(sub: str = WEB, aud=AUD, exp: float = NOW + 600, **extra) -> dict:
    out = {"sub": sub, "aud": aud, "exp": exp, "iat": NOW}
    out.update(extra)
    return out


class Keys:
    """One trust domain's signing keys and a JWKS file for them."""

    def __init__(self, tmp_path: Path) -> None:
        self.ec256 = ec.generate_private_key(ec.SECP256R1())
        self.ec384 = ec.generate_private_key(ec.SECP384R1())
        self.rsa = rsa.generate_private_key(65537, 2048)
        self.other = ec.generate_private_key(ec.SECP256R1())  # for trust domain "other.example"
        self.path = tmp_path / "jwks.json"
        self.write()

    def write(self, extra: dict | None = None) -> None:
        doc = jwksDocument({
            TD: [("ec256", self.ec256.public_key()), ("ec384", self.ec384.public_key()),
                 ("rsa", self.rsa.public_key())],
            "other.example": [("other", self.other.public_key())],
        })
        doc.update(extra or {})
        self.path.write_text(json.dumps(doc))

    def token(self, key=None, kid="ec256", alg=None, headers=None, **claimArgs) -> str:
        key = key or self.ec256
        return pyjwt.encode(claims(**claimArgs), key, algorithm=alg or ("ES256" if key is self.ec256 else alg),
                            headers={"kid": kid, **(headers or {})})


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture
def verifier(keys: Keys, clock: Clock) -> JWKSVerifier:
    return JWKSVerifier(keys.path, None, clock)


def refused(verifier: JWKSVerifier, token: str, host: str = "lb.example") -> TokenError:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, host)
    error = info.value
    # SECURITY §4.7: no part of the token in the reason
    for part in token.split("."):
        if len(part) > 8:
            assert part not in error.reason
            assert part not in str(error)
    return error


# -- accepted -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyName", "kid", "alg"),
    [
        ("ec256", "ec256", "ES256"),
        ("ec384", "ec384", "ES384"),
        ("rsa", "rsa", "RS256"),
        ("rsa", "rsa", "RS384"),
        ("rsa", "rsa", "RS512"),
        ("rsa", "rsa", "PS256"),
        ("rsa", "rsa", "PS384"),
        ("rsa", "rsa", "PS512"),
    ],
)
def test_acceptedAlgorithms(keys: Keys, verifier: JWKSVerifier, keyName: str, kid: str, alg: str) -> None:
    """Each allowed algorithm with a key of the right type verifies; the result is
    the token's sub as a SpiffeId."""
    token = pyjwt.encode(claims(), getattr(keys, keyName), algorithm=alg, headers={"kid": kid})
    assert verifier.verify(token, "lb.example") == SpiffeId.parse(WEB)


def test_allowedAlgorithmsAreExactlyProtocols() -> None:
    assert set(ALLOWED_ALGORITHMS) == {"RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512"}


def test_audienceList(keys: Keys, verifier: JWKSVerifier) -> None:
    """aud may be a list; it must contain the audience."""
    token = keys.token(aud=["https://elsewhere", AUD])
    assert verifier.verify(token, "lb.example") == SpiffeId.parse(WEB)


def test_defaultAudienceIsAuthorityHost(keys: Keys, clock: Clock) -> None:
    """Without a configured audience it is https://<:authority host>, lowercased;
    an IPv6 host is bracketed."""
    verifier = JWKSVerifier(keys.path, None, clock)
    assert verifier.verify(keys.token(aud="https://lb.example"), "LB.Example")
    assert verifier.verify(keys.token(aud="https://[2001:db8::1]"), "2001:db8::1")
    assert refused(verifier, keys.token(aud="https://lb.example"), "other.example").code == "audience"
    assert refused(verifier, keys.token(), None).code == "audience"


def test_configuredAudience(keys: Keys, clock: Clock) -> None:
    """A configured audience replaces the default; :authority no longer matters."""
    verifier = JWKSVerifier(keys.path, "spiffe://cluster.local/lb", clock)
    assert verifier.verify(keys.token(aud="spiffe://cluster.local/lb"), "anything.example")
    assert refused(verifier, keys.token(aud=AUD), "lb.example").code == "audience"


def test_expirySkew(keys: Keys, verifier: JWKSVerifier, clock: Clock) -> None:
    """exp is allowed 60 s of skew, and no more."""
    token = keys.token(exp=NOW - 59)
    assert verifier.verify(token, "lb.example")
    clock.advance(1)
    assert refused(verifier, token).code == "expired"


def test_notBeforeSkew(keys: Keys, verifier: JWKSVerifier, clock: Clock) -> None:
    """An nbf in the future is refused beyond 60 s of skew."""
    assert verifier.verify(keys.token(nbf=NOW + 60), "lb.example")
    assert refused(verifier, keys.token(nbf=NOW + 61)).code == "not_yet_valid"


# -- refused (S29 and more) -------------------------------------------------------


def test_expired(keys: Keys, verifier: JWKSVerifier) -> None:
    assert refused(verifier, keys.token(exp=NOW - 61)).code == "expired"


def test_wrongAudience(keys: Keys, verifier: JWKSVerifier) -> None:
    assert refused(verifier, keys.token(aud="https://other.example")).code == "audience"


def test_algNone(keys: Keys, verifier: JWKSVerifier) -> None:
    """alg none is refused before any key is looked at (even with a known kid)."""
    token = handMade({"alg": "none", "kid": "ec256", "typ": "JWT"}, claims())
    error = refused(verifier, token)
    assert error.code == "alg"
    assert "'none' is not allowed" in error.reason


def test_hs256SignedWithThePublicKey(keys: Keys, verifier: JWKSVerifier) -> None:
    """The classic key-confusion attack: HS256 keyed with the verifier's public key
    (PEM and the JWK's x coordinate both)."""
    pem = keys.ec256.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (pem, json.dumps(publicJWK(keys.ec256, "ec256")).encode()):
        token = handMade({"alg": "HS256", "kid": "ec256"}, claims(),
                         lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest())
        assert refused(verifier, token).code == "alg"


@pytest.mark.parametrize("alg", ["HS384", "HS512", "ES512", "EdDSA", "ES256K", "", "RS1", "x" * 100])
def test_otherAlgorithmsRefused(keys: Keys, verifier: JWKSVerifier, alg: str) -> None:
    token = handMade({"alg": alg, "kid": "ec256"}, claims(), lambda d: b"sig")
    error = refused(verifier, token)
    assert error.code == "alg"
    assert "x" * 20 not in error.reason  # an odd alg is not echoed


def test_unknownKid(keys: Keys, verifier: JWKSVerifier) -> None:
    assert refused(verifier, keys.token(kid="nobody")).code == "kid"


def test_noKid(keys: Keys, verifier: JWKSVerifier) -> None:
    token = pyjwt.encode(claims(), keys.ec256, algorithm="ES256")
    assert refused(verifier, token).code == "kid"


def test_kidOfAnotherTrustDomain(keys: Keys, verifier: JWKSVerifier) -> None:
    """A key is trusted only for its own trust domain's subs: other.example's key
    signing a cluster.local sub is an unknown kid there, and vice versa."""
    assert refused(verifier, keys.token(key=keys.other, kid="other", alg="ES256")).code == "kid"
    token = keys.token(kid="ec256", sub="spiffe://other.example/ns/x/sa/y")
    assert refused(verifier, token).code == "kid"
    ok = keys.token(key=keys.other, kid="other", alg="ES256", sub="spiffe://other.example/ns/x/sa/y")
    assert verifier.verify(ok, "lb.example") == SpiffeId.parse("spiffe://other.example/ns/x/sa/y")


def test_trustDomainWithoutBundle(keys: Keys, verifier: JWKSVerifier) -> None:
    token = keys.token(sub="spiffe://nowhere.example/ns/x/sa/y")
    assert refused(verifier, token).code == "trust_domain"


def test_signatureByAnotherKey(keys: Keys, verifier: JWKSVerifier) -> None:
    """The right kid, the wrong key."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    assert refused(verifier, keys.token(key=stranger, kid="ec256", alg="ES256")).code == "signature"


def test_tamperedClaims(keys: Keys, verifier: JWKSVerifier) -> None:
    header, _, signature = keys.token().split(".")
    forged = b64(json.dumps(claims(sub=f"spiffe://{TD}/ns/kube-system/sa/admin")).encode())
    assert refused(verifier, f"{header}.{forged}.{signature}").code == "signature"


def test_algDoesNotFitKey(keys: Keys, verifier: JWKSVerifier) -> None:
    """An allowed alg that the kid's key cannot produce: RS256 naming an EC kid,
    ES384 naming the P-256 kid."""
    assert refused(verifier, keys.token(key=keys.rsa, kid="ec256", alg="RS256")).code == "alg"
    assert refused(verifier, keys.token(key=keys.ec384, kid="ec256", alg="ES384")).code == "alg"


@pytest.mark.parametrize("sub", ["web", "https://cluster.local/ns/a", "spiffe://Cluster.local/x", "spiffe://td/a//b"])
def test_subNotSpiffe(keys: Keys, verifier: JWKSVerifier, sub: str) -> None:
    assert refused(verifier, keys.token(sub=sub)).code == "subject"


@pytest.mark.parametrize("missing", ["sub", "aud", "exp"])
def test_requiredClaims(keys: Keys, verifier: JWKSVerifier, missing: str) -> None:
    body = claims()
    del body[missing]
    token = pyjwt.encode(body, keys.ec256, algorithm="ES256", headers={"kid": "ec256"})
    assert refused(verifier, token).code in ("subject", "audience", "expired")


@pytest.mark.parametrize("exp", ["soon", True, None])
def test_expNotANumber(keys: Keys, verifier: JWKSVerifier, exp) -> None:
    """A correctly signed token whose exp is not a number is not accepted."""
    token = pyjwt.encode(claims(exp=exp), keys.ec256, algorithm="ES256", headers={"kid": "ec256"})
    assert refused(verifier, token).code == "expired"


@pytest.mark.parametrize(
    "token",
    ["", "a.b", "a.b.c.d", "not a token", "é.é.é", "eyJ.eyJ.sig", "a" * 9000 + ".b.c"],
)
def test_malformed(verifier: JWKSVerifier, token: str) -> None:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, "lb.example")
    assert info.value.code in ("malformed", "missing")


# -- the authorization header ---------------------------------------------------------


def test_bearerToken() -> None:
    assert bearerToken([(b":method", b"CONNECT"), (b"authorization", b"Bearer abc.def.ghi")]) == b"abc.def.ghi"
    assert bearerToken([(b"authorization", b"bearer  abc.def.ghi ")]) == b"abc.def.ghi"
    for headers, code in [
        ([], "missing"),
        ([(b"authorization", b"Bearer ")], "missing"),
        ([(b"authorization", b"Basic dXNlcjpwYXNz")], "malformed"),
        ([(b"authorization", b"Bearer a.b.c"), (b"authorization", b"Bearer a.b.c")], "malformed"),
    ]:
        with pytest.raises(TokenError) as info:
            bearerToken(headers)
        assert info.value.code == code
        assert b"dXNlcjpwYXNz".decode() not in info.value.reason


# -- the JWKS file ----------------------------------------------------------------------


def test_plainJWKSNeedsATrustDomain(keys: Keys, clock: Clock, tmp_path: Path) -> None:
    """A plain {"keys": [...]} does not say its trust domain: refused unless one is
    given, and then bound to that trust domain only."""
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"keys": [publicJWK(keys.ec256, "ec256")]}))
    with pytest.raises(JWKSError, match="plain JWKS.*per trust domain"):
        JWKSVerifier(plain, None, clock)
    verifier = JWKSVerifier(plain, None, clock, trustDomain=TD)
    assert verifier.trustDomains == {TD}
    assert verifier.verify(keys.token(), "lb.example") == SpiffeId.parse(WEB)
    assert refused(verifier, keys.token(sub="spiffe://other.example/x")).code == "trust_domain"


def test_spiffeBundleKeysForX509AreSkipped(keys: Keys, clock: Clock, tmp_path: Path) -> None:
    """A SPIFFE trust bundle's x509-svid keys are not JWT keys; unsupported key
    types are skipped; the usable ones still load."""
    x509Key = dict(publicJWK(keys.other, "x509"), use="x509-svid")
    okp = {"kty": "OKP", "crv": "Ed25519", "x": b64(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()),
           "kid": "ed"}
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({TD: {"spiffe_sequence": 1, "keys": [x509Key, okp, publicJWK(keys.ec256, "ec256")]}}))
    verifier = JWKSVerifier(path, None, clock)
    assert verifier.verify(keys.token(), "lb.example")
    assert refused(verifier, keys.token(key=keys.other, kid="x509", alg="ES256")).code == "kid"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ("[]", "expected a JSON object"),
        ('{"Bad TD": {"keys": []}}', "is not a trust domain"),
        ('{"cluster.local": []}', 'needs {"keys": [...]}'),
        ('{"cluster.local": {"keys": []}}', "no usable key"),
        ('{"cluster.local": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}}', "private key material"),
    ],
)
def test_badJWKSFiles(tmp_path: Path, clock: Clock, content: str, message: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(JWKSError) as info:
        JWKSVerifier(path, None, clock)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_privateJWKRefused(keys: Keys, tmp_path: Path, clock: Clock) -> None:
    """A JWKS that holds a private key is a leak, and refused."""
    private = pyjwt.algorithms.ECAlgorithm.to_jwk(keys.ec256, as_dict=True)
    private["kid"] = "ec256"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({TD: {"keys": [private]}}))
    with pytest.raises(JWKSError, match="private key material"):
        JWKSVerifier(path, None, clock)


def test_duplicateKid(keys: Keys, tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({TD: {"keys": [publicJWK(keys.ec256, "k"), publicJWK(keys.ec384, "k")]}}))
    with pytest.raises(JWKSError, match="kid 'k' twice"):
        JWKSVerifier(path, None, clock)


def test_missingFile(tmp_path: Path, clock: Clock) -> None:
    with pytest.raises(JWKSError, match="cannot read JWKS file"):
        JWKSVerifier(tmp_path / "nope.json", None, clock)


def test_reloadOnChange(keys: Keys, verifier: JWKSVerifier, clock: Clock) -> None:
    """A rewritten JWKS applies once the reload interval has passed; a broken
    rewrite keeps the keys loaded before."""
    rotated = ec.generate_private_key(ec.SECP256R1())
    token = keys.token(key=rotated, kid="rotated", alg="ES256")
    assert refused(verifier, token).code == "kid"
    keys.write({TD: {"keys": [publicJWK(rotated, "rotated")]}})
    os.utime(keys.path, ns=(1, 1))  # a different mtime, whatever the file system's granularity
    assert refused(verifier, token).code == "kid"  # not re-read before the interval
    clock.advance(10)
    assert verifier.verify(token, "lb.example") == SpiffeId.parse(WEB)
    assert refused(verifier, keys.token()).code == "kid"  # the old key is gone
    keys.path.write_text("{broken")
    os.utime(keys.path, ns=(2, 2))
    clock.advance(10)
    assert verifier.verify(token, "lb.example")


# -- minting and key ids ---------------------------------------------------------------


def test_mint(keys: Keys) -> None:
    token = mintJWTSVID(keys.ec256, "ec256", WEB, AUD, 300, now=NOW)
    assert pyjwt.get_unverified_header(token) == {"alg": "ES256", "kid": "ec256", "typ": "JWT"}
    body = pyjwt.decode(token, keys.ec256.public_key(), algorithms=["ES256"], audience=AUD,
                        options={"verify_exp": False, "verify_iat": False})
    assert body == {"sub": WEB, "aud": AUD, "iat": int(NOW), "exp": int(NOW) + 300}
    many = mintJWTSVID(keys.rsa, "rsa", SpiffeId.parse(WEB), [AUD, "b"], 300, now=NOW)
    assert pyjwt.get_unverified_header(many)["alg"] == "RS256"
    with pytest.raises(ValueError):
        mintJWTSVID(keys.ec256, "k", "not-spiffe", AUD, 300)
    with pytest.raises(ValueError):
        mintJWTSVID(keys.ec256, "k", WEB, "", 300)


def test_keyIdIsRFC7638Thumbprint() -> None:
    """RFC 7638 §3.1's example key has the thumbprint the RFC gives."""
    n = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
         "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
         "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
         "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")
    key = pyjwt.PyJWK({"kty": "RSA", "n": n, "e": "AQAB"}).key
    assert keyId(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert publicJWK(key)["kid"] == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# -- hbone certs jwt | jwks -------------------------------------------------------------


@pytest.fixture
def caDir(tmp_path: Path) -> Path:
    return initCA(tmp_path / "ca", TD)


def test_certsJwtAndJwks(caDir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``hbone certs jwt`` creates the signing key once (0600), writes the token
    (0600) and, with --jwks, the JWKS (per trust domain) that verifies it;
    ``hbone certs jwks`` writes the same JWKS."""
    token, jwks, jwks2 = tmp_path / "web.jwt", tmp_path / "jwks.json", tmp_path / "jwks2.json"
    argv = ["jwt", str(caDir), "--spiffe", WEB, "--audience", AUD, "--audience", "https://b",
            "--ttl", "600", "--out", str(token), "--jwks", str(jwks)]
    assert certsMain(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {token} (JWT-SVID for {WEB}, aud {AUD}, https://b" in out
    assert f"wrote {jwks} (JWKS of spiffe://{TD}, kid " in out
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE((caDir / JWT_KEY_FILE).stat().st_mode) == 0o600
    keyBytes = (caDir / JWT_KEY_FILE).read_bytes()
    assert certsMain(["jwks", str(caDir), "--out", str(jwks2)]) == 0
    assert (caDir / JWT_KEY_FILE).read_bytes() == keyBytes  # made once, reused
    assert json.loads(jwks.read_text()) == json.loads(jwks2.read_text())
    assert set(json.loads(jwks.read_text())) == {TD}
    clock = Clock()
    clock.advance(pyjwt.decode(token.read_text().strip(), options={"verify_signature": False})["iat"])
    verifier = JWKSVerifier(jwks, None, clock)
    assert verifier.verify(token.read_text().strip(), "lb.example") == SpiffeId.parse(WEB)
    assert verifier.verify(token.read_text().strip(), "b") == SpiffeId.parse(WEB)
    clock.advance(600 + 60)
    with pytest.raises(TokenError):
        verifier.verify(token.read_text().strip(), "lb.example")
    key, kid, td = loadSigningKey(caDir)
    assert (td, kid) == (TD, keyId(key))
    assert pyjwt.get_unverified_header(token.read_text().strip())["kid"] == kid


def test_certsJwtKeyIsCreatedByJwks(caDir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certsMain(["jwks", str(caDir), "--out", str(tmp_path / "j.json")]) == 0
    assert (caDir / JWT_KEY_FILE).exists()


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["jwt", "{ca}", "--spiffe", "spiffe://other.example/ns/a/sa/b", "--audience", AUD, "--out", "{t}/x"],
         "signs for spiffe://cluster.local, not other.example"),
        (["jwt", "{ca}", "--spiffe", "web", "--audience", AUD, "--out", "{t}/x"], "is not a valid SPIFFE ID"),
        (["jwt", "{ca}", "--spiffe", WEB, "--out", "{t}/x"], "required: --audience"),
        (["jwt", "{ca}", "--spiffe", WEB, "--audience", AUD, "--ttl", "0", "--out", "{t}/x"], "out of range"),
        (["jwt", "{ca}", "--spiffe", WEB, "--audience", AUD, "--ttl", "soon", "--out", "{t}/x"],
         "not a whole number of seconds"),
        (["jwt", "{ca}", "--spiffe", WEB, "--audience", "a b", "--out", "{t}/x"], "without spaces"),
        (["jwt", "{t}/nope", "--spiffe", WEB, "--audience", AUD, "--out", "{t}/x"], "no CA in"),
        (["jwt", "{ca}", "--spiffe", WEB, "--audience", AUD, "--out", "{t}/missing/dir/x"], "No such file"),
        (["jwks", "{t}/nope", "--out", "{t}/x"], "no CA in"),
        (["jwks", "{ca}"], "required: --out"),
    ],
)
def test_certsJwtErrors(caDir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv, reason) -> None:
    """Every mistake: one line on stderr naming it, exit status 2, no token file."""
    argv = [a.format(ca=caDir, t=tmp_path) for a in argv]
    assert certsMain(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hbone certs: error: ")
    assert err.count("\n") == 1, err
    assert reason in err
    assert not (tmp_path / "x").exists()


def test_certsJwtCorruptSigningKey(caDir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (caDir / JWT_KEY_FILE).write_text("garbage")
    assert certsMain(["jwks", str(caDir), "--out", str(tmp_path / "j")]) == 2
    assert "is not an unencrypted PEM private key" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["jwt", "jwks"])
def test_certsJwtHelp(capsys: pytest.CaptureFixture[str], command: str) -> None:
    """--help exits 0, shows an example, and every option has an "e.g."."""
    assert certsMain([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"usage: hbone certs {command}" in text
    assert f"example:\n  hbone certs {command} ./ca" in text
    options = text.split("options:")[1].split("example:")[0]
    entries = [e for e in options.split("\n  -") if e.strip() and not e.lstrip().startswith("h, --help")]
    positional = text.split("positional arguments:")[1].split("options:")[0]
    for entry in [*entries, positional]:
        assert "e.g." in entry, entry
    assert certsMain(["--help"]) == 0
    assert command in capsys.readouterr().out


def test_cliEntryPoint(caDir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``hbone certs jwt`` through the real command-line entry point."""
    from hbone.cli import main

    out = tmp_path / "t.jwt"
    assert main(["certs", "jwt", str(caDir), "--spiffe", WEB, "--audience", AUD, "--out", str(out)]) == 0
    assert out.read_text().count(".") == 2
    assert main(["certs", "jwt", str(caDir), "--spiffe", WEB, "--out", str(out)]) == 2
