"""A flow's start refuses what its declaration does not take, before anything is written:
inputs of the wrong type, missing or unknown (R033), an unknown flow (R034), and a runner
without a compute step's function (R035)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.flows import (
    FlowInputsInvalid,
    FlowRunner,
    UnknownFlow,
    UnregisteredFunction,
)
from autonomic.runtime.store.sqlite import SQLiteStore
from flow_world import flow_specs, marketplace

UPGRADE = {
    "customer_id": "c",
    "current_tier": "starter",
    "new_tier": "professional",
    "current_price": "10.00",
    "new_price": "30.00",
    "cycle_day": 10,
    "cycle_length": 30,
    "request_id": "r1",
}


@pytest.mark.parametrize(
    ("flow", "inputs", "named"),
    [
        ("CustomerSignup", {"customer_id": "x"}, {"email", "country", "product_id", "tier"}),
        ("SubscriptionUpgrade", {**UPGRADE, "new_tier": "gold"}, {"new_tier"}),
        ("SubscriptionUpgrade", {**UPGRADE, "new_price": "abc"}, {"new_price"}),
        ("SubscriptionUpgrade", {**UPGRADE, "cycle_day": "10"}, {"cycle_day"}),
        ("SubscriptionUpgrade", {**UPGRADE, "coupon": "X"}, {"coupon"}),
        (
            "PaymentProcessed",
            {
                "outcome": "Maybe",
                "customer_id": "c",
                "transaction_id": "t",
                "amount": "1",
                "idempotency_key": "k",
                "reason": "r",
                "case_id": "c",
            },
            {"outcome"},
        ),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(
    tmp_path: Path, flow: str, inputs: dict[str, Any], named: set[str]
) -> None:
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"))
    with runtime:
        entries = len(list(runtime.ledger()))
        with pytest.raises(FlowInputsInvalid) as refused:
            runner.start(flow, "c", inputs)
        assert refused.value.code == "R033" and refused.value.hint
        assert {name for name, _ in refused.value.problems} == named
        assert len(list(runtime.ledger())) == entries
        assert runtime.store.unfinished_flows() == []
        # The same inputs, corrected, start the run.
        assert runner.start("SubscriptionUpgrade", "c", UPGRADE).status == "waiting"


_FLOAT = 'Input should be a decimal: an integer or a string such as "12.50" (never a float)'


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"current_price": None}, ("current_price", "missing")),
        ({"current_price": 99.5}, ("current_price", _FLOAT)),
        ({"cycle_day": 45}, ("cycle_day", "45 is more than cycle_length (30)")),
        ({"cycle_day": -1}, ("cycle_day", "-1 is less than 0")),
        ({"new_price": "-5.00"}, ("new_price", "-5.00 is less than 0")),
        ({"cycle_length": 0, "cycle_day": 0}, ("cycle_length", "0 is less than 1")),
    ],
)
def test_a_refused_start_says_what_is_wrong_with_the_input(
    tmp_path: Path, change: dict[str, Any], problem: tuple[str, str]
) -> None:
    """A missing decimal is missing, a float is named, and a value outside the bounds the
    flow declares (`cycle_day: int at least 0 at most cycle_length`, prices at least 0) is
    refused at the start, not by a step later (the upgrade first waits for its approval)."""
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"))
    with runtime:
        inputs = {k: v for k, v in {**UPGRADE, **change}.items() if v is not None}
        with pytest.raises(FlowInputsInvalid) as refused:
            runner.start("SubscriptionUpgrade", "c", inputs)
        assert refused.value.problems == (problem,)
        assert f"input '{problem[0]}': {problem[1]}" in refused.value.message
        assert runtime.store.unfinished_flows() == []
        # At the bounds themselves the run starts: the last day of the cycle, a free tier.
        edge = {**UPGRADE, "cycle_day": 30, "current_price": "0"}
        assert runner.start("SubscriptionUpgrade", "c", edge).status == "waiting"


def test_an_unknown_flow_and_a_missing_compute_function_are_diagnostics(tmp_path: Path) -> None:
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"))
    with runtime:
        with pytest.raises(UnknownFlow) as unknown:
            runner.start("NoSuchFlow", "c", {})
        assert unknown.value.code == "R034" and "SubscriptionUpgrade" in str(unknown.value.hint)
        with pytest.raises(UnregisteredFunction) as missing:
            FlowRunner(runtime, flow_specs())
        assert missing.value.code == "R035"
        assert "SubscriptionCancellation.calculate_refund" in missing.value.message
        assert "refund_due" in str(missing.value.hint)
