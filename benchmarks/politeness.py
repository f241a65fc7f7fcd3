"""Politeness: what a target is sent with a fixed k and with the adaptive limiter, and what the limiter costs.

1. `politeness_table`: POST /batch's runner against upstreams whose capacity it is not
   told (fanout_local.capacity): token buckets of 20 to 500 requests a second (burst 10,
   429 with Retry-After: 1), 20 seconds of work each; 10 workers of 20 ms (a knee); a
   target answering 503 to everything. Each once with `fixed_k` (what the service did
   before: k=50 in flight, each request retried on its own) and once with the adaptive
   limiter (POST /batch's runner), in a fresh container each. Items lost, the share of
   requests answered 429 (or 503), the time against the ideal (N / rate; N x ms / workers).
2. `healthy_cost`: a fast, healthy target, with the limiter and without it, in one warm
   process per configuration, rounds interleaved in shuffled order: the paired ratio, over
   a few fresh pairs of processes (each process carries an offset of its own).
   The seed route (N=1000, k=100, at 0 and 50 ms) and /batch (N=1000, k=100, 0 ms).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paired import paired_ratio
from pyreqwest.http import Url
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt, wait_random_exponential

from fanout.batch import BACKOFF_BASE_S, BACKOFF_CAP_S, RETRY_STATUSES, BatchItem, BatchRunner, retry_after_s
from fanout.engine import RequestError, Strategy
from fanout.politeness import Politeness, TargetState
from fanout.settings import Settings, UpstreamTarget
from fanout.targets import TargetScope
from fanout.transports import Transport, UpstreamResponse, make_transport

ROOT = Path(__file__).resolve().parents[1]
K = 50
SECONDS_OF_WORK = 20
RATES = [20, 50, 100, 200, 500]
COST_ROUNDS = 14
#: Fresh process pairs per case: two warm processes of the same code differ by up to some 5 % (NOTES,
#: "The limiter on POST /batch"), an offset rounds within one pair cannot average out.
COST_PAIRS = 3
BUDGET_S = 60.0  # no deadline cuts these runs short: what is lost is lost to the retries


class _Unlimited:
    """A limiter that admits everything at once and learns nothing (the healthy-target comparison)."""

    state = TargetState(limit=math.inf)  # never paused

    def attempt(self, deadline: float) -> _Unlimited:
        return self

    async def __aenter__(self) -> _Unlimited:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def sending(self) -> None:
        pass

    def answered(self, status: int, retry_after_s: float | None) -> None:
        pass

    # the calls the seed routes make by hand (fanout.app)
    def enter_at_once(self) -> bool:
        return True

    def finish(self, *answer: object) -> None:
        pass

    def abandon(self, probe: bool, exc: BaseException | None) -> None:
        pass


def without_politeness(politeness: Politeness) -> None:
    """Turn a container's limiters off: every target admitted at once, nothing learned or reported."""
    unlimited = _Unlimited()
    politeness.limiter = lambda target: unlimited  # type: ignore[method-assign,assignment,return-value]
    politeness.counters = dict  # type: ignore[method-assign]
    politeness.report = lambda targets, since: {}  # type: ignore[method-assign]


