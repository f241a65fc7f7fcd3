"""What a /batch call holds of its upstream answers: a bounded sum, the largest parts let go first.

A /batch answer holds at most FANOUT_MAX_RESPONSE_BYTES, and the largest parts are
dropped to fit it, bodies before headers (fanout.batch_response). Holding every
answer until then cost n times what one may bring: 1,000 bodies of 256 KiB peaked at
889 MB, 1,000 heads of 90 headers of 4 KB (a head both clients take) at 1.1 GB, in a
512 MB function that Lambda kills, and the caller got a 502 for the whole batch.

So every answer's parts are counted as they arrive, and while their sum is over the
budget the largest body is let go (the largest headers once no body is left) and its
item marked `body_dropped` (`headers_dropped`), as the answer would have marked it.
An answer that still fits the budget in full goes back to the engine as it is (the
common case costs a count); past that, each answer is handed back without its parts,
which are held here, so that letting one go frees it. The call holds at most twice
the budget: once in what the engine keeps whole, once here. With a budget of twice
the answer's limit, what is let go is what the answer would drop (a part posts at
least half its size; pretty-printed JSON far below that is the exception).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from fanout.transports import head_bytes

if TYPE_CHECKING:
    from fanout.batch import ItemReport

HELD_ANSWERS_FACTOR = 2  # the budget, in answers' limits (FANOUT_MAX_RESPONSE_BYTES)


class _Sizes:
    """One kind of part (bodies, or headers): each item's size, largest first, and what was let go."""

    def __init__(self) -> None:
        self.let_go: set[int] = set()
        self._largest: list[tuple[int, int]] = []  # (-size, -index): of equal sizes, the later goes first

    def add(self, index: int, size: int) -> None:
        if size:
            heapq.heappush(self._largest, (-size, -index))

    def let_largest_go(self) -> tuple[int, int] | None:
        """Let the largest part go: its item and size (None if none is left)."""
        if not self._largest:
            return None
        negative_size, negative_index = heapq.heappop(self._largest)
        self.let_go.add(-negative_index)
        return -negative_index, -negative_size


class HeldAnswers:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.total = 0  # the parts counted and not let go
        self._whole = 0  # the parts of the answers handed back whole: the engine holds them to the end
        self._parts: dict[int, tuple[bytes, dict[str, str]]] = {}  # the parts of those handed back without
        self._bodies = _Sizes()
        self._headers = _Sizes()

    def hold(self, index: int, report: ItemReport) -> ItemReport:
        """Count the answer's parts, letting the largest go past the budget; the report as the engine
        may keep it (whole while that fits the budget, else without its parts, held here)."""
        response = report.response
        if response is None:
            return report
        body_size = len(response.body)
        headers_size = head_bytes(response.headers)
        self._bodies.add(index, body_size)
        self._headers.add(index, headers_size)
        self.total += body_size + headers_size
        whole = self._whole + body_size + headers_size <= self.budget_bytes
        if whole:
            self._whole += body_size + headers_size
        else:
            self._parts[index] = (response.body, response.headers)
        while self.total > self.budget_bytes:
            self._let_largest_go()
        return report if whole else report._replace(response=response._replace(body=b"", headers={}))

    def _let_largest_go(self) -> None:
        """The largest body (or, with none left, the largest headers): counted no more, and freed if held here."""
        body = self._bodies.let_largest_go()
        if body is not None:
            index, size = body
            if index in self._parts:
                self._parts[index] = (b"", self._parts[index][1])
        else:
            headers = self._headers.let_largest_go()
            assert headers is not None  # the total counts only parts still in the heaps
            index, size = headers
            if index in self._parts:
                self._parts[index] = (self._parts[index][0], {})
        self.total -= size

    def give_back(self, index: int, report: ItemReport) -> ItemReport:
        """The report with its parts, less those let go (marked so)."""
        response = report.response
        body_dropped, headers_dropped = index in self._bodies.let_go, index in self._headers.let_go
        parts = self._parts.pop(index, None)
        if response is None or (parts is None and not (body_dropped or headers_dropped)):
            return report  # handed back whole, nothing let go: as it is
        body, headers = parts or (response.body, response.headers)
        return report._replace(
            response=response._replace(body=b"" if body_dropped else body, headers={} if headers_dropped else headers),
            body_dropped=body_dropped,
            headers_dropped=headers_dropped,
        )
