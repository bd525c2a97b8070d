"""Geometric means and 95% t intervals of ratios and perplexities over seeds (they average on the log scale)."""

from __future__ import annotations

import math
from statistics import fmean, stdev


def geometric_interval(values: list[float]) -> tuple[float, tuple[float, float] | None]:
    """The geometric mean of `values` and the 95% Student-t interval of it (None with fewer than two values)."""
    logs = [math.log(v) for v in values]
    mean = fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), None
    from scipy.stats import t as student_t  # scikit-learn's dependency, present with the lm-eval extra

    half = student_t.ppf(0.975, len(logs) - 1) * stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), (math.exp(mean - half), math.exp(mean + half))
