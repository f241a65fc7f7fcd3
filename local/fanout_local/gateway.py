"""`sam local start-api` without containers: routes from template.yaml, a pool of processes per function.

`python -m fanout_local.gateway` (what `make run` calls):
1. checks that its ports are free, and stops with a plain message if one is not;
2. starts the bundled upstream (fanout_local.upstream) unless `--no-upstream`;
3. reads template.yaml and starts each function's first process ("container") with
   that function's environment (Parameter defaults, each overridable from the shell
   by its name, e.g. `SemaphoreMaxConcurrency=50`; `TargetUrl`, and `Upstreams` as
   the /batch target "local", default to the bundled upstream);
4. starts the AWS the jobs need (fanout_local.stack: moto on :3002, the template's
   table, buckets and queues in it) and, for each SQS event of a function, its event
   source mapping (fanout_local.esm);
5. serves http://127.0.0.1:3000, turning each request into an HTTP API v2 event for
   the function whose route matches (`$default` for the rest) and the handler's
   answer back into HTTP.

Each process runs one invocation at a time, like one Lambda container, and a function
gets more of them while calls wait (fanout_local.pool): up to its reserved concurrency,
past which a call is throttled with API Gateway's 429, or else up to
FANOUT_LOCAL_CONTAINERS (4), past which calls wait their turn. Nothing is dropped:
the listen backlog is deep. The functions' output is one readable line per call
(fanout_local.console; `--raw-logs` for the JSON lines CloudWatch gets).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import os
import signal
import socket
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
from typing import Any
from urllib.parse import urlsplit

from fanout_local.console import Console
from fanout_local.esm import QueuePoller
from fanout_local.pool import DEFAULT_LOCAL_CONTAINERS, FunctionPool, Throttled, Unavailable
from fanout_local.stack import REGION, LocalStack
from fanout_local.template import (
    STACK_RESOURCES,
    LocalFunction,
    Route,
    load_template,
    local_functions,
    parameter_values,
)

ROOT = Path(__file__).resolve().parents[2]
LOCAL_CONTAINERS_ENV = "FANOUT_LOCAL_CONTAINERS"
#: What the local gateway sets over the template for its functions (unless the shell sets it):
#: the bundled upstream is on loopback, which the functions refuse on Lambda.
LOCAL_ONLY = {"FANOUT_ALLOW_PRIVATE_NETWORKS": "true"}
AWS_LINE = "local AWS (moto) on"


class PortInUse(SystemExit):
    def __init__(self, what: str, port: int) -> None:
        super().__init__(
            f"fanout: port {port} ({what}) is already in use, perhaps by another `make run`. "
            f"Stop that, or choose other ports: make run ARGS='--port 3100 --upstream-port 3101'"
        )


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
        **({"pathParameters": path_parameters} if path_parameters else {}),
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


def pool_limits(function: LocalFunction, parameters: Mapping[str, str], local_cap: int) -> tuple[int, bool]:
    """How many containers a function may have, and whether calls past that are throttled (reserved)."""
    if function.queues:  # its event source mappings' ScalingConfig decides, as on AWS
        return max(local_cap, sum(source.maximum_concurrency for source in function.queues)), False
    reserved = parameters.get(function.name.removesuffix("Function") + "ReservedConcurrency", "0")
    if reserved.isdigit() and int(reserved) > 0:
        return int(reserved), True
    return local_cap, False


class Gateway(ThreadingHTTPServer):
    """API Gateway, locally: routes to pools, with a backlog deep enough that no connection is refused."""

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        self.routes: list[tuple[FunctionPool, Route]] = []
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse("the API", address[1]) from exc
            raise

    def serve(self, pools: list[FunctionPool]) -> None:
        # API Gateway prefers any route that matches to $default
        self.routes = sorted(
            ((pool, route) for pool in pools for route in pool.function.routes), key=lambda pair: pair[1].is_default
        )
        self.serve_forever()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Gateway

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        for pool, route in self.server.routes:
            params = route.match(self.command, path)
            if params is not None:
                return self._invoke(pool, route, params)
        return self._reply(404, {"content-type": "application/json"}, b'{"message":"Not Found"}')

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _invoke(self, pool: FunctionPool, route: Route, params: dict[str, str]) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        forwarded = {  # as API Gateway adds them (there https and 443), so redirects and URLs point back here
            "X-Forwarded-For": self.client_address[0],
            "X-Forwarded-Port": str(self.server.server_address[1]),
            "X-Forwarded-Proto": "http",
        }
        event = http_api_event(route, self.command, self.path, {**self.headers, **forwarded}, body, params)
        try:
            with pool.container() as container:
                result = container.invoke(event, pool.function.timeout_s)
        except Throttled:
            return self._reply(429, {"content-type": "application/json"}, b'{"message":"Too Many Requests"}')
        except Unavailable:
            return self._reply(503, {"content-type": "application/json"}, b'{"message":"Service Unavailable"}')
        payload = result.get("body") or ""
        data = base64.b64decode(payload) if result.get("isBase64Encoded") else payload.encode()
        return self._reply(result["statusCode"], result.get("headers") or {}, data)

    def _reply(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "connection"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the console shows one line per call
        pass


def check_free(host: str, port: int, what: str) -> None:
    """PortInUse naming `what` if host:port is taken (before anything is started)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(what, port) from exc
            raise


