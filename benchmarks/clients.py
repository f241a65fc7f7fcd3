"""The real handler against raw clients: one warm process each, interleaved rounds, paired ratios.

One process per configuration, all alive at once; each round runs every
configuration once in a shuffled order, and a configuration's figure in a round is
divided by raw aiohttp's in the same round, so drift on this shared machine hits
both sides of a ratio alike. Reported: the median and the interquartile range of
those ratios, and the medians themselves. Two measurements, semaphore, k=100,
against an upstream in its own process (its CPU is not counted):
- client CPU per request: N=2000, a 0 ms upstream;
- the delay chain: N=1000, a 50 ms upstream, so ten rounds of 100 requests, each
  round waiting on the one before; the wall time as the caller waits, against
  ceil(N/k) x 50 ms.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

from paired import paired_ratio

ROOT = Path(__file__).resolve().parents[1]
K, ROUNDS = 100, 15
CPU_N = 2000
CHAIN_N, CHAIN_LATENCY_MS = 1000, 50
#: "handler" is the function as shipped (pyreqwest on uvloop: fanout.transports, fanout.lambda_loop);
#: "handler+aiohttp" the same on the aiohttp transport, "handler+asyncio" on asyncio's own loop. The raw
#: clients have no engine and no guard: a semaphore of k over a gather of n.
#: aiosonic is the candidate that lost to pyreqwest (its connector takes a resolver, so the guard would fit).
CONFIGURATIONS = [
    "aiohttp",
    "aiohttp+uvloop",
    "aiosonic+uvloop",
    "pyreqwest+uvloop",
    "handler",
    "handler+aiohttp",
    "handler+asyncio",
]
#: The delay chain: the shipped handler, its other transport, and the raw clients it is measured against;
#: "bare+uvloop" is benchmarks/bare_http.py, the floor of any client on this machine.
CHAIN_CONFIGURATIONS = ["aiohttp", "aiohttp+uvloop", "pyreqwest+uvloop", "bare+uvloop", "handler", "handler+aiohttp"]

#: A configuration's process: warm up, then one round per line on stdin; answers on lines that begin
#: with "@@" (the handler's own log and metric lines share stdout, as on Lambda).
WORKER = """
import asyncio, copy, importlib.util, json, os, sys, time
name, url, n, k, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if name.endswith("+uvloop"):
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

if name == "handler+asyncio":
    import fanout.lambda_loop

    def on_asyncio_loop():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        return loop

    fanout.lambda_loop.install_event_loop = on_asyncio_loop

if name.startswith("handler"):
    os.environ.update({"FANOUT_TARGET_URL": url, "FANOUT_MAX_CONCURRENCY": str(k), "FANOUT_ROUTES": "async_sem",
                       "FANOUT_MAX_REQUESTS": str(n), "FANOUT_ALLOW_PRIVATE_NETWORKS": "true"})
    if name == "handler+aiohttp":
        os.environ["FANOUT_TRANSPORT"] = "aiohttp"
    sys.path.insert(0, os.path.join(root, "local"))
    from fanout_local.worker import LocalContext
    spec = importlib.util.spec_from_file_location("entry", os.path.join(root, "functions/api/app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    event = json.load(open(os.path.join(root, "events/async_sem-http-api-v2.json")))
    event["rawPath"] = event["requestContext"]["http"]["path"] = f"/async_sem/{n}/{k}"
    event["pathParameters"] = {"n": str(n), "k": str(k)}

    def one_round():
        response = module.handler(copy.deepcopy(event), LocalContext(function_name="bench", timeout_s=60))
        if response["statusCode"] != 200:
            sys.exit(f"the handler answered {response['statusCode']}: {response['body'][:300]}")
        return json.loads(response["body"])["failed"]
else:
    # A raw client: `open_client()` once, then `get()` per request; a semaphore of k over a gather of n.
    if name.startswith("aiosonic"):
        import aiosonic
        from aiosonic.pools import PoolConfig

        def open_client():
            return aiosonic.HTTPClient(aiosonic.TCPConnector(pool_configs={":default": PoolConfig(size=k)}))

        async def get(client):
            response = await client.get(url)
            await response.content()
            return response.status_code
    elif name.startswith("bare"):
        sys.path.insert(0, os.path.join(root, "benchmarks"))
        from bare_http import BareClient

        def open_client():
            return BareClient(url)

        async def get(client):
            return await client.get()
    elif name.startswith("pyreqwest"):
        from pyreqwest.client import ClientBuilder

        def open_client():
            return ClientBuilder().max_connections(k).build()

        async def get(client):
            response = await client.get(url).build().send()
            await response.bytes()
            return response.status
    else:
        import aiohttp

        def open_client():
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=k))

        async def get(client):
            async with client.get(url) as response:
                await response.read()
                return response.status

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    client = None

    async def call():
        global client
        client = client or open_client()
        limit = asyncio.Semaphore(k)

        async def bounded():
            async with limit:
                return await get(client)

        statuses = await asyncio.gather(*(bounded() for _ in range(n)))
        return sum(1 for s in statuses if s != 200)

    def one_round():
        return loop.run_until_complete(call())

