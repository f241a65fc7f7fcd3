"""Measure the strategies and transports; write benchmarks/results/{results.md,results.json,time_vs_n.png}.

`make bench` runs this (`make bench-quick` for a short matrix). Every figure in a
table comes from this one run, on this machine, so ratios compare like with like.

Per cell: a warm-up call (for clients kept across calls), then the median (and min, max) of 3 calls; client CPU
per request from this process's CPU time; upstream CPU from /proc. Ideal time:
sync N*L, semaphore ceil(N/k)*L, gather ceil(N/pool)*L; efficiency = ideal / actual.
Cells whose ideal time is over 6 s are left out, a candidate is not run at a
larger N once it took over 5 s at a smaller one (listed as skipped), and a call
over 8 s is not repeated (its row says so).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from candidates import Candidate, make_candidates
from paired import paired_ratio
from servers import Cores, Server, http1_upstream, on_cores, split_cores, tls_upstream

from fanout.engine import Outcome, Strategy

RESULTS = Path(__file__).parent / "results"
POOL = 100  # the template's default ceiling for the gather and semaphore functions
RUNS = 3
SKIP_IDEAL_S = 6.0
SKIP_SLOW_S = 5.0
SLOW_RUN_S = 8.0


@dataclass
class Row:
    section: str
    strategy: str
    n: int
    latency_ms: int
    k: int
    candidate: str
    wall_s: list[float] = field(default_factory=list)
    cpu_us_per_request: float = 0.0
    upstream_cpu_share: float = 0.0
    peak_rss_mb: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s) if self.wall_s else math.nan

    @property
    def ideal_s(self) -> float:
        seconds = self.latency_ms / 1000
        if self.strategy == "sync":
            return self.n * seconds
        return math.ceil(self.n / self.k) * seconds

    @property
    def efficiency(self) -> float | None:
        return self.ideal_s / self.median_s if self.ideal_s and self.wall_s else None


class RssSampler:
    """Peak resident memory of this process while a call runs (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, int(Path("/proc/self/statm").read_text().split()[1]) * page)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(loop: asyncio.AbstractEventLoop, candidate: Candidate, server: Server, row: Row) -> Row:
    url = f"{server.url}/delay?ms={row.latency_ms}"
    strategy = Strategy(row.strategy)
    if candidate.reuses_client:  # a warm container: the pool is open before the measured calls
        loop.run_until_complete(candidate.call(url, strategy, min(row.n, 1000), row.k))
    cpu, upstream_cpu, errors = 0.0, 0.0, Counter[str]()
    for _ in range(RUNS):
        cpu0, up0 = time.process_time(), server.cpu_s()
        with RssSampler() as rss:
            result = loop.run_until_complete(candidate.call(url, strategy, row.n, row.k))
        row.wall_s.append(result.elapsed_s)
        cpu += time.process_time() - cpu0
        upstream_cpu += server.cpu_s() - up0
        row.peak_rss_mb = max(row.peak_rss_mb, rss.peak / 2**20)
        errors.update(_failure(o) for o in result.outcomes if o.value != 200)
        if result.elapsed_s > SLOW_RUN_S:
            row.note = f"{len(row.wall_s)} run(s): over {SLOW_RUN_S:g} s each"
            break
    row.cpu_us_per_request = cpu / len(row.wall_s) / row.n * 1e6
    row.upstream_cpu_share = upstream_cpu / sum(row.wall_s)
    row.errors = dict(errors)
    return row


def _failure(outcome: Outcome[int]) -> str:
    return outcome.error or (f"skipped: {outcome.skipped}" if outcome.skipped else f"HTTP {outcome.value}")


def strategy_matrix() -> list[tuple[str, int]]:
    """(strategy, k) pairs; k is the semaphore's limit or the gather pool."""
    return [("sync", 1), ("gather", POOL), ("semaphore", 10), ("semaphore", 100)]


