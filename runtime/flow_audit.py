"""Flow runs held to the verified ledger: each `flows` row's status, version and inputs checked
against the run's entries, and a run's reason and instance read back where a digest commits to
them.

A run's entries (kind "flow", machine the flow, instance the run's id) are written with its
row, in the row's transaction (runtime/flows/steps.py): every entry of one write has the event
id `derive_event_id("flow", flow_id, version, index)` of the version that write stored, and the
`to_state` of its last entry is the status it stored. FlowStarted's payload digest commits to
the run's inputs, and an ending entry's (CompensationCompleted, FlowFailed) to the failed step
and the reason. The row itself carries only a MAC seal, which needs the private key; the ledger
needs only the public one, so `autonomic audit verify` holds every row to the run's entries:

- a row no entry records, or entries whose row is gone;
- the flow the row names, its inputs, and (a finished run) its failed step and reason;
- its version and status: the newest entry was written at the row's version and ends in its
  status. A write that carried no entry (a compensation's dispatch right after a parallel
  flow's failure, a step sent again after a restart) only raises the version, so an unfinished
  row may be ahead of its newest entry; a finished one never is: the write that ends a run
  always carries the ending entry.
- in a store whose rows are sealed, that the row carries a seal (what it seals is the
  runtime's to check, with the key).

What no entry commits to is not checked here: the run's instance (the run's id derives from it
only when its caller let `start` choose the id), `updated_ms`, `wake_ms` and the rest of its
data (step results, computed values), which the runtime checks by the seal.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .audit_problem import InstanceProblem
from .errors import PayloadEncodingError
from .ledger import payload_digest
from .results import _dumps, derive_event_id, derive_event_ids
from .store.row_seals import SEALED_MARK

__all__ = [
    "FLOW_ENTRIES_SQL",
    "FLOW_ROWS_SQL",
    "SEALED_SQL",
    "FlowAudit",
    "RunFacts",
    "audit_flows",
    "run_facts",
]

FLOW_KIND = "flow"
# The entry that ends a run, and the status it ends it in.
ENDS = {
    "FlowCompleted": "completed",
    "CompensationCompleted": "compensated",
    "FlowFailed": "failed",
}
# Ending entries whose digest commits to the failed step and the reason.
REASONED = ("CompensationCompleted", "FlowFailed")
FINISHED = frozenset(ENDS.values())

# Both ordered by the run's id in byte order (SQLite: BINARY; PostgreSQL: COLLATE "C"), the
# entries then by seq; read from the tables themselves, never an index.
FLOW_ROWS_SQL = {
    "sqlite": "SELECT flow_id, flow, instance, status, version, data, seal FROM flows "
    "NOT INDEXED ORDER BY flow_id COLLATE BINARY",
    "postgres": "SELECT flow_id, flow, instance, status, version, data, seal FROM flows "
    'ORDER BY flow_id COLLATE "C"',
}
# Whether the store's rows are sealed (its mark).
SEALED_SQL = {
    "sqlite": f"SELECT 1 FROM runtime_meta WHERE key = '{SEALED_MARK}'",
    "postgres": f"SELECT 1 FROM autonomic_meta WHERE key = '{SEALED_MARK}'",
}
FLOW_ENTRIES_SQL = {
    "sqlite": "SELECT instance, machine, seq, event, from_state, to_state, event_id, "
    f"payload_sha256 FROM ledger NOT INDEXED WHERE kind COLLATE BINARY = '{FLOW_KIND}' "
    "ORDER BY instance COLLATE BINARY, seq",
    "postgres": "SELECT instance, machine, seq, event, from_state, to_state, event_id, "
    f"payload_sha256 FROM ledger WHERE kind = '{FLOW_KIND}' "
    'ORDER BY instance COLLATE "C", part, seq',
}


@dataclass(frozen=True, slots=True)
class FlowAudit:
    """`flows` rows checked; `moved`: runs written after the verified entries (not checked);
    the first problem, if any."""

    runs: int
    moved: int
    problem: InstanceProblem | None


@dataclass(frozen=True, slots=True)
class _Entry:
    machine: str
    seq: int
    event: str
    step: str
    to_state: str
    event_id: str
    digest: bytes


class _Found(Exception):
    def __init__(self, problem: InstanceProblem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


def audit_flows(
    rows: Iterable[tuple[Any, ...]],
    entries: Iterable[tuple[Any, ...]],
    verified: Callable[[str, int], bool],
    *,
    sealed: bool,
) -> FlowAudit:
    """Check every run: rows (flow_id, flow, instance, status, version, data, seal) and
    entries (instance, machine, seq, event, from_state, to_state, event_id, payload_sha256),
    both ordered as FLOW_ROWS_SQL and FLOW_ENTRIES_SQL order them. `verified(flow_id, seq)`:
    whether that entry was verified (a newer one means the run moved during the audit)."""
    checked = moved = 0
    try:
        for flow_id, row, chain in _merged(rows, _grouped(entries)):
            if chain and not all(verified(flow_id, e.seq) for e in chain):
                moved += 1
                continue
            checked += row is not None
            _check(flow_id, row, chain, sealed)
    except _Found as found:
        return FlowAudit(checked, moved, found.problem)
    return FlowAudit(checked, moved, None)


def _grouped(entries: Iterable[tuple[Any, ...]]) -> Iterator[tuple[str, list[_Entry]]]:
    for flow_id, group in itertools.groupby(entries, key=lambda e: e[0]):
        chain = []
        for _, machine, seq, event, step, to_state, event_id, digest in group:
            chain.append(
                _Entry(
                    str(machine),
                    int(seq),
                    str(event),
                    str(step),
                    str(to_state),
                    str(event_id),
                    bytes(digest) if isinstance(digest, bytes | memoryview) else b"",
                )
            )
        yield str(flow_id), chain


def _merged(
    rows: Iterable[tuple[Any, ...]], groups: Iterator[tuple[str, list[_Entry]]]
) -> Iterator[tuple[str, tuple[Any, ...] | None, list[_Entry]]]:
    """A full outer join by the run's id of rows and entry groups, both in key order."""
    row_iter = iter(rows)
    last: dict[int, str] = {}

    def ordered(key: object, side: int, what: str) -> str:
        if type(key) is not str:
            raise _Found(_problem("?", str(key), None, f"a {what} row's run id is not text"))
        if side in last and key <= last[side]:
            raise _Found(_problem("?", key, None, f"the {what} rows are not in key order"))
        last[side] = key
        return key

    def next_row() -> tuple[str, tuple[Any, ...]] | None:
        row = next(row_iter, None)
        return None if row is None else (ordered(row[0], 0, "flows"), row)

    def next_group() -> tuple[str, list[_Entry]] | None:
        group = next(groups, None)
        return None if group is None else (ordered(group[0], 1, "ledger"), group[1])

    a, b = next_row(), next_group()
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            yield a[0], a[1], []
            a = next_row()
        elif a is None or b[0] < a[0]:
            yield b[0], None, b[1]
            b = next_group()
        else:
            yield a[0], a[1], b[1]
            a, b = next_row(), next_group()


