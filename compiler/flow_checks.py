"""The flow rules: references, acceptance, compensation, completion and parallel writes, one
small function per rule, each reporting every offender (E160-E167, and E141-E143 for
arguments as for emits)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property

from .emit_args import emit_payload_findings
from .errors import Diagnostic, SourceSpan, did_you_mean, fail
from .graph import closure, declared_only, retry_edges, written_moves
from .lower import emit_refs, name_problem
from .model import (
    EmitValue,
    Event,
    EventRef,
    Field,
    Flow,
    FlowStep,
    Machine,
    Name,
    snake_case,
)

__all__ = ["FLOW_RULES", "check_flows", "flow_module"]


def flow_module(flow: Flow) -> str:
    """The generated module (and diagram stem) of a flow: SubscriptionUpgrade ->
    flow_subscription_upgrade, apart from the machines' modules."""
    return "flow_" + snake_case(flow.name.value)


@dataclass
class Receiver:
    """What the rules need to know about one machine a flow or an emit names."""

    machine: Machine
    events: dict[str, Event] = field(default_factory=dict)
    # event -> the states where it moves the machine, and where those moves lead.
    accepting: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    @classmethod
    def of(cls, machine: Machine) -> Receiver:
        receiver = cls(machine, {e.name.value: e for e in machine.events})
        for state in machine.states:
            for t in state.transitions:
                targets = receiver.accepting.setdefault(t.event.value, {})
                targets.setdefault(state.name.value, set()).add(t.target.value)
        for ladder in machine.retries:
            for edge in retry_edges(ladder):
                targets = receiver.accepting.setdefault(ladder.event.value, {})
                targets.setdefault(edge.source.value, set()).add(edge.target.value)
        return receiver

    @cached_property
    def states(self) -> set[str]:
        return {s.name.value for s in self.machine.states}

    @cached_property
    def moves(self) -> dict[str, set[str]]:
        """Every move, timers and ladders included: what time alone can also bring about."""
        moves = declared_only(written_moves(self.machine))
        for targets in self.accepting.values():
            for source, to in targets.items():
                if source in moves:
                    moves[source] |= to & moves.keys()
        return moves


FlowRule = Callable[[Flow, Mapping[str, Receiver]], Iterable[Diagnostic]]


def check_flows(
    flows: Sequence[Flow], machines: Sequence[Machine], *, known: Sequence[Machine] = ()
) -> list[Diagnostic]:
    """Every flow rule over `flows`, and the acceptance rule over the machines' emits."""
    receivers: dict[str, Receiver] = {}
    for machine in [*machines, *known]:
        receivers.setdefault(machine.name.value, Receiver.of(machine))
    found: list[Diagnostic] = []
    found.extend(check_flow_names(flows, machines))
    for flow in flows:
        for rule in FLOW_RULES:
            found.extend(rule(flow, receivers))
        found.extend(_unused_suppressions(flow))
    found.extend(check_emits_accepted(machines, receivers))
    return sorted(found, key=Diagnostic.sort_key)


# ---------------------------------------------------------------- names


def check_flow_names(flows: Sequence[Flow], machines: Sequence[Machine]) -> Iterator[Diagnostic]:
    """E130 for flow and step names unusable in generated code; E131 for two flows (or a
    flow and a machine) with one name or module, and two steps of a flow with one name."""
    taken: dict[str, str] = {m.name.value: "machine" for m in machines}
    modules: dict[str, str] = {snake_case(m.name.value): m.name.value for m in machines}
    for flow in flows:
        name = flow.name.value
        problem = name_problem(name, "machine")
        if problem is not None:
            yield fail("E130", f"flow name '{name}' {problem}", flow.name.span, _NAME_HINT)
        module = flow_module(flow)
        if name in taken or module in modules:
            other = taken.get(name) or f"'{modules[module]}'"
            yield fail(
                "E131",
                f"flow '{name}' collides with {other} of the same name or module",
                flow.name.span,
                "give every flow a name of its own",
            )
        taken.setdefault(name, "a flow")
        modules.setdefault(module, name)
        seen: set[str] = set()
        for step in flow.all_steps():
            step_name = step.name.value
            problem = name_problem(step_name, "field")
            if problem is not None:
                yield fail("E130", f"step name '{step_name}' {problem}", step.name.span, _NAME_HINT)
            if step_name in seen:
                yield fail(
                    "E131",
                    f"flow '{name}' has two steps named '{step_name}'",
                    step.name.span,
                    "step names identify steps in the ledger: make them unique in the flow",
                )
            seen.add(step_name)


