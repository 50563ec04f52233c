"""Fixtures of the store tests. Every catalog test runs on SQLite and on PostgreSQL.

PostgreSQL comes from TORPOR_TEST_POSTGRES_URL (tests/postgres/run-with-postgres.sh sets
it; `make test` runs pytest under that script). Each test gets a fresh database on that
server. Without the URL the PostgreSQL cases FAIL, unless TORPOR_TEST_NO_POSTGRES=1 is set
on purpose for a quick local run, which skips them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.store.helpers import MODEL, FakeClock, StoreFactory, make_spec
from torpor.store.catalog import Catalog
from torpor.store.snapshots import SnapshotStore
from torpor.store.store_config import CatalogConfig, SnapshotStoreConfig

POSTGRES_ENV = "TORPOR_TEST_POSTGRES_URL"
NO_POSTGRES_ENV = "TORPOR_TEST_NO_POSTGRES"


def postgres_server_url() -> str:
    """The test server's URL; fails (or skips, when explicitly allowed) without one."""
    url = os.environ.get(POSTGRES_ENV)
    if url:
        return url
    if os.environ.get(NO_POSTGRES_ENV) == "1":
        pytest.skip(f"{NO_POSTGRES_ENV}=1: PostgreSQL cases skipped on request")
    pytest.fail(
        f"{POSTGRES_ENV} is not set: run the tests through tests/postgres/run-with-postgres.sh "
        f"(`make test` does), or set {NO_POSTGRES_ENV}=1 to skip PostgreSQL on purpose",
        pytrace=False,
    )


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh, empty database on the test server; dropped afterwards."""
    server = make_url(postgres_server_url()).set(drivername="postgresql+psycopg")
    name = f"torpor_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            # FORCE: crash tests leave connections of killed writers behind.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A catalog URL, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return str(request.getfixturevalue("postgres_database"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    """The one configured model root, with a checkpoint directory `ckpt` in it."""
    root = tmp_path / "models"
    (root / "ckpt").mkdir(parents=True)
    return root


@pytest.fixture
def catalog_config(db_url: str, model_root: Path) -> CatalogConfig:
    return CatalogConfig(url=db_url, model_roots=(model_root,), busy_timeout_s=30)


@pytest.fixture
def catalog(catalog_config: CatalogConfig, clock: FakeClock) -> Iterator[Catalog]:
    with Catalog.open(catalog_config, clock=clock) as cat:
        yield cat


@pytest.fixture
def registered(catalog: Catalog, model_root: Path) -> str:
    """Register the test model; returns its name."""
    catalog.register_model(make_spec(model_root))
    return MODEL


@pytest.fixture
def make_store(catalog: Catalog, registered: str, tmp_path: Path) -> StoreFactory:
    """Open a snapshot store over the catalog (capacity and chunk size per test)."""

    def make(capacity: int = 1 << 30, max_chunk: int = 64 * 1024, root: Path | None = None):
        config = SnapshotStoreConfig(
            root=root or tmp_path / "store", capacity_bytes=capacity, max_chunk_bytes=max_chunk
        )
        return SnapshotStore.open(catalog, config)

    return make


@pytest.fixture
def store(make_store: StoreFactory) -> SnapshotStore:
    return make_store()
