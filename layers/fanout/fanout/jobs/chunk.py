"""One chunk of a job: claimed, its lines run through POST /batch's runner, its results written once.

Each line is a /batch request item, checked as /batch checks it (a line that is not
one, or is longer than a /batch body may be, is that item's `InvalidItem` error, never
the chunk's failure). The results file holds one line per item, in input order, each
the /batch response item with the input `line` number first, spooled as it is made
(never held in memory beside the reports). Its key is the chunk's own and it is
written once (JobFiles.put_results_once), before the chunk is recorded: an attempt
that finds it written (an earlier attempt ran the chunk and died before recording
it) records that file without sending the chunk's requests again; two attempts that
finish together record the same file, and only the lease holder's record
(store.commit) counts.

`finish_if_done` ends a job once its last chunk is recorded: the manifest first, then
the status, so a job that reads as ended always has its manifest.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from fanout.batch import BatchItem, BatchRunner, ItemReport
from fanout.batch_api import BatchRequestItem, to_batch_item
from fanout.batch_response import item_line
from fanout.engine import Strategy
from fanout.jobs.ceilings import JobCeilings
from fanout.jobs.files import JobFiles, Line, results_key
from fanout.jobs.messages import RunChunk
from fanout.jobs.store import ChunkCounts, Claim, JobStatus, JobStore
from fanout.politeness import Politeness
from fanout.settings import ENV_PREFIX, Settings
from fanout.strict_json import BodyError, parse_body
from fanout.targets import TargetScope

INVALID_ITEM = "InvalidItem"
CHUNK_FAILED = "ChunkFailed"
SKIPPED_CANCELLED = "cancelled"
PAUSE_SYNC_S = 1.0  # how often a running chunk shares its targets' pauses with the other workers


class ChunkBusy(Exception):
    """Another attempt holds this chunk's lease: the message comes back after its visibility timeout."""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class ChunkContext:
    """What a worker container runs chunks with: one of each, kept across warm invocations."""

    settings: Settings
    store: JobStore
    files: JobFiles
    runner: BatchRunner
    politeness: Politeness
    lease_s: float  # how long a claim holds: the worker's timeout (it cannot run longer)
    scopes: dict[str, TargetScope] = field(init=False)
    ceilings: JobCeilings = field(init=False)

    def __post_init__(self) -> None:
        self.scopes = {name: TargetScope.of(name, target) for name, target in self.settings.upstreams.items()}
        self.ceilings = JobCeilings(self.politeness, workers=self.settings.workers)


async def run_chunk(message: RunChunk, context: ChunkContext, *, budget_s: float) -> None:
    """Run one chunk, unless it is done already; ChunkBusy if another attempt holds it."""
    store, files = context.store, context.files
    attempt = uuid.uuid4().hex[:12]
    claim = await asyncio.to_thread(
        store.claim,
        message.job_id,
        message.index,
        attempt=attempt,
        lease_ms=int(context.lease_s * 1000),
        now_ms=now_ms(),
    )
    if claim is Claim.DONE:
        return
    if claim is Claim.BUSY:
        raise ChunkBusy(f"chunk {message.index} of job {message.job_id} is being run by another attempt")
    job = await asyncio.to_thread(store.get, message.job_id)
    if job is None:
        return  # expired meanwhile
    key = results_key(message.job_id, message.index)
    counts = await asyncio.to_thread(files.results_counts, key)
    if counts is None:
        counts = await _run_and_write(message, job, key, context, budget_s)
    committed = await asyncio.to_thread(
        store.commit, message.job_id, message.index, attempt=attempt, results_key=key, counts=counts, now_ms=now_ms()
    )
    if committed:
        await asyncio.to_thread(finish_if_done, message.job_id, store, files)


