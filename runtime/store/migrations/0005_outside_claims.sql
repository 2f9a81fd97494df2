-- autonomic PostgreSQL store, schema version 5: outside-call claims, held by a dispatch from
-- before a policy's actions call the outside world until its unit of work commits, so that
-- two processes never call for one event id or idempotency key at once
-- (runtime/resilience/claims.py). A lease on the database clock lets a crashed holder's go.
CREATE TABLE outside_claims (
    machine TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    holder TEXT NOT NULL,
    until_ms BIGINT NOT NULL,
    PRIMARY KEY (machine, kind, key)
);
