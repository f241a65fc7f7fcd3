"""Memory per request through the shipped transport: peak RSS growth of one gather call, each N in a
fresh process; and the heap a queued request costs under the semaphore strategy (k=100), where N - k
wait their turn.

Growth is measured from after a small warm-up call to the peak of the big call
(VmHWM), so imports and the pool's connections are not counted; the slope
between sizes is the cost of one more request in flight or queued. The queued cost is
tracemalloc's peak during the call, as a slope between N=1000 and N=5000 (the k in
flight cost the same at both).
"""

from __future__ import annotations

import subprocess
import sys

from servers import http1_upstream

SIZES = [1000, 5000, 10000]
# A probe ends with os._exit once it has printed: pyreqwest's runtime thread can take the GIL while
# the interpreter finalizes ("PyGILState_Release: thread state ... must be current", SIGSEGV, some 5 %
# of exits here, with or without reading bodies), a known hazard of tokio threads in pyo3 extensions.
# Lambda never finalizes the interpreter, so only a short-lived process like this one meets it.
PROBE = """
import asyncio, os, sys
from fanout.engine import Strategy, fan_out
from fanout.settings import Settings
from fanout.transports import make_transport
TRANSPORT = Settings.model_fields["transport"].default  # the shipped one

def peak_rss():
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across fork+exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

async def main(url, n):
    transport = make_transport(TRANSPORT, max_connections=100, timeout_s=10, allow_private=True)
    async def send(_i):
        return (await transport.get_status(url))[0]
    await fan_out(send, n=100, strategy=Strategy.GATHER, concurrency=100, deadline_s=60)
    before = peak_rss()
    result = await fan_out(send, n=n, strategy=Strategy.GATHER, concurrency=100, deadline_s=60)
    after = peak_rss()
    await transport.aclose()
    print(after - before, sum(o.value != 200 for o in result.outcomes), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
os._exit(0)  # not finalizing: see above
"""
QUEUED_SIZES = [1000, 5000]
QUEUED_PROBE = """
import asyncio, os, sys, tracemalloc
from fanout.engine import Strategy, fan_out
from fanout.settings import Settings
from fanout.transports import make_transport
TRANSPORT = Settings.model_fields["transport"].default  # the shipped one

async def main(url, n):
    transport = make_transport(TRANSPORT, max_connections=100, timeout_s=10, allow_private=True)
    async def send(_i):
        return (await transport.get_status(url))[0]
    await fan_out(send, n=200, strategy=Strategy.SEMAPHORE, concurrency=100, deadline_s=60)
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    result = await fan_out(send, n=n, strategy=Strategy.SEMAPHORE, concurrency=100, deadline_s=60)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    await transport.aclose()
    print(peak - before, sum(o.value != 200 for o in result.outcomes), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
os._exit(0)  # not finalizing: see above
"""


def _probe(script: str, url: str, n: int) -> tuple[int, int]:
    """Run a probe in a fresh interpreter: (bytes it measured, requests that failed)."""
    out = subprocess.run([sys.executable, "-c", script, url, str(n)], capture_output=True, text=True, check=True)
    measured, failures = out.stdout.split()
    return int(measured), int(failures)


def _slope(by_n: dict[int, int]) -> float:
    """Bytes per request between the smallest and the largest N."""
    low, high = min(by_n), max(by_n)
    return (by_n[high] - by_n[low]) / (high - low)


def memory_per_request() -> dict[str, object]:
    growth: dict[int, int] = {}
    heap: dict[int, int] = {}
    failed: dict[int, int] = {}
    with http1_upstream() as server:
        url = f"{server.url}/delay?ms=50"
        for n in SIZES:
            growth[n], failed[n] = _probe(PROBE, url, n)
        for n in QUEUED_SIZES:
            heap[n], failures = _probe(QUEUED_PROBE, url, n)
            failed[n] = failed.get(n, 0) + failures
    return {
        "growth_bytes": growth,
        "failed": failed,
        "bytes_per_request": _slope(growth),
        "queued_heap_bytes": heap,
        "heap_bytes_per_queued_request": _slope(heap),
    }


if __name__ == "__main__":
    print(memory_per_request())
