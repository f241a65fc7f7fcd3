"""What an operator sees: the log lines, the EMF metrics and the spans of known calls through the real handler."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import lambda_context, load_event, post_batch
from fanout.observability import DEFAULT_SERVICE, CallReport, CallTally, Telemetry, UpstreamRecord, latency_sample
from fanout_local.upstream import LocalUpstream

NAMESPACE = "fanout-test"
SECRET = "s3cret-value"


@dataclass
class Output:
    """One test's stdout, split the way CloudWatch sees it: log lines, and EMF lines that become metrics."""

    logs: list[dict[str, Any]]
    blobs: list[dict[str, Any]]
    raw: str

    def summary(self) -> dict[str, Any]:
        (line,) = [line for line in self.logs if line["message"] == "fanout call"]
        return line

    def failures(self) -> list[dict[str, Any]]:
        return [line for line in self.logs if line["message"] == "upstream request failed"]

    def metric(self, name: str, **dimensions: str) -> list[float]:
        """Every value of `name` published with exactly these dimensions (besides service)."""
        values: list[float] = []
        for blob in self.blobs:
            (directive,) = blob["_aws"]["CloudWatchMetrics"]
            (keys,) = directive["Dimensions"]
            found = {key: blob[key] for key in keys}
            if name in blob and found == {"service": DEFAULT_SERVICE, **dimensions}:
                assert directive["Namespace"] == NAMESPACE
                values += blob[name]
        return values


