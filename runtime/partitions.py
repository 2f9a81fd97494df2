"""Ledger partitions: which chain an instance's entries go to, and the signed Merkle root that
commits to every chain's head at once.

A partitioned ledger is `n` independent hash chains (each exactly the single-chain ledger of
`ledger.py`: gap-free seq from 0, its own genesis entry signed by the root key, its own chained
checkpoints over its own Merkle tree). Instance `i` writes
only to chain `partition_of(i, n)`, so the entries of one instance are totally ordered (seq
order in its chain); entries of instances in different chains have no order but their
timestamps. A fleet's writers of one chain queue on that chain's head; writers of different
chains never wait for each other.

The signed root (`SignedRoot`) is Ed25519 over

    b"autonomic/ledger/root/v1\\x00" || n (4 bytes BE) || merkle_root (32) || ts_ms (8, signed)

where the Merkle tree (RFC 6962 shape: leaf 0x00-prefixed, node 0x01-prefixed, split at the
largest power of two below the count) has leaf `p` = sha256(0x00 || p (4) || size (8) ||
head_hash (32)). One signature thus commits to every chain's length and head: a verifier that
checks each chain and the root detects a chain truncated, replaced or dropped, and a changed
partition count. `heads` keeps the leaves' inputs so the root can be recomputed and each head
compared with its chain.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from .checkpointing import _check_control
from .keychain import CONTROL_KINDS, ChainError, KeyChain, RootOfTrust
from .keys import Signer
from .ledger import (
    GENESIS_HASH,
    Checkpoint,
    LedgerEntry,
    LedgerMode,
    MalformedRecord,
    Problem,
    RootLike,
    VerifyReport,
    verify_entries,
)
from .store.base import OutboxKind, OutboxMessage, Store, Transaction, WorkOutcome
from .timers import ArmedTimer

__all__ = [
    "ROOT_TAG",
    "PartitionedStore",
    "SignedRoot",
    "decode_heads",
    "encode_heads",
    "merkle_root",
    "partition_of",
]

T = TypeVar("T")

ROOT_TAG = b"autonomic/ledger/root/v1\x00"
_HEAD = struct.Struct(">Q32s")


def partition_of(instance: str, partitions: int) -> int:
    """The chain of an instance: the first 8 bytes of SHA-256 of its id, mod the count. A pure
    function of the id, so every worker and verifier agrees without asking."""
    if partitions == 1:
        return 0
    digest = hashlib.sha256(instance.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def _leaf(partition: int, size: int, head: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + struct.pack(">IQ", partition, size) + head).digest()


def _tree(nodes: Sequence[bytes]) -> bytes:
    if len(nodes) == 1:
        return nodes[0]
    split = 1 << ((len(nodes) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _tree(nodes[:split]) + _tree(nodes[split:])).digest()


def merkle_root(heads: Sequence[tuple[int, bytes]]) -> bytes:
    """The Merkle root over (size, head hash) of partitions 0..n-1."""
    if not heads:
        raise ValueError("a root needs at least one partition")
    return _tree([_leaf(p, size, head) for p, (size, head) in enumerate(heads)])


def encode_heads(heads: Sequence[tuple[int, bytes]]) -> bytes:
    return b"".join(_HEAD.pack(size, head) for size, head in heads)


def decode_heads(data: bytes) -> list[tuple[int, bytes]] | None:
    """The (size, head) list stored with a root, or None if the bytes cannot be one."""
    if not isinstance(data, bytes) or not data or len(data) % _HEAD.size:
        return None
    return [_HEAD.unpack_from(data, at) for at in range(0, len(data), _HEAD.size)]


@dataclass(frozen=True, slots=True)
class SignedRoot:
    """A signature over the Merkle root of every partition head at `ts_ms`."""

    ts_ms: int
    heads: tuple[tuple[int, bytes], ...]
    key_id: str
    signature: bytes

    @property
    def root(self) -> bytes:
        return merkle_root(self.heads)

    def signed_message(self) -> bytes:
        return (
            ROOT_TAG
            + struct.pack(">I", len(self.heads))
            + self.root
            + struct.pack(">q", self.ts_ms)
        )

    @classmethod
    def sign(cls, signer: Signer, heads: Sequence[tuple[int, bytes]], ts_ms: int) -> SignedRoot:
        signer.require_window(ts_ms)
        unsigned = cls(ts_ms, tuple(heads), signer.key_id, b"")
        return cls(ts_ms, unsigned.heads, signer.key_id, signer.sign(unsigned.signed_message()))

    def problem(self, chain: KeyChain) -> str | None:
        """Why the signature does not hold (a key the ledger's chain of keys never introduced,
        outside its window, bad), or None."""
        trusted = chain.any_introduced(self.key_id)
        if trusted is None:
            return f"signed by key id {self.key_id!r}, which the ledger never introduced"
        if not trusted.info.covers(self.ts_ms):
            return f"key {self.key_id} is not valid at {self.ts_ms} ms"
        if not trusted.verify(self.signature, self.signed_message()):
            return "bad signature"
        return None


@runtime_checkable
class PartitionedStore(Protocol):
    """What a store with a partitioned ledger and a fleet of workers offers beyond `Store`
    (the PostgreSQL store): batches bound to one partition, leased claims of due timers and
    pending messages, per-partition reads, and signed roots."""

    partitions: int

    def run(
        self,
        works: Sequence[Callable[[Transaction], T]],
        before_commit: Callable[[Transaction], None] | None = None,
        *,
        partition: int | None = 0,
    ) -> list[WorkOutcome[T]]: ...

    def partition_of(self, instance: str) -> int: ...

    def run_in_every_partition(self, work: Callable[[Callable[[int], Transaction]], T]) -> T:
        """One transaction holding every partition's head lock (see the PostgreSQL store)."""

    def in_partition(self, partition: int) -> Store:
        """The store, reading the ledger of `partition` (entries, one entry, checkpoints)."""

    def claim_due_timers(
        self, now_ms: int, machines: Sequence[str], limit: int
    ) -> list[ArmedTimer]: ...

    def claim_outbox(
        self, *, kind: OutboxKind, limit: int, due_ms: int | None = None
    ) -> list[OutboxMessage]: ...

    def lease_in(self, txn: Transaction, message_id: int) -> None:
        """Lease a message to this worker inside a unit of work (a refusal notice it
        releases), as `claim_outbox` leases the messages it returns."""

    def ledger_entry(self, seq: int, *, partition: int | None = None) -> LedgerEntry | None: ...

    def partition_heads(self) -> list[tuple[int, bytes]]: ...

    def add_root(self, root: SignedRoot) -> None: ...

    def roots(self) -> list[SignedRoot | str]:
        """Stored roots in order; a string says why a row cannot be read as one."""

    def partition_entries(self, partition: int) -> Iterator[LedgerEntry]: ...

    def partition_checkpoints(self, partition: int) -> list[Checkpoint]: ...


