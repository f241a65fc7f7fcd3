"""Jobs through the local stack `make run` starts: items per second, submit latency, worker memory.

One gateway (moto in server mode, the event source mapping stand-in, worker processes
running the real worker handler) against the benchmark's upstream at 10 ms. Two jobs,
20,000 and 200,000 items, submitted as `fanout jobs submit` does (a presigned upload,
then POST /jobs): the time to submit (the upload, and POST /jobs alone), items per
second from submit to the job's end, and the peak resident memory of the worker
processes during each job (flat: a worker holds a chunk, never a job).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fanout_cli.main import Api, upload
from fanout_local.gateway import RunningGateway, running_gateway

SIZES = (20_000, 200_000)
QUICK_SIZES = (20_000,)
LATENCY_MS = 10
PARAMETERS = {
    "ChunkItems": "1000",
    "WorkerMaxConcurrency": "100",
    "WorkerMaximumConcurrency": "4",
    "WorkerBatchSize": "1",
    "LOG_LEVEL": "WARNING",
}


TICKS = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds this machine has spent busy (all cores), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, *_ = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq) / TICKS


def _workers(gateway: RunningGateway) -> dict[int, tuple[int, float]]:
    """Per WorkerFunction process of the gateway: its resident set (KB) and CPU seconds so far."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"WorkerFunction" not in (entry / "cmdline").read_bytes():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != gateway.process.pid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        found[int(entry.name)] = (rss, (int(fields[11]) + int(fields[12])) / TICKS)  # utime + stime
    return found


class _Workers:
    """While a job runs: the workers' peak resident set, and the CPU they and the machine spent."""

    def __init__(self, gateway: RunningGateway) -> None:
        self.gateway = gateway
        self.peak_kb = 0
        self.worker_cpu_s = 0.0
        self.machine_busy_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kb = max([self.peak_kb, *(rss for rss, _ in _workers(self.gateway).values())])

    def __enter__(self) -> _Workers:
        self._cpu_before = {pid: cpu for pid, (_, cpu) in _workers(self.gateway).items()}
        self._busy_before = _machine_busy_s()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        after = _workers(self.gateway)
        self.worker_cpu_s = sum(cpu - self._cpu_before.get(pid, 0.0) for pid, (_, cpu) in after.items())
        self.machine_busy_s = _machine_busy_s() - self._busy_before


def run_job(gateway: RunningGateway, n: int, scratch: Path) -> dict[str, Any]:
    path = scratch / f"items-{n}.jsonl"
    item = {"target": "up", "path": "/delay", "query": {"ms": LATENCY_MS}}
    with path.open("w") as file:
        for i in range(n):
            file.write(json.dumps({"id": f"i{i}", **item}) + "\n")
    api = Api(gateway.url)
    with _Workers(gateway) as workers:
        started = time.perf_counter()
        slot = api.call("POST", "jobs/uploads")
        upload(slot["upload_url"], path)
        uploaded = time.perf_counter()
        job_id = api.call("POST", "jobs", {"upload_id": slot["upload_id"]})["job_id"]
        submitted = time.perf_counter()
        while not (job := api.call("GET", f"jobs/{job_id}")).get("finished_at"):
            time.sleep(0.25)
        ended = time.perf_counter()
    assert (job["status"], job["succeeded"]) == ("succeeded", n), job
    row = {
        "items": n,
        "upload_s": uploaded - started,
        "post_ms": (submitted - uploaded) * 1000,
        "run_s": ended - submitted,
        "items_per_s": n / (ended - submitted),
        "chunks": job["chunks"],
        "worker_peak_rss_mb": workers.peak_kb / 1024,
        "worker_cpu_us_per_item": workers.worker_cpu_s / n * 1e6,
        "machine_busy_share": workers.machine_busy_s / (ended - started) / (os.cpu_count() or 1),
        "file_mb": path.stat().st_size / 2**20,
    }
    print(
        f"jobs     N={n:<7} upload {row['upload_s']:.2f} s, POST /jobs {row['post_ms']:.0f} ms, "
        f"{row['items_per_s']:.0f} items/s, worker peak RSS {row['worker_peak_rss_mb']:.0f} MB, "
        f"worker CPU {row['worker_cpu_us_per_item']:.0f} us/item, machine {row['machine_busy_share']:.0%} busy",
        flush=True,
    )
    return row


def jobs_through_the_local_stack(upstream_url: str, *, quick: bool) -> list[dict[str, Any]]:
    upstreams = json.dumps({"up": {"url": upstream_url, "allow_http": True}})
    parameters = {"TargetUrl": f"{upstream_url}/delay", "Upstreams": upstreams, **PARAMETERS}
    rows = []
    with tempfile.TemporaryDirectory() as scratch, running_gateway(parameters) as gateway:
        run_job(gateway, 2_000, Path(scratch))  # warm: the workers' cold starts are not the jobs' doing
        for n in QUICK_SIZES if quick else SIZES:
            rows.append(run_job(gateway, n, Path(scratch)))
    return rows
