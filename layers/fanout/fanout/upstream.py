"""The pooled HTTP client that carries the engine's requests to the upstream.

One client per container, created lazily on first use and reused by every warm
invocation: a client per call would throw away its connections (and TLS
sessions), and the FastAPI lifespan is the wrong home because Mangum runs it on
every invocation. The pool is sized to the function's concurrency ceiling so
that no request waits for a connection longer than the deadline allows: the
pool wait itself has no timeout, the engine's deadline bounds it.
"""

from __future__ import annotations

import asyncio

import httpx


class UpstreamClient:
    """GETs one URL, returns the status. Keyword-only limits, like httpx.Limits."""

    def __init__(self, *, max_connections: int, timeout_s: float) -> None:
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"UpstreamClient(max_connections={self.max_connections}, timeout_s={self.timeout_s})"

    @property
    def client(self) -> httpx.AsyncClient:
        """The shared client, bound to the running loop (a new loop gets a new client)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A client's connections belong to the loop that opened them; Lambda keeps
            # one loop per container, so this happens once per cold start.
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                ),
                timeout=httpx.Timeout(self.timeout_s, pool=None),
            )
            self._loop = loop
        return self._client

    @property
    def client_if_open(self) -> httpx.AsyncClient | None:
        """The client if one was created (for inspection; does not create one)."""
        return self._client

    async def get_status(self, url: str) -> int:
        response = await self.client.get(url)
        return response.status_code

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
            self._loop = None
