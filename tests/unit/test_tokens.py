"""Token format: round trips, a pinned encoding, every rejection, and fuzzing."""

from __future__ import annotations

import datetime
from typing import Any, cast

import base58
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minimal_token_decoder import base58_decode, decode_body, parse_transport

from waystation.auth import tokens
from waystation.errors import Unauthenticated
from waystation.protocol import vagrant_server_pb2 as vs

UTC = datetime.UTC
NOW = datetime.datetime(2024, 1, 1, tzinfo=UTC)
KEY = bytes(range(32))
KEYS = {"k1": KEY}

# Golden vector: a fixed body signed with the all-zero key. Any change to the
# body serialization, signature, transport layout, magic or base58 breaks it.
GOLDEN_KEY = bytes(32)
GOLDEN_TEXT = (
    "7t9K53oNipWJiey3L12G6goRBVw6kSt2Bx2D5ZVa9KGvmL5KBKsPtYCPxmqNP2BEuMhoMAHjhffZx3iWv9aUif"
    "GaisXXQdRgqEAJR3dEmzp7cdsvyMxnc5eKr2vTM7AL4cFsduir8jLH7"
)
GOLDEN_BODY_HEX = (
    "0a0776616772616e741210000102030405060708090a0b0c0d0e0f1a060880e2cfaa06200132040a026431"
)
GOLDEN_SIGNATURE_HEX = "731d5b6e7fa9b509be3fbca85e057d96a3edd300c90eac9eb6d0fbc880d30545"


def golden_token() -> vs.Token:
    token = vs.Token(user="vagrant", token_id=bytes(range(16)), login=True)
    token.valid_until.seconds = 1_700_000_000  # 2023-11-14T22:13:20Z
    token.entrypoint.deployment_id = "d1"
    return token


def armor(raw: bytes) -> str:
    return base58.b58encode(raw).decode("ascii")


def unarmor(text: str) -> bytes:
    return base58.b58decode(text)


def transport_of(text: str) -> vs.TokenTransport:
    transport = vs.TokenTransport()
    transport.ParseFromString(unarmor(text)[len(tokens.MAGIC) :])
    return transport


def rearmor(transport: vs.TokenTransport) -> str:
    return armor(tokens.MAGIC + transport.SerializeToString(deterministic=True))


def reason(text: str, keys: tokens.KeyRing = KEYS, now: datetime.datetime = NOW) -> str:
    with pytest.raises(Unauthenticated) as caught:
        tokens.decode(text, keys, now)
    return caught.value.message


# Round trips


def test_login_token_round_trip() -> None:
    token = tokens.login_token()
    text = tokens.encode(token, "k1", KEY, {"origin": "cli"})
    decoded, transport = tokens.decode(text, KEYS, NOW)
    assert decoded == token
    assert decoded.login and not decoded.invite
    assert decoded.user == "vagrant"
    assert not decoded.HasField("valid_until")
    assert not decoded.HasField("entrypoint")
    assert transport.key_id == "k1"
    assert dict(transport.metadata) == {"origin": "cli"}
    assert transport.signature == tokens.sign(transport.body, KEY)


def test_invite_token_round_trip_and_expiry_boundary() -> None:
    entrypoint = vs.Token.Entrypoint(deployment_id="dep-1")
    token = tokens.invite_token(
        datetime.timedelta(hours=1, microseconds=5), entrypoint=entrypoint, now=NOW
    )
    assert token.invite and not token.login
    assert token.user == ""  # upstream sets no user on an invite
    assert token.entrypoint.deployment_id == "dep-1"
    until = NOW + datetime.timedelta(hours=1, microseconds=5)
    assert token.valid_until.seconds == int(until.timestamp())
    assert token.valid_until.nanos == 5_000

    text = tokens.encode(token, "k1", KEY)
    assert tokens.decode(text, KEYS, NOW)[0] == token
    # Valid up to and including valid_until (upstream: expired if before now).
    assert tokens.decode(text, KEYS, until)[0] == token
    assert reason(text, now=until + datetime.timedelta(microseconds=1)) == tokens.EXPIRED


def test_naive_now_is_utc() -> None:
    token = tokens.invite_token(datetime.timedelta(seconds=10), now=NOW)
    text = tokens.encode(token, "k1", KEY)
    naive = NOW.replace(tzinfo=None)
    assert tokens.decode(text, KEYS, naive + datetime.timedelta(seconds=10))[0] == token
    assert reason(text, now=naive + datetime.timedelta(seconds=11)) == tokens.EXPIRED


