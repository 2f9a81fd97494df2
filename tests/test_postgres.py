"""What only the PostgreSQL store has: versioned migrations and refusing databases that are not
its own, ledger partitions with a signed root, and leased claims of timers and messages."""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path
from typing import Any

import pytest
from autonomic.compiler import cli
from autonomic.runtime.audit_store import verify_url
from autonomic.runtime.dispatch import Governor
from autonomic.runtime.errors import (
    ActionFailed,
    NestedDispatch,
    StoreConfigError,
    StoreIntegrityError,
)
from autonomic.runtime.keychain import fingerprint
from autonomic.runtime.keys import (
    Keyring,
    generate_keypair,
    load_public_key,
    load_signer,
    load_trusted_root,
    now_ms,
)
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.partitions import merkle_root, partition_of
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.postgres import LATEST_SCHEMA, PostgresStore, migrate
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from runtime_machines import MINUTE, Bindings, counter_spec

START = 1_800_000_000_000


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, valid_from_ms=START - 86_400_000)
    return folder


def fleet(stores: Stores, key_dir: Path, partitions: int, name: str = "s") -> Runtime:
    store = PostgresStore(stores.location(name), partitions=partitions)
    sealer = LedgerSealer(load_signer(key_dir))
    return Runtime(store, clock=VirtualClock(START), sealer=sealer)


