"""The web layer: the three seed routes over the engine, POST /batch (fanout.batch_api) and the
jobs (fanout.jobs.api), each function with only its own routes (FANOUT_ROUTES).

Validation happens here, before any work: `n` above the function's
`FANOUT_MAX_REQUESTS` is a 422 naming the limit, so n = 10**9 allocates nothing.
A 422 is written whatever the input held (NaN, a lone surrogate, deep nesting):
the input is shown as a bounded repr, never re-encoded as JSON.
"""

import math
import reprlib
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Path, Request
from fastapi._compat import shared as fastapi_compat
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fanout.budget import call_budget_s
from fanout.engine import DEADLINE_EXCEEDED, FanoutResult, Strategy, fan_out
from fanout.observability import (
    CallReport,
    CallTally,
    Telemetry,
    UpstreamRecord,
    call_span,
    span_records,
    timed_attempt,
    traced_attempt,
)
from fanout.politeness import Politeness, retry_after_seconds
from fanout.runner import build_politeness, build_runner, build_transport
from fanout.settings import Settings, load_settings
from fanout.transports import Transport

_DESCRIBED = {
    Strategy.SYNC: "synchronously",
    Strategy.GATHER: "asynchronously",
    Strategy.SEMAPHORE: "asynchronously (with semaphore)",
}


def _check_pydantic_v1_only_once_imported() -> None:
    """Keep FastAPI from importing pydantic.v1 (some 20 ms of a 300 ms cold start) only to learn that
    a route's parameter is no pydantic.v1 model: no such model exists before pydantic.v1 is imported,
    so FastAPI's own check (and its refusal of v1 models) runs from then on. FastAPI 0.163 imports
    it at the first route with a parameter; fastapi/fastapi#16374 proposed this condition there."""
    is_v1_model = fastapi_compat.is_pydantic_v1_model_class

    def is_pydantic_v1_model_class(cls: Any) -> bool:
        return "pydantic.v1" in sys.modules and is_v1_model(cls)

    fastapi_compat.is_pydantic_v1_model_class = is_pydantic_v1_model_class


_check_pydantic_v1_only_once_imported()

#: The name FANOUT_TARGET_URL goes by in logs, metrics and spans.
SEED_TARGET = "default"


def create_app(
    settings: Settings | None = None, transport: Transport | None = None, telemetry: Telemetry | None = None
) -> FastAPI:
    """Build the app for one function; settings and telemetry come from the environment unless given.

    The routes are the function's own (FANOUT_ROUTES): a seed function never imports what POST
    /batch or the jobs need, so its cold start does not pay for them.
    """
    settings = settings or load_settings()
    telemetry = telemetry or Telemetry.from_env()
    transport = transport or build_transport(settings)
    politeness = build_politeness(settings)
    app = FastAPI(title="fanout", summary="Fan one call out to many upstream requests, bounded.")
    app.state.settings = settings
    app.state.transport = transport
    app.state.telemetry = telemetry
    app.state.politeness = politeness
    app.add_exception_handler(RequestValidationError, _explain_validation_error)
    if settings.routes in ("all", "sync", "async", "async_sem"):
        _add_seed_routes(app, settings, transport, politeness, telemetry)
    if settings.routes in ("all", "batch"):
        from fanout.batch_api import add_batch_route

        add_batch_route(app, settings, build_runner(settings, transport, politeness).run, telemetry)
    if settings.routes == "jobs" or (settings.routes == "all" and settings.jobs_table):
        from fanout.jobs.api import add_job_routes  # boto3 is imported only where it is used

        add_job_routes(app, settings)
    return app


