"""The TLS ClientHello, read without terminating TLS (PROTOCOL §8, SECURITY §4.5).

:class:`ClientHelloParser` is a pure, incremental, bounded state machine: feed it
whatever each read produced; it answers "need more" (None), the parsed
:class:`ClientHello`, or raises :class:`ClientHelloError`. It keeps every byte it was
given (``raw``) so the gateway can replay them unchanged. No reactor, no sockets.

Bounds: a record is 1-16 384 bytes, the hello spans at most 4 records, its declared
length is at most 16 384, so at most 4 x 5 + 16 384 + 4 bytes of hello are ever
buffered; the first byte that is not a TLS handshake record ends the parse at once
(plaintext is never buffered).

:func:`parseIstioSni` reads Istio's ``outbound_.<port>_.<subset>_.<fqdn>`` form.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["ClientHello", "ClientHelloError", "ClientHelloParser", "IstioName", "parseIstioSni",
           "checkServerName", "UNRECOGNIZED_NAME_ALERT", "MAX_RECORD", "MAX_RECORDS", "MAX_HELLO"]

MAX_RECORD = 16384  # RFC 8446 §5.1
MAX_RECORDS = 4
MAX_HELLO = 16384  # the declared handshake length
#: A fatal ``unrecognized_name`` alert (112) in a TLS 1.2-versioned record.
UNRECOGNIZED_NAME_ALERT = bytes.fromhex("15030300020270")

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")


class ClientHelloError(ValueError):
    """Not a usable ClientHello. ``kind``: ``not_tls`` (the first bytes are not a
    TLS handshake record), ``too_large`` (over a size cap), ``malformed``, or
    ``bad_name`` (the server_name is not one hbone routes)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ClientHello:
    serverName: str | None  # lowercased; None: no server_name extension
    records: int  # TLS records the hello spanned
    helloBytes: int  # bytes of ``raw`` up to the end of the record that completed the hello


