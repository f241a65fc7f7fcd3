"""The jobs routes: submit (inline, or a file uploaded to a presigned URL), status, cancel, results.

POST /jobs answers 202 at once whatever the job's size: it checks what it can (the
body as /batch checks it, or that the upload exists and is not too large), records
the job, and queues one message to split its input; the cutting into chunks happens
in a worker after the answer. Items of an uploaded file are checked where they run:
a bad line is its item's error in the results.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fanout.batch_api import BatchRequestItem, to_batch_item
from fanout.jobs import messages
from fanout.jobs.files import JobFiles, inline_key, s3_client, upload_key
from fanout.jobs.messages import SplitInput
from fanout.jobs.store import ENDED, JobStatus, JobStore
from fanout.openapi_body import add_components, body_of
from fanout.settings import ENV_PREFIX, ConfigError, Settings
from fanout.strict_json import BodyError, parse_body
from fanout.targets import TargetScope

ID_PATTERN = r"^[0-9a-f]{32}$"
_logger = logging.getLogger(__name__)
RESULTS_PAGE = 1000  # presigned URLs per page of GET /jobs/{id}/results


class TargetLimits(BaseModel):
    """A ceiling for one target, for all of a job's workers together (each takes an equal share)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rate_per_s: float | None = Field(default=None, gt=0, le=100_000)
    max_in_flight: int | None = Field(default=None, ge=1, le=100_000)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    strategy: Literal["sync", "gather", "semaphore"] = "semaphore"
    concurrency: int | None = Field(default=None, ge=1, description="Per worker; clamped to its own limit.")
    targets: dict[str, TargetLimits] = Field(default_factory=dict, description="Job-wide ceilings per target name.")
    requests: list[BatchRequestItem] | None = Field(default=None, min_length=1, description="The items, inline.")
    upload_id: str | None = Field(default=None, pattern=ID_PATTERN, description="Or: a file from POST /jobs/uploads.")

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        if (self.requests is None) == (self.upload_id is None):
            raise ValueError("give either requests (the items inline) or upload_id (a file uploaded), not both")
        seen: set[str] = set()
        for item in self.requests or ():
            if item.id in seen:
                raise ValueError(f"request ids must be unique: {item.id!r} appears more than once")
            seen.add(item.id)
        return self


def _input_line(item: BatchRequestItem) -> bytes:
    """An inline item as a line of the job's input file, as a worker will read it."""
    fields = item.model_dump(by_alias=True, exclude_unset=True)
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _refuse(loc: tuple[str | int, ...], message: str) -> None:
    raise RequestValidationError([{"loc": loc, "msg": message, "type": "value_error", "input": None}])


