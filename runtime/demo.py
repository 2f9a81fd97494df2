"""`autonomic demo`: the seed's flows and patterns on the seven generated governors, on SQLite
with a signed ledger, then verified.

Under a virtual clock (days pass in milliseconds), for a new customer each run, each scenario
named in the trace: signup (the parallel flow, asyncio); escalation (the entitlement approval
ladder, its notices' `within` deadlines tracked: the manager's missed, escalated and re-armed,
then met by the auto-approval); idempotency (the trial's charge, whose outbox delivery carries
the invoice's idempotency key, repeated by the processor's webhook: charged once, another
amount refused); payment outcomes (the conditional flow: Success waits for Subscription's
renewal through the outbox; Disputed freezes another customer's charge awaiting payment and
opens Compliance's investigation; Failed starts the grace period and waits, durably, while
Billing's retry ladder runs out, then a late payment reinstates); upgrade (the sequence flow);
noisy neighbour (the fanout flow, quorum 2); the cancellation saga with a failure at its
irreversible last step, compensated in reverse order; refund (the saga again: the refund paid
out, the subscription archived); a rejected event; breaker (the processor down: the backup
charges, the breaker opens after more than 10 failures and closes after a probe, each move in
the ledger); bulkhead (Billing's `bulkhead 4 per tenant` through the runtime: one tenant's hung
charges hold 4 action threads, the rest refused at once, the other tenants charged meanwhile).
Then it closes the store and verifies the whole ledger offline with the public key. Every entry
is signed unless --checkpoint asks for signed checkpoints. Exit 0 only if verification passes.

All seven governors are loaded with bindings: actions record their calls (a few stand for a
payment processor), guards have fixed, sensible outcomes. The store is only ever opened if it
is new, empty, or an autonomic store whose ledger verifies with the given keys; any other file
is left byte for byte as it was. A second run on the same store adds the next customer, with
the clock starting after the last recorded entry so the ledger stays in time order; each run
settles what it starts (the breaker's and bulkhead's shop accounts close), so nothing of an
earlier customer runs on in the next run's trace.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import math
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import IO

from autonomic.diagnostics import render

from .dispatch import Governor
from .errors import (
    IdempotencyConflict,
    InvalidTransition,
    RuntimeFailure,
    StoreConfigError,
    failure_diagnostic,
)
from .flows import FlowResult, FlowRunner, StepContext, StepFailed
from .keys import Signer, generate_keypair, load_signer, load_trusted_root, now_ms
from .ledger import (
    LedgerEntry,
    LedgerMode,
    LedgerSealer,
    RootLike,
    VerifyReport,
    format_timestamp,
    verify_ledger,
)
from .notice_deadlines import parse_notice_id
from .resilience import Unavailable
from .resilience.proration import prorate_upgrade
from .results import DispatchResult
from .runtime import Runtime
from .simulate import ScriptError, load_machine
from .store.base import Store
from .store.locate import open_store, redact
from .tables import FlowSpec, MachineSpec, TransitionContext
from .timers import VirtualClock, format_duration

__all__ = ["run_demo"]

# Every governor of the seed, by generated module name; the first two drive the scenario.
MODULES = (
    "entitlement",
    "billing",
    "customer_account",
    "subscription",
    "quota_sla",
    "compliance",
    "product_catalog",
)
APPROVERS = frozenset({"vendor-admin"})
TIERS = ("starter", "professional", "enterprise")
SQLITE_MAGIC = b"SQLite format 3\x00"
STORE_MARKER_TABLE = "runtime_meta"  # every autonomic SQLite store has it
SCENARIO_SPAN_MS = 12 * 86_400_000  # how far one run moves the clock, with a margin
STORE_HINT = "pass a new file, or a store written by `autonomic demo`"
KEYS_HINT = "pass a folder holding one <key_id>.private.pem (or none: one is generated)"


class _Narrator:
    def __init__(self, out: IO[str], clock: VirtualClock, customer: str) -> None:
        self.out = out
        self.clock = clock
        self.start = clock.now_ms()
        self.customer = customer
        self.shown: set[int] = set()  # flow ledger entries already narrated

    def say(self, text: str, indent: int = 0) -> None:
        when = f"T+{format_duration(self.clock.now_ms() - self.start):<7}"
        self.out.write(f"{when} {'  ' * indent}{text}\n")

    def result(self, result: DispatchResult, what: str, indent: int = 1) -> None:
        seq = "" if result.seq is None else f" [ledger #{result.seq}]"
        dup = " (duplicate: stored result returned, nothing run)" if result.duplicate else ""
        ignored = " (ignored in this state: nothing recorded)" if result.ignored else ""
        # Timers of an earlier run's customer fire too: name the instance when it is another.
        who = result.machine
        if result.instance != self.customer:
            who = f"{result.machine} '{result.instance}'"
        self.say(
            f"{what}: {who} {result.from_state or '(new)'} -> {result.to_state}{seq}{dup}{ignored}",
            indent,
        )
        for notice in result.notifications:
            deadline = ""
            if notice.deadline_ms is not None:
                left = notice.deadline_ms - notice.fired_ms
                # A notice sent late keeps its deadline, counted from when it was due.
                deadline = (
                    f", due within {format_duration(left)}"
                    if left > 0
                    else f", its deadline passed {format_duration(-left)} ago (sent late)"
                )
            self.say(
                f"notify {notice.kind} {notice.recipient}: {notice.message}{deadline}", indent + 1
            )
        for emitted in result.emitted:
            self.say(f"emit {emitted.machine}.{emitted.event} -> outbox", indent + 1)


_DECISIONS = frozenset({"DisputeUpheld", "DisputeRejected"})


class _Payments:
    """The demo's stand-in for a payment processor: counts real charge submissions. `store`:
    the runtime's store, whose ledger the dispute guard reads (what Billing itself decided)."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store
        self.submitted: list[str] = []
        self.retries = 0
        self.invoices: dict[str, Decimal] = {}
        self.down = False  # the primary processor unreachable (the breaker scenario)
        self.primary_attempts = 0
        self.backup_charges = 0
        # The customer's last upgrade (proration) charge, once captured: what a
        # CompensationRefund may pay back; a charge declined or voided was never taken.
        self.prorations: dict[str, Decimal] = {}
        # Each account's last proration charge key, and the keys of charges Billing voided: a
        # capture arriving under one of those is paid back.
        self.proration_keys: dict[str, str] = {}
        self.voided: set[tuple[str, str]] = set()
        # The proration charges whose refund was submitted, and those owed after the refund in
        # flight, by account: one refund per charge, paid one at a time.
        self.refunded: set[tuple[str, str]] = set()
        self.owed: dict[str, list[str]] = {}
        # The charges whose refund was paid (or whose money a chargeback gave back): a
        # compensation asking one back again pays nothing.
        self.settled: set[tuple[str, str]] = set()
        # The refund ids paid out, by account: a webhook repeating one is a copy.
        self.paid_refunds: set[tuple[str, str]] = set()

        # Tenants whose charges the processor holds until `answer` is set (the bulkhead).
        self.hung: set[str] = set()
        self.answer = threading.Event()
        self.holding = 0
        self.most_held = 0
        self._lock = threading.Lock()

    def _hang(self, tenant: str) -> None:
        with self._lock:
            self.holding += 1
            self.most_held = max(self.most_held, self.holding)
        try:
            self.answer.wait(60)
        finally:
            with self._lock:
                self.holding -= 1

    def submit_charge(self, ctx: TransitionContext) -> dict[str, str]:
        payload = ctx.payload
        tenant = str(getattr(payload, "customer_id", ""))
        if tenant in self.hung:
            self._hang(tenant)
        if self.down:
            self.primary_attempts += 1
            raise Unavailable("payment processor unreachable")
        key = str(getattr(payload, "idempotency_key", ""))
        self.submitted.append(key)
        self.invoices[ctx.instance] = Decimal(str(getattr(payload, "amount", "0")))
        if ctx.event == "ProcessProrationCharge":
            self.prorations.pop(ctx.instance, None)  # an earlier upgrade's is not this one's
            self.proration_keys[ctx.instance] = key
        return {"submitted": key}

    def charge_backup_processor(self, ctx: TransitionContext) -> dict[str, str]:
        self.backup_charges += 1
        key = str(getattr(ctx.payload, "idempotency_key", ""))
        self.submitted.append(key)
        self.invoices[ctx.instance] = Decimal(str(getattr(ctx.payload, "amount", "0")))
        return {"submitted": key, "processor": "backup"}

    def retry_charge(self, ctx: TransitionContext) -> dict[str, int]:
        self.retries += 1
        return {"attempt": self.retries}

    def record_payment(self, ctx: TransitionContext) -> None:
        if ctx.event == "ProrationPaid":
            self.prorations[ctx.instance] = Decimal(str(getattr(ctx.payload, "amount", "0")))

    def void_proration(self, ctx: TransitionContext) -> None:
        key = self.proration_keys.get(ctx.instance)
        if key is not None:
            self.voided.add((ctx.instance, key))

    def charge_was_voided(self, ctx: TransitionContext) -> bool:
        return (ctx.instance, str(getattr(ctx.payload, "idempotency_key", ""))) in self.voided

    def _charge_to_refund(self, ctx: TransitionContext) -> str | None:
        """The proration charge a refund of `ctx` pays back: a late capture's own key, a
        compensation's charge key (absent: the account's last proration charge)."""
        if ctx.event == "ProrationPaid":
            return str(getattr(ctx.payload, "idempotency_key", ""))
        if ctx.event == "CompensationRefund":
            named = getattr(ctx.payload, "charge_key", None)
            return self.proration_keys.get(ctx.instance) if named is None else str(named)
        return None

    def original_charge_found(self, ctx: TransitionContext) -> bool:
        """A compensation (in Current) asks back a captured charge not paid back yet: a copy
        arriving after that refund was paid pays nothing. Reads `settled`, which only the
        in-transaction actions write: `submit_refund`, an outside call run before the
        transaction decides again, must not change this decision."""
        key = self._charge_to_refund(ctx)
        return ctx.instance in self.prorations and (
            key is None or (ctx.instance, key) not in self.settled
        )

    def another_charge_to_refund(self, ctx: TransitionContext) -> bool:
        """A compensation asks back a captured charge that is neither refunded (or being
        refunded) nor owed already: a copy of the refund in flight is not another."""
        key = self._charge_to_refund(ctx)
        return (
            key is not None
            and key == self.proration_keys.get(ctx.instance)
            and ctx.instance in self.prorations
            and (ctx.instance, key) not in self.refunded
            and key not in self.owed.get(ctx.instance, [])
        )

    def refund_already_recorded(self, ctx: TransitionContext) -> bool:
        """A RefundSucceeded whose refund_id Billing recorded already: a redelivered webhook,
        not the payment of the refund now in flight (or held)."""
        refund_id = str(getattr(ctx.payload, "refund_id", ""))
        return (ctx.instance, refund_id) in self.paid_refunds

    def refund_owed(self, ctx: TransitionContext) -> bool:
        return bool(self.owed.get(ctx.instance))

    def owe_refund(self, ctx: TransitionContext) -> None:
        key = self._charge_to_refund(ctx)
        if key is not None:
            self.owed.setdefault(ctx.instance, []).append(key)

    def submit_refund(self, ctx: TransitionContext) -> None:
        """Records which charge the refund now in flight pays back: the next one owed when a
        refund was just paid, else the event's own. An outside call, made before the
        transaction decides again: it changes nothing a guard of that decision reads."""
        owed = self.owed.get(ctx.instance)
        key = owed[0] if ctx.event == "RefundSucceeded" and owed else self._charge_to_refund(ctx)
        if key is not None:
            self.refunded.add((ctx.instance, key))

    def record_refund(self, ctx: TransitionContext) -> None:
        """A refund was paid: its charge is settled (every charge submitted but the one this
        move submitted next), and the next one owed, if this move submitted it, is no longer
        owed."""
        self.paid_refunds.add((ctx.instance, str(getattr(ctx.payload, "refund_id", ""))))
        owed = self.owed.get(ctx.instance)
        following = owed[0] if owed and (ctx.instance, owed[0]) in self.refunded else None
        self.settled.update(
            charge
            for charge in self.refunded
            if charge[0] == ctx.instance and charge[1] != following
        )
        if owed and following is not None:
            owed.pop(0)

    def cancel_held_refund(self, ctx: TransitionContext) -> None:
        """The chargeback paid the customer back: the held refund's charge is settled."""
        self.settled.update(charge for charge in self.refunded if charge[0] == ctx.instance)

    def defer_charge(self, ctx: TransitionContext) -> None:
        """The invoice waits for the dispute's decision; the ladder's retries charge it."""
        self.invoices[ctx.instance] = Decimal(str(getattr(ctx.payload, "amount", "0")))

    def other_disputes_open(self, ctx: TransitionContext) -> bool:
        """Another chargeback than the one being decided is still open on the account. Counted
        from Billing's own ledger (every chargeback it froze, less every decision it took):
        durable, so a restarted process decides the same, and the same on every process."""
        if self.store is None:
            raise RuntimeError("the dispute guard reads Billing's ledger: give _Payments the store")
        opened = decided = 0
        for entry in self.store.ledger_entries(machine=ctx.machine, instance=ctx.instance):
            if entry.kind != "transition":
                continue
            if entry.event == "PaymentDisputed":
                opened += 1
            elif entry.event in _DECISIONS:
                decided += 1
        return opened - decided > 1

    def amount_matches(self, ctx: TransitionContext) -> bool:
        amount = getattr(ctx.payload, "amount", None)
        return amount is not None and self.invoices.get(ctx.instance) == Decimal(str(amount))


