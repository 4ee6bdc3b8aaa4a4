"""Protobuf's packed varint fields read with numpy, a chunk of bytes at a time.

Reading a repeated integer field through protobuf's container costs 40-100 ns per value
in Python; these functions decode the field's wire bytes with a few dozen array operations
per chunk instead, none of them a step per value. They take the bytes protobuf itself
serializes, and answer None for any bytes they do not expect, so that the caller can fall
back to the container.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

Scalar = Literal["bool", "int32", "int64", "uint32", "uint64"]
Words = npt.NDArray[np.uint64]

# What each protobuf scalar type decodes to, at the width the .proto declares.
SCALAR_DTYPES: dict[Scalar, np.dtype[np.generic]] = {
    "bool": np.dtype("bool"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
}

# Bytes decoded at a time, cut at a varint's end: the temporaries (a few 8-byte words
# per varint) stay near 2 MiB at most whatever the request's size, and from 8 bytes a
# varint under 128 KiB, which malloc serves from its heap instead of fresh pages (with
# 256 KiB chunks, page faults made 16k random INT64s 1.6x slower to decode). A multiple of 8.
CHUNK_BYTES = 1 << 16
# The longest varint: 64 bits, 7 per byte.
_MAX_VARINT_BYTES = 10
_LENGTH_DELIMITED = 2
# Zero bytes after a chunk: every varint's 16 bytes from its start then read as words.
_PADDING = 24

_U = np.uint64
_HIGH_BITS = _U(0x8080808080808080)  # the continuation bit of each of 8 bytes
# Squeezing 8 bytes of 7 bits into 56 bits: pairs of bytes, then of 14 bits, then of 28.
_SQUEEZE = (
    (_U(0x007F007F007F007F), _U(0x7F007F007F007F00), _U(1)),
    (_U(0x00003FFF00003FFF), _U(0x3FFF00003FFF0000), _U(2)),
    (_U(0x000000000FFFFFFF), _U(0x0FFFFFFF00000000), _U(4)),
)


def packed_payload(data: bytes, field_number: int) -> memoryview | None:
    """The payload of `data` when `data` is exactly one length-delimited field
    `field_number` (a packed repeated field, the only one set); None otherwise."""
    tag = field_number << 3 | _LENGTH_DELIMITED
    if tag >= 0x80 or len(data) < 2 or data[0] != tag:
        return None
    length = shift = 0
    position = 1
    while True:  # the payload's length, a varint
        if position == len(data) or shift >= 7 * _MAX_VARINT_BYTES:
            return None
        byte = data[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if position + length != len(data):
        return None
    return memoryview(data)[position:]


def decode_packed(
    payload: bytes | memoryview, count: int, scalar: Scalar
) -> npt.NDArray[np.generic] | None:
    """The `count` values of a packed varint field's payload, as protobuf reads them: a
    varint is up to 10 bytes of 7 bits, bits past 64 dropped; int32 and uint32 keep the
    low 32 bits (a negative int32 travels sign-extended to 64), bool is whether it is not
    0. None when the payload is not exactly `count` such varints."""
    values = np.empty(count, dtype=SCALAR_DTYPES[scalar])
    data = np.frombuffer(payload, dtype=np.uint8)
    # Each chunk is copied here, so that a varint's bytes read as aligned words.
    buffer = np.zeros(min(data.size, CHUNK_BYTES) // 8 * 8 + _PADDING, dtype=np.uint8)
    words = buffer.view("<u8")
    low_32_bits = scalar in ("int32", "uint32")
    filled = start = 0
    while start < data.size:
        chunk = data[start : start + CHUNK_BYTES]
        decoded: npt.NDArray[np.unsignedinteger] | None
        if chunk.max() < 0x80:  # one byte each (small values, bools): the bytes are they
            used = chunk.size
            decoded = chunk
        else:
            ends = np.flatnonzero(chunk < 0x80)  # a varint's last byte has no high bit
            if not ends.size:
                return None  # a varint longer than a chunk
            used = int(ends[-1]) + 1
            buffer[:used] = chunk[:used]
            buffer[used : used + _PADDING] = 0
            decoded = _multibyte_values(words, buffer, ends, low_32_bits)
            if decoded is None:
                return None
        if filled + decoded.size > count:
            return None
        values[filled : filled + decoded.size] = _as_scalar(decoded, scalar)
        filled += decoded.size
        start += used
    return values if filled == count else None


def _multibyte_values(
    words: Words, buffer: npt.NDArray[np.uint8], ends: npt.NDArray[np.intp], low_32_bits: bool
) -> Words | None:
    """The varints whose last bytes are at `ends` in `buffer` (`words` the same bytes), as
    uint64; only their low 32 bits right when `low_32_bits`. None for a varint over 10
    bytes."""
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    extra = ends - starts  # the bytes after each varint's first
    if int(extra.max()) >= _MAX_VARINT_BYTES:
        return None  # protobuf refuses it
    longer = np.flatnonzero(extra)
    if longer.size > ends.size // 2:  # mostly long ones: all are read alike
        return _window_values(words, starts, low_32_bits)
    # Mostly one byte each (small values, a few negative): only the others are read whole.
    values = buffer[starts].astype(np.uint64)
    values[longer] = _window_values(words, starts[longer], low_32_bits)
    return values


def _window_values(words: Words, starts: npt.NDArray[np.intp], low_32_bits: bool) -> Words:
    """The varints that start at `starts`, from the 8 (or 10) bytes there."""
    values = _words_at(words, starts)
    # Keep each varint's own bytes: up to and with the first byte without a high bit.
    last = ~values
    last &= _HIGH_BITS
    own = last - _U(1)
    own ^= last
    values &= own
    values = _squeeze(values)
    longest = last == 0  # the first 8 bytes all go on: 9 or 10 bytes
    if low_32_bits or not longest.any():
        return values  # bits 56 to 63 are all that bytes 9 and 10 hold
    more = _words_at(words, starts + 8)
    more *= longest
    tenth = more >> _U(7)  # byte 9's high bit: a 10th byte follows ...
    tenth &= more >> _U(8)  # ... and only its lowest bit lands in 64 bits
    tenth <<= _U(63)
    more &= _U(0x7F)
    more <<= _U(56)
    values |= more
    values |= tenth
    return values


def _words_at(words: Words, offsets: npt.NDArray[np.intp]) -> Words:
    """The 8 bytes from each byte offset, little-endian, from the two aligned words they
    fall in."""
    index = offsets >> 3
    shifts = ((offsets & 7) << 3).astype(np.uint64)
    low: Words = words[index]
    low >>= shifts
    high = words[index + 1]
    high <<= _U(64) - shifts  # numpy shifts by 64 or more give 0: nothing from `high`
    low |= high
    return low


def _squeeze(words: Words) -> Words:
    """Each word's 8 bytes of 7 bits, side by side in its low 56 bits."""
    for keep, move, by in _SQUEEZE:
        kept = words & keep
        words &= move
        words >>= by
        words |= kept
    return words


def _as_scalar(
    decoded: npt.NDArray[np.unsignedinteger], scalar: Scalar
) -> npt.NDArray[np.generic]:
    if scalar == "bool":
        flags: npt.NDArray[np.bool_] = decoded != 0
        return flags
    if scalar in ("int32", "uint32"):
        # protobuf keeps the low 32 bits, whatever the varint held above them.
        low = decoded.astype(np.uint32)
        return low.view(np.int32) if scalar == "int32" else low
    wide = decoded.astype(np.uint64, copy=False)
    return wide.view(np.int64) if scalar == "int64" else wide
