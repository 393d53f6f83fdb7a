"""SendBudget: bytes of responses in flight over all streams, granted first come, first served."""

from __future__ import annotations

import asyncio

import pytest

from isthmus.xds.server.stream import SendBudget


async def test_waits_for_room_in_order_and_lets_an_oversized_response_through_alone() -> None:
    budget = SendBudget(100)
    assert await budget.acquire(60) == 60
    order: list[str] = []

    async def take(name: str, size: int) -> int:
        got = await budget.acquire(size)
        order.append(name)
        return got

    second = asyncio.create_task(take("second", 60))
    huge = asyncio.create_task(take("huge", 500))
    small = asyncio.create_task(take("small", 10))  # would fit now, but waits its turn
    await asyncio.sleep(0.01)
    assert order == []
    assert budget.used == 60
    budget.release(60)
    await asyncio.sleep(0.01)
    assert order == ["second"]
    assert budget.used == 60
    budget.release(60)
    await asyncio.sleep(0.01)
    assert order == ["second", "huge"]
    assert budget.used == 100
    assert await huge == 100
    budget.release(100)
    assert await small == 10
    assert order == ["second", "huge", "small"]
    assert budget.used == 10
    await second


async def test_a_cancelled_waiter_gives_its_place_and_its_bytes_back() -> None:
    budget = SendBudget(100)
    await budget.acquire(90)
    waiter = asyncio.create_task(budget.acquire(50))
    behind = asyncio.create_task(budget.acquire(5))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await asyncio.wait_for(behind, 1) == 5  # no longer stuck behind the cancelled one
    assert budget.used == 95