async def _run_and_write(
    message: RunChunk, job: dict[str, Any], key: str, context: ChunkContext, budget_s: float
) -> ChunkCounts:
    """Run the chunk's lines (or skip them all if the job was cancelled) and write their results once."""
    lines = await asyncio.to_thread(_read_lines, message, context.files, context.settings.max_body_bytes)
    if job["status"] == JobStatus.CANCELLED:
        reports = [(number, _skipped(number, line)) for number, line in lines]
        requests: dict[str, int] = {}
        throttled: dict[str, int] = {}
    else:
        reports, requests, throttled = await _run_lines(lines, job["spec"], context, budget_s)
    counts = ChunkCounts(
        succeeded=sum(report.ok for _, report in reports),
        failed=sum(not report.ok and report.skipped is None for _, report in reports),
        skipped=sum(report.skipped is not None for _, report in reports),
        requests=requests,
        throttled=throttled,
    )
    return await asyncio.to_thread(context.files.put_results_once, key, _result_lines(reports), counts)


async def _run_lines(
    lines: list[tuple[int, Line]], spec: dict[str, Any], context: ChunkContext, budget_s: float
) -> tuple[list[tuple[int, ItemReport]], dict[str, int], dict[str, int]]:
    parsed = [(number, _parse(number, line, context)) for number, line in lines]
    items = [item for _, item in parsed if isinstance(item, BatchItem)]
    targets = sorted({item.target for item in items})
    pauses = _PauseSharing(context, targets)
    await pauses.pull()
    syncing = asyncio.create_task(pauses.keep_in_sync())
    most = context.settings.max_concurrency
    try:
        with context.ceilings.applied(spec.get("targets", {})):
            run = await context.runner.run(
                items,
                strategy=Strategy(spec.get("strategy", "semaphore")),
                concurrency=min(int(spec.get("concurrency") or most), most),
                budget_s=budget_s,
                fail_fast=False,
            )
    finally:
        syncing.cancel()
        await asyncio.gather(syncing, return_exceptions=True)
        await pauses.push()
    ran = iter(run.reports)
    reports = [(number, item if isinstance(item, ItemReport) else next(ran)) for number, item in parsed]
    requests: dict[str, int] = {}
    for item, report in zip(items, run.reports, strict=True):
        requests[item.target] = requests.get(item.target, 0) + report.attempts
    throttled = {name: report.throttled for name, report in run.targets.items() if report.throttled}
    return reports, requests, throttled


def _read_lines(message: RunChunk, files: JobFiles, max_line_bytes: int) -> list[tuple[int, Line]]:
    """The chunk's non-blank lines with their line numbers in the input file."""
    lines = files.read_lines(message.key, max_line_bytes, start=message.start, end=message.end)
    return [(message.first_line + position, line) for position, line in enumerate(lines) if not line.blank]


def _result_lines(reports: list[tuple[int, ItemReport]]) -> Iterator[str]:
    """Each item's results line, in order, letting go of its report (and body) once it is made."""
    reports.reverse()
    while reports:
        number, report = reports.pop()
        yield item_line(report, line=number)


def _parse(number: int, line: Line, context: ChunkContext) -> BatchItem | ItemReport:
    """A line as the runner's item, or its InvalidItem report saying what is wrong with it."""
    if line.data is None:
        most = context.settings.max_body_bytes
        return _invalid(number, line, f"the line is {line.length} bytes; at most {most} ({ENV_PREFIX}MAX_BODY_BYTES)")
    raw = line.data
    try:
        fields = parse_body(raw, "the line")
        if not isinstance(fields, dict):
            raise ValueError("a line must be a JSON object: a /batch request item")
        item = BatchRequestItem.model_validate(fields)
        return to_batch_item(number - 1, item, context.settings, context.scopes)
    except ValidationError as exc:
        return _invalid(number, line, _first_error(exc.errors(include_url=False)))
    except RequestValidationError as exc:  # located as in a /batch body: ("body", "requests", index, field...)
        errors = [{**error, "loc": tuple(error["loc"])[3:]} for error in exc.errors()]
        return _invalid(number, line, _first_error(errors))
    except (BodyError, ValueError) as exc:
        return _invalid(number, line, str(exc))


def _first_error(errors: list[Any]) -> str:
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg', '')}" if where else str(first.get("msg", ""))


def _line_id(number: int, line: Line) -> str:
    """The item's id if its line has a readable one, else the line's number: every result has an id."""
    try:
        fields = None if line.data is None else parse_body(line.data, "the line")
    except (BodyError, ValueError):
        fields = None
    found = fields.get("id") if isinstance(fields, dict) else None
    return found if isinstance(found, str) and 0 < len(found) <= 128 else f"line {number}"


