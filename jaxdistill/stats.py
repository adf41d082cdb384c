"""The statistics every report uses: spreads over seeds, bootstrap intervals over problems and
seeds (paired where arms share problems), and the smallest difference an evaluation can detect.

Per-problem outcomes come as [seeds, problems] arrays; every seed of every arm sees the same
held-out problems, so a difference between two arms is taken problem by problem, seed by seed.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

DRAWS = 2000
Z_95 = 1.959964
POWER_80 = 0.841621  # z of 80% power: a true difference of (Z_95 + POWER_80) standard errors is found 80% of the time


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for one value) of the finite values."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of a few values (seeds), ddof=1."""
    mean, sd = mean_sd(values)
    n = int(np.isfinite(np.asarray(values, np.float64)).sum())
    if n < 2:
        return float("nan"), float("nan")
    half = scipy_stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
    return mean - half, mean + half


def bootstrap(per_problem, *, minus=None, draws: int = DRAWS, seed: int = 0) -> dict[str, float]:
    """Mean of [seeds, problems] outcomes with a two-level bootstrap: each draw resamples seeds,
    then problems, with replacement. `minus` (same shape) makes it the paired difference: both
    arms take the same draw of seeds and problems. Returns mean, low/high (95% percentile
    interval) and se (the draws' standard deviation). Conservative: each seed's mean also carries
    the problems' noise, which resampling seeds counts a second time (up to sqrt(2) x the error of
    independent seeds); with one seed it is the usual bootstrap over problems."""
    values = np.atleast_2d(np.asarray(per_problem, np.float64))
    if minus is not None:
        other = np.atleast_2d(np.asarray(minus, np.float64))
        if other.shape != values.shape:
            raise ValueError(f"a paired difference needs the same seeds and problems: {values.shape} vs {other.shape}")
        values = values - other
    seeds, problems = values.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, seeds, size=(draws, seeds)) if seeds > 1 else np.zeros((draws, 1), int)
    problem_draws = rng.integers(0, problems, size=(draws, problems))
    means = np.nanmean(values[seed_draws[:, :, None], problem_draws[:, None, :]], axis=(1, 2))
    return {"mean": float(np.nanmean(values)), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "se": float(means.std(ddof=1))}


def detectable_difference(se: float, dof: int | None = None) -> float:
    """The smallest true difference a two-sided 5% test finds with 80% power, given its standard
    error (normal quantiles; Student t's with `dof` when the error comes from a few seeds)."""
    if dof is None:
        return (Z_95 + POWER_80) * se
    return float((scipy_stats.t.ppf(0.975, dof) + scipy_stats.t.ppf(0.8, dof)) * se)



def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value of two arms' paired right/wrong outcomes on the same
    problems: a binomial test on the problems exactly one of them gets right."""
    a, b = np.asarray(a, bool).ravel(), np.asarray(b, bool).ravel()
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
