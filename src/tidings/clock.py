"""Injected time, so timeouts, retransmits and windows are testable without sleeping."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in UTC milliseconds (stored in records)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (for timers and rate limits)."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()
