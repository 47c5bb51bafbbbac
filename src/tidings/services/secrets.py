"""Secrets kept in the data directory: the admin key and the token-signing key."""

from __future__ import annotations

import os
import secrets


def load_or_create(path: str, given: str, nbytes: int = 32) -> str:
    """``given`` when set; else the file's content, created 0600 on first use."""
    if given:
        return given
    try:
        with open(path, encoding="ascii") as fh:
            value = fh.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(value + "\n")
    return value
