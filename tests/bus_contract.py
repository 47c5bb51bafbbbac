"""The `Bus` contract: every implementation must pass these (see bus/base.py).

A test module subclasses `BusContract` and provides a ``make_bus`` fixture returning an
async factory of started buses that share one transport (so events published on one
reach handlers on all of them, as nodes of one cluster would).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tidings.bus.base import Bus, BusEvent, MessageEvent, RevokeEvent
from tidings.store.base import MessageRecord

BusFactory = Callable[[], Awaitable[Bus]]


def event(seq: int, users: tuple[str, ...] = ("a", "b")) -> MessageEvent:
    rec = MessageRecord(
        conv="d:a|b",
        seq=seq,
        mid=1000 + seq,
        sender="a",
        dev="d1",
        cid=f"c{seq}",
        type="text",
        body={"text": str(seq)},
        ts=seq,
    )
    return MessageEvent(rec, users, exclude_device="d1")


async def settle(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "bus did not deliver in time"
        await asyncio.sleep(0.005)


class BusContract:
    async def test_delivers_in_publish_order(self, make_bus: BusFactory) -> None:
        """Events from one publisher reach the handler in publish order, intact."""
        bus = await make_bus()
        got: list[BusEvent] = []
        bus.set_handler(got.append)
        sent = [event(i) for i in range(1, 101)]
        for ev in sent:
            bus.publish(ev)
        await settle(lambda: len(got) >= 100)
        assert got == sent
        await bus.close()

    async def test_revocations_travel_too(self, make_bus: BusFactory) -> None:
        """Revocation events are delivered like message events."""
        bus = await make_bus()
        got: list[BusEvent] = []
        bus.set_handler(got.append)
        ev = RevokeEvent("a", "d1", before_ms=5, jti="j")
        bus.publish(ev)
        await settle(lambda: bool(got))
        assert got == [ev]
        await bus.close()

    async def test_handler_failure_does_not_reach_publisher(self, make_bus: BusFactory) -> None:
        """A handler that raises neither breaks publish() nor stops later deliveries."""
        bus = await make_bus()
        got: list[BusEvent] = []

        def flaky(ev: BusEvent) -> None:
            if isinstance(ev, MessageEvent) and ev.record.seq == 1:
                raise RuntimeError("handler bug")
            got.append(ev)

        bus.set_handler(flaky)
        bus.publish(event(1))
        bus.publish(event(2))
        await settle(lambda: bool(got))
        assert [e.record.seq for e in got if isinstance(e, MessageEvent)] == [2]
        await bus.close()

    async def test_publish_without_handler_or_after_close(self, make_bus: BusFactory) -> None:
        """Publishing with nobody listening, or after close, is a silent no-op."""
        bus = await make_bus()
        bus.publish(event(1))
        got: list[BusEvent] = []
        bus.set_handler(got.append)
        await bus.close()
        bus.publish(event(2))
        await asyncio.sleep(0.05)
        assert got == []
