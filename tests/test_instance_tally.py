"""The instance audit from the verifier's own tallies (runtime/instance_tally.py): ranges tally
their instances, the merge checks continuity across the boundaries, and `audit verify` answers
exactly what the database's aggregates answer, for stores whose instances span ranges and
break at, before or after a boundary."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from autonomic.runtime.instance_audit import (
    InstanceAudit,
    audit_sqlite_instances,
    verify_sqlite_store,
)
from autonomic.runtime.instance_tally import MAX_TALLIED_INSTANCES, InstanceTallies
from autonomic.runtime.keys import PublicKeyInfo, Signer, generate_keypair, load_signer
from autonomic.runtime.ledger import (
    INSERT_CHECKPOINT_SQL,
    INSERT_ENTRY_SQL,
    KEPT,
    EntryData,
    LedgerEntry,
    LedgerSealer,
    kept_digest,
    payload_digest,
    read_ledger,
)
from autonomic.runtime.ledger_ranges import verify_source
from autonomic.runtime.merkle import TreeFrontier
from autonomic.runtime.store.sqlite import SQLiteStore

T0 = 1_700_000_000_000
RANGE = 8  # ranges [0, 8), [8, 16), [16, 24), ...
INSTANCES = ("a", "b", "c")


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, valid_from_ms=T0 - 1)
    return load_signer(folder)


@dataclass
class History:
    """A ledger's instance entries, built move by move, and the rows a store holds for them."""

    entries: list[tuple[str, str, str, str]] = field(default_factory=list)  # kind, inst, from, to
    states: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)

    def move(self, instance: str, kind: str = "transition", start: str | None = None) -> int:
        """Append an entry of `instance` (from its state, or from `start`); its seq."""
        before = self.states.get(instance, "")
        after = before if kind in ("rejection", KEPT) else f"S{len(self.entries) % 5}"
        if kind == KEPT:
            self.data[instance] = f'{{"n": {len(self.entries)}}}'
        self.entries.append((kind, instance, before if start is None else start, after))
        self.states[instance] = after
        if kind not in ("rejection", KEPT):
            self.versions[instance] = self.versions.get(instance, 0) + 1
        return len(self.entries)  # seq: the genesis entry is seq 0


def honest(length: int = 40) -> History:
    """Instances a, b and c moving in turn across every range, with rejections and kept data."""
    history = History()
    for number in range(length):
        instance = INSTANCES[number % 3]
        kind = "rejection" if number % 11 == 5 else KEPT if number % 7 == 4 else "transition"
        if instance not in history.states:
            kind = "transition"
        history.move(instance, kind)
    return history


def write_store(path: Path, signer: Signer, history: History) -> Path:
    """A store file holding the history's ledger (checkpoint mode, one checkpoint at its end)
    and its instance and data rows, laid out as the runtime lays it out."""
    sealer = LedgerSealer(signer, "checkpoint")
    entries: list[LedgerEntry] = [sealer.genesis(T0)]
    for number, (kind, instance, before, after) in enumerate(history.entries, start=1):
        payload = (
            kept_digest(history.data[instance]) if kind == KEPT else payload_digest({"n": number})
        )
        data = EntryData(T0 + number, kind, "M", instance, before, after, "E", "ops", "", payload)
        seal = sealer.seal_kept if kind == KEPT else sealer.seal
        entries.append(seal(number, entries[-1].entry_hash, data))
    tree = TreeFrontier().extend(entry.entry_hash for entry in entries)
    checkpoint = sealer.checkpoint(len(entries), entries[-1].entry_hash, T0 + 10**6, tree, None)
    store = SQLiteStore(path)
    store.set_ledger_mode("checkpoint")
    store.close()
    with sqlite3.connect(path) as connection:
        connection.executemany(INSERT_ENTRY_SQL, entries)
        connection.execute(INSERT_CHECKPOINT_SQL, checkpoint.as_row())
        connection.executemany(
            "INSERT INTO instances (machine, instance, state, version) VALUES ('M', ?, ?, ?)",
            [(i, history.states[i], history.versions[i]) for i in history.versions],
        )
        connection.executemany(
            "INSERT INTO instance_data (machine, instance, data) VALUES ('M', ?, ?)",
            list(history.data.items()),
        )
    connection.close()
    return path


def audits(path: Path, root: PublicKeyInfo, limit: int = MAX_TALLIED_INSTANCES) -> InstanceAudit:
    """The audit from the ranges' tallies; it must be the database aggregates' audit."""
    with read_ledger(path) as source:
        report, audit = verify_sqlite_store(
            source, root, processes=2, range_size=RANGE, min_entries=1, limit=limit
        )
    assert report.ok and audit is not None
    assert audit == audit_sqlite_instances(path, report.count)
    return audit


def tallied(
    path: Path, root: PublicKeyInfo, processes: int = 2, limit: int = MAX_TALLIED_INSTANCES
) -> InstanceTallies:
    """The tallies the ranges took (one process: the sequential verifier's)."""
    tallies = InstanceTallies(limit)
    with read_ledger(path) as source:
        report = verify_source(
            source, root, processes=processes, range_size=RANGE, min_entries=1, tallies=tallies
        )
    assert report.ok
    return tallies


