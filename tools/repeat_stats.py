"""The statistics of a group of repeats (one preset, several random seeds), computed here
only: the MLflow group runs (tools.repeats) and the results table (tools.results_table) give
the same numbers for the same runs. Standard library only, so that what imports it needs
neither MLflow nor DVC."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def group_stats(values: Sequence[float]) -> dict:
    """n, mean, sample standard deviation, standard error of the mean (sd / sqrt(n)), min and
    max of a group of at least one value. With one value there is no spread: sd and the
    standard error are None."""
    if not values:
        raise ValueError("a group of repeats needs at least one value")
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else None
    return {"n": n, "mean": statistics.fmean(values), "sd": sd,
            "sem": sd / math.sqrt(n) if sd is not None else None,
            "min": min(values), "max": max(values)}
