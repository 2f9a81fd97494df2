"""Runtime benchmark: dispatch, signing, checkpoints, durable commits and verification, each as
a ratio against a baseline measured in the same run.

Run: `python benchmarks/runtime.py [--quick] [--json] [--only GROUP ...]` (`--quick` takes
well under a minute, the default run about two; `--json` prints one JSON object as the last
line). The machine is `Door`, compiled from the text below by `autonomic.compiler.build` into a
temporary directory and imported like any generated governor. Its events carry no payload, so
the comparison with a hand-written dict is about dispatch itself.

The machine this runs on is shared and noisy, so every figure is a ratio of two timings taken
in the same process. The work of both sides is cut into chunks of equal size; subject and
baseline chunks alternate, every chunk runs in several passes, and each chunk's best time is
kept (as `timeit` keeps the best run), so a burst of load from the neighbours spoils one
chunk's time in one pass, not the figure. The garbage collector is off while timing. Ratios
read "higher is better": baseline time / subject time. Durable SQLite rounds are timed whole
(threads, fsync) and paired with a baseline round each; that figure is the median ratio.
"""

from __future__ import annotations

import argparse
import enum
import gc
import hashlib
import importlib.util
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from autonomic.compiler.build import build
from autonomic.runtime.dispatch import Governor
from autonomic.runtime.keys import Keyring, Signer
from autonomic.runtime.ledger import (
    EMPTY_PAYLOAD_DIGEST,
    ENTRY_TAG,
    INSERT_CHECKPOINT_SQL,
    INSERT_ENTRY_SQL,
    META_MODE_KEY,
    SCHEMA_SQL,
    SET_META_SQL,
    SIG_TAG,
    Checkpoint,
    EntryData,
    LedgerEntry,
    LedgerMode,
    LedgerSealer,
    MemoryLedger,
    verify_entries,
    verify_ledger,
)
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore
from autonomic.runtime.tables import MachineSpec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DOOR_MACHINE = """\
machine Door perpetual "A door that opens, closes, locks and unlocks." {
  event Open
  event Close
  event Lock
  event Unlock
  initial state Closed { on Open -> Opened  on Lock -> Locked }
  state Opened { on Close -> Closed }
  state Locked { on Unlock -> Closed }
}
"""
# Every instance cycles through these from Closed back to Closed, so any number of whole
# cycles is a valid sequence and leaves every door where it started.
CYCLE = ("Open", "Close", "Lock", "Unlock")
CHECKPOINT_EVERY = 1000  # memory store: one checkpoint per 1000 entries (a commit is 1 entry)
DURABLE_THREADS = 8


@dataclass(frozen=True)
class Profile:
    """How much work each figure does: --quick or the default run."""

    instances: int
    dispatch_cycles: int  # whole CYCLEs per instance in one pass
    passes: int  # how often every chunk runs; its best time is kept
    library_instances: int
    statemachine_instances: int
    signed: int  # sign-each dispatches per pass (about 30 us each: Ed25519 signing)
    checkpoint: int  # checkpoint-mode dispatches per pass; also the entries verified
    durable_dispatches: int  # per round, over all threads
    durable_rounds: int
    durable_sweep: tuple[int, ...]  # thread counts measured; DURABLE_THREADS is the figure
    latency_samples: int
    verify_signed: int  # sign-each entries verified per pass


QUICK = Profile(
    instances=500,
    dispatch_cycles=20,
    passes=5,
    library_instances=100,
    statemachine_instances=25,
    signed=1000,
    checkpoint=100_000,
    durable_dispatches=320,
    durable_rounds=3,
    durable_sweep=(DURABLE_THREADS,),
    latency_samples=150,
    verify_signed=2000,
)
FULL = Profile(
    instances=1000,
    dispatch_cycles=50,
    passes=7,
    library_instances=250,
    statemachine_instances=100,
    signed=4000,
    checkpoint=400_000,
    durable_dispatches=1600,
    durable_rounds=5,
    durable_sweep=(2, 4, DURABLE_THREADS, 16),
    latency_samples=600,
    verify_signed=10_000,
)


@dataclass
class Figure:
    """One line of the report: a value, its goal (None: shown for information), the numbers
    it was computed from."""

    key: str
    value: float | None
    goal: float | None
    unit: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.value is None:
            return None
        return self.value >= self.goal


# ---------------------------------------------------------------------------------------------
# Timing.


