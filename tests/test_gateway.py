"""The local gateway (`make run`): routes and per-function environments from template.yaml."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from conftest import ROOT
from fanout_local.gateway import RunningGateway, running_gateway
from fanout_local.template import Route, load_template, local_functions, placeholders
from fanout_local.upstream import LocalUpstream


@pytest.mark.parametrize(
    ("route", "method", "path", "params"),
    [
        (Route("GET", "/async_sem/{n}/{k}"), "GET", "/async_sem/10/3", {"n": "10", "k": "3"}),
        (Route("GET", "/async_sem/{n}/{k}"), "GET", "/async_sem/10", None),
        (Route("GET", "/sync/{n}"), "POST", "/sync/3", None),
        (Route("GET", "/sync/{n}"), "GET", "/sync/3/4", None),
        (Route("ANY", "/files/{path+}"), "PUT", "/files/a/b.txt", {"path": "a/b.txt"}),
    ],
)
def test_route_matching(route: Route, method: str, path: str, params: dict[str, str] | None) -> None:
    assert route.match(method, path) == params


def test_each_function_gets_its_own_environment_and_overrides_apply() -> None:
    template = load_template(ROOT / "template.yaml")
    overrides = {"TargetUrl": "http://up", "GatherMaxConcurrency": "7", "WorkerTimeoutSeconds": "60"}
    functions = {f.name: f for f in local_functions(template, ROOT, overrides, placeholders(template))}
    assert functions["GatherFunction"].environment["FANOUT_MAX_CONCURRENCY"] == "7"
    assert functions["SemaphoreFunction"].environment["FANOUT_MAX_CONCURRENCY"] == "100"
    assert functions["SyncFunction"].environment["FANOUT_TARGET_URL"] == "http://up"
    assert functions["SyncFunction"].environment["FANOUT_DEADLINE_S"] == "25"
    assert functions["SyncFunction"].code_dir == ROOT / "functions/api/"
    worker = functions["WorkerFunction"]  # its own code, its timeout and its queues resolved like the rest
    assert (worker.code_dir, worker.timeout_s) == (ROOT / "functions/worker/", 60.0)
    assert worker.environment["FANOUT_JOBS_TABLE"] == "JobsTable"
    assert worker.environment["FANOUT_DEAD_LETTER_QUEUE_ARN"] == "arn:aws:local:::ChunkDeadLetterQueue"
    assert [(q.queue, q.batch_size, q.maximum_concurrency, q.report_failures) for q in worker.queues] == [
        ("ChunkQueue", 2, 5, True),
        ("ChunkDeadLetterQueue", 1, 2, True),
    ]


def test_missing_required_parameter_says_how_to_set_it() -> None:
    template = load_template(ROOT / "template.yaml")
    with pytest.raises(KeyError, match="TargetUrl has no default; set it in the environment as TargetUrl="):
        local_functions(template, ROOT, {}, placeholders(template))


def gateway_parameters(upstream: LocalUpstream, **more: str) -> dict[str, str]:
    return {
        "TargetUrl": f"{upstream.url}/delay?ms=5",
        "SemaphoreMaxConcurrency": "3",
        "Upstreams": json.dumps({"local": {"url": upstream.url, "allow_http": True}}),
        **more,
    }


@pytest.fixture
def gateway(upstream: LocalUpstream) -> Iterator[RunningGateway]:
    with running_gateway(gateway_parameters(upstream)) as served:
        yield served


def logged(gateway: RunningGateway, function: str) -> list[dict[str, Any]]:
    """The JSON log records one function printed, read back from the gateway's --raw-logs output."""
    prefix = f"{function:<18}| "
    lines = [line.removeprefix(prefix) for line in list(gateway.output) if line.startswith(prefix)]
    return [record for line in lines if (record := json.loads(line)).get("message")]


