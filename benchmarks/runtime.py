"""Runtime benchmark: every figure against the strongest fair baseline, measured in the same run.

Run: `python benchmarks/runtime.py [--quick] [--json] [--only GROUP ...]` (`--quick` takes about
two minutes on two shared cores; `--json` prints one JSON object as the last line, its first
keys the goals in this order: bare_vs_enum_dict, bare_vs_str_table, governor_vs_baseline,
reject_vs_baseline, sign_each_vs_raw, checkpoint_default_tps, verify_cli_sqlite_eps,
durable_vs_raw_same_rows_1t, durable_vs_raw_same_rows_8t, group_commit_batch_256).

Every subject runs at the defaults a user gets (`Runtime()`, `MemoryStore()`, `SQLiteStore(path)`
with WAL and synchronous=FULL, the default checkpoint policy); a figure that needs anything
else says so in its detail. Each figure is the median of ROUNDS rounds (at least 5) with its
range; in every round subject and baseline are timed back to back, in alternating order, so a
burst of load from the neighbours spoils a round, not the figure. Within a round, in-memory
work is cut into chunks, subject and baseline chunks alternate, and each chunk's best of two
passes is kept; the garbage collector is off while timing. Ratios read "higher is better":
baseline time / subject time.

Baselines:
- bare dispatch: a hand-written dict of (state, event) -> state keyed by str (the practical
  limit) and by Enum members (what the first version of this benchmark used);
- the Entitlement governor (payload validation, guards, actions bound to trivial functions):
  a hand-written class validating the same payload with the same pydantic model (its
  validator's `validate_python`, as the governor calls it), looking up a str-keyed table,
  calling the guard with the payload and the action;
- rejections: the str-keyed dict's rejection (KeyError turned into an exception with a
  message), caught by the caller like the runtime's InvalidTransition;
- sign-each: raw Ed25519 signing of messages of the signed size;
- durable dispatch: raw sqlite3 writing the same rows (the instance UPDATE and ledger INSERT
  of each dispatch, the checkpoint INSERT of each commit) into the same tables and indexes of
  an already used file, WAL and synchronous=FULL, at the batch size group commit formed.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import gc
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
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

from autonomic.runtime.dispatch import Governor
from autonomic.runtime.errors import InvalidTransition
from autonomic.runtime.keys import Signer, generate_keypair, load_signer
from autonomic.runtime.ledger import (
    INSERT_CHECKPOINT_SQL,
    INSERT_ENTRY_SQL,
    SIG_TAG,
    LedgerSealer,
)
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import SQLiteStore
from autonomic.runtime.tables import MachineSpec
from harness import compile_machine, load_module, raw_copy, timed

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
DURABLE_THREADS = 8
ASYNC_DISPATCHERS = 256


@dataclass(frozen=True)
class Profile:
    """How much work each figure does: --quick or the default run."""

    rounds: int
    instances: int
    dispatch_cycles: int  # whole CYCLEs per instance in one round
    governor_cycles: int
    rejections: int
    library_instances: int
    statemachine_instances: int
    signed: int  # sign-each dispatches per round
    checkpoint: int  # checkpoint-mode dispatches per round
    verify_entries: int  # entries in the SQLite ledger `audit verify` reads
    durable_dispatches: int  # per round, over all threads
    async_rounds: int  # dispatches per coroutine in the 256-dispatcher figure


QUICK = Profile(
    rounds=5,
    instances=500,
    dispatch_cycles=10,
    governor_cycles=5,
    rejections=10_000,
    library_instances=100,
    statemachine_instances=25,
    signed=600,
    checkpoint=50_000,
    verify_entries=1_000_000,
    durable_dispatches=480,
    async_rounds=2,
)
FULL = Profile(
    rounds=7,
    instances=1000,
    dispatch_cycles=25,
    governor_cycles=20,
    rejections=40_000,
    library_instances=250,
    statemachine_instances=100,
    signed=2000,
    checkpoint=200_000,
    verify_entries=2_000_000,
    durable_dispatches=800,
    async_rounds=4,
)


@dataclass
class Figure:
    """One line of the report: the median over rounds, its range, its goal (None: shown for
    information), and what it was computed from."""

    key: str
    rounds: list[float]
    goal: float | None
    unit: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        return statistics.median(self.rounds) if self.rounds else None

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.value is None:
            return None
        return self.value >= self.goal


# ---------------------------------------------------------------------------------------------
# Timing.


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
    return load_module(compile_machine(folder, "door", DOOR_MACHINE))


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


DISPATCH_CHUNK = 1000
LIBRARY_CHUNK = 100
SIGNED_CHUNK = 100
CHECKPOINT_CHUNK = 5000
PASSES = 2  # per round: each chunk's best of this many passes


def paired_rounds(
    subject: Callable[[int], object],
    baseline: Callable[[int], object],
    chunks: int,
    rounds: int,
    before_round: Callable[[], object] | None = None,
) -> list[tuple[float, float]]:
    """Per round: (subject seconds, baseline seconds), each a sum of chunks' best times."""
    measured = []
    for _ in range(rounds):
        measured.append(chunked_pairs(subject, baseline, chunks, PASSES, before_round))
    return measured


