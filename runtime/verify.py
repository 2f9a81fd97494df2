"""Ledger verification: one streaming pass over the entries and checkpoints that names the
first bad seq and why, over a whole ledger or one seq range of it (see ledger_ranges.py).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from .instance_tally import (
    CHANGE_KINDS,
    DEADLINE_ACTOR,
    INSTANCE_KINDS,
    Break,
    InstanceTallies,
)
from .keychain import (
    CONTROL_ACTOR,
    CONTROL_KINDS,
    GENESIS,
    ROTATION,
    ChainError,
    KeyChain,
    RootOfTrust,
)
from .ledger import (
    DATA_KINDS,
    GENESIS_HASH,
    KEPT,
    KINDS,
    LEDGER_COLUMNS,
    MODES,
    PAYLOAD_TAG,
    SIG_TAG,
    Checkpoint,
    LedgerEntry,
    LedgerMode,
    RootLike,
    _entry_hasher,
    _sha256,
)
from .merkle import TreeFrontier, extend_frontier

__all__ = ["MalformedRecord", "Problem", "Span", "VerifyReport", "verify_batches", "verify_entries"]

Problem = Literal[
    "malformed",
    "gap",
    "reorder",
    "duplicate",
    "chain_break",
    "hash_mismatch",
    "unknown_kind",
    "missing_signature",
    "unexpected_signature",
    "unknown_key",
    "key_window",
    "key_retired",
    "bad_signature",
    "genesis",
    "rotation",
    "mode_mismatch",
    "checkpoint_order",
    "checkpoint_chain",
    "checkpoint_signature",
    "checkpoint_mismatch",
    "truncated",
    "uncovered",
]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome: `count` entries verified; on failure the first bad seq and why.

    `mode` is the mode the genesis entry declares, `keys` the key ids the chain introduced (the
    root first), `missing` how many entries a newer external checkpoint proves are missing.
    """

    count: int
    ok: bool
    index: int | None
    reason: str | None
    problem: Problem | None = None
    checkpoints: int = 0
    mode: str | None = None
    keys: tuple[str, ...] = ()
    missing: int = 0


@dataclass(slots=True)
class Span:
    """A seq range [start, end) verified on its own, so that a ledger can be verified in ranges
    and the ranges joined (ledger_ranges.py). `end` None: to the ledger's end (set to where it
    ended). `control`: the ledger's control entries by seq, as the join read them; a range
    replays those before its start into its key chain and must hold exactly those within it.

    What the join checks, filled in by verification: the range's first prev_hash and last
    entry hash (the hash chain), the Merkle frontier of its own leaves and (size, signed root,
    root of its own leaves) of each checkpoint (the tree), the prev_checkpoint of its first
    checkpoint and the digest of its last (the checkpoint chain), whether it settled a
    checkpoint and whether entries after its last one are uncovered; and, when asked for, its
    per-instance tallies (instance_tally.py), whose merge checks continuity across the joins."""

    start: int = 0
    end: int | None = None
    control: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    first_prev: bytes = GENESIS_HASH
    last_hash: bytes = GENESIS_HASH
    frontier: tuple[bytes, ...] = ()
    roots: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    first_link: bytes | None = None
    last_link: bytes | None = None
    settled: bool = False
    uncovered: bool = False
    tallies: InstanceTallies | None = None


@dataclass(frozen=True, slots=True)
class MalformedRecord:
    """A stored record that could not be read as an entry or checkpoint (never trusted).

    `size`: for an unreadable checkpoint row whose size could still be read, that size, so the
    failure is reported where the checkpoint stands rather than where reading stopped."""

    reason: str
    size: int | None = None


class _Failure(Exception):
    """Raised inside verification; becomes the failed VerifyReport."""

    def __init__(self, index: int, problem: Problem, reason: str, count: int) -> None:
        super().__init__(reason)
        self.index = index
        self.problem = problem
        self.reason = reason
        self.count = count


_MAX_I64 = 2**63 - 1
_MIN_I64 = -(2**63)
_STRING_FIELDS = (
    "kind",
    "machine",
    "instance",
    "from_state",
    "to_state",
    "event",
    "actor",
    "event_id",
    "key_id",
)


