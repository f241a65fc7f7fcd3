"""Every route against a hostile upstream, run as Lambda runs it: an answer, every item, in time, in bounded memory.

A warm function process per route and case (the built artifacts under awslambdaric), one
table of hostile answers (fanout_local.hostile and the upstream's faults). For each:
the invocation is answered (no 5xx, nothing refused as too large), every request is
accounted for with the expected status or error, the answer leaves within the
deadline, and the process's peak memory grows by at most MEMORY_BOUND_MB during it.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from conftest import load_event, runtime_python
from fanout.politeness import TARGET_PAUSED
from fanout_local.upstream import LocalUpstream, running_in_thread
from lambda_runtime import LambdaProcess, lambda_process

pytestmark = pytest.mark.sam

REQUEST_TIMEOUT_S = 1.0  # below that, a loaded host turns a slow protocol error into a timeout
DEADLINE_S = 3.0
SLACK_S = 2.0  # process start of the invocation, writing and posting the answer: generous on a shared host
MEMORY_BOUND_MB = 48  # growth of the peak RSS during one call (a 50 MB body read whole would be 50 times over)

#: (hostile path, what a seed route reports for it, what /batch reports): a status, or an error's type.
HOSTILE: list[tuple[str, int | str, int | str]] = [
    ("/hang", "ReadTimeout", "ReadTimeout"),
    ("/stall-body", "ReadTimeout", "ReadTimeout"),
    ("/slow-headers?interval=0.05", "ReadTimeout", "ReadTimeout"),
    ("/reset", "RemoteProtocolError", "RemoteProtocolError"),
    ("/cut", "ReadError", "ReadError"),
    ("/status/503", 503, 503),
    ("/huge?mb=50", 200, 200),
    ("/endless", 200, 200),
    ("/gzip-bomb?gb=4", 200, 200),
    ("/bad-json", 200, 200),
    ("/json?kind=nan", 200, 200),
    ("/json?kind=infinity", 200, 200),
    ("/json?kind=big", 200, 200),
    ("/json?kind=surrogate", 200, 200),
    ("/json?kind=deep&depth=50000", 200, 200),
    ("/many-headers?n=10000", "RemoteProtocolError", "RemoteProtocolError"),
    ("/fat-headers?n=90&size=4000", 200, "RemoteProtocolError"),  # the seed routes keep no headers
    ("/non-utf8", 200, 200),
    ("/loop", 302, "TooManyRedirects"),
    ("/retry-after?key=hostile&fail=1000000&s=30", 429, 429),  # pauses the target for 30 s
]
SEED_ROUTES = {
    "SyncFunction": ("sync-http-api-v2.json", "/sync/2", {"n": "2"}),
    "GatherFunction": ("async-http-api-v2.json", "/async/6", {"n": "6"}),
    "SemaphoreFunction": ("async_sem-http-api-v2.json", "/async_sem/6/3", {"n": "6", "k": "3"}),
}
COMMON_ENV = {
    "FANOUT_ALLOW_PRIVATE_NETWORKS": "true",  # the hostile upstream is on loopback
    "FANOUT_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
    "FANOUT_DEADLINE_S": str(DEADLINE_S),
    "FANOUT_MAX_ATTEMPTS": "2",
    # A case fails up to 12 attempts in a row (n=6, 2 attempts): the circuit must not open on them
    # (test_politeness covers the circuit).
    "FANOUT_CIRCUIT_FAILURES": "100000",
    "LOG_LEVEL": "ERROR",
}


@pytest.fixture(scope="module")
def hostile_upstream() -> Iterator[LocalUpstream]:
    with running_in_thread(delay_ms=1) as server:
        yield server


@pytest.fixture
def warm_function(
    built: Path, hostile_upstream: LocalUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], LambdaProcess]]:
    """Starts a route's function, warm; each case gets its own, stopped when the case ends.

    A hostile answer can leave a container's politeness changed (fanout.politeness: a 503 lowers the
    target's limit, a Retry-After pauses it, rounds slower than the target's baseline step the limit
    down), and a warm container keeps that: in a container of its own, a case passes whichever ran
    before it (after the 503 case, the timeout cases met a limit of 1 and the deadline cut them).
    """
    ric = Path(os.environ.get("FANOUT_LAMBDA_RIC", ""))
    if not (ric / "awslambdaric").is_dir() or runtime_python() is None:
        pytest.skip("awslambdaric for python3.13 not installed: run the tests with `make test`")
    scratch = tmp_path_factory.mktemp("hostile")
    target = {"url": hostile_upstream.url, "allow_http": True, "max_redirects": 2}
    upstreams = json.dumps({"up": target, "hostile": target})  # the same server, its own politeness
    env = {**COMMON_ENV, "FANOUT_TARGET_URL": f"{hostile_upstream.url}/mode", "FANOUT_UPSTREAMS": upstreams}

    with ExitStack() as running:

        def start(function: str) -> LambdaProcess:
            context = lambda_process(built, function, ric=ric, python=str(runtime_python()), env=env, scratch=scratch)
            process = running.enter_context(context)
            hostile_upstream.mode = "/delay"
            # the first call's imports and pool are not the upstream's doing
            process.api.invoke(seed_event(function) if function in SEED_ROUTES else batch_event(WARM_UP))
            return process

        yield start


def call(function: LambdaProcess, event: dict[str, Any]) -> tuple[int, dict[str, Any], float, float]:
    """Invoke; the answer's status and body, the seconds it took, and the peak RSS growth in MB."""
    rss_before = _rss_kb(function)
    function.reset_peak()
    started = time.monotonic()
    invocation = function.api.invoke(event, timeout_s=30)
    took = time.monotonic() - started
    status, body = invocation.http  # asserts the runtime posted a response (not an error, not too large)
    return status, body, took, (function.peak_rss_kb() - rss_before) / 1024


