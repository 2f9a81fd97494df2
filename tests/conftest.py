"""The stores the store tests run against: SQLite always, PostgreSQL when a server is given.

AUTONOMIC_TEST_POSTGRES=postgresql://...  use that server (each test gets a schema of its own,
                                          dropped afterwards)
AUTONOMIC_TEST_POSTGRES=start             initdb and start a throwaway cluster in a temporary
                                          folder for the session of each test worker (Debian:
                                          apt-get install postgresql), stopped at the end
unset                                     the PostgreSQL cases skip, saying this; under CI=true
                                          a throwaway cluster is started as with `start`, and
                                          if none can be, they fail: CI cannot pass without them
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg_cluster
import pytest
from autonomic.runtime.keys import generate_keypair
from autonomic.runtime.ledger import RootLike, VerifyReport, verify_ledger
from autonomic.runtime.processes import available_cpus
from autonomic.runtime.store.base import Store
from autonomic.runtime.store.locate import open_store
from billing_world import START

POSTGRES_ENV = "AUTONOMIC_TEST_POSTGRES"
HOW_TO_RUN = (
    f"PostgreSQL tests need a server: set {POSTGRES_ENV}=start to run a throwaway cluster "
    "(needs Debian's `postgresql` package: initdb and pg_ctl), or "
    f"{POSTGRES_ENV}=postgresql://USER@HOST/DB for a database the tests may create schemas in"
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`--numprocesses=auto` (pyproject.toml): one worker more than the CPUs this process may
    use, at most four. The tests wait much of their time on subprocesses, fsync and
    PostgreSQL; on a 2-core machine 3 workers ran the suite fastest (545 s against 645 s
    with 2 and 760 s with 4, each at a load near 7)."""
    return min(available_cpus() + 1, 4)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    value = os.environ.get(POSTGRES_ENV, "")
    in_ci = os.environ.get("CI", "").lower() == "true"
    if not value:
        if not in_ci:
            pytest.skip(HOW_TO_RUN)
        value = "start"
    if value != "start":
        yield value
        return
    if pg_cluster.find_bin() is None:
        pytest.fail(f"no initdb is installed, and CI must run the PostgreSQL tests. {HOW_TO_RUN}")
    # Not under pytest's own temporary folder: pytest keeps that one private to its user
    # (0700, reset by every run), and as root the server runs as the `postgres` user.
    folder = Path(tempfile.mkdtemp(prefix="autonomic-pg-"))
    try:
        url = pg_cluster.start(folder)
        try:
            yield url
        finally:
            pg_cluster.stop(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Stores:
    """Named stores of one kind for one test: `location(name)` is an SQLite path or a URL to
    a fresh PostgreSQL schema; `rows` runs a plain SQL query on either, for assertions and
    for tampering the way someone with database access would."""

    def __init__(self, kind: str, folder: Path, server: str | None) -> None:
        self.kind = kind
        self._folder = folder
        self._server = server
        self._schemas: dict[str, str] = {}

    def location(self, name: str = "s") -> str:
        if self._server is None:
            return str(self._folder / f"{name}.db")
        schema = self._schemas.get(name)
        if schema is None:
            schema = self._schemas[name] = f"t_{secrets.token_hex(6)}_{name}"
            self._admin(f"CREATE SCHEMA {schema}")
        separator = "&" if "?" in self._server else "?"
        return f"{self._server}{separator}options=-csearch_path%3D{schema}"

    def open(self, name: str = "s", **options: Any) -> Store:
        return open_store(self.location(name), **options)

    def rows(self, name: str, sql: str) -> list[tuple[Any, ...]]:
        if self._server is None:
            with sqlite3.connect(self.location(name)) as db:
                return db.execute(sql).fetchall()
        import psycopg

        with psycopg.connect(self.location(name), autocommit=True) as connection:
            cursor = connection.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []

    def verify(self, name: str, root: RootLike) -> VerifyReport:
        """Verify the stored ledger offline, the way `autonomic audit verify` does."""
        if self._server is None:
            return verify_ledger(self.location(name), root)
        from autonomic.runtime.audit_store import verify_url

        return verify_url(self.location(name), root, workers=1)

    def _admin(self, statement: str) -> None:
        import psycopg

        assert self._server is not None
        with psycopg.connect(self._server, autocommit=True) as connection:
            connection.execute(statement.encode())

    def drop(self) -> None:
        for schema in self._schemas.values():
            self._admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    server = request.getfixturevalue("postgres_server") if request.param == "postgres" else None
    made = Stores(request.param, tmp_path, server)
    yield made
    if server is not None:
        made.drop()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A signing key valid from just before billing_world.START (the Billing resilience
    tests'; a module with a `keys` fixture of its own uses that one)."""
    folder = tmp_path / "keys"
    generate_keypair(folder, valid_from_ms=START - 1)
    return folder


@pytest.fixture
def postgres_stores(tmp_path: Path, postgres_server: str) -> Iterator[Stores]:
    """PostgreSQL only: for partitions, leases and migrations, which SQLite does not have."""
    made = Stores("postgres", tmp_path, postgres_server)
    yield made
    made.drop()
