"""A flow entry's detail digest: a send's result ({"result": {"state", "seq"}}), a computed
str and a run's FlowStarted (its inputs' JSON text known) are written without canonical_json's
walk, to the same digest, and refused as canonical_json refuses them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from autonomic.runtime.errors import PayloadEncodingError
from autonomic.runtime.flows.steps import _detail_digest, _started_detail
from autonomic.runtime.ledger import PAYLOAD_TAG, canonical_json
from autonomic.runtime.results import _dumps
from hypothesis import given
from hypothesis import strategies as st


def general(detail: dict[str, Any]) -> bytes:
    """The digest as the general walk makes it (its JSON round trip for what it refuses)."""
    try:
        text = canonical_json(detail)
    except PayloadEncodingError:
        text = canonical_json(json.loads(_dumps(detail)))
    return hashlib.sha256(PAYLOAD_TAG + text).digest()


def same(detail: dict[str, Any]) -> None:
    try:
        expected = general(detail)
    except PayloadEncodingError as error:
        with pytest.raises(PayloadEncodingError) as raised:
            _detail_digest(detail)
        assert str(raised.value) == str(error)
        return
    assert _detail_digest(detail) == expected


@given(st.text(), st.integers(min_value=-(2**54), max_value=2**54))
def test_a_sends_result_digests_as_canonical_json_has_it(state: str, seq: int) -> None:
    same({"result": {"state": state, "seq": seq}})
    same({"result": {"seq": seq, "state": state}})


@given(
    st.dictionaries(
        st.sampled_from(["result", "state", "seq", "error"]),
        st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
        max_size=3,
    )
)
def test_other_details_take_the_general_walk(result: dict[str, Any]) -> None:
    same({"result": result})
    same({"result": result, "other": 1})


def test_the_shapes_close_to_a_result() -> None:
    for result in (
        {"state": "Done", "seq": True},
        {"state": "Done", "seq": 1.0},
        {"state": 1, "seq": 2},
        {"state": "\ud800", "seq": 2},
        {"state": "Dön\n\x01", "seq": 2**53 - 1},
        {"state": "Done", "seq": 2**53},
        {"state": "Done", "zzz": 2},
    ):
        same({"result": result})


@given(st.text())
def test_a_computed_str_digests_as_canonical_json_has_it(value: str) -> None:
    same({"result": value})
    same({"error": value})


@given(
    st.dictionaries(
        st.text(),
        st.none() | st.booleans() | st.integers(min_value=-(2**54), max_value=2**54) | st.text(),
        max_size=4,
    )
)
def test_flow_started_digests_as_canonical_json_has_it(inputs: dict[str, Any]) -> None:
    started_same(inputs)


def started_same(inputs: dict[str, Any]) -> None:
    detail = _started_detail(inputs, _dumps(inputs))
    assert detail == {"inputs": inputs}
    same(dict(detail))
    try:
        expected = general({"inputs": inputs})
    except PayloadEncodingError:
        return
    assert _detail_digest(detail) == expected


def test_flow_started_close_to_the_edges() -> None:
    for inputs in (
        {"a": "x\x7f", "b": 1},
        {"é": "x"},
        {"a": 'say "hi"'},
        {"a": 2**53 - 1, "b": -(2**53 - 1)},
        {"a": 2**53},
        {"a": True, "b": None},
        {"B": 1, "a": 2, "_": 3},
        {},
    ):
        started_same(inputs)
