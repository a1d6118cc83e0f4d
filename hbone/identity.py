"""SPIFFE identities: IDs, identity patterns and X509-SVID leaf checks.

This module is pure: no reactor, no sockets, no files. It implements the rules of
PROTOCOL.md §2 ("SPIFFE X509-SVID"):

- L{SpiffeId.parse} accepts exactly the SPIFFE IDs of the SPIFFE-ID standard §2: the
  scheme C{spiffe://}, a trust domain of 1-255 bytes of C{[a-z0-9._-]}, a path of
  C{[A-Za-z0-9._-]+} segments (no empty, C{.} or C{..} segment, no trailing C{/}), no
  query, fragment, port or userinfo, and at most 2048 bytes in all.
- L{IdentityPattern} is what configuration names: an exact ID, every service account
  of one namespace (C{spiffe://td/ns/NS/*}) or a whole trust domain (C{spiffe://td/*}).
- L{svidFromCertificate} applies the leaf rules of an X509-SVID (one URI SAN, C{cA}
  false, C{digitalSignature} without C{keyCertSign}/C{cRLSign}, within validity) and
  returns the peer's ID. Chain validation against a trust bundle happens in the TLS
  layer, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = [
    "IdentityPattern",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "describeCertificate",
    "svidFromCertificate",
]

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+", re.ASCII)
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)

# How much of an offending value an error message quotes: values may come from a
# peer's certificate, so they are shortened and shown with repr() (no raw control
# characters reach a log line).
_QUOTE_LIMIT = 96


def _quote(value: str | bytes) -> str:
    """
    Show C{value} safely inside an error message.

    @return: C{repr} of the value, cut to a readable length with the full length noted.
    """
    if len(value) > _QUOTE_LIMIT:
        return f"{value[:_QUOTE_LIMIT]!r}... ({len(value)} characters)"
    return repr(value)


class SpiffeIdError(ValueError):
    """
    A string that is not a valid SPIFFE ID (or identity pattern).

    C{str(error)} names the offending value and the rule it breaks.
    """


def _invalid(value: str | bytes, rule: str) -> SpiffeIdError:
    return SpiffeIdError(f"{_quote(value)} is not a valid SPIFFE ID: {rule}")


def _checkTrustDomain(trustDomain: str, value: str | bytes) -> None:
    """
    Raise L{SpiffeIdError} unless C{trustDomain} is 1-255 bytes of C{[a-z0-9._-]}.

    @param value: the whole text being parsed, quoted in the error.
    """
    if not trustDomain:
        raise _invalid(value, "the trust domain is empty (expected spiffe://<trust-domain>/...)")
    if len(trustDomain) > MAX_TRUST_DOMAIN_BYTES:
        raise _invalid(
            value,
            f"the trust domain is {len(trustDomain)} bytes long "
            f"(at most {MAX_TRUST_DOMAIN_BYTES} are allowed)",
        )
    if _TRUST_DOMAIN_RE.fullmatch(trustDomain) is None:
        if "@" in trustDomain:
            raise _invalid(value, "userinfo ('user@') is not allowed")
        if ":" in trustDomain:
            raise _invalid(value, "a port is not allowed after the trust domain")
        if _TRUST_DOMAIN_RE.fullmatch(trustDomain.lower()) is not None:
            rule = "the trust domain must be lowercase"
        else:
            rule = "the trust domain may contain only a-z, 0-9, '.', '-' and '_'"
        raise _invalid(value, f"{rule} (got {_quote(trustDomain)})")


def _checkPath(path: str, value: str | bytes) -> None:
    """
    Raise L{SpiffeIdError} unless C{path} is C{""} or C{/seg/seg...} with valid segments.

    @param value: the whole text being parsed, quoted in the error.
    """
    if path == "":
        return
    if not path.startswith("/"):
        raise _invalid(value, "the path must start with '/'")
    if path.endswith("/"):
        raise _invalid(value, "the path must not end with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise _invalid(value, "the path has an empty segment ('//')")
        if segment in (".", ".."):
            raise _invalid(value, f"the path must not contain a {segment!r} segment")
        if _SEGMENT_RE.fullmatch(segment) is None:
            raise _invalid(
                value,
                f"path segment {_quote(segment)} may contain only "
                "A-Z, a-z, 0-9, '.', '-' and '_'",
            )


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """
    A valid SPIFFE ID: C{spiffe://<trustDomain><path>}.

    Construct one with L{SpiffeId.parse}; the constructor validates its fields too,
    so an invalid C{SpiffeId} cannot exist.

    @ivar trustDomain: the trust domain, e.g. C{"cluster.local"}.
    @ivar path: C{""} or C{"/seg/seg..."}, e.g. C{"/ns/default/sa/web"}.
    """

    trustDomain: str
    path: str

    def __post_init__(self) -> None:
        text = SCHEME + self.trustDomain + self.path
        _checkTrustDomain(self.trustDomain, text)
        _checkPath(self.path, text)
        if len(text.encode("ascii")) > MAX_ID_BYTES:
            raise _invalid(text, f"it is {len(text)} bytes long (at most {MAX_ID_BYTES} are allowed)")

    @classmethod
    def parse(cls, value: str | bytes) -> SpiffeId:
        """
        Parse C{value} as a SPIFFE ID.

        @param value: text such as C{"spiffe://cluster.local/ns/default/sa/web"}; bytes
            must be ASCII.
        @raise SpiffeIdError: if C{value} breaks any rule of the SPIFFE-ID standard §2;
            the message names the rule.
        """
        return cls._parse(value, value)

    @classmethod
    def _parse(cls, value: str | bytes, shown: str | bytes) -> SpiffeId:
        """
        L{parse}, quoting C{shown} in errors (a pattern quotes its whole text).
        """
        if isinstance(value, bytes):
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                raise _invalid(shown, "it contains non-ASCII bytes") from None
        elif isinstance(value, str):
            text = value
        else:
            raise SpiffeIdError(f"a SPIFFE ID must be text, not {type(value).__name__}")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            raise _invalid(shown, f"it is {size} bytes long (at most {MAX_ID_BYTES} are allowed)")
        if not text.startswith(SCHEME):
            if text[: len(SCHEME)].lower() == SCHEME:
                raise _invalid(shown, "the scheme must be lowercase 'spiffe://'")
            raise _invalid(shown, "it must start with 'spiffe://'")
        rest = text[len(SCHEME) :]
        if "#" in rest:
            raise _invalid(shown, "a fragment ('#') is not allowed")
        if "?" in rest:
            raise _invalid(shown, "a query ('?') is not allowed")
        if "%" in rest:
            raise _invalid(shown, "percent-encoding ('%') is not allowed")
        trustDomain, slash, path = rest.partition("/")
        _checkTrustDomain(trustDomain, shown)
        path = slash + path
        _checkPath(path, shown)
        return cls(trustDomain, path)

    def _segments(self) -> list[str]:
        return self.path.split("/")[1:] if self.path else []

    @property
    def namespace(self) -> str | None:
        """
        The Kubernetes namespace of an Istio workload ID (C{/ns/<ns>/sa/<sa>}), else C{None}.
        """
        segments = self._segments()
        if len(segments) == 4 and segments[0] == "ns" and segments[2] == "sa":
            return segments[1]
        return None

    @property
    def serviceAccount(self) -> str | None:
        """
        The service account of an Istio workload ID (C{/ns/<ns>/sa/<sa>}), else C{None}.
        """
        segments = self._segments()
        if len(segments) == 4 and segments[0] == "ns" and segments[2] == "sa":
            return segments[3]
        return None

    def __str__(self) -> str:
        return f"{SCHEME}{self.trustDomain}{self.path}"


class IdentityPattern:
    """
    An exact SPIFFE ID, or C{"spiffe://<td>/ns/<ns>/*"} (any service account in that
    namespace), or C{"spiffe://<td>/*"} (any ID of that trust domain).

    Patterns compare equal and hash by their text, so they can be parts of pool keys.

    @ivar trustDomain: the trust domain every matching ID has.
    @ivar namespace: for a namespace pattern, its namespace; otherwise C{None}.
    @ivar exact: for an exact pattern, its L{SpiffeId}; otherwise C{None}.
    """

    __slots__ = ("trustDomain", "namespace", "exact", "_text")

    trustDomain: str
    namespace: str | None
    exact: SpiffeId | None
    _text: str

    def __init__(self, trustDomain: str, namespace: str | None = None, exact: SpiffeId | None = None) -> None:
        """
        Prefer L{IdentityPattern.parse}, or L{IdentityPattern.forId} for an exact ID.

        @raise SpiffeIdError: if the parts do not form one of the three pattern shapes.
        """
        if exact is not None:
            if namespace is not None or exact.trustDomain != trustDomain:
                raise SpiffeIdError("an exact identity pattern takes only the ID itself")
            text = str(exact)
        elif namespace is not None:
            if "/" in namespace:
                raise SpiffeIdError(f"namespace {_quote(namespace)} must not contain '/'")
            text = f"{SCHEME}{trustDomain}/ns/{namespace}/*"
            # Validates both parts with the SPIFFE ID rules.
            SpiffeId(trustDomain, f"/ns/{namespace}")
        else:
            SpiffeId(trustDomain, "")
            text = f"{SCHEME}{trustDomain}/*"
        self.trustDomain = trustDomain
        self.namespace = namespace
        self.exact = exact
        self._text = text

    @classmethod
    def forId(cls, spiffeId: SpiffeId) -> IdentityPattern:
        """
        The pattern that matches exactly C{spiffeId}.
        """
        return cls(spiffeId.trustDomain, exact=spiffeId)

    @classmethod
    def parse(cls, value: str) -> IdentityPattern:
        """
        Parse an identity pattern.

        @param value: C{"spiffe://td/ns/NS/sa/SA"} (or any exact SPIFFE ID),
            C{"spiffe://td/ns/NS/*"} or C{"spiffe://td/*"}.
        @raise SpiffeIdError: for anything else; the message names the rule.
        """
        if not isinstance(value, str):
            raise SpiffeIdError(f"an identity pattern must be text, not {type(value).__name__}")
        if "*" not in value:
            return cls.forId(SpiffeId.parse(value))
        wildcardRule = (
            f"{_quote(value)} is not a valid identity pattern: '*' is allowed only as "
            "the whole last segment of spiffe://<trust-domain>/* or "
            "spiffe://<trust-domain>/ns/<namespace>/*"
        )
        if not value.endswith("/*") or "*" in value[:-2]:
            raise SpiffeIdError(wildcardRule)
        # Check the rest with the SPIFFE ID rules, the '*' standing for one segment.
        placeholder = SpiffeId._parse(value[:-1] + "x", value)
        if not placeholder.path:  # "spiffe://*": the '*' stood for the trust domain
            raise SpiffeIdError(wildcardRule)
        segments = placeholder._segments()[:-1]
        if not segments:
            return cls(placeholder.trustDomain)
        if len(segments) == 2 and segments[0] == "ns":
            return cls(placeholder.trustDomain, namespace=segments[1])
        raise SpiffeIdError(wildcardRule)

    def matches(self, peer: SpiffeId) -> bool:
        """
        Whether C{peer} is an identity this pattern allows.

        A namespace pattern matches only Istio workload IDs (C{/ns/<ns>/sa/<sa>}) of
        that trust domain and namespace.
        """
        if self.exact is not None:
            return peer == self.exact
        if peer.trustDomain != self.trustDomain:
            return False
        if self.namespace is not None:
            return peer.namespace == self.namespace
        return True

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"IdentityPattern.parse({self._text!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdentityPattern):
            return NotImplemented
        return self._text == other._text

    def __hash__(self) -> int:
        return hash((IdentityPattern, self._text))


class SvidError(Exception):
    """
    A certificate that is not an acceptable X509-SVID; C{str(e)} is the reason, e.g.
    C{"certificate has 2 URI SANs (exactly one spiffe:// URI is required)"}.
    """


def _utc(moment: datetime | None) -> datetime:
    """
    C{moment} as an aware UTC datetime (naive values are taken as UTC), or now.
    """
    if moment is None:
        return datetime.now(timezone.utc)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _isoTime(moment: datetime) -> str:
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def _extension(cert: x509.Certificate, kind: type) -> x509.Extension | None:
    """
    The extension of class C{kind}, or C{None} when absent.

    @raise SvidError: if the certificate's extensions cannot be parsed.
    """
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise SvidError(f"certificate extensions cannot be parsed: {e}") from None


def _uriSANs(cert: x509.Certificate) -> list[str]:
    """
    The URI SANs of C{cert} (an empty list without a subjectAltName extension).
    """
    san = _extension(cert, x509.SubjectAlternativeName)
    if san is None:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def svidFromCertificate(cert: x509.Certificate, now: datetime | None = None) -> SpiffeId:
    """
    Check the leaf rules of an X509-SVID and return the certificate's SPIFFE ID.

    The rules (PROTOCOL.md §2): exactly one URI SAN, which is a valid SPIFFE ID;
    basicConstraints C{cA} false (or no basicConstraints); a keyUsage extension with
    C{digitalSignature} and without C{keyCertSign} or C{cRLSign}; C{now} within the
    validity period. DNS and IP SANs are ignored. The chain is not checked here.

    @param now: the time to check validity at; defaults to the current time. A naive
        datetime is taken as UTC.
    @raise SvidError: naming the first rule the certificate breaks.
    """
    uris = _uriSANs(cert)
    if not uris:
        raise SvidError("certificate has no URI SAN (exactly one spiffe:// URI is required)")
    if len(uris) > 1:
        raise SvidError(
            f"certificate has {len(uris)} URI SANs (exactly one spiffe:// URI is required)"
        )
    try:
        spiffeId = SpiffeId.parse(uris[0])
    except SpiffeIdError as e:
        raise SvidError(f"certificate URI SAN is not a SPIFFE ID: {e}") from None
    who = f"certificate of {spiffeId}"

    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.value.ca:
        raise SvidError(f"{who} has basicConstraints cA=true (an X509-SVID leaf must not be a CA)")

    usage = _extension(cert, x509.KeyUsage)
    if usage is None:
        raise SvidError(f"{who} has no keyUsage extension (an X509-SVID leaf requires digitalSignature)")
    if not usage.value.digital_signature:
        raise SvidError(f"{who} lacks keyUsage digitalSignature (an X509-SVID leaf requires it)")
    if usage.value.key_cert_sign:
        raise SvidError(f"{who} has keyUsage keyCertSign (not allowed on an X509-SVID leaf)")
    if usage.value.crl_sign:
        raise SvidError(f"{who} has keyUsage cRLSign (not allowed on an X509-SVID leaf)")

    moment = _utc(now)
    notBefore = cert.not_valid_before_utc
    notAfter = cert.not_valid_after_utc
    if moment < notBefore:
        raise SvidError(
            f"{who} is not yet valid: valid from {_isoTime(notBefore)} (now {_isoTime(moment)})"
        )
    if moment > notAfter:
        raise SvidError(f"{who} expired at {_isoTime(notAfter)} (now {_isoTime(moment)})")
    return spiffeId


def _printable(value: str, limit: int = 128) -> str:
    """
    C{value} with control and non-ASCII characters escaped and cut to C{limit}.

    Certificate fields come from peers; a log line must not carry their raw bytes.
    """
    shown = value.encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    if len(shown) > limit:
        shown = shown[:limit] + "..."
    return shown


def describeCertificate(cert: x509.Certificate) -> str:
    """
    One short line that identifies C{cert} in a log: subject CN (if any), URI SANs,
    serial number and notAfter. Never includes key material.

    Example: C{"CN=web, URI=spiffe://td/ns/default/sa/web, serial=1f2e..., notAfter=2026-01-01T00:00:00Z"}.
    """
    parts = []
    try:
        commonNames = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        commonNames = []
    for attribute in commonNames:
        value = attribute.value
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        parts.append(f"CN={_printable(text, 64)}")
    try:
        uris = _uriSANs(cert)
    except SvidError:
        parts.append("URI=(unparseable extensions)")
    else:
        if uris:
            parts.append("URI=" + ",".join(_printable(uri) for uri in uris[:4]))
            if len(uris) > 4:
                parts[-1] += f",...({len(uris)} in all)"
        else:
            parts.append("URI=(none)")
    parts.append(f"serial={cert.serial_number:x}")
    parts.append(f"notAfter={_isoTime(cert.not_valid_after_utc)}")
    return ", ".join(parts)