def _tier_rank(ctx: TransitionContext, field: str) -> int:
    tier = getattr(ctx.payload, field, None)
    return TIERS.index(tier) if tier in TIERS else -1


def _fixed(outcome: bool) -> Callable[[TransitionContext], bool]:
    def guard(ctx: TransitionContext) -> bool:
        return outcome

    return guard


def _demo_guards(payments: _Payments) -> dict[str, Callable[[TransitionContext], bool]]:
    """The guards of all seven machines, by name: fixed outcomes that keep the story simple,
    or a look at the payload where the machine's intent is plain."""
    return {
        # Entitlement
        "is_authorized_approver": lambda ctx: getattr(ctx.payload, "approver", None) in APPROVERS,
        "tier_available": _fixed(True),
        "contention_is_severe": _fixed(False),
        # Billing
        "amount_matches": payments.amount_matches,
        "charge_was_voided": payments.charge_was_voided,
        "other_disputes_open": payments.other_disputes_open,
        "another_charge_to_refund": payments.another_charge_to_refund,
        "refund_owed": payments.refund_owed,
        "original_charge_found": payments.original_charge_found,
        "refund_already_recorded": payments.refund_already_recorded,
        "refund_due": _fixed(True),
        "refund_was_issued": _fixed(False),
        "settled_amount_matches": _fixed(True),
        # Subscription
        "is_higher_tier": lambda ctx: _tier_rank(ctx, "new_tier") > _tier_rank(ctx, "current_tier"),
        "is_lower_tier": lambda ctx: _tier_rank(ctx, "new_tier") < _tier_rank(ctx, "current_tier"),
        # CustomerAccount
        "has_open_subscriptions": _fixed(True),
        "identity_fields_changed": lambda ctx: bool(
            getattr(ctx.payload, "legal_name_changed", False)
        ),
        "is_last_open_subscription": _fixed(True),
        # QuotaSla
        "capacity_available": _fixed(True),
        # Compliance
        "customer_prevailed": lambda ctx: getattr(ctx.payload, "outcome", None) == "customer",
        "is_retryable": lambda ctx: bool(getattr(ctx.payload, "retryable", False)),
        # ProductCatalog
        "is_current_version": _fixed(True),
        "is_increase_on_current_version": _fixed(True),
    }


