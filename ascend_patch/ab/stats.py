"""Medians, their exact 95% intervals, paired ratios and the order of A/B runs.

The interval of a median is the distribution-free order-statistic interval: for n samples
sorted x(1) <= ... <= x(n), [x(k), x(n+1-k)] holds the true median with probability
1 - 2 P(Bin(n, 1/2) <= k - 1), and k is the largest index for which that is >= 95%. It
assumes only independent samples from one distribution (no normality, no resampling, so the
same samples always give the same interval). It needs n >= 6: with 5 samples even [min, max]
covers the median only 93.75% of the time.

Paired ratios: repeat i of an arm and repeat i of the reference ran in the same block, close
in time, so their ratio cancels most of the machine's slow drifts (another engineer's build,
thermal state). The interval is the median's interval of those per-pair ratios.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
# Fewest samples for which some order-statistic interval reaches CONFIDENCE (1 - 2/2^6).
MIN_SAMPLES = 6


@dataclass(frozen=True)
class Estimate:
    """A median with its exact interval (lo, hi are None below MIN_SAMPLES samples)."""

    median: float
    lo: float | None
    hi: float | None
    coverage: float | None
    n: int

    def holds(self, value: float) -> bool | None:
        if self.lo is None or self.hi is None:
            return None
        return self.lo <= value <= self.hi

    def as_json(self) -> dict[str, float | int | None]:
        return {"median": self.median, "lo": self.lo, "hi": self.hi, "coverage": self.coverage,
                "n": self.n, "method": "order-statistic (binomial) interval of the median"}


def median_interval_rank(n: int, confidence: float = CONFIDENCE) -> tuple[int, float] | None:
    """(k, coverage) of the interval [x(k), x(n+1-k)] (1-based), or None if n is too small."""
    best = None
    total = 2 ** n
    below = 0  # 2^n P(Bin(n, 1/2) <= k - 1): the interval misses when x(k) is above the median
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1)
        coverage = 1 - 2 * below / total
        if coverage < confidence:
            break
        best = (k, coverage)
    return best


def estimate(samples: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    n = len(ordered)
    rank = median_interval_rank(n, confidence)
    if rank is None:
        return Estimate(statistics.median(ordered), None, None, None, n)
    k, coverage = rank
    return Estimate(statistics.median(ordered), ordered[k - 1], ordered[n - k], coverage, n)


def paired_ratios(arm: Sequence[float], reference: Sequence[float]) -> list[float]:
    """arm[i] / reference[i] for each repeat i (the two ran in the same block)."""
    if len(arm) != len(reference):
        raise ValueError(f"{len(arm)} samples against {len(reference)}: pairs need equal counts")
    return [a / r for a, r in zip(arm, reference)]


def verdict(ratio: Estimate, better_above_one: bool = True) -> str:
    """A plain statement about a ratio of arm to reference."""
    inside = ratio.holds(1.0)
    if inside is None:
        return f"too few repeats for a 95% interval (n={ratio.n}, need {MIN_SAMPLES})"
    if inside:
        return "no measurable difference"
    faster = (ratio.lo > 1.0) == better_above_one
    return "better" if faster else "worse"


def block_order(arms: int, blocks: int, seed: int) -> list[list[int]]:
    """Randomised blocks: each block runs every arm once, in an order drawn from `seed`.

    A fixed ABAB order would always run B right after A (caches A left warm, the second of
    two on a machine that is slowly getting busier); a fresh permutation per block spreads
    such effects over all arms. The RNG is private, so the order is a function of the seed.
    """
    rng = random.Random(seed)
    order = []
    for _ in range(blocks):
        block = list(range(arms))
        rng.shuffle(block)
        order.append(block)
    return order
