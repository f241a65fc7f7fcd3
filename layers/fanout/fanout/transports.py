"""Transports: what carries the engine's requests to the upstream, chosen per function.

`FANOUT_TRANSPORT=aiohttp` (the default, and today the only one shipped): an
aiohttp `ClientSession`. Measured in benchmarks/ against httpx's own pool,
httpx2, httpx on the aiohttp transport and httpx with HTTP/2: aiohttp had the
lowest client CPU per request in every cell and stayed within a few percent of
raw aiohttp; HTTP/2 won only a cold N=100 TLS call and failed requests under
load, so it was not kept (README, "Choosing the transport").

Every transport is one pooled client per container, created lazily on first use
inside the running loop and reused by every warm invocation (a client per call
throws away its connections and TLS sessions; the FastAPI lifespan is the wrong
home because Mangum runs it on every invocation). The pool is sized to the
function's concurrency ceiling and waiting for it has no timeout of its own: the
engine's deadline bounds it. Each request has `timeout_s` to connect and between
reads.

Failures are raised as `RequestError` named in one vocabulary (httpx's names:
`ConnectError`, `ConnectTimeout`, `ReadTimeout`, `RemoteProtocolError`, ...), so the
API's `errors` do not depend on the library underneath.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from fanout.engine import RequestError

if TYPE_CHECKING:
    import aiohttp

TransportName = Literal["aiohttp"]
TRANSPORTS: tuple[str, ...] = get_args(TransportName)


class Transport(Protocol):
    """The one thing the web layer needs from a client: GET a URL, return the status."""

    async def get_status(self, url: str) -> int: ...

    async def aclose(self) -> None: ...


class LoopBound:
    """Holds one client per event loop: Lambda keeps one loop per container, so one client.

    A client's connections belong to the loop that opened them; should the loop
    ever change (tests, local tools), the next call opens a new client on it.
    """

    def __init__(self, *, max_connections: int, timeout_s: float, ssl_context: ssl.SSLContext | None = None):
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_connections={self.max_connections}, timeout_s={self.timeout_s})"

    @property
    def client_if_open(self) -> Any:
        """The current client, or None before the first request (does not create one)."""
        return self._client

    def _bound_client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = self._open(), loop
        return self._client

    def _open(self) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await self._close(client)

    async def _close(self, client: Any) -> None:
        await client.aclose()


class AiohttpTransport(LoopBound):
    async def get_status(self, url: str) -> int:
        import aiohttp

        session: aiohttp.ClientSession = self._bound_client()
        try:
            async with session.get(url) as response:
                await response.read()  # read the body so the connection goes back to the pool
                return response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RequestError(_aiohttp_error_kind(exc), str(exc)) from exc

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, ssl=self.ssl_context or True)
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
        # No cookie jar: the session is shared by every caller of this container, and a
        # cookie one upstream response sets must never ride along on another caller's request.
        return aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar())

    async def _close(self, client: aiohttp.ClientSession) -> None:
        await client.close()


def _aiohttp_error_kind(exc: BaseException) -> str:
    import aiohttp

    kinds: list[tuple[type[BaseException], str]] = [
        (aiohttp.SocketTimeoutError, "ReadTimeout"),
        (aiohttp.ConnectionTimeoutError, "ConnectTimeout"),
        (aiohttp.ServerDisconnectedError, "RemoteProtocolError"),
        (aiohttp.ClientConnectorError, "ConnectError"),
        (aiohttp.ClientPayloadError, "ReadError"),
        (aiohttp.ClientResponseError, "RemoteProtocolError"),
        (aiohttp.ClientOSError, "ReadError"),
        (TimeoutError, "Timeout"),
    ]
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), type(exc).__name__)


def make_transport(
    name: str, *, max_connections: int, timeout_s: float, ssl_context: ssl.SSLContext | None = None
) -> Transport:
    """The transport called `name` (one of TRANSPORTS), sized for one function."""
    common: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout_s": timeout_s,
        "ssl_context": ssl_context,
    }
    if name == "aiohttp":
        return AiohttpTransport(**common)
    raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORTS)}")