@dataclass
class RunningGateway:
    url: str
    process: subprocess.Popen[str]
    screen: list[str]  # what it printed up to serving: the upstream, the functions, the address
    output: list[str] = field(default_factory=list)  # what it printed after: the functions' logs

    @property
    def aws_url(self) -> str | None:
        """The local stack's endpoint (moto), if the template has resources for it."""
        for line in self.screen:
            if line.startswith(AWS_LINE):
                return line.split()[len(AWS_LINE.split())]
        return None


@contextmanager
def running_gateway(
    parameters: Mapping[str, str], *, raw_logs: bool = True, upstream_port: int | None = None
) -> Iterator[RunningGateway]:
    """This gateway in a subprocess on a free port, for tests and benchmarks; with the bundled upstream
    only if `upstream_port` is given.

    `parameters` override template Parameters by name (e.g. TargetUrl), and may set other
    variables of the functions' environment (e.g. LOG_LEVEL).
    """
    upstream = ["--upstream-port", str(upstream_port)] if upstream_port else ["--no-upstream"]
    ports = ["--port", "0", "--aws-port", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "fanout_local.gateway", *ports, *upstream, *(["--raw-logs"] if raw_logs else [])],
        env={**os.environ, **parameters},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        screen = []
        for line in process.stdout:
            screen.append(line)
            if line.startswith("fanout API on "):
                break
        else:
            raise RuntimeError("the gateway exited before serving:\n" + "".join(screen))
        served = RunningGateway(url=screen[-1].split()[3], process=process, screen=screen)
        # Keep reading, or a full pipe would stop the gateway (and its functions) mid-call.
        threading.Thread(target=lambda: served.output.extend(process.stdout or ()), daemon=True).start()
        yield served
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=15)
        process.stdout.close()


