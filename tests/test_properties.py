"""Properties of /batch (hypothesis) and a schema fuzz of the whole API, the jobs routes included
(schemathesis, with moto): no 500, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moto import mock_aws
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from conftest import INPUT, REGION, RESULTS, TABLE, create_resources, post_batch
from fanout.app import create_app
from fanout.settings import Settings, UpstreamTarget
from fanout_local.upstream import LocalUpstream, running_in_thread

ids = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
items = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        "target": st.just("up"),
        "path": st.sampled_from(["/delay", "/status/404", "/status/503", "/echo", "/reset", "/bytes"]),
    },
    optional={"query": st.fixed_dictionaries({"ms": st.integers(0, 5)}), "idempotency_key": st.just("k")},
)
batches = st.fixed_dictionaries(
    {"requests": st.lists(st.tuples(ids, items), min_size=1, max_size=12, unique_by=lambda pair: pair[0])},
    optional={
        "strategy": st.sampled_from(["sync", "gather", "semaphore"]),
        "concurrency": st.integers(1, 6),
        "fail_fast": st.booleans(),
        "tolerated_failure_percentage": st.floats(0, 100),
    },
)


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[LocalUpstream]:
    with running_in_thread(delay_ms=0) as server:
        yield server


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches)
def test_every_request_comes_back_once_in_order(
    batch: dict[str, Any], shared_upstream: LocalUpstream, import_handler: Any
) -> None:
    handler = _handler(shared_upstream, import_handler)
    body = {**batch, "requests": [{"id": id_, **item} for id_, item in batch["requests"]]}
    status, answer = post_batch(handler, body)
    assert status in (200, 502)
    assert [item["id"] for item in answer["responses"]] == [id_ for id_, _ in batch["requests"]]
    for item in answer["responses"]:
        assert sum(key in item for key in ("status", "error", "skipped")) == 1, item
    summary = answer["summary"]
    assert summary["succeeded"] + summary["failed"] + summary["skipped"] == len(batch["requests"])


_handlers: dict[int, Any] = {}


def _handler(upstream: LocalUpstream, import_handler: Any) -> Any:
    """One cold start per upstream: hypothesis runs many examples in one test."""
    if upstream.port not in _handlers:
        upstreams = {"up": {"url": upstream.url, "allow_http": True}}
        _handlers.clear()
        _handlers[upstream.port] = import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams)).handler
    return _handlers[upstream.port]


# --- schema fuzz: every operation of the OpenAPI, served by uvicorn on 127.0.0.1 -------------------


def _app_settings(upstream_url: str) -> Settings:
    return Settings(
        target_url=f"{upstream_url}/delay?ms=0",
        upstreams={"up": UpstreamTarget(url=upstream_url, allow_http=True)},
        allow_private_networks=True,
        max_requests=20,
        deadline_s=2,
        request_timeout_s=1,
    )


schema = schemathesis.openapi.from_dict(create_app(_app_settings("http://127.0.0.1:9")).openapi())


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """The app on a real socket, as httpx's own test suite serves its test app."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(app.state.transport.aclose(), loop).result(timeout=10)
    server.should_exit = True
    thread.join(timeout=10)
    loop.close()


@pytest.fixture(scope="module")
def live_api(shared_upstream: LocalUpstream) -> Iterator[str]:
    with serving(create_app(_app_settings(shared_upstream.url))) as url:
        yield url


def refusal_says_why(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx names what is wrong: a 422's message and its fields, a 413's limit."""
    if 400 <= response.status_code < 500:
        body = response.json()
        if response.status_code == 422:
            assert body["message"] and all(error["loc"] and error["msg"] for error in body["detail"]), body
        else:
            assert body["detail"], body
    return None


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_500_and_every_refusal_says_why(case: Any, live_api: str) -> None:
    case.call_and_validate(
        base_url=live_api,
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance, refusal_says_why],
    )


# --- schema fuzz of the jobs routes, with S3, SQS and DynamoDB in moto (in-process) ----------------


def _jobs_app(upstream_url: str, queue_url: str) -> Any:
    """The jobs routes' app (FANOUT_ROUTES=jobs), on the resources template.yaml declares."""
    return create_app(
        Settings(
            routes="jobs",
            upstreams={"up": UpstreamTarget(url=upstream_url, allow_http=True)},
            allow_private_networks=True,
            jobs_table=TABLE,
            input_bucket=INPUT,
            results_bucket=RESULTS,
            chunk_queue_url=queue_url,
            max_upload_bytes=4096,
        )
    )


with pytest.MonkeyPatch.context() as _env:  # its clients are made, not used: a region is all they need
    _env.setenv("AWS_DEFAULT_REGION", REGION)
    jobs_schema = schemathesis.openapi.from_dict(_jobs_app("http://127.0.0.1:9", "http://queue").openapi())


@pytest.fixture(scope="module")
def jobs_live(shared_upstream: LocalUpstream) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as env, mock_aws():
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
            env.setenv(name, value)
        env.setenv("AWS_DEFAULT_REGION", REGION)
        with serving(_jobs_app(shared_upstream.url, create_resources()["chunks"])) as url:
            yield url


@jobs_schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_to_the_jobs_routes_makes_a_500_and_every_refusal_says_why(case: Any, jobs_live: str) -> None:
    case.call_and_validate(base_url=jobs_live, checks=[not_a_server_error, status_code_conformance, refusal_says_why])