_NAME_HINT = "names are ASCII letters, digits and underscores, not Python keywords"


# ---------------------------------------------------------------- the rules


def check_flow_shape(flow: Flow, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    """E165: what the kind asks for: `on` and `when` branches only for conditional flows (one
    per input value), `within` and `quorum` only for fanout, a quorum within the branches,
    compensation only beside a send, never both `compensate` and `irreversible`."""
    kind, name = flow.kind, flow.name.value
    if kind == "conditional":
        if flow.on is None:
            yield _shape(flow.name.span, f"conditional flow '{name}' needs `on field`")
        elif flow.on.value not in {f.name.value for f in flow.inputs}:
            yield _shape(
                flow.on.span,
                f"'{flow.on.value}' is not an input of flow '{name}'",
                "declare it in `input { ... }`, as an enum of the branch names",
            )
        if flow.steps or not flow.branches:
            yield _shape(
                flow.span,
                f"conditional flow '{name}' holds its steps in `when Case {{ ... }}` branches",
            )
        cases = _cases(flow)
        seen: set[str] = set()
        for branch in flow.branches:
            case = branch.case.value
            if case in seen or (cases is not None and case not in cases):
                why = "is written twice" if case in seen else "is not a value of the field"
                yield _shape(
                    branch.case.span, f"branch '{case}' {why}", f"values: {', '.join(cases or [])}"
                )
            seen.add(case)
        if cases is not None and (missing := [c for c in cases if c not in seen]):
            yield _shape(
                flow.span,
                f"conditional flow '{name}' has no branch for {', '.join(missing)}",
                "write `when Case { }` (an empty branch does nothing)",
            )
    else:
        if flow.on is not None:
            yield _shape(flow.on.span, "`on field` belongs to conditional flows")
        if flow.branches:
            yield _shape(flow.branches[0].span, "`when` branches belong to conditional flows")
        if not flow.steps:
            yield _shape(flow.span, f"flow '{name}' has no steps")
    if kind != "fanout":
        for clause in (flow.within, flow.quorum):
            if clause is not None:
                yield _shape(clause.span, "`within` and `quorum` belong to fanout flows")
    elif flow.quorum is not None:
        text = flow.quorum.text
        if not text.isdigit() or not 1 <= int(text) <= max(1, len(flow.steps)):
            yield _shape(
                flow.quorum.span,
                f"quorum {text} is not a count from 1 to the {len(flow.steps)} steps",
                "the quorum is how many replies must succeed",
            )
    deadlines = [flow.within, *(step.within for step in flow.all_steps())]
    for duration in deadlines:
        if duration is not None and duration.millis == 0:
            yield fail(
                "E115",
                f"`within` of zero duration ({duration.text})",
                duration.span,
                "a deadline is a timer and fires after a positive duration",
            )
    for step in flow.all_steps():
        if step.compensate is not None and step.kind != "send":
            yield _shape(step.compensate.span, "only a step that sends can be compensated")
        if step.compensate is not None and step.irreversible:
            yield _shape(
                step.span,
                f"step '{step.name.value}' is both compensated and irreversible",
                "keep one: `compensate Machine.Event` or `irreversible`",
            )
        if step.kind == "await" and kind in ("parallel", "fanout"):
            yield _shape(step.span, "a parallel flow's steps send; await in a sequence")
    for step in never_undone(flow):
        if step.compensate is not None:
            why = (
                "a fanout compensates nothing"
                if kind == "fanout"
                else "the run completes in the commit of its last step, so nothing after it "
                "can fail"
            )
            yield _shape(
                step.compensate.span,
                f"the compensation of step '{step.name.value}' never runs: {why}",
                "remove `compensate ...` (E162 asks for none here)",
            )


def never_undone(flow: Flow) -> tuple[FlowStep, ...]:
    """The steps no failure ever compensates: a fanout's (it gathers, it compensates nothing)
    and the last step of a sequence, a saga or a conditional branch (its success completes
    the run in the same commit, so no step fails after it)."""
    if flow.kind == "fanout":
        return flow.steps
    if flow.kind == "parallel":
        return ()
    chains = (
        [branch.steps for branch in flow.branches] if flow.kind == "conditional" else [flow.steps]
    )
    return tuple(chain[-1] for chain in chains if chain)


def _shape(
    span: SourceSpan, message: str, hint: str = "see the flows section of the language reference"
) -> Diagnostic:
    return fail("E165", message, span, hint)


def _cases(flow: Flow) -> list[str] | None:
    if flow.on is None:
        return None
    for f in flow.inputs:
        if f.name.value == flow.on.value and f.type.kind == "enum":
            return [lit.value for lit in f.type.literals]
    return None


def check_flow_references(flow: Flow, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    """E160: every machine, event and state a step names exists; a sent event names its
    machine (`Machine.Event`)."""
    for step in flow.all_steps():
        for ref in (step.target, step.compensate):
            if ref is not None:
                yield from _event_reference(ref, receivers)
        if step.kind == "await" and step.machine is not None:
            receiver = _machine_reference(step.machine, receivers)
            if isinstance(receiver, Diagnostic):
                yield receiver
                continue
            for state in (*step.states, *step.unless):
                if state.value not in receiver.states:
                    yield fail(
                        "E160",
                        f"machine '{step.machine.value}' has no state '{state.value}'",
                        state.span,
                        did_you_mean(state.value, receiver.states)
                        or f"its states: {', '.join(sorted(receiver.states))}",
                    )


def _machine_reference(name: Name, receivers: Mapping[str, Receiver]) -> Receiver | Diagnostic:
    receiver = receivers.get(name.value)
    if receiver is not None:
        return receiver
    return fail(
        "E160",
        f"flow names unknown machine '{name.value}'",
        name.span,
        did_you_mean(name.value, receivers) or "machines are the .fsm files checked with it",
    )


def _event_reference(ref: EventRef, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    if ref.machine is None:
        yield fail(
            "E160",
            f"a flow step names its machine: '{ref.event.value}' alone is not enough",
            ref.event.span,
            f"write `Machine.{ref.event.value}`",
        )
        return
    receiver = _machine_reference(ref.machine, receivers)
    if isinstance(receiver, Diagnostic):
        yield receiver
    elif ref.event.value not in receiver.events:
        yield fail(
            "E160",
            f"machine '{ref.machine.value}' has no event '{ref.event.value}'",
            ref.event.span,
            did_you_mean(ref.event.value, receiver.events)
            or f"declare `event {ref.event.value}` in {receiver.machine.path}",
        )


def _resolve(
    ref: EventRef | None, receivers: Mapping[str, Receiver]
) -> tuple[Receiver, str] | None:
    if ref is None or ref.machine is None:
        return None
    receiver = receivers.get(ref.machine.value)
    if receiver is None or ref.event.value not in receiver.events:
        return None
    return receiver, ref.event.value


def check_flow_acceptance(flow: Flow, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    """E161: every event a step or its compensation sends is accepted (moves the receiver)
    in some state of the receiver."""
    for step in flow.all_steps():
        for ref in (step.target, step.compensate):
            resolved = _resolve(ref, receivers)
            if resolved is not None and ref is not None:
                yield from _accepted(ref, *resolved)


def check_emits_accepted(
    machines: Sequence[Machine], receivers: Mapping[str, Receiver]
) -> Iterator[Diagnostic]:
    """E161 for governors: an event a machine emits is accepted in some state of its target."""
    for machine in machines:
        for ref in emit_refs(machine):
            target = machine.name if ref.machine is None else ref.machine
            receiver = receivers.get(target.value)
            if receiver is not None and ref.event.value in receiver.events:
                yield from _accepted(ref, receiver, ref.event.value)


def _accepted(ref: EventRef, receiver: Receiver, event: str) -> Iterator[Diagnostic]:
    if event not in receiver.accepting:
        yield fail(
            "E161",
            f"no state of '{receiver.machine.name.value}' accepts '{event}': every send of it "
            "would be rejected or ignored",
            ref.event.span,
            f"handle it with `on {event} -> ...` in a state of {receiver.machine.path}",
        )


def check_flow_arguments(flow: Flow, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    """E141-E143: a step's arguments, with the flow inputs of the same names, supply every
    required field of the event it sends, and fit the fields' types. A compute step's result
    is named by the step and fits any field."""
    inputs = {f.name.value: f for f in flow.inputs}
    computed: set[str] = set()
    for step in flow.all_steps():
        if step.to is not None:
            chosen = inputs.get(step.to.value)
            if chosen is None or chosen.type.kind != "str" or chosen.type.optional:
                yield fail(
                    "E142",
                    f"`to {step.to.value}` does not name a required str input of the flow",
                    step.to.span,
                    did_you_mean(step.to.value, inputs) or "declare it in `input { ... }`",
                )
        for ref in (step.target, step.compensate):
            resolved = _resolve(ref, receivers)
            if resolved is None or ref is None:
                continue
            receiver, event = resolved
            target = receiver.events[event]
            causing = dict(inputs)
            for name in computed:
                wanted = next((f for f in target.fields if f.name.value in _named(ref, name)), None)
                if wanted is not None:
                    renamed = Name(span=wanted.span, value=name)
                    causing[name] = wanted.model_copy(update={"name": renamed})
            for finding in emit_payload_findings(ref, target, causing, has_cause=True):
                yield _in_flow_terms(finding)
        if step.kind == "compute":
            computed.add(step.name.value)


_FLOW_TERMS = (
    ("the causing event has no field", "the flow has no input"),
    ("taken from the causing event", "taken from the flow input"),
    ("emit of ", "step sending "),
    ("name one of its fields", "name one of the flow's inputs"),
    ("with a causing field", "with a flow input"),
    ("emit ", ""),
)


def _in_flow_terms(finding: Diagnostic) -> Diagnostic:
    """The emit rules' words for a flow: inputs where an emit has a causing event."""
    message, hint = finding.message, finding.hint or ""
    for emit_words, flow_words in _FLOW_TERMS:
        message, hint = (
            message.replace(emit_words, flow_words),
            hint.replace(emit_words, flow_words),
        )
    return finding.model_copy(update={"message": message, "hint": hint or None})


def _named(ref: EventRef, value: str) -> set[str]:
    """The target fields that the argument value `value` fills."""
    return {a.field.value for a in ref.args if a.value.kind == "field" and a.value.text == value}


def check_flow_compensation(flow: Flow, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    """E162: every step that sends (a side effect) is compensated or marked irreversible.
    The steps no failure ever undoes (never_undone: a sequence's last, a fanout's) are no
    exception: their compensation would never run (E165), so they say `irreversible`, and a
    step appended later finds the step before it already decided. Compute steps are pure;
    await steps only watch."""
    last = {step.name.value for step in never_undone(flow)}
    for step in flow.all_steps():
        if step.kind == "send" and step.compensate is None and not step.irreversible:
            hint = (
                "nothing runs after it to fail, so no compensation ever would: mark it "
                '`irreversible "why"`'
                if step.name.value in last
                else "add `compensate Machine.Event(...)`, or `irreversible` if nothing can undo it"
            )
            yield fail(
                "E162",
                f"step '{step.name.value}' has side effects but no compensation and is not "
                "marked irreversible",
                step.name.span,
                hint,
            )


def check_flow_completion(flow: Flow, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    """E163: steps that can never all complete. Following the states each receiver can be in
    (all of them at first), a send in a state set where its event is accepted nowhere, or an
    await for states that no move reaches, fails whatever happens."""
    for steps in _sequences(flow):
        for _step, _possible, finding in _walk(steps, receivers):
            if finding is not None:
                yield finding


def check_compensation_applies(
    flow: Flow, receivers: Mapping[str, Receiver]
) -> Iterator[Diagnostic]:
    """E167: a compensation's event is accepted in a state its receiver can be in when the
    compensation runs. A later step's failure runs it, the receiver then where the step before
    the failing one left it: after its own step, or after any later step but the last (whose
    success completes the run). Lenient where the walk knows less: a receiver no step moved
    may be in any state, and a later step compensated on the same receiver moves it back
    first."""
    never = {step.name.value for step in never_undone(flow)}  # E165's
    for steps in _sequences(flow):
        trail = list(_walk(steps, receivers))
        for index, (step, _possible, _finding) in enumerate(trail):
            resolved = _resolve(step.compensate, receivers)
            if resolved is None or step.compensate is None or step.name.value in never:
                continue
            receiver, event = resolved
            machine = receiver.machine.name.value
            later = (_resolve(s.compensate, receivers) for s in steps[index + 1 :])
            if any(r is not None and r[0] is receiver for r in later):
                continue
            window = trail[index : max(index + 1, len(trail) - 1)]
            if any(machine not in possible for _s, possible, _f in window):
                continue
            states = set().union(*(possible[machine] for _s, possible, _f in window))
            accepting = receiver.accepting.get(event, {})
            if accepting and not states & accepting.keys():
                yield fail(
                    "E167",
                    f"the compensation of step '{step.name.value}' can never apply: when it "
                    f"runs '{machine}' is in {_listed(states)}, where '{event}' is not accepted",
                    step.compensate.event.span,
                    f"'{event}' is accepted in {_listed(accepting.keys())}: compensate with an "
                    f"event '{machine}' accepts in {_listed(states)}",
                )


def _sequences(flow: Flow) -> list[tuple[FlowStep, ...]]:
    """The step chains that run one after another: each branch of a parallel or fanout flow
    alone, a sequence's or saga's steps, each conditional branch's steps."""
    if flow.kind in ("parallel", "fanout"):
        return [(step,) for step in flow.steps]
    return [flow.steps] if flow.steps else [b.steps for b in flow.branches]


def _walk(
    steps: Sequence[FlowStep], receivers: Mapping[str, Receiver]
) -> Iterator[tuple[FlowStep, dict[str, set[str]], Diagnostic | None]]:
    """Each step with the states every receiver the steps so far moved can be in after it,
    and the E163 finding if the step can never complete there."""
    possible: dict[str, set[str]] = {}
    for step in steps:
        finding: Diagnostic | None = None
        if step.kind == "send":
            resolved = _resolve(step.target, receivers)
            if resolved is not None:
                receiver, event = resolved
                now = possible.get(receiver.machine.name.value, receiver.states)
                accepting = receiver.accepting.get(event, {})
                if sources := now & accepting.keys():
                    after = set().union(*(accepting[s] for s in sources)) & receiver.states
                    possible[receiver.machine.name.value] = after
                elif now is not receiver.states and accepting:
                    finding = fail(
                        "E163",
                        f"step '{step.name.value}' can never complete: after the steps "
                        f"before it '{receiver.machine.name.value}' is in "
                        f"{_listed(now)}, where '{event}' is not accepted",
                        step.span,
                        f"'{event}' is accepted in {_listed(accepting.keys())}",
                    )
        elif step.kind == "await" and step.machine is not None:
            receiver_or = receivers.get(step.machine.value)
            if receiver_or is not None:
                now = possible.get(step.machine.value, receiver_or.states)
                wanted = {s.value for s in step.states} & receiver_or.states
                reachable = closure(receiver_or.moves, now) & wanted
                if wanted and not reachable:
                    finding = fail(
                        "E163",
                        f"step '{step.name.value}' can never complete: from {_listed(now)} "
                        f"'{step.machine.value}' never reaches {_listed(wanted)}",
                        step.span,
                        "wait for a state the machine can reach, or change the steps before",
                    )
                elif reachable:
                    possible[step.machine.value] = reachable
        yield step, dict(possible), finding


def _listed(states: Iterable[str]) -> str:
    return ", ".join(sorted(states)) or "no state"


def check_parallel_writes(flow: Flow, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    """E164: branches of a parallel or fanout flow that write the same governor instance, or
    may: the flow's instance twice, or an instance an input names (`to field`) beside the
    flow's own or another input's, which are the same whenever the inputs hold the same id
    (`to customer_id` is the flow's own instance in a flow started for that customer). They
    would race for its version, and one would fail for no fault of its own."""
    if flow.kind not in ("parallel", "fanout"):
        return
    earlier: dict[str, list[FlowStep]] = {}
    for step in flow.steps:
        receiver = step.receiver
        if receiver is None:
            continue
        before = earlier.setdefault(receiver.value, [])
        if before:
            other = before[0]
            same = other.to is None and step.to is None
            verb = "both write" if same else "may write the same instance:"
            yield fail(
                "E164",
                f"parallel steps '{other.name.value}' and '{step.name.value}' {verb} "
                f"{_instance(other, receiver.value)}"
                + ("" if same else f" and {_instance(step, receiver.value)}"),
                step.span,
                "merge them into one step, or move one into a sequence after the parallel flow"
                + ("" if same else " (inputs that may hold the same id are the same instance)"),
            )
        before.append(step)


def _instance(step: FlowStep, machine: str) -> str:
    if step.to is None:
        return f"the flow's instance of '{machine}'"
    return f"the instance of '{machine}' named by input '{step.to.value}'"


def _unused_suppressions(flow: Flow) -> Iterator[Diagnostic]:
    """Flow findings are all errors, which cannot be allowed: an `@allow` on a flow is W205."""
    for suppression in (
        *flow.suppressions,
        *(s for st in flow.all_steps() for s in st.suppressions),
    ):
        yield fail(
            "W205",
            f"@allow({suppression.code}) matches no finding",
            suppression.span,
            "flow findings are errors and cannot be allowed: remove it",
        )


# ---------------------------------------------------------------- input bounds

_NUMBER_KINDS = ("int", "decimal")


def check_input_bounds(flow: Flow, receivers: Mapping[str, Receiver]) -> Iterator[Diagnostic]:
    """E166: `at least` / `at most` only on an int or decimal input, each bound a number (a
    whole one for an int) or another int or decimal input, and literal bounds not crossed."""
    inputs = {f.name.value: f for f in flow.inputs}
    for declared in flow.inputs:
        bounds = [b for b in (declared.at_least, declared.at_most) if b is not None]
        if not bounds:
            continue
        name, kind = declared.name.value, declared.type.kind
        if kind not in _NUMBER_KINDS:
            yield _bound(bounds[0].span, f"input '{name}' is {kind}: only a number has bounds")
            continue
        for bound in bounds:
            yield from _bound_findings(declared, bound, inputs)
        low, high = declared.at_least, declared.at_most
        if not (isinstance(low, EmitValue) and isinstance(high, EmitValue)):
            continue
        if Decimal(low.text) > Decimal(high.text):
            message = f"input '{name}' is at least {low.text} and at most {high.text}"
            yield _bound(high.span, message)


def _bound_findings(
    declared: Field, bound: EmitValue | Name, inputs: Mapping[str, Field]
) -> Iterator[Diagnostic]:
    name, kind = declared.name.value, declared.type.kind
    if isinstance(bound, EmitValue):
        if kind == "int" and not bound.text.lstrip("-").isdigit():
            yield _bound(bound.span, f"input '{name}' is an int: {bound.text} is no whole number")
        return
    other = inputs.get(bound.value)
    if other is None or bound.value == name:
        numbers = [n for n, f in inputs.items() if f.type.kind in _NUMBER_KINDS and n != name]
        hint = did_you_mean(bound.value, numbers) or "a bound is a number or another input"
        yield _bound(bound.span, f"bound '{bound.value}' of input '{name}' is no other input", hint)
    elif other.type.kind not in _NUMBER_KINDS:
        message = f"bound '{bound.value}' of input '{name}' is {other.type.kind}, not a number"
        yield _bound(bound.span, message)


def _bound(
    span: SourceSpan,
    message: str,
    hint: str = "write `at least N` / `at most N` after an int or decimal input's type",
) -> Diagnostic:
    return fail("E166", message, span, hint)


FLOW_RULES: tuple[FlowRule, ...] = (
    check_flow_shape,
    check_input_bounds,
    check_flow_references,
    check_flow_acceptance,
    check_flow_arguments,
    check_flow_compensation,
    check_flow_completion,
    check_compensation_applies,
    check_parallel_writes,
)
