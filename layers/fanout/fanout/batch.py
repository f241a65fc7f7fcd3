"""Running a /batch: every item through retries and the rate limit, under one budget.

No FastAPI here: items come in as `BatchItem`s (the web layer has already turned
target names into URLs and checked headers), and each ends as one `ItemReport`:
a response, an error, or skipped with the reason. Nothing is dropped.

Every attempt first passes its target's limiter (fanout.politeness: the target's pace,
its pauses, its circuit), and only then takes one of the call's `concurrency` slots:
a request waiting for a slow or paused target never holds a slot another target's
request could use.

Retries (tenacity; it fits the async, budget-aware shape: the wait is computed
before the stop check, so a wait that would overrun the budget stops instead):
- only idempotent methods, or requests carrying an idempotency key;
- on connection-level errors and on 429, 502, 503, 504;
- exponential backoff with full jitter ("Exponential Backoff And Jitter", AWS
  Architecture Blog); after a Retry-After the target's pause is the wait;
- `max_attempts` counts attempts that failed, not those a target answered "later"
  (a 429 or 503 with a Retry-After of a second or more, which pauses the target):
  waiting for a paused target costs no attempt. Such an answer says the request was
  not taken, so even a POST is sent again after the pause;
- the last answer is what is reported, with the number of requests sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from fanout.engine import (
    DEADLINE_EXCEEDED,
    SKIPPED_DEADLINE,
    SKIPPED_FAIL_FAST,
    Outcome,
    RequestError,
    Strategy,
    fan_out,
)
from fanout.held_answers import HeldAnswers
from fanout.observability import UpstreamRecord, span_records, timed_attempt, traced_attempt
from fanout.politeness import NO_TARGETS, UNANSWERED, Politeness, TargetLimiter, TargetReport, retry_after_seconds
from fanout.targets import TargetScope
from fanout.transports import Transport, UpstreamResponse

if TYPE_CHECKING:
    from aiolimiter import AsyncLimiter
    from pyreqwest.http import Url
    from tenacity import AsyncRetrying, RetryCallState

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_ERRORS = UNANSWERED  # errors retried: the target did not answer
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
CUT_BY_DEADLINE = "the call's deadline passed while this request was in flight"
RATE_LIMIT_WAIT_S = 0.001  # an attempt that waited longer than this for the rate limit counts as a wait


class BatchItem(NamedTuple):
    id: str
    method: str
    url: Url
    headers: dict[str, str]
    body: bytes | None
    scope: TargetScope  # where the request and its redirects may go
    path: str  # as the caller gave it, for logs, metrics and spans (never the query)
    idempotency_key: str | None = None

    @property
    def target(self) -> str:
        return self.scope.name

    @property
    def retryable(self) -> bool:
        return self.method in IDEMPOTENT_METHODS or self.idempotency_key is not None


class ItemReport(NamedTuple):
    id: str
    attempts: int
    elapsed_s: float
    response: UpstreamResponse | None = None
    error: str | None = None
    message: str = ""  # equivalent: '' -> 'XX..XX' (read only for an error, which always sets one)
    internal: str | None = None  # what only the log line may show (RequestError.internal)
    skipped: str | None = None
    latencies_ms: tuple[float, ...] = ()  # one per attempt that ended
    body_dropped: bool = False  # let go while the call ran, to hold no more than its answer can use
    headers_dropped: bool = False  # likewise

    @property
    def ok(self) -> bool:
        return self.response is not None and self.response.status < 400


class BatchRun(NamedTuple):
    reports: list[ItemReport]
    concurrency: int
    elapsed_s: float
    rate_limit_waits: int | None = None  # None: no rate limit
    rate_limit_wait_s: float = 0.0
    targets: Mapping[str, TargetReport] = NO_TARGETS  # what politeness did to each target

    def records(self, items: list[BatchItem]) -> list[UpstreamRecord]:
        """Each item's report as the operator sees it (fanout.observability)."""
        return [
            UpstreamRecord(
                ref=item.id,
                target=item.target,
                method=item.method,
                path=item.path,
                attempts=report.attempts,
                latencies_ms=report.latencies_ms,
                status=report.response.status if report.response is not None else None,
                error=report.error,
                internal=report.internal,
                skipped=report.skipped is not None,
            )
            for item, report in zip(items, self.reports, strict=True)  # equivalent: True -> False (same lengths)
        ]


