"""Batch processing: a long run of work (a billing cycle) cut into chunks, one commit per chunk.

`dispatch_in_chunks(governor, requests, chunk_size)` is the runtime's billing cycle: each chunk
goes through `Governor.dispatch_many`, so on SQLite a chunk of up to `max_batch` events is one
transaction and one commit (with one checkpoint in checkpoint mode) instead of one per event.
Each event still succeeds or fails on its own: a rejected or failing event rolls back only its
own unit, and its slot in the result holds the error.

The general form:

`run_in_chunks(items, chunk_size, process_chunk)` hands `process_chunk` consecutive chunks of
at most `chunk_size` items, in order, and gathers what it returns; `process_chunk` commits the
chunk's work in one transaction, so a cycle over n customers costs ceil(n / chunk_size)
commits instead of n. A chunk that fails propagates its error at once: the chunks before it
are committed, the failed one rolled back by its transaction, the ones after it not started,
and `ChunkFailed.done` says how many items were committed, so a rerun can resume after them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from ..dispatch import DispatchRequest, Governor
    from ..results import DispatchResult

__all__ = ["ChunkFailed", "chunks", "dispatch_in_chunks", "run_in_chunks"]

T = TypeVar("T")
R = TypeVar("R")


class ChunkFailed(Exception):
    """A chunk failed after `done` items had been committed in earlier chunks."""

    def __init__(self, done: int, error: Exception) -> None:
        super().__init__(f"a chunk failed after {done} items were committed: {error}")
        self.done = done
        self.error = error


def chunks(items: Iterable[T], chunk_size: int) -> Iterator[list[T]]:
    """Consecutive chunks of at most `chunk_size` items, read lazily."""
    if chunk_size < 1:
        raise ValueError(f"a chunk holds at least 1 item, not {chunk_size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, chunk_size)):
        yield chunk


def run_in_chunks(
    items: Iterable[T],
    chunk_size: int,
    process_chunk: Callable[[Sequence[T]], Sequence[R]],
) -> list[R]:
    """Every chunk's results, in order; ChunkFailed (from the failed chunk's error) if one
    fails."""
    results: list[R] = []
    done = 0
    for chunk in chunks(items, chunk_size):
        try:
            results.extend(process_chunk(chunk))
        except Exception as error:
            raise ChunkFailed(done, error) from error
        done += len(chunk)
    return results


def dispatch_in_chunks(
    governor: Governor, requests: Iterable[DispatchRequest], chunk_size: int = 256
) -> list[DispatchResult | Exception]:
    """Every request's result or error, in order, committed one chunk at a time."""
    return run_in_chunks(requests, chunk_size, governor.dispatch_many)
