"""What an operator sees in CloudWatch: one summary log line and metrics per call, spans per request.

- Logs: Powertools Logger, JSON, level from LOG_LEVEL. `observe_invocations` puts
  the Lambda request id and API Gateway's request id (`correlation_id`) on every
  line. A call logs one summary line and one line per failed upstream request
  (target, path, error type, attempts); never a body, a query string or a header.
- Metrics: Powertools EphemeralMetrics in Embedded Metric Format (CloudWatch
  turns the log lines into metrics; no API call, no latency). Namespace from
  POWERTOOLS_METRICS_NAMESPACE. Dimensions stay few, because each combination is
  a billed custom metric: `function` for the call's metrics, plus `target` for
  upstream requests, plus `error_type` for failures (README, "Operating it").
- Traces: the OpenTelemetry API, not Powertools Tracer. Tracer is built on the
  X-Ray SDK, which AWS put in maintenance mode in February 2026 and stops
  supporting on 25 February 2027, recommending OpenTelemetry. Without an SDK
  (tests, local runs) every span is a no-op; on Lambda the ADOT layer that
  template.yaml adds when tracing is on sends them to X-Ray.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricResolution, MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from fanout.engine import RequestError
from fanout.politeness import NO_TARGETS, TargetReport

SERVICE_ENV = "POWERTOOLS_SERVICE_NAME"
NAMESPACE_ENV = "POWERTOOLS_METRICS_NAMESPACE"
DEFAULT_SERVICE = "fanout"
DEFAULT_NAMESPACE = "fanout"

_tracer = trace.get_tracer("fanout")
R = TypeVar("R")
LATENCY_SAMPLE_SIZE = 100  # UpstreamLatency values per target per call: EMF takes up to 100 values a metric


class UpstreamRecord(NamedTuple):
    """One request of a call as the operator sees it: where it went and how it ended."""

    ref: str  # the batch item's id, or the seed request's index
    target: str  # a FANOUT_UPSTREAMS name; "default" for FANOUT_TARGET_URL
    method: str
    path: str  # without the query string, which may carry secrets
    attempts: int
    latencies_ms: tuple[float, ...] = ()  # one per attempt that ended (answered or failed)
    status: int | None = None
    error: str | None = None  # transport error kind, e.g. ReadTimeout
    internal: str | None = None  # what the log line may add that the caller never sees (a refused address)
    skipped: bool = False

    @property
    def error_type(self) -> str | None:
        """Why it failed, from a small fixed vocabulary (it is a metric dimension); None if it did not."""
        if self.skipped:
            return None
        if self.error is not None:
            return self.error
        if self.status is not None and self.status >= 400:
            return f"HTTP{self.status // 100}xx"
        return None


class CallReport(NamedTuple):
    function: str  # sync | gather | semaphore | batch: the function serving the route
    strategy: str
    concurrency: int
    elapsed_s: float
    deadline_s: float
    tally: CallTally  # every request of the call, counted
    rate_limit_waits: int | None = None  # None: no rate limit configured
    rate_limit_wait_s: float = 0.0
    targets: Mapping[str, TargetReport] = NO_TARGETS  # what politeness did to each target

    def throttled_shares(self) -> dict[str, float]:
        """Per target, the percentage of this call's requests to it answered 429 or 503."""
        shares = {}
        for name, report in self.targets.items():
            counted = self.tally.targets.get(name)
            sent = counted.attempts if counted is not None else 0
            shares[name] = 100 * report.throttled / sent if sent else 0.0
        return shares

    def summary(self) -> dict[str, Any]:
        tally = self.tally
        failed = len(tally.failed)
        skipped = tally.skipped
        summary: dict[str, Any] = {
            "function": self.function,
            "strategy": self.strategy,
            "n": tally.count,
            "concurrency": self.concurrency,
            "succeeded": tally.count - failed - skipped,
            "failed": failed,
            "skipped": skipped,
            "upstream_requests": sum(target.attempts for target in tally.targets.values()),
            "retries": sum(target.retries for target in tally.targets.values()),
            "elapsed_ms": round(self.elapsed_s * 1000, 1),
            "deadline_left_ms": round((self.deadline_s - self.elapsed_s) * 1000, 1),
        }
        if self.rate_limit_waits is not None:
            summary["rate_limit_waits"] = self.rate_limit_waits
            summary["rate_limit_wait_ms"] = round(self.rate_limit_wait_s * 1000, 1)
        if self.targets:
            summary["targets"] = {name: report._asdict() for name, report in self.targets.items()}
        return summary


class TargetTally:
    """What one call sent to one target, and how it ended."""

    __slots__ = ("attempts", "failures", "latencies_ms", "retries")

    def __init__(self) -> None:
        self.attempts = 0
        self.retries = 0
        self.latencies_ms: list[float] = []
        self.failures = Counter[str]()  # by error type


