"""Binding guards and actions by name to Python callables, checked once at load time.

Every problem is reported together, each as a diagnostic at the machine file position of the
name (`machines/billing.fsm:12:9: R010 guard 'amount_matches' has no binding`), so a missing
binding fails the deployment, never the first event that needs it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from autonomic.diagnostics import render

from .errors import BindingError
from .tables import MachineSpec, SourceRef

__all__ = ["Action", "Guard", "bind"]

# Both receive the TransitionContext of the event (see results.TransitionContext).
Guard = Callable[[Any], bool]
Action = Callable[[Any], object]

MISSING_GUARD = "R010"
MISSING_ACTION = "R011"
UNKNOWN_GUARD = "R012"
UNKNOWN_ACTION = "R013"
NOT_CALLABLE = "R014"


def _diagnostic(where: SourceRef, code: str, message: str, hint: str | None) -> str:
    return render(where.path, code, message, hint, line=where.line, column=where.column)


def _nearest(name: str, pool: Mapping[str, object]) -> str | None:
    close = difflib.get_close_matches(name, list(pool), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _accepts_one_argument(function: Callable[..., object]) -> bool:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return True  # builtins without a signature: let the first call decide
    try:
        signature.bind(object())
    except TypeError:
        return False
    return True


def _check(
    role: str,
    declared: Mapping[str, SourceRef],
    bound: Mapping[str, Callable[..., Any]],
    machine_file: str,
    missing_code: str,
    unknown_code: str,
) -> list[tuple[tuple[str, int, int, str], str]]:
    found: list[tuple[tuple[str, int, int, str], str]] = []
    for name, ref in declared.items():
        if name not in bound:
            hint = _nearest(name, {k: v for k, v in bound.items() if k not in declared})
            message = f"{role} '{name}' has no binding"
            found.append(
                (
                    (ref.path, ref.line, ref.column, name),
                    _diagnostic(
                        ref, missing_code, message, hint or f"pass {role}s={{'{name}': callable}}"
                    ),
                )
            )
            continue
        function = bound[name]
        if not callable(function):
            message = f"{role} '{name}' is bound to a {type(function).__name__}, not a callable"
            found.append(
                (
                    (ref.path, ref.line, ref.column, name),
                    _diagnostic(ref, NOT_CALLABLE, message, None),
                )
            )
        elif not _accepts_one_argument(function):
            message = f"{role} '{name}' must accept one argument (the transition context)"
            found.append(
                (
                    (ref.path, ref.line, ref.column, name),
                    _diagnostic(ref, NOT_CALLABLE, message, None),
                )
            )
    for name in bound:
        if name not in declared:
            hint = _nearest(name, declared)
            message = f"{role} '{name}' is bound but the machine names no such {role}"
            found.append(
                (
                    (machine_file, 1 << 30, 0, name),
                    _diagnostic(
                        SourceRef(machine_file, 1, 1),
                        unknown_code,
                        message,
                        hint or "remove the binding",
                    ),
                )
            )
    return found


def bind(
    spec: MachineSpec,
    guards: Mapping[str, Callable[..., Any]],
    actions: Mapping[str, Callable[..., Any]],
) -> tuple[dict[str, Guard], dict[str, Action]]:
    """The guard and action callables for `spec`, or BindingError listing every problem."""
    problems = _check("guard", spec.guards, guards, spec.source_path, MISSING_GUARD, UNKNOWN_GUARD)
    problems += _check(
        "action", spec.actions, actions, spec.source_path, MISSING_ACTION, UNKNOWN_ACTION
    )
    if problems:
        problems.sort(key=lambda item: item[0])
        raise BindingError(spec.name, tuple(text for _, text in problems))
    return dict(guards), dict(actions)
