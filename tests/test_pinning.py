"""The pyreqwest transport's guard by pinning, live against listeners on loopback addresses.

reqwest connects in Rust, so the egress tests can only intercept where it is told to go.
These show that it really goes there: a name pinned to 127.0.0.2 is connected at
127.0.0.2 although the system resolver says 127.0.0.1 for it; a changed answer is
followed after the TTL with a new client; an answer that changes to a refused address
(DNS rebinding) is refused before anything is sent. Also: the host is read as reqwest
reads it (property-based, against ipaddress), and TLS is verified against the roots given.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from pyreqwest.http import Url

from conftest import run
from fanout.engine import RequestError
from fanout.pinning import Pin, Pins, destination
from fanout.targets import TargetScope
from fanout.transport_pyreqwest import PyreqwestTransport
from fanout.transports import TRANSPORTS, make_transport
from fanout_local.upstream import LocalUpstream, running_in_thread
from pinning_stand_ins import stub_lookup


class Listeners:
    """HTTP listeners at one port on several loopback addresses, counting connections per address."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self.connections = dict.fromkeys(hosts, 0)
        self.port = 0
        self._servers: list[asyncio.Server] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        for host in self.hosts:
            self._servers.append(await asyncio.start_server(self._answer(host), host, self.port))
            self.port = self._servers[0].sockets[0].getsockname()[1]

    def _answer(self, host: str) -> Any:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections[host] += 1
            self._writers.append(writer)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
            writer.close()

        return serve

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for writer in self._writers:
            writer.close()
        for server in self._servers:
            await server.wait_closed()


async def with_listeners(hosts: list[str], body: Any) -> Any:
    listeners = Listeners(hosts)
    await listeners.start()
    try:
        return await body(listeners)
    finally:
        await listeners.stop()


def transport(*, allow_private: bool = True) -> PyreqwestTransport:
    made = make_transport("pyreqwest", max_connections=4, timeout_s=2, allow_private=allow_private)
    assert isinstance(made, PyreqwestTransport)
    return made


def test_a_name_goes_where_it_is_pinned_not_where_dns_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup({"localhost": ["127.0.0.2"]}))

    async def call(listeners: Listeners) -> tuple[int, dict[str, int]]:
        client = transport()
        try:
            status, _ = await client.get_status(f"http://localhost:{listeners.port}/")
        finally:
            await client.aclose()
        return status, listeners.connections

    assert run(with_listeners(["127.0.0.2", "127.0.0.1"], call)) == (200, {"127.0.0.2": 1, "127.0.0.1": 0})


def test_without_the_pin_dns_would_have_sent_it_elsewhere() -> None:
    """The control: the system resolver answers 127.0.0.1 for localhost, so the test above shows the pin."""

    async def call(listeners: Listeners) -> dict[str, int]:
        client = transport()
        try:
            await client.get_status(f"http://localhost:{listeners.port}/")
        finally:
            await client.aclose()
        return listeners.connections

    assert run(with_listeners(["127.0.0.2", "127.0.0.1"], call)) == {"127.0.0.2": 0, "127.0.0.1": 1}


def test_many_requests_to_a_cold_name_share_one_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup({"upstream.test": ["127.0.0.1"]}, calls))

    async def call(listeners: Listeners) -> list[int]:
        client = transport()
        try:
            answers = await asyncio.gather(
                *(client.get_status(f"http://upstream.test:{listeners.port}/") for _ in range(40))
            )
        finally:
            await client.aclose()
        return [status for status, _ in answers]

    assert run(with_listeners(["127.0.0.1"], call)) == [200] * 40
    assert calls == ["upstream.test"]


def test_a_changed_answer_is_followed_after_the_ttl_with_a_new_client(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"upstream.test": ["127.0.0.2"]}
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup(answers))
    monkeypatch.setattr("fanout.pinning.PIN_TTL_S", 0.0)  # every request looks the name up again

    async def call(listeners: Listeners) -> tuple[dict[str, int], int, int]:
        client = transport()
        try:
            url = f"http://upstream.test:{listeners.port}/"
            await client.get_status(url)
            await client.get_status(url)  # same answer: same client, same connection
            first = client.open_clients
            answers["upstream.test"] = ["127.0.0.3"]
            await client.get_status(url)
            return dict(listeners.connections), len(first), len(client.open_clients)
        finally:
            await client.aclose()

    connections, before, after = run(with_listeners(["127.0.0.2", "127.0.0.3"], call))
    assert connections == {"127.0.0.2": 1, "127.0.0.3": 1}
    assert (before, after) == (1, 1)  # the name's client was replaced, not added to


