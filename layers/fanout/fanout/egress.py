"""Outbound safety: which addresses this service may connect to, decided where it connects.

A caller names a target, never a host, but a target's base URL, a DNS answer or a
redirect can still point inside: the VPC, the instance metadata at 169.254.169.254,
the Lambda runtime API on 127.0.0.1:9001. So the decision is made on the exact
address the kernel is about to be handed, after every parse and every lookup:

- with aiohttp, at the socket its connector is about to connect
  (fanout.transport_aiohttp): the role of `net.Dialer.Control` in daenney/ssrf;
- with pyreqwest, which connects in Rust and has no such hook, by pinning: every
  name is resolved and checked here and the client is handed only the checked
  address (fanout.pinning), every literal is checked as the client parses it.

Deny by default (stripe/smokescreen's `classifyAddr`): `classify` gives one
`Reason` per address. IPv6 outside 2000::/3 is refused; IPv4 carried inside IPv6
(mapped ::ffff:0:0/96, compatible ::/96, NAT64 64:ff9b::/96, 6to4 2002::/16,
Teredo 2001::/32) is decoded and classified again; a host the connector would
use as an address but that does not parse (a zone id, say) is refused.

What an `EgressPolicy` allows beyond global addresses: the networks of a target
marked `private` (its own host only: see fanout.targets), or everything with
FANOUT_ALLOW_PRIVATE_NETWORKS for local runs. Never, whatever is set: the
instance metadata (169.254.0.0/16, fd00:ec2::254), the Lambda runtime API's port
on any loopback or unspecified address, and unparseable hosts.

Why our own: the maintained SSRF libraries looked at (drawbridge, egressweave,
httpx-secure) each wrap httpx; none plugs into aiohttp's connector or pyreqwest.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from collections.abc import Iterable
from typing import NamedTuple

FORBIDDEN_ADDRESS = "ForbiddenAddress"
RUNTIME_API_ENV = "AWS_LAMBDA_RUNTIME_API"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Reason(enum.StrEnum):
    """Why an address is refused: in the caller's error, the log line and the metric."""

    LOOPBACK = "loopback"
    UNSPECIFIED = "unspecified"
    PRIVATE = "private"  # RFC 1918, IPv6 unique-local and site-local
    SHARED = "shared"  # 100.64.0.0/10, carrier-grade NAT (also VPC secondary ranges)
    METADATA = "metadata"  # 169.254.0.0/16 and fd00:ec2::254: instance metadata and link-local IPv4
    LINK_LOCAL = "link_local"  # fe80::/10
    MULTICAST = "multicast"
    RESERVED = "reserved"  # documentation, benchmarking, future use, IPv6 outside 2000::/3
    RUNTIME_API = "runtime_api"  # the Lambda runtime API's port on a local address
    UNCLASSIFIABLE = "unclassifiable"  # the connector would use it as an address; it does not parse


_DESCRIBED = {
    Reason.LOOPBACK: "a loopback address",
    Reason.UNSPECIFIED: "an unspecified address",
    Reason.PRIVATE: "a private address",
    Reason.SHARED: "a shared (carrier-grade NAT) address",
    Reason.METADATA: "the instance metadata (link-local) range",
    Reason.LINK_LOCAL: "a link-local address",
    Reason.MULTICAST: "a multicast address",
    Reason.RESERVED: "a reserved address",
    Reason.RUNTIME_API: "the Lambda runtime API",
    Reason.UNCLASSIFIABLE: "a host the connector takes for an address that does not parse",
}

#: Refused for every target whatever the configuration says.
ALWAYS_REFUSED = frozenset({Reason.METADATA, Reason.RUNTIME_API, Reason.UNCLASSIFIABLE})

_net = ipaddress.ip_network

#: Special-purpose IPv4 blocks (IANA registry), first match wins.
_IPV4_BLOCKS: tuple[tuple[IPNetwork, Reason], ...] = (
    (_net("0.0.0.0/8"), Reason.UNSPECIFIED),  # "this network": 0.0.0.0 reaches local listeners
    (_net("10.0.0.0/8"), Reason.PRIVATE),
    (_net("100.64.0.0/10"), Reason.SHARED),
    (_net("127.0.0.0/8"), Reason.LOOPBACK),
    (_net("169.254.0.0/16"), Reason.METADATA),
    (_net("172.16.0.0/12"), Reason.PRIVATE),
    (_net("192.0.0.0/24"), Reason.RESERVED),  # IETF protocol assignments
    (_net("192.0.2.0/24"), Reason.RESERVED),  # TEST-NET-1
    (_net("192.88.99.0/24"), Reason.RESERVED),  # 6to4 relay anycast, deprecated
    (_net("192.168.0.0/16"), Reason.PRIVATE),
    (_net("198.18.0.0/15"), Reason.RESERVED),  # benchmarking
    (_net("198.51.100.0/24"), Reason.RESERVED),  # TEST-NET-2
    (_net("203.0.113.0/24"), Reason.RESERVED),  # TEST-NET-3
    (_net("224.0.0.0/4"), Reason.MULTICAST),
    (_net("240.0.0.0/4"), Reason.RESERVED),  # future use, and 255.255.255.255
)

