"""Paired ratios: how the benchmarks compare configurations on a shared, noisy machine.

Each round runs every configuration once (in a shuffled order), and a configuration's
figure in a round is divided by the reference's in the same round, so drift that hits a
round hits both sides of its ratio alike. Reported: the median of those ratios and
their quartiles.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def paired_ratio(mine: Sequence[float], reference: Sequence[float]) -> tuple[float, float, float]:
    """The median, first and third quartile of `mine[i] / reference[i]` over the rounds."""
    ratios = [a / b for a, b in zip(mine, reference, strict=True)]
    first, _, third = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), first, third
