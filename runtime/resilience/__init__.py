"""The seed's resilience patterns: backoff, retry, breaker, fallback, bulkheads, deadlines,
TTL cache, batches and pure proration; each module states its semantics."""

from __future__ import annotations

from .backoff import (
    Backoff,
    jitter_delay_ms,
    jitter_with_cap,
    retry_later_ms,
    throttle_delay_ms,
)
from .batch import ChunkFailed, chunks, dispatch_in_chunks, run_in_chunks
from .breaker import BreakerChange, BreakerState, BreakerStatus, CircuitBreaker
from .bulkhead import Bulkhead, TenantBulkheads
from .deadlines import Deadline, DeadlineEscalation, DeadlineTracker, escalation_entry
from .errors import (
    BulkheadFull,
    CircuitOpen,
    ServiceFailure,
    TransientFailure,
    Unavailable,
    is_transient,
    is_unanswered,
    is_unavailable,
    is_unhealthy,
)
from .fallback import call_with_fallback, call_with_fallback_async
from .proration import Proration, prorate
from .retry import Retry, clock_sleeper, retry_call
from .ttl_cache import CatalogCache, ttl_cache

__all__ = [
    "Backoff",
    "BreakerChange",
    "BreakerState",
    "BreakerStatus",
    "Bulkhead",
    "BulkheadFull",
    "CatalogCache",
    "ChunkFailed",
    "CircuitBreaker",
    "CircuitOpen",
    "Deadline",
    "DeadlineEscalation",
    "DeadlineTracker",
    "Proration",
    "Retry",
    "ServiceFailure",
    "TenantBulkheads",
    "TransientFailure",
    "Unavailable",
    "call_with_fallback",
    "call_with_fallback_async",
    "chunks",
    "clock_sleeper",
    "dispatch_in_chunks",
    "escalation_entry",
    "is_transient",
    "is_unanswered",
    "is_unavailable",
    "is_unhealthy",
    "jitter_delay_ms",
    "jitter_with_cap",
    "prorate",
    "retry_call",
    "retry_later_ms",
    "run_in_chunks",
    "throttle_delay_ms",
    "ttl_cache",
]
