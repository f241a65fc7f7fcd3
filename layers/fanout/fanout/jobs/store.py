"""The job table (DynamoDB): jobs, their chunks, and targets' pauses, with conditional writes.

One table, keys `pk` and `sk`:
- a job: `pk = job#{id}`, `sk = job`: status, counts, the input's key, the job's spec;
- its chunks: `pk = job#{id}`, `sk = chunk#{index:07d}`: who holds it (an attempt id and a
  lease), and once done which attempt's results file counts;
- a target's pause: `pk = target#{name}`, `sk = pause`: until when every worker leaves it alone.

Nothing is lost or counted twice, whatever SQS redelivers: a chunk is claimed with a
conditional write (free, or its lease ran out), and recorded in one transaction with
the job's counters on the condition that this attempt still holds it. A redelivered
chunk that is done is acknowledged and skipped; an attempt that lost its lease (it ran
past it, and another took over) leaves its file behind and counts nothing.

DynamoDB refuses a write that meets a transaction on the same item, and cancels a
transaction that meets another write: chunks of one job finishing together all add to
the job's row. botocore retries neither, so every update here is retried on such a
conflict (`_retrying_conflicts`); nothing was written, so a retry writes it once.

Times are integer milliseconds since the epoch; `expires_at` (seconds) is the TTL.
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    wait_random_exponential,
)

_serialize = TypeSerializer().serialize
_deserialize = TypeDeserializer().deserialize
BATCH_GET_KEYS = 100


class JobStatus(enum.StrEnum):
    QUEUED = "queued"  # submitted; its input not yet cut into chunks
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every chunk ran (items may have failed: see the counts)
    FAILED = "failed"  # a chunk could not run (its items are reported failed), or the input could not be read
    CANCELLED = "cancelled"


ENDED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Claim(enum.Enum):
    CLAIMED = "claimed"  # this attempt holds the chunk now
    DONE = "done"  # it was recorded already: nothing to do
    BUSY = "busy"  # another attempt holds an unexpired lease


@dataclass(frozen=True, slots=True)
class ChunkCounts:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # upstream requests sent, per target
    throttled: dict[str, int] = field(default_factory=dict)  # of which answered 429 or 503


def _job_key(job_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"job#{job_id}"}, "sk": {"S": "job"}}


def _chunk_key(job_id: str, index: int) -> dict[str, Any]:
    return {"pk": {"S": f"job#{job_id}"}, "sk": {"S": f"chunk#{index:07d}"}}


def _pause_key(target: str) -> dict[str, Any]:
    return {"pk": {"S": f"target#{target}"}, "sk": {"S": "pause"}}


def _values(**values: Any) -> dict[str, Any]:
    return {f":{name}": _serialize(value) for name, value in values.items()}


def _plain(item: dict[str, Any]) -> dict[str, Any]:
    return {name: _int_if_whole(_deserialize(value)) for name, value in item.items()}


def _int_if_whole(value: Any) -> Any:
    """DynamoDB numbers come back as Decimal; ours are whole numbers."""
    if type(value).__name__ == "Decimal":
        return int(value)
    if isinstance(value, dict):
        return {key: _int_if_whole(inner) for key, inner in value.items()}
    return value


def _cancellation_reasons(exc: BaseException) -> set[str]:
    """Why DynamoDB cancelled a transaction, one code per item ("None" for an item that was fine)."""
    return {reason.get("Code") for reason in getattr(exc, "response", {}).get("CancellationReasons", [])}


def _transaction_condition_failed(exc: Exception) -> bool:
    return "ConditionalCheckFailed" in _cancellation_reasons(exc)


def is_write_conflict(exc: BaseException) -> bool:
    """A write DynamoDB refused because a transaction held the item, or a transaction it cancelled because
    another write did (and for no failed condition: that outcome stands)."""
    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code")
    if code == "TransactionConflictException":
        return True
    if code != "TransactionCanceledException" or _transaction_condition_failed(exc):
        return False
    return "TransactionConflict" in _cancellation_reasons(exc)


@retry(
    retry=retry_if_exception(is_write_conflict),
    wait=wait_random_exponential(multiplier=0.02, max=1.0),  # jittered: the writers that met meet again less
    stop=stop_after_attempt(12),
    reraise=True,
)
def _retrying_conflicts(write: Callable[..., dict[str, Any]], **request: Any) -> dict[str, Any]:
    return write(**request)


_wait = time.sleep  # between reads of keys left unprocessed (a test counts the waits here)


def _left_unread(state: RetryCallState) -> Any:
    """After the last try: the keys still unprocessed, given up on (a pause is read again within a second)."""
    return state.outcome.result() if state.outcome is not None else None


@retry(
    retry=retry_if_result(bool),  # keys left unprocessed: DynamoDB throttled part of the read
    wait=wait_random_exponential(multiplier=0.05, max=1.0),
    stop=stop_after_attempt(10),
    retry_error_callback=_left_unread,
    sleep=lambda seconds: _wait(seconds),
)
def _until_processed(read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`read` again, with a growing jittered wait, while it leaves keys unprocessed (AWS asks for backoff)."""
    return read()


