"""Politeness: per-target limits learned from the target's answers (fanout.politeness).

Against upstreams whose capacity the client is not told (fanout_local.capacity): a token
bucket answering 429 with Retry-After, a target whose latency grows past a knee, a target
answering 503 to everything. What is asserted is what the issue promises: every item
accounted for, few 429s, a learned rate never above the target's, a limit near the knee.
How long a run takes is the benchmark's business (`make bench`, "Politeness").
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pyreqwest.http import Url

from conftest import post_batch, run
from fanout.batch import BatchItem, BatchRun, BatchRunner, ItemReport
from fanout.engine import RequestError, Strategy
from fanout.politeness import (
    CIRCUIT_OPEN,
    CIRCUIT_THRESHOLD,
    ESTIMATE_WINDOW_S,
    INITIAL_LIMIT,
    RETRY_AFTER_MAX_S,
    TARGET_PAUSED,
    Answer,
    Politeness,
    TargetLimiter,
    classify,
    retry_after_seconds,
)
from fanout.settings import UpstreamTarget
from fanout.targets import TargetScope
from fanout.transports import make_transport
from fanout_local.upstream import LocalUpstream


def items_to(upstream: LocalUpstream, target: str, path: str, n: int, **query: Any) -> list[BatchItem]:
    scope = TargetScope.of(target, UpstreamTarget(url=upstream.url, allow_http=True))
    url = Url(upstream.url).with_path(path).with_query({k: str(v) for k, v in query.items()})
    return [
        BatchItem(id=f"{target}-{i}", method="GET", url=url, headers={}, body=None, scope=scope, path=path)
        for i in range(n)
    ]


def status(report: ItemReport) -> int | None:
    return report.response.status if report.response is not None else None


def run_batch(
    items: list[BatchItem],
    *,
    concurrency: int,
    budget_s: float,
    politeness: Politeness | None = None,
    max_attempts: int = 3,
) -> tuple[BatchRun, Politeness]:
    politeness = politeness or Politeness(ceiling=concurrency)

    async def go() -> BatchRun:
        transport = make_transport("aiohttp", max_connections=concurrency, timeout_s=5, allow_private=True)
        runner = BatchRunner(
            transport, max_attempts=max_attempts, max_item_bytes=1000, rate_per_s=0, politeness=politeness
        )
        try:
            return await runner.run(
                items, strategy=Strategy.SEMAPHORE, concurrency=concurrency, budget_s=budget_s, fail_fast=False
            )
        finally:
            await transport.aclose()

    return run(go()), politeness


# --- a token bucket whose rate the client is not told ------------------------------------------------


@pytest.mark.parametrize(("rate", "n"), [(500, 3000)])
def test_a_token_bucket_loses_nothing_and_draws_few_429s(upstream: LocalUpstream, rate: int, n: int) -> None:
    """The issue's upstream (burst 10, Retry-After: 1) at a high rate (the issue's own 50 a second
    is the next test; `make bench` runs 20 to 500). The limiter must lose nothing, draw at most
    5 % 429s over the whole call, and never settle above the target's rate.

    The rate it settles at is a lower bound of the target's, and how close it comes is the
    benchmark's business (README, "Politeness": 8 to 34 % under at 500/s). Asked here: not
    collapsed, at least 0.4x. The bound counts as the bucket what the first contact was served,
    and a busy machine stretches that contact: 34 served where other runs count 12 to 21, and a
    rate found of 0.55x and 0.57x (two runs of 27 with two busy loops on this machine's two
    cores; 0.56x once in a full suite)."""
    key = f"bucket-{rate}"
    items = items_to(upstream, "bucket", "/limited", n, key=key, rate=rate, burst=10, retry_after=1)
    result, _politeness = run_batch(items, concurrency=50, budget_s=n / rate * 2 + 5)

    answers = upstream.capacity.answers[key]
    assert [status(report) for report in result.reports] == [200] * n  # nothing lost, nothing skipped
    assert answers[200] == n
    assert answers[429] <= 0.05 * (answers[200] + answers[429])
    report = result.targets["bucket"]
    assert report.throttled == answers[429]  # the call's summary counts every 429 the target sent
    assert report.pauses >= 1 and report.rate_per_s is not None
    assert 0.4 * rate <= report.rate_per_s <= 1.05 * rate


def test_the_issue_example_through_the_handler(upstream: LocalUpstream, import_handler: Any) -> None:
    """POST /batch, 300 items at concurrency 50 to a target serving 50 a second: before politeness
    81 items failed and 56 % of requests were 429s."""
    upstreams = {"limited": {"url": upstream.url, "allow_http": True}}
    handler = import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams), FANOUT_MAX_CONCURRENCY="50").handler
    query = {"key": "issue", "rate": 50, "burst": 10, "retry_after": 1}
    requests = [{"id": str(i), "target": "limited", "path": "/limited", "query": query} for i in range(300)]
    status, body = post_batch(handler, {"requests": requests, "concurrency": 50})

    answers = upstream.capacity.answers["issue"]
    assert status == 200
    assert body["summary"]["succeeded"] == 300
    assert answers[429] <= 0.06 * (answers[200] + answers[429])


# --- latency that grows with what is in flight ---------------------------------------------------------


def test_the_limit_settles_near_the_knee_not_at_the_ceiling(upstream: LocalUpstream) -> None:
    """20 workers of 20 ms: past 20 in flight a request only queues. The ceiling is 100."""
    politeness = Politeness(ceiling=100)
    limiter = politeness.limiter("knee")
    limits: list[float] = []

    async def sample(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.05)
            limits.append(limiter.state.limit)

    async def go() -> BatchRun:
        transport = make_transport("aiohttp", max_connections=100, timeout_s=5, allow_private=True)
        runner = BatchRunner(transport, max_attempts=3, max_item_bytes=1000, rate_per_s=0, politeness=politeness)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(stop))
        try:
            items = items_to(upstream, "knee", "/knee", 2000, key="knee", knee=20, ms=20)
            return await runner.run(items, strategy=Strategy.SEMAPHORE, concurrency=100, budget_s=25, fail_fast=False)
        finally:
            stop.set()
            await sampler
            await transport.aclose()

    result = run(go())
    assert all(status(report) == 200 for report in result.reports)
    settled = sorted(limits[len(limits) // 2 :])  # the second half of the run
    median = settled[len(settled) // 2]
    assert 15 <= median <= 60, settled  # measured: 30 to 45 (1.5 to 2.2 x the knee)


# --- a target that fails everything ------------------------------------------------------------------------


def test_a_target_answering_503_to_everything_gets_a_bounded_number_of_requests(
    upstream: LocalUpstream, import_handler: Any
) -> None:
    upstreams = {"down": {"url": upstream.url, "allow_http": True}}
    handler = import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams), FANOUT_MAX_CONCURRENCY="50").handler
    requests = [{"id": str(i), "target": "down", "path": "/status/503"} for i in range(200)]
    started = time.monotonic()
    status, body = post_batch(handler, {"requests": requests, "concurrency": 50})

    assert status == 200
    errors = [item.get("error", {}).get("type") for item in body["responses"]]
    statuses = [item.get("status") for item in body["responses"]]
    assert len(body["responses"]) == 200  # every item accounted for
    assert set(errors) <= {CIRCUIT_OPEN, None} and set(statuses) <= {503, None}
    assert errors.count(CIRCUIT_OPEN) >= 180
    # The circuit opens after CIRCUIT_THRESHOLD failures in a row; what was in flight then
    # (at most the initial limit) still arrives. Then nothing for the cool-down.
    assert upstream.stats.requests <= CIRCUIT_THRESHOLD + INITIAL_LIMIT
    assert time.monotonic() - started < 5  # refused at once, not after waiting out the cool-down


def test_the_half_open_circuit_lets_one_probe_through() -> None:
    async def go() -> tuple[list[str], int]:
        limiter = TargetLimiter("t", ceiling=10)
        for _ in range(CIRCUIT_THRESHOLD):
            limiter.record(
                await limiter.admit(deadline=time.monotonic() + 10), None, latency_s=None, retry_after_s=None
            )
        limiter.state.circuit_until = time.monotonic()  # the cool-down is over
        probe = await limiter.admit(deadline=time.monotonic() + 10)
        refused = []
        for _ in range(3):  # while the probe is out, everyone else is refused at once
            try:
                await limiter.admit(deadline=time.monotonic() + 10)
            except RequestError as exc:
                refused.append(exc.kind)
        limiter.record(probe, 200, latency_s=0.01, retry_after_s=None)
        admitted = 0
        for _ in range(3):
            limiter.record(await limiter.admit(deadline=time.monotonic() + 10), 200, latency_s=0.01, retry_after_s=None)
            admitted += 1
        return refused, admitted

    refused, admitted = run(go())
    assert refused == [CIRCUIT_OPEN] * 3
    assert admitted == 3  # the probe's success closed it


def test_a_failed_probe_opens_the_circuit_again() -> None:
    async def go() -> str:
        limiter = TargetLimiter("t", ceiling=10)
        for _ in range(CIRCUIT_THRESHOLD):
            limiter.record(await limiter.admit(deadline=time.monotonic() + 10), 502, latency_s=0.01, retry_after_s=None)
        limiter.state.circuit_until = time.monotonic()
        limiter.record(await limiter.admit(deadline=time.monotonic() + 10), None, latency_s=None, retry_after_s=None)
        assert limiter.state.circuit_until > time.monotonic() + 4  # a full cool-down again
        try:
            await limiter.admit(deadline=time.monotonic() + 10)
        except RequestError as exc:
            return exc.kind
        return "admitted"

    assert run(go()) == CIRCUIT_OPEN


def test_a_4xx_is_an_answer_and_closes_no_circuit() -> None:
    """404s say nothing against the target's health: only no answer and 5xx count."""

    async def go() -> str:
        limiter = TargetLimiter("t", ceiling=10)
        for _ in range(CIRCUIT_THRESHOLD * 3):
            limiter.record(await limiter.admit(deadline=time.monotonic() + 10), 404, latency_s=0.01, retry_after_s=None)
        return limiter.state.circuit.value

    assert run(go()) == "closed"


