"""Pins the h2 internals hbone relies on (PROTOCOL §3 "GOAWAY and drain", §4;
SECURITY §4.4, S13), so an h2 upgrade that changes them fails here, loudly.

hbone.h2.connection.HBoneH2Connection depends on:
* h2 >= 4.4.1 accepting an RFC 9113 CONNECT (no :scheme/:path) and refusing one
  with :path as a connection error;
* ``H2Connection._frame_dispatch_table`` (per instance, keyed by frame class), to
  replace GOAWAY receipt;
* ``local_settings`` / ``decoder.max_header_list_size`` / ``max_inbound_frame_size``
  being what h2 consults, so settings are in force before the peer's ACK;
* ``H2Stream._expected_content_length``, to leave POST body length checks to hbone
  (a stream error there, a connection error in h2).
"""

from __future__ import annotations

import h2
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
)
from h2.exceptions import DenialOfServiceError, InvalidBodyLengthError, ProtocolError
from h2.settings import SettingCodes
from h2.stream import H2Stream
from hpack import Encoder
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from hbone.h2.connection import ConnectionSettings, HBoneH2Connection
from tests.h2harness import PREFACE, Harness, parseFrames

MiB = 1024 * 1024


def serverConn(hbone: bool = True) -> H2Connection:
    config = H2Configuration(client_side=False, header_encoding=None)
    conn = HBoneH2Connection(config, ConnectionSettings()) if hbone else H2Connection(config)
    conn.initiate_connection()
    conn.increment_flow_control_window(16 * MiB - 65535)  # as HBoneH2Protocol does
    conn.clear_outbound_data_buffer()
    return conn


def headersFrame(sid: int, headers, encoder: Encoder | None = None, end: bool = False) -> bytes:
    f = HeadersFrame(sid)
    f.data = (encoder or Encoder()).encode(headers)
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()


def clientPreface() -> bytes:
    """A client's preface and an empty SETTINGS: the peer has not ACKed ours."""
    return PREFACE + SettingsFrame(0).serialize()


def goAwayFrame(last: int, code: int = 0) -> bytes:
    return GoAwayFrame(0, last_stream_id=last, error_code=code).serialize()


def openConnectStream(conn: H2Connection, sid: int = 1) -> None:
    events = conn.receive_data(
        clientPreface() + headersFrame(sid, [(b":method", b"CONNECT"), (b":authority", b"a.example:443")])
    )
    assert [type(e) for e in events if isinstance(e, RequestReceived)] == [RequestReceived]
    conn.clear_outbound_data_buffer()


def versionTuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# -- version and CONNECT (S13) -------------------------------------------------


def test_h2_version_floor():
    assert versionTuple(h2.__version__) >= (4, 4, 1), h2.__version__


