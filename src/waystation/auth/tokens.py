"""The token format (docs/protocols.md, section 4): pure functions, no database, no gRPC.

Wire format, compatible with the upstream Vagrant/Waypoint server::

    body      = Token, serialized deterministically
    signature = keyed BLAKE2b-256(body), the key being the 32-byte key of `key_id`
                (a plain keyed hash, not the HMAC construction, despite `HMACKey`)
    transport = TokenTransport{body=1, signature=2, key_id=3, metadata=4}
    text      = base58(b"wp24" + transport), Bitcoin alphabet

Only `body` is signed. `key_id` and `metadata` ride beside it unsigned: whoever
holds a token can change its metadata without invalidating it, so treat metadata
as a client's claim, never as the server's word. Several strings can carry the
same signed body (field order, unknown fields), so identify a token by its
`token_id`, never by its text.

`decode` checks, in this order, and raises `Unauthenticated` whose `.message` is
``invalid authentication token: <reason>``; it raises nothing else for any text:

=================  ===========================================================
reason             when
=================  ===========================================================
malformed token    text is not a str, or longer than MAX_TOKEN_TEXT (4 KiB)
not base58         a character outside the Bitcoin alphabet (whitespace too)
bad magic          the decoded bytes are shorter than 4 or do not start "wp24"
malformed token    the rest is not a TokenTransport
unknown key        `key_id` is not in the key ring (exact, case-sensitive)
bad signature      the signature is not BLAKE2b-256(body) under that key
malformed token    the signed body is not a Token
token has expired  `valid_until` is set and strictly before `now`
=================  ===========================================================

The one exception: a key ring holding a key that is not KEY_SIZE bytes is a
server bug, and `sign` (so `decode`) raises ValueError for it.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Final, TypeAlias

import base58
from google.protobuf.timestamp_pb2 import Timestamp

from waystation.errors import Unauthenticated
from waystation.protocol import vagrant_server_pb2 as vs

MAGIC: Final = b"wp24"
DEFAULT_KEY_ID: Final = "k1"
DEFAULT_USER: Final = "vagrant"
KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 32
TOKEN_ID_SIZE: Final = 16
# Real tokens are 100-200 characters. Base58 decoding takes time quadratic in the
# length (about 15 ms at 4 KiB, 190 ms at 16 KiB), and anyone may send a token.
MAX_TOKEN_TEXT: Final = 4 * 1024

KeyRing: TypeAlias = Mapping[str, bytes]
"""Key id -> KEY_SIZE-byte signing key."""

ERROR_PREFIX: Final = "invalid authentication token: "
MALFORMED: Final = ERROR_PREFIX + "malformed token"
NOT_BASE58: Final = ERROR_PREFIX + "not base58"
BAD_MAGIC: Final = ERROR_PREFIX + "bad magic"
UNKNOWN_KEY: Final = ERROR_PREFIX + "unknown key"
BAD_SIGNATURE: Final = ERROR_PREFIX + "bad signature"
EXPIRED: Final = ERROR_PREFIX + "token has expired"

_ALPHABET: Final = frozenset(base58.BITCOIN_ALPHABET.decode("ascii"))
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND: Final = datetime.timedelta(microseconds=1)


def new_key() -> bytes:
    """A fresh random signing key."""
    return secrets.token_bytes(KEY_SIZE)


def sign(body: bytes, key: bytes) -> bytes:
    """Keyed BLAKE2b-256 of `body`. ValueError unless `key` is KEY_SIZE bytes."""
    if len(key) != KEY_SIZE:
        # An empty key would make this an unkeyed hash that anyone can forge.
        raise ValueError(f"token signing key must be {KEY_SIZE} bytes, got {len(key)}")
    return hashlib.blake2b(body, key=key, digest_size=SIGNATURE_SIZE).digest()


def encode(
    token: vs.Token,
    key_id: str,
    key: bytes,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """The armored text of `token`, signed with `key` and labelled `key_id`.

    ValueError if the text would be longer than `decode` accepts (huge metadata).
    """
    body = token.SerializeToString(deterministic=True)
    transport = vs.TokenTransport(
        body=body, signature=sign(body, key), key_id=key_id, metadata=metadata or {}
    )
    raw = MAGIC + transport.SerializeToString(deterministic=True)
    text = base58.b58encode(raw).decode("ascii")
    if len(text) > MAX_TOKEN_TEXT:
        raise ValueError(f"token would be {len(text)} characters, over {MAX_TOKEN_TEXT}")
    return text


def decode(text: str, keys: KeyRing, now: datetime.datetime) -> tuple[vs.Token, vs.TokenTransport]:
    """The verified token and its transport; Unauthenticated otherwise (see module doc).

    A naive `now` is taken as UTC.
    """
    transport = _open_transport(text)
    key = keys.get(transport.key_id)
    if key is None:
        raise Unauthenticated(UNKNOWN_KEY)
    if not hmac.compare_digest(sign(transport.body, key), transport.signature):
        raise Unauthenticated(BAD_SIGNATURE)
    token = vs.Token()
    if not _parse(token, transport.body):
        raise Unauthenticated(MALFORMED)
    if token.HasField("valid_until") and _timestamp_ns(token.valid_until) < _unix_ns(now):
        raise Unauthenticated(EXPIRED)
    return token, transport


def unverified(text: str) -> tuple[vs.Token, str]:
    """The claims and key id of a token, NOT checked: for showing, never for trusting."""
    transport = _open_transport(text)
    token = vs.Token()
    if not _parse(token, transport.body):
        raise Unauthenticated(MALFORMED)
    return token, transport.key_id


def login_token(
    user: str = DEFAULT_USER, entrypoint: vs.Token.Entrypoint | None = None
) -> vs.Token:
    """A login token body for `user`, restricted to `entrypoint` if given."""
    token = vs.Token(user=user, token_id=secrets.token_bytes(TOKEN_ID_SIZE), login=True)
    if entrypoint is not None:
        token.entrypoint.CopyFrom(entrypoint)
    return token


def invite_token(
    duration: datetime.timedelta,
    entrypoint: vs.Token.Entrypoint | None = None,
    *,
    now: datetime.datetime,
) -> vs.Token:
    """An invite token body valid until `now + duration`. Upstream sets no user on it."""
    token = vs.Token(token_id=secrets.token_bytes(TOKEN_ID_SIZE), invite=True)
    micros = (_unix_ns(now) // 1000) + duration // _MICROSECOND
    seconds, rest = divmod(micros, 1_000_000)
    token.valid_until.seconds = seconds
    token.valid_until.nanos = rest * 1000
    if entrypoint is not None:
        token.entrypoint.CopyFrom(entrypoint)
    return token


def token_id_hex(token: vs.Token) -> str:
    """The token's id as lowercase hex: how logs and revocations name it."""
    return token.token_id.hex()


