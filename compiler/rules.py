"""The help of every diagnostic code: what it means, how to fix it, where the docs say more.

One table feeds the SARIF rules (fullDescription, help, helpUri) and the "Diagnostic
reference" of docs/language.md, which a test keeps equal to `render_reference()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CODES, Severity

# Where the language reference is published; a rule's helpUri is this plus `#<code>`.
DOCS_URL = "https://github.com/autonomic-governors/autonomic/blob/main/docs/language.md"
REFERENCE_HEADING = "## Diagnostic reference"


@dataclass(frozen=True, slots=True)
class RuleHelp:
    code: str
    severity: Severity
    summary: str
    meaning: str
    fix: str

    @property
    def anchor(self) -> str:
        """The anchor GitHub gives the heading `### E101`."""
        return self.code.lower()

    @property
    def help_uri(self) -> str:
        return f"{DOCS_URL}#{self.anchor}"

    @property
    def text(self) -> str:
        return f"{self.meaning}\n\nHow to fix: {self.fix}"

    @property
    def markdown(self) -> str:
        return (
            f"**{self.code}: {self.summary}**\n\n{self.meaning}\n\n"
            f"**How to fix:** {self.fix}\n\n[Language reference]({self.help_uri})"
        )


_HELP: dict[str, tuple[str, str]] = {
    "E001": (
        "The file does not follow the grammar of the machine language; the message names the "
        "tokens that could come next, or the common mistake recognised.",
        "Correct the text at the caret; compare with the examples in the language reference.",
    ),
    "E002": (
        "The file is not UTF-8 text (invalid byte sequences or NUL bytes).",
        "Save the file as UTF-8 without NUL bytes.",
    ),
    "E003": (
        "The file cannot be read: it is missing, a directory, unreadable or larger than 64 MiB.",
        "Check the path and its permissions.",
    ),
    "E004": (
        "Each .fsm file holds one `machine` block (and any `flow` blocks beside it), or flows "
        "only; not two machines, and not nothing.",
        "Move each further machine into its own file named after it.",
    ),
    "E005": (
        'An `@allow(CODE, "reason")` names an unknown code, an error code (only warnings can be '
        "allowed) or has a blank reason.",
        "Name a warning code and say why it is allowed.",
    ),
    "E006": (
        "The output file cannot be written, or writing it would overwrite an input.",
        "Pass another output path.",
    ),
    "E007": (
        "The command found no machine to act on: no file, or no machine of that name.",
        "Pass a .fsm file, or a machine name that exists in the machines folder.",
    ),
    "E101": (
        "Every machine needs one `initial` state, where new instances start.",
        "Mark the state instances start in with `initial`.",
    ),
    "E102": (
        "A machine has exactly one initial state; several make the start ambiguous.",
        "Keep `initial` on one state only.",
    ),
    "E103": (
        "Two states have the same name.",
        "Rename or merge one of them.",
    ),
    "E104": (
        "A transition, timer, escalation or ladder names a state that is not declared.",
        "Fix the spelling (see the hint) or declare the state.",
    ),
    "E105": (
        "Two events have the same name.",
        "Rename or merge one of them.",
    ),
    "E106": (
        "A transition, `ignore` or ladder names an event that is not declared.",
        "Fix the spelling (see the hint) or declare the event.",
    ),
    "E107": (
        "The same transition (state, event, guard, target) is written twice.",
        "Delete the repeated row.",
    ),
    "E108": (
        "Two rows of one state and event with the same guard lead to different targets, or a "
        "row competes with a retry ladder: the machine could not decide which to take.",
        "Give the rows different guards, or remove the row the ladder already covers.",
    ),
    "E109": (
        "An unguarded row stands beside guarded rows of the same state and event, so it would "
        "shadow them or be shadowed.",
        "Write the unguarded row as `else`.",
    ),
    "E110": (
        "An `else` row needs guarded rows beside it, and there is at most one.",
        "Remove the extra `else`, or add the guarded rows it completes.",
    ),
    "E111": (
        "A final state is the end of an instance: it has no transitions, timers or "
        "escalations and is no retry entry.",
        "Remove what leaves the final state, or make it an ordinary state.",
    ),
    "E112": (
        "A state both handles and ignores the same event (a retry ladder counts as handling).",
        "Keep either the transition or the `ignore`.",
    ),
    "E113": (
        "A payload field is declared twice in one event.",
        "Rename or remove one of the fields.",
    ),
    "E114": (
        "A payload field has a type the language does not know.",
        "Use str, int, decimal, bool, datetime or enum(...).",
    ),
    "E115": (
        "A timer has a zero duration, or two timers of one state are due at the same moment.",
        "Give every timer of a state a distinct, positive duration.",
    ),
    "E116": (
        "A state cannot be both where instances start and where they end.",
        "Drop `initial` or `final` from the state.",
    ),
    "E117": (
        "An enum literal is listed twice.",
        "Remove the repeated literal.",
    ),
    "E118": (
        "A compound duration repeats a unit or puts a smaller unit before a larger one "
        "(`30m1h`, `1h1h`).",
        "Write each unit once, largest first: `1h30m`, `1d12h`.",
    ),
    "E119": (
        "A repeat count or an attempt cap is not a whole number from 1 to 10000, or a retry "
        "ladder makes more attempts than its `at most N attempts` cap (each step once, a "
        "repeated step as often as it repeats).",
        "Use a whole number of at least 1, and no more attempts than the cap.",
    ),
    "E120": (
        "The steps of a ladder must come strictly later one after another, and a repeated "
        "attempt in flight must be made again before its timeout.",
        "Order the steps by time and make each later than the one before; repeat an attempt "
        "fewer times or more often than its timeout allows.",
    ),
    "E121": (
        "An escalation step's `within` deadline ends after the next step (or the end) fires.",
        "Shorten the deadline or move the next step later.",
    ),
    "E122": (
        "A ladder is empty, has no `exhausted`, reuses a step state, uses an entry or final "
        "state as a step, or ends in its own state.",
        "Give the ladder distinct ordinary step states and an end elsewhere.",
    ),
    "E123": (
        "The machine declares `always accept Event` (an event that can come at any moment, "
        "such as a chargeback), but a state that is neither final nor listed after `except` "
        "has no row for it and does not ignore it: the event would be refused there.",
        "Add `on Event -> ...` or `ignore Event` to the state, or list the state after `except`.",
    ),
    "E124": (
        "A duration (a timer, a ladder step or deadline, a flow's wait or fan-out deadline, a "
        "policy's cool-down or `max`, a setting's bounds) is longer than 36500d, 100 years. The "
        "runtime keeps times as 64-bit milliseconds, and sums and repeats of durations must fit "
        "there too.",
        "Write at most `36500d`; a timer that should never fire is no timer: leave it out.",
    ),
    "E130": (
        "A name cannot stand in generated Python code (not an ASCII identifier, a keyword, or "
        "an attribute of the generated types).",
        "Rename it to a plain ASCII identifier that is not a Python keyword.",
    ),
    "E131": (
        "Two names become the same name in generated code (two machines with one module "
        "name, two ladders of one state with one name).",
        "Rename one of them.",
    ),
    "E140": (
        "An `emit` names an event, or a machine, that does not exist.",
        "Fix the name (see the hint) or declare the event in the target machine.",
    ),
    "E141": (
        "An `emit` leaves a required field of the target event without a value: no argument "
        "and no same-named field of the causing event.",
        "Pass the field as an argument: `emit M.E(field = value)`.",
    ),
    "E142": (
        "An `emit` argument names a field the target lacks, a causing field that does not "
        "exist (a timer has none), an unknown `$reference`, a `$data.FIELD` that is not a "
        "data field of the machine (or in a flow step, which has no instance data), or a "
        "field twice.",
        "Name fields the target declares, values the causing event has, and data fields the "
        "machine declares.",
    ),
    "E143": (
        "An `emit` argument's value does not fit the target field's type, or an optional "
        "causing field fills a required one.",
        "Pass a value of the field's type, or make the target field optional.",
    ),
    "E160": (
        "A flow names a machine, event or state that does not exist, or a step sends an event "
        "without naming its machine.",
        "Fix the name (see the hint), or write `Machine.Event`.",
    ),
    "E161": (
        "An event that a flow step, a compensation or a governor's `emit` sends is accepted "
        "(moves the receiver) in no state of its receiver: every send would be rejected.",
        "Handle the event with `on Event -> Target` in a state of the receiving machine.",
    ),
    "E162": (
        "A flow step that sends an event has side effects, but neither a compensation nor the "
        "`irreversible` marker: a failure later in the flow could not undo it. The last step "
        "of a sequence, a saga or a conditional branch and a fanout's steps too: no failure "
        "is compensated after them, so they say `irreversible`, and a step added after one "
        "later finds it already decided.",
        'Add `compensate Machine.Event(...)`, or `irreversible "why"` if nothing can or '
        "will undo it.",
    ),
    "E163": (
        "A flow's steps can never all complete: following the states each receiver can be in "
        "after the steps before, a step's event is accepted in none of them, or an `await` "
        "waits for states the receiver cannot reach.",
        "Reorder the steps, send the event the receiver accepts there, or wait for a reachable "
        "state.",
    ),
    "E164": (
        "Two steps of a parallel or fanout flow write the same governor instance, or may: "
        "the flow's own instance and one an input names (`to customer_id` is the flow's own "
        "in a flow started for that customer), or two inputs' instances; they would race for "
        "its version.",
        "Merge the two steps, or move one into a sequence before or after the parallel flow.",
    ),
    "E165": (
        "A flow's clauses do not fit its kind: `on`/`when` outside a conditional flow or a "
        "branch missing or unknown, `within`/`quorum` outside a fanout or a quorum outside "
        "1..steps, a compensation beside a step that does not send, both `compensate` and "
        "`irreversible`, a compensation that never runs (of the last step of a sequence, a "
        "saga or a conditional branch, whose success completes the run, or of a fanout's "
        "step), or `await` in a parallel flow.",
        "Write the flow as the flows section of the language reference shows for its kind.",
    ),
    "E166": (
        "A flow input's `at least` / `at most` does not fit: a bound on an input that is not "
        "an int or a decimal, a bound that is neither a number nor another int or decimal "
        "input (or is the input itself), a fraction bounding an int, or a lower literal bound "
        "above the upper one.",
        "Bound only number inputs, each side with a number or another number input: "
        "`cycle_day: int at least 0 at most cycle_length`.",
    ),
    "E167": (
        "A compensation's event is accepted in none of the states its receiver can be in when "
        "the compensation runs: after its step and after the later steps of the same "
        "sequence, whose failure runs it. The run would end failed, the step's effect never "
        "undone.",
        "Compensate with an event the receiver accepts in the states the step leaves it in "
        "(the hint lists them), or handle this event there.",
    ),
    "E170": (
        "`autonomic diff --store` found live instances in states the new version removes, "
        "renames or cannot reach, or armed timers whose state or target it removes: deploying "
        "it would strand them.",
        "Keep the states (and timers) until the instances have left them, or migrate the "
        "instances first; then deploy the removal.",
    ),
    "W201": (
        "No path of transitions, timers or ladders leads from the initial state to this state.",
        "Add a way in, or delete the state.",
    ),
    "W202": (
        "From this state (or anywhere in the machine) no final state can be reached, so its "
        "instances never end.",
        "Add a way to a final state, or mark the machine `perpetual` if it never ends.",
    ),
    "W203": (
        "Nothing leaves this state and it is not final: instances that enter it are stuck.",
        "Add a transition or timer out of it, or make it `final`.",
    ),
    "W204": (
        "An event is declared but no state handles it, so every delivery is rejected.",
        "Handle it in the states where it can arrive, or remove it.",
    ),
    "W205": (
        "An `@allow` suppresses a finding that does not occur (any more).",
        "Remove the stale `@allow`.",
    ),
    "W206": (
        "The file name is not the machine name in snake_case (`QuotaSla` in quota_sla.fsm).",
        "Rename the file or the machine.",
    ),
    "W207": (
        "A folder given to the command holds no .fsm files.",
        "Pass the folder that holds the machine files.",
    ),
    "W208": (
        "A timer can never fire: a shorter timer of the same state that moves out of it always "
        "fires first.",
        "Shorten the timer below the one that wins, or lengthen or remove that one.",
    ),
    "W209": (
        "A policy's `fallback` names an action that no transition, timer or ladder runs (a "
        "backup's own action, which is normal) but whose name is within a letter or two of an "
        "action the machine does run, or of another policy's fallback: most likely a typo, "
        "which would otherwise surface only when the machine is loaded (R011).",
        "Correct the name, or name the backup's action distinctly (`charge_backup_processor`).",
    ),
    "E144": (
        "`after event.FIELD` takes its delay from the event that entered the state, but an "
        "event entering it lacks FIELD as a required `duration`, or the state is also entered "
        "without an event (creation, a timer, a ladder).",
        "Declare `FIELD: duration` in every entering event, and enter the state only by them.",
    ),
    "E145": (
        "A setting has bounds that are not positive and ordered, or is declared twice or "
        "unknown; or a group is declared twice, lists a state twice, holds a final state, or "
        "is unknown.",
        "Declare each setting once, `between LOW and HIGH` with 0 < LOW <= HIGH, and each "
        "group once with distinct non-final states.",
    ),
    "E146": (
        "A field of the machine's `data` block is declared twice, or marked optional (`?`): "
        "a data field is there wherever a `keep` has set it, which the compiler checks.",
        "Declare each data field once, without `?`.",
    ),
    "E147": (
        "A `keep FIELD [= CAUSING]` names a field the machine's `data` block lacks, a field "
        "the row's event lacks, a value that does not fit the data field (or an optional "
        "one), or keeps one field twice on a row.",
        "Declare the field in `data { ... }`, and keep a required field of the row's event "
        "of the same type: `keep customer_id` or `keep customer_id = account_id`.",
    ),
    "E148": (
        "`emit Machine.Event to FIELD` names a field that is not in the machine's `data` "
        "block, or one that is not a `str` (an instance id is a string).",
        "Declare `data { FIELD: str }` and `keep` it on the rows before the emit.",
    ),
    "E149": (
        "`emit ... to FIELD`, or an emit argument `$data.FIELD`, reads a data field that some "
        "way into the emitting state (its creation, a row without `keep FIELD`, a timer or a "
        "ladder, from a state that had not kept it) leaves unset, so the receiver or the value "
        "would be unknown there. The related location names such a way in.",
        "Add `keep FIELD` to the rows that lead there (a row's own `keep` counts for its "
        "emits), or emit from states that every way into keeps it.",
    ),
    "E150": (
        "`emit ... if refused NOTICE` names an event that the emitting machine does not "
        "declare, or an event of another machine: the notice of a refused delivery goes back "
        "to the emitting instance.",
        "Declare the notice event in the emitting machine and name it without a machine: "
        "`emit Entitlement.GrantEntitlements if refused TierChangeFailed(...)`.",
    ),
    "E151": (
        "The notice of a refused delivery is not handled (no `on NOTICE -> ...` row) in the "
        "state the emitting move leads to, where the instance waits for the outcome: the "
        "notice would be refused in turn.",
        "Add `on NOTICE -> ...` to that state, or name a notice it handles.",
    ),
    "E152": (
        "`$refusal_code` or `$refusal_message` is an argument of an emit, a flow step or a "
        "compensation that is not a refusal notice: only a notice's delivery follows a "
        "refusal, whose code and message fill them in.",
        "Use them in the arguments of the notice: `emit Machine.Event if refused "
        "NOTICE(reason = $refusal_message, refusal_code = $refusal_code)`.",
    ),
}


def rule_help(code: str) -> RuleHelp:
    """The help of one code. A code without an entry (a new one) gets its summary as help,
    so a SARIF rule is never incomplete."""
    severity, summary = CODES[code]
    meaning, fix = _HELP.get(
        code, (summary[:1].upper() + summary[1:] + ".", "See the language reference.")
    )
    return RuleHelp(code, severity, summary, meaning, fix)


def all_rules() -> list[RuleHelp]:
    return [rule_help(code) for code in sorted(CODES)]


def render_reference() -> str:
    """The "Diagnostic reference" section of docs/language.md: one heading per code, so
    each SARIF helpUri lands on it."""
    out = [
        REFERENCE_HEADING,
        "",
        "One section per code; SARIF rules link here (`helpUri`). Generated from",
        "`compiler/rules.py` (a test keeps the two equal).",
    ]
    for rule in all_rules():
        out += [
            "",
            f"### {rule.code}",
            "",
            f"**{rule.summary}** ({rule.severity.value}). {rule.meaning}",
            "",
            f"How to fix: {rule.fix}",
        ]
    return "\n".join(out) + "\n"
