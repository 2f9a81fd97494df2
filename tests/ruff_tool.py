"""`ruff format` for the tests that hold generated code to ruff's layout (ruff is a test and
development dependency: building machines never runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from autonomic.compiler.codegen import LINE_LENGTH


def ruff_command() -> list[str]:
    """ruff, preferring the binary installed beside this interpreter."""
    beside = Path(sys.executable).with_name("ruff")
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "ruff"]


def ruff_format(source: str) -> str:
    """`ruff format` with fixed settings, so the bytes never depend on the caller's config."""
    command = [
        *ruff_command(),
        "format",
        "--isolated",
        "--line-length",
        str(LINE_LENGTH),
        "--target-version",
        "py311",
        "--stdin-filename",
        "generated.py",
        "-",
    ]
    done = subprocess.run(command, input=source.encode("utf-8"), capture_output=True, check=False)
    if done.returncode != 0:
        raise AssertionError(done.stderr.decode("utf-8", "replace").strip())
    return done.stdout.decode("utf-8")
