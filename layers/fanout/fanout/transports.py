"""Transports: what carries the engine's requests to the upstream, chosen per function.

`FANOUT_TRANSPORT` picks one (benchmarks/ measured them; README, "Choosing the transport"):
- `pyreqwest` (the default): Rust's reqwest and hyper, behind a guard by pinning
  (fanout.transport_pyreqwest, fanout.pinning). Raw, about a third of aiohttp's
  client CPU per request; through the handler, about half;
- `aiohttp`: aiohttp behind a guard at its connector's socket factory
  (fanout.transport_aiohttp).

What both share lives here, so that they keep the same promises:

Clients live as long as the container, created lazily on first use inside the
running loop and reused by every warm invocation (a client per call throws away
its connections and TLS sessions; the FastAPI lifespan is the wrong home because
Mangum runs it on every invocation).

Bounds on each request, whatever the upstream does:
- time: `timeout_s` covers the whole request, connecting, the headers, the body and
  its redirects (a server sending its headers a byte a second is cut at `timeout_s`).
  It starts once a slot is free: the slots (`max_connections`, and `max_per_host`
  per host) are taken before the clock runs, so waiting for them is bounded by the
  caller's deadline, never a spurious timeout;
- memory: a body is read as a stream and cut at its cap, decompressed by us with
  a bounded output (a gzip bomb yields the cap, not gigabytes); a head over
  `MAX_HEAD_BYTES` is a `RemoteProtocolError` (each answer's headers are kept with
  it, and both clients take some 400 KB of them); the seed routes,
  which report only the status, read at most `DISCARD_BYTES` and then drop the
  connection instead of reading on;
- redirects: followed by hand, each hop checked against the target's scope and
  each connection against the egress guard.

Failures are raised as `RequestError` named in one vocabulary (httpx's names:
`ConnectError`, `ConnectTimeout`, `ReadTimeout`, `RemoteProtocolError`, ...), so the
API's `errors` do not depend on the library underneath.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Hashable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

from fanout.egress import EVERY_NETWORK, FORBIDDEN_ADDRESS, EgressPolicy, EgressRefused, IPNetwork, parse_address
from fanout.engine import RequestError
from fanout.targets import REDIRECT_REFUSED, TOO_MANY_REDIRECTS, TargetScope

if TYPE_CHECKING:
    from pyreqwest.http import Url  # what /batch and the jobs send; the seed routes send a string

TransportName = Literal["pyreqwest", "aiohttp"]
TRANSPORTS: tuple[str, ...] = get_args(TransportName)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024
DISCARD_BYTES = 64 * 1024  # what the seed routes read of a body before they drop the connection instead
ACCEPT_ENCODING = "gzip, deflate"  # what _Decoder can decode; nothing else is asked for
DECODING_ERROR = "DecodingError"
USER_AGENT = "fanout"  # what every request says it comes from, unless its caller set one
MAX_HEAD_BYTES = 64 * 1024  # a response's header names and values: far past any real head, far below 400 KB
#: A connect still pending at this share of a request's time is cut and named ConnectTimeout (the rest
#: could hardly carry a request and its answer); without it the whole-request clock would cut it first,
#: and a connect that never completes would read as a late answer (ReadTimeout).
CONNECT_SHARE = 0.9


class UpstreamResponse(NamedTuple):
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    truncated: bool  # the body was longer than the cap and was cut there


class Hop(NamedTuple):
    """One request of a `send`, as a transport makes it: a redirect's next hop is another."""

    method: str
    url: Url
    headers: dict[str, str]
    body: bytes | None
    timeout_s: float  # what is left of the whole request's time
    max_body_bytes: int
    networks: tuple[IPNetwork, ...]  # what its connection may reach beyond global addresses
    follow: bool  # a redirect answer will be followed: its body is discarded, not read


