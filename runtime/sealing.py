"""Ledger sealing inside a commit: the chain head a batch appends to, verified before use,
and the checkpoints signed before commit."""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from .checkpointing import check_signer_is_active
from .errors import StoreIntegrityError
from .keychain import CONTROL_KINDS
from .ledger import GENESIS_HASH, Checkpoint, EntryData, LedgerEntry, entry_hash
from .store.base import Store, Transaction

if TYPE_CHECKING:
    from .checkpointing import CheckpointKeeper
    from .runtime import Runtime


_NEVER = sys.maxsize
_RESTORE = "restore the store from a backup; verify it with `autonomic audit verify`"
# Building hot-path tuples with tuple.__new__ skips the NamedTuple's Python-level __new__.
_new_entry_data = cast(Callable[[type[EntryData], tuple[Any, ...]], EntryData], tuple.__new__)


class _LedgerState:
    """What a runtime knows of one ledger chain (a store has one; a partitioned store one per
    partition): the head it last verified or wrote, the size its newest checkpoint covers,
    when a commit first left entries uncovered, its checkpoint keeper, and where to read the
    chain's own entries."""

    __slots__ = (
        "checked",
        "covered",
        "keeper",
        "quiet_ms",
        "quiet_seq",
        "reads",
        "uncovered_since",
        "verified_head",
    )

    def __init__(self, reads: Store, keeper: CheckpointKeeper) -> None:
        self.reads = reads
        self.keeper = keeper
        self.verified_head: LedgerEntry | None = None
        self.checked: Checkpoint | None = None  # the stored checkpoint last verified
        self.covered = 0
        self.uncovered_since: int | None = None
        # `_Chain.finish` has nothing to do for a commit that ends below `quiet_seq` before
        # `quiet_ms` (without witnesses): the memory store's commits skip it then. -1: ask it.
        self.quiet_seq = -1
        self.quiet_ms = -1

    def recheck(self) -> None:
        """`covered` or `uncovered_since` changed: the next commit asks `finish` again."""
        self.quiet_seq = self.quiet_ms = -1


