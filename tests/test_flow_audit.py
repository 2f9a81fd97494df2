"""Flow runs held to the ledger by `autonomic audit verify` and read back by `audit show`: a
`flows` row edited behind the runtime's back (status, reason, inputs, version, flow, deleted,
added, unsealed) fails verification with A006 naming the run, on SQLite and PostgreSQL; an
untouched store verifies and counts its runs; `audit show` gives a run's instance and its
compensation reason only when the row matches the entries' digests."""

from __future__ import annotations

from pathlib import Path

import pytest
from autonomic.runtime.keys import load_signer
from autonomic.runtime.store.sqlite import SQLiteStore
from conftest import Stores
from flow_world import marketplace
from test_flows import NOISY, Injector, active_customer, unanswered
from test_instance_audit import audit, keys, run_cli

CUSTOMER = "cust-1"
REASON = "injected failure at archive_subscription"


def compensated_run(stores: Stores, public: Path) -> str:
    """A signup and a cancellation saga whose last step fails and is compensated (PostgreSQL:
    four ledger partitions); the saga's run id."""
    injector = Injector()
    store = stores.open("m", partitions=4 if stores.kind == "postgres" else None)
    runtime, runner, _ = marketplace(store, signer=load_signer(public.parent), before_step=injector)
    with runtime:
        active_customer(runtime, runner, CUSTOMER)
        injector.target = (CUSTOMER, "SubscriptionCancellation", "archive_subscription", "do")
        inputs = {"customer_id": CUSTOMER, "request_id": "cx-1", "reason": "too pricey"}
        result = runner.start("SubscriptionCancellation", CUSTOMER, inputs)
    assert result.status == "compensated"
    return result.flow_id


def show(stores: Stores, flow_id: str) -> tuple[int, str]:
    location = stores.location("m")
    if stores.kind == "sqlite":
        return run_cli("audit", "show", location, flow_id)
    return run_cli("audit", "show", "--store", location, flow_id)


TAMPERS = {
    "status": (
        "UPDATE flows SET status = 'completed' WHERE flow_id = '{run}'",
        "the row holds status 'completed' at version {version}, but the run's newest entry "
        "(CompensationCompleted, written at that version) records 'compensated'",
    ),
    "reason": (
        "UPDATE flows SET data = replace(data, 'injected failure', 'a timeout') "
        "WHERE flow_id = '{run}'",
        "the row's failed step and reason differ from what the run's ending entry commits to",
    ),
    "inputs": (
        "UPDATE flows SET data = replace(data, 'too pricey', 'moved away') WHERE flow_id = '{run}'",
        "the row's inputs differ from what the run's FlowStarted entry commits to",
    ),
    "version": (
        "UPDATE flows SET version = version - 1 WHERE flow_id = '{run}'",
        "the row holds status 'compensated' at version {version_1}, but the run's newest entry "
        "(CompensationCompleted into 'compensated') was not written at that version",
    ),
    "flow": (
        "UPDATE flows SET flow = 'SubscriptionUpgrade' WHERE flow_id = '{run}'",
        "the row names flow 'SubscriptionUpgrade', but the ledger records this run as "
        "'SubscriptionCancellation'",
    ),
    "deleted": (
        "DELETE FROM flows WHERE flow_id = '{run}'",
        "entries of this flow run, but the store holds no row for it (deleted?)",
    ),
    "added": (
        "INSERT INTO flows (flow_id, flow, instance, status, version, data, updated_ms, seal) "
        "SELECT 'flw_0', flow, instance, status, version, data, updated_ms, seal FROM flows "
        "WHERE flow_id = '{run}'",
        "SubscriptionCancellation run 'flw_0': the flows row (status 'compensated', "
        "version {version}) has no ledger entry",
    ),
    "unsealed": (
        "UPDATE flows SET seal = NULL WHERE flow_id = '{run}'",
        "the row carries no seal, though the store's rows are sealed",
    ),
}
# The row's ordering, the entries' grouping, the sealed mark and a row's columns as read.
PG_TAMPERS = {"status", "deleted", "added", "unsealed"}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_audit_verify_names_the_flow_run_the_ledger_contradicts(
    stores: Stores, tmp_path: Path, tamper: str
) -> None:
    if stores.kind == "postgres" and tamper not in PG_TAMPERS:
        pytest.skip("the checks are shared; PostgreSQL runs the tampers its own queries see")
    public = keys(tmp_path)
    run = compensated_run(stores, public)
    code, out = audit(stores, public)
    assert code == 0, out
    assert "and 2 flow runs (status, version and inputs)" in out  # the signup's and the saga's
    sql, message = TAMPERS[tamper]
    # The run's last version: how many writes it took depends on whether each compensation's
    # dispatch shared the run's transaction (its ledger partition), on PostgreSQL.
    [(version,)] = stores.rows("m", f"SELECT version FROM flows WHERE flow_id = '{run}'")
    message = message.format(version=version, version_1=version - 1)
    stores.rows("m", sql.format(run=run))
    code, out = audit(stores, public)
    assert code == 1, out
    assert " A006 [error] " in out and message in out, out
    assert "= hint: the store's flows table was changed outside autonomic" in out