@pytest.fixture
def output(capsys: pytest.CaptureFixture[str]) -> Any:
    """Read what the handler printed so far (conftest points the Powertools logger at the current stdout)."""

    def read() -> Output:
        raw = capsys.readouterr().out
        lines = [json.loads(line) for line in raw.splitlines() if line.startswith("{")]
        return Output(
            logs=[line for line in lines if "_aws" not in line],
            blobs=[line for line in lines if "_aws" in line],
            raw=raw,
        )

    return read


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """An OpenTelemetry SDK recording spans in memory, as the ADOT layer's SDK would export them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process; fanout's tracer is a proxy that follows it
    return exporter


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


@pytest.fixture
def cold_start(upstream: LocalUpstream, import_handler: Any) -> Any:
    def start(target: dict[str, Any] | None = None, **env: str) -> Any:
        upstreams = {
            name: {"url": upstream.url, "allow_http": True, **(target or {})} for name in ("catalog", "orders")
        }
        env = {
            "FANOUT_TARGET_URL": f"{upstream.url}/delay?ms=1",
            "FANOUT_UPSTREAMS": json.dumps(upstreams),
            "FANOUT_MAX_CONCURRENCY": "8",
            "POWERTOOLS_METRICS_NAMESPACE": NAMESPACE,
            **env,
        }
        return import_handler(**env).handler

    return start


def seed_event(name: str, n: int, path: str) -> dict[str, Any]:
    event = copy.deepcopy(load_event(name))
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["pathParameters"] = {"n": str(n)}
    return event


@pytest.mark.parametrize("event_name", ["batch-http-api-v2.json", "batch-rest-v1.json"])
def test_a_batch_call_logs_its_summary_and_failure_with_both_request_ids(
    event_name: str, cold_start: Any, output: Any
) -> None:
    handler = cold_start()
    event, context = load_event(event_name), lambda_context()
    assert handler(event, context)["statusCode"] == 200
    out = output()

    assert out.logs, "the call logged nothing"
    for line in out.logs:  # every line, not only ours
        assert line["function_request_id"] == context.aws_request_id
        assert line["correlation_id"] == event["requestContext"]["requestId"]
    summary = out.summary()
    assert {key: summary[key] for key in ("function", "strategy", "n", "concurrency")} == {
        "function": "batch",
        "strategy": "semaphore",
        "n": 3,
        "concurrency": 3,
    }
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (2, 1, 0)
    assert (summary["upstream_requests"], summary["retries"]) == (3, 0)
    assert 0 < summary["deadline_left_ms"] < 10_000  # the event asks for deadline_s 10
    assert [
        {key: line[key] for key in ("level", "request", "target", "path", "error_type", "status", "attempts")}
        for line in out.failures()
    ] == [
        {
            "level": "WARNING",
            "request": "a3",
            "target": "catalog",
            "path": "/status/404",
            "error_type": "HTTP4xx",
            "status": 404,
            "attempts": 1,
        }
    ]


def test_a_batch_call_publishes_emf_metrics_per_function_target_and_error_type(cold_start: Any, output: Any) -> None:
    handler = cold_start()
    assert handler(load_event("batch-http-api-v2.json"), lambda_context())["statusCode"] == 200
    out = output()

    assert out.metric("Calls", function="batch") == [1.0]
    assert out.metric("SkippedRequests", function="batch") == [0.0]
    assert len(out.metric("CallDuration", function="batch")) == 1
    assert out.metric("UpstreamRequests", function="batch", target="catalog") == [2.0]
    assert out.metric("UpstreamRequests", function="batch", target="orders") == [1.0]
    assert out.metric("Retries", function="batch", target="catalog") == [0.0]
    latencies = out.metric("UpstreamLatency", function="batch", target="catalog")
    assert len(latencies) == 2 and all(value > 0 for value in latencies)
    assert out.metric("UpstreamFailures", function="batch", target="catalog", error_type="HTTP4xx") == [1.0]
    assert out.metric("UpstreamFailures", function="batch", target="orders", error_type="HTTP4xx") == []
    assert out.metric("RateLimitWaits", function="batch") == []  # no rate limit configured, no metric


def test_retries_and_each_error_type_are_counted(cold_start: Any, output: Any) -> None:
    handler = cold_start(FANOUT_REQUEST_TIMEOUT_S="0.2", FANOUT_MAX_ATTEMPTS="3")
    requests = [
        {"id": "flaky", "target": "catalog", "path": "/flaky", "query": {"key": "obs-1", "fail": 2, "status": 503}},
        {"id": "down", "target": "catalog", "path": "/status/503"},
        {"id": "slow", "target": "orders", "path": "/hang"},
    ]
    status, body = post_batch(handler, {"requests": requests})
    assert status == 200
    assert [item["attempts"] for item in body["responses"]] == [3, 3, 3]
    out = output()

    summary = out.summary()
    assert (summary["succeeded"], summary["failed"], summary["retries"], summary["upstream_requests"]) == (1, 2, 6, 9)
    failures = {line["request"]: (line["target"], line["error_type"], line["attempts"]) for line in out.failures()}
    assert failures == {"down": ("catalog", "HTTP5xx", 3), "slow": ("orders", "ReadTimeout", 3)}
    assert out.metric("Retries", function="batch", target="catalog") == [4.0]
    assert out.metric("Retries", function="batch", target="orders") == [2.0]
    assert out.metric("UpstreamFailures", function="batch", target="catalog", error_type="HTTP5xx") == [1.0]
    assert out.metric("UpstreamFailures", function="batch", target="orders", error_type="ReadTimeout") == [1.0]
    assert len(out.metric("UpstreamLatency", function="batch", target="catalog")) == 6


def test_politeness_shows_per_target_in_the_summary_and_metrics(cold_start: Any, output: Any) -> None:
    """One target asks for a pause (a 429 with Retry-After: 1, then 200s), the other answers 503 to
    everything until its circuit opens: the summary and the EMF metrics say so per target, and the
    alarm's metric is the worse target's share of 429s and 503s."""
    handler = cold_start()
    requests = [
        *(
            {"id": f"p{i}", "target": "catalog", "path": "/retry-after", "query": {"key": "obs-pause"}}
            for i in range(4)
        ),
        *({"id": f"d{i}", "target": "orders", "path": "/status/503"} for i in range(12)),
    ]
    status, _ = post_batch(handler, {"requests": requests, "concurrency": 4})
    out = output()
    assert status == 200

    targets = out.summary()["targets"]
    assert targets["catalog"] == {
        "throttled": 1,
        "pauses": 1,
        "circuit_opened": 0,
        "limit": targets["catalog"]["limit"],
        "rate_per_s": targets["catalog"]["rate_per_s"],
        "circuit": "closed",
    }
    assert targets["catalog"]["rate_per_s"] is not None  # paced since it throttled
    orders = targets["orders"]
    assert (orders["circuit_opened"], orders["circuit"], orders["pauses"]) == (1, "open", 0)
    assert orders["throttled"] == out.metric("UpstreamRequests", function="batch", target="orders")[0]  # all 503s
    assert out.metric("Throttled", function="batch", target="catalog") == [1.0]
    assert out.metric("TargetPauses", function="batch", target="catalog") == [1.0]
    assert out.metric("CircuitOpen", function="batch", target="orders") == [1.0]
    assert out.metric("CircuitOpen", function="batch", target="catalog") == [0.0]
    assert out.metric("ConcurrencyLimit", function="batch", target="catalog") == [float(targets["catalog"]["limit"])]
    assert out.metric("MaxTargetThrottledShare", function="batch") == [100.0]  # orders: every request a 503


def test_a_healthy_call_publishes_a_throttled_share_of_zero(cold_start: Any, output: Any) -> None:
    handler = cold_start()
    response = handler(seed_event("async-http-api-v2.json", 5, "/async/5"), lambda_context())
    out = output()
    assert response["statusCode"] == 200
    assert out.metric("MaxTargetThrottledShare", function="gather") == [0.0]
    assert out.metric("Throttled", function="gather", target="default") == [0.0]
    assert out.summary()["targets"]["default"]["circuit"] == "closed"


def test_rate_limit_waits_are_counted_and_timed(cold_start: Any, output: Any) -> None:
    handler = cold_start(FANOUT_RATE_PER_S="2")
    requests = [{"id": str(index), "target": "catalog", "path": "/delay", "query": {"ms": 1}} for index in range(4)]
    assert post_batch(handler, {"requests": requests})[0] == 200
    out = output()

    # A bucket of 2 per second: the first two start at once, the other two wait about 0.5 and 1 s.
    assert out.metric("RateLimitWaits", function="batch") == [2.0]
    (waited_ms,) = out.metric("RateLimitWaitTime", function="batch")
    assert 1200 <= waited_ms <= 2200  # the waits as they were, not a count of them
    assert out.summary()["rate_limit_waits"] == 2


def test_no_body_query_or_authorization_value_reaches_logs_or_metrics(cold_start: Any, output: Any) -> None:
    handler = cold_start({"forward_authorization": True})
    request = {
        "id": "secretive",
        "method": "POST",
        "target": "catalog",
        "path": "/status/500",
        "query": {"api_key": SECRET},
        "headers": {"Authorization": f"Bearer {SECRET}"},
        "json": {"password": SECRET},
    }
    status, body = post_batch(handler, {"requests": [request]})
    assert (status, body["responses"][0]["status"]) == (200, 500)
    out = output()

    (failure,) = out.failures()
    assert (failure["path"], failure["error_type"]) == ("/status/500", "HTTP5xx")
    assert SECRET not in out.raw
    assert "api_key" not in out.raw and "Bearer" not in out.raw


@pytest.mark.parametrize(
    ("event_name", "function", "concurrency"),
    [("sync-http-api-v2.json", "sync", 1), ("async-http-api-v2.json", "gather", 6)],
)
def test_a_seed_call_reports_every_request_to_the_default_target(
    event_name: str, function: str, concurrency: int, cold_start: Any, output: Any
) -> None:
    handler = cold_start()
    route = event_name.split("-")[0]
    assert handler(seed_event(event_name, 6, f"/{route}/6"), lambda_context())["statusCode"] == 200
    out = output()

    summary = out.summary()
    assert (summary["function"], summary["n"], summary["concurrency"]) == (function, 6, concurrency)
    assert (summary["succeeded"], summary["failed"], summary["upstream_requests"]) == (6, 0, 6)
    assert out.failures() == []
    assert out.metric("UpstreamRequests", function=function, target="default") == [6.0]
    assert len(out.metric("UpstreamLatency", function=function, target="default")) == 6


def test_a_seed_call_counts_each_request_once_whether_it_succeeded_or_failed(
    cold_start: Any, output: Any, upstream: LocalUpstream
) -> None:
    # Successes are counted as they land, failures after the engine names them: each once.
    handler = cold_start(FANOUT_TARGET_URL=f"{upstream.url}/flaky?key=seed-mix&fail=3&status=503")
    response = handler(seed_event("async-http-api-v2.json", 8, "/async/8"), lambda_context())
    assert response["statusCode"] == 200
    assert sorted(json.loads(response["body"])["status_codes"]) == [200] * 5 + [503] * 3
    out = output()

    summary = out.summary()
    assert (summary["n"], summary["succeeded"], summary["failed"], summary["upstream_requests"]) == (8, 5, 3, 8)
    refs = [int(line["request"]) for line in out.failures()]
    assert len(refs) == 3 and refs == sorted(refs)  # in the call's order, not the order they ended in
    assert {line["error_type"] for line in out.failures()} == {"HTTP5xx"}
    assert out.metric("UpstreamRequests", function="gather", target="default") == [8.0]
    assert out.metric("UpstreamFailures", function="gather", target="default", error_type="HTTP5xx") == [3.0]
    assert len(out.metric("UpstreamLatency", function="gather", target="default")) == 8


def test_a_call_after_failures_publishes_its_metrics_with_only_its_own_dimensions(
    cold_start: Any, output: Any, upstream: LocalUpstream
) -> None:
    # One EMF line object per container, emptied for each line: nothing of a failure's line stays.
    handler = cold_start(FANOUT_TARGET_URL=f"{upstream.url}/flaky?key=seed-then-clean&fail=2&status=503")
    assert handler(seed_event("sync-http-api-v2.json", 2, "/sync/2"), lambda_context())["statusCode"] == 200
    assert output().metric("UpstreamFailures", function="sync", target="default", error_type="HTTP5xx") == [2.0]

    assert handler(seed_event("sync-http-api-v2.json", 3, "/sync/3"), lambda_context())["statusCode"] == 200
    out = output()
    assert [sorted(blob["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0]) for blob in out.blobs] == [
        ["function", "service"],
        ["function", "service", "target"],
    ]
    assert out.metric("Calls", function="sync") == [1.0]
    assert out.metric("UpstreamRequests", function="sync", target="default") == [3.0]
    assert len(out.metric("UpstreamLatency", function="sync", target="default")) == 3


def test_the_deadline_shows_as_a_failure_and_skips(cold_start: Any, output: Any, upstream: LocalUpstream) -> None:
    handler = cold_start(
        FANOUT_TARGET_URL=f"{upstream.url}/hang", FANOUT_DEADLINE_S="0.5", FANOUT_REQUEST_TIMEOUT_S="0.5"
    )
    assert handler(seed_event("sync-http-api-v2.json", 4, "/sync/4"), lambda_context())["statusCode"] == 200
    out = output()

    summary = out.summary()
    assert (summary["succeeded"], summary["failed"], summary["skipped"], summary["upstream_requests"]) == (0, 1, 3, 1)
    assert [(line["path"], line["error_type"]) for line in out.failures()] == [("/hang", "DeadlineExceeded")]
    assert out.metric("SkippedRequests", function="sync") == [3.0]
    assert out.metric("UpstreamFailures", function="sync", target="default", error_type="DeadlineExceeded") == [1.0]


def test_each_upstream_attempt_is_a_client_span_under_the_call(
    cold_start: Any, spans: InMemorySpanExporter, output: Any
) -> None:
    handler = cold_start(FANOUT_REQUEST_TIMEOUT_S="0.2", FANOUT_MAX_ATTEMPTS="2")
    requests = [
        {"id": "flaky", "target": "catalog", "path": "/flaky", "query": {"key": "span-1", "fail": 1, "status": 503}},
        {"id": "slow", "target": "orders", "path": "/hang"},
    ]
    assert post_batch(handler, {"requests": requests})[0] == 200
    output()  # drop the logs

    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    (call,) = [span for span in finished if span.name == "fanout batch"]
    attempts = [span for span in finished if span.kind is SpanKind.CLIENT]
    assert all(span.parent is not None and span.parent.span_id == call.context.span_id for span in attempts)
    flaky = [span for span in attempts if span.attributes["fanout.target"] == "catalog"]
    assert [span.attributes["http.response.status_code"] for span in flaky] == [503, 200]
    assert [span.status.status_code for span in flaky] == [StatusCode.ERROR, StatusCode.UNSET]
    assert {span.name for span in flaky} == {"GET catalog"}
    assert flaky[0].attributes["url.path"] == "/flaky"
    slow = [span for span in attempts if span.attributes["fanout.target"] == "orders"]
    assert [span.attributes["error.type"] for span in slow] == ["ReadTimeout", "ReadTimeout"]
    assert call.attributes["fanout.n"] == 2


def test_a_batch_call_a_sampler_dropped_has_no_spans_and_still_reports_every_attempt(
    cold_start: Any, spans: InMemorySpanExporter, output: Any
) -> None:
    """POST /batch decides once per call, as the seed routes do: a call whose trace is not sampled makes
    no span for any attempt, retries included, and each attempt's latency is still reported."""
    handler = cold_start(FANOUT_MAX_ATTEMPTS="2")
    requests = [
        {
            "id": "flaky",
            "target": "catalog",
            "path": "/flaky",
            "query": {"key": "unsampled-1", "fail": 1, "status": 503},
        },
        {"id": "steady", "target": "catalog", "path": "/delay", "query": {"ms": 0}},
    ]
    event = copy.deepcopy(load_event("batch-http-api-v2.json"))
    event["body"] = json.dumps({"requests": requests})
    event["headers"]["content-length"] = str(len(event["body"]))
    event["headers"]["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"  # not sampled
    response = handler(event, lambda_context())
    answer = json.loads(response["body"])
    assert (response["statusCode"], [item["status"] for item in answer["responses"]]) == (200, [200, 200])
    assert [item["attempts"] for item in answer["responses"]] == [2, 1]
    assert [span.name for span in spans.get_finished_spans()] == []
    assert len(output().metric("UpstreamLatency", function="batch", target="catalog")) == 3


def test_a_seed_calls_requests_are_spans_under_the_call_unless_it_is_not_sampled(
    cold_start: Any, spans: InMemorySpanExporter, output: Any
) -> None:
    """The seed routes decide once per call: spans for every request of a call that records, none for
    one a sampler dropped (its requests' latencies are still reported)."""
    handler = cold_start()
    assert handler(seed_event("async-http-api-v2.json", 3, "/async/3"), lambda_context())["statusCode"] == 200
    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    (call,) = [span for span in finished if span.name == "fanout gather"]
    attempts = [span for span in finished if span.kind is SpanKind.CLIENT]
    assert [span.parent.span_id for span in attempts if span.parent] == [call.context.span_id] * 3
    assert [span.attributes["http.response.status_code"] for span in attempts] == [200] * 3
    assert {span.name for span in attempts} == {"GET default"}
    output()

    spans.clear()
    unsampled = seed_event("async-http-api-v2.json", 3, "/async/3")  # a caller's trace it did not sample
    unsampled["headers"]["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert handler(unsampled, lambda_context())["statusCode"] == 200
    assert [span.name for span in spans.get_finished_spans()] == []  # neither FastAPI's, the call's nor any request's
    assert len(output().metric("UpstreamLatency", function="gather", target="default")) == 3


def test_a_large_call_publishes_a_sample_of_its_latencies_and_every_count(cold_start: Any, output: Any) -> None:
    handler = cold_start(FANOUT_MAX_CONCURRENCY="50")
    assert handler(seed_event("async-http-api-v2.json", 250, "/async/250"), lambda_context())["statusCode"] == 200
    out = output()  # and no warning (an error here) about an empty flush after Powertools' own at 100 values

    assert out.metric("UpstreamRequests", function="gather", target="default") == [250.0]
    latencies = out.metric("UpstreamLatency", function="gather", target="default")
    assert len(latencies) == 100 and latencies == sorted(latencies)
    (line,) = [blob for blob in out.blobs if "UpstreamLatency" in blob]  # the sample in one EMF line
    assert line["_aws"]["CloudWatchMetrics"][0]["Metrics"][-1] == {"Name": "UpstreamLatency", "Unit": "Milliseconds"}
    assert line["UpstreamRequests"] == [250.0]  # beside the counts of the same target


def test_counting_an_answered_request_without_its_record_counts_what_its_record_would() -> None:
    by_record, by_answer = CallTally(), CallTally()
    for latency in (12.5, 7.25):
        by_record.add(UpstreamRecord("0", "default", "GET", "/", 1, (latency,), 200))
        by_answer.add_answered("default", latency)
    for tally in (by_record, by_answer):
        (counted,) = tally.targets.values()
        assert (tally.count, tally.failed, tally.skipped) == (2, [], 0)
        assert (counted.attempts, counted.retries, counted.latencies_ms, counted.failures) == (2, 0, [12.5, 7.25], {})


def test_with_metrics_disabled_no_values_pile_up_from_call_to_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")  # Powertools then flushes without clearing
    telemetry = Telemetry(service=DEFAULT_SERVICE, namespace=NAMESPACE)
    tally = CallTally()
    tally.add_answered("default", 5.0)
    call = CallReport("gather", "gather", 1, 0.005, 30.0, tally)
    for _ in range(3):
        telemetry.report(call)
    assert "_aws" not in capsys.readouterr().out
    assert telemetry._emf.metric_set["UpstreamRequests"]["Value"] == [1.0]  # the last line's, not three calls'


class Writes:
    """A stdout that keeps each write apart: what the reader of a function's output is woken for."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_calls_metrics_are_one_write_of_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    telemetry = Telemetry(service=DEFAULT_SERVICE, namespace=NAMESPACE)
    tally = CallTally()
    tally.add_answered("a", 5.0)
    tally.add(UpstreamRecord("1", "b", "GET", "/", 1, (9.0,), None, "ReadTimeout"))
    tally.add(UpstreamRecord("2", "b", "GET", "/", 2, (3.0, 4.0), 503, None))
    stdout = Writes()
    monkeypatch.setattr("sys.stdout", stdout)
    telemetry._emit_metrics(CallReport("batch", "semaphore", 2, 0.01, 30.0, tally), {"elapsed_ms": 10.0, "skipped": 0})
    (written,) = stdout.writes
    lines = [json.loads(line) for line in written.splitlines()]
    assert written.endswith("\n") and len(lines) == 5  # the call; per target a and b; b's two error types
    dimensions = [tuple(line["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0]) for line in lines]
    assert dimensions == [
        ("function", "service"),
        ("function", "target", "service"),
        ("function", "target", "service"),
        ("function", "target", "error_type", "service"),
        ("function", "target", "error_type", "service"),
    ]
    assert [(line.get("target"), line.get("error_type")) for line in lines] == [
        (None, None),
        ("a", None),
        ("b", None),
        ("b", "HTTP5xx"),
        ("b", "ReadTimeout"),
    ]
    assert [line["UpstreamRequests"] for line in lines[1:3]] == [[1.0], [3.0]]
    assert telemetry._emf.metric_set == {}  # emptied, as Powertools' flush leaves it


def test_latency_sample_keeps_every_value_up_to_the_size_then_order_statistics() -> None:
    assert latency_sample([3.0, 1.0, 2.0], size=5) == [3.0, 1.0, 2.0]
    values = [float(v) for v in range(1000, 0, -1)]  # 1000 .. 1, unordered for the sample
    sample = latency_sample(values, size=100)
    assert len(sample) == 100
    assert (sample[0], sample[-1]) == (1.0, 1000.0)  # min and max kept
    assert sample[49] == 1 + round(49 * 999 / 99)  # the median region, evenly spaced
