"""Jobs, piece by piece, against moto in-process (S3, SQS, DynamoDB) and the test upstream on 127.0.0.1.

The split, a chunk's claim and record, redelivery, leases, the dead-letter queue, the
end of a job and its manifest, cancelling; the worker's handler with SQS events (the
event file of events/ included) and the jobs routes through the real handler. The
local stack and the whole path end to end are test_jobs_local.py's.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import math
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from botocore.exceptions import ClientError
from hypothesis import example, given
from hypothesis import strategies as st
from moto import mock_aws

from conftest import INPUT, REGION, RESULTS, ROOT, TABLE, create_resources, lambda_context, load_event
from fanout import install_event_loop
from fanout.batch import BatchRunner, ItemReport
from fanout.batch_api import ALLOWED_HEADERS
from fanout.batch_response import item_line
from fanout.jobs import split as split_module
from fanout.jobs.ceilings import JobCeilings
from fanout.jobs.chunk import CHUNK_FAILED, INVALID_ITEM, ChunkBusy, ChunkContext, bury_chunk, finish_if_done, run_chunk
from fanout.jobs.files import JobFiles, Line, bounded_lines, inline_key, s3_client
from fanout.jobs.messages import RunChunk, SplitInput, decode, encode
from fanout.jobs.split import SplitQueue, split_input
from fanout.jobs.store import ChunkCounts, Claim, JobStore, is_write_conflict
from fanout.jobs.worker import lambda_memory_mb
from fanout.politeness import Politeness
from fanout.settings import Settings
from fanout.transports import UpstreamResponse, make_transport
from fanout_local.upstream import LocalUpstream

LINE_CAP = 1024  # FANOUT_MAX_BODY_BYTES of the workers here: the longest line of an input (its least)


def one_dynamodb_request_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process moto, with each DynamoDB request atomic as on AWS: what
    fanout_local.stack.OneDynamoDBRequestAtATime does for moto's server (the worker commits
    chunks from threads, and moto alone can lose or undo one of two concurrent updates)."""
    from moto.core.botocore_stubber import BotocoreStubber

    lock = threading.Lock()
    process = BotocoreStubber.process_request

    def one_at_a_time(stubber: BotocoreStubber, request: Any) -> Any:
        target = request.headers.get("X-Amz-Target", b"")
        if not (target.decode() if isinstance(target, bytes) else target).startswith("DynamoDB_"):
            return process(stubber, request)
        with lock:
            return process(stubber, request)

    monkeypatch.setattr(BotocoreStubber, "process_request", one_at_a_time)