class ClientHelloParser:
    """Feed bytes; see the module docstring."""

    def __init__(self) -> None:
        self.raw = bytearray()  # every byte fed, for the replay
        self._pos = 0  # next unparsed record header in ``raw``
        self._handshake = bytearray()  # record payloads so far
        self._records = 0
        self.result: ClientHello | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        """:returns: the hello once complete (and on every later call), else None.
        :raises ClientHelloError: the input cannot be a ClientHello we route."""
        self.raw += data
        if self.result is not None:
            return self.result
        raw = self.raw
        while True:
            available = len(raw) - self._pos
            if available >= 1 and raw[self._pos] != _HANDSHAKE:
                if self._records == 0:
                    raise ClientHelloError("not_tls", f"not TLS: first byte 0x{raw[self._pos]:02x}")
                raise ClientHelloError("malformed", f"a record of type {raw[self._pos]} inside the hello")
            if available >= 2 and raw[self._pos + 1] != 3:
                raise ClientHelloError("not_tls" if self._records == 0 else "malformed",
                                       f"record version major {raw[self._pos + 1]}, not 3")
            if available < 5:
                return None
            length = int.from_bytes(raw[self._pos + 3:self._pos + 5], "big")
            if length == 0:
                raise ClientHelloError("malformed", "an empty handshake record")
            if length > MAX_RECORD:
                raise ClientHelloError("too_large", f"record length {length} > {MAX_RECORD}")
            if self._records >= MAX_RECORDS:
                raise ClientHelloError("too_large", f"the hello spans more than {MAX_RECORDS} records")
            if available < 5 + length:
                # fail early (a declared length over the cap) from what has arrived
                self._checkHeader(raw[self._pos + 5:self._pos + 5 + length])
                return None
            self._handshake += raw[self._pos + 5:self._pos + 5 + length]
            self._pos += 5 + length
            self._records += 1
            total = self._checkHeader()
            if total is not None and len(self._handshake) >= 4 + total:
                serverName = _parseBody(bytes(self._handshake[4:4 + total]))
                self.result = ClientHello(serverName, self._records, self._pos)
                return self.result

    def _checkHeader(self, partial: bytes | bytearray = b"") -> int | None:
        hs = self._handshake + partial if partial else self._handshake
        if not hs:
            return None
        if hs[0] != _CLIENT_HELLO:
            raise ClientHelloError("malformed", f"handshake type {hs[0]}, not ClientHello (1)")
        if len(hs) < 4:
            return None
        total = int.from_bytes(hs[1:4], "big")
        if total > MAX_HELLO:
            raise ClientHelloError("too_large", f"declared hello length {total} > {MAX_HELLO}")
        if total < 38:
            raise ClientHelloError("malformed", f"declared hello length {total} is too short")
        return total


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ClientHelloError("malformed", f"truncated {what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, lengthBytes: int, what: str) -> bytes:
        return self.take(self.int(lengthBytes, f"{what} length"), what)

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _parseBody(body: bytes) -> str | None:
    r = _Reader(body)
    r.take(2, "legacy_version")
    r.take(32, "random")
    session = r.vector(1, "legacy_session_id")
    if len(session) > 32:
        raise ClientHelloError("malformed", f"session id of {len(session)} bytes")
    suites = r.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise ClientHelloError("malformed", "cipher_suites empty or of odd length")
    if not r.vector(1, "legacy_compression_methods"):
        raise ClientHelloError("malformed", "no compression method")
    if r.left == 0:
        return None  # no extensions: no SNI
    extensions = _Reader(r.vector(2, "extensions"))
    if r.left:
        raise ClientHelloError("malformed", f"{r.left} bytes after the extensions")
    seen: set[int] = set()
    serverName = None
    while extensions.left:
        kind = extensions.int(2, "extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise ClientHelloError("malformed", f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            serverName = _parseServerName(data)
    return serverName


def _parseServerName(data: bytes) -> str:
    r = _Reader(data)
    names = _Reader(r.vector(2, "server_name_list"))
    if r.left:
        raise ClientHelloError("malformed", "bytes after the server_name_list")
    found = []
    while names.left:
        kind = names.int(1, "name_type")
        name = names.vector(2, "host_name")
        found.append((kind, name))
    if len(found) != 1 or found[0][0] != 0:
        raise ClientHelloError("bad_name", f"server_name must hold exactly one host_name, not {len(found)} entries")
    try:
        text = found[0][1].decode("ascii")
    except UnicodeDecodeError:
        raise ClientHelloError("bad_name", "server_name is not ASCII") from None
    return checkServerName(text)


def checkServerName(name: str) -> str:
    """A server name hbone routes: 1-253 bytes of ``[A-Za-z0-9._-]``, no empty
    label, no trailing dot, not an IP literal (RFC 6066 §3). Returns it lowercased.

    :raises ClientHelloError: (``bad_name``) naming what is wrong."""
    shown = name if len(name) <= 64 else name[:61] + "..."
    if not _NAME.fullmatch(name):
        raise ClientHelloError("bad_name", f"server_name {shown!r}: expected 1-253 of A-Z a-z 0-9 . _ -")
    if name.endswith("."):
        raise ClientHelloError("bad_name", f"server_name {shown!r} ends with a dot")
    if "" in name.split("."):
        raise ClientHelloError("bad_name", f"server_name {shown!r} has an empty label")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name.lower()
    raise ClientHelloError("bad_name", f"server_name {shown!r} is an IP literal (RFC 6066 §3)")


@dataclass(frozen=True)
class IstioName:
    port: int
    subset: str  # "" when none
    fqdn: str

    def authority(self) -> str:
        return f"{self.fqdn}:{self.port}"


def parseIstioSni(name: str) -> IstioName | None:
    """``outbound_.<port>_.<subset>_.<fqdn>`` (an empty subset is ``_``), or None
    when ``name`` is not in that form (Istio ``BuildDNSSrvSubsetKey``)."""
    prefix = "outbound_."
    if not name.startswith(prefix):
        return None
    portLabel, dot, rest = name[len(prefix):].partition(".")
    if not dot or not portLabel.endswith("_") or not portLabel[:-1].isdigit() or len(portLabel) > 6:
        return None
    port = int(portLabel[:-1])
    if not 1 <= port <= 65535 or portLabel[0] == "0":
        return None
    subsetLabel, dot, fqdn = rest.partition(".")
    if not dot or not fqdn or not subsetLabel.endswith("_"):
        return None
    subset = subsetLabel[:-1]
    if subset and not re.fullmatch(r"[A-Za-z0-9-]+", subset):
        return None
    if "_" in fqdn or "" in fqdn.split("."):
        return None
    return IstioName(port, subset.lower(), fqdn.lower())
