"""Verbs of tokens and their signing keys."""

from __future__ import annotations

from waystation.store import auth as auth_tx
from waystation.store.verbs.base import Pending, Verbs


class AuthVerbs(Verbs):
    def key_signing(self, now: int) -> Pending[tuple[str, bytes]]:
        """The key to sign new tokens with (made on first use)."""
        return self._db.write(auth_tx.signing_key, now)

    def keys_active(self) -> Pending[dict[str, bytes]]:
        """Every key a token may be signed with: id -> key."""
        return self._db.read(auth_tx.active_keys)

    def key_rotate(self, now: int) -> Pending[str]:
        """A new signing key; the id."""
        return self._db.write(auth_tx.keys_rotate, now)

    def key_retire(self, key_id: str, now: int) -> Pending[None]:
        """Retire a key: tokens it signed stop working (FailedPrecondition for the last)."""
        return self._db.write(auth_tx.keys_retire, key_id, now)

    def keys_list(self) -> Pending[list[tuple[str, int, int | None]]]:
        """(id, created, retired) of every key."""
        return self._db.read(auth_tx.keys_list)

    def token_bootstrap(self, now: int) -> Pending[tuple[str, bytes] | None]:
        """The key for the bootstrap token, once per server (None after)."""
        return self._db.write(auth_tx.bootstrap, now)

    def token_revoke(self, token_id: str, now: int) -> Pending[bool]:
        """Revoke a token by id; whether it was not revoked already."""
        return self._db.write(auth_tx.revoke, token_id, now)

    def token_is_revoked(self, token_id: str) -> Pending[bool]:
        """Whether a token id is revoked."""
        return self._db.read(auth_tx.is_revoked, token_id)

    # Without an event loop: `waystation server keys` on a stopped server.

    def key_rotate_now(self, now: int) -> str:
        """key_rotate, blocking."""
        return self._db.run_sync(lambda conn: auth_tx.keys_rotate(conn, now))

    def key_retire_now(self, key_id: str, now: int) -> None:
        """key_retire, blocking."""
        self._db.run_sync(lambda conn: auth_tx.keys_retire(conn, key_id, now))

    def keys_list_now(self) -> list[tuple[str, int, int | None]]:
        """keys_list, blocking."""
        return self._db.run_sync(auth_tx.keys_list)
