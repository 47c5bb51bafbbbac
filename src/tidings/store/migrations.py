"""Numbered SQL migrations, applied in order and recorded in ``schema_version``."""

from __future__ import annotations

import re
import sqlite3
from importlib import resources

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_scripts(folder: str = "migrations") -> list[tuple[int, str]]:
    out = []
    for entry in resources.files("tidings.store").joinpath(folder).iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append((int(m.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(out)


def apply_sqlite(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; return the schema version now in force."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = row[0] or 0
    for version, script in migration_scripts():
        if version <= current:
            continue
        conn.executescript(
            f"BEGIN IMMEDIATE;\n{script}\nINSERT INTO schema_version VALUES ({version});\nCOMMIT;"
        )
        current = version
    return int(current)