def wait_for(gateway: RunningGateway, function: str, message: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = logged(gateway, function)
        if any(record["message"] == message for record in records):
            return records
        time.sleep(0.05)
    raise AssertionError(f"{function} logged no {message!r}: {gateway.output[-20:]}")


def get(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_gateway_serves_each_function_with_its_limits(gateway: RunningGateway, upstream: LocalUpstream) -> None:
    base, process = gateway.url, gateway.process
    status, body = get(f"{base}/async_sem/12/8")
    assert status == 200
    assert body["concurrency"] == 3  # SemaphoreMaxConcurrency from the shell, clamping k=8
    assert upstream.stats.peak_in_flight == 3
    status, body = get(f"{base}/async/6")
    assert (status, body["concurrency"], body["succeeded"]) == (200, 6, 6)
    assert get(f"{base}/sync/0")[0] == 422
    assert get(f"{base}/nowhere") == (404, {"detail": "Not Found"})  # the $default route, as on AWS
    status, body = get(f"{base}/batch", {"requests": [{"id": "a", "target": "local", "path": "/echo", "json": [1]}]})
    assert (status, body["responses"][0]["status"], body["responses"][0]["body"]["body"]) == (200, 200, "[1]")
    # a trailing slash is redirected as on AWS, to this gateway's own scheme: x-forwarded-proto is http here
    status, body = get(f"{base}/async/6/")
    assert (status, body["requests"]) == (200, 6)
    process.send_signal(signal.SIGINT)  # Ctrl-C stops the gateway and its workers
    assert process.wait(timeout=15) == 0


def test_make_run_shows_one_readable_line_per_call(upstream: LocalUpstream) -> None:
    with running_gateway(gateway_parameters(upstream), raw_logs=False) as gateway:
        assert get(f"{gateway.url}/async_sem/4/2")[0] == 200
        batch = {"requests": [{"id": "a", "target": "local", "path": "/status/503"}, {"id": "b", "target": "local"}]}
        # b asks for "/" of the upstream, which has no such route: a 404
        assert get(f"{gateway.url}/batch", batch)[0] == 200
        lines = _lines_mentioning(gateway, "BatchFunction", 1)
    semaphore, batch_line = _lines_mentioning(gateway, "SemaphoreFunction", 1)[0], lines[0]
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d SemaphoreFunction  semaphore n=4 k=2: 4 ok, 0 failed, 0 skipped in \d+ ms\n", semaphore
    )
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d BatchFunction      semaphore n=2 k=2: 0 ok, 2 failed, 0 skipped in \d+ ms "
        r"\(1 HTTP5xx, 1 HTTP4xx\)\n",
        batch_line,
    )
    text = "".join(gateway.output)
    assert "_aws" not in text and '"level"' not in text and "Warning" not in text


def _lines_mentioning(gateway: RunningGateway, function: str, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [line for line in list(gateway.output) if f" {function} " in line]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{function}: {gateway.output[-20:]}")


def test_the_first_screen_names_routes_and_ports_without_warnings() -> None:
    """What a newcomer sees after `make run`: no warnings, the routes, and where the API listens."""
    upstream = _free_port()
    with running_gateway({}, raw_logs=False, upstream_port=upstream) as gateway:
        screen = gateway.screen
        assert screen[0] == f"local upstream on http://127.0.0.1:{upstream} (GET /delay answers after 50 ms)\n"
        assert [line.split()[0] for line in screen[1:-1]] == [
            "SyncFunction",
            "GatherFunction",
            "SemaphoreFunction",
            "BatchFunction",
            "JobsFunction",
            "WorkerFunction",
            "WorkerFunction",
            "local",  # AWS (moto) on http://127.0.0.1:PORT: the jobs' S3, SQS and DynamoDB
        ]
        assert gateway.aws_url is not None and gateway.aws_url.startswith("http://127.0.0.1:")
        assert re.fullmatch(r"fanout API on http://127\.0\.0\.1:\d+  \(Ctrl-C stops\)\n", screen[-1])
        assert get(f"{gateway.url}/sync/1")[0] == 200  # against the bundled upstream


@pytest.mark.parametrize("which", ["--port", "--upstream-port"])
def test_a_taken_port_stops_make_run_with_a_plain_message(which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = _free_port()
        ports = {"--port": other, "--upstream-port": _free_port(), which: port}
        done = subprocess.run(
            [sys.executable, "-m", "fanout_local.gateway", *[str(part) for pair in ports.items() for part in pair]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
    what = "the API" if which == "--port" else "the bundled upstream"
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"fanout: port {port} ({what}) is already in use, perhaps by another `make run`. "
        "Stop that, or choose other ports: make run ARGS='--port 3100 --upstream-port 3101'"
    )
    assert done.stdout == ""  # nothing was started


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_concurrent_clients_are_all_answered(upstream: LocalUpstream) -> None:
    """100 clients at once on a function capped at 4 local containers: they queue, none is dropped."""
    parameters = gateway_parameters(upstream, TargetUrl=f"{upstream.url}/delay?ms=20", FANOUT_LOCAL_CONTAINERS="4")
    with running_gateway(parameters) as gateway, ThreadPoolExecutor(max_workers=100) as clients:
        answers = list(clients.map(lambda _: get(f"{gateway.url}/async_sem/3/3")[0], range(100)))
    assert answers == [200] * 100


def test_a_reserved_concurrency_throttles_like_api_gateway(upstream: LocalUpstream) -> None:
    parameters = gateway_parameters(upstream, TargetUrl=f"{upstream.url}/delay?ms=300", SyncReservedConcurrency="1")
    with running_gateway(parameters) as gateway, ThreadPoolExecutor(max_workers=6) as clients:
        answers = list(clients.map(lambda _: get(f"{gateway.url}/sync/1"), range(6)))
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1 and set(statuses) == {200, 429}
    assert {json.dumps(body) for status, body in answers if status == 429} == {'{"message": "Too Many Requests"}'}


def test_log_level_parameter_reaches_the_functions(upstream: LocalUpstream) -> None:
    with running_gateway(gateway_parameters(upstream, LogLevel="WARNING")) as gateway:
        status, _ = get(f"{gateway.url}/batch", {"requests": [{"id": "x", "target": "local", "path": "/status/500"}]})
        assert status == 200
        records = wait_for(gateway, "BatchFunction", "upstream request failed")
        assert {record["level"] for record in records} == {"WARNING"}  # no INFO summary at WARNING
