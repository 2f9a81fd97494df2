"""Instance data: the fields a row `keep`s beside the state, read back to route emits.

A machine declares `data { customer_id: str }`; a row `keep customer_id` copies the causing
event's field into the instance's data in the unit of work of that move (the store's
`save_instance_data`, as a JSON object), and the move's signed "kept" ledger entry commits to
that JSON text (runtime/ledger.py); `emit Billing.DisputeUpheld to customer_id` sends to
the Billing instance whose id the field holds, from a row, a timer or an entry alike, so a
timer with no payload still reaches the right receiver. The compiler proves that every emit
reads a field kept on every way to it (E149); the runtime still refuses to guess: data it
cannot read as an object holding that id is a StoreIntegrityError, and nothing is written.
A field an emit routes by is checked as an identifier when it is kept, so the row that keeps a
malformed id is refused (InputRejected) instead of the later emit.

The runtime does not trust the store with it either (`KeptLedger`): before it uses stored data
(to route an emit, or to keep more fields beside it), it finds the instance's newest kept entry
in the same transaction and checks the entry's hash, its signature by a key the ledger's chain
of keys held active at that entry, and that it commits to exactly the stored text. Data that
was changed, deleted, added or rolled back without such an entry is a StoreIntegrityError, and
nothing is written. Only rows and timers that read data pay for it: one indexed read, a hash
and an Ed25519 verification. A store written without that entry (before kept entries existed)
is refused the same way: its data is committed by nothing. A rollback that also removed the
newer kept entries from the ledger table, or a forged index that hides them, breaks the hash
chain or disagrees with the table, which `autonomic audit verify` finds; this check reads the
one entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from .checkpointing import ROOT_HINT, _check_control
from .errors import StoreIntegrityError
from .inputs import check_identifier
from .keychain import CONTROL_KINDS, ChainError, KeyChain, RootOfTrust
from .keys import TrustedKey
from .ledger import KEPT, SIG_TAG, Checkpoint, LedgerEntry, kept_digest
from .results import _dumps
from .sealing import _verify_stored_entry
from .store.base import Store, Transaction
from .store.memory import MemoryStore
from .tables import Payload

__all__ = ["KeptLedger", "dump_data", "keep_fields", "read_data", "route"]

try:
    from nacl.bindings import crypto_sign_open
    from nacl.exceptions import BadSignatureError

    _SODIUM = True
except ImportError:  # an environment installed before PyNaCl became a dependency
    _SODIUM = False

Data = dict[str, object]

_HINT = "nothing was written; verify the store with `autonomic audit verify`"


class KeptLedger:
    """Checks an instance's stored kept data against its newest kept entry (see the module
    docstring), for one runtime. `reads(partition)` reads that ledger chain's committed
    entries; the control entries (genesis, rotations) are read once each and verified once."""

    def __init__(self, reads: Callable[[int], Store], root: RootOfTrust) -> None:
        self._reads = reads
        self._root = root  # the pinned root: the chain of keys starts there, not at the store
        self._controls: dict[int, list[LedgerEntry]] = {}  # verified, by partition
        self._scanned: dict[int, int] = {}  # the controls below this seq are known
        # The chain after the first n controls, by (partition, n): control entries are few.
        self._chains: dict[tuple[int, int], KeyChain] = {}

    def check(
        self, txn: Transaction, partition: int, machine: str, instance: str, text: str | None
    ) -> None:
        """Raise StoreIntegrityError unless `text` (the stored data, None: none) is what the
        instance's newest kept entry commits to (none: no entry)."""
        where = f"{machine} '{instance}'"
        entry = self.newest(txn, partition, machine, instance)
        self._nothing_kept_since(partition, machine, instance, entry)
        if entry is None:
            if text is None:
                return
            raise StoreIntegrityError(
                f"the store holds kept data for {where} that no ledger entry commits to",
                hint=_HINT,
            )
        if text is None:
            raise StoreIntegrityError(
                f"ledger entry {entry.seq} commits to kept data of {where} that the store no "
                "longer holds",
                hint=_HINT,
            )
        if entry.payload_sha256 != _digest(text):
            raise StoreIntegrityError(
                f"the kept data of {where} is not what ledger entry {entry.seq} commits to: "
                "the store was changed",
                hint=_HINT,
            )

    def newest(
        self, txn: Transaction, partition: int, machine: str, instance: str
    ) -> LedgerEntry | None:
        """The instance's newest kept entry as of `txn`, checked: its hash, that it is a kept
        entry of that instance, and its signature by a key the chain held active then."""
        where = f"{machine} '{instance}'"
        entry = txn.kept_entry(machine, instance)
        if entry is None:
            return None
        _verify_stored_entry(entry, "kept entry")
        if entry.kind != KEPT or entry.machine != machine or entry.instance != instance:
            raise StoreIntegrityError(
                f"ledger entry {entry.seq}, read as the kept entry of {where}, is not one",
                hint=_HINT,
            )
        self.check_signed(txn, partition, entry, f"the kept entry of {where}")
        return entry

    def _nothing_kept_since(
        self, partition: int, machine: str, instance: str, kept: LedgerEntry | None
    ) -> None:
        """The index answered `kept` (None: none) as the instance's newest kept entry. Each of
        the instance's entries after it is read (by the same index) and checked: its hash, that
        it starts where the one before ended (from the kept entry's state, or '' if none), and
        that the entry right after it, read by its seq from the table itself, is not a kept
        entry of the instance. A kept entry follows its move at once, so a newer keep that the
        index hides, or whose row was deleted (a hole in the chain right after its move), is
        found. Cost: the instance's entries since its newest keep (one on the marketplace's
        routes), each two indexed reads and a hash."""
        where = f"{machine} '{instance}'"
        reads = self._reads(partition)
        if isinstance(reads, MemoryStore):
            return  # its kept entry is found by a scan of the runtime's own list, not an index
        state = "" if kept is None else kept.to_state
        after = -1 if kept is None else kept.seq
        for later in reads.ledger_entries(machine=machine, instance=instance, after_seq=after):
            _verify_stored_entry(later, "ledger entry")
            if later.kind == KEPT:
                raise StoreIntegrityError(
                    f"the store answers ledger entry {after} as the newest kept entry of "
                    f"{where}, but lists kept entry {later.seq} after it",
                    hint=_HINT,
                )
            if later.from_state != state:
                raise StoreIntegrityError(
                    f"ledger entry {later.seq} of {where} starts in '{later.from_state}' but "
                    f"the entry before it ends in '{state}': entries were removed",
                    hint=_HINT,
                )
            state = later.to_state
            following = reads.ledger_entry(later.seq + 1)
            if following is None:
                beyond = next(iter(reads.ledger_entries(after_seq=later.seq)), None)
                if beyond is not None:
                    raise StoreIntegrityError(
                        f"ledger entry {later.seq + 1}, right after entry {later.seq} of "
                        f"{where}, is missing: entries were removed",
                        hint=_HINT,
                    )
            elif (
                following.kind == KEPT
                and following.machine == machine
                and following.instance == instance
            ):
                raise StoreIntegrityError(
                    f"ledger entry {following.seq} is a kept entry of {where} newer than the "
                    f"one the store answers as its newest ({after}): the store hides it",
                    hint=_HINT,
                )

    def check_signed(self, txn: Transaction, partition: int, entry: LedgerEntry, what: str) -> None:
        """Raise StoreIntegrityError unless `entry` (its hash checked) is signed by a key the
        chain held active at it."""
        trusted = self._signer(txn, partition, entry.seq, entry.key_id, entry.ts_ms, what)
        if not _verified(trusted, entry.signature, SIG_TAG + entry.entry_hash):
            raise StoreIntegrityError(
                f"ledger entry {entry.seq}, {what}, has a bad signature", hint=_HINT
            )

    def check_checkpoint(self, txn: Transaction, partition: int, checkpoint: Checkpoint) -> None:
        """Raise StoreIntegrityError unless the stored checkpoint is signed by a key the chain
        held active at its size."""
        what = f"the checkpoint at size {checkpoint.size}"
        trusted = self._signer(
            txn, partition, checkpoint.size, checkpoint.key_id, checkpoint.ts_ms, what
        )
        if not _verified(trusted, checkpoint.signature, checkpoint.signed_message()):
            raise StoreIntegrityError(
                f"{what} has a bad signature: the stored row was changed", hint=_HINT
            )

    def _signer(
        self, txn: Transaction, partition: int, seq: int, key_id: str, ts_ms: int, what: str
    ) -> TrustedKey:
        try:
            return self._chain(txn, partition, seq).signer(seq, key_id, ts_ms, what)
        except ChainError as error:
            raise StoreIntegrityError(error.reason, hint=_HINT) from None

    def _chain(self, txn: Transaction, partition: int, seq: int) -> KeyChain:
        """The chain of keys as the control entries before `seq` leave it. The controls are
        read up to the head each time a newer entry is checked, so over a runtime's life
        each stored entry is read at most once for this (an index read on a server store)."""
        controls = self._controls.setdefault(partition, [])
        scanned = self._scanned.get(partition, 0)
        if seq >= scanned:
            head = txn.ledger_head()
            end = seq + 1 if head is None else max(head.seq, seq) + 1
            stored = self._reads(partition).ledger_entries(
                machine="", instance="", after_seq=scanned - 1
            )
            for entry in stored:
                if entry.seq >= end:
                    break
                if entry.kind in CONTROL_KINDS:
                    self._verify_control(controls, entry)
            self._scanned[partition] = end
        count = sum(1 for entry in controls if entry.seq < seq)
        chain = self._chains.get((partition, count))
        if chain is None:
            if not count:
                raise StoreIntegrityError("the ledger has no genesis entry", hint=_HINT)
            chain = self._chains[(partition, count)] = self._replayed(controls[:count])
        return chain

    def _verify_control(self, controls: list[LedgerEntry], entry: LedgerEntry) -> None:
        try:
            chain = self._replayed(controls) if controls else KeyChain(self._root)
            _check_control(chain, entry)
        except (ChainError, KeyError, TypeError, ValueError) as exc:
            raise StoreIntegrityError(
                f"the ledger's chain of keys does not verify at seq {entry.seq}: {exc}",
                hint=ROOT_HINT,
            ) from None
        controls.append(entry)

    def _replayed(self, controls: list[LedgerEntry]) -> KeyChain:
        """The chain after `controls` (verified already from the pinned root: genesis first)."""
        genesis = controls[0]
        chain = KeyChain(self._root)
        chain.genesis(genesis.seq, genesis.event, genesis.key_id)
        for entry in controls[1:]:
            chain.apply(entry.seq, entry.kind, entry.event)
        return chain