# ---------------------------------------------------------------------------------------------
# Verification: every partition as a ledger of its own, then every root against the chains.


def _in_partition(
    entries: Iterable[LedgerEntry], partition: int, partitions: int
) -> Iterator[LedgerEntry | MalformedRecord]:
    """The entries, with one that belongs to another partition turned into a malformed record
    (an entry moved between chains would otherwise verify in its new place). Control entries
    (genesis, key rotations) belong to every chain: each starts with its own genesis."""
    for entry in entries:
        instance = entry[4] if isinstance(entry, tuple) and len(entry) > 4 else None
        control = instance == "" and entry[2] in CONTROL_KINDS
        if (
            isinstance(instance, str)
            and not control
            and partition_of(instance, partitions) != partition
        ):
            yield MalformedRecord(
                f"an entry of instance {instance!r} (partition "
                f"{partition_of(instance, partitions)}) is stored in partition {partition}"
            )
        else:
            yield entry


def verify_partition(
    store: PartitionedStore, partition: int, root: RootLike, mode: LedgerMode | None
) -> VerifyReport:
    """One chain, exactly as a single-chain ledger is verified, plus the partition check."""
    return verify_entries(
        _in_partition(store.partition_entries(partition), partition, store.partitions),
        root,
        checkpoints=store.partition_checkpoints(partition),
        mode=mode,
    )