@dataclass
class _Progress:
    """What a run's attempts have done so far; read even for items the deadline cut off."""

    attempts: list[int]
    latencies_ms: list[list[float]]
    started: list[float]  # perf_counter when each item started
    spent: list[int]  # attempts that count against max_attempts (a throttle with Retry-After does not)
    rate_limit_waits: int = 0
    rate_limit_wait_s: float = 0.0

    @classmethod
    def of(cls, n: int) -> _Progress:
        return cls(
            attempts=[0] * n,
            latencies_ms=[[] for _ in range(n)],
            started=[0.0] * n,  # equivalent: 0.0 -> 1.0 (read only once the item has started)
            spent=[0] * n,
        )


class _Skipped(Exception):
    """An attempt that must not be sent: fail-fast stopped the call while it waited for its target."""


def _by_target(items: list[BatchItem]) -> list[list[int]]:
    """The items' indices per target, in order: each target's own `concurrency` workers (one waiting
    on a paused or paced target holds back no other target's items). An item waiting out its
    backoff keeps its worker: a target whose requests fail is sent fewer at once meanwhile."""
    lanes: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        lanes.setdefault(item.target, []).append(index)
    return list(lanes.values())


def retry_after_s(response: UpstreamResponse) -> float | None:
    """Retry-After in seconds, from delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    return retry_after_seconds(response.headers.get("retry-after"))


class BatchRunner:
    """One per container: the shared transport, the targets' limiters, the rate limit, the retry policy."""

    def __init__(
        self,
        transport: Transport,
        *,
        max_attempts: int,
        max_item_bytes: int,
        rate_per_s: float,
        politeness: Politeness,
    ) -> None:
        self.transport = transport
        self.max_attempts = max_attempts
        self.max_item_bytes = max_item_bytes
        self.politeness = politeness
        # A leaky bucket over all calls of this container, one token per attempt.
        self.limiter: AsyncLimiter | None = None
        if rate_per_s:
            from aiolimiter import AsyncLimiter  # only a container with a rate cap loads it (about 1 ms)

            self.limiter = AsyncLimiter(rate_per_s, 1.0)

    @functools.cached_property
    def _jitter(self) -> Callable[[RetryCallState], float]:
        from tenacity import wait_random_exponential  # see _retrying

        return wait_random_exponential(multiplier=BACKOFF_BASE_S, max=BACKOFF_CAP_S)

    async def run(
        self,
        items: list[BatchItem],
        *,
        strategy: Strategy,
        concurrency: int,
        budget_s: float,
        fail_fast: bool,
        held_bytes: int | None = None,
    ) -> BatchRun:
        """Every item through its attempts; `held_bytes`: the most its answers may hold (fanout.held_answers)."""
        progress = _Progress.of(len(items))
        held = HeldAnswers(held_bytes) if held_bytes is not None else None
        since = self.politeness.counters()
        stop = asyncio.Event() if fail_fast else None
        deadline = time.monotonic() + budget_s
        sequential = strategy is Strategy.SYNC
        # the call's slots on the wire; waiting for a target happens before taking one
        wire = contextlib.nullcontext() if sequential else asyncio.Semaphore(concurrency)
        traced = span_records()

        async def send(index: int) -> ItemReport:
            progress.started[index] = started = time.perf_counter()
            try:
                answer = await self._send_with_retries(items[index], index, progress, deadline, wire, stop, traced)
            except _Skipped:
                return ItemReport(
                    id=items[index].id, attempts=progress.attempts[index], elapsed_s=0.0, skipped=SKIPPED_FAIL_FAST
                )
            cut = time.monotonic() >= deadline  # equivalent: GtE -> Gt (differs only at the very instant)
            report = _answered(items[index], answer, progress.attempts[index], time.perf_counter() - started, cut=cut)
            if stop is not None and not report.ok:
                stop.set()
            return report if held is None else held.hold(index, report)

        result = await fan_out(
            send,
            n=len(items),
            strategy=Strategy.SYNC if sequential else Strategy.SEMAPHORE,
            concurrency=1 if sequential else concurrency,  # per target, `wire` bounds all; equivalent: 1 -> 2 (SYNC)
            deadline_s=budget_s,
            stop=stop,
            lanes=None if sequential else _by_target(items),
        )
        ended = time.perf_counter()
        ended_as = zip(items, result.outcomes, strict=True)  # equivalent: True -> False (same lengths)
        reports = [
            _report(item, outcome, progress.attempts[index], ended - progress.started[index])._replace(
                latencies_ms=tuple(progress.latencies_ms[index])
            )
            for index, (item, outcome) in enumerate(ended_as)
        ]
        if held is not None:
            reports = [held.give_back(index, report) for index, report in enumerate(reports)]
        return BatchRun(
            reports=reports,
            concurrency=1 if sequential else min(len(items), concurrency),
            elapsed_s=result.elapsed_s,
            rate_limit_waits=progress.rate_limit_waits if self.limiter is not None else None,
            rate_limit_wait_s=progress.rate_limit_wait_s,
            targets=self.politeness.report((item.target for item in items), since),
        )

    async def _send_with_retries(
        self,
        item: BatchItem,
        index: int,
        progress: _Progress,
        deadline: float,
        wire: asyncio.Semaphore | contextlib.nullcontext[None],
        stop: asyncio.Event | None,
        traced: bool,
    ) -> UpstreamResponse | RequestError:
        """`traced`: the call's span records, so each attempt is a span of its own."""
        headers = dict(item.headers)
        if item.idempotency_key is not None:
            headers["Idempotency-Key"] = item.idempotency_key
        target = self.politeness.limiter(item.target)
        latencies_ms = progress.latencies_ms[index]

        def send() -> Awaitable[UpstreamResponse]:
            return self.transport.send(
                item.method,
                item.url,
                headers=headers,
                body=item.body,
                max_body_bytes=self.max_item_bytes,
                scope=item.scope,
            )

        async def attempt() -> UpstreamResponse:
            try:
                async with target.attempt(deadline) as sent, wire:
                    if stop is not None and stop.is_set():
                        raise _Skipped
                    progress.attempts[index] += 1
                    await self._rate_limit(progress)
                    sent.sending()
                    if traced:
                        response = await traced_attempt(
                            send,
                            target=item.target,
                            method=item.method,
                            path=item.path,
                            status_of=lambda response: response.status,
                            latencies_ms=latencies_ms,
                        )
                    else:
                        response = await timed_attempt(send, latencies_ms)
                    retry_after = retry_after_s(response)
                    sent.answered(response.status, retry_after)
            except RequestError:
                progress.spent[index] += 1
                raise
            if not (response.status in (429, 503) and retry_after):
                progress.spent[index] += 1  # a target saying "in a while" (a pause) costs the item no attempt
            return response

        # Most first attempts end the item; only one that tenacity would retry goes through it.
        try:
            first: UpstreamResponse | RequestError = await attempt()
        except RequestError as exc:
            if not _retryable_error(exc):
                return exc
            first = exc
        else:
            if not _retryable_status(first):
                return first
        allowed = self.max_attempts if item.retryable else 1
        retrying = self._retrying(_stop_when_spent(progress.spent, index, allowed), _stop_past(deadline, target))
        try:
            response: UpstreamResponse = await retrying(_replaying(first, attempt))
        except RequestError as exc:
            return exc
        return response

    def _retrying(self, *stops: Callable[[RetryCallState], bool]) -> AsyncRetrying:
        """The retry policy, for an item whose first attempt is to be retried: it stops at the first
        of `stops`. Tenacity is loaded by a container's first retry (5 to 10 ms), not by its cold
        start: most calls retry nothing."""
        from tenacity import AsyncRetrying, retry_if_exception, retry_if_result, stop_any

        return AsyncRetrying(
            stop=stop_any(*stops),
            wait=self._wait,
            retry=retry_if_exception(_retryable_error) | retry_if_result(_retryable_status),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )

    async def _rate_limit(self, progress: _Progress) -> None:
        """Take a token of the container's rate limit, counting the attempts that had to wait."""
        if self.limiter is None:
            return
        started = time.perf_counter()
        await self.limiter.acquire()
        waited = time.perf_counter() - started
        if waited > RATE_LIMIT_WAIT_S:  # equivalent: Gt -> GtE (differs only at the very instant)
            progress.rate_limit_waits += 1
            progress.rate_limit_wait_s += waited

    def _wait(self, state: RetryCallState) -> float:
        """Backoff with full jitter; none after a Retry-After, whose pause the target's limiter keeps."""
        outcome = state.outcome
        if outcome is not None and not outcome.failed and retry_after_s(outcome.result()) is not None:
            return 0.0
        return float(self._jitter(state))