class JobsApi:
    """The routes' dependencies, one per container."""

    def __init__(self, settings: Settings) -> None:
        missing = [
            f"{ENV_PREFIX}{name.upper()}"
            for name in ("jobs_table", "input_bucket", "results_bucket", "chunk_queue_url")
            if not getattr(settings, name)
        ]
        if missing:
            needed = ", ".join(missing)
            raise ConfigError(f"Invalid configuration: the jobs routes need {needed} (set by template.yaml)")
        self.settings = settings
        self.store = JobStore(boto3.client("dynamodb"), settings.jobs_table, retention_days=settings.job_retention_days)
        self.files = JobFiles(
            s3_client(),
            input_bucket=settings.input_bucket,
            results_bucket=settings.results_bucket,
            url_ttl_s=settings.results_url_ttl_s,
        )
        self.sqs = boto3.client("sqs")
        self.scopes = {name: TargetScope.of(name, target) for name, target in settings.upstreams.items()}

    def read(self, data: bytes) -> JobRequest:
        try:
            parsed = parse_body(data)
        except BodyError as exc:
            raise RequestValidationError([{"loc": ("body",), "msg": str(exc), "type": "json_invalid"}]) from exc
        if not isinstance(parsed, dict):
            _refuse(("body",), "the body must be a JSON object with requests or upload_id")
        try:
            job = JobRequest.model_validate(parsed)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
            ) from exc
        for name in job.targets:
            if name not in self.settings.upstreams:
                allowed = ", ".join(sorted(self.settings.upstreams)) or "none"
                _refuse(("body", "targets", name), f"unknown target; allowed: {allowed}")
        for index, item in enumerate(job.requests or ()):
            to_batch_item(index, item, self.settings, self.scopes)  # unknown targets, headers: a 422 now
        if job.requests is not None and len(job.requests) > self.settings.max_job_items:
            _refuse(
                ("body", "requests"),
                f"at most {self.settings.max_job_items} items per job ({ENV_PREFIX}MAX_JOB_ITEMS)",
            )
        return job

    def submit(self, job: JobRequest) -> str:
        job_id = uuid.uuid4().hex
        if job.upload_id is not None:
            key = upload_key(job.upload_id)
            size = self.files.input_size(key)
            if size is None:
                _refuse(("body", "upload_id"), "no file was uploaded for this upload_id (PUT it to its upload_url)")
            elif size > self.settings.max_upload_bytes:
                most = self.settings.max_upload_bytes
                raise HTTPException(413, f"the upload is {size} bytes; at most {most} ({ENV_PREFIX}MAX_UPLOAD_BYTES)")
        else:
            key = inline_key(job_id)
            lines = [_input_line(item) for item in job.requests or ()]
            for index, line in enumerate(lines):
                if len(line) > self.settings.max_body_bytes:  # a worker would refuse it: written back, 1e5 is 100000.0
                    _refuse(
                        ("body", "requests", index),
                        f"the item is {len(line)} bytes as a line of the job's input; "
                        f"at most {self.settings.max_body_bytes} ({ENV_PREFIX}MAX_BODY_BYTES)",
                    )
            self.files.put_input(key, b"".join(line + b"\n" for line in lines))
        spec = {
            "strategy": job.strategy,
            "concurrency": job.concurrency,
            "targets": {name: limits.model_dump(exclude_none=True) for name, limits in job.targets.items()},
        }
        self.store.create(job_id, input_key=key, spec=spec, now_ms=int(time.time() * 1000))
        messages.send(self.sqs, self.settings.chunk_queue_url, [SplitInput(job_id=job_id, key=key)])
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        total = job.get("total")
        done = job["succeeded"] + job["failed"] + job["skipped"]
        ended_ms = job.get("finished_ms") or job["updated_ms"]
        elapsed_s = max((ended_ms - job["created_ms"]) / 1000, 0.001)
        answer: dict[str, Any] = {
            "job_id": job_id,
            "status": job["status"],
            "total": total,
            "succeeded": job["succeeded"],
            "failed": job["failed"],
            "skipped": job["skipped"],
            "pending": None if total is None else max(total - done, 0),
            "chunks": job.get("chunks"),
            "chunks_done": job["chunks_done"],
            "created_at": _iso(job["created_ms"]),
            "started_at": _iso(job.get("started_ms")),
            "updated_at": _iso(job["updated_ms"]),
            "finished_at": _iso(job.get("finished_ms")),
            "items_per_s": round(done / elapsed_s, 1),
            "targets": {
                name: {
                    "requests": count,
                    "throttled": job["throttled"].get(name, 0),
                    "rate_per_s": round(count / elapsed_s, 1),
                }
                for name, count in sorted(job["requests"].items())
            },
        }
        if "error" in job:
            answer["error"] = job["error"]
        if job["status"] in ENDED and "finished_ms" in job:
            pages = math.ceil((job.get("chunks") or 0) / RESULTS_PAGE)
            answer["results"] = {
                "manifest_url": self.files.results_url(f"results/{job_id}/manifest.json"),
                "pages": pages,
                "first_page": f"/jobs/{job_id}/results?page=0",
            }
        return answer

    def results_page(self, job_id: str, page: int) -> dict[str, Any]:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if "finished_ms" not in job:
            raise HTTPException(409, f"job {job_id} is {job['status']}: its results are complete when it has ended")
        records = sorted(self.store.chunks(job_id), key=lambda record: record["sk"])
        chosen = records[page * RESULTS_PAGE : (page + 1) * RESULTS_PAGE]
        more = (page + 1) * RESULTS_PAGE < len(records)
        return {
            "job_id": job_id,
            "page": page,
            "urls": [self.files.results_url(record["results_key"]) for record in chosen],
            "next_page": f"/jobs/{job_id}/results?page={page + 1}" if more else None,
        }

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if not self.store.cancel(job_id, int(time.time() * 1000)):
            current = self.store.get(job_id) or job
            raise HTTPException(409, f"job {job_id} has ended: {current['status']}")
        return {"job_id": job_id, "status": JobStatus.CANCELLED.value}


