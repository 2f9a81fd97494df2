"""The Merkle tree over ledger entries (RFC 9162 section 2.1) and its consistency proofs.

Leaf i is the SHA-256 entry hash of seq i. Hashes follow RFC 9162: a leaf is
SHA-256(0x00 || entry_hash), an inner node SHA-256(0x01 || left || right), the empty tree
SHA-256(""). A checkpoint signs the tree root besides the head hash, so a witness holding an
older checkpoint checks that a newer one extends it from a consistency proof of about
log2(size) hashes, without reading the ledger.

`TreeFrontier` keeps the roots of the perfect subtrees left to right (one per set bit of the
size), which is all an appender needs: appending is amortised two hashes, the root is
popcount(size) hashes away, and the frontier is what the runtime stores beside a checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "EMPTY_ROOT",
    "SubtreeHasher",
    "TreeFrontier",
    "consistency_proof",
    "extend_frontier",
    "leaf_hash",
    "node_hash",
    "tree_root",
    "verify_consistency",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def leaf_hash(entry_hash: bytes) -> bytes:
    return _sha256(b"\x00" + entry_hash).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


@dataclass(frozen=True, slots=True)
class TreeFrontier:
    """The perfect-subtree roots of a tree of `size` leaves, largest (leftmost) first."""

    size: int = 0
    nodes: tuple[bytes, ...] = ()

    def extend(self, entry_hashes: Iterable[bytes]) -> TreeFrontier:
        """The frontier after appending these entries (self is unchanged: a batch that rolls
        back simply drops the result)."""
        nodes = list(self.nodes)
        hashes = entry_hashes if type(entry_hashes) is list else list(entry_hashes)
        if len(hashes) < _LEVELS_FROM:
            size = _append_each(nodes, self.size, hashes)
        else:
            size = extend_frontier(
                nodes, self.size, [_sha256(b"\x00" + e).digest() for e in hashes]
            )
        return _frontier(size, tuple(nodes))

    def root(self) -> bytes:
        nodes = self.nodes
        if not nodes:
            return EMPTY_ROOT
        sha256 = _sha256
        node = nodes[-1]
        for index in range(len(nodes) - 2, -1, -1):
            node = sha256(b"\x01" + nodes[index] + node).digest()  # node_hash, inline
        return node

    def to_bytes(self) -> bytes:
        return b"".join(self.nodes)

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> TreeFrontier | None:
        """The frontier stored beside a checkpoint, or None when the blob cannot be one."""
        count = size.bit_count() if size >= 0 else -1
        if type(data) is not bytes or len(data) != 32 * count:
            return None
        return cls(size, tuple(data[i : i + 32] for i in range(0, len(data), 32)))


# A frontier's slots set directly: a runtime extends its tree at every commit, and the frozen
# dataclass __init__ (an object.__setattr__ call per field) costs twice as much.
_set_size = getattr(TreeFrontier, "size").__set__  # noqa: B009
_set_nodes = getattr(TreeFrontier, "nodes").__set__  # noqa: B009


def _frontier(size: int, nodes: tuple[bytes, ...]) -> TreeFrontier:
    """TreeFrontier(size, nodes)."""
    frontier: TreeFrontier = object.__new__(TreeFrontier)
    _set_size(frontier, size)
    _set_nodes(frontier, nodes)
    return frontier


def extend_frontier(nodes: list[bytes], size: int, leaves: list[bytes]) -> int:
    """Append leaf hashes to the frontier `nodes` of a `size`-leaf tree, in place; the new
    size. Leaves go in as the largest perfect subtrees that fit where the tree ends, each
    built a level at a time (a comprehension per level, not a loop step per node); a subtree
    of width w then merges like a leaf, one pair per trailing zero of (size + w) / w."""
    sha256 = _sha256
    start, count = 0, len(leaves)
    while start < count:
        aligned = (size & -size).bit_length() - 1 if size else count.bit_length()
        width = 1 << min(aligned, (count - start).bit_length() - 1)
        level = leaves[start : start + width]
        while len(level) > 1:
            level = [
                sha256(b"\x01" + left + right).digest()
                for left, right in zip(level[::2], level[1::2], strict=True)
            ]
        node = level[0]
        start += width
        size += width
        bits = size // width
        while not bits & 1:
            node = sha256(b"\x01" + nodes.pop() + node).digest()
            bits >>= 1
        nodes.append(node)
    return size


# From this many entries on, `extend` builds the batch's subtrees a level at a time
# (`extend_frontier`); below it, a commit's few entries go in one by one (`_append_each`),
# which costs a third less for the handful of entries a commit appends.
_LEVELS_FROM = 256


def _append_each(nodes: list[bytes], size: int, entry_hashes: list[bytes]) -> int:
    """`extend_frontier` of these entries' leaves, appended one at a time: each leaf merges
    with the frontier's last node once per trailing zero of the new size."""
    sha256 = _sha256
    for entry in entry_hashes:
        node = sha256(b"\x00" + entry).digest()
        size += 1
        bits = size
        while not bits & 1:
            node = sha256(b"\x01" + nodes.pop() + node).digest()
            bits >>= 1
        nodes.append(node)
    return size


def tree_root(entry_hashes: Iterable[bytes]) -> bytes:
    return TreeFrontier().extend(entry_hashes).root()


def consistency_proof(
    old_size: int, new_size: int, subtree: Callable[[int, int], bytes]
) -> list[bytes]:
    """RFC 9162 2.1.4.1 PROOF(old_size, D[new_size]); `subtree(a, b)` gives MTH(D[a:b])."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    start, end, m, complete = 0, new_size, old_size, True
    trail: list[bytes] = []
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            trail.append(subtree(start + k, end))
            end = start + k
        else:
            trail.append(subtree(start, start + k))
            start, m, complete = start + k, m - k, False
    if not complete:
        proof.append(subtree(start, end))
    proof.extend(reversed(trail))
    return proof


class SubtreeHasher:
    """MTH(D[start:end]) over leaves read by index, with the perfect subtrees a frontier
    already knows (those of the old size), so a proof reads only the new entries."""

    def __init__(self, entry_hash: Callable[[int], bytes], known: TreeFrontier | None = None):
        self._entry_hash = entry_hash
        self._memo: dict[tuple[int, int], bytes] = {}
        if known is not None:
            start = 0
            for node in known.nodes:
                width = _width_at(known.size, start)
                self._memo[(start, start + width)] = node
                start += width

    def __call__(self, start: int, end: int) -> bytes:
        found = self._memo.get((start, end))
        if found is not None:
            return found
        if end - start == 1:
            value = leaf_hash(self._entry_hash(start))
        else:
            k = _split(end - start)
            value = node_hash(self(start, start + k), self(start + k, end))
        self._memo[(start, end)] = value
        return value


def _width_at(size: int, start: int) -> int:
    """The width of the frontier subtree of a `size`-leaf tree that begins at `start`."""
    remaining = size - start
    return 1 << (remaining.bit_length() - 1)


def verify_consistency(
    old_size: int, old_root: bytes, new_size: int, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 2.1.4.2: does the tree of `new_size` leaves extend the one of `old_size`?"""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