def run_matrix(
    loop: asyncio.AbstractEventLoop,
    section: str,
    server: Server,
    names: list[str],
    ns: list[int],
    latencies: list[int],
    strategies: list[tuple[str, int]],
) -> list[Row]:
    rows: list[Row] = []
    candidates = make_candidates(names, POOL, server.client_ssl_context, server.ca_pem())
    try:
        _fill(loop, section, server, candidates, ns, latencies, strategies, rows)
    finally:
        for candidate in candidates:
            loop.run_until_complete(candidate.aclose())
    return rows


def _fill(
    loop: asyncio.AbstractEventLoop,
    section: str,
    server: Server,
    candidates: list[Candidate],
    ns: list[int],
    latencies: list[int],
    strategies: list[tuple[str, int]],
    rows: list[Row],
) -> None:
    for strategy, k in strategies:
        for latency in latencies:
            too_slow: dict[str, int] = {}
            for n in ns:
                for candidate in candidates:
                    row = Row(section, strategy, n, latency, k, candidate.name)
                    if row.ideal_s > SKIP_IDEAL_S:
                        continue
                    if candidate.name in too_slow:
                        row.note = f"skipped: over {SKIP_SLOW_S:g} s at N={too_slow[candidate.name]}"
                        rows.append(row)
                        continue
                    measure(loop, candidate, server, row)
                    rows.append(row)
                    print(_progress(row), flush=True)
                    if row.median_s > SKIP_SLOW_S:
                        too_slow[candidate.name] = n


def _progress(row: Row) -> str:
    return (
        f"{row.section:<8} {row.strategy:<9} N={row.n:<5} L={row.latency_ms:<3} k={row.k:<4} "
        f"{row.candidate:<14} {row.median_s * 1000:9.1f} ms  cpu {row.cpu_us_per_request:8.0f} us/req  "
        f"errors {sum(row.errors.values())}"
    )


GUARD_ROUNDS = 61


def guard_cost(loop: asyncio.AbstractEventLoop, server: Server) -> dict[str, float]:
    """What the egress guard costs: a guarded and an unguarded call in each round, in a shuffled order,
    and the ratio of the two in the same round (`paired.paired_ratio`), so drift hits both sides alike.

    Semaphore, N=1000, k=100, latency 0: the cell where per-request overhead shows most. (The ratio of
    the two medians, as before, swung from 0.82x to 1.06x between runs of the same code.)
    """
    url = f"{server.url}/delay?ms=0"
    guarded, bare = make_candidates(["pyreqwest", "pyreqwest-unguarded"], POOL)
    candidates = {"guarded": guarded, "unguarded": bare}
    walls: dict[str, list[float]] = {"guarded": [], "unguarded": []}
    cpus: dict[str, list[float]] = {"guarded": [], "unguarded": []}
    try:
        for candidate in candidates.values():  # warm both pools
            loop.run_until_complete(candidate.call(url, Strategy.SEMAPHORE, 1000, 100))
        for _ in range(GUARD_ROUNDS):
            for name in random.sample(list(candidates), len(candidates)):
                cpu0 = time.process_time()
                result = loop.run_until_complete(candidates[name].call(url, Strategy.SEMAPHORE, 1000, 100))
                walls[name].append(result.elapsed_s)
                cpus[name].append((time.process_time() - cpu0) / 1000 * 1e6)
    finally:
        for candidate in candidates.values():
            loop.run_until_complete(candidate.aclose())
    out: dict[str, Any] = {f"{name}_ms": statistics.median(values) * 1000 for name, values in walls.items()}
    out |= {f"{name}_cpu_us": statistics.median(values) for name, values in cpus.items()}
    out["wall_ratio"], *out["wall_ratio_iqr"] = paired_ratio(walls["guarded"], walls["unguarded"])
    out["cpu_ratio"], *out["cpu_ratio_iqr"] = paired_ratio(cpus["guarded"], cpus["unguarded"])
    out["rounds"] = GUARD_ROUNDS
    print(f"guard    wall {out['wall_ratio']:.3f}x  cpu {out['cpu_ratio']:.3f}x", flush=True)
    return out


