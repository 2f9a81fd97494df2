-- autonomic PostgreSQL store, schema version 10: a pending outbox event whose delivery got no
-- answer from its receiver's outside call (a timeout, the service unreachable, its breaker
-- open, the tenant's bulkhead full) stays pending and is tried again with backoff
-- (runtime/outbox.py): how many such deliveries it had, and when it is due again.
CREATE TABLE outbox_retries (
    id BIGINT PRIMARY KEY,
    attempts BIGINT NOT NULL,
    retry_at_ms BIGINT NOT NULL
);
