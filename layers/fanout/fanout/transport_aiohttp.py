"""aiohttp behind the egress guard, checked at the socket it connects.

The decision is made on the exact address the kernel is about to be handed,
after every parse and every lookup:

- `GuardedSocketFactory` is aiohttp's `socket_factory`. The connector calls it with
  the sockaddr it will connect to, for names and IP literals alike (aiohttp never
  resolves a literal, and takes any host with a ":" for one). This is the check
  that cannot be walked around: the role of `net.Dialer.Control` in daenney/ssrf.
- `GuardedResolver` refuses a name if any of its addresses is refused, so a DNS
  answer mixing a public and an inside address never gets the chance to fall back
  to the inside one, and its error names the name.

One session per egress policy: the public one, and one per private target
(fanout.targets), so that a pooled connection opened to a private address is never
handed to a request that may not reach it.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Hashable
from typing import Any

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from fanout.egress import EgressPolicy, IPNetwork
from fanout.engine import RequestError
from fanout.transports import (
    CHUNK_BYTES,
    CONNECT_SHARE,
    DISCARD_BYTES,
    USER_AGENT,
    Hop,
    Transport,
    UpstreamResponse,
    checked_head,
    decoded_headers,
    is_redirect,
    read_capped,
    refused_error,
)


class GuardedSocketFactory:
    """aiohttp's `socket_factory`: a socket only for an address the policy allows."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    def __call__(self, addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        host, port = str(sockaddr[0]), int(sockaddr[1])
        self.policy.check(host, host, port)
        return socket.socket(family=family, type=kind, proto=proto)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name if any address it resolves to is refused."""

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or ThreadedResolver()

    async def resolve(
        self,
        host: str,
        port: int = 0,  # pragma: no mutate (aiohttp always passes the port)
        family: socket.AddressFamily = socket.AF_INET,
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            self.policy.check(host, result["host"], port)
        return results

    async def close(self) -> None:
        await self.inner.close()


class AiohttpTransport(Transport):
    """aiohttp `ClientSession`s, one per egress policy; every connection's address is checked."""

    def __init__(self, *, extra_ca_pem: bytes | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.ssl_context: ssl.SSLContext | None = None
        if extra_ca_pem is not None:
            self.ssl_context = ssl.create_default_context(cadata=extra_ca_pem.decode("ascii"))

    async def get_status(self, url: str) -> tuple[int, str | None]:
        session: aiohttp.ClientSession = self._bound_client(None)
        try:
            async with self._slot(None), session.get(url, allow_redirects=False) as response:
                await _discard(response)
                return response.status, response.headers.get("Retry-After")
        except Exception as exc:
            raise _request_error(exc) from exc

    async def _exchange(self, hop: Hop) -> UpstreamResponse:
        session: aiohttp.ClientSession = self._bound_client(hop.networks)
        timeout = aiohttp.ClientTimeout(total=hop.timeout_s, sock_connect=hop.timeout_s * CONNECT_SHARE)
        url = URL(str(hop.url), encoded=True)  # WHATWG's serialization, read as it is written
        try:
            async with session.request(
                hop.method, url, headers=hop.headers, data=hop.body, allow_redirects=False, timeout=timeout
            ) as response:
                headers = checked_head(_response_headers(response))
                if hop.follow and is_redirect(response.status, headers.get("location")):
                    await _discard(response)
                    return UpstreamResponse(response.status, headers, b"", False)
                data, truncated, decoded = await read_capped(
                    _chunks(response), headers.get("content-encoding", ""), hop.max_body_bytes
                )
                if truncated:
                    response.close()  # the rest is never read: this connection cannot be reused
                return UpstreamResponse(
                    status=response.status, headers=decoded_headers(headers, decoded), body=data, truncated=truncated
                )
        except RequestError:
            raise
        except Exception as exc:
            raise _request_error(exc) from exc

    def _open(self, key: Hashable) -> aiohttp.ClientSession:
        networks: tuple[IPNetwork, ...] = key if isinstance(key, tuple) else self._networks(())
        policy = EgressPolicy.from_env(allowed_networks=networks)
        connector = aiohttp.TCPConnector(
            limit=self.max_connections,
            limit_per_host=0,  # our slots bound each host, before the request's clock starts
            resolver=GuardedResolver(policy),
            socket_factory=GuardedSocketFactory(policy),
            ssl=self.ssl_context or True,
        )
        # No cookie jar: the session is shared by every caller of this container, and a
        # cookie one upstream response sets must never ride along on another caller's request.
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.timeout_s * CONNECT_SHARE),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,  # read_capped decompresses, with its output bounded
            headers={"User-Agent": USER_AGENT},
        )


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        yield chunk


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Read a body we do not keep, so the connection can be reused; past DISCARD_BYTES, drop it instead."""
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        size += len(chunk)
        if size > DISCARD_BYTES:
            response.close()
            return


def _response_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    """Header names in lower case, as text.

    aiohttp keeps bytes that are not UTF-8 as lone surrogates, which no encoder takes: they become U+FFFD.
    """
    return {_text(name).lower(): _text(value) for name, value in response.headers.items()}


def _text(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _request_error(exc: BaseException) -> RequestError:
    return refused_error(exc) or RequestError(_error_kind(exc), str(exc))


def _error_kind(exc: BaseException) -> str:
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
