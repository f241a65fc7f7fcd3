"""One function's "container": imports its real handler and runs invocations one at a time.

Started by the local gateway, one process per function, with that function's
environment from template.yaml. Like the Lambda runtime, it puts the function's
code directory on `sys.path`, imports the handler once (the cold start) and
calls it synchronously per event, so Mangum's loop and the pooled client live
across warm invocations exactly as they do on Lambda.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclass
class LocalContext:
    """The parts of the Lambda context object that handlers read."""

    function_name: str
    timeout_s: float
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    memory_limit_in_mb: int = 512
    _started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:local:000000000000:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self._started)) * 1000))


def load_handler(code_dir: str, handler: str) -> LambdaHandler:
    module_name, _, attribute = handler.rpartition(".")
    sys.path.insert(0, code_dir)  # what the Lambda runtime does with /var/task
    return getattr(importlib.import_module(module_name), attribute)


def serve(handler: LambdaHandler, *, port: int, function_name: str, timeout_s: float) -> None:
    class Invoke(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            event = json.loads(self.rfile.read(int(self.headers["content-length"])))
            result = handler(event, LocalContext(function_name=function_name, timeout_s=timeout_s))
            payload = json.dumps(result).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # the gateway logs calls
            pass

    server = HTTPServer(("127.0.0.1", port), Invoke)
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve one Lambda handler to the local gateway.")
    parser.add_argument("--code-dir", required=True)
    parser.add_argument("--handler", required=True)
    parser.add_argument("--function-name", required=True)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    handler = load_handler(args.code_dir, args.handler)
    with contextlib.suppress(KeyboardInterrupt):
        serve(handler, port=args.port, function_name=args.function_name, timeout_s=args.timeout_s)


if __name__ == "__main__":
    main()
