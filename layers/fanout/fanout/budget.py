"""How long one call may run: the answer must leave before API Gateway or Lambda gives up.

The smallest of what the caller asked for, the function's FANOUT_DEADLINE_S
(below API Gateway's 29-30 s) and what Lambda says is left of the invocation,
minus a margin to write and post the answer. Without that last term a function
whose invocation started late (a slow cold start, a queue) would be killed by
Lambda mid-call and the caller would get nothing.
"""

from __future__ import annotations

import math
from typing import Any

LAMBDA_MARGIN_S = 1.0  # kept back from Lambda's remaining time to write and post the answer
SHORTEST_S = 0.001  # a call always gets to report its requests, if only as skipped


def call_budget_s(asked: float | None, configured: float, context: Any) -> float:
    """Seconds this call may run; `context` is the Lambda context (None outside Lambda)."""
    budget = min(asked or math.inf, configured)
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is not None:
        budget = min(budget, remaining() / 1000 - LAMBDA_MARGIN_S)
    return max(budget, SHORTEST_S)