@pytest.mark.parametrize("hbone", [False, True], ids=["stock", "hbone"])
def test_rfc9113_connect_accepted(hbone):
    conn = serverConn(hbone)
    events = conn.receive_data(
        clientPreface() + headersFrame(1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
    )
    requests = [e for e in events if isinstance(e, RequestReceived)]
    assert len(requests) == 1
    assert requests[0].headers == [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]


@pytest.mark.parametrize("hbone", [False, True], ids=["stock", "hbone"])
@pytest.mark.parametrize(
    "extra",
    [[(b":path", b"/")], [(b":scheme", b"https")], [(b":scheme", b"https"), (b":path", b"/")]],
    ids=["path", "scheme", "both"],
)
def test_connect_with_path_or_scheme_is_a_connection_error(hbone, extra):
    conn = serverConn(hbone)
    headers = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")] + extra
    with pytest.raises(ProtocolError):
        conn.receive_data(clientPreface() + headersFrame(1, headers))
    goaways = [f for f in parseFrames(conn.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [ErrorCodes.PROTOCOL_ERROR]


# -- the dispatch table and GOAWAY receipt -----------------------------------------


def test_frame_dispatch_table_maps_goaway():
    stock = H2Connection(H2Configuration(client_side=False))
    table = stock._frame_dispatch_table
    assert isinstance(table, dict)
    assert table[GoAwayFrame] == stock._receive_goaway_frame
    assert table[DataFrame] == stock._receive_data_frame
    ours = serverConn()
    assert ours._frame_dispatch_table[GoAwayFrame] == ours._receiveGoAwayReported
    # per instance: the subclass did not change stock connections
    assert H2Connection(H2Configuration())._frame_dispatch_table[GoAwayFrame].__name__ == "_receive_goaway_frame"


def test_stock_h2_cannot_send_data_after_goaway():
    """If this starts failing, h2 fixed python-hyper/h2#1181 and the subclass may go."""
    conn = serverConn(hbone=False)
    openConnectStream(conn)
    conn.send_headers(1, [(b":status", b"200")])
    conn.send_data(1, b"queued before GOAWAY")
    events = conn.receive_data(goAwayFrame(1))
    assert any(isinstance(e, ConnectionTerminated) for e in events)
    assert conn.data_to_send() == b""  # stock drops queued output
    with pytest.raises(ProtocolError):
        conn.send_data(1, b"x")


def test_hbone_connection_reports_goaway_and_keeps_streams_alive():
    conn = serverConn()
    openConnectStream(conn)
    conn.send_headers(1, [(b":status", b"200")])
    conn.send_data(1, b"queued before GOAWAY")
    events = conn.receive_data(goAwayFrame(1, ErrorCodes.NO_ERROR))
    [event] = events
    assert isinstance(event, ConnectionTerminated)
    assert event.error_code == ErrorCodes.NO_ERROR
    assert event.last_stream_id == 1
    assert event.additional_data is None
    # queued output survived, and DATA can still be sent and received
    conn.send_data(1, b"after GOAWAY", end_stream=True)
    sent = parseFrames(conn.data_to_send())
    data = [f.data for f in sent if isinstance(f, DataFrame)]
    assert data == [b"queued before GOAWAY", b"after GOAWAY"]
    assert "END_STREAM" in sent[-1].flags
    f = DataFrame(1, data=b"late", flags=["END_STREAM"])
    events = conn.receive_data(f.serialize())
    assert [type(e) for e in events] == [DataReceived, StreamEnded]


def test_hbone_connection_goaway_unknown_error_code_is_an_int():
    conn = serverConn()
    openConnectStream(conn)
    f = GoAwayFrame(0, last_stream_id=1, error_code=0x77, additional_data=b"bye")
    [event] = conn.receive_data(f.serialize())
    assert event.error_code == 0x77
    assert event.additional_data == b"bye"
    conn.send_headers(1, [(b":status", b"200")])  # still usable


# -- local settings in force before the peer's ACK ----------------------------------


def test_local_settings_advertised_and_in_force_before_ack():
    conn = HBoneH2Connection(H2Configuration(client_side=False, header_encoding=None), ConnectionSettings())
    conn.initiate_connection()
    [settings] = [f for f in parseFrames(conn.data_to_send()) if isinstance(f, SettingsFrame)]
    assert settings.settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 100
    assert settings.settings[SettingCodes.INITIAL_WINDOW_SIZE] == 4 * MiB
    assert settings.settings[SettingCodes.MAX_FRAME_SIZE] == MiB
    assert settings.settings[SettingCodes.MAX_HEADER_LIST_SIZE] == 8192
    assert settings.settings[SettingCodes.HEADER_TABLE_SIZE] == 4096
    assert settings.settings.get(SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == 0
    # what h2 consults, before any ACK
    assert conn.local_settings.max_concurrent_streams == 100
    assert conn.local_settings.initial_window_size == 4 * MiB
    assert conn.max_inbound_frame_size == MiB
    assert conn.decoder.max_header_list_size == 8192


def test_client_advertises_enable_push_0():
    conn = HBoneH2Connection(H2Configuration(client_side=True, header_encoding=None), ConnectionSettings())
    conn.initiate_connection()
    [settings] = [f for f in parseFrames(conn.data_to_send()) if isinstance(f, SettingsFrame)]
    assert settings.settings[SettingCodes.ENABLE_PUSH] == 0


def test_big_frames_and_stream_window_accepted_before_ack():
    """A 1 MiB DATA frame and 4 MiB on one stream, before our SETTINGS is ACKed:
    stock h2 would answer FRAME_SIZE_ERROR / FLOW_CONTROL_ERROR."""
    conn = serverConn()
    openConnectStream(conn)
    total = 0
    for _ in range(4):
        events = conn.receive_data(DataFrame(1, data=b"x" * MiB).serialize())
        [event] = events
        assert isinstance(event, DataReceived)
        total += event.flow_controlled_length
    assert total == 4 * MiB
    assert conn.data_to_send() == b""  # no GOAWAY


def test_stock_refuses_big_frame_before_ack():
    conn = serverConn(hbone=False)
    openConnectStream(conn)
    with pytest.raises(ProtocolError):
        conn.receive_data(DataFrame(1, data=b"x" * (16384 + 1)).serialize())


def oversizedHeaders() -> list[tuple[bytes, bytes]]:
    # decoded size > 8192 (32 bytes overhead per field), each field well under it
    return [(b":method", b"CONNECT"), (b":authority", b"a.example:443")] + [
        (b"x-pad-%d" % i, b"v" * 1000) for i in range(9)
    ]


def test_header_list_over_8k_refused_from_first_block():
    conn = serverConn()
    with pytest.raises(DenialOfServiceError):
        conn.receive_data(clientPreface() + headersFrame(1, oversizedHeaders()))
    goaways = [f for f in parseFrames(conn.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [ErrorCodes.ENHANCE_YOUR_CALM]


def test_stock_accepts_that_header_list():
    """Proves the block above is only refused because of hbone's 8 KiB."""
    conn = serverConn(hbone=False)
    events = conn.receive_data(clientPreface() + headersFrame(1, oversizedHeaders()))
    assert any(isinstance(e, RequestReceived) for e in events)


def test_header_list_just_under_8k_accepted():
    conn = serverConn()
    headers = [(b":method", b"CONNECT"), (b":authority", b"a.example:443")]
    size = sum(len(n) + len(v) + 32 for n, v in headers)
    pad = 8192 - size - 32 - len(b"x-pad")
    headers.append((b"x-pad", b"v" * pad))
    assert sum(len(n) + len(v) + 32 for n, v in headers) == 8192
    events = conn.receive_data(clientPreface() + headersFrame(1, headers))
    assert any(isinstance(e, RequestReceived) for e in events)


@pytest.mark.parametrize("role", ["server", "client"])
def test_connection_window_update_right_after_preface(role):
    h = Harness(role=role)
    raw = h.transport.value()
    assert raw.startswith(PREFACE) == (role == "client")
    frames = parseFrames(raw)
    assert isinstance(frames[0], SettingsFrame) and "ACK" not in frames[0].flags
    assert isinstance(frames[1], WindowUpdateFrame)
    assert frames[1].stream_id == 0
    assert frames[1].window_increment == 16_711_681
    assert len(frames) == 2
    # and h2 agrees on the connection window it granted
    assert h.proto._conn.inbound_flow_control_window == 16 * MiB


# -- content-length: left to hbone's stream-level check --------------------------------


def test_stock_h2_makes_body_length_a_connection_error():
    conn = serverConn(hbone=False)
    conn.receive_data(
        clientPreface()
        + headersFrame(
            1,
            [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"lb"),
             (b":path", b"/_hbone/10.0.0.1:80"), (b"content-length", b"3")],
        )
    )
    assert isinstance(conn.streams[1], H2Stream)
    assert conn.streams[1]._expected_content_length == 3
    with pytest.raises(InvalidBodyLengthError):
        conn.receive_data(DataFrame(1, data=b"four").serialize())


def test_hbone_connection_leaves_body_length_to_hbone():
    conn = serverConn()
    conn.receive_data(
        clientPreface()
        + headersFrame(
            1,
            [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"lb"),
             (b":path", b"/_hbone/10.0.0.1:80"), (b"content-length", b"3")],
        )
    )
    assert conn.streams[1]._expected_content_length is None
    events = conn.receive_data(DataFrame(1, data=b"four", flags=["END_STREAM"]).serialize())
    assert [type(e) for e in events] == [DataReceived, StreamEnded]


def test_receivedDataFrames_areNotHexDumped(monkeypatch):
    """h2 logs repr(frame) for every received frame; hbone's frame buffer makes a DATA
    frame's repr length-only (hyperframe's _raw_data_repr hex-encodes the payload)."""
    import hyperframe.frame as hf

    from hbone.h2.connection import ConnectionSettings, HBoneH2Connection

    real = hf._raw_data_repr

    def boom(data):
        if data is not None and len(data) >= 60000:
            raise AssertionError("DATA payload was hex-dumped")
        return real(data)

    monkeypatch.setattr(hf, "_raw_data_repr", boom)
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    server = HBoneH2Connection(H2Configuration(client_side=False), ConnectionSettings())
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "a.example:1")])
    client.send_data(1, b"x" * 60000)
    events = server.receive_data(client.data_to_send())
    data = [e for e in events if type(e).__name__ == "DataReceived"]
    assert data and data[0].data == b"x" * 60000
