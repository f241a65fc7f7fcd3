"""Turn one benchmark run into benchmarks/results/{results.md,results.json,time_vs_n.png,performance.png}."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

TRANSPORT_ORDER = [
    "baseline",
    "httpx",
    "httpx2",
    "httpx-aiohttp",
    "httpx-http2",
    "aiohttp",
    "aiohttp-unguarded",
    "pyreqwest",
    "pyreqwest-unguarded",
    "floor",
]
#: The transport the service ships by default (fanout.settings): the one the targets are about.
SHIPPED = "pyreqwest"
#: The figure of the CPU, delay chain and cold start ratios (beside time_vs_n.png).
PERFORMANCE_PLOT = "performance.png"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or math.isnan(value) or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(errors.items())) or "0"


def matrix_table(rows: list[Any]) -> list[str]:
    lines = [
        "| section | strategy | N | L ms | k/pool | candidate | wall ms: median (min-max) | x floor | x baseline "
        "| efficiency | client CPU us/req | errors | upstream CPU | peak RSS MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for row in rows:
        groups[(row.section, row.strategy, row.k, row.latency_ms, row.n)].append(row)
    for key, group in groups.items():
        floor = next((r.median_s for r in group if r.candidate == "floor" and r.wall_s), None)
        baseline = next((r.median_s for r in group if r.candidate == "baseline" and r.wall_s), None)
        for row in sorted(group, key=lambda r: TRANSPORT_ORDER.index(r.candidate)):
            if not row.wall_s:
                lines.append(
                    f"| {' | '.join(map(str, key[:2]))} | {row.n} | {row.latency_ms} | {row.k} | "
                    f"{row.candidate} | - | - | - | - | - | - | - | - | {row.note} |"
                )
                continue
            efficiency = f"{row.efficiency:.2f}" if row.efficiency else "-"
            lines.append(
                f"| {row.section} | {row.strategy} | {row.n} | {row.latency_ms} | {row.k} | {row.candidate} | "
                f"{_ms(row.median_s)} ({_ms(min(row.wall_s))}-{_ms(max(row.wall_s))}) | "
                f"{_ratio(row.median_s, floor)} | {_ratio(row.median_s, baseline)} | {efficiency} | "
                f"{row.cpu_us_per_request:,.0f} | {_errors(row.errors)} | {row.upstream_cpu_share:.0%} | "
                f"{row.peak_rss_mb:.0f} | {row.note} |"
            )
    return lines


def headline(rows: list[Any]) -> list[str]:
    """The targets of the benchmark issue, each as a ratio from this run."""

    def find(section: str, strategy: str, n: int, latency: int, k: int, candidate: str) -> Any:
        return next(
            (
                r
                for r in rows
                if (r.section, r.strategy, r.n, r.latency_ms, r.k, r.candidate)
                == (section, strategy, n, latency, k, candidate)
                and r.wall_s
            ),
            None,
        )

    lines = ["| target | measured | met |", "|---|---|---|"]
    for strategy in ("gather", "semaphore"):
        ours, floor = (
            find("http1", strategy, 1000, 0, 100, SHIPPED),
            find("http1", strategy, 1000, 0, 100, "floor"),
        )
        if ours and floor:
            ratio = ours.median_s / floor.median_s
            lines.append(
                target_row(
                    f"{strategy} N=1000 L=0: within 1.5x of raw aiohttp, no errors",
                    f"{ratio:.2f}x, {sum(ours.errors.values())} errors",
                    ratio <= 1.5 and not ours.errors,
                )
            )
    if sem := find("http1", "semaphore", 1000, 50, 100, SHIPPED):
        lines.append(
            target_row(
                "semaphore N=1000 L=50 k=100, engine + shipped transport (asyncio's loop): within 5% of the delay"
                " chain (efficiency >= 0.95)",
                f"{sem.efficiency:.3f} ({_ms(sem.median_s)} ms)",
                sem.efficiency >= 0.95,
            )
        )
    if big := find("http1", "gather", 5000, 0, 100, SHIPPED):
        lines.append(target_row("gather N=5000: no errors", f"{sum(big.errors.values())} errors", not big.errors))
    if sync := find("http1", "sync", 100, 50, 1, SHIPPED):
        ratio = sync.median_s / sync.ideal_s
        lines.append(target_row("sync: within 1.5x of N x latency", f"{ratio:.2f}x (N=100, L=50)", ratio <= 1.5))
    return lines


def target_row(target: str, measured: str, met: bool) -> str:
    return f"| {target} | {measured} | {'yes' if met else 'no'} |"


def write_plot(rows: list[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sync", 1), ("gather", 100), ("semaphore", 100)]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.5), sharey=True)
    for axis, (strategy, k) in zip(axes, panels, strict=True):
        for candidate in TRANSPORT_ORDER:
            points = sorted(
                (r.n, r.median_s)
                for r in rows
                if r.section == "http1"
                and r.strategy == strategy
                and r.k == k
                and r.latency_ms == 0
                and r.candidate == candidate
                and r.wall_s
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=candidate)
        axis.set(
            xscale="log",
            yscale="log",
            title=f"{strategy}" + (f" (k/pool={k})" if strategy != "sync" else ""),
            xlabel="N requests",
        )
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("wall time, s (upstream latency 0)")
    axes[-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_performance_plot(cpu: dict[str, Any], chain: dict[str, Any], cold: dict[str, Any], path: Path) -> None:
    """The paired ratios the performance targets are read from, each configuration against its line:
    client CPU per request and the delay chain (raw clients beside the handler, in the same rounds) and
    the cold start (against the hello-world). Medians with their IQR, the targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ratios(block: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
        return {name: (block[name]["ratio_median"], *block[name]["ratio_iqr"]) for name in _configurations(block)}

    limit_ms = math.ceil(chain["n"] / chain["k"]) * chain["latency_ms"]

    def efficiency(measured: dict[str, Any]) -> tuple[float, float, float]:
        first, third = measured["wall_iqr_ms"]  # a longer wall is a lower efficiency: the IQR's ends swap
        return limit_ms / measured["wall_ms"], limit_ms / third, limit_ms / first

    efficiencies = {name: efficiency(chain[name]) for name in _configurations(chain)}
    shipped_cold = {name.split(",")[0]: value for name, value in cold["import_ms"].items() if "precompiled" in name}
    panels = [
        (ratios(cpu), 0.5, f"client CPU per request, x raw aiohttp\n(N={cpu['n']}, k={cpu['k']}, 0 ms; target 0.5)"),
        (
            efficiencies,
            0.95,
            f"delay chain: {limit_ms} ms / wall time\n"
            f"(N={chain['n']}, k={chain['k']}, {chain['latency_ms']} ms; target 0.95)",
        ),
        (ratios(shipped_cold), 1.1, "cold start, x a FastAPI + Mangum\nhello-world (sam build; target 1.1)"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4.5))
    for axis, (values, line, title) in zip(axes, panels, strict=True):
        medians, lows, highs = zip(*values.values(), strict=True)
        spreads = [
            [m - low for m, low in zip(medians, lows, strict=True)],
            [h - m for m, h in zip(medians, highs, strict=True)],
        ]
        colours = ["tab:orange" if name.startswith(("handler", "fanout")) else "tab:blue" for name in values]
        axis.barh([_plot_label(name) for name in values], medians, xerr=spreads, color=colours, capsize=3)
        axis.axvline(line, color="black", linestyle="--", linewidth=1)
        axis.set_xlim(0, max(line, *highs) * 1.08)
        axis.invert_yaxis()
        axis.set_title(title, fontsize=10)
        axis.grid(True, axis="x", alpha=0.3)
    axes[1].set_xlim(min(low for _, low, _ in efficiencies.values()) - 0.02, 1.0)
    figure.suptitle("through the real handler (orange) and the raw clients, paired rounds of one run", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _configurations(block: dict[str, Any]) -> list[str]:
    """The configurations measured in a CPU or delay chain block (its other keys are the run's settings)."""
    return [name for name, value in block.items() if isinstance(value, dict) and "ratio_median" in value]


def _plot_label(configuration: str) -> str:
    """`aiohttp+uvloop` as "raw aiohttp, uvloop", `handler+aiohttp` as "handler, aiohttp", "fanout X" as X."""
    if " " in configuration:  # a cold start's function
        return configuration.removeprefix("fanout ")
    if configuration == "handler":
        return "handler (shipped)"
    if configuration == "bare+uvloop":
        return "bare client, uvloop (floor)"
    what, _, how = configuration.partition("+")
    label = what if what == "handler" else f"raw {what}"
    return f"{label}, {how}" if how else label


def politeness_targets(polite: dict[str, Any]) -> list[str]:
    """The issue's promises for politeness, measured."""
    adaptive = [row for row in polite["table"] if row["limiter"] == "adaptive"]
    buckets = [row for row in adaptive if row["kind"].startswith("token bucket")]
    lost = sum(row["lost"] for row in buckets)
    worst_share = max(row["refused_share"] for row in buckets)
    worst_time = max(row["time_s"] / row["ideal_s"] for row in buckets)
    (knee,) = [row for row in adaptive if row["kind"].endswith("ms")]
    costs = polite["healthy"]
    worst_cost = max(row["ratio"] for row in costs)
    return [
        target_row(
            "token buckets of 20-500/s, adaptive: 0 items lost, <= 5 % 429s, time <= 1.2x N/rate",
            f"{lost} lost, {worst_share:.1%} 429s at most, {worst_time:.2f}x at most",
            lost == 0 and worst_share <= 0.05 and worst_time <= 1.2,
        ),
        target_row(
            "latency knee (10 workers): the limit settles near it, not at k",
            f"limit {knee['limit']:.0f} at the end (k=50)",
            knee["limit"] < 50,
        ),
        target_row(
            f"a healthy fast target: the limiter costs < 5 % ({costs[0]['rounds']} paired rounds, "
            f"{costs[0]['pairs']} pairs of processes)",
            ", ".join(f"{row['ratio'] - 1:+.1%}" for row in costs),
            worst_cost < 1.05,
        ),
    ]


def _pacing_cells(row: dict[str, Any]) -> str:
    """The adaptive limiter's throttle episodes and the rate it ended at; dashes for a fixed k (and for runs
    before a943a7a, which did not record them)."""
    if row.get("throttles") is None:
        return "- | -"
    rate = "unpaced" if row["rate_per_s"] is None else f"{row['rate_per_s']:.0f}"
    return f"{row['throttles']} | {rate}"


def politeness_tables(polite: dict[str, Any]) -> list[str]:
    lines = [
        "## Politeness (POST /batch's runner, k=50, 3 attempts, a fresh container per row)",
        "",
        "Upstreams whose capacity the client is not told: token buckets (burst 10, 429 with `Retry-After: 1`), "
        "a knee (10 workers of 20 ms; past them a request queues), a target answering 503 to everything. "
        "`fixed k=50` is the service before politeness.",
        "",
        "| upstream | limiter | items | lost | requests sent | 429/503 share | time s | x ideal | median latency ms "
        "| limit at end | throttle episodes | rate at end /s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in polite["table"]:
        ideal = f"{row['time_s'] / row['ideal_s']:.2f}x" if row["ideal_s"] else "-"
        lines.append(
            f"| {row['kind']} | {row['limiter']} | {row['n']} | {row['lost']} | {row['sent']} | "
            f"{row['refused_share']:.1%} | {row['time_s']:.2f} | {ideal} | {row['median_latency_ms']:.0f} | "
            f"{row['limit']:.0f} | {_pacing_cells(row)} |"
        )
    lines += [
        "",
        "### A healthy, fast target: the adaptive limiter against none",
        "",
        "One warm process per configuration, calls interleaved in shuffled order, in fresh pairs of processes (two "
        "processes of the same code differ by up to some 5 %); ratio = with / without, per round, over all pairs.",
        "",
        "| route | L ms | with limiter ms | without ms | ratio: median (IQR) |",
        "|---|---|---|---|---|",
        *[
            f"| {row['route']} | {row['latency_ms']} | {row['adaptive_ms']:.1f} | {row['fixed_ms']:.1f} | "
            f"{row['ratio']:.3f} ({row['ratio_q1']:.3f}-{row['ratio_q3']:.3f}) |"
            for row in polite["healthy"]
        ],
        "",
    ]
    return lines


def jobs_table(jobs: list[dict[str, Any]]) -> list[str]:
    return [
        "## Jobs through the local stack (`make run`: moto, the event source mapping stand-in, 4 workers)",
        "",
        "Items of 10 ms against the upstream, 1,000 a chunk, 100 in flight per worker; submitted as `fanout jobs "
        "submit` does. Items per second from POST /jobs to the job's end (the split included); the workers' peak "
        "resident memory during the job.",
        "",
        "| items | file MB | upload s | POST /jobs ms | items/s | chunks | worker peak RSS MB "
        "| worker CPU us/item | machine busy |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {row['items']} | {row['file_mb']:.1f} | {row['upload_s']:.2f} | {row['post_ms']:.0f} | "
            f"{row['items_per_s']:.0f} | {row['chunks']} | {row['worker_peak_rss_mb']:.0f} | "
            f"{row['worker_cpu_us_per_item']:.0f} | {row['machine_busy_share']:.0%} |"
            for row in jobs
        ],
        "",
    ]


def cpu_targets(cpu: dict[str, Any], memory: dict[str, Any]) -> list[str]:
    handler = cpu["handler"]["ratio_median"]
    queued = memory.get("heap_bytes_per_queued_request", 0.0) / 1024
    return [
        target_row(
            f"client CPU per request at most 0.5x raw aiohttp (N={cpu['n']}, k={cpu['k']}, paired rounds)",
            f"{handler:.2f}x",
            handler <= 0.5,
        ),
        target_row("heap per queued request at most 0.3 KB (semaphore, k=100)", f"{queued:.2f} KB", queued <= 0.3),
    ]


def cpu_table(cpu: dict[str, Any]) -> list[str]:
    names = _configurations(cpu)
    return [
        f"## Client CPU per request (semaphore, N={cpu['n']}, k={cpu['k']}, 0 ms upstream, {cpu['rounds']} rounds)",
        "",
        "One warm process per configuration; each round runs them in a shuffled order; the ratio is to raw "
        "aiohttp's CPU in the same round.",
        "",
        "| configuration | µs per request (median) | x raw aiohttp: median (IQR) |",
        "|---|---|---|",
        *[
            f"| {name} | {cpu[name]['us_per_request']:.0f} | {cpu[name]['ratio_median']:.2f} "
            f"({cpu[name]['ratio_iqr'][0]:.2f}-{cpu[name]['ratio_iqr'][1]:.2f}) |"
            for name in names
        ],
        "",
        f"Failed requests: {sum(cpu['failed'].values())}.",
        "",
    ]


def chain_target(chain: dict[str, Any] | None, service: list[dict[str, Any]]) -> str:
    """The handler's delay chain: from the interleaved rounds, with raw aiohttp's in the same rounds beside it
    (a run from before them: the median of the handler's calls in the service table)."""
    what = (
        "semaphore N=1000 L=50 k=100 through the real handler (uvloop), as the caller waits: within 5% of"
        " the delay chain"
    )
    if chain is None:
        row = next(r for r in service if (r["path"], r["n"], r["latency_ms"]) == ("Mangum handler", 1000, 50))
        efficiency = math.ceil(row["n"] / row["k"]) * row["latency_ms"] / row["wall_ms"]
        return target_row(what, f"{efficiency:.3f} ({row['wall_ms']:.1f} ms)", efficiency >= 0.95)
    handler, floor = chain["handler"], chain["aiohttp"]
    bare = chain.get("bare+uvloop")  # runs before 11-28 23:40 had no bare client
    return target_row(
        f"{what} ({chain['rounds']} interleaved rounds)",
        f"{handler['efficiency']:.3f} ({handler['wall_ms']:.1f} ms); raw aiohttp {floor['efficiency']:.3f} in the same"
        f" rounds, the handler {handler['ratio_median']:.3f}x its time"
        + (
            f"; the bare client (this machine's floor) {bare['efficiency']:.3f}, the handler"
            f" {handler['efficiency'] / bare['efficiency']:.3f}x its efficiency"
            if bare
            else ""
        ),
        handler["efficiency"] >= 0.95,
    )


def chain_table(chain: dict[str, Any]) -> list[str]:
    names = _configurations(chain)
    limit_ms = math.ceil(chain["n"] / chain["k"]) * chain["latency_ms"]
    return [
        f"## The delay chain (semaphore, N={chain['n']}, k={chain['k']}, {chain['latency_ms']} ms upstream,"
        f" {chain['rounds']} rounds)",
        "",
        f"{chain['n'] // chain['k']} rounds of {chain['k']} requests, each waiting on the one before: at best"
        f" {limit_ms} ms. One warm process per configuration; each round runs them in a shuffled order; the ratio"
        " is to raw aiohttp's wall time in the same round.",
        "",
        "| configuration | wall ms: median (IQR) | efficiency | x raw aiohttp: median (IQR) |",
        "|---|---|---|---|",
        *[
            f"| {name} | {chain[name]['wall_ms']:.1f} ({chain[name]['wall_iqr_ms'][0]:.1f}-"
            f"{chain[name]['wall_iqr_ms'][1]:.1f}) | {chain[name]['efficiency']:.3f} | "
            f"{chain[name]['ratio_median']:.3f} ({chain[name]['ratio_iqr'][0]:.3f}-{chain[name]['ratio_iqr'][1]:.3f}) |"
            for name in names
        ],
        "",
        f"Failed requests: {sum(chain['failed'].values())}.",
        "",
        *_upstream_lateness(chain.get("upstream_late_us")),
    ]


def _guard_iqr(guard: dict[str, Any]) -> str:
    """The wall ratio's quartiles, where the run measured them paired (results of older runs did not)."""
    if "wall_ratio_iqr" not in guard:
        return ""
    first, third = guard["wall_ratio_iqr"]
    return f" (wall IQR {first - 1:+.1%} to {third - 1:+.1%})"


def _upstream_lateness(late_us: dict[str, float] | None) -> list[str]:
    """What the floor leaves out: how late the upstream itself answered (results before it was measured have none)."""
    if late_us is None:
        return []
    return [
        f"The upstream answered {late_us['p50']:.0f} us past the asked delay at the median, {late_us['p99']:.0f} us at"
        " the 99th percentile, counted from when it read the request. It sleeps on the loop's timer to 2 ms before"
        " the deadline, then spins, with its answer made beforehand: on the timer alone it answered up to a"
        " millisecond late, and making the answer after waking took 0.17 ms, both counted against the client.",
        "",
    ]


def write_report(
    rows: list[Any],
    service: list[dict[str, Any]],
    guard: dict[str, float],
    memory: dict[str, Any],
    cold: dict[str, Any],
    machine: dict[str, Any],
    out: Path,
    polite: dict[str, Any] | None = None,
    jobs: list[dict[str, Any]] | None = None,
    cpu: dict[str, Any] | None = None,
    chain: dict[str, Any] | None = None,
) -> None:
    from run import rows_to_json

    write_plot(rows, out / "time_vs_n.png")
    if cpu and chain:
        write_performance_plot(cpu, chain, cold, out / PERFORMANCE_PLOT)
    shipped_cold = {name: v for name, v in cold["import_ms"].items() if name.endswith("(sam build)")}
    cold_ms = max(v["median"] for v in shipped_cold.values())
    handler_overhead = max(r["overhead_ms"] for r in service if r["path"] == "Mangum handler")
    lines = [
        "# Benchmark results",
        "",
        f"One run of `make bench` on {machine['cpus']} CPUs, Python {machine['python']}, {machine['when']}. "
        f"Loopback, tiny JSON bodies; upstream in its own process, {machine.get('cores', 'sharing the cores')}"
        " (jobs and cold start: the whole machine).",
        "",
        "## Targets",
        "",
        *headline(rows),
        target_row(
            f"egress guard costs < 5% at N=1000 (paired, {guard['rounds']} rounds)",
            f"{guard['wall_ratio'] - 1:+.1%} wall, {guard['cpu_ratio'] - 1:+.1%} client CPU{_guard_iqr(guard)}",
            guard["wall_ratio"] < 1.05,
        ),
        target_row(
            "Mangum handler overhead per call < 5 ms", f"{handler_overhead:.2f} ms at most", handler_overhead < 5
        ),
        chain_target(chain, service),
        target_row("cold start from built artifacts < 500 ms", f"{cold_ms:.0f} ms at most", cold_ms < 500),
        target_row(
            f"cold start within 1.1x of a FastAPI + Mangum hello-world (paired, {cold['rounds']} rounds)",
            ", ".join(
                f"{name.split(',')[0].removeprefix('fanout ')} {v['ratio_median']:.2f}x"
                for name, v in shipped_cold.items()
            ),
            max(v["ratio_median"] for v in shipped_cold.values()) <= 1.1,
        ),
        *(politeness_targets(polite) if polite else []),
        *(
            [
                target_row(
                    "jobs through the local stack: 2,000 items/s or more (10 ms requests)",
                    ", ".join(f"{row['items_per_s']:.0f}/s at N={row['items']}" for row in jobs),
                    min(row["items_per_s"] for row in jobs) >= 2000,
                )
            ]
            if jobs
            else []
        ),
        *(cpu_targets(cpu, memory) if cpu else []),
        "",
        *(cpu_table(cpu) if cpu else []),
        *(chain_table(chain) if chain else []),
        f"## Cold start (`import app` from the built artifacts, {cold['rounds']} interleaved rounds)",
        "",
        "| build | import ms: median (min-max) | x hello-world: paired median (IQR) |",
        "|---|---|---|",
        *[
            f"| {name} | {v['median']:.0f} ({v['min']:.0f}-{v['max']:.0f}) | {v['ratio_median']:.2f}x "
            f"({v['ratio_iqr'][0]:.2f}-{v['ratio_iqr'][1]:.2f}) |"
            for name, v in cold["import_ms"].items()
        ],
        "",
        f"Layer: {cold['layer_mb']:.1f} MB unzipped, {cold['layer_zip_mb']:.1f} MB zipped (Lambda allows 250 MB "
        "unzipped for function and layers together).",
        "",
        f"## Memory (gather, {SHIPPED}, fresh process per N)",
        "",
        "| N | peak RSS growth | failed |",
        "|---|---|---|",
        *[f"| {n} | {b / 2**20:.1f} MB | {memory['failed'][n]} |" for n, b in memory["growth_bytes"].items()],
        "",
        f"About {memory['bytes_per_request'] / 1024:.1f} KB per request (slope between the smallest and largest N).",
        "",
        "Semaphore, k=100, 50 ms upstream: heap peak during the call (tracemalloc) "
        + ", ".join(f"N={n}: {b / 2**20:.2f} MB" for n, b in memory.get("queued_heap_bytes", {}).items())
        + f"; about {memory.get('heap_bytes_per_queued_request', 0) / 1024:.2f} KB per queued request "
        "(the engine's k workers take the next index: a queued request is an int, not a waiting task).",
        "",
        f"## Through the service (semaphore, k=100, {SHIPPED} transport)",
        "",
        "| path | N | L ms | wall ms | engine ms | overhead ms per call | calls |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['path']} | {r['n']} | {r['latency_ms']} | {r['wall_ms']:.1f} | {r['engine_ms']:.1f} | "
            f"{r['overhead_ms']:.2f} | {r['calls']} |"
            for r in service
        ],
        "",
        *(politeness_tables(polite) if polite else []),
        *(jobs_table(jobs) if jobs else []),
        "## Strategies x transports",
        "",
        f"`{SHIPPED}` is the shipped transport; `floor` is raw aiohttp without the engine; "
        "`baseline` the naive pattern (a new httpx client per call, "
        "`httpx.get` per request for sync). `tls-cold` is the first call on a new client (every connection "
        "does its TLS handshake); `tls` rows are warm.",
        "",
        *matrix_table(rows),
        "",
        "![time vs N](time_vs_n.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "matrix": rows_to_json(rows),
                "service": service,
                "guard": guard,
                "memory": memory,
                "cold_start": cold,
                "politeness": polite,
                "jobs": jobs,
                "cpu": cpu,
                "chain": chain,
            },
            indent=1,
            default=str,
        )
    )


def rerender(results_json: Path) -> None:
    """Write results.md and the plot again from a run's results.json (no new measurement)."""
    from run import Row

    data = json.loads(results_json.read_text())
    fields = set(Row.__dataclass_fields__)
    rows = [Row(**{key: value for key, value in row.items() if key in fields}) for row in data["matrix"]]
    by_n = [key for key in ("growth_bytes", "failed", "queued_heap_bytes") if key in data["memory"]]
    memory = data["memory"] | {key: {int(n): v for n, v in data["memory"][key].items()} for key in by_n}
    write_report(
        rows,
        data["service"],
        data["guard"],
        memory,
        data["cold_start"],
        data["machine"],
        results_json.parent,
        data.get("politeness"),
        data.get("jobs"),
        data.get("cpu"),
        data.get("chain"),
    )


if __name__ == "__main__":
    import sys

    rerender(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "results.json")
