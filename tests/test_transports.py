"""Transports' shared helpers, without sockets: bounded closing."""

from __future__ import annotations

import asyncio
import time

import pytest

from lobbyd import close_within


def test_closing_that_hangs_fails_or_is_cancelled_inside_never_raises() -> None:
    async def hangs() -> None:
        await asyncio.sleep(60)

    async def fails() -> None:
        raise OSError("connection reset")

    async def cancelled_inside() -> None:  # nats-py cancels its own futures as it closes
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    async def main() -> float:
        started = time.monotonic()
        await close_within(0.1, hangs(), "hangs")
        took = time.monotonic() - started
        await close_within(1.0, fails(), "fails")
        await close_within(1.0, cancelled_inside(), "cancelled inside")
        return took

    assert 0.09 < asyncio.run(main()) < 30  # bounded (it hangs 60 s), however loaded


def test_a_cancelled_caller_stays_cancelled_and_cancels_the_close() -> None:
    state: list[str] = []

    async def slow_close() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            state.append("close cancelled")
            raise

    async def main() -> None:
        closing = asyncio.ensure_future(close_within(30, slow_close(), "slow"))
        await asyncio.sleep(0.05)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await asyncio.sleep(0)

    asyncio.run(main())
    assert state == ["close cancelled"]
