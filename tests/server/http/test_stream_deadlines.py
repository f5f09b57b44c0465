"""Stream.fill deadlines: one lazily moved timer per stream instead of a timeout per wait."""

from __future__ import annotations

import asyncio

from support import async_test, stream


@async_test()
async def test_a_wait_past_its_deadline_raises_timeout() -> None:
    s, _ = stream()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await s.fill(loop.time() + 0.05)
    except TimeoutError:
        assert loop.time() - started >= 0.04
    else:
        raise AssertionError("no timeout")


@async_test()
async def test_a_finished_waits_timer_neither_ends_later_waits_early_nor_lets_them_run_late() -> (
    None
):
    s, _ = stream()
    loop = asyncio.get_running_loop()
    # A first wait with a short deadline ends with data; its timer stays set.
    waiting = asyncio.ensure_future(s.fill(loop.time() + 0.05))
    await asyncio.sleep(0)
    s.data_received(b"x")
    assert await waiting
    s.consume(1)
    # A wait with a later deadline outlives the first one's timer.
    started = loop.time()
    waiting = asyncio.ensure_future(s.fill(loop.time() + 0.2))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    try:
        await waiting
    except TimeoutError:
        assert loop.time() - started >= 0.18
    else:
        raise AssertionError("no timeout")
    # A shorter deadline than the timer's is kept too, and an unbounded wait is never ended.
    waiting = asyncio.ensure_future(s.fill(loop.time() + 1.0))
    await asyncio.sleep(0)
    s.data_received(b"y")
    assert await waiting
    s.consume(1)
    started = loop.time()
    try:
        await s.fill(loop.time() + 0.05)
    except TimeoutError:
        assert loop.time() - started < 0.5
    unbounded = asyncio.ensure_future(s.fill())
    await asyncio.sleep(0.1)
    assert not unbounded.done()
    s.data_received(b"z")
    assert await unbounded


@async_test()
async def test_losing_the_connection_drops_the_timer() -> None:
    s, _ = stream()
    loop = asyncio.get_running_loop()
    waiting = asyncio.ensure_future(s.fill(loop.time() + 60))
    await asyncio.sleep(0)
    s.connection_lost(None)
    assert not await waiting
    assert s._timer is None
