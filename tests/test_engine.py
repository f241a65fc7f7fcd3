"""The engine on its own: strategies, bounds, isolation and the deadline, over real sockets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import run
from fanout.engine import (
    DEADLINE_EXCEEDED,
    SKIPPED_DEADLINE,
    SKIPPED_FAIL_FAST,
    FanoutResult,
    Outcome,
    RequestError,
    Strategy,
    fan_out,
)
from fanout.transports import TRANSPORTS, make_transport
from fanout_local.upstream import LocalUpstream


def statuses(result: FanoutResult[int]) -> list[int | None]:
    return [outcome.value for outcome in result.outcomes]


class RunningSpy:
    """Counts calls running at once, like aiometer's tests do."""

    def __init__(self) -> None:
        self.running = 0
        self.max_running = 0

    async def send(self, index: int) -> int:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        await asyncio.sleep(0.005)
        self.running -= 1
        return 200


@pytest.mark.parametrize("n", [1, 7, 40])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_semaphore_never_exceeds_k(n: int, k: int) -> None:
    spy = RunningSpy()
    result = run(fan_out(spy.send, n=n, strategy=Strategy.SEMAPHORE, concurrency=k, deadline_s=10))
    assert spy.max_running == min(n, k)
    assert result.concurrency == min(n, k)
    assert [outcome.value for outcome in result.outcomes] == [200] * n


def test_queued_calls_wait_as_indices_not_as_tasks() -> None:
    """k workers pull the next index: a queued call costs no task (about 1.5 KB of heap each before)."""
    tasks_seen: list[int] = []

    async def send(index: int) -> int:
        tasks_seen.append(len(asyncio.all_tasks()))
        await asyncio.sleep(0)
        return index

    result = run(fan_out(send, n=500, strategy=Strategy.SEMAPHORE, concurrency=8, deadline_s=10))
    assert [outcome.value for outcome in result.outcomes] == list(range(500))
    assert max(tasks_seen) <= 8 + 1  # the workers and the task running the call


def test_each_lane_has_its_own_workers_and_keeps_its_order() -> None:
    """A lane whose calls wait (a paused target) holds back no other lane."""
    release = asyncio.Event()
    started: list[int] = []

    async def send(index: int) -> int:
        started.append(index)
        if index % 2 == 0:  # lane 0 waits until lane 1 is done
            await release.wait()
        elif index == 5:
            release.set()
        return index

    result = run(
        fan_out(send, n=6, strategy=Strategy.SEMAPHORE, concurrency=1, deadline_s=5, lanes=[[0, 2, 4], [1, 3, 5]])
    )
    assert [outcome.value for outcome in result.outcomes] == list(range(6))
    assert started == [0, 1, 3, 5, 2, 4]


def test_sync_runs_one_at_a_time() -> None:
    spy = RunningSpy()
    result = run(fan_out(spy.send, n=12, strategy=Strategy.SYNC, concurrency=50, deadline_s=10))
    assert (spy.max_running, result.concurrency, statuses(result)) == (1, 1, [200] * 12)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_stop_skips_what_has_not_started(strategy: Strategy) -> None:
    stop = asyncio.Event()

    async def send(index: int) -> int:
        await asyncio.sleep(0.01)
        if index == 1:
            stop.set()
            raise RuntimeError("upstream broke")
        return 200

    result = run(fan_out(send, n=6, strategy=strategy, concurrency=2, deadline_s=5, stop=stop))
    assert result.outcomes[0] == Outcome(value=200)
    assert result.outcomes[1] == Outcome(error="RuntimeError", detail="upstream broke")
    assert result.outcomes[2:] == [Outcome(skipped=SKIPPED_FAIL_FAST)] * 4 or strategy is Strategy.GATHER
    if strategy is Strategy.GATHER:  # all started at once: nothing left to skip
        assert [o.value for o in result.outcomes[2:]] == [200] * 4


@pytest.mark.parametrize(
    ("n", "concurrency", "deadline_s"),
    [(0, 1, 1.0), (-1, 1, 1.0), (1, 0, 1.0), (1, -2, 1.0), (1, 1, 0.0), (1, 1, -1.0)],
)
def test_bad_arguments_are_refused(n: int, concurrency: int, deadline_s: float) -> None:
    spy = RunningSpy()
    with pytest.raises(ValueError) as refused:
        run(fan_out(spy.send, n=n, strategy=Strategy.GATHER, concurrency=concurrency, deadline_s=deadline_s))
    assert str(refused.value) == f"n={n}, concurrency={concurrency} and deadline_s={deadline_s} must be positive"
    assert spy.max_running == 0