def _rss_kb(function: LambdaProcess) -> int:
    status = Path(f"/proc/{function.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


WARM_UP = [{"id": "warm", "target": "up", "path": "/delay"}]


def batch_event(requests: list[dict[str, Any]]) -> dict[str, Any]:
    event = copy.deepcopy(load_event("batch-http-api-v2.json"))
    event["body"] = json.dumps({"requests": requests})
    return event


def seed_event(function: str) -> dict[str, Any]:
    name, path, params = SEED_ROUTES[function]
    event = copy.deepcopy(load_event(name))
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["pathParameters"] = params
    return event


@pytest.mark.parametrize("function", list(SEED_ROUTES))
@pytest.mark.parametrize(("path", "expected", "_batch"), HOSTILE)
def test_a_seed_route_answers_every_request_whatever_the_upstream_does(
    function: str,
    path: str,
    expected: int | str,
    _batch: Any,
    warm_function: Callable[[str], LambdaProcess],
    hostile_upstream: LocalUpstream,
) -> None:
    process = warm_function(function)
    hostile_upstream.mode = path
    status, body, took, grew_mb = call(process, seed_event(function))
    n = int(SEED_ROUTES[function][2]["n"])
    assert status == 200
    assert len(body["status_codes"]) == body["requests"] == n
    if path.startswith("/retry-after"):  # the first 429 pauses the target past the deadline
        answered = [code for code in body["status_codes"] if code is not None]
        assert answered and set(answered) == {expected}
        assert {error["error"] for error in body["errors"]} <= {TARGET_PAUSED}
        assert len(answered) + len(body["errors"]) == n
    elif isinstance(expected, int):
        assert body["status_codes"] == [expected] * n
        assert body["errors"] == []
    else:
        assert body["status_codes"] == [None] * n
        assert {error["index"] for error in body["errors"]} == set(range(n))
        assert {error["error"] for error in body["errors"]} == {expected}  # in time: not cut by the deadline
    assert body["succeeded"] + body["failed"] == n
    assert took < DEADLINE_S + SLACK_S
    assert grew_mb < MEMORY_BOUND_MB


@pytest.mark.parametrize(("path", "_seed", "expected"), HOSTILE)
def test_a_batch_answers_every_item_whatever_one_upstream_does(
    path: str,
    _seed: Any,
    expected: int | str,
    warm_function: Callable[[str], LambdaProcess],
    hostile_upstream: LocalUpstream,
) -> None:
    target_path, _, query = path.partition("?")
    hostile = {
        "id": "hostile",
        "target": "hostile",
        "path": target_path,
        "query": dict(p.split("=") for p in query.split("&") if p),
    }
    healthy = [{"id": f"ok{i}", "target": "up", "path": "/delay", "query": {"ms": 1}} for i in range(3)]
    process = warm_function("BatchFunction")
    status, body, took, grew_mb = call(process, batch_event([healthy[0], hostile, *healthy[1:]]))
    assert status == 200
    assert [item["id"] for item in body["responses"]] == ["ok0", "hostile", "ok1", "ok2"]
    item = body["responses"][1]
    if isinstance(expected, int):
        assert item["status"] == expected
        assert isinstance(item.get("body"), str | dict | list | type(None))
    else:
        assert item["error"]["type"] == expected
    assert [body["responses"][i]["status"] for i in (0, 2, 3)] == [200, 200, 200]  # the healthy ones, untouched
    summary = body["summary"]
    assert summary["succeeded"] + summary["failed"] + summary["skipped"] == 4
    assert took < DEADLINE_S + SLACK_S
    assert grew_mb < MEMORY_BOUND_MB
