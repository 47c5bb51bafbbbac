"""Secrets kept in the data directory: the admin key and the token-signing key."""

from __future__ import annotations

import contextlib
import os
import secrets


def load_or_create(path: str, given: str, nbytes: int = 32) -> str:
    """``given`` when set; else the file's content, created 0600 on first use. Safe when
    several processes start at once (``--workers``): the file appears whole, once, and
    every process reads the same key."""
    if given:
        return given
    value = _read(path)
    if value:
        return value
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_urlsafe(nbytes) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: theirs
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    value = _read(path)
    if not value:
        raise RuntimeError(f"{path} is empty: remove it to have a new key made")
    return value


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return ""
