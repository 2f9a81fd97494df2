"""Emit arguments end to end: machine text -> build -> import -> dispatch -> outbox -> delivery.

The emitted payload is built when the event is emitted (from the emit's arguments, which the
compiler completes with the causing event's same-named fields), stored in the outbox with the
change, and delivered as stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from autonomic.compiler.build import build
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.memory import MemoryStore
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.tables import EmitArg, TransitionContext
from autonomic.runtime.timers import VirtualClock
from strategies import import_path

START = 1_700_000_000_000

SHOP = """
machine Shop "Takes orders and tells the ledger." {
  event Order {
    order_id: str, amount: decimal, note: str?, priority: enum(low, high), at: datetime, qty: int
  }
  event Cancel
  initial state Open {
    on Order -> Ordered emit Ledger.Post(
      account = $instance, by = $actor, cause = $event,
      memo = note, fee = 0.50, count = 12, rush = true, channel = "web",
    )
  }
  state Ordered {
    on Cancel -> Closed
    after 2h -> Closed emit Ledger.Expire(
      account = $instance, by = $actor, cause = $event, reason = "order timed out", late = false
    )
  }
  final state Closed
}
"""

LEDGER = """
machine Ledger "Keeps what the shop tells it." {
  event Post {
    order_id: str, amount: decimal, account: str, by: str, cause: str, memo: str?,
    fee: decimal, count: int, rush: bool, channel: enum(web, phone), priority: str,
    at: datetime, qty: decimal
  }
  event Expire { account: str, by: str, cause: str, reason: str, late: bool }
  initial state Empty { on Post -> Posted do keep }
  state Posted { on Expire -> Closed do keep }
  final state Closed
}
"""


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    root = tmp_path_factory.mktemp("emit")
    (root / "machines").mkdir()
    (root / "machines" / "shop.fsm").write_text(SHOP, encoding="utf-8")
    (root / "machines" / "ledger.fsm").write_text(LEDGER, encoding="utf-8")
    result = build([root / "machines"], root / "out", svg=False, strict=True)
    assert not result.report.diagnostics, result.report.diagnostics
    return {name: import_path(root / "out" / f"{name}.py") for name in ("shop", "ledger")}


@pytest.fixture(params=["memory", "sqlite"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runtime]:
    store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    rt = Runtime(store, clock=VirtualClock(START), timer_actor="scheduler")
    yield rt
    rt.close()


def _load(runtime: Runtime, modules: dict[str, ModuleType]) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []

    def keep(ctx: TransitionContext) -> None:
        assert ctx.payload is not None
        received.append(dict(ctx.payload))

    runtime.load(modules["shop"].MACHINE)
    runtime.load(modules["ledger"].MACHINE, actions={"keep": keep})
    runtime.governor("Shop").create("acme")
    runtime.governor("Ledger").create("acme")
    return received


def test_the_compiler_completes_the_mapping_in_target_field_order(
    modules: dict[str, ModuleType],
) -> None:
    (row,) = modules["shop"].TRANSITIONS["Open", "Order"]
    (emit,) = row.emits
    assert (emit.machine, emit.event) == ("Ledger", "Post")
    assert emit.args == (
        EmitArg("order_id", "field", "order_id"),
        EmitArg("amount", "field", "amount"),
        EmitArg("account", "instance", None),
        EmitArg("by", "actor", None),
        EmitArg("cause", "event", None),
        EmitArg("memo", "field", "note"),
        EmitArg("fee", "literal", "0.50"),
        EmitArg("count", "literal", 12),
        EmitArg("rush", "literal", True),
        EmitArg("channel", "literal", "web"),
        EmitArg("priority", "field", "priority"),
        EmitArg("at", "field", "at"),
        EmitArg("qty", "field", "qty"),
    )


def test_a_transition_emit_delivers_the_exact_payload(
    runtime: Runtime, modules: dict[str, ModuleType]
) -> None:
    received = _load(runtime, modules)
    at = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    order = {
        "order_id": "o-1",
        "amount": "12.34",
        "priority": "high",
        "at": at.isoformat(),
        "qty": 3,
    }
    result = runtime.governor("Shop").dispatch("acme", "Order", order, actor="alice")
    assert [(e.machine, e.event) for e in result.emitted] == [("Ledger", "Post")]
    (stored,) = runtime.store.outbox(kind="event", status="pending")
    assert json.loads(stored.body)["fee"] == "0.50"  # written with the change, before delivery
    (delivery,) = runtime.deliver_outbox()
    assert delivery.status == "delivered", delivery.error
    assert received == [
        {
            "order_id": "o-1",
            "amount": Decimal("12.34"),
            "account": "acme",
            "by": "alice",
            "cause": "Order",
            "memo": None,
            "fee": Decimal("0.50"),
            "count": 12,
            "rush": True,
            "channel": "web",
            "priority": "high",
            "at": at,
            "qty": Decimal(3),
        }
    ]
    assert runtime.governor("Ledger").get("acme").state == "Posted"  # type: ignore[union-attr]


def test_a_timer_emit_carries_its_context(runtime: Runtime, modules: dict[str, ModuleType]) -> None:
    received = _load(runtime, modules)
    order = {"order_id": "o-2", "amount": "1", "note": "gift", "priority": "low"}
    order |= {"at": "2024-05-01T00:00:00Z", "qty": 1}
    runtime.governor("Shop").dispatch("acme", "Order", order, actor="bob")
    runtime.deliver_outbox()
    assert received[0]["memo"] == "gift"
    clock = runtime.clock
    assert isinstance(clock, VirtualClock)
    clock.advance("2h")
    (firing,) = runtime.fire_due()
    assert firing.result.to_state == "Closed"
    (delivery,) = runtime.deliver_outbox()
    assert delivery.status == "delivered", delivery.error
    assert received[1] == {
        "account": "acme",
        "by": "scheduler",
        "cause": "Ordered/after/2h#0",
        "reason": "order timed out",
        "late": False,
    }
    assert runtime.governor("Ledger").get("acme").state == "Closed"  # type: ignore[union-attr]


def test_a_payload_the_receiver_refuses_is_marked_failed_not_lost(
    runtime: Runtime, modules: dict[str, ModuleType]
) -> None:
    """The body is the receiver's to judge: a bad stored body fails with the reason."""
    received = _load(runtime, modules)
    order = {"order_id": "o-3", "amount": "5", "priority": "low"}
    order |= {"at": "2024-05-01T00:00:00Z", "qty": 2}
    runtime.governor("Shop").dispatch("acme", "Order", order)
    runtime.governor("Ledger").dispatch("acme", "Post", {**_post(), "order_id": "direct"})
    (delivery,) = runtime.deliver_outbox()
    assert delivery.status == "failed" and delivery.error is not None
    assert delivery.error.startswith("R0")  # Posted accepts no Post: rejected, kept as failed
    assert [r["order_id"] for r in received] == ["direct"]
    assert runtime.store.outbox(kind="event", status="failed")


def _post() -> dict[str, Any]:
    return {
        "order_id": "x",
        "amount": "1",
        "account": "acme",
        "by": "me",
        "cause": "test",
        "fee": "0",
        "count": 1,
        "rush": False,
        "channel": "phone",
        "priority": "low",
        "at": "2024-05-01T00:00:00Z",
        "qty": "1",
    }