def test_other_timezone_now() -> None:
    token = tokens.invite_token(datetime.timedelta(seconds=10), now=NOW)
    text = tokens.encode(token, "k1", KEY)
    east = datetime.timezone(datetime.timedelta(hours=5))
    assert tokens.decode(text, KEYS, NOW.astimezone(east))[0] == token
    later = (NOW + datetime.timedelta(seconds=11)).astimezone(east)
    assert reason(text, now=later) == tokens.EXPIRED


def test_negative_duration_invite_is_already_expired() -> None:
    token = tokens.invite_token(datetime.timedelta(seconds=-1), now=NOW)
    assert reason(tokens.encode(token, "k1", KEY)) == tokens.EXPIRED


def test_encoding_is_deterministic_including_metadata_order() -> None:
    token = tokens.login_token()
    first = tokens.encode(token, "k1", KEY, {"a": "1", "b": "2"})
    second = tokens.encode(token, "k1", KEY, {"b": "2", "a": "1"})
    assert first == second


def test_helpers() -> None:
    key = tokens.new_key()
    assert len(key) == tokens.KEY_SIZE == 32
    assert key != tokens.new_key()

    entrypoint = vs.Token.Entrypoint(deployment_id="x")
    login = tokens.login_token(user="alice", entrypoint=entrypoint)
    entrypoint.deployment_id = "changed"  # the token holds a copy
    assert login.user == "alice"
    assert login.entrypoint.deployment_id == "x"
    assert len(login.token_id) == tokens.TOKEN_ID_SIZE == 16
    assert login.token_id != tokens.login_token().token_id
    assert tokens.token_id_hex(login) == login.token_id.hex()
    assert len(tokens.token_id_hex(login)) == 32


def test_magic_alone_is_the_upstream_empty_token() -> None:
    # Upstream tests use "445DHu" as base58(b"wp24"): an empty transport.
    assert armor(tokens.MAGIC) == "445DHu"
    assert reason("445DHu") == tokens.UNKNOWN_KEY


# The encoding, pinned


def test_minted_token_decodes_with_the_minimal_decoder() -> None:
    token = tokens.invite_token(
        datetime.timedelta(minutes=5),
        entrypoint=vs.Token.Entrypoint(deployment_id="dep"),
        now=NOW,
    )
    text = tokens.encode(token, "k1", KEY, {"z": "last", "a": "first"})
    body = decode_body(text, KEYS)
    assert body == token.SerializeToString(deterministic=True)
    assert vs.Token.FromString(body) == token
    with pytest.raises(ValueError, match="unknown key"):
        decode_body(text, {"k2": KEY})
    with pytest.raises(ValueError, match="bad signature"):
        decode_body(text, {"k1": bytes(32)})


def test_golden_vector() -> None:
    token = golden_token()
    body = token.SerializeToString(deterministic=True)
    assert body.hex() == GOLDEN_BODY_HEX
    assert tokens.sign(body, GOLDEN_KEY).hex() == GOLDEN_SIGNATURE_HEX
    assert tokens.encode(token, "k1", GOLDEN_KEY, {"b": "2", "a": "1"}) == GOLDEN_TEXT

    keys = {"k1": GOLDEN_KEY}
    decoded, transport = tokens.decode(GOLDEN_TEXT, keys, datetime.datetime(2023, 1, 1))
    assert decoded == token
    assert dict(transport.metadata) == {"a": "1", "b": "2"}
    assert decode_body(GOLDEN_TEXT, keys).hex() == GOLDEN_BODY_HEX
    assert reason(GOLDEN_TEXT, keys) == tokens.EXPIRED  # NOW is after 2023-11-14


@given(st.binary(max_size=200))
def test_minimal_base58_agrees_with_the_package(raw: bytes) -> None:
    assert base58_decode(armor(raw)) == raw


# Every rejection


def valid_text(metadata: dict[str, str] | None = None) -> str:
    return tokens.encode(tokens.login_token(), "k1", KEY, metadata)


