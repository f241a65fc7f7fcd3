"""The worker: the SQS handler that splits inputs and runs chunks, with partial batch failures.

Powertools' AsyncBatchProcessor runs a batch's records at once on the container's one
loop (with the pooled client and the targets' limiters of `fanout.batch`) and answers
`batchItemFailures` for the records that raised: only those come back (after their
visibility timeout), the rest are deleted. A record that keeps failing goes to the
dead-letter queue after the queue's maxReceiveCount; the worker also consumes that
queue, where a chunk is buried (each item a ChunkFailed error) and a split fails its
job, so that no job waits forever for a chunk that will never run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import tempfile
from typing import Any

import boto3
from aws_lambda_powertools.utilities.batch import AsyncBatchProcessor, EventType, async_process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from fanout.budget import call_budget_s
from fanout.jobs.chunk import ChunkContext, bury_chunk, finish_if_done, now_ms, run_chunk
from fanout.jobs.files import JobFiles, s3_client
from fanout.jobs.messages import SplitInput, decode
from fanout.jobs.split import SplitQueue, split_input
from fanout.jobs.store import JobStore
from fanout.runner import build_runner
from fanout.settings import ConfigError, Settings
from fanout.transports import MAX_HEAD_BYTES

DEAD_LETTER_REASON = "the chunk failed on every delivery and was moved to the dead-letter queue"
REQUIRED = ("jobs_table", "input_bucket", "results_bucket", "chunk_queue_url", "dead_letter_queue_arn")
ANSWERS_SHARE = 0.5  # of the worker's memory, for the upstream answers its chunks hold at once
RESULTS_LINE_FIELDS = 4096  # a results line's id, line number, status, timings and error message, written out
_logger = logging.getLogger(__name__)  # the Lambda runtime's handler writes it to the function's log


class Worker:
    """One per container: the clients and the runner, kept across warm invocations."""

    def __init__(self, settings: Settings, *, timeout_s: float, memory_mb: int) -> None:
        missing = [f"FANOUT_{name.upper()}" for name in REQUIRED if not getattr(settings, name)]
        if missing:
            raise ConfigError(f"Invalid configuration: the worker needs {', '.join(missing)} (set by template.yaml)")
        check_answers_fit(settings, memory_mb)
        check_results_fit(settings, shutil.disk_usage(tempfile.gettempdir()).free)
        self.settings = settings
        runner = build_runner(settings)
        self.sqs = boto3.client("sqs")
        self.context = ChunkContext(
            settings=settings,
            store=JobStore(boto3.client("dynamodb"), settings.jobs_table, retention_days=settings.job_retention_days),
            files=JobFiles(
                s3_client(),
                input_bucket=settings.input_bucket,
                results_bucket=settings.results_bucket,
                url_ttl_s=settings.results_url_ttl_s,
            ),
            runner=runner,
            politeness=runner.politeness,
            lease_s=timeout_s,
        )
        self.processor = AsyncBatchProcessor(event_type=EventType.SQS)

    def handle(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        self._lambda_context = context
        return async_process_partial_response(
            event=event, record_handler=self.record, processor=self.processor, context=context
        )

    async def record(self, record: SQSRecord) -> None:
        dead = record.event_source_arn == self.settings.dead_letter_queue_arn
        try:
            message = decode(record.body)
        except ValueError as exc:
            if not dead:
                raise  # back to the queue, then on to the dead-letter queue after its receives
            # No queue follows this one: failing it would bring it back every visibility timeout until
            # the queue's retention drops it. It carries no job (none of ours could read it): logged, dropped.
            _logger.error("dropped a dead letter that is not a chunk queue message: %r", str(exc))
            return
        context = self.context
        if isinstance(message, SplitInput):
            if dead:
                await asyncio.to_thread(self._fail_split, message)
            else:
                await asyncio.to_thread(self._split, message)
        elif dead:
            await bury_chunk(message, context, reason=DEAD_LETTER_REASON)
        else:
            # A chunk may take the worker's whole timeout (its lease), less the margin to record it.
            budget = call_budget_s(None, context.lease_s, self._lambda_context)
            await run_chunk(message, context, budget_s=budget)

    def _split(self, message: SplitInput) -> None:
        context = self.context
        split_input(
            message,
            store=context.store,
            files=context.files,
            queue=SplitQueue(self.sqs, self.settings.chunk_queue_url),
            chunk_items=self.settings.chunk_items,
            max_items=self.settings.max_job_items,
            max_line_bytes=self.settings.max_body_bytes,
            now_ms=now_ms,
        )
        finish_if_done(message.job_id, context.store, context.files)

    def _fail_split(self, message: SplitInput) -> None:
        store = self.context.store
        job = store.get(message.job_id)
        if job is None:
            return
        reason = "the input could not be cut into chunks: " + DEAD_LETTER_REASON.removeprefix("the chunk ")
        store.fail_input(message.job_id, reason, total=None, chunks=int(job["split_sent"]), now_ms=now_ms())
        finish_if_done(message.job_id, store, self.context.files)


def lambda_memory_mb() -> int:
    """The function's memory, as Lambda (and make run, and sam local) tell it."""
    given = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
    if not given.isdigit():
        raise ConfigError(
            f"Invalid configuration: AWS_LAMBDA_FUNCTION_MEMORY_SIZE (got {given!r}) must be the function's memory "
            "in MB, as Lambda sets it"
        )
    return int(given)