# --- Retry-After pauses the whole target -------------------------------------------------------------------


def test_retry_after_pauses_every_request_to_the_target(upstream: LocalUpstream) -> None:
    """One 429 with Retry-After: 1, then 200s: the other 19 items wait the second out instead of
    each drawing its own 429, and none spends an attempt on it."""
    items = items_to(upstream, "paused", "/retry-after", 20, key="pause", fail=1, s=1)
    result, _ = run_batch(items, concurrency=20, budget_s=10)

    arrivals = sorted(upstream.arrivals)
    assert [status(report) for report in result.reports] == [200] * 20
    assert upstream.calls["pause"] == 21  # each item once, and the one that drew the 429 once more
    gap = max(later - earlier for earlier, later in itertools.pairwise(arrivals))
    assert gap >= 0.95  # nothing was sent during the pause
    assert result.targets["paused"].pauses == 1


def test_throttles_with_retry_after_spend_no_attempt(upstream: LocalUpstream) -> None:
    """A "come back in a second" answer, then 200: with one attempt allowed the item still succeeds.
    A Retry-After of 0 pauses nothing, and is spent like any failure (test_batch)."""
    (item,) = items_to(upstream, "later", "/retry-after", 1, key="free", fail=1, s=1)
    result, _ = run_batch([item], concurrency=1, budget_s=10, max_attempts=1)
    (report,) = result.reports
    assert (status(report), report.attempts) == (200, 2)


