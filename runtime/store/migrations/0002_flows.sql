-- autonomic PostgreSQL store, schema version 2: durable flow runs (runtime/flows).
CREATE TABLE flows (
    flow_id TEXT PRIMARY KEY,
    flow TEXT NOT NULL,
    instance TEXT NOT NULL,
    status TEXT NOT NULL,
    version BIGINT NOT NULL,
    data TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    wake_ms BIGINT
);
CREATE INDEX flows_unfinished ON flows (updated_ms, flow_id)
    WHERE status NOT IN ('completed', 'compensated', 'failed');
