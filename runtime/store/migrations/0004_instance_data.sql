-- autonomic PostgreSQL store, schema version 4: instance data, the fields an instance keeps
-- beside its state (`data { ... }` and `keep` in a machine; runtime/instance_data.py).
CREATE TABLE instance_data (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (machine, instance)
);