def test_migrate_creates_then_finds_nothing_to_do(postgres_stores: Stores) -> None:
    url = postgres_stores.location()
    assert migrate(url, partitions=4) == (0, LATEST_SCHEMA)
    assert migrate(url) == (LATEST_SCHEMA, LATEST_SCHEMA)
    rows = postgres_stores.rows("s", "SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == list(range(1, LATEST_SCHEMA + 1))
    with pytest.raises(StoreConfigError, match="fixed when the store is created"):
        migrate(url, partitions=8)
    store = PostgresStore(url)
    assert store.partitions == 4
    store.close()


def test_a_version_1_store_is_migrated_to_the_latest(postgres_stores: Stores) -> None:
    url = postgres_stores.location()
    migrate(url)
    # Back to what version 1 of autonomic created: no flows, breakers, deadlines, instance
    # data, outside-call claims, timer retries or outbox retries tables, snapshots that name no
    # kept entry, no row seals and no ledger index by event id.
    postgres_stores.rows(
        "s",
        "DROP TABLE flows, breakers, deadlines, instance_data, outside_claims, timer_retries, "
        "outbox_retries",
    )
    postgres_stores.rows("s", "ALTER TABLE snapshots DROP COLUMN kept_seq")
    postgres_stores.rows("s", "DROP INDEX ledger_by_event")
    for table in ("instances", "processed_events", "idempotency_keys", "timers", "outbox"):
        postgres_stores.rows("s", f"ALTER TABLE {table} DROP COLUMN seal")
    postgres_stores.rows("s", "DELETE FROM schema_migrations WHERE version > 1")
    postgres_stores.rows("s", "UPDATE autonomic_meta SET value = '1' WHERE key = 'schema'")
    with pytest.raises(StoreConfigError, match="older than this"):
        PostgresStore(url)
    assert migrate(url) == (1, LATEST_SCHEMA)
    with PostgresStore(url) as store:
        assert store.unfinished_flows() == [] and store.deadlines() == []


def test_a_newer_schema_is_refused_untouched(postgres_stores: Stores) -> None:
    url = postgres_stores.location()
    migrate(url)
    postgres_stores.rows(
        "s", f"UPDATE autonomic_meta SET value = '{LATEST_SCHEMA + 1}' WHERE key = 'schema'"
    )
    before = postgres_stores.rows("s", "SELECT key, value FROM autonomic_meta ORDER BY key")
    for attempt in (lambda: PostgresStore(url), lambda: migrate(url)):
        with pytest.raises(StoreConfigError, match="newer than this autonomic knows") as caught:
            attempt()
        assert "upgrade autonomic" in str(caught.value.hint)
    assert postgres_stores.rows("s", "SELECT key, value FROM autonomic_meta ORDER BY key") == before


def test_an_older_schema_waits_for_migrate(postgres_stores: Stores) -> None:
    url = postgres_stores.location()
    migrate(url)
    postgres_stores.rows("s", "UPDATE autonomic_meta SET value = '0' WHERE key = 'schema'")
    with pytest.raises(StoreConfigError, match="older than this") as caught:
        PostgresStore(url)
    assert "autonomic db migrate" in str(caught.value.hint)


def test_another_programs_schema_is_refused_untouched(postgres_stores: Stores) -> None:
    url = postgres_stores.location()
    postgres_stores.rows("s", "CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
    postgres_stores.rows("s", "INSERT INTO accounts VALUES (1, 100)")
    for attempt in (lambda: PostgresStore(url), lambda: migrate(url)):
        with pytest.raises(StoreConfigError, match="tables of something else"):
            attempt()
    tables = postgres_stores.rows(
        "s", "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    )
    assert tables == [("accounts",)]
    assert postgres_stores.rows("s", "SELECT * FROM accounts") == [(1, 100)]


def test_an_empty_database_is_created_only_when_asked(postgres_stores: Stores) -> None:
    with pytest.raises(StoreConfigError, match="holds no autonomic store"):
        PostgresStore(postgres_stores.location(), create=False)
    assert postgres_stores.rows(
        "s", "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
    ) == [(0,)]


def test_a_wrong_url_is_a_diagnostic_without_the_password() -> None:
    with pytest.raises(StoreConfigError, match="cannot connect") as caught:
        PostgresStore("postgresql://someone:s3cret@127.0.0.1:1/nothing?connect_timeout=2")
    assert "s3cret" not in str(caught.value)


def test_partitions_keep_instances_in_their_own_gap_free_chain(
    postgres_stores: Stores, key_dir: Path
) -> None:
    rt = fleet(postgres_stores, key_dir, 4)
    counter = rt.load(counter_spec(), *Bindings().for_spec(counter_spec()))
    names = [f"c{n}" for n in range(24)]
    for name in names:
        counter.create(name)
        counter.dispatch(name, "Tick")
    assert rt.replay("Counter", "c7").version == 2
    rt.close()
    rows = postgres_stores.rows("s", "SELECT part, seq, instance FROM ledger ORDER BY part, seq")
    by_part: dict[int, list[int]] = {}
    for part, seq, instance in rows:
        # Each chain starts with its own genesis entry; the rest are its instances' entries.
        assert part == partition_of(instance, 4) or (seq, instance) == (0, "")
        by_part.setdefault(part, []).append(seq)
    assert len(by_part) == 4  # 24 instances spread over every chain
    assert all(seqs == list(range(len(seqs))) for seqs in by_part.values())
    report = verify_url(postgres_stores.location(), Keyring.from_files([key_dir]), workers=2)
    assert report.ok and report.count == 4 + 48, report.reason


def tamper_and_verify(stores: Stores, key_dir: Path, *statements: str) -> str:
    for statement in statements:
        stores.rows("s", statement)
    report = verify_url(stores.location(), Keyring.from_files([key_dir]), workers=1)
    assert not report.ok
    return str(report.reason)


@pytest.fixture
def sample(postgres_stores: Stores, key_dir: Path) -> Stores:
    rt = fleet(postgres_stores, key_dir, 4)
    counter = rt.load(counter_spec(), *Bindings().for_spec(counter_spec()))
    for n in range(12):
        counter.create(f"c{n}")
        counter.dispatch(f"c{n}", "Tick")
    rt.close()
    return postgres_stores


def test_a_dropped_partition_tail_is_caught_by_the_root(sample: Stores, key_dir: Path) -> None:
    # Entries and checkpoints of one chain removed together: the chain alone still verifies.
    reason = tamper_and_verify(
        sample,
        key_dir,
        "DELETE FROM ledger WHERE part = 2 AND seq >= 2",
        "DELETE FROM ledger_checkpoints WHERE part = 2 AND size > 2",
    )
    assert "partition 2 had" in reason and "entries were removed" in reason


def test_an_entry_moved_to_another_partition_is_caught(sample: Stores, key_dir: Path) -> None:
    reason = tamper_and_verify(
        sample,
        key_dir,
        "UPDATE ledger SET part = 9 WHERE part = 1 AND seq = 1",
        "UPDATE ledger SET part = 1 WHERE part = 3 AND seq = 1",
        "UPDATE ledger SET part = 3 WHERE part = 9",
    )
    assert "is stored in partition" in reason


def test_a_changed_root_is_caught(sample: Stores, key_dir: Path) -> None:
    reason = tamper_and_verify(sample, key_dir, "UPDATE ledger_roots SET ts_ms = ts_ms + 1")
    assert "bad signature" in reason


def test_roots_are_counted_and_none_is_no_failure(sample: Stores, key_dir: Path) -> None:
    keyring = Keyring.from_files([key_dir])
    with_roots = verify_url(sample.location(), keyring, workers=1)
    sample.rows("s", "DELETE FROM ledger_roots")
    without = verify_url(sample.location(), keyring, workers=1)
    assert with_roots.ok and without.ok
    assert with_roots.checkpoints == without.checkpoints + 1  # close() signed one root


def test_every_partition_is_verified(sample: Stores, key_dir: Path) -> None:
    reason = tamper_and_verify(
        sample, key_dir, "UPDATE ledger SET actor = 'mallory' WHERE part = 3 AND seq = 1"
    )
    assert reason.startswith("partition 3: ")


def test_merkle_root_commits_to_every_head() -> None:
    heads = [(n, bytes([n]) * 32) for n in range(5)]
    root = merkle_root(heads)
    for index in range(5):
        changed = list(heads)
        changed[index] = (heads[index][0] + 1, heads[index][1])
        assert merkle_root(changed) != root
    assert merkle_root(heads[:4]) != root


def test_claims_lease_each_timer_to_one_worker_until_it_expires(
    postgres_stores: Stores, key_dir: Path
) -> None:
    rt = fleet(postgres_stores, key_dir, 2)
    counter = rt.load(counter_spec(), *Bindings().for_spec(counter_spec()))
    for n in range(6):
        counter.create(f"c{n}")
        counter.dispatch(f"c{n}", "Hold")  # arms a 10 minute step and a 30 minute end
    rt.close()
    url = postgres_stores.location()
    first, second = PostgresStore(url, lease_ms=60_000), PostgresStore(url, lease_ms=60_000)
    due = START + 31 * MINUTE
    mine = first.claim_due_timers(due, ["Counter"], 100)
    # Only the earliest timer of each instance: the end waits for the step before it.
    assert sorted(t.instance for t in mine) == [f"c{n}" for n in range(6)]
    assert {t.timer_id for t in mine} == {"Holding.HoldLadder.1"}
    assert second.claim_due_timers(due, ["Counter"], 100) == []  # leased to the first
    postgres_stores.rows("s", "UPDATE timers SET lease_until_ms = 0")  # the leases run out
    assert len(second.claim_due_timers(due, ["Counter"], 100)) == 6
    first.close()
    second.close()


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exit:  # usage errors, as the process would exit
            code = int(exit.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_commands_take_a_postgresql_store(postgres_stores: Stores, tmp_path: Path) -> None:
    """demo, simulate and audit verify|export|show on a postgresql:// URL, as a user runs them."""
    url = postgres_stores.location()
    code, out, err = run_cli("db", "migrate", "--store", url, "--partitions", "4")
    assert code == 0 and "created the store at schema version" in out, err
    code, out, err = run_cli("demo", "--store", url, "--keys", str(tmp_path / "keys"))
    assert code == 0 and "ledger verified" in out and "4 ledger partitions" in out, err
    public = next((tmp_path / "keys").glob("*.public.json"))
    code, out, err = run_cli("audit", "verify", "--store", url, "--public-key", str(public))
    assert code == 0 and "in 4 partitions" in out, err
    customer = out and postgres_stores.rows("s", "SELECT instance FROM instances LIMIT 1")[0][0]
    code, out, err = run_cli("audit", "show", "--store", url, customer)
    assert code == 0 and "create" in out, err
    code, _, err = run_cli("audit", "export", "--store", url)
    assert code == 2 and "pass --partition P" in err
    export = tmp_path / "p1.jsonl"
    code, out, err = run_cli(
        "audit", "export", "--store", url, "--partition", "1", "--out", str(export)
    )
    assert code == 0, err
    code, out, err = run_cli("audit", "verify", str(export), "--public-key", str(public))
    assert code == 0 and "verified" in out, err
    postgres_stores.rows("s", "UPDATE ledger SET event = 'forged' WHERE part = 2 AND seq = 0")
    code, out, _ = run_cli("audit", "verify", "--store", url, "--public-key", str(public))
    assert code == 1 and "partition 2: " in out
    code, _, err = run_cli("simulate", "Counter", "--script", "x.yaml", "--store", url)
    assert code == 1


def test_a_key_rotation_goes_into_every_partition_at_once(
    postgres_stores: Stores, tmp_path: Path
) -> None:
    """`keygen --retire OLD --ledger URL` on a store of four partitions: every chain gets its
    rotation entry (signed by the old key) in one transaction, the checkpoints over them are
    signed by the new key, the old key can no longer open the store, and the whole ledger
    verifies from the old (root) key, roots signed by the new key included."""
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    generate_keypair(old_dir, valid_from_ms=now_ms() - 3_600_000)
    old = load_signer(old_dir)
    old_public = old_dir / f"{old.key_id}.public.json"
    url = postgres_stores.location()
    runtime = Runtime(PostgresStore(url, partitions=4), sealer=LedgerSealer(old))
    counter = runtime.load(counter_spec(), *Bindings().for_spec(counter_spec()))
    for n in range(8):
        counter.create(f"c{n}")
    runtime.close()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["keygen", str(new_dir), "--retire", str(old_public), "--ledger", url])
    assert code == 0, out.getvalue()
    new = load_signer(new_dir)
    assert f"introduces key {new.key_id}" in out.getvalue()
    rotations = postgres_stores.rows(
        "s", "SELECT part, key_id FROM ledger WHERE kind = 'key_rotation' ORDER BY part"
    )
    assert rotations == [(p, old.key_id) for p in range(4)]
    newest = postgres_stores.rows(
        "s",
        "SELECT DISTINCT ON (part) key_id FROM ledger_checkpoints ORDER BY part, size DESC",
    )
    assert newest == [(new.key_id,)] * 4
    with pytest.raises(StoreIntegrityError, match="does not hold active"):
        Runtime(PostgresStore(url), sealer=LedgerSealer(old))
    # keygen recorded the ledger's root beside the new key: the runtime pins it.
    assert load_trusted_root(new_dir) == fingerprint(old.public_info().public_key)
    runtime = Runtime(
        PostgresStore(url), sealer=LedgerSealer(new), trusted_root=load_trusted_root(new_dir)
    )
    counter = runtime.load(counter_spec(), *Bindings().for_spec(counter_spec()))
    for n in range(8):
        counter.dispatch(f"c{n}", "Tick")
    runtime.close()
    report = verify_url(url, load_public_key(old_public), workers=1)
    assert report.ok, report.reason
    assert report.keys == (old.key_id, new.key_id)
    assert report.count == 4 + 8 + 4 + 8  # geneses, creates, rotations, ticks


def test_a_nested_dispatch_is_refused_while_another_chain_commits(
    postgres_stores: Stores, key_dir: Path
) -> None:
    """Two chains commit at once in two threads: a dispatch from inside the action of one is
    refused (NestedDispatch), even though the other chain's batch started after it."""
    spec = counter_spec()
    guards, actions = Bindings().for_spec(spec)
    a_started, b_done = threading.Event(), threading.Event()
    holder: list[Governor] = []
    first, second = (
        "a-0",
        next(f"b-{n}" for n in range(100) if partition_of(f"b-{n}", 4) != partition_of("a-0", 4)),
    )

    def count(ctx: Any) -> None:
        if ctx.instance == first:  # committing in its chain while the other nests
            a_started.set()
            b_done.wait(10)
            return
        try:
            assert a_started.wait(10)
            holder[0].dispatch(second, "Hold")  # its own chain, whose batch this thread leads
        finally:
            b_done.set()

    rt = fleet(postgres_stores, key_dir, 4)
    counter = rt.load(spec, guards, {**actions, "count": count})
    holder.append(counter)
    counter.create(first)
    counter.create(second)
    caught: list[BaseException] = []

    def tick(instance: str) -> None:
        try:
            counter.dispatch(instance, "Tick")
        except BaseException as exc:
            caught.append(exc)

    threads = [threading.Thread(target=tick, args=(i,), daemon=True) for i in (second, first)]
    threads[0].start()
    threads[1].start()
    for thread in threads:
        thread.join(20)
    assert not any(t.is_alive() for t in threads), "the nested dispatch waited for itself"
    assert len(caught) == 1 and isinstance(caught[0], ActionFailed), caught
    assert isinstance(caught[0].cause, NestedDispatch)
    record = counter.get(first)
    assert record is not None and record.version == 2
    rt.close()
