"""The ``hbone:`` client endpoint string (``clientFromString(reactor, "hbone:...")``).

    hbone:host=127.0.0.1:port=15008:target=127.0.0.1\\:9000:certs=/etc/hbone/client
         :identity=spiffe\\://cluster.local/ns/default/sa/server

Fields (all ``key=value``; ``:`` separates fields, so a ``:`` inside a value is
written ``\\:`` and a backslash ``\\\\``, as ``quoteStringArgument`` writes them):

``host``      the HBONE peer (IP or DNS name; an IPv6 address as ``[\\:\\:1]``)
``port``      its port (default 15008)
``target``    where the tunnel goes, ``HOST\\:PORT`` (``[v6]\\:PORT`` for IPv6)
``certs``     our identity: a directory with cert-chain.pem, key.pem, root-cert.pem;
              or ``cert``, ``key`` and ``ca`` naming the three files
``identity``  the SPIFFE ID (or ``spiffe://td/ns/N/*``) the peer must present; a
              comma separates several; without it any SVID of our trust domain is
              accepted and logged
``method``    ``connect`` (default) or ``post`` (the ``POST /_hbone/`` form)
``tls``       ``mtls`` (default: SPIFFE mutual TLS) or ``server``: toward an L7 load
              balancer that terminates TLS, server-auth TLS checked by DNS name (or IP)
              and a bearer JWT-SVID from ``token``; an identity (``certs``) is then
              optional and only presented if the load balancer asks for one
``token``     ``@FILE``: a file holding the JWT-SVID sent as ``authorization: Bearer``
              (``tls=server``; never the token itself in the string)
``servername`` ``tls=server``: the name the certificate must carry (default: ``host``)
``cafile``    ``tls=server``: the CA bundle (PEM) the load balancer's chain must reach
              (default: the system's)

Endpoints parsed for the same reactor and the same identity files share one
:class:`hbone.h2.client.Pool`, so their tunnels to one peer ride one mTLS HTTP/2
connection. The pools close when the reactor shuts down, or with
:func:`closeEndpointPools`.

The plugin object lives in ``twisted/plugins/hbone_endpoints.py``. This module is
imported whenever a program asks ``clientFromString`` for a prefix Twisted does not
know, so it imports nothing heavy until an ``hbone:`` string is parsed.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
from twisted.plugin import IPlugin
from zope.interface import implementer

__all__ = ["EndpointStringError", "HBoneClientParser", "H2RServerParser", "closeEndpointPools", "EXAMPLE",
           "H2R_EXAMPLE"]

#: A complete string, as a user types it in Python source (``r"..."``).
EXAMPLE = (
    r"hbone:host=127.0.0.1:port=15008:target=127.0.0.1\:9000:certs=./client"
    r":identity=spiffe\://cluster.local/ns/default/sa/server"
)

FIELDS = ("host", "port", "target", "certs", "cert", "key", "ca", "identity", "method", "tls", "token",
          "servername", "cafile")


class EndpointStringError(ValueError):
    """An ``hbone:`` endpoint string that cannot be used; the message names the field."""


def _fail(message: str) -> EndpointStringError:
    return EndpointStringError(f"hbone: endpoint string: {message} (e.g. {EXAMPLE})")


def _checkFields(args, kwargs, fields, fail) -> None:
    """Every field is key=value and one of ``fields``; ``fail`` makes the error."""
    if args:
        raise fail(rf"stray field {args[0]!r}: every field is key=value, and a ':' inside a "
                   rf"value is written '\:'")
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise fail(f"unknown field {unknown[0]}=; the fields are {', '.join(fields)}")


# reactor -> {identity files: (Identity, Pool)}, until closeEndpointPools or shutdown
_pools: dict[object, dict[tuple, tuple]] = {}
# reactor -> the "before shutdown" trigger that closes its pools
_triggers: dict[object, object] = {}


def _identityKey(certs, cert, key, ca, required: bool = True) -> tuple:
    if certs is None and cert is None and key is None and ca is None and not required:
        return ("none",)
    if certs is not None:
        if cert is not None or key is not None or ca is not None:
            raise _fail("give certs= or cert=, key= and ca=, not both")
        return ("certs", os.path.realpath(certs))
    given = {"cert": cert, "key": key, "ca": ca}
    if not any(v is not None for v in given.values()):
        raise _fail("no identity: add certs=DIR (cert-chain.pem, key.pem, root-cert.pem) "
                    "or cert=FILE:key=FILE:ca=FILE")
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise _fail(f"{'= and '.join(missing)}= missing: cert=, key= and ca= go together")
    return ("files", os.path.realpath(cert), os.path.realpath(key), os.path.realpath(ca))


def _sharedPool(reactor, identityKey: tuple):
    """The pool for ``reactor`` and these identity files, made (and the files read) once."""
    from hbone.h2.client import Pool
    from hbone.tls import Identity, IdentityConfigError

    entry = _pools.get(reactor, {}).get(identityKey)
    if entry is None:
        try:
            if identityKey[0] == "none":
                identity = None
            elif identityKey[0] == "certs":
                identity = Identity.fromDirectory(identityKey[1])
            else:
                identity = Identity.fromFiles(*identityKey[1:])
        except IdentityConfigError as e:
            field = "certs=" if identityKey[0] == "certs" else "cert=/key=/ca="
            raise _fail(f"{field}: {e}") from None
        if reactor not in _pools:
            _pools[reactor] = {}
            _triggers[reactor] = reactor.addSystemEventTrigger("before", "shutdown", _closeAtShutdown, reactor)
        entry = _pools[reactor][identityKey] = (identity, Pool(reactor, identity))
    return entry[1]


def closeEndpointPools(reactor):
    """Close the pools that ``hbone:`` endpoints of ``reactor`` share (their tunnels
    end). Endpoints parsed before cannot connect afterwards; parse new ones.

    :return: a Deferred that fires when every connection has closed.
    """
    trigger = _triggers.pop(reactor, None)
    if trigger is not None:
        reactor.removeSystemEventTrigger(trigger)
    return _close(reactor)


def _closeAtShutdown(reactor):
    _triggers.pop(reactor, None)
    return _close(reactor)


def _close(reactor):
    from twisted.internet import defer

    perReactor = _pools.pop(reactor, None) or {}
    return defer.DeferredList([pool.closeAll() for _, pool in perReactor.values()])


def _hostOf(value: str, port: int) -> str:
    from hbone.address import AddressError, parseAuthority

    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    authority = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
    try:
        return parseAuthority(authority).host
    except AddressError as e:
        raise _fail(f"host={value!r}: {e}") from None


def _portOf(value) -> int:
    value = str(value)
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise _fail(f"port={value!r}: expected a port number 1-65535")
    return int(value)


def _targetOf(value: str | None):
    from hbone.address import AddressError, parseAuthority

    if not value:
        raise _fail(r"target= missing: where the tunnel goes, written HOST\:PORT")
    try:
        return parseAuthority(value)
    except AddressError as e:
        raise _fail(rf"target={value!r}: {e} (write HOST\:PORT, or [v6]\:PORT)") from None


def _identitiesOf(value: str | None):
    if value is None:
        return None
    from hbone.identity import IdentityPattern, SpiffeIdError

    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise _fail("identity= is empty")
    try:
        return tuple(IdentityPattern.parse(p) for p in parts)
    except SpiffeIdError as e:
        raise _fail(rf"identity={value!r}: {e} (write spiffe\://td/ns/N/sa/S or spiffe\://td/ns/N/*)") from None


def parseClient(reactor, *args: str, **kwargs: str):
    """``clientFromString``'s fields -> an :class:`hbone.h2.client.HBoneClientEndpoint`."""
    _checkFields(args, kwargs, FIELDS, _fail)
    if not kwargs.get("host"):
        raise _fail("host= missing: the HBONE peer's address")
    port = _portOf(kwargs.get("port", "15008"))
    host = _hostOf(kwargs["host"], port)
    target = _targetOf(kwargs.get("target"))
    identities = _identitiesOf(kwargs.get("identity"))
    method = kwargs.get("method", "connect").lower()
    if method not in ("connect", "post"):
        raise _fail(f"method={kwargs['method']!r}: expected connect or post")
    tls = kwargs.get("tls", "mtls").lower()
    if tls not in ("mtls", "server"):
        raise _fail(f"tls={kwargs['tls']!r}: expected mtls (default) or server")
    token = kwargs.get("token")
    if token is not None and (not token.startswith("@") or len(token) < 2):
        raise _fail("token= takes @FILE (a file holding the JWT-SVID), never the token itself")
    if tls == "mtls":
        for name in ("token", "servername", "cafile"):
            if kwargs.get(name) is not None:
                raise _fail(f"{name}= applies to tls=server (toward a TLS-terminating load balancer)")
    elif identities is not None:
        raise _fail("identity= needs tls=mtls; with tls=server the load balancer is checked by DNS name")
    key = _identityKey(kwargs.get("certs"), kwargs.get("cert"), kwargs.get("key"), kwargs.get("ca"),
                       required=tls == "mtls")

    from hbone.h2.client import HBoneClientEndpoint, HBoneHop

    pool = _sharedPool(reactor, key)
    try:
        hop = HBoneHop(host, port, identities, method, tls=tls, token=token[1:] if token else None,
                       serverName=kwargs.get("servername"), caFile=kwargs.get("cafile"))
    except ValueError as e:
        raise _fail(str(e)) from None
    return HBoneClientEndpoint(pool, hop, target)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class HBoneClientParser:
    """The ``hbone:`` prefix for :func:`twisted.internet.endpoints.clientFromString`."""

    prefix = "hbone"

    def parseStreamClient(self, reactor, *args, **kwargs):
        return parseClient(reactor, *args, **kwargs)


