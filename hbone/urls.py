"""gost-style ``-L``/``-F`` URLs -> listener and hop specs (pure).

    LISTENER = [scheme://][user:pass@][host]:port[/target][?key=value&...]
    HOP      = [scheme://][user:pass@]host:port[?key=value&...]

An omitted listener host means 127.0.0.1 (SECURITY §4.3), unlike gost. Every error
names the URL, the part that is wrong, and what is expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from hbone.address import AddressError, Target, parseAuthority, parseHostPort
from hbone.identity import IdentityPattern, SpiffeIdError

__all__ = ["URLError", "ListenerSpec", "HopSpec", "parseListener", "parseHop",
           "LISTENER_SCHEMES", "HOP_SCHEMES"]

#: Listener schemes this build serves, and the options each takes.
LISTENER_SCHEMES = {
    "tcp": frozenset(),
    "hbone": frozenset(),
}
#: Hop schemes this build dials, and the options each takes.
HOP_SCHEMES = {
    "hbone": frozenset({"identity", "method"}),
}
_PLANNED = {"auto", "http", "socks5", "socks4", "socks4a", "h2c", "http2", "sni", "h2r", "rtcp", "admin"}


class URLError(ValueError):
    """A ``-L``/``-F`` value that cannot be used; the message says what to write."""


@dataclass(frozen=True)
class ListenerSpec:
    scheme: str
    host: str
    port: int
    target: Target | None = None
    options: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class HopSpec:
    scheme: str
    host: str
    port: int
    identities: tuple[IdentityPattern, ...] | None = None
    method: str = "connect"
    options: tuple[tuple[str, str], ...] = field(default=())
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.scheme}://{self.host}:{self.port}"


def _split(text: str, flag: str, defaultScheme: str) -> tuple[str, str, str, list[tuple[str, str]]]:
    rest = text.strip()
    if not rest:
        raise URLError(f"{flag}: empty value")
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        scheme = scheme.lower()
    else:
        scheme = defaultScheme
    query = ""
    if "?" in rest:
        rest, query = rest.split("?", 1)
    path = ""
    # the authority ends at the first '/' that is not inside brackets
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "/" and depth == 0:
            rest, path = rest[:i], rest[i + 1 :]
            break
    if "@" in rest:
        raise URLError(f"{flag} {text}: user:pass@ credentials are not supported by this build yet")
    try:
        options = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise URLError(f"{flag} {text}: malformed query {query!r} (expected key=value&key=value)") from None
    return scheme, rest, unquote(path), options


def _checkScheme(scheme: str, known: dict, flag: str, text: str, kind: str) -> None:
    if scheme in known:
        return
    supported = ", ".join(sorted(known))
    if scheme in _PLANNED:
        raise URLError(f"{flag} {text}: scheme {scheme!r} is not available in this build (supported {kind} schemes: {supported})")
    raise URLError(f"{flag} {text}: unknown scheme {scheme!r} (supported {kind} schemes: {supported})")


def _checkOptions(options, allowed: frozenset, flag: str, text: str) -> None:
    for key, _ in options:
        if key not in allowed:
            hint = f"; it takes {', '.join(sorted(allowed))}" if allowed else "; it takes no options"
            raise URLError(f"{flag} {text}: unknown option {key!r}{hint}")


def parseListener(text: str) -> ListenerSpec:
    """Parse one ``-L`` value."""
    flag = "-L"
    scheme, authority, path, options = _split(text, flag, "auto")
    _checkScheme(scheme, LISTENER_SCHEMES, flag, text, "listener")
    _checkOptions(options, LISTENER_SCHEMES[scheme], flag, text)
    try:
        host, port = parseHostPort(authority, defaultHost="127.0.0.1", allowPortZero=True)
    except AddressError as e:
        raise URLError(f"{flag} {text}: {e} (write [host]:port, e.g. :7000 or 0.0.0.0:15008)") from None
    target = None
    if scheme == "tcp":
        if not path:
            raise URLError(f"{flag} {text}: a tcp listener needs a fixed target: tcp://:7000/host:port")
        try:
            target = parseAuthority(path)
        except AddressError as e:
            raise URLError(f"{flag} {text}: bad target: {e}") from None
    elif path:
        raise URLError(f"{flag} {text}: only tcp:// listeners take a /target")
    return ListenerSpec(scheme, host, port, target, tuple(options), text)


def parseHop(text: str) -> HopSpec:
    """Parse one ``-F`` value."""
    flag = "-F"
    scheme, authority, path, options = _split(text, flag, "http")
    _checkScheme(scheme, HOP_SCHEMES, flag, text, "hop")
    _checkOptions(options, HOP_SCHEMES[scheme], flag, text)
    if path:
        raise URLError(f"{flag} {text}: a hop takes no /path")
    if "," in authority:
        raise URLError(f"{flag} {text}: groups of nodes (a,b) are not available in this build")
    try:
        host, port = parseHostPort(authority)
    except AddressError as e:
        raise URLError(f"{flag} {text}: {e} (write host:port, e.g. gw.example:15008)") from None
    opts = dict(options)
    identities = None
    if "identity" in opts:
        try:
            identities = tuple(
                IdentityPattern.parse(v) for k, v in options if k == "identity" for v in [v] if v
            )
        except SpiffeIdError as e:
            raise URLError(
                f"{flag} {text}: identity=: {e} (expected spiffe://td/ns/N/sa/S or spiffe://td/ns/N/*)"
            ) from None
        if not identities:
            raise URLError(f"{flag} {text}: identity= is empty")
    method = opts.get("method", "connect").lower()
    if method not in ("connect", "post"):
        raise URLError(f"{flag} {text}: method={method!r}; expected connect or post")
    return HopSpec(scheme, host, port, identities, method, tuple(options), text)