#: IPv6 blocks checked after the forms that carry IPv4 were decoded, first match wins.
_IPV6_BLOCKS: tuple[tuple[IPNetwork, Reason], ...] = (
    (_net("::/128"), Reason.UNSPECIFIED),
    (_net("::1/128"), Reason.LOOPBACK),
    (_net("fd00:ec2::254/128"), Reason.METADATA),
    (_net("fc00::/7"), Reason.PRIVATE),  # unique-local
    (_net("fe80::/10"), Reason.LINK_LOCAL),
    (_net("fec0::/10"), Reason.PRIVATE),  # site-local, deprecated
    (_net("ff00::/8"), Reason.MULTICAST),
    (_net("64:ff9b:1::/48"), Reason.RESERVED),  # local-use NAT64: its embedding is the network's own
    (_net("2001::/23"), Reason.RESERVED),  # IETF protocol assignments (Teredo is decoded before)
    (_net("2001:db8::/32"), Reason.RESERVED),  # documentation
    (_net("3fff::/20"), Reason.RESERVED),  # documentation
    (_net("5f00::/16"), Reason.RESERVED),  # SRv6 SIDs
)
_GLOBAL_UNICAST = _net("2000::/3")

_IPV4_MAPPED = _net("::ffff:0:0/96")
_IPV4_COMPATIBLE = _net("::/96")  # deprecated; :: and ::1 are classified as themselves
_NAT64 = _net("64:ff9b::/96")
_SIXTOFOUR = _net("2002::/16")
_TEREDO = _net("2001::/32")

#: What a target marked `private` may reach when it names no `allow_cidrs`.
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = (
    _net("10.0.0.0/8"),
    _net("172.16.0.0/12"),
    _net("192.168.0.0/16"),
    _net("100.64.0.0/10"),
    _net("fc00::/7"),
)
#: FANOUT_ALLOW_PRIVATE_NETWORKS: every network (but what is always refused). Local runs and tests.
EVERY_NETWORK: tuple[IPNetwork, ...] = (_net("0.0.0.0/0"), _net("::/0"))


def parse_address(host: str) -> IPAddress | None:
    """The address a connector would connect to for `host`, zone id dropped; None if it does not parse."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    if isinstance(address, ipaddress.IPv4Address):
        return []  # pragma: no mutate (None and [] both mean: carries nothing)
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _IPV4_MAPPED or address in _NAT64:
        return [low32]
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        return [low32]
    if address in _SIXTOFOUR:
        return [ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)]
    if address in _TEREDO:
        server, client = address.teredo  # type: ignore[misc]  # in 2001::/32, teredo is never None
        return [client, server]
    return []  # pragma: no mutate (None and [] both mean: carries nothing)


def classify(address: IPAddress) -> Reason | None:
    """Why `address` may not be reached, or None if it is a global unicast address."""
    carried = embedded_ipv4(address)
    if carried:
        return next((reason for inner in carried if (reason := classify(inner)) is not None), None)
    if isinstance(address, ipaddress.IPv4Address):
        return _first_block(address, _IPV4_BLOCKS)
    reason = _first_block(address, _IPV6_BLOCKS)
    if reason is None and address not in _GLOBAL_UNICAST:
        return Reason.RESERVED
    return reason


def _first_block(address: IPAddress, blocks: Iterable[tuple[IPNetwork, Reason]]) -> Reason | None:
    return next((reason for network, reason in blocks if address in network), None)


def effective_address(address: IPAddress) -> IPAddress:
    """The address packets really go to: the IPv4 inside an IPv6 form that carries one (Teredo's client)."""
    carried = embedded_ipv4(address)
    return carried[0] if carried else address


class EgressRefused(OSError):
    """A connection this service must not make. An OSError, so the connector's own error path carries it."""

    def __init__(self, reason: Reason, host: str, address: str, port: int) -> None:
        super().__init__(f"refused ({reason.value}): {host} is {address} port {port}, {_DESCRIBED[reason]}")
        self.reason = reason
        self.host = host
        self.address = address
        self.port = port

    @property
    def public_message(self) -> str:
        """What the caller may see: the reason, never the address a name resolved to."""
        return f"refused ({self.reason.value}): the destination is {_DESCRIBED[self.reason]}"


def lambda_runtime_api() -> tuple[str, int] | None:
    """The runtime API's host and port inside Lambda, which nothing here may call."""
    value = os.environ.get(RUNTIME_API_ENV, "")  # pragma: no mutate (any default without ":" is no value)
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)  # equivalent: '[]' -> 'XX..XX' (no address has an X to strip)


class EgressPolicy(NamedTuple):
    """Global unicast addresses, plus `allowed_networks`; never what is always refused."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    runtime_api: tuple[str, int] | None = None

    @classmethod
    def from_env(cls, *, allowed_networks: tuple[IPNetwork, ...] = ()) -> EgressPolicy:
        return cls(allowed_networks=allowed_networks, runtime_api=lambda_runtime_api())

    def refusal(self, host: str, port: int) -> Reason | None:
        """Why connecting to `host` (an address as the connector holds it) at `port` is refused, or None."""
        address = parse_address(host)
        if address is None:
            return Reason.UNCLASSIFIABLE
        reason = classify(address)
        if self._is_runtime_api(address, reason, port):
            return Reason.RUNTIME_API
        if reason is None or reason in ALWAYS_REFUSED:
            return reason
        target = effective_address(address)
        if any(target in network for network in self.allowed_networks if network.version == target.version):
            return None
        return reason

    def _is_runtime_api(self, address: IPAddress, reason: Reason | None, port: int) -> bool:
        if self.runtime_api is None or port != self.runtime_api[1]:
            return False  # equivalent: return None (None is as false)
        local = reason in (Reason.LOOPBACK, Reason.UNSPECIFIED)
        return local or parse_address(self.runtime_api[0]) in (address, effective_address(address))

    def check(self, host: str, address: str, port: int) -> None:
        """Raise EgressRefused if `address` (what `host` stands for) may not be connected to at `port`."""
        reason = self.refusal(address, port)
        if reason is not None:
            raise EgressRefused(reason, host, address, port)
