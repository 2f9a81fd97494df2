"""Typed runtime failures: each class carries a stable diagnostic code and an optional hint.

Codes A0xx belong to the audit ledger and its keys. A caller that reports a failure to a user
prints it with `failure_diagnostic` (`path:line:col: CODE [error] message` and the hint, in the
format every command shares), never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar

from autonomic.diagnostics import render


class RuntimeFailure(Exception):
    """Base of every failure the runtime reports to its caller."""

    code: ClassVar[str] = "R000"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def failure_diagnostic(where: str | os.PathLike[str], failure: RuntimeFailure, hint: str) -> str:
    """A runtime failure about the file `where`; `hint` serves when the failure has none."""
    return render(where, failure.code, failure.message, failure.hint or hint)


class LedgerReadError(RuntimeFailure):
    """The ledger file cannot be opened or read (missing, a directory, no permission)."""

    code = "A001"


class LedgerFormatError(RuntimeFailure):
    """The file is neither an autonomic SQLite ledger nor a JSON Lines ledger export."""

    code = "A002"


class LedgerVerificationError(RuntimeFailure):
    """A ledger failed verification; the message names the first bad sequence index."""

    code = "A003"


class LedgerWriteError(RuntimeFailure):
    """An export or checkpoint file cannot be written."""

    code = "A004"


class InstanceNotInLedger(RuntimeFailure):
    """`audit show` found no entry for the requested instance."""

    code = "A005"


class FlowRunContradicted(RuntimeFailure):
    """`audit verify`: a flow run's row in the store contradicts the run's verified ledger
    entries (runtime/flow_audit.py)."""

    code = "A006"


class KeyFileError(RuntimeFailure):
    """A key file cannot be read, or does not hold the kind of Ed25519 key expected."""

    code = "A010"


class KeyExistsError(RuntimeFailure):
    """Key generation would overwrite an existing key file."""

    code = "A011"


class KeyPermissionError(RuntimeFailure):
    """A private key file is readable or writable by other users."""

    code = "A012"


class KeyWindowError(RuntimeFailure):
    """A key is used to sign outside its validity window, or a window is inconsistent."""

    code = "A013"


class CheckpointFileError(RuntimeFailure):
    """A checkpoint file cannot be read or is not a valid checkpoint."""

    code = "A020"


class WitnessError(RuntimeFailure):
    """A witness refused a checkpoint or could not be reached (runtime/witness.py)."""

    code = "A040"


class PayloadEncodingError(RuntimeFailure):
    """A payload holds a value that RFC 8785 canonical JSON cannot represent."""

    code = "A030"


class EntryEncodingError(RuntimeFailure):
    """A ledger entry field cannot be encoded (not UTF-8 encodable, out of range)."""

    code = "A031"


# ---------------------------------------------------------------------------------------------
# Dispatch, bindings, storage and simulation (codes R0xx), appended by the runtime core.


class InputRejected(RuntimeFailure):
    """An identifier or payload breaks an input rule (runtime/inputs.py); nothing was stored."""

    code = "R031"


class UnknownMachine(RuntimeFailure):
    """No governor of that machine is loaded in this runtime."""

    code = "R001"

    def __init__(self, machine: str, loaded: tuple[str, ...]) -> None:
        super().__init__(
            f"no governor '{machine}' is loaded",
            hint=f"loaded: {', '.join(loaded) or 'none'}",
        )
        self.machine = machine


class UnknownInstance(RuntimeFailure):
    """An event names an instance that was never created."""

    code = "R002"

    def __init__(self, machine: str, instance: str) -> None:
        super().__init__(
            f"{machine} has no instance '{instance}'",
            hint=f"create it first: governor.create({instance!r}, actor)",
        )
        self.machine = machine
        self.instance = instance


class InstanceExists(RuntimeFailure):
    """`create` names an instance that already exists."""

    code = "R003"

    def __init__(self, machine: str, instance: str) -> None:
        super().__init__(f"{machine} instance '{instance}' already exists")
        self.machine = machine
        self.instance = instance


class UnknownEvent(RuntimeFailure):
    """An event name the machine does not declare."""

    code = "R004"

    def __init__(self, machine: str, event: str, hint: str | None) -> None:
        super().__init__(f"{machine} has no event '{event}'", hint=hint)
        self.machine = machine
        self.event = event


class PayloadInvalid(RuntimeFailure):
    """A payload does not match the event's generated model; `problems` name each field."""

    code = "R005"

    def __init__(self, machine: str, event: str, problems: tuple[tuple[str, str], ...]) -> None:
        described = "; ".join(f"field '{name}': {why}" for name, why in problems)
        super().__init__(
            f"invalid payload for {machine}.{event}: {described}",
            hint="nothing was stored; fix the payload and send the event again",
        )
        self.machine = machine
        self.event = event
        self.problems = problems

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.problems)


