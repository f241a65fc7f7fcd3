"""The real Lambda handler (Mangum around the app), fed the event files in events/."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
from types import ModuleType
from typing import Any

import pytest

from conftest import event_files, lambda_context, load_event
from fanout.politeness import CIRCUIT_THRESHOLD
from fanout_local.upstream import LocalUpstream

BODY_KEYS = {
    "message",
    "status_codes",
    "strategy",
    "requests",
    "concurrency",
    "elapsed_ms",
    "succeeded",
    "failed",
    "errors",
}
LIMIT = 5


def invoke(handler: Any, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = handler(event, lambda_context())
    return response["statusCode"], json.loads(response["body"])


def with_path(event_name: str, path: str, **params: str) -> dict[str, Any]:
    """An event file with its path (and path parameters) replaced, in either payload format."""
    event = copy.deepcopy(load_event(event_name))
    if event.get("version") == "2.0":
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
    else:
        event["path"] = path
    event["pathParameters"] = params
    return event


def local_upstreams(upstream: LocalUpstream) -> str:
    """FANOUT_UPSTREAMS naming the test upstream as the targets the batch event files use."""
    target = {"url": upstream.url, "allow_http": True}
    return json.dumps({"catalog": target, "orders": target})


@pytest.fixture
def entry(upstream: LocalUpstream, import_handler: Any) -> ModuleType:
    """functions/api/app.py after a cold start: its `handler`, and the `app` behind it."""
    return import_handler(
        FANOUT_TARGET_URL=f"{upstream.url}/delay?ms=5",
        FANOUT_MAX_CONCURRENCY=str(LIMIT),
        FANOUT_UPSTREAMS=local_upstreams(upstream),
    )


@pytest.fixture
def handler(entry: ModuleType) -> Any:
    return entry.handler


@pytest.mark.parametrize("name", [name for name in event_files() if name.startswith("batch-")])
def test_batch_event_files_answer_every_request(name: str, handler: Any, upstream: LocalUpstream) -> None:
    status, body = invoke(handler, load_event(name))
    assert status == 200
    responses = {item["id"]: item for item in body["responses"]}
    assert [item["id"] for item in body["responses"]] == ["a1", "a2", "a3"]
    assert (responses["a1"]["status"], responses["a1"]["body"], responses["a1"]["attempts"]) == (
        200,
        {"delay_ms": 5.0},
        1,
    )
    echoed = responses["a2"]["body"]
    assert (echoed["method"], json.loads(echoed["body"])) == ("POST", {"sku": 7})
    assert echoed["headers"]["idempotency-key"] == "k-81"
    assert responses["a3"]["status"] == 404
    assert body["summary"] == body["summary"] | {"succeeded": 2, "failed": 1, "skipped": 0, "concurrency": 3}


@pytest.mark.parametrize("name", [name for name in event_files() if not name.startswith(("batch-", "worker-"))])
def test_every_event_file_answers_200(name: str, handler: Any, upstream: LocalUpstream) -> None:
    event = load_event(name)
    params = {key: int(value) for key, value in event["pathParameters"].items()}
    status, body = invoke(handler, event)
    assert status == 200
    assert set(body) == BODY_KEYS
    n = params["n"]
    expected_concurrency = {"sync": 1, "async": min(n, LIMIT)}.get(
        name.split("-")[0], min(n, params.get("k", n), LIMIT)
    )
    assert body["requests"] == n
    assert body["concurrency"] == expected_concurrency
    assert body["status_codes"] == [200] * n
    assert (body["succeeded"], body["failed"], body["errors"]) == (n, 0, [])
    assert upstream.stats.requests == n
    assert upstream.stats.peak_in_flight <= expected_concurrency


def test_two_warm_invocations_share_loop_pool_and_connections(entry: ModuleType, upstream: LocalUpstream) -> None:
    handler, transport = entry.handler, entry.app.state.transport
    event = load_event("async_sem-http-api-v2.json")
    assert invoke(handler, event)[0] == 200
    clients = transport.open_clients
    assert len(clients) == 1
    opened = upstream.stats.connections
    assert opened == LIMIT
    status, body = invoke(handler, event)
    assert status == 200 and body["succeeded"] == 20
    assert upstream.stats.connections == opened  # the second call opened no connection
    assert transport.open_clients == clients
    assert not asyncio.get_event_loop().is_closed()


@pytest.mark.parametrize(
    ("event_name", "path", "params", "message"),
    [
        ("sync-http-api-v2.json", "/sync/0", {"n": "0"}, "n: Input should be greater than or equal to 1"),
        ("async-rest-v1.json", "/async/abc", {"n": "abc"}, "n: Input should be a valid integer"),
        ("async-http-api-v2.json", "/async/1.5", {"n": "1.5"}, "n: Input should be a valid integer"),
        (
            "async-http-api-v2.json",
            "/async/1000000000",
            {"n": "1000000000"},
            "n: Input should be less than or equal to 1000",
        ),
        (
            "async_sem-http-api-v2.json",
            "/async_sem/10/0",
            {"n": "10", "k": "0"},
            "k: Input should be greater than or equal to 1",
        ),
        (
            "async_sem-rest-v1.json",
            "/async_sem/-3/x",
            {"n": "-3", "k": "x"},
            "n: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    event_name: str, path: str, params: dict[str, str], message: str, handler: Any, upstream: LocalUpstream
) -> None:
    status, body = invoke(handler, with_path(event_name, path, **params))
    assert status == 422
    assert message in body["message"]
    assert upstream.stats.requests == 0  # refused before any work


def test_k_above_the_limit_is_clamped(handler: Any, upstream: LocalUpstream) -> None:
    status, body = invoke(handler, with_path("async_sem-http-api-v2.json", "/async_sem/12/500", n="12", k="500"))
    assert status == 200
    assert body["concurrency"] == LIMIT
    assert upstream.stats.peak_in_flight == LIMIT


def test_failing_upstream_is_reported_not_a_500(upstream: LocalUpstream, import_handler: Any) -> None:
    """503 to everything: the first answers are reported, then the target's circuit opens (fanout.politeness)."""
    module = import_handler(FANOUT_TARGET_URL=f"{upstream.url}/status/503", FANOUT_MAX_CONCURRENCY="3")
    status, body = invoke(module.handler, load_event("async-http-api-v2.json"))
    assert status == 200
    answered = [code for code in body["status_codes"] if code is not None]
    assert set(answered) == {503} and CIRCUIT_THRESHOLD <= len(answered) <= CIRCUIT_THRESHOLD + 3
    assert body["errors"] == [
        {"index": index, "error": "CircuitOpen"} for index, code in enumerate(body["status_codes"]) if code is None
    ]
    assert (body["succeeded"], body["failed"]) == (0, 20)
    assert upstream.stats.requests == len(answered)
    assert module.app.state.politeness.limiter("default").state.in_flight == 0  # every slot given back


