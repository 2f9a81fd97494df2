-- autonomic PostgreSQL store, schema version 7: every operational row carries a seal, an
-- HMAC-SHA256 under a key derived from the runtime's signing key over the table name and
-- every column (runtime/store/row_seals.py), checked before the runtime acts on the row.
-- Rows written before are sealed as found when a runtime first opens the store with its key,
-- which then marks the store ('row_seals' in autonomic_meta): a missing seal is refused after.
ALTER TABLE instances ADD COLUMN seal BYTEA;
ALTER TABLE processed_events ADD COLUMN seal BYTEA;
ALTER TABLE idempotency_keys ADD COLUMN seal BYTEA;
ALTER TABLE timers ADD COLUMN seal BYTEA;
ALTER TABLE outbox ADD COLUMN seal BYTEA;
ALTER TABLE flows ADD COLUMN seal BYTEA;
ALTER TABLE deadlines ADD COLUMN seal BYTEA;
ALTER TABLE breakers ADD COLUMN seal BYTEA;
