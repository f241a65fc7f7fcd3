"""Upstreams with a capacity the client is not told, for the politeness tests and benchmarks.

Served by `LocalUpstream` (`key` names a separate capacity, so runs do not share one):
- `/limited?key=K&rate=50&burst=10&retry_after=1`: a token bucket refilled at `rate` per
  second holding at most `burst` tokens; a request without a token is a 429 with
  `Retry-After` (whole seconds), as an API gateway's rate limit answers;
- `/knee?key=K&knee=20&ms=20`: `knee` workers, each answering in `ms`; a request past
  them waits its turn, so latency grows with what is in flight while throughput stays
  at knee/ms: where a client should stop adding concurrency.

Every answer is counted per key and status (`Capacity.answers`), so a test can tell how
many 429s the client drew.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    refilled_at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class Capacity:
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    workers: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    answers: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))

    def limited(self, key: str, query: dict[str, str]) -> tuple[int, tuple[str, ...]]:
        """The status (and headers) a token-bucket limit gives this request."""
        now = time.monotonic()
        bucket = self.buckets.get(key)
        if bucket is None:
            burst = float(query.get("burst", "10"))
            bucket = self.buckets[key] = TokenBucket(float(query.get("rate", "50")), burst, burst, now)
        if bucket.take(now):
            self.answers[key][200] += 1
            return 200, ()
        self.answers[key][429] += 1
        return 429, (f"retry-after: {query.get('retry_after', '1')}",)

    async def knee(self, key: str, query: dict[str, str]) -> float:
        """Wait for a worker, work `ms`; the milliseconds the request took in all."""
        started = time.monotonic()
        workers = self.workers.get(key)
        if workers is None:
            workers = self.workers[key] = asyncio.Semaphore(int(query.get("knee", "20")))
        async with workers:
            await asyncio.sleep(float(query.get("ms", "20")) / 1000)
        self.answers[key][200] += 1
        return (time.monotonic() - started) * 1000
