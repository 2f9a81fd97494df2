"""A flow's start refuses what its declaration does not take, before anything is written:
inputs of the wrong type, missing or unknown (R033), an unknown flow (R034), and a runner
without a compute step's function (R035)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.flows import (
    FlowInputsInvalid,
    FlowRunner,
    UnknownFlow,
    UnregisteredFunction,
)
from autonomic.runtime.flows.inputs import _model, check_inputs
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.tables import FlowInput, FlowSpec
from flow_world import flow_specs, marketplace
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

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


_TYPED = FlowSpec(
    "Typed",
    "sequence",
    None,
    "flows.fsm",
    "0" * 64,
    "test",
    ("name", "count", "flag", "tier"),
    input_types={
        "name": FlowInput("str"),
        "count": FlowInput("int"),
        "flag": FlowInput("bool", optional=True),
        "tier": FlowInput("enum", ("basic", "pro"), optional=True),
    },
)
_VALUES = st.one_of(
    st.text(max_size=3),
    st.integers(),
    st.integers(min_value=2**64),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.sampled_from(["basic", "pro"]),
)


# Valid inputs, then one of them changed to any value, left out, or one more given.
_NEAR_VALID = st.builds(
    lambda valid, name, value, drop: (
        {k: v for k, v in valid.items() if k != name} if drop else {**valid, name: value}
    ),
    st.fixed_dictionaries(
        {"name": st.text(max_size=3), "count": st.integers()},
        optional={"flag": st.booleans() | st.none(), "tier": st.sampled_from(["basic", "pro"])},
    ),
    st.sampled_from([*_TYPED.inputs, "extra"]),
    st.sampled_from([None, "", "basic", "pro", "x", 0, 7, 2**70, True, False, 1.5]),
    st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(_NEAR_VALID | st.dictionaries(st.sampled_from([*_TYPED.inputs, "extra"]), _VALUES))
def test_plain_inputs_are_checked_as_the_model_checks_them(given_inputs: dict[str, Any]) -> None:
    """Inputs of plain kinds (str, int, bool, enum, no bounds) are taken without the pydantic
    model when every value is of exactly its kind's type: the same inputs the model takes,
    and everything else still goes to the model, which says what is wrong."""
    model, plain = _model(_TYPED)
    assert model is not None and plain is not None
    try:
        model.model_validate(given_inputs)
    except ValidationError:
        valid = False
    else:
        valid = True
    if plain.accepts(given_inputs):
        assert valid
    try:
        check_inputs(_TYPED, given_inputs)
    except FlowInputsInvalid:
        assert not valid
    else:
        assert valid


def test_a_runs_id_and_inputs_are_those_of_the_inputs_json(tmp_path: Path) -> None:
    """`start` takes plain inputs (str, int, bool) as they are, since JSON gives them back so,
    and others through their JSON round trip (a Decimal becomes its text): either way the run's
    id and stored inputs are those of the inputs' JSON, as `flow_id` derives them, so the same
    inputs in either form resume one run."""
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"))
    with runtime:
        as_decimals = {
            **UPGRADE,
            "current_price": Decimal("10.00"),
            "new_price": Decimal("30.00"),
        }
        first = runner.start("SubscriptionUpgrade", "c", UPGRADE)
        again = runner.start("SubscriptionUpgrade", "c", as_decimals)
        assert first.status == again.status == "waiting"  # for the entitlement's approval
        assert first.flow_id == again.flow_id
        assert runner.flow_id("SubscriptionUpgrade", "c", UPGRADE) == first.flow_id
        assert runner.flow_id("SubscriptionUpgrade", "c", as_decimals) == first.flow_id
        stored = runtime.store.get_flow(first.flow_id)
        assert stored is not None and json.loads(stored.data)["inputs"] == UPGRADE
