"""Certificates minted per test run (SECURITY §5: trustme cannot make URI SANs)."""

from __future__ import annotations

import functools

from hbone.ca import makeCA, makeLeaf
from hbone.tls import Identity

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"


def ca(trustDomain: str = TD):
    """One CA per trust domain for the whole run (``ca()`` is ``ca(TD)``)."""
    return _ca(trustDomain)


@functools.lru_cache(maxsize=None)
def _ca(trustDomain: str):
    return makeCA(trustDomain)


def identity(spiffeId: str, trustDomain: str = TD, caPair=None, federated=None, **leafOptions) -> Identity:
    caCert, caKey = caPair or ca(trustDomain)
    cert, key = makeLeaf(caCert, caKey, uris=[spiffeId], ips=["127.0.0.1"], dns=["localhost"], **leafOptions)
    bundles = {trustDomain: [caCert]}
    for td, bundle in (federated or {}).items():
        bundles[td] = bundle
    return Identity([cert], key, bundles)


@functools.lru_cache(maxsize=None)
def serverIdentity() -> Identity:
    return identity(SERVER_ID)


@functools.lru_cache(maxsize=None)
def clientIdentity() -> Identity:
    return identity(CLIENT_ID)