def test_a_pause_past_the_deadline_fails_the_waiting_items_at_once(upstream: LocalUpstream) -> None:
    items = items_to(upstream, "long", "/retry-after", 10, key="long-pause", fail=1, s=60)
    started = time.monotonic()
    result, _ = run_batch(items, concurrency=1, budget_s=3)
    took = time.monotonic() - started

    first, *rest = result.reports
    assert status(first) == 429  # the answer that asked for the pause
    assert {(report.error, report.attempts) for report in rest} == {(TARGET_PAUSED, 0)}
    assert upstream.calls["long-pause"] == 1
    assert took < 3  # reported when known, not at the deadline


def test_a_paused_target_does_not_hold_back_another(upstream: LocalUpstream) -> None:
    """Each target has its own workers, and the call's concurrency slots are taken only after a target
    admits the request: the healthy target's items are answered while the other is paused for 2 s."""
    paused = items_to(upstream, "paused", "/retry-after", 30, key="hold", fail=1, s=2)
    healthy = items_to(upstream, "healthy", "/delay", 30, ms=0)
    answered_at: dict[str, list[float]] = {"paused": [], "healthy": []}

    async def go() -> tuple[BatchRun, float]:
        transport = make_transport("aiohttp", max_connections=5, timeout_s=5, allow_private=True)
        send = transport.send

        async def timed(*args: Any, **kwargs: Any) -> Any:
            response = await send(*args, **kwargs)
            answered_at[kwargs["scope"].name].append(time.monotonic())
            return response

        transport.send = timed  # type: ignore[method-assign]
        runner = BatchRunner(
            transport, max_attempts=3, max_item_bytes=1000, rate_per_s=0, politeness=Politeness(ceiling=5)
        )
        started = time.monotonic()
        try:
            result = await runner.run(
                paused + healthy, strategy=Strategy.SEMAPHORE, concurrency=5, budget_s=10, fail_fast=False
            )
        finally:
            await transport.aclose()
        return result, started

    result, started = run(go())
    assert [status(report) for report in result.reports] == [200] * 60
    assert max(answered_at["paused"]) - started >= 2.0  # the pause was kept
    assert max(answered_at["healthy"]) - started < 1.5  # done while the other target was still paused


