"""Alembic glue: run the catalog's migrations from the installed package, on any engine.

The migration scripts are package data of `torpor.store.migrations`, located through the
package (`torpor.store:migrations`), never through a path relative to the working directory.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

SCRIPT_LOCATION = "torpor.store:migrations"

# Any constant; it serializes concurrent upgrades of one PostgreSQL catalog by several hosts.
_PG_MIGRATION_LOCK = 0x746F72706F72  # "torpor"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the catalog; env.py uses `connection` when one is given."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the catalog schema to `revision` (idempotent; safe to run concurrently)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        command.upgrade(alembic_config(conn), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest revision shipped with this build."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found in torpor.store.migrations"
    return head


def revisions_oldest_first() -> list[str]:
    """Every shipped revision, oldest first (tests upgrade through them one by one)."""
    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]
