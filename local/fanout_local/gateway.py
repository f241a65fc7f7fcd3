"""`sam local start-api` without containers: routes from template.yaml, one process per function.

`python -m fanout_local.gateway` (what `make run` calls):
1. starts the bundled upstream (fanout_local.upstream) unless `--no-upstream`;
2. reads template.yaml and starts one worker process per function, with that
   function's environment (Parameter defaults, each overridable from the shell
   by its name, e.g. `SemaphoreMaxConcurrency=50`; `TargetUrl`, and `Upstreams`
   as the /batch target "local", default to the bundled upstream);
3. serves http://127.0.0.1:3000, turning each request into an HTTP API v2 event
   for the function whose route matches, and the handler's answer back into HTTP.

Each worker runs one invocation at a time, like one Lambda container. Its logs
are the same Powertools JSON lines as on Lambda, indented (POWERTOOLS_DEV=true,
which also keeps the EMF metric lines out; set POWERTOOLS_DEV=false to see the
lines exactly as CloudWatch gets them) and marked with the function's name.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from fanout_local.template import LocalFunction, Route, load_template, local_functions

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Worker:
    function: LocalFunction
    port: int


def http_api_event(
    route: Route,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    path_parameters: dict[str, str],
) -> dict[str, Any]:
    """The HTTP API (payload format 2.0) event API Gateway would send for this request."""
    url = urlsplit(target)
    now = time.time()
    return {
        "version": "2.0",
        "routeKey": route.route_key,
        "rawPath": url.path,
        "rawQueryString": url.query,
        "headers": {name.lower(): value for name, value in headers.items()},
        "pathParameters": path_parameters,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "local",
            "domainName": headers.get("Host", "127.0.0.1"),
            "http": {
                "method": method,
                "path": url.path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": headers.get("User-Agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": route.route_key,
            "stage": "$default",
            "timeEpoch": int(now * 1000),
        },
        "body": base64.b64encode(body).decode() if body else None,
        "isBase64Encoded": bool(body),
    }


@contextmanager
def start_worker(function: LocalFunction, base_env: Mapping[str, str]) -> Iterator[Worker]:
    """One process for one function, its handler imported; stopped on exit."""
    env = {**base_env, **function.environment, "AWS_LAMBDA_FUNCTION_NAME": function.name}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fanout_local.worker",
            "--code-dir",
            str(function.code_dir),
            "--handler",
            function.handler,
            "--function-name",
            function.name,
            "--timeout-s",
            str(function.timeout_s),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("READY "):
            process.wait(timeout=10)
            raise SystemExit(f"{function.name} failed to start (see its error above)")
        threading.Thread(target=_show_logs, args=(process.stdout, function.name), daemon=True).start()
        yield Worker(function=function, port=int(line.split()[1]))
    finally:
        process.terminate()
        process.wait(timeout=10)


def _show_logs(stream: IO[str], function_name: str) -> None:
    """A function's log lines on the gateway's stdout, each marked with the function's name."""
    for line in stream:
        print(f"{function_name:<18}| {line}", end="", flush=True)


@dataclass
class RunningGateway:
    url: str
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)  # what it printed after starting: the functions' logs


@contextmanager
def running_gateway(parameters: Mapping[str, str]) -> Iterator[RunningGateway]:
    """This gateway in a subprocess on a free port, without the bundled upstream: for tests and benchmarks.

    `parameters` override template Parameters by name (e.g. TargetUrl), and may set other
    variables of the functions' environment (e.g. POWERTOOLS_DEV).
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "fanout_local.gateway", "--port", "0", "--no-upstream"],
        env={**os.environ, **parameters},
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        line = next((line for line in process.stdout if line.startswith("fanout API on ")), "")
        if not line:
            raise RuntimeError("the gateway exited before serving (see its error above)")
        served = RunningGateway(url=line.split()[3], process=process)
        # Keep reading, or a full pipe would stop the gateway (and its functions) mid-call.
        threading.Thread(target=lambda: served.output.extend(process.stdout or ()), daemon=True).start()
        yield served
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
        process.stdout.close()


def make_server(workers: list[Worker], host: str, port: int) -> ThreadingHTTPServer:
    class Gateway(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _dispatch(self) -> None:
            path = urlsplit(self.path).path
            for worker in workers:
                for route in worker.function.routes:
                    params = route.match(self.command, path)
                    if params is not None:
                        return self._invoke(worker, route, params)
            return self._reply(404, {"content-type": "application/json"}, b'{"message":"Not Found"}')

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

        def _invoke(self, worker: Worker, route: Route, params: dict[str, str]) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            event = http_api_event(route, self.command, self.path, dict(self.headers), body, params)
            connection = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=worker.function.timeout_s)
            connection.request("POST", "/", json.dumps(event), {"content-type": "application/json"})
            result = json.loads(connection.getresponse().read())
            connection.close()
            payload = result.get("body") or ""
            data = base64.b64decode(payload) if result.get("isBase64Encoded") else payload.encode()
            self._reply(result["statusCode"], result.get("headers") or {}, data)

        def _reply(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in ("content-length", "connection"):
                    self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return ThreadingHTTPServer((host, port), Gateway)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve template.yaml's functions locally, without Docker.")
    parser.add_argument("--template", type=Path, default=ROOT / "template.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--upstream-port", type=int, default=3001)
    parser.add_argument("--upstream-delay-ms", type=float, default=50.0)
    parser.add_argument("--no-upstream", action="store_true", help="do not start the bundled upstream")
    args = parser.parse_args()
    _stop_on_signals()

    overrides = dict(os.environ)
    if not args.no_upstream:
        bundled = f"http://127.0.0.1:{args.upstream_port}"
        overrides.setdefault("TargetUrl", f"{bundled}/delay")
        overrides.setdefault(
            "Upstreams", json.dumps({"local": {"url": bundled, "allow_http": True, "max_redirects": 2}})
        )
    # Local targets live on loopback; on Lambda this variable is never set (see fanout.egress).
    base_env = {"FANOUT_ALLOW_PRIVATE_NETWORKS": "true", "POWERTOOLS_DEV": "true", **os.environ}
    template = load_template(args.template)
    functions = local_functions(template, args.template.parent, overrides)

    with ExitStack() as stack:
        if not args.no_upstream:
            upstream = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fanout_local.upstream",
                    "--port",
                    str(args.upstream_port),
                    "--delay-ms",
                    str(args.upstream_delay_ms),
                ]
            )
            stack.callback(upstream.wait, 10)
            stack.callback(upstream.terminate)
        workers = [stack.enter_context(start_worker(function, base_env)) for function in functions]
        server = make_server(workers, args.host, args.port)
        stack.callback(server.server_close)
        for worker in workers:
            routes = ", ".join(route.route_key for route in worker.function.routes)
            limit = worker.function.environment.get("FANOUT_MAX_CONCURRENCY", "-")
            print(f"{worker.function.name:<18} {routes:<28} max concurrency {limit}", flush=True)
        print(f"fanout API on http://{args.host}:{server.server_address[1]}  (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop the gateway, its workers and the upstream."""

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    main()
