-- autonomic PostgreSQL store, schema version 8: a processed event id or idempotency key
-- found missing is checked against the ledger (runtime/store/row_seals.py, DedupAnchor): a
-- "transition" entry recording it, newer than the purge horizon, means its row was deleted.
-- Partial: entries without an event id (most) cost the index nothing.
CREATE INDEX ledger_by_event ON ledger (machine, event_id) WHERE event_id <> '';