def bare_figures(door: ModuleType, profile: Profile) -> list[Figure]:
    """Dispatch on `Runtime()` (memory store, no ledger) vs hand-written dicts."""
    spec: MachineSpec = door.MACHINE
    ids = door_ids(profile.instances)
    governed = event_sequence(ids, profile.dispatch_cycles, [door.Event(e) for e in CYCLE])
    by_enum = event_sequence(ids, profile.dispatch_cycles, [DoorEvent(e) for e in CYCLE])
    by_str = event_sequence(ids, profile.dispatch_cycles, list(CYCLE))
    chunks = len(governed) // DISPATCH_CHUNK
    count = chunks * DISPATCH_CHUNK
    loop = min(timed(lambda: idle(governed[:count])) for _ in range(5))
    figures = []
    for key, table, initial, sequence, goal in (
        ("bare_vs_enum_dict", ENUM_TABLE, DoorState.CLOSED, by_enum, 1.0),
        ("bare_vs_str_table", STR_TABLE, "Closed", by_str, 0.5),
    ):
        dispatch = load_doors(Runtime(), spec, ids).dispatch
        naive = NaiveDoors(table, initial, ids).dispatch
        measured = paired_rounds(
            driver(dispatch, governed, DISPATCH_CHUNK),
            driver(naive, sequence, DISPATCH_CHUNK),
            chunks,
            profile.rounds,
        )
        ours = [max(s - loop, 1e-12) / count for s, _ in measured]
        theirs = [max(b - loop, 1e-12) / count for _, b in measured]
        figures.append(
            Figure(
                key,
                [ratio(b, s) for s, b in zip(ours, theirs, strict=True)],
                goal,
                "x",
                {
                    "dispatch_ns": round(statistics.median(ours) * 1e9, 1),
                    "baseline_ns": round(statistics.median(theirs) * 1e9, 1),
                    "dispatches": count,
                    "store": "MemoryStore() (thread-safe default)",
                },
            )
        )
    return figures


