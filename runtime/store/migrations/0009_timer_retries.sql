-- autonomic PostgreSQL store, schema version 9: a timer whose firing's action failed stays
-- armed and is tried again with backoff (runtime/timer_firing.py): how many of its firings
-- failed, the last one's error, and when it is due again. Keyed by the arming it retries.
CREATE TABLE timer_retries (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    timer_id TEXT NOT NULL,
    armed_version BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    retry_at_ms BIGINT NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (machine, instance, timer_id, armed_version)
);
