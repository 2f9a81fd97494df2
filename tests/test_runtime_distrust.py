"""The runtime trusts nothing it reads from the store: attacks that tamper with the real SQLite
file or PostgreSQL rows (someone with database access and no signing key) are refused with a
StoreIntegrityError naming what is wrong, and nothing is written or lost. Each attack here was
accepted by the runtime before its check existed."""

from __future__ import annotations

import pytest
from autonomic.runtime.errors import StoreIntegrityError
from autonomic.runtime.keys import Signer
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import marketplace
from test_emit_routing import disputed

CASE, CUSTOMER = "case-1", "cust-1"
EVIDENCE = {"evidence_ref": "ev-1", "submitted_at": "2026-01-02T00:00:00+00:00"}


def count(stores: Stores, table: str) -> int:
    return int(stores.rows("m", f"SELECT count(*) FROM {table}")[0][0])


@pytest.mark.parametrize("tamper", ["kept_seq -1, data deleted", "kept_seq -1"])
def test_replay_from_a_snapshot_checks_its_kept_entry_against_the_ledger(
    stores: Stores, tamper: str
) -> None:
    """Redteam a10: the snapshot after EvidenceSubmitted names the case's kept entry; set its
    kept_seq to -1 (and delete the kept data), and replay from it must still find the kept
    entry in the ledger and refuse, as replay without it does."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, _, _ = marketplace(stores.open("m"), signer=signer, snapshot_every=1)
    disputed(runtime, CUSTOMER, CASE)
    runtime.governor("Compliance").dispatch(CASE, "EvidenceSubmitted", EVIDENCE)
    runtime.close()
    stores.rows("m", f"UPDATE snapshots SET kept_seq = -1 WHERE instance = '{CASE}'")
    if "deleted" in tamper:
        stores.rows("m", f"DELETE FROM instance_data WHERE instance = '{CASE}'")
    entries = count(stores, "ledger")
    runtime, _, _ = marketplace(stores.open("m"), signer=signer, snapshot_every=1)
    with runtime:
        with pytest.raises(StoreIntegrityError, match="names no kept entry as its kept entry"):
            runtime.replay("Compliance", CASE)
        if "deleted" in tamper:
            with pytest.raises(StoreIntegrityError, match=r"no longer holds|commits to"):
                runtime.replay("Compliance", CASE, use_snapshot=False)
        else:
            assert runtime.replay("Compliance", CASE, use_snapshot=False).data is not None
    assert count(stores, "ledger") == entries
