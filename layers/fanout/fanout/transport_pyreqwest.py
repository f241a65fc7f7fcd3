"""pyreqwest (Rust's reqwest and hyper) behind the egress guard, by pinning.

reqwest connects in Rust, where no Python hook can see the socket. So nothing it
connects to is left to it: before a request goes out, the URL is read as reqwest
will read it (fanout.pinning.destination: reqwest is then handed that reading) and
- a literal address is checked against the request's policy as it stands;
- a name is looked up by us and every address of the answer is checked; the request
  then goes through that name's own client, built with the name pinned to the
  checked address (reqwest's `resolve`), so reqwest never asks DNS. When a later
  lookup gives another first address, or the pinned one fails to connect (it goes
  last), the name gets a new client.
Nothing else can make reqwest connect: no proxies (its environment proxies are
cleared), no redirects of its own, no cookies. The checks are cached per address,
port and policy: they cost a dict lookup per request.

reqwest's own decompression is off: bodies are decoded by `read_capped`, bounded.

A body we do not keep (the seed routes', a redirect's) is never read here: pyreqwest's
streamed response has already read up to its buffer limit (DISCARD_BYTES) before it is
returned, so a short body is whole and its connection back in the pool; a longer one is
dropped with its connection when the response closes. Reading it here cost two more
awaits a request (some 7 % of the client's CPU).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import (
    BodyDecodeError,
    ConnectError,
    ConnectTimeoutError,
    PyreqwestError,
    ReadError,
    RequestTimeoutError,
    WriteError,
)
from pyreqwest.http import Url

from fanout.egress import EgressPolicy, EgressRefused, IPNetwork, Reason
from fanout.engine import RequestError
from fanout.pinning import Destination, Pins, destination, parsed_destination
from fanout.transports import (
    CHUNK_BYTES,
    CONNECT_SHARE,
    USER_AGENT,
    Hop,
    Transport,
    UpstreamResponse,
    checked_head,
    decoded_headers,
    is_redirect,
    read_capped,
    refusal_of_unparsable,
    refused_error,
)

#: In reqwest's chain of causes when the connect itself failed or timed out.
CONNECTING = "client error (Connect)"
#: ... when the server closed the connection without (a whole) answer: aiohttp's ServerDisconnectedError.
CLOSED_EARLY = "connection closed before message completed"
#: Errors that sent nothing, the address itself failing: the name's next address is tried next time.
NOT_CONNECTED = frozenset({"ConnectError", "ConnectTimeout"})


class PyreqwestTransport(Transport):
    """One pyreqwest client per pinned name, and one for literal addresses."""

    def __init__(self, *, extra_ca_pem: bytes | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.extra_ca_pem = extra_ca_pem
        self._pins = Pins()
        self._pinned: dict[str, str] = {}  # name -> the address its client is pinned to
        self._retired: list[tuple[float, Client]] = []  # (when, client) of names whose address changed
        # Verdicts by address, port and the policy's networks, held by identity: hashing a tuple of
        # ip_network objects costs more than the rest of the check. The entry keeps its networks
        # alive, so their id is never reused while the entry exists.
        self._verdicts: dict[tuple[str, int, int], tuple[tuple[IPNetwork, ...], Reason | None]] = {}
        self._public_networks = self._networks(())  # what the seed routes' requests may reach

    async def get_status(self, url: str) -> tuple[int, str | None]:
        async with self._slot(None):
            client = None
            try:
                networks = self._public_networks
                where = _destination_of(url, networks)
                client = self._ready_client(where, networks) or await self._client_for(where, networks)
                async with client.get(where.url).build_streamed() as response:
                    return response.status, _retry_after(response)  # its body: see the module's docstring
            except RequestError:
                raise
            except Exception as exc:
                raise self._failed(client, exc) from exc

    async def _exchange(self, hop: Hop) -> UpstreamResponse:
        client = None
        try:
            where = _destination_of(hop.url, hop.networks)
            client = self._ready_client(where, hop.networks) or await self._client_for(where, hop.networks)
            request = client.request(hop.method, where.url).headers(hop.headers)
            request = request.timeout(timedelta(seconds=hop.timeout_s))
            if hop.body is not None:
                request = request.body_bytes(hop.body)
            async with request.build_streamed() as response:
                answer = checked_head(_response_headers(response))
                location = answer.get("location")  # equivalent: 'location' -> 'XX..XX' (its body read, not discarded)
                if hop.follow and is_redirect(response.status, location):
                    return UpstreamResponse(response.status, answer, b"", False)  # pragma: no mutate (followed)
                encoding = answer.get("content-encoding", "")  # equivalent: '' -> 'XX..XX' (not decoded either)
                data, truncated, decoded = await read_capped(_chunks(response), encoding, hop.max_body_bytes)
                return UpstreamResponse(response.status, decoded_headers(answer, decoded), data, truncated)
        except RequestError:
            raise
        except Exception as exc:
            raise self._failed(client, exc) from exc

    def _failed(self, client: Client | None, exc: BaseException) -> RequestError:
        """The error in our vocabulary; a pinned address that failed to connect goes last, so the name's next
        request gets a client pinned to its next address (this one's retry, for /batch and the jobs)."""
        error = _request_error(exc)
        if error.kind in NOT_CONNECTED and client is not None:
            for name, pinned in self._clients.items():
                if pinned is client and name is not None:  # the name this client is still the current one of
                    self._pins.demote(name, self._pinned[name])
        return error

    def _ready_client(self, where: Destination, networks: tuple[IPNetwork, ...]) -> Client | None:
        """The fast path of `_client_for`, without a coroutine: None when a name's answer must be looked up.
        Called with a slot held, so on the loop the clients belong to."""
        if where.address is not None:
            self._check(where.host, where.address, where.port, networks)
            # the key None: the one client of literal addresses, with no pins
            return self._clients.get(None) or self._bound_client()
        pin = self._pins.current(where.host)
        if pin is None or self._pinned.get(where.host) != pin.address:  # pragma: no mutate (slow path: same)
            return None  # pragma: no mutate (_client_for gives the same client, a coroutine later)
        for address in pin.addresses:
            self._check(where.host, address, where.port, networks)
        return self._clients[where.host]  # pragma: no mutate (None: _client_for gives this client)

    async def _client_for(self, where: Destination, networks: tuple[IPNetwork, ...]) -> Client:
        """The client to send to `where` (a name: a literal never gets here), once where it would connect
        is allowed; else EgressRefused."""
        pin = await self._pins.get(where.host)
        for address in pin.addresses:
            self._check(where.host, address, where.port, networks)
        client = self._clients.get(where.host)
        if client is None or self._pinned.get(where.host) != pin.address:
            replaced, client = client, self._build((where.host, pin.address))
            # in place before the await below, so a request arriving meanwhile takes it, not a second one
            self._clients[where.host], self._pinned[where.host] = client, pin.address
            if replaced is not None:
                await self._retire(replaced)
        return client

    async def _retire(self, client: Client) -> None:
        """Put a replaced client aside, and close those replaced over `timeout_s` ago: no request of
        theirs can still be running, since every request ends within `timeout_s`."""
        now = time.monotonic()
        kept = []
        for when, old in self._retired:
            if when < now - self.timeout_s:  # equivalent: Lt -> LtE (replaced exactly timeout_s ago)
                await old.close()
            else:
                kept.append((when, old))
        self._retired = [*kept, (now, client)]

    def _check(self, host: str, address: str, port: int, networks: tuple[IPNetwork, ...]) -> None:
        key = (address, port, id(networks))
        verdict = self._verdicts.get(key)
        if verdict is None or verdict[0] is not networks:  # pragma: no mutate (a cache: the same verdict again)
            policy = EgressPolicy.from_env(allowed_networks=networks)
            verdict = self._verdicts[key] = (networks, policy.refusal(address, port))
        reason = verdict[1]
        if reason is not None:
            raise EgressRefused(reason, host, address, port)

    def _open(self, key: Any) -> Client:
        return self._build(None)

    def _build(self, pin: tuple[str, str] | None) -> Client:
        """A client that connects a name to its pinned address only; with no pin, one for literals."""
        builder = (
            ClientBuilder()
            .no_proxy()
            .follow_redirects(False)
            .gzip(False)
            .deflate(False)
            .brotli(False)
            .zstd(False)
            .referer(False)  # pragma: no mutate (reqwest sets Referer only on redirects it follows: none)
            .max_connections(self.max_connections)
            .timeout(timedelta(seconds=self.timeout_s))
            .connect_timeout(timedelta(seconds=self.timeout_s * CONNECT_SHARE))
            .user_agent(USER_AGENT)
        )
        if pin is not None:
            builder = builder.resolve(*pin, 0)  # pragma: no mutate (reqwest takes the URL's port, not this)
        if self.extra_ca_pem is not None:
            builder = builder.add_root_certificate_pem(self.extra_ca_pem)
        return builder.build()

    def _on_new_loop(self) -> None:
        self._pins, self._pinned, self._retired = Pins(), {}, []

    @property
    def retired_clients(self) -> int:
        """Replaced clients not closed yet (they close `timeout_s` after they were replaced)."""
        return len(self._retired)

    async def aclose(self) -> None:
        retired, self._retired = self._retired, []
        for _, client in retired:
            await client.close()
        await super().aclose()


async def _chunks(response: Any) -> AsyncIterator[bytes]:
    reader = response.body_reader
    while (chunk := await reader.read(CHUNK_BYTES)) is not None:
        yield bytes(chunk)


def _response_headers(response: Any) -> dict[str, str]:
    """Header names in lower case, as text. pyreqwest gives no bytes of a value that is not UTF-8, so
    such a value reads as one U+FFFD (aiohttp's transport keeps its valid bytes and replaces the rest)."""
    headers = response.headers
    try:
        return {name.lower(): value for name, value in headers.items()}
    except ValueError:
        return {name.lower(): _last_value(headers, name) for name in dict.fromkeys(headers.keys())}


def _last_value(headers: Any, name: str) -> str:
    try:
        return str(headers.getall(name)[-1])
    except ValueError:
        return "\ufffd"


def _destination_of(url: str | Url, networks: tuple[IPNetwork, ...]) -> Destination:
    """Where the client would connect for `url` (text, or a hop's URL already parsed). A URL reqwest would
    not even parse is refused; as ForbiddenAddress when its host spells an address the policy refuses."""
    try:
        return destination(url) if isinstance(url, str) else parsed_destination(url)
    except ValueError as exc:
        unsendable = RequestError("InvalidURL", f"the client cannot send to {url}")
        raise refusal_of_unparsable(str(url), networks, unsendable) from exc


def _retry_after(response: Any) -> str | None:
    try:
        return response.get_header("retry-after")
    except ValueError:  # not UTF-8, so not a number of seconds or a date either
        return None


def _request_error(exc: BaseException) -> RequestError:
    return refused_error(exc) or RequestError(_error_kind(exc), _message(exc))


def _error_kind(exc: BaseException) -> str:
    """Our name for what went wrong. reqwest calls anything before the headers a connection error; only
    a chain with CONNECTING really failed to connect."""
    connected = CONNECTING not in _causes(exc)
    if isinstance(exc, ConnectTimeoutError) and connected:
        return "ReadTimeout"
    if isinstance(exc, ConnectError) and connected:
        return "RemoteProtocolError" if CLOSED_EARLY in _causes(exc) else "ReadError"
    kinds: list[tuple[type[BaseException], str]] = [
        (BodyDecodeError, "ReadError"),  # the body broke off: reqwest reports it as undecodable
        (ConnectTimeoutError, "ConnectTimeout"),
        (RequestTimeoutError, "ReadTimeout"),
        (ConnectError, "ConnectError"),
        (ReadError, "ReadError"),
        (WriteError, "WriteError"),
        (PyreqwestError, "RemoteProtocolError"),  # hyper's parse errors and early closes
    ]
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), type(exc).__name__)


def _causes(exc: BaseException) -> list[str]:
    """reqwest's chain of causes, outermost first: ['error sending request ...', 'client error (Connect)', ...]."""
    causes = (getattr(exc, "details", None) or {}).get("causes") or []
    return [str(cause.get("message", "")) for cause in causes]  # pragma: no mutate (a cause has one)


def _message(exc: BaseException) -> str:
    """reqwest's message and its innermost cause: 'connection error: Connection refused (os error 111)'."""
    found = _causes(exc)
    message = getattr(exc, "message", None) or str(exc)
    return f"{message}: {found[-1]}" if found else message
