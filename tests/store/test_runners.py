"""Conformance of the runner verbs (store/verbs/runners.py): leases and config variables."""

from __future__ import annotations

from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store

from .conftest import LEASE, Reopen, now_us


async def test_a_runner_is_online_for_its_lease_and_offline_after(
    store: Store, reopen: Reopen
) -> None:
    now = now_us()
    await store.runner_register(vs.Runner(id="Runner-1"), now, LEASE)
    store = await reopen()
    assert (await store.runner_get("runner-1")).id == "Runner-1"
    assert await store.runner_assignable(None, now)
    assert await store.runner_assignable("RUNNER-1", now)
    assert not await store.runner_assignable("other", now)
    [(runner, online, _)] = await store.runners_list(now)
    assert (runner.id, online) == ("Runner-1", True)
    await store.runners_renew(["runner-1"], now + LEASE, LEASE)
    assert await store.runner_assignable(None, now + LEASE + 1)
    await store.runner_offline("runner-1", now + 2)
    store = await reopen()
    [(_, online, _)] = await store.runners_list(now + 3)
    assert not online


async def test_config_variables_by_scope_are_durable(store: Store, reopen: Reopen) -> None:
    anyone = vs.ConfigVar(name="region", value="eu", runner=vs.Ref.Runner(any=vs.Ref.RunnerAny()))
    mine = vs.ConfigVar(
        name="region", value="us", runner=vs.Ref.Runner(id=vs.Ref.RunnerId(id="r1"))
    )
    other = vs.ConfigVar(name="zone", value="a", runner=vs.Ref.Runner(any=vs.Ref.RunnerAny()))
    assert await store.config_set([anyone, mine, other])
    store = await reopen()
    got = await store.runner_config("r1")
    assert [(v.name, v.value) for v in got] == [("region", "us"), ("zone", "a")]
    asked = await store.config_get(vs.ConfigGetRequest(runner=vs.Ref.RunnerId(id="r2")))
    assert [(v.name, v.value) for v in asked] == [("region", "eu"), ("zone", "a")]