def test_audit_show_gives_the_reason_and_instance_only_where_the_row_matches(
    stores: Stores, tmp_path: Path
) -> None:
    public = keys(tmp_path)
    run = compensated_run(stores, public)
    code, out = show(stores, run)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"SubscriptionCancellation run {run} for '{CUSTOMER}', inputs ")
    assert "its id derives from the flow, this instance and these inputs" in lines[0]
    [end] = [i for i, line in enumerate(lines) if "CompensationCompleted" in line]
    assert lines[end + 1].strip() == (
        f"failed step 'archive_subscription', reason: {REASON} (the flows row's text, "
        "matching this entry's digest)"
    )
    stores.rows(
        "m",
        f"UPDATE flows SET data = replace(data, '{REASON}', 'a timeout') WHERE flow_id = '{run}'",
    )
    code, out = show(stores, run)
    assert code == 0 and "a timeout" not in out and REASON not in out, out
    assert (
        "reason: not shown: the flows row's failed step and reason do not match this entry's "
        "digest" in out
    )
    stores.rows("m", f"UPDATE flows SET instance = 'cust-2' WHERE flow_id = '{run}'")
    code, out = show(stores, run)
    assert "the instance only as the flows row says: the run's id does not derive" in out


def test_waiting_and_failed_fanout_runs_verify_and_show_their_reason(tmp_path: Path) -> None:
    """A fanout waiting for replies (an unfinished row) verifies; so does one that then
    misses its quorum, whose FlowFailed digest holds its reason alone (fanin.py)."""
    public = keys(tmp_path)
    db = tmp_path / "m.db"
    runtime, runner, _ = marketplace(
        SQLiteStore(db),
        signer=load_signer(public.parent),
        before_step=unanswered("contention", "notify"),
    )
    with runtime:
        active_customer(runtime, runner, "n-1")
        waiting = runner.start("NoisyNeighbour", "n-1", {"customer_id": "n-1", **NOISY})
        assert waiting.status == "waiting"
        code, out = run_cli("audit", "verify", str(db), "--public-key", str(public))
        assert code == 0 and "and 2 flow runs" in out, out
        runtime.clock.advance("30s")
        (failed,) = runner.resume_all()
    assert failed.status == "failed" and failed.reason == "1 of 3 replies, quorum 2"
    code, out = run_cli("audit", "verify", str(db), "--public-key", str(public))
    assert code == 0 and "and 2 flow runs" in out, out
    code, out = run_cli("audit", "show", str(db), failed.flow_id)
    [end] = [i for i, line in enumerate(out.splitlines()) if "FlowFailed" in line]
    assert out.splitlines()[end + 1].strip() == (
        "reason: 1 of 3 replies, quorum 2 (the flows row's text, matching this entry's digest)"
    )
