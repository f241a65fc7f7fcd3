"""A bare HTTP/1.1 client for the delay chain's floor: what this machine allows any client.

One asyncio Protocol per keep-alive connection, one thread, GET only, an answer read
by its Content-Length and nothing else checked. No product should send requests
this way; the benchmark runs it beside the handler and the raw clients so that the
chain's figure can be read against what is possible here, not only against the
500 ms that no client reaches (the loopback and the idle CPUs' wake-ups take
their share of every round whoever sends).
"""

from __future__ import annotations

import asyncio
from typing import cast
from urllib.parse import urlsplit


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `answered` is the future of the request on it, if any."""

    def __init__(self) -> None:
        self.received = b""
        self.answered: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without deriving from it

    def data_received(self, data: bytes) -> None:
        self.received += data
        head, blank_line, body = self.received.partition(b"\r\n\r\n")
        if not blank_line:
            return
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        if len(body) >= length and self.answered is not None:
            self.received = body[length:]
            self.answered.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_exception(exc or ConnectionError("closed before the answer"))


class BareClient:
    """GET one URL over a pool of keep-alive connections: a connection per request in flight."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "", parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
        self.idle: list[_Connection] = []

    async def get(self) -> int:
        """The status of one GET of the URL."""
        loop = asyncio.get_running_loop()
        if self.idle:
            connection = self.idle.pop()
        else:
            _, connection = await loop.create_connection(_Connection, self.host, self.port)
        connection.answered = loop.create_future()
        connection.transport.write(self.request)
        status = await connection.answered
        connection.answered = None
        self.idle.append(connection)
        return status

    async def close(self) -> None:
        for connection in self.idle:
            connection.transport.close()
