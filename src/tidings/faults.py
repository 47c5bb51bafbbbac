"""Fault injection for the fault tests: ``TIDINGS_FAULTS=point:N[,point:N]`` makes this
process kill itself with SIGKILL the N-th time it passes ``point``. Unset (always, in
production) a check costs one dictionary lookup.

Points: ``after_commit`` — a message is durable in the store and not yet published on
the bus (the window in which a crash leaves recipients to learn of it by sync).
"""

from __future__ import annotations

import os
import signal

_armed: dict[str, int] = {}
for _item in os.environ.get("TIDINGS_FAULTS", "").split(","):
    _point, _, _count = _item.partition(":")
    if _point.strip():
        _armed[_point.strip()] = int(_count or 1)


def hit(point: str) -> None:
    """Count a pass through ``point``; die there if armed and this is the N-th pass."""
    left = _armed.get(point)
    if left is None:
        return
    left -= 1
    _armed[point] = left
    if left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
