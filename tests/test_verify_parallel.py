"""Verifying a SQLite ledger in seq ranges gives the single pass's answer, tampered or not."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from autonomic.runtime.keys import Keyring, generate_keypair, load_signer
from autonomic.runtime.ledger import (
    EntryData,
    LedgerMode,
    LedgerSealer,
    MemoryLedger,
    payload_digest,
    read_ledger,
)
from autonomic.runtime.verify_parallel import verify_source
from ledger_files import write_sqlite_ledger

SIZE = 97  # ranges of 24 and 25 entries at 4 processes: boundaries inside checkpoint spans
T0 = 1_767_225_600_000
TAMPERING = {
    "untouched": None,
    "content": "UPDATE ledger SET actor = 'mallory' WHERE seq = 50",
    "boundary entry": "UPDATE ledger SET actor = 'mallory' WHERE seq = 23",
    "first after a boundary": "UPDATE ledger SET prev_hash = zeroblob(32) WHERE seq = 24",
    "missing at a boundary": "DELETE FROM ledger WHERE seq = 48",
    "negative seq": "UPDATE ledger SET seq = -1 WHERE seq = 0",
    "seq past the end": "UPDATE ledger SET seq = 500 WHERE seq = 96",
    "tail cut": "DELETE FROM ledger WHERE seq > 90",
    "last checkpoint gone": "DELETE FROM ledger_checkpoints WHERE size = 97",
    "checkpoint forged": "UPDATE ledger_checkpoints SET signature = zeroblob(64) WHERE size = 50",
}


def build(path: Path, mode: LedgerMode, keys: Path) -> Keyring:
    generate_keypair(keys, valid_from_ms=T0)
    signer = load_signer(keys)
    ledger = MemoryLedger(LedgerSealer(signer, mode))
    for number in range(SIZE):
        ledger.append(
            EntryData(
                T0 + number,
                "transition",
                "Door",
                f"d{number % 5}",
                "Closed",
                "Opened",
                "Open",
                "ops",
                "",
                payload_digest({"n": number}),
            )
        )
        if mode == "checkpoint" and number % 10 == 9:
            ledger.checkpoint(T0 + number)
    if mode == "checkpoint":
        ledger.checkpoint(T0 + SIZE)
    write_sqlite_ledger(path, ledger)
    return Keyring([signer.public_info()])


@pytest.mark.parametrize("mode", ["checkpoint", "sign-each"])
def test_ranges_report_what_one_pass_reports(tmp_path: Path, mode: LedgerMode) -> None:
    keyring = build(tmp_path / "clean.db", mode, tmp_path / "keys")
    for name, statement in TAMPERING.items():
        path = tmp_path / f"{name}.db"
        shutil.copyfile(tmp_path / "clean.db", path)
        if statement is not None:
            with sqlite3.connect(path) as connection:
                connection.execute(statement)
            connection.close()
        with read_ledger(path) as source:
            single = source.verify(keyring)
        with read_ledger(path) as source:
            ranges = verify_source(source, keyring, processes=4, parallel_from=1)
        # A range that passes must never hide what the single pass finds, and vice versa.
        assert ranges == single, name
        assert ranges.ok is (statement is None) or mode == "sign-each", name
