"""`autonomic worker --public-key/--root`: a worker pins the ledger root it is given, as
`audit verify` takes it, through the real CLI. The case it is for: a key folder rotated
before `keygen --retire` recorded the root beside the new key (no trusted-root.json), which
the worker otherwise refuses to use on the store."""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from autonomic.compiler import cli
from autonomic.runtime.keychain import fingerprint
from autonomic.runtime.keys import generate_keypair, load_signer, now_ms
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from runtime_machines import Bindings, counter_spec

AUTONOMIC = Path(sys.executable).with_name("autonomic")
TESTS = Path(__file__).parent


@pytest.fixture
def rotated(tmp_path: Path) -> Path:
    """A store whose ledger key k0 was rotated to k1, k1's folder without trusted-root.json
    (as a rotation before the file existed left it)."""
    generate_keypair(tmp_path / "k0", valid_from_ms=now_ms() - 3_600_000)
    runtime = Runtime(
        SQLiteStore(tmp_path / "s.db"), sealer=LedgerSealer(load_signer(tmp_path / "k0"))
    )
    runtime.load(counter_spec(), *Bindings().for_spec(counter_spec())).create("c0")
    runtime.close()
    (public,) = (tmp_path / "k0").glob("*.public.json")
    with contextlib.redirect_stdout(io.StringIO()):
        argv = ["keygen", str(tmp_path / "k1"), "--retire", str(public), "--ledger"]
        assert cli.main([*argv, str(tmp_path / "s.db")]) == 0
    (tmp_path / "k1" / "trusted-root.json").unlink()
    return tmp_path


def worker(folder: Path, *pinned: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(str(AUTONOMIC), "worker", "--store", str(folder / "s.db")),
            *("--keys", str(folder / "k1"), "--app", "runtime_machines:load_counter"),
            *("--poll", "50ms", *pinned),
        ],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused(folder: Path, *pinned: str) -> tuple[int, str]:
    """Exit status and stderr of a worker that stops before working."""
    process = worker(folder, *pinned)
    out, err = process.communicate(timeout=60)
    assert out == "" and "Traceback" not in err, err
    return process.returncode, err


def ledger_rows(folder: Path) -> int:
    store = SQLiteStore(folder / "s.db")
    try:
        return sum(1 for _ in store.ledger_entries())
    finally:
        store.close()


def test_a_worker_given_the_ledger_root_works_on_a_store_rotated_before_trusted_roots(
    rotated: Path,
) -> None:
    entries = ledger_rows(rotated)
    code, err = refused(rotated)  # it pins its own key k1, which did not start the ledger
    assert code == 1 and f"{rotated / 's.db'}:1:1: R021 [error]" in err
    assert "is not the pinned root" in err and "--public-key ROOT.public.json" in err
    assert ledger_rows(rotated) == entries
    (public,) = (rotated / "k0").glob("*.public.json")
    root = fingerprint(load_signer(rotated / "k0").public_info().public_key)
    for pinned in (("--public-key", str(public)), ("--root", root)):
        process = worker(rotated, *pinned)
        assert process.stdout is not None
        assert process.stdout.readline().startswith("worker on "), process.stderr
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0 and "worker stopped:" in out, err


def test_a_bad_root_is_a_diagnostic(rotated: Path) -> None:
    code, err = refused(rotated, "--root", "k0")
    assert code == 2 and "error: --root: a root fingerprint is 64 hex digits" in err
    code, err = refused(rotated, "--root", "0" * 64, "--public-key", "k0.json")
    assert code == 2 and "not allowed with argument" in err
    missing = rotated / "missing.public.json"
    code, err = refused(rotated, "--public-key", str(missing))
    assert code == 1 and err.startswith(f"{missing}:1:1: A010 [error] key file")
    assert "= hint: pass the <key_id>.public.json" in err
    # The new key's own public file is a key, but not the one that started the ledger.
    (public,) = (rotated / "k1").glob("*.public.json")
    code, err = refused(rotated, "--public-key", str(public))
    assert code == 1 and "is not the pinned root" in err
    assert "pass the key that started this store's ledger" in err
