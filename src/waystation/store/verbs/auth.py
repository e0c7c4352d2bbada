"""Verbs of tokens and their signing keys."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from waystation.core.roles import BOOTSTRAP_USER, Actor, Role
from waystation.store import auth as auth_tx
from waystation.store import tokens as tokens_tx
from waystation.store import users as users_tx
from waystation.store.audit import audited, audited_as
from waystation.store.tokens import TokenRow
from waystation.store.users import User
from waystation.store.verbs.base import Pending, Verbs


class AuthVerbs(Verbs):
    def key_signing(self, now: int) -> Pending[tuple[str, bytes]]:
        """The key to sign new tokens with (made on first use)."""
        return self._db.write(auth_tx.signing_key, now)

    def keys_active(self) -> Pending[dict[str, bytes]]:
        """Every key a token may be signed with: id -> key."""
        return self._db.read(auth_tx.active_keys)

    def key_rotate(self, now: int, actor: Actor | None = None) -> Pending[str]:
        """A new signing key; the id (audited if `actor` is given)."""
        return self._db.write(_key_rotate, actor, now)

    def key_retire(self, key_id: str, now: int, actor: Actor | None = None) -> Pending[None]:
        """Retire a key: tokens it signed stop working (FailedPrecondition for the last)."""
        return self._db.write(
            audited, actor, "key.retire", key_id, now, auth_tx.keys_retire, key_id, now
        )

    def keys_list(self) -> Pending[list[tuple[str, int, int | None]]]:
        """(id, created, retired) of every key."""
        return self._db.read(auth_tx.keys_list)

    def token_bootstrap(
        self, now: int, user: str = BOOTSTRAP_USER
    ) -> Pending[tuple[str, bytes] | None]:
        """The key for the bootstrap token, once per server (None after); `user` the first admin."""
        return self._db.write(auth_tx.bootstrap, now, user)

    def token_revoke(self, token_id: str, now: int, actor: Actor | None = None) -> Pending[bool]:
        """Revoke a token by id; whether it was not revoked already."""
        return self._db.write(
            audited, actor, "token.revoke", token_id, now, auth_tx.revoke, token_id, now
        )

    def token_is_revoked(self, token_id: str) -> Pending[bool]:
        """Whether a token id is revoked."""
        return self._db.read(auth_tx.is_revoked, token_id)

    def token_standing(self, token_id: str, user: str) -> Pending[tuple[bool, User | None]]:
        """Whether a token id is revoked, and its user's row (None if absent): per call."""
        return self._db.read(users_tx.token_standing, token_id, user)

    # -- minted tokens ---------------------------------------------------------

    def token_add(self, row: TokenRow, actor: Actor | None, action: str, now: int) -> Pending[None]:
        """Record a minted token, audited as `action` by `actor` in the same transaction."""
        obj = f"{row.token_id} for {row.user}"
        return self._db.write(audited, actor, action, obj, now, tokens_tx.token_add, row)

    def token_find(self, token_id: str) -> Pending[TokenRow | None]:
        """A recorded token by id (None: minted before tokens were recorded, or unknown)."""
        return self._db.read(tokens_tx.token_find, token_id)

    def token_list(self, user: str) -> Pending[list[TokenRow]]:
        """Recorded tokens, every user's or one's, oldest first."""
        return self._db.read(tokens_tx.token_list, user)

    def token_touch(self, token_id: str, now: int) -> Pending[None]:
        """Record a token's use (at most once a minute)."""
        return self._db.write(tokens_tx.token_touch, token_id, now)

    # -- users -----------------------------------------------------------------

    def user_create(
        self, name: str, role: Role, now: int, actor: Actor | None = None
    ) -> Pending[User]:
        """A new user (AlreadyExists when the name, ignoring case, is taken)."""
        return self._db.write(
            audited,
            actor,
            "user.create",
            f"{name} ({role})",
            now,
            users_tx.user_create,
            name,
            role,
            now,
        )

    def user_ensure(self, name: str, role: Role, now: int) -> Pending[User]:
        """The user named so, created with `role` if absent."""
        return self._db.write(users_tx.user_ensure, name, role, now)

    def user_get(self, name: str) -> Pending[User]:
        """One user, by name ignoring case (NotFound)."""
        return self._db.read(users_tx.user_get, name)

    def user_list(self) -> Pending[list[User]]:
        """Every user, by name."""
        return self._db.read(users_tx.user_list)

    def user_set_role(
        self, name: str, role: Role, actor: Actor | None = None, now: int = 0
    ) -> Pending[User]:
        """Change a user's role (not the last enabled admin's)."""
        obj = f"{name} -> {role}"
        return self._db.write(
            audited, actor, "user.set_role", obj, now, users_tx.user_set_role, name, role
        )

    def user_disable(self, name: str, now: int, actor: Actor | None = None) -> Pending[User]:
        """Disable a user: their tokens are refused from now on."""
        return self._db.write(
            audited, actor, "user.disable", name, now, users_tx.user_disable, name, now
        )

    def user_delete(self, name: str, actor: Actor | None = None, now: int = 0) -> Pending[None]:
        """Delete a user (not the last enabled admin) and revoke their recorded tokens."""
        return self._db.write(
            audited, actor, "user.delete", name, now, users_tx.user_delete, name, now
        )

    # Without an event loop: `waystation server keys` on a stopped server.

    def key_rotate_now(self, now: int, actor: Actor | None = None) -> str:
        """key_rotate, blocking."""
        return self._db.run_sync(lambda conn: _key_rotate(conn, actor, now))

    def key_retire_now(self, key_id: str, now: int, actor: Actor | None = None) -> None:
        """key_retire, blocking."""
        self._db.run_sync(
            lambda conn: audited(
                conn, actor, "key.retire", key_id, now, auth_tx.keys_retire, key_id, now
            )
        )

    def keys_list_now(self) -> list[tuple[str, int, int | None]]:
        """keys_list, blocking."""
        return self._db.run_sync(auth_tx.keys_list)


def _key_rotate(conn: Connection, actor: Actor | None, now: int) -> str:
    """A new signing key, audited as `key.rotate` with its id."""
    return audited_as(
        conn, actor, lambda key_id: ("key.rotate", key_id), now, auth_tx.keys_rotate, now
    )
