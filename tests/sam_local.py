"""`sam local` run by the SAM CLI's own code, with only its container runtime swapped for subprocesses.

Run with the SAM CLI's interpreter (its venv): `python tests/sam_local.py local start-api --template ...`.
Everything up to the container is the SAM CLI's: click and samconfig.toml, parameter
overrides, `--env-vars`, its template resolver, route discovery and authorizers, event
construction and the parsing of the function's answer. Where it would start a Docker
container from the python3.13 image, `SubprocessRuntime` starts the function's code and
layers under the runtime interface client with Lambda's import paths (lambda_runtime.py)
and keeps it warm, as `--warm-containers` does.

`--print-args` first: print the arguments the command would run with, as JSON, and start
nothing (the README's commands are checked that way).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from lambda_runtime import LambdaProcess, container

RIC = Path(os.environ.get("FANOUT_LAMBDA_RIC", ""))
PYTHON = os.environ.get("FANOUT_LAMBDA_PYTHON", "python3.13")
SCRATCH = Path(os.environ.get("FANOUT_SAM_LOCAL_SCRATCH", "/tmp"))


class SubprocessRuntime:
    """Stands in for samcli.local.lambdafn.runtime.LambdaRuntime: one warm process per function."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[Any, LambdaProcess]] = {}
        self._lock = threading.Lock()

    def invoke(
        self, function_config: Any, event: str, *args: Any, stdout: Any = None, stderr: Any = None, **_: Any
    ) -> None:
        process = self._process(function_config)
        invocation = process.api.invoke(None, raw=event.encode("utf-8"), timeout_s=float(function_config.timeout))
        stdout.write_str(json.dumps(json.loads(invocation.payload), ensure_ascii=False))  # what the RIE answers
        stdout.flush()
        if stderr is not None:
            stderr.write_str("\n")
            stderr.flush()

    def _process(self, function_config: Any) -> LambdaProcess:
        with self._lock:
            if function_config.full_path not in self._running:
                code = Path(function_config.code_abs_path)
                layers = [_layer_root(layer.codeuri, code.parent) for layer in function_config.layers]
                context = container(
                    code,
                    layers,
                    ric=RIC,
                    python=PYTHON,
                    env=function_config.env_vars.resolve(),
                    scratch=SCRATCH,
                    handler=function_config.handler,
                )
                self._running[function_config.full_path] = (context, context.__enter__())
            return self._running[function_config.full_path][1]

    def clean_runtime_containers(self) -> None:
        for context, _ in self._running.values():
            context.__exit__(None, None, None)
        self._running.clear()


def _layer_root(codeuri: str, base: Path) -> Path:
    path = Path(codeuri)
    return path if path.is_absolute() else base / path


def swap_the_container_runtime() -> None:
    from samcli.commands.local.cli_common.invoke_context import InvokeContext

    runtime = SubprocessRuntime()

    def lambda_runtime(self: Any) -> SubprocessRuntime:
        self._lambda_runtimes = {"subprocess": runtime}
        return runtime

    InvokeContext.lambda_runtime = property(lambda_runtime)  # type: ignore[method-assign,assignment]
    InvokeContext._get_container_manager = staticmethod(lambda *args: None)  # type: ignore[method-assign]
    InvokeContext._initialize_all_functions_containers = lambda self: []  # type: ignore[method-assign]
    InvokeContext._clean_running_containers_and_related_resources = lambda self: runtime.clean_runtime_containers()  # type: ignore[method-assign]


def print_the_arguments_instead() -> None:
    """Replace each command's `do_cli` with one that prints what it was given."""
    from samcli.commands.local.invoke import cli as invoke_cli
    from samcli.commands.local.start_api import cli as start_api_cli

    for module in (invoke_cli, start_api_cli):
        signature = inspect.signature(module.do_cli)

        def report(*args: Any, _signature: inspect.Signature = signature, **kwargs: Any) -> None:
            bound = _signature.bind(*args, **kwargs).arguments
            bound.pop("ctx", None)
            print(json.dumps({name: value for name, value in bound.items()}, default=str))

        module.do_cli = report


def main(argv: list[str]) -> None:
    from samcli.cli.main import cli

    if argv[:1] == ["--print-args"]:
        argv = argv[1:]
        print_the_arguments_instead()
    else:
        swap_the_container_runtime()
    cli.main(args=argv, prog_name="sam")


if __name__ == "__main__":
    main(sys.argv[1:])