def _shape_problem(entry: object) -> str | None:
    """Why an entry is structurally invalid (types, lengths), or None."""
    if isinstance(entry, MalformedRecord):
        return entry.reason
    if not isinstance(entry, tuple) or len(entry) != len(LEDGER_COLUMNS):
        return f"not a ledger entry ({type(entry).__name__})"
    fields = dict(zip(LEDGER_COLUMNS, entry, strict=True))
    for name in ("seq", "ts_ms"):
        value = fields[name]
        if type(value) is not int:
            return f"{name} is {type(value).__name__}, expected an integer"
        if not _MIN_I64 <= value <= _MAX_I64 or (name == "seq" and value < 0):
            return f"{name} {value} is out of range"
    for name in _STRING_FIELDS:
        value = fields[name]
        if not isinstance(value, str):
            return f"{name} is {type(value).__name__}, expected text"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{name} is not valid Unicode text"
    for name in ("payload_sha256", "prev_hash", "entry_hash"):
        value = fields[name]
        if type(value) is not bytes:
            return f"{name} is {type(value).__name__}, expected a 32-byte blob"
        if len(value) != 32:
            return f"{name} has {len(value)} bytes, expected 32"
    if type(fields["signature"]) is not bytes:
        return f"signature is {type(fields['signature']).__name__}, expected a blob"
    return None


def _checkpoint_shape_problem(checkpoint: object) -> str | None:
    if isinstance(checkpoint, MalformedRecord):
        return checkpoint.reason
    if not isinstance(checkpoint, Checkpoint):
        return f"not a checkpoint ({type(checkpoint).__name__})"
    if type(checkpoint.size) is not int or not 0 <= checkpoint.size <= _MAX_I64:
        return "size is not a non-negative 64-bit integer"
    if type(checkpoint.ts_ms) is not int or not _MIN_I64 <= checkpoint.ts_ms <= _MAX_I64:
        return "ts_ms is not a 64-bit integer"
    if type(checkpoint.head_hash) is not bytes or len(checkpoint.head_hash) != 32:
        return "head_hash is not a 32-byte blob"
    if type(checkpoint.key_id) is not str:
        return "key_id is not text"
    if type(checkpoint.signature) is not bytes:
        return "signature is not a blob"
    for name in ("tree_root", "prev_checkpoint"):
        value = getattr(checkpoint, name)
        if type(value) is not bytes or len(value) != 32:
            return f"{name} is not a 32-byte blob"
    if type(checkpoint.frontier) is not bytes:
        return "frontier is not a blob"
    if checkpoint.kind not in ("checkpoint", "entry"):
        return f"unknown checkpoint kind {checkpoint.kind!r}"
    return None


def _describe_sequence_problem(
    position: int, seq: object, rest: Iterator[object]
) -> tuple[Problem, str]:
    if type(seq) is not int:
        return "malformed", f"seq is {type(seq).__name__}, expected an integer"
    assert isinstance(seq, int)
    if seq < 0:
        return "malformed", f"seq {seq} is negative"
    if seq < position:
        return "duplicate", f"seq {seq} appears again where seq {position} was expected"
    # seq is ahead: a gap, unless the expected entry turns up later (reordered). Scanning the
    # rest keeps memory flat; the verdict is a failure either way.
    for later in rest:
        if isinstance(later, tuple) and later and later[0] == position:
            return (
                "reorder",
                f"out of order: seq {seq} comes where seq {position} was expected, "
                f"and seq {position} comes later",
            )
    return "gap", f"seq {position} is missing (the next entry has seq {seq})"


_CHAIN_PROBLEMS: dict[str, Problem] = {
    "genesis": "genesis",
    "unknown_key": "unknown_key",
    "key_window": "key_window",
    "key_retired": "key_retired",
    "rotation": "rotation",
}


def _chain_failure(error: ChainError, index: int, count: int, prefix: str = "") -> _Failure:
    return _Failure(index, _CHAIN_PROBLEMS[error.problem], prefix + error.reason, count)


