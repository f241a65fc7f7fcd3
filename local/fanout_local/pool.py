"""The local stand-in for Lambda's scaling: a pool of function processes ("containers") per function.

Lambda runs one invocation per container at a time and starts more containers as calls
arrive, up to the function's reserved concurrency when it has one. Here each container is
a worker process (fanout_local.worker) running the real handler; a pool starts one,
starts more while every one is busy, and stops growing at its `limit`:

- with a reserved concurrency (a configured limit), a call past it is throttled, as on
  AWS: `Throttled` (the gateway answers 429);
- without one, the local cap (FANOUT_LOCAL_CONTAINERS) only keeps a laptop usable: a call
  past it waits for a free container, as long as the function's timeout, instead of
  being dropped.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from fanout_local.template import LocalFunction

DEFAULT_LOCAL_CONTAINERS = 4


class Throttled(Exception):
    """Every container the function may have is busy, and its reserved concurrency says no more."""


class Unavailable(Exception):
    """No container became free within the function's timeout."""


@dataclass(frozen=True)
class Container:
    process: subprocess.Popen[str]
    port: int

    def invoke(self, event: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s + 5)
        try:
            connection.request("POST", "/", json.dumps(event), {"content-type": "application/json"})
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()


class FunctionPool:
    """Containers of one function: started on demand up to `limit`, each serving one call at a time."""

    def __init__(
        self,
        function: LocalFunction,
        environment: dict[str, str],
        *,
        limit: int,
        throttles: bool,
        on_output: Callable[[str, str], None],
    ) -> None:
        self.function = function
        self.environment = environment
        self.limit = limit
        self.throttles = throttles  # a reserved concurrency: throttle past `limit` instead of waiting
        self._on_output = on_output
        self._idle: list[Container] = []
        self._all: list[Container] = []
        self._starting = 0
        self._freed = threading.Condition()

    def __repr__(self) -> str:
        return f"FunctionPool({self.function.name}, limit={self.limit}, throttles={self.throttles})"

    def start(self) -> None:
        """The first container, so that a broken function fails `make run` at once, not on its first call."""
        self._release(self._start_container())

    @contextmanager
    def container(self) -> Iterator[Container]:
        """A container for one call: idle, or newly started, or (past the limit) the next one freed."""
        container = self._acquire()
        try:
            yield container
        finally:
            self._release(container)

    def _acquire(self) -> Container:
        with self._freed:
            while not self._idle:
                if len(self._all) + self._starting < self.limit:
                    self._starting += 1
                    break
                if self.throttles:
                    raise Throttled(f"{self.function.name}: all {self.limit} reserved containers are busy")
                if not self._freed.wait(timeout=self.function.timeout_s):
                    raise Unavailable(f"{self.function.name}: no container free within {self.function.timeout_s} s")
            else:
                return self._idle.pop()
        try:
            return self._start_container()
        finally:
            with self._freed:
                self._starting -= 1

    def _release(self, container: Container) -> None:
        with self._freed:
            if container.process.poll() is None:
                self._idle.append(container)
            else:
                self._all.remove(container)  # it died: the next call starts another
            self._freed.notify()

    def _start_container(self) -> Container:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fanout_local.worker",
                "--code-dir",
                str(self.function.code_dir),
                "--handler",
                self.function.handler,
                "--function-name",
                self.function.name,
                "--timeout-s",
                str(self.function.timeout_s),
            ],
            env=self.environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        ready = ""
        for line in process.stdout:  # what the cold start printed comes first (an error, if it failed)
            if line.startswith("READY "):
                ready = line
                break
            self._on_output(self.function.name, line)
        if not ready:
            process.wait(timeout=10)
            raise RuntimeError(f"{self.function.name} failed to start (see its error above)")
        threading.Thread(target=self._forward, args=(process.stdout,), daemon=True).start()
        container = Container(process=process, port=int(ready.split()[1]))
        with self._freed:
            self._all.append(container)
        return container

    def _forward(self, stream: IO[str]) -> None:
        for line in stream:
            self._on_output(self.function.name, line)

    def stop(self) -> None:
        with self._freed:
            containers, self._all, self._idle = list(self._all), [], []
        for container in containers:
            container.process.terminate()
        for container in containers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                container.process.wait(timeout=10)
