"""Fallback routing: call the backup when, and only when, the primary is unavailable.

"Unavailable" is `errors.is_unavailable(error)`: the primary raised Unavailable (or an error
with a truthy `unavailable` attribute), which includes CircuitOpen from the primary's breaker,
so a primary wrapped in `breaker.call` falls back while its breaker is open without being
called. Every other failure of the primary propagates unchanged and the backup is not called:
a declined card is not a reason to try another processor. A failure of the backup propagates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import is_unavailable

__all__ = ["call_with_fallback", "call_with_fallback_async"]

T = TypeVar("T")


def call_with_fallback(
    primary: Callable[[], T],
    backup: Callable[[], T],
    *,
    on_fallback: Callable[[BaseException], None] | None = None,
) -> T:
    """The primary's result, or the backup's if the primary was unavailable; `on_fallback`
    hears the primary's error before the backup is called."""
    try:
        return primary()
    except Exception as error:
        if not is_unavailable(error):
            raise
        if on_fallback is not None:
            on_fallback(error)
    return backup()


async def call_with_fallback_async(
    primary: Callable[[], Awaitable[T]],
    backup: Callable[[], Awaitable[T]],
    *,
    on_fallback: Callable[[BaseException], None] | None = None,
) -> T:
    """`call_with_fallback` for coroutine functions."""
    try:
        return await primary()
    except Exception as error:
        if not is_unavailable(error):
            raise
        if on_fallback is not None:
            on_fallback(error)
    return await backup()
