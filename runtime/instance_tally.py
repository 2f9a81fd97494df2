"""Per-instance tallies taken in the verifier's own pass over a ledger, for the instance audit.

The instance audit (runtime/instance_audit.py) needs, per (machine, instance): the count of its
changes and the newest one's seq and to_state, its newest kept entry's seq and digest, and
whether its entries are continuous (each starts in the state the one before it ended in, the
first from ''). The verifier (runtime/verify.py) reads every entry anyway, so it tallies these
as it verifies, one InstanceTallies per range (ledger_ranges.py) or per sequential pass; the
ranges' tallies are merged in seq order, and the merge checks continuity across each boundary
as the join checks the hash chain: an instance's first entry in a range must start where its
last entry in the ranges before ended (from '' if none did).

Memory stays flat: past `limit` instances a tally gives up (`by_instance` None), and the audit
falls back to the database's aggregates over the same snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .ledger import KEPT

__all__ = [
    "CHANGE_KINDS",
    "DEADLINE_ACTOR",
    "INSTANCE_KINDS",
    "MAX_TALLIED_INSTANCES",
    "InstanceTallies",
]

# The entry kinds that change an instance (its version counts them); the deadline tracker's
# "escalation" entries (runtime/resilience/deadlines.py) belong to no instance row.
CHANGE_KINDS = ("transition", "timer", "escalation")
DEADLINE_ACTOR = "deadline-tracker"
# The entries of an instance whose states must be continuous: rejections and kept entries too.
INSTANCE_KINDS = (*CHANGE_KINDS, "rejection", KEPT)
# Instances a tally holds before it gives up: each costs about 400 bytes in every range and in
# the merge, 3.5 KB in all with 8 ranges, so 2,048 of them keep the peak within 4 MB.
MAX_TALLIED_INSTANCES = 1 << 11

# A tally, a list for speed: [first seq, its from_state, the last to_state, changes, the
# newest change's seq, its to_state, the newest kept entry's seq, its digest] (-1: none).
FIRST_SEQ, FIRST_FROM, LAST_TO, CHANGES, CHANGE_SEQ, STATE, KEPT_SEQ, DIGEST = range(8)

Key = tuple[str, str]
# Where continuity breaks: (seq, machine, instance, from_state, the previous to_state or None).
Break = tuple[int, str, str, str, str | None]


class InstanceTallies:
    """The tallies of a seq range, filled by the verifier, or of the ranges merged so far.

    `by_instance` maps (machine, instance) to its tally (None: past `limit` instances, given
    up); `first_break` is the first entry, by seq, that does not start where its instance's
    previous entry ended (within the range; the merge adds the boundaries)."""

    __slots__ = ("by_instance", "first_break", "limit")

    def __init__(self, limit: int = MAX_TALLIED_INSTANCES) -> None:
        self.by_instance: dict[Key, list[Any]] | None = {}
        self.first_break: Break | None = None
        self.limit = limit

    @property
    def complete(self) -> bool:
        return self.by_instance is not None

    def merge(self, part: InstanceTallies | None) -> None:
        """Fold in the tallies of the range that follows the ones merged so far (None: that
        range took none, so these give up too)."""
        mine, theirs = self.by_instance, None if part is None else part.by_instance
        if mine is None or theirs is None:
            self.by_instance = None
            return
        if self.first_break is not None:
            return  # an earlier entry breaks continuity: that is the audit's answer
        assert part is not None
        found = part.first_break
        for key, tally in theirs.items():
            have = mine.get(key)
            previous = None if have is None else have[LAST_TO]
            if tally[FIRST_FROM] != ("" if previous is None else previous) and (
                found is None or tally[FIRST_SEQ] < found[0]
            ):
                found = (tally[FIRST_SEQ], *key, tally[FIRST_FROM], previous)
            if have is None:
                if len(mine) >= self.limit:
                    self.by_instance = None
                    return
                mine[key] = tally
                continue
            have[LAST_TO] = tally[LAST_TO]
            if tally[CHANGES]:
                have[CHANGES] += tally[CHANGES]
                have[CHANGE_SEQ], have[STATE] = tally[CHANGE_SEQ], tally[STATE]
            if tally[KEPT_SEQ] >= 0:
                have[KEPT_SEQ], have[DIGEST] = tally[KEPT_SEQ], tally[DIGEST]
        self.first_break = found

    def changes(self) -> Iterator[tuple[str, str, int, int, str]]:
        """(machine, instance, changes, newest change's seq, its to_state) of every instance
        with a change, in key order (byte order: code point order is UTF-8's)."""
        tallies = self._tallies()
        for key in sorted(tallies):
            tally = tallies[key]
            if tally[CHANGES]:
                yield (*key, tally[CHANGES], tally[CHANGE_SEQ], tally[STATE])

    def kept(self) -> Iterator[tuple[str, str, int, bytes]]:
        """(machine, instance, newest kept entry's seq, its digest), in key order."""
        tallies = self._tallies()
        for key in sorted(tallies):
            tally = tallies[key]
            if tally[KEPT_SEQ] >= 0:
                yield (*key, tally[KEPT_SEQ], tally[DIGEST])

    def _tallies(self) -> dict[Key, list[Any]]:
        if self.by_instance is None:
            raise ValueError("the tallies gave up past their limit of instances")
        return self.by_instance