class _Bindings:
    """Every guard and action a machine names: the demo's guards (a guard it does not know
    holds), the payment actions, and every other action recorded by name."""

    def __init__(self, payments: _Payments) -> None:
        self.payments = payments
        self.guards = _demo_guards(payments)
        self.calls: Counter[str] = Counter()

    def _recorder(self, machine: str, action: str) -> Callable[[TransitionContext], None]:
        def record(ctx: TransitionContext) -> None:
            self.calls[f"{machine}.{action}"] += 1

        return record

    def _counted(
        self, machine: str, action: str, run: Callable[[TransitionContext], object]
    ) -> Callable[[TransitionContext], object]:
        def record(ctx: TransitionContext) -> object:
            self.calls[f"{machine}.{action}"] += 1
            return run(ctx)

        return record

    def of(
        self, spec: MachineSpec
    ) -> tuple[dict[str, Callable[..., bool]], dict[str, Callable[..., object]]]:
        actions: Mapping[str, Callable[[TransitionContext], object]] = {}
        if spec.name == "Billing":
            actions = {
                "submit_charge": self.payments.submit_charge,
                "retry_charge": self.payments.retry_charge,
                "charge_backup_processor": self.payments.charge_backup_processor,
                "record_payment": self.payments.record_payment,
                "void_proration": self.payments.void_proration,
                "defer_charge": self.payments.defer_charge,
                "owe_refund": self.payments.owe_refund,
                "submit_refund": self.payments.submit_refund,
                "record_refund": self.payments.record_refund,
                "cancel_held_refund": self.payments.cancel_held_refund,
            }
        guards = {name: self.guards.get(name, _fixed(True)) for name in spec.guards}
        bound: dict[str, Callable[..., object]] = {}
        for name in spec.actions:
            run = actions.get(name)
            bound[name] = (
                self._recorder(spec.name, name)
                if run is None
                else self._counted(spec.name, name, run)
            )
        return guards, bound


# ---------------------------------------------------------------------------------------------
# Inputs: the generated modules, the store file and the signing key, all checked before
# anything is written.


def _load_specs(generated: str | None) -> dict[str, MachineSpec]:
    """All seven specs from one place: DIR, else ./generated if it holds entitlement.py, else
    the installed autonomic.generated package."""
    folder = generated
    if folder is None and (Path("generated") / f"{MODULES[0]}.py").is_file():
        folder = "generated"
    if folder is not None and not Path(folder).is_dir():
        raise ScriptError(
            folder,
            1,
            1,
            "S010",
            "is not a folder of generated modules",
            "pass --generated the folder `autonomic build` wrote (default: generated)",
        )
    specs: dict[str, MachineSpec] = {}
    for module in MODULES:
        target = module if folder is None else str(Path(folder) / f"{module}.py")
        if folder is not None and not Path(target).is_file():
            raise ScriptError(
                target,
                1,
                1,
                "S010",
                "no such generated module file: the demo runs all seven governors",
                f"run `autonomic build --out {folder}` on the seven machines of the seed",
            )
        spec = load_machine(target)
        specs[spec.name] = spec
    return specs