def _verify_checkpoint_signature(
    checkpoint: Checkpoint, chain: KeyChain, label: str, index: int, count: int, *, any_key: bool
) -> None:
    """Check a checkpoint's signature by a key of the chain: the key active at its size, or
    (`any_key`, for a checkpoint beyond the ledger's end) any key the chain introduced."""
    where = f"{label} at size {checkpoint.size}"
    if any_key:
        trusted = chain.any_introduced(checkpoint.key_id)
        if trusted is None:
            raise _Failure(
                index,
                "checkpoint_signature",
                f"{where}: signed by key {checkpoint.key_id!r}, which this ledger's chain of "
                "keys does not introduce (its rotation may be among the missing entries)",
                count,
            )
        if not trusted.info.covers(checkpoint.ts_ms):
            raise _Failure(
                index,
                "checkpoint_signature",
                f"{where}: key {checkpoint.key_id} is not valid at {checkpoint.ts_ms} ms",
                count,
            )
    else:
        try:
            trusted = chain.signer(index, checkpoint.key_id, checkpoint.ts_ms, where)
        except ChainError as error:
            raise _Failure(index, "checkpoint_signature", error.reason, count) from None
    if not trusted.verify(checkpoint.signature, checkpoint.signed_message()):
        raise _Failure(index, "checkpoint_signature", f"{where}: bad signature", count)


class _Tree:
    """The verifier's Merkle frontier (merkle.TreeFrontier, mutable for speed). Entry hashes
    wait in `pending` (at most _TREE_BATCH of them, so memory stays flat) and go into the
    tree a batch at a time, a level at a time, when a root is needed or the batch is full."""

    __slots__ = ("deferred", "nodes", "pending", "size")

    def __init__(self) -> None:
        self.nodes: list[bytes] = []
        self.size = 0
        self.pending: list[bytes] = []
        # A range that starts after seq 0 knows only its own subtrees: it records (size, signed
        # root, root of its own leaves) for the join to finish (see Span).
        self.deferred: list[tuple[int, bytes, bytes]] | None = None

    def flush(self) -> None:
        pending = self.pending
        if pending:
            leaves = [_sha256(b"\x00" + entry).digest() for entry in pending]
            self.size = extend_frontier(self.nodes, self.size, leaves)
            pending.clear()

    def root(self) -> bytes:
        self.flush()
        return TreeFrontier(self.size, tuple(self.nodes)).root()


_TREE_BATCH = 1024
# What checkpoint mode leaves unsigned: every data kind but "kept", which is always signed.
_UNSIGNED_KINDS = DATA_KINDS - {KEPT}


