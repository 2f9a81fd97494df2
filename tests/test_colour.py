"""Coloured findings on a terminal (a real pseudo-terminal), plain text when piped or when
NO_COLOR is set."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checks" / "five_mistakes.fsm"
ESC = "\x1b["


def run_on_terminal(*args: str, **env: str) -> str:
    """`autonomic check` with stdout on a pseudo-terminal, as a user at a shell runs it."""
    leader, follower = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    environment.update({"TERM": "xterm-256color", **env})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "autonomic.compiler.cli", "check", *args, str(FIXTURE)],
            stdout=follower,
            stderr=subprocess.PIPE,
            env=environment,
            check=False,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # Linux: EIO once the writer is gone and the buffer is empty
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    return b"".join(chunks).decode("utf-8")


def test_terminal_output_is_coloured() -> None:
    out = run_on_terminal()
    assert f"{ESC}1m{ESC}31mE104 [error]{ESC}0m" in out
    assert f"{ESC}1m{ESC}36mhint{ESC}0m" in out


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_color_and_dumb_terminals_are_plain(env: dict[str, str]) -> None:
    out = run_on_terminal(**env)
    assert "E104 [error]" in out and ESC not in out


def test_piped_output_is_plain_and_flags_override() -> None:
    command = [sys.executable, "-m", "autonomic.compiler.cli", "check", str(FIXTURE)]
    environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    piped = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    assert "E104 [error]" in piped.stdout and ESC not in piped.stdout
    forced = subprocess.run(
        [*command, "--color", "always"], capture_output=True, text=True, check=False
    )
    assert ESC in forced.stdout
    assert ESC not in run_on_terminal("--color", "never")
    # Stripped of its colours, the terminal text is the piped text.
    coloured = run_on_terminal().replace("\r\n", "\n")
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == piped.stdout
