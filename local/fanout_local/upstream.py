"""A small, fast HTTP/1.1 upstream for local runs, tests and benchmarks.

Endpoints:
- `GET /delay?ms=X`: 200 after X ms (default: the server's `delay_ms`);
- `GET /status/{code}`: answers with that status at once;
- `GET /hang`: never answers (until the client gives up);
- `GET /reset`: closes the connection without answering;
- `GET /cookie`: 200 with a `Set-Cookie` header (counts requests that carried a cookie);
- `GET /stats`: the counters below, as JSON (not counted themselves).

It counts connections opened, requests served and the peak of requests in
flight, which is what tests assert concurrency bounds and connection reuse with.
Plain asyncio streams with keep-alive: no framework, so it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit


@dataclass
class UpstreamStats:
    connections: int = 0
    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    requests_with_cookie: int = 0

    def reset(self) -> None:
        self.connections = self.requests = self.peak_in_flight = self.requests_with_cookie = 0


class LocalUpstream:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay_ms: float = 50.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.port = port
        self.delay_ms = delay_ms
        self.stats = UpstreamStats()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

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
            for task in self._connections:
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                _method, target, _version = request_line.split(" ", 2)
                headers = dict(line.lower().split(": ", 1) for line in header_lines if ": " in line)
                if length := int(headers.get("content-length", "0")):
                    await reader.readexactly(length)
                keep_alive = headers.get("connection", "") != "close"
                if "cookie" in headers:
                    self.stats.requests_with_cookie += 1
                if not await self._respond(target, writer, keep_alive):
                    return
                await writer.drain()
                if not keep_alive:
                    return
        finally:
            self._connections.discard(task)
            writer.close()

    async def _respond(self, target: str, writer: asyncio.StreamWriter, keep_alive: bool) -> bool:
        """Answer one request; False means the connection is to be dropped."""
        url = urlsplit(target)
        if url.path == "/stats":
            writer.write(_response(200, asdict(self.stats), keep_alive))
            return True
        self.stats.requests += 1
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            if url.path == "/delay":
                delay_ms = float(parse_qs(url.query).get("ms", [self.delay_ms])[0])
                await asyncio.sleep(delay_ms / 1000)
                writer.write(_response(200, {"delay_ms": delay_ms}, keep_alive))
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
                writer.write(_response(404, {"error": f"no route {url.path}"}, keep_alive))
            return True
        finally:
            self.stats.in_flight -= 1


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
def running_in_thread(*, delay_ms: float = 50.0) -> Iterator[LocalUpstream]:
    """Serve on 127.0.0.1 (a free port) from a thread with its own loop, for tests and benchmarks."""
    upstream = LocalUpstream(delay_ms=delay_ms)
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
    parser.add_argument("--certfile", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--keyfile", help="and this private key (PEM)")
    args = parser.parse_args()
    ssl_context = None
    if args.certfile:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.certfile, args.keyfile)

    async def serve() -> None:
        upstream = LocalUpstream(host=args.host, port=args.port, delay_ms=args.delay_ms, ssl_context=ssl_context)
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