def signed_transport(body: bytes, key_id: str = "k1") -> str:
    transport = vs.TokenTransport(body=body, signature=tokens.sign(body, KEY), key_id=key_id)
    return rearmor(transport)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", tokens.BAD_MAGIC, id="empty"),
        pytest.param("abc", tokens.BAD_MAGIC, id="three-chars"),
        pytest.param("1111", tokens.BAD_MAGIC, id="zero-bytes"),
        pytest.param("0OIl", tokens.NOT_BASE58, id="not-base58"),
        pytest.param("445DHu0", tokens.NOT_BASE58, id="zero-digit"),
        pytest.param("445DHu ", tokens.NOT_BASE58, id="trailing-space"),
        pytest.param("445DHu\n", tokens.NOT_BASE58, id="trailing-newline"),
        pytest.param("Bearer 445DHu", tokens.NOT_BASE58, id="bearer-prefix"),
        pytest.param("445DHué", tokens.NOT_BASE58, id="non-ascii"),
        pytest.param(armor(b"wp25" + b"\x1a\x02k1"), tokens.BAD_MAGIC, id="wrong-magic"),
        pytest.param(armor(b"wp2"), tokens.BAD_MAGIC, id="short-magic"),
        pytest.param(armor(b"\0wp24"), tokens.BAD_MAGIC, id="leading-zero-byte"),
        pytest.param(armor(b"wp24\xff"), tokens.MALFORMED, id="garbage-transport"),
        pytest.param(armor(b"wp24\x1a\x02\xff\xfe"), tokens.MALFORMED, id="key-id-not-utf8"),
        pytest.param("2" * (tokens.MAX_TOKEN_TEXT + 1), tokens.MALFORMED, id="too-long"),
        pytest.param(signed_transport(b"\xff"), tokens.MALFORMED, id="signed-garbage-body"),
        pytest.param(signed_transport(b"", key_id="k9"), tokens.UNKNOWN_KEY, id="unknown-key"),
    ],
)
def test_rejections(text: str, expected: str) -> None:
    assert reason(text) == expected


def test_message_texts() -> None:
    reasons = [
        tokens.MALFORMED,
        tokens.NOT_BASE58,
        tokens.BAD_MAGIC,
        tokens.UNKNOWN_KEY,
        tokens.BAD_SIGNATURE,
        tokens.EXPIRED,
    ]
    assert [r.removeprefix("invalid authentication token: ") for r in reasons] == [
        "malformed token",
        "not base58",
        "bad magic",
        "unknown key",
        "bad signature",
        "token has expired",
    ]


def test_not_a_string_is_malformed() -> None:
    assert reason(cast(Any, None)) == tokens.MALFORMED
    assert reason(cast(Any, b"445DHu")) == tokens.MALFORMED


def test_truncated_transport() -> None:
    raw = unarmor(valid_text({"k": "v"}))
    for cut in (1, 2, 10, len(raw) - len(tokens.MAGIC) - 1):
        assert reason(armor(raw[:-cut])) == tokens.MALFORMED, cut


def test_flipped_signature_bit() -> None:
    transport = transport_of(valid_text())
    signature = bytearray(transport.signature)
    signature[0] ^= 0x01
    transport.signature = bytes(signature)
    assert reason(rearmor(transport)) == tokens.BAD_SIGNATURE


def test_truncated_or_missing_signature() -> None:
    transport = transport_of(valid_text())
    transport.signature = transport.signature[:-1]
    assert reason(rearmor(transport)) == tokens.BAD_SIGNATURE
    transport.ClearField("signature")
    assert reason(rearmor(transport)) == tokens.BAD_SIGNATURE


def test_mutated_body() -> None:
    transport = transport_of(valid_text())
    body = vs.Token.FromString(transport.body)
    body.user = "root"
    transport.body = body.SerializeToString()
    assert reason(rearmor(transport)) == tokens.BAD_SIGNATURE


def test_unknown_key_id() -> None:
    assert reason(valid_text(), keys={"k2": KEY}) == tokens.UNKNOWN_KEY
    assert reason(valid_text(), keys={}) == tokens.UNKNOWN_KEY
    assert reason(valid_text(), keys={"K1": KEY}) == tokens.UNKNOWN_KEY  # exact match


def test_signed_with_another_key() -> None:
    text = tokens.encode(tokens.login_token(), "k1", tokens.new_key())
    assert reason(text) == tokens.BAD_SIGNATURE


def test_expired_invite() -> None:
    token = tokens.invite_token(datetime.timedelta(minutes=5), now=NOW)
    text = tokens.encode(token, "k1", KEY)
    assert reason(text, now=NOW + datetime.timedelta(minutes=6)) == tokens.EXPIRED


