"""The local gateway (`make run`): routes and per-function environments from template.yaml."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import ROOT
from fanout_local.gateway import RunningGateway, running_gateway
from fanout_local.template import Route, load_template, local_functions
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
    functions = {
        f.name: f for f in local_functions(template, ROOT, {"TargetUrl": "http://up", "GatherMaxConcurrency": "7"})
    }
    assert functions["GatherFunction"].environment["FANOUT_MAX_CONCURRENCY"] == "7"
    assert functions["SemaphoreFunction"].environment["FANOUT_MAX_CONCURRENCY"] == "100"
    assert functions["SyncFunction"].environment["FANOUT_TARGET_URL"] == "http://up"
    assert functions["SyncFunction"].environment["FANOUT_DEADLINE_S"] == "25"
    assert functions["SyncFunction"].code_dir == ROOT / "functions/api/"


def test_missing_required_parameter_says_how_to_set_it() -> None:
    template = load_template(ROOT / "template.yaml")
    with pytest.raises(KeyError, match="TargetUrl has no default; set it in the environment as TargetUrl="):
        local_functions(template, ROOT, {})


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
    """The JSON log records one function printed, read back from the gateway's indented output."""
    prefix = f"{function:<18}| "
    text = "".join(line.removeprefix(prefix) for line in list(gateway.output) if line.startswith(prefix))
    decoder, records, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) != -1:
        record, at = decoder.raw_decode(text, at)
        records.append(record)
    return records


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
    assert get(f"{base}/nowhere") == (404, {"message": "Not Found"})
    status, body = get(f"{base}/batch", {"requests": [{"id": "a", "target": "local", "path": "/echo", "json": [1]}]})
    assert (status, body["responses"][0]["status"], body["responses"][0]["body"]["body"]) == (200, 200, "[1]")
    process.send_signal(signal.SIGINT)  # Ctrl-C stops the gateway and its workers
    assert process.wait(timeout=15) == 0


def test_functions_log_readably_through_the_gateway(gateway: RunningGateway) -> None:
    assert get(f"{gateway.url}/async_sem/4/2")[0] == 200
    (summary,) = [r for r in wait_for(gateway, "SemaphoreFunction", "fanout call") if r["message"] == "fanout call"]
    assert (summary["function"], summary["n"], summary["concurrency"], summary["succeeded"]) == ("semaphore", 4, 2, 4)
    assert summary["correlation_id"] and summary["function_request_id"]
    assert f'{"SemaphoreFunction":<18}|     "level":"INFO",\n' in gateway.output  # indented: a key a line
    assert not any("_aws" in line for line in gateway.output)  # EMF stays out of local output


def test_log_level_parameter_reaches_the_functions(upstream: LocalUpstream) -> None:
    with running_gateway(gateway_parameters(upstream, LogLevel="WARNING")) as gateway:
        status, _ = get(f"{gateway.url}/batch", {"requests": [{"id": "x", "target": "local", "path": "/status/500"}]})
        assert status == 200
        records = wait_for(gateway, "BatchFunction", "upstream request failed")
        assert {record["level"] for record in records} == {"WARNING"}  # no INFO summary at WARNING