def test_the_smallest_arguments_are_accepted() -> None:
    spy = RunningSpy()
    result = run(fan_out(spy.send, n=1, strategy=Strategy.GATHER, concurrency=1, deadline_s=0.5))
    assert (statuses(result), result.concurrency) == ([200], 1)


async def _fan_out_over_http(
    transport: str,
    url: str,
    strategy: Strategy,
    n: int,
    concurrency: int,
    path: str = "/delay?ms=50",
    pool: int = 10,
    timeout_s: float = 5.0,
    deadline_s: float = 10.0,
    paths: dict[int, str] | None = None,
) -> FanoutResult:
    client = make_transport(transport, max_connections=pool, timeout_s=timeout_s, allow_private=True)
    paths = paths or {}

    async def send(index: int) -> int:
        return (await client.get_status(url + paths.get(index, path)))[0]

    try:
        return await fan_out(send, n=n, strategy=strategy, concurrency=concurrency, deadline_s=deadline_s)
    finally:
        await client.aclose()


@pytest.fixture(params=TRANSPORTS)
def over_http(request: pytest.FixtureRequest, upstream: LocalUpstream) -> Callable[..., FanoutResult]:
    """Fan out to the test upstream through each shipped transport."""

    def call(strategy: Strategy, n: int, concurrency: int, **options: Any) -> FanoutResult:
        return run(_fan_out_over_http(request.param, upstream.url, strategy, n, concurrency, **options))

    return call


@pytest.mark.parametrize(
    ("strategy", "n", "concurrency", "pool", "peak"),
    [
        (Strategy.SYNC, 8, 1, 10, 1),
        (Strategy.SEMAPHORE, 30, 7, 10, 7),
        (Strategy.SEMAPHORE, 4, 7, 10, 4),
        (Strategy.GATHER, 30, 10, 10, 10),
        (Strategy.GATHER, 4, 10, 10, 4),
    ],
)
def test_peak_in_flight_at_the_upstream(
    over_http: Callable[..., FanoutResult],
    upstream: LocalUpstream,
    strategy: Strategy,
    n: int,
    concurrency: int,
    pool: int,
    peak: int,
) -> None:
    result = over_http(strategy, n, concurrency, pool=pool)
    assert upstream.stats.peak_in_flight == peak
    assert upstream.stats.requests == n
    assert upstream.stats.connections == peak  # connections are reused, never one per request
    assert statuses(result) == [200] * n


def test_semaphore_finishes_in_rounds_not_one_by_one(over_http: Callable[..., FanoutResult]) -> None:
    result = over_http(Strategy.SEMAPHORE, 50, 10, path="/delay?ms=100")
    # 5 rounds of 100 ms; one after another would take 5 s. Bounds are generous on purpose.
    assert 0.45 <= result.elapsed_s < 2.0
    assert statuses(result) == [200] * 50


@pytest.mark.parametrize("strategy", list(Strategy))
def test_a_failing_request_is_isolated(over_http: Callable[..., FanoutResult], strategy: Strategy) -> None:
    paths = {0: "/hang", 1: "/reset", 2: "/status/500"}
    result = over_http(strategy, 6, 3, path="/delay?ms=5", timeout_s=0.3, paths=paths)
    errors = [outcome.error for outcome in result.outcomes]
    assert statuses(result) == [None, None, 500, 200, 200, 200]
    assert errors[0] == "ReadTimeout"
    assert errors[1] == "RemoteProtocolError"
    assert errors[2:] == [None] * 4


@pytest.mark.parametrize("strategy", list(Strategy))
def test_deadline_reports_unfinished_requests(over_http: Callable[..., FanoutResult], strategy: Strategy) -> None:
    paths = {2: "/hang"}
    result = over_http(strategy, 4, 2, path="/delay?ms=5", timeout_s=5, deadline_s=0.4, paths=paths)
    assert result.elapsed_s < 1.5
    assert len(result.outcomes) == 4
    assert result.outcomes[2].error == DEADLINE_EXCEEDED
    if strategy is Strategy.SYNC:  # what comes after the hang never started
        assert result.outcomes[3] == Outcome(skipped=SKIPPED_DEADLINE)
    else:
        assert result.outcomes[3].value == 200
    assert result.outcomes[0].value == 200


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_cookie_carries_over_between_requests(transport: str, upstream: LocalUpstream) -> None:
    # One session serves every caller of a container: a cookie set for one must not reach another.
    # A host name, not an IP: cookie jars ignore cookies from IP addresses.
    url = upstream.url.replace("127.0.0.1", "localhost")
    result = run(_fan_out_over_http(transport, url, Strategy.SYNC, 3, 1, path="/cookie"))
    assert statuses(result) == [200] * 3
    assert upstream.stats.requests_with_cookie == 0