def _key_chain(store: PartitionedStore, root: RootLike) -> KeyChain:
    """The chain of keys of partition 0 (every partition starts from the same root key),
    replayed from its control entries; verify_partition has checked them already."""
    chain = KeyChain(RootOfTrust.of(root))
    for entry in store.in_partition(0).ledger_entries(machine="", instance=""):
        if entry.kind in CONTROL_KINDS:
            _check_control(chain, entry)
    return chain


def check_roots(
    store: PartitionedStore, reports: Sequence[VerifyReport], root_of_trust: RootLike
) -> tuple[int, tuple[Problem, str] | None]:
    """Verify every stored root: its signature, its partition count, and each head it signs
    against the verified chain (that many entries, ending in that hash). Returns how many
    roots verified and the first problem. No root at all is no problem (workers killed
    before their first root leave none): like a single chain without an external
    checkpoint, the chains then prove their content but not that none was cut off whole."""
    roots = store.roots()
    if not roots:
        return 0, None
    try:
        chain = _key_chain(store, root_of_trust)
    except ChainError as error:
        return 0, (error.problem, f"the signed roots: partition 0's keys: {error.reason}")
    for number, root in enumerate(roots):
        if isinstance(root, str):
            return number, ("malformed", root)
        label = f"root {number} (signed at {root.ts_ms} ms)"
        problem = root.problem(chain)
        if problem is not None:
            return number, ("checkpoint_signature", f"{label}: {problem}")
        if len(root.heads) != store.partitions:
            return number, (
                "checkpoint_mismatch",
                f"{label} covers {len(root.heads)} partitions; the store has {store.partitions}",
            )
        for partition, (size, head) in enumerate(root.heads):
            verified = reports[partition].count
            if size > verified:
                return number, (
                    "truncated",
                    f"{label}: partition {partition} had {size} entries, "
                    f"{verified} verify now (entries were removed)",
                )
            if size == 0:
                ok = head == GENESIS_HASH
            else:
                entry = store.ledger_entry(size - 1, partition=partition)
                ok = entry is not None and entry.entry_hash == head
            if not ok:
                return number, (
                    "checkpoint_mismatch",
                    f"{label}: partition {partition}'s head at size {size} differs",
                )
    return len(roots), None


def combine(
    reports: Sequence[VerifyReport], roots: int, root_problem: tuple[Problem, str] | None
) -> VerifyReport:
    """One report for the whole partitioned ledger: the first failing partition's reason
    (prefixed with its number), else the root problem, else success with the totals."""
    count = sum(r.count for r in reports)
    checkpoints = sum(r.checkpoints for r in reports) + roots
    first = reports[0]
    for partition, report in enumerate(reports):
        if not report.ok:
            reason = f"partition {partition}: {report.reason}"
            return VerifyReport(
                count,
                False,
                report.index,
                reason,
                report.problem,
                checkpoints,
                mode=report.mode,
                keys=report.keys,
            )
    if root_problem is not None:
        problem, reason = root_problem
        return VerifyReport(
            count, False, None, reason, problem, checkpoints, mode=first.mode, keys=first.keys
        )
    return VerifyReport(
        count, True, None, None, None, checkpoints, mode=first.mode, keys=first.keys
    )


def verify_store(store: PartitionedStore, root: RootLike, mode: LedgerMode | None) -> VerifyReport:
    """Verify every partition (in this thread) and every root."""
    reports = [verify_partition(store, p, root, mode) for p in range(store.partitions)]
    return combine(reports, *check_roots(store, reports, root))