def _invalid(number: int, line: Line, message: str) -> ItemReport:
    return ItemReport(id=_line_id(number, line), attempts=0, elapsed_s=0.0, error=INVALID_ITEM, message=message)


def _skipped(number: int, line: Line) -> ItemReport:
    return ItemReport(id=_line_id(number, line), attempts=0, elapsed_s=0.0, skipped=SKIPPED_CANCELLED)


class _PauseSharing:
    """A target's Retry-After pauses it for every worker: pauses go to the job table and come back."""

    def __init__(self, context: ChunkContext, targets: list[str]) -> None:
        self.context = context
        self.targets = targets

    async def keep_in_sync(self) -> None:
        while True:
            await asyncio.sleep(PAUSE_SYNC_S)
            await self.push()
            await self.pull()

    async def pull(self) -> None:
        if not self.targets:
            return
        shared = await asyncio.to_thread(self.context.store.pauses, self.targets)
        mono, wall = time.monotonic(), now_ms()
        for name, until_ms in shared.items():
            state = self.context.politeness.limiter(name).state
            state.paused_until = max(state.paused_until, mono + (until_ms - wall) / 1000)

    async def push(self) -> None:
        mono, wall = time.monotonic(), now_ms()
        for name in self.targets:
            paused_until = self.context.politeness.limiter(name).state.paused_until
            if paused_until > mono:
                until_ms = wall + int((paused_until - mono) * 1000)
                await asyncio.to_thread(self.context.store.pause, name, until_ms, wall)


async def bury_chunk(message: RunChunk, context: ChunkContext, *, reason: str) -> None:
    """A chunk that came back from the dead-letter queue: each of its items is a ChunkFailed error."""
    store, files = context.store, context.files
    try:
        lines = await asyncio.to_thread(_read_lines, message, files, context.settings.max_body_bytes)
    except Exception:  # whatever kept the chunk from running may keep it from being read
        lines = []
    # by line when the lines can be read, else by count (the input itself may be what failed)
    ids = [(number, _line_id(number, line)) for number, line in lines] or [
        (0, f"chunk {message.index} item {k + 1}") for k in range(message.items)
    ]
    reports = [
        (number, ItemReport(id=id_, attempts=0, elapsed_s=0.0, error=CHUNK_FAILED, message=reason))
        for number, id_ in ids
    ]
    key = results_key(message.job_id, message.index)
    counts = ChunkCounts(failed=len(reports))
    counts = await asyncio.to_thread(files.put_results_once, key, _result_lines(reports), counts)
    buried = await asyncio.to_thread(
        store.bury, message.job_id, message.index, results_key=key, counts=counts, now_ms=now_ms()
    )
    if buried:
        await asyncio.to_thread(finish_if_done, message.job_id, store, files)


def finish_if_done(job_id: str, store: JobStore, files: JobFiles) -> bool:
    """End the job if every chunk is recorded (manifest, then status); True if this call ended it."""
    job = store.get(job_id)
    if job is None or "chunks" not in job or job["chunks_done"] < job["chunks"] or "finished_ms" in job:
        return False
    status = JobStatus(job["status"])
    if status is JobStatus.CANCELLED:
        final = JobStatus.CANCELLED
    elif status is JobStatus.FAILED or job["dead_chunks"]:
        final = JobStatus.FAILED
    else:
        final = JobStatus.SUCCEEDED
    records = sorted(store.chunks(job_id), key=lambda record: record["sk"])
    manifest = {
        "job_id": job_id,
        "status": final.value,
        "total": job.get("total"),
        "succeeded": job["succeeded"],
        "failed": job["failed"],
        "skipped": job["skipped"],
        **({"error": job["error"]} if "error" in job else {}),
        "chunks": [
            {"index": int(record["sk"].removeprefix("chunk#")), "key": record["results_key"], "state": record["state"]}
            for record in records
        ],
    }
    files.put_manifest(job_id, manifest)
    return store.finish(job_id, final, expected=status.value, now_ms=now_ms())
