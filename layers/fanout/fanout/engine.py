"""The fan-out engine: run n requests with one of three strategies under a deadline.

Pure asyncio. The engine does not know what a request is: it calls `send(index)`,
which returns an HTTP status or raises. That keeps it testable on its own and lets
the transport (see `fanout.transports`) be chosen by measurement.

Guarantees, whatever the strategy:
- every index ends with exactly one outcome, in request order;
- one failing request never fails the others (exceptions become outcomes);
- at the deadline, unfinished requests are cancelled and reported as
  `DeadlineExceeded`, so the call answers in time and loses nothing.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

DEADLINE_EXCEEDED = "DeadlineExceeded"

Send = Callable[[int], Awaitable[int]]


class RequestError(Exception):
    """A request failed; `kind` names how, in one vocabulary whatever the transport."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Strategy(enum.StrEnum):
    SYNC = "sync"  # one after another
    GATHER = "gather"  # all at once; the transport's pool bounds what is on the wire
    SEMAPHORE = "semaphore"  # at most `concurrency` started at a time


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request: a status, or the name of the error."""

    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400


@dataclass(frozen=True, slots=True)
class FanoutResult:
    strategy: Strategy
    concurrency: int
    elapsed_s: float
    outcomes: list[Outcome] = field(repr=False)

    @property
    def succeeded(self) -> int:
        return sum(outcome.ok for outcome in self.outcomes)

    @property
    def failed(self) -> int:
        return len(self.outcomes) - self.succeeded


async def fan_out(
    send: Send,
    *,
    n: int,
    strategy: Strategy,
    concurrency: int,
    deadline_s: float,
) -> FanoutResult:
    """Call `send(0) … send(n-1)` and collect one outcome per call.

    `concurrency` is what the caller was granted (already clamped to the
    function's ceiling); SYNC ignores it, GATHER relies on the transport's
    pool being sized to it, SEMAPHORE enforces it itself.
    """
    if n < 1 or concurrency < 1 or deadline_s <= 0:
        raise ValueError(f"n={n}, concurrency={concurrency} and deadline_s={deadline_s} must be positive")
    outcomes: list[Outcome | None] = [None] * n
    started = time.perf_counter()
    try:
        async with asyncio.timeout(deadline_s):
            if strategy is Strategy.SYNC:
                for index in range(n):
                    outcomes[index] = await _attempt(send, index)
            else:
                limiter = asyncio.Semaphore(concurrency) if strategy is Strategy.SEMAPHORE else None
                await asyncio.gather(*(_record(send, index, outcomes, limiter) for index in range(n)))
    except TimeoutError:
        pass  # what did not finish is reported below, not lost
    elapsed = time.perf_counter() - started
    final = [outcome or Outcome(error=DEADLINE_EXCEEDED) for outcome in outcomes]
    used = 1 if strategy is Strategy.SYNC else min(n, concurrency)
    return FanoutResult(strategy=strategy, concurrency=used, elapsed_s=elapsed, outcomes=final)


async def _record(send: Send, index: int, outcomes: list[Outcome | None], limiter: asyncio.Semaphore | None) -> None:
    if limiter is None:
        outcomes[index] = await _attempt(send, index)
        return
    async with limiter:
        outcomes[index] = await _attempt(send, index)


async def _attempt(send: Send, index: int) -> Outcome:
    try:
        return Outcome(status=await send(index))
    except RequestError as exc:
        return Outcome(error=exc.kind)
    except Exception as exc:  # isolate: one request's failure is its own outcome
        return Outcome(error=type(exc).__name__)