def test_fail_fast_skips_an_item_that_was_waiting_for_a_slot(upstream: LocalUpstream) -> None:
    """Target b's worker waits for the call's one slot while target a's request fails: once the
    slot is free, b's item is skipped (fail_fast, no attempt), not sent."""
    items = items_to(upstream, "a", "/status/500", 1) + items_to(upstream, "b", "/delay", 1, ms=0)

    async def go() -> BatchRun:
        transport = make_transport("aiohttp", max_connections=1, timeout_s=5, allow_private=True)
        runner = BatchRunner(
            transport, max_attempts=3, max_item_bytes=1000, rate_per_s=0, politeness=Politeness(ceiling=1)
        )
        try:
            return await runner.run(items, strategy=Strategy.SEMAPHORE, concurrency=1, budget_s=5, fail_fast=True)
        finally:
            await transport.aclose()

    result = run(go())
    first, second = result.reports
    assert (status(first), first.skipped, first.attempts) == (500, None, 1)
    assert (status(second), second.skipped, second.attempts, second.elapsed_s) == (None, "fail_fast", 0, 0.0)


def test_a_batch_runs_a_few_workers_per_target_not_a_task_per_item(upstream: LocalUpstream) -> None:
    """Items wait as indices in their target's lane (fanout.engine): what a call holds grows with its
    concurrency and targets, not its items."""
    items = items_to(upstream, "a", "/delay", 300, ms=0) + items_to(upstream, "b", "/delay", 300, ms=0)
    most_tasks = 0

    async def go() -> BatchRun:
        nonlocal most_tasks
        transport = make_transport("aiohttp", max_connections=5, timeout_s=5, allow_private=True)
        runner = BatchRunner(
            transport, max_attempts=1, max_item_bytes=1000, rate_per_s=0, politeness=Politeness(ceiling=5)
        )
        running = asyncio.create_task(
            runner.run(items, strategy=Strategy.SEMAPHORE, concurrency=5, budget_s=10, fail_fast=False)
        )
        while not running.done():
            most_tasks = max(most_tasks, len(asyncio.all_tasks()))
            await asyncio.sleep(0.001)
        await transport.aclose()
        return running.result()

    result = run(go())
    assert [status(report) for report in result.reports] == [200] * 600
    assert [report.id for report in result.reports] == [item.id for item in items]
    assert most_tasks <= 2 * 5 + 3  # the workers of two targets, the call, this sampler, and the runner's own


