"""Build a :class:`hbone.service.Node` from keyword arguments (the embedding front door).

The command line and the config file compile into a :class:`NodeSpec`;
:func:`makeNode` does the same from Python values, with the same parsers and the same
error messages, so an embedding program never imports the internals.
"""

from __future__ import annotations

import os
from typing import Iterable

__all__ = ["makeNode"]


def _strings(value, what: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, os.PathLike)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        from hbone.service import NodeConfigError

        raise NodeConfigError(f"{what}: expected a string or a list of strings, not {type(value).__name__}") from None


def _renamed(message: str, flag: str, keyword: str) -> str:
    return f"{keyword} {message[len(flag) + 1:]}" if message.startswith(flag + " ") else f"{keyword}: {message}"


def makeNode(
    reactor,
    *,
    listen: Iterable[str] | str = (),
    forward: Iterable[str] | str = (),
    certs: str | os.PathLike | None = None,
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
    ca: str | os.PathLike | None = None,
    identity=None,
    allow: Iterable[str] | str = (),
    deny: Iterable[str] | str = (),
    allowPeers: Iterable[str] | str = (),
    config: str | os.PathLike | None = None,
    events=None,
    name: str = "hbone",
    connectTimeout: float = 10.0,
    idleTimeout: float = 3600.0,
):
    """A :class:`hbone.service.Node` (a ``MultiService``) for ``reactor``.

    :param listen: listener URLs, as ``-L`` takes them (``hbone://127.0.0.1:15008``,
        ``tcp://:7000/10.0.0.5:22``, ``socks5://:1080`` ...).
    :param forward: hop URLs, as ``-F`` takes them; in order they form one chain.
    :param certs: an identity directory (cert-chain.pem, key.pem, root-cert.pem);
        or ``cert``, ``key`` and ``ca`` naming the files; or ``identity``, an
        :class:`hbone.tls.Identity` already loaded.
    :param allow: destinations past the default policy (``--allow``).
    :param deny: destinations refused whatever else allows them (``--deny``).
    :param allowPeers: peer identities to accept beyond our namespace (``--allow-peer``).
    :param config: a node config file (``docs/config.md``) instead of all of the above.
    :param events: an :class:`hbone.events.Events` to emit into (default: the node's own,
        ``node.events``).

    The node binds its listeners in ``privilegedStartService``: when its parent
    service starts (twistd), or at once if it joins a parent that is running. Outside
    a service tree, ``await node.startListening()`` then ``node.startService()``.

    :raise hbone.service.NodeConfigError: anything that cannot be built; the message
        names the argument (and the URL, file or key) and what to write instead.
    """
    from hbone.service import Node, NodeConfigError, NodeSpec

    listen = _strings(listen, "listen")
    forward = _strings(forward, "forward")
    allow = _strings(allow, "allow")
    deny = _strings(deny, "deny")
    allowPeers = _strings(allowPeers, "allowPeers")
    identitySources = [n for n, v in (("certs", certs), ("cert", cert), ("key", key), ("ca", ca),
                                      ("identity", identity)) if v is not None]
    if config is not None:
        given = identitySources + [n for n, v in (("listen", listen), ("forward", forward), ("allow", allow), ("deny", deny),
                                                  ("allowPeers", allowPeers)) if v]
        if given:
            raise NodeConfigError(f"config= describes the whole node; {', '.join(given)} go in the file "
                                  f"(docs/config.md), not beside it")
        from hbone.config import ConfigError, loadConfig

        try:
            spec = loadConfig(config)
        except ConfigError as e:
            raise NodeConfigError(str(e)) from None
        return Node(reactor, spec, events=events)

    if not listen:
        raise NodeConfigError("listen: give at least one listener URL, e.g. listen=['hbone://127.0.0.1:15008']")
    from hbone.urls import HopSpec, ListenerSpec, URLError, parseHop, parseListener

    try:
        listeners = tuple(l if isinstance(l, ListenerSpec) else parseListener(os.fspath(l)) for l in listen)
    except URLError as e:
        raise NodeConfigError(_renamed(str(e), "-L", "listen")) from None
    try:
        hops = tuple(h if isinstance(h, HopSpec) else parseHop(os.fspath(h)) for h in forward)
    except URLError as e:
        raise NodeConfigError(_renamed(str(e), "-F", "forward")) from None
    if len([n for n in identitySources if n in ("certs", "identity")]) + bool({"cert", "key", "ca"} & set(identitySources)) > 1:
        raise NodeConfigError(f"{', '.join(identitySources)}: give one identity: certs=DIR, "
                              f"or cert=, key= and ca=, or identity=Identity")
    if identity is None and identitySources:
        from hbone.tls import Identity, IdentityConfigError

        try:
            if certs is not None:
                identity = Identity.fromDirectory(certs)
            else:
                missing = [n for n in ("cert", "key", "ca") if n not in identitySources]
                if missing:
                    raise NodeConfigError(f"{', '.join(missing)}: missing; cert=, key= and ca= go together")
                identity = Identity.fromFiles(cert, key, ca)
        except IdentityConfigError as e:
            raise NodeConfigError(f"{'certs' if certs is not None else 'cert'}: {e}") from None
    spec = NodeSpec(
        listeners=listeners,
        hops=hops,
        identity=identity,
        allow=tuple(allow),
        deny=tuple(deny),
        allowPeers=tuple(allowPeers),
        name=name,
        connectTimeout=connectTimeout,
        idleTimeout=idleTimeout,
    )
    return Node(reactor, spec, events=events)
