"""Jobs end to end on the local stack `make run` starts: the gateway, moto in server mode, the event
source mapping stand-in, worker processes running the real worker handler, and the `fanout` CLI.

What the issue asks to prove: a job of 20,000 items ends `succeeded` with every id once;
a worker killed in the middle of a chunk loses nothing and does nothing twice (its
message comes back after the visibility timeout); a chunk that keeps failing lands in
the dead-letter queue and the job ends `failed` with those items reported, never
stuck in `running`; a cancelled job stops starting chunks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from fanout.jobs.messages import RunChunk, encode
from fanout.jobs.store import JobStore
from fanout_cli.main import Api
from fanout_local.gateway import RunningGateway, running_gateway
from fanout_local.upstream import LocalUpstream, running_in_thread

ROOT = Path(__file__).resolve().parents[1]
#: Short leases and visibility so that what comes back does so in seconds (the template's are minutes).
FAST = {
    "WorkerTimeoutSeconds": "3",
    "ChunkVisibilityTimeoutSeconds": "18",
    "ChunkMaxReceives": "2",
    "WorkerMaximumConcurrency": "2",
    "WorkerBatchSize": "1",
}


@pytest.fixture(scope="module")
def target() -> Iterator[LocalUpstream]:
    with running_in_thread(delay_ms=10) as server:
        yield server


def start(target: LocalUpstream, **parameters: str) -> Any:
    upstreams = json.dumps({"up": {"url": target.url, "allow_http": True}})
    defaults = {"TargetUrl": f"{target.url}/delay", "Upstreams": upstreams, "LOG_LEVEL": "WARNING"}
    return running_gateway({**defaults, **parameters})


@pytest.fixture(scope="module")
def stack(target: LocalUpstream) -> Iterator[RunningGateway]:
    with start(target, ChunkItems="500", WorkerMaxConcurrency="100", WorkerMaximumConcurrency="4") as gateway:
        yield gateway


def items(n: int, *, ms: int = 10, prefix: str = "i") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "target": "up", "path": "/delay", "query": {"ms": ms}} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fanout(gateway: RunningGateway, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `fanout` command against this gateway."""
    return subprocess.run(
        [sys.executable, "-m", "fanout_cli.main", "--api", gateway.url, *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def wait_for_end(gateway: RunningGateway, job_id: str, timeout_s: float) -> dict[str, Any]:
    api = Api(gateway.url)
    ends = time.monotonic() + timeout_s
    while time.monotonic() < ends:
        job = api.call("GET", f"jobs/{job_id}")
        if job.get("finished_at"):
            return dict(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s: {job}")


def result_ids(gateway: RunningGateway, job_id: str, tmp_path: Path) -> Counter[str]:
    out = tmp_path / f"{job_id}.jsonl"
    done = fanout(gateway, "jobs", "results", job_id, "-o", str(out))
    assert done.returncode == 0, done.stderr
    return Counter(json.loads(line)["id"] for line in out.read_text().splitlines())


def test_a_job_of_20000_items_ends_with_every_id_once(stack: RunningGateway, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "items.jsonl", items(20_000))
    done = fanout(stack, "jobs", "submit", str(path), "--wait")
    assert done.returncode == 0, done.stderr
    job_id, summary = done.stdout.splitlines()
    assert json.loads(summary) == {"status": "succeeded", "total": 20000, "succeeded": 20000, "failed": 0, "skipped": 0}
    ids = result_ids(stack, job_id, tmp_path)
    assert set(ids.values()) == {1}
    assert set(ids) == {f"i{i}" for i in range(20_000)}
    job = Api(stack.url).call("GET", f"jobs/{job_id}")
    assert job["targets"]["up"]["requests"] == 20_000 and job["chunks"] == 40


def test_bad_input_is_a_4xx_at_submit_or_an_items_error(stack: RunningGateway, tmp_path: Path) -> None:
    api = Api(stack.url)
    with pytest.raises(SystemExit, match=r"422\).*unknown target"):
        api.call("POST", "jobs", {"requests": [{"id": "a", "target": "nowhere"}]})
    lines = [json.dumps(row) for row in items(3)]
    lines[1] = '{"id": "broken", "target": '  # cut short
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    done = fanout(stack, "jobs", "submit", str(path), "--wait")
    job_id = done.stdout.splitlines()[0]
    job = wait_for_end(stack, job_id, 60)
    assert (job["status"], job["succeeded"], job["failed"]) == ("succeeded", 2, 1)
    assert done.returncode == 0  # the job succeeded: an item's error is a result, not the job's failure
    out = tmp_path / "mixed-results.jsonl"
    fanout(stack, "jobs", "results", job_id, "-o", str(out))
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["id"], row.get("error", {}).get("type")) for row in results] == [
        ("i0", None),
        ("line 2", "InvalidItem"),
        ("i2", None),
    ]


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain", None]
)
def test_an_upload_is_kept_as_sent_whatever_its_content_type(
    content_type: str | None, stack: RunningGateway, tmp_path: Path
) -> None:
    """S3 keeps a PUT's bytes whatever its Content-Type says; `curl --data-binary` says a form. Through moto
    that upload was an empty file (a job of none of its items) and, past a byte that is not UTF-8, a PUT
    that never answered."""
    api = Api(stack.url)
    upload = api.call("POST", "jobs/uploads")
    data = "".join(json.dumps(row) + "\n" for row in items(3)).encode() + b'{"id": "caf\xe9"}\n'
    headers = {} if content_type is None else {"content-type": content_type}
    put = urllib.request.Request(upload["upload_url"], data=data, method="PUT", headers=headers)
    with urllib.request.urlopen(put, timeout=10) as answer:
        assert answer.status == 200
    job_id = api.call("POST", "jobs", {"upload_id": upload["upload_id"]})["job_id"]
    job = wait_for_end(stack, job_id, 60)
    assert (job["status"], job["total"], job["succeeded"], job["failed"]) == ("succeeded", 4, 3, 1)


