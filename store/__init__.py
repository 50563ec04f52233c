"""The store: the SQLAlchemy catalog and the content-addressed snapshot chunk store."""
