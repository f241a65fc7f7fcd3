"""Stand-ins for the pyreqwest transport's two contacts with the outside: DNS and the connect.

- `stub_lookup`: fanout.pinning.lookup answered from a table; a name not in it does not
  resolve, so no test asks a real DNS server anything.
- `RecordingClient`: stands in for a pyreqwest client. It records where reqwest would
  connect (the address a name's client is pinned to, or the literal as reqwest parses the
  URL) and connects nowhere, failing as a refused connect does.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

from pyreqwest.exceptions import ConnectError

from fanout.pinning import destination
from fanout.transport_pyreqwest import CONNECTING

#: Where an unpinned name would have been looked up by reqwest itself: a guard bug, recorded as such.
UNPINNED = "unpinned"


def stub_lookup(
    answers: dict[str, list[str]], calls: list[str] | None = None
) -> Callable[[str], Awaitable[tuple[str, ...]]]:
    async def lookup(name: str) -> tuple[str, ...]:
        if calls is not None:
            calls.append(name)
        if name not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (stub)")
        return tuple(answers[name])

    return lookup


class RecordingClient:
    """Records each request's connect as (address, port); `pinned` is (name, address) for a name's client."""

    def __init__(self, attempts: list[tuple[str, int]], pinned: tuple[str, str] | None) -> None:
        self.attempts = attempts
        self.pinned = pinned
        self.url = ""

    def request(self, method: str, url: str) -> RecordingClient:
        self.url = url
        return self

    def get(self, url: str) -> RecordingClient:
        return self.request("GET", url)

    def headers(self, headers: Any) -> RecordingClient:
        return self

    def timeout(self, timeout: Any) -> RecordingClient:
        return self

    def body_bytes(self, body: bytes) -> RecordingClient:
        return self

    def build_streamed(self) -> RecordingClient:
        where = destination(self.url)
        if where.address is not None:
            self.attempts.append((where.address, where.port))
        elif self.pinned is not None and self.pinned[0] == where.host:
            self.attempts.append((self.pinned[1], where.port))
        else:
            self.attempts.append((f"{UNPINNED} {where.host}", where.port))
        return self

    async def __aenter__(self) -> Any:
        raise ConnectError("connection error", {"causes": [{"message": CONNECTING}, {"message": "intercepted"}]})

    async def __aexit__(self, *args: object) -> None:
        pass

    async def close(self) -> None:
        pass
