"""The path AWS takes: the built function under the real runtime interface client, against a Runtime API of ours.

`RuntimeApi` serves the Lambda Runtime API (2018-06-01) on 127.0.0.1: `next`
hands out the events `invoke` queues, with a deadline header; `response` takes
the answer, refusing one over Lambda's 6 MB with a 413 as Lambda does, and
records one that comes after the deadline as timed out (Lambda would have ended
the invocation, and the caller got nothing); `error` and `init/error` record
failures. `LambdaProcess` runs `python3.13 -S -m
awslambdaric app.handler` with Lambda's import paths (the function's code, then
the layer's `python/`, then the runtime client, and no site-packages), so the
artifacts of `sam build` are all the function has, as on Lambda.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: Lambda's limit on a synchronous invocation's response, as the Runtime API enforces it.
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
PREFIX = "/2018-06-01/runtime"
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:fn"


@dataclass
class Invocation:
    event: bytes
    timeout_s: float
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    done: threading.Event = field(default_factory=threading.Event)
    outcome: str = ""  # "response", "error", "too_large" (the runtime's post was refused) or "timed_out"
    payload: bytes = b""
    handed_out_at: float | None = None  # time.monotonic() when `next` gave it out: its timeout runs from then

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def http(self) -> tuple[int, dict[str, Any]]:
        """An API Gateway-shaped response as status and parsed JSON body."""
        assert self.outcome == "response", (self.outcome, self.payload[:500])
        answer = self.json()
        return answer["statusCode"], json.loads(answer["body"])


class RuntimeApi:
    """The Runtime API one function process talks to; one invocation at a time, as Lambda runs them."""

    def __init__(self) -> None:
        self.pending: queue.Queue[Invocation] = queue.Queue()
        self.by_id: dict[str, Invocation] = {}
        self.init_error: dict[str, Any] | None = None
        self.init_failed = threading.Event()
        self.user_agents: list[str] = []  # of every request the API saw: the runtime client's, or a stray one
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # serve_forever checks for shutdown every poll_interval: its default (0.5 s) was most of a stop
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> RuntimeApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def invoke(self, event: Any, *, timeout_s: float = 30.0, raw: bytes | None = None) -> Invocation:
        """Queue an event, wait for the function's answer (or its timeout), return the invocation."""
        invocation = Invocation(event=raw if raw is not None else json.dumps(event).encode(), timeout_s=timeout_s)
        self.by_id[invocation.request_id] = invocation
        self.pending.put(invocation)
        if not invocation.done.wait(timeout_s + 10):
            raise TimeoutError(f"no answer to {invocation.request_id} within its {timeout_s} s and 10 s more")
        return invocation

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                api.user_agents.append(self.headers.get("User-Agent", ""))
                if self.path != f"{PREFIX}/invocation/next":
                    return self._reply(404, {"errorMessage": f"no route {self.path}"})
                invocation = api.pending.get()
                invocation.handed_out_at = time.monotonic()
                deadline_ms = int((time.time() + invocation.timeout_s) * 1000)
                self.send_response(200)
                self.send_header("Lambda-Runtime-Aws-Request-Id", invocation.request_id)
                self.send_header("Lambda-Runtime-Deadline-Ms", str(deadline_ms))
                self.send_header(
                    "Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:123456789012:function:fn"
                )
                self.send_header("Lambda-Runtime-Trace-Id", f"Root=1-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:24]}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(invocation.event)))
                self.end_headers()
                self.wfile.write(invocation.event)

            def do_POST(self) -> None:
                api.user_agents.append(self.headers.get("User-Agent", ""))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self.path.removeprefix(PREFIX).strip("/").split("/")
                if parts == ["init", "error"]:
                    api.init_error = json.loads(body)
                    api.init_failed.set()
                    return self._reply(202, {"status": "OK"})
                if len(parts) != 3 or parts[0] != "invocation" or parts[1] not in api.by_id:
                    return self._reply(404, {"errorMessage": f"no route {self.path}"})
                invocation = api.by_id[parts[1]]
                invocation.payload = body
                handed_out_at = invocation.handed_out_at
                if handed_out_at is not None and time.monotonic() - handed_out_at > invocation.timeout_s:
                    # Lambda would have ended the invocation at its deadline; the runtime client just goes on
                    invocation.outcome = "timed_out"
                    self._reply(202, {"status": "OK"})
                elif parts[2] == "response" and len(body) > MAX_RESPONSE_BYTES:
                    invocation.outcome = "too_large"
                    message = f"Exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."
                    self._reply(413, {"errorMessage": message, "errorType": "RequestEntityTooLarge"})
                else:
                    invocation.outcome = parts[2]
                    self._reply(202, {"status": "OK"})
                invocation.done.set()
                return None

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@dataclass
class LambdaProcess:
    """One function container: its Runtime API, its process, and what it printed."""

    api: RuntimeApi
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def peak_rss_kb(self) -> int:
        """The process's peak resident set since it started or since `reset_peak`."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)


def lambda_paths(code: Path, layers: list[Path], ric: Path) -> str:
    """PYTHONPATH as Lambda's python3.13 builds it: /var/task, each layer's /opt/python, then /var/runtime."""
    paths = [code]
    for layer in layers:  # a layer's root, holding python/
        paths += [layer / "python" / "lib" / "python3.13" / "site-packages", layer / "python"]
    return os.pathsep.join(map(str, [*paths, ric]))


def lambda_process(
    built: Path,
    function: str,
    *,
    ric: Path,
    python: str,
    env: dict[str, str],
    scratch: Path,
    api: RuntimeApi | None = None,
) -> Any:
    """`function` of a `sam build` output directory, with the fanout layer: see `container`."""
    return container(
        built / function, [built / "FanoutLayer"], ric=ric, python=python, env=env, scratch=scratch, api=api
    )


@contextmanager
def container(
    code: Path,
    layers: list[Path],
    *,
    ric: Path,
    python: str,
    env: dict[str, str],
    scratch: Path,
    api: RuntimeApi | None = None,
    handler: str = "app.handler",
) -> Iterator[LambdaProcess]:
    """A function's code and layers under awslambdaric against `api` (a fresh one by default); both stopped on exit.

    `env` overrides the defaults below, as a function configured by the SAM CLI brings its own AWS_* values.
    A non-empty AWS_LAMBDA_EXEC_WRAPPER must name a file, as Lambda's bootstrap requires.
    """
    if api is None:
        api = RuntimeApi()
        api.start()
    wrapper = env.get("AWS_LAMBDA_EXEC_WRAPPER", "")
    if wrapper and not Path(wrapper).is_file():
        api.stop()
        raise FileNotFoundError(f"{wrapper}: does not exist (Lambda's bootstrap exits 127)")
    log = scratch / f"{code.name}-{uuid.uuid4().hex[:8]}.log"
    environment = {
        "PATH": os.environ["PATH"],
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
        "AWS_LAMBDA_FUNCTION_NAME": code.name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TZ": ":UTC",
        **env,
        "PYTHONPATH": lambda_paths(code, layers, ric),
        "AWS_LAMBDA_RUNTIME_API": api.address,
        "LAMBDA_TASK_ROOT": str(code),
        "_HANDLER": handler,
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [python, "-S", "-m", "awslambdaric", handler],
            env=environment,
            cwd=code,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield LambdaProcess(api=api, process=process, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        api.stop()