def _stop_when_spent(spent: list[int], index: int, allowed: int) -> Callable[[RetryCallState], bool]:
    """Stop once the item has spent its attempts (throttles with Retry-After are not spent)."""

    def stop(_state: RetryCallState) -> bool:
        return spent[index] >= allowed

    return stop


def _stop_past(deadline: float, target: TargetLimiter) -> Callable[[RetryCallState], bool]:
    """Stop when the next attempt could not start before the budget ends: after the backoff, or after
    the target's pause. The answer must go out in time."""

    def stop(state: RetryCallState) -> bool:
        now = time.monotonic()
        ready = max(now + (state.upcoming_sleep or 0.0), target.state.paused_until)
        return ready >= deadline  # equivalent: GtE -> Gt (the instant)

    return stop


def _retryable_error(exc: BaseException) -> bool:
    return isinstance(exc, RequestError) and exc.kind in RETRY_ERRORS


def _retryable_status(response: UpstreamResponse) -> bool:
    return response.status in RETRY_STATUSES


def _replaying(
    first: UpstreamResponse | RequestError, attempt: Callable[[], Awaitable[UpstreamResponse]]
) -> Callable[[], Awaitable[UpstreamResponse]]:
    """`attempt`, whose first call hands back the outcome of one already made: tenacity then
    counts, stops and backs off from it exactly as if it had made it. Tenacity's own work is some
    80 us a call here, more than the request: without it where nothing is retried, a 1,000-item
    POST /batch takes 0.53x the CPU and a job's worker 0.58x per item (paired rounds, by hand)."""
    replay: list[UpstreamResponse | RequestError] = [first]

    async def replayed() -> UpstreamResponse:
        if not replay:
            return await attempt()
        outcome = replay.pop()
        if isinstance(outcome, RequestError):
            raise outcome
        return outcome

    return replayed


