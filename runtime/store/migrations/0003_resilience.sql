-- autonomic PostgreSQL store, schema version 3: resilience state (runtime/resilience): each
-- circuit breaker's state after its last move, and the deadline tracker's deadlines.
CREATE TABLE breakers (
    machine TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    failures BIGINT NOT NULL,
    opened_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (machine, name)
);
CREATE TABLE deadlines (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    governor TEXT NOT NULL,
    due_ms BIGINT NOT NULL,
    level BIGINT NOT NULL,
    action TEXT NOT NULL
);
CREATE INDEX deadlines_due ON deadlines (due_ms, id);
