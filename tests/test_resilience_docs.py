"""Every Python example in docs/resilience.md runs and its assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "resilience.md"
EXAMPLES = re.findall(r"^## (.+?)\n.*?```python\n(.*?)```", DOC.read_text(), re.S | re.M)


def test_every_pattern_has_an_example() -> None:
    assert len(EXAMPLES) == 10


@pytest.mark.parametrize(("title", "code"), EXAMPLES, ids=[title for title, _ in EXAMPLES])
def test_example_runs(title: str, code: str) -> None:
    exec(compile(code, f"{DOC}:{title}", "exec"), {"__name__": "docs_example"})
