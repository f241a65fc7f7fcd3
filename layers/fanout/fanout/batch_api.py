"""POST /batch: the contract (models), and the translation between it and `fanout.batch`.

A caller names a target, never a host: `target` must be a key of
FANOUT_UPSTREAMS and `path` is appended to that target's base URL, so this is the
only way a request chooses where it goes. Headers pass an allowlist. The budget
is the smallest of the caller's `deadline_s`, FANOUT_DEADLINE_S and what Lambda
has left minus a margin, so the answer always goes out.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from fanout.batch import BatchItem, BatchRun, ItemReport
from fanout.engine import Strategy
from fanout.observability import CallReport, Telemetry, call_span
from fanout.settings import ENV_PREFIX, Settings
from fanout.targets import TargetScope, check_path, target_url

#: Request headers a caller may set; anything else is refused with a 422 naming it.
ALLOWED_HEADERS = frozenset(
    {
        "accept",
        "accept-language",
        "cache-control",
        "content-type",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-unmodified-since",
        "prefer",
        "x-correlation-id",
        "x-request-id",
    }
)
#: Response headers never passed back: hop-by-hop, and cookies meant for this service.
DROPPED_RESPONSE_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade", "set-cookie"}
)
LAMBDA_MARGIN_S = 1.0  # time kept back from Lambda's remaining time to serialise and return

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class BatchRequestItem(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(min_length=1, max_length=128)
    method: Method = "GET"
    target: str = Field(min_length=1, description="A name from the function's FANOUT_UPSTREAMS.")
    path: Annotated[str, AfterValidator(check_path)] = Field(
        default="/",
        max_length=2048,
        pattern=r"^/([^/\s\\?#][^\s\\?#]*)?$",
        description="Appended to the target's base URL; never '.' or '..' segments, also percent-encoded.",
    )
    query: dict[str, str | int | float | bool] = Field(default_factory=dict)
    headers: dict[str, Annotated[str, Field(pattern=r"^[^\r\n]*$")]] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json", description="A JSON body (sent as application/json).")
    body: str | None = Field(default=None, description="A text body, sent as is.")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)

    @model_validator(mode="after")
    def _one_body(self) -> BatchRequestItem:
        if "json_body" in self.model_fields_set and self.body is not None:
            raise ValueError("give either json or body, not both")
        return self


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["sync", "gather", "semaphore"] = "semaphore"
    concurrency: int | None = Field(default=None, ge=1, description="Clamped to FANOUT_MAX_CONCURRENCY.")
    deadline_s: float | None = Field(default=None, gt=0, description="Capped by FANOUT_DEADLINE_S and Lambda's.")
    fail_fast: bool = False
    tolerated_failure_percentage: float | None = Field(default=None, ge=0, le=100)
    requests: list[BatchRequestItem] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> BatchRequest:
        seen: set[str] = set()
        for item in self.requests:
            if item.id in seen:
                raise ValueError(f"request ids must be unique: {item.id!r} appears more than once")
            seen.add(item.id)
        return self


def add_batch_route(app: FastAPI, settings: Settings, run: Any, telemetry: Telemetry) -> None:
    """Register POST /batch; `run(items, strategy=..., concurrency=..., budget_s=..., fail_fast=...)`."""
    scopes = {name: TargetScope.of(name, target) for name, target in settings.upstreams.items()}

    async def body_within_limit(request: Request) -> None:
        size = len(await request.body())
        if size > settings.max_body_bytes:
            raise HTTPException(
                413, f"request body is {size} bytes; at most {settings.max_body_bytes} ({ENV_PREFIX}MAX_BODY_BYTES)"
            )

    @app.post("/batch", dependencies=[Depends(body_within_limit)], responses={502: {}, 413: {}})
    async def batch(call: BatchRequest, request: Request) -> JSONResponse:
        """Send a list of different requests to named upstreams; every one comes back, in order."""
        if len(call.requests) > settings.max_requests:
            _refuse(
                ("body", "requests"),
                f"at most {settings.max_requests} requests per call "
                f"({ENV_PREFIX}MAX_REQUESTS), got {len(call.requests)}",
            )
        items = [_to_item(index, item, settings, scopes) for index, item in enumerate(call.requests)]
        concurrency = min(call.concurrency or settings.max_concurrency, settings.max_concurrency)
        budget = _budget_s(call.deadline_s, settings.deadline_s, request.scope.get("aws.context"))
        with call_span("batch", call.strategy, len(items)):
            result: BatchRun = await run(
                items,
                strategy=Strategy(call.strategy),
                concurrency=concurrency,
                budget_s=budget,
                fail_fast=call.fail_fast,
            )
        telemetry.report(
            CallReport(
                function="batch",
                strategy=call.strategy,
                concurrency=result.concurrency,
                elapsed_s=result.elapsed_s,
                deadline_s=budget,
                requests=result.records(items),
                rate_limit_waits=result.rate_limit_waits,
                rate_limit_wait_s=result.rate_limit_wait_s,
            )
        )
        return _envelope(call, result, settings.max_response_bytes)


def _refuse(loc: tuple[str | int, ...], message: str, given: Any = None) -> None:
    raise RequestValidationError([{"loc": loc, "msg": message, "type": "value_error", "input": given}])


def _to_item(index: int, item: BatchRequestItem, settings: Settings, scopes: dict[str, TargetScope]) -> BatchItem:
    target = settings.upstreams.get(item.target)
    if target is None:
        allowed = ", ".join(sorted(settings.upstreams)) or f"none: {ENV_PREFIX}UPSTREAMS is empty"
        _refuse(("body", "requests", index, "target"), f"unknown target; allowed: {allowed}", item.target)
        raise AssertionError  # pragma: no cover - _refuse raises
    allowed_headers = ALLOWED_HEADERS | ({"authorization"} if target.forward_authorization else set())
    for name in item.headers:
        if name.lower() not in allowed_headers:
            _refuse(
                ("body", "requests", index, "headers", name),
                f"header not allowed; allowed: {', '.join(sorted(allowed_headers))}",
                name,
            )
    headers = dict(item.headers)
    body: bytes | None = None
    if "json_body" in item.model_fields_set:
        body = json.dumps(item.json_body).encode()
        if not any(name.lower() == "content-type" for name in headers):  # the caller's own wins, sent once
            headers["content-type"] = "application/json"
    elif item.body is not None:
        body = item.body.encode()
    return BatchItem(
        id=item.id,
        method=item.method,
        url=target_url(str(target.url), item.path, item.query),
        headers=headers,
        body=body,
        scope=scopes[item.target],
        idempotency_key=item.idempotency_key,
        path=item.path,
    )


def _budget_s(asked: float | None, configured: float, context: Any) -> float:
    budget = min(asked or math.inf, configured)
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        budget = min(budget, context.get_remaining_time_in_millis() / 1000 - LAMBDA_MARGIN_S)
    return max(budget, 0.001)


def _envelope(call: BatchRequest, result: BatchRun, max_bytes: int) -> JSONResponse:
    responses = [_response_json(report) for report in result.reports]
    dropped = _fit(responses, max_bytes)
    succeeded = sum(report.ok for report in result.reports)
    skipped = sum(report.skipped is not None for report in result.reports)
    failed = len(result.reports) - succeeded - skipped
    summary = {
        "succeeded": succeeded,
        "failed": failed,
        "skipped": skipped,
        "elapsed_ms": round(result.elapsed_s * 1000, 1),
        "strategy": call.strategy,
        "concurrency": result.concurrency,
        "bodies_dropped": dropped,
    }
    tolerated = call.tolerated_failure_percentage
    over = tolerated is not None and (failed + skipped) * 100 / len(result.reports) > tolerated
    return JSONResponse({"responses": responses, "summary": summary}, status_code=502 if over else 200)


def _response_json(report: ItemReport) -> dict[str, Any]:
    out: dict[str, Any] = {"id": report.id}
    if report.response is not None:
        response = report.response
        out["status"] = response.status
        out["headers"] = {k: v for k, v in response.headers.items() if k not in DROPPED_RESPONSE_HEADERS}
        out.update(_decode_body(response.body, response.headers.get("content-type", ""), response.truncated))
    elif report.skipped is not None:
        out["skipped"] = report.skipped
    else:
        out["error"] = {"type": report.error, "message": report.message}
    out["attempts"] = report.attempts
    out["elapsed_ms"] = round(report.elapsed_s * 1000, 1)
    return out


def _decode_body(data: bytes, content_type: str, truncated: bool) -> dict[str, Any]:
    """JSON is parsed, text is a string, anything else base64; a cut body is never parsed."""
    out: dict[str, Any] = {"truncated": True} if truncated else {}
    media = content_type.split(";")[0].strip().lower()
    if not data:
        out["body"] = None
        return out
    if not truncated and (media == "application/json" or media.endswith("+json")):
        try:
            out["body"] = json.loads(data)
            return out
        except ValueError:
            pass
    try:
        out["body"] = data.decode("utf-8")
    except UnicodeDecodeError:
        out["body"], out["encoding"] = base64.b64encode(data).decode(), "base64"
    return out


def _fit(responses: list[dict[str, Any]], max_bytes: int) -> int:
    """Drop bodies, largest first, until the whole answer fits under `max_bytes`; count them."""
    size = len(json.dumps(responses))
    if size <= max_bytes:
        return 0
    by_size = sorted(
        (len(json.dumps(r.get("body"))), index) for index, r in enumerate(responses) if r.get("body") is not None
    )
    dropped = 0
    while size > max_bytes and by_size:
        body_size, index = by_size.pop()
        responses[index]["body"] = None
        responses[index]["body_dropped"] = True
        responses[index].pop("encoding", None)
        size -= body_size - len('null, "body_dropped": true')
        dropped += 1
    return dropped
