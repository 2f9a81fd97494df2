"""Hygiene: the whole package is mypy --strict clean and ruff clean, as DEVELOPERS.md requires."""

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
    """mypy cannot follow setuptools' editable-install import hook, so the installed layout
    (`autonomic.compiler` = compiler/, ...) is recreated with symlinks."""
    layout = tmp_path / "autonomic"
    layout.mkdir()
    for package in PACKAGES:
        (layout / package).symlink_to(ROOT / package, target_is_directory=True)
    done = _run(
        [
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            *(arg for package in PACKAGES for arg in ("-p", f"autonomic.{package}")),
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr


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