# --- the rate the limiter learns is a lower bound of the target's ------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(5, 2000),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0.0001, 0.05), min_size=20, max_size=400),
)
def test_the_rate_found_at_a_throttle_is_never_above_the_targets(rate: float, burst: int, gaps: list[float]) -> None:
    """Replay any schedule of sends against a token bucket (full at first contact) into a limiter,
    whose clock is the `now` each answer carries: the rate it finds at each throttle after the
    first, from what was served, is at most the bucket's."""
    limiter = TargetLimiter("t", ceiling=1000)
    tokens, clock = float(burst), 0.0
    found: list[float] = []
    for gap in gaps:
        clock += gap
        tokens = min(float(burst), tokens + gap * rate)
        limiter.state.in_flight += 1
        if tokens >= 1:
            tokens -= 1
            limiter.record(False, 200, latency_s=0.001, retry_after_s=None, now=clock)
            continue
        assume(limiter.state.free is not None or clock <= ESTIMATE_WINDOW_S)  # the first episode is all seen
        if limiter.state.free is not None:
            served = limiter._served_rate(clock)
            if served is not None:
                found.append(served)
        limiter.record(False, 429, latency_s=0.001, retry_after_s=None, now=clock)
    assert all(value <= rate for value in found), (max(found), rate)


def replay(limiter: TargetLimiter, start: float, gap_s: float, served: int) -> float:
    """`served` answers of 200, `gap_s` apart from `start`, then one 429; the time of the 429."""
    clock = start
    for _ in range(served):
        limiter.state.in_flight += 1
        limiter.record(False, 200, latency_s=0.001, retry_after_s=None, now=clock)
        clock += gap_s
    limiter.state.in_flight += 1
    limiter.record(False, 429, latency_s=0.001, retry_after_s=None, now=clock)
    return clock


def test_a_throttle_early_in_a_paced_episode_cuts_the_rate_by_a_tenth_a_later_one_by_what_was_served() -> None:
    """A target of 500/s with a bucket of 10. Its bucket, arriving bunched 20 ms into an episode paced
    at about 480/s, draws a 429 that says little of its rate: the rate is cut by a tenth, not to what
    those 20 ms served (about 100/s). A throttle 0.5 s into an episode is measured: it served 300/s.
    A 429 with nothing served at all is a target refusing everything: the rate falls by the AWS SDKs' beta."""
    limiter = TargetLimiter("t", ceiling=100)
    clock = replay(limiter, 0.0, 0.0005, served=10)  # first contact: the bucket, all at once
    clock = replay(limiter, clock + 0.002, 0.002, served=500)  # discovery: 500/s for a second
    paced = limiter.state.rate
    assert paced is not None and 470 <= paced <= 500
    clock = replay(limiter, clock + 0.002, 0.002, served=12)  # 12 in 22 ms: the bucket and a few
    assert limiter.state.peak_rate == pytest.approx(paced * 0.9, rel=0.01)  # paced: it grew a little since
    clock = replay(limiter, clock + 0.002, 1 / 300, served=150)  # 0.5 s of 300/s, then a 429
    assert 270 <= limiter.state.peak_rate <= 300  # (150 served - a bucket of 10) / 0.5 s: 280, a lower bound
    paced = limiter.state.rate
    replay(limiter, clock + 0.002, 0.002, served=0)  # early again, and nothing served: no jitter did that
    assert limiter.state.peak_rate == pytest.approx(paced * 0.7)


