"""A job's per-target ceilings, on the container's limiters while the job's chunks run.

A job may ask, per target, for at most `max_in_flight` requests at once and `rate_per_s`
a second, for all its workers together: each worker takes an equal share. The
limiters are the container's, one per target, shared by every chunk it runs at once
(of any job) and kept across invocations. So while chunks run, a target's ceilings
are the strictest of the configured ones (FANOUT_UPSTREAMS, FANOUT_MAX_CONCURRENCY)
and of each running job's share, and once they end the configured ones come back:
a job can ask for less than the operator allows, never more, and what it asks ends
with its chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

from fanout.politeness import Politeness


class Share(NamedTuple):
    """One running job's part of a target's ceilings (None: the job sets none)."""

    target: str
    max_in_flight: int | None
    rate_per_s: float | None


class JobCeilings:
    def __init__(self, politeness: Politeness, *, workers: int) -> None:
        self.politeness = politeness
        self.workers = workers  # the job's ceilings are shared out among this many
        self._running: list[Share] = []

    @contextlib.contextmanager
    def applied(self, targets: Mapping[str, Mapping[str, float]]) -> Iterator[None]:
        """The job's ceilings (the spec's `targets`) hold for the `with` block."""
        shares = [self._share(name, limits) for name, limits in targets.items()]
        self._running += shares
        self._set({share.target for share in shares})
        try:
            yield
        finally:
            for share in shares:
                self._running.remove(share)
            self._set({share.target for share in shares})

    def _share(self, target: str, limits: Mapping[str, float]) -> Share:
        in_flight, rate = limits.get("max_in_flight"), limits.get("rate_per_s")
        return Share(
            target,
            max(1, int(in_flight) // self.workers) if in_flight else None,
            float(rate) / self.workers if rate else None,
        )

    def _set(self, targets: set[str]) -> None:
        for target in targets:
            ceiling, rate = self.politeness.configured(target)
            for share in self._running:
                if share.target != target:
                    continue
                if share.max_in_flight is not None:
                    ceiling = min(ceiling, share.max_in_flight)
                if share.rate_per_s is not None:
                    rate = share.rate_per_s if rate is None else min(rate, share.rate_per_s)
            self.politeness.limiter(target).set_ceilings(ceiling, rate)
