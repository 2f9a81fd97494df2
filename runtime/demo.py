"""`autonomic demo`: the seven generated governors on SQLite with a signed ledger, then verified.

The scenario, under a virtual clock (days pass in milliseconds), for a new customer each run:
0. signup: the customer's account starts, and a subscription on trial;
1. an entitlement waits for approval: the 24h and 48h escalation steps notify the manager and
   director queues, the 72h end auto-approves it;
2. the trial converts, so the subscription asks Billing for the period charge; the charge
   arrives with an idempotency key three times (a webhook retry): it is charged once, and
   reusing the key for another amount is refused;
3. the charge keeps failing: the retry ladder tries again after 1h, 3h, 1d and 7d, then gives
   up, which emits Subscription.RenewalFailed and Entitlement.Suspend; the outbox is delivered
   to the governors, each delivery reported as delivered, ignored or refused (and why);
4. an event the suspended entitlement does not accept is rejected and recorded as such;
then it closes the store (signing the last checkpoint) and verifies the whole ledger offline
with the public key. Exit 0 only if verification passes.

All seven governors are loaded with bindings: actions record their calls (two stand for a
payment processor), guards have fixed, sensible outcomes. The store is only ever opened if it
is new, empty, or an autonomic store whose ledger verifies with the given keys; any other file
is left byte for byte as it was. A second run on the same store adds the next customer, with
the clock starting after the last recorded entry so the ledger stays in time order.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
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
from .keys import Keyring, Signer, generate_keypair, load_public_key, load_signer, now_ms
from .ledger import LedgerSealer, format_timestamp, verify_ledger
from .results import DispatchResult
from .runtime import Runtime
from .simulate import ScriptError, load_machine
from .store.sqlite import SQLiteStore
from .tables import MachineSpec, TransitionContext
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
            deadline = (
                ""
                if notice.deadline_ms is None
                else (f", due within {format_duration(notice.deadline_ms - notice.fired_ms)}")
            )
            self.say(
                f"notify {notice.kind} {notice.recipient}: {notice.message}{deadline}", indent + 1
            )
        for emitted in result.emitted:
            self.say(f"emit {emitted.machine}.{emitted.event} -> outbox", indent + 1)


class _Payments:
    """The demo's stand-in for a payment processor: counts real charge submissions."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.retries = 0
        self.invoices: dict[str, Decimal] = {}

    def submit_charge(self, ctx: TransitionContext) -> dict[str, str]:
        payload = ctx.payload
        key = str(getattr(payload, "idempotency_key", ""))
        self.submitted.append(key)
        self.invoices[ctx.instance] = Decimal(str(getattr(payload, "amount", "0")))
        return {"submitted": key}

    def retry_charge(self, ctx: TransitionContext) -> dict[str, int]:
        self.retries += 1
        return {"attempt": self.retries}

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
        "charge_was_voided": _fixed(False),
        "original_charge_found": _fixed(True),
        "refund_due": _fixed(True),
        "refund_was_issued": _fixed(False),
        "settled_amount_matches": _fixed(True),
        # Subscription
        "is_higher_tier": lambda ctx: _tier_rank(ctx, "new_tier") > _tier_rank(ctx, "current_tier"),
        "is_lower_tier": lambda ctx: _tier_rank(ctx, "new_tier") < _tier_rank(ctx, "current_tier"),
        "proration_was_charged": _fixed(False),
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


def _keyring(keys: Path, signer: Signer) -> Keyring:
    """The signer's public key and, for a key folder, every public key beside it (rotation)."""
    keyring = Keyring([signer.public_info()])
    if keys.is_dir():
        for public in sorted(keys.glob("*.public.json")):
            if public.name != f"{signer.key_id}.public.json":
                keyring.add(load_public_key(public))
    return keyring


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
    for firing in runtime.fire_due():
        timer = firing.timer
        spec = runtime.governor(timer.machine).spec
        kinds = {t.id: t.kind for t in spec.timers.get(timer.state, ())}
        label = TIMER_LABELS.get(kinds.get(timer.timer_id, ""), firing.kind)
        say.result(firing.result, f"{label} {timer.timer_id}")