def _verified(trusted: TrustedKey, signature: bytes, message: bytes) -> bool:
    """`trusted.verify`, through libsodium when PyNaCl is there: 53 us here against 102 us
    through cryptography (OpenSSL), on the runtime's own checks. libsodium accepts no
    signature OpenSSL rejects (it also refuses small-order and non-canonical points), so the
    runtime is never more lenient than `audit verify`."""
    if not _SODIUM:
        return trusted.verify(signature, message)
    if len(signature) != 64:
        return False
    try:
        crypto_sign_open(signature + message, trusted.info.public_key)
    except BadSignatureError:
        return False
    return True


def _digest(text: str) -> bytes | None:
    try:
        return kept_digest(text)
    except UnicodeEncodeError:
        return None


def read_data(
    txn: Transaction,
    machine: str,
    instance: str,
    ledger: KeptLedger | None = None,
    partition: int = 0,
) -> Data:
    """The instance's kept data as of this transaction ({} if it never kept any), checked
    against the ledger first when the runtime keeps one (`ledger`)."""
    text = txn.instance_data(machine, instance)
    if ledger is not None:
        ledger.check(txn, partition, machine, instance, text)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise StoreIntegrityError(f"the kept data of {machine} '{instance}' is not a JSON object")
    return data


def keep_fields(
    data: Mapping[str, object],
    keep: tuple[tuple[str, str], ...],
    payload: Payload | None,
    routes: frozenset[str],
) -> Data:
    """`data` with each (field, causing field) of `keep` taken from the causing payload; a
    field that some emit routes by must hold a well-formed instance id (InputRejected)."""
    kept = dict(data)
    for field, source in keep:
        value = getattr(payload, source, None)
        if field in routes:
            check_identifier(f"kept instance id '{field}'", value)
        kept[field] = value
    return kept


def dump_data(data: Mapping[str, object]) -> str:
    """Kept data as stored: JSON, a decimal as its exact string, a datetime in ISO 8601."""
    return _dumps(dict(data))


def route(data: Mapping[str, object] | None, field: str, machine: str, instance: str) -> str:
    """The receiving instance's id, kept in `field` (see the module docstring)."""
    value = None if data is None else data.get(field)
    if type(value) is not str or not value:
        raise StoreIntegrityError(
            f"{machine} '{instance}' keeps no instance id in '{field}' to send its emit to",
            hint="the machine's checks (E149) rule this out; was the store or the machine "
            "changed under live instances?",
        )
    return value