class _CheckpointStream:
    """The stored checkpoints, consumed in step with the entries (sizes strictly increasing,
    each chained to the one before it)."""

    __slots__ = (
        "_chain",
        "_iterator",
        "_previous",
        "_tree",
        "first_link",
        "link_known",
        "next_size",
        "pending",
        "unreadable",
        "verified",
    )

    def __init__(
        self,
        checkpoints: Iterable[Checkpoint | MalformedRecord],
        chain: KeyChain,
        tree: _Tree,
        *,
        link_known: bool = True,
    ) -> None:
        self._iterator = iter(checkpoints)
        self._chain = chain
        self._tree = tree
        self._previous: Checkpoint | None = None
        # False in a range that starts after seq 0: the checkpoint before its first one is in
        # an earlier range, so the first link is recorded for the join to check.
        self.link_known = link_known
        self.first_link: bytes | None = None
        self.next_size = -1
        self.verified = 0
        self.pending: Checkpoint | None = None
        self.unreadable: MalformedRecord | None = None  # an unreadable row of known size
        self.advance(0)

    def advance(self, position: int) -> None:
        item = next(self._iterator, None)
        if item is None:
            self.pending = None
            return
        if isinstance(item, MalformedRecord) and item.size is not None and item.size > position:
            # Reported when the entries reach it: an earlier bad entry is reported first.
            self.pending, self.unreadable, self.next_size = None, item, item.size
            return
        problem = _checkpoint_shape_problem(item)
        if problem is not None:
            raise _Failure(
                max(position - 1, 0), "malformed", f"checkpoint record: {problem}", position
            )
        assert isinstance(item, Checkpoint)
        if item.size <= self.next_size:
            raise _Failure(
                max(position - 1, 0),
                "checkpoint_order",
                f"checkpoint at size {item.size} follows one at size {self.next_size}: "
                "checkpoint sizes must increase strictly",
                position,
            )
        self.next_size = item.size
        self.pending = item

    def settle(self, size: int, head: bytes) -> bool:
        """Verify every checkpoint signed at `size`; True when there was one."""
        self.fail_if_unreadable(size)
        settled = False
        while self.pending is not None and self.pending.size == size:
            checkpoint = self.pending
            _check_checkpoint(checkpoint, self._chain, self._tree, size, head, "checkpoint")
            self._check_link(checkpoint, size)
            self._previous = checkpoint
            self.verified += 1
            settled = True
            self.advance(size)
        return settled

    def fail_if_unreadable(self, size: int) -> None:
        """Fail at an unreadable checkpoint row once the entries reach its size (or end)."""
        bad = self.unreadable
        if bad is not None and bad.size is not None and bad.size <= size:
            index = max(bad.size - 1, 0)
            raise _Failure(index, "malformed", f"checkpoint record: {bad.reason}", index)

    def last_digest(self) -> bytes | None:
        return None if self._previous is None else self._previous.digest()

    def _check_link(self, checkpoint: Checkpoint, size: int) -> None:
        if not self.link_known:
            self.first_link, self.link_known = checkpoint.prev_checkpoint, True
            return
        previous = self._previous
        expected = GENESIS_HASH if previous is None else previous.digest()
        if checkpoint.prev_checkpoint == expected:
            return
        if previous is None:
            reason = (
                f"the first stored checkpoint (size {size}) was signed after an earlier "
                "checkpoint that is missing: a checkpoint was removed"
            )
        else:
            reason = (
                f"checkpoint at size {size} was not signed right after the stored checkpoint "
                f"at size {previous.size}: a checkpoint between them was removed"
            )
        raise _Failure(max(size - 1, 0), "checkpoint_chain", reason, size)


def _check_checkpoint(
    checkpoint: Checkpoint, chain: KeyChain, tree: _Tree, size: int, head: bytes, label: str
) -> None:
    """Verify a checkpoint's signature, head hash and tree root against the ledger at `size`."""
    index = max(size - 1, 0)
    _verify_checkpoint_signature(checkpoint, chain, label, index, size, any_key=False)
    _check_head(checkpoint, size, head, label)
    if checkpoint.kind != "checkpoint":
        return
    if tree.deferred is not None:
        tree.deferred.append((size, checkpoint.tree_root, tree.root()))
    elif checkpoint.tree_root != tree.root():
        raise _Failure(
            index,
            "checkpoint_mismatch",
            f"{label} at size {size}: its Merkle tree root does not match the ledger's entries",
            size,
        )


def _check_head(checkpoint: Checkpoint, size: int, head: bytes, label: str) -> None:
    if checkpoint.head_hash != head:
        at = f"seq {size - 1}" if size else "the empty ledger"
        raise _Failure(
            max(size - 1, 0),
            "checkpoint_mismatch",
            f"{label} at size {size}: its head hash does not match the hash of {at} "
            "(the ledger was rewritten after the checkpoint was signed)",
            size,
        )


def verify_entries(
    entries: Iterable[LedgerEntry | MalformedRecord],
    root: RootLike,
    *,
    checkpoints: Iterable[Checkpoint | MalformedRecord] = (),
    external_checkpoint: Checkpoint | None = None,
    mode: LedgerMode | None = None,
    external_label: str = "external checkpoint",
) -> VerifyReport:
    """Verify a ledger in one streaming pass; report the first bad sequence index and why.

    `root` pins the root of trust: the genesis entry's key must be it (a PublicKeyInfo, its
    fingerprint, or a Keyring holding exactly that one key). Every other key must be introduced
    by the chain's own rotation entries. Checkpoints must come in increasing size order (as
    stored); they are consumed in step with the entries, so memory stays flat. `mode`, when
    given (the store's declared mode), must match the mode the genesis entry declares.
    `count` is the number of entries that passed every per-entry check.
    """
    return verify_batches(
        (entries,),
        root,
        checkpoints=checkpoints,
        external_checkpoint=external_checkpoint,
        mode=mode,
        external_label=external_label,
    )