def reject_figure(door: ModuleType, profile: Profile) -> Figure:
    """Invalid events only (Close to a closed door): the runtime's InvalidTransition vs the
    str-keyed dict's rejection, both raised and caught."""
    ids = door_ids(profile.instances)
    per_instance = max(1, profile.rejections // len(ids))
    governed = [(i, door.Event("Close")) for _ in range(per_instance) for i in ids]
    naive_events = [(i, "Close") for _ in range(per_instance) for i in ids]
    dispatch = load_doors(Runtime(), door.MACHINE, ids).dispatch
    naive = NaiveDoors(STR_TABLE, "Closed", ids).dispatch
    ours_chunks = split(governed, DISPATCH_CHUNK)
    naive_chunks = split(naive_events, DISPATCH_CHUNK)

    def ours(k: int) -> None:
        for instance_id, event in ours_chunks[k]:
            try:  # noqa: SIM105 - contextlib.suppress costs more than the work timed
                dispatch(instance_id, event)
            except InvalidTransition:
                pass

    def theirs(k: int) -> None:
        for instance_id, event in naive_chunks[k]:
            try:  # noqa: SIM105 - as above
                naive(instance_id, event)
            except InvalidDoorEvent:
                pass

    chunks = len(ours_chunks)
    count = chunks * DISPATCH_CHUNK
    measured = paired_rounds(ours, theirs, chunks, profile.rounds)
    return Figure(
        "reject_vs_baseline",
        [ratio(b, s) for s, b in measured],
        0.8,
        "x",
        {
            "reject_ns": round(statistics.median(s for s, _ in measured) / count * 1e9, 1),
            "baseline_ns": round(statistics.median(b for _, b in measured) / count * 1e9, 1),
            "rejections": count,
        },
    )


# ---------------------------------------------------------------------------------------------
# The Entitlement governor vs the same work written by hand.


def entitlement_module() -> ModuleType:
    """The committed generated module (autonomic build keeps it up to date)."""
    import autonomic.generated.entitlement as module

    return module


def entitlement_bindings() -> tuple[dict[str, Callable[..., Any]], dict[str, Callable[..., Any]]]:
    """Trivial guards and actions, as a user would bind them: the payload decides severity."""
    module = entitlement_module()
    guards: dict[str, Callable[..., Any]] = {name: _yes for name in module.GUARDS}
    guards["contention_is_severe"] = _severe
    actions: dict[str, Callable[..., Any]] = {name: _nothing for name in module.ACTIONS}
    return guards, actions


def _yes(ctx: Any) -> bool:
    return True


def _severe(ctx: Any) -> bool:
    return bool(ctx.payload.severity == "high")


def _nothing(ctx: Any) -> None:
    return None


# Active -> Degraded (guard holds) -> Degraded (self-loop) -> Active -> Active (else row):
# payloads, guards, actions; no emits and no timers (neither the Active nor Degraded state
# has timers, and these rows emit nothing), so both sides do the same work.
GOVERNOR_CYCLE: tuple[tuple[str, dict[str, str]], ...] = (
    ("TenantContention", {"tenant_id": "t-1", "resource": "cpu", "severity": "high"}),
    ("RestorePreviousTier", {"customer_id": "c-1", "previous_tier": "starter"}),
    ("ContentionResolved", {"tenant_id": "t-1"}),
    ("TenantContention", {"tenant_id": "t-1", "resource": "cpu", "severity": "low"}),
)


class HandEntitlements:
    """The baseline: the same validation (the generated pydantic models), a str-keyed table
    of (state, event) -> rows of (guard, action, target), the guard and the action called."""

    def __init__(self, ids: Sequence[str]) -> None:
        module = entitlement_module()
        # The model's validator itself, as the governor calls it: `model_validate` adds a
        # Python frame and keyword options (0.4 us of the baseline's 1.8 us), work that the
        # governor does not do, so a baseline through it would be a weaker one.
        self.validators = {
            str(event): model.__pydantic_validator__.validate_python
            for event, model in module.PAYLOADS.items()
        }
        self.table = {
            ("Active", "TenantContention"): (
                (_hand_severe, _hand_action, "Degraded"),
                (None, _hand_action, "Active"),
            ),
            ("Degraded", "RestorePreviousTier"): ((None, _hand_action, "Degraded"),),
            ("Degraded", "ContentionResolved"): ((None, _hand_action, "Active"),),
        }
        self.states = dict.fromkeys(ids, "Active")

    def dispatch(self, instance_id: str, event: str, payload: dict[str, Any]) -> str:
        validated = self.validators[event](payload)
        state = self.states[instance_id]
        rows = self.table.get((state, event))
        if rows is None:
            raise InvalidDoorEvent(f"{instance_id}: {state} does not accept {event}")
        for guard, action, target in rows:
            if guard is None or guard(validated):
                action(validated)
                self.states[instance_id] = target
                return target
        raise InvalidDoorEvent(f"{instance_id}: no guard held")


def _hand_severe(payload: Any) -> bool:
    return bool(payload.severity == "high")


def _hand_action(payload: Any) -> None:
    return None


def governor_figure(profile: Profile) -> Figure:
    module = entitlement_module()
    ids = [f"ent-{n:05d}" for n in range(200)]
    runtime = Runtime()
    governor = runtime.load(module.MACHINE, *entitlement_bindings())
    for instance_id in ids:
        governor.create(instance_id)
        governor.dispatch(instance_id, "Approve", {"approver": "vendor"})
    assert governor.get(ids[0]) is not None and governor.get(ids[0]).state == "Active"  # type: ignore[union-attr]
    events = [module.Event(e) for e, _ in GOVERNOR_CYCLE]
    sequence = [
        (i, events[step % 4], GOVERNOR_CYCLE[step % 4][1])
        for step in range(4 * profile.governor_cycles)
        for i in ids
    ]
    plain = [(i, str(e), p) for i, e, p in sequence]
    hand = HandEntitlements(ids)
    size = 200
    ours_chunks = split(sequence, size)
    hand_chunks = split(plain, size)
    dispatch, by_hand = governor.dispatch, hand.dispatch

    def ours(k: int) -> None:
        for instance_id, event, payload in ours_chunks[k]:
            dispatch(instance_id, event, payload)

    def theirs(k: int) -> None:
        for instance_id, event, payload in hand_chunks[k]:
            by_hand(instance_id, event, payload)

    chunks = len(ours_chunks)
    count = chunks * size
    measured = paired_rounds(ours, theirs, chunks, profile.rounds)
    return Figure(
        "governor_vs_baseline",
        [ratio(b, s) for s, b in measured],
        0.7,
        "x",
        {
            "dispatch_us": round(statistics.median(s for s, _ in measured) / count * 1e6, 2),
            "baseline_us": round(statistics.median(b for _, b in measured) / count * 1e6, 2),
            "dispatches": count,
            "machine": "Entitlement, Runtime() defaults (memory store, no ledger)",
        },
    )


# ---------------------------------------------------------------------------------------------
# Ledger modes at their defaults.


def new_signer(folder: Path) -> Signer:
    generate_keypair(folder / "keys")
    return load_signer(folder / "keys")


def raw_ed25519(signer: Signer) -> Callable[[bytes], bytes]:
    """The fastest raw Ed25519 signing here, on the signer's key: libsodium's, as the runtime
    signs (cryptography's `private_key.sign` takes about 1.7 times as long)."""
    from cryptography.hazmat.primitives import serialization
    from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

    seed = signer.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    secret = crypto_sign_seed_keypair(seed)[1]
    return lambda message: crypto_sign(message, secret)[:64]


def signed_figure(door: ModuleType, profile: Profile, signer: Signer) -> Figure:
    """Sign-each mode (memory store) vs raw Ed25519 signing (libsodium, as the runtime signs) of
    messages of the signed size."""
    ids = door_ids(min(profile.instances, profile.signed))
    cycles = max(1, profile.signed // (len(CYCLE) * len(ids)))
    governed = event_sequence(ids, cycles, [door.Event(e) for e in CYCLE])
    runtime = Runtime(sealer=LedgerSealer(signer, "sign-each"))
    governor = load_doors(runtime, door.MACHINE, ids)
    sign = raw_ed25519(signer)
    messages = [SIG_TAG + hashlib.sha256(str(n).encode()).digest() for n in range(len(governed))]
    message_chunks = split(messages, SIGNED_CHUNK)

    def raw(k: int) -> None:
        for message in message_chunks[k]:
            sign(message)

    chunks = len(governed) // SIGNED_CHUNK
    count = chunks * SIGNED_CHUNK
    measured = paired_rounds(
        driver(governor.dispatch, governed, SIGNED_CHUNK), raw, chunks, profile.rounds
    )
    return Figure(
        "sign_each_vs_raw",
        [ratio(b, s) for s, b in measured],
        0.8,
        "x",
        {
            "signed_tps": round(count / statistics.median(s for s, _ in measured)),
            "raw_sign_per_s": round(count / statistics.median(b for _, b in measured)),
            "dispatches": count,
        },
    )


def checkpoint_figure(door: ModuleType, profile: Profile, signer: Signer) -> Figure:
    """Checkpoint mode, `Runtime(sealer=...)` defaults (memory store: one checkpoint per 1000
    entries or per second): dispatches per second."""
    ids = door_ids(profile.instances)
    cycles = max(1, profile.checkpoint // (len(CYCLE) * len(ids)))
    governed = event_sequence(ids, cycles, [door.Event(e) for e in CYCLE])
    rates = []
    checkpoints = 0
    for _ in range(profile.rounds):
        # A fresh ledger per round: otherwise every round's entries stay in memory.
        runtime = Runtime(sealer=LedgerSealer(signer, "checkpoint"))
        dispatch = load_doors(runtime, door.MACHINE, ids).dispatch
        seconds = timed(partial(drive, dispatch, governed))
        rates.append(len(governed) / seconds)
        checkpoints = len(runtime.store.checkpoints())
    return Figure(
        "checkpoint_default_tps",
        rates,
        200_000.0,
        "/s",
        {"dispatches": len(governed), "checkpoints_signed": checkpoints},
    )


# ---------------------------------------------------------------------------------------------
# `autonomic audit verify` of a SQLite store.


def verify_figure(door: ModuleType, profile: Profile, signer: Signer, folder: Path) -> Figure:
    """The CLI on a SQLite store written by the runtime (checkpoint mode, defaults): entries
    per second of wall time, process start included; peak memory of a ledger and of one
    twice its size."""
    small = write_store(door, signer, folder / "verify-half.db", profile.verify_entries // 2)
    big = write_store(door, signer, folder / "verify.db", profile.verify_entries)
    keys = str(folder / "keys" / f"{signer.key_id}.public.json")
    rates: list[float] = []
    peaks: dict[int, int] = {}
    for path, entries in ((big, profile.verify_entries), (small, profile.verify_entries // 2)):
        for _ in range(profile.rounds if path == big else 1):
            seconds, peak_kb, out = run_cli(["audit", "verify", str(path), "--public-key", keys])
            if f"verified {entries} entries" not in out:
                raise SystemExit(f"audit verify did not verify {path}: {out}")
            if path == big:
                rates.append(entries / seconds)
            peaks[entries] = max(peaks.get(entries, 0), peak_kb)
    return Figure(
        "verify_cli_sqlite_eps",
        rates,
        500_000.0,
        "/s",
        {
            "entries": profile.verify_entries,
            "peak_rss_mb": {n: round(kb / 1024, 1) for n, kb in sorted(peaks.items())},
            "command": "autonomic audit verify STORE --public-key KEY",
        },
    )


def write_store(door: ModuleType, signer: Signer, path: Path, entries: int) -> Path:
    """A SQLite store holding `entries` ledger entries and the rows of its 1000 instances,
    written as the runtime writes them: dispatched on a memory store, then copied into the
    SQLite store's tables in one commit."""
    ids = door_ids(1000)
    runtime = Runtime(sealer=LedgerSealer(signer, "checkpoint"))
    governor = load_doors(runtime, door.MACHINE, ids)
    events = [door.Event(e) for e in CYCLE]
    for step in range((entries - len(ids)) // len(ids) + 1):
        for instance_id in ids:
            if len(runtime.store.ledger_list) >= entries:  # type: ignore[attr-defined]
                break
            governor.dispatch(instance_id, events[step % len(events)])
    runtime.checkpoint()
    store = SQLiteStore(path, synchronous="NORMAL")
    store.set_ledger_mode("checkpoint")
    store.close()
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN")
        connection.executemany(INSERT_ENTRY_SQL, runtime.store.ledger_entries())
        connection.executemany(
            INSERT_CHECKPOINT_SQL, [c.as_row() for c in runtime.store.checkpoints()]
        )
        # The instance rows too: `audit verify` holds each to the ledger.
        connection.executemany(
            "INSERT INTO instances (machine, instance, state, version) VALUES (?, ?, ?, ?)",
            [
                (r.machine, r.instance, r.state, r.version)
                for r in runtime.store.instances(governor.name)
            ],
        )
        connection.execute("COMMIT")
    finally:
        connection.close()
    return path


# Runs the command from a small process: a child forked from this benchmark (which holds
# the ledger in memory) would count this process's pages in its peak RSS until it execs.
_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "seconds = time.perf_counter() - start\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(seconds, peak)\n"
    "print(done.stdout + done.stderr, end='')\n"
)


def run_cli(args: list[str]) -> tuple[float, int, str]:
    """Seconds (wall, process start included), peak resident kB of the command and of the
    workers it starts, and its output."""
    # The script installed beside this interpreter first: a venv run without activating it
    # (`.venv/bin/python benchmarks/runtime.py`) has no `autonomic` on PATH.
    beside = Path(sys.executable).with_name("autonomic")
    command = str(beside) if beside.is_file() else shutil.which("autonomic")
    if command is None:
        sys.exit(
            "benchmarks/runtime.py: the `autonomic` command is not installed (pip install -e .)"
        )
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, command, *args], capture_output=True, text=True
    )
    first, _, out = done.stdout.partition("\n")
    if done.returncode != 0 or len(first.split()) != 2:
        sys.exit(
            f"benchmarks/runtime.py: measuring `autonomic {' '.join(args)}` failed:\n"
            f"{done.stdout}{done.stderr}"
        )
    seconds, peak = first.split()
    return float(seconds), int(peak), out


# ---------------------------------------------------------------------------------------------
# Durable dispatch on SQLite vs raw sqlite3 writing the same rows.


def durable_figures(
    door: ModuleType, profile: Profile, signer: Signer, folder: Path
) -> list[Figure]:
    figures = []
    for key, threads in (
        ("durable_vs_raw_same_rows_1t", 1),
        ("durable_vs_raw_same_rows_8t", DURABLE_THREADS),
    ):
        store_path = folder / f"durable-{threads}.db"
        raw_path = folder / f"raw-{threads}.db"
        runtime = Runtime(SQLiteStore(store_path), sealer=LedgerSealer(signer, "checkpoint"))
        ids = door_ids(threads)
        governor = load_doors(runtime, door.MACHINE, ids)
        raw = RawWriter(raw_path, store_path, ids)
        per_thread = max(4, profile.durable_dispatches // threads // 4 * 4)
        ratios, batches, ours_tps, raw_tps = [], [], [], []
        count = threads * per_thread
        batch = 1 if threads == 1 else threads  # until group commit has shown its batches
        for number in range(profile.rounds):
            raw_seconds = raw.write(count, batch) if number % 2 else 0.0
            before = runtime.commit_batches
            ours_seconds = run_threads(governor, door, ids, per_thread)
            formed = count / (runtime.commit_batches - before)
            batch = max(1, round(formed))
            if not number % 2:
                raw_seconds = raw.write(count, batch)
            batches.append(formed)
            ratios.append(raw_seconds / ours_seconds)
            ours_tps.append(count / ours_seconds)
            raw_tps.append(count / raw_seconds)
        runtime.close()
        raw.close()
        figures.append(
            Figure(
                key,
                ratios,
                0.5,
                "x",
                {
                    "threads": threads,
                    "durable_tps": round(statistics.median(ours_tps)),
                    "raw_rows_tps": round(statistics.median(raw_tps)),
                    "batch": round(statistics.median(batches), 2),
                    "dispatches_per_round": threads * per_thread,
                    "statements_first_and_next_dispatch": statements_per_dispatch(
                        store_path, door, signer
                    ),
                    "synchronous": "FULL",
                },
            )
        )
    return figures


def run_threads(governor: Governor, door: ModuleType, ids: Sequence[str], per_thread: int) -> float:
    events = [door.Event(e) for e in CYCLE]
    barrier = threading.Barrier(len(ids) + 1)

    def worker(instance_id: str) -> None:
        barrier.wait()
        for step in range(per_thread):
            governor.dispatch(instance_id, events[step % len(events)])

    workers = [threading.Thread(target=worker, args=(i,)) for i in ids]
    for thread in workers:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in workers:
        thread.join()
    return time.perf_counter() - start


class RawWriter:
    """Raw sqlite3 on a copy of the runtime's store (same tables and indexes) warmed up by a
    first write: per dispatch the UPDATE of the instance row (conditional on its version, as
    the store writes it) and the INSERT of a ledger row shaped like the runtime's, per commit
    the INSERT of a checkpoint row (the newest one's root, links and signature, copied: the
    baseline signs nothing); WAL, synchronous=FULL."""

    def __init__(self, path: Path, store_path: Path, ids: Sequence[str]) -> None:
        self.connection = raw_copy(store_path, path)
        execute = self.connection.execute
        columns = "seq, ts_ms, kind, machine, instance, from_state, to_state, event, actor, "
        columns += "event_id, payload_sha256, prev_hash, entry_hash, key_id, signature"
        self.like = execute(f"SELECT {columns} FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        self.checkpoint = execute(
            "SELECT ts_ms, key_id, signature, tree_root, prev_checkpoint, frontier "
            "FROM ledger_checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
        self.versions = dict(
            execute("SELECT instance, version FROM instances WHERE machine = 'Door'").fetchall()
        )
        self.ids = list(ids)
        self.seq = int(self.like[0]) + 1
        self.write(4 * len(self.ids), len(self.ids))  # a used file: pages, WAL, caches

    def write(self, count: int, batch: int) -> float:
        like, execute = self.like, self.connection.execute
        rows = []
        for n in range(count):
            seq = self.seq + n
            digest = hashlib.sha256(str(seq).encode()).digest()
            rows.append(
                (seq, *like[1:4], self.ids[n % len(self.ids)], *like[5:12], digest, "", b"")
            )
        versions = self.versions
        checkpoint = self.checkpoint
        start = time.perf_counter()
        for first in range(0, count, batch):
            execute("BEGIN IMMEDIATE")
            for row in rows[first : first + batch]:
                instance = row[4]
                version = versions[instance]
                execute(
                    "UPDATE instances SET state = ?, version = ? "
                    "WHERE machine = ? AND instance = ? AND version = ?",
                    ("Closed", version + 1, "Door", instance, version),
                )
                versions[instance] = version + 1
                execute(INSERT_ENTRY_SQL, row)
            last = rows[min(first + batch, count) - 1]
            execute(INSERT_CHECKPOINT_SQL, (last[0] + 1, last[12], *checkpoint))
            execute("COMMIT")
        seconds = time.perf_counter() - start
        self.seq += count
        return seconds

    def close(self) -> None:
        self.connection.close()


def statements_per_dispatch(path: Path, door: ModuleType, signer: Signer) -> tuple[int, int]:
    """SQL statements the store runs for a dispatch committed alone (sqlite3 trace): the first
    of a runtime just opened on the store (it also reads and checks the ledger's head and
    checkpoint), and the next one."""
    store = SQLiteStore(path)
    runtime = Runtime(store, sealer=LedgerSealer(signer, "checkpoint"))
    governor = runtime.load(door.MACHINE)
    counts = []
    for _ in range(2):
        counted: list[str] = []
        state = governor.get("door-000000")
        assert state is not None
        event = {"Closed": "Open", "Opened": "Close", "Locked": "Unlock"}[state.state]
        store._connection.set_trace_callback(counted.append)
        governor.dispatch("door-000000", event)
        store._connection.set_trace_callback(None)
        counts.append(len(counted))
    runtime.close()
    return counts[0], counts[1]


def group_commit_figure(door: ModuleType, profile: Profile, signer: Signer, folder: Path) -> Figure:
    """256 coroutines each awaiting `dispatch_async` in a loop on one SQLite store (defaults):
    the average number of dispatches per commit."""
    runtime = Runtime(SQLiteStore(folder / "async.db"), sealer=LedgerSealer(signer, "checkpoint"))
    ids = door_ids(ASYNC_DISPATCHERS)
    governor = load_doors(runtime, door.MACHINE, ids)
    events = [door.Event(e) for e in CYCLE]
    sizes, rates = [], []

    async def dispatcher(instance_id: str) -> None:
        for step in range(4 * profile.async_rounds):
            await governor.dispatch_async(instance_id, events[step % len(events)])

    async def all_of_them() -> None:
        await asyncio.gather(*(dispatcher(i) for i in ids))

    for _ in range(profile.rounds):
        before = runtime.commit_batches
        start = time.perf_counter()
        asyncio.run(all_of_them())
        seconds = time.perf_counter() - start
        count = len(ids) * 4 * profile.async_rounds
        sizes.append(count / (runtime.commit_batches - before))
        rates.append(count / seconds)
    runtime.close()
    return Figure(
        "group_commit_batch_256",
        sizes,
        50.0,
        "",
        {"dispatchers": ASYNC_DISPATCHERS, "durable_tps": round(statistics.median(rates))},
    )


# ---------------------------------------------------------------------------------------------
# The same machine in transitions and python-statemachine.


def library_figures(door: ModuleType, profile: Profile) -> list[Figure]:
    """The same machine and events in the `transitions` and `python-statemachine` libraries
    (`Runtime()` defaults on our side)."""
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
            figures.append(Figure(key, [], 10.0, "x", {"missing": True}))
            continue
        governed = event_sequence(ids, cycles, [door.Event(e) for e in CYCLE])
        dispatch = load_doors(Runtime(), spec, ids).dispatch
        chunks = len(governed) // LIBRARY_CHUNK
        measured = paired_rounds(
            driver(dispatch, governed, LIBRARY_CHUNK), library, chunks, profile.rounds
        )
        per = chunks * LIBRARY_CHUNK
        figures.append(
            Figure(
                key,
                [ratio(b, s) for s, b in measured],
                10.0,
                "x",
                {
                    "dispatch_ns": round(statistics.median(s for s, _ in measured) / per * 1e9, 1),
                    "library_ns": round(statistics.median(b for _, b in measured) / per * 1e9, 1),
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


# ---------------------------------------------------------------------------------------------
# Report.


def _number(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.1f}"


def _goal(figure: Figure) -> str:
    if figure.goal is None:
        return ""
    return f">= {_number(figure.goal, figure.unit)}"


def _met(figure: Figure) -> str:
    met = figure.met
    return "" if met is None else ("yes" if met else "NO")


def report(figures: Sequence[Figure], profile_name: str, rounds: int) -> list[str]:
    lines = [
        f"python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, "
        f"profile {profile_name}, medians of {rounds} rounds",
        "",
        "| key | median | range | goal | met? | measured |",
        "|---|---:|---:|---:|:---:|---|",
    ]
    for f in figures:
        value = "n/a" if f.value is None else _number(f.value, f.unit)
        spread = (
            f"{_number(min(f.rounds), f.unit)} - {_number(max(f.rounds), f.unit)}"
            if f.rounds
            else ""
        )
        detail = ", ".join(f"{name} {value}" for name, value in f.detail.items())
        lines.append(f"| {f.key} | {value} | {spread} | {_goal(f)} | {_met(f)} | {detail} |")
    return lines


GROUPS = (
    "bare",
    "governor",
    "reject",
    "libraries",
    "signed",
    "checkpoint",
    "verify",
    "durable",
    "async",
)


def run(profile: Profile, only: set[str] | None) -> list[Figure]:
    figures: list[Figure] = []

    def wanted(group: str) -> bool:
        return only is None or group in only

    def step(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="autonomic-bench-") as tmp:
        folder = Path(tmp)
        door = compile_door(folder)
        signer = new_signer(folder)
        if wanted("bare"):
            step("bare dispatch vs hand-written dicts")
            figures += bare_figures(door, profile)
        if wanted("governor"):
            step("the Entitlement governor vs the same work by hand")
            figures.append(governor_figure(profile))
        if wanted("reject"):
            step("rejections")
            figures.append(reject_figure(door, profile))
        if wanted("signed"):
            step("sign-each dispatch vs raw Ed25519 signing")
            figures.append(signed_figure(door, profile, signer))
        if wanted("checkpoint"):
            step("checkpoint-mode dispatch at the defaults")
            figures.append(checkpoint_figure(door, profile, signer))
        if wanted("verify"):
            step("autonomic audit verify on a SQLite store")
            figures.append(verify_figure(door, profile, signer, folder))
        if wanted("durable"):
            step("durable SQLite dispatch vs raw sqlite3, same rows")
            figures += durable_figures(door, profile, signer, folder)
        if wanted("async"):
            step("256 asyncio dispatchers: group commit batches")
            figures.append(group_commit_figure(door, profile, signer, folder))
        if wanted("libraries"):
            step("dispatch vs transitions and python-statemachine")
            figures += library_figures(door, profile)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about two minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run only these groups")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    started = time.perf_counter()
    figures = run(profile, set(args.only) if args.only else None)
    elapsed = time.perf_counter() - started
    for line in report(figures, "quick" if args.quick else "default", profile.rounds):
        print(line)
    print(f"\n{elapsed:.1f} s")
    if args.json:
        summary: dict[str, Any] = {figure.key: figure.value for figure in figures}
        summary["ranges"] = {f.key: [min(f.rounds), max(f.rounds)] for f in figures if f.rounds}
        summary["goals"] = {f.key: f.goal for f in figures if f.goal is not None}
        summary["details"] = {f.key: f.detail for f in figures}
        summary["profile"] = "quick" if args.quick else "default"
        summary["rounds"] = profile.rounds
        summary["seconds"] = round(elapsed, 1)
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
