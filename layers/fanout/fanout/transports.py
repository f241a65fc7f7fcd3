"""Transports: what carries the engine's requests to the upstream, chosen per function.

`FANOUT_TRANSPORT=aiohttp` (the default, and today the only one shipped): aiohttp
`ClientSession`s. Measured in benchmarks/ against httpx's own pool, httpx2,
httpx on the aiohttp transport and httpx with HTTP/2: aiohttp had the lowest
client CPU per request in every cell (README, "Choosing the transport").

Clients live as long as the container, created lazily on first use inside the
running loop and reused by every warm invocation (a client per call throws away
its connections and TLS sessions; the FastAPI lifespan is the wrong home because
Mangum runs it on every invocation). One client per egress policy: the public
one, and one per private target (fanout.targets), so that a pooled connection
opened to a private address is never handed to a request that may not reach it.

Bounds on each request, whatever the upstream does:
- time: `timeout_s` covers the whole request, connecting, the headers and the
  body (a server sending its headers a byte a second is cut at `timeout_s`).
  It starts once a slot is free: the slots (`max_connections`, and
  `max_per_host` per host) are taken before the clock runs, so waiting for
  them is bounded by the caller's deadline, never a spurious timeout;
- memory: a body is read as a stream and cut at its cap, decompressed by us with
  a bounded output (a gzip bomb yields the cap, not gigabytes); the seed routes,
  which report only the status, read at most `DISCARD_BYTES` and then drop the
  connection instead of reading on.

Failures are raised as `RequestError` named in one vocabulary (httpx's names:
`ConnectError`, `ConnectTimeout`, `ReadTimeout`, `RemoteProtocolError`, ...), so the
API's `errors` do not depend on the library underneath.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from fanout.engine import RequestError

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

    from fanout.egress import IPNetwork
    from fanout.targets import TargetScope

TransportName = Literal["aiohttp"]
TRANSPORTS: tuple[str, ...] = get_args(TransportName)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024
DISCARD_BYTES = 64 * 1024  # what the seed routes read of a body before they drop the connection instead
ACCEPT_ENCODING = "gzip, deflate"  # what _Decoder can decode; nothing else is asked for
DECODING_ERROR = "DecodingError"


class Transport(Protocol):
    """What the seed routes need from a client: GET a URL, return the status (and any Retry-After)."""

    async def get_status(self, url: str) -> tuple[int, str | None]: ...

    async def aclose(self) -> None: ...


class LoopBound:
    """Holds clients by key, on one event loop: Lambda keeps one loop per container.

    A client's connections belong to the loop that opened them; should the loop
    ever change (tests, local tools), the next call opens new clients on it.
    """

    def __init__(self, *, max_connections: int, timeout_s: float, ssl_context: ssl.SSLContext | None = None):
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._clients: dict[Hashable, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_connections={self.max_connections}, timeout_s={self.timeout_s})"

    @property
    def client_if_open(self) -> Any:
        """The default client, or None before the first request (does not create one)."""
        return self._clients.get(None)

    def _bound_client(self, key: Hashable = None) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._clients, self._loop = {}, loop
            self._on_new_loop()
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self._open(key)
        return client

    def _on_new_loop(self) -> None:
        """Drop whatever else belongs to the previous loop."""

    def _open(self, key: Hashable) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        clients, self._clients, self._loop = self._clients, {}, None
        for client in clients.values():
            await self._close(client)

    async def _close(self, client: Any) -> None:
        await client.aclose()


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
        self._slots: asyncio.Semaphore | None = None
        self._host_slots: dict[tuple[str | None, int | None], asyncio.Semaphore] = {}

    async def get_status(self, url: str) -> tuple[int, str | None]:
        """GET `url`: the status and Retry-After (the seed routes' fast path: the body is not kept)."""
        session: aiohttp.ClientSession = self._bound_client(None)
        try:
            async with self._slot(None), session.get(url, allow_redirects=False) as response:
                await _discard(response)
                return response.status, response.headers.get("Retry-After")
        except Exception as exc:
            raise _request_error(exc) from exc

    async def send(
        self,
        method: str,
        url: URL,
        *,
        headers: dict[str, str],
        body: bytes | None,
        max_body_bytes: int,
        scope: TargetScope,
    ) -> UpstreamResponse:
        """One request, the whole of it within `timeout_s`; redirects followed by hand, each hop checked."""
        import aiohttp
        from yarl import URL

        from fanout.targets import REDIRECT_REFUSED, TOO_MANY_REDIRECTS

        headers = {"Accept-Encoding": ACCEPT_ENCODING, **headers}
        current = url
        ends: float | None = None  # the whole request, its redirects included, ends within timeout_s
        try:
            for hop in range(scope.max_redirects + 1):
                session: aiohttp.ClientSession = self._bound_client(self._networks(scope.networks_for(current.host)))
                async with self._slot(current):
                    ends = ends or time.monotonic() + self.timeout_s
                    timeout = aiohttp.ClientTimeout(total=max(ends - time.monotonic(), 0.001))
                    async with session.request(
                        method, current, headers=headers, data=body, allow_redirects=False, timeout=timeout
                    ) as response:
                        location = response.headers.get("Location")
                        if scope.max_redirects and response.status in REDIRECT_STATUSES and location:
                            if hop == scope.max_redirects:
                                raise RequestError(TOO_MANY_REDIRECTS, f"more than {scope.max_redirects} redirects")
                            try:
                                following = current.join(URL(location))
                            except ValueError as exc:
                                raise RequestError(REDIRECT_REFUSED, "the Location header is not a URL") from exc
                            refused = scope.check_redirect(following)
                            if refused is not None:
                                raise RequestError(REDIRECT_REFUSED, refused)
                            if following.origin() != current.origin():  # credentials stay with their origin
                                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                                method, body = "GET", None
                            await _discard(response)
                            current = following
                            continue
                        data, truncated, decoded = await _read_capped(response, max_body_bytes)
                        return UpstreamResponse(
                            status=response.status,
                            headers=_response_headers(response, decoded),
                            body=data,
                            truncated=truncated,
                        )
        except RequestError:
            raise
        except Exception as exc:
            raise _request_error(exc) from exc
        raise AssertionError("unreachable: the last hop returns or raises")  # pragma: no cover

    def _networks(self, networks: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
        from fanout.egress import EVERY_NETWORK

        return EVERY_NETWORK if self.allow_private else networks

    def _slot(self, url: URL | None) -> asyncio.Semaphore:
        """The slot a request holds while it runs: one of `max_connections`, or of its host's `max_per_host`."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        if url is None or not self.max_per_host:
            return self._slots
        key = (url.host, url.port)
        slot = self._host_slots.get(key)
        if slot is None:
            slot = self._host_slots[key] = asyncio.Semaphore(min(self.max_per_host, self.max_connections))
        return slot

    def _on_new_loop(self) -> None:
        self._slots, self._host_slots = None, {}

    def _open(self, key: Hashable) -> aiohttp.ClientSession:
        import aiohttp

        from fanout.egress import EgressPolicy, GuardedResolver, GuardedSocketFactory

        networks: tuple[IPNetwork, ...] = key if isinstance(key, tuple) else self._networks(())
        policy = EgressPolicy.from_env(allowed_networks=networks)
        connector = aiohttp.TCPConnector(
            limit=self.max_connections,
            limit_per_host=0,  # our slots bound each host, before the request's clock starts
            resolver=GuardedResolver(policy),
            socket_factory=GuardedSocketFactory(policy),
            ssl=self.ssl_context or True,
        )
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        # No cookie jar: the session is shared by every caller of this container, and a
        # cookie one upstream response sets must never ride along on another caller's request.
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,  # _read_capped decompresses, with its output bounded
        )

    async def _close(self, client: aiohttp.ClientSession) -> None:
        await client.close()


async def _discard(response: Any) -> None:
    """Read a body we do not keep, so the connection can be reused; past DISCARD_BYTES, drop it instead."""
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        size += len(chunk)
        if size > DISCARD_BYTES:
            response.close()
            return


class _Decoder:
    """Content-Encoding gzip or deflate, decoded with a bounded output per call."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32 if encoding == "gzip" else zlib.MAX_WBITS)
        self._started = False

    def decode(self, data: bytes, max_length: int) -> tuple[bytes, bytes]:
        """Up to `max_length` bytes of output, and the input not yet consumed."""
        try:
            out = self._inflate.decompress(data, max_length)
        except zlib.error:
            if self._started or self.encoding != "deflate":
                raise
            self._inflate = zlib.decompressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, as some servers send it
            out = self._inflate.decompress(data, max_length)
        self._started = True
        rest = self._inflate.unconsumed_tail
        if self._inflate.eof and self._inflate.unused_data and self.encoding == "gzip":
            rest, self._inflate = self._inflate.unused_data + rest, zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)
        return out, rest


async def _read_capped(response: Any, max_bytes: int) -> tuple[bytes, bool, bool]:
    """At most `max_bytes` of the (decoded) body as it streams in: body, cut, decoded.

    An endless body or a bomb is cut at the cap, never buffered: memory per request is
    the cap plus one chunk of input.
    """
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    decoder = _Decoder(encoding) if encoding in ("gzip", "deflate") else None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        pending = chunk
        while pending:
            room = max_bytes - size
            if decoder is None:
                out, pending = pending, b""
            else:
                try:
                    out, pending = decoder.decode(pending, room + 1)
                except zlib.error as exc:
                    raise RequestError(DECODING_ERROR, f"the {encoding} body does not decode: {exc}") from exc
            if len(out) > room:
                chunks.append(out[:room])
                response.close()  # the rest is never read: this connection cannot be reused
                return b"".join(chunks), True, decoder is not None
            chunks.append(out)
            size += len(out)
            if decoder is not None and not out:
                break  # the decoder holds what it took; more input comes with the next chunk
    return b"".join(chunks), False, decoder is not None


def _response_headers(response: Any, decoded: bool) -> dict[str, str]:
    """Header names in lower case, as text; once we decoded the body, its wire encoding and length no longer apply.

    aiohttp keeps bytes that are not UTF-8 as lone surrogates, which no encoder takes: they become U+FFFD.
    """
    headers = {_text(name).lower(): _text(value) for name, value in response.headers.items()}
    if decoded:
        headers.pop("content-encoding", None)
        headers.pop("content-length", None)
    return headers


def _text(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _request_error(exc: BaseException) -> RequestError:
    from fanout.egress import FORBIDDEN_ADDRESS, EgressRefused

    refused = next((e for e in _causes(exc) if isinstance(e, EgressRefused)), None)
    if refused is not None:
        return RequestError(FORBIDDEN_ADDRESS, refused.public_message, internal=str(refused))
    return RequestError(_aiohttp_error_kind(exc), str(exc))


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception, the OSError aiohttp wrapped in it, and its causes."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, BaseException):
            found.append(os_error)
        current = current.__cause__
    return found


def _aiohttp_error_kind(exc: BaseException) -> str:
    import aiohttp

    kinds: list[tuple[type[BaseException], str]] = [
        (aiohttp.ConnectionTimeoutError, "ConnectTimeout"),
        (aiohttp.SocketTimeoutError, "ReadTimeout"),
        (aiohttp.ServerDisconnectedError, "RemoteProtocolError"),
        (aiohttp.ClientConnectorError, "ConnectError"),
        (aiohttp.ClientPayloadError, "ReadError"),
        (aiohttp.ClientResponseError, "RemoteProtocolError"),
        (aiohttp.ClientOSError, "ReadError"),
        (aiohttp.InvalidURL, "InvalidURL"),
        (TimeoutError, "ReadTimeout"),  # the whole-request clock ran out after connecting
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