class InvalidTransition(RuntimeFailure):
    """The machine has no transition for this event in the instance's current state."""

    code = "R006"
    ledger_seq: int | None = None

    def __init__(
        self,
        machine: str,
        instance: str,
        state: str,
        event: str,
        *,
        accepted: tuple[str, ...] = (),
        ledger_seq: int | None = None,
        message: str | None = None,
    ) -> None:
        text = message or f"{machine} in state {state} has no transition on {event}"
        super().__init__(
            f"{text} (instance '{instance}')",
            hint=(
                f"{state} accepts: {', '.join(accepted)}"
                if accepted
                else f"{state} accepts no events"
            ),
        )
        self.machine = machine
        self.instance = instance
        self.state = state
        self.event = event
        self.ledger_seq = ledger_seq

    @property
    def message(self) -> str:
        text = self.__dict__.get("_message")
        if text is None:
            text = (
                f"{self.machine} in state {self.state} has no transition on {self.event} "
                f"(instance '{self.instance}')"
            )
            self._message = text
        return str(text)

    @message.setter
    def message(self, value: str) -> None:
        self._message = value

    def __str__(self) -> str:
        return self.message


class NoGuardHeld(InvalidTransition):
    """Every guarded row for (state, event) returned False and there is no `else` row."""

    code = "R007"

    def __init__(
        self,
        machine: str,
        instance: str,
        state: str,
        event: str,
        guards: tuple[str, ...],
        *,
        ledger_seq: int | None = None,
    ) -> None:
        super().__init__(
            machine,
            instance,
            state,
            event,
            ledger_seq=ledger_seq,
            message=(
                f"{machine} in state {state} rejected {event}: no guard held ({', '.join(guards)})"
            ),
        )
        self.guards = guards


class ActionFailed(RuntimeFailure):
    """A bound action (or guard) raised; the transition was not applied, nothing was stored."""

    code = "R008"

    def __init__(
        self, machine: str, action: str, cause: BaseException, *, role: str = "action"
    ) -> None:
        super().__init__(
            f"{machine} {role} '{action}' failed: {type(cause).__name__}: {cause}",
            hint="nothing was stored; the event can be sent again",
        )
        self.machine = machine
        self.action = action
        self.role = role
        self.cause = cause


class IdempotencyConflict(RuntimeFailure):
    """An idempotency key is reused for a different request (payload, event or instance)."""

    code = "R009"

    def __init__(self, machine: str, key: str) -> None:
        super().__init__(
            f"{machine} idempotency key '{key}' was already used with a different request",
            hint="use a new key for a new request; resend the same payload for the stored result",
        )
        self.machine = machine
        self.key = key


class BindingError(RuntimeFailure):
    """Guards or actions missing, unknown or not callable; `problems` lists every one.

    Each problem is one diagnostic line, `machines/billing.fsm:12:9: R010 guard 'x' has no
    binding`, reported together at load time rather than at the first event.
    """

    code = "R010"

    def __init__(self, machine: str, problems: tuple[str, ...]) -> None:
        super().__init__(
            f"{machine}: {len(problems)} binding problem{'s' if len(problems) != 1 else ''}:\n"
            + "\n".join(problems),
            hint="bind every guard and action the machine names, and nothing else",
        )
        self.machine = machine
        self.problems = problems


class SettingsError(RuntimeFailure):
    """Settings of a machine missing, unknown, malformed or out of their declared bounds;
    `problems` lists every one, as diagnostics at the setting's declaration."""

    code = "R015"

    def __init__(self, machine: str, problems: tuple[str, ...]) -> None:
        super().__init__(
            f"{machine}: {len(problems)} setting problem{'s' if len(problems) != 1 else ''}:\n"
            + "\n".join(problems),
            hint="pass settings={name: duration} with every setting the machine declares",
        )
        self.machine = machine
        self.problems = problems