one_round()
print("@@ ready", flush=True)
for _ in sys.stdin:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    failed = one_round()
    print("@@", time.process_time() - cpu0, time.perf_counter() - wall0, failed, flush=True)
if not name.startswith("handler"):
    loop.run_until_complete(client.aclose() if name.startswith("aiosonic") else client.close())
"""


def _answer(process: subprocess.Popen[str]) -> list[str]:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("@@"):
            return line.split()[1:]
    raise RuntimeError(f"a configuration's process ended (exit {process.wait()})")


def _interleaved(
    url: str, n: int, configurations: list[str], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """CPU seconds and wall seconds per round of each configuration, and its failed requests in all."""
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", WORKER, name, url, str(n), str(K), str(ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in configurations
    }
    cpu: dict[str, list[float]] = {name: [] for name in configurations}
    wall: dict[str, list[float]] = {name: [] for name in configurations}
    failed = dict.fromkeys(configurations, 0)
    try:
        for process in processes.values():
            assert _answer(process) == ["ready"]
        for _ in range(rounds):
            for name in random.sample(configurations, len(configurations)):
                process = processes[name]
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
                cpu_s, wall_s, failures = _answer(process)
                cpu[name].append(float(cpu_s))
                wall[name].append(float(wall_s))
                failed[name] += int(failures)
    finally:
        for process in processes.values():
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=30)
    return cpu, wall, failed


def cpu_per_request(upstream_url: str, *, rounds: int = ROUNDS) -> dict[str, object]:
    cpu, _, failed = _interleaved(f"{upstream_url}/delay?ms=0", CPU_N, CONFIGURATIONS, rounds)
    out: dict[str, object] = {"n": CPU_N, "k": K, "rounds": rounds, "failed": failed}
    for name in CONFIGURATIONS:
        ratio, first, third = paired_ratio(cpu[name], cpu["aiohttp"])
        out[name] = {
            "us_per_request": statistics.median(cpu[name]) / CPU_N * 1e6,
            "ratio_median": ratio,
            "ratio_iqr": [first, third],
        }
        print(f"cpu {name:<16} {statistics.median(cpu[name]) / CPU_N * 1e6:6.0f} us/req  {ratio:.2f}x")
    return out


def delay_chain(upstream_url: str, *, rounds: int = ROUNDS) -> dict[str, object]:
    url = f"{upstream_url}/delay?ms={CHAIN_LATENCY_MS}"
    _, wall, failed = _interleaved(url, CHAIN_N, CHAIN_CONFIGURATIONS, rounds)
    limit_s = math.ceil(CHAIN_N / K) * CHAIN_LATENCY_MS / 1000
    out: dict[str, object] = {"n": CHAIN_N, "k": K, "latency_ms": CHAIN_LATENCY_MS, "rounds": rounds, "failed": failed}
    for name in CHAIN_CONFIGURATIONS:
        ratio, first, third = paired_ratio(wall[name], wall["aiohttp"])
        median_s = statistics.median(wall[name])
        out[name] = {
            "wall_ms": median_s * 1000,
            "wall_iqr_ms": [q * 1000 for q in statistics.quantiles(wall[name], n=4)[::2]],
            "efficiency": limit_s / median_s,
            "ratio_median": ratio,
            "ratio_iqr": [first, third],
        }
        print(f"chain {name:<16} {median_s * 1000:6.1f} ms  efficiency {limit_s / median_s:.3f}  {ratio:.3f}x")
    # how late the upstream answered, past the 50 ms asked: what the floor above leaves out
    with urllib.request.urlopen(f"{upstream_url}/stats", timeout=10) as answer:
        out["upstream_late_us"] = json.load(answer)["delay_late_us"]
    print(f"chain upstream late by {out['upstream_late_us']} us")
    return out


if __name__ == "__main__":
    from servers import http1_upstream, on_cores, split_cores

    cores = split_cores()
    with on_cores(None if cores is None else cores.client):  # as run.py: the upstreams on a core of their own
        with http1_upstream() as server:
            print(cpu_per_request(server.url, rounds=4))
        with http1_upstream(exact_delays=True) as server:
            print(delay_chain(server.url, rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 4))
