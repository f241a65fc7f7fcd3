"""Outbound safety (SSRF): hostile targets and redirect chains are refused before any connection."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from conftest import post_batch, run
from fanout.egress import EgressPolicy, EgressRefused, GuardedResolver, refusal
from fanout.engine import RequestError
from fanout.transports import make_transport
from fanout_local.upstream import LocalUpstream, running_in_thread

FORBIDDEN = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.0.1",
    "169.254.169.254",
    "169.254.0.1",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",  # IPv4-mapped
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 around 169.254.169.254
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "172.32.0.1", "100.128.0.1", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_non_global_addresses_are_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_global_addresses_are_allowed(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


class StubDns(AbstractResolver):
    """Answers from a table: public DNS cannot be reached from here, so names are stubbed."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=ip, port=port, family=socket.AF_INET, proto=0, flags=0)
            for ip in self.answers[host]
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("name", "answer", "refused"),
    [
        ("metadata.attacker.example", ["169.254.169.254"], True),
        ("intranet.attacker.example", ["93.184.216.34", "10.1.2.3"], True),  # one bad address refuses the name
        ("mapped.attacker.example", ["::ffff:127.0.0.1"], True),
        ("api.example.com", ["93.184.216.34", "93.184.216.35"], False),
    ],
)
def test_resolver_refuses_names_that_resolve_inside(name: str, answer: list[str], refused: bool) -> None:
    resolver = GuardedResolver(EgressPolicy(allow_private=False), inner=StubDns({name: answer}))
    if refused:
        with pytest.raises(EgressRefused, match=name):
            run(resolver.resolve(name, 443))
    else:
        assert [r["host"] for r in run(resolver.resolve(name, 443))] == answer


@pytest.fixture
def listener() -> Iterator[LocalUpstream]:
    with running_in_thread(delay_ms=0) as server:
        yield server


def get_status(url: str, *, allow_private: bool) -> int:
    async def call() -> int:
        transport = make_transport("aiohttp", max_connections=2, timeout_s=2, allow_private=allow_private)
        try:
            return await transport.get_status(url)
        finally:
            await transport.aclose()

    return run(call())


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "127.1", "2130706433", "0x7f000001", "127.0.0.1.nip.invalid"],
)
def test_loopback_in_any_spelling_is_never_reached(host: str, listener: LocalUpstream) -> None:
    with pytest.raises(RequestError) as error:
        get_status(f"http://{host}:{listener.port}/delay", allow_private=False)
    # refused by the guard, by yarl (non-canonical IPv4), or not even a name: never connected
    assert error.value.kind in ("ForbiddenAddress", "InvalidURL", "ConnectError")
    assert listener.stats.connections == 0


def test_lambda_runtime_api_is_unreachable_even_when_private_is_allowed(
    listener: LocalUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", f"127.0.0.1:{listener.port}")
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(RequestError, match="Lambda runtime API") as error:
            get_status(f"http://{host}:{listener.port}/2018-06-01/runtime/invocation/next", allow_private=True)
        assert error.value.kind == "ForbiddenAddress"
    assert listener.stats.connections == 0


def test_private_targets_are_refused_by_default(listener: LocalUpstream, import_handler: Any) -> None:
    upstreams = {"inside": {"url": listener.url, "allow_http": True}}
    handler = import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams), FANOUT_ALLOW_PRIVATE_NETWORKS="false").handler
    _, body = post_batch(handler, {"requests": [{"id": "x", "target": "inside", "path": "/delay"}]})
    assert body["responses"][0]["error"]["type"] == "ForbiddenAddress"
    assert body["responses"][0]["attempts"] == 1  # a refusal is final, never retried
    assert listener.stats.connections == 0


def test_redirect_into_a_forbidden_address_is_refused(
    listener: LocalUpstream, import_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_in_thread(delay_ms=0) as runtime_api:
        monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", f"127.0.0.1:{runtime_api.port}")
        upstreams = {"up": {"url": listener.url, "allow_http": True, "max_redirects": 3}}
        handler = import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams)).handler
        inside = f"http://localhost:{runtime_api.port}/2018-06-01/runtime/invocation/next"
        chain = f"/redirect?to={inside}"  # a first hop that is allowed, redirecting inside
        requests = [
            {"id": "direct", "target": "up", "path": "/redirect", "query": {"to": inside}},
            {"id": "chained", "target": "up", "path": "/redirect", "query": {"to": chain}},
        ]
        _, body = post_batch(handler, {"requests": requests})
        assert [item["error"]["type"] for item in body["responses"]] == ["ForbiddenAddress"] * 2
        assert runtime_api.stats.connections == 0