def test_an_early_throttle_while_discovering_is_not_taken_for_jitter() -> None:
    """Discovery sends above what it knows the target takes, to find its rate: a throttle there is the
    finding, early or late. Here the target served no more than its bucket: nothing to measure by."""
    limiter = TargetLimiter("t", ceiling=100)
    clock = replay(limiter, 0.0, 0.0005, served=10)
    discovering_at = limiter.state.rate
    assert limiter.state.discovering and discovering_at is not None
    replay(limiter, clock + 0.002, 0.004, served=10)  # 10 in 40 ms, then a 429
    assert limiter.state.peak_rate == pytest.approx(discovering_at * 0.7)


@given(st.text(max_size=40))
def test_retry_after_of_any_text_is_none_or_a_bounded_wait(value: str) -> None:
    seconds = retry_after_seconds(value)
    assert seconds is None or 0.0 <= seconds <= RETRY_AFTER_MAX_S


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("99999999", RETRY_AFTER_MAX_S),
        ("-1", None),
        ("1.5", None),
        ("", None),
        ("²", None),  # str.isdigit() says yes, float() says no
        ("١٢", None),  # float() reads these as 12; RFC 9110's delta-seconds are ASCII digits
    ],
)
def test_retry_after_values(value: str, seconds: float | None) -> None:
    assert retry_after_seconds(value) == seconds


def test_retry_after_as_a_date() -> None:
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412500.0) == 0.0  # past: now


# --- the limiter's own bookkeeping ---------------------------------------------------------------------------


def test_slow_start_grows_one_per_success_up_to_the_ceiling() -> None:
    async def go() -> list[int]:
        limiter = TargetLimiter("t", ceiling=12)
        seen = []
        for _ in range(8):
            probe = await limiter.admit(deadline=time.monotonic() + 10)
            limiter.record(probe, 200, latency_s=0.01, retry_after_s=None)
            seen.append(int(limiter.state.limit))
        return seen

    assert run(go()) == [9, 10, 11, 12, 12, 12, 12, 12]


def test_a_healthy_target_is_never_paced() -> None:
    async def go() -> float | None:
        limiter = TargetLimiter("t", ceiling=100)
        for _ in range(500):
            probe = await limiter.admit(deadline=time.monotonic() + 10)
            limiter.record(probe, 200, latency_s=0.01, retry_after_s=None)
        return limiter.state.rate

    assert run(go()) is None


def test_requests_past_the_limit_wait_their_turn_first_come_first() -> None:
    async def go() -> list[int]:
        limiter = TargetLimiter("t", ceiling=2)
        limiter.state.limit = 2
        order: list[int] = []
        held = [await limiter.admit(deadline=time.monotonic() + 10) for _ in range(2)]

        async def wait(index: int) -> None:
            probe = await limiter.admit(deadline=time.monotonic() + 10)
            order.append(index)
            limiter.release(probe)

        waiting = [asyncio.create_task(wait(index)) for index in range(5)]
        await asyncio.sleep(0.01)
        assert order == []  # all five wait while two are in flight
        for probe in held:
            limiter.release(probe)
        await asyncio.gather(*waiting)
        assert limiter.state.in_flight == 0
        return order

    assert run(go()) == [0, 1, 2, 3, 4]


def test_a_cancelled_waiter_hands_its_slot_on() -> None:
    async def go() -> bool:
        limiter = TargetLimiter("t", ceiling=1)
        limiter.state.limit = 1
        held = await limiter.admit(deadline=time.monotonic() + 10)
        first = asyncio.create_task(limiter.admit(deadline=time.monotonic() + 10))
        second = asyncio.create_task(limiter.admit(deadline=time.monotonic() + 10))
        await asyncio.sleep(0)
        limiter.release(held)  # the slot goes to `first`...
        first.cancel()  # ...which is cancelled before it runs
        await asyncio.wait_for(second, 1)  # so `second` gets it
        return first.cancelled() and limiter.state.in_flight == 1

    assert run(go())


async def _through_attempt(limiter: TargetLimiter, status: int) -> None:
    """One request as the routes make it: admitted, sent, answered with `status`."""
    async with limiter.attempt(time.monotonic() + 10) as sent:
        sent.sending()
        sent.answered(status, None)


