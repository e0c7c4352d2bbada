"""Minting and checking tokens against the keys and revocations in the store."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from waystation.auth import tokens
from waystation.core.roles import BOOTSTRAP_USER, LEGACY_USER, Actor, Role, user_name_problem
from waystation.core.timeouts import now_us
from waystation.core.wire import AUTHORIZATION
from waystation.errors import InvalidArgument, PermissionDenied, Unauthenticated
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store
from waystation.store.tokens import TOUCH_EVERY_US, TokenRow
from waystation.store.users import User

# Active keys are cached this long: a key retired elsewhere stops working
# within it. Revocations are looked up on every call, so they act at once.
KEY_CACHE_SECONDS = 2.0
MAX_METADATA = 1024
REVOKED = tokens.ERROR_PREFIX + "token has been revoked"
DEFAULT_TOKEN_TTL = 30 * 24 * 3600.0
MAX_TOUCHED = 100_000  # token ids remembered for last-use throttling

NEVER = -1e9  # when the keys were last read, before the first time

log = logging.getLogger(__name__)


@dataclass
class Authenticator:
    store: Store
    # Seconds a login token is valid when the minter asks for no TTL; 0: forever.
    token_ttl: float = DEFAULT_TOKEN_TTL
    _keys: dict[str, bytes] = field(default_factory=dict)
    _keys_at: float = NEVER
    # When this replica last recorded each token's use (microseconds).
    _touched: dict[str, int] = field(default_factory=dict)

    async def _active_keys(self, *, fresh: bool = False) -> dict[str, bytes]:
        if fresh or time.monotonic() - self._keys_at > KEY_CACHE_SECONDS:
            keys = await self.store.keys_active()
            if self._keys_at != NEVER:  # a rotation or retirement, here or on another replica
                for key_id in keys.keys() - self._keys.keys():
                    log.info("signing key %s is active", key_id, extra={"key_id": key_id})
                for key_id in self._keys.keys() - keys.keys():
                    log.info("signing key %s was retired", key_id, extra={"key_id": key_id})
            self._keys = keys
            self._keys_at = time.monotonic()
        return self._keys

    async def _decode(self, text: str) -> tuple[vs.Token, vs.TokenTransport]:
        try:
            return tokens.decode(text, await self._active_keys(), _now())
        except Unauthenticated as exc:
            if exc.message != tokens.UNKNOWN_KEY:
                raise
        # A key made since the cache was filled (a rotation, the first key): look again.
        return tokens.decode(text, await self._active_keys(fresh=True), _now())

    async def verify(self, text: str) -> vs.Token:
        """The token's claims, or Unauthenticated with a precise reason."""
        token, _ = await self.authenticate(text)
        return token

    async def authenticate(self, text: str) -> tuple[vs.Token, User | None]:
        """The token's claims and its user (None for an invite, which names no
        user yet), or Unauthenticated: revoked, or its user deleted or disabled."""
        token, _ = await self._decode(text)
        if token.invite:
            await self._not_revoked(token)
            return token, None
        return token, await self._standing(token)

    async def _standing(self, token: vs.Token) -> User:
        # Read on every call, never cached: a revocation, a disabled or deleted
        # user and a new role act at once on every replica.
        revoked, user = await self.store.token_standing(tokens.token_id_hex(token), token.user)
        if revoked:
            raise Unauthenticated(REVOKED)
        if user is None:
            raise Unauthenticated(f"{tokens.ERROR_PREFIX}its user {token.user!r} does not exist")
        if user.disabled:
            raise Unauthenticated(f"{tokens.ERROR_PREFIX}its user {user.name} is disabled")
        await self._touch(tokens.token_id_hex(token))
        return user

    async def _touch(self, token_id: str) -> None:
        # Last use at most once a minute per token here (and in the store across
        # replicas): a call costs no write of its own.
        now = now_us()
        if now - self._touched.get(token_id, -TOUCH_EVERY_US) < TOUCH_EVERY_US:
            return
        if len(self._touched) > MAX_TOUCHED:
            self._touched.clear()
        self._touched[token_id] = now
        await self.store.token_touch(token_id, now)

    async def _not_revoked(self, token: vs.Token) -> None:
        revoked: bool = await self.store.token_is_revoked(tokens.token_id_hex(token))
        if revoked:
            raise Unauthenticated(REVOKED)

    async def mint(
        self,
        token: vs.Token,
        metadata: dict[str, str] | None = None,
        how: str = "login",
        **fields: str,
    ) -> str:
        key_id, key = await self.store.key_signing(now_us())
        return _minted(token, key_id, key, metadata, how, **fields)

    async def bootstrap(self, user: str = BOOTSTRAP_USER) -> str:
        """The first token, for `user`, the first admin; PermissionDenied after."""
        problem = user_name_problem(user)
        if problem:
            raise InvalidArgument(f"invalid user name {user!r}: {problem}")
        key = await self.store.token_bootstrap(now_us(), user)
        if key is None:
            raise PermissionDenied("server is already bootstrapped")
        # The bootstrap token never expires: it is how the first admin gets in.
        token = tokens.login_token(user)
        text = _minted(token, *key, None, "bootstrap", user=user)
        actor = Actor(user, tokens.token_id_hex(token))
        await self._record(token, actor, "token.bootstrap", "bootstrap")
        return text

    async def login(
        self,
        user: str,
        entrypoint: vs.Token.Entrypoint | None = None,
        actor: Actor | None = None,
        *,
        ttl: float | None = None,
        label: str = "",
    ) -> str:
        """A login token for `user` (as the store spells the name), valid `ttl`
        seconds (None: the server's default; 0: until revoked)."""
        token = tokens.login_token(user, entrypoint=entrypoint)
        _expire(token, self.token_ttl if ttl is None else ttl)
        text = await self.mint(token, user=user)
        await self._record(token, actor, "token.login", label)
        return text

    async def _record(
        self,
        token: vs.Token,
        actor: Actor | None,
        action: str,
        label: str,
        role: Role | None = None,
    ) -> None:
        """The token's row, and its audit entry in the same transaction."""
        expires = token.valid_until.ToMicroseconds() if token.HasField("valid_until") else None
        kind = "invite" if token.invite else "login"
        now = now_us()
        row = TokenRow(tokens.token_id_hex(token), token.user, kind, label, now, expires, role)
        await self.store.token_add(row, actor, action, now)

    async def invite(
        self,
        duration: datetime.timedelta,
        entrypoint: vs.Token.Entrypoint | None = None,
        *,
        user: str,
        actor: Actor | None = None,
        role: Role = Role.MEMBER,
        label: str = "",
    ) -> str:
        """An invite that converts to a login token for `user`, created with
        `role` if they do not exist by then."""
        token = tokens.invite_token(duration, entrypoint=entrypoint, now=_now())
        token.user = user
        text = await self.mint(token, how="invite", user=user)
        await self._record(token, actor, "token.invite", label, role)
        return text

    async def convert_invite(self, text: str) -> str:
        token, transport = await self._decode(text)
        if not token.invite:
            raise PermissionDenied("token is not an invite token")
        await self._not_revoked(token)
        entrypoint = token.entrypoint if token.HasField("entrypoint") else None
        # Upstream carries the invite's metadata over; it is not signed, so bound it.
        metadata = dict(transport.metadata)
        if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA:
            raise InvalidArgument(f"invite token metadata over {MAX_METADATA} bytes")
        # Invites made before users existed name none: they were the legacy user's.
        name = token.user or LEGACY_USER
        invite_id = tokens.token_id_hex(token)
        row = await self.store.token_find(invite_id)
        role = row.role if row is not None and row.role else Role.MEMBER
        user = await self.store.user_ensure(name, role, now_us())
        if user.disabled:
            raise PermissionDenied(f"the invite's user {user.name} is disabled")
        login = tokens.login_token(user.name, entrypoint=entrypoint)
        _expire(login, self.token_ttl)
        text = await self.mint(login, metadata, "convert", invite_id=invite_id, user=user.name)
        actor = Actor(user.name, invite_id)
        await self._record(login, actor, "token.convert_invite", f"from invite {invite_id[:8]}")
        return text

    async def revoke(self, token_id_hex: str, actor: Actor | None = None) -> bool:
        token_id = token_id_hex.lower()
        revoked: bool = await self.store.token_revoke(token_id, now_us(), actor)
        if revoked:
            log.info("revoked token %s", token_id, extra={"token_id": token_id})
        else:
            log.info("token %s was already revoked", token_id, extra={"token_id": token_id})
        return revoked


