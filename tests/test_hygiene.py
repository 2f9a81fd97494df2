"""Hygiene: the whole package is mypy --strict clean and ruff clean, as the guide requires."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compiler", "runtime", "generated")


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )


def test_package_is_mypy_strict_clean(tmp_path: Path) -> None:
    """src/autonomic is the installed layout (the packages are linked into it)."""
    done = _run(
        [
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "-p",
            "autonomic",
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT / "src")},
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_installed_layout_links_every_package() -> None:
    """What mypy checks above and what the wheel holds are the tree's own packages."""
    for package in PACKAGES:
        assert (ROOT / "src" / "autonomic" / package).resolve() == ROOT / package


def test_ruff_check_is_clean() -> None:
    done = _run(["ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_is_clean() -> None:
    done = _run(["ruff", "format", "--check", "--no-cache", str(ROOT)], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_generic_top_level_packages_are_installed() -> None:
    """Installed import names are namespaced: no top-level `compiler` or `runtime`."""
    probe = (
        "import importlib.util as u, autonomic.compiler, autonomic.runtime, autonomic.generated;"
        "print(u.find_spec('compiler') is None and u.find_spec('runtime') is None)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path("/"),
    )
    assert done.stdout.strip() == "True", done.stdout + done.stderr


def test_python_dash_m_runs_the_command_line() -> None:
    """`python -m autonomic` is the `autonomic` command, from any folder."""
    done = subprocess.run(
        [sys.executable, "-m", "autonomic", "check", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path("/"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: autonomic check")
