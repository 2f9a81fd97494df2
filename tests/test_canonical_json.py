"""The runtime's canonical JSON text (`results._dumps`: rows, outbox messages, flow runs) is
json.dumps's with sorted keys and no spaces, errors included."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from autonomic.runtime.results import _dumps
from hypothesis import given
from hypothesis import strategies as st
from pydantic_core import to_jsonable_python


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=to_jsonable_python)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.decimals(allow_nan=False)
    | st.datetimes()
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(values)
def test_the_text_is_json_dumps_s(value: Any) -> None:
    assert _dumps(value) == dumps(value)


def test_keys_are_sorted_and_text_is_ascii() -> None:
    value = {"b": [1, 2.5, None, True], "a": {"é": Decimal("1.10"), "z": datetime(2026, 1, 1)}}
    assert _dumps(value) == dumps(value)
    assert _dumps(value).isascii()


def test_a_value_that_holds_itself_is_refused_as_json_dumps_refuses_it() -> None:
    looped: list[object] = [1]
    looped.append({"again": looped})
    with pytest.raises(ValueError, match=r"^Circular reference detected$") as raised:
        _dumps(looped)
    assert raised.value.__context__ is None


def test_a_value_nested_too_deep_raises_recursion_error() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        _dumps(deep)


def test_a_value_json_does_not_know_raises_as_before() -> None:
    with pytest.raises(Exception) as ours:
        _dumps({"a": object()})
    with pytest.raises(Exception) as theirs:
        dumps({"a": object()})
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