def test_an_answer_through_attempt_resets_the_failures_and_hands_its_slot_on() -> None:
    """`record` hands served answers to `served`, a shortcut past its general path: it must still end
    a run of failures, give the slot back and wake a waiter."""

    async def failures_between_answers() -> tuple[str, int]:
        limiter = TargetLimiter("t", ceiling=10)
        for _ in range(3):  # never CIRCUIT_THRESHOLD failures in a row
            for _ in range(CIRCUIT_THRESHOLD - 1):
                await _through_attempt(limiter, 502)
            await _through_attempt(limiter, 200)
        return limiter.state.circuit.value, limiter.state.in_flight

    async def a_waiter_gets_the_slot() -> bool:
        limiter = TargetLimiter("t", ceiling=2)
        limiter.state.limit, limiter.state.slow_start = 2, False  # and no round ends: nothing else wakes it
        held = await limiter.admit(deadline=time.monotonic() + 10)
        async with limiter.attempt(time.monotonic() + 10) as sent:
            waiter = asyncio.create_task(limiter.admit(deadline=time.monotonic() + 10))
            await asyncio.sleep(0)  # waiting: both slots are taken
            sent.sending()
            sent.answered(204, None)
        probe = await asyncio.wait_for(waiter, 1)
        limiter.release(held)
        limiter.release(probe)
        return not probe and limiter.state.in_flight == 0

    assert run(failures_between_answers()) == ("closed", 0)
    assert run(a_waiter_gets_the_slot())


@pytest.mark.parametrize("retry_after_s", [None, 1.0])
def test_the_attempts_shortcut_to_served_is_taken_exactly_for_what_classify_calls_served(
    retry_after_s: float | None,
) -> None:
    """`finish` (on Attempt's way out, and as the seed routes call it) spells classify's SERVED inline (a
    call less on every request): for every status, with and without Retry-After, it must go to `served`
    exactly when classify says SERVED."""

    async def paths() -> dict[int, str]:
        taken: dict[int, str] = {}
        for status in range(100, 600):
            limiter = TargetLimiter("t", ceiling=10)
            limiter.served = lambda *args, status=status: taken.__setitem__(status, "served")  # type: ignore[method-assign]
            limiter.record = lambda *args, status=status, **kwargs: taken.__setitem__(status, "record")  # type: ignore[method-assign]
            async with limiter.attempt(time.monotonic() + 10) as sent:
                sent.sending()
                sent.answered(status, retry_after_s)
        return taken

    expected = {
        status: "served" if classify(status, retry_after_s) is Answer.SERVED else "record" for status in range(100, 600)
    }
    assert run(paths()) == expected


def test_a_probe_answered_through_attempt_closes_the_circuit() -> None:
    async def go() -> tuple[str, bool, int]:
        limiter = TargetLimiter("t", ceiling=10)
        for _ in range(CIRCUIT_THRESHOLD):
            await _through_attempt(limiter, 502)
        assert limiter.state.circuit.value == "open"
        limiter.state.circuit_until = time.monotonic()  # the cool-down is over
        await _through_attempt(limiter, 200)  # the probe
        return limiter.state.circuit.value, limiter.state.probing, limiter.state.in_flight

    assert run(go()) == ("closed", False, 0)


def test_vegas_steps_down_after_two_queueing_rounds_not_one() -> None:
    limiter = TargetLimiter("t", ceiling=100)
    state = limiter.state
    state.limit, state.slow_start, state.baseline_s = 40.0, False, 0.02

    def a_round(latency_s: float) -> None:
        for _ in range(int(state.limit)):
            state.in_flight += 1
            limiter.record(False, 200, latency_s=latency_s, retry_after_s=None)

    a_round(0.2)  # one slow round: a client-side stall, perhaps
    assert state.limit == 40.0
    a_round(0.2)  # a second: the target is queueing
    assert state.limit == 20.0  # limit x baseline / latency + 3 = 7: but never below half at once
    a_round(0.02)
    assert state.limit == pytest.approx(20 + 20**0.5)  # room again: it grows by its square root
