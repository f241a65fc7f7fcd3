"""POST /batch through the real handler, against the fault-injecting upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import random
import socket
import time
import tracemalloc
from typing import Any

import pytest
from pyreqwest.http import Url
from tenacity import AsyncRetrying, Future, RetryCallState

from conftest import lambda_context, load_event, post_batch, run
from fanout.batch import BatchItem, BatchRun, BatchRunner, ItemReport, _retryable_error, retry_after_s
from fanout.engine import RequestError, Strategy
from fanout.held_answers import HeldAnswers
from fanout.politeness import Politeness
from fanout.settings import UpstreamTarget
from fanout.targets import TargetScope
from fanout.transports import UpstreamResponse
from fanout_local.upstream import LocalUpstream


def get(path: str, **query: Any) -> dict[str, Any]:
    return {"id": f"{path}{sorted(query.items())}", "target": "up", "path": path, "query": query}


@pytest.fixture
def make_handler(upstream: LocalUpstream, import_handler: Any) -> Any:
    def cold_start(target: dict[str, Any] | None = None, **env: str) -> Any:
        upstreams = {"up": {"url": upstream.url, "allow_http": True, **(target or {})}}
        return import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams), **env).handler

    return cold_start


@pytest.fixture
def handler(make_handler: Any) -> Any:
    return make_handler(FANOUT_MAX_CONCURRENCY="8")


def attempts_seen(upstream: LocalUpstream, key: str) -> int:
    return upstream.calls.get(key, 0)


def test_503_then_success_is_retried(handler: Any, upstream: LocalUpstream) -> None:
    status, body = post_batch(handler, {"requests": [get("/flaky", key="f1", fail=2, status=503)]})
    (item,) = body["responses"]
    assert status == 200
    assert (item["status"], item["attempts"], attempts_seen(upstream, "f1")) == (200, 3, 3)


def test_post_without_idempotency_key_is_never_retried(handler: Any, upstream: LocalUpstream) -> None:
    request = {"id": "p", "method": "POST", "target": "up", "path": "/flaky", "query": {"key": "p1"}, "json": {}}
    _, body = post_batch(handler, {"requests": [request]})
    assert (body["responses"][0]["status"], body["responses"][0]["attempts"]) == (503, 1)
    assert attempts_seen(upstream, "p1") == 1


def test_post_with_idempotency_key_is_retried(handler: Any, upstream: LocalUpstream) -> None:
    request = {
        "id": "p",
        "method": "POST",
        "target": "up",
        "path": "/flaky",
        "query": {"key": "p2", "fail": 1},
        "json": {},
        "idempotency_key": "k-1",
    }
    _, body = post_batch(handler, {"requests": [request]})
    assert (body["responses"][0]["status"], body["responses"][0]["attempts"]) == (200, 2)


@pytest.mark.parametrize(("form", "seconds", "at_least"), [("seconds", 1, 1.0), ("date", 2, 1.0)])
def test_retry_after_is_honoured(
    form: str, seconds: int, at_least: float, handler: Any, upstream: LocalUpstream
) -> None:
    query = {"key": f"r-{form}", "s": seconds} | ({"date": 1} if form == "date" else {})
    _, body = post_batch(handler, {"requests": [get("/retry-after", **query)]})
    assert (body["responses"][0]["status"], body["responses"][0]["attempts"]) == (200, 2)
    # An HTTP date has whole seconds: "now + 2 s" written as a date is 1 to 2 s away when read.
    first, second = list(upstream.arrivals)[-2:]
    assert second - first >= at_least


@pytest.mark.parametrize(
    ("value", "seconds"), [("3", 3.0), ("0", 0.0), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)]
)
def test_retry_after_values(value: str, seconds: float | None) -> None:
    response = UpstreamResponse(status=429, headers={"retry-after": value}, body=b"", truncated=False)
    assert retry_after_s(response) == seconds  # a date in the past means: now


def test_retry_after_beyond_the_budget_returns_the_429_in_time(handler: Any) -> None:
    started = time.monotonic()
    _, body = post_batch(handler, {"deadline_s": 1.5, "requests": [get("/retry-after", key="long", s=30)]})
    assert time.monotonic() - started < 1.5
    assert (body["responses"][0]["status"], body["responses"][0]["attempts"]) == (429, 1)


def test_connection_reset_is_retried_then_reported(handler: Any, upstream: LocalUpstream) -> None:
    _, body = post_batch(handler, {"requests": [get("/reset")]})
    (item,) = body["responses"]
    assert item["error"]["type"] == "RemoteProtocolError"
    assert item["attempts"] == 3
    # aiohttp itself resends once when a reused connection drops before answering
    assert upstream.stats.requests in (3, 6)


def test_body_cut_mid_stream_is_a_read_error(handler: Any) -> None:
    _, body = post_batch(handler, {"requests": [get("/cut")]})
    assert (body["responses"][0]["error"]["type"], body["responses"][0]["attempts"]) == ("ReadError", 3)


def test_hang_past_the_timeout_is_a_read_timeout(make_handler: Any) -> None:
    handler = make_handler(FANOUT_REQUEST_TIMEOUT_S="0.2", FANOUT_MAX_ATTEMPTS="2")
    _, body = post_batch(handler, {"requests": [get("/hang")]})
    assert (body["responses"][0]["error"]["type"], body["responses"][0]["attempts"]) == ("ReadTimeout", 2)


def test_deadline_is_met_and_every_request_accounted(handler: Any) -> None:
    requests = [{"id": str(i), "target": "up", "path": "/hang"} for i in range(6)]
    started = time.monotonic()
    status, body = post_batch(handler, {"concurrency": 2, "deadline_s": 0.5, "requests": requests})
    assert time.monotonic() - started < 1.5
    assert status == 200
    assert [item["id"] for item in body["responses"]] == [str(i) for i in range(6)]
    cut = [item for item in body["responses"] if "error" in item]
    skipped = [item for item in body["responses"] if "skipped" in item]
    assert [(item["error"]["type"], item["attempts"]) for item in cut] == [("DeadlineExceeded", 1)] * 2
    assert [(item["skipped"], item["attempts"]) for item in skipped] == [("deadline", 0)] * 4
    assert body["summary"] | {"elapsed_ms": 0} == {
        "succeeded": 0,
        "failed": 2,
        "skipped": 4,
        "elapsed_ms": 0,
        "strategy": "semaphore",
        "concurrency": 2,
        "bodies_dropped": 0,
        "headers_dropped": 0,
        "messages_dropped": 0,
    }


def test_budget_follows_lambda_remaining_time(handler: Any) -> None:
    event = copy.deepcopy(load_event("batch-http-api-v2.json"))
    event["body"] = json.dumps({"requests": [{"id": "h", "target": "up", "path": "/hang"}]})
    context = lambda_context()
    context.timeout_s = 1.6  # Lambda would end the call 1.6 s from now; the margin is 1 s
    started = time.monotonic()
    body = json.loads(handler(event, context)["body"])
    assert time.monotonic() - started < 1.2
    assert body["responses"][0]["error"]["type"] == "DeadlineExceeded"


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/bytes", {"n": 5000, "type": "text/plain"}, {"truncated": True, "body": "x" * 1000}),
        ("/endless", {}, {"truncated": True, "body": "y" * 1000}),
        ("/bytes", {"n": 600, "type": "text/plain"}, {"body": "x" * 600}),
    ],
)
def test_bodies_are_cut_at_the_item_cap(
    path: str, query: dict[str, Any], expected: dict[str, Any], make_handler: Any
) -> None:
    handler = make_handler(FANOUT_MAX_ITEM_BYTES="1000")
    _, body = post_batch(handler, {"requests": [get(path, **query)]})
    item = body["responses"][0]
    assert {key: item.get(key) for key in expected} == expected
    assert ("truncated" in item) == ("truncated" in expected)


def test_binary_bodies_come_back_as_base64(handler: Any) -> None:
    _, body = post_batch(handler, {"requests": [get("/bytes", n=300)]})
    item = body["responses"][0]
    assert item["encoding"] == "base64"
    assert len(item["body"]) == 400  # 300 bytes


def test_response_over_the_cap_drops_largest_bodies_first(make_handler: Any) -> None:
    handler = make_handler(FANOUT_MAX_RESPONSE_BYTES="70000", FANOUT_MAX_ITEM_BYTES="40000", FANOUT_MAX_REQUESTS="100")
    sizes = [30000, 6000, 40000]
    requests = [
        {"id": str(n), "target": "up", "path": "/bytes", "query": {"n": n, "type": "text/plain"}} for n in sizes
    ]
    status, body = post_batch(handler, {"requests": requests})
    assert status == 200
    dropped = [item["id"] for item in body["responses"] if item.get("body_dropped")]
    assert dropped == ["40000"]
    assert body["summary"]["bodies_dropped"] == 1
    assert [item["status"] for item in body["responses"]] == [200, 200, 200]


def _traced_peak(handler: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any], int]:
    """post_batch, and the most the heap held meanwhile (tracemalloc)."""
    tracemalloc.start()
    try:
        status, answer = post_batch(handler, body)
        return status, answer, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_batch_holds_at_most_twice_its_answer_in_bodies_letting_the_largest_go(make_handler: Any) -> None:
    """100 bodies of 32 KiB (3.2 MB) for an answer of 64 KiB: what the call holds while it runs is
    bounded by twice the answer, not by n bodies (1,000 of 256 KiB once took 889 MB of a 512 MB
    function: Lambda killed it and the whole batch was a 502). Every item still comes back."""
    handler = make_handler(FANOUT_MAX_RESPONSE_BYTES="65536", FANOUT_MAX_CONCURRENCY="10", FANOUT_MAX_REQUESTS="200")

    def text(id_: str, size: int) -> dict[str, Any]:
        return {"id": id_, "target": "up", "path": "/bytes", "query": {"n": size, "type": "text/plain"}}

    small = text("small", 100)
    post_batch(handler, {"requests": [small]})  # the pool and the code warm, out of the measure
    status, body, peak = _traced_peak(handler, {"requests": [*(text(f"b{i}", 32768) for i in range(100)), small]})
    assert status == 200
    assert [item["status"] for item in body["responses"]] == [200] * 101
    kept = {item["id"]: item["body"] for item in body["responses"] if not item.get("body_dropped")}
    assert kept["small"] == "x" * 100
    assert all(text == "x" * 32768 for text in kept.values() if len(text) > 100)
    assert body["summary"]["bodies_dropped"] == 101 - len(kept) >= 99  # 64 KiB holds one big body at most
    assert peak < 100 * 32768  # less than the bodies' sum (10.6 MB held them all; 1.0 MB here)


def test_a_batch_holds_at_most_twice_its_answer_in_headers_too(make_handler: Any) -> None:
    """100 heads of 16 headers of 2 KiB (3.2 MB): held within the same budget, the largest let go."""
    handler = make_handler(FANOUT_MAX_RESPONSE_BYTES="65536", FANOUT_MAX_CONCURRENCY="10", FANOUT_MAX_REQUESTS="200")
    fat = {"target": "up", "path": "/fat-headers", "query": {"n": 16, "size": 2048}}
    post_batch(handler, {"requests": [{"id": "warm", **fat}]})
    status, body, peak = _traced_peak(handler, {"requests": [{"id": f"h{i}", **fat} for i in range(100)]})
    assert status == 200
    assert [item["status"] for item in body["responses"]] == [200] * 100
    kept = [item["headers"] for item in body["responses"] if not item.get("headers_dropped")]
    assert all(len(headers) >= 16 and headers["x-h15"] == "v" * 2048 for headers in kept)
    assert body["summary"]["headers_dropped"] == 100 - len(kept) >= 98
    assert peak < 100 * 16 * 2048


def test_held_answers_let_the_largest_bodies_go_then_headers_and_give_the_rest_back() -> None:
    held = HeldAnswers(10)

    def answered(size: int, headers: dict[str, str] | None = None) -> ItemReport:
        response = UpstreamResponse(200, headers or {}, b"x" * size, False)
        return ItemReport(id="i", attempts=1, elapsed_s=0.0, response=response)

    sizes = [5, 1, 7, 3, 3, 12]
    kept = [held.hold(index, answered(size)) for index, size in enumerate(sizes)]
    assert held.total == 7  # the 7 went when it came (13 held), the 5 with the second 3 (12), the 12 itself
    # handed back whole while those fit the budget (5, 1, 3: 9), the rest without their bodies (held here)
    assert [len(report.response.body) for report in kept if report.response] == [5, 1, 0, 3, 0, 0]
    held_here = {index: len(body) for index, (body, _) in held._parts.items()}
    assert held_here == {2: 0, 4: 3, 5: 0}  # of the 7, 3 and 12 that came past it, the two let go are freed
    back = [held.give_back(index, report) for index, report in enumerate(kept)]
    assert [report.body_dropped for report in back] == [True, False, True, False, False, True]
    assert [len(report.response.body) for report in back if report.response] == [0, 1, 0, 3, 3, 0]
    assert not any(report.headers_dropped for report in back)

    held = HeldAnswers(10)
    first = held.hold(0, answered(4, {"a": "bb"}))  # 4 + 3 bytes
    second = held.hold(1, answered(0, {"c": "dddd"}))  # 5 more (12): a body goes before any headers
    assert held.total == 8
    back = [held.give_back(0, first), held.give_back(1, second)]
    assert [(report.body_dropped, report.headers_dropped) for report in back] == [(True, False), (False, False)]
    assert [report.response.headers for report in back if report.response] == [{"a": "bb"}, {"c": "dddd"}]
    third = held.hold(2, answered(0, {"e": "f" * 9}))  # 10 more (18), no body left: the largest headers go
    assert (held.give_back(2, third).headers_dropped, held.total) == (True, 8)

    unanswered = ItemReport(id="e", attempts=1, elapsed_s=0.0, error="ConnectError")
    assert held.hold(6, unanswered) is unanswered and held.give_back(6, unanswered) is unanswered


def test_fail_fast_skips_the_rest(handler: Any) -> None:
    requests = [get("/delay", ms=1), get("/status/500"), get("/delay", ms=2), get("/delay", ms=3)]
    _, body = post_batch(handler, {"strategy": "sync", "fail_fast": True, "requests": requests})
    assert [item.get("status") for item in body["responses"]] == [200, 500, None, None]
    assert [item.get("skipped") for item in body["responses"]] == [None, None, "fail_fast", "fail_fast"]


@pytest.mark.parametrize(("tolerated", "status"), [(10, 502), (25, 200), (None, 200)])
def test_tolerated_failure_percentage_sets_the_envelope_status(
    tolerated: float | None, status: int, handler: Any
) -> None:
    requests = [get("/delay", ms=1), get("/status/500"), get("/delay", ms=2), get("/delay", ms=3)]
    answered, body = post_batch(handler, {"tolerated_failure_percentage": tolerated, "requests": requests})
    assert answered == status
    assert body["summary"]["failed"] == 1


def test_per_host_cap_bounds_requests_in_flight(make_handler: Any, upstream: LocalUpstream) -> None:
    handler = make_handler(FANOUT_MAX_PER_HOST="2", FANOUT_MAX_CONCURRENCY="10")
    requests = [{"id": str(i), "target": "up", "path": "/delay", "query": {"ms": 30}} for i in range(10)]
    _, body = post_batch(handler, {"concurrency": 10, "requests": requests})
    assert body["summary"]["succeeded"] == 10
    assert upstream.stats.peak_in_flight == 2


def test_per_host_cap_is_per_host(import_handler: Any, upstream: LocalUpstream) -> None:
    """Two targets on two host names (one listener): each has its own cap of 2, so 4 are in flight."""
    upstreams = {name: {"url": f"http://{host}:{upstream.port}", "allow_http": True}
                 for name, host in [("a", "127.0.0.1"), ("b", "localhost")]}  # fmt: skip
    handler = import_handler(
        FANOUT_UPSTREAMS=json.dumps(upstreams), FANOUT_MAX_PER_HOST="2", FANOUT_MAX_CONCURRENCY="10"
    ).handler
    requests = [{"id": str(i), "target": "ab"[i % 2], "path": "/delay", "query": {"ms": 50}} for i in range(12)]
    _, body = post_batch(handler, {"concurrency": 10, "requests": requests})
    assert body["summary"]["succeeded"] == 12
    assert upstream.stats.peak_in_flight == 4


def test_rate_limit_spaces_out_starts(make_handler: Any, upstream: LocalUpstream) -> None:
    handler = make_handler(FANOUT_RATE_PER_S="5")
    requests = [{"id": str(i), "target": "up", "path": "/delay", "query": {"ms": 0}} for i in range(15)]
    _, body = post_batch(handler, {"concurrency": 8, "requests": requests})
    assert body["summary"]["succeeded"] == 15
    arrivals = sorted(upstream.arrivals)
    # A bucket of 5 lets 5 go at once, then one every 0.2 s: the 15th leaves 2 s after the first.
    # At least that (the limit holds); at most 1.5 s more on a busy host (a limit at half the rate
    # would take 4 s).
    assert 1.9 <= arrivals[-1] - arrivals[0] < 3.5
    assert all(later - earlier >= 0.15 for earlier, later in itertools.pairwise(arrivals[5:]))


def test_redirects_are_not_followed_unless_the_target_allows(make_handler: Any, upstream: LocalUpstream) -> None:
    hop = {"id": "r", "target": "up", "path": "/redirect", "query": {"to": "/delay?ms=1"}}
    _, body = post_batch(make_handler(), {"requests": [hop]})
    assert body["responses"][0]["status"] == 302
    _, body = post_batch(make_handler({"max_redirects": 1}), {"requests": [hop]})
    assert (body["responses"][0]["status"], body["responses"][0]["body"]) == (200, {"delay_ms": 1.0})


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://example.com/x", "gopher://127.0.0.1/"])
def test_redirect_to_another_scheme_is_refused(location: str, make_handler: Any) -> None:
    hop = {"id": "r", "target": "up", "path": "/redirect", "query": {"to": location}}
    _, body = post_batch(make_handler({"max_redirects": 3}), {"requests": [hop]})
    assert body["responses"][0]["error"]["type"] == "RedirectRefused"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b["requests"].append(dict(b["requests"][0])), "request ids must be unique: 'a'"),
        (lambda b: b["requests"][0].update(target="elsewhere"), "unknown target; allowed: up"),
        (lambda b: b["requests"][0].update(headers={"Host": "x"}), "header not allowed"),
        (lambda b: b["requests"][0].update(headers={"Authorization": "Bearer t"}), "header not allowed"),
        (lambda b: b["requests"][0].update(path="//evil.example.com/x"), "path: String should match pattern"),
        (lambda b: b["requests"][0].update(path="https://evil.example.com/"), "path: String should match pattern"),
        (lambda b: b["requests"][0].update(json={}, body="x"), "give either json or body, not both"),
        (lambda b: b.update(requests=[]), "requests: List should have at least 1 item"),
        (
            lambda b: b.update(requests=[{**b["requests"][0], "id": str(i)} for i in range(1001)]),
            "at most 1000 requests per call (FANOUT_MAX_REQUESTS), got 1001",
        ),
    ],
)
def test_bad_batches_are_422_naming_the_field(change: Any, message: str, handler: Any, upstream: LocalUpstream) -> None:
    batch = {"requests": [{"id": "a", "target": "up", "path": "/delay"}]}
    change(batch)
    status, body = post_batch(handler, batch)
    assert status == 422
    assert message in body["message"]
    assert upstream.stats.requests == 0


def test_authorization_passes_only_where_the_target_allows(make_handler: Any) -> None:
    request = {"id": "a", "target": "up", "path": "/echo", "headers": {"Authorization": "Bearer t"}}
    _, body = post_batch(make_handler({"forward_authorization": True}), {"requests": [request]})
    assert body["responses"][0]["body"]["headers"]["authorization"] == "Bearer t"


def test_callers_content_type_is_sent_once_with_a_json_body(handler: Any) -> None:
    request = {
        "id": "a",
        "target": "up",
        "path": "/echo",
        "json": {"a": 1},
        "headers": {"Content-Type": "application/merge-patch+json"},
    }
    _, body = post_batch(handler, {"requests": [request]})
    echoed = body["responses"][0]["body"]
    assert echoed["headers"]["content-type"] == "application/merge-patch+json"


def test_oversized_body_is_413(make_handler: Any, upstream: LocalUpstream) -> None:
    handler = make_handler(FANOUT_MAX_BODY_BYTES="2048")
    status, body = post_batch(handler, {"requests": [{"id": "a" * 100, "target": "up", "body": "x" * 3000}]})
    assert status == 413
    assert "at most 2048 (FANOUT_MAX_BODY_BYTES)" in body["detail"]
    assert upstream.stats.requests == 0


@pytest.mark.parametrize(
    ("method", "attempts"),
    [("GET", 3), ("HEAD", 3), ("PUT", 3), ("DELETE", 3), ("OPTIONS", 3), ("POST", 1), ("PATCH", 1)],
)
def test_only_idempotent_methods_are_retried(method: str, attempts: int, handler: Any, upstream: LocalUpstream) -> None:
    request = {"id": "m", "method": method, "target": "up", "path": "/flaky", "query": {"key": method, "fail": 9}}
    _, body = post_batch(handler, {"requests": [request]})
    assert (body["responses"][0]["status"], body["responses"][0]["attempts"]) == (503, attempts)
    assert attempts_seen(upstream, method) == attempts


@pytest.mark.parametrize(
    ("status", "attempts"), [(429, 3), (502, 3), (503, 3), (504, 3), (500, 1), (501, 1), (400, 1), (404, 1)]
)
def test_which_answers_are_retried(status: int, attempts: int, handler: Any, upstream: LocalUpstream) -> None:
    _, body = post_batch(handler, {"requests": [get("/flaky", key=f"s{status}", fail=9, status=status)]})
    assert (body["responses"][0]["status"], body["responses"][0]["attempts"]) == (status, attempts)
    assert attempts_seen(upstream, f"s{status}") == attempts


def test_a_refused_connection_is_retried_then_reported(import_handler: Any) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    upstreams = {"gone": {"url": f"http://127.0.0.1:{closed}", "allow_http": True}}
    handler = import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams)).handler
    _, body = post_batch(handler, {"requests": [{"id": "c", "target": "gone"}]})
    (item,) = body["responses"]
    assert (item["error"]["type"], item["attempts"]) == ("ConnectError", 3)


@pytest.mark.parametrize(("status", "succeeded"), [(200, 1), (302, 1), (399, 1), (400, 0), (404, 0), (500, 0)])
def test_an_answer_from_400_up_counts_as_failed(status: int, succeeded: int, handler: Any) -> None:
    _, body = post_batch(handler, {"requests": [get(f"/status/{status}")]})
    assert (body["summary"]["succeeded"], body["summary"]["failed"]) == (succeeded, 1 - succeeded)


def backoff_waits(attempt: int, samples: int = 400) -> list[float]:
    """What the runner waits after a failed `attempt` (a connection error: no Retry-After), `samples` times."""
    runner = BatchRunner(
        transport=None, max_attempts=10, max_item_bytes=1, rate_per_s=0, politeness=Politeness(ceiling=10)
    )  # type: ignore[arg-type]
    state = RetryCallState(retry_object=AsyncRetrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    failed: Future = Future(attempt)
    failed.set_exception(RequestError("ConnectError"))
    state.outcome = failed
    random.seed(attempt)
    return [runner._wait(state) for _ in range(samples)]


@pytest.mark.parametrize(("attempt", "window"), [(1, 0.1), (2, 0.2), (3, 0.4), (6, 3.2), (7, 5.0), (20, 5.0)])
def test_backoff_is_full_jitter_in_a_window_that_doubles_to_five_seconds(attempt: int, window: float) -> None:
    waits = backoff_waits(attempt)
    assert min(waits) >= 0 and max(waits) <= window
    assert max(waits) > 0.95 * window  # the whole window is used: jitter, not a fixed wait
    assert min(waits) < 0.05 * window


def test_after_a_retry_after_the_targets_pause_is_the_wait() -> None:
    runner = BatchRunner(
        transport=None, max_attempts=10, max_item_bytes=1, rate_per_s=0, politeness=Politeness(ceiling=10)
    )  # type: ignore[arg-type]
    state = RetryCallState(retry_object=AsyncRetrying(), fn=None, args=(), kwargs={})
    answered: Future = Future(1)
    answered.set_result(UpstreamResponse(status=429, headers={"retry-after": "7"}, body=b"", truncated=False))
    state.outcome = answered
    assert runner._wait(state) == 0.0  # the target's limiter keeps the 7 s pause for every request to it


def test_each_item_reports_how_long_it_took(handler: Any) -> None:
    requests = [get("/delay", ms=200), get("/hang"), get("/delay", ms=1)]
    _, body = post_batch(handler, {"strategy": "sync", "deadline_s": 1.0, "requests": requests})
    slow, hung, never = body["responses"]
    assert 200 <= slow["elapsed_ms"] < 1000
    assert hung["error"] == {
        "type": "DeadlineExceeded",
        "message": "the call's deadline passed while this request was in flight",
    }
    assert 700 <= hung["elapsed_ms"] <= 1000 - slow["elapsed_ms"] + 50
    assert (never["skipped"], never["elapsed_ms"], never["attempts"]) == ("deadline", 0.0, 0)


def test_an_idempotency_key_is_sent_as_a_header(handler: Any) -> None:
    request = {"id": "p", "method": "POST", "target": "up", "path": "/echo", "json": {}, "idempotency_key": "k-9"}
    _, body = post_batch(handler, {"requests": [request]})
    assert body["responses"][0]["body"]["headers"]["idempotency-key"] == "k-9"


@pytest.mark.parametrize(
    ("kind", "retried"),
    [
        ("ConnectError", True),
        ("ConnectTimeout", True),
        ("ReadTimeout", True),
        ("ReadError", True),
        ("RemoteProtocolError", True),
        ("ForbiddenAddress", False),
        ("RedirectRefused", False),
        ("TooManyRedirects", False),
        ("DecodingError", False),
        ("InvalidURL", False),
    ],
)
def test_which_errors_are_retried(kind: str, retried: bool) -> None:
    assert _retryable_error(RequestError(kind)) is retried
    assert _retryable_error(ValueError(kind)) is False  # only the transport's errors, by their kind


def test_a_retry_after_of_zero_is_retried_until_it_succeeds(handler: Any) -> None:
    """No wait before a retry is still a retry within the budget, not a reason to stop."""
    _, body = post_batch(handler, {"deadline_s": 0.8, "requests": [get("/retry-after", key="zero", fail=2, s=0)]})
    assert (body["responses"][0]["status"], body["responses"][0]["attempts"]) == (200, 3)


def stand_in_items(n: int) -> list[BatchItem]:
    """GETs to a target only a stand-in transport answers (nothing goes to the network)."""
    scope = TargetScope.of("t", UpstreamTarget(url="https://t.example"))
    return [
        BatchItem(id=str(i), method="GET", url=Url("https://t.example/"), headers={}, body=None, scope=scope, path="/")
        for i in range(n)
    ]


def stand_in_runner(transport: Any, *, max_attempts: int = 3, ceiling: int = 1) -> BatchRunner:
    return BatchRunner(
        transport, max_attempts=max_attempts, max_item_bytes=10, rate_per_s=0, politeness=Politeness(ceiling=ceiling)
    )


class SwallowingTransport:
    """A client whose own timer fires with the deadline and turns the cancellation into its error."""

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            raise RequestError("ReadTimeout", "the client's own timer") from None
        raise AssertionError("unreachable")


def test_an_error_at_the_deadline_is_reported_as_the_deadlines() -> None:
    runner = stand_in_runner(SwallowingTransport(), ceiling=10)
    items = stand_in_items(2)
    result = run(runner.run(items, strategy=Strategy.SYNC, concurrency=1, budget_s=0.2, fail_fast=False))
    first, second = result.reports
    assert (first.error, first.message, first.attempts) == (
        "DeadlineExceeded",
        "the call's deadline passed while this request was in flight",
        1,
    )
    assert (second.skipped, second.attempts) == ("deadline", 0)
    assert result.concurrency == 1  # one after another


def test_an_error_at_the_deadline_is_the_deadlines_however_the_loop_rounds_its_timers() -> None:
    """On uvloop (the function's loop) timers fire up to a millisecond early by time.monotonic(), which
    the runner's cut reads: budgets where that rounding falls either way, each item still the deadline's."""

    async def only_report(budget_s: float) -> ItemReport:
        runner = stand_in_runner(SwallowingTransport(), ceiling=10)  # a new target each: no circuit opens
        result = await runner.run(
            stand_in_items(1), strategy=Strategy.SYNC, concurrency=1, budget_s=budget_s, fail_fast=False
        )
        return result.reports[0]

    errors: list[str | None] = []
    for step in range(200):
        if len(errors) == 40:
            break
        report = run(only_report(0.003 + step % 8 * 0.0007))
        if report.attempts == 0:  # a busy machine held the call past its few milliseconds before it sent
            assert report.skipped == "deadline"
            continue
        errors.append(report.error)
    assert errors == ["DeadlineExceeded"] * 40


class HangingTransport:
    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")


def test_an_item_the_deadline_caught_waiting_for_its_target_was_skipped_not_failed() -> None:
    """It never went out: `skipped: deadline` with no attempt, not a DeadlineExceeded error."""
    runner = stand_in_runner(HangingTransport(), ceiling=1)
    items = stand_in_items(2)
    result = run(runner.run(items, strategy=Strategy.SEMAPHORE, concurrency=2, budget_s=0.2, fail_fast=False))
    sent, waited = result.reports
    assert (sent.error, sent.attempts) == ("DeadlineExceeded", 1)
    assert (waited.skipped, waited.error, waited.attempts) == ("deadline", None, 0)


def status_of(report: ItemReport) -> int | None:
    return report.response.status if report.response is not None else None


class UnavailableTransport:
    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        return UpstreamResponse(status=503, headers={}, body=b"", truncated=False)


class ScriptedTransport:
    """Answers from a script, one step per request: a status, or the kind of a RequestError."""

    def __init__(self, *script: int | str) -> None:
        self.script = list(script)
        self.sent = 0

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        self.sent += 1
        step = self.script.pop(0)
        if isinstance(step, str):
            raise RequestError(step)
        return UpstreamResponse(status=step, headers={}, body=b"", truncated=False)


@pytest.mark.parametrize(
    ("script", "status", "error", "backoffs"),
    [
        ((200,), 200, None, []),
        ((404,), 404, None, []),
        (("InvalidURL",), None, "InvalidURL", []),
        ((503, 200), 200, None, [1]),
        (("ConnectError", "ReadError", 200), 200, None, [1, 2]),
        (("ConnectError", 502, 504), 504, None, [1, 2, 3]),  # the third spends the last attempt
    ],
)
def test_every_attempt_is_sent_once_and_backs_off_by_its_number(
    script: tuple[int | str, ...], status: int | None, error: str | None, backoffs: list[int]
) -> None:
    """The first attempt goes out before tenacity is asked; a retry must still back off from it as
    attempt 1, and never send it again."""
    transport = ScriptedTransport(*script)
    runner = stand_in_runner(transport, ceiling=10)
    backed_off_after: list[int] = []

    def no_wait(state: RetryCallState) -> float:
        backed_off_after.append(state.attempt_number)
        return 0.0

    runner._jitter = no_wait  # type: ignore[assignment,method-assign]
    result = run(runner.run(stand_in_items(1), strategy=Strategy.SYNC, concurrency=1, budget_s=5, fail_fast=False))
    (report,) = result.reports
    assert (status_of(report), report.error) == (status, error)
    assert report.attempts == transport.sent == len(script)
    assert backed_off_after == backoffs


def test_a_retry_whose_backoff_ends_past_the_budget_is_not_waited_for() -> None:
    """The item reports the answer it got, in time, instead of sleeping into the deadline."""
    runner = stand_in_runner(UnavailableTransport(), ceiling=1)
    runner._jitter = lambda state: 1.0  # type: ignore[assignment,method-assign]  # every backoff: 1 s
    (item,) = stand_in_items(1)
    result = run(runner.run([item], strategy=Strategy.SEMAPHORE, concurrency=1, budget_s=0.3, fail_fast=False))
    (report,) = result.reports
    assert (status_of(report), report.error, report.attempts) == (503, None, 1)
    assert result.elapsed_s < 0.3


class BusyOnceTransport:
    """503 with Retry-After: 1 to the first request, then 200."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        self.sent += 1
        if self.sent == 1:
            return UpstreamResponse(status=503, headers={"retry-after": "1"}, body=b"", truncated=False)
        return UpstreamResponse(status=200, headers={}, body=b"", truncated=False)


def test_a_503_with_retry_after_pauses_the_target_and_costs_no_attempt() -> None:
    """Like a 429 with Retry-After: with one attempt allowed, the item is still sent again after the pause."""
    transport = BusyOnceTransport()
    runner = stand_in_runner(transport, max_attempts=1)
    (item,) = stand_in_items(1)
    result = run(runner.run([item], strategy=Strategy.SEMAPHORE, concurrency=1, budget_s=5, fail_fast=False))
    (report,) = result.reports
    assert (status_of(report), report.attempts, transport.sent) == (200, 2, 2)


def test_batch_records_are_values() -> None:
    (item,) = stand_in_items(1)
    report = ItemReport(id="a", attempts=1, elapsed_s=0.1)
    batch = BatchRun(reports=[report], concurrency=1, elapsed_s=0.1)
    for value, field in ((item, "id"), (report, "attempts"), (batch, "concurrency")):
        with pytest.raises(AttributeError):
            setattr(value, field, None)
        assert not hasattr(value, "__dict__")
    assert (item.target, batch.rate_limit_waits, batch.rate_limit_wait_s) == ("t", None, 0.0)
