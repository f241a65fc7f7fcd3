"""`sam local start-api` and `sam local invoke` as the SAM CLI runs them, minus Docker (tests/sam_local.py).

The SAM CLI's own code reads the built template, resolves parameters and `--env-vars`,
discovers routes and authorizers, builds each event and parses each answer; only the
container is a subprocess running the built function under the runtime interface
client. Real HTTP requests go to every route, in both AuthModes. The `sam local`
commands the README gives are parsed by the SAM CLI and checked against what they mean.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, runtime_python
from fanout_local.upstream import LocalUpstream, running_in_thread

pytestmark = pytest.mark.sam
HARNESS = Path(__file__).with_name("sam_local.py")


@pytest.fixture(scope="session")
def sam_python(sam: tuple[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    """The SAM CLI's interpreter, and an environment for it that can start functions."""
    cli, env = sam
    ric = os.environ.get("FANOUT_LAMBDA_RIC", "")
    if not (Path(ric) / "awslambdaric").is_dir() or runtime_python() is None:
        pytest.skip("awslambdaric for python3.13 not installed: run the tests with `make test`")
    return str(Path(cli).with_name("python")), {
        **env,
        "FANOUT_LAMBDA_RIC": ric,
        "FANOUT_LAMBDA_PYTHON": str(runtime_python()),
    }