# -- the h2r: server endpoint string -------------------------------------------------------------

#: A complete ``h2r:`` string.
H2R_EXAMPLE = (
    r"h2r:host=gw.example:port=15441:name=laptop:expose=22:certs=./laptop"
    r":identity=spiffe\://cluster.local/ns/default/sa/gw"
)
H2R_FIELDS = ("host", "port", "name", "expose", "certs", "cert", "key", "ca", "identity")


def _h2rFail(message: str) -> EndpointStringError:
    return EndpointStringError(f"h2r: endpoint string: {message} (e.g. {H2R_EXAMPLE})")


def parseH2RServer(reactor, *args: str, **kwargs: str):
    """``serverFromString``'s fields -> an :class:`hbone.h2r.H2RServerEndpoint`.

    ``host``/``port`` the gateway (a comma in ``host`` registers with several, each on
    ``port``); ``name`` the name the gateway binds to our identity; ``expose`` the
    port(s) of that name served by the factory (comma-separated); our identity
    (``certs`` or ``cert``/``key``/``ca``); ``identity`` the gateway's SPIFFE ID."""
    _checkFields(args, kwargs, H2R_FIELDS, _h2rFail)
    hosts = [h.strip() for h in kwargs.get("host", "").split(",") if h.strip()]
    if not hosts:
        raise _h2rFail("host= missing: the gateway's address")
    try:
        port = _portOf(kwargs.get("port", "15441"))
    except EndpointStringError as e:
        raise _h2rFail(str(e).split(": ", 2)[-1].split(" (e.g.")[0]) from None
    name = kwargs.get("name", "").strip().lower()
    if not name:
        raise _h2rFail("name= missing: the name the gateway binds to this node")
    try:
        exposed = [int(p) for p in kwargs.get("expose", "").split(",") if p.strip()]
    except ValueError:
        raise _h2rFail(f"expose={kwargs.get('expose')!r}: expected port numbers, e.g. 22 or 80,443") from None
    if not exposed or not all(0 < p < 65536 for p in exposed):
        raise _h2rFail("expose= missing or out of range: the port(s) of the name this factory serves")
    try:
        identities = _identitiesOf(kwargs.get("identity"))
        key = _identityKey(kwargs.get("certs"), kwargs.get("cert"), kwargs.get("key"), kwargs.get("ca"))
        gateways = [(_hostOf(h, port), port) for h in hosts]
    except EndpointStringError as e:  # the shared checks speak of hbone: strings
        core = str(e).removeprefix("hbone: endpoint string: ").split(" (e.g. hbone:")[0]
        raise _h2rFail(core) from None
    from hbone.h2r import H2RServerEndpoint
    from hbone.tls import Identity, IdentityConfigError

    try:
        identity = Identity.fromDirectory(key[1]) if key[0] == "certs" else Identity.fromFiles(*key[1:])
    except IdentityConfigError as e:
        raise _h2rFail(str(e)) from None
    return H2RServerEndpoint(reactor, identity, gateways, identities, [(name, p) for p in exposed])


from twisted.internet.interfaces import IStreamServerEndpointStringParser  # noqa: E402


@implementer(IPlugin, IStreamServerEndpointStringParser)
class H2RServerParser:
    """The ``h2r:`` prefix for :func:`twisted.internet.endpoints.serverFromString`."""

    prefix = "h2r"

    def parseStreamServer(self, reactor, *args, **kwargs):
        return parseH2RServer(reactor, *args, **kwargs)
