"""A user's project against autonomic installed into a fresh virtual environment, twice: from a
built wheel (`pip install .`) and editable (`pip install -e .`).

In each, the installed `autonomic` command builds the sample project's machine
(tests/user_project), the generated module passes `ruff check` under ruff's default settings,
the project passes `mypy --strict` against the installed package (an editable install must
not hide it behind an import hook), and the project runs on SQLite with a signed ledger that
it then verifies. Marked `venv`: the slowest tests by design (about 30 s a mode). One venv
per mode, built without pip (`--without-pip`, driven by this interpreter's pip) and without
network, autonomic installed `--no-deps --no-build-isolation`, its dependencies taken from
this environment through a path file rather than installed again.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parent / "user_project"
# The fresh venv must find autonomic where it installed it, not where this process does.
CLEAN_ENVIRONMENT = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        args,
        cwd=cwd,
        env={**CLEAN_ENVIRONMENT, "PIP_NO_INPUT": "1", **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


def _copy_tree(source: Path, target: Path) -> None:
    """The files git would see (tracked or new, not ignored), symlinks kept as links."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        path = source / os.fsdecode(name)
        if not path.exists() and not path.is_symlink():
            continue  # deleted in the working tree
        destination = target / os.fsdecode(name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            destination.symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, destination)


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by both modes: the dependencies' analysis is the same in each."""
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.mark.venv
@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_user_project_builds_type_checks_and_runs(
    mode: str, tmp_path: Path, mypy_cache: Path
) -> None:
    checkout = tmp_path / "autonomic"
    _copy_tree(ROOT, checkout)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    # The dependencies (pydantic, lark, cryptography, setuptools, ...) of this environment.
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
    )
    Path(purelib.stdout.strip(), "zz_dependencies.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n"
    )
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    install += ["--no-deps", "--no-build-isolation", "--no-index"]
    _run([*install, *(["-e"] if mode == "editable" else []), str(checkout)], tmp_path)

    where = _run([str(python), "-c", "import autonomic; print(autonomic.__file__)"], tmp_path)
    home = Path(where.stdout.strip()).parent
    if mode == "editable":
        assert home == checkout / "src" / "autonomic"
    else:
        assert venv in home.parents and (home / "py.typed").is_file()
        assert (home / "compiler" / "templates").is_dir() and (
            home / "runtime" / "py.typed"
        ).is_file()

    project = tmp_path / "door_project"
    shutil.copytree(SAMPLE, project)
    bin_dir = str(venv / "bin")
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"  # the venv's own `autonomic` first
    _run(
        ["autonomic", "build", "machines", "--out", "door_app/governors", "--no-svg"],
        project,
        PATH=path,
    )
    assert (project / "door_app" / "governors" / "door.py").is_file()

    _run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "door_app/governors"],
        project,
    )
    _run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--python-executable",
            str(python),
            "--cache-dir",
            str(mypy_cache),
            "door_app",
        ],
        project,
    )

    ran = _run([str(python), "-m", "door_app.main"], project)
    assert "R006: " in ran.stdout
    assert "refused eve, unlocked for ann, locked by timer" in ran.stdout
    assert "ledger verified: True, 5 entries" in ran.stdout  # with the genesis entry
    assert _run([str(python), "-m", "autonomic", "--version"], project).stdout.startswith(
        "autonomic "
    )