def _deliver(runtime: Runtime, say: _Narrator) -> None:
    # A delivered event may emit further events: deliver until the outbox holds none.
    for _ in range(10):
        deliveries = runtime.deliver_outbox()
        if not any(d.status != "skipped" for d in deliveries):
            return
        for delivery in deliveries:
            message = delivery.message
            target = f"{message.target_machine}.{message.event}"
            if delivery.result is not None:
                say.result(delivery.result, f"outbox {target} delivered")
            else:
                say.say(f"outbox {target}: {delivery.status} ({delivery.error})", 1)


def _scenario(runtime: Runtime, payments: _Payments, say: _Narrator) -> None:
    clock = say.clock
    customer = say.customer
    entitlement = runtime.governor("Entitlement")
    billing = runtime.governor("Billing")
    subscription = runtime.governor("Subscription")
    account = runtime.governor("CustomerAccount")
    say.say(f"customer {customer}")

    say.say("0. signup: the account's profile, then Subscription, QuotaSla and Compliance")
    for name in ("CustomerAccount", "Subscription", "QuotaSla", "Compliance"):
        say.result(runtime.governor(name).create(customer, "signup"), "create")
    profile = {
        "customer_id": customer,
        "email": f"billing@{customer}.example",
        "country": "DE",
        "product_id": "analytics-pro",
        "tier": "professional",
    }
    say.result(account.dispatch(customer, "CreateProfile", profile, "signup"), "CreateProfile")
    signup = (
        ("Subscription", "CreateTrialSubscription", ("customer_id", "product_id", "tier")),
        ("QuotaSla", "AllocateQuota", ("customer_id", "tier")),
        ("Compliance", "VerifyIdentity", ("customer_id",)),
    )
    for machine, event, fields in signup:
        payload = {name: profile[name] for name in fields}
        say.result(runtime.governor(machine).dispatch(customer, event, payload, "signup"), event)
    _deliver(runtime, say)

    say.say("1. entitlement approval escalation ladder")
    say.result(entitlement.create(customer, "marketplace"), "create")
    for hours in (24, 24, 24):
        clock.advance(hours * 3_600_000)
        say.say(f"{hours}h pass")
        _fire(runtime, say)
    _deliver(runtime, say)

    say.say("2. the trial converts: the charge arrives with an idempotency key, three times")
    convert = {
        "customer_id": customer,
        "payment_method_id": f"pm-{customer}",
        "invoice_id": f"inv-{customer}-1",
        "amount": "99.00",
    }
    say.result(subscription.dispatch(customer, "ConvertTrial", convert, customer), "ConvertTrial")
    _charge(billing, customer, payments, say)

    say.say("3. the payment keeps failing: the retry ladder")
    failure = {
        "customer_id": customer,
        "idempotency_key": f"pay-{customer}-1",
        "reason": "card_declined",
    }
    for wait in ("1h", "3h", "1d", "7d"):
        say.result(
            billing.dispatch(customer, "PaymentFailed", failure, "processor"), "PaymentFailed"
        )
        clock.advance(wait)
        say.say(f"{wait} pass")
        _fire(runtime, say)
    say.result(billing.dispatch(customer, "PaymentFailed", failure, "processor"), "PaymentFailed")
    _deliver(runtime, say)

    say.say("4. an event the suspended entitlement does not accept")
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


def _charge(billing: Governor, customer: str, payments: _Payments, say: _Narrator) -> None:
    say.result(billing.create(customer, "marketplace"), "create")
    charge = {
        "customer_id": customer,
        "invoice_id": f"inv-{customer}-1",
        "amount": "99.00",
        "idempotency_key": f"pay-{customer}-1",
    }
    key = charge["idempotency_key"]
    for attempt in (1, 2):
        result = billing.dispatch(
            customer, "ChargeRequested", charge, "webhook", idempotency_key=key
        )
        say.result(result, f"ChargeRequested delivery {attempt}")
    try:
        billing.dispatch(
            customer,
            "ChargeRequested",
            {**charge, "amount": "199.00"},
            "webhook",
            idempotency_key=key,
        )
    except IdempotencyConflict as conflict:
        say.say(f"ChargeRequested delivery 3 (another amount): refused: {conflict.code}", 1)
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


