"""windfleet.nucleus.eventstream: framing checked against botocore's independent decoder."""

from __future__ import annotations

import datetime as dt
import struct
import uuid
import zlib

import pytest
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer

from windfleet.nucleus import eventstream as es

UTC = dt.timezone.utc
WHEN = dt.datetime(2024, 5, 17, 12, 34, 56, 789000, tzinfo=UTC)
ID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")

# One header of every wire type, with the type byte it must be sent as.
EVERY_TYPE = {
    "t": (True, 0),
    "f": (False, 1),
    "i8": (es.Int8(-128), 2),
    "i16": (es.Int16(32767), 3),
    "i32": (-2_000_000_000, 4),
    "i64": (es.Int64(2**40 + 3), 5),
    "bytes": (b"\x00\xffraw", 6),
    "string": ("héllo ☃", 7),
    "timestamp": (WHEN, 8),
    "uuid": (ID, 9),
}


def _headers_types(frame: bytes) -> dict[str, int]:
    """Header name -> wire type byte, parsed by hand from a frame."""
    total, headers_len, _ = struct.unpack_from(">III", frame)
    pos, end, out = 12, 12 + headers_len, {}
    sizes = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
    while pos < end:
        name_len = frame[pos]
        name = frame[pos + 1:pos + 1 + name_len].decode()
        kind = frame[pos + 1 + name_len]
        pos += 2 + name_len
        if kind in (6, 7):
            pos += 2 + struct.unpack_from(">H", frame, pos)[0]
        else:
            pos += sizes[kind]
        out[name] = kind
    assert pos == end
    return out


def _botocore_messages(data: bytes):
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return list(buffer)


def _frame(total: int | None = None, headers_len: int = 0, body: bytes = b"",
           prelude_crc: int | None = None, message_crc: int | None = None) -> bytes:
    """A hand-made frame whose body (headers + payload) is ``body``."""
    total = 16 + len(body) if total is None else total
    prelude = struct.pack(">II", total, headers_len)
    prelude += struct.pack(">I", zlib.crc32(prelude) if prelude_crc is None else prelude_crc)
    frame = prelude + body
    return frame + struct.pack(">I", zlib.crc32(frame) if message_crc is None else message_crc)


def test_every_header_type_round_trips_with_its_wire_type():
    headers = {name: value for name, (value, _) in EVERY_TYPE.items()}
    frame = es.encode(headers, b"payload")
    assert _headers_types(frame) == {name: kind for name, (_, kind) in EVERY_TYPE.items()}

    [message] = es.Decoder().feed(frame)
    assert message.headers == headers
    assert message.payload == b"payload"
    for name, (value, _) in EVERY_TYPE.items():
        assert type(message.headers[name]) is type(value), name
    # Decoded values re-encode to the same bytes: the wire types survive.
    assert es.encode(message.headers, message.payload) == frame


def test_botocore_decodes_our_encoding():
    headers = {name: value for name, (value, _) in EVERY_TYPE.items()}
    [message] = _botocore_messages(es.encode(headers, b"\x01\x02"))
    assert message.payload == b"\x01\x02"
    got = message.headers
    # botocore keeps timestamps as ms integers and UUIDs as bytes.
    assert got["t"] is True and got["f"] is False
    assert (got["i8"], got["i16"], got["i32"], got["i64"]) == (-128, 32767, -2_000_000_000, 2**40 + 3)
    assert got["bytes"] == b"\x00\xffraw"
    assert got["string"] == "héllo ☃"
    assert got["timestamp"] == int(WHEN.timestamp() * 1000)
    assert got["uuid"] == ID.bytes


def test_we_decode_botocore_checked_frames_and_reject_what_botocore_rejects():
    frame = es.rpc_message(es.APPLICATION_MESSAGE, 3, b'{"a":1}', flags=es.TERMINATE_STREAM,
                           headers={":content-type": "application/json"},
                           operation="aws.greengrass#PublishToTopic")
    [theirs] = _botocore_messages(frame)
    [ours] = es.Decoder().feed(frame)
    assert ours.headers == theirs.headers
    assert ours.payload == theirs.payload == b'{"a":1}'

    corrupt = frame[:-5] + bytes([frame[-5] ^ 1]) + frame[-4:]
    with pytest.raises(ChecksumMismatch):
        _botocore_messages(corrupt)
    with pytest.raises(es.FramingError):
        es.Decoder().feed(corrupt)


def test_rpc_message_sets_the_three_i32_rpc_headers():
    frame = es.rpc_message(es.CONNECT_ACK, 0, flags=es.CONNECTION_ACCEPTED,
                           headers={":content-type": "application/json", "service-model-type": "x"})
    assert _headers_types(frame)[":message-type"] == 4
    assert _headers_types(frame)[":message-flags"] == 4
    assert _headers_types(frame)[":stream-id"] == 4
    [message] = es.Decoder().feed(frame)
    assert (message.message_type, message.flags, message.stream_id) == (es.CONNECT_ACK, 1, 0)
    assert message.header(":CONTENT-type") == "application/json"
    assert message.header("missing", "dflt") == "dflt"
    with pytest.raises(ValueError):
        es.rpc_message(es.PING, 0, headers={":Stream-Id": 5})