class CountingTransport:
    """The real transport, counting every status a target answered (retries included)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.statuses: Counter[int] = Counter()
        self.latencies_s: list[float] = []

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        started = time.perf_counter()
        response = await self.inner.send(*args, **kwargs)
        self.latencies_s.append(time.perf_counter() - started)
        self.statuses[response.status] += 1
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True)
class Kind:
    name: str
    path: str
    query: dict[str, Any]
    n: int
    ideal_s: float | None


def kinds(quick: bool) -> list[Kind]:
    rates = [50, 500] if quick else RATES
    seconds = 10 if quick else SECONDS_OF_WORK
    buckets = [
        Kind(
            f"token bucket {rate}/s", "/limited", {"rate": rate, "burst": 10, "retry_after": 1}, rate * seconds, seconds
        )
        for rate in rates
    ]
    knee = Kind("10 workers x 20 ms", "/knee", {"knee": 10, "ms": 20}, 1000, 1000 * 0.020 / 10)
    down = Kind("503 to everything", "/status/503", {}, 200, None)
    return [*buckets, knee, down]


async def fixed_k(transport: CountingTransport, items: list[BatchItem], k: int, budget_s: float) -> list[bool]:
    """The service before politeness: k in flight, each request retried on its own (tenacity, 3
    attempts, its own Retry-After as the wait when it fits the budget, else backoff with jitter)."""
    deadline = time.monotonic() + budget_s
    slots = asyncio.Semaphore(k)
    jitter = wait_random_exponential(multiplier=BACKOFF_BASE_S, max=BACKOFF_CAP_S)

    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        if outcome is not None and not outcome.failed:
            hinted = retry_after_s(outcome.result())
            if hinted is not None:
                return hinted
        return float(jitter(state))

    def past_budget(state: RetryCallState) -> bool:
        return time.monotonic() + (state.upcoming_sleep or 0.0) >= deadline

    async def one(item: BatchItem) -> bool:
        async def attempt() -> UpstreamResponse:
            async with slots:
                return await transport.send(
                    item.method, item.url, headers={}, body=None, max_body_bytes=1000, scope=item.scope
                )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(3) | past_budget,
            wait=wait,
            retry=retry_if_result(lambda response: response.status in RETRY_STATUSES),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        try:
            response: UpstreamResponse = await retrying(attempt)
        except RequestError:
            return False
        return response.status < 400

    return list(await asyncio.gather(*(one(item) for item in items)))


def run_kind(server_url: str, kind: Kind, adaptive: bool, key: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        transport = CountingTransport(
            make_transport(
                Settings.model_fields["transport"].default, max_connections=K, timeout_s=5, allow_private=True
            )
        )
        politeness = Politeness(ceiling=K)
        scope = TargetScope.of("t", UpstreamTarget(url=server_url, allow_http=True))
        query = {name: str(value) for name, value in {**kind.query, "key": key}.items()}
        url = Url(server_url).with_path(kind.path).with_query(query)
        items = [
            BatchItem(id=str(i), method="GET", url=url, headers={}, body=None, scope=scope, path=kind.path)
            for i in range(kind.n)
        ]
        started = time.monotonic()
        try:
            if adaptive:
                runner = BatchRunner(
                    transport,  # type: ignore[arg-type]
                    max_attempts=3,
                    max_item_bytes=1000,
                    rate_per_s=0,
                    politeness=politeness,
                )
                result = await runner.run(
                    items, strategy=Strategy.SEMAPHORE, concurrency=K, budget_s=BUDGET_S, fail_fast=False
                )
                ok = [report.ok for report in result.reports]
            else:
                ok = await fixed_k(transport, items, K, BUDGET_S)
        finally:
            await transport.aclose()
        took = time.monotonic() - started
        state = politeness.limiter("t").state
        sent = sum(transport.statuses.values())
        refused = transport.statuses[429] + transport.statuses[503]
        return {
            "kind": kind.name,
            "limiter": "adaptive" if adaptive else f"fixed k={K}",
            "n": kind.n,
            "lost": ok.count(False),
            "sent": sent,
            "refused_share": refused / sent if sent else 0.0,
            "time_s": took,
            "ideal_s": kind.ideal_s,
            "median_latency_ms": statistics.median(transport.latencies_s) * 1000 if transport.latencies_s else 0.0,
            "limit": state.limit if adaptive else K,
            # why a row took what it took: the episodes that slowed the target down, and the rate they left
            "throttles": state.throttles if adaptive else None,
            "rate_per_s": state.rate if adaptive else None,
        }

    return asyncio.run(go())


def politeness_table(server_url: str, *, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for kind in kinds(quick):
        for adaptive in (False, True):
            row = run_kind(server_url, kind, adaptive, key=f"{kind.name}-{adaptive}-{time.monotonic_ns()}")
            vs = f" x{row['time_s'] / row['ideal_s']:.2f} ideal" if row["ideal_s"] else ""
            print(
                f"polite   {row['kind']:<20} {row['limiter']:<11} lost {row['lost']:>4}/{row['n']:<5} "
                f"refused {row['refused_share']:6.1%} of {row['sent']:<5} {row['time_s']:6.2f} s{vs} "
                f"latency {row['median_latency_ms']:.0f} ms limit {row['limit']:.0f}{_pacing(row)}",
                flush=True,
            )
            rows.append(row)
    return rows


def _pacing(row: dict[str, Any]) -> str:
    if row["throttles"] is None:
        return ""
    rate = "unpaced" if row["rate_per_s"] is None else f"{row['rate_per_s']:.0f}/s"
    return f" throttles {row['throttles']} rate {rate}"


# --- a healthy target: the limiter's cost, paired ------------------------------------------------------


def _worker(adaptive: bool, route: str, target_url: str) -> None:
    """One warm container: answer each "go" line on stdin with the call's wall time."""
    import importlib.util
    import os

    from fanout_local.worker import LocalContext

    os.environ.update(
        {
            "FANOUT_TARGET_URL": target_url,
            "FANOUT_UPSTREAMS": json.dumps({"up": {"url": target_url, "allow_http": True}}),
            "FANOUT_MAX_CONCURRENCY": "100",
            "FANOUT_MAX_REQUESTS": "1000",
            "FANOUT_ALLOW_PRIVATE_NETWORKS": "true",
            "POWERTOOLS_LOG_LEVEL": "ERROR",
            "POWERTOOLS_METRICS_DISABLED": "true",
        }
    )
    spec = importlib.util.spec_from_file_location("bench_entry", ROOT / "functions/api/app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not adaptive:
        without_politeness(module.app.state.politeness)
    event = _seed_event(1000, 100) if route == "seed" else _batch_event(1000, 100)
    context = LocalContext(function_name="bench", timeout_s=30)
    for _ in range(3):
        module.handler(copy.deepcopy(event), context)
    for _line in sys.stdin:
        started = time.perf_counter()
        response = module.handler(copy.deepcopy(event), context)
        took = time.perf_counter() - started
        body = json.loads(response["body"])
        ok = body["succeeded"] if route == "seed" else body["summary"]["succeeded"]
        assert ok == 1000, body
        print(took, flush=True)


def _seed_event(n: int, k: int) -> dict[str, Any]:
    event = json.loads((ROOT / "events/async_sem-http-api-v2.json").read_text())
    event["rawPath"] = event["requestContext"]["http"]["path"] = f"/async_sem/{n}/{k}"
    event["pathParameters"] = {"n": str(n), "k": str(k)}
    return event


def _batch_event(n: int, k: int) -> dict[str, Any]:
    event = json.loads((ROOT / "events/batch-http-api-v2.json").read_text())
    requests = [{"id": str(i), "target": "up", "path": "/delay", "query": {"ms": "0"}} for i in range(n)]
    event["body"] = json.dumps({"requests": requests, "concurrency": k})
    event["headers"]["content-length"] = str(len(event["body"]))
    return event


def _interleave(route: str, target: str, walls: dict[bool, list[float]]) -> None:
    """One fresh pair of warm processes (with the limiter, without), COST_ROUNDS rounds in shuffled order."""
    workers = {
        adaptive: subprocess.Popen(
            [sys.executable, __file__, "--worker", "adaptive" if adaptive else "fixed", route, target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for adaptive in (True, False)
    }
    try:
        for _ in range(COST_ROUNDS):
            order = [True, False]
            random.shuffle(order)
            for adaptive in order:
                worker = workers[adaptive]
                assert worker.stdin and worker.stdout
                worker.stdin.write("go\n")
                worker.stdin.flush()
                walls[adaptive].append(float(worker.stdout.readline()))
    finally:
        for worker in workers.values():
            assert worker.stdin
            worker.stdin.close()
            worker.wait(timeout=30)


def healthy_cost(server_url: str) -> list[dict[str, Any]]:
    cases = [("seed", 0), ("seed", 50), ("batch", 0)]
    rows = []
    for route, latency in cases:
        target = f"{server_url}/delay?ms={latency}" if route == "seed" else server_url
        walls: dict[bool, list[float]] = {True: [], False: []}
        for _pair in range(COST_PAIRS):
            _interleave(route, target, walls)
        ratio, first, third = paired_ratio(walls[True], walls[False])
        row = {
            "route": "GET /async_sem/1000/100" if route == "seed" else "POST /batch, 1000 items, k=100",
            "latency_ms": latency,
            "adaptive_ms": statistics.median(walls[True]) * 1000,
            "fixed_ms": statistics.median(walls[False]) * 1000,
            "ratio": ratio,
            "ratio_q1": first,
            "ratio_q3": third,
            "rounds": COST_ROUNDS * COST_PAIRS,
            "pairs": COST_PAIRS,
        }
        print(
            f"polite   healthy {row['route']:<32} L={latency:<3} ratio {row['ratio']:.3f} "
            f"(IQR {row['ratio_q1']:.3f}-{row['ratio_q3']:.3f})",
            flush=True,
        )
        rows.append(row)
    return rows


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(sys.argv[2] == "adaptive", sys.argv[3], sys.argv[4])