def run_demo(
    db: Path, keys: Path, out: IO[str], err: IO[str], *, generated: str | None = None
) -> int:
    """Run the scenario; 0 only if the ledger verifies afterwards."""
    try:
        specs = _load_specs(generated)
    except ScriptError as problem:
        err.write(problem.render() + "\n")
        return 1
    try:
        last_ts = _check_store_file(db)
    except _Refused as refused:
        err.write(refused.text + "\n")
        return 1
    has_data = last_ts is not None
    if has_data and not _holds_private_key(keys):
        err.write(
            render(
                keys,
                "A010",
                f"holds no private key, and {db} already holds a ledger signed by another key; "
                "nothing was written",
                "pass the --keys that wrote this store, or a new --db",
            )
            + "\n"
        )
        return 1
    try:
        signer = _signer(keys, out)
        keyring = _keyring(keys, signer)
    except RuntimeFailure as failure:
        err.write(failure_diagnostic(keys, failure, KEYS_HINT) + "\n")
        return 1
    # After the last recorded entry, so that a second run keeps the ledger in time order.
    start = now_ms() if last_ts is None else max(now_ms(), last_ts + 1)
    if has_data:
        # Nothing is added to a ledger these keys cannot vouch for (another key, tampering).
        try:
            report = verify_ledger(db, keyring)
        except RuntimeFailure as failure:
            err.write(failure_diagnostic(db, failure, STORE_HINT) + "\n")
            return 1
        if not report.ok:
            err.write(
                render(
                    db,
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
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err.write(render(db, "R022", f"cannot create its folder: {exc.strerror}", STORE_HINT))
        err.write("\n")
        return 1
    try:
        store = SQLiteStore(db)
    except RuntimeFailure as failure:
        err.write(failure_diagnostic(db, failure, STORE_HINT) + "\n")
        return 1
    clock = VirtualClock(start)
    payments = _Payments()
    bindings = _Bindings(payments)
    try:
        runtime = Runtime(store, clock=clock, sealer=LedgerSealer(signer, "checkpoint"))
        for spec in specs.values():
            runtime.load(spec, *bindings.of(spec))
    except RuntimeFailure as failure:
        store.close()
        err.write(failure_diagnostic(db, failure, STORE_HINT) + "\n")
        return 1
    customer = f"acme-{_run_number(runtime)}"
    say = _Narrator(out, clock, customer)
    entitlement, billing = specs["Entitlement"], specs["Billing"]
    out.write(f"governors {entitlement.name} and {billing.name} ({entitlement.source_path}, ")
    out.write(f"{billing.source_path}, built by autonomic {entitlement.compiler_version}), ")
    others = [name for name in specs if name not in (entitlement.name, billing.name)]
    out.write(f"with {', '.join(others)}\n")
    out.write(f"store {db} (SQLite, WAL, synchronous=FULL), ledger signed by key {signer.key_id}\n")
    try:
        _scenario(runtime, payments, say)
    except RuntimeFailure as failure:
        runtime.close()
        err.write(failure_diagnostic(db, failure, STORE_HINT) + "\n")
        return 1
    runtime.close()
    out.write(_summary(bindings.calls) + "\n")
    try:
        report = verify_ledger(db, keyring)
    except RuntimeFailure as failure:
        err.write(failure_diagnostic(db, failure, STORE_HINT) + "\n")
        return 1
    public = (keys if keys.is_dir() else keys.parent) / f"{signer.key_id}.public.json"
    if public.is_file():
        out.write(f"verify it yourself: autonomic audit verify {db} --public-key {public}\n")
    else:
        out.write(f"({public} does not exist: the ledger was verified with the key itself)\n")
    if not report.ok:
        out.write(f"ledger verification FAILED at seq {report.index}: {report.reason}\n")
        return 1
    out.write(f"{report.checkpoints} signed checkpoints; ledger verified: {report.count} entries\n")
    return 0