def _problem(flow: str, flow_id: str, seq: int | None, reason: str) -> InstanceProblem:
    return InstanceProblem(f"{flow} run", flow_id, seq, reason, "flow")


def _check(
    flow_id: str, row: tuple[Any, ...] | None, chain: Sequence[_Entry], sealed: bool
) -> None:
    name = chain[-1].machine if row is None else str(row[1])

    def fail(seq: int | None, reason: str) -> NoReturn:
        raise _Found(_problem(name, flow_id, seq, reason))

    if row is None:
        fail(
            chain[-1].seq,
            f"the ledger records {len(chain)} entries of this flow run, but the store holds no "
            "row for it (deleted?)",
        )
    _, _, _, status, version, data, seal = row
    if not chain:
        fail(
            None,
            f"the flows row (status {status!r}, version {version}) has no ledger entry: no "
            "write of this run was ever recorded",
        )
    first, newest = chain[0], chain[-1]
    if type(status) is not str or type(version) is not int or type(data) is not str:
        fail(None, "the row's columns are not a flow run's")
    if sealed and not (isinstance(seal, bytes | memoryview) and len(seal) == 32):
        fail(
            None,
            "the row carries no seal, though the store's rows are sealed: it was written "
            "outside the runtime",
        )
    others = sorted({e.machine for e in chain} - {name})
    if others:
        fail(
            first.seq,
            f"the row names flow {name!r}, but the ledger records this run as {others[0]!r}",
        )
    if first.event != "FlowStarted":
        fail(first.seq, f"the run's first entry is {first.event}, not FlowStarted")
    facts = run_facts(data, chain)
    if not facts.inputs_match:
        fail(first.seq, "the row's inputs differ from what the run's FlowStarted entry commits to")
    held = f"the row holds status {status!r} at version {version}, but the run's newest entry"
    if newest.event_id in derive_event_ids(("flow", flow_id, version), len(chain)):
        if status != newest.to_state:
            fail(
                newest.seq,
                f"{held} ({newest.event}, written at that version) records {newest.to_state!r}",
            )
    elif status in FINISHED or newest.event in ENDS:
        fail(
            newest.seq,
            f"{held} ({newest.event} into {newest.to_state!r}) was not written at that version",
        )
    elif not _written_before(flow_id, newest, version, len(chain)):
        fail(
            newest.seq,
            f"{held} ({newest.event}) was written at none of its versions up to it (rolled back?)",
        )
    if facts.reason_matches is False:
        fail(
            newest.seq,
            "the row's failed step and reason differ from what the run's ending entry commits to",
        )