def _add_seed_routes(
    app: FastAPI, settings: Settings, transport: Transport, politeness: Politeness, telemetry: Telemetry
) -> None:
    """GET /sync/{n}, /async/{n} and /async_sem/{n}/{k} (or the one FANOUT_ROUTES names): n requests to
    FANOUT_TARGET_URL."""
    target = str(settings.target_url)
    target_path = urlsplit(target).path or "/"

    async def run(function: str, strategy: Strategy, n: int, concurrency: int, request: Request) -> dict[str, Any]:
        budget = call_budget_s(None, settings.deadline_s, request.scope.get("aws.context"))
        latencies: dict[int, list[float]] = {}  # by index, from its start: not n empty lists before the first

        seed = politeness.limiter(SEED_TARGET)
        since = politeness.counters()
        deadline = time.monotonic() + budget
        get_status = partial(transport.get_status, target)  # built once: it runs for every request
        tally = CallTally()

        with call_span(function, strategy.value, n):
            traced = span_records()

            async def send(index: int) -> int:
                latencies_ms: list[float] = []
                latencies[index] = latencies_ms
                # The limiter's calls by hand, not `async with seed.attempt(...)`: the attempt object and its
                # `async with` were some 2 us of a request's 40 (5 % of a call to a fast target).
                probe = False if seed.enter_at_once() else await seed.admit(deadline)
                sent_at = time.monotonic()
                try:
                    if traced:
                        answer = await traced_attempt(
                            get_status,
                            target=SEED_TARGET,
                            method="GET",
                            path=target_path,
                            status_of=_status_of,
                            latencies_ms=latencies_ms,
                        )
                    else:
                        answer = await timed_attempt(get_status, latencies_ms)
                except BaseException as exc:  # a slot taken is given back however the request ends
                    seed.abandon(probe, exc)
                    raise
                status, retry_after = answer
                answered_at = time.monotonic()
                retry_after_s = None if retry_after is None else retry_after_seconds(retry_after)
                seed.finish(probe, status, retry_after_s, answered_at - sent_at, answered_at)
                if status < 400:  # counted now, while others are on the wire; the rest once the engine has named them
                    tally.add_answered(SEED_TARGET, latencies_ms[0])
                return status

            result = await fan_out(send, n=n, strategy=strategy, concurrency=concurrency, deadline_s=budget)
        for index, outcome in enumerate(result.outcomes):
            if outcome.value is None or outcome.value >= 400:  # in their order, for the failures' log lines
                skipped = outcome.skipped is not None
                tried = latencies.get(index, ())
                tally.add(_record(index, target_path, tried, outcome.value, outcome.error, skipped))
        telemetry.report(
            CallReport(
                function=function,
                strategy=strategy.value,
                concurrency=result.concurrency,
                elapsed_s=result.elapsed_s,
                deadline_s=budget,
                tally=tally,
                targets=politeness.report([SEED_TARGET], since),
            )
        )
        return _body(result)

    max_n = settings.max_requests
    N = Annotated[int, Path(ge=1, le=max_n, description=f"Number of requests, 1 to {max_n}.")]
    K = Annotated[int, Path(ge=1, description="Requests in flight at most (clamped to the function's limit).")]

    async def sync(n: N, request: Request) -> dict[str, Any]:
        """n requests one after another (never blocking the event loop)."""
        return await run("sync", Strategy.SYNC, n, 1, request)

    async def gather(n: N, request: Request) -> dict[str, Any]:
        """n requests at once; at most the function's limit are on the wire."""
        return await run("gather", Strategy.GATHER, n, settings.max_concurrency, request)

    async def semaphore(n: N, k: K, request: Request) -> dict[str, Any]:
        """n requests, at most min(k, the function's limit) in flight."""
        return await run("semaphore", Strategy.SEMAPHORE, n, min(k, settings.max_concurrency), request)

    for name, path, endpoint in (
        ("sync", "/sync/{n}", sync),
        ("async", "/async/{n}", gather),
        ("async_sem", "/async_sem/{n}/{k}", semaphore),
    ):
        if settings.routes in ("all", name):
            app.get(path)(endpoint)


def _record(
    index: int,
    path: str,
    latencies_ms: Sequence[float],
    status: int | None,
    error: str | None,
    skipped: bool,
) -> UpstreamRecord:
    # Positional, in the fields' order (ref, target, method, path, attempts, latencies_ms, status,
    # error, internal, skipped): a call builds up to 10,000 of these, and keywords cost a third more.
    return UpstreamRecord(
        str(index), SEED_TARGET, "GET", path, 0 if skipped else 1, tuple(latencies_ms), status, error, None, skipped
    )


def _body(result: FanoutResult[int]) -> dict[str, Any]:
    seconds = result.elapsed_s
    how = _DESCRIBED[result.strategy]
    statuses = [outcome.value for outcome in result.outcomes]
    succeeded = sum(status is not None and status < 400 for status in statuses)
    return {
        "message": f"Processed {len(statuses)} requests {how} in {seconds:.2f} seconds",
        "status_codes": statuses,
        "strategy": result.strategy.value,
        "requests": len(statuses),
        "concurrency": result.concurrency,
        "elapsed_ms": round(seconds * 1000, 1),
        "succeeded": succeeded,
        "failed": len(statuses) - succeeded,
        "errors": [
            # never started before the deadline counts as the deadline's failure too
            {"index": index, "error": outcome.error or DEADLINE_EXCEEDED}
            for index, outcome in enumerate(result.outcomes)
            if outcome.value is None
        ],
    }


MAX_ERRORS_SHOWN = 20
_shown = reprlib.Repr(maxlevel=2, maxstring=60, maxother=60, maxlist=4, maxdict=4)


def _status_of(answer: tuple[int, str | None]) -> int:
    return answer[0]


async def _explain_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 detail, plus one readable line naming each field and its limit."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())[:MAX_ERRORS_SHOWN]
    detail = [
        {
            "loc": [_text(part) if isinstance(part, str) else part for part in error["loc"]],
            "msg": _text(error["msg"]),
            "type": error["type"],
            "input": _plain(error.get("input")),
        }
        for error in errors
    ]
    message = "; ".join(
        f"{shown['loc'][-1]}: {shown['msg']} (got {_text(_shown.repr(error.get('input')))})"
        for shown, error in zip(detail, errors, strict=True)
    )
    return JSONResponse(status_code=422, content={"message": message, "detail": detail})


def _plain(value: Any) -> Any:
    """A scalar JSON can carry as it is, or else a bounded repr of it (NaN, a surrogate, a deep list)."""
    if value is None or (isinstance(value, bool | int) and abs(value) < 2**53):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= 200 and _text(value) == value:
        return value
    return _text(_shown.repr(value))


def _text(value: str) -> str:
    """`value` as text any encoder takes: a lone surrogate is written out as its escape."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")