def verify_batches(
    batches: Iterable[Iterable[LedgerEntry | MalformedRecord | tuple[Any, ...]]],
    root: RootLike,
    *,
    checkpoints: Iterable[Checkpoint | MalformedRecord] = (),
    external_checkpoint: Checkpoint | None = None,
    mode: LedgerMode | None = None,
    external_label: str = "external checkpoint",
    span: Span | None = None,
    tallies: InstanceTallies | None = None,
) -> VerifyReport:
    """`verify_entries` over entries that come in batches (rows fetched many at a time), or
    over the range `span` of a ledger (see Span). `tallies`, when given, is filled with the
    verified entries' per-instance tallies (runtime/instance_tally.py)."""
    chain = KeyChain(RootOfTrust.of(root))
    try:
        return _verify(
            batches, chain, checkpoints, external_checkpoint, mode, external_label, span, tallies
        )
    except _Failure as failure:
        return VerifyReport(
            failure.count,
            False,
            failure.index,
            failure.reason,
            failure.problem,
            mode=chain.mode,
            keys=tuple(chain.introduced),
        )


def _verify_control(
    chain: KeyChain,
    position: int,
    kind: str,
    entry: tuple[Any, ...],
    computed: bytes,
) -> None:
    """Check a control entry (genesis, rotation, retirement) and apply it to the key chain."""
    ts_ms, machine, instance, from_state, to_state, body = entry[1], *entry[3:8]
    actor, event_id, payload, key_id, signature = entry[8], entry[9], entry[10], *entry[13:15]
    if (machine, instance, from_state, to_state, event_id, actor) != (
        "",
        "",
        "",
        "",
        "",
        CONTROL_ACTOR,
    ) or not isinstance(body, str):
        raise _Failure(position, "malformed", f"a {kind} entry must hold only its body", position)
    if not body.isascii() or payload != _sha256(PAYLOAD_TAG + body.encode()).digest():
        raise _Failure(
            position, "malformed", f"the {kind} entry's payload digest is not its body's", position
        )
    if not key_id or type(key_id) is not str or type(signature) is not bytes or not signature:
        raise _Failure(position, "missing_signature", f"a {kind} entry must be signed", position)
    try:
        if kind == GENESIS:
            trusted = chain.genesis(position, body, key_id)
            if not trusted.info.covers(ts_ms):
                raise ChainError(
                    "key_window",
                    f"root key {key_id} is not valid at {ts_ms} ms "
                    f"(window {trusted.info.window_text()})",
                )
        else:
            trusted = chain.signer(position, key_id, ts_ms, f"{kind} entry")
    except ChainError as error:
        raise _chain_failure(error, position, position) from None
    if not trusted.verify(signature, SIG_TAG + computed):
        raise _Failure(
            position,
            "bad_signature",
            f"bad signature on the {kind} entry by key {key_id}"
            + (" (a rotation must be signed by the outgoing key)" if kind == ROTATION else ""),
            position,
        )
    if kind != GENESIS:
        try:
            chain.apply(position, kind, body)
        except ChainError as error:
            raise _chain_failure(error, position, position) from None


def _replay_control(chain: KeyChain, control: Mapping[int, tuple[Any, ...]], start: int) -> None:
    """Apply the control entries before `start` to `chain`, checking each as the range that
    holds it does (content hash, signature by a key the chain trusts at that point). The
    join then holds each of these ranges to exactly these entries."""
    compute = _entry_hasher()
    for seq in sorted(control):
        if seq >= start:
            break
        entry = control[seq]
        try:
            computed = compute(*entry[:12])
        except (AttributeError, TypeError, UnicodeEncodeError, struct.error, OverflowError):
            raise _Failure(seq, "malformed", "a control entry cannot be encoded", seq) from None
        if computed != entry[12] or entry[0] != seq or entry[2] not in CONTROL_KINDS:
            raise _Failure(seq, "hash_mismatch", "a control entry does not hold together", seq)
        _verify_control(chain, seq, entry[2], entry, computed)
    if chain.mode is None:
        raise _Failure(0, "genesis", "the control entries start with no genesis entry", 0)