def tls_cold_and_warm(loop: asyncio.AbstractEventLoop, server: Server, ns: list[int]) -> list[Row]:
    """Semaphore k=100 over TLS: the first call on a new client (handshakes) and warm calls."""
    rows = run_matrix(
        loop,
        "tls",
        server,
        ["pyreqwest", "aiohttp", "httpx", "httpx-http2", "floor"],
        ns,
        [0, 50],
        [("semaphore", 100)],
    )
    for name in ["pyreqwest", "aiohttp", "httpx", "httpx-http2"]:
        for n in ns:
            row = Row("tls-cold", "semaphore", n, 0, 100, name)
            for _ in range(RUNS):
                (candidate,) = make_candidates([name], POOL, server.client_ssl_context, server.ca_pem())
                cpu0 = time.process_time()
                result = loop.run_until_complete(candidate.call(f"{server.url}/delay?ms=0", Strategy.SEMAPHORE, n, 100))
                row.cpu_us_per_request += (time.process_time() - cpu0) / n * 1e6 / RUNS
                row.wall_s.append(result.elapsed_s)
                row.errors = dict(Counter(o.error for o in result.outcomes if o.error))
                loop.run_until_complete(candidate.aclose())
            rows.append(row)
            print(_progress(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {10, 1000} only, fewer candidates")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    ns = [10, 1000] if args.quick else [10, 100, 1000, 5000]
    names = ["baseline", "httpx", "httpx2", "httpx-aiohttp", "aiohttp", "pyreqwest", "pyreqwest-unguarded", "floor"]
    if args.quick:
        names = ["baseline", "httpx-aiohttp", "aiohttp", "pyreqwest", "pyreqwest-unguarded", "floor"]
    cores = split_cores()
    whole_machine = None if cores is None else cores.client | cores.upstream
    # A client against an upstream: the client on cores of its own (set before any client thread
    # starts: what this thread starts inherits them).
    with on_cores(None if cores is None else cores.client):
        loop = asyncio.new_event_loop()
        rows: list[Row] = []
        with http1_upstream() as server:
            rows += run_matrix(loop, "http1", server, names, ns, [0, 50], strategy_matrix())
            guard = guard_cost(loop, server)
            from service import through_service  # imports the handler: after the bare engine cells

            service_rows = through_service(server, ns=[10, 1000])
            from politeness import healthy_cost, politeness_table

            polite = {"table": politeness_table(server.url, quick=args.quick), "healthy": healthy_cost(server.url)}
            from clients import cpu_per_request, delay_chain

            cpu = cpu_per_request(server.url, rounds=4 if args.quick else 15)
            with http1_upstream(exact_delays=True) as exact:
                chain = delay_chain(exact.url, rounds=4 if args.quick else 15)
            from jobs import jobs_through_the_local_stack

            with on_cores(whole_machine):
                # the local stack with its AWS stand-ins, as `make run` starts it: the whole machine
                jobs = jobs_through_the_local_stack(server.url, quick=args.quick)
        with tls_upstream() as server:
            rows += tls_cold_and_warm(loop, server, [100, 1000])
        loop.close()
        from memory import memory_per_request

        memory = memory_per_request()
    # Cold start (an import, no upstream): the whole machine, as before the split.
    from coldstart import cold_start
    from report import write_report

    write_report(rows, service_rows, guard, memory, cold_start(), _machine(cores), RESULTS, polite, jobs, cpu, chain)


def _machine(cores: Cores | None) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cores": "on a core of its own" if cores is not None else "on the client's cores (one CPU, or not Linux)",
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "argv": " ".join(sys.argv[1:]),
    }


def rows_to_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [
        asdict(row) | {"median_s": row.median_s, "ideal_s": row.ideal_s, "efficiency": row.efficiency} for row in rows
    ]


if __name__ == "__main__":
    main()