class CallTally:
    """A call's requests, counted once for the summary, the log lines and the metrics: by target,
    the failed ones, the skipped.

    A route can count each request as it ends, while the others are still on the wire: a call
    has up to 10,000, and counting them all after the last answer is work the caller waits for.
    """

    __slots__ = ("count", "failed", "skipped", "targets")

    def __init__(self, requests: Iterable[UpstreamRecord] = ()) -> None:
        self.count = 0
        self.targets: dict[str, TargetTally] = {}  # in the order of each target's first request
        self.failed: list[tuple[UpstreamRecord, str]] = []  # with its error type
        self.skipped = 0
        for record in requests:
            self.add(record)

    def add_answered(self, target: str, latency_ms: float) -> None:
        """A request answered below 400 at its first attempt: what `add` counts of its record, without
        building the record (this runs for almost every request)."""
        self.count += 1
        counted = self._target(target)
        counted.attempts += 1
        counted.latencies_ms.append(latency_ms)

    def add(self, record: UpstreamRecord) -> None:
        self.count += 1
        target = self._target(record.target)
        target.attempts += record.attempts
        if record.attempts > 1:
            target.retries += record.attempts - 1
        target.latencies_ms.extend(record.latencies_ms)
        error_type = record.error_type
        if error_type is not None:
            target.failures[error_type] += 1
            self.failed.append((record, error_type))
        elif record.skipped:
            self.skipped += 1

    def _target(self, name: str) -> TargetTally:
        counted = self.targets.get(name)
        if counted is None:
            counted = self.targets[name] = TargetTally()
        return counted


class Telemetry:
    """Reports calls as log lines and EMF metrics; one per container, settings read once."""

    def __init__(self, *, service: str, namespace: str) -> None:
        self.service = service
        self.namespace = namespace
        self.logger = Logger(service=service)
        # One EMF line at a time, each flushed before the next: a new EphemeralMetrics per line
        # read the environment and listed Powertools' units again (some 15 us each, warm).
        self._emf = EphemeralMetrics(namespace=namespace, service=service)

    def __repr__(self) -> str:
        return f"Telemetry(service={self.service!r}, namespace={self.namespace!r})"

    @classmethod
    def from_env(cls) -> Telemetry:
        return cls(
            service=os.environ.get(SERVICE_ENV) or DEFAULT_SERVICE,
            namespace=os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE,
        )

    def report(self, call: CallReport) -> None:
        summary = call.summary()
        for record, error_type in call.tally.failed:
            self.logger.warning(
                "upstream request failed",
                extra={
                    "function": call.function,
                    "request": record.ref,
                    "target": record.target,
                    "method": record.method,
                    "path": record.path,
                    "error_type": error_type,
                    "status": record.status,
                    "attempts": record.attempts,
                    **({"detail": record.internal} if record.internal else {}),
                },
            )
        self.logger.info("fanout call", extra=summary)
        self._emit_metrics(call, summary)

    def _emit_metrics(self, call: CallReport, summary: dict[str, Any]) -> None:
        """The call's EMF lines, written at once: each write wakes whatever reads the function's output
        (Lambda's runtime; here, the bench), some 0.2 ms a line once the call has run cold."""
        lines: list[str] = []
        calls = self._metrics(function=call.function)
        calls.add_metric("Calls", MetricUnit.Count, 1)
        calls.add_metric("CallDuration", MetricUnit.Milliseconds, summary["elapsed_ms"])
        calls.add_metric("SkippedRequests", MetricUnit.Count, summary["skipped"])
        if call.rate_limit_waits is not None:
            calls.add_metric("RateLimitWaits", MetricUnit.Count, call.rate_limit_waits)
            calls.add_metric("RateLimitWaitTime", MetricUnit.Milliseconds, summary["rate_limit_wait_ms"])
        shares = call.throttled_shares()
        if shares:  # the alarm's metric: one per function, whichever targets a call reached
            calls.add_metric("MaxTargetThrottledShare", MetricUnit.Percent, round(max(shares.values()), 1))
        lines.append(_line(calls))

        for target, counted in call.tally.targets.items():
            sent = self._metrics(function=call.function, target=target)
            sent.add_metric("UpstreamRequests", MetricUnit.Count, counted.attempts)
            sent.add_metric("Retries", MetricUnit.Count, counted.retries)
            polite = call.targets.get(target)
            if polite is not None:
                sent.add_metric("Throttled", MetricUnit.Count, polite.throttled)
                sent.add_metric("TargetPauses", MetricUnit.Count, polite.pauses)
                sent.add_metric("ConcurrencyLimit", MetricUnit.Count, polite.limit)
                sent.add_metric("CircuitOpen", MetricUnit.Count, 0 if polite.circuit == "closed" else 1)
            if counted.latencies_ms:  # on the same line: one line fewer to write before the caller has its answer
                sent.metric_set["UpstreamLatency"] = _values(
                    MetricUnit.Milliseconds, latency_sample(counted.latencies_ms)
                )
            lines.append(_line(sent))
            for error_type, count in sorted(counted.failures.items()):
                failed = self._metrics(function=call.function, target=target, error_type=error_type)
                failed.add_metric("UpstreamFailures", MetricUnit.Count, count)
                lines.append(_line(failed))
        if any(lines):
            sys.stdout.write("".join(lines))  # sys.stdout as it is now, as Powertools' print finds it

    def _metrics(self, **dimensions: str) -> EphemeralMetrics:
        """The container's one EMF line, emptied, with these dimensions."""
        metrics = self._emf
        metrics.clear_metrics()  # flushing clears it too, except where metrics are disabled
        for name, value in dimensions.items():
            metrics.add_dimension(name=name, value=value)
        return metrics