def commit_chunks_at_once(dynamodb: Callable[[], Any], chunks: int) -> tuple[int, int, int]:
    """`chunks` chunks of one job committed from as many threads, each also tried by an attempt
    that no longer holds it (a cancelled transaction): (chunks_done, succeeded, chunks in state done)."""
    store = JobStore(dynamodb(), TABLE, retention_days=1)
    now = int(time.time() * 1000)
    store.create("j" * 32, input_key="k", spec={}, now_ms=now)
    for index in range(chunks):
        assert store.claim("j" * 32, index, attempt=f"a{index}", lease_ms=60_000, now_ms=now) is Claim.CLAIMED

    def commit(index: int) -> None:
        own = JobStore(dynamodb(), TABLE, retention_days=1)
        for attempt in (f"a{index}", "lost-its-lease"):
            own.commit("j" * 32, index, attempt=attempt, results_key="r", counts=ChunkCounts(succeeded=1), now_ms=now)

    threads = [threading.Thread(target=commit, args=(index,)) for index in range(chunks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    job = store.get("j" * 32)
    assert job is not None
    done = sum(chunk["state"] == "done" for chunk in store.chunks("j" * 32))
    return int(job["chunks_done"]), int(job["succeeded"]), done


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    one_dynamodb_request_at_a_time(monkeypatch)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield create_resources()


def test_chunks_that_finish_together_are_each_counted_once_in_process(aws: dict[str, str]) -> None:
    assert commit_chunks_at_once(lambda: boto3.client("dynamodb", region_name=REGION), 40) == (40, 40, 40)


def test_chunks_that_finish_together_are_each_counted_once_on_the_local_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same boto3 code against the moto server `make run` starts (a job stuck in `running` otherwise)."""
    from fanout_local.stack import LocalStack

    stack = LocalStack()
    stack.start()
    try:
        for name, value in stack.environment().items():
            monkeypatch.setenv(name, value)
        create_resources()
        assert commit_chunks_at_once(lambda: boto3.client("dynamodb", region_name=REGION), 40) == (40, 40, 40)
    finally:
        stack.stop()


def settings_for(upstream: LocalUpstream, aws: dict[str, str], **more: Any) -> Settings:
    return Settings(
        upstreams={"up": {"url": upstream.url, "allow_http": True}},
        allow_private_networks=True,
        max_concurrency=20,
        jobs_table=TABLE,
        input_bucket=INPUT,
        results_bucket=RESULTS,
        chunk_queue_url=aws["chunks"],
        dead_letter_queue_arn=aws["dead_arn"],
        max_body_bytes=LINE_CAP,
        **more,
    )


def store() -> JobStore:
    return JobStore(boto3.client("dynamodb", region_name=REGION), TABLE, retention_days=7)


def files() -> JobFiles:
    return JobFiles(boto3.client("s3", region_name=REGION), input_bucket=INPUT, results_bucket=RESULTS, url_ttl_s=600)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One loop for the test, as a worker container has: its pooled client lives on it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def chunks_on(aws: dict[str, str], upstream: LocalUpstream, loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """`chunks_on(coroutine function, message, **kwargs)`: run it with a worker's chunk context, on `loop`."""
    transport = make_transport("aiohttp", max_connections=20, timeout_s=5, allow_private=True)
    politeness = Politeness(ceiling=20)
    runner = BatchRunner(transport, max_attempts=2, max_item_bytes=4096, rate_per_s=0, politeness=politeness)
    context = ChunkContext(
        settings=settings_for(upstream, aws),
        store=store(),
        files=files(),
        runner=runner,
        politeness=politeness,
        lease_s=30,
    )

    def go(step: Any, message: Any, **kwargs: Any) -> Any:
        return loop.run_until_complete(step(message, context, **kwargs))

    go.context = context  # type: ignore[attr-defined]
    yield go
    loop.run_until_complete(transport.aclose())


def item(i: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"i{i}", "target": "up", "path": "/delay", "query": {"ms": 1}, **fields}


def new_job(lines: list[str], *, job_id: str = "0" * 32, spec: dict[str, Any] | None = None) -> str:
    files().put_input(inline_key(job_id), ("\n".join(lines) + "\n").encode())
    store().create(job_id, input_key=inline_key(job_id), spec=spec or {}, now_ms=int(time.time() * 1000))
    return job_id


def queued(queue_url: str) -> list[Any]:
    sqs = boto3.client("sqs", region_name=REGION)
    found = []
    while batch := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
        for message in batch:
            found.append(decode(message["Body"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return found


def split(
    job_id: str, aws: dict[str, str], *, chunk_items: int = 3, max_items: int = 1000, max_line_bytes: int = LINE_CAP
) -> list[RunChunk]:
    split_input(
        SplitInput(job_id=job_id, key=inline_key(job_id)),
        store=store(),
        files=files(),
        queue=SplitQueue(boto3.client("sqs", region_name=REGION), aws["chunks"]),
        chunk_items=chunk_items,
        max_items=max_items,
        max_line_bytes=max_line_bytes,
        now_ms=lambda: int(time.time() * 1000),
    )
    return [message for message in queued(aws["chunks"]) if isinstance(message, RunChunk)]


def results_of(job_id: str) -> list[dict[str, Any]]:
    s3 = boto3.client("s3", region_name=REGION)
    manifest = json.loads(s3.get_object(Bucket=RESULTS, Key=f"results/{job_id}/manifest.json")["Body"].read())
    lines: list[dict[str, Any]] = []
    for chunk in manifest["chunks"]:
        body = s3.get_object(Bucket=RESULTS, Key=chunk["key"])["Body"].read().decode()
        lines += [json.loads(line) for line in body.splitlines()]
    return lines


# --- messages -------------------------------------------------------------------------------------------


def test_messages_round_trip_and_refuse_what_is_not_ours() -> None:
    chunk = RunChunk(job_id="j", index=3, key="k", start=10, end=90, first_line=7, items=5)
    assert decode(encode(chunk)) == chunk
    assert decode(encode(SplitInput(job_id="j", key="k"))) == SplitInput(job_id="j", key="k")
    for body in ("", "[]", '{"kind": "other"}', '{"kind": "chunk", "job_id": "j"}', '{"kind": "split", "x": 1}'):
        with pytest.raises(ValueError, match="not a chunk queue message"):
            decode(body)


# --- reading input files ------------------------------------------------------------------------------------


def reference_lines(data: bytes, cap: int, offset: int = 0) -> list[Line]:
    """What bounded_lines must give: each line of `data` (the last may lack its newline), None past the cap."""
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()  # the newline ended the last line; nothing follows it
    lines = []
    for piece in pieces:
        lines.append(Line(offset, len(piece), piece if len(piece) <= cap else None))
        offset += len(piece) + 1
    return lines


@given(
    data=st.lists(st.sampled_from([b"a", b"bc", b" ", b"\n", b"\n\n", b"xyz" * 5]), max_size=60).map(b"".join),
    cuts=st.lists(st.integers(0, 300), max_size=8),
    cap=st.integers(0, 20),
    offset=st.integers(0, 10**9),
)
def test_lines_come_out_whole_with_their_offsets_or_counted_past_the_cap(
    data: bytes, cuts: list[int], cap: int, offset: int
) -> None:
    edges = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    blocks = [data[start:end] for start, end in itertools.pairwise(edges)]
    assert list(bounded_lines(blocks, cap, offset=offset)) == reference_lines(data, cap, offset)


def test_a_line_of_any_length_costs_a_block_and_a_line_cap_of_memory() -> None:
    """A 64 MB input with no newline (an upload may be 5 GB of it): counted as it streams past, never
    held, and never copied whole once per block (which made the split quadratic)."""
    block = 1 << 20

    def blocks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * block
        yield b"\n" + b"y" * 10

    tracemalloc.start()
    try:
        lines = list(bounded_lines(blocks(), 1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines == [Line(0, 64 * block, None), Line(64 * block + 1, 10, b"y" * 10)]
    assert peak < 5 * block


# --- the split ----------------------------------------------------------------------------------------------


def test_the_split_covers_every_line_once_in_ranges_of_whole_lines(aws: dict[str, str]) -> None:
    lines = [json.dumps(item(i)) for i in range(8)]
    lines.insert(4, "   ")  # a blank line is no item, but keeps its number
    job_id = new_job(lines)
    chunks = split(job_id, aws)

    data = boto3.client("s3", region_name=REGION).get_object(Bucket=INPUT, Key=inline_key(job_id))["Body"].read()
    assert [chunk.index for chunk in chunks] == [0, 1, 2]
    assert [chunk.items for chunk in chunks] == [3, 3, 2]
    assert [chunk.first_line for chunk in chunks] == [1, 4, 8]
    assert b"".join(data[c.start : c.end] for c in chunks).split(b"\n")[:-1] == [line.encode() for line in lines]
    job = store().get(job_id)
    assert job is not None
    assert (job["status"], job["total"], job["chunks"], job["split_sent"]) == ("running", 8, 3, 3)


def test_a_split_delivered_again_sends_only_what_was_not_sent(aws: dict[str, str]) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(7)])
    store().split_progress(job_id, 2)  # the first delivery sent two chunks, then died
    assert [chunk.index for chunk in split(job_id, aws)] == [2]


def test_a_split_past_the_job_limit_fails_the_job_saying_so(aws: dict[str, str]) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(10)])
    chunks = split(job_id, aws, max_items=4)
    job = store().get(job_id)
    assert job is not None
    assert sum(chunk.items for chunk in chunks) == 4
    assert (job["status"], job["total"], job["chunks"]) == ("failed", 4, len(chunks))
    assert "more than 4 items" in job["error"]


def test_a_line_past_the_cap_is_its_items_error_and_a_chunk_holds_a_bounded_share_of_the_input(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [json.dumps(item(i)) for i in range(6)]
    lines.insert(3, json.dumps(item(99, body="x" * 5000)))  # past FANOUT_MAX_BODY_BYTES: never read whole
    each = len(lines[0])
    monkeypatch.setattr(split_module, "CHUNK_LINE_BYTES", 4 * each + 1)  # four lines a chunk, by bytes
    job_id = new_job(lines)
    chunks = split(job_id, aws, chunk_items=10)

    assert [chunk.items for chunk in chunks] == [5, 2]  # i0-i2, the long line (held: none of it) and i3
    assert [chunk.first_line for chunk in chunks] == [1, 6]
    for chunk in chunks:
        chunks_on(run_chunk, chunk, budget_s=10)
    job = store().get(job_id)
    assert job is not None
    assert (job["status"], job["total"], job["succeeded"], job["failed"]) == ("succeeded", 7, 6, 1)
    assert upstream.stats.requests == 6
    results = results_of(job_id)
    assert [line["id"] for line in results] == ["i0", "i1", "i2", "line 4", "i3", "i4", "i5"]
    assert results[3]["error"] == {
        "type": INVALID_ITEM,
        "message": f"the line is {len(lines[3])} bytes; at most {LINE_CAP} (FANOUT_MAX_BODY_BYTES)",
    }


def test_a_line_that_is_no_item_is_its_items_error_naming_the_field_as_the_line_has_it(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    """The message speaks of the line and its fields, as /batch's 422 speaks of the body and its items."""
    lines = [
        json.dumps(item(0)),
        "not json",
        json.dumps(item(2, target="nowhere")),
        json.dumps(item(3, headers={"accept": "a\u0000b"})),
        "[1, 2]",
        json.dumps(item(5, headers={"host": "elsewhere"})),
    ]
    job_id = new_job(lines)
    for chunk in split(job_id, aws, chunk_items=10):
        chunks_on(run_chunk, chunk, budget_s=10)
    results = results_of(job_id)
    assert [(line["id"], line.get("error", {}).get("message")) for line in results] == [
        ("i0", None),
        ("line 2", "the line is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        ("i2", "target: unknown target; allowed: up"),
        (
            "i3",
            "headers.accept: Value error, must not contain control characters"
            " (only visible characters, spaces and tabs)",
        ),
        ("line 5", "a line must be a JSON object: a /batch request item"),
        ("i5", "headers.host: header not allowed; allowed: " + ", ".join(sorted(ALLOWED_HEADERS))),
    ]
    assert upstream.stats.requests == 1


def test_results_lines_stay_near_their_bodies_size_whatever_the_upstream_sends(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    """A text body that escapes to twice its size (quotes) or six times (control characters) is written
    as base64: a chunk's results file is bounded by its bodies' cap, never six times it."""
    job_id = new_job([json.dumps(item(0, path="/quotes", query={"n": 3000})), json.dumps(item(1, path="/delay"))])
    (chunk,) = split(job_id, aws)
    chunks_on(run_chunk, chunk, budget_s=10)

    key = f"results/{job_id}/chunks/0000000.jsonl"
    raw = boto3.client("s3", region_name=REGION).get_object(Bucket=RESULTS, Key=key)["Body"].read()
    quotes, delay = (json.loads(line) for line in raw.splitlines())
    assert (quotes["encoding"], base64.b64decode(quotes["body"])) == ("base64", b'"' * 3000)
    assert len(raw.splitlines()[0]) < 4000 + 1000  # base64's 4/3, and the headers; escaped text was 6000+
    assert "encoding" not in delay and isinstance(delay["body"], dict)  # JSON stays JSON


HOSTILE_PIECES = [b'"', b"\x01", b"\\", b"\xe2\x80\xa8", b"a", b"[1,", b"1]", b"{}", b",", b'"\\ud800"', b"1e15", b"0,"]


@given(
    body=st.binary(max_size=400) | st.lists(st.sampled_from(HOSTILE_PIECES), max_size=200).map(b"".join),
    content_type=st.sampled_from(["text/plain", "application/json", "application/octet-stream"]),
    truncated=st.booleans(),
)
@example(body=b'["\\ud800", 1]', content_type="application/json", truncated=False)  # JSON, but not in UTF-8
@example(body=b"[" + b"1e15," * 99 + b"1e15]", content_type="application/json", truncated=False)  # 1e15 -> 4.5x
def test_a_results_line_gives_the_body_back_and_stays_near_its_size(
    body: bytes, content_type: str, truncated: bool
) -> None:
    response = UpstreamResponse(200, {"content-type": content_type}, body, truncated)
    line = item_line(ItemReport(id="i", attempts=1, elapsed_s=0.01, response=response), line=7)
    written = json.loads(line.encode("utf-8"))  # as the results file holds it: a lone surrogate could not be
    assert (written["line"], written["id"], written["status"]) == (7, "i", 200)
    if written.get("encoding") == "base64":
        assert base64.b64decode(written["body"]) == body
    elif content_type != "application/json" or truncated:
        assert (written["body"] or "").encode() == body  # text, as it came
    as_written = len(json.dumps(written["body"], ensure_ascii=False).encode())
    assert as_written <= 4 * math.ceil(len(body) / 3) + 4  # base64's with its quotes (or null): the most a body takes


# --- chunks ----------------------------------------------------------------------------------------------------


def test_a_job_runs_every_item_once_and_ends_with_its_manifest(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    lines = [json.dumps(item(i)) for i in range(7)]
    lines[2] = '{"id": "bad", "target": "nowhere"}'
    lines[5] = "not json"
    job_id = new_job(lines)
    for chunk in split(job_id, aws):
        chunks_on(run_chunk, chunk, budget_s=10)

    job = store().get(job_id)
    assert job is not None
    assert (job["status"], job["succeeded"], job["failed"], job["skipped"]) == ("succeeded", 5, 2, 0)
    assert job["requests"] == {"up": 5}
    results = results_of(job_id)
    assert [line["line"] for line in results] == list(range(1, 8))
    assert [line["id"] for line in results] == ["i0", "i1", "bad", "i3", "i4", "line 6", "i6"]
    assert {line["id"]: line.get("status") for line in results}["i0"] == 200
    errors = {line["id"]: line["error"] for line in results if "error" in line}
    assert errors["bad"]["type"] == INVALID_ITEM and "unknown target" in errors["bad"]["message"]
    assert errors["line 6"]["type"] == INVALID_ITEM


class ConflictingWrites:
    """The job table as DynamoDB is under load and moto never is: the first try of every write to a job's
    row meets another writer's transaction (TransactionConflictException, or a transaction cancelled for
    TransactionConflict), the next goes through."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.refused: Counter[str] = Counter()
        self._tried: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def _first_try(self, request: dict[str, Any]) -> bool:
        key = json.dumps(request, sort_keys=True, default=str)
        first = key not in self._tried
        self._tried.add(key)
        return first

    def update_item(self, **request: Any) -> Any:
        if request["Key"]["sk"] == {"S": "job"} and self._first_try(request):
            self.refused["update_item"] += 1
            error = {"Error": {"Code": "TransactionConflictException", "Message": "a transaction holds the item"}}
            raise self.db.exceptions.TransactionConflictException(error, "UpdateItem")
        return self.db.update_item(**request)

    def transact_write_items(self, **request: Any) -> Any:
        if self._first_try(request):
            self.refused["transact_write_items"] += 1
            reasons = [{"Code": "None"}, {"Code": "TransactionConflict", "Message": "another transaction"}]
            error = {"Error": {"Code": "TransactionCanceledException", "Message": "cancelled"}}
            raise self.db.exceptions.TransactionCanceledException({**error, "CancellationReasons": reasons}, "X")
        return self.db.transact_write_items(**request)


def test_a_job_whose_writes_meet_other_writers_transactions_ends_with_every_item_once(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    """botocore retries neither conflict: a chunk's commit that met one failed its message (SQS brought it
    back minutes later, and past its receive count the job ended failed); a cancel answered 500."""
    table = ConflictingWrites(boto3.client("dynamodb", region_name=REGION))
    jobs = JobStore(table, TABLE, retention_days=7)
    chunks_on.context.store = jobs
    job_id = new_job([json.dumps(item(i)) for i in range(7)])
    split_input(
        SplitInput(job_id=job_id, key=inline_key(job_id)),
        store=jobs,
        files=files(),
        queue=SplitQueue(boto3.client("sqs", region_name=REGION), aws["chunks"]),
        chunk_items=2,
        max_items=1000,
        max_line_bytes=LINE_CAP,
        now_ms=lambda: int(time.time() * 1000),
    )
    for chunk in [message for message in queued(aws["chunks"]) if isinstance(message, RunChunk)]:
        chunks_on(run_chunk, chunk, budget_s=10)

    job = jobs.get(job_id)
    assert job is not None
    assert (job["status"], job["chunks_done"], job["succeeded"], job["failed"]) == ("succeeded", 4, 7, 0)
    assert upstream.stats.requests == 7
    assert [line["id"] for line in results_of(job_id)] == [f"i{i}" for i in range(7)]
    assert table.refused["transact_write_items"] == 4 and table.refused["update_item"] >= 3  # start, split, finish
    other = new_job([json.dumps(item(0))], job_id="1" * 32)
    assert jobs.cancel(other, int(time.time() * 1000)) is True


@pytest.mark.parametrize(
    ("code", "reasons", "conflict"),
    [
        ("TransactionConflictException", None, True),
        ("TransactionCanceledException", ["None", "TransactionConflict"], True),
        ("TransactionCanceledException", ["ConditionalCheckFailed", "TransactionConflict"], False),  # decided
        ("TransactionCanceledException", ["ConditionalCheckFailed", "None"], False),
        ("ConditionalCheckFailedException", None, False),
        ("ValidationException", None, False),
    ],
)
def test_which_refusals_are_write_conflicts(code: str, reasons: list[str] | None, conflict: bool) -> None:
    error: dict[str, Any] = {"Error": {"Code": code, "Message": ""}}
    if reasons is not None:
        error["CancellationReasons"] = [{"Code": reason} for reason in reasons]
    assert is_write_conflict(ClientError(error, "TransactWriteItems")) is conflict  # type: ignore[arg-type]
    assert is_write_conflict(ValueError(code)) is False


def test_a_chunk_delivered_twice_runs_once(aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(3)])
    (chunk,) = split(job_id, aws)
    chunks_on(run_chunk, chunk, budget_s=10)
    sent = upstream.stats.requests
    chunks_on(run_chunk, chunk, budget_s=10)  # SQS delivers at least once

    job = store().get(job_id)
    assert job is not None
    assert upstream.stats.requests == sent
    assert (job["succeeded"], job["chunks_done"]) == (3, 1)


def test_a_chunk_held_by_a_live_lease_is_busy_and_one_whose_lease_ran_out_is_taken_over(aws: dict[str, str]) -> None:
    jobs = store()
    job_id = new_job([json.dumps(item(0))])
    now = int(time.time() * 1000)
    assert jobs.claim(job_id, 0, attempt="first", lease_ms=60_000, now_ms=now) is Claim.CLAIMED
    assert jobs.claim(job_id, 0, attempt="second", lease_ms=60_000, now_ms=now + 1000) is Claim.BUSY
    # the first attempt died: past its lease, the chunk is free again
    assert jobs.claim(job_id, 0, attempt="third", lease_ms=60_000, now_ms=now + 61_000) is Claim.CLAIMED
    counts = ChunkCounts(succeeded=1)
    assert not jobs.commit(job_id, 0, attempt="first", results_key="a", counts=counts, now_ms=now + 62_000)
    assert jobs.commit(job_id, 0, attempt="third", results_key="c", counts=counts, now_ms=now + 62_000)
    assert jobs.claim(job_id, 0, attempt="fourth", lease_ms=60_000, now_ms=now + 63_000) is Claim.DONE
    job = jobs.get(job_id)
    assert job is not None
    assert (job["succeeded"], job["chunks_done"]) == (1, 1)  # counted once, by the attempt that held it
    assert jobs.chunk(job_id, 0)["results_key"] == "c"  # type: ignore[index]


def test_a_chunk_whose_results_were_written_before_its_attempt_died_is_recorded_without_sending_again(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(3)])
    (chunk,) = split(job_id, aws)
    chunks_on(run_chunk, chunk, budget_s=10)
    sent = upstream.stats.requests
    # as if that attempt had died between writing its results and recording the chunk
    table = boto3.client("dynamodb", region_name=REGION)
    table.delete_item(TableName=TABLE, Key={"pk": {"S": f"job#{job_id}"}, "sk": {"S": "chunk#0000000"}})
    table.update_item(
        TableName=TABLE,
        Key={"pk": {"S": f"job#{job_id}"}, "sk": {"S": "job"}},
        UpdateExpression="SET chunks_done = :zero, succeeded = :zero REMOVE finished_ms",
        ExpressionAttributeValues={":zero": {"N": "0"}},
    )
    chunks_on(run_chunk, chunk, budget_s=10)  # the message came back after its visibility timeout

    job = store().get(job_id)
    assert job is not None
    assert upstream.stats.requests == sent  # the written results were recorded, not sent for again
    assert (job["succeeded"], job["chunks_done"]) == (3, 1)
    assert store().chunk(job_id, 0)["results_key"] == f"results/{job_id}/chunks/0000000.jsonl"  # type: ignore[index]


def test_a_chunk_results_file_is_written_once_and_a_later_writer_gets_its_counts(aws: dict[str, str]) -> None:
    key = "results/" + "0" * 32 + "/chunks/0000000.jsonl"
    first = files().put_results_once(key, ['{"id":"a"}'], ChunkCounts(succeeded=1, requests={"up": 1}))
    late = files().put_results_once(key, ['{"id":"b"}'], ChunkCounts(failed=1, requests={"up": 2}))
    assert first == ChunkCounts(succeeded=1, requests={"up": 1})
    assert late == ChunkCounts(succeeded=1, requests={"up": 2})  # the file's counts, the requests it sent
    body = boto3.client("s3", region_name=REGION).get_object(Bucket=RESULTS, Key=key)["Body"].read()
    assert body == b'{"id":"a"}\n'
    assert files().results_counts(key.replace("0000000", "0000001")) is None


def test_run_chunk_raises_busy_while_another_attempt_holds_the_chunk(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    job_id = new_job([json.dumps(item(0))])
    (chunk,) = split(job_id, aws)
    store().claim(job_id, 0, attempt="other", lease_ms=60_000, now_ms=int(time.time() * 1000))
    with pytest.raises(ChunkBusy):
        chunks_on(run_chunk, chunk, budget_s=10)


def test_a_buried_chunk_reports_its_items_failed_and_fails_the_job(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(5)])
    first, second = split(job_id, aws)
    chunks_on(run_chunk, first, budget_s=10)
    chunks_on(bury_chunk, second, reason="gone")
    chunks_on(bury_chunk, second, reason="gone")  # the dead-letter queue delivers at least once too

    job = store().get(job_id)
    assert job is not None
    assert (job["status"], job["succeeded"], job["failed"], job["dead_chunks"]) == ("failed", 3, 2, 1)
    results = results_of(job_id)
    assert [line["id"] for line in results] == ["i0", "i1", "i2", "i3", "i4"]
    assert [line["error"]["type"] for line in results[3:]] == [CHUNK_FAILED, CHUNK_FAILED]


def test_a_buried_chunk_whose_results_were_written_keeps_them(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    """An attempt wrote the chunk's results and never recorded it (and every redelivery failed to):
    the dead-letter queue's record counts what the file holds, not its items as failed."""
    job_id = new_job([json.dumps(item(i)) for i in range(2)])
    (chunk,) = split(job_id, aws)
    key = f"results/{job_id}/chunks/0000000.jsonl"
    files().put_results_once(key, ['{"id":"i0"}', '{"id":"i1"}'], ChunkCounts(succeeded=2))
    chunks_on(bury_chunk, chunk, reason="gone")

    job = store().get(job_id)
    assert job is not None
    assert (job["status"], job["succeeded"], job["failed"], job["dead_chunks"]) == ("failed", 2, 0, 1)
    assert [line["id"] for line in results_of(job_id)] == ["i0", "i1"]


def test_a_buried_chunk_whose_input_is_gone_is_accounted_for_by_count(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(3)])
    (chunk,) = split(job_id, aws)
    boto3.client("s3", region_name=REGION).delete_object(Bucket=INPUT, Key=inline_key(job_id))
    chunks_on(bury_chunk, chunk, reason="gone")
    assert [line["id"] for line in results_of(job_id)] == ["chunk 0 item 1", "chunk 0 item 2", "chunk 0 item 3"]


def test_a_cancelled_job_starts_no_more_requests(aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(6)])
    first, second = split(job_id, aws)
    chunks_on(run_chunk, first, budget_s=10)
    assert store().cancel(job_id, int(time.time() * 1000))
    sent = upstream.stats.requests
    chunks_on(run_chunk, second, budget_s=10)

    job = store().get(job_id)
    assert job is not None
    assert upstream.stats.requests == sent
    assert (job["status"], job["succeeded"], job["skipped"]) == ("cancelled", 3, 3)
    assert "finished_ms" in job
    assert [line.get("skipped") for line in results_of(job_id)] == [None] * 3 + ["cancelled"] * 3
    assert not store().cancel(job_id, int(time.time() * 1000))  # it has ended


def test_a_jobs_ceilings_only_lower_the_configured_ones_and_end_with_its_chunks() -> None:
    """The limiters are the container's, shared by the chunks it runs at once and kept across
    invocations: a job's share may lower a target's configured ceilings while its chunks run, never
    raise them, and never outlast them (the strictest of the running jobs' holds)."""
    politeness = Politeness(ceiling=20, max_in_flight={"up": 3}, rate_per_s={"up": 20.0})
    ceilings = JobCeilings(politeness, workers=2)
    up, free = politeness.limiter("up"), politeness.limiter("free")

    def now() -> list[tuple[int, float | None, float | None]]:
        return [(up.ceiling, up.rate_ceiling, up.state.rate), (free.ceiling, free.rate_ceiling, free.state.rate)]

    assert now() == [(3, 20.0, 20.0), (20, None, None)]
    with ceilings.applied({"up": {"max_in_flight": 1000, "rate_per_s": 1000}}):  # asks for more: no
        assert now() == [(3, 20.0, 20.0), (20, None, None)]
    with ceilings.applied({"up": {"max_in_flight": 4, "rate_per_s": 8}, "free": {"rate_per_s": 6}}):
        assert now() == [(2, 4.0, 4.0), (20, 3.0, 3.0)]  # each worker's half
        with ceilings.applied({"up": {"max_in_flight": 10}, "free": {"max_in_flight": 8}}):  # another job
            assert now() == [(2, 4.0, 4.0), (4, 3.0, 3.0)]
        assert now() == [(2, 4.0, 4.0), (20, 3.0, 3.0)]
    assert now() == [(3, 20.0, 20.0), (20, None, None)]  # unpaced again: it was never throttled


def test_a_job_asking_fewer_in_flight_gets_them_and_the_next_job_does_not(
    aws: dict[str, str], upstream: LocalUpstream, chunks_on: Any
) -> None:
    lines = [json.dumps(item(i, query={"ms": 30})) for i in range(6)]
    first = new_job(lines, job_id="1" * 32, spec={"targets": {"up": {"max_in_flight": 2}}})
    (chunk,) = split(first, aws, chunk_items=6)
    chunks_on(run_chunk, chunk, budget_s=10)
    assert upstream.stats.peak_in_flight == 2

    upstream.stats.peak_in_flight = 0
    second = new_job(lines, job_id="2" * 32)
    (chunk,) = split(second, aws, chunk_items=6)
    chunks_on(run_chunk, chunk, budget_s=10)
    assert upstream.stats.peak_in_flight > 2  # the first job's ceiling ended with it


def test_an_empty_input_ends_the_job_at_once(aws: dict[str, str]) -> None:
    job_id = new_job([])
    assert split(job_id, aws) == []
    assert finish_if_done(job_id, store(), files())
    job = store().get(job_id)
    assert job is not None
    assert (job["status"], job["total"]) == ("succeeded", 0)
    assert results_of(job_id) == []


def test_targets_pause_for_every_worker(aws: dict[str, str]) -> None:
    jobs = store()
    now = int(time.time() * 1000)
    jobs.pause("up", now + 5000, now)
    jobs.pause("up", now + 1000, now)  # never shortened
    assert jobs.pauses(["up", "other"]) == {"up": now + 5000}


class LeavingKeysUnprocessed:
    """DynamoDB under throttling (moto never): BatchGetItem answers part of its keys and hands the rest back as
    UnprocessedKeys, `times` calls in a row."""

    def __init__(self, db: Any, times: int) -> None:
        self.db, self.times, self.calls = db, times, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def batch_get_item(self, **request: Any) -> Any:
        self.calls += 1
        if self.calls > self.times:
            return self.db.batch_get_item(**request)
        (table, asked), *_ = request["RequestItems"].items()
        first, rest = asked["Keys"][:1], asked["Keys"][1:]
        answer = self.db.batch_get_item(RequestItems={table: {**asked, "Keys": first}})
        return {**answer, "UnprocessedKeys": {table: {**asked, "Keys": rest}} if rest else {}}


def test_pauses_left_unprocessed_are_asked_again_after_a_growing_wait(
    aws: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS asks for exponential backoff between such calls; asked again at once, a throttled table is hammered."""
    waits: list[float] = []
    monkeypatch.setattr("fanout.jobs.store._wait", waits.append)
    now = int(time.time() * 1000)
    for number in range(4):
        store().pause(f"t{number}", now + 1000 * (number + 1), now)
    table = LeavingKeysUnprocessed(boto3.client("dynamodb", region_name=REGION), times=3)
    jobs = JobStore(table, TABLE, retention_days=7)
    assert jobs.pauses([f"t{number}" for number in range(4)]) == {f"t{n}": now + 1000 * (n + 1) for n in range(4)}
    assert table.calls == 4 and len(waits) == 3 and all(0 <= wait <= 1.0 for wait in waits)


# --- the worker's handler ----------------------------------------------------------------------------------------


@pytest.fixture
def worker(aws: dict[str, str], upstream: LocalUpstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The worker as its Lambda entry point builds it: on the container's one loop (Powertools' batch
    processor runs on the current loop when LAMBDA_TASK_ROOT says it is in Lambda)."""
    from fanout.jobs.worker import Worker
    from fanout.settings import load_settings

    for name, value in {
        "LAMBDA_TASK_ROOT": str(ROOT / "functions" / "worker"),
        "FANOUT_UPSTREAMS": json.dumps({"up": {"url": upstream.url, "allow_http": True}}),
        "FANOUT_ALLOW_PRIVATE_NETWORKS": "true",
        "FANOUT_JOBS_TABLE": TABLE,
        "FANOUT_INPUT_BUCKET": INPUT,
        "FANOUT_RESULTS_BUCKET": RESULTS,
        "FANOUT_CHUNK_QUEUE_URL": aws["chunks"],
        "FANOUT_DEAD_LETTER_QUEUE_ARN": aws["dead_arn"],
        "FANOUT_CHUNK_ITEMS": "2",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
    }.items():
        monkeypatch.setenv(name, value)
    loop = install_event_loop()
    worker = Worker(load_settings(), timeout_s=30, memory_mb=lambda_memory_mb())
    yield worker
    loop.run_until_complete(worker.context.runner.transport.aclose())
    loop.close()
    asyncio.set_event_loop(None)


def sqs_event(messages: list[Any], *, source_arn: str) -> dict[str, Any]:
    """The worker's event file with these bodies (events/worker-sqs.json is the shape)."""
    event = load_event("worker-sqs.json")
    template = event["Records"][0]
    event["Records"] = [
        {**copy.deepcopy(template), "messageId": f"m{i}", "body": encode(message), "eventSourceARN": source_arn}
        for i, message in enumerate(messages)
    ]
    return event


def test_the_worker_event_file_is_a_split_the_handler_takes(worker: Any, aws: dict[str, str]) -> None:
    event = load_event("worker-sqs.json")
    assert decode(event["Records"][0]["body"]) == SplitInput(job_id="0" * 32, key=inline_key("0" * 32))
    new_job([json.dumps(item(i)) for i in range(3)])
    event["Records"][0]["eventSourceARN"] = "arn:aws:sqs:us-east-1:123456789012:chunks"
    assert worker.handle(event, lambda_context()) == {"batchItemFailures": []}
    assert [message.items for message in queued(aws["chunks"])] == [2, 1]


def test_the_worker_reports_only_the_records_that_failed(worker: Any, aws: dict[str, str]) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(4)])
    worker.handle(sqs_event([SplitInput(job_id=job_id, key=inline_key(job_id))], source_arn="chunks"), lambda_context())
    first, second = queued(aws["chunks"])
    store().claim(job_id, 1, attempt="other", lease_ms=60_000, now_ms=int(time.time() * 1000))
    answer = worker.handle(sqs_event([first, second], source_arn="chunks"), lambda_context())
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m1"}]}  # busy: it comes back later
    job = store().get(job_id)
    assert job is not None
    assert (job["succeeded"], job["chunks_done"]) == (2, 1)


def test_the_worker_buries_dead_letters_and_the_job_ends(worker: Any, aws: dict[str, str]) -> None:
    job_id = new_job([json.dumps(item(i)) for i in range(4)])
    worker.handle(sqs_event([SplitInput(job_id=job_id, key=inline_key(job_id))], source_arn="chunks"), lambda_context())
    first, second = queued(aws["chunks"])
    worker.handle(sqs_event([first], source_arn="chunks"), lambda_context())
    worker.handle(sqs_event([second], source_arn=aws["dead_arn"]), lambda_context())
    job = store().get(job_id)
    assert job is not None
    assert (job["status"], job["succeeded"], job["failed"]) == ("failed", 2, 2)


def test_a_message_that_is_not_ours_goes_to_the_dead_letter_queue_and_is_dropped_there_saying_so(
    worker: Any, aws: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """On the chunk queue it fails (SQS moves it on after its receives); on the dead-letter queue, which has
    no queue after it, failing brought it back every visibility timeout for the queue's 14 days of retention."""
    event = sqs_event([SplitInput(job_id="0" * 32, key="k")], source_arn="chunks")
    event["Records"][0]["body"] = '{"kind": "unknown"}'
    with pytest.raises(BatchProcessingError, match="All records failed"):  # its whole batch: all come back
        worker.handle(event, lambda_context())
    event["Records"][0]["eventSourceARN"] = aws["dead_arn"]
    with caplog.at_level("ERROR"):
        assert worker.handle(event, lambda_context()) == {"batchItemFailures": []}
    (dropped,) = [record for record in caplog.records if record.levelname == "ERROR"]
    assert dropped.getMessage() == (
        "dropped a dead letter that is not a chunk queue message: 'not a chunk queue message: "
        '\\\'{"kind": "unknown"}\\\'\''
    )


def test_a_split_in_the_dead_letter_queue_fails_its_job(worker: Any, aws: dict[str, str]) -> None:
    job_id = new_job([json.dumps(item(0))])
    worker.handle(
        sqs_event([SplitInput(job_id=job_id, key=inline_key(job_id))], source_arn=aws["dead_arn"]), lambda_context()
    )
    job = store().get(job_id)
    assert job is not None
    assert job["status"] == "failed" and "could not be cut into chunks" in job["error"]
    assert "finished_ms" in job  # nothing was sent: it ends at once


def test_the_worker_refuses_to_start_without_its_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    from fanout.jobs.worker import Worker
    from fanout.settings import ConfigError

    with pytest.raises(ConfigError, match="FANOUT_JOBS_TABLE, FANOUT_INPUT_BUCKET"):
        Worker(Settings(), timeout_s=30, memory_mb=512)


def test_the_worker_refuses_to_start_if_its_chunks_answers_could_fill_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two chunks of 1,000 items, each answer up to 256 KiB of body and 64 KiB of headers: 625 MiB, over
    half of 1024 MB (and a chunk that met such answers would kill the worker on every delivery). It names
    the numbers and the way out."""
    from fanout.jobs.worker import Worker, check_answers_fit
    from fanout.settings import ConfigError

    resources = {name: "x" for name in ("jobs_table", "input_bucket", "results_bucket", "chunk_queue_url")}
    settings = Settings(**resources, dead_letter_queue_arn="x", worker_batch_size=2, chunk_items=1000)
    with pytest.raises(ConfigError) as refused:
        Worker(settings, timeout_s=30, memory_mb=1024)
    assert str(refused.value) == (
        "Invalid configuration: FANOUT_WORKER_BATCH_SIZE (2) x FANOUT_CHUNK_ITEMS (1000) x (FANOUT_MAX_ITEM_BYTES "
        "(262144) + 65536 of headers) is 625 MiB of upstream answers held at once, over half the worker's memory "
        "(1024 MB, AWS_LAMBDA_FUNCTION_MEMORY_SIZE): lower ChunkItems or WorkerBatchSize, or raise WorkerMemorySize"
    )
    check_answers_fit(settings, 1250)  # 625 MiB is half of 1250 MB (MiB each): the least that starts
    with pytest.raises(ConfigError):
        check_answers_fit(settings, 1249)
    for told in ("", "512MB"):
        monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", told)
        with pytest.raises(ConfigError, match=f"AWS_LAMBDA_FUNCTION_MEMORY_SIZE \\(got '{told}'\\) must be"):
            lambda_memory_mb()


def test_the_worker_refuses_to_start_if_its_chunks_results_could_fill_its_tmp() -> None:
    """An invocation's chunks spool their results files to /tmp at once (past 8 MiB each) before they go to
    S3; each line is at most its body in base64, its headers written three times over (escapes, U+FFFD)
    and 4 KiB more. Lambda's /tmp is 512 MB unless EphemeralStorage says otherwise: ENOSPC on every
    delivery of a chunk that met large answers, and locally never, since a laptop's /tmp is large."""
    from fanout.jobs.worker import check_results_fit
    from fanout.settings import ConfigError

    settings = Settings(worker_batch_size=2, chunk_items=1000)
    line = 4 * math.ceil(262144 / 3) + 3 * 65536 + 4096
    assert line == 550_232
    check_results_fit(settings, 2 * 1000 * line)
    with pytest.raises(ConfigError) as refused:
        check_results_fit(settings, 2 * 1000 * line - 1)
    assert str(refused.value) == (
        "Invalid configuration: FANOUT_WORKER_BATCH_SIZE (2) x FANOUT_CHUNK_ITEMS (1000) x results lines of up to "
        "550232 bytes (FANOUT_MAX_ITEM_BYTES (262144) in base64, 65536 of headers written out) is 1049 MiB of "
        "results files on /tmp at once, over its 1049 MiB free: lower ChunkItems or WorkerBatchSize, or raise "
        "WorkerTmpSize"
    )


# --- the jobs routes, through the real handler --------------------------------------------------------------------


@pytest.fixture
def jobs_api(aws: dict[str, str], upstream: LocalUpstream, import_handler: Any) -> Any:
    """The jobs function's handler (Mangum and the app), with the resources of `aws`."""
    handler = import_handler(
        FANOUT_UPSTREAMS=json.dumps({"up": {"url": upstream.url, "allow_http": True}}),
        FANOUT_JOBS_TABLE=TABLE,
        FANOUT_INPUT_BUCKET=INPUT,
        FANOUT_RESULTS_BUCKET=RESULTS,
        FANOUT_CHUNK_QUEUE_URL=aws["chunks"],
        FANOUT_MAX_UPLOAD_BYTES="2048",
    ).handler

    def call(method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        event = copy.deepcopy(load_event("batch-http-api-v2.json"))
        event["routeKey"] = "$default"
        event["rawPath"] = event["requestContext"]["http"]["path"] = path.partition("?")[0]
        event["rawQueryString"] = path.partition("?")[2]
        event["requestContext"]["http"]["method"] = method
        event["body"] = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        event["isBase64Encoded"] = False
        event.pop("pathParameters", None)
        response = handler(event, lambda_context())
        return response["statusCode"], json.loads(response["body"]), response.get("headers", {})

    return call


def drain(worker: Any, aws: dict[str, str]) -> None:
    """What the event source mapping does: deliver the queue's messages to the worker until it is empty."""
    while pending := queued(aws["chunks"]):
        answer = worker.handle(sqs_event(pending, source_arn="chunks"), lambda_context())
        assert answer == {"batchItemFailures": []}, (pending, answer)


def test_a_job_submitted_inline_runs_and_its_results_are_fetched(
    jobs_api: Any, worker: Any, aws: dict[str, str]
) -> None:
    import requests

    status, body, headers = jobs_api("POST", "/jobs", {"requests": [item(i) for i in range(5)], "concurrency": 4})
    assert status == 202
    job_id = body["job_id"]
    assert body == {"job_id": job_id, "status": "queued", "status_url": f"/jobs/{job_id}"}
    assert headers["location"] == f"/jobs/{job_id}"
    assert jobs_api("GET", f"/jobs/{job_id}")[1]["status"] == "queued"
    assert jobs_api("GET", f"/jobs/{job_id}/results")[0] == 409  # not ended: results are not complete

    drain(worker, aws)
    status, job, _ = jobs_api("GET", f"/jobs/{job_id}")
    assert status == 200
    assert {key: job[key] for key in ("status", "total", "succeeded", "failed", "skipped", "pending", "chunks")} == {
        "status": "succeeded",
        "total": 5,
        "succeeded": 5,
        "failed": 0,
        "skipped": 0,
        "pending": 0,
        "chunks": 3,
    }
    assert job["targets"]["up"]["requests"] == 5 and job["items_per_s"] > 0
    assert job["created_at"] <= job["started_at"] <= job["updated_at"] == job["finished_at"]
    manifest = requests.get(job["results"]["manifest_url"], timeout=5).json()
    assert (manifest["status"], len(manifest["chunks"])) == ("succeeded", 3)
    page = jobs_api("GET", job["results"]["first_page"])[1]
    assert page["next_page"] is None
    lines = [json.loads(line) for url in page["urls"] for line in requests.get(url, timeout=5).text.splitlines()]
    assert [line["id"] for line in lines] == [f"i{i}" for i in range(5)]
    assert jobs_api("DELETE", f"/jobs/{job_id}")[0] == 409  # it has ended


@pytest.mark.parametrize(
    ("region", "host"),
    [("us-east-1", "in-bucket.s3.amazonaws.com"), ("eu-west-1", "in-bucket.s3.eu-west-1.amazonaws.com")],
)
def test_presigned_urls_are_sigv4_and_name_the_buckets_region(
    region: str, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 refuses SigV2 for buckets created since June 2020, and boto3 presigns with it by default in the
    older regions; the global name answers a new bucket of another region with a redirect."""
    for name, value in {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_DEFAULT_REGION": region}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    files = JobFiles(s3_client(), input_bucket="in-bucket", results_bucket="out-bucket", url_ttl_s=60)
    for url, bucket in [
        (files.upload_url("a" * 32), "in-bucket"),
        (files.results_url("results/x.jsonl"), "out-bucket"),
    ]:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        assert parts.netloc == host.replace("in-bucket", bucket)
        assert (query["X-Amz-Algorithm"], query["X-Amz-Expires"]) == (["AWS4-HMAC-SHA256"], ["60"])
        assert query["X-Amz-Credential"][0].endswith(f"/{region}/s3/aws4_request")
        assert "Signature" not in query and "AWSAccessKeyId" not in query


def test_a_job_from_an_uploaded_file(jobs_api: Any, worker: Any, aws: dict[str, str]) -> None:
    import requests

    status, upload, _ = jobs_api("POST", "/jobs/uploads")
    assert status == 201 and upload["max_bytes"] == 2048
    data = "\n".join(json.dumps(item(i)) for i in range(3)) + "\n"
    assert requests.put(upload["upload_url"], data=data.encode(), timeout=5).status_code == 200
    status, body, _ = jobs_api("POST", "/jobs", {"upload_id": upload["upload_id"]})
    assert status == 202
    drain(worker, aws)
    job = jobs_api("GET", f"/jobs/{body['job_id']}")[1]
    assert (job["status"], job["succeeded"]) == ("succeeded", 3)


@pytest.mark.parametrize(
    ("operation", "failure", "method", "path"),
    [
        ("SendMessageBatch", ("ServiceUnavailable", 503), "POST", "/jobs"),
        ("PutItem", ("ProvisionedThroughputExceededException", 400), "POST", "/jobs"),
        ("GetItem", ("ThrottlingException", 400), "GET", "/jobs/" + "a" * 32),
        ("GetItem", None, "GET", "/jobs/" + "a" * 32),  # unreachable: botocore's EndpointConnectionError
    ],
)
def test_an_aws_call_failing_past_its_retries_is_a_503_saying_so(
    operation: str,
    failure: tuple[str, int] | None,
    method: str,
    path: str,
    jobs_api: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DynamoDB throttled, SQS or S3 unavailable, an endpoint out of reach, after botocore's own retries: the
    caller is told to try again (503, Retry-After), not handed a bare 500 as if its request were wrong."""
    from botocore.client import BaseClient
    from botocore.exceptions import EndpointConnectionError

    real = BaseClient._make_api_call

    def failing(client: Any, name: str, params: dict[str, Any]) -> Any:
        if name != operation:
            return real(client, name, params)
        if failure is None:
            raise EndpointConnectionError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com")
        code, status = failure
        error = {"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}}
        raise ClientError(error, name)  # type: ignore[arg-type]

    monkeypatch.setattr(BaseClient, "_make_api_call", failing)
    status, answer, headers = jobs_api(method, path, {"requests": [item(0)]} if method == "POST" else None)
    said = f"{operation}: {failure[0]}" if failure else "EndpointConnectionError"
    assert (status, answer) == (503, {"message": f"an AWS service the jobs use did not answer ({said}): try again"})
    assert headers["retry-after"] == "1"


def test_an_aws_refusal_that_no_retry_mends_is_a_502_naming_it(jobs_api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """AccessDenied is the deployment's (its role's policy), not a moment's: no Retry-After, but still an answer
    that says what failed, not a bare 500."""
    from botocore.client import BaseClient

    def refused(client: Any, name: str, params: dict[str, Any]) -> Any:
        error = {"Error": {"Code": "AccessDenied", "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": 403}}
        raise ClientError(error, name)  # type: ignore[arg-type]

    monkeypatch.setattr(BaseClient, "_make_api_call", refused)
    status, answer, headers = jobs_api("GET", "/jobs/" + "a" * 32)
    assert (status, answer) == (
        502,
        {"message": "an AWS service the jobs use refused the call (GetItem: AccessDenied)"},
    )
    assert "retry-after" not in headers


@pytest.mark.parametrize(
    ("body", "where", "says"),
    [
        ({"requests": [item(0, target="nowhere")]}, ["body", "requests", 0, "target"], "unknown target"),
        ({"requests": [item(0), item(0)]}, ["body"], "must be unique"),
        ({"requests": [item(0)], "upload_id": "a" * 32}, ["body"], "not both"),
        ({}, ["body"], "either requests"),
        ({"upload_id": "../../etc"}, ["body", "upload_id"], "should match pattern"),
        ({"upload_id": "b" * 32}, ["body", "upload_id"], "no file was uploaded"),
        ({"requests": [item(0)], "targets": {"nowhere": {"rate_per_s": 5}}}, ["body", "targets", "nowhere"], "unknown"),
        ({"requests": [item(0)], "targets": {"up": {"rate_per_s": -1}}}, ["body", "targets", "up", "rate_per_s"], ""),
        ("[1, 2]", ["body"], "JSON object"),
        ('{"requests": [NaN]}', ["body"], ""),
    ],
)
def test_bad_submissions_are_a_422_naming_the_field(jobs_api: Any, body: Any, where: list[Any], says: str) -> None:
    status, answer, _ = jobs_api("POST", "/jobs", body)
    assert status == 422
    assert any(error["loc"][: len(where)] == where and says in error["msg"] for error in answer["detail"]), answer


def test_an_inline_item_a_worker_would_refuse_as_too_long_is_a_422_at_once(jobs_api: Any) -> None:
    """Within the body's limit as sent, past it as a line of the job's input once written back
    (each 1e5 becomes 100000.0): refused now, naming the item, not failed later by the worker."""
    numbers = "[" + ",".join(["1e5"] * 150_000) + "]"  # 600 kB as sent, 1.35 MB written back
    body = '{"requests": [{"id": "a", "target": "up", "json": ' + numbers + "}]}"
    status, answer, _ = jobs_api("POST", "/jobs", body=body)
    assert status == 422
    (error,) = answer["detail"]
    assert error["loc"] == ["body", "requests", 0]
    assert error["msg"] == (
        "the item is 1350033 bytes as a line of the job's input; at most 1000000 (FANOUT_MAX_BODY_BYTES)"
    )


def test_an_upload_over_the_limit_is_a_413(jobs_api: Any) -> None:
    upload = jobs_api("POST", "/jobs/uploads")[1]
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(Bucket=INPUT, Key=f"uploads/{upload['upload_id']}.jsonl", Body=b"x" * 4096)
    status, answer, _ = jobs_api("POST", "/jobs", {"upload_id": upload["upload_id"]})
    assert status == 413 and "4096 bytes; at most 2048" in answer["detail"]


def test_unknown_jobs_are_a_404_and_cancel_stops_a_job(jobs_api: Any, worker: Any, aws: dict[str, str]) -> None:
    assert jobs_api("GET", "/jobs/" + "f" * 32)[0] == 404
    assert jobs_api("GET", "/jobs/not-an-id")[0] == 404
    assert jobs_api("DELETE", "/jobs/" + "f" * 32)[0] == 404
    job_id = jobs_api("POST", "/jobs", {"requests": [item(i) for i in range(4)]})[1]["job_id"]
    status, answer, _ = jobs_api("DELETE", f"/jobs/{job_id}")
    assert (status, answer) == (202, {"job_id": job_id, "status": "cancelled"})
    drain(worker, aws)
    job = jobs_api("GET", f"/jobs/{job_id}")[1]
    assert (job["status"], job["total"], job["finished_at"] is not None) == ("cancelled", 0, True)