#: Error codes of an AWS service that is throttling: a moment's, gone on a retry (botocore's own list is private).
_THROTTLED = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)


def _is_outage(exc: Exception) -> bool:
    """Whether an AWS call failed for the moment (throttled, a 5xx, out of reach) rather than for good."""
    if not isinstance(exc, ClientError):
        return True  # BotoCoreError: the endpoint unreachable, a connection cut, a read timed out
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status >= 500 or status == 429 or exc.response.get("Error", {}).get("Code") in _THROTTLED


async def _aws_failed(_request: Request, exc: Exception) -> JSONResponse:
    """A call to DynamoDB, S3 or SQS failed past botocore's own retries: 503 with Retry-After for an outage,
    502 for a refusal no retry mends (the role's policy); either way what failed, never a bare 500."""
    if isinstance(exc, ClientError):
        said = f"{exc.operation_name}: {exc.response.get('Error', {}).get('Code')}"
    else:
        said = type(exc).__name__
    _logger.error("an AWS call of the jobs failed: %s", said, exc_info=exc)
    if _is_outage(exc):
        message = f"an AWS service the jobs use did not answer ({said}): try again"
        return JSONResponse({"message": message}, status_code=503, headers={"retry-after": "1"})
    return JSONResponse({"message": f"an AWS service the jobs use refused the call ({said})"}, status_code=502)


def add_job_routes(app: FastAPI, settings: Settings) -> None:
    jobs = JobsApi(settings)
    add_components(app, JobRequest)
    app.add_exception_handler(ClientError, _aws_failed)
    app.add_exception_handler(BotoCoreError, _aws_failed)

    @app.post("/jobs/uploads", status_code=201)
    def upload() -> dict[str, Any]:
        """A presigned PUT URL for a JSON Lines file of items (one /batch request item per line)."""
        upload_id = uuid.uuid4().hex
        return {
            "upload_id": upload_id,
            "upload_url": jobs.files.upload_url(upload_id),
            "expires_in_s": settings.results_url_ttl_s,
            "max_bytes": settings.max_upload_bytes,
        }

    @app.post("/jobs", status_code=202, responses={413: {}, 422: {}}, openapi_extra=body_of(JobRequest))
    async def submit(request: Request, response: Response) -> dict[str, Any]:
        data = await request.body()
        if len(data) > settings.max_body_bytes:
            raise HTTPException(
                413,
                f"request body is {len(data)} bytes; at most {settings.max_body_bytes} ({ENV_PREFIX}MAX_BODY_BYTES): "
                "upload larger jobs (POST /jobs/uploads)",
            )
        job_id = jobs.submit(jobs.read(data))
        response.headers["location"] = f"/jobs/{job_id}"
        return {"job_id": job_id, "status": JobStatus.QUEUED.value, "status_url": f"/jobs/{job_id}"}

    @app.get("/jobs/{job_id}", responses={404: {}})
    def status(job_id: str) -> dict[str, Any]:
        return jobs.status(_checked(job_id))

    @app.get("/jobs/{job_id}/results", responses={404: {}, 409: {}})
    def results(job_id: str, page: int = Query(default=0, ge=0)) -> dict[str, Any]:
        return jobs.results_page(_checked(job_id), page)

    @app.delete("/jobs/{job_id}", status_code=202, responses={404: {}, 409: {}})
    def cancel(job_id: str) -> dict[str, Any]:
        return jobs.cancel(_checked(job_id))


def _checked(job_id: str) -> str:
    """A job id is 32 hex digits; anything else names no job (and is never sent to DynamoDB)."""
    if not re.fullmatch(ID_PATTERN, job_id):
        raise HTTPException(404, f"no job {job_id[:64]}")
    return job_id