class _Chain:
    """Where the next ledger entry goes: the head is read inside the transaction and verified
    before anything is chained on it (a store could hand back a modified row)."""

    __slots__ = (
        "appended",
        "hashes",
        "head",
        "loaded",
        "next_seq",
        "partition",
        "runtime",
        "state",
    )

    def __init__(self, runtime: Runtime, partition: int = 0) -> None:
        self.runtime = runtime
        self.partition = partition  # the ledger chain of a partitioned store
        self.state = runtime._ledgers[partition]
        self.loaded = False
        self.next_seq = 0
        self.head = GENESIS_HASH
        self.appended = 0
        self.hashes: list[bytes] = []  # this transaction's entry hashes, for the Merkle tree

    def load(self, txn: Transaction) -> None:
        runtime = self.runtime
        stored = txn.ledger_head()
        if stored is None:
            self.next_seq, self.head = 0, GENESIS_HASH
        else:
            state = self.state
            known = state.verified_head
            if stored is not known and stored != known:
                _verify_stored_entry(stored, "ledger head")
                self._check_checkpoint(txn, stored)
                # Another writer moved the head: the tree must be reloaded (without the hashes
                # this chain kept for it), and a rotation it wrote may have retired this
                # runtime's key.
                state.keeper.invalidate()
                self.hashes = []
                if stored.kind in CONTROL_KINDS and runtime._sealer is not None:
                    check_signer_is_active(state.reads, runtime._sealer, runtime.pinned_root)
                state.verified_head = stored
            self.next_seq, self.head = stored.seq + 1, stored.entry_hash
        if stored is None:
            last = txn.last_checkpoint()
            if last is not None and last.size > 0:
                raise StoreIntegrityError(
                    f"the ledger is empty but a checkpoint is signed at size {last.size}",
                    hint="the ledger table was truncated; restore it from a backup",
                )
        self.loaded = True

    def _check_checkpoint(self, txn: Transaction, head: LedgerEntry) -> None:
        """A head this runtime did not write (another writer's, or the first it reads): no
        signature of the ledger may be taken on the store's word. The newest checkpoint's
        signature is checked (by the key the chain held active at its size), it may not cover
        more than the ledger holds, and it must end at the head or before it. The entries
        after it, which no signature covers in checkpoint mode, must be fewer than this
        runtime's `checkpoint_every` (every writer with its policy signs at the end of the
        batch that reaches it, so a longer tail was not written by one) and chain from the
        checkpoint's head to the stored head, each matching its hash. In sign-each mode the
        head's own signature is checked. Only then is anything chained on the head."""
        runtime = self.runtime
        state = self.state
        keys = runtime._kept
        sealer = runtime._sealer
        last = txn.last_checkpoint()
        size = head.seq + 1
        if last is not None:
            if last.size > size:
                raise StoreIntegrityError(
                    f"the ledger ends at seq {head.seq} but a checkpoint is signed at size "
                    f"{last.size}: entries were removed",
                    hint=_RESTORE,
                )
            if keys is not None and last != state.checked:
                keys.check_checkpoint(txn, self.partition, last)
                state.checked = last
            state.covered = max(state.covered, last.size)
            state.recheck()
        if sealer is None or keys is None:
            return
        if sealer.mode != "checkpoint":
            if head.kind not in CONTROL_KINDS:  # those are checked from the root in `load`
                keys.check_signed(txn, self.partition, head, "the ledger head")
            if last is not None and last.size == size and last.head_hash != head.entry_hash:
                raise StoreIntegrityError(
                    f"the checkpoint at size {last.size} does not match the ledger head",
                    hint=_RESTORE,
                )
            return
        covered = 0 if last is None else last.size
        uncovered = size - covered
        if uncovered >= runtime._checkpoint_every:
            raise StoreIntegrityError(
                f"the ledger holds {uncovered} entries after its last signed checkpoint (size "
                f"{covered}), more than a runtime signing a checkpoint every "
                f"{runtime._checkpoint_every} entries leaves: no signature covers them, so "
                "nothing is chained on them",
                hint="if a runtime with a larger checkpoint_every wrote them, open the store "
                "with that setting; else verify the store with `autonomic audit verify`",
            )
        expected = GENESIS_HASH if last is None else last.head_hash
        seq = covered
        for entry in state.reads.ledger_entries(after_seq=covered - 1):
            if entry.seq > head.seq:
                break
            if entry.seq != seq or entry.prev_hash != expected:
                raise StoreIntegrityError(
                    f"ledger entry {entry.seq}, after the last signed checkpoint (size "
                    f"{covered}), does not chain on the entry before it",
                    hint=_RESTORE,
                )
            _verify_stored_entry(entry, "ledger entry after the last checkpoint")
            expected = entry.entry_hash
            seq += 1
        if seq != size or expected != head.entry_hash:
            raise StoreIntegrityError(
                f"the entries after the last signed checkpoint (size {covered}) do not lead to "
                f"the ledger head (seq {head.seq})",
                hint=_RESTORE,
            )

    def seal(self, txn: Transaction, data: EntryData) -> LedgerEntry:
        if not self.loaded:
            self.load(txn)
        sealer = self.runtime._sealer
        assert sealer is not None
        if self.next_seq == 0:
            raise StoreIntegrityError(
                "the store's ledger has no genesis entry, so nothing can be chained on it",
                hint="the ledger table was emptied; restore it from a backup",
            )
        return sealer.seal(self.next_seq, self.head, data)

    def append(self, txn: Transaction, data: EntryData) -> LedgerEntry:
        """Seal `data` on the head, append it in `txn` and move the head on to it."""
        entry = self.seal(txn, data)
        txn.append_ledger(entry)
        self.advance(entry)
        return entry

    def append_each(self, txn: Transaction, entries: Iterable[EntryData]) -> None:
        """`append` of each of `entries` in turn, in one call: a flow run's write seals several,
        each made as the one before it is appended (a generator), so that what fails first
        fails as it would one `append` at a time."""
        sealer = self.runtime._sealer
        for data in entries:
            # `seal`, inline: a call fewer for each of the run's entries.
            if not self.loaded:
                self.load(txn)
            if self.next_seq == 0 or sealer is None:
                entry = self.seal(txn, data)  # which refuses it
            else:
                entry = sealer.seal(self.next_seq, self.head, data)
            txn.append_ledger(entry)
            self.next_seq = entry.seq + 1
            self.head = digest = entry.entry_hash
            self.appended += 1
            self.hashes.append(digest)
            self.state.verified_head = entry

    def advance(self, entry: LedgerEntry) -> None:
        self.next_seq = entry.seq + 1
        self.head = entry.entry_hash
        self.appended += 1
        self.hashes.append(entry.entry_hash)
        self.state.verified_head = entry

    def finish(self, txn: Transaction, now: int | None = None) -> None:
        """Before commit, in checkpoint mode: sign a checkpoint over everything appended so
        far once `checkpoint_every` entries are uncovered, or once entries have been
        uncovered for `checkpoint_ms` (measured from the commit that first left some). In
        either mode, also when a witness publication is due (runtime/checkpointing.py).
        `now`: the clock's time, if the caller has read it already."""
        runtime = self.runtime
        sealer = runtime._sealer
        if sealer is None or not self.appended:
            return
        state = self.state
        if self.next_seq <= state.covered:  # signed meanwhile (Runtime.checkpoint)
            self.appended = 0
            return
        if now is None:
            now = runtime._clock.now_ms()
        keeper = state.keeper
        if not (keeper.witnesses and keeper.publication_due(now)):
            if sealer.mode != "checkpoint":
                state.quiet_seq = state.quiet_ms = _NEVER  # no checkpoints to sign
                return
            if self.next_seq - state.covered < runtime._checkpoint_every:
                since = state.uncovered_since
                if since is None:
                    state.uncovered_since = since = now
                    state.quiet_seq = state.covered + runtime._checkpoint_every
                    state.quiet_ms = since + runtime._checkpoint_ms
                    return
                if now - since < runtime._checkpoint_ms:
                    state.quiet_seq = state.covered + runtime._checkpoint_every
                    state.quiet_ms = since + runtime._checkpoint_ms
                    return
        state.keeper.sign(txn, sealer, self.next_seq, self.head, self.hashes, now)
        state.covered = self.next_seq
        state.uncovered_since = None
        state.recheck()
        self.appended = 0


def _verify_stored_entry(entry: LedgerEntry, what: str) -> None:
    try:
        computed = entry_hash(
            entry.seq,
            entry.ts_ms,
            (
                entry.kind,
                entry.machine,
                entry.instance,
                entry.from_state,
                entry.to_state,
                entry.event,
                entry.actor,
                entry.event_id,
            ),
            entry.payload_sha256,
            entry.prev_hash,
        )
    except (AttributeError, TypeError, ValueError, UnicodeEncodeError, struct.error) as exc:
        raise StoreIntegrityError(f"{what} (seq {entry.seq!r}) cannot be read: {exc}") from None
    if computed != entry.entry_hash:
        raise StoreIntegrityError(
            f"{what} (seq {entry.seq}) does not match its hash: the stored row was modified",
            hint="nothing was written; verify the store with `autonomic audit verify`",
        )