class JobStore:
    """The job table through one boto3 DynamoDB client."""

    def __init__(self, dynamodb: Any, table: str, *, retention_days: int) -> None:
        self.db = dynamodb
        self.table = table
        self.retention_s = retention_days * 86400

    def __repr__(self) -> str:
        return f"JobStore({self.table!r})"

    def _expires(self, now_ms: int) -> int:
        return now_ms // 1000 + self.retention_s

    # --- jobs ---------------------------------------------------------------------------------

    def create(self, job_id: str, *, input_key: str, spec: dict[str, Any], now_ms: int) -> None:
        item = {
            "status": JobStatus.QUEUED.value,
            "input_key": input_key,
            "spec": json.dumps(spec, separators=(",", ":")),
            "created_ms": now_ms,
            "updated_ms": now_ms,
            "chunks_done": 0,
            "dead_chunks": 0,
            "split_sent": 0,
            "succeeded": 0,
            "failed": 0,
            "skipped": 0,
            "expires_at": self._expires(now_ms),
        }
        self.db.put_item(
            TableName=self.table,
            Item={**_job_key(job_id), **{name: _serialize(value) for name, value in item.items()}},
            ConditionExpression="attribute_not_exists(pk)",
        )

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job as plain values (spec parsed), or None if there is none."""
        found = self.db.get_item(TableName=self.table, Key=_job_key(job_id), ConsistentRead=True).get("Item")
        if found is None:
            return None
        job = _plain(found)
        job["spec"] = json.loads(job["spec"])
        job["id"] = job_id
        for kind in ("requests", "throttled"):  # per target: `requests:catalog` -> job["requests"]["catalog"]
            job[kind] = {name.split(":", 1)[1]: job.pop(name) for name in list(job) if name.startswith(f"{kind}:")}
        return job

    def start(self, job_id: str, now_ms: int) -> bool:
        """queued -> running (the split has begun); False if it is not queued (cancelled, or begun)."""
        return self._update_status(
            job_id, JobStatus.RUNNING, expected=JobStatus.QUEUED, now_ms=now_ms, stamp="started_ms"
        )

    def cancel(self, job_id: str, now_ms: int) -> bool:
        """Stop starting chunks; False if the job had ended already."""
        for expected in (JobStatus.QUEUED, JobStatus.RUNNING):
            if self._update_status(job_id, JobStatus.CANCELLED, expected=expected, now_ms=now_ms):
                return True
        return False

    def fail_input(self, job_id: str, reason: str, *, total: int | None, chunks: int, now_ms: int) -> None:
        """The input could not be read to its end: the job will end failed, saying why, once the
        `chunks` already sent (holding `total` items, if known) are recorded."""
        sizes = {"chunks": chunks, **({"total": total} if total is not None else {})}
        try:
            _retrying_conflicts(
                self.db.update_item,
                TableName=self.table,
                Key=_job_key(job_id),
                UpdateExpression="SET #status = :failed, #error = :reason, updated_ms = :now, "
                + ", ".join(f"#{name} = :{name}" for name in sizes),
                ConditionExpression="#status IN (:queued, :running)",
                ExpressionAttributeNames={"#status": "status", "#error": "error", **{f"#{n}": n for n in sizes}},
                ExpressionAttributeValues=_values(
                    failed=JobStatus.FAILED.value,
                    reason=reason,
                    now=now_ms,
                    queued=JobStatus.QUEUED.value,
                    running=JobStatus.RUNNING.value,
                    **sizes,
                ),
            )
        except self.db.exceptions.ConditionalCheckFailedException:  # cancelled meanwhile: that stands
            self.split_done(job_id, total=total or 0, chunks=chunks, now_ms=now_ms)

    def _update_status(
        self, job_id: str, status: JobStatus, *, expected: JobStatus, now_ms: int, stamp: str | None = None
    ) -> bool:
        """expected -> status, also setting the `stamp` attribute to now if given; False if it was not `expected`."""
        try:
            _retrying_conflicts(
                self.db.update_item,
                TableName=self.table,
                Key=_job_key(job_id),
                UpdateExpression="SET #status = :status, updated_ms = :now" + (f", {stamp} = :now" if stamp else ""),
                ConditionExpression="#status = :expected",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues=_values(status=status.value, expected=expected.value, now=now_ms),
            )
        except self.db.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def split_progress(self, job_id: str, sent: int) -> None:
        """How many chunk messages the split has sent: a redelivered split goes on from there."""
        _retrying_conflicts(
            self.db.update_item,
            TableName=self.table,
            Key=_job_key(job_id),
            UpdateExpression="SET split_sent = :sent",
            ExpressionAttributeValues=_values(sent=sent),
        )

    def split_done(self, job_id: str, *, total: int, chunks: int, now_ms: int) -> None:
        """The job's size is known: `total` items in `chunks` chunks."""
        _retrying_conflicts(
            self.db.update_item,
            TableName=self.table,
            Key=_job_key(job_id),
            UpdateExpression="SET #total = :total, chunks = :chunks, split_sent = :chunks, updated_ms = :now",
            ExpressionAttributeNames={"#total": "total"},
            ExpressionAttributeValues=_values(total=total, chunks=chunks, now=now_ms),
        )

    def finish(self, job_id: str, status: JobStatus, *, expected: str, now_ms: int) -> bool:
        """End the job once every chunk is recorded; True for the one caller that ended it."""
        try:
            _retrying_conflicts(
                self.db.update_item,
                TableName=self.table,
                Key=_job_key(job_id),
                UpdateExpression="SET #status = :status, finished_ms = :now, updated_ms = :now",
                ConditionExpression="#status = :expected AND attribute_not_exists(finished_ms) "
                "AND chunks_done >= chunks",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues=_values(status=status.value, expected=expected, now=now_ms),
            )
        except self.db.exceptions.ConditionalCheckFailedException:
            return False
        return True

    # --- chunks -------------------------------------------------------------------------------

    def claim(self, job_id: str, index: int, *, attempt: str, lease_ms: int, now_ms: int) -> Claim:
        try:
            _retrying_conflicts(
                self.db.update_item,
                TableName=self.table,
                Key=_chunk_key(job_id, index),
                UpdateExpression="SET #state = :running, attempt = :attempt, lease_until = :lease, "
                "expires_at = :expires ADD attempts :one",
                ConditionExpression="attribute_not_exists(pk) OR (#state = :running AND lease_until < :now)",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues=_values(
                    running="running",
                    attempt=attempt,
                    lease=now_ms + lease_ms,
                    expires=self._expires(now_ms),
                    one=1,
                    now=now_ms,
                ),
            )
        except self.db.exceptions.ConditionalCheckFailedException:
            chunk = self.chunk(job_id, index)
            return Claim.BUSY if chunk is not None and chunk["state"] == "running" else Claim.DONE
        return Claim.CLAIMED

    def chunk(self, job_id: str, index: int) -> dict[str, Any] | None:
        found = self.db.get_item(TableName=self.table, Key=_chunk_key(job_id, index), ConsistentRead=True).get("Item")
        return None if found is None else _plain(found)

    def commit(
        self, job_id: str, index: int, *, attempt: str, results_key: str, counts: ChunkCounts, now_ms: int
    ) -> bool:
        """Record the chunk done and add its counts to the job's, in one transaction, if this attempt
        still holds it. False: it does not (its lease ran out and another attempt took the chunk)."""
        return self._record(
            job_id,
            index,
            results_key,
            counts,
            now_ms=now_ms,
            dead=False,
            condition="attempt = :attempt AND #state = :running",
            attempt=attempt,
        )

    def bury(self, job_id: str, index: int, *, results_key: str, counts: ChunkCounts, now_ms: int) -> bool:
        """Record a chunk that came back from the dead-letter queue, with the counts of its results file
        (its items as failed, unless an attempt had written their results). False if it was recorded
        already."""
        return self._record(
            job_id,
            index,
            results_key,
            counts,
            now_ms=now_ms,
            dead=True,
            condition="attribute_not_exists(pk) OR #state = :running",  # a chunk never claimed has no row
        )

    def _record(
        self,
        job_id: str,
        index: int,
        results_key: str,
        counts: ChunkCounts,
        *,
        now_ms: int,
        dead: bool,
        condition: str,
        **condition_values: str,
    ) -> bool:
        """The chunk's row (done or dead, its file and counts) and the job's counters, in one transaction,
        if `condition` holds on the chunk's row; False if it does not."""
        chunk_update = {
            "TableName": self.table,
            "Key": _chunk_key(job_id, index),
            "UpdateExpression": "SET #state = :state, results_key = :key, succeeded = :succeeded, failed = :failed, "
            "skipped = :skipped, done_ms = :now, expires_at = :expires",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": {"#state": "state"},
            "ExpressionAttributeValues": _values(
                state="dead" if dead else "done",
                running="running",
                key=results_key,
                succeeded=counts.succeeded,
                failed=counts.failed,
                skipped=counts.skipped,
                now=now_ms,
                expires=self._expires(now_ms),
                **condition_values,
            ),
        }
        names = {}
        values = _values(
            one=1,
            succeeded=counts.succeeded,
            failed=counts.failed,
            skipped=counts.skipped,
            dead=1 if dead else 0,
            now=now_ms,
        )
        adds = ["chunks_done :one", "succeeded :succeeded", "failed :failed", "skipped :skipped", "dead_chunks :dead"]
        for kind, per_target in (("requests", counts.requests), ("throttled", counts.throttled)):
            for position, (target, count) in enumerate(sorted(per_target.items())):
                name, value = f"#{kind[0]}{position}", f":{kind[0]}{position}"
                names[name] = f"{kind}:{target}"  # a top-level counter per target: ADD is atomic there
                values[value] = _serialize(count)
                adds.append(f"{name} {value}")
        job_update = {
            "TableName": self.table,
            "Key": _job_key(job_id),
            "UpdateExpression": "SET updated_ms = :now ADD " + ", ".join(adds),
            "ConditionExpression": "attribute_exists(pk)",
            "ExpressionAttributeValues": values,
            **({"ExpressionAttributeNames": names} if names else {}),
        }
        try:
            _retrying_conflicts(
                self.db.transact_write_items, TransactItems=[{"Update": chunk_update}, {"Update": job_update}]
            )
        except self.db.exceptions.TransactionCanceledException as exc:
            if _transaction_condition_failed(exc):
                return False
            raise
        return True

    def chunks(self, job_id: str) -> list[dict[str, Any]]:
        """Every chunk record of a job, in order (a page of the query at a time)."""
        found: list[dict[str, Any]] = []
        pages = self.db.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression="pk = :pk AND begins_with(sk, :chunk)",
            ExpressionAttributeValues=_values(pk=f"job#{job_id}", chunk="chunk#"),
            ConsistentRead=True,
        )
        for page in pages:
            found += [_plain(item) for item in page["Items"]]
        return found

    # --- targets' pauses ----------------------------------------------------------------------

    def pause(self, target: str, until_ms: int, now_ms: int) -> None:
        """Pause a target for every worker until `until_ms` (never shortening a pause)."""
        with contextlib.suppress(self.db.exceptions.ConditionalCheckFailedException):  # a longer one holds
            _retrying_conflicts(
                self.db.update_item,
                TableName=self.table,
                Key=_pause_key(target),
                UpdateExpression="SET paused_until = :until, expires_at = :expires",
                ConditionExpression="attribute_not_exists(paused_until) OR paused_until < :until",
                ExpressionAttributeValues=_values(until=until_ms, expires=until_ms // 1000 + 86400),
            )

    def pauses(self, targets: list[str]) -> dict[str, int]:
        """Until when each of these targets is paused (milliseconds), for those that have a pause."""
        found: dict[str, int] = {}
        for start in range(0, len(targets), BATCH_GET_KEYS):
            keys = [_pause_key(target) for target in targets[start : start + BATCH_GET_KEYS]]
            request = {self.table: {"Keys": keys, "ConsistentRead": True}}

            def read() -> dict[str, Any]:
                nonlocal request
                answer = self.db.batch_get_item(RequestItems=request)
                for item in answer["Responses"].get(self.table, []):
                    plain = _plain(item)
                    found[plain["pk"].removeprefix("target#")] = plain["paused_until"]
                request = answer.get("UnprocessedKeys") or {}
                return request

            _until_processed(read)
        return found
