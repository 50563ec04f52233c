"""Alembic migrations: a database created at the oldest revision upgrades with data intact."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, insert, inspect

from tests.store.helpers import MODEL, blob, read_all
from torpor.store import migrate
from torpor.store.catalog import Catalog
from torpor.store.chunks import ChunkStore
from torpor.store.schema import BandwidthTier, Base, DType, LoadFormat, SnapshotState
from torpor.store.snapshots import SnapshotStore
from torpor.store.store_config import CatalogConfig, SnapshotStoreConfig

WHEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_revisions_are_a_line_from_0001() -> None:
    assert migrate.revisions_oldest_first() == ["0001", "0002", "0003", "0004"]
    assert migrate.head_revision() == "0004"


def _fill_oldest_schema(url: str, chunk_store: ChunkStore, source: Path) -> list[bytes]:
    """Create the 0001 schema and write one of everything into it with plain SQL."""
    engine = create_engine(CatalogConfig(url=url).parsed_url())
    try:
        migrate.upgrade(engine, "0001")
        assert migrate.current_revision(engine) == "0001"
        tensors = [blob("m:0", 3000), blob("m:1", 10)]
        refs = [chunk_store.put(t) for t in tensors]
        tables = MetaData()
        tables.reflect(engine)
        t = tables.tables
        store_id = chunk_store.store_id
        with engine.begin() as conn:
            conn.execute(
                insert(t["models"]).values(
                    name=MODEL,
                    source_path=str(source),
                    dtype="fp8",
                    max_batch=4,
                    max_seq_len=2048,
                    priority=3,
                    pinned=True,
                    keep_alive_s=30.0,
                    created_at=WHEN,
                    updated_at=WHEN,
                )
            )
            conn.execute(
                insert(t["snapshots"]).values(
                    id="a" * 32,
                    store_id=store_id,
                    model_name=MODEL,
                    fingerprint="fp",
                    state="complete",
                    total_bytes=3010,
                    reserved_bytes=0,
                    manifest={"layout": [1, 2]},
                    created_at=WHEN,
                    last_used_at=WHEN,
                    pinned=False,
                )
            )
            for i, ref in enumerate(refs):
                conn.execute(
                    insert(t["chunks"]).values(
                        store_id=store_id, hash=ref.hash, size=ref.size, refcount=1
                    )
                )
                conn.execute(
                    insert(t["snapshot_chunks"]).values(
                        snapshot_id="a" * 32, ordinal=i, store_id=store_id, hash=ref.hash
                    )
                )
            conn.execute(
                insert(t["bandwidths"]).values(
                    host="h", tier="disk_read", bytes_per_s=1.5e9, samples=7, updated_at=WHEN
                )
            )
            conn.execute(
                insert(t["events"]).values(
                    ts=WHEN, kind="loaded", model=MODEL, detail={"gpu_bytes": 123}
                )
            )
        return tensors
    finally:
        engine.dispose()


def test_upgrade_from_the_oldest_revision_keeps_the_data(
    db_url: str, tmp_path: Path, model_root: Path
) -> None:
    root = tmp_path / "store"
    tensors = _fill_oldest_schema(db_url, ChunkStore(root), model_root / "ckpt")
    config = CatalogConfig(url=db_url, model_roots=(model_root,))
    with Catalog.open(config) as catalog:
        assert migrate.current_revision(catalog.engine) == migrate.head_revision()
        model = catalog.get_model(MODEL)
        assert (model.spec.dtype, model.spec.priority, model.spec.pinned) == (DType.FP8, 3, True)
        assert model.created_at == WHEN
        assert model.spec.chat_template == ""  # 0003: none for a model registered before
        assert model.spec.load_format is LoadFormat.CHECKPOINT  # 0004: its checkpoint's
        bandwidth = catalog.get_bandwidth("h", BandwidthTier.DISK_READ)
        assert bandwidth is not None and (bandwidth.bytes_per_s, bandwidth.samples) == (1.5e9, 7)
        (event,) = catalog.events_after(0)
        assert (event.kind, event.detail) == ("loaded", {"gpu_bytes": 123})
        store = SnapshotStore.open(catalog, SnapshotStoreConfig(root=root, capacity_bytes=1 << 20))
        info = store.get("a" * 32)
        assert info.state is SnapshotState.COMPLETE and info.total_bytes == 3010
        with store.reading(info.id) as contents:
            assert contents.manifest == {"layout": [1, 2]}
        assert list(read_all(store, info.id)) == tensors
        indexes = {ix["name"] for ix in inspect(catalog.engine).get_indexes("snapshots")}
        assert {"ix_snapshots_lru", "ix_snapshots_model"} <= indexes


def test_models_match_the_head_migration(catalog: Catalog) -> None:
    with catalog.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_open_is_idempotent_and_downgrade_works(db_url: str) -> None:
    Catalog.open(db_url).close()
    with Catalog.open(db_url) as catalog:
        assert migrate.current_revision(catalog.engine) == migrate.head_revision()
        with catalog.engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "base")
        assert migrate.current_revision(catalog.engine) is None
        assert "models" not in inspect(catalog.engine).get_table_names()
        migrate.upgrade(catalog.engine)
        assert migrate.current_revision(catalog.engine) == migrate.head_revision()


def test_migrations_are_found_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with Catalog.open(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
        assert migrate.current_revision(catalog.engine) == migrate.head_revision()
    assert list(elsewhere.iterdir()) == []
