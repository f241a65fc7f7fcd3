"""Through the service: the real Mangum handler with API Gateway events, and `make run`'s gateway.

Overhead per call = wall time around the call minus the engine's own
`elapsed_ms` reported in the same response, so it is exactly what FastAPI,
Mangum and JSON (and, for the gateway, two local HTTP hops) add to one call.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from servers import Server

from fanout_local.gateway import running_gateway
from fanout_local.worker import LocalContext

ROOT = Path(__file__).resolve().parents[1]
CALLS = {10: 30, 1000: 9}


def _load_handler(target_url: str, concurrency: int) -> Any:
    os.environ.update(
        {
            "FANOUT_TARGET_URL": target_url,
            "FANOUT_MAX_CONCURRENCY": str(concurrency),
            "FANOUT_ALLOW_PRIVATE_NETWORKS": "true",
        }
    )
    spec = importlib.util.spec_from_file_location(f"bench_entry_{time.monotonic_ns()}", ROOT / "functions/api/app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.handler


def _event(n: int, k: int) -> dict[str, Any]:
    event = copy.deepcopy(json.loads((ROOT / "events/async_sem-http-api-v2.json").read_text()))
    path = f"/async_sem/{n}/{k}"
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["pathParameters"] = {"n": str(n), "k": str(k)}
    return event


def _summary(walls: list[float], engines: list[float]) -> dict[str, float]:
    overheads = [wall - engine for wall, engine in zip(walls, engines, strict=True)]
    return {
        "wall_ms": statistics.median(walls),
        "engine_ms": statistics.median(engines),
        "overhead_ms": statistics.median(overheads),
        "calls": len(walls),
    }


def via_handler(server: Server, n: int, latency_ms: int) -> dict[str, float]:
    handler = _load_handler(f"{server.url}/delay?ms={latency_ms}", 100)
    event = _event(n, 100)
    handler(event, LocalContext(function_name="bench", timeout_s=30))  # warm-up: the cold start opens the pool
    walls, engines = [], []
    for _ in range(CALLS[n]):
        started = time.perf_counter()
        response = handler(event, LocalContext(function_name="bench", timeout_s=30))
        walls.append((time.perf_counter() - started) * 1000)
        body = json.loads(response["body"])
        assert body["succeeded"] == n, body
        engines.append(body["elapsed_ms"])
    return _summary(walls, engines)


def via_gateway(server: Server, n: int, latency_ms: int) -> dict[str, float]:
    parameters = {"TargetUrl": f"{server.url}/delay?ms={latency_ms}", "SemaphoreMaxConcurrency": "100"}
    with running_gateway(parameters) as gateway:
        url = f"{gateway.url}/async_sem/{n}/100"
        urllib.request.urlopen(url).read()  # warm-up
        walls, engines = [], []
        for _ in range(CALLS[n]):
            started = time.perf_counter()
            body = json.loads(urllib.request.urlopen(url).read())
            walls.append((time.perf_counter() - started) * 1000)
            engines.append(body["elapsed_ms"])
        return _summary(walls, engines)


def through_service(server: Server, ns: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in ns:
        for latency in (0, 50):
            for path, measure in (("Mangum handler", via_handler), ("local gateway", via_gateway)):
                row = {"path": path, "n": n, "latency_ms": latency, "k": 100, **measure(server, n, latency)}
                print(
                    f"service  {path:<15} N={n:<5} L={latency:<3} overhead {row['overhead_ms']:.2f} ms",
                    flush=True,
                )
                rows.append(row)
    return rows
