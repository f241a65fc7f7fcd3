"""Outbound safety (SSRF): every spelling of an inside address is refused where the connection is made.

Three kinds of test, from the inside out, each transport through the same ones:
- the classification table at block edges, each address with its expected reason;
- live: loopback and the unspecified addresses in every spelling a client accepts, against
  listeners on 127.0.0.1 and [::1] that count connections (zero means zero bytes);
- intercepted: addresses that are not on this machine (private ranges, metadata, NAT64,
  site-local) with the connect replaced by a recorder, so a guard that failed would be seen
  trying, and still nothing would leave the machine. aiohttp connects through the event
  loop's `sock_connect`; pyreqwest connects in Rust, so its clients are replaced by one that
  records where reqwest would connect (the pinned address of a name, or the literal as
  reqwest parses it). That reqwest really goes where it is pinned is shown live, in
  tests/test_pinning.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar
from unittest import mock

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from pyreqwest.http import Url
from yarl import URL

from conftest import post_batch, run
from fanout.egress import (
    PRIVATE_NETWORKS,
    EgressPolicy,
    EgressRefused,
    Reason,
    classify,
    effective_address,
    parse_address,
)
from fanout.engine import RequestError
from fanout.targets import TargetScope
from fanout.transport_aiohttp import GuardedResolver, GuardedSocketFactory
from fanout.transport_pyreqwest import PyreqwestTransport
from fanout.transports import TRANSPORTS, make_transport
from fanout_local.upstream import LocalUpstream
from pinning_stand_ins import RecordingClient, stub_lookup

T = TypeVar("T")
R = Reason

# --- the table: first and last address of each block, and the ones just outside ------------------

CLASSIFIED: list[tuple[str, Reason | None]] = [
    ("0.0.0.0", R.UNSPECIFIED),
    ("0.255.255.255", R.UNSPECIFIED),
    ("1.0.0.0", None),
    ("9.255.255.255", None),
    ("10.0.0.0", R.PRIVATE),
    ("10.255.255.255", R.PRIVATE),
    ("11.0.0.0", None),
    ("100.63.255.255", None),
    ("100.64.0.0", R.SHARED),
    ("100.127.255.255", R.SHARED),
    ("100.128.0.0", None),
    ("126.255.255.255", None),
    ("127.0.0.0", R.LOOPBACK),
    ("127.255.255.255", R.LOOPBACK),
    ("128.0.0.0", None),
    ("169.253.255.255", None),
    ("169.254.0.0", R.METADATA),
    ("169.254.169.254", R.METADATA),
    ("169.254.255.255", R.METADATA),
    ("169.255.0.0", None),
    ("172.15.255.255", None),
    ("172.16.0.0", R.PRIVATE),
    ("172.31.255.255", R.PRIVATE),
    ("172.32.0.0", None),
    ("191.255.255.255", None),
    ("192.0.0.0", R.RESERVED),
    ("192.0.0.255", R.RESERVED),
    ("192.0.1.0", None),
    ("192.0.2.0", R.RESERVED),
    ("192.0.2.255", R.RESERVED),
    ("192.0.3.0", None),
    ("192.88.98.255", None),
    ("192.88.99.0", R.RESERVED),
    ("192.88.99.255", R.RESERVED),
    ("192.88.100.0", None),
    ("192.167.255.255", None),
    ("192.168.0.0", R.PRIVATE),
    ("192.168.255.255", R.PRIVATE),
    ("192.169.0.0", None),
    ("198.17.255.255", None),
    ("198.18.0.0", R.RESERVED),
    ("198.19.255.255", R.RESERVED),
    ("198.20.0.0", None),
    ("198.51.99.255", None),
    ("198.51.100.0", R.RESERVED),
    ("198.51.100.255", R.RESERVED),
    ("198.51.101.0", None),
    ("203.0.112.255", None),
    ("203.0.113.0", R.RESERVED),
    ("203.0.113.255", R.RESERVED),
    ("203.0.114.0", None),
    ("223.255.255.255", None),
    ("224.0.0.0", R.MULTICAST),
    ("239.255.255.255", R.MULTICAST),
    ("240.0.0.0", R.RESERVED),
    ("255.255.255.255", R.RESERVED),
    ("8.8.8.8", None),
    # IPv6
    ("::", R.UNSPECIFIED),
    ("::1", R.LOOPBACK),
    ("::2", R.UNSPECIFIED),  # IPv4-compatible 0.0.0.2
    ("::127.0.0.1", R.LOOPBACK),  # IPv4-compatible
    ("::8.8.8.8", None),
    ("::ffff:0.0.0.0", R.UNSPECIFIED),
    ("::ffff:127.0.0.1", R.LOOPBACK),
    ("::ffff:7f00:1", R.LOOPBACK),
    ("::ffff:10.0.0.1", R.PRIVATE),
    ("::ffff:169.254.169.254", R.METADATA),
    ("::ffff:8.8.8.8", None),
    ("::1:0:0:0", R.RESERVED),  # outside 2000::/3, carries nothing
    ("64:ff9b::", R.UNSPECIFIED),  # NAT64 of 0.0.0.0
    ("64:ff9b::a00:1", R.PRIVATE),  # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", R.LOOPBACK),
    ("64:ff9b::a9fe:a9fe", R.METADATA),
    ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
    ("64:ff9b::1:0:0", R.RESERVED),  # just past 64:ff9b::/96
    ("64:ff9b:1::", R.RESERVED),  # local-use NAT64
    ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", R.RESERVED),
    ("64:ff9c::1", R.RESERVED),
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", R.RESERVED),
    ("2000::", None),
    ("2001::", R.RESERVED),  # Teredo: client 255.255.255.255 (checked first), server 0.0.0.0
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", R.RESERVED),  # Teredo, client 192.0.2.45
    ("2001:0:0808:0808:0:f7f7:f7f7:f7f7", None),  # Teredo: server 8.8.8.8, client 8.8.8.8
    ("2001:0:0808:0808:0:ffff:80ff:fffe", R.LOOPBACK),  # Teredo, client 127.0.0.1
    ("2001:1::", R.RESERVED),  # IETF protocol assignments
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", R.RESERVED),
    ("2001:200::", None),
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("2001:db8::", R.RESERVED),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", R.RESERVED),
    ("2001:db9::", None),
    ("2002:7f00:1::", R.LOOPBACK),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::", R.METADATA),
    ("2002:808:808::", None),  # 6to4 of 8.8.8.8
    ("2003::", None),
    ("2606:4700:4700::1111", None),
    ("3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
    ("3fff::", R.RESERVED),
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", R.RESERVED),
    ("3fff:1000::", None),
    ("4000::", R.RESERVED),
    ("5f00::", R.RESERVED),
    ("5f00:ffff::", R.RESERVED),
    ("5f01::", R.RESERVED),  # outside 2000::/3 anyway
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", R.RESERVED),
    ("fc00::", R.PRIVATE),
    ("fd00:ec2::253", R.PRIVATE),
    ("fd00:ec2::254", R.METADATA),
    ("fd00:ec2::255", R.PRIVATE),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", R.PRIVATE),
    ("fe00::", R.RESERVED),
    ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", R.RESERVED),
    ("fe80::", R.LINK_LOCAL),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", R.LINK_LOCAL),
    ("fec0::", R.PRIVATE),  # site-local
    ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", R.PRIVATE),
    ("ff00::", R.MULTICAST),
    ("ff02::1", R.MULTICAST),
]


@pytest.mark.parametrize(("address", "reason"), CLASSIFIED)
def test_classification_at_block_edges(address: str, reason: Reason | None) -> None:
    assert classify(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    ("address", "carried"),
    [
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("64:ff9b::a01:203", "10.1.2.3"),
        ("2002:a01:203::", "10.1.2.3"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # Teredo's client, not its server
        ("10.1.2.3", "10.1.2.3"),
        ("2606:4700::1", "2606:4700::1"),
    ],
)
def test_effective_address_is_where_packets_go(address: str, carried: str) -> None:
    assert effective_address(ipaddress.ip_address(address)) == ipaddress.ip_address(carried)


@pytest.mark.parametrize(
    ("host", "parsed"),
    [
        ("::1%", "::1"),
        ("::1%25", "::1"),
        ("::ffff:127.0.0.1%eth0", "::ffff:127.0.0.1"),
        ("[::1]", None),  # a URL's brackets never reach the connector
        ("127.0.0.1", "127.0.0.1"),
        ("fe80::1%lo", "fe80::1"),
        ("a:b", None),
        ("localhost", None),
        ("", None),
    ],
)
def test_parse_address_drops_zone_ids(host: str, parsed: str | None) -> None:
    assert parse_address(host) == (ipaddress.ip_address(parsed) if parsed else None)


def test_unparseable_addresses_are_refused_whatever_is_allowed() -> None:
    everything = EgressPolicy(allowed_networks=(ipaddress.ip_network("::/0"), ipaddress.ip_network("0.0.0.0/0")))
    assert everything.refusal("a:b", 80) is Reason.UNCLASSIFIABLE
    assert everything.refusal("::1%", 80) is None  # parses once the zone id is dropped: allowed here


@pytest.mark.parametrize(
    ("networks", "address", "reason"),
    [
        ((), "10.1.2.3", R.PRIVATE),
        (PRIVATE_NETWORKS, "10.1.2.3", None),
        (PRIVATE_NETWORKS, "100.64.0.1", None),
        (PRIVATE_NETWORKS, "fd12::1", None),
        (PRIVATE_NETWORKS, "::ffff:192.168.1.1", None),  # the address carried is what counts
        (PRIVATE_NETWORKS, "127.0.0.1", R.LOOPBACK),  # private means the VPC, not this machine
        (PRIVATE_NETWORKS, "169.254.169.254", R.METADATA),
        (PRIVATE_NETWORKS, "fd00:ec2::254", R.METADATA),
        ((ipaddress.ip_network("10.1.0.0/16"),), "10.1.255.255", None),
        ((ipaddress.ip_network("10.1.0.0/16"),), "10.2.0.0", R.PRIVATE),
        ((ipaddress.ip_network("169.254.0.0/16"),), "169.254.169.254", R.METADATA),  # never, whatever is set
        ((ipaddress.ip_network("fd00::/8"),), "fd00:ec2::254", R.METADATA),
        ((ipaddress.ip_network("0.0.0.0/0"),), "::1", R.LOOPBACK),  # an IPv4 network allows no IPv6
        ((ipaddress.ip_network("0.0.0.0/0"),), "8.8.8.8", None),
    ],
)
def test_allowed_networks_open_only_themselves(networks: tuple[Any, ...], address: str, reason: Reason | None) -> None:
    assert EgressPolicy(allowed_networks=networks).refusal(address, 443) == reason


@pytest.mark.parametrize(
    ("address", "port", "reason"),
    [
        ("127.0.0.1", 9001, R.RUNTIME_API),
        ("127.0.0.2", 9001, R.RUNTIME_API),
        ("0.0.0.0", 9001, R.RUNTIME_API),
        ("::1", 9001, R.RUNTIME_API),
        ("::", 9001, R.RUNTIME_API),
        ("::ffff:127.0.0.1", 9001, R.RUNTIME_API),
        ("::ffff:0.0.0.0", 9001, R.RUNTIME_API),
        ("::1%", 9001, R.RUNTIME_API),
        ("64:ff9b::7f00:1", 9001, R.RUNTIME_API),
        ("127.0.0.1", 9002, None),  # loopback is allowed here, only not at the runtime API's port
        ("10.0.0.1", 9001, None),
    ],
)
def test_runtime_api_is_refused_by_address_and_port(address: str, port: int, reason: Reason | None) -> None:
    everything = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    policy = EgressPolicy(allowed_networks=everything, runtime_api=("127.0.0.1", 9001))
    assert policy.refusal(address, port) == reason


def test_runtime_api_elsewhere_is_refused_at_its_own_address() -> None:
    policy = EgressPolicy(allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),), runtime_api=("10.9.9.9", 9001))
    assert (policy.refusal("10.9.9.9", 9001), policy.refusal("::ffff:10.9.9.9", 9001)) == (R.RUNTIME_API,) * 2
    assert policy.refusal("10.9.9.8", 9001) is None


def test_runtime_api_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")
    assert EgressPolicy.from_env().runtime_api == ("127.0.0.1", 9001)
    monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", "[::1]:9001")
    assert EgressPolicy.from_env().runtime_api == ("::1", 9001)
    for value in ("", "9001", "127.0.0.1:", "127.0.0.1:x"):
        monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", value)
        assert EgressPolicy.from_env().runtime_api is None


def test_the_reasons_are_a_fixed_vocabulary() -> None:
    """They appear in the caller's errors, the log lines and the metrics: renaming one breaks dashboards."""
    assert [reason.value for reason in Reason] == [
        "loopback",
        "unspecified",
        "private",
        "shared",
        "metadata",
        "link_local",
        "multicast",
        "reserved",
        "runtime_api",
        "unclassifiable",
    ]


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        (R.LOOPBACK, "refused (loopback): the destination is a loopback address"),
        (R.UNSPECIFIED, "refused (unspecified): the destination is an unspecified address"),
        (R.PRIVATE, "refused (private): the destination is a private address"),
        (R.SHARED, "refused (shared): the destination is a shared (carrier-grade NAT) address"),
        (R.METADATA, "refused (metadata): the destination is the instance metadata (link-local) range"),
        (R.LINK_LOCAL, "refused (link_local): the destination is a link-local address"),
        (R.MULTICAST, "refused (multicast): the destination is a multicast address"),
        (R.RESERVED, "refused (reserved): the destination is a reserved address"),
        (R.RUNTIME_API, "refused (runtime_api): the destination is the Lambda runtime API"),
        (
            R.UNCLASSIFIABLE,
            "refused (unclassifiable): the destination is "
            "a host the connector takes for an address that does not parse",
        ),
    ],
)
def test_each_reason_reads_plainly(reason: Reason, message: str) -> None:
    assert EgressRefused(reason, "h", "a", 1).public_message == message


