"""`autonomic demo`: the generated Entitlement and Billing governors on SQLite with a signed ledger.

The scenario, under a virtual clock (72 hours pass in milliseconds):
1. an entitlement waits for approval: the 24h and 48h escalation steps notify the manager and
   director queues, the 72h end auto-approves it;
2. a charge with an idempotency key is delivered three times (a webhook retry): it is charged
   once, and reusing the key for another amount is refused;
3. the charge keeps failing: the retry ladder tries again after 1h, 3h, 1d and 7d, then gives
   up, which emits Entitlement.Suspend; delivering the outbox suspends the entitlement;
4. an event the suspended entitlement does not accept is rejected and recorded as such;
then it closes the store (signing the last checkpoint) and verifies the whole ledger offline
with the public key. Exit 0 only if verification passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from .errors import IdempotencyConflict, InvalidTransition, RuntimeFailure
from .interpreter import DispatchResult, Governor, Runtime, TransitionContext
from .keys import Keyring, generate_keypair, load_signer
from .ledger import LedgerSealer, verify_ledger
from .simulate import ScriptError, load_machine
from .store.sqlite import SQLiteStore
from .tables import MachineSpec
from .timers import VirtualClock, format_duration

__all__ = ["run_demo"]

APPROVERS = frozenset({"vendor-admin"})


class _Narrator:
    def __init__(self, out: IO[str], clock: VirtualClock) -> None:
        self.out = out
        self.clock = clock
        self.start = clock.now_ms()

    def say(self, text: str, indent: int = 0) -> None:
        when = f"T+{format_duration(self.clock.now_ms() - self.start):<7}"
        self.out.write(f"{when} {'  ' * indent}{text}\n")

    def result(self, result: DispatchResult, what: str, indent: int = 1) -> None:
        seq = "" if result.seq is None else f" [ledger #{result.seq}]"
        dup = " (duplicate: stored result returned, nothing run)" if result.duplicate else ""
        self.say(
            f"{what}: {result.machine} {result.from_state or '(new)'} -> {result.to_state}"
            f"{seq}{dup}",
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


def _bindings(
    spec: MachineSpec, guards: Mapping[str, Callable[..., bool]], actions: Mapping[str, Any]
) -> tuple[dict[str, Callable[..., bool]], dict[str, Callable[..., object]]]:
    """Every guard and action the machine names: the demo's own, the rest hold / do nothing."""

    def holds(ctx: TransitionContext) -> bool:
        return True

    def noop(ctx: TransitionContext) -> None:
        return None

    bound_guards = {name: guards.get(name, holds) for name in spec.guards}
    bound_actions = {name: actions.get(name, noop) for name in spec.actions}
    return bound_guards, bound_actions


def _load(generated: str | None, module: str) -> MachineSpec:
    target = module if generated is None else str(Path(generated) / f"{module}.py")
    return load_machine(target)


def _run_number(runtime: Runtime) -> int:
    taken = {r.instance for r in runtime.store.instances("Entitlement")}
    number = 1
    while f"acme-{number}" in taken:
        number += 1
    return number


def _scenario(
    runtime: Runtime, entitlement: Governor, billing: Governor, payments: _Payments, say: _Narrator
) -> None:
    clock = say.clock
    customer = f"acme-{_run_number(runtime)}"
    say.say(f"customer {customer}")

    say.say("1. entitlement approval escalation ladder")
    say.result(entitlement.create(customer, "marketplace"), "create")
    for hours in (24, 24, 24):
        clock.advance(hours * 3_600_000)
        say.say(f"{hours}h pass")
        for firing in runtime.fire_due():
            say.result(firing.result, f"{firing.kind} {firing.timer.timer_id}")

    say.say("2. a charge with an idempotency key, delivered three times")
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

    say.say("3. the payment keeps failing: the retry ladder")
    failure = {"customer_id": customer, "idempotency_key": key, "reason": "card_declined"}
    for wait in ("1h", "3h", "1d", "7d"):
        say.result(
            billing.dispatch(customer, "PaymentFailed", failure, "processor"), "PaymentFailed"
        )
        clock.advance(wait)
        say.say(f"{wait} pass")
        for firing in runtime.fire_due():
            say.result(firing.result, f"retry {firing.timer.timer_id}")
    say.result(billing.dispatch(customer, "PaymentFailed", failure, "processor"), "PaymentFailed")
    for delivery in runtime.deliver_outbox():
        message = delivery.message
        target = f"{message.target_machine}.{message.event}"
        if delivery.result is not None:
            say.result(delivery.result, f"outbox {target} delivered")
        else:
            say.say(f"outbox {target}: {delivery.status} ({delivery.error})", 1)

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


def run_demo(
    db: Path, keys: Path, out: IO[str], err: IO[str], *, generated: str | None = None
) -> int:
    """Run the scenario; 0 only if the ledger verifies afterwards."""
    try:
        ent_spec = _load(generated, "entitlement")
        bil_spec = _load(generated, "billing")
    except ScriptError as problem:
        err.write(problem.render() + "\n")
        return 1
    where = keys
    try:
        if not any(keys.glob("*.private.pem")):
            info = generate_keypair(keys)
            out.write(f"generated signing key {info.key_id} in {keys}\n")
        signer = load_signer(keys)
        where = db
        db.parent.mkdir(parents=True, exist_ok=True)
        clock = VirtualClock()
        runtime = Runtime(SQLiteStore(db), clock=clock, sealer=LedgerSealer(signer, "checkpoint"))
    except RuntimeFailure as failure:
        err.write(f"{where}:1:1: {failure.code} [error] {failure.message}\n")
        if failure.hint:
            err.write(f"  = hint: {failure.hint}\n")
        return 1
    payments = _Payments()

    def approver(ctx: TransitionContext) -> bool:
        return getattr(ctx.payload, "approver", None) in APPROVERS

    entitlement = runtime.load(
        ent_spec, *_bindings(ent_spec, {"is_authorized_approver": approver}, {})
    )
    billing = runtime.load(
        bil_spec,
        *_bindings(
            bil_spec,
            {"amount_matches": payments.amount_matches},
            {"submit_charge": payments.submit_charge, "retry_charge": payments.retry_charge},
        ),
    )
    say = _Narrator(out, clock)
    out.write(f"governors {ent_spec.name} and {bil_spec.name} ({ent_spec.source_path}, ")
    out.write(f"{bil_spec.source_path}, built by autonomic {ent_spec.compiler_version})\n")
    out.write(f"store {db} (SQLite, WAL, synchronous=FULL), ledger signed by key {signer.key_id}\n")
    try:
        _scenario(runtime, entitlement, billing, payments, say)
    except RuntimeFailure as failure:
        err.write(f"{db}:1:1: {failure.code} [error] {failure.message}\n")
        runtime.store.close()
        return 1
    runtime.close()
    report = verify_ledger(db, Keyring.from_files([keys]))
    public = next(keys.glob("*.public.json"))
    out.write(f"verify it yourself: autonomic audit verify {db} --public-key {public}\n")
    if not report.ok:
        out.write(f"ledger verification FAILED at seq {report.index}: {report.reason}\n")
        return 1
    out.write(f"{report.checkpoints} signed checkpoints; ledger verified: {report.count} entries\n")
    return 0