def test_unreachable_upstream_lists_every_error(import_handler: Any) -> None:
    module = import_handler(FANOUT_TARGET_URL="http://127.0.0.1:9/", FANOUT_MAX_CONCURRENCY="3")
    status, body = invoke(module.handler, load_event("sync-rest-v1.json"))
    assert status == 200
    assert body["status_codes"] == [None] * 10
    assert body["errors"] == [{"index": i, "error": "ConnectError"} for i in range(10)]  # fewer than the threshold
    limiter = module.app.state.politeness.limiter("default")
    assert (limiter.state.in_flight, limiter.state.failures_in_a_row) == (0, 10)  # each counted, each slot back
    status, body = invoke(module.handler, load_event("sync-rest-v1.json"))
    assert body["errors"] == [{"index": 0, "error": "CircuitOpen"}] + [
        {"index": i, "error": "CircuitOpen"} for i in range(1, 10)
    ]  # the 10th failure in a row opened it: the next call sends nothing


def test_deadline_answers_in_time_with_every_request_accounted(upstream: LocalUpstream, import_handler: Any) -> None:
    module = import_handler(
        FANOUT_TARGET_URL=f"{upstream.url}/hang",
        FANOUT_MAX_CONCURRENCY="4",
        FANOUT_REQUEST_TIMEOUT_S="0.3",
        FANOUT_DEADLINE_S="0.5",
    )
    status, body = invoke(module.handler, load_event("async_sem-http-api-v2.json"))
    assert status == 200
    assert body["elapsed_ms"] < 1500
    assert body["requests"] == len(body["status_codes"]) == 20
    # 4 in flight, each times out after 0.3 s: one round fails with ReadTimeout, the rest hit the deadline
    kinds = {error["error"] for error in body["errors"]}
    assert kinds == {"ReadTimeout", "DeadlineExceeded"}
    assert len(body["errors"]) == 20
    # the requests cancelled at the deadline gave their slots back: the next call is not refused for want of one
    assert module.app.state.politeness.limiter("default").state.in_flight == 0


def test_a_cold_start_leaves_what_it_built_out_of_the_collectors_sight(import_handler: Any) -> None:
    """Built once per container, never garbage: frozen, so no collection during a call walks it, and the
    collector is on again for what calls make."""
    frozen_before = gc.get_freeze_count()
    entry = import_handler()
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen_before
    assert not any(tracked is entry.app for tracked in gc.get_objects())  # frozen: in no generation
