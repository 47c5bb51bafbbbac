"""Identifiers: user ids, device ids, conversation ids and 64-bit message ids."""

from __future__ import annotations

import functools
import re
import unicodedata

from tidings.protocol.errors import TidingsError

MAX_USER_ID_BYTES = 64
MAX_DEVICE_ID_BYTES = 64
MAX_CLIENT_ID_BYTES = 64
PLATFORMS = frozenset({"ios", "android", "web", "desktop", "iot", "bot"})

# Letters, marks and digits of any script, plus a few separators. No whitespace, no '|'
# (the separator of direct-conversation ids), no control characters.
_USER_PUNCT = frozenset("._@:+-")
_USER_CATEGORIES = frozenset({"L", "M", "N"})
_DEVICE_RE = re.compile(r"^[A-Za-z0-9._:-]+$")


@functools.lru_cache(maxsize=65_536)
def _normalize(raw: str) -> str:
    uid = unicodedata.normalize("NFKC", raw).casefold()
    if len(uid.encode()) > MAX_USER_ID_BYTES or not all(
        c in _USER_PUNCT or unicodedata.category(c)[0] in _USER_CATEGORIES for c in uid
    ):
        raise TidingsError(
            "invalid",
            f"user id must be 1-{MAX_USER_ID_BYTES} bytes of letters, digits and . _ @ : + -",
        )
    return uid


def normalize_user_id(raw: object) -> str:
    """The canonical form of a user id (NFKC + casefold), or TidingsError('invalid')."""
    if not isinstance(raw, str) or not raw:
        raise TidingsError("invalid", "user id must be a non-empty string")
    if len(raw) > 4 * MAX_USER_ID_BYTES:  # never cache arbitrarily long junk
        raise TidingsError("invalid", f"user id must be at most {MAX_USER_ID_BYTES} bytes")
    return _normalize(raw)


def validate_device(device: object, platform: object) -> tuple[str, str]:
    if not isinstance(device, str) or not device or len(device) > MAX_DEVICE_ID_BYTES:
        raise TidingsError("invalid", f"device id must be 1-{MAX_DEVICE_ID_BYTES} characters")
    if not _DEVICE_RE.fullmatch(device):
        raise TidingsError("invalid", "device id may hold only A-Z a-z 0-9 . _ : -")
    if platform not in PLATFORMS:
        raise TidingsError("invalid", f"platform must be one of {sorted(PLATFORMS)}")
    assert isinstance(platform, str)
    return device, platform


def validate_client_id(cid: str) -> None:
    if not cid or len(cid.encode()) > MAX_CLIENT_ID_BYTES:
        raise TidingsError("invalid", f"cid must be 1-{MAX_CLIENT_ID_BYTES} bytes")


DIRECT_PREFIX = "d:"


def direct_conversation_id(a: str, b: str) -> str:
    """The id of the 1:1 conversation of two canonical user ids; order does not matter."""
    lo, hi = (a, b) if a <= b else (b, a)
    return f"{DIRECT_PREFIX}{lo}|{hi}"


def direct_members(conv: str) -> tuple[str, str] | None:
    if not conv.startswith(DIRECT_PREFIX):
        return None
    parts = conv[len(DIRECT_PREFIX) :].split("|")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]


# ------------------------------------------------------------------ message ids

EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
WORKER_BITS = 10
COUNTER_BITS = 12
MAX_WORKER = (1 << WORKER_BITS) - 1
_COUNTER_MASK = (1 << COUNTER_BITS) - 1
ID_TIME_SHIFT = WORKER_BITS + COUNTER_BITS  # an id's milliseconds are the bits above this


class MessageIdGenerator:
    """Time-ordered 64-bit ids: 41 bits of ms since EPOCH_MS, 10 of worker, 12 of counter.

    Not thread-safe: owned by one thread (the store's writer). When the clock steps
    back, or 4096 ids are drawn in one millisecond, the id borrows the next millisecond
    so ids stay strictly increasing.
    """

    def __init__(self, worker_id: int, after: int = 0) -> None:
        """``after``: every id drawn is above it (the highest id already stored), even if
        the clock now reads earlier than when that id was made."""
        if not 0 <= worker_id <= MAX_WORKER:
            raise ValueError("worker id out of range")
        self.worker_id = worker_id
        self._last_ms = after >> (WORKER_BITS + COUNTER_BITS)
        self._counter = _COUNTER_MASK if after else 0  # the next draw moves past `after`

    def next(self, now_ms: int) -> int:
        ms = max(now_ms - EPOCH_MS, self._last_ms)
        if ms == self._last_ms:
            self._counter += 1
            if self._counter > _COUNTER_MASK:
                ms += 1
                self._counter = 0
        else:
            self._counter = 0
        self._last_ms = ms
        return (
            (ms << (WORKER_BITS + COUNTER_BITS)) | (self.worker_id << COUNTER_BITS) | self._counter
        )

    def bump(self, after: int) -> None:
        """Every id drawn from now on is above ``after`` (an id another process made)."""
        after_ms = after >> (WORKER_BITS + COUNTER_BITS)
        if after_ms >= self._last_ms:
            self._last_ms = after_ms
            self._counter = _COUNTER_MASK


def message_id_time_ms(mid: int) -> int:
    return (mid >> (WORKER_BITS + COUNTER_BITS)) + EPOCH_MS