def _open_transport(text: str) -> vs.TokenTransport:
    """Text -> unverified TokenTransport: length, alphabet, magic, parse."""
    if not isinstance(text, str) or len(text) > MAX_TOKEN_TEXT:
        raise Unauthenticated(MALFORMED)
    # Checked here rather than left to base58, which strips trailing whitespace
    # and reports non-ASCII text as UnicodeEncodeError.
    if not _ALPHABET.issuperset(text):
        raise Unauthenticated(NOT_BASE58)
    raw: bytes = base58.b58decode(text)
    if len(raw) < len(MAGIC) or not hmac.compare_digest(raw[: len(MAGIC)], MAGIC):
        raise Unauthenticated(BAD_MAGIC)
    transport = vs.TokenTransport()
    if not _parse(transport, raw[len(MAGIC) :]):
        raise Unauthenticated(MALFORMED)
    return transport


def _parse(message: vs.Token | vs.TokenTransport, data: bytes) -> bool:
    """Whether `data` parsed into `message`."""
    try:
        message.ParseFromString(data)
    except Exception:  # DecodeError mostly; any parse failure means malformed
        return False
    return True


def _unix_ns(moment: datetime.datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return (moment - _EPOCH) // _MICROSECOND * 1000


def _timestamp_ns(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos
