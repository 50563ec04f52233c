"""The catalog: what torpor remembers across restarts (models, bandwidths, events).

A synchronous API over SQLAlchemy: the daemon runs each call in a thread
(`asyncio.to_thread`), so the event loop never waits on the database. Snapshot and
chunk rows are managed by `torpor.store.snapshots.SnapshotStore` through `session()`.

SQLite (default) runs in WAL mode with foreign keys on; write transactions start with
`BEGIN IMMEDIATE`, so concurrent writers queue on the busy timeout instead of failing on a
lock upgrade. PostgreSQL is reached by URL (psycopg 3).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from torpor.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from torpor.log import get_logger
from torpor.store import migrate, private
from torpor.store.names import check_source_path, validate_model_name
from torpor.store.records import Bandwidth, Event, ModelRegistration, NewEvent, RegisteredModel
from torpor.store.schema import (
    BandwidthRow,
    BandwidthTier,
    EventRow,
    LoadFormat,
    ModelRow,
    SnapshotRow,
)
from torpor.store.store_config import CatalogConfig

Clock = Callable[[], datetime]
"""Returns the current time, UTC-aware; injected so tests control time."""

log = get_logger("store.catalog")


def utc_now() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


class Catalog:
    """The catalog database. Thread-safe: every call opens its own short session."""

    def __init__(self, config: CatalogConfig, engine: Engine, clock: Clock = utc_now) -> None:
        self.config = config
        self.engine = engine
        self.clock = clock
        self._writer = sessionmaker(engine, expire_on_commit=False)
        self._reader = sessionmaker(
            engine.execution_options(torpor_readonly=True), expire_on_commit=False
        )

    @classmethod
    def open(
        cls, config: CatalogConfig | str, *, clock: Clock = utc_now, upgrade: bool = True
    ) -> Catalog:
        """Connect to the catalog and (by default) upgrade its schema to the newest revision."""
        if isinstance(config, str):
            config = CatalogConfig(url=config)
        engine = _create_engine(config)
        try:
            if upgrade:
                migrate.upgrade(engine)
        except (OperationalError, DBAPIError) as exc:
            engine.dispose()
            raise _unavailable(config, exc) from exc
        log.info(
            "catalog_opened",
            url=config.parsed_url().render_as_string(hide_password=True),
            revision=migrate.current_revision(engine),
        )
        return cls(config, engine, clock)

    def close(self) -> None:
        """Release pooled connections (idempotent)."""
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on an exception.

        A lost or locked database raises Unavailable (retryable).
        """
        maker = self._writer if write else self._reader
        try:
            with maker.begin() as session:
                yield session
        except OperationalError as exc:
            raise _unavailable(self.config, exc) from exc

    # Models ---------------------------------------------------------------------------

    def register_model(self, spec: ModelRegistration, *, replace: bool = False) -> RegisteredModel:
        """Add a model; its source must lie under a model root (the resolved path is kept).

        An existing name raises AlreadyExists unless `replace`, which updates it in place.
        """
        source = check_source_path(spec.source_path, self.config.model_roots)
        now = self.clock()
        with self.session() as s:
            row = s.get(ModelRow, spec.name)
            if row is not None and not replace:
                raise AlreadyExists(
                    f"model {spec.name!r} is already registered",
                    reason="MODEL_EXISTS",
                    metadata={"model": spec.name},
                )
            if row is None:
                row = ModelRow(name=spec.name, created_at=now)
                s.add(row)
            _fill_model_row(row, spec, str(source), now)
            s.flush()
            model = _model(row)
        log.info("model_registered", model=spec.name, source=str(source), replace=replace)
        return model

    def get_model(self, name: str) -> RegisteredModel:
        """The registered model `name`; NotFound if there is none."""
        validate_model_name(name)
        with self.session(write=False) as s:
            row = s.get(ModelRow, name)
            if row is None:
                raise NotFound(
                    f"model {name!r} is not registered",
                    reason="MODEL_NOT_FOUND",
                    metadata={"model": name},
                )
            return _model(row)

    def list_models(self) -> tuple[RegisteredModel, ...]:
        """Every registered model, by name."""
        with self.session(write=False) as s:
            return tuple(_model(r) for r in s.scalars(select(ModelRow).order_by(ModelRow.name)))

    def set_model_pinned(self, name: str, pinned: bool) -> RegisteredModel:
        """Pin or unpin a model (SetPinned)."""
        validate_model_name(name)
        with self.session() as s:
            row = s.get(ModelRow, name)
            if row is None:
                raise NotFound(f"model {name!r} is not registered", reason="MODEL_NOT_FOUND")
            row.pinned = pinned
            row.updated_at = self.clock()
            return _model(row)

    def delete_model(self, name: str) -> None:
        """Unregister a model. Its snapshots must be deleted first (FailedPrecondition)."""
        validate_model_name(name)
        with self.session() as s:
            row = s.get(ModelRow, name)
            if row is None:
                raise NotFound(f"model {name!r} is not registered", reason="MODEL_NOT_FOUND")
            count = s.scalar(
                select(func.count()).select_from(SnapshotRow).where(SnapshotRow.model_name == name)
            )
            if count:
                raise FailedPrecondition(
                    f"model {name!r} still has {count} snapshot(s); delete them first",
                    reason="MODEL_HAS_SNAPSHOTS",
                    metadata={"model": name, "snapshots": count},
                )
            s.delete(row)
        log.info("model_deleted", model=name)

    # Bandwidths -----------------------------------------------------------------------

    def record_bandwidth(
        self, host: str, tier: BandwidthTier, nbytes: int, seconds: float
    ) -> Bandwidth:
        """Fold one measured transfer into the host's mean for `tier` and return the mean."""
        _check_host(host)
        if nbytes <= 0 or seconds <= 0:
            raise InvalidArgument(
                f"a bandwidth sample needs bytes > 0 and seconds > 0, got {nbytes}, {seconds}",
                reason="INVALID_SAMPLE",
            )
        rate = nbytes / seconds
        alpha = self.config.bandwidth_alpha
        for attempt in range(2):
            try:
                with self.session() as s:
                    row = s.get(BandwidthRow, (host, tier), with_for_update=True)
                    if row is None:
                        row = BandwidthRow(host=host, tier=tier, bytes_per_s=rate, samples=0)
                        s.add(row)
                    else:
                        row.bytes_per_s = alpha * rate + (1 - alpha) * row.bytes_per_s
                    row.samples += 1
                    row.updated_at = self.clock()
                    s.flush()
                    return _bandwidth(row)
            except IntegrityError:
                if attempt:  # a concurrent first sample won the insert: fold into it
                    raise
        raise AssertionError("unreachable")

    def get_bandwidth(self, host: str, tier: BandwidthTier) -> Bandwidth | None:
        """The measured mean for a host and tier, or None before the first sample."""
        with self.session(write=False) as s:
            row = s.get(BandwidthRow, (host, tier))
            return None if row is None else _bandwidth(row)

    def list_bandwidths(self, host: str | None = None) -> tuple[Bandwidth, ...]:
        """Every measured mean (of one host if given), by host and tier."""
        query = select(BandwidthRow).order_by(BandwidthRow.host, BandwidthRow.tier)
        if host is not None:
            query = query.where(BandwidthRow.host == host)
        with self.session(write=False) as s:
            return tuple(_bandwidth(r) for r in s.scalars(query))

    # Events ---------------------------------------------------------------------------

    def append_event(
        self,
        kind: str,
        *,
        model: str | None = None,
        runtime: str | None = None,
        gpu: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Event:
        """Record a residency event; returns it with its id (ids increase)."""
        (written,) = self.append_events(
            [NewEvent(kind, model=model, runtime=runtime, gpu=gpu, detail=detail or {})]
        )
        return written

    def append_events(self, events: Sequence[NewEvent]) -> tuple[Event, ...]:
        """Record several events in one transaction, in order (a busy daemon's audit trail
        is written in batches: one fsync per batch, not per event)."""
        for new in events:
            Event.check_kind(new.kind)
        rows = [
            EventRow(
                ts=new.ts or self.clock(),
                kind=new.kind,
                model=new.model,
                runtime=new.runtime,
                gpu=new.gpu,
                detail=dict(new.detail),
            )
            for new in events
        ]
        if not rows:
            return ()
        with self.session() as s:
            s.add_all(rows)
            s.flush()
            return tuple(_event(r) for r in rows)

    def events_after(
        self, after_id: int = 0, *, limit: int = 1000, model: str | None = None
    ) -> tuple[Event, ...]:
        """Events with an id above `after_id`, oldest first (a WatchEvents stream's page)."""
        if not 1 <= limit <= 100_000:
            raise InvalidArgument(f"limit must be in 1..100000, got {limit}", reason="BAD_LIMIT")
        query = select(EventRow).where(EventRow.id > after_id).order_by(EventRow.id).limit(limit)
        if model is not None:
            query = query.where(EventRow.model == model)
        with self.session(write=False) as s:
            return tuple(_event(r) for r in s.scalars(query))

    def prune_events(self, before: datetime) -> int:
        """Delete events older than `before`; returns how many."""
        with self.session() as s:
            result = s.execute(delete(EventRow).where(EventRow.ts < before))
            return int(getattr(result, "rowcount", 0) or 0)


def _make_private(database: str | None) -> None:
    """Create the SQLite file 0600 before SQLite does (it would use 0644 less the umask), and
    narrow an older one. SQLite gives its -wal and -shm files the database file's mode."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        private.make_file(database)
    except OSError:
        return  # no such directory, or not ours: SQLite's own open says why
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(database + suffix).st_mode & 0o077:
                os.chmod(database + suffix, private.PRIVATE_FILE)


def _create_engine(config: CatalogConfig) -> Engine:
    url = config.parsed_url()
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_size=config.pool_size, pool_pre_ping=True, echo=config.echo)
    _make_private(url.database)
    engine = create_engine(url, echo=config.echo)
    busy_ms = int(config.busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below): pysqlite's implicit BEGIN is deferred and
        # would turn a read-then-write transaction into SQLITE_BUSY under contention.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")  # a committed snapshot survives power loss
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        readonly = conn.get_execution_options().get("torpor_readonly", False)
        conn.exec_driver_sql("BEGIN DEFERRED" if readonly else "BEGIN IMMEDIATE")

    return engine


def _unavailable(config: CatalogConfig, exc: Exception) -> Unavailable:
    url = config.parsed_url().render_as_string(hide_password=True)
    return Unavailable(
        f"catalog database {url} is unavailable: {exc}",
        reason="CATALOG_UNAVAILABLE",
        metadata={"url": url},
    )


def _check_host(host: str) -> None:
    if not isinstance(host, str) or not 0 < len(host) <= 255 or not host.isprintable():
        raise InvalidArgument(f"invalid host name {host!r}", reason="INVALID_HOST")


def _fill_model_row(row: ModelRow, spec: ModelRegistration, source: str, now: datetime) -> None:
    row.source_path = source
    row.dtype = spec.dtype
    row.max_batch = spec.max_batch
    row.max_seq_len = spec.max_seq_len
    row.priority = spec.priority
    row.pinned = spec.pinned
    row.keep_alive_s = spec.keep_alive_s
    row.chat_template = spec.chat_template
    row.load_format = spec.load_format
    row.updated_at = now


def _model(row: ModelRow) -> RegisteredModel:
    spec = ModelRegistration(
        name=row.name,
        source_path=row.source_path,
        dtype=row.dtype,
        max_batch=row.max_batch,
        max_seq_len=row.max_seq_len,
        priority=row.priority,
        pinned=row.pinned,
        keep_alive_s=row.keep_alive_s,
        chat_template=row.chat_template or "",
        load_format=row.load_format or LoadFormat.CHECKPOINT,
    )
    return RegisteredModel(spec=spec, created_at=row.created_at, updated_at=row.updated_at)


def _bandwidth(row: BandwidthRow) -> Bandwidth:
    return Bandwidth(
        host=row.host,
        tier=row.tier,
        bytes_per_s=row.bytes_per_s,
        samples=row.samples,
        updated_at=row.updated_at,
    )


def _event(row: EventRow) -> Event:
    return Event(
        id=row.id,
        ts=row.ts,
        kind=row.kind,
        model=row.model,
        runtime=row.runtime,
        gpu=row.gpu,
        detail=dict(row.detail or {}),
    )
