"""Minting and checking tokens against the keys and revocations in the store."""

from __future__ import annotations

import datetime
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from waystation.auth import tokens
from waystation.engine.rules import now_us
from waystation.errors import InvalidArgument, PermissionDenied, Unauthenticated
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store.auth import active_keys, bootstrap, is_revoked, revoke, signing_key
from waystation.store.database import Database

# Active keys are cached this long: a key retired elsewhere stops working
# within it. Revocations are looked up on every call, so they act at once.
KEY_CACHE_SECONDS = 2.0
MAX_METADATA = 1024


@dataclass
class Authenticator:
    db: Database
    _keys: dict[str, bytes] = field(default_factory=dict)
    _keys_at: float = -1e9

    async def _active_keys(self, *, fresh: bool = False) -> dict[str, bytes]:
        if fresh or time.monotonic() - self._keys_at > KEY_CACHE_SECONDS:
            self._keys = await self.db.read(active_keys)
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
        token, _ = await self._decode(text)
        await self._not_revoked(token)
        return token

    async def _not_revoked(self, token: vs.Token) -> None:
        # Looked up on every call, not cached: a revocation acts at once everywhere.
        revoked: bool = await self.db.read(is_revoked, token.token_id.hex())
        if revoked:
            raise Unauthenticated("invalid authentication token: token has been revoked")

    async def mint(self, token: vs.Token, metadata: dict[str, str] | None = None) -> str:
        key_id, key = await self.db.write(signing_key, now_us())
        return tokens.encode(token, key_id, key, metadata)

    async def bootstrap(self) -> str:
        key = await self.db.write(bootstrap, now_us())
        if key is None:
            raise PermissionDenied("server is already bootstrapped")
        return tokens.encode(tokens.login_token(), *key)

    async def login(self, entrypoint: vs.Token.Entrypoint | None = None) -> str:
        return await self.mint(tokens.login_token(entrypoint=entrypoint))

    async def invite(
        self, duration: datetime.timedelta, entrypoint: vs.Token.Entrypoint | None = None
    ) -> str:
        return await self.mint(tokens.invite_token(duration, entrypoint=entrypoint, now=_now()))

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
        return await self.mint(tokens.login_token(entrypoint=entrypoint), metadata)

    async def revoke(self, token_id_hex: str) -> bool:
        return await self.db.write(revoke, token_id_hex.lower(), now_us())


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
    text = metadata.get("authorization", "")
    token = text.removeprefix("Bearer ") if isinstance(text, str) else ""

    async def check() -> None:
        await authenticator.verify(token)

    return check
