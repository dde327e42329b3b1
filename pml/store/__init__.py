"""The SQL store: tables, engine and sessions, migrations (SQLite or PostgreSQL)."""
