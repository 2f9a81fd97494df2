"""Runs the autonomic CLI as a subprocess, as a user's shell would, with colour off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def autonomic(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autonomic.compiler.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=900,
    )
