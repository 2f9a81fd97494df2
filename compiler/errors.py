"""Source spans and diagnostics: the one place that builds and formats every finding."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Mapping, Sequence

from autonomic.diagnostics import render
from pydantic import BaseModel, ConfigDict


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"


class SourceSpan(BaseModel):
    """A 1-based line/column range in one source file (end is exclusive)."""

    model_config = ConfigDict(frozen=True)

    path: str
    line: int
    column: int
    end_line: int
    end_column: int

    @classmethod
    def point(cls, path: str, line: int = 1, column: int = 1) -> SourceSpan:
        return cls.model_construct(
            path=path, line=line, column=column, end_line=line, end_column=column + 1
        )

    def sort_key(self) -> tuple[str, int, int]:
        return (self.path, self.line, self.column)


class RelatedLocation(BaseModel):
    """Where to look besides the finding itself: the cause of a consequence (the row that
    points at the wrong state), or the other half of a clash (the first declaration)."""

    model_config = ConfigDict(frozen=True)

    span: SourceSpan
    message: str


class Diagnostic(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str
    severity: Severity
    message: str
    span: SourceSpan
    hint: str | None = None
    related: tuple[RelatedLocation, ...] = ()

    def sort_key(self) -> tuple[str, int, int, str]:
        return (*self.span.sort_key(), self.code)


# Every code the tool can report, with its default severity and a one-line summary.
# The summary doubles as the SARIF rule description.
CODES: dict[str, tuple[Severity, str]] = {
    "E001": (Severity.ERROR, "syntax error"),
    "E002": (Severity.ERROR, "file cannot be read as UTF-8 text"),
    "E003": (Severity.ERROR, "file cannot be read"),
    "E004": (Severity.ERROR, "file must hold one machine or flows"),
    "E005": (Severity.ERROR, "invalid annotation"),
    "E006": (Severity.ERROR, "output cannot be written or is refused"),
    "E007": (Severity.ERROR, "no machine to act on"),
    "E101": (Severity.ERROR, "machine has no initial state"),
    "E102": (Severity.ERROR, "machine has more than one initial state"),
    "E103": (Severity.ERROR, "duplicate state"),
    "E104": (Severity.ERROR, "unknown state"),
    "E105": (Severity.ERROR, "duplicate event"),
    "E106": (Severity.ERROR, "unknown event"),
    "E107": (Severity.ERROR, "duplicate transition"),
    "E108": (Severity.ERROR, "nondeterministic transitions"),
    "E109": (Severity.ERROR, "unguarded transition beside guarded ones"),
    "E110": (Severity.ERROR, "invalid else branch"),
    "E111": (Severity.ERROR, "final state with outgoing transitions or timers"),
    "E112": (Severity.ERROR, "event both handled and ignored"),
    "E113": (Severity.ERROR, "duplicate payload field"),
    "E114": (Severity.ERROR, "unknown payload type"),
    "E115": (Severity.ERROR, "duplicate or zero timer"),
    "E116": (Severity.ERROR, "state is both initial and final"),
    "E117": (Severity.ERROR, "duplicate enum literal"),
    "E118": (Severity.ERROR, "malformed duration"),
    "E119": (Severity.ERROR, "invalid repeat count or attempt cap"),
    "E120": (Severity.ERROR, "ladder steps not strictly increasing"),
    "E121": (Severity.ERROR, "escalation step deadline overruns the next step"),
    "E122": (Severity.ERROR, "invalid ladder end or step state"),
    "E123": (Severity.ERROR, "a state refuses an event the machine always accepts"),
    "E124": (Severity.ERROR, "duration longer than 100 years"),
    "E130": (Severity.ERROR, "name is not usable in generated code"),
    "E131": (Severity.ERROR, "names collide in generated code"),
    "E140": (Severity.ERROR, "emitted event does not exist"),
    "E141": (Severity.ERROR, "emit leaves a required payload field unsupplied"),
    "E142": (Severity.ERROR, "emit argument names an unknown field or reference"),
    "E143": (Severity.ERROR, "emit argument does not fit the target field's type"),
    "E170": (Severity.ERROR, "live instances or armed timers stranded by a new version"),
    "E190": (Severity.ERROR, "policy names an action the machine never runs"),
    "E191": (Severity.ERROR, "policy declared twice, or an action under two policies"),
    "E192": (Severity.ERROR, "invalid policy value"),
    "E193": (Severity.ERROR, "policy clause repeated, or a policy without clauses"),
    "E194": (Severity.ERROR, "policy falls back to an action it guards"),
    "E160": (Severity.ERROR, "flow names an unknown machine, event or state"),
    "E161": (Severity.ERROR, "sent event is accepted in no state of its receiver"),
    "E162": (Severity.ERROR, "flow step with side effects has no compensation"),
    "E163": (Severity.ERROR, "flow steps can never all complete"),
    "E164": (Severity.ERROR, "parallel flow steps write (or may write) one governor instance"),
    "E165": (Severity.ERROR, "invalid flow shape"),
    "E166": (Severity.ERROR, "invalid flow input bound"),
    "E167": (Severity.ERROR, "compensation can never apply where its step leaves the receiver"),
    "E144": (Severity.ERROR, "timer delay field is not a duration of every entering event"),
    "E145": (Severity.ERROR, "invalid setting or group"),
    "E146": (Severity.ERROR, "invalid data field"),
    "E147": (Severity.ERROR, "invalid keep"),
    "E148": (Severity.ERROR, "emit target is not a string data field"),
    "E149": (Severity.ERROR, "data field an emit reads not kept on every way to the emit"),
    "E150": (Severity.ERROR, "refusal notice is not an event of the emitting machine"),
    "E151": (Severity.ERROR, "refusal notice not handled where the emit waits"),
    "E152": (Severity.ERROR, "refusal reference outside a refusal notice"),
    "W201": (Severity.WARNING, "unreachable state"),
    "W202": (Severity.WARNING, "no final state reachable"),
    "W203": (Severity.WARNING, "dead-end state"),
    "W204": (Severity.WARNING, "event declared but never handled"),
    "W205": (Severity.WARNING, "suppression matches no finding"),
    "W206": (Severity.WARNING, "machine name does not match its file name"),
    "W207": (Severity.WARNING, "folder holds no machine files"),
    "W208": (Severity.WARNING, "timer can never fire"),
    "W209": (Severity.WARNING, "policy fallback looks like a misspelt action"),
}


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a misspelled name, or None."""
    pool = list(candidates)
    matches = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in pool}
        if name.lower() in lowered:
            matches = [lowered[name.lower()]]
    return f"did you mean '{matches[0]}'?" if matches else None