def timed(work: Callable[[], object]) -> float:
    """Seconds one call of `work` takes, with the garbage collector off (as timeit does)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def chunked_pairs(
    subject: Callable[[int], object],
    baseline: Callable[[int], object],
    chunks: int,
    passes: int,
    before_pass: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """(subject seconds, baseline seconds): each the sum over chunks of the chunk's best time.
    `subject(k)` and `baseline(k)` run chunk k; chunks run in order within a pass, so work
    that carries state from chunk to chunk stays valid; `before_pass` resets such state."""
    best_subject = [float("inf")] * chunks
    best_baseline = [float("inf")] * chunks
    clock = time.perf_counter
    enabled = gc.isenabled()
    try:
        for number in range(passes):
            if before_pass is not None:
                gc.enable()
                before_pass()
            gc.collect()
            gc.disable()
            for k in range(chunks):
                if (number + k) % 2:
                    start = clock()
                    baseline(k)
                    middle = clock()
                    subject(k)
                    end = clock()
                    subject_time, baseline_time = end - middle, middle - start
                else:
                    start = clock()
                    subject(k)
                    middle = clock()
                    baseline(k)
                    end = clock()
                    subject_time, baseline_time = middle - start, end - middle
                best_subject[k] = min(best_subject[k], subject_time)
                best_baseline[k] = min(best_baseline[k], baseline_time)
    finally:
        if enabled:
            gc.enable()
    return sum(best_subject), sum(best_baseline)


def ratio(baseline: float, subject: float) -> float:
    """Subject speed relative to the baseline: above 1, the subject is faster."""
    return baseline / subject if subject > 0 else float("inf")


T = TypeVar("T")


def split(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive chunks of `size` items (cut before timing: slicing is not the work)."""
    return [items[start : start + size] for start in range(0, len(items) - size + 1, size)]


# ---------------------------------------------------------------------------------------------
# The machine, as generated code and as the hand-written code it replaces.


