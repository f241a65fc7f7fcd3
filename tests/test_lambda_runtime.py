"""The built function as Lambda runs it: `sam build` artifacts, awslambdaric, and a Runtime API of our own.

What only this path shows: an init error as the runtime reports it, warm reuse of one
process, events that are not API Gateway requests, and the size of the response the
runtime really posts (Lambda refuses one over 6 MB, and the caller then gets nothing).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import load_event, runtime_python
from fanout_local.upstream import LocalUpstream
from lambda_runtime import MAX_RESPONSE_BYTES, LambdaProcess, RuntimeApi, lambda_process

pytestmark = pytest.mark.sam


@pytest.fixture(scope="session")
def ric() -> Path:
    path = os.environ.get("FANOUT_LAMBDA_RIC")
    if not path or not (Path(path) / "awslambdaric").is_dir() or runtime_python() is None:
        pytest.skip("awslambdaric for python3.13 not installed: run the tests with `make test`")
    return Path(path)


@pytest.fixture
def start(built: Path, ric: Path, tmp_path: Path) -> Iterator[Any]:
    """Start a built function under the runtime client: `start(function, **env)`; stopped after the test."""
    started: list[Any] = []

    def begin(function: str, *, api: RuntimeApi | None = None, **env: str) -> LambdaProcess:
        python = str(runtime_python())
        context = lambda_process(built, function, ric=ric, python=python, env=env, scratch=tmp_path, api=api)
        started.append(context)
        return context.__enter__()

    yield begin
    for context in reversed(started):
        context.__exit__(None, None, None)


def upstreams(upstream: LocalUpstream) -> str:
    target = {"url": upstream.url, "allow_http": True}
    return json.dumps({"catalog": target, "orders": target, "up": target})


def batch_event(body: dict[str, Any]) -> dict[str, Any]:
    event = copy.deepcopy(load_event("batch-http-api-v2.json"))
    event["body"] = json.dumps(body)
    return event


def test_a_bad_configuration_is_an_init_error_naming_the_variable(start: Any) -> None:
    function = start("SemaphoreFunction", FANOUT_MAX_CONCURRENCY="lots")
    assert function.api.init_failed.wait(30), function.output
    assert function.api.init_error is not None
    assert function.api.init_error["errorType"] == "ConfigError"
    assert function.api.init_error["errorMessage"] == (
        "Invalid configuration: FANOUT_MAX_CONCURRENCY (got 'lots'): "
        "Input should be a valid integer, unable to parse string as an integer"
    )
    assert function.process.wait(timeout=10) == 1


def test_warm_invocations_are_served_by_one_process(start: Any, upstream: LocalUpstream) -> None:
    function = start(
        "SemaphoreFunction", FANOUT_TARGET_URL=f"{upstream.url}/delay?ms=1", FANOUT_ALLOW_PRIVATE_NETWORKS="true"
    )
    first = function.api.invoke(load_event("async_sem-http-api-v2.json"))
    opened = upstream.stats.connections
    second = function.api.invoke(load_event("async_sem-rest-v1.json"))
    for invocation in (first, second):
        status, body = invocation.http
        assert (status, body["succeeded"], body["failed"]) == (200, body["requests"], 0)
    assert upstream.stats.connections == opened  # the second call reused the first one's pool
    assert function.process.poll() is None


@pytest.mark.parametrize(
    ("event", "described"),
    [
        (None, "null"),
        ({}, "an empty object"),
        ([1, 2], "a JSON array"),
        ("hello", "a JSON str"),
        ({"Records": [{"eventSource": "aws:sqs", "body": "{}"}]}, "an event of aws:sqs records"),
        ({"Records": [{"eventSource": "aws:s3", "s3": {}}]}, "an event of aws:s3 records"),
        ({"detail-type": "Scheduled Event", "source": "aws.events"}, "an object with keys detail-type, source"),
    ],
)
def test_an_event_that_is_no_api_request_is_refused_plainly_and_the_next_is_served(
    event: Any, described: str, start: Any, upstream: LocalUpstream
) -> None:
    function = start(
        "SyncFunction", FANOUT_TARGET_URL=f"{upstream.url}/delay?ms=1", FANOUT_ALLOW_PRIVATE_NETWORKS="true"
    )
    refused = function.api.invoke(event)
    assert refused.outcome == "error"
    error = refused.json()
    assert error["errorType"] == "UnsupportedEvent"
    assert error["errorMessage"] == (
        "this function expects an API Gateway request (HTTP API payload format 2.0, or a REST API proxy event); "
        f"it was invoked with {described}"
    )
    status, body = function.api.invoke(load_event("sync-http-api-v2.json")).http
    assert (status, body["succeeded"]) == (200, body["requests"])
    assert upstream.stats.requests == body["requests"]  # nothing was sent for the refused event


def test_the_answer_as_posted_fits_lambdas_limit_whatever_the_bodies_hold(start: Any, upstream: LocalUpstream) -> None:
    """24 bodies of 256 KiB of double quotes: 6 MiB of body, over 12 MiB once escaped twice."""
    function = start("BatchFunction", FANOUT_UPSTREAMS=upstreams(upstream), FANOUT_ALLOW_PRIVATE_NETWORKS="true")
    requests = [{"id": f"q{i}", "target": "up", "path": "/quotes", "query": {"n": 262144}} for i in range(24)]
    invocation = function.api.invoke(batch_event({"requests": requests}))
    assert invocation.outcome == "response"  # posted and taken: not refused as too large
    assert len(invocation.payload) <= 4_000_000  # FANOUT_MAX_RESPONSE_BYTES, the default
    status, body = invocation.http
    assert status == 200
    assert [item["id"] for item in body["responses"]] == [f"q{i}" for i in range(24)]
    assert all(item["status"] == 200 for item in body["responses"])
    kept = [item for item in body["responses"] if not item.get("body_dropped")]
    assert kept and all(item["body"] == '"' * 262144 for item in kept)
    assert body["summary"]["bodies_dropped"] == 24 - len(kept) > 0
    assert len(invocation.payload) > 4_000_000 - 4 * 262144  # it kept all it could (a body posts as 1 MiB)


def test_the_limit_can_be_set_to_lambdas_own(start: Any, upstream: LocalUpstream) -> None:
    function = start(
        "BatchFunction",
        FANOUT_UPSTREAMS=upstreams(upstream),
        FANOUT_ALLOW_PRIVATE_NETWORKS="true",
        FANOUT_MAX_RESPONSE_BYTES="6000000",
        FANOUT_MAX_ITEM_BYTES="1000000",
    )
    requests = [{"id": f"q{i}", "target": "up", "path": "/quotes", "query": {"n": 1000000}} for i in range(8)]
    invocation = function.api.invoke(batch_event({"requests": requests}))
    assert invocation.outcome == "response"
    assert len(invocation.payload) <= 6_000_000 < MAX_RESPONSE_BYTES
    # a quote is 4 bytes as posted (\\\"): one body of a million is 4 MB, and only one fits in 6
    assert invocation.http[1]["summary"]["bodies_dropped"] == 7


def test_a_target_at_the_runtime_api_is_refused_even_with_private_networks_allowed(start: Any) -> None:
    api = RuntimeApi().start()
    runtime = {"runtime": {"url": f"http://{api.address}", "allow_http": True}}
    function = start(
        "BatchFunction", api=api, FANOUT_ALLOW_PRIVATE_NETWORKS="true", FANOUT_UPSTREAMS=json.dumps(runtime)
    )
    item = {"id": "r", "target": "runtime", "path": "/2018-06-01/runtime/invocation/next"}
    status, body = function.api.invoke(batch_event({"requests": [item]})).http
    assert status == 200
    assert body["responses"][0]["error"] == {
        "type": "ForbiddenAddress",
        "message": "refused (runtime_api): the destination is the Lambda runtime API",
    }
    assert not [agent for agent in api.user_agents if "aiohttp" in agent]  # only the runtime client called it


@pytest.mark.parametrize(
    ("function", "event", "n"),
    [("SyncFunction", "sync-http-api-v2.json", 10), ("GatherFunction", "async-http-api-v2.json", 20)],
)
def test_a_seed_route_answers_before_lambdas_remaining_time_runs_out(
    function: str, event: str, n: int, start: Any, upstream: LocalUpstream
) -> None:
    """3 s left of the invocation, a 4 s upstream: the answer leaves in time, the requests cut by the deadline.
    The 3 s run from when the runtime client took the event, as Lambda's do: the cold start before is not in
    them (timed from the test's side, a cold start slowed by a busy machine once made it 3.01 s)."""
    process = start(function, FANOUT_TARGET_URL=f"{upstream.url}/delay?ms=4000", FANOUT_ALLOW_PRIVATE_NETWORKS="true")
    invocation = process.api.invoke(load_event(event), timeout_s=3)
    status, body = invocation.http  # asserts a response in time: "timed_out" is what Lambda would have ended
    assert status == 200
    assert body["status_codes"] == [None] * n
    assert body["errors"] == [{"index": i, "error": "DeadlineExceeded"} for i in range(n)]


# --- the jobs worker, built, under the runtime client, against moto in server mode -----------------


@pytest.fixture
def aws_stack() -> Iterator[tuple[Any, dict[str, dict[str, str]]]]:
    """moto's server with the template's table, buckets and queues, as `make run` makes them."""
    from fanout_local.stack import LocalStack
    from fanout_local.template import load_template, parameter_values

    template = load_template(Path(__file__).resolve().parents[1] / "template.yaml")
    stack = LocalStack(0)
    stack.start()
    try:
        yield stack, stack.create(template, parameter_values(template, {"TargetUrl": "https://example.com"}))
    finally:
        stack.stop()


def test_the_built_worker_runs_a_job_from_its_sqs_events(
    start: Any, upstream: LocalUpstream, aws_stack: tuple[Any, dict[str, dict[str, str]]]
) -> None:
    from fanout.jobs.files import JobFiles, inline_key
    from fanout.jobs.messages import SplitInput, decode, encode
    from fanout.jobs.store import JobStore

    stack, resources = aws_stack
    env = {
        **stack.environment(),
        "FANOUT_UPSTREAMS": upstreams(upstream),
        "FANOUT_ALLOW_PRIVATE_NETWORKS": "true",
        "FANOUT_JOBS_TABLE": resources["JobsTable"]["Ref"],
        "FANOUT_INPUT_BUCKET": resources["InputBucket"]["Ref"],
        "FANOUT_RESULTS_BUCKET": resources["ResultsBucket"]["Ref"],
        "FANOUT_CHUNK_QUEUE_URL": resources["ChunkQueue"]["Ref"],
        "FANOUT_DEAD_LETTER_QUEUE_ARN": resources["ChunkDeadLetterQueue"]["Arn"],
        "FANOUT_CHUNK_ITEMS": "3",
        "FANOUT_WORKER_TIMEOUT_S": "30",
        "FANOUT_CHUNK_VISIBILITY_TIMEOUT_S": "180",
    }
    function = start("WorkerFunction", **env)
    job_id = "e" * 32
    files = JobFiles(stack.client("s3"), input_bucket=env["FANOUT_INPUT_BUCKET"], results_bucket="", url_ttl_s=60)
    lines = [{"id": f"w{i}", "target": "up", "path": "/delay", "query": {"ms": 1}} for i in range(7)]
    files.put_input(inline_key(job_id), "".join(json.dumps(line) + "\n" for line in lines).encode())
    store = JobStore(stack.client("dynamodb"), env["FANOUT_JOBS_TABLE"], retention_days=1)
    store.create(job_id, input_key=inline_key(job_id), spec={}, now_ms=int(time.time() * 1000))
    sqs, queue = stack.client("sqs"), env["FANOUT_CHUNK_QUEUE_URL"]

    def deliver(bodies: list[str]) -> Any:
        event = load_event("worker-sqs.json")
        record = event["Records"][0]
        event["Records"] = [
            {**record, "messageId": f"m{i}", "body": body, "eventSourceARN": resources["ChunkQueue"]["Arn"]}
            for i, body in enumerate(bodies)
        ]
        invocation = function.api.invoke(event, timeout_s=30)
        assert invocation.outcome == "response", invocation.payload[:500]
        return invocation.json()

    assert deliver([encode(SplitInput(job_id=job_id, key=inline_key(job_id)))]) == {"batchItemFailures": []}
    chunks = [m["Body"] for m in sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]]
    assert sorted(decode(body).items for body in chunks) == [1, 3, 3]  # type: ignore[union-attr]
    assert deliver(chunks) == {"batchItemFailures": []}  # three records of one batch, on one loop
    job = store.get(job_id)
    assert job is not None
    assert (job["status"], job["succeeded"], job["requests"]) == ("succeeded", 7, {"up": 7})


def test_a_worker_without_its_resources_is_an_init_error_naming_them(start: Any) -> None:
    function = start("WorkerFunction")
    assert function.api.init_failed.wait(30)
    assert function.api.init_error is not None
    assert function.api.init_error["errorType"] == "ConfigError"
    assert "FANOUT_JOBS_TABLE" in function.api.init_error["errorMessage"]
