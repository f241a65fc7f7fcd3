"""Outbound safety: which addresses this service may connect to, checked where it connects.

A caller names a target, never a host, but a target's base URL or a redirect can
still point inside (the VPC, the instance metadata at 169.254.169.254, the Lambda
runtime API on 127.0.0.1:9001). So the check sits in the connection path, not
beside it: `GuardedResolver` is aiohttp's resolver, and the connector connects to
exactly the addresses it returned, so a name is resolved once and checked, with no
second lookup for a rebinding DNS server to answer differently. If any address of
a name is refused, the whole name is. IP literals never reach a resolver, so
`check_literal_host` covers them before every request and redirect hop.

Not globally routable means refused: loopback, RFC 1918, link-local (metadata),
shared 100.64/10, 0/8, multicast, reserved, IPv6 loopback/link-local/ULA, and the
IPv4 addresses hidden in IPv4-mapped, 6to4 and Teredo forms. Local runs and tests
need loopback: `allow_private=True` (FANOUT_ALLOW_PRIVATE_NETWORKS), never set in
template.yaml. The Lambda runtime API stays refused even then.

Why our own: the maintained SSRF libraries looked at (drawbridge, egressweave,
httpx-secure) each wrap httpx; none plugs into aiohttp's connector, which the
benchmarks chose. aiohttp's resolver hook is the one place that sees every
connection, so the check is a resolver, tested for every range above.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

FORBIDDEN_ADDRESS = "ForbiddenAddress"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressRefused(Exception):
    """A request would have connected somewhere this service must not reach."""


def refusal(address: IPAddress) -> str | None:
    """Why `address` may not be reached, or None if it is globally routable."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            reason = refusal(embedded)
            return f"{reason} (embedded in {address})" if reason else None
    if address.is_loopback:
        return f"{address} is a loopback address"
    if address.is_link_local:
        return f"{address} is link-local (instance metadata lives there)"
    if address.is_multicast:
        return f"{address} is multicast"
    if not address.is_global:
        return f"{address} is not globally routable (private, shared or reserved)"
    return None


def lambda_runtime_api() -> tuple[str, int] | None:
    """The runtime API's host and port inside Lambda, which nothing here may call."""
    value = os.environ.get("AWS_LAMBDA_RUNTIME_API", "")
    host, _, port = value.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


class EgressPolicy:
    """What may be connected to: global addresses, and private ones only if allowed."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.runtime_api = lambda_runtime_api()

    def check(self, host: str, address: IPAddress, port: int) -> None:
        if self.runtime_api and (str(address), port) in {self.runtime_api, ("127.0.0.1", self.runtime_api[1])}:
            raise EgressRefused(f"{host}:{port} is the Lambda runtime API")
        if self.allow_private:
            return
        if reason := refusal(address):
            raise EgressRefused(f"{host} resolves to {reason}")

    def check_literal_host(self, host: str | None, port: int | None) -> None:
        """For URLs whose host is an IP literal, which aiohttp connects to without resolving."""
        if not host:
            raise EgressRefused("the URL has no host")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: the resolver checks what it resolves to
        self.check(host, address, port or 0)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing names that resolve to forbidden addresses."""

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            self.policy.check(host, ipaddress.ip_address(result["host"]), port)
        return results

    async def close(self) -> None:
        await self.inner.close()


def guarded_connector(policy: EgressPolicy, **options: Any) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(resolver=GuardedResolver(policy), **options)
