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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from fanout.engine import RequestError

if TYPE_CHECKING:
    import aiohttp

TransportName = Literal["aiohttp"]
TRANSPORTS: tuple[str, ...] = get_args(TransportName)


class Transport(Protocol):
    """What the seed routes need from a client: GET a URL, return the status."""

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


REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    truncated: bool  # the body was longer than the cap and was cut there


class AiohttpTransport(LoopBound):
    """aiohttp behind the egress guard (fanout.egress): every connection's address is checked."""

    def __init__(self, *, max_per_host: int = 0, allow_private: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_per_host = max_per_host
        self.allow_private = allow_private
        self._checked_hosts: set[tuple[str | None, int | None]] = set()
        self._policy: Any = None

    async def get_status(self, url: str) -> int:
        """GET `url` and return the status (the seed routes' fast path)."""
        from yarl import URL

        session: aiohttp.ClientSession = self._bound_client()
        try:
            self._check_literal(URL(url))
            async with session.get(url, allow_redirects=False) as response:
                await response.read()  # read the body so the connection goes back to the pool
                return response.status
        except Exception as exc:
            raise _request_error(exc) from exc

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        body: bytes | None,
        max_body_bytes: int,
        max_redirects: int = 0,
        check_redirect: Callable[[str], None] = lambda _url: None,
    ) -> UpstreamResponse:
        """One request; redirects followed by hand, each hop checked like the first."""
        from yarl import URL

        session: aiohttp.ClientSession = self._bound_client()
        current = URL(url)
        try:
            for hop in range(max_redirects + 1):
                self._check_literal(current)
                async with session.request(
                    method, current, headers=headers, data=body, allow_redirects=False
                ) as response:
                    location = response.headers.get("Location")
                    if response.status in REDIRECT_STATUSES and location and hop < max_redirects:
                        following = current.join(URL(location))
                        check_redirect(str(following))
                        if following.origin() != current.origin():  # credentials stay with their origin
                            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                        if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                            method, body = "GET", None
                        current = following
                        continue
                    data, truncated = await _read_capped(response, max_body_bytes)
                    return UpstreamResponse(
                        status=response.status,
                        headers={name.lower(): value for name, value in response.headers.items()},
                        body=data,
                        truncated=truncated,
                    )
        except RequestError:
            raise
        except Exception as exc:
            raise _request_error(exc) from exc
        raise AssertionError("unreachable: the last hop returns")  # pragma: no cover

    def _check_literal(self, url: Any) -> None:
        key = (url.host, url.port)
        if key not in self._checked_hosts:
            self._bound_policy().check_literal_host(url.host, url.port)
            if len(self._checked_hosts) < 1024:
                self._checked_hosts.add(key)

    def _bound_policy(self) -> Any:
        if self._policy is None:
            from fanout.egress import EgressPolicy

            self._policy = EgressPolicy(allow_private=self.allow_private)
        return self._policy

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        from fanout.egress import guarded_connector

        connector = guarded_connector(
            self._bound_policy(),
            limit=self.max_connections,
            limit_per_host=self.max_per_host,
            ssl=self.ssl_context or True,
        )
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
        # No cookie jar: the session is shared by every caller of this container, and a
        # cookie one upstream response sets must never ride along on another caller's request.
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )

    async def _close(self, client: aiohttp.ClientSession) -> None:
        await client.close()


async def _read_capped(response: Any, max_bytes: int) -> tuple[bytes, bool]:
    """Read at most `max_bytes` of the body as it streams in; an endless body is cut, not buffered."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        if size + len(chunk) > max_bytes:
            chunks.append(chunk[: max_bytes - size])
            response.close()  # the rest is never read: this connection cannot be reused
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def _request_error(exc: BaseException) -> RequestError:
    from fanout.egress import FORBIDDEN_ADDRESS, EgressRefused

    if isinstance(exc, EgressRefused):
        return RequestError(FORBIDDEN_ADDRESS, str(exc))
    return RequestError(_aiohttp_error_kind(exc), str(exc))


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
        (aiohttp.InvalidURL, "InvalidURL"),
        (TimeoutError, "Timeout"),
    ]
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), type(exc).__name__)


def make_transport(
    name: str,
    *,
    max_connections: int,
    timeout_s: float,
    max_per_host: int = 0,
    allow_private: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> AiohttpTransport:
    """The transport called `name` (one of TRANSPORTS), sized for one function."""
    if name == "aiohttp":
        return AiohttpTransport(
            max_connections=max_connections,
            timeout_s=timeout_s,
            max_per_host=max_per_host,
            allow_private=allow_private,
            ssl_context=ssl_context,
        )
    raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORTS)}")