class Transport:
    """Clients by key on one event loop, the request slots, and the redirect loop both transports share.

    A subclass says how one hop is made (`_exchange`), how the seed routes' GET is made
    (`get_status`) and how a client is opened and closed. Lambda keeps one loop per
    container; should the loop ever change (tests, local tools), the next call opens
    new clients and slots on it, since connections belong to the loop that opened them.
    """

    def __init__(
        self, *, max_connections: int, timeout_s: float, max_per_host: int = 0, allow_private: bool = False
    ) -> None:
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.max_per_host = max_per_host
        self.allow_private = allow_private
        self._clients: dict[Hashable, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._host_slots: dict[tuple[str | None, int | None], asyncio.Semaphore] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_connections={self.max_connections}, timeout_s={self.timeout_s})"

    async def get_status(self, url: str) -> tuple[int, str | None]:
        """GET `url`: the status and Retry-After (the seed routes' fast path: the body is not kept)."""
        raise NotImplementedError

    async def send(
        self,
        method: str,
        url: Url,
        *,
        headers: dict[str, str],
        body: bytes | None,
        max_body_bytes: int,
        scope: TargetScope,
    ) -> UpstreamResponse:
        """One request, the whole of it within `timeout_s`; redirects followed by hand, each hop checked."""
        headers = {"Accept-Encoding": ACCEPT_ENCODING, **headers}
        current = url
        ends: float | None = None  # the whole request, its redirects included, ends within timeout_s
        for hop in range(scope.max_redirects + 1):
            async with self._slot(current):
                ends = ends or time.monotonic() + self.timeout_s
                response = await self._exchange(
                    Hop(
                        method,
                        current,
                        headers,
                        body,
                        timeout_s=max(ends - time.monotonic(), 0.001),
                        max_body_bytes=max_body_bytes,
                        networks=self._networks(scope.networks_for(current.host_str)),
                        follow=scope.max_redirects > 0,
                    )
                )
            location = response.headers.get("location")
            if not (scope.max_redirects and is_redirect(response.status, location)):
                return response
            if hop == scope.max_redirects:
                raise RequestError(TOO_MANY_REDIRECTS, f"more than {scope.max_redirects} redirects")
            try:
                following = current.join(location)
            except ValueError as exc:
                unparsable = RequestError(REDIRECT_REFUSED, "the Location header is not a URL")
                raise refusal_of_unparsable(location, self._networks(()), unparsable) from exc
            refused = scope.check_redirect(following)
            if refused is not None:
                raise RequestError(REDIRECT_REFUSED, refused)
            if following.origin_ascii != current.origin_ascii:  # credentials stay with their origin
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None
            current = following
        raise AssertionError("unreachable: the last hop returns or raises")  # pragma: no cover

    async def _exchange(self, hop: Hop) -> UpstreamResponse:
        """One hop; errors are raised as RequestError."""
        raise NotImplementedError

    def _networks(self, networks: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
        return EVERY_NETWORK if self.allow_private else networks

    def _slot(self, url: Url | None) -> asyncio.Semaphore:
        """The slot a request holds while it runs: one of `max_connections`, or of its host's `max_per_host`."""
        self._bound_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        if url is None or not self.max_per_host:
            return self._slots
        key = (url.host_str, url.port_or_known_default)
        slot = self._host_slots.get(key)
        if slot is None:
            slot = self._host_slots[key] = asyncio.Semaphore(min(self.max_per_host, self.max_connections))
        return slot

    @property
    def open_clients(self) -> tuple[Any, ...]:
        """The clients opened so far (none before the first request): warm invocations must reuse them."""
        return tuple(self._clients.values())

    def _bound_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._clients, self._loop = {}, loop
            self._slots, self._host_slots = None, {}
            self._on_new_loop()

    def _bound_client(self, key: Hashable = None) -> Any:
        self._bound_loop()
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
        await client.close()


def refusal_of_unparsable(url: str, networks: tuple[IPNetwork, ...], otherwise: RequestError) -> RequestError:
    """Why a URL the WHATWG parser will not take is refused: the guard's reason when its host reads as a
    refused address (`[::1%25]`, with a zone id, is one), so no spelling of a local address is reported
    as anything else; else `otherwise`. Read with yarl (RFC 3986), which takes such hosts."""
    from yarl import URL  # loaded only here, for a URL that cannot be sent

    try:
        parsed = URL(url, encoded=True)  # pragma: no mutate (encoded or not, the same host)
        host = parsed.host or ""  # pragma: no mutate (no host is no address, whatever stands for it)
        port = parsed.port or 0  # pragma: no mutate (http has a port); ValueError past 65535
    except ValueError:
        return otherwise
    if parse_address(host) is None:
        return otherwise  # a name, never looked up: refused as what cannot be parsed
    try:
        EgressPolicy.from_env(allowed_networks=networks).check(host, host, port)
    except EgressRefused as refused:
        return forbidden(refused)
    return otherwise


def is_redirect(status: int, location: str | None) -> bool:
    """An answer a `send` follows (where its target allows redirects at all): the one rule the redirect
    loop and each transport's choice to discard a body share."""
    return status in REDIRECT_STATUSES and bool(location)


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


async def read_capped(chunks: AsyncIterator[bytes], content_encoding: str, max_bytes: int) -> tuple[bytes, bool, bool]:
    """At most `max_bytes` of the (decoded) body as `chunks` stream in: body, cut, decoded.

    An endless body or a bomb is cut at the cap, never buffered: memory per request is
    the cap plus one chunk of input. When the body was cut, the caller drops the
    connection: the rest was never read.
    """
    encoding = content_encoding.strip().lower()
    decoder = _Decoder(encoding) if encoding in ("gzip", "deflate") else None
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
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
                parts.append(out[:room])
                return b"".join(parts), True, decoder is not None
            parts.append(out)
            size += len(out)
            if decoder is not None and not out:
                break  # the decoder holds what it took; more input comes with the next chunk
    return b"".join(parts), False, decoder is not None


def head_bytes(headers: dict[str, str]) -> int:
    """What a response's headers take, names and values: what MAX_HEAD_BYTES bounds."""
    return sum(len(name) + len(value) for name, value in headers.items())


def checked_head(headers: dict[str, str]) -> dict[str, str]:
    """The response's headers, if they fit MAX_HEAD_BYTES; else the request fails as the server's fault."""
    size = head_bytes(headers)
    if size > MAX_HEAD_BYTES:
        raise RequestError("RemoteProtocolError", f"the response's headers are {size} bytes; at most {MAX_HEAD_BYTES}")
    return headers


def decoded_headers(headers: dict[str, str], decoded: bool) -> dict[str, str]:
    """Once we decoded the body, its wire encoding and length no longer apply."""
    if decoded:
        headers.pop("content-encoding", None)
        headers.pop("content-length", None)
    return headers


def causes(exc: BaseException) -> list[BaseException]:
    """The exception, the OSError a library wrapped in it, and their causes."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, BaseException):
            found.append(os_error)
        current = current.__cause__
    return found


def refused_error(exc: BaseException) -> RequestError | None:
    """The ForbiddenAddress error if the egress guard refused anywhere inside `exc`, else None."""
    refused = next((e for e in causes(exc) if isinstance(e, EgressRefused)), None)
    return None if refused is None else forbidden(refused)


def forbidden(refused: EgressRefused) -> RequestError:
    """The guard's refusal as the API names it: the reason for the caller, the address for the logs."""
    return RequestError(FORBIDDEN_ADDRESS, refused.public_message, internal=str(refused))


def make_transport(
    name: str,
    *,
    max_connections: int,
    timeout_s: float,
    max_per_host: int = 0,
    allow_private: bool = False,
    extra_ca_pem: bytes | None = None,
) -> Transport:
    """The transport called `name` (one of TRANSPORTS), sized for one function.

    `extra_ca_pem` is one more certificate authority to trust (tests and local TLS upstreams).
    The module of the other transport is never imported: its import is cold-start time.
    """
    options = dict(
        max_connections=max_connections, timeout_s=timeout_s, max_per_host=max_per_host, allow_private=allow_private
    )
    if name == "pyreqwest":
        from fanout.transport_pyreqwest import PyreqwestTransport

        return PyreqwestTransport(**options, extra_ca_pem=extra_ca_pem)
    if name == "aiohttp":
        from fanout.transport_aiohttp import AiohttpTransport

        return AiohttpTransport(**options, extra_ca_pem=extra_ca_pem)
    raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORTS)}")
