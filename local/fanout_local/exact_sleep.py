"""Sleep to the deadline within tens of microseconds, for an upstream whose delay is a benchmark's floor.

An event loop's timer wakes late on this kind of machine: uvloop counts time in whole
milliseconds, asyncio's selector rounds its timeout up to one, and an idle virtual CPU
takes a few hundred microseconds to wake. A 50 ms sleep measured 0.2 ms late at the
median and 1.1 ms at the 95th percentile, so ten rounds of 100 such sleeps, waiting
on each other, took ten milliseconds longer than asked: time the delay chain charged
to the client.

`ExactSleeper` sleeps on the loop's timer until `SPIN_S` before the deadline, then
hands the rest to one task that yields to the loop (which keeps serving sockets)
until each sleeper's deadline passes. One spinning task for every sleeper keeps the
cost to one core's few milliseconds a round, however many sleep at once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

#: How long before a deadline the timer hands over: longer than the timer is ever late.
SPIN_S = 0.002


class ExactSleeper:
    """Sleeps that end at their deadline on `time.perf_counter()` (the clock every process of the
    machine shares); one per event loop."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()  # ties in the heap go by arrival, never to the futures
        self._spinner: asyncio.Task[None] | None = None

    async def sleep_until(self, deadline: float) -> float:
        """Sleep until `deadline` (a `time.perf_counter()` time); answers how late it woke, in seconds."""
        if (timed := deadline - SPIN_S - time.perf_counter()) > 0:
            await asyncio.sleep(timed)
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._due, (deadline, next(self._order), woken))
        if self._spinner is None:
            self._spinner = asyncio.create_task(self._spin())
        await woken
        return time.perf_counter() - deadline

    async def _spin(self) -> None:
        try:
            while self._due:
                now = time.perf_counter()
                while self._due and self._due[0][0] <= now:
                    woken = heapq.heappop(self._due)[2]
                    if not woken.done():  # a sleeper cancelled meanwhile has a done future
                        woken.set_result(None)
                await asyncio.sleep(0)
        finally:
            self._spinner = None
