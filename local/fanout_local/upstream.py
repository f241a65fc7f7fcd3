"""A small, fast HTTP/1.1 upstream for local runs, tests and benchmarks.

Endpoints:
- `GET /delay?ms=X`: 200 after X ms (default: the server's `delay_ms`);
- `GET /status/{code}`: answers with that status at once;
- `GET /hang`: never answers (until the client gives up);
- `GET /reset`: closes the connection without answering;
- `GET /cookie`: 200 with a `Set-Cookie` header (counts requests that carried a cookie);
- `GET /stats`: the counters below, as JSON (not counted themselves), and how late /delay
  answered (`delay_late_us`: median and 99th percentile past the asked delay).

Faults, for the /batch tests (`key` keeps a counter per test):
- `/flaky?key=K&fail=N&status=503`: the first N calls answer `status`, then 200;
- `/retry-after?key=K&fail=N&s=1` (or `&date=1`): 429 with Retry-After in seconds
  (or as an HTTP date) for the first N calls, then 200;
- `/bytes?n=X` (`&type=...`), `/endless`, `/cut`: a body of X bytes, a body that
  never ends, a body cut off by a reset;
- `/redirect?to=URL&status=302`; `/echo`: method, path, headers and body as JSON;
- `/attempts?key=K`: how many calls a key has had;
- `/loop`: a redirect to itself;
- `/limited` (a token bucket) and `/knee` (latency that grows past a number in flight):
  targets with a capacity the client is not told, see fanout_local.capacity;
- `/mode`: answers as the path (and query) in the server's `mode` attribute, which tests
  set to point a seed function's fixed target at one fault after another;
- hostile answers (stalled bodies, slow headers, huge bodies, gzip bombs, JSON Python
  cannot write back, 10,000 headers, non-UTF-8): see fanout_local.hostile.

It counts connections opened, requests served and the peak of requests in
flight, which is what tests assert concurrency bounds and connection reuse with.
Plain asyncio streams with keep-alive: no framework, so it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import ssl
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fanout_local import hostile
from fanout_local.capacity import Capacity
from fanout_local.exact_sleep import ExactSleeper


@dataclass
class UpstreamStats:
    connections: int = 0
    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    requests_with_cookie: int = 0


class LocalUpstream:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay_ms: float = 50.0,
        ssl_context: ssl.SSLContext | None = None,
        exact_delays: bool = False,
    ) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.port = port
        self.delay_ms = delay_ms
        self.stats = UpstreamStats()
        self.calls: dict[str, int] = {}  # per `key` of the fault endpoints
        self.mode = "/delay"  # what GET /mode answers as: tests point a function's one target at /mode
        self.arrivals: deque[float] = deque(maxlen=100_000)  # monotonic time each request arrived
        self.capacity = Capacity()  # /limited and /knee: what a target can take (fanout_local.capacity)
        # /delay on the loop's timer (late by up to a millisecond or so), or to the microsecond for a benchmark
        # that takes the delay as its floor, at the cost of spinning a core for the last 2 ms of each
        self.exact_sleeper = ExactSleeper() if exact_delays else None
        self.delay_lateness_s: deque[float] = deque(maxlen=100_000)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}  # each connection: its task, its writer

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, backlog=4096, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Hanging requests and idle keep-alive connections would keep wait_closed() waiting.
            connections = dict(self._connections)
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            # A cancelled connection's close waits for its unsent bytes (an endless body the client cut
            # off or stopped reading): a write still pending hangs uvloop's close, or fails it (EBUSY).
            for writer in connections.values():
                writer.transport.abort()
            await asyncio.gather(*(writer.wait_closed() for writer in connections.values()), return_exceptions=True)
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                received_at = time.perf_counter()
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {
                    name.lower(): value for name, _, value in (line.partition(": ") for line in header_lines) if value
                }
                body = await reader.readexactly(length) if (length := int(headers.get("content-length", "0"))) else b""
                keep_alive = headers.get("connection", "") != "close"
                if "cookie" in headers:
                    self.stats.requests_with_cookie += 1
                request = Request(method, target, headers, body, received_at)
                self.arrivals.append(time.monotonic())
                try:
                    answer: Any = _HeadersOnly(writer) if method == "HEAD" else writer
                    if not await self._respond(request, answer, keep_alive):
                        return
                    await writer.drain()
                except ConnectionError:
                    return  # the client closed first: hostile bodies are meant to be abandoned
                if not keep_alive:
                    return
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _respond(self, request: Request, writer: asyncio.StreamWriter, keep_alive: bool) -> bool:
        """Answer one request; False means the connection is to be dropped."""
        url = urlsplit(request.target)
        if url.path == "/mode":
            url = urlsplit(self.mode)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        if url.path == "/stats":
            writer.write(_response(200, {**asdict(self.stats), "delay_late_us": self._lateness_us()}, keep_alive))
            return True
        self.stats.requests += 1
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            if url.path == "/delay":
                delay_ms = float(query.get("ms", self.delay_ms))
                answer = _response(200, {"delay_ms": delay_ms}, keep_alive)  # made first: sent on time
                self.delay_lateness_s.append(await self._hold(request.received_at + delay_ms / 1000))
                writer.write(answer)
            elif url.path.startswith("/status/"):
                code = int(url.path.removeprefix("/status/"))
                writer.write(_response(code, {"status": code}, keep_alive))
            elif url.path == "/cookie":
                writer.write(_response(200, {"cookie": "set"}, keep_alive, ("set-cookie: session=caller-a; Path=/",)))
            elif url.path == "/hang":
                await asyncio.sleep(3600)
            elif url.path == "/reset":
                writer.transport.abort()
                return False
            else:
                return await self._fault(url.path, query, request, writer, keep_alive)
            return True
        finally:
            self.stats.in_flight -= 1

    async def _hold(self, until: float) -> float:
        """Sleep for /delay until `until` (a time.perf_counter() time); answers how late it woke, in seconds."""
        if self.exact_sleeper is not None:
            return await self.exact_sleeper.sleep_until(until)
        await asyncio.sleep(until - time.perf_counter())
        return time.perf_counter() - until

    def _lateness_us(self) -> dict[str, float] | None:
        if len(self.delay_lateness_s) < 2:
            return None
        percentiles = statistics.quantiles(self.delay_lateness_s, n=100)
        return {"p50": round(percentiles[49] * 1e6, 1), "p99": round(percentiles[98] * 1e6, 1)}

    async def _fault(
        self, path: str, query: dict[str, str], request: Request, writer: asyncio.StreamWriter, keep_alive: bool
    ) -> bool:
        key = query.get("key", "")
        if path in ("/flaky", "/retry-after"):
            self.calls[key] = calls = self.calls.get(key, 0) + 1
            if calls <= int(query.get("fail", "1")):
                if path == "/flaky":
                    writer.write(_response(int(query.get("status", "503")), {"call": calls}, keep_alive))
                    return True
                seconds = float(query.get("s", "1"))
                value = (
                    email.utils.formatdate(time.time() + seconds, usegmt=True) if "date" in query else f"{seconds:g}"
                )
                writer.write(_response(429, {"call": calls}, keep_alive, (f"retry-after: {value}",)))
                return True
            writer.write(_response(200, {"call": calls}, keep_alive))
        elif path == "/attempts":
            writer.write(_response(200, {"calls": self.calls.get(key, 0)}, keep_alive))
        elif path == "/limited":
            status, headers = self.capacity.limited(key, query)
            writer.write(_response(status, {"status": status}, keep_alive, headers))
        elif path == "/knee":
            took_ms = await self.capacity.knee(key, query)
            writer.write(_response(200, {"took_ms": round(took_ms, 1)}, keep_alive))
        elif path == "/loop":
            writer.write(_response(302, {}, keep_alive, ("location: /loop",)))
        elif path == "/echo" or path.startswith("/echo/"):
            echoed = {
                "method": request.method,
                "target": request.target,
                "headers": request.headers,
                "body": request.body.decode("utf-8", "replace"),
            }
            writer.write(_response(200, echoed, keep_alive))
        elif path == "/bytes":
            size, kind = int(query.get("n", "0")), query.get("type", "application/octet-stream")
            data = (b"x" * size) if kind.startswith("text/") else bytes(range(256)) * (size // 256) + bytes(size % 256)
            writer.write(_raw_response(200, data, kind, keep_alive))
        elif path == "/redirect":
            location = query.get("to", "/")
            writer.write(_response(int(query.get("status", "302")), {}, keep_alive, (f"location: {location}",)))
        elif path == "/endless":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
            chunk = b"y" * 65536
            while True:  # until the client gives up and closes
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()
        elif path == "/cut":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100000\r\n\r\n" + b"z" * 10)
            await writer.drain()
            writer.transport.abort()
            return False
        elif (served := await hostile.answer(path, query, writer, keep_alive)) is not None:
            return served
        else:
            writer.write(_response(404, {"error": f"no route {path}"}, keep_alive))
        return True


class _HeadersOnly:
    """A writer for a HEAD request: the status line and headers go out, the body that GET would get does not."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._done = False

    def write(self, data: bytes) -> None:
        if not self._done:
            head, found, _ = data.partition(b"\r\n\r\n")
            self._writer.write(head + found)
            self._done = bool(found)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # time.perf_counter() when its head was read: /delay counts from there