def fail(
    code: str,
    message: str,
    span: SourceSpan,
    hint: str | None = None,
    related: Iterable[RelatedLocation] = (),
) -> Diagnostic:
    """The single constructor of diagnostics; severity comes from the code table."""
    severity, _ = CODES[code]
    return Diagnostic.model_construct(
        code=code, severity=severity, message=message, span=span, hint=hint, related=tuple(related)
    )


def related(span: SourceSpan, message: str) -> RelatedLocation:
    return RelatedLocation.model_construct(span=span, message=message)


def colour_wanted(stream: object, environ: Mapping[str, str]) -> bool:
    """Colour on a terminal unless NO_COLOR is set to anything (no-color.org) or TERM is
    dumb; never when piped or written to a file."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def format_text(
    diagnostic: Diagnostic, source_lines: Sequence[str] | None, *, colour: bool = False
) -> str:
    """rustc/ruff style: `path:line:col: CODE message`, the source line, a caret, a hint, in
    the format every command shares (autonomic.diagnostics). With `colour`, the same text
    with ANSI colours (severity, caret, hint)."""
    span = diagnostic.span
    return render(
        span.path,
        diagnostic.code,
        diagnostic.message,
        diagnostic.hint,
        severity=diagnostic.severity.value,
        line=span.line,
        column=span.column,
        end_line=span.end_line,
        end_column=span.end_column,
        source_lines=source_lines,
        related=[
            (f"{note.span.path}:{note.span.line}:{note.span.column}:", note.message)
            for note in diagnostic.related
        ],
        colour=colour,
    )
