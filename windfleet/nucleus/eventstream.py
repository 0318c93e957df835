"""AWS event-stream framing, the wire format of Greengrass IPC (stdlib only).

A message is ``total length (u32) | headers length (u32) | prelude CRC (u32) | headers |
payload | message CRC (u32)``, big-endian; both CRCs are zlib CRC-32, the prelude one over the
first 8 bytes, the message one over everything before it (aws-c-event-stream; botocore's
``botocore.eventstream`` decodes the same format).  A header is ``name length (u8) | name |
type (u8) | value`` with the ten types below.

Guarantees:

* :func:`encode` output is byte-exact event-stream and never exceeds :data:`MAX_MESSAGE`
  (else ``ValueError``).  Python ``int`` becomes an i32 header, because the RPC layer requires
  i32 for ``:message-type``/``:message-flags``/``:stream-id``; other integer widths need the
  marker types :class:`Int8`, :class:`Int16`, :class:`Int64`.
* :class:`Decoder` accepts any split of the byte stream, returns whole messages only, and
  raises :class:`FramingError` on anything malformed (bad CRC, total length < 16 or
  > :data:`MAX_MESSAGE`, headers that overrun or do not parse, duplicate header names).  After
  a ``FramingError`` the stream cannot be resynchronised: close the connection.  A frame over
  the limit raises the subclass :class:`FrameTooLarge` (so a server can count it apart).
* Decoded header values keep their wire type: i8/i16/i64 come back as the int subclasses
  :class:`Int8`/:class:`Int16`/:class:`Int64`, so ``encode(decoded.headers)`` reproduces the
  original headers.
"""

from __future__ import annotations

import datetime as _dt
import struct
import uuid
import zlib
from dataclasses import dataclass, field

# The nucleus' limit on one event-stream frame (aws-c-event-stream / the Java nucleus: 24 MiB).
MAX_MESSAGE = 24 * 1024 * 1024

# RPC message types and flags (Greengrass event-stream RPC)
(APPLICATION_MESSAGE, APPLICATION_ERROR, PING, PING_RESPONSE, CONNECT, CONNECT_ACK,
 PROTOCOL_ERROR, SERVER_ERROR) = range(8)
CONNECTION_ACCEPTED = 1
TERMINATE_STREAM = 2

# Header value types.
TRUE, FALSE, BYTE, SHORT, INT, LONG, BYTES, STRING, TIMESTAMP, UUID = range(10)

_PRELUDE = struct.Struct(">III")
_PRELUDE_LEN = 12
_OVERHEAD = _PRELUDE_LEN + 4          # prelude + message CRC: the smallest possible message
_MAX_NAME = 127                       # aws-c-event-stream: INT8_MAX
_MAX_VALUE = 32767                    # aws-c-event-stream: INT16_MAX for bytes/string values
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class FramingError(ValueError):
    """Bad prelude/CRC/header/length: the connection must be closed."""


class FrameTooLarge(FramingError):
    """A frame whose prelude announces more than :data:`MAX_MESSAGE` bytes (refused unbuffered)."""


class Int8(int):
    """An integer sent as an i8 header (type 2)."""


class Int16(int):
    """An integer sent as an i16 header (type 3)."""


class Int64(int):
    """An integer sent as an i64 header (type 5)."""


@dataclass
class Message:
    """One decoded message: header names as sent, values decoded to Python."""

    headers: dict[str, object] = field(default_factory=dict)
    payload: bytes = b""

    def header(self, name: str, default=None):
        """Header value by name, case-insensitively (event-stream names are case-insensitive)."""
        if name in self.headers:
            return self.headers[name]
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return default

    @property
    def message_type(self) -> int:
        return self.header(":message-type")

    @property
    def flags(self) -> int:
        return self.header(":message-flags", 0)

    @property
    def stream_id(self) -> int:
        return self.header(":stream-id", 0)


def _encode_header(name: str, value: object) -> bytes:
    raw_name = name.encode("utf-8")
    if not 0 < len(raw_name) <= _MAX_NAME:
        raise ValueError(f"header name must be 1..{_MAX_NAME} bytes: {name!r}")
    head = bytes([len(raw_name)]) + raw_name
    # bool before int: bool is an int subclass.
    if isinstance(value, bool):
        return head + bytes([TRUE if value else FALSE])
    if isinstance(value, int):
        for cls, kind, fmt in ((Int8, BYTE, ">b"), (Int16, SHORT, ">h"), (Int64, LONG, ">q")):
            if isinstance(value, cls):
                break
        else:
            kind, fmt = INT, ">i"
        try:
            return head + bytes([kind]) + struct.pack(fmt, value)
        except struct.error:
            raise ValueError(f"header {name!r}: {value} does not fit type {kind}") from None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"header {name!r}: timestamp must be timezone-aware")
        millis = (value - _EPOCH) // _dt.timedelta(milliseconds=1)
        return head + bytes([TIMESTAMP]) + struct.pack(">q", millis)
    if isinstance(value, uuid.UUID):
        return head + bytes([UUID]) + value.bytes
    if isinstance(value, str):
        kind, data = STRING, value.encode("utf-8")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        kind, data = BYTES, bytes(value)
    else:
        raise ValueError(f"header {name!r}: unsupported value type {type(value).__name__}")
    if len(data) > _MAX_VALUE:
        raise ValueError(f"header {name!r}: value longer than {_MAX_VALUE} bytes")
    return head + bytes([kind]) + struct.pack(">H", len(data)) + data


