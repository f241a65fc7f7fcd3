"""Which address a host name is connected to, decided here: the egress guard for a client that
connects in Rust (pyreqwest) and so offers no connect hook, only a static DNS entry per name.

- `destination`: the host and port as the client itself reads the URL (its WHATWG
  parser turns `http://2130706433/` and `http://0x7f.1/` into 127.0.0.1), so what is
  checked is what it will connect to, never our reading of the same text.
- `Pins`: a name is looked up by us, every address of the answer is checked by the
  caller (one refused address refuses the name, as fanout.transport_aiohttp's
  resolver does), and the name's client is built with the name pinned to the first
  address: the client never asks DNS itself. An answer is kept `PIN_TTL_S`, then
  looked up again (the pinned address stays while the answer holds it); concurrent
  requests for a name share one lookup. An address that fails to connect goes last
  (`Pins.demote`), so the next request tries the next one, as a client connecting by
  itself would (a dead node still in DNS, IPv6 where the network routes none).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from typing import NamedTuple

from pyreqwest.http import Url

from fanout.engine import RequestError

#: How long a name's answer is used before it is looked up again. The system resolver gives no TTL;
#: a minute follows a moved upstream soon enough and costs one lookup per name per minute.
PIN_TTL_S = 60.0  # pragma: no mutate (a choice of how long, not a rule a test could hold)


class Destination(NamedTuple):
    """A URL's host and port as the client reads them; `address` is set when the host is a literal.
    `url` is the parsed URL itself, handed to the client so that it does not parse the text again."""

    host: str
    port: int
    address: str | None
    url: Url


#: The seed routes send one URL thousands of times: parsed once. Small, because /batch and jobs send a
#: new URL per item (already parsed: `parsed_destination`), and a large cache would only keep callers'
#: paths and queries alive.
@functools.lru_cache(maxsize=16)  # pragma: no mutate (a size, not a rule)
def destination(url: str) -> Destination:
    """Where the client would connect for `url`; ValueError when it would not take the URL at all."""
    return parsed_destination(Url(url))


def parsed_destination(parsed: Url) -> Destination:
    """Where the client would connect for a URL its parser has read; ValueError without a host or port."""
    host, port = parsed.host_str, parsed.port_or_known_default
    if host is None or port is None:
        raise ValueError(f"{str(parsed)!r} has no host or port the client can connect to")
    return Destination(host, port, _literal_address(host), parsed)


#: A call's hosts are few (its targets, their redirect hosts), and parsing one with ipaddress is most
#: of a destination's cost (3.4 of 3.8 us): each host is read once. Bounded, since redirects name hosts.
@functools.lru_cache(maxsize=1024)  # pragma: no mutate (a size, not a rule)
def _literal_address(host: str) -> str | None:
    """The address a URL's host spells (`[::1]` -> `::1`), or None for a name."""
    bare = host[1:-1] if host.startswith("[") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return None


class Pin(NamedTuple):
    """A name's answer: every address (each one checked), the first one pinned, until `expires`."""

    addresses: tuple[str, ...]
    expires: float

    @property
    def address(self) -> str:
        return self.addresses[0]


async def lookup(name: str) -> tuple[str, ...]:
    """The addresses `name` resolves to, in the system resolver's order (a thread, as aiohttp's default)."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


class Pins:
    """Names to their current answer, looked up once per `ttl_s` however many requests ask at once."""

    def __init__(self, ttl_s: float | None = None) -> None:
        self.ttl_s = PIN_TTL_S if ttl_s is None else ttl_s
        self._pins: dict[str, Pin] = {}
        self._lookups: dict[str, asyncio.Task[Pin]] = {}

    def current(self, name: str) -> Pin | None:
        """The name's answer if it has not expired, without waiting."""
        pin = self._pins.get(name)
        fresh = pin is not None and pin.expires > time.monotonic()  # equivalent: Gt -> GtE (this instant)
        return pin if fresh else None

    def demote(self, name: str, address: str) -> None:
        """After a connect to `address` failed: the name's other addresses first, until the answer changes.
        Only while it is the one pinned, so requests that failed on it together move it once."""
        pin = self._pins.get(name)
        if pin is not None and pin.address == address:
            self._pins[name] = pin._replace(addresses=(*pin.addresses[1:], address))

    async def get(self, name: str) -> Pin:
        pin = self.current(name)
        if pin is not None:
            return pin
        task = self._lookups.get(name)
        if task is None:
            task = self._lookups[name] = asyncio.ensure_future(self._look_up(name))
            task.add_done_callback(lambda _: self._lookups.pop(name, None))
        return await asyncio.shield(task)  # one caller's cancellation leaves the lookup to the others

    async def _look_up(self, name: str) -> Pin:
        try:
            addresses = await lookup(name)
        except OSError as exc:
            raise RequestError("ConnectError", f"cannot resolve {name}: {exc}") from exc
        if not addresses:
            raise RequestError("ConnectError", f"{name} resolves to no address")
        pin = self._pins[name] = Pin(_keeping(self._pins.get(name), addresses), time.monotonic() + self.ttl_s)
        return pin


def _keeping(previous: Pin | None, addresses: tuple[str, ...]) -> tuple[str, ...]:
    """`addresses` with the pinned one first while the answer still holds it: a round-robin answer
    (the same addresses in another order) keeps the name's client and its connections."""
    if previous is None or previous.address not in addresses:
        return addresses
    return (previous.address, *(address for address in addresses if address != previous.address))
