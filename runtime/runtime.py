"""The Runtime: the store, the clock, the ledger sealer and the loaded governors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from .bindings import bind
from .checkpointing import CheckpointKeeper, WitnessPolicy, check_signer_is_active
from .commit import AsyncBatcher, GroupCommit
from .dispatch import Governor
from .errors import (
    NestedDispatch,
    StoreConfigError,
    StoreIntegrityError,
    UnknownMachine,
    WitnessError,
)
from .inputs import DEFAULT_LIMITS, InputLimits, check_identifier
from .instance_data import KeptLedger
from .keychain import RootOfTrust, fingerprint
from .keys import Signer
from .ledger import Checkpoint, EntryData, LedgerEntry, LedgerSealer, RootLike, VerifyReport
from .notice_deadlines import escalate_due
from .outbox import CHUNK_SIZE, deliver_outbox, mark
from .partitions import PartitionedStore, SignedRoot
from .replay import replay, verify
from .resilience.claims import DEFAULT_CLAIM_LEASE_MS, OutsideClaims
from .resilience.deadlines import DeadlineEscalation
from .resilience.policies import (
    ActionPolicies,
    BreakerJournal,
    Noted,
    write_noted,
)
from .results import Delivery, ReplayedState, TimerFiring
from .sealing import _Chain, _LedgerState
from .store.base import OutboxMessage, OutboxStatus, Store, Transaction, WorkOutcome
from .store.memory import MemoryStore
from .store.row_seals import row_key
from .tables import MachineSpec
from .timer_firing import fire_due, next_deadline
from .timers import Clock, SystemClock, resolve_settings
from .witness import Witness

T = TypeVar("T")
_P = ParamSpec("_P")


def _first_partition(instance: str) -> int:
    return 0


def _pinned_root(sealer: LedgerSealer, trusted_root: RootLike | None) -> RootOfTrust:
    """The root of trust a runtime holds its ledger's chain of keys to: `trusted_root`, or by
    default its own signing key (which a ledger it starts names as its root). A runtime that
    signs with a key a rotation introduced is given the root (`load_trusted_root`)."""
    if trusted_root is not None:
        return RootOfTrust.of(trusted_root)
    return RootOfTrust(fingerprint(sealer.signer.public_info().public_key))


TIMER_ACTOR = "timer"
DAY_MS = 86_400_000
# The memory store's checkpoint defaults: it commits every dispatch alone.
MEMORY_CHECKPOINT_EVERY = 1000
MEMORY_CHECKPOINT_MS = 1000


def _closes_store_on_failure(
    init: Callable[Concatenate[Runtime, _P], None],
) -> Callable[Concatenate[Runtime, _P], None]:
    """A Runtime owns its store (`close` closes it): if it cannot be built, nobody else can
    close the store it was given, so the failure closes it (a PostgreSQL pool left to the
    garbage collector is reclaimed in one of its own threads, which cannot join itself)."""

    @functools.wraps(init)
    def build(self: Runtime, /, *args: _P.args, **options: _P.kwargs) -> None:
        try:
            init(self, *args, **options)
        except BaseException:
            store = cast("Store | None", args[0] if args else options.get("store"))
            if store is not None:
                with contextlib.suppress(Exception):  # why the runtime failed matters more
                    store.close()
            raise

    return build


class Runtime:
    """Owns the store, the clock, the ledger sealer and the loaded governors.

    `store` defaults to a MemoryStore. `sealer` None runs without an audit ledger (no entries,
    no replay). Checkpoint mode signs a checkpoint at the end of a commit batch when at least
    `checkpoint_every` entries are uncovered, or when entries have been uncovered for
    `checkpoint_ms`. By default a transactional store signs one per commit batch (every
    acknowledged change is covered; concurrent dispatches share batches), and the memory
    store, which commits each dispatch alone and keeps nothing across a crash, one per 1000
    entries or per second. `checkpoint()` signs on demand, `close()` signs the rest.
    `snapshot_every`: store a snapshot of an instance every N versions.
    `dedup_retention_ms`: processed event ids and idempotency keys older than this are
    forgotten by `purge_expired`.

    The ledger: a new store's first entry is the genesis entry (the signer's key as the root,
    the mode); an existing ledger is opened only with a key its chain of keys holds active
    (`rotate_key` writes a rotation), that chain followed from the root the runtime pins:
    `trusted_root` (a public key, its fingerprint or a RootOfTrust), by default the signer's
    own key. A runtime signing with a key a rotation introduced is given the root
    (`keys.load_trusted_root` reads the one `autonomic keygen --retire` records beside it): a
    chain the store rewrote from another root, even one rotating to this runtime's key, is
    refused. `witnesses` receive signed checkpoints outside the
    database as `witness_policy` says (see runtime/checkpointing.py). `limits` bound payload
    size and nesting (runtime/inputs.py). `action_threads`: how many of the actions a policy
    names (outside calls) `dispatch_async` runs at once (see runtime/dispatch.py).
    `claim_lease_ms`: how long a dispatch's claim on an event id or idempotency key whose
    outside calls it runs lasts if its process dies or stalls (runtime/resilience/claims.py);
    a live holder renews it every third of the lease while its calls run.
    With a sealer, every operational row is sealed under a key derived from the signer's
    (runtime/store/row_seals.py). `adopt_unsealed_rows`: seal, as they are, the rows of a
    store that was never sealed (written before rows were sealed); without it such a store is
    refused, since someone without the key may have stripped the seals and rewritten the rows.
    """

    @_closes_store_on_failure
    def __init__(
        self,
        store: Store | None = None,
        *,
        clock: Clock | None = None,
        sealer: LedgerSealer | None = None,
        checkpoint_every: int | None = None,
        checkpoint_ms: int | None = None,
        snapshot_every: int = 100,
        dedup_retention_ms: int = 7 * DAY_MS,
        timer_actor: str = TIMER_ACTOR,
        max_batch: int = 512,
        witnesses: Sequence[Witness] = (),
        witness_policy: WitnessPolicy | None = None,
        limits: InputLimits = DEFAULT_LIMITS,
        action_threads: int = 32,
        claim_lease_ms: int = DEFAULT_CLAIM_LEASE_MS,
        trusted_root: RootLike | None = None,
        adopt_unsealed_rows: bool = False,
    ) -> None:
        check_identifier("timer actor", timer_actor)
        if witnesses and sealer is None:
            raise ValueError("witnesses keep signed checkpoints: pass a sealer too")
        self._limits = limits
        self._store: Store = MemoryStore() if store is None else store
        self._memory = self._store if isinstance(self._store, MemoryStore) else None
        if checkpoint_every is None:
            checkpoint_every = 1 if self._memory is None else MEMORY_CHECKPOINT_EVERY
        if checkpoint_ms is None:
            checkpoint_ms = 0 if self._memory is None else MEMORY_CHECKPOINT_MS
        if checkpoint_every < 1 or snapshot_every < 1 or dedup_retention_ms < 0:
            raise ValueError("checkpoint_every and snapshot_every must be >= 1, retention >= 0")
        if checkpoint_ms < 0:
            raise ValueError("checkpoint_ms must be >= 0")
        self._clock: Clock = SystemClock() if clock is None else clock
        self._sealer = sealer
        self._checkpoint_every = checkpoint_every
        self._checkpoint_ms = checkpoint_ms
        self._snapshot_every = snapshot_every
        self._retention_ms = dedup_retention_ms
        self._timer_actor = timer_actor
        self._governors: dict[str, Governor] = {}
        # A partitioned store (PostgreSQL) keeps one ledger chain per partition, each with its
        # own committer: batches of different chains commit in parallel, on their own
        # connections. Other stores have one chain, partition 0.
        self._partitioned = store if isinstance(store, PartitionedStore) else None
        partitions = 1 if self._partitioned is None else self._partitioned.partitions
        if witnesses and partitions > 1:
            raise StoreConfigError(
                f"witnesses keep one chain of checkpoints; this store's ledger has {partitions} "
                "partitions",
                hint="witness a store with one ledger partition (`autonomic db migrate "
                "--partitions 1`), or rely on the signed roots over the partition heads",
            )
        self._partition_of: Callable[[str], int] = (
            _first_partition if self._partitioned is None else self._partitioned.partition_of
        )
        # Per chain: its verified head, checkpoint coverage and checkpoint keeper.
        self._ledgers = [
            _LedgerState(
                reads := self._ledger_reads(p),
                CheckpointKeeper(reads, witnesses, witness_policy),
            )
            for p in range(partitions)
        ]
        # The pinned root the ledger's chain of keys must start from: never the store's word.
        self._root = None if sealer is None else _pinned_root(sealer, trusted_root)
        if trusted_root is not None and sealer is None:
            raise ValueError("trusted_root pins a ledger's root key: pass a sealer too")
        # Checks stored kept data against the ledger before it is used (instance_data.py).
        self._kept = (
            None if self._root is None else KeptLedger(lambda p: self._ledgers[p].reads, self._root)
        )
        self._last_root_heads: list[tuple[int, bytes]] | None = None
        # The thread running units of work right now: a guard or action that dispatches
        # from inside one would wait for itself.
        self._working_thread: int | None = None
        # The threads leading a commit batch now: one per ledger chain on a partitioned store.
        self._committing: set[int] = set()
        self._chain = _Chain(self)  # the memory store's chain, kept across its commits
        self._committers: list[GroupCommit[Callable[[Transaction, _Chain], Any]]] = [
            GroupCommit(functools.partial(self._run_batch, p), max_batch=max_batch)
            for p in range(partitions)
        ]
        self._committer = self._committers[0]
        # Work that writes no ledger entry (outbox marks, purges) on a partitioned store
        # locks no chain head.
        self._unchained: GroupCommit[Callable[[Transaction, _Chain], Any]] = (
            self._committer
            if self._partitioned is None
            else GroupCommit(functools.partial(self._run_batch, None), max_batch=max_batch)
        )
        # asyncio: one batcher per event loop (and partition), feeding the committers from
        # one thread.
        self._batchers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop,
            dict[int, AsyncBatcher[Callable[[Transaction, _Chain], Any]]],
        ] = weakref.WeakKeyDictionary()
        self._executor: ThreadPoolExecutor | None = None
        self._action_pool: ThreadPoolExecutor | None = None
        self._action_pool_lock = threading.Lock()
        self._action_thread_count = action_threads
        # Breaker statuses changed by actions: the unit of work that ran them writes them.
        self._breakers = BreakerJournal()
        # Event ids and idempotency keys whose policy actions a dispatch is running.
        if claim_lease_ms < 1:
            raise ValueError("claim_lease_ms must be >= 1")
        self._outside = OutsideClaims(self._store, claim_lease_ms)
        self._policies = ActionPolicies(self._clock, self._breakers, self._store.get_breaker)
        recorded = self._store.ledger_mode()
        if sealer is None and recorded is not None:
            raise StoreConfigError(
                f"the store keeps an audit ledger ({recorded} mode): changes without a ledger "
                "entry would go unrecorded",
                hint="pass sealer=LedgerSealer(load_signer(KEYS), mode) to the Runtime",
            )
        if sealer is not None:
            if recorded is None:
                self._store.set_ledger_mode(sealer.mode)
            elif recorded != sealer.mode:
                raise StoreConfigError(
                    f"the store's ledger is in {recorded} mode; this runtime signs in "
                    f"{sealer.mode} mode",
                    hint="one ledger keeps one mode: open it with the mode it was written in",
                )
            last = self._store.checkpoints()[-1:] if self._memory is not None else []
            self._ledgers[0].covered = last[0].size if last else 0
            # Every chain (each partition of a partitioned store) starts with its genesis.
            for partition, ledger in enumerate(self._ledgers):
                if ledger.reads.ledger_entry(0) is None:
                    self._write_genesis(sealer, partition)
                else:
                    check_signer_is_active(ledger.reads, sealer, self.pinned_root)
            # Every operational row is sealed under the signer's row key from now on, and
            # checked before it is acted on (runtime/store/row_seals.py).
            self._store.seal_rows(row_key(sealer.signer.private_key), adopt=adopt_unsealed_rows)

    @property
    def pinned_root(self) -> RootOfTrust:
        """The root key this runtime holds its ledger's chain of keys to."""
        if self._root is None:
            raise StoreConfigError("this runtime keeps no ledger, so it pins no root key")
        return self._root

    def _ledger_reads(self, partition: int) -> Store:
        """Where the entries of one chain are read: the store, or its partition's view."""
        fleet = self._partitioned
        return self._store if fleet is None else fleet.in_partition(partition)

    def _write_genesis(self, sealer: LedgerSealer, partition: int = 0) -> None:
        own = fingerprint(sealer.signer.public_info().public_key)
        if own != self.pinned_root.fingerprint:
            raise StoreConfigError(
                f"this runtime would start a new ledger with its key {sealer.signer.key_id} "
                f"as the root, but the pinned root is another key (fingerprint "
                f"{self.pinned_root.fingerprint})",
                hint="start a new ledger with the root key itself, or pin this key",
            )

        def work(txn: Transaction, chain: _Chain) -> None:
            chain.load(txn)
            if chain.next_seq != 0:
                return  # another process wrote it first
            entry = sealer.genesis(self._clock.now_ms())
            txn.append_ledger(entry)
            chain.advance(entry)

        self._submit(work, partition)

    def rotate_key(self, new_signer: Signer) -> LedgerEntry:
        """Rotate the ledger to `new_signer`: a rotation entry introducing its public key and
        window, signed by the current (outgoing) key, which it retires. Entries after it are
        signed (and checkpoints countersigned) by the new key only."""
        old = self._sealer
        if old is None:
            raise StoreConfigError("this runtime keeps no ledger, so it has no key to rotate")
        if self._partitioned is not None and len(self._ledgers) > 1:
            return self._rotate_every_chain(self._partitioned, old, new_signer)

        def work(txn: Transaction, chain: _Chain) -> LedgerEntry:
            chain.load(txn)
            if chain.next_seq == 0:
                raise StoreIntegrityError("the ledger has no genesis entry to rotate from")
            entry, new = old.rotation(chain.next_seq, chain.head, self._clock.now_ms(), new_signer)
            txn.append_ledger(entry)
            chain.advance(entry)
            # The rows are sealed under the new key's row key in the same transaction.
            txn.reseal_rows(row_key(new_signer.private_key))
            # The checkpoint over this batch is signed after the rotation: by the new key.
            self._sealer = new
            return entry

        try:
            return self._submit(work)
        except BaseException:
            self._sealer = old
            self._store.seal_rows(row_key(old.signer.private_key))
            raise

    def _rotate_every_chain(
        self, fleet: PartitionedStore, old: LedgerSealer, new_signer: Signer
    ) -> LedgerEntry:
        """`rotate_key` on a partitioned store: the rotation entry is appended to every chain
        (each a complete ledger), all in one transaction holding every head, so no chain is
        left signed by the retired key; returns partition 0's entry."""
        now = self._clock.now_ms()
        chains = [_Chain(self, partition) for partition in range(len(self._ledgers))]

        def work(in_chain: Callable[[int], Transaction]) -> LedgerEntry:
            rotated: list[LedgerEntry] = []
            new: LedgerSealer | None = None
            for chain in chains:
                txn = in_chain(chain.partition)
                chain.load(txn)
                if chain.next_seq == 0:
                    raise StoreIntegrityError(
                        f"ledger partition {chain.partition} has no genesis entry to rotate from"
                    )
                entry, new = old.rotation(chain.next_seq, chain.head, now, new_signer)
                txn.append_ledger(entry)
                chain.advance(entry)
                rotated.append(entry)
            assert new is not None
            # The operational tables are the fleet's, not a chain's: resealed once.
            in_chain(0).reseal_rows(row_key(new_signer.private_key))
            # The checkpoints over the rotations are signed after them: by the new key.
            self._sealer = new
            for chain in chains:
                chain.finish(in_chain(chain.partition))
            return rotated[0]

        try:
            entry = fleet.run_in_every_partition(work)
        except BaseException:
            self._sealer = old
            self._store.seal_rows(row_key(old.signer.private_key))
            for state in self._ledgers:
                state.keeper.failed()
            raise
        for chain in chains:
            chain.state.keeper.committed(chain.hashes, now)
        return entry

    # -- governors -----------------------------------------------------------------------------

    def load(
        self,
        spec: MachineSpec,
        guards: Mapping[str, Callable[..., Any]] | None = None,
        actions: Mapping[str, Callable[..., Any]] | None = None,
        settings: Mapping[str, int | str | timedelta] | None = None,
    ) -> Governor:
        """Bind guards and actions (BindingError lists every problem), resolve the machine's
        settings (durations such as "7d", milliseconds or timedeltas, each within its declared
        bounds; SettingsError lists every problem) and build the tables."""
        if spec.name in self._governors:
            raise ValueError(f"a governor named {spec.name!r} is already loaded")
        bound_guards, bound_actions = bind(spec, guards or {}, actions or {})
        bound_actions = self._policies.wrap(spec, bound_actions)
        resolved = resolve_settings(spec, settings)
        governor = Governor(self, spec, bound_guards, bound_actions, resolved)
        self._governors[spec.name] = governor
        return governor

    def governor(self, machine: str) -> Governor:
        found = self._governors.get(machine)
        if found is None:
            raise UnknownMachine(machine, tuple(sorted(self._governors)))
        return found

    @property
    def governors(self) -> Mapping[str, Governor]:
        return MappingProxyType(self._governors)

    @property
    def store(self) -> Store:
        return self._store

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def sealer(self) -> LedgerSealer | None:
        return self._sealer

    @property
    def policies(self) -> ActionPolicies:
        """The machines' resilience policies, with their breakers and bulkheads."""
        return self._policies

    @property
    def commit_batches(self) -> int:
        """How many commit batches the group committer ran (memory store: 0)."""
        batches = sum(committer.batches for committer in self._committers)
        return batches + (self._unchained.batches if self._partitioned is not None else 0)

    @property
    def partitions(self) -> int:
        """How many ledger chains the store keeps (1 but on a partitioned PostgreSQL store)."""
        return len(self._committers)

    # -- running work --------------------------------------------------------------------------

    def record(self, entries: Sequence[EntryData]) -> list[LedgerEntry]:
        """Seal and append ledger entries that no transition makes (breaker moves, missed
        deadlines), in order, in one unit of work of their own (one per ledger partition on a
        partitioned store); [] without a ledger."""
        if self._sealer is None or not entries:
            return []
        # One unit per ledger partition: each entry goes to the chain of its instance.
        by_partition: dict[int, list[int]] = {}
        for index, data in enumerate(entries):
            by_partition.setdefault(self._partition_of(data.instance), []).append(index)
        sealed: list[LedgerEntry | None] = [None] * len(entries)
        for partition, indexes in sorted(by_partition.items()):

            def work(
                txn: Transaction, chain: _Chain, indexes: list[int] = indexes
            ) -> list[LedgerEntry]:
                return [chain.append(txn, entries[index]) for index in indexes]

            for index, entry in zip(indexes, self._submit(work, partition), strict=True):
                sealed[index] = entry
        return [entry for entry in sealed if entry is not None]

    def _record_breaker_moves(self, keep: int | None = None) -> None:
        """Write the breaker statuses still noted, in a unit of their own (per ledger chain):
        those that no committed unit of work took (see runtime/resilience/policies.py); with
        `keep`, not those whose entries go to ledger chain `keep` (a unit there takes them)."""
        journal = self._breakers
        sealed = self._sealer is not None
        partition_of = self._partition_of

        def wanted(key: tuple[str, str]) -> bool:
            return keep is None or partition_of(f"policy:{key[1]}") != keep

        while True:
            taken = journal.take(wanted)
            if not taken:
                return
            # A partitioned store: each breaker's moves go to the chain of its entries.
            by_partition: dict[int, list[Noted]] = {}
            for noted in taken:
                by_partition.setdefault(partition_of(f"policy:{noted[0][1]}"), []).append(noted)
            parts = list(by_partition.items())
            for index, (partition, part) in enumerate(parts):

                def work(txn: Transaction, chain: _Chain, part: list[Noted] = part) -> None:
                    write_noted(txn, chain if sealed else None, part)

                try:
                    self._submit_unit(work, partition)
                except BaseException:
                    for _, unwritten in parts[index:]:
                        journal.put_back(unwritten)
                    raise
                journal.stored(part)

    def _settle_breakers(self) -> None:
        """Return once every breaker status noted so far is stored: those no unit took are
        written here, those a unit took are waited for. Every answer to a caller (a result,
        an error) comes after this, so none is given before the breaker changes its calls
        made are stored."""
        journal = self._breakers
        if journal.unstored:
            journal.settle(journal.last, self._record_breaker_moves)

    def _submit(self, work: Callable[[Transaction, _Chain], T], partition: int | None = 0) -> T:
        """Run one unit in the commit batches of ledger `partition` (None: work that appends
        no ledger entry)."""
        try:
            return self._submit_unit(work, partition)
        finally:
            if self._breakers.unstored:
                self._settle_breakers()

    def _submit_unit(self, work: Callable[[Transaction, _Chain], T], partition: int | None) -> T:
        """Run one unit of work and commit it: on the memory store at once, inside the store;
        on a transactional store through group commit (of its ledger partition)."""
        me = threading.get_ident()
        if self._working_thread == me or me in self._committing:
            raise NestedDispatch()
        memory = self._memory
        if memory is None:
            committer = self._unchained if partition is None else self._committers[partition]
            return cast(T, committer.submit(work))
        owned = memory.enter()
        self._working_thread = me
        try:
            return self._commit_in_memory(memory, work)
        finally:
            self._working_thread = None
            memory.leave(owned)

    def _commit_in_memory(self, memory: MemoryStore, work: Callable[..., T], *arguments: Any) -> T:
        """One unit, `work(*arguments, memory, chain)`, on the memory store, which the caller
        has entered: it commits as it writes; the checkpoint policy runs after it."""
        chain = self._chain
        if self._sealer is None:  # no ledger: no chain to load, nothing to sign
            return work(*arguments, memory, chain)
        state = chain.state
        ledger = memory.ledger_list
        # The head this chain appended last is still the store's: nothing to reload.
        chain.loaded = bool(ledger) and ledger[-1] is state.verified_head
        chain.appended = 0  # `finish` looks at what this commit appended
        value = work(*arguments, memory, chain)
        keeper = state.keeper
        if chain.appended:
            # The entry appended last was stamped in this commit: no second clock read.
            now = state.verified_head.ts_ms  # type: ignore[union-attr]
            # `finish` is asked only when it may sign (see _LedgerState.quiet_seq).
            if keeper.witnesses or chain.next_seq >= state.quiet_seq or now >= state.quiet_ms:
                chain.finish(memory, now)
        elif keeper.staged is None:
            return value
        else:
            now = self._clock.now_ms()
        # The tree moves on (and witnesses hear) when a checkpoint was signed; otherwise, in
        # checkpoint mode, the hashes wait in the chain for the next checkpoint, unless
        # witnesses count commits.
        if keeper.staged is not None or keeper.witnesses:
            keeper.committed(chain.hashes, now)
            chain.hashes = []
        elif self._sealer.mode != "checkpoint":
            # Sign-each, nothing staged, no witnesses: the keeper only extends a tree it has
            # loaded (for a checkpoint signed on demand); without one it has nothing to do.
            if keeper._tree is not None:
                keeper.committed(chain.hashes, now)
            chain.hashes = []
        return value

    def _action_threads(self) -> ThreadPoolExecutor:
        """Where `dispatch_async` runs the actions a policy names (outside calls): they
        overlap there, each tenant's bulkhead capping its share."""
        pool = self._action_pool
        if pool is None:
            with self._action_pool_lock:
                if self._action_pool is None:
                    self._action_pool = ThreadPoolExecutor(
                        self._action_thread_count, thread_name_prefix="autonomic-action"
                    )
                pool = self._action_pool
        return pool

    async def _submit_async(
        self, work: Callable[[Transaction, _Chain], T], partition: int = 0
    ) -> T:
        """`_submit` for a coroutine: the event loop keeps running while the batch holding
        this unit commits in a worker thread."""
        try:
            return cast(T, await self._queue_async(work, partition))
        finally:
            if self._breakers.unstored:  # rare: settled synchronously
                self._settle_breakers()

    def _queue_async(
        self, work: Callable[[Transaction, _Chain], T], partition: int = 0
    ) -> asyncio.Future[T]:
        """Queue one unit in this event loop's batches now (on the memory store, run it):
        a future of its value. Units queued one after another, with no await between them,
        commit in that order, in one batch if `max_batch` allows."""
        if self._memory is not None:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            try:
                future.set_result(self._submit(work))
            except Exception as exc:
                future.set_exception(exc)
            return future
        return self._batcher(partition).queue(work)

    async def _submit_many_async(
        self, works: Sequence[Callable[[Transaction, _Chain], T]], partition: int = 0
    ) -> list[WorkOutcome[T]]:
        """`_submit_many` for a coroutine, its units all in ledger `partition`: in order,
        in one batch if `max_batch` allows."""
        if self._memory is not None:
            return self._submit_many(works)
        try:
            return await self._batcher(partition).queue_many(works)
        finally:
            if self._breakers.unstored:
                self._settle_breakers()

    def _batcher(self, partition: int) -> AsyncBatcher[Callable[[Transaction, _Chain], Any]]:
        """The running event loop's batcher for ledger `partition`."""
        loop = asyncio.get_running_loop()
        by_partition = self._batchers.get(loop)
        if by_partition is None:
            by_partition = self._batchers[loop] = {}
        batcher = by_partition.get(partition)
        if batcher is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="autonomic-commit")
            batcher = by_partition[partition] = AsyncBatcher(
                self._committers[partition].submit_many, self._executor
            )
        return batcher

    def _submit_many(
        self,
        works: Sequence[Callable[[Transaction, _Chain], T]],
        partitions: Sequence[int] | None = None,
    ) -> list[WorkOutcome[T]]:
        """Run units in order; with a transactional store, in one commit batch per ledger
        partition if possible (`partitions[i]` is the partition of `works[i]`; partitions
        commit in the order they first appear)."""
        if self._memory is None:
            try:
                if partitions is None or len(self._committers) == 1:
                    return self._committer.submit_many(works)
                outcomes_by_index: dict[int, WorkOutcome[T]] = {}
                for partition in dict.fromkeys(partitions):
                    indexes = [i for i, p in enumerate(partitions) if p == partition]
                    done = self._committers[partition].submit_many([works[i] for i in indexes])
                    outcomes_by_index.update(zip(indexes, done, strict=True))
                return [outcomes_by_index[i] for i in range(len(works))]
            finally:
                if self._breakers.unstored:
                    self._settle_breakers()
        outcomes: list[WorkOutcome[T]] = []
        for work in works:
            try:
                outcomes.append(WorkOutcome(self._submit(work), None))
            except Exception as exc:
                outcomes.append(WorkOutcome(None, exc))
        return outcomes

    def _run_batch(
        self, partition: int | None, works: list[Callable[[Transaction, _Chain], object]]
    ) -> list[WorkOutcome[object]]:
        chain = _Chain(self, partition or 0)
        keeper = chain.state.keeper
        journal = self._breakers
        taken_here: list[Noted] = []  # noted again if the batch fails to commit
        me = threading.get_ident()
        self._working_thread = me
        self._committing.add(me)
        try:
            # Each unit a partial of `_run_unit` (a closure over the batch's state cost a
            # commit more to make than the unit's call); a lone unit's without a comprehension.
            run = self._run_unit
            units = (
                [functools.partial(run, chain, partition, taken_here, works[0])]
                if len(works) == 1
                else [functools.partial(run, chain, partition, taken_here, work) for work in works]
            )
            if self._partitioned is not None:
                outcomes = self._partitioned.run(units, chain.finish, partition=partition)
            else:
                outcomes = self._store.run(units, before_commit=chain.finish)
        except BaseException:
            keeper.failed()
            if taken_here:
                journal.put_back(taken_here)
            raise
        finally:
            self._working_thread = None
            self._committing.discard(me)
        if taken_here:
            journal.stored(taken_here)
        keeper.committed(chain.hashes, self._clock.now_ms())
        return outcomes

    def _run_unit(
        self,
        chain: _Chain,
        partition: int | None,
        taken_here: list[Noted],
        work: Callable[[Transaction, _Chain], object],
        txn: Transaction,
    ) -> object:
        """One unit of a batch of ledger `partition`. Breaker statuses the unit's actions
        changed (or others', noted before it ran) go in its transaction; on a partitioned
        store only those whose entries go to its chain, and none for a unit that locks no
        chain head."""
        saved = (chain.next_seq, chain.head, chain.appended, chain.loaded)
        hashes = len(chain.hashes)
        journal = self._breakers
        taken: list[Noted] = []
        try:
            value = work(txn, chain)
            if journal.pending:
                fleet = self._partitioned
                if fleet is None:
                    taken = journal.take(None)
                elif partition is not None:
                    chain_of = fleet.partition_of
                    taken = journal.take(lambda key: chain_of(f"policy:{key[1]}") == partition)
                if taken:
                    write_noted(txn, chain if self._sealer is not None else None, taken)
                    taken_here.extend(taken)
            return value
        except BaseException:
            # The store rolls this unit back; so does the chain, and the breaker statuses it
            # took are noted again.
            chain.next_seq, chain.head, chain.appended, chain.loaded = saved
            del chain.hashes[hashes:]
            if taken:
                journal.put_back(taken)
            raise

    # -- timers, outbox ------------------------------------------------------------------------

    def fire_due(self, now: int | None = None, *, limit: int = 1000) -> list[TimerFiring]:
        """Fire every timer due at `now` (default: the clock), earliest first, each exactly
        once; timers armed by these firings that are already due fire too."""
        return fire_due(self, now, limit=limit)

    def next_deadline(self) -> int | None:
        """The earliest armed timer or escalation notice's deadline of a loaded governor, or
        None."""
        return next_deadline(self)

    def escalate_deadlines(
        self, now: int | None = None, *, rearm_ms: int = DAY_MS, notices_only: bool = False
    ) -> list[DeadlineEscalation]:
        """Escalate every tracked deadline due at `now` (default: the clock) and re-arm it
        `rearm_ms` later (runtime/notice_deadlines.py; `fire_due` does it for the notices'
        deadlines, `DeadlineTracker.check` for all)."""
        return escalate_due(self, now, rearm_ms=rearm_ms, notices_only=notices_only)

    def deliver_outbox(self, *, limit: int = 1000, chunk_size: int = CHUNK_SIZE) -> list[Delivery]:
        """Deliver the pending emitted events due now to their governors, `chunk_size` to a
        commit (see outbox.deliver_outbox)."""
        return deliver_outbox(self, limit=limit, chunk_size=chunk_size)

    def notifications(self, *, status: OutboxStatus | None = "pending") -> list[OutboxMessage]:
        """Escalation notifications in the outbox (JSON body: recipient, message, deadline)."""
        return self._store.outbox(kind="notification", status=status)

    def acknowledge(self, message: OutboxMessage) -> None:
        """Mark a notification (or event) as handled by whoever delivered it."""
        mark(self, message, "delivered", None)

    # -- retention, checkpoints, replay, verification ------------------------------------------

    def purge_expired(self, now: int | None = None) -> tuple[int, int]:
        """Forget processed event ids and idempotency keys older than the retention window;
        returns (event ids, idempotency keys) removed. A repeat after this is processed anew."""
        instant = self._clock.now_ms() if now is None else now
        before = instant - self._retention_ms

        def work(txn: Transaction, chain: _Chain) -> tuple[int, int]:
            return txn.purge_dedup(before)

        return self._submit(work, None)

    def checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint over every entry now (checkpoint mode, or any mode with
        witnesses, which receive it as the policy says), in every ledger partition, and on a
        partitioned store a root over all partition heads; returns the checkpoint of the last
        partition that had new entries, None if nothing was new."""
        sealer = self._sealer
        if sealer is None:
            return None
        signed: Checkpoint | None = None
        if sealer.mode == "checkpoint" or self._ledgers[0].keeper.witnesses:
            for partition in range(len(self._ledgers)):
                signed = self._checkpoint_partition(sealer, partition) or signed
        self.sign_root()
        return signed

    def _checkpoint_partition(self, sealer: LedgerSealer, partition: int) -> Checkpoint | None:
        state = self._ledgers[partition]

        def work(txn: Transaction, chain: _Chain) -> Checkpoint | None:
            chain.load(txn)
            last = txn.last_checkpoint()
            if chain.next_seq == 0 or (last is not None and last.size >= chain.next_seq):
                return None
            # chain.hashes: entries this commit appended before, or on the memory store the
            # ones no checkpoint covers yet (see _commit_in_memory).
            signed = state.keeper.sign(
                txn, sealer, chain.next_seq, chain.head, chain.hashes, self._clock.now_ms()
            )
            state.covered = chain.next_seq
            state.uncovered_since = None
            state.recheck()
            return signed

        return self._submit(work, partition)

    def sign_root(self) -> SignedRoot | None:
        """On a partitioned store: sign and store a Merkle root over every partition's
        committed head (see runtime.partitions); None on other stores or without a sealer,
        or when the heads are those this runtime signed last."""
        store, sealer = self._partitioned, self._sealer
        if store is None or sealer is None:
            return None
        heads = store.partition_heads()
        if not any(size for size, _ in heads) or heads == self._last_root_heads:
            return None
        root = SignedRoot.sign(sealer.signer, heads, self._clock.now_ms())
        store.add_root(root)
        self._last_root_heads = heads
        return root

    @property
    def witness_errors(self) -> list[WitnessError]:
        """The witnesses that refused the last publication (retried with the next one)."""
        return [error for state in self._ledgers for error in state.keeper.witness_errors]

    def replay(self, machine: str, instance: str, *, use_snapshot: bool = True) -> ReplayedState:
        """Rebuild an instance's state from its ledger entries, from its latest snapshot on
        (verified against the entry it names) or from the start. Every entry read is checked
        against its hash, and each must start where the previous one ended. The snapshot's
        kept entry is checked against the instance's newest kept entry in the ledger (its hash
        and signature verified), and the stored kept data against that entry."""
        kept = self._kept
        if kept is None:  # no ledger: nothing to replay from
            return replay(self._store, machine, instance, use_snapshot=use_snapshot)
        partition = self._partition_of(instance)

        def newest(txn: Transaction, chain: _Chain) -> LedgerEntry | None:
            return kept.newest(txn, partition, machine, instance)

        return replay(
            self._store,
            machine,
            instance,
            use_snapshot=use_snapshot,
            newest_kept=lambda: self._submit(newest, partition),
        )

    def verify(self, root: RootLike) -> VerifyReport:
        """Verify the whole stored ledger (every entry, checkpoint and signature) from the
        pinned `root` (see ledger.verify_entries)."""
        mode = self._sealer.mode if self._sealer is not None else self._store.ledger_mode()
        return verify(self._store, root, mode)

    def ledger(self) -> Iterator[LedgerEntry]:
        """The stored entries in seq order; on a partitioned store partition by partition
        (each its own chain: entries of different partitions have no order between them)."""
        for state in self._ledgers:
            yield from state.reads.ledger_entries()

    def close(self) -> None:
        """Sign the remaining entries (checkpoint mode), then close the store (also when the
        signing fails, for example on a ledger that no longer verifies: that error is raised)."""
        try:
            if self._sealer is not None:
                self.checkpoint()
                for state in self._ledgers:
                    state.keeper.flush()
        finally:
            self._outside.close()
            if self._executor is not None:
                self._executor.shutdown()
            if self._action_pool is not None:
                self._action_pool.shutdown()
            self._store.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