def test_engine_imports_neither_web_nor_lambda_code() -> None:
    code = (
        "import sys, fanout.engine, fanout.transports;"
        "bad = {'fastapi', 'starlette', 'mangum', 'pydantic', 'aiohttp', 'httpx'} & set(sys.modules);"
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_error_at_the_deadline_is_the_deadlines_and_nothing_starts_after_it() -> None:
    """A client whose own timer fires with the deadline turns its cancellation into an error (aiohttp does)."""

    async def send(index: int) -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # swallowed, as a client's timeout context does
            raise RequestError("ReadTimeout", "the client's own timer") from None
        return 200

    result = run(fan_out(send, n=3, strategy=Strategy.SYNC, concurrency=1, deadline_s=0.2))
    assert result.outcomes == [Outcome(error=DEADLINE_EXCEEDED)] + [Outcome(skipped=SKIPPED_DEADLINE)] * 2
    assert result.elapsed_s < 5


def test_the_deadline_cancels_no_sooner_than_the_clock_its_checks_read() -> None:
    """The function's loop is uvloop, whose timers run on a millisecond clock and fire up to about a
    millisecond before time.monotonic() reaches their deadline (nearly half of them, here). The
    deadline's checks read time.monotonic(), so a cancellation before it made an error at the deadline
    the client's own: the cancellation must wait for that clock."""
    assert type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")  # conftest's, as on Lambda
    cancelled_early: list[float] = []
    sent: list[int] = []

    async def send(index: int) -> int:
        sent.append(index)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled_early.append(not_before - time.monotonic())
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            raise RequestError("ReadTimeout", "the client's own timer") from None
        return 200

    outcomes: list[Outcome] = []
    for attempt in range(200):
        if len(outcomes) == 40:
            break
        deadline_s = 0.003 + attempt % 8 * 0.0007  # where a millisecond clock rounds either way
        not_before = time.monotonic() + deadline_s
        sent_before = len(sent)
        (outcome,) = run(fan_out(send, n=1, strategy=Strategy.SYNC, concurrency=1, deadline_s=deadline_s)).outcomes
        if len(sent) == sent_before:  # a busy machine held the call past its few milliseconds before it sent
            assert outcome == Outcome(skipped=SKIPPED_DEADLINE)
            continue
        outcomes.append(outcome)
    assert [early for early in cancelled_early if early > 0] == []
    assert outcomes == [Outcome(error=DEADLINE_EXCEEDED)] * 40


def test_the_vocabulary_is_fixed() -> None:
    """These strings reach callers (errors, skipped reasons, strategies) and metrics: renaming one breaks them."""
    assert (DEADLINE_EXCEEDED, SKIPPED_DEADLINE, SKIPPED_FAIL_FAST) == ("DeadlineExceeded", "deadline", "fail_fast")
    assert [strategy.value for strategy in Strategy] == ["sync", "gather", "semaphore"]


def test_errors_and_outcomes_are_plain_values() -> None:
    error = RequestError("ReadTimeout")
    assert (str(error), error.kind, error.detail, error.internal) == ("ReadTimeout", "ReadTimeout", "", None)
    detailed = RequestError("ForbiddenAddress", "refused (private)", internal="10.0.0.1")
    assert (str(detailed), detailed.internal) == ("ForbiddenAddress: refused (private)", "10.0.0.1")
    outcome = Outcome(value=200)
    assert (outcome.error, outcome.detail, outcome.skipped) == (None, "", None)
    with pytest.raises(AttributeError):
        outcome.value = 500  # type: ignore[misc]
    result = FanoutResult(strategy=Strategy.SYNC, concurrency=1, elapsed_s=0.0, outcomes=[outcome])
    with pytest.raises(AttributeError):
        result.concurrency = 2  # type: ignore[misc]
    assert not hasattr(outcome, "__dict__") and not hasattr(result, "__dict__")