def _verify(
    batches: Iterable[Iterable[Any]],
    chain: KeyChain,
    checkpoints: Iterable[Checkpoint | MalformedRecord],
    external: Checkpoint | None,
    declared_mode: LedgerMode | None,
    label: str,
    span: Span | None = None,
    tallies: InstanceTallies | None = None,
) -> VerifyReport:
    if declared_mode is not None and declared_mode not in MODES:
        raise _Failure(0, "malformed", f"unknown ledger mode {declared_mode!r}", 0)
    if external is not None:
        problem = _checkpoint_shape_problem(external)
        if problem is not None:
            raise _Failure(0, "malformed", f"external checkpoint: {problem}", 0)
    tree = _Tree()
    position = 0
    head = GENESIS_HASH
    batches = iter(batches)
    control: Mapping[int, tuple[Any, ...]] | None = None
    if span is not None:
        control = span.control
        if span.start:
            # A range after seq 0: the key chain up to its start comes from the control entries
            # the join was given (checked here, and held to the stored ones by their ranges);
            # the chain link, the checkpoint link and the tree's left part are the join's.
            _replay_control(chain, control, span.start)
            position = span.start
            tree.deferred = span.roots
            first = iter(next(batches, ()))  # a batch may be a cursor: read one entry of it
            peek = next(first, None)
            if isinstance(peek, tuple) and len(peek) == len(LEDGER_COLUMNS):
                head = peek[11]
            span.first_prev = head
            if peek is not None:
                batches = itertools.chain(((peek,), first), batches)
    stream = _CheckpointStream(checkpoints, chain, tree, link_known=not position)
    external_size = external.size if external is not None else -1
    kinds, control_kinds, data_kinds, sig_tag = KINDS, CONTROL_KINDS, _UNSIGNED_KINDS, SIG_TAG
    sign_each = chain.mode == "sign-each"
    checkpoint_mode = chain.mode == "checkpoint"
    uncovered_from = -1  # the first unsigned entry not yet covered by a signed checkpoint
    settled = False
    controls_seen = 0
    append_leaf = tree.pending.append
    compute = _entry_hasher()  # the sealer's: the same bytes, built by the same code
    tree_mask = _TREE_BATCH - 1  # a power of two: flush when position & mask is 0
    # Per-instance tallies (instance_tally.py): 1 for a change, 0 for the other entries of an
    # instance, 2 for an escalation (a change unless the deadline tracker's).
    by_instance = None if tallies is None else tallies.by_instance
    tally_roles = {kind: int(kind in CHANGE_KINDS) for kind in INSTANCE_KINDS}
    tally_roles["escalation"] = 2
    tally_role, tally_limit = tally_roles.get, -1 if tallies is None else tallies.limit
    first_break: Break | None = None

    def next_stop(position: int) -> int:
        """The next size at which a stored or the external checkpoint is to be checked."""
        ahead = [size for size in (stream.next_size, external_size) if size > position]
        return min(ahead) if ahead else -1

    if external_size == 0 or stream.next_size == 0:
        raise _Failure(0, "malformed", "a checkpoint at size 0 covers no genesis entry", 0)
    stop = next_stop(position)
    iterator: Iterator[Any] = iter(())
    for batch in batches:
        iterator = iter(batch)
        for entry in iterator:
            try:
                (
                    seq,
                    ts_ms,
                    kind,
                    machine,
                    instance,
                    from_state,
                    to_state,
                    event,
                    actor,
                    event_id,
                    payload,
                    prev,
                    stored,
                    key_id,
                    signature,
                ) = entry
            except (TypeError, ValueError):
                raise _Failure(
                    position, "malformed", _shape_problem(entry) or "not a ledger entry", position
                ) from None
            if seq != position or type(seq) is not int:
                rest = itertools.chain(iterator, itertools.chain.from_iterable(batches))
                problem, reason = _describe_sequence_problem(position, seq, rest)
                raise _Failure(position, problem, reason, position)
            try:
                computed = compute(
                    seq,
                    ts_ms,
                    kind,
                    machine,
                    instance,
                    from_state,
                    to_state,
                    event,
                    actor,
                    event_id,
                    payload,
                    prev,
                )
            except (AttributeError, TypeError, UnicodeEncodeError, struct.error, OverflowError):
                reason = _shape_problem(entry) or "the entry cannot be encoded"
                raise _Failure(position, "malformed", reason, position) from None
            if computed != stored or prev != head or len(payload) != 32:
                _fail_link(entry, position, computed, head)
            if checkpoint_mode and kind in data_kinds and key_id == "" and signature == b"":
                # The common entry of a checkpoint-mode ledger: unsigned, covered later.
                if uncovered_from < 0:
                    uncovered_from = position
            else:
                if kind not in kinds:
                    raise _Failure(
                        position, "unknown_kind", f"unknown entry kind {kind!r}", position
                    )
                if position == 0 and kind != GENESIS:
                    raise _Failure(
                        0,
                        "genesis",
                        "seq 0 is not a genesis entry: the ledger declares no root key and no mode",
                        0,
                    )
                if kind in control_kinds:
                    if control is not None:
                        if control.get(position) != entry:
                            raise _Failure(
                                position,
                                "malformed",
                                f"the {kind} entry differs from the one the other ranges used",
                                position,
                            )
                        controls_seen += 1
                    _verify_control(chain, position, kind, entry, computed)
                    if position == 0:
                        sign_each = chain.mode == "sign-each"
                        checkpoint_mode = chain.mode == "checkpoint"
                        if declared_mode is not None and declared_mode != chain.mode:
                            raise _Failure(
                                0,
                                "mode_mismatch",
                                f"the store declares {declared_mode} mode, but the genesis "
                                f"entry declares {chain.mode} mode",
                                0,
                            )
                elif key_id or signature:
                    if checkpoint_mode and kind != KEPT:
                        raise _Failure(
                            position,
                            "unexpected_signature",
                            "entry carries a key id or signature, but the ledger is in "
                            "checkpoint mode",
                            position,
                        )
                    if type(key_id) is not str or type(signature) is not bytes:
                        reason = _shape_problem(entry) or "key_id or signature has the wrong type"
                        raise _Failure(position, "malformed", reason, position)
                    try:
                        trusted = chain.signer(position, key_id, ts_ms)
                    except ChainError as error:
                        raise _chain_failure(error, position, position) from None
                    if not trusted.verify(signature, sig_tag + computed):
                        raise _Failure(
                            position, "bad_signature", f"bad signature by key {key_id}", position
                        )
                elif key_id != "" or signature != b"":
                    reason = _shape_problem(entry) or "key_id or signature has the wrong type"
                    raise _Failure(position, "malformed", reason, position)
                elif sign_each:
                    raise _Failure(
                        position,
                        "missing_signature",
                        "missing signature (sign-each mode)",
                        position,
                    )
                elif kind == KEPT:
                    raise _Failure(
                        position,
                        "missing_signature",
                        "missing signature (a kept entry is signed in either mode)",
                        position,
                    )
                elif uncovered_from < 0:
                    uncovered_from = position
            if by_instance is not None:
                role = tally_role(kind)
                if role is not None and (role != 2 or actor != DEADLINE_ACTOR):
                    tally = by_instance.get((machine, instance))
                    if tally is None and len(by_instance) < tally_limit:
                        # Its first entry: where it starts is checked where ranges join.
                        tally = [position, from_state, from_state, 0, -1, "", -1, b""]
                        by_instance[machine, instance] = tally
                    if tally is None:
                        by_instance = None  # too many instances: given up, memory stays flat
                    else:
                        if from_state != tally[2] and first_break is None:
                            first_break = (position, machine, instance, from_state, tally[2])
                        tally[2] = to_state
                        if role:
                            tally[3] += 1
                            tally[4] = position
                            tally[5] = to_state
                        elif kind == KEPT:
                            tally[6] = position
                            tally[7] = payload
            head = computed
            append_leaf(computed)
            position += 1
            if not position & tree_mask:
                tree.flush()
            if position == stop:
                covered = stream.settle(position, head)
                if position == external_size and external is not None:
                    _check_checkpoint(external, chain, tree, position, head, label)
                    covered = True
                if covered:
                    uncovered_from = -1
                    settled = True
                stop = next_stop(position)

    if tallies is not None:
        tallies.by_instance, tallies.first_break = by_instance, first_break
    if span is not None and span.end is not None and position != span.end:
        reason = f"the range ends at seq {position}, not {span.end}"
        raise _Failure(position, "gap", reason, position)
    if position == 0:
        raise _Failure(0, "genesis", "the ledger is empty: it has no genesis entry", 0)
    if stream.unreadable is not None:
        stream.fail_if_unreadable(stream.next_size)
    if stream.pending is not None:
        # Only a validly signed checkpoint is evidence that entries are missing.
        pending = stream.pending
        _verify_checkpoint_signature(pending, chain, "checkpoint", position, position, any_key=True)
        raise _Failure(
            position,
            "truncated",
            f"truncated: a checkpoint is signed at size {pending.size}, but the ledger ends "
            f"after {position} entries ({_missing(pending.size - position)})",
            position,
        )
    if external is not None and external_size > position:
        _verify_checkpoint_signature(
            external, chain, label, external_size - 1, position, any_key=True
        )
        missing = external_size - position
        return VerifyReport(
            position,
            False,
            position,
            f"truncated: the {label} is signed at size {external_size}, but the "
            f"ledger ends after {position} entries ({_missing(missing)})",
            "truncated",
            stream.verified,
            chain.mode,
            tuple(chain.introduced),
            missing,
        )
    if span is not None:
        if control is not None and controls_seen != sum(
            1 for seq in control if span.start <= seq < position
        ):
            raise _Failure(position, "malformed", "control entries missing from the range", 0)
        tree.flush()
        span.end = position
        span.last_hash = head
        span.frontier = tuple(tree.nodes)
        span.first_link = stream.first_link
        span.last_link = stream.last_digest()
        span.settled = settled
        span.uncovered = uncovered_from >= 0
    elif uncovered_from >= 0:
        raise _Failure(
            uncovered_from,
            "uncovered",
            f"entries {uncovered_from}..{position - 1} are not covered by a signed checkpoint",
            position,
        )
    return VerifyReport(
        position, True, None, None, None, stream.verified, chain.mode, tuple(chain.introduced)
    )


