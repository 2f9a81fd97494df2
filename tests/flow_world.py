"""A marketplace for flow tests: the seven generated governors with the demo's bindings on a
store, the seed's five flows, a virtual clock and a signed ledger."""

from __future__ import annotations

import importlib
import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from autonomic.generated import FLOWS, MODULES
from autonomic.runtime.demo import _Bindings, _Payments
from autonomic.runtime.flows import FlowRunner, StepContext
from autonomic.runtime.keys import Signer
from autonomic.runtime.ledger import LedgerMode, LedgerSealer
from autonomic.runtime.resilience.claims import DEFAULT_CLAIM_LEASE_MS
from autonomic.runtime.resilience.proration import prorate_upgrade
from autonomic.runtime.results import derive_event_id
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import Store
from autonomic.runtime.tables import FlowSpec
from autonomic.runtime.timers import Clock, VirtualClock
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def flow_specs() -> list[FlowSpec]:
    return [importlib.import_module(f"autonomic.generated.{m}").FLOW for m in FLOWS]


def refund_due(values: Mapping[str, Any]) -> str:
    """The cancellation saga's pure step: half of the period price, to the cent."""
    return str((Decimal(str(values.get("period_price", "30.00"))) / 2).quantize(Decimal("0.01")))


def marketplace(
    store: Store,
    *,
    signer: Signer | None = None,
    before_step: Callable[[StepContext], None] | None = None,
    clock: Clock | None = None,
    mode: LedgerMode = "sign-each",
    snapshot_every: int = 100,
    claim_lease_ms: int = DEFAULT_CLAIM_LEASE_MS,
    actions: Mapping[str, Mapping[str, Callable[..., Any]]] | None = None,
    guards: Mapping[str, Mapping[str, Callable[..., bool]]] | None = None,
) -> tuple[Runtime, FlowRunner, _Bindings]:
    """`actions`, `guards`: machine -> name -> a function that replaces the demo's."""
    signer = signer or Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime = Runtime(
        store,
        clock=clock or VirtualClock(START_MS),
        sealer=LedgerSealer(signer, mode),
        snapshot_every=snapshot_every,
        claim_lease_ms=claim_lease_ms,
    )
    runner, bindings = load_world(runtime, before_step=before_step, actions=actions, guards=guards)
    return runtime, runner, bindings


def load_world(
    runtime: Runtime,
    *,
    before_step: Callable[[StepContext], None] | None = None,
    actions: Mapping[str, Mapping[str, Callable[..., Any]]] | None = None,
    guards: Mapping[str, Mapping[str, Callable[..., bool]]] | None = None,
) -> tuple[FlowRunner, _Bindings]:
    """Load the seven governors (the demo's bindings) into `runtime`; the flows' runner."""
    bindings = _Bindings(_Payments(runtime.store))
    for module in MODULES:
        spec = importlib.import_module(f"autonomic.generated.{module}").MACHINE
        bound_guards, bound = bindings.of(spec)
        bound_guards.update((guards or {}).get(spec.name, {}))
        bound.update((actions or {}).get(spec.name, {}))
        runtime.load(spec, bound_guards, bound)
    runner = FlowRunner(
        runtime,
        flow_specs(),
        functions={"refund_due": refund_due, "prorate_upgrade": prorate_upgrade},
        before_step=before_step,
    )
    return runner, bindings


SEND_STEPS = {
    "CustomerSignup": ("profile", "trial", "quota", "identity"),
    "SubscriptionCancellation": ("issue_refund", "suspend_entitlements", "archive_subscription"),
}


def check_runs_once(db: Path) -> int:
    """Every flow run in the SQLite store `db` ended, with one end entry: completed,
    compensated, or failed with nothing to undo (no compensation refused); each send step and
    compensation took effect exactly once (its event id in the ledger). How many runs."""
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT flow_id, flow, status, data FROM flows").fetchall()
        event_ids = [
            e for (e,) in conn.execute("SELECT event_id FROM ledger WHERE kind = 'transition'")
        ]
        ends = dict(
            conn.execute(
                "SELECT instance, count(*) FROM ledger WHERE kind = 'flow' AND event IN "
                "('FlowCompleted', 'CompensationCompleted', 'FlowFailed') GROUP BY instance"
            )
        )
    counted = Counter(event_ids)
    for flow_id, flow, status, data in runs:
        assert status in ("completed", "compensated", "failed"), (flow_id, status)
        assert ends[flow_id] == 1  # one end entry per run
        steps = json.loads(data)["steps"]
        outcomes = {step["status"] for step in steps.values()}
        assert (status == "failed") == ("compensated" not in outcomes and status != "completed")
        assert "uncompensated" not in outcomes
        for step in SEND_STEPS[flow]:
            outcome = steps.get(step, {}).get("status")
            done = counted[derive_event_id("flow", flow_id, step, "do")]
            undone = counted[derive_event_id("flow", flow_id, step, "undo")]
            assert done == (1 if outcome in ("succeeded", "compensated") else 0), (step, steps)
            assert undone == (1 if outcome == "compensated" else 0), (step, steps)
    return len(runs)