def test_a_cancelled_job_stops_starting_chunks(target: LocalUpstream, tmp_path: Path) -> None:
    with start(target, ChunkItems="10", WorkerMaxConcurrency="5", **FAST) as gateway:
        api = Api(gateway.url)
        job_id = api.call("POST", "jobs", {"requests": items(200, ms=300, prefix="c")})["job_id"]
        time.sleep(1.5)  # about 4 of its 20 chunks have run (2 workers, 0.6 s a chunk)
        assert api.call("DELETE", f"jobs/{job_id}")["status"] == "cancelled"
        job = wait_for_end(gateway, job_id, 60)
        assert job["status"] == "cancelled"
        assert job["succeeded"] + job["failed"] + job["skipped"] == 200
        assert job["skipped"] >= 100  # most chunks had not started
        assert job["targets"]["up"]["requests"] == job["succeeded"]
        ids = result_ids(gateway, job_id, tmp_path)
        assert set(ids.values()) == {1} and len(ids) == 200


def worker_processes(gateway: RunningGateway) -> list[int]:
    """The WorkerFunction containers of this gateway (its child processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == gateway.process.pid and b"WorkerFunction" in command:
            found.append(int(entry.name))
    return found


def test_a_worker_killed_mid_chunk_loses_nothing_and_does_nothing_twice(target: LocalUpstream, tmp_path: Path) -> None:
    with start(target, ChunkItems="4", WorkerMaxConcurrency="4", **FAST) as gateway:
        api = Api(gateway.url)
        before = target.stats.requests
        job_id = api.call("POST", "jobs", {"requests": items(16, ms=1000, prefix="k")})["job_id"]
        ends = time.monotonic() + 20
        while target.stats.in_flight == 0 and time.monotonic() < ends:
            time.sleep(0.05)
        assert target.stats.in_flight > 0, "no chunk started"
        victims = worker_processes(gateway)
        assert victims
        os.kill(victims[0], signal.SIGKILL)  # mid-chunk: its requests are in flight
        job = wait_for_end(gateway, job_id, 90)
        assert (job["status"], job["succeeded"], job["failed"]) == ("succeeded", 16, 0)
        ids = result_ids(gateway, job_id, tmp_path)
        assert set(ids.values()) == {1} and len(ids) == 16
        # The killed chunk's requests were sent again (an upstream sees at least once); nothing else was.
        assert 16 < target.stats.requests - before <= 16 + 4


def test_a_chunk_that_always_fails_ends_in_the_dead_letter_queue_and_the_job_fails(
    target: LocalUpstream, tmp_path: Path
) -> None:
    fail_fast = {**FAST, "WorkerTimeoutSeconds": "1", "ChunkVisibilityTimeoutSeconds": "6"}
    with start(target, **fail_fast) as gateway:
        assert gateway.aws_url is not None
        aws = {
            "endpoint_url": gateway.aws_url,
            "region_name": "us-east-1",
            "aws_access_key_id": "local",
            "aws_secret_access_key": "local",
        }
        store = JobStore(boto3.client("dynamodb", **aws), "fanout-local-JobsTable", retention_days=1)
        job_id = "d" * 32
        now = int(time.time() * 1000)
        store.create(job_id, input_key="jobs/missing/items.jsonl", spec={}, now_ms=now)
        store.start(job_id, now)
        store.split_done(job_id, total=3, chunks=1, now_ms=now)
        sqs = boto3.client("sqs", **aws)
        queue = sqs.get_queue_url(QueueName="fanout-local-ChunkQueue")["QueueUrl"]
        chunk = RunChunk(job_id=job_id, index=0, key="jobs/missing/items.jsonl", start=0, end=99, first_line=1, items=3)
        sqs.send_message(QueueUrl=queue, MessageBody=encode(chunk))  # its input does not exist: it always fails

        job = wait_for_end(gateway, job_id, 90)
        assert (job["status"], job["failed"], job["total"]) == ("failed", 3, 3)
        ids = result_ids(gateway, job_id, tmp_path)
        assert set(ids) == {"chunk 0 item 1", "chunk 0 item 2", "chunk 0 item 3"}