def _raw_response(status: int, data: bytes, content_type: str, keep_alive: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(data)}\r\nconnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + data


def _response(status: int, body: object, keep_alive: bool, extra_headers: tuple[str, ...] = ()) -> bytes:
    payload = json.dumps(body).encode()
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Status"
    connection = "keep-alive" if keep_alive else "close"
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: {connection}\r\n"
        + "".join(f"{header}\r\n" for header in extra_headers)
        + "\r\n"
    )
    return head.encode() + payload


@contextmanager
def running_in_thread(
    *, delay_ms: float = 50.0, ssl_context: ssl.SSLContext | None = None, exact_delays: bool = False
) -> Iterator[LocalUpstream]:
    """Serve on 127.0.0.1 (a free port) from a thread with its own loop, for tests and benchmarks."""
    upstream = LocalUpstream(delay_ms=delay_ms, ssl_context=ssl_context, exact_delays=exact_delays)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="local-upstream", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(timeout=10)
    try:
        yield upstream
    finally:
        asyncio.run_coroutine_threadsafe(upstream.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3001)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="latency of /delay without ?ms=")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (benchmarks: less server CPU)")
    parser.add_argument(
        "--exact-delays", action="store_true", help="answer /delay on time to the microsecond (spins a core)"
    )
    parser.add_argument("--certfile", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--keyfile", help="and this private key (PEM)")
    args = parser.parse_args()
    ssl_context = None
    if args.certfile:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.certfile, args.keyfile)

    async def serve() -> None:
        upstream = LocalUpstream(
            host=args.host,
            port=args.port,
            delay_ms=args.delay_ms,
            ssl_context=ssl_context,
            exact_delays=args.exact_delays,
        )
        await upstream.start()
        print(f"local upstream on {upstream.url} (GET /delay answers after {args.delay_ms:g} ms)", flush=True)
        await asyncio.Event().wait()

    if args.uvloop:
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve())


if __name__ == "__main__":
    main()
