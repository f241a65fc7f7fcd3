"""What a /batch call holds of its upstream answers: a bounded sum, the largest parts let go first.

A /batch answer holds at most FANOUT_MAX_RESPONSE_BYTES, and the largest parts are
dropped to fit it, bodies before headers (fanout.batch_response). Holding every
answer until then cost n times what one may bring: 1,000 bodies of 256 KiB peaked at
889 MB, 1,000 heads of 90 headers of 4 KB (a head both clients take) at 1.1 GB, in a
512 MB function that Lambda kills, and the caller got a 502 for the whole batch. So
a call's bodies and headers are held here as they arrive, and while their sum is
over the budget the largest held body is let go (the largest headers once no body
is left) and its item marked `body_dropped` (`headers_dropped`), as the answer would
have marked it. With a budget of twice the answer's limit, what is let go is what
the answer would drop (a part posts at least half its size; pretty-printed JSON far
below that is the exception), and the peak is the budget, not n answers.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fanout.batch import ItemReport

HELD_ANSWERS_FACTOR = 2  # the budget, in answers' limits (FANOUT_MAX_RESPONSE_BYTES)


class _Held:
    """One part (bodies, or headers) of what is held: by item, with a max-heap of sizes."""

    def __init__(self) -> None:
        self.parts: dict[int, object] = {}
        self.sizes: dict[int, int] = {}
        self.let_go: set[int] = set()
        self._largest: list[tuple[int, int]] = []  # (-size, -index): of equal sizes, the later goes first

    def add(self, index: int, part: object, size: int) -> None:
        self.parts[index], self.sizes[index] = part, size
        heapq.heappush(self._largest, (-size, -index))

    def drop_largest(self) -> int:
        """Let the largest part go; the bytes that freed (0 if nothing is held)."""
        if not self._largest:
            return 0
        _, negative_index = heapq.heappop(self._largest)
        index = -negative_index
        del self.parts[index]
        self.let_go.add(index)
        return self.sizes.pop(index)


class HeldAnswers:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.total = 0
        self._bodies = _Held()
        self._headers = _Held()

    def hold(self, index: int, report: ItemReport) -> ItemReport:
        """The report without its body and headers, which are held here (or let go, the largest first,
        past the budget)."""
        response = report.response
        if response is None:
            return report
        if response.body:
            self._bodies.add(index, response.body, len(response.body))
            self.total += len(response.body)
        if response.headers:
            size = sum(len(name) + len(value) for name, value in response.headers.items())
            self._headers.add(index, response.headers, size)
            self.total += size
        while self.total > self.budget_bytes:
            self.total -= self._bodies.drop_largest() or self._headers.drop_largest()
        return report._replace(response=response._replace(body=b"", headers={}))

    def give_back(self, index: int, report: ItemReport) -> ItemReport:
        """The report with its body and headers again, or marked as having had them let go."""
        response = report.response
        if response is None:
            return report
        body = self._bodies.parts.get(index, response.body)
        headers = self._headers.parts.get(index, response.headers)
        return report._replace(
            response=response._replace(body=body, headers=headers),
            body_dropped=index in self._bodies.let_go,
            headers_dropped=index in self._headers.let_go,
        )
