"""gost-style ``-L``/``-F`` URLs -> listener and hop specs (pure).

    LISTENER = [scheme://][user:pass@][host]:port[/target][?key=value&...]
    HOP      = [scheme://][user:pass@]host:port[,host:port...][?key=value&...]

An omitted listener host means 127.0.0.1 (SECURITY §4.3), unlike gost. No scheme
means ``auto`` for a listener (HTTP and SOCKS sniffed) and ``http`` for a hop
(gost's defaults). A comma list in a hop is a group of equivalent nodes. Every error
names the URL, the part that is wrong, and shows what to write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from hbone.address import AddressError, Target, parseAuthority, parseHostPort
from hbone.identity import IdentityPattern, SpiffeIdError

__all__ = ["URLError", "ListenerSpec", "HopSpec", "parseListener", "parseHop",
           "LISTENER_SCHEMES", "HOP_SCHEMES", "PROXY_LISTENERS"]

#: Listener schemes, the options each takes, and an example.
LISTENER_SCHEMES = {
    "tcp": (frozenset(), "tcp://:7000/10.0.0.5:22"),
    "hbone": (frozenset(), "hbone://0.0.0.0:15008"),
    "http": (frozenset(), "http://:8080"),
    "socks5": (frozenset(), "socks5://user:pass@0.0.0.0:1080"),
    "socks4": (frozenset(), "socks4://:1080"),
    "socks4a": (frozenset(), "socks4a://:1080"),
    "auto": (frozenset(), ":8080"),
    "h2c": (frozenset({"jwks", "audience", "insecure"}), "h2c://:15009?jwks=jwks.json&audience=https://lb.example"),
    "sni": (frozenset(), "sni://0.0.0.0:15443"),
    "admin": (frozenset(), "admin://127.0.0.1:15000"),
    "h2r": (frozenset({"bind"}), "h2r://0.0.0.0:15441?bind=laptop=spiffe://cluster.local/ns/default/sa/laptop"),
    "rtcp": (frozenset(), "rtcp://laptop:22/127.0.0.1:22"),
}
#: Hop schemes, the options each takes, and an example.
HOP_SCHEMES = {
    "hbone": (frozenset({"identity", "method", "tls", "token", "ca", "servername"}),
              "hbone://gw.example:15008?identity=spiffe://cluster.local/ns/istio-system/sa/gw"),
    "h2c": (frozenset({"token", "method"}), "h2c://lb.example:80?token=@/run/hbone/jwt"),
    "http2": (frozenset({"ca", "servername"}), "http2://user:pass@proxy.example:443"),
    "http": (frozenset(), "http://proxy.example:3128"),
    "socks5": (frozenset(), "socks5://user:pass@proxy.example:1080"),
    "h2r": (frozenset({"identity"}), "h2r://gw.example:15441?identity=spiffe://cluster.local/ns/default/sa/gw"),
}
PROXY_LISTENERS = frozenset({"http", "socks5", "socks4", "socks4a", "auto"})


class URLError(ValueError):
    """A ``-L``/``-F`` value that cannot be used; the message says what to write."""


@dataclass(frozen=True)
class ListenerSpec:
    scheme: str
    host: str
    port: int
    target: Target | None = None
    options: tuple[tuple[str, str], ...] = ()
    credentials: tuple[str, str] | None = None
    text: str = ""
    chain: tuple["HopSpec", ...] | None = None  # None: the node's chain
    name: str | None = None  # the config file's [listener:NAME]

    def option(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.options:
            if k == key:
                return v
        return default

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
    credentials: tuple[str, str] | None = None
    nodes: tuple[tuple[str, int], ...] = ()  # every node of a group, (host, port)
    text: str = ""

    def option(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.options:
            if k == key:
                return v
        return default

    def __str__(self) -> str:
        return self.text or f"{self.scheme}://{self.host}:{self.port}"


def _split(text: str, flag: str, defaultScheme: str):
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
    depth = 0
    for i, ch in enumerate(rest):  # the authority ends at the first '/' outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "/" and depth == 0:
            rest, path = rest[:i], rest[i + 1 :]
            break
    credentials = None
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, colon, password = userinfo.partition(":")
        if not colon or not user:
            raise URLError(f"{flag} {text}: credentials must be user:pass@")
        credentials = (unquote(user), unquote(password))
    try:
        options = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise URLError(f"{flag} {text}: malformed query {query!r} (expected key=value&key=value)") from None
    return scheme, rest, unquote(path), options, credentials


def _checkScheme(scheme: str, known: dict, flag: str, text: str, kind: str) -> None:
    if scheme in known:
        return
    supported = ", ".join(sorted(known))
    if scheme == "mtls":
        raise URLError(f"{flag} {text}: 'mtls' is gost's multiplexed TLS; mutual TLS is what "
                       f"hbone:// always is (e.g. {known['hbone'][1]})")
    raise URLError(f"{flag} {text}: unknown scheme {scheme!r} (supported {kind} schemes: {supported})")


def _checkOptions(options, allowed: frozenset, example: str, flag: str, text: str) -> None:
    for key, _ in options:
        if key not in allowed:
            hint = f"; it takes {', '.join(sorted(allowed))}" if allowed else "; it takes no options"
            raise URLError(f"{flag} {text}: unknown option {key!r}{hint} (e.g. {example})")


def parseListener(text: str) -> ListenerSpec:
    """Parse one ``-L`` value."""
    flag = "-L"
    scheme, authority, path, options, credentials = _split(text, flag, "auto")
    _checkScheme(scheme, LISTENER_SCHEMES, flag, text, "listener")
    allowed, example = LISTENER_SCHEMES[scheme]
    _checkOptions(options, allowed, example, flag, text)
    try:
        host, port = parseHostPort(authority, defaultHost="127.0.0.1", allowPortZero=True)
    except AddressError as e:
        raise URLError(f"{flag} {text}: {e} (write [host]:port, e.g. {example})") from None
    if credentials is not None and scheme not in PROXY_LISTENERS:
        raise URLError(f"{flag} {text}: only http, socks and auto listeners take user:pass@")
    target = None
    if scheme == "rtcp" and authority.startswith(":"):
        raise URLError(f"{flag} {text}: an rtcp export needs the NAME it is reached by: {example}")
    if scheme == "h2r":
        from hbone.h2r import parseBindings

        try:
            parseBindings(v for k, v in options if k == "bind")
        except ValueError as e:
            raise URLError(f"{flag} {text}: {e}") from None
    if scheme in ("tcp", "rtcp"):
        if not path:
            raise URLError(f"{flag} {text}: a {scheme} listener needs a fixed target: {example}")
        try:
            target = parseAuthority(path)
        except AddressError as e:
            raise URLError(f"{flag} {text}: bad target: {e} (e.g. {example})") from None
    elif path:
        raise URLError(f"{flag} {text}: only tcp:// and rtcp:// listeners take a /target")
    return ListenerSpec(scheme, host, port, target, tuple(options), credentials, text)


def parseHop(text: str) -> HopSpec:
    """Parse one ``-F`` value."""
    flag = "-F"
    scheme, authority, path, options, credentials = _split(text, flag, "http")
    _checkScheme(scheme, HOP_SCHEMES, flag, text, "hop")
    allowed, example = HOP_SCHEMES[scheme]
    _checkOptions(options, allowed, example, flag, text)
    if path:
        raise URLError(f"{flag} {text}: a hop takes no /path")
    nodes = []
    for part in authority.split(","):
        try:
            nodes.append(parseHostPort(part.strip()))
        except AddressError as e:
            raise URLError(f"{flag} {text}: {e} (write host:port, e.g. {example})") from None
    if credentials is not None and scheme in ("hbone", "h2c", "h2r"):
        raise URLError(f"{flag} {text}: {scheme} hops authenticate with certificates or ?token=@FILE, not user:pass@")
    opts = dict(options)
    identities = None
    if "identity" in opts:
        try:
            identities = tuple(IdentityPattern.parse(v) for k, v in options if k == "identity" and v)
        except SpiffeIdError as e:
            raise URLError(f"{flag} {text}: identity=: {e} "
                           f"(expected spiffe://td/ns/N/sa/S or spiffe://td/ns/N/*)") from None
        if not identities:
            raise URLError(f"{flag} {text}: identity= is empty")
    method = opts.get("method", "connect").lower()
    if method not in ("connect", "post"):
        raise URLError(f"{flag} {text}: method={method!r}; expected connect or post")
    tls = opts.get("tls", "mtls")
    if tls not in ("mtls", "server"):
        raise URLError(f"{flag} {text}: tls={tls!r}; expected mtls (default) or server")
    token = opts.get("token")
    if token is not None and not token.startswith("@"):
        raise URLError(f"{flag} {text}: token= takes @FILE (a file holding the JWT-SVID), "
                       f"never the token itself")
    if tls == "server" and identities is not None:
        raise URLError(f"{flag} {text}: identity= needs mutual TLS; with tls=server the "
                       f"server is checked by DNS name")
    host, port = nodes[0]
    return HopSpec(scheme, host, port, identities, method, tuple(options), credentials, tuple(nodes), text)
