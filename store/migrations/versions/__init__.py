"""Catalog schema revisions, oldest first: 0001 the initial schema, 0002 query indexes."""