def encode(headers: dict[str, object], payload: bytes = b"") -> bytes:
    """One framed message.

    ``bool`` -> type 0/1, ``int`` -> i32 (type 4; :class:`Int8`/:class:`Int16`/:class:`Int64`
    for the other widths), ``bytes`` -> 6, ``str`` -> 7, aware ``datetime`` -> 8 (ms),
    ``uuid.UUID`` -> 9.  Raises ``ValueError`` for unsupported values or a message larger
    than :data:`MAX_MESSAGE`.
    """
    raw_headers = b"".join(_encode_header(name, value) for name, value in headers.items())
    total = _OVERHEAD + len(raw_headers) + len(payload)
    if total > MAX_MESSAGE:
        raise ValueError(f"message of {total} bytes exceeds the {MAX_MESSAGE}-byte limit")
    prelude = struct.pack(">II", total, len(raw_headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + raw_headers + bytes(payload)
    return body + struct.pack(">I", zlib.crc32(body))


def rpc_message(message_type: int, stream_id: int, payload: bytes = b"", flags: int = 0,
                headers: dict[str, object] | None = None, **extra_headers: object) -> bytes:
    """An RPC message: ``:message-type``, ``:message-flags`` and ``:stream-id`` (all i32, as the
    client requires) followed by ``headers`` and ``extra_headers`` (the dict is there because
    names such as ``:content-type`` are not Python identifiers).
    """
    merged: dict[str, object] = {":message-type": int(message_type),
                                 ":message-flags": int(flags),
                                 ":stream-id": int(stream_id)}
    for name, value in {**(headers or {}), **extra_headers}.items():
        if name.lower() in merged:
            raise ValueError(f"header {name!r} is set by rpc_message itself")
        merged[name] = value
    return encode(merged, payload)


def _decode_headers(data: bytes) -> dict[str, object]:
    headers: dict[str, object] = {}
    seen: set[str] = set()
    pos, end = 0, len(data)

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > end:
            raise FramingError("header overruns the headers section")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    while pos < end:
        name_len = take(1)[0]
        if name_len == 0:
            raise FramingError("empty header name")
        try:
            name = take(name_len).decode("utf-8")
        except UnicodeDecodeError:
            raise FramingError("header name is not UTF-8") from None
        kind = take(1)[0]
        value: object
        if kind == TRUE:
            value = True
        elif kind == FALSE:
            value = False
        elif kind == BYTE:
            value = Int8(struct.unpack(">b", take(1))[0])
        elif kind == SHORT:
            value = Int16(struct.unpack(">h", take(2))[0])
        elif kind == INT:
            value = struct.unpack(">i", take(4))[0]
        elif kind == LONG:
            value = Int64(struct.unpack(">q", take(8))[0])
        elif kind in (BYTES, STRING):
            raw = take(struct.unpack(">H", take(2))[0])
            if kind == BYTES:
                value = raw
            else:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise FramingError(f"header {name!r}: string value is not UTF-8") from None
        elif kind == TIMESTAMP:
            millis = struct.unpack(">q", take(8))[0]
            try:
                value = _EPOCH + _dt.timedelta(milliseconds=millis)
            except OverflowError:
                raise FramingError(f"header {name!r}: timestamp out of range") from None
        elif kind == UUID:
            value = uuid.UUID(bytes=take(16))
        else:
            raise FramingError(f"header {name!r}: unknown value type {kind}")
        # Names are case-insensitive, so a repeat would make lookups ambiguous (botocore refuses too).
        if name.lower() in seen:
            raise FramingError(f"duplicate header {name!r}")
        seen.add(name.lower())
        headers[name] = value
    return headers


class Decoder:
    """Incremental decoder: :meth:`feed` bytes as they arrive, get back complete messages.

    Keeps partial frames between calls; raises :class:`FramingError` on a bad CRC, a total
    length < 16 or > :data:`MAX_MESSAGE` (checked as soon as the prelude is in, so an oversized
    frame is refused before it is buffered), or malformed headers.  Once it has raised it
    raises again on every call: the stream is lost.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: FramingError | None = None

    def feed(self, data: bytes) -> list[Message]:
        if self._error is not None:
            raise self._error
        self._buffer += data
        messages: list[Message] = []
        try:
            while True:
                message = self._next()
                if message is None:
                    return messages
                messages.append(message)
        except FramingError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _next(self) -> Message | None:
        buf = self._buffer
        if len(buf) < _PRELUDE_LEN:
            return None
        total, headers_len, prelude_crc = _PRELUDE.unpack_from(buf)
        # The CRC comes first: the lengths mean nothing if the prelude is corrupt.
        if zlib.crc32(buf[:8]) != prelude_crc:
            raise FramingError("prelude CRC mismatch")
        if total > MAX_MESSAGE:
            raise FrameTooLarge(f"total length {total} exceeds the {MAX_MESSAGE}-byte limit")
        if total < _OVERHEAD:
            raise FramingError(f"total length {total} outside {_OVERHEAD}..{MAX_MESSAGE}")
        if headers_len > total - _OVERHEAD:
            raise FramingError(f"headers length {headers_len} exceeds the message")
        if len(buf) < total:
            return None
        frame = bytes(buf[:total])
        del buf[:total]
        (message_crc,) = struct.unpack_from(">I", frame, total - 4)
        if zlib.crc32(frame[:-4]) != message_crc:
            raise FramingError("message CRC mismatch")
        headers_end = _PRELUDE_LEN + headers_len
        return Message(_decode_headers(frame[_PRELUDE_LEN:headers_end]), frame[headers_end:-4])
