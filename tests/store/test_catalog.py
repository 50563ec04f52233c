"""The catalog: models, bandwidths and events, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from tests.store.helpers import MODEL, FakeClock, make_spec
from torpor.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from torpor.store.catalog import Catalog
from torpor.store.records import NewEvent
from torpor.store.schema import BandwidthTier, DType, LoadFormat
from torpor.store.snapshots import SnapshotStore
from torpor.store.store_config import CatalogConfig


def test_register_get_list_models(catalog: Catalog, model_root: Path, clock: FakeClock) -> None:
    registered = catalog.register_model(make_spec(model_root, dtype=DType.FP8, priority=5))
    assert registered.spec.source_path == str((model_root / "ckpt").resolve())
    assert registered.created_at == clock.now
    got = catalog.get_model(MODEL)
    assert got == registered
    assert got.spec.dtype is DType.FP8
    catalog.register_model(make_spec(model_root, name="another"))
    assert [m.spec.name for m in catalog.list_models()] == ["another", MODEL]


def test_a_models_chat_template_is_kept(catalog: Catalog, model_root: Path) -> None:
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    catalog.register_model(make_spec(model_root, chat_template=template))
    assert catalog.get_model(MODEL).spec.chat_template == template
    catalog.register_model(make_spec(model_root, name="plain"))
    assert catalog.get_model("plain").spec.chat_template == ""


def test_a_models_load_format_is_kept(catalog: Catalog, model_root: Path) -> None:
    catalog.register_model(make_spec(model_root, load_format=LoadFormat.DUMMY))
    assert catalog.get_model(MODEL).spec.load_format is LoadFormat.DUMMY
    catalog.register_model(make_spec(model_root, name="plain"))
    assert catalog.get_model("plain").spec.load_format is LoadFormat.CHECKPOINT


def test_register_twice_is_already_exists_unless_replace(
    catalog: Catalog, model_root: Path, clock: FakeClock
) -> None:
    first = catalog.register_model(make_spec(model_root))
    with pytest.raises(AlreadyExists):
        catalog.register_model(make_spec(model_root, max_batch=2))
    clock.advance(60)
    replaced = catalog.register_model(make_spec(model_root, max_batch=2), replace=True)
    assert replaced.spec.max_batch == 2
    assert replaced.created_at == first.created_at
    assert replaced.updated_at == clock.now


def test_source_outside_the_roots_is_refused(catalog: Catalog, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "models" / "sneaky")
    for source in (elsewhere, tmp_path / "models" / "sneaky", tmp_path / "models" / ".." / "x"):
        with pytest.raises(InvalidArgument):
            catalog.register_model(make_spec(tmp_path / "models", source_path=str(source)))
    assert catalog.list_models() == ()


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "../x"},
        {"max_batch": 0},
        {"max_seq_len": -1},
        {"keep_alive_s": -1.0},
        {"dtype": "bfloat16"},
    ],
)
def test_bad_specs_are_invalid_argument(model_root: Path, overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        make_spec(model_root, **overrides)


def test_pin_and_delete_models(catalog: Catalog, model_root: Path) -> None:
    catalog.register_model(make_spec(model_root))
    assert catalog.set_model_pinned(MODEL, True).spec.pinned
    assert catalog.get_model(MODEL).spec.pinned
    catalog.delete_model(MODEL)
    with pytest.raises(NotFound):
        catalog.get_model(MODEL)
    with pytest.raises(NotFound):
        catalog.delete_model(MODEL)


def test_a_model_with_snapshots_cannot_be_deleted(store: SnapshotStore, catalog: Catalog) -> None:
    with store.begin(MODEL, "fp", reserve_bytes=10) as w:
        w.add_tensor(b"x" * 10)
        w.commit({})
    with pytest.raises(FailedPrecondition) as err:
        catalog.delete_model(MODEL)
    assert err.value.reason == "MODEL_HAS_SNAPSHOTS"
    assert store.delete_model_snapshots(MODEL) == 1
    catalog.delete_model(MODEL)


def test_bandwidth_is_an_exponentially_weighted_mean(catalog: Catalog) -> None:
    tier = BandwidthTier.DISK_READ
    assert catalog.get_bandwidth("h1", tier) is None
    assert catalog.record_bandwidth("h1", tier, 1_000, 1.0).bytes_per_s == 1000
    second = catalog.record_bandwidth("h1", tier, 2_000, 1.0)
    assert second.bytes_per_s == pytest.approx(0.2 * 2000 + 0.8 * 1000)
    assert second.samples == 2
    catalog.record_bandwidth("h1", BandwidthTier.HOST_TO_GPU, 55e9, 1.0)
    catalog.record_bandwidth("h2", tier, 10, 1.0)
    assert [(b.host, b.tier) for b in catalog.list_bandwidths("h1")] == [
        ("h1", BandwidthTier.DISK_READ),
        ("h1", BandwidthTier.HOST_TO_GPU),
    ]
    assert len(catalog.list_bandwidths()) == 3
    with pytest.raises(InvalidArgument):
        catalog.record_bandwidth("h1", tier, 0, 1.0)
    with pytest.raises(InvalidArgument):
        catalog.record_bandwidth("", tier, 1, 1.0)


def test_events_are_an_ordered_audit_trail(catalog: Catalog, clock: FakeClock) -> None:
    first = catalog.append_event(
        "evicted", model=MODEL, runtime="r1", gpu="0", detail={"to": "DISK"}
    )
    clock.advance(10)
    second = catalog.append_event("restored", model="other")
    assert second.id > first.id
    assert catalog.events_after(0) == (first, second)
    assert catalog.events_after(first.id) == (second,)
    assert catalog.events_after(0, model=MODEL) == (first,)
    assert first.detail == {"to": "DISK"} and first.gpu == "0"
    assert catalog.prune_events(clock.now - timedelta(seconds=5)) == 1
    assert catalog.events_after(0) == (second,)
    with pytest.raises(InvalidArgument):
        catalog.append_event("Bad Kind")


def test_a_batch_of_events_is_one_transaction_in_order(catalog: Catalog, clock: FakeClock) -> None:
    happened = clock.now - timedelta(seconds=3)
    written = catalog.append_events(
        [NewEvent("granted", model=MODEL, ts=happened), NewEvent("released", detail={"n": 2})]
    )
    assert [e.kind for e in written] == ["granted", "released"]
    assert written[0].id < written[1].id
    assert written[0].ts == happened and written[1].ts == clock.now  # None: when written
    assert catalog.events_after(0) == written
    assert catalog.append_events([]) == ()
    with pytest.raises(InvalidArgument):  # one bad kind refuses the whole batch
        catalog.append_events([NewEvent("ok"), NewEvent("Bad Kind")])
    assert catalog.events_after(0) == written


def test_times_come_back_utc_aware(catalog: Catalog, clock: FakeClock) -> None:
    event = catalog.append_event("x")
    assert catalog.events_after(0)[0].ts == clock.now == event.ts
    assert catalog.events_after(0)[0].ts.utcoffset() == timedelta(0)


def test_reopening_keeps_everything(
    catalog_config: CatalogConfig, catalog: Catalog, model_root: Path
) -> None:
    catalog.register_model(make_spec(model_root))
    catalog.append_event("loaded", model=MODEL)
    catalog.close()
    with Catalog.open(catalog_config) as again:
        assert again.get_model(MODEL).spec.name == MODEL
        assert len(again.events_after(0)) == 1


def test_sqlite_runs_wal_with_foreign_keys(tmp_path: Path) -> None:
    with Catalog.open(f"sqlite:///{tmp_path / 'c.db'}") as cat, cat.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


@pytest.mark.parametrize(
    "url",
    ["mysql://x/y", "sqlite://", "sqlite:///:memory:", "not a url", "postgresql+psycopg2://h/d"],
)
def test_bad_urls_are_invalid_config(url: str) -> None:
    with pytest.raises(InvalidArgument):
        CatalogConfig(url=url)


def test_plain_postgresql_url_means_psycopg3() -> None:
    assert CatalogConfig(url="postgresql://u@h/d").parsed_url().drivername == "postgresql+psycopg"


def test_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        Catalog.open("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(Unavailable):
        Catalog.open(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'c.db'}")
