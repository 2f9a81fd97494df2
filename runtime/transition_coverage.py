"""A pytest plugin that records which transitions a test run takes, for `testgen --coverage`.

`python -m pytest -p autonomic.runtime.transition_coverage` wraps the dispatch of every governor
a Runtime loads, and `Runtime.fire_due`, and writes each (machine, from, event, to) taken to the
JSON file named by AUTONOMIC_TRANSITION_COVERAGE when the session ends. Nothing changes for a run
without the plugin: the wrapping happens only in a session that loads it.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from .runtime import Runtime

ENVIRONMENT = "AUTONOMIC_TRANSITION_COVERAGE"
_taken: set[tuple[str, str, str, str]] = set()


def _note(result: Any) -> None:
    if result is None or getattr(result, "ignored", False) or getattr(result, "duplicate", False):
        return
    _taken.add(
        (str(result.machine), str(result.from_state), str(result.event), str(result.to_state))
    )


def _wrap_dispatch(dispatch: Any) -> Any:
    @functools.wraps(dispatch)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = dispatch(*args, **kwargs)
        _note(result)
        return result

    return recorded


def pytest_configure(config: Any) -> None:
    original_load = Runtime.load
    original_fire = Runtime.fire_due

    def load(self: Runtime, *args: Any, **kwargs: Any) -> Any:
        governor = original_load(self, *args, **kwargs)
        governor.dispatch = _wrap_dispatch(governor.dispatch)
        return governor

    def fire_due(self: Runtime, *args: Any, **kwargs: Any) -> Any:
        firings = original_fire(self, *args, **kwargs)
        for firing in firings:
            _note(firing.result)
        return firings

    Runtime.load = load  # type: ignore[method-assign]
    Runtime.fire_due = fire_due  # type: ignore[method-assign]


def pytest_unconfigure(config: Any) -> None:
    target = os.environ.get(ENVIRONMENT)
    if target:
        rows = sorted(_taken)
        Path(target).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
