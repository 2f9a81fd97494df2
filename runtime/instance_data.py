"""Instance data: the fields a row `keep`s beside the state, read back to route emits.

A machine declares `data { customer_id: str }`; a row `keep customer_id` copies the causing
event's field into the instance's data in the unit of work of that move (the store's
`save_instance_data`, as a JSON object); `emit Billing.DisputeUpheld to customer_id` sends to
the Billing instance whose id the field holds, from a row, a timer or an entry alike, so a
timer with no payload still reaches the right receiver. The compiler proves that every emit
reads a field kept on every way to it (E149); the runtime still refuses to guess: data it
cannot read as an object holding that id is a StoreIntegrityError, and nothing is written.
A field an emit routes by is checked as an identifier when it is kept, so the row that keeps a
malformed id is refused (InputRejected) instead of the later emit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from .errors import StoreIntegrityError
from .inputs import check_identifier
from .results import _dumps
from .store.base import Transaction
from .tables import Payload

__all__ = ["dump_data", "keep_fields", "read_data", "route"]

Data = dict[str, object]


def read_data(txn: Transaction, machine: str, instance: str) -> Data:
    """The instance's kept data as of this transaction ({} if it never kept any)."""
    text = txn.instance_data(machine, instance)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise StoreIntegrityError(f"the kept data of {machine} '{instance}' is not a JSON object")
    return data


def keep_fields(
    data: Mapping[str, object],
    keep: tuple[tuple[str, str], ...],
    payload: Payload | None,
    routes: frozenset[str],
) -> Data:
    """`data` with each (field, causing field) of `keep` taken from the causing payload; a
    field that some emit routes by must hold a well-formed instance id (InputRejected)."""
    kept = dict(data)
    for field, source in keep:
        value = getattr(payload, source, None)
        if field in routes:
            check_identifier(f"kept instance id '{field}'", value)
        kept[field] = value
    return kept


def dump_data(data: Mapping[str, object]) -> str:
    """Kept data as stored: JSON, a decimal as its exact string, a datetime in ISO 8601."""
    return _dumps(dict(data))


def route(data: Mapping[str, object] | None, field: str, machine: str, instance: str) -> str:
    """The receiving instance's id, kept in `field` (see the module docstring)."""
    value = None if data is None else data.get(field)
    if type(value) is not str or not value:
        raise StoreIntegrityError(
            f"{machine} '{instance}' keeps no instance id in '{field}' to send its emit to",
            hint="the machine's checks (E149) rule this out; was the store or the machine "
            "changed under live instances?",
        )
    return value
