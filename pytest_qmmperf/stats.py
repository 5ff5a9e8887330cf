"""Statistics of benchmark samples: summaries, change estimates, significance, compaction.

Pure functions on plain sequences of floats: no pytest, no MLX.

The gate compares two sample sets of one metric, the baseline's ``b`` and the
current run's ``c``, and needs three things from this module:

* **How big is the change?**  The ratio of medians ``median(c) / median(b)``:
  what a reader checks by hand against the two medians in the report.
* **How sure are we of it?**  A distribution-free confidence interval for the
  ratio: the Hodges-Lehmann / Moses interval for a shift of ``log(c)``
  against ``log(b)``.  It is the set of ratios the Mann-Whitney rank test
  cannot reject, so "the interval excludes 1" and "the rank test is
  significant at the same level" are one and the same statement.  Ranks make
  it immune to the odd outlier (a shared runner's context switch) that
  inflates a t-test's variance or drags a mean.
* **A p-value** to print: Mann-Whitney U from :mod:`scipy.stats`, one-sided
  in the direction asked about.

Times and rates are positive and change by factors, so the interval is built
on logarithms; a set containing zero or negative values (none of the shipped
metrics, but a user's ``info`` could) falls back to the plain difference,
reported relative to the baseline median.

Sample sets without any spread (peak memory is usually the same in every
round) are compared exactly: the interval collapses to the one observed
ratio.  That is why a memory regression is caught from three rounds, while
a timing with spread needs at least five rounds per side to reach 99%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats as _sps

#: Default two-sided confidence level of :func:`compare`'s interval.
DEFAULT_CONFIDENCE = 0.99

#: Above this many (n*m) pairs the rank distribution is taken as normal; below
#: it is computed exactly (a few milliseconds, cached per size pair).
_EXACT_PAIRS_LIMIT = 2500


@dataclass(frozen=True)
class Summary:
    """Robust and classical descriptors of one sample set, in the metric's unit.

    ``iqr`` is the interquartile range (linear interpolation between order
    statistics); ``mad`` the median absolute deviation from the median,
    unscaled; ``stdev`` the sample standard deviation (0 for one sample).
    """

    n: int
    median: float
    mean: float
    stdev: float
    iqr: float
    mad: float
    min: float
    max: float

    @property
    def rel_spread(self) -> float:
        """IQR relative to the median: a unit-free noise figure (NaN at median 0)."""
        return self.iqr / self.median if self.median else math.nan


def _array(samples: Sequence[float] | np.ndarray, what: str = "samples") -> np.ndarray:
    values = np.asarray(list(samples), dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what}: need at least one value, got {len(values)}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what}: all values must be finite numbers, got {list(samples)!r}")
    return values


def summarize(samples: Sequence[float]) -> Summary:
    """Summary of a non-empty set of finite samples (``ValueError`` otherwise)."""
    x = _array(samples)
    median = float(np.median(x))
    q25, q75 = np.quantile(x, [0.25, 0.75])
    return Summary(
        n=int(x.size),
        median=median,
        mean=float(np.mean(x)),
        stdev=float(np.std(x, ddof=1)) if x.size > 1 else 0.0,
        iqr=float(q75 - q25),
        mad=float(np.median(np.abs(x - median))),
        min=float(np.min(x)),
        max=float(np.max(x)),
    )


def round_sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (0 and non-finite pass through)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def compact(samples: Sequence[float], max_n: int = 32, digits: int = 4) -> list[float]:
    """Bounded, quantile-preserving copy of ``samples`` for storage.

    Returns the samples sorted and rounded to ``digits`` significant digits.
    More than ``max_n`` samples are replaced by the ``max_n`` quantiles at
    probabilities ``(i + 0.5) / max_n``: the result's empirical distribution
    (and so its median, spread and rank comparisons) matches the original's,
    while a baseline file stays small however many rounds ran.  Four
    significant digits resolve 0.05%, a hundredth of any sensible threshold.
    """
    if max_n < 1:
        raise ValueError(f"max_n={max_n!r}: must be at least 1")
    x = np.sort(_array(samples))
    if x.size > max_n:
        x = np.quantile(x, (np.arange(max_n) + 0.5) / max_n)
    return [round_sig(float(v), digits) for v in x]


def fast_half(samples: Sequence[float]) -> list[float]:
    """The faster (smaller) half of a set of times, sorted: ``ceil(n / 2)`` values.

    Interference from other work only ever slows a workload down, and a
    passing spike hits some rounds and not others: the faster half of a
    burst measures the machine's undisturbed speed, while a sustained
    slowdown (throttling, steady load) moves it as much as the median.
    """
    x = np.sort(_array(samples))
    return [float(v) for v in x[: (x.size + 1) // 2]]


def fast_median(samples: Sequence[float]) -> float:
    """The median of :func:`fast_half`: the undisturbed speed a burst of times stands for."""
    return summarize(fast_half(samples)).median


@lru_cache(maxsize=256)
def _rank_sum_cdf(n: int, m: int) -> np.ndarray:
    """Exact null CDF of the Mann-Whitney U statistic for sizes ``n`` and ``m``.

    ``P(U = u)`` follows ``p(n, m, u) = n/(n+m) p(n-1, m, u-m) + m/(n+m) p(n, m-1, u)``
    (the largest of the ``n + m`` values belongs to the first sample or the
    second); probabilities rather than counts keep it in float64.
    """
    # table[j] holds the distribution for sizes (i, j) of the current row i.
    row = [np.ones(1) for _ in range(m + 1)]  # i = 0: U is always 0
    for i in range(1, n + 1):
        new = [np.ones(1)]  # j = 0: U is always 0
        for j in range(1, m + 1):
            size = i * j + 1
            dist = np.zeros(size)
            up = row[j]  # sizes (i-1, j): the largest is from sample 1, adding j to U
            dist[j : j + up.size] += i / (i + j) * up
            left = new[j - 1]  # sizes (i, j-1)
            dist[: left.size] += j / (i + j) * left
            new.append(dist)
        row = new
    return np.cumsum(row[m])


def rank_critical_value(n: int, m: int, alpha: float) -> int:
    """Largest ``c`` with ``P(U <= c) <= alpha`` under the null hypothesis, or -1 if none.

    Exact for ``n*m <= 2500``, else from the normal approximation with a
    continuity correction.  ``-1`` means the samples are too few for any
    result to be significant at level ``alpha`` (e.g. 3 against 3 at 0.5%).
    """
    if n < 1 or m < 1:
        return -1
    if n * m <= _EXACT_PAIRS_LIMIT:
        cdf = _rank_sum_cdf(n, m)
        # Tolerance: the recurrence accumulates rounding in the last bits.
        below = np.nonzero(cdf <= alpha * (1 + 1e-9))[0]
        return int(below[-1]) if below.size else -1
    mean = n * m / 2.0
    sd = math.sqrt(n * m * (n + m + 1) / 12.0)
    z = float(_sps.norm.ppf(alpha))
    return max(-1, math.floor(mean + z * sd - 0.5))


@dataclass(frozen=True)
class Change:
    """How ``current`` compares with ``baseline`` for one metric.

    ``ratio`` is ``median(current) / median(baseline)``; ``ci_low`` and
    ``ci_high`` bound that ratio at ``confidence`` (two-sided; infinite when
    the samples are too few to bound it).  ``p_increase`` / ``p_decrease`` are
    one-sided Mann-Whitney p-values for "current tends to be larger/smaller"
    (``None`` when undefined: every value in both sets equal).
    ``exact`` says both sets had no spread, so the ratio is known exactly.
    """

    ratio: float
    ci_low: float
    ci_high: float
    confidence: float
    p_increase: float | None
    p_decrease: float | None
    n_baseline: int
    n_current: int
    exact: bool = False

    @property
    def change(self) -> float:
        """Fractional change of the median: ``+0.05`` is 5% larger."""
        return self.ratio - 1.0

    @property
    def significant_increase(self) -> bool:
        """The whole interval lies above 1: current is larger, beyond noise."""
        return self.ci_low > 1.0

    @property
    def significant_decrease(self) -> bool:
        """The whole interval lies below 1: current is smaller, beyond noise."""
        return self.ci_high < 1.0


def shift_interval(
    baseline: Sequence[float] | np.ndarray,
    current: Sequence[float] | np.ndarray,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Hodges-Lehmann / Moses confidence interval for the shift of ``current`` over ``baseline``.

    The interval runs between order statistics ``C+1`` and ``nm-C`` (1-based)
    of the ``n*m`` pairwise differences ``c_i - b_j``, where ``C`` is the
    rank test's critical value at ``(1 - confidence) / 2``.  Returns
    ``(-inf, inf)`` when the samples are too few to bound the shift.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: must lie strictly between 0 and 1")
    b = _array(baseline, "baseline")
    c = _array(current, "current")
    crit = rank_critical_value(b.size, c.size, (1.0 - confidence) / 2.0)
    if crit < 0:
        return (-math.inf, math.inf)
    diffs = np.sort((c[:, None] - b[None, :]).ravel())
    return (float(diffs[crit]), float(diffs[diffs.size - 1 - crit]))


def _p_value(baseline: np.ndarray, current: np.ndarray, alternative: str) -> float | None:
    if np.all(baseline == baseline[0]) and np.all(current == baseline[0]):
        return None  # no information at all: every value equal
    p = float(_sps.mannwhitneyu(current, baseline, alternative=alternative).pvalue)
    return None if math.isnan(p) else p


def compare(
    baseline: Sequence[float],
    current: Sequence[float],
    confidence: float = DEFAULT_CONFIDENCE,
) -> Change:
    """Change of ``current`` against ``baseline``: median ratio, its interval, p-values.

    Positive samples are compared on a log scale (a ratio); otherwise as a
    difference relative to the baseline median.  See the module docstring.
    """
    b = _array(baseline, "baseline")
    c = _array(current, "current")
    med_b = float(np.median(b))
    med_c = float(np.median(c))
    p_inc = _p_value(b, c, "greater")
    p_dec = _p_value(b, c, "less")
    no_spread = bool(np.all(b == b[0]) and np.all(c == c[0]))
    positive = bool(np.all(b > 0) and np.all(c > 0))

    if positive:
        ratio = med_c / med_b
        if no_spread:
            lo = hi = ratio
        else:
            lo_log, hi_log = shift_interval(np.log(b), np.log(c), confidence)
            lo, hi = math.exp(lo_log), math.exp(hi_log)
    else:
        if med_b == 0:
            # Relative change is undefined; report no ratio rather than a made-up one.
            ratio = 1.0 if med_c == 0 else math.copysign(math.inf, med_c)
            lo, hi = (ratio, ratio) if no_spread else (-math.inf, math.inf)
        else:
            ratio = med_c / med_b
            if no_spread:
                lo = hi = ratio
            else:
                lo_d, hi_d = shift_interval(b, c, confidence)
                scale = abs(med_b)
                lo, hi = 1.0 + lo_d / scale, 1.0 + hi_d / scale
    return Change(
        ratio=ratio,
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
        p_increase=p_inc,
        p_decrease=p_dec,
        n_baseline=int(b.size),
        n_current=int(c.size),
        exact=no_spread,
    )


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (e.g. a false-failure rate)."""
    if trials <= 0:
        raise ValueError(f"trials={trials!r}: must be positive")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes!r}: must lie in 0..{trials}")
    z = float(_sps.norm.ppf(0.5 + confidence / 2.0))
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, not rounding residue
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return (lo, hi)