def _answered(
    item: BatchItem, answer: UpstreamResponse | RequestError, attempts: int, elapsed_s: float, *, cut: bool
) -> ItemReport:
    """An item's report once its attempts ended; an error at the deadline is the deadline's (see fanout.engine)."""
    if isinstance(answer, UpstreamResponse):
        return ItemReport(id=item.id, attempts=attempts, elapsed_s=elapsed_s, response=answer)
    if cut:
        return ItemReport(
            id=item.id, attempts=attempts, elapsed_s=elapsed_s, error=DEADLINE_EXCEEDED, message=CUT_BY_DEADLINE
        )
    return ItemReport(
        id=item.id,
        attempts=attempts,
        elapsed_s=elapsed_s,
        error=answer.kind,
        message=answer.detail,
        internal=answer.internal,
    )


def _report(item: BatchItem, outcome: Outcome[ItemReport], attempts: int, elapsed_s: float) -> ItemReport:
    """The engine's outcome as a report; cut-off and skipped items keep the attempts they made.

    `elapsed_s` is the time since the item started, for an item the deadline cut off. One that
    the deadline caught before it sent anything (waiting for its target or a slot) was skipped.
    """
    if outcome.value is not None:
        return outcome.value
    never_sent = outcome.error == DEADLINE_EXCEEDED and attempts == 0
    if outcome.skipped is not None or never_sent:
        return ItemReport(id=item.id, attempts=attempts, elapsed_s=0.0, skipped=outcome.skipped or SKIPPED_DEADLINE)
    message = CUT_BY_DEADLINE if outcome.error == DEADLINE_EXCEEDED else outcome.detail
    return ItemReport(id=item.id, attempts=attempts, elapsed_s=elapsed_s, error=outcome.error, message=message)
