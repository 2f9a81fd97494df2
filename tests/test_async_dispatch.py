"""dispatch_async and create_async: coroutines share group commits, errors arrive as raised."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from autonomic.runtime.errors import InvalidTransition, UnknownInstance
from autonomic.runtime.keys import generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore
from runtime_machines import Bindings, counter_spec

COROUTINES, TICKS = 64, 5


async def tick_all(rt: Runtime) -> None:
    counter = rt.governor("Counter")
    await asyncio.gather(*(counter.create_async(f"c{n}") for n in range(COROUTINES)))

    async def ticker(instance: str) -> None:
        for _ in range(TICKS):
            result = await counter.dispatch_async(instance, "Tick")
            assert result.instance == instance and result.to_state == "Counting"

    await asyncio.gather(*(ticker(f"c{n}") for n in range(COROUTINES)))


def test_concurrent_coroutines_share_commits_and_lose_nothing(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "keys")
    sealer = LedgerSealer(load_signer(tmp_path / "keys"), "checkpoint")
    rt = Runtime(SQLiteStore(tmp_path / "a.db", synchronous="NORMAL"), sealer=sealer)
    spec = counter_spec()
    rt.load(spec, *Bindings().for_spec(spec))
    asyncio.run(tick_all(rt))
    units = COROUTINES * (1 + TICKS)
    versions = [r.version for r in rt.store.instances("Counter")]
    assert versions == [1 + TICKS] * COROUTINES
    assert len(list(rt.ledger())) == units + 1  # and the genesis entry
    # Every coroutine waits for its commit, so they pile up behind each one.
    assert rt.commit_batches <= units // 4
    rt.close()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_errors_are_raised_in_the_awaiting_coroutine(tmp_path: Path, store: str) -> None:
    backing = MemoryStore() if store == "memory" else SQLiteStore(tmp_path / "e.db")
    rt = Runtime(backing)
    spec = counter_spec()
    counter = rt.load(spec, *Bindings().for_spec(spec))

    async def run() -> None:
        await counter.create_async("c1")
        with pytest.raises(UnknownInstance):
            await counter.dispatch_async("nobody", "Tick")
        with pytest.raises(InvalidTransition):
            await counter.dispatch_async("c1", "Release")
        stopped = await counter.dispatch_async("c1", "Stop")
        assert (stopped.to_state, stopped.version) == ("Stopped", 2)

    asyncio.run(run())
    rt.close()