def _start_upstream(port: int, delay_ms: float) -> subprocess.Popen[str]:
    upstream = subprocess.Popen(
        [sys.executable, "-m", "fanout_local.upstream", "--port", str(port), "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert upstream.stdout is not None
    line = upstream.stdout.readline()  # "local upstream on ...", once it listens
    if not line:
        raise SystemExit(f"fanout: the bundled upstream did not start on port {port} (see its error above)")
    print(line, end="", flush=True)
    return upstream


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve template.yaml's functions locally, without Docker.")
    parser.add_argument("--template", type=Path, default=ROOT / "template.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--upstream-port", type=int, default=3001)
    parser.add_argument("--upstream-delay-ms", type=float, default=50.0)
    parser.add_argument("--aws-port", type=int, default=3002, help="the local AWS stand-in (moto) for the jobs")
    parser.add_argument("--no-upstream", action="store_true", help="do not start the bundled upstream")
    parser.add_argument("--raw-logs", action="store_true", help="the functions' JSON log lines, as CloudWatch has them")
    args = parser.parse_args()
    _stop_on_signals()

    server = Gateway((args.host, args.port))
    if not args.no_upstream:
        check_free("127.0.0.1", args.upstream_port, "the bundled upstream")
    overrides = dict(os.environ)
    if not args.no_upstream:
        bundled = f"http://127.0.0.1:{args.upstream_port}"
        overrides.setdefault("TargetUrl", f"{bundled}/delay")
        overrides.setdefault(
            "Upstreams", json.dumps({"local": {"url": bundled, "allow_http": True, "max_redirects": 2}})
        )
    template = load_template(args.template)
    parameters = parameter_values(template, overrides)
    local_cap = int(os.environ.get(LOCAL_CONTAINERS_ENV, DEFAULT_LOCAL_CONTAINERS))
    console = Console(raw=args.raw_logs)
    local_only = {name: os.environ.get(name, value) for name, value in LOCAL_ONLY.items()}

    with ExitStack() as stack:
        stack.callback(server.server_close)
        if not args.no_upstream:
            upstream = _start_upstream(args.upstream_port, args.upstream_delay_ms)
            stack.callback(upstream.wait, 10)
            stack.callback(upstream.terminate)
        aws, resources = _start_stack(stack, template, parameters, args.aws_port)
        functions = local_functions(template, args.template.parent, overrides, resources)
        pools = []
        for function in functions:
            limit, throttles = pool_limits(function, parameters, local_cap)
            environment = {
                **os.environ,
                **function.environment,
                **local_only,
                **(aws.environment() if aws else {}),
                "AWS_LAMBDA_FUNCTION_NAME": function.name,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_mb),
                "LAMBDA_TASK_ROOT": str(function.code_dir),
            }
            pool = FunctionPool(
                function, environment, limit=limit, throttles=throttles, on_output=console.function_output
            )
            stack.callback(pool.stop)
            pool.start()
            pools.append(pool)
        for pool in pools:
            if pool.function.routes:
                routes = ", ".join(route.route_key for route in pool.function.routes)
                limit = pool.function.environment.get("FANOUT_MAX_CONCURRENCY", "-")
                scale = f"{pool.limit} reserved" if pool.throttles else f"up to {pool.limit} local"
                print(
                    f"{pool.function.name:<18} {routes:<38} max concurrency {limit:<4} containers: {scale}", flush=True
                )
            for poller in _start_pollers(stack, aws, resources, pool):
                source = poller.source
                print(
                    f"{pool.function.name:<18} SQS {source.queue:<34} batch {source.batch_size}, "
                    f"{source.maximum_concurrency} at once (event source mapping)",
                    flush=True,
                )
        if aws is not None:
            print(f"{AWS_LINE} {aws.endpoint}  (S3, SQS, DynamoDB: {', '.join(sorted(resources))})", flush=True)
        print(f"fanout API on http://{args.host}:{server.server_address[1]}  (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve(pools)


def _start_stack(
    stack: ExitStack, template: Mapping[str, Any], parameters: Mapping[str, str], port: int
) -> tuple[LocalStack | None, dict[str, dict[str, str]]]:
    """The local AWS, if the template declares tables, buckets or queues; what their Refs are."""
    kinds = {resource.get("Type") for resource in template.get("Resources", {}).values()}
    if not kinds & set(STACK_RESOURCES):
        return None, {}
    if port:
        check_free("127.0.0.1", port, "the local AWS stand-in")
    aws = LocalStack(port)
    aws.start()
    stack.callback(aws.stop)
    return aws, aws.create(template, parameters)


def _start_pollers(
    stack: ExitStack, aws: LocalStack | None, resources: Mapping[str, Mapping[str, str]], pool: FunctionPool
) -> list[QueuePoller]:
    pollers = []
    for source in pool.function.queues:
        if aws is None or source.queue not in resources:
            raise SystemExit(f"fanout: {pool.function.name} reads {source.queue}, which the local stack has not made")
        poller = QueuePoller(
            aws.client("sqs"),
            queue_url=resources[source.queue]["Ref"],
            queue_arn=resources[source.queue]["Arn"],
            region=REGION,
            source=source,
            pool=pool,
        )
        poller.start()
        stack.callback(poller.stop)
        pollers.append(poller)
    return pollers


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop the gateway, its functions and the upstream."""

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    main()
