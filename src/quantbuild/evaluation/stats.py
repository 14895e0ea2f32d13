"""Confidence intervals, so the gate can tell a real drop from sampling noise."""

from __future__ import annotations

import math

# The two-sided 95% interval's z: the gate's own, wherever no stricter one is recorded.
Z95 = 1.96


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_drop_interval(baseline: list[bool], variant: list[bool], z: float = Z95) -> tuple[float, float, float]:
    """(drop, low, high): the baseline's score minus the variant's on the same items, with
    Newcombe's hybrid score interval for a difference of paired proportions (his method 10,
    Stat. Med. 1998). It uses the pairing: items both get right or both get wrong carry no
    evidence of a drop, so one changed answer in 300 is not a 1-point "drop" on its own."""
    if len(baseline) != len(variant):
        raise ValueError("paired outcomes of different lengths")
    n = len(baseline)
    if n == 0:
        return (0.0, -1.0, 1.0)
    both = sum(1 for b, v in zip(baseline, variant) if b and v)
    lost = sum(1 for b, v in zip(baseline, variant) if b and not v)
    gained = sum(1 for b, v in zip(baseline, variant) if v and not b)
    neither = n - both - lost - gained
    p1, p2 = (both + lost) / n, (both + gained) / n
    l1, u1 = wilson_interval(both + lost, n, z)
    l2, u2 = wilson_interval(both + gained, n, z)
    product = (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    phi = 0.0
    if product:
        concordance = both * neither - lost * gained
        # Newcombe's continuity correction of the correlation, for positive association.
        concordance = max(concordance - n / 2, 0.0) if concordance > 0 else concordance
        phi = concordance / math.sqrt(product)
    drop = p1 - p2
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (drop, max(-1.0, drop - below), min(1.0, drop + above))


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): a distribution-free interval for the median from order statistics
    (exact binomial sign-test ranks; for 9 values: the 2nd and 8th smallest, 96% coverage).
    Below 6 values no pair of ranks reaches 95%: the interval is then the whole range."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of no values")
    tail = (1 - confidence) / 2
    rank, below = 0, 0.0
    while rank < n // 2:
        below += math.comb(n, rank) / 2**n  # P(fewer than rank + 1 values below the median)
        if below > tail:
            break
        rank += 1
    rank = max(rank - 1, 0)
    return (percentile(ordered, 50), ordered[rank], ordered[n - 1 - rank])


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