class ConcurrentUpdateDetected(RuntimeFailure):
    """The instance changed since the caller read it (optimistic concurrency)."""

    code = "R020"

    def __init__(self, machine: str, instance: str, expected: int, actual: int) -> None:
        super().__init__(
            f"{machine} instance '{instance}' is at version {actual}, expected {expected}",
            hint="read the instance again and retry with its current version",
        )
        self.machine = machine
        self.instance = instance
        self.expected = expected
        self.actual = actual


class OutsideCallsSuperseded(ConcurrentUpdateDetected):
    """The instance moved while a dispatch's outside actions (a policy's) ran before its
    transaction, to where the event is decided otherwise: the calls were made once and are
    not made again, nothing of the dispatch is stored, and `results` holds what they
    returned (for the caller to settle or compensate)."""

    code = "R024"

    def __init__(
        self,
        machine: str,
        instance: str,
        expected: int,
        actual: int,
        actions: tuple[str, ...],
        results: Mapping[str, object],
    ) -> None:
        super().__init__(machine, instance, expected, actual)
        self.message = (
            f"{machine} instance '{instance}' moved from version {expected} to {actual} while "
            f"its outside actions ran ({', '.join(actions)}), and the event is now decided "
            "otherwise: their results are not applied, and they are not called again"
        )
        self.hint = (
            "nothing of the dispatch was stored; the outside calls were made once: settle or "
            "compensate them from the error's `results`, or send the event again with the same "
            "idempotency key so the outside service recognises the call"
        )
        self.args = (self.message,)
        self.actions = actions
        self.results = results


class OutsideCallInProgress(RuntimeFailure):
    """Another dispatch (of this or another process on the store) is calling the outside world
    for the same event id or idempotency key right now, and this one does not wait for it (a
    request of `dispatch_many`): nothing was called or stored for it."""

    code = "R025"

    def __init__(self, machine: str, kind: str, key: str) -> None:
        what = "event id" if kind == "event" else "idempotency key"
        super().__init__(
            f"{machine}: another dispatch of {what} '{key}' is calling the outside world now; "
            "this one called nothing",
            hint="send it again: once that dispatch has committed, the repeat returns its "
            "result (or, if it failed, is evaluated anew)",
        )
        self.machine = machine
        self.key = key


class OutsideClaimLost(RuntimeFailure):
    """A dispatch's outside actions ran under its claim on an event id or idempotency key, but
    the claim was taken over before its unit of work committed (its holder could not renew the
    lease in time: the process was stopped, or the store out of reach, for longer than the
    lease), so another dispatch may have made the same calls: this one stores nothing."""

    code = "R026"

    def __init__(
        self, machine: str, kind: str, key: str, lease_ms: int, results: object = None
    ) -> None:
        what = {"event": "event id", "key": "idempotency key"}.get(kind, "timer firing")
        super().__init__(
            f"{machine}: the claim on {what} '{key}' was taken over by another runtime while "
            f"this one called the outside world (its {lease_ms} ms lease ran out unrenewed); "
            "this result is not stored",
            hint="the other runtime's result stands (send the event again to read it). The "
            "outside calls this one made are in the error's `results`: settle or compensate "
            "them. Raise Runtime(claim_lease_ms=...) if a process can stall that long",
        )
        self.machine = machine
        self.key = key
        self.results = results


class StoreIntegrityError(RuntimeFailure):
    """The store returned data that does not verify (a modified head entry, a lost tail)."""

    code = "R021"


class StoreConfigError(RuntimeFailure):
    """The store cannot be used as configured (ledger mode differs, unreadable file)."""

    code = "R022"


class NestedDispatch(RuntimeFailure):
    """A guard or action dispatched (or created, or fired timers) from inside a transition."""

    code = "R023"

    def __init__(self) -> None:
        super().__init__(
            "a guard or action tried to dispatch while its own transition is being applied",
            hint="emit the event from the machine instead (`emit Machine.Event`), or dispatch "
            "after this dispatch returns",
        )
