"""Typed, validated configuration of the catalog and the snapshot store.

Built by the daemon's config module from its TOML file; every field has bounds, and an
invalid value raises InvalidArgument naming the field and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from torpor.errors import InvalidArgument
from torpor.units import format_size

CATALOG_FILE = "catalog.db"
"""Name of the SQLite catalog inside the state directory."""


def _check(name: str, ok: bool, value: object, expected: str) -> None:
    if not ok:
        raise InvalidArgument(
            f"{name} must be {expected}, got {value!r}",
            reason="INVALID_CONFIG",
            metadata={"field": name, "value": value},
        )


@dataclass(frozen=True, slots=True)
class CatalogConfig:
    """Where the catalog lives and how to talk to it."""

    url: str
    """SQLAlchemy URL: `sqlite:////abs/path/catalog.db` (default, in the state directory) or
    `postgresql+psycopg://user@host:port/db` for a catalog shared by several hosts."""
    model_roots: tuple[Path, ...] = ()
    """Directories under which checkpoint sources may lie; empty accepts no model."""
    busy_timeout_s: float = 30.0
    """SQLite: how long a writer waits for another writer's lock, 0..3600 s."""
    pool_size: int = 5
    """PostgreSQL: pooled connections, 1..64 (each `to_thread` call uses one at a time)."""
    bandwidth_alpha: float = 0.2
    """Weight of a new sample in the bandwidth mean, (0, 1]; 1 keeps only the last one."""
    echo: bool = False
    """Log every SQL statement (debugging only)."""

    def __post_init__(self) -> None:
        parsed = self.parsed_url()
        _check("busy_timeout_s", 0 <= self.busy_timeout_s <= 3600, self.busy_timeout_s, "0..3600")
        _check("pool_size", 1 <= self.pool_size <= 64, self.pool_size, "1..64")
        _check("bandwidth_alpha", 0 < self.bandwidth_alpha <= 1, self.bandwidth_alpha, "in (0, 1]")
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            _check(
                "url",
                database not in ("", ":memory:") and not database.startswith("file:"),
                self.url,
                "a SQLite file path (an in-memory database would vanish per connection)",
            )

    @classmethod
    def in_state_dir(cls, state_dir: Path, **kwargs: object) -> CatalogConfig:
        """The default: a SQLite file `catalog.db` in the daemon's state directory."""
        path = (Path(state_dir) / CATALOG_FILE).absolute()
        return cls(url=f"sqlite:///{path}", **kwargs)  # type: ignore[arg-type]

    def parsed_url(self) -> URL:
        """The URL with its driver made explicit (`postgresql://` means psycopg 3)."""
        try:
            url = make_url(self.url)
        except ArgumentError as exc:
            raise InvalidArgument(
                f"url is not a database URL: {self.url!r}", reason="INVALID_CONFIG"
            ) from exc
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        _check(
            "url",
            url.drivername in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"),
            url.render_as_string(hide_password=True),
            "a sqlite:/// or postgresql+psycopg:// URL",
        )
        return url


@dataclass(frozen=True, slots=True)
class SnapshotStoreConfig:
    """The local snapshot chunk store of one host."""

    root: Path
    """Directory on local NVMe holding chunks/, locks/ and store-id."""
    capacity_bytes: int
    """Budget for chunk bytes (shared chunks counted once); LRU snapshots are evicted
    to stay within it. 1 byte .. 1 EiB."""
    max_chunk_bytes: int = 64 * 1024**2
    """Largest chunk: a bigger tensor is cut into pieces of this size, 1 B .. 2 GiB. The pager
    reads a chunk at a time into its staging ring, so this bounds its buffer size."""

    def __post_init__(self) -> None:
        _check(
            "capacity_bytes",
            isinstance(self.capacity_bytes, int) and 0 < self.capacity_bytes <= 2**60,
            self.capacity_bytes,
            "a positive byte count up to 1 EiB",
        )
        _check(
            "max_chunk_bytes",
            isinstance(self.max_chunk_bytes, int) and 0 < self.max_chunk_bytes <= 2**31,
            self.max_chunk_bytes,
            f"1 .. {format_size(2**31)}",
        )