def results_line_most(max_item_bytes: int) -> int:
    """The longest results line an item can make: its body in base64 (fanout.batch_response writes any
    body that would take more as base64), its headers written out (escapes double a quote, U+FFFD takes
    three bytes for one that is not UTF-8) and the line's other fields."""
    return 4 * math.ceil(max_item_bytes / 3) + 3 * MAX_HEAD_BYTES + RESULTS_LINE_FIELDS


def check_results_fit(settings: Settings, tmp_free_bytes: int) -> None:
    """An invocation's chunks spool their results files to /tmp (past SPOOL_BYTES each) before they go to
    S3, at once. Lambda's /tmp is what the function's EphemeralStorage says (512 MB if nothing): results
    that could fill it would fail a chunk that met large answers on every delivery. Refused at cold start,
    as check_answers_fit refuses for memory."""
    batch, items, each = settings.worker_batch_size, settings.chunk_items, settings.max_item_bytes
    line = results_line_most(each)
    most = batch * items * line
    if most > tmp_free_bytes:
        raise ConfigError(
            f"Invalid configuration: FANOUT_WORKER_BATCH_SIZE ({batch}) x FANOUT_CHUNK_ITEMS ({items}) x results "
            f"lines of up to {line} bytes (FANOUT_MAX_ITEM_BYTES ({each}) in base64, {MAX_HEAD_BYTES} of headers "
            f"written out) is {most / 2**20:.0f} MiB of results files on /tmp at once, over its "
            f"{tmp_free_bytes / 2**20:.0f} MiB free: lower ChunkItems or WorkerBatchSize, or raise WorkerTmpSize"
        )


def check_answers_fit(settings: Settings, memory_mb: int) -> None:
    """A chunk holds each item's answer (its body cut at FANOUT_MAX_ITEM_BYTES, its headers at most
    MAX_HEAD_BYTES) until its results are written, and an invocation runs its batch's chunks at once.
    If that could fill the worker, a chunk that meets large answers would kill it on every delivery:
    refuse the configuration at cold start instead."""
    batch, items, each = settings.worker_batch_size, settings.chunk_items, settings.max_item_bytes
    most, room = batch * items * (each + MAX_HEAD_BYTES), int(memory_mb * 2**20 * ANSWERS_SHARE)
    if most > room:
        raise ConfigError(
            f"Invalid configuration: FANOUT_WORKER_BATCH_SIZE ({batch}) x FANOUT_CHUNK_ITEMS ({items}) x "
            f"(FANOUT_MAX_ITEM_BYTES ({each}) + {MAX_HEAD_BYTES} of headers) is {most / 2**20:.0f} MiB of "
            f"upstream answers held at once, over half the worker's memory ({memory_mb} MB, "
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE): lower ChunkItems or WorkerBatchSize, or raise WorkerMemorySize"
        )
