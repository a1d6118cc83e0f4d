"""Certificate rotation: watch the SVID files, load a renewed one, warn before expiry.

SVIDs live for hours or days (Istio's default is 24 h) and are renewed by rewriting
``cert-chain.pem``/``key.pem`` (and sometimes ``root-cert.pem``) in place.
:class:`IdentityWatcher` looks at the files' (inode, size, mtime) every
``interval`` seconds; when they change it loads them as a new
:class:`hbone.tls.Identity` and, if that succeeds, rotates the node's identity in
place: new handshakes (both roles) use the new certificate, live connections keep
the one they were made with (PROTOCOL §2). Files caught half-written (a key that
does not match the certificate yet) fail to load; the old SVID stays in use and the
next change is tried again. Expiry is logged once per state: within
``warnFraction`` of the certificate's lifetime (or ``warnBefore`` seconds, whichever
is longer), and expired.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hbone.events import CertificateRotated, CertificateRotationFailed
from hbone.tls import Identity, IdentityConfigError

__all__ = ["IdentityWatcher", "expiryState"]


def _signature(paths) -> tuple:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def expiryState(identity: Identity, now: float, warnBefore: float = 3600.0,
                warnFraction: float = 0.2) -> str:
    """``"valid"``, ``"expiring"`` (within the warning window) or ``"expired"``."""
    leaf = identity.chain[0]
    notAfter = leaf.not_valid_after_utc.timestamp()
    lifetime = notAfter - leaf.not_valid_before_utc.timestamp()
    if now >= notAfter:
        return "expired"
    if now >= notAfter - max(warnBefore, warnFraction * lifetime):
        return "expiring"
    return "valid"


class IdentityWatcher:
    """Polls an identity's files; see the module docstring.

    :param identity: the node's :class:`Identity` (loaded with ``fromFiles`` or
        ``fromDirectory``), rotated in place.
    :param events: an :class:`hbone.events.Events` for ``CertificateRotated`` and
        ``CertificateRotationFailed``.
    """

    log = Logger(namespace="hbone")

    def __init__(self, clock, identity: Identity, interval: float = 5.0, events=None,
                 warnBefore: float = 3600.0, warnFraction: float = 0.2) -> None:
        if identity.files is None:
            raise ValueError(f"{identity.source}: not loaded from files; nothing to watch")
        self.clock = clock
        self.identity = identity
        self.interval = interval
        self.events = events
        self.warnBefore = warnBefore
        self.warnFraction = warnFraction
        chain, key, roots, federated = identity.files
        self.paths = (chain, key, roots, *federated.values())
        self._seen = _signature(self.paths)
        self._state = "valid"
        self._loop: LoopingCall | None = None
        self.rotations = 0
        self.failures = 0

    def start(self) -> None:
        self.checkExpiry()
        if self.interval > 0 and self._loop is None:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> bool:
        """Look at the files now (also what SIGHUP does); True if the identity rotated."""
        seen = _signature(self.paths)
        rotated = False
        if seen != self._seen:
            self._seen = seen
            rotated = self._load()
        self.checkExpiry()
        return rotated

    def _load(self) -> bool:
        source = str(self.identity.files[0])
        try:
            new = self.identity.reloaded()
        except IdentityConfigError as e:
            self.failures += 1
            self.log.error("certificate files changed but do not load; still using the old SVID "
                           "(valid until {until}): {error}",
                           until=_fmt(self.identity.notAfter), error=str(e))
            if self.events is not None:
                self.events.emit(CertificateRotationFailed(str(self.identity.localId), source, str(e)))
            return False
        old = self.identity.notAfter
        self.identity.rotate(new)
        self.rotations += 1
        self._state = "valid"
        self.log.info("certificate rotated: {id}, valid until {until} (was {old}); new handshakes "
                      "use it, live connections keep theirs",
                      id=str(self.identity.localId), until=_fmt(self.identity.notAfter), old=_fmt(old))
        if self.events is not None:
            self.events.emit(CertificateRotated(str(self.identity.localId),
                                                self.identity.notAfter.timestamp(), source))
        return True

    def checkExpiry(self) -> str:
        state = expiryState(self.identity, self.clock.seconds(), self.warnBefore, self.warnFraction)
        if state != self._state:
            self._state = state
            if state == "expired":
                self.log.error("certificate of {id} EXPIRED at {until}: peers refuse new handshakes; "
                               "renew {path}", id=str(self.identity.localId),
                               until=_fmt(self.identity.notAfter), path=str(self.identity.files[0]))
            elif state == "expiring":
                self.log.warn("certificate of {id} expires at {until}; renew {path} (it is picked "
                              "up without a restart)", id=str(self.identity.localId),
                              until=_fmt(self.identity.notAfter), path=str(self.identity.files[0]))
        return state


def _fmt(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
