"""A second, minimal token decoder written from docs/protocols.md section 4 alone.

It shares no code with `waystation.auth` (not even the base58 package or the
protobuf runtime), so a test that decodes a minted token with it pins the wire
format: base58 (Bitcoin alphabet) of b"wp24" + TokenTransport, signature =
keyed BLAKE2b-256 of the body. Every failure is a ValueError.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
MAGIC = b"wp24"

_DIGITS = {char: value for value, char in enumerate(ALPHABET)}

_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5


def base58_decode(text: str) -> bytes:
    """Bitcoin base58: each leading '1' is a zero byte, the rest a big-endian number."""
    number = 0
    for char in text:
        if char not in _DIGITS:
            raise ValueError(f"not base58: {char!r}")
        number = number * 58 + _DIGITS[char]
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + (number.to_bytes((number.bit_length() + 7) // 8, "big"))


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the base-128 varint at `pos`."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise ValueError("varint too long")


def parse_transport(data: bytes) -> tuple[bytes, bytes, str]:
    """(body, signature, key_id) of a serialized TokenTransport; metadata skipped."""
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == _VARINT:
            _, pos = read_varint(data, pos)
            continue
        if wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
            if pos > len(data):
                raise ValueError("truncated fixed field")
            continue
        if wire_type != _LEN:
            raise ValueError(f"unsupported wire type {wire_type}")
        length, pos = read_varint(data, pos)
        if pos + length > len(data):
            raise ValueError("truncated length-delimited field")
        if number in (1, 2, 3):
            fields[number] = data[pos : pos + length]  # the last occurrence wins
        pos += length
    return fields.get(1, b""), fields.get(2, b""), fields.get(3, b"").decode("utf-8")


def decode_body(text: str, keys: Mapping[str, bytes]) -> bytes:
    """The signed Token bytes inside `text`, checked against `keys`."""
    raw = base58_decode(text)
    if raw[: len(MAGIC)] != MAGIC:
        raise ValueError("bad magic")
    body, signature, key_id = parse_transport(raw[len(MAGIC) :])
    if key_id not in keys:
        raise ValueError(f"unknown key {key_id!r}")
    expected = hashlib.blake2b(body, key=keys[key_id], digest_size=32).digest()
    if not hmac.compare_digest(expected, signature):
        raise ValueError("bad signature")
    return body