class _Refused(Exception):
    """An input the demo will not use; the diagnostic is ready to print."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _refuse(where: Path, message: str, hint: str) -> _Refused:
    return _Refused(render(where, StoreConfigError.code, message, hint))


def _check_store_file(db: Path) -> int | None:
    """The time of the last ledger entry in `db` (None: no entries yet); raise _Refused for a
    file that is not ours to write (it is only read, read-only, to decide)."""
    if db.is_dir():
        raise _refuse(db, "is a directory", STORE_HINT)
    if db.parent.exists() and not db.parent.is_dir():
        raise _refuse(db, f"{db.parent} is not a directory", STORE_HINT)
    if not db.exists():
        return None
    if not db.is_file():  # a device or a pipe: SQLite would put its -wal file beside it
        raise _refuse(db, "is not a regular file", STORE_HINT)
    try:
        with db.open("rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise _refuse(db, f"cannot be read: {exc.strerror or exc}", STORE_HINT) from None
    if not head:
        return None
    if head != SQLITE_MAGIC:
        raise _refuse(db, "is not an SQLite database; it was left untouched", STORE_HINT)
    try:
        reader = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in reader.execute("SELECT name FROM sqlite_master")}
            last_ts = (
                reader.execute("SELECT max(ts_ms) FROM ledger").fetchone()[0]
                if STORE_MARKER_TABLE in tables and "ledger" in tables
                else None
            )
        finally:
            reader.close()
    except sqlite3.Error as exc:
        message = f"cannot be read as SQLite: {exc}; it was left untouched"
        raise _refuse(db, message, STORE_HINT) from None
    if tables and STORE_MARKER_TABLE not in tables:
        shown = ", ".join(sorted(tables)[:5])
        raise _refuse(
            db,
            f"is an SQLite database of something else (tables: {shown}); it was left untouched",
            STORE_HINT,
        )
    return last_ts if isinstance(last_ts, int) else None


def _holds_private_key(keys: Path) -> bool:
    return keys.is_file() or (keys.is_dir() and any(keys.glob("*.private.pem")))


def _signer(keys: Path, out: IO[str]) -> Signer:
    """The key in `keys` (a folder holding one private key, or the .private.pem itself); a
    new key pair is generated into a folder that holds none."""
    if not _holds_private_key(keys):
        info = generate_keypair(keys)
        out.write(f"generated signing key {info.key_id} in {keys}\n")
    return load_signer(keys)


def _keyring(keys: Path) -> str:
    """The pinned root of trust (its fingerprint): the demo's own key, which its ledger's
    genesis entry names, or the root `keygen --retire` recorded beside a key it introduced
    (keys rotated since are introduced by the ledger's rotation entries). The runtime pins it
    too: it never follows a chain of keys from the store's own word."""
    return load_trusted_root(keys)


# ---------------------------------------------------------------------------------------------
# The scenario.


def _run_number(runtime: Runtime) -> int:
    taken = {r.instance for r in runtime.store.instances("Entitlement")}
    number = 1
    while f"acme-{number}" in taken:
        number += 1
    return number


# How the narration names a timer firing, by the timer's kind in the generated tables.
TIMER_LABELS = {
    "retry_step": "retry",
    "escalation_step": "escalation",
    "escalation_end": "escalation",
    "timeout": "timeout",
}


def _fire(runtime: Runtime, say: _Narrator) -> None:
    """The due work, in the order it was done: the firings and, among them, the notices'
    missed deadlines (runtime/notice_deadlines.py)."""
    before = max((e.seq for e in runtime.store.ledger_entries()), default=-1)
    done: list[tuple[float, Callable[[], None]]] = []
    for firing in runtime.fire_due():
        timer = firing.timer
        spec = runtime.governor(timer.machine).spec
        kinds = {t.id: t.kind for t in spec.timers.get(timer.state, ())}
        label = TIMER_LABELS.get(kinds.get(timer.timer_id, ""), firing.kind)
        seq = math.inf if firing.result.seq is None else firing.result.seq
        done.append(
            (seq, functools.partial(say.result, firing.result, f"{label} {timer.timer_id}"))
        )
    done.extend(_missed_deadlines(runtime, say, before))
    for _, show in sorted(done, key=lambda item: item[0]):
        show()


def _missed_deadlines(
    runtime: Runtime, say: _Narrator, before: int
) -> list[tuple[float, Callable[[], None]]]:
    """The notices' deadlines missed since ledger entry `before`: one line per notice, where
    its first miss stands (a week's jump misses an hourly re-escalation seven times over)."""
    missed: dict[str, list[LedgerEntry]] = {}
    for entry in runtime.store.ledger_entries(after_seq=before):
        if entry.kind == "escalation" and entry.event == "DeadlineMissed":
            missed.setdefault(entry.instance, []).append(entry)
    return [
        (entries[0].seq, functools.partial(_missed_deadline, runtime, say, entries))
        for entries in missed.values()
    ]


def _missed_deadline(runtime: Runtime, say: _Narrator, entries: list[LedgerEntry]) -> None:
    """One notice's missed deadline: its ledger entries, and when it falls due again (or that
    the instance has moved on since, which met what is left of it)."""
    entry = entries[-1]
    deadline_id = entry.instance.removeprefix("deadline:")
    notice = parse_notice_id(deadline_id)
    if notice is None:
        return
    machine, timer_id, instance = notice
    who = machine if instance == say.customer else f"{machine} '{instance}'"
    spec = runtime.governor(machine).spec
    notify = next(
        (t.notify for ts in spec.timers.values() for t in ts if t.id == timer_id and t.notify),
        None,
    )
    what = repr(timer_id)
    if notify is not None:
        what = f"{(notify.message or timer_id)!r} (notify {notify.kind} {notify.recipient})"
    level = int(entry.to_state.removeprefix("level"))
    stored = next((d for d in runtime.store.deadlines() if d.id == deadline_id), None)
    if stored is not None and stored.level == level:
        after = f"due again in {format_duration(stored.due_ms - say.clock.now_ms())}"
    else:
        after = "then the instance moved on"
    levels, seqs = f"level {level}", f"#{entry.seq}"
    if len(entries) > 1:
        first = int(entries[0].to_state.removeprefix("level"))
        levels = f"levels {first}-{level}"
        seqs = f"#{entries[0].seq}..#{entry.seq}, {len(entries)} entries"
    say.say(f"deadline missed: {who} {what}: escalated to {levels}, {after} [ledger {seqs}]", 1)


def _deliver(runtime: Runtime, say: _Narrator) -> None:
    """Deliver the outbox, in the order it was done: a delivery whose move meets a notice's
    deadline that fell due before it escalates that miss first (runtime/notice_deadlines.py)."""
    # A delivered event may emit further events: deliver until the outbox holds none.
    for _ in range(10):
        before = max((e.seq for e in runtime.store.ledger_entries()), default=-1)
        deliveries = runtime.deliver_outbox()
        if not any(d.status != "skipped" for d in deliveries):
            return
        done: list[tuple[float, Callable[[], None]]] = []
        seq: float = before  # a delivery without an entry stays where it was
        for delivery in deliveries:
            message = delivery.message
            target = f"{message.target_machine}.{message.event}"
            if delivery.result is not None:
                if delivery.result.seq is not None:
                    seq = delivery.result.seq
                show: Callable[[], None] = functools.partial(
                    say.result, delivery.result, f"outbox {target} delivered"
                )
            else:
                line = f"outbox {target}: {delivery.status} ({delivery.error})"
                show = functools.partial(say.say, line, 1)
            done.append((seq, show))
        done.extend(_missed_deadlines(runtime, say, before))
        for _, shown in sorted(done, key=lambda item: item[0]):
            shown()


FLOW_MODULES = (
    "flow_customer_signup",
    "flow_subscription_upgrade",
    "flow_payment_processed",
    "flow_noisy_neighbour",
    "flow_subscription_cancellation",
)


def _load_flows(generated: str | None) -> list[FlowSpec]:
    """The five flows from the folder the machines came from (or the installed package)."""
    folder = generated
    if folder is None and (Path("generated") / f"{FLOW_MODULES[0]}.py").is_file():
        folder = "generated"
    flows: list[FlowSpec] = []
    for name in FLOW_MODULES:
        if folder is None:
            module = importlib.import_module(f"autonomic.generated.{name}")
        else:
            path = Path(folder) / f"{name}.py"
            if not path.is_file():
                raise ScriptError(
                    str(path),
                    1,
                    1,
                    "S010",
                    "no such generated flow module: the demo runs the seed's five flows",
                    f"run `autonomic build --out {folder}` on machines/ (flows.fsm included)",
                )
            loader = importlib.util.spec_from_file_location(f"_demo_{name}", path)
            assert loader is not None and loader.loader is not None
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        flows.append(module.FLOW)
    return flows


def refund_due(values: Mapping[str, object]) -> str:
    """The cancellation saga's pure step: the unused half of a 99.00 period, to the cent."""
    return str((Decimal("99.00") / 2).quantize(Decimal("0.01")))


class _Injected:
    """Fails one step of one flow run, on purpose: the demo's saga failure."""

    def __init__(self) -> None:
        self.target: tuple[str, str] | None = None

    def __call__(self, ctx: StepContext) -> None:
        if self.target == (ctx.flow_id, ctx.step) and ctx.phase == "do":
            raise StepFailed(f"injected failure: {ctx.step} refused by the archive service")


def _flow(say: _Narrator, result: FlowResult, runtime: Runtime) -> None:
    """A flow run's ledger entries and its outcome."""
    for entry in runtime.store.ledger_entries(machine=result.flow, instance=result.flow_id):
        if entry.seq in say.shown:
            continue
        say.shown.add(entry.seq)
        step = f" {entry.from_state}" if entry.from_state else ""
        say.say(
            f"flow {result.flow}: {entry.event}{step} -> {entry.to_state} [ledger #{entry.seq}]", 1
        )
    extra = f" ({result.failed_step}: {result.reason})" if result.reason else ""
    if result.gathered is not None:
        extra += " gathered " + ", ".join(f"{k}={v}" for k, v in result.gathered.items())
    say.say(f"flow {result.flow} {result.status}{extra}", 1)


def _states(runtime: Runtime, say: _Narrator, *machines: str) -> None:
    shown = []
    for machine in machines:
        record = runtime.governor(machine).get(say.customer)
        shown.append(f"{machine} {record.state if record else '(none)'}")
    say.say("states: " + ", ".join(shown), 1)


def _scenario(
    runtime: Runtime, runner: FlowRunner, payments: _Payments, injected: _Injected, say: _Narrator
) -> None:
    clock = say.clock
    customer = say.customer
    entitlement = runtime.governor("Entitlement")
    billing = runtime.governor("Billing")
    subscription = runtime.governor("Subscription")
    say.say(f"customer {customer}")

    say.say("== signup (parallel flow, asyncio): profile, trial, quota, identity at once")
    profile = {
        "customer_id": customer,
        "email": f"billing@{customer}.example",
        "country": "DE",
        "product_id": "analytics-pro",
        "tier": "professional",
    }
    _flow(say, asyncio.run(runner.start_async("CustomerSignup", customer, profile)), runtime)

    say.say("== escalation: the entitlement approval ladder, its notices' deadlines tracked")
    say.result(entitlement.create(customer, "marketplace"), "create")
    for hours in (24, 24, 24):
        clock.advance(hours * 3_600_000)
        say.say(f"{hours}h pass")
        _fire(runtime, say)
    mine = "deadline:notice:Entitlement:PendingApproval/ApprovalLadder/"
    missed = sum(
        1
        for e in runtime.store.ledger_entries(machine="Entitlement")
        if e.event == "DeadlineMissed"
        and e.instance.startswith(mine)
        and e.instance.endswith(f":{customer}")
    )
    still = [
        d
        for d in runtime.store.deadlines()
        if (parse_notice_id(d.id) or ("",))[0] == "Entitlement" and d.id.endswith(f":{customer}")
    ]
    say.say(
        f"Entitlement deadlines: {missed} missed and escalated; still open: {len(still)} "
        "(the auto-approval moved the request on)",
        1,
    )
    _deliver(runtime, say)

    say.say("== idempotency: the trial converts; its charge carries an idempotency key")
    say.result(billing.create(customer, "marketplace"), "create")
    convert = {
        "customer_id": customer,
        "payment_method_id": f"pm-{customer}",
        "invoice_id": f"inv-{customer}-1",
        "amount": "99.00",
    }
    say.result(subscription.dispatch(customer, "ConvertTrial", convert, customer), "ConvertTrial")
    _deliver(runtime, say)
    _charge(billing, customer, payments, say)

    say.say("== payment outcomes: Success (conditional flow) goes to Billing, then renewal")
    paid = {
        "customer_id": customer,
        "transaction_id": f"txn-{customer}-1",
        "amount": "99.00",
        "idempotency_key": f"inv-{customer}-1",
    }
    outcome = {**paid, "reason": "captured", "case_id": f"case-{customer}"}
    result = runner.start("PaymentProcessed", customer, {"outcome": "Success", **outcome})
    _flow(say, result, runtime)
    _deliver(runtime, say)
    for result in runner.resume_all():
        _flow(say, result, runtime)

    say.say("== upgrade (sequence flow): proration, order, charge, capture, grant, quota")
    upgrade = {
        "customer_id": customer,
        "current_tier": "professional",
        "new_tier": "enterprise",
        "current_price": "99.00",
        "new_price": "199.00",
        "cycle_day": 12,
        "cycle_length": 30,
        "request_id": f"upgrade-{customer}-1",
    }
    result = runner.start("SubscriptionUpgrade", customer, upgrade)
    _flow(say, result, runtime)  # waits for the capture: nothing is granted unpaid
    net = result.values["calculate_proration"]
    say.say(f"proration computed by the flow: {net} (18 of 30 days, 199.00 less 99.00)", 1)
    proration = {
        "customer_id": customer,
        "transaction_id": f"txn-{customer}-2",
        "amount": net,
        "idempotency_key": f"upgrade-{customer}-1",
        "new_tier": "enterprise",
    }
    say.result(billing.dispatch(customer, "ProrationPaid", proration, "processor"), "ProrationPaid")
    _deliver(runtime, say)
    _flow(say, runner.resume(result.flow_id), runtime)
    _deliver(runtime, say)
    _states(runtime, say, "Subscription", "Billing", "Entitlement", "QuotaSla")

    say.say("== noisy neighbour (fanout flow, quorum 2 within 30s)")
    detected = {
        "tenant_id": customer,
        "noisy_tenant_id": "tenant-noisy",
        "resource": "cpu",
        "severity": "high",
        "incident_id": f"inc-{customer}",
        "detected_at": format_timestamp(clock.now_ms()).replace("Z", "+00:00"),
    }
    _detected(runtime, say, detected)
    neighbour = {
        "customer_id": customer,
        "tenant_id": customer,
        "resource": "cpu",
        "severity": "high",
        "violation_id": f"inc-{customer}",
        "window_start": detected["detected_at"],
    }
    _flow(say, runner.start("NoisyNeighbour", customer, neighbour), runtime)
    _deliver(runtime, say)

    _dispute(runtime, runner, say)

    say.say("== cancellation saga with a failure: archive fails, compensated in reverse order")
    cancel = {"customer_id": customer, "request_id": f"cancel-{customer}-1", "reason": "budget"}
    flow_id = runner.flow_id("SubscriptionCancellation", customer, cancel)
    injected.target = (flow_id, "archive_subscription")
    _flow(say, runner.start("SubscriptionCancellation", customer, cancel), runtime)
    _states(runtime, say, "Subscription", "Billing", "Entitlement")

    say.say("== payment outcomes: Failed: grace period, Billing's retry ladder, a durable wait")
    due = {
        "customer_id": customer,
        "period_end": format_timestamp(clock.now_ms()).replace("Z", "+00:00"),
        "invoice_id": f"inv-{customer}-2",
        "amount": "99.00",
    }
    say.result(subscription.dispatch(customer, "RenewalDue", due, "calendar"), "RenewalDue")
    _deliver(runtime, say)
    failed = {
        "outcome": "Failed",
        **outcome,
        "idempotency_key": f"inv-{customer}-2",
        "reason": "card_declined",
    }
    _flow(say, runner.start("PaymentProcessed", customer, failed), runtime)
    decline = {
        "customer_id": customer,
        "idempotency_key": f"inv-{customer}-2",
        "reason": "declined",
    }
    for wait in ("1h", "3h", "1d", "7d"):
        clock.advance(wait)
        say.say(f"{wait} pass")
        _fire(runtime, say)
        say.result(
            billing.dispatch(customer, "PaymentFailed", decline, "processor"), "PaymentFailed"
        )
        _deliver(runtime, say)
        for result in runner.resume_all():
            if result.finished:  # the ladder gave up: the wait ends there, not after 9d
                _flow(say, result, runtime)
            else:
                say.say(f"flow {result.flow} still {result.status} (its wait is in the store)", 1)
    clock.advance("1d")
    say.say("1d pass")

    say.say("== payment outcomes: a late payment settles the debt and reinstates access")
    late = {**paid, "transaction_id": f"txn-{customer}-3", "idempotency_key": f"inv-{customer}-2"}
    say.result(
        billing.dispatch(customer, "PaymentSucceeded", late, "processor"), "PaymentSucceeded"
    )
    _deliver(runtime, say)
    _states(runtime, say, "Subscription", "Billing", "Entitlement")

    say.say("== refund: the cancellation saga again (a new request): refund paid out, archived")
    cancel = {**cancel, "request_id": f"cancel-{customer}-2"}
    _flow(say, runner.start("SubscriptionCancellation", customer, cancel), runtime)
    # The outbox goes first, as a worker delivers it: Billing closes once the refund is paid.
    _deliver(runtime, say)
    refunded = {"refund_id": f"rf-{customer}", "amount": "49.50"}
    say.result(
        billing.dispatch(customer, "RefundSucceeded", refunded, "processor"), "RefundSucceeded"
    )
    _states(runtime, say, "Subscription", "Billing", "Entitlement", "QuotaSla")

    say.say("== an event the revoked entitlement does not accept")
    try:
        entitlement.dispatch(
            customer,
            "Approve",
            {"approver": "vendor-admin"},
            "vendor-admin",
            record_rejection=True,
        )
    except InvalidTransition as rejected:
        say.say(f"rejected and recorded [ledger #{rejected.ledger_seq}]: {rejected.message}", 1)


def _dispute(runtime: Runtime, runner: FlowRunner, say: _Narrator) -> None:
    """A chargeback on another customer's charge still awaiting payment: Billing freezes it,
    Compliance investigates under a case id of its own (the case keeps the customer's id, and
    its decision, an emit `to customer_id`, reaches the customer's Billing), the customer
    withdraws. The charge is still unpaid: after the decision the retry ladder collects it
    (here the account closes instead)."""
    say.say("== payment outcomes: Disputed: Billing freezes the funds, Compliance investigates")
    buyer = f"{say.customer}-buyer"
    billing = runtime.governor("Billing")
    say.result(billing.create(buyer, "marketplace"), "create")
    charge = {
        "customer_id": buyer,
        "invoice_id": f"inv-{buyer}",
        "amount": "20.00",
        "idempotency_key": f"inv-{buyer}",
    }
    say.result(billing.dispatch(buyer, "ChargeRequested", charge, "calendar"), "ChargeRequested")
    disputed = {
        "outcome": "Disputed",
        "customer_id": buyer,
        "transaction_id": f"txn-{buyer}",
        "amount": "20.00",
        "idempotency_key": f"inv-{buyer}",
        "reason": "chargeback",
        "case_id": f"case-{buyer}",
    }
    _flow(say, runner.start("PaymentProcessed", buyer, disputed), runtime)
    compliance = runtime.governor("Compliance")
    withdrawn = {"note": "the customer withdrew the chargeback"}
    say.result(
        compliance.dispatch(f"case-{buyer}", "DisputeWithdrawn", withdrawn, "bank"),
        "DisputeWithdrawn",
    )
    _deliver(runtime, say)
    closed = {"customer_id": buyer, "reason": "the buyer leaves the marketplace"}
    say.result(billing.dispatch(buyer, "CloseAccount", closed, "marketplace"), "CloseAccount")


def _detected(runtime: Runtime, say: _Narrator, detected: Mapping[str, str]) -> None:
    quota = runtime.governor("QuotaSla")
    result = quota.dispatch(say.customer, "NoisyNeighborDetected", dict(detected), "monitor")
    say.result(result, "NoisyNeighborDetected")


def _breaker(runtime: Runtime, payments: _Payments, say: _Narrator) -> None:
    """The processor goes down: charges fall back to the backup, the breaker opens after more
    than 10 failures and fails fast, then a probe after the cool-down closes it."""
    say.say("== breaker: the card processor goes down")
    billing = runtime.governor("Billing")
    payments.down = True
    seen = {e.seq for e in runtime.store.ledger_entries() if e.kind == "breaker"}
    for index in range(1, 13):
        tenant = f"{say.customer}-shop{index}"
        billing.create(tenant, "marketplace")
        charge = {
            "customer_id": tenant,
            "invoice_id": f"inv-{tenant}",
            "amount": "10.00",
            "idempotency_key": f"inv-{tenant}",
        }
        result = billing.dispatch(tenant, "ChargeRequested", charge, "calendar")
        if index in (1, 12):
            say.result(result, f"ChargeRequested for {tenant} (primary down: backup charged)")
        elif index == 2:
            say.say("... the same for shop2 to shop11, each a failure the breaker counts", 1)
        _breaker_moves(runtime, say, seen)
    say.say(
        f"processor calls: primary {payments.primary_attempts}, backup {payments.backup_charges}", 1
    )
    payments.down = False
    say.clock.advance("30s")
    say.say("30s pass: the processor is back; the next charge probes it")
    tenant = f"{say.customer}-shop13"
    billing.create(tenant, "marketplace")
    charge = {
        "customer_id": tenant,
        "invoice_id": f"inv-{tenant}",
        "amount": "10.00",
        "idempotency_key": f"inv-{tenant}",
    }
    say.result(
        billing.dispatch(tenant, "ChargeRequested", charge, "calendar"),
        f"ChargeRequested for {tenant}",
    )
    _breaker_moves(runtime, say, seen)
    _settle(runtime, [f"{say.customer}-shop{index}" for index in range(1, 14)], say)


def _breaker_moves(runtime: Runtime, say: _Narrator, seen: set[int]) -> None:
    for entry in runtime.store.ledger_entries():
        if entry.kind == "breaker" and entry.seq not in seen:
            seen.add(entry.seq)
            move = f"{entry.event} {entry.from_state} -> {entry.to_state}"
            say.say(f"breaker {entry.instance}: {move} [ledger #{entry.seq}]", 2)


def _bulkhead(runtime: Runtime, payments: _Payments, say: _Narrator) -> None:
    """One tenant's charges hang at the processor: Billing's `bulkhead 4 per tenant` policy
    lets them hold 4 of the runtime's action threads and refuses the rest at once, while the
    other tenants' charges are made meanwhile (dispatch_async); then the processor answers,
    and every charge is captured, so nothing is left for a later run."""
    say.say("== bulkhead: one tenant's charges hang at the processor (bulkhead 4 per tenant)")
    billing = runtime.governor("Billing")
    noisy = f"{say.customer}-noisy"
    accounts = [f"{noisy}-sub{n}" for n in range(1, 9)]
    others = [f"{say.customer}-quiet{n}" for n in range(1, 6)]
    for account in (*accounts, *others):
        billing.create(account, "marketplace")

    def charge(account: str, tenant: str) -> Awaitable[DispatchResult]:
        request = {
            "customer_id": tenant,
            "invoice_id": f"inv-{account}",
            "amount": "10.00",
            "idempotency_key": f"inv-{account}",
        }
        return billing.dispatch_async(account, "ChargeRequested", request, "calendar")

    async def main() -> tuple[list[DispatchResult], int, list[DispatchResult | BaseException]]:
        held = [asyncio.ensure_future(charge(account, noisy)) for account in accounts]
        # Until the tenant's charges are settled in: 4 at the processor, the rest refused.
        while payments.most_held <= 4 and not (
            payments.holding == 4 and sum(task.done() for task in held) == 4
        ):
            await asyncio.sleep(0.001)
        served = await asyncio.gather(*(charge(account, account) for account in others))
        holding = payments.holding
        payments.answer.set()
        return served, holding, await asyncio.gather(*held, return_exceptions=True)

    payments.hung = {noisy}
    try:
        served, holding, answered = asyncio.run(main())
    finally:
        payments.hung = set()
    refused = [r for r in answered if isinstance(r, BaseException)]
    reason = f" ({refused[0]})" if refused else ""
    say.say(
        f"tenant {noisy}: 8 charges for its 8 subscriptions: {holding} held at the processor, "
        f"{len(refused)} refused at once, nothing written{reason}",
        1,
    )
    seqs = [r.seq for r in served if r.seq is not None]
    shown = f" [ledger #{min(seqs)}-#{max(seqs)}]" if seqs else ""
    charged = sum(r.to_state == "AwaitingPayment" for r in served)
    say.say(f"5 other tenants, meanwhile: {charged} of 5 charged{shown}", 1)
    made = [r for r in answered if isinstance(r, DispatchResult)]
    for result in made:
        say.result(result, f"ChargeRequested for {result.instance} (answered)")
    _settle(runtime, [r.instance for r in (*made, *served)], say)


def _settle(runtime: Runtime, accounts: Sequence[str], say: _Narrator) -> None:
    """The demo's shop accounts close before the processor answers (their open invoices are
    voided), so that no ladder of theirs runs on in a later run of the demo on the same
    store. (A payment would emit Subscription.RenewalSucceeded, and shops have none.)"""
    billing = runtime.governor("Billing")
    for account in accounts:
        closing = {"customer_id": account, "reason": "demo shop leaves"}
        billing.dispatch(account, "CloseAccount", closing, "marketplace")
    say.say(
        f"the {len(accounts)} shop accounts close (CloseAccount voids their open invoices): "
        "none of them has a timer left to fire",
        1,
    )


def _charge(billing: Governor, customer: str, payments: _Payments, say: _Narrator) -> None:
    """The processor's webhook repeats the charge request under the invoice's idempotency key,
    which the outbox delivery above already carried: stored results, one charge."""
    charge = {
        "customer_id": customer,
        "invoice_id": f"inv-{customer}-1",
        "amount": "99.00",
        "idempotency_key": f"inv-{customer}-1",
    }
    key = charge["idempotency_key"]
    for attempt in (1, 2):
        result = billing.dispatch(
            customer, "ChargeRequested", charge, "webhook", idempotency_key=key
        )
        say.result(result, f"ChargeRequested webhook {attempt}")
    try:
        billing.dispatch(
            customer,
            "ChargeRequested",
            {**charge, "amount": "199.00"},
            "webhook",
            idempotency_key=key,
        )
    except IdempotencyConflict as conflict:
        say.say(
            f"ChargeRequested webhook 3 (same key, another amount): refused with {conflict.code}, "
            "nothing run: a key stands for one request",
            1,
        )
    say.say(f"charges submitted to the processor: {len(payments.submitted)}", 1)


def _window(signer: Signer) -> str:
    start, end = signer.valid_from_ms, signer.valid_until_ms
    shown_start = "always" if start is None else format_timestamp(start)
    shown_end = "with no end" if end is None else f"until {format_timestamp(end)}"
    return f"valid from {shown_start} {shown_end}"


def _summary(calls: Counter[str]) -> str:
    by_machine: Counter[str] = Counter()
    for name, count in calls.items():
        by_machine[name.split(".", 1)[0]] += count
    shown = ", ".join(f"{machine} {count}" for machine, count in sorted(by_machine.items()))
    return f"recorded action calls: {sum(calls.values())} ({shown or 'none'})"


def _last_postgres_ts(url: str) -> int | None:
    """The newest ledger timestamp of the PostgreSQL store at `url` (None: no entries), read
    without creating anything."""
    from .store.postgres import PostgresStore

    # A new database becomes a store; anything else is refused untouched.
    with PostgresStore(url) as store:
        return store.newest_ts()


def _verify_store(db: Path | str, root: RootLike) -> VerifyReport:
    if isinstance(db, Path):
        return verify_ledger(db, root)
    from .audit_store import verify_url

    return verify_url(db, root)


def run_demo(
    db: Path | str,
    keys: Path,
    out: IO[str],
    err: IO[str],
    *,
    generated: str | None = None,
    mode: LedgerMode = "sign-each",
) -> int:
    """Run the scenarios; 0 only if the ledger verifies afterwards. Every ledger entry is
    signed unless `mode` is "checkpoint" (signed checkpoints over batches of entries)."""
    try:
        specs = _load_specs(generated)
        flows = _load_flows(generated)
    except ScriptError as problem:
        err.write(problem.render() + "\n")
        return 1
    try:
        if isinstance(db, str):  # a postgresql:// URL (runtime/store/postgres.py)
            last_ts = _last_postgres_ts(db)
            db_shown: Path | str = redact(db)
        else:
            last_ts = _check_store_file(db)
            db_shown = db
    except _Refused as refused:
        err.write(refused.text + "\n")
        return 1
    has_data = last_ts is not None
    if has_data and not _holds_private_key(keys):
        err.write(
            render(
                keys,
                "A010",
                f"holds no private key, and {db_shown} already holds a ledger signed by "
                "another key; nothing was written",
                "pass the --keys that wrote this store, or a new --db",
            )
            + "\n"
        )
        return 1
    try:
        signer = _signer(keys, out)
        keyring = _keyring(keys)
    except RuntimeFailure as failure:
        err.write(failure_diagnostic(keys, failure, KEYS_HINT) + "\n")
        return 1
    # After the last recorded entry, so that a second run keeps the ledger in time order.
    start = now_ms() if last_ts is None else max(now_ms(), last_ts + 1)
    if has_data:
        # Nothing is added to a ledger these keys cannot vouch for (another key, tampering).
        try:
            report = _verify_store(db, keyring)
        except RuntimeFailure as failure:
            err.write(failure_diagnostic(db_shown, failure, STORE_HINT) + "\n")
            return 1
        if not report.ok:
            err.write(
                render(
                    db_shown,
                    "A003",
                    f"the store's ledger does not verify with the key in {keys}: "
                    f"seq {report.index}: {report.reason}; nothing was added",
                    "pass the --keys that wrote this store, or a new --db",
                )
                + "\n"
            )
            return 1
    for instant in (start, start + SCENARIO_SPAN_MS):
        if not signer.covers(instant):
            err.write(
                render(
                    keys,
                    "A013",
                    f"key {signer.key_id} is not valid at {format_timestamp(instant)} "
                    f"({_window(signer)}); nothing was written",
                    "pass a key valid from now on, or let the demo generate one in a new folder",
                )
                + "\n"
            )
            return 1
    try:
        if isinstance(db, Path):
            db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = f"cannot create its folder: {exc.strerror}"
        err.write(render(db_shown, "R022", why, STORE_HINT))
        err.write("\n")
        return 1
    try:
        store = open_store(db)
    except RuntimeFailure as failure:
        err.write(failure_diagnostic(db_shown, failure, STORE_HINT) + "\n")
        return 1
    clock = VirtualClock(start)
    payments = _Payments(store)
    bindings = _Bindings(payments)
    injected = _Injected()
    try:
        runtime = Runtime(
            store, clock=clock, sealer=LedgerSealer(signer, mode), trusted_root=keyring
        )
        for spec in specs.values():
            runtime.load(spec, *bindings.of(spec))
        runner = FlowRunner(
            runtime,
            flows,
            functions={"refund_due": refund_due, "prorate_upgrade": prorate_upgrade},
            before_step=injected,
        )
    except RuntimeFailure as failure:
        store.close()
        err.write(failure_diagnostic(db_shown, failure, STORE_HINT) + "\n")
        return 1
    customer = f"acme-{_run_number(runtime)}"
    say = _Narrator(out, clock, customer)
    entitlement = specs["Entitlement"]
    folders = sorted({str(PurePosixPath(spec.source_path).parent) for spec in specs.values()})
    sources = ", ".join(f"{folder}/*.fsm" for folder in folders)
    out.write(f"governors {', '.join(specs)} ({sources}, ")
    out.write(f"built by autonomic {entitlement.compiler_version})\n")
    out.write(f"flows {', '.join(f.name for f in flows)} ({flows[0].source_path})\n")
    signing = "every entry signed" if mode == "sign-each" else "signed checkpoints"
    kind = (
        "SQLite, WAL, synchronous=FULL"
        if isinstance(db, Path)
        else f"PostgreSQL, {runtime.partitions} ledger partitions"
    )
    out.write(f"store {db_shown} ({kind}); ledger: {signing} by key {signer.key_id}\n")
    try:
        _scenario(runtime, runner, payments, injected, say)
        _breaker(runtime, payments, say)
        _bulkhead(runtime, payments, say)
    except RuntimeFailure as failure:
        runtime.close()
        err.write(failure_diagnostic(db_shown, failure, STORE_HINT) + "\n")
        return 1
    runtime.close()
    runner.close()
    out.write(_summary(bindings.calls) + "\n")
    try:
        report = _verify_store(db, keyring)
    except RuntimeFailure as failure:
        err.write(failure_diagnostic(db_shown, failure, STORE_HINT) + "\n")
        return 1
    public = (keys if keys.is_dir() else keys.parent) / f"{signer.key_id}.public.json"
    if public.is_file():
        where = db if isinstance(db, Path) else f"--store '{db_shown}'"
        out.write(f"verify it yourself: autonomic audit verify {where} --public-key {public}\n")
        private = public.with_name(f"{signer.key_id}.private.pem")
        if isinstance(db, Path) and private.is_file():
            out.write(f"  (add --private-key {private} to check every row's seal as well)\n")
    else:
        out.write(f"({public} does not exist: the ledger was verified with the key itself)\n")
    if not report.ok:
        out.write(f"ledger verification FAILED at seq {report.index}: {report.reason}\n")
        return 1
    if mode == "sign-each":
        out.write(f"every entry signed; ledger verified: {report.count} entries\n")
    else:
        out.write(
            f"{report.checkpoints} signed checkpoints; ledger verified: {report.count} entries\n"
        )
    return 0
