"""Storage behind the `Store` interface (see base.py); SQLite is the embedded default."""