def test_ranges_tally_instances_spanning_them_as_one_pass_does(
    tmp_path: Path, signer: Signer
) -> None:
    root = signer.public_info()
    history = honest()
    path = write_store(tmp_path / "m.db", signer, history)
    ranged, sequential = tallied(path, root), tallied(path, root, processes=1)
    assert ranged.complete and sequential.complete
    assert list(ranged.changes()) == list(sequential.changes())
    assert list(ranged.kept()) == list(sequential.kept())
    # a: entries in every range (changes, a rejection, kept entries).
    changes = {row[1]: row[2:] for row in ranged.changes()}
    assert changes["a"][0] == history.versions["a"] and changes["a"][1] > 3 * RANGE
    assert ranged.first_break is None and sequential.first_break is None
    audit = audits(path, root)
    assert audit.ok and (audit.instances, audit.kept) == (3, 3)


@pytest.mark.parametrize("seq", [RANGE - 1, RANGE, RANGE + 1, 2 * RANGE, 3 * RANGE + 3])
def test_a_continuity_break_at_or_by_a_boundary_is_the_audit_s_answer(
    tmp_path: Path, signer: Signer, seq: int
) -> None:
    """The entry at `seq` starts from a state its instance's previous entry (in an earlier
    range when `seq` starts a range) did not end in; rows and the newest entries agree."""
    history = honest(seq - 1)
    instance = INSTANCES[(seq - 1) % 3]
    history.move(instance, start="Forged")
    for _ in range(9):
        history.move(INSTANCES[len(history.entries) % 3])
    path = write_store(tmp_path / "m.db", signer, history)
    audit = audits(path, signer.public_info())
    assert audit.problem is not None and audit.problem.seq == seq
    assert audit.problem.instance == instance
    assert "moves it from 'Forged', but its previous entry ended in" in audit.problem.reason


@pytest.mark.parametrize("seq", [RANGE, 2 * RANGE + 1])
def test_an_instance_first_seen_in_a_later_range_must_start_from_nothing(
    tmp_path: Path, signer: Signer, seq: int
) -> None:
    history = honest(seq - 1)
    history.move("d", start="Forged")
    history.move("a")
    path = write_store(tmp_path / "m.db", signer, history)
    audit = audits(path, signer.public_info())
    assert audit.problem is not None and (audit.problem.instance, audit.problem.seq) == ("d", seq)
    assert "but no earlier entry" in audit.problem.reason


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("state", "'Forged'", "the row holds state 'Forged' at version {v}"),
        # The changes of its last ranges alone: a tally not summed across the ranges.
        ("version", "version - 3", "at version {w}, but the ledger records {v} change(s)"),
        ("state", "'S0'", "the newest into '{s}'"),  # an older state of the instance
    ],
)
def test_a_row_contradicting_an_instance_whose_entries_span_ranges_fails(
    tmp_path: Path, signer: Signer, column: str, value: str, reason: str
) -> None:
    history = honest()
    path = write_store(tmp_path / "m.db", signer, history)
    with sqlite3.connect(path) as connection:
        connection.execute(f"UPDATE instances SET {column} = {value} WHERE instance = 'a'")
    connection.close()
    audit = audits(path, signer.public_info())
    version, state = history.versions["a"], history.states["a"]
    assert state != "S0"
    assert audit.problem is not None and audit.problem.instance == "a"
    expected = reason.format(v=version, w=version - 3, s=state)
    assert expected in audit.problem.reason, audit.problem.reason


def test_kept_data_is_held_to_the_newest_kept_entry_of_a_later_range(
    tmp_path: Path, signer: Signer
) -> None:
    history = honest()
    first = history.data["b"]
    history.move("b", KEPT)  # the newest kept entry of b, in the last range
    path = write_store(tmp_path / "m.db", signer, history)
    assert audits(path, signer.public_info()).ok
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE instance_data SET data = ? WHERE instance = 'b'", (first,))
    connection.close()
    audit = audits(path, signer.public_info())
    assert audit.problem is not None and audit.problem.instance == "b"
    assert audit.problem.seq == len(history.entries)


def test_past_the_limit_of_instances_the_aggregates_answer(tmp_path: Path, signer: Signer) -> None:
    """Tallies give up past their limit (memory stays flat), in a range or in the merge; the
    audit is then the database aggregates' (checked by `audits`), with or without a break."""
    history = honest()
    history.move("d", "rejection")  # an instance of the ledger without a row (nothing changed)
    history.move("a", start="Forged")
    path = write_store(tmp_path / "m.db", signer, history)
    assert not tallied(path, signer.public_info(), limit=3).complete
    assert tallied(path, signer.public_info()).first_break is not None
    # 2: fewer than the rows; 3: the ledger's instances exceed it, the rows do not; 4: enough.
    for limit in (2, 3, 4):
        audit = audits(path, signer.public_info(), limit=limit)
        assert audit.problem is not None and "moves it from 'Forged'" in audit.problem.reason
