"""Upstreams for the benchmarks, each in its own process, on a core the client does not use.

- HTTP/1.1, plain: fanout_local.upstream (asyncio streams, keep-alive);
- HTTP/1.1 and HTTP/2 over TLS (ALPN): hypercorn serving a one-route ASGI app,
  with a certificate from a throwaway CA (trustme) that the clients trust.

Every server reports its own CPU time (from /proc) so a reader can see it was not
the bottleneck.

A target runs on machines of its own, and a Lambda function of 512 MB has less than one
vCPU. So on a machine of two CPUs or more the upstreams get the last CPU to themselves and
the benchmark's client the others (`split_cores`). Left to the scheduler, the client's two
threads (the event loop and pyreqwest's runtime) and the upstream woke each other up on
the same two cores, about 1 ms per request each way at 100 in flight: a delay of the
machine, not of the client, which the delay chain took for the client's.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cores:
    client: frozenset[int]
    upstream: frozenset[int]


@functools.cache
def split_cores() -> Cores | None:
    """The client's CPUs and the upstreams' (the last one), or None where they cannot be kept apart.
    Read once, from the CPUs this process had before the client was moved to its own."""
    if not hasattr(os, "sched_setaffinity"):
        return None  # not Linux
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return Cores(client=frozenset(cpus[:-1]), upstream=frozenset(cpus[-1:]))


def _on_upstream_core(process: subprocess.Popen[str]) -> None:
    """Move a server just started (one thread, still importing) to the upstreams' core; the threads it
    starts later inherit that."""
    cores = split_cores()
    if cores is not None:
        os.sched_setaffinity(process.pid, cores.upstream)


@contextmanager
def on_cores(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the calling thread, and the processes and threads it starts meanwhile, on `cpus`; None: leave
    it where it is. (Affinity is per thread: threads already running keep theirs.)"""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    ca: trustme.CA | None = None

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """A new context trusting this server; one per client, since httpx sets ALPN on the one it gets."""
        if self.ca is None:
            return None
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def ca_pem(self) -> bytes | None:
        """The certificate authority to trust for this server, as PEM (the shipped transports take it so)."""
        return None if self.ca is None else self.ca.cert_pem.bytes()

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _wait_ready(process: subprocess.Popen[str], marker: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if marker in line:
            return
    raise RuntimeError(f"upstream exited before it was ready ({marker!r} never printed)")


@contextmanager
def http1_upstream(port: int = 0, *, exact_delays: bool = False) -> Iterator[Server]:
    """fanout_local.upstream on uvloop; `exact_delays`: /delay on time to the microsecond (for the delay
    chain, whose floor is the delay itself), not the loop's timer (up to a millisecond or so late)."""
    port = port or _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fanout_local.upstream", "--port", str(port), "--delay-ms", "0", "--uvloop"]
        + (["--exact-delays"] if exact_delays else []),
        stdout=subprocess.PIPE,
        text=True,
    )
    _on_upstream_core(process)
    try:
        _wait_ready(process, "local upstream on")
        yield Server(url=f"http://127.0.0.1:{port}", process=process)
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


@contextmanager
def tls_upstream() -> Iterator[Server]:
    """hypercorn on TLS, offering h2 and http/1.1 by ALPN."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    with tempfile.TemporaryDirectory() as scratch:
        certfile, keyfile = Path(scratch, "cert.pem"), Path(scratch, "key.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))
        port = _free_port()
        process = subprocess.Popen(
            [sys.executable, __file__, str(port), str(certfile), str(keyfile)],
            stdout=subprocess.PIPE,
            text=True,
        )
        _on_upstream_core(process)
        try:
            _wait_ready(process, "tls upstream on")
            _wait_listening(port)
            yield Server(url=f"https://127.0.0.1:{port}", process=process, ca=ca)
        finally:
            process.kill()
            process.wait(timeout=10)
            assert process.stdout is not None
            process.stdout.close()


def _wait_listening(port: int, timeout_s: float = 10.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _delay_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: GET /delay?ms=X answers after X ms."""
    if scope["type"] != "http":
        return
    query = dict(part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part)
    await asyncio.sleep(float(query.get("ms", 0)) / 1000)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def _serve_tls(port: int, certfile: str, keyfile: str) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile, config.keyfile = certfile, keyfile
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = config.errorlog = None
    config.backlog = 4096
    config.h2_max_concurrent_streams = 1000
    print(f"tls upstream on {port}", flush=True)
    asyncio.run(serve(_delay_app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    _serve_tls(int(sys.argv[1]), sys.argv[2], sys.argv[3])