async def traced_attempt(
    attempt: Callable[[], Awaitable[R]],
    *,
    target: str,
    method: str,
    path: str,
    status_of: Callable[[R], int],
    latencies_ms: list[float],
) -> R:
    """One upstream attempt in a client span (an X-Ray subsegment); its latency is appended
    to `latencies_ms` when it ends with an answer or an error, not when it is cancelled.

    For a call whose span records (`span_records`): a call decides once, not each attempt."""
    attributes = {"fanout.target": target, "http.request.method": method, "url.path": path}
    with _tracer.start_as_current_span(f"{method} {target}", kind=SpanKind.CLIENT, attributes=attributes) as span:
        try:
            result = await timed_attempt(attempt, latencies_ms)
        except RequestError as exc:
            span.set_attribute("error.type", exc.kind)  # the kind only: a message may hold a URL
            span.set_status(Status(StatusCode.ERROR))
            raise
        status = status_of(result)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return result


async def timed_attempt(attempt: Callable[[], Awaitable[R]], latencies_ms: list[float]) -> R:
    """One upstream attempt with no span, for a call whose span does not record (`span_records`)."""
    started = time.perf_counter()
    try:
        result = await attempt()
    except RequestError:
        latencies_ms.append(_ms_since(started))
        raise
    latencies_ms.append(_ms_since(started))
    return result


def span_records() -> bool:
    """Whether the current span records (an SDK, and a sampled call). Read once per call: a sampler decides
    a child as its parent, so no attempt of a call that does not record would either, and checking the
    context on every attempt cost some 2 us a request (1.5 to 4 % of a /batch call at 0 ms)."""
    return trace.get_current_span().is_recording()


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _values(unit: MetricUnit, values: list[float]) -> dict[str, Any]:
    """A metric of many values, as Powertools' `add_metric` builds it one value at a time.

    `add_metric` formats the metric's whole value list into a debug message on every call:
    100 values cost about 0.8 ms, on every call of 100 requests or more, before the caller has
    its answer. Set whole, they cost 0.07 ms, and Powertools still serializes and prints the line.
    """
    return {
        "Unit": unit.value,
        "StorageResolution": MetricResolution.Standard.value,
        "Value": [float(value) for value in values],
    }


def _line(metrics: EphemeralMetrics) -> str:
    """What Powertools' `flush_metrics` would print, as a line, and the metrics emptied as it leaves them:
    "" when there is nothing to publish or metrics are disabled (POWERTOOLS_METRICS_DISABLED)."""
    if not metrics.metric_set or is_metrics_disabled():
        return ""
    line = json.dumps(metrics.serialize_metric_set(), separators=(",", ":")) + "\n"
    metrics.clear_metrics()
    return line


def latency_sample(latencies_ms: list[float], size: int = LATENCY_SAMPLE_SIZE) -> list[float]:
    """All the latencies up to `size`; beyond, `size` evenly spaced order statistics (min and max kept).

    One EMF line carries at most 100 values of a metric, and a call has up to 10,000
    requests. The sample keeps the shape of the call's distribution (its percentiles
    to 1%), not its count: UpstreamRequests counts.
    """
    if len(latencies_ms) <= size:
        return latencies_ms
    ordered = sorted(latencies_ms)
    step = (len(ordered) - 1) / (size - 1)
    return [ordered[round(index * step)] for index in range(size)]


@contextmanager
def call_span(function: str, strategy: str, n: int) -> Iterator[None]:
    """The parent span of one call's upstream spans, current while the call runs (`span_records` reads it)."""
    attributes = {"fanout.function": function, "fanout.strategy": strategy, "fanout.n": n}
    with _tracer.start_as_current_span(f"fanout {function}", attributes=attributes):
        yield


def observe_invocations(handler: Callable[[dict[str, Any], Any], Any], telemetry: Telemetry) -> Callable[..., Any]:
    """The Lambda handler with the invocation's ids (Lambda's and API Gateway's) on every log line."""
    return telemetry.logger.inject_lambda_context(
        handler, correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
    )
