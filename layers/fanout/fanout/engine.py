"""The fan-out engine: run n calls with one of three strategies under a deadline.

Pure asyncio. The engine does not know what a request is: it awaits `send(index)`,
which returns a value or raises. That keeps it testable on its own and lets the
transport (see `fanout.transports`) be chosen by measurement.

Guarantees, whatever the strategy:
- every index ends with exactly one outcome, in request order;
- one failing call never fails the others (exceptions become outcomes);
- at the deadline, calls in flight are cancelled and reported as
  `DeadlineExceeded`, calls never started as skipped ("deadline"), so the
  caller answers in time and loses nothing;
- once `stop` is set (fail-fast), calls not yet started are skipped ("fail_fast").
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Generic, NamedTuple, TypeVar

DEADLINE_EXCEEDED = "DeadlineExceeded"
SKIPPED_DEADLINE = "deadline"
SKIPPED_FAIL_FAST = "fail_fast"

T = TypeVar("T")


class Strategy(enum.StrEnum):
    SYNC = "sync"  # one after another
    GATHER = "gather"  # all at once; the transport's pool bounds what is on the wire
    SEMAPHORE = "semaphore"  # at most `concurrency` started at a time


class RequestError(Exception):
    """A request failed; `kind` names how, in one vocabulary whatever the transport.

    `detail` is what the caller may read; `internal`, when set, what only the log
    line may keep (the address a name resolved to, say).
    """

    def __init__(self, kind: str, detail: str = "", *, internal: str | None = None) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
        self.internal = internal


class Outcome(NamedTuple, Generic[T]):
    """What became of one call: a value, an error's name, or why it never started."""

    value: T | None = None
    error: str | None = None
    detail: str = ""
    skipped: str | None = None


class FanoutResult(NamedTuple, Generic[T]):
    strategy: Strategy
    concurrency: int
    elapsed_s: float
    outcomes: list[Outcome[T]]


async def fan_out(
    send: Callable[[int], Awaitable[T]],
    *,
    n: int,
    strategy: Strategy,
    concurrency: int,
    deadline_s: float,
    stop: asyncio.Event | None = None,
    lanes: Sequence[Sequence[int]] | None = None,
) -> FanoutResult[T]:
    """Await `send(0) … send(n-1)` and collect one outcome per call.

    `concurrency` is what the caller was granted (already clamped to the
    function's ceiling); SYNC ignores it, GATHER relies on the transport's
    pool being sized to it, SEMAPHORE enforces it itself: per lane.
    `lanes` (SEMAPHORE): the indices split by what their calls wait on (POST
    /batch: their target), every index in exactly one, each lane in order. Each
    lane has its own workers, so a call waiting on its target never holds back
    another target's; the caller bounds what is in flight in all (its wire slots).
    """
    if n < 1 or concurrency < 1 or deadline_s <= 0:
        raise ValueError(f"n={n}, concurrency={concurrency} and deadline_s={deadline_s} must be positive")
    outcomes: list[Outcome[T] | None] = [None] * n
    started: list[bool] = [False] * n
    # Workers pulling the next index, not a task per call: a queued call is an int in a range, not
    # a coroutine waiting on a semaphore (about 0.1 KB instead of 1.5 KB of heap each, and less
    # for the collector to walk). SEMAPHORE runs `concurrency` of them per lane, GATHER one per call.
    if strategy is Strategy.SYNC:
        plan: list[tuple[Sequence[int], int]] = [(range(n), 1)]
    elif strategy is Strategy.GATHER:
        plan = [(range(n), n)]
    else:
        plan = [(lane, min(len(lane), concurrency)) for lane in (lanes or [range(n)]) if lane]

    async def run_one(index: int) -> None:
        if stop is not None and stop.is_set():
            outcomes[index] = Outcome(skipped=SKIPPED_FAIL_FAST)
            return
        if time.monotonic() >= ends:  # equivalent: GtE -> Gt (differs only at the very instant)
            return  # skipped for the deadline, even where a request swallowed the timeout's cancellation
        started[index] = True
        outcome = await _attempt(send, index)
        past_deadline = time.monotonic() >= ends  # equivalent: GtE -> Gt (differs only at the very instant)
        if outcome.error is not None and past_deadline:
            outcome = Outcome(error=DEADLINE_EXCEEDED)  # cut by the deadline, whatever the client called it
        outcomes[index] = outcome

    async def work(pending: Iterator[int]) -> None:
        for index in pending:
            await run_one(index)
            if stop is not None:
                # Let the calls that ended in the same tick record their outcomes (and set `stop`)
                # before this worker starts another, as a semaphore's next waiter would.
                await asyncio.sleep(0)

    begun = time.perf_counter()
    # The timeout cancels what is in flight at the deadline. A client whose own timer fires
    # in the same instant can turn that cancellation into its own timeout error (aiohttp's
    # TimerContext does), so nothing starts past `ends` whatever became of the cancellation.
    ends = time.monotonic() + deadline_s
    try:
        async with asyncio.timeout(None) as timer:
            disarm = _expire_once_past(timer, ends)
            try:
                shared = [(iter(lane), count) for lane, count in plan]
                workers = [work(pending) for pending, count in shared for _ in range(count)]
                if len(workers) == 1:
                    await workers[0]
                else:
                    await asyncio.gather(*workers)
            finally:
                disarm()
    except TimeoutError:
        pass  # what did not finish is reported below, not lost
    elapsed = time.perf_counter() - begun
    final = [
        outcome
        if outcome is not None
        else Outcome(error=DEADLINE_EXCEEDED)
        if started[index]
        else Outcome(skipped=SKIPPED_DEADLINE)
        for index, outcome in enumerate(outcomes)
    ]
    used = 1 if strategy is Strategy.SYNC else min(n, concurrency)
    return FanoutResult(strategy=strategy, concurrency=used, elapsed_s=elapsed, outcomes=final)


def _expire_once_past(timer: asyncio.Timeout, ends: float) -> Callable[[], None]:
    """Expire `timer` once time.monotonic() has reached `ends`, never before; returns what disarms it.

    Every check of a deadline reads time.monotonic() (the engine's `ends`, fanout.batch's cut). uvloop's
    timers run on libuv's millisecond clock and fire up to about a millisecond before that clock gets
    there (nearly half of them, measured here), so a timeout at `ends` cancelled calls the checks still
    saw inside it, and an error at the deadline was reported as the client's own. A timer that fires
    early is set again for what is left.
    """
    loop = asyncio.get_running_loop()

    def expire_if_due() -> None:
        nonlocal pending
        left = ends - time.monotonic()
        if left > 0:
            pending = loop.call_later(left, expire_if_due)
        else:
            timer.reschedule(loop.time())  # now: the timeout cancels on the loop's next pass

    pending = loop.call_later(ends - time.monotonic(), expire_if_due)
    return lambda: pending.cancel()


async def _attempt(send: Callable[[int], Awaitable[T]], index: int) -> Outcome[T]:
    try:
        return Outcome(value=await send(index))
    except RequestError as exc:
        return Outcome(error=exc.kind, detail=exc.detail)
    except Exception as exc:  # isolate: one call's failure is its own outcome
        return Outcome(error=type(exc).__name__, detail=str(exc))
