"""The DuckDB results store: SQLAlchemy schema, SQL views, ingest and read-only queries."""
