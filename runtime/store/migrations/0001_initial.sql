-- autonomic PostgreSQL store, schema version 1: state rows, dedup and idempotency records,
-- timers and outbox with leases, snapshots, and the ledger partitioned into chains.
CREATE TABLE autonomic_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE instances (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    state TEXT NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (machine, instance)
);
CREATE TABLE processed_events (
    machine TEXT NOT NULL,
    event_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    result TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (machine, event_id)
);
CREATE INDEX processed_events_age ON processed_events (created_ms);
CREATE TABLE idempotency_keys (
    machine TEXT NOT NULL,
    key TEXT NOT NULL,
    request_sha256 BYTEA NOT NULL,
    result TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (machine, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_ms);
-- lease_owner/lease_until_ms: the worker that claimed a due timer, until when (database
-- clock, ms since the epoch); an expired lease is claimable again.
CREATE TABLE timers (
    id BIGSERIAL PRIMARY KEY,
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    timer_id TEXT NOT NULL,
    state TEXT NOT NULL,
    due_ms BIGINT NOT NULL,
    armed_version BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until_ms BIGINT,
    UNIQUE (machine, instance, timer_id)
);
CREATE INDEX timers_due ON timers (due_ms, id);
CREATE INDEX timers_by_instance ON timers (machine, instance, due_ms, id);
CREATE TABLE outbox (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    version BIGINT NOT NULL,
    target_machine TEXT NOT NULL,
    target_instance TEXT NOT NULL,
    event TEXT NOT NULL,
    event_id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    lease_owner TEXT,
    lease_until_ms BIGINT
);
CREATE INDEX outbox_pending ON outbox (status, kind, id);
CREATE INDEX outbox_by_target ON outbox (target_machine, target_instance, id)
    WHERE status = 'pending';
CREATE TABLE snapshots (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    version BIGINT NOT NULL,
    state TEXT NOT NULL,
    ledger_seq BIGINT NOT NULL,
    entry_hash BYTEA NOT NULL,
    PRIMARY KEY (machine, instance)
);
-- One chain per partition (part = hash of the instance id mod the partition count), each
-- with its own gap-free seq from 0 (a genesis entry) and its own chained checkpoints over its
-- own Merkle tree (docs/ledger.md). A batch locks its partition's ledger_heads row first.
CREATE TABLE ledger_heads (
    part INTEGER PRIMARY KEY
);
CREATE TABLE ledger (
    part INTEGER NOT NULL,
    seq BIGINT NOT NULL,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload_sha256 BYTEA NOT NULL,
    prev_hash BYTEA NOT NULL,
    entry_hash BYTEA NOT NULL,
    key_id TEXT NOT NULL,
    signature BYTEA NOT NULL,
    PRIMARY KEY (part, seq)
);
CREATE INDEX ledger_by_instance ON ledger (machine, instance, part, seq);
CREATE TABLE ledger_checkpoints (
    part INTEGER NOT NULL,
    size BIGINT NOT NULL,
    head_hash BYTEA NOT NULL,
    ts_ms BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    signature BYTEA NOT NULL,
    tree_root BYTEA NOT NULL,
    prev_checkpoint BYTEA NOT NULL,
    frontier BYTEA NOT NULL,
    PRIMARY KEY (part, size)
);
-- A signed Merkle root over every partition's (size, head hash): one signature commits to
-- the whole ledger. `heads` holds the leaves, 40 bytes per partition in partition order.
CREATE TABLE ledger_roots (
    id BIGSERIAL PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    partitions INTEGER NOT NULL,
    heads BYTEA NOT NULL,
    root BYTEA NOT NULL,
    key_id TEXT NOT NULL,
    signature BYTEA NOT NULL
);
CREATE TABLE ledger_meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