def _written_before(flow_id: str, newest: _Entry, version: int, count: int) -> bool:
    """Whether the newest entry was written at a version below `version` (writes without an
    entry raised it since)."""
    return any(
        newest.event_id in derive_event_ids(("flow", flow_id, earlier), count)
        for earlier in range(version - 1, 0, -1)
    )


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What a run's row says that its entries commit to: `inputs_match` (FlowStarted's
    digest), `reason_matches` (None: no CompensationCompleted or FlowFailed entry), the failed
    step and reason the row holds, and whether the run's id derives from its flow, the row's
    instance and those inputs (then the instance is as committed as the inputs are)."""

    inputs_match: bool
    reason_matches: bool | None
    failed_step: str | None
    reason: str | None
    instance_derived: bool


def run_facts(
    data: str, chain: Sequence[Any], *, flow: str = "", instance: str = "", flow_id: str = ""
) -> RunFacts:
    """The row's `data` held to the run's entries `chain` (each with `event`, `step` or
    `from_state`, and `digest` or `payload_sha256`), in seq order."""
    try:
        decoded = json.loads(data)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("inputs"), dict):
        return RunFacts(False, None if not _reasoned(chain) else False, None, None, False)
    inputs = decoded["inputs"]
    started = [e for e in chain if e.event == "FlowStarted"]
    inputs_match = len(started) == 1 and _digest_of(started[0]) == _safe_digest({"inputs": inputs})
    failed, reason = decoded.get("failed"), decoded.get("reason")
    ending = [e for e in chain if e.event in REASONED]
    reason_matches: bool | None = None
    if ending:
        end = ending[-1]
        candidates = _end_details(decoded, chain) if end.event == "FlowFailed" else []
        # A run's compensation end, or a fanout's missed quorum (fanin.py: its reason alone).
        candidates[:0] = [{"failed_step": failed, "reason": reason}, {"reason": reason}]
        reason_matches = any(_safe_digest(c) == _digest_of(end) for c in candidates)
    derived = (
        bool(flow_id) and flow_id == "flw_" + derive_event_id(flow, instance, _dumps(inputs))[4:]
    )
    return RunFacts(
        inputs_match,
        reason_matches,
        failed if isinstance(failed, str) else None,
        reason if isinstance(reason, str) else None,
        derived,
    )


def _reasoned(chain: Sequence[Any]) -> bool:
    return any(e.event in REASONED for e in chain)


def _digest_of(entry: Any) -> bytes:
    value = getattr(entry, "digest", None)
    if value is None:
        value = entry.payload_sha256
    return bytes(value)


def _step_of(entry: Any) -> str:
    step = getattr(entry, "step", None)
    return str(entry.from_state if step is None else step)


def _safe_digest(detail: Mapping[str, Any]) -> bytes | None:
    try:
        return payload_digest(detail)
    except PayloadEncodingError:
        return None


def _end_details(decoded: Mapping[str, Any], chain: Sequence[Any]) -> list[dict[str, Any]]:
    """A failed run's ending detail with the `uncompensated` steps it listed: in the order the
    run first met them (its entries), or sorted (a run read back from its row)."""
    steps = decoded.get("steps")
    if not isinstance(steps, dict):
        return []
    left = [
        name
        for name, s in steps.items()
        if isinstance(s, dict) and s.get("status") == "uncompensated"
    ]
    if not left:
        return []
    met = list(dict.fromkeys(_step_of(e) for e in chain if _step_of(e) in left))
    base = {"failed_step": decoded.get("failed"), "reason": decoded.get("reason")}
    return [{**base, "uncompensated": order} for order in (met, sorted(left), left)]


def run_notes(
    flow_id: str, chain: Sequence[Any], row: tuple[str, str, str] | None, *, store: bool
) -> tuple[str, dict[int, str]]:
    """What `audit show` adds to a flow run's entries `chain` (LedgerEntry rows, seq order):
    a line naming the run's flow and instance, and a note under each ending entry with its
    failed step and reason. They come from the run's row (flow, instance, data) and are shown
    only where the entries' digests commit to them; `store`: whether the ledger was read from
    a store (else an export, which has no rows)."""
    flow = chain[0].machine
    ends = [e for e in chain if e.event in REASONED]
    if row is None:
        where = (
            "the store holds no flows row for this run"
            if store
            else ("a ledger export holds no flows rows; show the store itself")
        )
        header = f"{flow} run {flow_id}: instance and reason not shown: {where}"
        return header, {e.seq: "reason: not shown (only its digest is in the ledger)" for e in ends}
    name, instance, data = row
    facts = run_facts(data, chain, flow=name, instance=instance, flow_id=flow_id)
    if name != flow or not facts.inputs_match:
        header = (
            f"{flow} run {flow_id}: the flows row's inputs do not match the run's FlowStarted "
            "digest (or it names another flow): instance and reason not shown; run "
            "`autonomic audit verify`"
        )
        return header, {e.seq: "reason: not shown (the row does not match)" for e in ends}
    inputs = _dumps(json.loads(data)["inputs"])
    if facts.instance_derived:
        why = "its id derives from the flow, this instance and these inputs"
    else:
        why = (
            "the instance only as the flows row says: the run's id does not derive from the "
            "flow, this instance and these inputs (its caller gave the id, or the row was "
            "changed)"
        )
    header = (
        f"{flow} run {flow_id} for {instance!r}, inputs {inputs} (the inputs match the run's "
        f"FlowStarted digest; {why})"
    )
    notes: dict[int, str] = {}
    for end in ends:
        if facts.reason_matches:
            step = "" if facts.failed_step is None else f"failed step {facts.failed_step!r}, "
            notes[end.seq] = (
                f"{step}reason: {facts.reason} (the flows row's text, matching this entry's digest)"
            )
        else:
            notes[end.seq] = (
                "reason: not shown: the flows row's failed step and reason do not match this "
                "entry's digest"
            )
    return header, notes
