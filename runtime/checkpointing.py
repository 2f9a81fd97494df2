"""The runtime's checkpoints: the Merkle tree they sign, their chain, and their witnesses.

- Every stored checkpoint signs the tree root over all entries before it and the digest of
  the checkpoint stored before it, and stores its tree frontier (authenticated by the root), so
  a restarted runtime resumes the tree without reading the ledger.
- The keeper keeps that tree in memory: `committed` extends it after each commit, a failed
  commit or a head written by another process makes it reload from the last stored checkpoint.
- With witnesses, a checkpoint is signed and published after a commit when due: every
  `WitnessPolicy.every_commits` commits or `every_ms` milliseconds, whichever comes first (in
  sign-each mode too, where checkpoints are otherwise not needed). Publishing happens after the
  commit, outside the transaction: a witness that fails (`WitnessError`) is retried with the
  next publication and listed in `witness_errors`; `Runtime.close` publishes the final
  checkpoint and raises if a witness still refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import StoreIntegrityError, WitnessError
from .keychain import CONTROL_KINDS, GENESIS, ChainError, KeyChain, RootOfTrust
from .ledger import SIG_TAG, Checkpoint, LedgerEntry, LedgerSealer, entry_hash
from .merkle import EMPTY_ROOT, SubtreeHasher, TreeFrontier, consistency_proof
from .store.base import Store, Transaction
from .witness import Publication, Witness

__all__ = ["ROOT_HINT", "CheckpointKeeper", "WitnessPolicy", "check_signer_is_active"]

ROOT_HINT = (
    "verify the store with `autonomic audit verify`; a runtime pins its ledger's root key "
    "(Runtime(trusted_root=...); by default its own key, or the root `autonomic keygen "
    "--retire` records in the new key's folder)"
)


@dataclass(frozen=True, slots=True)
class WitnessPolicy:
    """When to publish: after every N-th commit, or when `every_ms` passed since the last."""

    every_commits: int = 1
    every_ms: int | None = None

    def __post_init__(self) -> None:
        if self.every_commits < 1 or (self.every_ms is not None and self.every_ms < 0):
            raise ValueError("every_commits must be >= 1 and every_ms >= 0")


class CheckpointKeeper:
    """Signs checkpoints for one runtime and publishes them to its witnesses."""

    def __init__(
        self, store: Store, witnesses: Sequence[Witness], policy: WitnessPolicy | None
    ) -> None:
        self._store = store
        self.witnesses = list(witnesses)
        self.policy = policy or WitnessPolicy()
        self._base: Checkpoint | None = None
        self._chained: bytes | None = None  # the base's digest, kept from signing it
        self._tree: TreeFrontier | None = None  # at base.size (None: reload before use)
        self._pending: list[bytes] = []  # committed entry hashes after the tree
        # The checkpoint signed in the transaction running now, and its tree and digest.
        self.staged: tuple[Checkpoint, TreeFrontier] | None = None
        self._staged_digest: bytes | None = None
        self._commits = 0
        self._published_ms: int | None = None
        self._sent: dict[int, tuple[int, bytes, TreeFrontier | None]] = {}
        self.witness_errors: list[WitnessError] = []
        self._unpublished: tuple[Checkpoint, TreeFrontier] | None = None

    # -- signing, inside the transaction ----------------------------------------------------

    def publication_due(self, now_ms: int) -> bool:
        if not self.witnesses:
            return False
        if self._commits + 1 >= self.policy.every_commits:
            return True
        every = self.policy.every_ms
        return every is not None and (
            self._published_ms is None or now_ms - self._published_ms >= every
        )

    def sign(
        self,
        txn: Transaction,
        sealer: LedgerSealer,
        size: int,
        head: bytes,
        batch: Sequence[bytes],
        ts_ms: int,
    ) -> Checkpoint:
        """Sign and store a checkpoint at `size`; `batch` holds this transaction's entry hashes
        (the last `len(batch)` entries)."""
        start = size - len(batch)
        if self._tree is None or self._tree.size + len(self._pending) != start:
            self._reload(txn, start)
        assert self._tree is not None
        tree = self._tree.extend([*self._pending, *batch])
        checkpoint, digest = sealer.chained_checkpoint(
            size, head, ts_ms, tree, self._base, self._chained
        )
        txn.add_checkpoint(checkpoint)
        self.staged = (checkpoint, tree)
        self._staged_digest = digest
        return checkpoint

    def _reload(self, txn: Transaction, upto: int) -> None:
        last = txn.last_checkpoint()
        if last is None:
            tree = TreeFrontier()
        else:
            found = TreeFrontier.from_bytes(last.size, last.frontier)
            if found is None or found.root() != last.tree_root:
                raise StoreIntegrityError(
                    f"the stored checkpoint at size {last.size} holds a Merkle frontier that "
                    "does not match its signed tree root: the row was modified",
                    hint="verify the store with `autonomic audit verify`",
                )
            tree = found
        self._base, self._chained, self._tree = last, None, tree
        self._pending = [
            entry.entry_hash
            for entry in self._store.ledger_entries(after_seq=tree.size - 1)
            if entry.seq < upto
        ]

    # -- after the transaction -----------------------------------------------------------------

    def committed(self, batch: Sequence[bytes], now_ms: int) -> None:
        """The transaction committed: move the tree on, then publish if due."""
        staged, self.staged = self.staged, None
        if not batch and staged is None:
            return
        self._commits += 1
        if staged is not None:
            self._base, self._tree = staged
            self._chained = self._staged_digest
            self._pending = []
            if self.witnesses and self.publication_due_after(now_ms):
                self._publish(staged)
            elif self.witnesses:
                self._unpublished = staged
        elif self._tree is not None:
            self._pending.extend(batch)

    def publication_due_after(self, now_ms: int) -> bool:
        if self._commits >= self.policy.every_commits:
            return True
        every = self.policy.every_ms
        return every is not None and (
            self._published_ms is None or now_ms - self._published_ms >= every
        )

    def failed(self) -> None:
        """The transaction rolled back: forget what it staged, reload the tree next time."""
        self.staged = None
        self._tree = None

    def invalidate(self) -> None:
        """Another writer moved the head: reload the tree before the next checkpoint."""
        self._tree = None

    def flush(self) -> None:
        """Publish a checkpoint that was signed but not yet published; raise if one fails."""
        if self._unpublished is not None:
            self._publish(self._unpublished)
        if self.witness_errors:
            raise self.witness_errors[-1]

    def _publish(self, staged: tuple[Checkpoint, TreeFrontier]) -> None:
        checkpoint, tree = staged
        self._commits = 0
        self._published_ms = checkpoint.ts_ms
        self._unpublished = None
        errors: list[WitnessError] = []
        for index, witness in enumerate(self.witnesses):
            try:
                sent = self._sent.get(index) or self._what_witness_holds(witness)
                publication = self._publication(checkpoint, tree, sent)
                witness.publish(publication)
            except WitnessError as error:
                errors.append(error)
                continue
            self._sent[index] = (checkpoint.size, checkpoint.tree_root, tree)
        self.witness_errors = errors
        if errors:
            self._unpublished = staged  # retried with the next publication, or by flush

    @staticmethod
    def _what_witness_holds(witness: Witness) -> tuple[int, bytes, TreeFrontier | None]:
        last_of = getattr(witness, "last", None)
        held = last_of() if callable(last_of) else None
        if isinstance(held, Publication):
            return held.checkpoint.size, held.checkpoint.tree_root, None
        return 0, EMPTY_ROOT, TreeFrontier()

    def _publication(
        self,
        checkpoint: Checkpoint,
        tree: TreeFrontier,
        sent: tuple[int, bytes, TreeFrontier | None],
    ) -> Publication:
        size, root, known = sent
        if size > checkpoint.size:
            raise WitnessError(
                f"the witness holds a checkpoint at size {size}, beyond this ledger's "
                f"{checkpoint.size} entries: the ledger was truncated"
            )
        hashes: dict[int, bytes] = {}
        needed_from = size if known is not None else 0

        def entry_hash(seq: int) -> bytes:
            if not hashes:
                for entry in self._store.ledger_entries(after_seq=needed_from - 1):
                    if entry.seq >= checkpoint.size:
                        break
                    hashes[entry.seq] = entry.entry_hash
            return hashes[seq]

        proof = consistency_proof(size, checkpoint.size, SubtreeHasher(entry_hash, known))
        return Publication(checkpoint, size, root, tuple(proof))


def check_signer_is_active(store: Store, sealer: LedgerSealer, root: RootOfTrust) -> None:
    """Refuse to sign with a key the ledger's own chain of keys does not hold active.

    The control entries are read by their (machine, instance) index and checked against their
    hashes and signatures from the pinned `root` on (the genesis entry must declare that very
    key: a chain rewritten from another root, even one that rotates to this runtime's key, is
    refused); a runtime holding any other key (never introduced, or retired by a rotation)
    stops before it writes anything.
    """
    control = [
        entry
        for entry in store.ledger_entries(machine="", instance="")
        if entry.kind in CONTROL_KINDS
    ]
    if not control:
        return
    genesis = control[0]
    if genesis.seq != 0 or genesis.kind != GENESIS:
        raise StoreIntegrityError(
            "the store's ledger does not start with its genesis entry",
            hint="verify the store with `autonomic audit verify`",
        )
    chain = KeyChain(root)
    try:
        for entry in control:
            _check_control(chain, entry)
    except (ChainError, KeyError, TypeError, ValueError) as exc:
        raise StoreIntegrityError(
            f"the ledger's chain of keys does not verify: {exc}",
            hint=ROOT_HINT,
        ) from None
    if chain.mode != sealer.mode:
        raise StoreIntegrityError(
            f"the ledger's genesis entry declares {chain.mode} mode; this runtime signs in "
            f"{sealer.mode} mode",
            hint="one ledger keeps one mode: open it with the mode it was written in",
        )
    if sealer.signer.key_id not in chain.active:
        active = ", ".join(sorted(chain.active)) or "none"
        raise StoreIntegrityError(
            f"this runtime signs with key {sealer.signer.key_id}, which the ledger's chain of "
            f"keys does not hold active (active: {active})",
            hint="start the runtime with the key the last rotation introduced, or rotate to "
            "this key with `autonomic keygen NEW_DIR --retire OLD.public.json --ledger STORE`",
        )


def _check_control(chain: KeyChain, entry: LedgerEntry) -> None:
    if entry_hash(entry.seq, entry.ts_ms, entry[2:10], entry.payload_sha256, entry.prev_hash) != (
        entry.entry_hash
    ):
        raise ChainError("rotation", f"the control entry at seq {entry.seq} was modified")
    if entry.kind == GENESIS:
        trusted = chain.genesis(entry.seq, entry.event, entry.key_id)
    else:
        trusted = chain.signer(entry.seq, entry.key_id, entry.ts_ms, f"{entry.kind} entry")
    if not trusted.verify(entry.signature, SIG_TAG + entry.entry_hash):
        raise ChainError("rotation", f"bad signature on the {entry.kind} entry at seq {entry.seq}")
    if entry.kind != GENESIS:
        chain.apply(entry.seq, entry.kind, entry.event)
