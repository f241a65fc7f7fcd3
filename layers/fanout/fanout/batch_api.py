"""POST /batch: the contract (models), and the translation between it and `fanout.batch`.

A caller names a target, never a host: `target` must be a key of
FANOUT_UPSTREAMS and `path` is appended to that target's base URL, so this is the
only way a request chooses where it goes. Headers pass an allowlist. The budget
is the smallest of the caller's `deadline_s`, FANOUT_DEADLINE_S and what Lambda
has left minus a margin (fanout.budget), so the answer always goes out.

The body is read as JSON whatever its Content-Type says (`curl -d` sends a form
type), and strictly (fanout.strict_json): NaN, Infinity, 1e400, lone surrogates
and deep nesting are a 422 naming the field, never a 500 while answering.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, NoReturn

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fanout.batch import BatchItem, BatchRun
from fanout.batch_response import fits, render
from fanout.budget import call_budget_s
from fanout.engine import Strategy
from fanout.held_answers import HELD_ANSWERS_FACTOR
from fanout.observability import CallReport, CallTally, Telemetry, call_span
from fanout.openapi_body import add_components, body_of
from fanout.settings import ENV_PREFIX, Settings
from fanout.strict_json import BodyError, encode_json, parse_body
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
MAX_JSON_DEPTH = 64  # levels of arrays and objects in a field; a JSON body deeper than that is refused
#: What an HTTP field value may not hold (RFC 9110, 5.5): controls but the tab, and DEL.
_NOT_IN_A_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _check_header_value(value: str) -> str:
    """Refused here, naming the header, rather than failing the item later in the client library."""
    if _NOT_IN_A_HEADER_VALUE.search(value):
        raise ValueError("must not contain control characters (only visible characters, spaces and tabs)")
    return value


class BatchRequestItem(BaseModel):
    """One request. Strings are checked as text by pydantic (a lone surrogate is `string_unicode`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

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
    headers: dict[str, Annotated[str, AfterValidator(_check_header_value)]] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json", description="A JSON body (sent as application/json).")
    body: str | None = Field(default=None, description="A text body, sent as is.")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)

    @model_validator(mode="before")
    @classmethod
    def _text_and_depth(cls, item: Any) -> Any:
        """pydantic checks a plain str as text, but not a dict's keys nor a str in a union (`str | None`);
        and JSON nested past MAX_JSON_DEPTH is refused here, before anything recurses through it."""
        for name, value in item.items() if isinstance(item, dict) else ():
            _check_text_and_depth(name, value)
        return item

    @field_validator("query", mode="before")
    @classmethod
    def _finite_numbers(cls, query: Any) -> Any:
        """What pydantic lets through a str | int | float | bool union: NaN, Infinity."""
        for key, value in query.items() if isinstance(query, dict) else ():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key!r}: numbers must be finite (NaN, Infinity and 1e400 are not JSON numbers)")
        return query

    @field_validator("json_body")
    @classmethod
    def _writable_json(cls, value: Any) -> Any:
        encode_json(value)  # raises, saying what JSON cannot carry
        return value

    @model_validator(mode="after")
    def _one_body(self) -> BatchRequestItem:
        if "json_body" in self.model_fields_set and self.body is not None:
            raise ValueError("give either json or body, not both")
        return self


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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


def _check_text_and_depth(name: str, value: Any) -> None:
    """ValueError naming `name` if a lone surrogate is in any string of `value` (keys included), or if it
    nests past MAX_JSON_DEPTH. A loop, not recursion: it must work at any depth."""
    pending = [(value, 0)]
    while pending:
        current, depth = pending.pop()
        if isinstance(current, str):
            if not current.isascii() and any("\ud800" <= char <= "\udfff" for char in current):
                raise ValueError(f"{name}: holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape), which is not text")
        elif isinstance(current, dict | list):
            if depth == MAX_JSON_DEPTH:
                raise ValueError(f"{name}: nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
            children = [*current, *current.values()] if isinstance(current, dict) else current
            pending.extend((child, depth + 1) for child in children)


def read_batch(data: bytes) -> BatchRequest:
    """The body as a BatchRequest, or a RequestValidationError whose message names the field."""
    try:
        parsed = parse_body(data)
    except BodyError as exc:
        _refuse(("body",), str(exc), None, kind="json_invalid")
    if not isinstance(parsed, dict):
        kind = "an array" if isinstance(parsed, list) else f"a {type(parsed).__name__}".replace("NoneType", "null")
        _refuse(("body",), f"the body must be a JSON object with a requests list, not {kind}", None)
    try:
        return BatchRequest.model_validate(parsed)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        ) from exc