def test_a_round_robin_answer_keeps_the_pinned_address_and_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"upstream.test": ["127.0.0.2", "127.0.0.3"]}
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup(answers))
    monkeypatch.setattr("fanout.pinning.PIN_TTL_S", 0.0)

    async def call(listeners: Listeners) -> tuple[dict[str, int], int]:
        client = transport()
        try:
            url = f"http://upstream.test:{listeners.port}/"
            await client.get_status(url)
            answers["upstream.test"] = ["127.0.0.3", "127.0.0.2"]  # the next DNS answer, rotated
            await client.get_status(url)
            return dict(listeners.connections), client.retired_clients
        finally:
            await client.aclose()

    assert run(with_listeners(["127.0.0.2", "127.0.0.3"], call)) == ({"127.0.0.2": 1, "127.0.0.3": 0}, 0)


def test_a_replaced_client_is_closed_once_its_requests_have_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"upstream.test": ["127.0.0.2"]}
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup(answers))
    monkeypatch.setattr("fanout.pinning.PIN_TTL_S", 0.0)

    async def call(listeners: Listeners) -> list[int]:
        client = make_transport("pyreqwest", max_connections=4, timeout_s=0.2, allow_private=True)
        assert isinstance(client, PyreqwestTransport)
        url = f"http://upstream.test:{listeners.port}/"
        kept = []
        try:
            for address in ["127.0.0.3", "127.0.0.2"]:  # each next request gets a new client
                await client.get_status(url)
                kept.append(client.retired_clients)
                answers["upstream.test"] = [address]
            await client.get_status(url)
            kept.append(client.retired_clients)
            await asyncio.sleep(0.25)  # past timeout_s: no request of a replaced client can be running
            answers["upstream.test"] = ["127.0.0.3"]
            await client.get_status(url)
            kept.append(client.retired_clients)
        finally:
            await client.aclose()
        return kept

    # two replaced before the pause and kept (their requests might run); the third replacement closes them
    assert run(with_listeners(["127.0.0.2", "127.0.0.3"], call)) == [0, 1, 2, 1]


def test_requests_that_see_a_changed_answer_together_build_one_new_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first of them puts the old client aside (closing older ones may wait) while the others arrive:
    they take its new client rather than build their own."""
    answers = {"upstream.test": ["127.0.0.2"]}
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup(answers))
    monkeypatch.setattr("fanout.pinning.PIN_TTL_S", 0.0)
    retire = PyreqwestTransport._retire

    async def slow_retire(self: PyreqwestTransport, client: Any) -> None:
        await asyncio.sleep(0.01)  # as a close of an older client may take
        await retire(self, client)

    monkeypatch.setattr(PyreqwestTransport, "_retire", slow_retire)

    async def call(listeners: Listeners) -> tuple[list[int], int, int]:
        client = transport()
        url = f"http://upstream.test:{listeners.port}/"
        try:
            await client.get_status(url)
            answers["upstream.test"] = ["127.0.0.3"]
            statuses = [status for status, _ in await asyncio.gather(*(client.get_status(url) for _ in range(4)))]
            return statuses, len(client.open_clients), client.retired_clients
        finally:
            await client.aclose()

    assert run(with_listeners(["127.0.0.2", "127.0.0.3"], call)) == ([200] * 4, 1, 1)


def test_an_answer_that_turns_inside_is_refused_before_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name first resolves where its target may go, then to the runtime's own host."""
    answers = {"upstream.test": ["127.0.0.2"]}
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup(answers))
    monkeypatch.setattr("fanout.pinning.PIN_TTL_S", 0.0)
    scope = TargetScope(
        name="t",
        host="upstream.test",
        ports=frozenset(),  # no redirects (max_redirects=0)
        redirect_hosts=frozenset(),
        schemes=frozenset({"http"}),
        max_redirects=0,
        private_networks=(ipaddress.ip_network("127.0.0.2/32"),),
    )

    async def call(listeners: Listeners) -> tuple[int, str, dict[str, int]]:
        client = transport(allow_private=False)
        url = Url(f"http://upstream.test:{listeners.port}/")
        try:
            first = await client.send("GET", url, headers={}, body=None, max_body_bytes=10, scope=scope)
            answers["upstream.test"] = ["127.0.0.1"]
            with pytest.raises(RequestError) as refused:
                await client.send("GET", url, headers={}, body=None, max_body_bytes=10, scope=scope)
            return first.status, refused.value.detail, dict(listeners.connections)
        finally:
            await client.aclose()

    status, detail, connections = run(with_listeners(["127.0.0.2", "127.0.0.1"], call))
    assert status == 200
    assert detail == "refused (loopback): the destination is a loopback address"
    assert connections == {"127.0.0.2": 1, "127.0.0.1": 0}