def compile_door(folder: Path) -> ModuleType:
    source = folder / "door.fsm"
    source.write_text(DOOR_MACHINE, encoding="utf-8")
    out = folder / "generated"
    result = build([source], out, svg=False)
    if result.report.failed(False):
        raise SystemExit(f"the Door machine does not compile: {result.report}")
    spec = importlib.util.spec_from_file_location("bench_door", out / "door.py")
    if spec is None or spec.loader is None:
        raise SystemExit("cannot import the generated Door module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class DoorState(enum.Enum):
    """The hand-written baseline's states: a plain Enum, as a user would write it."""

    CLOSED = "Closed"
    OPENED = "Opened"
    LOCKED = "Locked"


class DoorEvent(enum.Enum):
    OPEN = "Open"
    CLOSE = "Close"
    LOCK = "Lock"
    UNLOCK = "Unlock"


ENUM_TABLE: dict[tuple[DoorState, DoorEvent], DoorState] = {
    (DoorState.CLOSED, DoorEvent.OPEN): DoorState.OPENED,
    (DoorState.CLOSED, DoorEvent.LOCK): DoorState.LOCKED,
    (DoorState.OPENED, DoorEvent.CLOSE): DoorState.CLOSED,
    (DoorState.LOCKED, DoorEvent.UNLOCK): DoorState.CLOSED,
}
STR_TABLE: dict[tuple[str, str], str] = {
    (state.value, event.value): target.value for (state, event), target in ENUM_TABLE.items()
}


class InvalidDoorEvent(Exception):
    pass


class NaiveDoors:
    """The code a governor replaces: a transition dict, the current state of every instance,
    an error for an event the state does not accept. Same work as a minimal governor."""

    def __init__(self, table: dict[Any, Any], initial: object, ids: Sequence[str]) -> None:
        self.table = table
        self.states: dict[str, Any] = dict.fromkeys(ids, initial)

    def dispatch(self, instance_id: str, event: Any) -> Any:
        state = self.states[instance_id]
        try:
            target = self.table[(state, event)]
        except KeyError:
            raise InvalidDoorEvent(f"{instance_id}: {state} does not accept {event}") from None
        self.states[instance_id] = target
        return target


def door_ids(count: int) -> list[str]:
    return [f"door-{number:06d}" for number in range(count)]


def event_sequence(ids: Sequence[str], cycles: int, events: Sequence[Any]) -> list[tuple[str, Any]]:
    """Round-robin over the instances: every instance takes the next event of its cycle."""
    return [(i, events[step % len(events)]) for step in range(cycles * len(events)) for i in ids]


def drive(dispatch: Callable[[str, Any], object], sequence: Sequence[tuple[str, Any]]) -> None:
    for instance_id, event in sequence:
        dispatch(instance_id, event)


def driver(
    dispatch: Callable[[str, Any], object], sequence: Sequence[tuple[str, Any]], size: int
) -> Callable[[int], None]:
    """Runs chunk k of `sequence` through `dispatch`."""

    chunks = split(sequence, size)

    def run(k: int) -> None:
        drive(dispatch, chunks[k])

    return run


def idle(sequence: Sequence[tuple[str, Any]]) -> None:
    for _instance_id, _event in sequence:
        pass


def load_doors(runtime: Runtime, spec: MachineSpec, ids: Sequence[str]) -> Governor:
    governor = runtime.load(spec)
    for instance_id in ids:
        governor.create(instance_id)
    return governor


# ---------------------------------------------------------------------------------------------
# Figures.


DISPATCH_CHUNK = 2000
LIBRARY_CHUNK = 100
SIGNED_CHUNK = 100
CHECKPOINT_CHUNK = 5000


def dispatch_figures(door: ModuleType, profile: Profile) -> list[Figure]:
    """In-memory dispatch without a ledger vs the hand-written dict (Enum keys and str keys)."""
    spec: MachineSpec = door.MACHINE
    ids = door_ids(profile.instances)
    governed = event_sequence(ids, profile.dispatch_cycles, [door.Event(e) for e in CYCLE])
    by_enum = event_sequence(ids, profile.dispatch_cycles, [DoorEvent(e) for e in CYCLE])
    by_str = event_sequence(ids, profile.dispatch_cycles, list(CYCLE))
    count = len(governed)
    chunks = count // DISPATCH_CHUNK
    count = chunks * DISPATCH_CHUNK
    loop = min(timed(partial(idle, governed[:count])) for _ in range(5))

    def net(seconds: float) -> float:
        """Per-dispatch seconds without the driving loop's own cost."""
        return max(seconds - loop, 1e-12) / count

    figures: list[Figure] = []
    variants = (
        ("dispatch_vs_dict", False, ENUM_TABLE, DoorState.CLOSED, by_enum, 1.0),
        ("dispatch_vs_str_table", False, STR_TABLE, "Closed", by_str, None),
        ("dispatch_vs_dict_locked", True, ENUM_TABLE, DoorState.CLOSED, by_enum, None),
    )
    for key, thread_safe, table, initial, sequence, goal in variants:
        runtime = Runtime(MemoryStore(thread_safe=thread_safe))
        dispatch = load_doors(runtime, spec, ids).dispatch
        naive = NaiveDoors(table, initial, ids).dispatch
        ours, theirs = chunked_pairs(
            driver(dispatch, governed, DISPATCH_CHUNK),
            driver(naive, sequence, DISPATCH_CHUNK),
            chunks,
            profile.passes,
        )
        figures.append(
            Figure(
                key,
                ratio(net(theirs), net(ours)),
                goal,
                "x",
                {
                    "dispatch_ns": round(net(ours) * 1e9, 1),
                    "baseline_ns": round(net(theirs) * 1e9, 1),
                    "loop_ns": round(loop / count * 1e9, 1),
                    "dispatches": count,
                    "thread_safe_store": thread_safe,
                },
            )
        )
    return figures


def library_figures(door: ModuleType, profile: Profile) -> list[Figure]:
    """The same machine and events in the `transitions` and `python-statemachine` libraries."""
    spec: MachineSpec = door.MACHINE
    figures: list[Figure] = []
    for key, count, make in (
        ("dispatch_vs_transitions", profile.library_instances, _transitions_driver),
        ("dispatch_vs_statemachine", profile.statemachine_instances, _statemachine_driver),
    ):
        ids = door_ids(count)
        cycles = 5
        library = make(ids, cycles)
        if library is None:
            figures.append(Figure(key, None, 10.0, "x", {"missing": True}))
            continue
        governed = event_sequence(ids, cycles, [door.Event(e) for e in CYCLE])
        dispatch = load_doors(Runtime(MemoryStore(thread_safe=False)), spec, ids).dispatch
        chunks = len(governed) // LIBRARY_CHUNK
        ours, theirs = chunked_pairs(
            driver(dispatch, governed, LIBRARY_CHUNK),
            library,
            chunks,
            max(3, profile.passes // 2),
        )
        per = chunks * LIBRARY_CHUNK
        figures.append(
            Figure(
                key,
                ratio(theirs, ours),
                10.0,
                "x",
                {
                    "dispatch_ns": round(ours / per * 1e9, 1),
                    "library_ns": round(theirs / per * 1e9, 1),
                    "dispatches": per,
                },
            )
        )
    return figures


def _transitions_driver(ids: Sequence[str], cycles: int) -> Callable[[int], object] | None:
    try:
        from transitions import Machine
    except ImportError:
        return None

    class DoorModel:
        pass

    models = {i: DoorModel() for i in ids}
    Machine(
        model=list(models.values()),
        states=["Closed", "Opened", "Locked"],
        transitions=[
            ["Open", "Closed", "Opened"],
            ["Close", "Opened", "Closed"],
            ["Lock", "Closed", "Locked"],
            ["Unlock", "Locked", "Closed"],
        ],
        initial="Closed",
        auto_transitions=False,
    )
    sequence = [(models[i], e) for i, e in event_sequence(ids, cycles, list(CYCLE))]
    chunks = split(sequence, LIBRARY_CHUNK)

    def run(k: int) -> None:
        for model, event in chunks[k]:
            model.trigger(event)  # type: ignore[attr-defined]

    return run


def _statemachine_driver(ids: Sequence[str], cycles: int) -> Callable[[int], object] | None:
    try:
        from statemachine import State, StateMachine
    except ImportError:
        return None

    class DoorMachine(StateMachine):
        closed = State(initial=True)
        opened = State()
        locked = State()
        open = closed.to(opened)
        close = opened.to(closed)
        lock = closed.to(locked)
        unlock = locked.to(closed)

    machines = {i: DoorMachine() for i in ids}
    names = [e.lower() for e in CYCLE]
    sequence = [(machines[i], e) for i, e in event_sequence(ids, cycles, names)]
    chunks = split(sequence, LIBRARY_CHUNK)

    def run(k: int) -> None:
        for machine, event in chunks[k]:
            machine.send(event)

    return run


def new_signer() -> Signer:
    return Signer.from_private_key(Ed25519PrivateKey.generate())


def ledger_runtime(
    spec: MachineSpec, ids: Sequence[str], signer: Signer, mode: LedgerMode
) -> tuple[Runtime, Governor]:
    sealer = LedgerSealer(signer, mode)
    runtime = Runtime(MemoryStore(), sealer=sealer, checkpoint_every=CHECKPOINT_EVERY)
    return runtime, load_doors(runtime, spec, ids)


def signed_figure(door: ModuleType, profile: Profile, signer: Signer) -> Figure:
    """Sign-each mode in memory vs raw Ed25519 signing of messages of the signed size."""
    ids = door_ids(min(profile.instances, profile.signed))
    cycles = max(1, profile.signed // (len(CYCLE) * len(ids)))
    governed = event_sequence(ids, cycles, [door.Event(e) for e in CYCLE])
    _, governor = ledger_runtime(door.MACHINE, ids, signer, "sign-each")
    sign = signer.private_key.sign
    messages = [SIG_TAG + hashlib.sha256(str(n).encode()).digest() for n in range(len(governed))]
    message_chunks = split(messages, SIGNED_CHUNK)

    ours = driver(governor.dispatch, governed, SIGNED_CHUNK)

    def raw(k: int) -> None:
        for message in message_chunks[k]:
            sign(message)

    chunks = len(governed) // SIGNED_CHUNK
    count = chunks * SIGNED_CHUNK
    subject, baseline = chunked_pairs(ours, raw, chunks, max(3, profile.passes // 2))
    figure = Figure(
        "signed_vs_raw_sign",
        ratio(baseline, subject),
        0.8,
        "x",
        {
            "signed_tps": round(count / subject),
            "raw_sign_per_s": round(count / baseline),
            "message_bytes": len(messages[0]),
            "dispatches": count,
        },
    )
    return figure


def twelve_field_entry(seq: int) -> dict[str, object]:
    return {
        "seq": seq,
        "ts_ms": 1_767_225_600_000 + seq,
        "kind": "transition",
        "machine": "Door",
        "instance": f"door-{seq % 1000:06d}",
        "from_state": "Closed",
        "to_state": "Opened",
        "event": "Open",
        "actor": "system",
        "event_id": "",
        "payload_sha256": hashlib.sha256(b"payload").hexdigest(),
        "prev_hash": hashlib.sha256(str(seq).encode()).hexdigest(),
    }


def checkpoint_figure(
    door: ModuleType, profile: Profile, signer: Signer
) -> tuple[Figure, Figure, Runtime]:
    """Checkpoint mode in memory: transitions per second, and that vs json.dumps per second."""
    ids = door_ids(profile.instances)
    cycles = max(1, profile.checkpoint // (len(CYCLE) * len(ids)))
    governed = event_sequence(ids, cycles, [door.Event(e) for e in CYCLE])
    chunks = len(governed) // CHECKPOINT_CHUNK
    count = chunks * CHECKPOINT_CHUNK
    docs = [twelve_field_entry(n) for n in range(count)]
    event_chunks = split(governed, CHECKPOINT_CHUNK)
    doc_chunks = split(docs, CHECKPOINT_CHUNK)
    dumps = json.dumps
    current: list[Runtime] = []
    dispatch: list[Callable[..., object]] = []

    def fresh() -> None:
        # A fresh ledger per pass: otherwise every pass's entries stay in memory.
        current.clear()
        dispatch.clear()
        runtime, governor = ledger_runtime(door.MACHINE, ids, signer, "checkpoint")
        current.append(runtime)
        dispatch.append(governor.dispatch)

    def ours(k: int) -> None:
        drive(dispatch[0], event_chunks[k])

    def baseline(k: int) -> None:
        for doc in doc_chunks[k]:
            dumps(doc)

    subject, theirs = chunked_pairs(ours, baseline, chunks, max(3, profile.passes // 2), fresh)
    runtime = current[0]
    runtime.checkpoint()
    absolute = Figure(
        "checkpoint_tps",
        count / subject,
        200_000.0,
        "/s",
        {
            "checkpoint_every": CHECKPOINT_EVERY,
            "dispatch_us": round(subject / count * 1e6, 3),
            "dispatches": count,
        },
    )
    relative = Figure(
        "checkpoint_vs_json_dumps",
        ratio(theirs, subject),
        None,
        "x",
        {"json_dumps_per_s": round(count / theirs), "fields": len(docs[0])},
    )
    return absolute, relative, runtime


def durable_figures(door: ModuleType, profile: Profile, signer: Signer) -> list[Figure]:
    """SQLite with synchronous=FULL: group commit from several threads vs raw batched INSERTs
    of ledger rows of the same size, in batches of the size the group committer formed, each
    round paired with its own baseline (the disk is shared too); then the latency of one
    dispatch per commit (one thread)."""
    with tempfile.TemporaryDirectory(prefix="autonomic-bench-") as tmp:
        folder = Path(tmp)
        sweep = {}
        for threads in profile.durable_sweep:
            sweep[threads] = _durable_rounds(door, profile, signer, folder, threads)
        main = sweep[DURABLE_THREADS]
        latencies, raw_latencies = _commit_latencies(door, profile, signer, folder)
    ratios = [raw / ours for ours, raw, _, _ in main]
    middle = sorted(range(len(main)), key=lambda n: ratios[n])[len(main) // 2]
    ours, raw, count, batches = main[middle]
    detail: dict[str, Any] = {
        "durable_tps": round(count / ours),
        "raw_rows_per_s": round(count / raw),
        "threads": DURABLE_THREADS,
        "dispatches": count,
        "avg_batch": round(count / batches, 2),
        "round_ratios": [round(r, 2) for r in ratios],
        "synchronous": "FULL",
    }
    for threads, rounds in sweep.items():
        if threads != DURABLE_THREADS:
            ratio_by_round = sorted(raw / ours for ours, raw, _, _ in rounds)
            batch = statistics.mean(n / b for _, _, n, b in rounds)
            detail[f"threads_{threads}"] = (
                f"{ratio_by_round[len(rounds) // 2]:.2f} at batch {batch:.1f}"
            )
    return [
        Figure("durable_vs_raw_batch", statistics.median(ratios), 0.5, "x", detail),
        Figure(
            "commit_latency_p50_ms",
            statistics.median(latencies) * 1e3,
            None,
            "ms",
            {"raw_single_row_commit_p50_ms": round(statistics.median(raw_latencies) * 1e3, 3)},
        ),
        Figure(
            "commit_latency_p99_ms",
            statistics.quantiles(latencies, n=100)[98] * 1e3,
            None,
            "ms",
            {
                "raw_single_row_commit_p99_ms": round(
                    statistics.quantiles(raw_latencies, n=100)[98] * 1e3, 3
                ),
                "samples": len(latencies),
            },
        ),
    ]


def _durable_rounds(
    door: ModuleType, profile: Profile, signer: Signer, folder: Path, threads: int
) -> list[tuple[float, float, int, int]]:
    """Per round: (group-commit seconds, raw seconds, dispatches, commit batches)."""
    store = SQLiteStore(folder / f"durable-{threads}.db", synchronous="FULL")
    runtime = Runtime(store, sealer=LedgerSealer(signer, "checkpoint"), checkpoint_every=1)
    ids = door_ids(threads)
    governor = load_doors(runtime, door.MACHINE, ids)
    events = [door.Event(e) for e in CYCLE]
    like = next(iter(runtime.ledger()))
    per_thread = max(4, profile.durable_dispatches // threads)
    rounds: list[tuple[float, float, int, int]] = []
    for number in range(profile.durable_rounds):
        barrier = threading.Barrier(threads + 1)

        def worker(instance_id: str, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            for step in range(per_thread):
                governor.dispatch(instance_id, events[step % len(events)])

        workers = [threading.Thread(target=worker, args=(i,)) for i in ids]
        for thread in workers:
            thread.start()
        batches_before = runtime.commit_batches
        barrier.wait()
        start = time.perf_counter()
        for thread in workers:
            thread.join()
        ours = time.perf_counter() - start
        count = threads * per_thread
        batches = runtime.commit_batches - batches_before
        batch = max(1, round(count / batches))
        raw = _raw_batched_inserts(folder / f"raw-{threads}-{number}.db", like, count, batch)
        rounds.append((ours, raw, count, batches))
    runtime.close()
    return rounds


def _commit_latencies(
    door: ModuleType, profile: Profile, signer: Signer, folder: Path
) -> tuple[list[float], list[float]]:
    """One thread, one dispatch per commit: seconds per dispatch, and per raw one-row commit."""
    store = SQLiteStore(folder / "latency.db", synchronous="FULL")
    runtime = Runtime(store, sealer=LedgerSealer(signer, "checkpoint"), checkpoint_every=1)
    governor = load_doors(runtime, door.MACHINE, ["door-latency"])
    events = [door.Event(e) for e in CYCLE]
    like = next(iter(runtime.ledger()))
    latencies: list[float] = []
    clock = time.perf_counter
    for step in range(profile.latency_samples):
        start = clock()
        governor.dispatch("door-latency", events[step % len(events)])
        latencies.append(clock() - start)
    runtime.close()
    connection = _raw_connection(folder / "latency-raw.db")
    raw: list[float] = []
    try:
        for seq in range(profile.latency_samples):
            start = clock()
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(INSERT_ENTRY_SQL, (seq, *like[1:]))
            connection.execute("COMMIT")
            raw.append(clock() - start)
    finally:
        connection.close()
    return latencies, raw


def _raw_connection(path: Path) -> sqlite3.Connection:
    """A bare SQLite connection like the store's: WAL, synchronous=FULL, the ledger table."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.executescript(SCHEMA_SQL)
    return connection


def _raw_batched_inserts(path: Path, like: LedgerEntry, count: int, batch: int) -> float:
    """Seconds to insert `count` rows shaped like `like` into a fresh ledger table, `batch`
    rows per commit."""
    connection = _raw_connection(path)
    try:
        rows = [(n, *like[1:]) for n in range(count)]
        start = time.perf_counter()
        for first in range(0, count, batch):
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(INSERT_ENTRY_SQL, rows[first : first + batch])
            connection.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        connection.close()


VERIFY_CHAIN_CHUNK = 5000
VERIFY_SIGNED_CHUNK = 100


def door_ledgers(
    signer: Signer, mode: LedgerMode, ledgers: int, size: int
) -> list[tuple[list[LedgerEntry], list[Checkpoint]]]:
    """`ledgers` complete ledgers of `size` Door transitions each (sealed as the runtime seals
    them; in checkpoint mode a checkpoint every CHECKPOINT_EVERY entries and at the end), so
    that verification too can be timed in chunks: each chunk is a whole ledger."""
    sealer = LedgerSealer(signer, mode)
    # 100 doors, each taking one step of its cycle per 100 entries: a consistent history.
    steps = (
        ("Closed", "Opened", "Open"),
        ("Opened", "Closed", "Close"),
        ("Closed", "Locked", "Lock"),
        ("Locked", "Closed", "Unlock"),
    )
    start = time.time_ns() // 1_000_000
    made: list[tuple[list[LedgerEntry], list[Checkpoint]]] = []
    for _ in range(ledgers):
        ledger = MemoryLedger(sealer)
        for n in range(size):
            source, target, event = steps[(n // 100) % len(steps)]
            data = EntryData(
                start + n,
                "transition",
                "Door",
                f"door-{n % 100:06d}",
                source,
                target,
                event,
                "system",
                "",
                EMPTY_PAYLOAD_DIGEST,
            )
            ledger.append(data)
            if mode == "checkpoint" and (n + 1) % CHECKPOINT_EVERY == 0:
                ledger.checkpoint(start + n)
        if mode == "checkpoint":
            ledger.checkpoint(start + size)
        made.append((list(ledger.entries()), list(ledger.checkpoints())))
    return made


def verify_chain_figures(runtime: Runtime, signer: Signer, profile: Profile) -> list[Figure]:
    """Chain-only verification (checkpoint mode) in memory vs raw SHA-256 of messages the size
    of an encoded entry; then the checkpoint figure's whole ledger from an SQLite file."""
    keyring = Keyring([signer.public_info()])
    chunks = max(1, profile.checkpoint // VERIFY_CHAIN_CHUNK)
    ledgers = door_ledgers(signer, "checkpoint", chunks, VERIFY_CHAIN_CHUNK)
    size = _encoded_size(ledgers[0][0][0])
    messages = [os.urandom(size) for _ in range(VERIFY_CHAIN_CHUNK)]
    sha256 = hashlib.sha256

    def ours(k: int) -> None:
        entries, checkpoints = ledgers[k]
        report = verify_entries(entries, keyring, checkpoints=checkpoints, mode="checkpoint")
        if not report.ok or report.count != len(entries):
            raise SystemExit(f"the benchmark ledger does not verify: {report}")

    def raw(k: int) -> None:
        for message in messages:
            sha256(message).digest()

    verify, hashing = chunked_pairs(ours, raw, chunks, max(3, profile.passes // 2))
    count = chunks * VERIFY_CHAIN_CHUNK
    entries = list(runtime.ledger())
    checkpoints = runtime.store.checkpoints()
    with tempfile.TemporaryDirectory(prefix="autonomic-bench-") as tmp:
        path = Path(tmp) / "ledger.db"
        _write_ledger_file(path, entries, checkpoints, "checkpoint")

        def from_file() -> None:
            report = verify_ledger(path, keyring)
            if not report.ok or report.count != len(entries):
                raise SystemExit(f"the benchmark ledger file does not verify: {report}")

        file_seconds = min(timed(from_file) for _ in range(3))
    return [
        Figure(
            "verify_chain_eps",
            count / verify,
            500_000.0,
            "/s",
            {
                "entries": count,
                "checkpoint_every": CHECKPOINT_EVERY,
                "raw_sha256_per_s": round(count / hashing),
                "vs_raw_sha256": round(ratio(hashing, verify), 3),
                "message_bytes": size,
            },
        ),
        Figure(
            "verify_chain_eps_sqlite",
            len(entries) / file_seconds,
            None,
            "/s",
            {"entries": len(entries), "checkpoints": len(checkpoints)},
        ),
    ]


def _encoded_size(entry: LedgerEntry) -> int:
    """Bytes hashed for an entry: tag, seq and ts, 8 length-prefixed strings, 2 digests."""
    strings = entry[2:10]
    return len(ENTRY_TAG) + 16 + sum(4 + len(str(s).encode()) for s in strings) + 32 + 32


def _write_ledger_file(
    path: Path, entries: Sequence[LedgerEntry], checkpoints: Sequence[Any], mode: LedgerMode
) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.executescript(SCHEMA_SQL)
        connection.execute("BEGIN")
        connection.executemany(INSERT_ENTRY_SQL, entries)
        connection.executemany(INSERT_CHECKPOINT_SQL, [c.as_row() for c in checkpoints])
        connection.execute(SET_META_SQL, (META_MODE_KEY, mode))
        connection.execute("COMMIT")
    finally:
        connection.close()


def verify_signed_figure(signer: Signer, profile: Profile) -> Figure:
    """Sign-each verification vs raw Ed25519 verification of the same signatures."""
    keyring = Keyring([signer.public_info()])
    public = signer.private_key.public_key()
    chunks = max(1, profile.verify_signed // VERIFY_SIGNED_CHUNK)
    ledgers = door_ledgers(signer, "sign-each", chunks, VERIFY_SIGNED_CHUNK)
    pairs = [[(e.signature, SIG_TAG + e.entry_hash) for e in entries] for entries, _ in ledgers]

    def ours(k: int) -> None:
        entries = ledgers[k][0]
        report = verify_entries(entries, keyring, mode="sign-each")
        if not report.ok or report.count != len(entries):
            raise SystemExit(f"the signed benchmark ledger does not verify: {report}")

    def raw(k: int) -> None:
        verify = public.verify
        for signature, message in pairs[k]:
            verify(signature, message)

    subject, baseline = chunked_pairs(ours, raw, chunks, max(3, profile.passes // 2))
    count = chunks * VERIFY_SIGNED_CHUNK
    return Figure(
        "verify_sig_vs_raw",
        ratio(baseline, subject),
        0.9,
        "x",
        {
            "verify_eps": round(count / subject),
            "raw_verify_per_s": round(count / baseline),
            "entries": count,
        },
    )


# ---------------------------------------------------------------------------------------------
# Report.


def _value(figure: Figure) -> str:
    if figure.value is None:
        return "n/a"
    if figure.unit == "/s":
        return f"{figure.value:,.0f}/s"
    if figure.unit == "ms":
        return f"{figure.value:.2f} ms"
    return f"{figure.value:.2f}x"


def _goal(figure: Figure) -> str:
    if figure.goal is None:
        return ""
    if figure.unit == "/s":
        return f">= {figure.goal:,.0f}/s"
    return f">= {figure.goal:g}"


def _met(figure: Figure) -> str:
    met = figure.met
    return "" if met is None else ("yes" if met else "NO")


def _detail(figure: Figure) -> str:
    return ", ".join(f"{name} {value}" for name, value in figure.detail.items())


def report(figures: Sequence[Figure], profile_name: str) -> list[str]:
    lines = [
        f"python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.machine()}, {os.cpu_count()} cpus, profile {profile_name}",
        "",
        "| key | value | goal | met? | measured |",
        "|---|---:|---:|:---:|---|",
    ]
    for figure in figures:
        lines.append(
            f"| {figure.key} | {_value(figure)} | {_goal(figure)} | {_met(figure)} | "
            f"{_detail(figure)} |"
        )
    return lines


def run(profile: Profile, only: set[str] | None) -> list[Figure]:
    figures: list[Figure] = []

    def wanted(group: str) -> bool:
        return only is None or group in only

    def step(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="autonomic-bench-") as tmp:
        door = compile_door(Path(tmp))
    signer = new_signer()
    if wanted("dispatch"):
        step("dispatch vs hand-written dicts")
        figures += dispatch_figures(door, profile)
    if wanted("libraries"):
        step("dispatch vs transitions and python-statemachine")
        figures += library_figures(door, profile)
    if wanted("signed"):
        step("sign-each dispatch vs raw Ed25519 signing")
        figures.append(signed_figure(door, profile, signer))
    if wanted("checkpoint") or wanted("verify"):
        step("checkpoint-mode dispatch")
        absolute, relative, ledger = checkpoint_figure(door, profile, signer)
        if wanted("checkpoint"):
            figures += [absolute, relative]
        if wanted("verify"):
            step("verification")
            figures += verify_chain_figures(ledger, signer, profile)
            figures.append(verify_signed_figure(signer, profile))
        del ledger
    if wanted("durable"):
        step("durable SQLite dispatch (group commit)")
        figures += durable_figures(door, profile, signer)
    return figures


GROUPS = ("dispatch", "libraries", "signed", "checkpoint", "verify", "durable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run only these groups")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    started = time.perf_counter()
    figures = run(profile, set(args.only) if args.only else None)
    elapsed = time.perf_counter() - started
    for line in report(figures, "quick" if args.quick else "default"):
        print(line)
    print(f"\n{elapsed:.1f} s")
    if args.json:
        summary: dict[str, Any] = {figure.key: figure.value for figure in figures}
        summary["goals"] = {f.key: f.goal for f in figures if f.goal is not None}
        summary["details"] = {f.key: f.detail for f in figures}
        summary["profile"] = "quick" if args.quick else "default"
        summary["seconds"] = round(elapsed, 1)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
