"""Verbs of runners and their config variables."""

from __future__ import annotations

from collections.abc import Iterable

from waystation.core.roles import Actor
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import runners as runner_tx
from waystation.store.audit import audited
from waystation.store.verbs.base import Pending, Verbs


class RunnerVerbs(Verbs):
    def runner_register(self, runner: vs.Runner, now: int, lease: int) -> Pending[vs.Runner]:
        """Record a runner as online until `now + lease`."""
        return self._db.write(runner_tx.runner_register, runner, now, lease)

    def runner_offline(self, runner_id: str, now: int) -> Pending[None]:
        """Its last config stream here closed: offline."""
        return self._db.write(runner_tx.runner_offline, runner_id, now)

    def runners_renew(self, runner_ids: Iterable[str], now: int, lease: int) -> Pending[None]:
        """Connected runners stay online another lease (off the event loop: maybe many)."""
        return self._db.write_bulk(runner_tx.runners_renew, runner_ids, now, lease)

    def runner_get(self, runner_id: str) -> Pending[vs.Runner]:
        """One runner as registered (NotFound)."""
        return self._db.read(runner_tx.runner_get, runner_id)

    def runners_list(self, now: int) -> Pending[list[tuple[vs.Runner, bool, int]]]:
        """Every runner, whether online, and when last seen."""
        return self._db.read(runner_tx.runners_list, now)

    def runner_assignable(self, runner_id: str | None, now: int) -> Pending[bool]:
        """Whether a runner that may take a job aimed at `runner_id` (None: any) is online."""
        return self._db.read(runner_tx.runner_assignable, runner_id, now)

    def runner_config(self, runner_id: str) -> Pending[list[vs.ConfigVar]]:
        """The config variables a runner gets."""
        return self._db.read(runner_tx.runner_config, runner_id)

    def config_set(
        self, variables: list[vs.ConfigVar], actor: Actor | None = None, now: int = 0
    ) -> Pending[bool]:
        """Set (or with no value, unset) config variables; whether anything changed."""
        # Names only: values may be secrets.
        obj = ", ".join(sorted({v.name for v in variables}))
        return self._db.write(
            audited, actor, "config.set", obj, now, runner_tx.config_set, variables
        )

    def config_get(self, request: vs.ConfigGetRequest) -> Pending[list[vs.ConfigVar]]:
        """Config variables of a scope."""
        return self._db.read(runner_tx.config_get, request)