def test_unix_epoch_valid_until_is_expired() -> None:
    token = tokens.login_token()
    token.valid_until.SetInParent()  # set, all zero: 1970-01-01
    assert reason(tokens.encode(token, "k1", KEY)) == tokens.EXPIRED


def test_metadata_and_unknown_fields_are_not_signed() -> None:
    """Documented weakness of the upstream format: only the body is signed."""
    text = valid_text({"role": "user"})
    transport = transport_of(text)
    transport.metadata["role"] = "admin"
    token, decoded = tokens.decode(rearmor(transport), KEYS, NOW)
    assert decoded.metadata["role"] == "admin"
    assert token == tokens.decode(text, KEYS, NOW)[0]


def test_bad_key_in_ring_is_a_server_bug() -> None:
    for key in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError, match="32 bytes"):
            tokens.sign(b"body", key)
    with pytest.raises(ValueError, match="32 bytes"):
        tokens.decode(valid_text(), {"k1": b""}, NOW)


def test_encode_refuses_tokens_decode_would_reject() -> None:
    with pytest.raises(ValueError, match="characters"):
        tokens.encode(tokens.login_token(), "k1", KEY, {"big": "x" * 4000})


# Fuzzing: decode returns or raises Unauthenticated, nothing else


def decode_outcome(text: str) -> tuple[vs.Token, vs.TokenTransport] | None:
    """The decoded pair, or None when rejected (with a message from the table)."""
    try:
        return tokens.decode(text, KEYS, NOW)
    except Unauthenticated as exc:
        assert exc.message.startswith(tokens.ERROR_PREFIX)
        assert exc.message in REASONS
        return None


REASONS = {
    tokens.MALFORMED,
    tokens.NOT_BASE58,
    tokens.BAD_MAGIC,
    tokens.UNKNOWN_KEY,
    tokens.BAD_SIGNATURE,
    tokens.EXPIRED,
}
ALPHABET = base58.BITCOIN_ALPHABET.decode("ascii")
FUZZ = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_random_text(text: str) -> None:
    decode_outcome(text)


@FUZZ
@given(st.text(alphabet=ALPHABET, max_size=300))
def test_fuzz_random_base58_text(text: str) -> None:
    decode_outcome(text)


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_random_bytes(raw: bytes, with_magic: bool) -> None:
    decode_outcome(armor(tokens.MAGIC + raw if with_magic else raw))


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    """(original token text, mutated decoded bytes): flip, insert or delete a byte."""
    metadata = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    invite = draw(st.booleans())
    if invite:
        token = tokens.invite_token(datetime.timedelta(hours=1), now=NOW)
    else:
        token = tokens.login_token()
    text = tokens.encode(token, "k1", KEY, metadata)
    raw = bytearray(unarmor(text))
    kind = draw(st.sampled_from(["flip", "insert", "delete"]))
    if kind == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] ^= draw(st.integers(1, 255))
    elif kind == "insert":
        raw.insert(draw(st.integers(0, len(raw))), draw(st.integers(0, 255)))
    else:
        del raw[draw(st.integers(0, len(raw) - 1))]
    return text, bytes(raw)


@FUZZ
@given(mutations())
def test_fuzz_mutated_tokens(case: tuple[str, bytes]) -> None:
    text, mutated = case
    original = transport_of(text)
    outcome = decode_outcome(armor(mutated))

    if mutated[: len(tokens.MAGIC)] != tokens.MAGIC:
        assert outcome is None
        return
    parsed = vs.TokenTransport()
    try:
        parsed.ParseFromString(mutated[len(tokens.MAGIC) :])
    except Exception:
        assert outcome is None
        return
    if (parsed.body, parsed.signature) != (original.body, original.signature):
        assert outcome is None, "a changed body or signature was accepted"
    if outcome is not None:
        token, transport = outcome
        assert transport.body == original.body
        assert token == vs.Token.FromString(original.body)


@FUZZ
@given(mutations())
def test_fuzz_minimal_decoder_never_accepts_a_changed_body(case: tuple[str, bytes]) -> None:
    text, mutated = case
    original_body = decode_body(text, KEYS)
    try:
        body = decode_body(armor(mutated), KEYS)
    except ValueError:
        return
    assert body == original_body
    assert parse_transport(mutated[len(tokens.MAGIC) :])[0] == original_body
