"""Witnesses and the Merkle tree: published checkpoints outside the database, consistency
proofs, truncation named by a witness, key rotation in a running runtime."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import pytest
from autonomic.runtime.audit_cli import main
from autonomic.runtime.checkpointing import WitnessPolicy
from autonomic.runtime.errors import StoreIntegrityError, WitnessError
from autonomic.runtime.keys import Signer, generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerMode, LedgerSealer, verify_ledger
from autonomic.runtime.merkle import (
    EMPTY_ROOT,
    SubtreeHasher,
    TreeFrontier,
    consistency_proof,
    leaf_hash,
    node_hash,
    verify_consistency,
)
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from autonomic.runtime.witness import CommandWitness, FileWitness, Publication, read_witness_file
from runtime_machines import Bindings, counter_spec

START = 1_800_000_000_000


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 2.1.1 MTH, written out recursively as the reference."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def _subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    """RFC 9162 2.1.4.1 SUBPROOF, written out recursively as the reference."""
    n = len(leaves)
    if m == n:
        return [] if complete else [_mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), _mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), _mth(leaves[:k])]


def test_tree_and_proofs_match_rfc_9162() -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(40)]
    for n in range(41):
        assert TreeFrontier().extend(leaves[:n]).root() == _mth(leaves[:n])
        for m in range(n + 1):
            known = TreeFrontier().extend(leaves[:m])
            proof = consistency_proof(m, n, SubtreeHasher(lambda i: leaves[i], known))
            assert proof == (_subproof(m, leaves[:n], True) if 0 < m < n else [])
            assert verify_consistency(m, _mth(leaves[:m]), n, _mth(leaves[:n]), proof)
            if 0 < m < n:
                # Another history of the same length never passes.
                other = [*leaves[: m - 1], bytes(32), *leaves[m:n]]
                assert not verify_consistency(m, _mth(other[:m]), n, _mth(leaves[:n]), proof)
                assert not verify_consistency(m, _mth(leaves[:m]), n, _mth(other), proof)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "main"
    generate_keypair(folder, valid_from_ms=START - 1000)
    return folder


def _runtime(
    path: Path, signer: Signer, mode: LedgerMode = "checkpoint", **options: object
) -> Runtime:
    clock = VirtualClock(START)
    return Runtime(SQLiteStore(path), clock=clock, sealer=LedgerSealer(signer, mode), **options)  # type: ignore[arg-type]


def _counters(runtime: Runtime, count: int, prefix: str = "c") -> None:
    spec = counter_spec()
    loaded = runtime.governors.get(spec.name)
    counter = loaded or runtime.load(spec, *Bindings().for_spec(spec))
    for number in range(count):
        counter.create(f"{prefix}{number}")
        counter.dispatch(f"{prefix}{number}", "Tick")


@pytest.mark.parametrize("mode", ["checkpoint", "sign-each"])
def test_every_commit_is_published_and_a_cut_is_named(
    tmp_path: Path, key_dir: Path, mode: LedgerMode, capsys: pytest.CaptureFixture[str]
) -> None:
    store, witness = tmp_path / "store.db", tmp_path / "elsewhere" / "witness.jsonl"
    witness.parent.mkdir()
    signer = load_signer(key_dir)
    runtime = _runtime(store, signer, mode, witnesses=[FileWitness(witness)])
    _counters(runtime, 5)
    runtime.close()
    newest, count = read_witness_file(witness)
    assert count == 11 and newest.size == 11  # the genesis commit and ten more, each alone
    lines = witness.read_text().splitlines()
    first, last = Publication.from_line(lines[0]), Publication.from_line(lines[-1])
    assert (first.from_size, last.from_size) == (0, 10) and last.proof
    root = key_dir / f"{signer.key_id}.public.json"
    argv = ["audit", "verify", str(store), "--public-key", str(root), "--witness", str(witness)]
    assert main(argv) == 0
    assert "not truncated: the ledger holds all 11 entries" in capsys.readouterr().out
    with sqlite3.connect(store) as connection:  # cut the tail with its checkpoints
        connection.execute("DELETE FROM ledger WHERE seq >= 8")
        connection.execute("DELETE FROM ledger_checkpoints WHERE size > 8")
    connection.close()
    assert verify_ledger(store, signer.public_info()).ok  # the store alone cannot tell
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{store}: seq 8: truncated: the newest witnessed checkpoint")
    assert "(3 entries are missing)" in out


def test_a_witness_refuses_a_rewritten_history(tmp_path: Path, key_dir: Path) -> None:
    witness = tmp_path / "witness.jsonl"
    signer = load_signer(key_dir)
    first = _runtime(tmp_path / "a.db", signer, witnesses=[FileWitness(witness)])
    _counters(first, 2, prefix="a")
    first.close()
    before = witness.read_bytes()
    # Another history (another store) published to the same witness: the proof from the size
    # the witness holds fails, nothing is appended, and closing says so.
    second = _runtime(tmp_path / "b.db", signer, witnesses=[FileWitness(witness)])
    _counters(second, 3, prefix="b")
    assert second.witness_errors and "does not extend" in second.witness_errors[0].message
    with pytest.raises(WitnessError):
        second.close()
    assert witness.read_bytes() == before
    assert verify_ledger(tmp_path / "b.db", signer.public_info()).ok  # nothing was lost


def test_command_witness_policy_and_failures(tmp_path: Path, key_dir: Path) -> None:
    signer = load_signer(key_dir)
    received = tmp_path / "received.jsonl"
    command = CommandWitness(["sh", "-c", f"cat >> '{received}'"])
    policy = WitnessPolicy(every_commits=4)
    runtime = _runtime(tmp_path / "s.db", signer, witnesses=[command], witness_policy=policy)
    _counters(runtime, 4)  # the genesis commit and eight more
    runtime.close()  # publishes the last checkpoint too
    sizes = [
        Publication.from_line(line).checkpoint.size for line in received.read_text().splitlines()
    ]
    assert sizes == [4, 8, 9]
    failing = CommandWitness([sys.executable, "-c", "import sys; sys.exit('offline')"])
    runtime = _runtime(tmp_path / "f.db", signer, witnesses=[failing])
    _counters(runtime, 1)
    assert "exited with 1: offline" in runtime.witness_errors[0].message
    with pytest.raises(WitnessError):
        runtime.close()
    assert verify_ledger(tmp_path / "f.db", signer.public_info()).count == 3


def test_rotation_in_a_running_runtime(tmp_path: Path, key_dir: Path) -> None:
    old = load_signer(key_dir)
    generate_keypair(tmp_path / "new", valid_from_ms=START - 1000)
    new = load_signer(tmp_path / "new")
    store, witness = tmp_path / "s.db", tmp_path / "w.jsonl"
    runtime = _runtime(store, old, witnesses=[FileWitness(witness)])
    _counters(runtime, 1, prefix="before")
    rotation = runtime.rotate_key(new)
    _counters(runtime, 1, prefix="after")
    runtime.close()
    entries = list(SQLiteStore(store).ledger_entries())
    assert rotation.kind == "key_rotation" and rotation.key_id == old.key_id
    body = json.loads(rotation.event)
    assert body["new_key"]["key_id"] == new.key_id and body["retires"] == [old.key_id]
    report = verify_ledger(
        store, old.public_info(), external_checkpoint=read_witness_file(witness)[0]
    )
    assert report.ok and report.keys == (old.key_id, new.key_id), report.reason
    assert len(entries) == report.count == 6
    # The retired key no longer opens the store; the new key does, pinned to the root.
    with pytest.raises(StoreIntegrityError, match="does not hold active"):
        _runtime(store, old)
    with pytest.raises(StoreIntegrityError, match="is not the pinned root"):
        _runtime(store, new)  # by default a runtime's own key is its ledger's root
    _runtime(store, new, trusted_root=old.public_info()).close()