async def statuses(request: Callable[[], Awaitable[int]], times: int) -> list[str]:
    """What each of `times` requests in a row came to: its status, or its error's kind."""
    found = []
    for _ in range(times):
        try:
            found.append(str(await request()))
        except RequestError as error:
            found.append(error.kind)
    return found


def test_an_address_that_refuses_is_passed_over_for_the_names_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name pinned to one address of several: when it refuses (a dead node still in DNS, IPv6 where the
    network routes none), the next request goes to the next address, as a client left to connect by itself
    would. Before, every request went to the dead address for as long as DNS kept it."""
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup({"upstream.test": ["127.0.0.3", "127.0.0.1"]}))

    async def call(listeners: Listeners) -> tuple[list[str], dict[str, int]]:
        client = transport()

        async def get() -> int:
            return (await client.get_status(f"http://upstream.test:{listeners.port}/"))[0]

        try:
            return await statuses(get, 3), listeners.connections
        finally:
            await client.aclose()

    assert run(with_listeners(["127.0.0.1"], call)) == (["ConnectError", "200", "200"], {"127.0.0.1": 1})


def test_an_address_whose_connect_never_completes_is_passed_over_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup({"upstream.test": ["127.0.0.3", "127.0.0.1"]}))

    async def call(listeners: Listeners) -> list[str]:
        with contextlib.ExitStack() as stack:
            listener = stack.enter_context(socket.socket())
            listener.bind(("127.0.0.3", listeners.port))
            listener.listen(0)
            for _ in range(3):  # its queue full: a connect to it never completes
                pending = stack.enter_context(socket.socket())
                pending.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    pending.connect(("127.0.0.3", listeners.port))
            client = make_transport("pyreqwest", max_connections=4, timeout_s=0.3, allow_private=True)

            async def get() -> int:
                return (await client.get_status(f"http://upstream.test:{listeners.port}/"))[0]

            try:
                return await statuses(get, 2)
            finally:
                await client.aclose()

    assert run(with_listeners(["127.0.0.1"], call)) == ["ConnectTimeout", "200"]


def test_a_batch_item_whose_first_address_refuses_is_answered_on_its_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup({"upstream.test": ["127.0.0.3", "127.0.0.1"]}))
    scope = TargetScope(
        name="t",
        host="upstream.test",
        ports=frozenset(),
        redirect_hosts=frozenset(),
        schemes=frozenset({"http"}),
        max_redirects=0,
        private_networks=(ipaddress.ip_network("127.0.0.0/8"),),
    )

    async def call(listeners: Listeners) -> list[str]:
        client = transport(allow_private=False)
        url = Url(f"http://upstream.test:{listeners.port}/")

        async def send() -> int:
            return (await client.send("GET", url, headers={}, body=None, max_body_bytes=10, scope=scope)).status

        try:
            return await statuses(send, 2)  # the runner's attempts, as /batch and the jobs make them
        finally:
            await client.aclose()

    assert run(with_listeners(["127.0.0.1"], call)) == ["ConnectError", "200"]


def test_a_demoted_address_goes_last_and_only_while_it_is_the_one_pinned() -> None:
    pins = Pins()
    pins._pins["a.test"] = Pin(("10.0.0.1", "10.0.0.2", "10.0.0.3"), expires=float("inf"))
    pins.demote("a.test", "10.0.0.1")
    assert pins._pins["a.test"].addresses == ("10.0.0.2", "10.0.0.3", "10.0.0.1")
    pins.demote("a.test", "10.0.0.1")  # a second request that failed on it: already passed over
    assert pins._pins["a.test"].addresses == ("10.0.0.2", "10.0.0.3", "10.0.0.1")
    pins.demote("b.test", "10.0.0.9")  # no answer for the name: nothing to do
    assert "b.test" not in pins._pins


def test_a_name_that_does_not_resolve_is_a_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup({}))
    client = transport()
    with pytest.raises(RequestError) as error:
        run(client.get_status("http://nowhere.test/"))
    assert error.value.kind == "ConnectError"
    assert error.value.detail.startswith("cannot resolve nowhere.test: ")
    assert client.open_clients == ()


# --- Pins alone ---------------------------------------------------------------------------------------


def test_an_answer_is_kept_for_its_ttl_then_looked_up_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup({"a.test": ["192.0.2.1"]}, calls))

    async def twice(pins: Pins) -> tuple[Pin, Pin]:
        return await pins.get("a.test"), await pins.get("a.test")

    first, second = run(twice(Pins(ttl_s=60)))
    assert (first.addresses, second is first, calls) == (("192.0.2.1",), True, ["a.test"])
    run(twice(Pins(ttl_s=0)))
    assert calls == ["a.test"] * 3


def test_a_new_answer_keeps_the_pinned_address_first_and_every_other_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = {"a.test": ["192.0.2.1"]}
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup(answers))
    pins = Pins(ttl_s=0)
    assert run(pins.get("a.test")).addresses == ("192.0.2.1",)
    answers["a.test"] = ["192.0.2.7", "192.0.2.1", "192.0.2.9"]
    assert run(pins.get("a.test")).addresses == ("192.0.2.1", "192.0.2.7", "192.0.2.9")
    answers["a.test"] = ["192.0.2.9", "192.0.2.7"]  # the pinned one is gone: the answer's own order
    assert run(pins.get("a.test")).addresses == ("192.0.2.9", "192.0.2.7")


def test_an_empty_answer_is_a_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup({"empty.test": []}))
    with pytest.raises(RequestError) as error:
        run(Pins().get("empty.test"))
    assert (error.value.kind, error.value.detail) == ("ConnectError", "empty.test resolves to no address")


# --- the host as reqwest reads it -------------------------------------------------------------------

IPV4 = st.integers(min_value=0, max_value=2**32 - 1)


def spellings(number: int) -> list[str]:
    """Ways WHATWG URL parsing (reqwest's) spells one IPv4 address."""
    a, b, c, d = ipaddress.IPv4Address(number).packed
    return [
        f"{a}.{b}.{c}.{d}",
        str(number),
        hex(number),
        f"0{number:o}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        f"{hex(a)}.{hex(b)}.{c}.{d}",
    ]


@given(IPV4, st.sampled_from(range(7)), st.sampled_from(["http", "https"]))
def test_every_spelling_of_an_ipv4_address_is_checked_as_that_address(number: int, form: int, scheme: str) -> None:
    host = spellings(number)[form]
    where = destination(f"{scheme}://{host}/path")
    assert where.address == str(ipaddress.IPv4Address(number))
    assert where.port == (443 if scheme == "https" else 80)


@given(st.ip_addresses(v=6), st.integers(min_value=1, max_value=65535))
def test_an_ipv6_literal_is_checked_as_that_address(address: ipaddress.IPv6Address, port: int) -> None:
    where = destination(f"http://[{address.exploded.upper()}]:{port}/")
    assert (ipaddress.ip_address(where.address or ""), where.port) == (address, port)


@given(st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}\.?", fullmatch=True))
def test_a_name_is_a_name_in_lower_case(name: str) -> None:
    where = destination(f"http://{name.upper()}/")
    assert (where.host, where.address) == (name, None)


@pytest.mark.parametrize(
    "url",
    ["http://[::1%25lo]/", "http://a b/", "http://[::1/", "http://host:99999/", "gopher://host/", "mailto:x@host"],
)
def test_what_reqwest_would_not_parse_or_connect_to_is_refused_as_such(url: str) -> None:
    with pytest.raises(ValueError):
        destination(url)


# --- TLS: verified against the roots given, for both transports ---------------------------------------


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_upstream(authority: trustme.CA) -> Iterator[LocalUpstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    with running_in_thread(delay_ms=1, ssl_context=context) as upstream:
        yield upstream


@pytest.mark.parametrize("name", TRANSPORTS)
def test_tls_is_verified_against_the_roots_given(name: str, authority: trustme.CA, tls_upstream: LocalUpstream) -> None:
    async def get(ca: bytes | None) -> int:
        client = make_transport(name, max_connections=2, timeout_s=2, allow_private=True, extra_ca_pem=ca)
        try:
            return (await client.get_status(f"{tls_upstream.url}/delay"))[0]
        finally:
            await client.aclose()

    assert tls_upstream.url.startswith("https://")
    assert run(get(authority.cert_pem.bytes())) == 200
    with pytest.raises(RequestError) as untrusted:
        run(get(None))
    assert untrusted.value.kind == "ConnectError"
    assert tls_upstream.stats.requests == 1  # the untrusted handshake sent no request


# --- error names: the same whatever the transport ------------------------------------------------------


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listener never accepts and whose queue is full: a connect to it never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    waiting = []
    for _ in range(3):
        pending = socket.socket()
        pending.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            pending.connect(("127.0.0.1", port))
        waiting.append(pending)
    yield port
    for pending in waiting:
        pending.close()
    listener.close()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_connect_that_never_completes_is_a_connect_timeout(name: str, full_backlog: int) -> None:
    async def get() -> int:
        client = make_transport(name, max_connections=2, timeout_s=0.3, allow_private=True)
        try:
            return (await client.get_status(f"http://127.0.0.1:{full_backlog}/"))[0]
        finally:
            await client.aclose()

    with pytest.raises(RequestError) as error:
        run(get())
    assert error.value.kind == "ConnectTimeout"