def test_message_defaults_when_rpc_headers_are_absent():
    [message] = es.Decoder().feed(es.encode({}, b""))
    assert (message.flags, message.stream_id, message.message_type) == (0, 0, None)
    assert message.payload == b""


def test_frame_split_byte_by_byte():
    frames = [es.rpc_message(es.APPLICATION_MESSAGE, i, b"x" * i, headers={"n": str(i)}) for i in range(1, 4)]
    data = b"".join(frames)
    decoder = es.Decoder()
    got = []
    for i in range(len(data)):
        batch = decoder.feed(data[i:i + 1])
        # A message appears exactly when its last byte arrives.
        assert (len(batch) == 1) == (i + 1 in {sum(map(len, frames[:k])) for k in (1, 2, 3)})
        got += batch
    assert [m.stream_id for m in got] == [1, 2, 3]
    assert [m.payload for m in got] == [b"x", b"xx", b"xxx"]
    assert decoder.feed(b"") == []


def test_several_frames_in_one_feed_with_a_partial_tail():
    frames = [es.rpc_message(es.PING, 0), es.rpc_message(es.PING_RESPONSE, 0), es.rpc_message(es.PING, 0, b"p")]
    decoder = es.Decoder()
    data = b"".join(frames)
    first = decoder.feed(data[:-3])
    assert [m.message_type for m in first] == [es.PING, es.PING_RESPONSE]
    [last] = decoder.feed(data[-3:])
    assert last.payload == b"p"


def test_bad_prelude_crc():
    frame = bytearray(es.encode({"a": 1}, b"body"))
    frame[8] ^= 0xFF
    with pytest.raises(es.FramingError, match="prelude"):
        es.Decoder().feed(bytes(frame))


def test_bad_message_crc():
    frame = bytearray(es.encode({"a": 1}, b"body"))
    frame[-1] ^= 0x01
    with pytest.raises(es.FramingError, match="message CRC"):
        es.Decoder().feed(bytes(frame))


def test_oversized_length_is_refused_from_the_prelude_alone():
    prelude = struct.pack(">II", es.MAX_MESSAGE + 1, 0)
    prelude += struct.pack(">I", zlib.crc32(prelude))
    decoder = es.Decoder()
    with pytest.raises(es.FramingError, match="total length"):
        decoder.feed(prelude)
    # The stream is lost for good.
    with pytest.raises(es.FramingError):
        decoder.feed(es.encode({}, b""))


@pytest.mark.parametrize("frame, reason", [
    (_frame(total=15), "total length"),
    (_frame(headers_len=5, body=b"\x01a\x00"), "headers length"),          # headers longer than the message
    (_frame(headers_len=3, body=b"\x01a\x0a"), "unknown value type"),       # type 10 does not exist
    (_frame(headers_len=4, body=b"\x01a\x07\x00"), "overruns"),              # string length cut off
    (_frame(headers_len=6, body=b"\x01a\x00\x01A\x01"), "duplicate"),        # same name, other case
    (_frame(headers_len=3, body=b"\x00a\x00"), "empty header name"),
])
def test_malformed_frames(frame, reason):
    with pytest.raises(es.FramingError, match=reason):
        es.Decoder().feed(frame)


def test_megabyte_payload_round_trips():
    payload = bytes(range(256)) * 4096
    assert len(payload) == 1024 * 1024
    frame = es.rpc_message(es.APPLICATION_MESSAGE, 7, payload)
    decoder = es.Decoder()
    got = []
    for start in range(0, len(frame), 65536):
        got += decoder.feed(frame[start:start + 65536])
    assert len(got) == 1 and got[0].payload == payload and got[0].stream_id == 7
    [theirs] = _botocore_messages(frame)
    assert theirs.payload == payload


def test_encode_limits():
    with pytest.raises(ValueError):
        es.encode({}, b"\0" * es.MAX_MESSAGE)
    with pytest.raises(ValueError):
        es.encode({"big": 2**31})              # plain int is i32 only
    with pytest.raises(ValueError):
        es.encode({"s": "x" * 40000})          # u16-length values stay within aws-c-event-stream's limit
    with pytest.raises(ValueError):
        es.encode({"x" * 128: 1})
    with pytest.raises(ValueError):
        es.encode({"naive": dt.datetime(2024, 1, 1)})
    with pytest.raises(ValueError):
        es.encode({"f": 1.5})
    # Exactly at the limit is fine.
    assert len(es.encode({}, b"\0" * (es.MAX_MESSAGE - 16))) == es.MAX_MESSAGE
