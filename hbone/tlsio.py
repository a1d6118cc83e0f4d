"""The TLS layer under every HBONE connection: Twisted's memory-BIO TLS protocol,
with the bulk path batched.

Twisted's :class:`~twisted.protocols.tls.TLSMemoryBIOProtocol` moves bytes through
pyOpenSSL one record at a time: a large write is cut into 16 KiB slices, each
encrypted by its own ``SSL_write`` and read back from the BIO by its own
``bio_read``; received records are decrypted and handed to the protocol one by
one (16 KiB each), so an HTTP/2 connection parses its input in 16 KiB pieces.
Per record that is a handful of cffi calls, a slice copy and a pass through the
protocol above. On the bulk path those calls cost about a third of the TLS CPU
(docs/performance.md).

:class:`HBoneTLSProtocol` keeps Twisted's state machine (handshake, shutdown,
abort, producer) and changes three things:

* a large write (>= :data:`LARGE_WRITE`) goes to OpenSSL as one ``SSL_write``
  (OpenSSL still emits 16 KiB records) instead of being copied into the
  small-write aggregator; small writes are aggregated as Twisted does;
* the send BIO is drained completely after each write, into one buffer;
* ``writeSequence`` (how HTTP/2 hands over a DATA frame: a 9-byte header and
  the payload as read from the socket) encrypts the pieces in place: small
  pieces are joined with the first bytes of the next large one to fill a
  record, and the rest of it is encrypted without being copied;
* decrypted records are gathered and delivered together, up to
  :data:`MAX_DELIVERY` bytes at a time (one socket read's worth), instead of one
  ``dataReceived`` per record. Once the handshake is done they are decrypted by
  ``SSL_read`` straight into one buffer (pyOpenSSL's own binding, the one its
  ``recv`` calls), so a record costs one C call instead of pyOpenSSL's
  per-call buffer, copy and error check; anything but data or "want read"
  is left to pyOpenSSL's ``recv``, which raises what Twisted expects.

Bounded memory holds: gathering never exceeds what arrived in one
``dataReceived`` plus :data:`MAX_DELIVERY`, and a write is encrypted only when
the protocol above writes (the TCP transport's high-water mark still pauses it).
``tests/test_tlsio.py`` pins the Twisted internals this relies on.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["HBoneTLSProtocol", "HBoneTLSFactory", "TLSClientEndpoint", "LARGE_WRITE", "MAX_DELIVERY"]

LARGE_WRITE = 16 * 1024  # writes this large skip the small-write aggregator
BIO_READ_SIZE = 512 * 1024  # ciphertext read from the send BIO per call
RECORD_SIZE = 16 * 1024  # TLS plaintext per record
RECORD_READ_SIZE = 32 * 1024  # plaintext asked of SSL_read (a record is at most 16 KiB)
MAX_DELIVERY = 256 * 1024  # decrypted bytes gathered before one dataReceived

try:  # pyOpenSSL's cffi binding (cryptography's): SSL_read into our own buffer
    from OpenSSL._util import ffi as _ffi, lib as _lib

    _SSL_read = _lib.SSL_read
    _SSL_get_error = _lib.SSL_get_error
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _buffer = _ffi.buffer
    _BIO_read = _lib.BIO_read
    # one of each per process (the reactor is one thread): copied out before use
    _gather = _ffi.new("char[]", MAX_DELIVERY + RECORD_READ_SIZE)
    _drain = _ffi.new("char[]", BIO_READ_SIZE)
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL layout: the portable loops
    _SSL_read = _BIO_read = None


class HBoneTLSProtocol(BufferingTLSTransport):
    """:class:`BufferingTLSTransport` with batched encryption and delivery."""

    def __init__(self, factory, wrappedProtocol, _connectWrapped: bool = True) -> None:
        super().__init__(factory, wrappedProtocol, _connectWrapped)
        self.write = self._write_or_aggregate  # replaces the aggregator's bound write

    def _write_or_aggregate(self, data: bytes) -> None:
        if len(data) < LARGE_WRITE:
            self._aggregator.write(data)
            return
        self._aggregator.flush()  # what was aggregated goes first
        TLSMemoryBIOProtocol.write(self, data)

    def writeSequence(self, sequence) -> None:
        pieces = list(sequence)
        if len(pieces) == 1:
            self.write(pieces[0])
            return
        if (
            sum(map(len, pieces)) < LARGE_WRITE
            or not self._handshakeDone
            or self._appSendBuffer
            or self._lostTLSConnection
        ):
            self.write(b"".join(pieces))
            return
        self._aggregator.flush()
        if self.disconnecting and self._producer is None:
            return  # as TLSMemoryBIOProtocol.write: nothing after loseConnection
        small: list[bytes] = []
        for piece in pieces:
            if len(piece) < LARGE_WRITE:
                small.append(piece)
                continue
            if small:
                head = b"".join(small)
                small = []
                fill = RECORD_SIZE - len(head)
                if fill > 0:  # fill the record with the start of the large piece
                    head += piece[:fill]
                    piece = memoryview(piece)[fill:]
                self._encrypt(head)
            self._encrypt(piece)
        if small:
            self._encrypt(b"".join(small))
        self._flushSendBIO()

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        self._encrypt(data)
        self._flushSendBIO()

    def _encrypt(self, data) -> None:
        """Hand ``data`` (bytes or a memoryview) to OpenSSL; what it cannot take
        yet is kept, in order, for after the handshake (Twisted's buffer)."""
        if self._lostTLSConnection:
            return
        if self._appSendBuffer:
            self._bufferedWrite(bytes(data))
            return
        view = memoryview(data)
        offset = 0
        total = len(data)
        while offset < total:
            try:
                sent = self._tlsConnection.send(view[offset:] if offset else data)
            except WantReadError:
                self._bufferedWrite(bytes(view[offset:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            offset += sent

    def _flushSendBIO(self) -> None:
        tls = self._tlsConnection
        if tls is None:
            return
        if self._aborted:
            # abortConnection discards what is not sent (ITransport): Twisted's
            # own close_notify, written just before its TCP abort, included.
            # Bytes reach the kernel at once now (splice.tuneTCP), so they are
            # dropped here rather than in the TCP transport's queue.
            try:
                while tls.bio_read(BIO_READ_SIZE):
                    pass
            except WantReadError:
                pass
            return
        out = []
        if _BIO_read is not None:
            bio = tls._from_ssl
            while True:
                n = _BIO_read(bio, _drain, BIO_READ_SIZE)
                if n <= 0:  # empty (a memory BIO asks to retry)
                    break
                out.append(_buffer(_drain, n)[:])
                if n < BIO_READ_SIZE:
                    break
            if out:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            return
        while True:
            try:
                chunk = tls.bio_read(BIO_READ_SIZE)
            except WantReadError:
                break
            out.append(chunk)
            if len(chunk) < BIO_READ_SIZE:
                break
        if not out:
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _flushReceiveBIO(self) -> None:
        tls = self._tlsConnection
        if _SSL_read is not None and self._handshakeDone and not self._lostTLSConnection:
            ssl = tls._ssl
            buf = _gather
            size = 0
            while True:
                n = _SSL_read(ssl, buf + size, RECORD_READ_SIZE)
                if n > 0:
                    size += n
                    if size >= MAX_DELIVERY:
                        self._deliver([_buffer(buf, size)[:]])
                        size = 0
                        if self._lostTLSConnection:
                            return
                    continue
                if _SSL_get_error(ssl, n) == _WANT_READ:
                    if size:
                        self._deliver([_buffer(buf, size)[:]])
                    if self._tlsConnection is not None:
                        self._flushSendBIO()
                    return
                if size:  # what came before the alert or error, first
                    self._deliver([_buffer(buf, size)[:]])
                break  # pyOpenSSL's recv below raises the right exception
        chunks: list[bytes] = []
        size = 0
        while not self._lostTLSConnection:
            try:
                data = tls.recv(RECORD_READ_SIZE)
            except WantReadError:
                break
            except ZeroReturnError:
                # the peer's close_notify: what came before it is delivered first
                self._deliver(chunks)
                chunks, size = [], 0
                if self._lostTLSConnection:
                    break
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(chunks)
                chunks, size = [], 0
                self._tlsShutdownFinished(failure)
            else:
                chunks.append(data)
                size += len(data)
                if size >= MAX_DELIVERY:
                    self._deliver(chunks)
                    chunks, size = [], 0
        self._deliver(chunks)
        if self._tlsConnection is not None:
            self._flushSendBIO()

    def _deliver(self, chunks: list[bytes]) -> None:
        if not chunks or self._aborted:
            return
        ProtocolWrapper.dataReceived(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))


class HBoneTLSFactory(TLSMemoryBIOFactory):
    """:class:`TLSMemoryBIOFactory` building :class:`HBoneTLSProtocol`."""

    protocol = HBoneTLSProtocol


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """``wrapClientTLS`` with :class:`HBoneTLSFactory`: TLS over any stream client
    endpoint; ``connect`` fires with the application protocol."""

    def __init__(self, connectionCreator, wrappedEndpoint, clock=None) -> None:
        self._creator = connectionCreator
        self._endpoint = wrappedEndpoint
        self._clock = clock

    def connect(self, protocolFactory):
        factory = HBoneTLSFactory(self._creator, True, protocolFactory, clock=self._clock)
        return self._endpoint.connect(factory).addCallback(lambda proto: proto.wrappedProtocol)
