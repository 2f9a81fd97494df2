"""Event ids derived from a kept prefix (a flow run's "flow" and its id, hashed once) are the
ids `derive_event_id` gives for all the parts; a run's records built slot by slot equal the
dataclass's."""

from __future__ import annotations

from autonomic.runtime.results import (
    derive_event_id,
    derive_event_ids,
    derive_from,
    derive_ids_from,
    derive_with,
    event_id_prefix,
    id_part,
    index_prefix,
)
from autonomic.runtime.store.base import FlowRecord, new_flow_record
from hypothesis import given
from hypothesis import strategies as st

parts = st.lists(st.text() | st.integers(min_value=0, max_value=10**12), max_size=4)


@given(parts, parts)
def test_an_id_from_a_prefix_is_the_id_of_all_its_parts(
    leading: list[str | int], rest: list[str | int]
) -> None:
    prefix = event_id_prefix(*leading)
    assert derive_from(prefix, *rest) == derive_event_id(*leading, *rest)
    assert derive_from(event_id_prefix(*rest, after=prefix)) == derive_event_id(*leading, *rest)
    assert derive_with(prefix, id_part(*rest)) == derive_event_id(*leading, *rest)


@given(parts, st.integers(min_value=0, max_value=200), parts)
def test_an_index_from_the_table_is_the_index_hashed(
    leading: list[str | int], index: int, rest: list[str | int]
) -> None:
    ids = index_prefix(event_id_prefix(*leading), index)
    assert derive_from(ids, *rest) == derive_event_id(*leading, index, *rest)


@given(parts, st.integers(min_value=0, max_value=80), st.integers(min_value=0, max_value=70))
def test_a_writes_ids_are_those_of_each_index(
    leading: list[str | int], first: int, count: int
) -> None:
    expected = [derive_event_id(*leading, index) for index in range(first, first + count)]
    assert derive_ids_from(event_id_prefix(*leading), count, first) == expected
    assert derive_event_ids(tuple(leading), count, first) == expected


def test_a_flow_entry_id_is_pinned() -> None:
    flow_id = "flw_0123456789abcdef0123456789abcdef"
    assert derive_event_id("flow", flow_id, 3, 70) == "evt_a99ab0173ba61c11d2a819cc1e3634d2"
    assert derive_ids_from(event_id_prefix("flow", flow_id, 3), 1, 70) == [
        "evt_a99ab0173ba61c11d2a819cc1e3634d2"
    ]


def test_a_flow_record_built_by_its_slots_equals_the_dataclass() -> None:
    built = new_flow_record("flw_1", "Saga", "c1", "running", 2, '{"a":1}', 5)
    made = FlowRecord("flw_1", "Saga", "c1", "running", 2, '{"a":1}', 5)
    assert built == made and hash(built) == hash(made) and repr(built) == repr(made)
    waiting = FlowRecord("flw_1", "Saga", "c1", "waiting", 3, "{}", 5, 9)
    assert new_flow_record("flw_1", "Saga", "c1", "waiting", 3, "{}", 5, 9) == waiting