def _fail_link(entry: tuple[Any, ...], position: int, computed: bytes, head: bytes) -> NoReturn:
    """Why an entry's hash, its link to the one before it, or its payload digest is wrong."""
    prev, stored, key_id, signature = entry[11], entry[12], entry[13], entry[14]
    shape = _shape_problem(entry)
    if shape is not None:
        raise _Failure(position, "malformed", shape, position)
    if prev != head and computed == stored and position and not (key_id or signature):
        # Entry `position` is intact and unsigned, so its prev_hash is the one that was
        # written: the previous entry was altered and rehashed after this one linked it.
        raise _Failure(
            position - 1,
            "chain_break",
            f"seq {position - 1} was altered after it was chained: its hash no longer "
            f"matches the prev_hash that seq {position} recorded for it",
            position - 1,
        )
    if prev != head:
        link = f"the hash of seq {position - 1}" if position else "the genesis hash"
        raise _Failure(
            position,
            "chain_break",
            f"prev_hash does not match {link} (chain broken)",
            position,
        )
    raise _Failure(
        position,
        "hash_mismatch",
        "entry hash mismatch: the stored hash does not match the entry's content",
        position,
    )


def _missing(count: int) -> str:
    return f"{count} entr{'y is' if count == 1 else 'ies are'} missing"
