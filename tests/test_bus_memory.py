"""The Bus contract suite against the in-process bus."""

from __future__ import annotations

import pytest

from tests.bus_contract import BusContract, BusFactory
from tidings.bus.base import Bus
from tidings.bus.memory import MemoryBus


@pytest.fixture
def make_bus() -> BusFactory:
    async def factory() -> Bus:
        bus = MemoryBus()
        await bus.start()
        return bus

    return factory


class TestMemoryBus(BusContract):
    pass
