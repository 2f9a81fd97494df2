-- autonomic PostgreSQL store, schema version 6: a snapshot names its instance's newest "kept"
-- ledger entry (-1: none), so replay from it checks the kept data (runtime/replay.py).
ALTER TABLE snapshots ADD COLUMN kept_seq BIGINT NOT NULL DEFAULT -1;