def add_batch_route(app: FastAPI, settings: Settings, run: Any, telemetry: Telemetry) -> None:
    """Register POST /batch; `run(items, strategy=..., concurrency=..., budget_s=..., fail_fast=...)`."""
    scopes = {name: TargetScope.of(name, target) for name, target in settings.upstreams.items()}
    add_components(app, BatchRequest)

    @app.post(
        "/batch",
        responses={502: {}, 413: {}, 422: {}},
        openapi_extra=body_of(BatchRequest),  # the route reads the body itself
    )
    async def batch(request: Request) -> Response:
        """Send a list of different requests to named upstreams; every one comes back, in order."""
        data = await request.body()
        if len(data) > settings.max_body_bytes:
            raise HTTPException(
                413,
                f"request body is {len(data)} bytes; at most {settings.max_body_bytes} ({ENV_PREFIX}MAX_BODY_BYTES)",
            )
        call = read_batch(data)
        if len(call.requests) > settings.max_requests:
            _refuse(
                ("body", "requests"),
                f"at most {settings.max_requests} requests per call "
                f"({ENV_PREFIX}MAX_REQUESTS), got {len(call.requests)}",
            )
        if not fits([item.id for item in call.requests], settings.max_response_bytes):
            _refuse(
                ("body", "requests"),
                f"the answer to {len(call.requests)} requests with these ids would not fit "
                f"{ENV_PREFIX}MAX_RESPONSE_BYTES ({settings.max_response_bytes}); send fewer, or shorter ids",
            )
        items = [to_batch_item(index, item, settings, scopes) for index, item in enumerate(call.requests)]
        concurrency = min(call.concurrency or settings.max_concurrency, settings.max_concurrency)
        budget = call_budget_s(call.deadline_s, settings.deadline_s, request.scope.get("aws.context"))
        with call_span("batch", call.strategy, len(items)):
            result: BatchRun = await run(
                items,
                strategy=Strategy(call.strategy),
                concurrency=concurrency,
                budget_s=budget,
                fail_fast=call.fail_fast,
                held_bytes=HELD_ANSWERS_FACTOR * settings.max_response_bytes,
            )
        telemetry.report(
            CallReport(
                function="batch",
                strategy=call.strategy,
                concurrency=result.concurrency,
                elapsed_s=result.elapsed_s,
                deadline_s=budget,
                tally=CallTally(result.records(items)),
                rate_limit_waits=result.rate_limit_waits,
                rate_limit_wait_s=result.rate_limit_wait_s,
                targets=result.targets,
            )
        )
        return _answer(call, result, settings.max_response_bytes)


def _refuse(loc: tuple[str | int, ...], message: str, given: Any = None, *, kind: str = "value_error") -> NoReturn:
    raise RequestValidationError([{"loc": loc, "msg": message, "type": kind, "input": given}])


def to_batch_item(index: int, item: BatchRequestItem, settings: Settings, scopes: dict[str, TargetScope]) -> BatchItem:
    """A validated request as the runner's item; a RequestValidationError naming the field for an unknown
    target or a header the caller may not set (POST /batch, and each line of a job)."""
    target = settings.upstreams.get(item.target)
    if target is None:
        allowed = ", ".join(sorted(settings.upstreams)) or f"none: {ENV_PREFIX}UPSTREAMS is empty"
        _refuse(("body", "requests", index, "target"), f"unknown target; allowed: {allowed}", item.target)
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
        body = encode_json(item.json_body)
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


def _answer(call: BatchRequest, result: BatchRun, max_bytes: int) -> Response:
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
    }
    tolerated = call.tolerated_failure_percentage
    over = tolerated is not None and (failed + skipped) * 100 / len(result.reports) > tolerated
    rendered = render(result.reports, summary, max_bytes)
    return Response(rendered.body, status_code=502 if over else 200, media_type="application/json")
