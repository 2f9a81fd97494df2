"""Ledger benchmark: what the Merkle tree (RFC 9162) costs and what it buys.

Run: `python benchmarks/ledger.py [--quick]`. Every figure is a ratio of two timings taken in
the same process, best of several passes (the machine is shared and noisy):

- tree_vs_chain: building the Merkle tree over N entry hashes (leaf and node hashes, as the
  runtime and the verifier do) against recomputing the N entry hashes themselves, which
  verification does anyway: the tree's share of a verification pass.
- verify_with_tree: the whole verification as shipped (chain, checkpoints, tree roots) against
  the same pass's baseline, the raw SHA-256 of the N encoded entries.
- seal_with_tree: sealing N entries and extending the tree by them (what a checkpoint-mode
  commit does) against sealing alone.
- witness_check: a witness checking that a checkpoint of size n extends its checkpoint of size
  m from a consistency proof, against the strongest alternative without a tree: re-hashing the
  n - m new entries from the old head (the witness would also have to fetch them).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import time
from collections.abc import Callable

from autonomic.runtime.keys import Signer
from autonomic.runtime.ledger import (
    EMPTY_PAYLOAD_DIGEST,
    EntryData,
    LedgerEntry,
    LedgerSealer,
    MemoryLedger,
    encode_entry,
    verify_entries,
)
from autonomic.runtime.merkle import (
    SubtreeHasher,
    TreeFrontier,
    consistency_proof,
    verify_consistency,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def best(function: Callable[[], object], passes: int) -> float:
    """The best wall time of `passes` runs, with the garbage collector off."""
    times = []
    for _ in range(passes):
        gc.disable()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        gc.enable()
    return min(times)


def entries(count: int) -> tuple[MemoryLedger, list[LedgerEntry]]:
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    ledger = MemoryLedger(LedgerSealer(signer, "checkpoint"), genesis_ts_ms=0)
    for n in range(1, count):
        ledger.append(
            EntryData(
                n,
                "transition",
                "Door",
                f"door-{n % 100:06d}",
                "Closed",
                "Opened",
                "Open",
                "system",
                "",
                EMPTY_PAYLOAD_DIGEST,
            )
        )
        if n % 100 == 0:
            ledger.checkpoint(n)
    ledger.checkpoint(count)
    return ledger, list(ledger.entries())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller ledgers, fewer passes")
    args = parser.parse_args()
    count = 20_000 if args.quick else 100_000
    passes = 3 if args.quick else 5
    ledger, stored = entries(count)
    hashes = [e.entry_hash for e in stored]
    encoded = [
        encode_entry(e.seq, e.ts_ms, tuple(e[2:10]), e.payload_sha256, e.prev_hash)  # type: ignore[arg-type]
        for e in stored
    ]
    sha256 = hashlib.sha256
    rows: list[tuple[str, float, float, str]] = []

    chain = best(lambda: [sha256(m).digest() for m in encoded], passes)
    tree = best(lambda: TreeFrontier().extend(hashes).root(), passes)
    rows.append(("tree_vs_chain", chain, tree, f"{count} entries"))

    checkpoints = list(ledger.checkpoints())
    root = ledger.sealer.signer.public_info()

    def verify() -> None:
        report = verify_entries(stored, root, checkpoints=checkpoints, mode="checkpoint")
        assert report.ok, report

    rows.append(("verify_with_tree", chain, best(verify, passes), f"{len(checkpoints)} ckpts"))

    sealer = LedgerSealer(Signer.from_private_key(Ed25519PrivateKey.generate()), "checkpoint")
    data = [
        EntryData(n, "transition", "Door", f"d{n}", "A", "B", "E", "s", "", EMPTY_PAYLOAD_DIGEST)
        for n in range(count)
    ]

    def seal_only() -> None:
        head = bytes(32)
        for n, item in enumerate(data, start=1):
            head = sealer.seal(n, head, item).entry_hash

    def seal_and_tree() -> None:
        head, frontier, batch = bytes(32), TreeFrontier(), []
        for n, item in enumerate(data, start=1):
            head = sealer.seal(n, head, item).entry_hash
            batch.append(head)
            if len(batch) == 32:  # a commit batch
                frontier = frontier.extend(batch)
                batch = []
        frontier.extend(batch).root()

    rows.append(
        ("seal_with_tree", best(seal_only, passes), best(seal_and_tree, passes), "batch 32")
    )

    oracle = SubtreeHasher(lambda i: hashes[i])
    for old, new in ((count // 2, count), (count - 1000, count)):
        old_root = TreeFrontier().extend(hashes[:old]).root()
        new_root = TreeFrontier().extend(hashes).root()
        proof = consistency_proof(old, new, oracle)

        def check(
            o: int = old,
            r: bytes = old_root,
            p: list[bytes] = proof,
            n: int = new,
            nr: bytes = new_root,
        ) -> None:
            assert verify_consistency(o, r, n, nr, p)

        def rehash(o: int = old) -> None:
            for message in encoded[o:]:
                sha256(message).digest()

        rows.append(
            (
                f"witness_check {old}->{new}",
                best(rehash, passes),
                best(check, passes * 20),
                f"proof {len(proof)} hashes",
            )
        )

    print(f"{'figure':<28} {'baseline ms':>12} {'subject ms':>12} {'ratio':>9}  note")
    for name, baseline, subject, note in rows:
        ratio = baseline / subject
        print(f"{name:<28} {baseline * 1e3:>12.3f} {subject * 1e3:>12.3f} {ratio:>9.3f}  {note}")
    print("ratio = baseline time / subject time (higher is better for the subject)")


if __name__ == "__main__":
    main()
