"""autonomic's compiler: checks governor machine files and generates Python tables and diagrams.

A program uses it through `check` and `build`, which return the reports the `autonomic`
command prints (render them with `render_text`, `render_json` or `render_sarif`). Names load
on first use, so the command starts without loading the checker.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autonomic.lazy import load_attribute

if TYPE_CHECKING:
    from .build import BuildResult
    from .checks import CheckReport
    from .errors import CODES, Diagnostic, Severity, SourceSpan
    from .report import render_json, render_sarif, render_text

__version__ = "0.1.0"

# Where each public name lives.
_HOMES = {
    "CODES": "errors",
    "BuildResult": "build",
    "CheckReport": "checks",
    "Diagnostic": "errors",
    "Severity": "errors",
    "SourceSpan": "errors",
    "render_json": "report",
    "render_sarif": "report",
    "render_text": "report",
}

__all__ = [
    "CODES",
    "BuildResult",
    "CheckReport",
    "Diagnostic",
    "Severity",
    "SourceSpan",
    "__version__",
    "build",
    "check",
    "render_json",
    "render_sarif",
    "render_text",
]


def check(paths: Sequence[str | os.PathLike[str]]) -> CheckReport:
    """Read, parse and check machine files and folders of them; every finding is in the
    report (`report.errors()`, `report.warnings()`), bad input never raises."""
    from .checks import check_paths

    return check_paths([Path(p) for p in paths])


def build(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    check_only: bool = False,
    svg: bool = True,
    strict: bool = False,
) -> BuildResult:
    """Check the machines, then write their modules, diagrams and index into `out` (only
    files whose bytes change). Nothing is written if the check fails (`result.report`);
    `check_only` lists stale, missing and orphaned files instead of writing."""
    from .build import build as build_machines

    return build_machines(
        [Path(p) for p in paths], Path(out), check_only=check_only, svg=svg, strict=strict
    )


class _Package(types.ModuleType):
    """This package's module type: importing the submodule `build` (compiler/build.py) makes
    Python set the package attribute `build` to that module, which would hide the public
    function `build` from every later `from autonomic.compiler import build`. The functions
    stay; the submodule is still `sys.modules["autonomic.compiler.build"]`."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


_FUNCTIONS = frozenset({"build", "check"})
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    return load_attribute(globals(), _HOMES, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