def test_a_policy_is_a_value() -> None:
    policy = EgressPolicy(runtime_api=("127.0.0.1", 9001))
    with pytest.raises(AttributeError):
        policy.runtime_api = None  # type: ignore[misc]
    assert policy == EgressPolicy(runtime_api=("127.0.0.1", 9001)) and not hasattr(policy, "__dict__")


def test_refusal_tells_the_caller_the_reason_and_the_log_the_address() -> None:
    refused = EgressRefused(R.PRIVATE, "db.internal.example", "10.1.2.3", 5432)
    assert refused.public_message == "refused (private): the destination is a private address"
    assert "10.1.2.3" not in refused.public_message and "db.internal" not in refused.public_message
    assert str(refused) == "refused (private): db.internal.example is 10.1.2.3 port 5432, a private address"
    assert isinstance(refused, OSError)  # so aiohttp's connector error path carries it


def test_socket_factory_makes_a_socket_only_for_allowed_addresses() -> None:
    factory = GuardedSocketFactory(EgressPolicy())
    with pytest.raises(EgressRefused) as refused:
        factory((socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1%", 80, 0, 0)))
    assert (refused.value.reason, refused.value.port) == (R.LOOPBACK, 80)
    sock = factory((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("8.8.8.8", 443)))
    try:
        assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
    finally:
        sock.close()


# --- names: a stub DNS (public DNS is not reachable here), the guarded resolver around it ---------


class StubDns(AbstractResolver):
    """Answers from a table, so no test asks a real DNS server anything."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for ip in self.answers[host]
        ]

    async def close(self) -> None:
        pass


NAMES = {
    "metadata.attacker.example": ["169.254.169.254"],
    "mixed.attacker.example": ["93.184.216.34", "10.1.2.3"],  # one inside address refuses the name
    "mapped.attacker.example": ["::ffff:127.0.0.1"],
    "nat64.attacker.example": ["64:ff9b::a00:1"],
    "sitelocal.attacker.example": ["fec0::1"],
    "zone.attacker.example": ["fe80::1%eth0"],
    "unspecified.attacker.example": ["::ffff:0.0.0.0"],
    "api.example.com": ["93.184.216.34", "2606:2800:220:1::1"],
    "db.internal.example": ["10.1.2.3"],
}


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("metadata.attacker.example", R.METADATA),
        ("mixed.attacker.example", R.PRIVATE),
        ("mapped.attacker.example", R.LOOPBACK),
        ("nat64.attacker.example", R.PRIVATE),
        ("sitelocal.attacker.example", R.PRIVATE),
        ("zone.attacker.example", R.LINK_LOCAL),
        ("unspecified.attacker.example", R.UNSPECIFIED),
        ("api.example.com", None),
    ],
)
def test_resolver_refuses_a_name_with_any_inside_address(name: str, reason: Reason | None) -> None:
    resolver = GuardedResolver(EgressPolicy(), inner=StubDns(NAMES))
    if reason is None:
        assert [r["host"] for r in run(resolver.resolve(name, 443))] == NAMES[name]
        return
    with pytest.raises(EgressRefused) as refused:
        run(resolver.resolve(name, 443))
    assert (refused.value.reason, refused.value.host) == (reason, name)


# --- intercepted: what is not on this machine is never really connected to ----------------------


class ConnectRecorder:
    """Stands in for the loop's `sock_connect`: records the attempt, connects nowhere."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []

    async def sock_connect(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        self.attempts.append((address[0], address[1]))
        raise ConnectionRefusedError("intercepted by the test: nothing leaves this machine")


def run_intercepted(coro: Coroutine[Any, Any, T], transport: str) -> tuple[T | BaseException, list[tuple[str, int]]]:
    """Run `coro` with every connect attempt recorded instead of made; its result (or error) and the attempts."""
    recorder = ConnectRecorder()
    loop = asyncio.new_event_loop()
    loop.sock_connect = recorder.sock_connect  # type: ignore[method-assign]

    def recording_client(_: Any, pin: tuple[str, str] | None) -> RecordingClient:
        return RecordingClient(recorder.attempts, pin)

    try:
        with mock.patch.object(PyreqwestTransport, "_build", recording_client):
            result: T | BaseException = loop.run_until_complete(coro)
    except BaseException as exc:
        result = exc
    finally:
        loop.close()
    return result, [(str(ipaddress.ip_address(host)), port) for host, port in recorder.attempts]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each transport, through the same tests."""
    return str(request.param)


@pytest.fixture
def stub_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fanout.transport_aiohttp.ThreadedResolver", lambda: StubDns(NAMES))
    monkeypatch.setattr("fanout.pinning.lookup", stub_lookup(NAMES))


def client_host(url: str) -> str:
    """The host as the client (and pydantic's HttpUrl) reads it; "" for a URL it cannot parse."""
    try:
        return Url(url).host_str or ""
    except ValueError:
        return ""


def scope_for(url: str, *, private: tuple[Any, ...] = (), redirect_hosts: tuple[str, ...] = ()) -> TargetScope:
    return TargetScope(
        name="t",
        host=client_host(url),
        ports=frozenset({Url(url).port_or_known_default}),
        redirect_hosts=frozenset(redirect_hosts),
        schemes=frozenset({"http", "https"}),
        max_redirects=3,
        private_networks=private,
    )


async def send_once(url: str, scope: TargetScope | None = None, *, transport: str, allow_private: bool = False) -> int:
    """One request by `send`, as /batch makes it; a URL the client's parser refuses (a zone id) cannot be
    a /batch URL, so it is sent as the seed routes send theirs, by `get_status` with the URL as text."""
    client = make_transport(transport, max_connections=2, timeout_s=2, allow_private=allow_private)
    try:
        if not client_host(url):
            return (await client.get_status(url))[0]
        response = await client.send(
            "GET", Url(url), headers={}, body=None, max_body_bytes=100, scope=scope or scope_for(url)
        )
        return response.status
    finally:
        await client.aclose()


NOT_HERE = [
    ("http://10.0.0.1/", R.PRIVATE),
    ("http://172.16.5.4:8080/", R.PRIVATE),
    ("http://192.168.1.1/", R.PRIVATE),
    ("http://100.64.0.1/", R.SHARED),
    ("http://169.254.169.254/latest/meta-data/", R.METADATA),
    ("http://[::ffff:169.254.169.254]/", R.METADATA),
    ("http://[fd00:ec2::254]/", R.METADATA),
    ("http://[64:ff9b::a00:1]/", R.PRIVATE),
    ("http://[64:ff9b::a9fe:a9fe]/", R.METADATA),
    ("http://[64:ff9b:1::a00:1]/", R.RESERVED),
    ("http://[fec0::1]/", R.PRIVATE),
    ("http://[fe80::1%25eth0]/", R.LINK_LOCAL),
    ("http://[2002:a00:1::]/", R.PRIVATE),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", R.RESERVED),
    ("http://[ff02::1]/", R.MULTICAST),
    ("http://224.0.0.1/", R.MULTICAST),
    ("http://metadata.attacker.example/", R.METADATA),
    ("http://mixed.attacker.example/", R.PRIVATE),
    ("http://nat64.attacker.example/", R.PRIVATE),
    ("http://sitelocal.attacker.example/", R.PRIVATE),
]


@pytest.mark.parametrize(("url", "reason"), NOT_HERE)
def test_inside_addresses_never_reach_connect(url: str, reason: Reason, stub_dns: None, transport: str) -> None:
    error, attempts = run_intercepted(send_once(url, transport=transport), transport)
    assert attempts == []
    assert isinstance(error, RequestError) and error.kind == "ForbiddenAddress"
    assert error.detail.startswith(f"refused ({reason.value}): the destination is ")
    assert error.internal is not None and error.internal.startswith(f"refused ({reason.value})")


@pytest.mark.parametrize(
    ("url", "connected_to"),
    [
        ("http://93.184.216.34/", ("93.184.216.34", 80)),
        ("http://[::ffff:8.8.8.8]:8080/", ("::ffff:8.8.8.8", 8080)),
        ("http://[2002:808:808::]/", ("2002:808:808::", 80)),
        ("http://[64:ff9b::808:808]/", ("64:ff9b::808:808", 80)),
        ("https://api.example.com/", ("93.184.216.34", 443)),
    ],
)
def test_global_addresses_go_through_to_connect(
    url: str, connected_to: tuple[str, int], stub_dns: None, transport: str
) -> None:
    """The control for the test above: what is allowed reaches the (intercepted) connect."""
    error, attempts = run_intercepted(send_once(url, transport=transport), transport)
    assert attempts[0] == (str(ipaddress.ip_address(connected_to[0])), connected_to[1])
    assert isinstance(error, RequestError) and error.kind == "ConnectError"


def test_private_target_reaches_its_networks_and_nothing_else(stub_dns: None, transport: str) -> None:
    inside = scope_for(
        "http://db.internal.example/", private=PRIVATE_NETWORKS, redirect_hosts=("metadata.attacker.example",)
    )
    error, attempts = run_intercepted(send_once("http://db.internal.example/", inside, transport=transport), transport)
    assert attempts == [("10.1.2.3", 80)]  # its own host may resolve inside
    assert isinstance(error, RequestError) and error.kind == "ConnectError"
    narrowed = scope_for("http://db.internal.example/", private=(ipaddress.ip_network("10.9.0.0/16"),))
    error, attempts = run_intercepted(
        send_once("http://db.internal.example/", narrowed, transport=transport), transport
    )
    assert (attempts, getattr(error, "kind", None)) == ([], "ForbiddenAddress")
    # another host of the same target gets no private access: the allowance is the target's own host's
    error, attempts = run_intercepted(send_once("http://10.1.2.3/", inside, transport=transport), transport)
    assert (attempts, getattr(error, "kind", None)) == ([], "ForbiddenAddress")


def test_metadata_stays_refused_for_a_private_target_that_asks_for_it(transport: str) -> None:
    scope = scope_for("http://169.254.169.254/", private=(ipaddress.ip_network("169.254.0.0/16"),))
    error, attempts = run_intercepted(
        send_once("http://169.254.169.254/latest/", scope, transport=transport), transport
    )
    assert attempts == []
    assert isinstance(error, RequestError) and error.detail.startswith("refused (metadata)")


# --- live: loopback and unspecified spellings against listeners on 127.0.0.1 and [::1] -----------


class LoopbackListener:
    """Listens on 127.0.0.1 and [::1] at one port, counting connections; answers 200 to anything."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
def loopback() -> Iterator[LoopbackListener]:
    listener = LoopbackListener()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> list[asyncio.Server]:
        first = await asyncio.start_server(listener.serve, "127.0.0.1", 0)
        listener.port = first.sockets[0].getsockname()[1]
        return [first, await asyncio.start_server(listener.serve, "::1", listener.port)]

    servers = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    yield listener

    async def stop() -> None:  # on the loop's own thread: asyncio servers are not thread-safe
        for server in servers:
            server.close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


LOCAL_SPELLINGS = [
    ("127.0.0.1", R.LOOPBACK),
    ("127.0.0.2", R.LOOPBACK),
    ("localhost", R.LOOPBACK),
    ("[::1]", R.LOOPBACK),
    ("[::1%25]", R.LOOPBACK),  # a zone id, percent-encoded: aiohttp takes it for an address
    ("[::1%25lo]", R.LOOPBACK),
    ("[::ffff:127.0.0.1]", R.LOOPBACK),
    ("[::ffff:127.0.0.1%25]", R.LOOPBACK),
    ("[::ffff:7f00:1]", R.LOOPBACK),
    ("[::127.0.0.1]", R.LOOPBACK),  # IPv4-compatible
    ("0.0.0.0", R.UNSPECIFIED),
    ("[::]", R.UNSPECIFIED),
    ("[::ffff:0.0.0.0]", R.UNSPECIFIED),
    ("[::%25]", R.UNSPECIFIED),
    ("2130706433", R.LOOPBACK),  # 127.0.0.1 as one number: reqwest's URL parser (WHATWG) and getaddrinfo read it so
    ("0x7f.1", R.LOOPBACK),  # hex and a short form: 127.0.0.1 again
    ("0177.0.0.1", R.LOOPBACK),  # octal
]
#: Spellings the kernel really connects to this machine with (the others fail to route or resolve).
LIVE = {"127.0.0.1", "localhost", "[::1]", "[::1%25]", "[::ffff:127.0.0.1]", "[::ffff:127.0.0.1%25]",
        "[::ffff:7f00:1]", "0.0.0.0", "[::]", "[::ffff:0.0.0.0]", "[::%25]", "2130706433", "0x7f.1",
        "0177.0.0.1"}  # fmt: skip
#: What a client will not even parse, so sends nothing to, allowed or not: reqwest takes no zone id,
#: yarl no IPv4 address that is not dotted decimal (it reads "0x7f.1" as a name, which resolves).
UNSENDABLE = {"pyreqwest": {host for host in LIVE if "%25" in host}, "aiohttp": {"2130706433", "0177.0.0.1"}}


def refused_kind(transport: str, host: str) -> str:
    """ForbiddenAddress, or InvalidURL where the client itself refuses the URL and the guard is never asked."""
    return "InvalidURL" if host in UNSENDABLE["aiohttp"] and transport == "aiohttp" else "ForbiddenAddress"


def get_status(url: str, *, transport: str, allow_private: bool) -> int:
    async def call() -> int:
        client = make_transport(transport, max_connections=2, timeout_s=2, allow_private=allow_private)
        try:
            return (await client.get_status(url))[0]
        finally:
            await client.aclose()

    return run(call())


@pytest.mark.parametrize(("host", "reason"), LOCAL_SPELLINGS)
def test_local_spellings_never_reach_a_local_listener(
    host: str, reason: Reason, loopback: LoopbackListener, transport: str
) -> None:
    with pytest.raises(RequestError) as error:
        get_status(f"http://{host}:{loopback.port}/", transport=transport, allow_private=False)
    assert loopback.connections == 0
    assert error.value.kind == refused_kind(transport, host)
    if error.value.kind == "ForbiddenAddress":
        assert error.value.detail.startswith(f"refused ({reason.value})")


@pytest.mark.parametrize("host", sorted(LIVE))
def test_those_spellings_do_reach_it_when_allowed(host: str, loopback: LoopbackListener, transport: str) -> None:
    """The control: each refused spelling above is a live way in, not a URL that fails anyway."""
    url = f"http://{host}:{loopback.port}/"
    if host in UNSENDABLE[transport]:
        with pytest.raises(RequestError) as error:
            get_status(url, transport=transport, allow_private=True)
        assert (error.value.kind, loopback.connections) == ("InvalidURL", 0)
        return
    assert get_status(url, transport=transport, allow_private=True) == 200
    assert loopback.connections == 1


@pytest.mark.parametrize(("host", "_reason"), LOCAL_SPELLINGS)
def test_the_runtime_api_is_refused_in_every_spelling_even_when_private_is_allowed(
    host: str, _reason: Reason, loopback: LoopbackListener, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", f"127.0.0.1:{loopback.port}")
    with pytest.raises(RequestError) as error:
        get_status(
            f"http://{host}:{loopback.port}/2018-06-01/runtime/invocation/next", transport=transport, allow_private=True
        )
    assert loopback.connections == 0
    assert error.value.kind == refused_kind(transport, host)
    if error.value.kind == "ForbiddenAddress":
        assert error.value.detail == "refused (runtime_api): the destination is the Lambda runtime API"


@pytest.mark.parametrize(
    "location",
    ["http://[::1%25]:{port}/", "http://[::ffff:127.0.0.1%25]:{port}/", "http://0.0.0.0:{port}/",
     "http://[::]:{port}/", "http://localhost:{port}/", "http://[::127.0.0.1]:{port}/"],
)  # fmt: skip
def test_a_redirect_into_a_local_spelling_is_refused_at_connect(
    location: str, loopback: LoopbackListener, upstream: LocalUpstream, transport: str
) -> None:
    """Even where a target lists the host (the redirect rule passes), the connection is refused; a
    Location the client cannot parse (a zone id) is refused as the address it spells, not as a bad URL."""
    hostile = URL(location.format(port=loopback.port))  # yarl: it takes a zone id, as a Location may hold one
    first = f"{upstream.url}/redirect?to={hostile}"
    scope = scope_for(upstream.url, private=(ipaddress.ip_network("127.0.0.1/32"),), redirect_hosts=())
    scope = TargetScope(**{**_fields(scope), "redirect_hosts": frozenset({client_host(str(hostile))})})
    with pytest.raises(RequestError) as error:
        run(send_once(first, scope, transport=transport))
    assert error.value.kind == "ForbiddenAddress"
    assert upstream.stats.requests == 1  # the first hop was made: the redirect was really followed
    assert loopback.connections == 0


def _fields(scope: TargetScope) -> dict[str, Any]:
    return {name: getattr(scope, name) for name in TargetScope._fields}


# --- through the real handler: targets, redirects, private targets --------------------------------


def batch_handler(import_handler: Any, upstreams: dict[str, Any], transport: str) -> Any:
    return import_handler(
        FANOUT_UPSTREAMS=json.dumps(upstreams), FANOUT_ALLOW_PRIVATE_NETWORKS="false", FANOUT_TRANSPORT=transport
    ).handler


def test_private_targets_are_refused_unless_marked(
    upstream: LocalUpstream, import_handler: Any, transport: str
) -> None:
    handler = batch_handler(import_handler, {"inside": {"url": upstream.url, "allow_http": True}}, transport)
    _, body = post_batch(handler, {"requests": [{"id": "x", "target": "inside", "path": "/delay"}]})
    (item,) = body["responses"]
    assert item["error"] == {
        "type": "ForbiddenAddress",
        "message": "refused (loopback): the destination is a loopback address",
    }
    assert item["attempts"] == 1  # a refusal is final, never retried
    assert upstream.stats.connections == 0


def test_a_private_target_reaches_its_own_host(upstream: LocalUpstream, import_handler: Any, transport: str) -> None:
    upstreams = {
        "inside": {"url": upstream.url, "allow_http": True, "private": True, "allow_cidrs": ["127.0.0.1/32"]},
        "same-host-public": {"url": upstream.url, "allow_http": True},
        "inside-default": {"url": upstream.url, "allow_http": True, "private": True},
    }
    handler = batch_handler(import_handler, upstreams, transport)
    requests = [
        {"id": "a", "target": "inside", "path": "/delay"},
        {"id": "b", "target": "same-host-public", "path": "/delay"},
        {"id": "c", "target": "inside-default", "path": "/delay"},
    ]
    _, body = post_batch(handler, {"strategy": "sync", "requests": requests})
    assert [item.get("status") or item["error"]["type"] for item in body["responses"]] == [
        200,
        "ForbiddenAddress",  # the pooled connection of "inside" is not handed to another target
        "ForbiddenAddress",  # private means the VPC's ranges, not loopback, unless allow_cidrs says so
    ]
    assert upstream.stats.connections == 1


def test_the_log_line_keeps_the_address_the_caller_never_sees(
    upstream: LocalUpstream, import_handler: Any, capsys: pytest.CaptureFixture[str], transport: str
) -> None:
    handler = batch_handler(
        import_handler,
        {"inside": {"url": upstream.url.replace("127.0.0.1", "localhost"), "allow_http": True}},
        transport,
    )
    capsys.readouterr()
    _, body = post_batch(handler, {"requests": [{"id": "x", "target": "inside", "path": "/delay"}]})
    assert "127.0.0.1" not in json.dumps(body)
    (failure,) = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if "upstream request failed" in line
    ]
    assert failure["detail"] == f"refused (loopback): localhost is 127.0.0.1 port {upstream.port}, a loopback address"