def _minted(
    token: vs.Token,
    key_id: str,
    key: bytes,
    metadata: dict[str, str] | None,
    how: str,
    **fields: str,
) -> str:
    """The token's text; the log gets its id and key id, never the text."""
    text = tokens.encode(token, key_id, key, metadata)
    kind = "invite" if token.invite else "login"
    token_id = tokens.token_id_hex(token)
    about = "".join(f", {name} {value}" for name, value in fields.items())
    fields.update(token_id=token_id, key_id=key_id, token_kind=kind, minted_by=how)
    log.info(
        "minted %s token %s by %s with key %s%s", kind, token_id, how, key_id, about, extra=fields
    )
    return text


def _expire(token: vs.Token, ttl: float) -> None:
    """Make `token` valid for `ttl` seconds from now (0: no expiry)."""
    if ttl > 0:
        seconds, micros = divmod(now_us() + int(ttl * 1_000_000), 1_000_000)
        token.valid_until.seconds = seconds
        token.valid_until.nanos = micros * 1000


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def recheck(
    authenticator: Authenticator, context: aio.ServicerContext[Any, Any], enabled: bool
) -> Callable[[], Awaitable[None]] | None:
    """For calls that wait long (a runner or daemon parked for work): verify the
    caller's token again before handing out a job, so a token revoked meanwhile
    gets nothing more. None when auth is off."""
    if not enabled:
        return None
    metadata = dict(context.invocation_metadata() or ())
    text = metadata.get(AUTHORIZATION, "")
    token = text.removeprefix("Bearer ") if isinstance(text, str) else ""

    async def check() -> None:
        await authenticator.verify(token)

    return check
