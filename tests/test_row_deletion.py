"""What row seals alone do not stop (red team session 3, a04 and the residuals listed in
docs/runtime.md, "What the runtime trusts"): rows DELETED, older genuine rows PUT BACK, a
store EMPTIED. Each attack is made as the red team made it: the real API on a real store
file (or PostgreSQL rows), plain SQL without the key between two runs, then the runtime run
again. Each test says what the runtime now does: refuses (R021, nothing written), or shows
why the attack is harmless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.errors import StoreIntegrityError
from conftest import Stores
from test_row_seals import CHARGE, HOUR, World, keys, refused

__all__ = ["keys"]  # the fixture, imported for pytest

DAY = 24 * HOUR
OTHER = {**CHARGE, "customer_id": "other", "invoice_id": "i-2", "idempotency_key": "i-2"}


@pytest.fixture
def world(tmp_path: Path, keys: Path) -> Any:
    made = World(str(tmp_path / "store.db"), keys)
    yield made
    made.close()


def _charged(world: World, **ids: str) -> None:
    """Billing 'cust' charged (submit_charge called), then paid: back in Current."""
    billing = world.gov("Billing")
    billing.create("cust")
    billing.dispatch("cust", "ChargeRequested", CHARGE, **ids)
    billing.dispatch(
        "cust",
        "PaymentSucceeded",
        {
            "customer_id": "cust",
            "transaction_id": "tx-1",
            "amount": "30.00",
            "idempotency_key": "i-1",
        },
    )
    assert world.payments.submitted.count("i-1") == 1


# -- a04: a dedup row deleted inside its retention ------------------------------------------


def test_a04_a_deleted_idempotency_row_does_not_charge_twice(world: World) -> None:
    _charged(world, idempotency_key="i-1")
    world.close()
    world.sql("DELETE FROM idempotency_keys WHERE key = 'i-1'")
    world.open()
    billing = world.gov("Billing")
    failure = refused(
        world, lambda: billing.dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    )
    assert "idempotency_keys row ('Billing', 'i-1') is missing" in str(failure)
    assert failure.code == "R021"
    assert world.payments.submitted.count("i-1") == 1


def test_a04_a_deleted_processed_event_row_does_not_run_the_event_again(world: World) -> None:
    _charged(world, event_id="charge-1")
    world.close()
    world.sql("DELETE FROM processed_events WHERE event_id = 'charge-1'")
    world.open()
    billing = world.gov("Billing")
    failure = refused(
        world, lambda: billing.dispatch("cust", "ChargeRequested", CHARGE, event_id="charge-1")
    )
    assert "processed_events row ('Billing', 'charge-1') is missing" in str(failure)
    assert world.payments.submitted.count("i-1") == 1


def test_a04_a_retry_after_the_retention_purge_runs_again(world: World) -> None:
    """The honest case: rows purged with their retention are not missed; nor after a key
    rotation, which carries the purge horizon over to the new key."""
    _charged(world, idempotency_key="i-1")
    assert world.runtime is not None
    world.clock.advance(8 * DAY)
    assert world.runtime.purge_expired() == (0, 1)
    again = world.gov("Billing").dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    assert not again.duplicate and world.payments.submitted.count("i-1") == 2


def test_a04_a_forged_purge_horizon_only_makes_the_check_stricter(world: World) -> None:
    _charged(world, idempotency_key="i-1")
    assert world.runtime is not None
    world.clock.advance(8 * DAY)
    world.runtime.purge_expired()
    world.close()
    world.sql(  # a purge horizon in the future, with a seal made up without the key
        "UPDATE runtime_meta SET value = '99999999999999:00' WHERE key = 'dedup_purged_before'"
    )
    world.open()
    billing = world.gov("Billing")
    refused(
        world, lambda: billing.dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    )
    assert world.payments.submitted.count("i-1") == 1


def test_a04_is_refused_on_postgresql_too(postgres_stores: Stores, keys: Path) -> None:
    made = World(postgres_stores.location(), keys, lambda sql: postgres_stores.rows("s", sql))
    try:
        _charged(made, idempotency_key="i-1")
        made.gov("Billing").create("other")
        made.gov("Billing").dispatch("other", "ChargeRequested", OTHER, event_id="charge-2")
        made.close()
        made.sql("DELETE FROM idempotency_keys WHERE key = 'i-1'")
        made.sql("DELETE FROM processed_events WHERE event_id = 'charge-2'")
        made.open()
        billing = made.gov("Billing")
        refused(
            made, lambda: billing.dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
        )
        refused(
            made,
            lambda: billing.dispatch("other", "ChargeRequested", OTHER, event_id="charge-2"),
        )
        # The committed-state reads a dispatch makes before its outside calls check too.
        assert made.runtime is not None
        with pytest.raises(StoreIntegrityError):
            made.runtime._store.idempotency("Billing", "i-1")
        with pytest.raises(StoreIntegrityError):
            made.runtime._store.processed("Billing", "charge-2")
        assert made.payments.submitted.count("i-1") == 1
        made.runtime.purge_expired(made.clock.now_ms() + 8 * DAY)
        assert made.runtime._store.idempotency("Billing", "i-1") is None
    finally:
        made.close()