def sam_cli(
    sam_python: tuple[str, dict[str, str]], *args: str, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """`sam ARGS` through the harness, its output captured."""
    python, base = sam_python
    return subprocess.run(
        [python, str(HARNESS), *args], env={**base, **env}, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def overrides(upstream: LocalUpstream, **more: str) -> str:
    """--parameter-overrides as one argument, the JSON value quoted as the SAM CLI needs it."""
    upstreams = json.dumps({"local": {"url": upstream.url, "allow_http": True, "max_redirects": 2}})
    pairs = [f"TargetUrl={upstream.url}/delay?ms=1", f"Upstreams='{upstreams}'", "SemaphoreMaxConcurrency=3"]
    return " ".join(pairs + [f"{name}={value}" for name, value in more.items()])


@pytest.fixture(scope="module")
def local_upstream() -> Iterator[LocalUpstream]:
    with running_in_thread(delay_ms=1) as server:
        yield server


@contextmanager
def sam_local_start_api(
    built: Path, sam_python: tuple[str, dict[str, str]], upstream: LocalUpstream, scratch: Path, auth_mode: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`sam local start-api` on the built template with one AuthMode and no other flag; stopped on exit."""
    python, env = sam_python
    port = free_port()
    more = {"AuthMode": auth_mode}
    if auth_mode == "JWT":
        more |= {"JwtIssuer": "https://issuer.example.com", "JwtAudience": "client-1"}
    command = [
        python,
        str(HARNESS),
        "local",
        "start-api",
        "--template",
        str(built / "template.yaml"),
        "--port",
        str(port),
        "--env-vars",
        str(ROOT / "local" / "sam-env.json"),
        "--parameter-overrides",
        overrides(upstream, **more),
    ]
    log = (scratch / "start-api.log").open("w+")
    process = subprocess.Popen(
        command, env={**env, "FANOUT_SAM_LOCAL_SCRATCH": str(scratch)}, cwd=scratch, stdout=log, stderr=log, text=True
    )
    try:
        _wait_for(port, process, log)
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module", params=["AWS_IAM", "JWT"])
def start_api(
    request: pytest.FixtureRequest,
    built: Path,
    sam_python: tuple[str, dict[str, str]],
    local_upstream: LocalUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    scratch = tmp_path_factory.mktemp(f"start-api-{request.param}")
    with sam_local_start_api(built, sam_python, local_upstream, scratch, request.param) as (base, _):
        yield base


def _wait_for(port: int, process: subprocess.Popen[str], log: Any) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"sam local start-api exited {process.returncode}:\n{log.read()[-3000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("sam local start-api did not listen within 60 s")


def call(url: str, *, method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_every_route_answers_through_sam_local(start_api: str, local_upstream: LocalUpstream) -> None:
    base, before = start_api, local_upstream.stats.requests
    status, body = call(f"{base}/sync/2")
    assert (status, body["status_codes"], body["concurrency"]) == (200, [200, 200], 1)
    status, body = call(f"{base}/async/3")
    assert (status, body["succeeded"]) == (200, 3)
    status, body = call(f"{base}/async_sem/6/5")
    assert (status, body["concurrency"], body["succeeded"]) == (200, 3, 6)  # SemaphoreMaxConcurrency=3
    batch = {"requests": [{"id": "a", "target": "local", "path": "/echo", "json": {"sku": 7}, "method": "POST"}]}
    status, body = call(f"{base}/batch", method="POST", body=json.dumps(batch).encode())
    assert status == 200
    assert json.loads(body["responses"][0]["body"]["body"]) == {"sku": 7}
    assert local_upstream.stats.requests - before == 2 + 3 + 6 + 1  # the private upstream was reached: --env-vars


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("GET", "/sync/0", None, 422, "n: Input should be greater than or equal to 1"),
        ("GET", "/async_sem/5/x", None, 422, "k: Input should be a valid integer"),
        ("POST", "/batch", b"{not json", 422, "body: the body is not valid JSON"),
        ("POST", "/batch", b'{"requests": [{"id": "a", "target": "nope"}]}', 422, "target: unknown target"),
        ("POST", "/batch", b'{"requests": [], "deadline_s": NaN}', 422, "deadline_s: Input should be a finite"),
        ("GET", "/nowhere", None, 404, "Not Found"),
        ("DELETE", "/batch", None, 405, "Method Not Allowed"),
        ("POST", "/sync/3", None, 405, "Method Not Allowed"),
        # the jobs routes start under sam local too; what needs no AWS call answers as deployed
        ("POST", "/jobs", b'{"requests": [{"id": "a", "target": "nope"}]}', 422, "target: unknown target"),
        ("GET", "/jobs/not-a-job", None, 404, "no job not-a-job"),
    ],
)
def test_bad_input_and_unknown_routes_answer_as_on_aws(
    method: str, path: str, body: bytes | None, status: int, says: str, start_api: str
) -> None:
    answered, payload = call(f"{start_api}{path}", method=method, body=body)
    assert answered == status
    assert says in (payload.get("message") or payload.get("detail"))


def test_sam_local_stops_its_functions_with_it(
    built: Path, sam_python: tuple[str, dict[str, str]], local_upstream: LocalUpstream, tmp_path: Path
) -> None:
    with sam_local_start_api(built, sam_python, local_upstream, tmp_path, "AWS_IAM") as (base, process):
        assert call(f"{base}/sync/1")[0] == 200
        functions = _children_of(process.pid)
        assert functions  # the warm function process
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert not [pid for pid in functions if Path(f"/proc/{pid}").exists()]


def _children_of(pid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return found.stdout.split()


def test_sam_local_invoke_answers_an_event_file(
    built: Path, sam_python: tuple[str, dict[str, str]], local_upstream: LocalUpstream, tmp_path: Path
) -> None:
    target = {"url": local_upstream.url, "allow_http": True}
    upstreams = json.dumps({"catalog": target, "orders": target})
    done = sam_cli(
        sam_python,
        "local",
        "invoke",
        "BatchFunction",
        "--template",
        str(built / "template.yaml"),
        "-e",
        str(ROOT / "events" / "batch-http-api-v2.json"),
        "--env-vars",
        str(ROOT / "local" / "sam-env.json"),
        "--parameter-overrides",
        f"TargetUrl={local_upstream.url}/delay Upstreams='{upstreams}'",
        cwd=tmp_path,
        FANOUT_SAM_LOCAL_SCRATCH=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["statusCode"] == 200
    body = json.loads(answer["body"])
    assert [item.get("status") for item in body["responses"]] == [200, 200, 404]


# --- the README's `sam local` commands, parsed by the SAM CLI ------------------------------------

README_COMMANDS = {
    "sam local start-api --config-env local": {
        "env_vars": "local/sam-env.json",
        "parameter_overrides": {
            "TargetUrl": "http://host.docker.internal:3001/delay",
            "Upstreams": {"local": {"url": "http://host.docker.internal:3001", "allow_http": True, "max_redirects": 2}},
        },
    },
    "sam local invoke BatchFunction -e events/batch-http-api-v2.json --config-env local": {
        "env_vars": "local/sam-env.json",
        "function_identifier": "BatchFunction",
        "event": "events/batch-http-api-v2.json",
        "parameter_overrides": {
            "TargetUrl": "http://host.docker.internal:3001/delay",
            "Upstreams": {
                name: {"url": "http://host.docker.internal:3001", "allow_http": True}
                for name in ("local", "catalog", "orders")
            },
        },
    },
    "sam local start-api --parameter-overrides "
    '"TargetUrl=https://httpbin.org/get Upstreams=\'{\\"catalog\\": \\"https://httpbin.org\\"}\'"': {
        "parameter_overrides": {
            "TargetUrl": "https://httpbin.org/get",
            "Upstreams": {"catalog": "https://httpbin.org"},
        },
    },
    "sam local invoke SemaphoreFunction -e events/async_sem-http-api-v2.json "
    "--parameter-overrides TargetUrl=https://httpbin.org/get": {
        "function_identifier": "SemaphoreFunction",
        "event": "events/async_sem-http-api-v2.json",
        "parameter_overrides": {"TargetUrl": "https://httpbin.org/get"},
    },
}


def readme_sam_local_commands() -> list[str]:
    """Every `sam local ...` line in the README's shell blocks, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+", " ", line.split("  #")[0]).strip() for line in lines if line.strip().startswith("sam local")]


def test_the_readme_names_exactly_the_commands_checked_here() -> None:
    assert sorted(readme_sam_local_commands()) == sorted(README_COMMANDS)


@pytest.mark.parametrize("command", sorted(README_COMMANDS))
def test_each_readme_command_means_what_it_says(command: str, sam_python: tuple[str, dict[str, str]]) -> None:
    done = sam_cli(sam_python, "--print-args", *shlex.split(command)[1:], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    expected = README_COMMANDS[command]
    overrides = parsed["parameter_overrides"]
    if "Upstreams" in overrides:
        overrides["Upstreams"] = json.loads(overrides["Upstreams"])  # it reaches the template as valid JSON
    assert overrides == expected["parameter_overrides"]
    for key in ("env_vars", "function_identifier", "event"):
        if key in expected:
            assert parsed[key] == expected[key]
