"""The upstream bodies a /batch call holds for its answer: a bounded sum, the largest let go first.

A /batch answer holds at most FANOUT_MAX_RESPONSE_BYTES, and the largest parts are
dropped to fit it (fanout.batch_response). Holding every body until then cost n times
FANOUT_MAX_ITEM_BYTES: 1,000 items of 256 KiB peaked at 889 MB in a 512 MB function,
which Lambda kills, and the caller got a 502 for the whole batch. So a call's bodies
are held here as they arrive, and while their sum is over the budget the largest is
let go and its item marked `body_dropped`, as the answer would have marked it. With a
budget of twice the answer's limit, what is let go is what the answer would drop
(a body posts at least half its size; pretty-printed JSON far below that is the
exception), and the peak is the budget, not n bodies.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fanout.batch import ItemReport

HELD_BODIES_FACTOR = 2  # the budget, in answers' limits (FANOUT_MAX_RESPONSE_BYTES)


class HeldBodies:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.total = 0
        self._bodies: dict[int, bytes] = {}
        self._largest: list[tuple[int, int]] = []  # (-size, -index): a max-heap of what is held
        self._let_go: set[int] = set()

    def hold(self, index: int, report: ItemReport) -> ItemReport:
        """The report without its body, which is held here (or let go, with the largest, past the budget)."""
        response = report.response
        if response is None or not response.body:
            return report
        size = len(response.body)
        self._bodies[index] = response.body
        self.total += size
        heapq.heappush(self._largest, (-size, -index))  # of equal sizes, the later goes first, as in the answer
        while self.total > self.budget_bytes:
            _, negative_index = heapq.heappop(self._largest)
            self.total -= len(self._bodies.pop(-negative_index))
            self._let_go.add(-negative_index)
        return report._replace(response=response._replace(body=b""))

    def give_back(self, index: int, report: ItemReport) -> ItemReport:
        """The report with its body again, or marked `body_dropped` if it was let go."""
        if index in self._let_go:
            return report._replace(body_dropped=True)
        body = self._bodies.get(index)
        if body is None or report.response is None:
            return report
        return report._replace(response=report.response._replace(body=body))
