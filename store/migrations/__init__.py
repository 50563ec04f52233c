"""Alembic migrations of the catalog (package data; see torpor.store.migrate)."""
