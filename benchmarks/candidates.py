"""What the benchmark compares, each behind the engine's API except the floor.

- `baseline`: the naive pattern this service replaces: a new `httpx.AsyncClient`
  with default limits for every call (and `httpx.get` per request for sync);
- the service's transports (`fanout.transports`), their egress guard on (loopback is
  allowed here, but every address is still checked): `pyreqwest` (shipped by default)
  and `aiohttp`; `pyreqwest-unguarded` and `aiohttp-unguarded`, the same without the
  guard, to show what it costs;
- candidates measured and not shipped: httpx's own HTTP/1.1 pool (`httpx`),
  `httpx2` (the maintained fork), httpx's API on aiohttp (`httpx-aiohttp`) and
  httpx with `http2=True` over TLS (`httpx-http2`);
- `floor`: raw aiohttp with no engine at all, the physical limit of that client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from types import ModuleType
from typing import Any

import aiohttp
import httpx
import httpx2
from httpx_aiohttp import AiohttpTransport as HttpxOnAiohttp

from fanout.egress import IPNetwork
from fanout.engine import FanoutResult, Outcome, RequestError, Strategy, fan_out
from fanout.transport_aiohttp import AiohttpTransport
from fanout.transport_pyreqwest import PyreqwestTransport
from fanout.transports import Transport

TIMEOUT_S = 10.0


class HttpxTransport(Transport):
    """httpx's own pool (or httpx2's: same API); `http2=True` multiplexes over one TLS connection per host."""

    def __init__(
        self,
        *,
        http2: bool = False,
        library: ModuleType = httpx,
        ssl_context: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.http2 = http2
        self.library = library
        self.ssl_context = ssl_context

    async def _close(self, client: Any) -> None:
        await client.aclose()

    async def get_status(self, url: str) -> tuple[int, str | None]:
        try:
            response = await self._bound_client().get(url)
        except self.library.HTTPError as exc:
            raise RequestError(type(exc).__name__) from exc
        return response.status_code, response.headers.get("retry-after")

    def _open(self, key: Any) -> Any:
        lib = self.library
        limits = lib.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        return lib.AsyncClient(
            http2=self.http2,
            limits=limits,
            timeout=lib.Timeout(self.timeout_s, pool=None),
            verify=self.ssl_context or True,
        )


class HttpxAiohttpTransport(HttpxTransport):
    def _open(self, key: Any) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        transport = HttpxOnAiohttp(limits=limits, verify=self.ssl_context or True)
        return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(self.timeout_s, pool=None))


class UnguardedAiohttp(AiohttpTransport):
    """The service's transport without the egress guard (its resolver and socket factory): what the guard costs."""

    def _open(self, key: Any) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
        )


class UnguardedPyreqwest(PyreqwestTransport):
    """The shipped transport with its address check skipped (URLs still read as reqwest reads them)."""

    def _check(self, host: str, address: str, port: int, networks: tuple[IPNetwork, ...]) -> None:
        return None


class Candidate:
    """Runs one fan-out call; keeps its client across calls, like a warm container."""

    reuses_client = True

    def __init__(self, name: str, transport: Transport) -> None:
        self.name = name
        self.transport = transport

    async def call(self, url: str, strategy: Strategy, n: int, concurrency: int) -> FanoutResult:
        async def send(_index: int) -> int:
            return (await self.transport.get_status(url))[0]

        return await fan_out(send, n=n, strategy=strategy, concurrency=concurrency, deadline_s=120)

    async def aclose(self) -> None:
        await self.transport.aclose()


class Baseline(Candidate):
    """A new client per call with httpx's defaults (100 connections, 5 s pool timeout)."""

    reuses_client = False

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        self.name = "baseline"
        self.verify: Any = ssl_context or True

    async def call(self, url: str, strategy: Strategy, n: int, concurrency: int) -> FanoutResult:
        if strategy is Strategy.SYNC:

            async def send_blocking(_index: int) -> int:
                return httpx.get(url, verify=self.verify).status_code  # noqa: ASYNC210 - the naive pattern, on purpose

            return await fan_out(send_blocking, n=n, strategy=strategy, concurrency=1, deadline_s=120)
        async with httpx.AsyncClient(verify=self.verify) as client:

            async def send(_index: int) -> int:
                return (await client.get(url)).status_code

            return await fan_out(send, n=n, strategy=strategy, concurrency=concurrency, deadline_s=120)

    async def aclose(self) -> None:
        pass


class Floor(Candidate):
    """Raw aiohttp, no engine: what this client can do at best."""

    def __init__(self, pool: int, ssl_context: ssl.SSLContext | None) -> None:
        self.name = "floor"
        self.pool = pool
        self.ssl_context = ssl_context
        self.session: aiohttp.ClientSession | None = None

    async def call(self, url: str, strategy: Strategy, n: int, concurrency: int) -> FanoutResult:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=self.pool, limit_per_host=0, ssl=self.ssl_context or True)
            self.session = aiohttp.ClientSession(connector=connector)
        session = self.session

        async def get() -> int:
            async with session.get(url) as response:
                await response.read()
                return response.status

        loop = asyncio.get_running_loop()
        started = loop.time()
        if strategy is Strategy.SYNC:
            statuses = [await get() for _ in range(n)]
        elif strategy is Strategy.SEMAPHORE:
            limiter = asyncio.Semaphore(concurrency)

            async def bounded() -> int:
                async with limiter:
                    return await get()

            statuses = await asyncio.gather(*(bounded() for _ in range(n)))
        else:
            statuses = await asyncio.gather(*(get() for _ in range(n)))
        outcomes = [Outcome(value=status) for status in statuses]
        return FanoutResult(strategy, min(n, concurrency), loop.time() - started, outcomes)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def make_candidates(
    names: list[str],
    pool: int,
    ssl_factory: Callable[[], ssl.SSLContext | None] = lambda: None,
    ca_pem: bytes | None = None,
) -> list[Candidate]:
    """The named candidates, each with a pool of `pool` and its own TLS context (or `ca_pem` to trust)."""

    def common() -> dict[str, Any]:
        return {"max_connections": pool, "timeout_s": TIMEOUT_S, "ssl_context": ssl_factory()}

    def shipped() -> dict[str, Any]:
        return {"max_connections": pool, "timeout_s": TIMEOUT_S, "extra_ca_pem": ca_pem, "allow_private": True}

    factories: dict[str, Callable[[], Candidate]] = {
        "baseline": lambda: Baseline(ssl_factory()),
        "httpx": lambda: Candidate("httpx", HttpxTransport(**common())),
        "httpx2": lambda: Candidate("httpx2", HttpxTransport(library=httpx2, **common())),
        "httpx-aiohttp": lambda: Candidate("httpx-aiohttp", HttpxAiohttpTransport(**common())),
        "httpx-http2": lambda: Candidate("httpx-http2", HttpxTransport(http2=True, **common())),
        "pyreqwest": lambda: Candidate("pyreqwest", PyreqwestTransport(**shipped())),
        "pyreqwest-unguarded": lambda: Candidate("pyreqwest-unguarded", UnguardedPyreqwest(**shipped())),
        "aiohttp": lambda: Candidate("aiohttp", AiohttpTransport(**shipped())),
        "aiohttp-unguarded": lambda: Candidate("aiohttp-unguarded", UnguardedAiohttp(**shipped())),
        "floor": lambda: Floor(pool, ssl_factory()),
    }
    return [factories[name]() for name in names]
