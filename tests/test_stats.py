"""Unit tests of the pure statistics: hand-checked values and seeded samples."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from pytest_qmmperf import stats


def test_summarize_hand_checked() -> None:
    s = stats.summarize([1, 2, 3, 4, 100])
    assert (s.n, s.median, s.mean, s.min, s.max) == (5, 3.0, 22.0, 1.0, 100.0)
    assert s.iqr == 2.0  # q25 = 2, q75 = 4
    assert s.mad == 1.0  # |x - 3| = 2, 1, 0, 1, 97
    assert s.stdev == pytest.approx(math.sqrt(7610 / 4))
    assert s.rel_spread == pytest.approx(2 / 3)


def test_summarize_single_sample_has_zero_spread() -> None:
    s = stats.summarize([0.5])
    assert (s.n, s.median, s.stdev, s.iqr, s.mad) == (1, 0.5, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_summarize_rejects_empty_and_non_finite(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="samples"):
        stats.summarize(bad)


@pytest.mark.parametrize(
    ("value", "digits", "expected"),
    [(0.00123456, 4, 0.001235), (123456.0, 2, 120000.0), (-9.87654, 3, -9.88), (0.0, 4, 0.0)],
)
def test_round_sig(value: float, digits: int, expected: float) -> None:
    assert stats.round_sig(value, digits) == pytest.approx(expected, rel=1e-12)


def test_compact_small_sets_are_sorted_and_rounded_only() -> None:
    assert stats.compact([3.33333, 1.0, 2.123456]) == [1.0, 2.123, 3.333]


def test_compact_takes_mid_quantiles() -> None:
    # 0..8 at probabilities 1/6, 1/2, 5/6: positions 1.333, 4, 6.667 (linear interpolation).
    assert stats.compact(range(9), max_n=3) == [1.333, 4.0, 6.667]


def test_compact_preserves_distribution_and_bounds_size() -> None:
    rng = np.random.default_rng(1)
    raw = rng.lognormal(math.log(6.6e-3), 0.05, 2000)
    small = stats.compact(raw)
    assert len(small) == 32
    assert small == sorted(small)
    assert np.median(small) == pytest.approx(np.median(raw), rel=2e-3)
    q = np.quantile(raw, [0.25, 0.75])
    assert np.quantile(small, [0.25, 0.75]) == pytest.approx(q, rel=5e-3)
    assert len(json.dumps(small)) < 400  # about 11 characters a value


def test_compact_rejects_bad_max_n() -> None:
    with pytest.raises(ValueError, match="max_n"):
        stats.compact([1.0], max_n=0)


@pytest.mark.parametrize(("n", "m"), [(3, 4), (4, 4), (2, 6), (5, 3)])
def test_exact_rank_distribution_matches_enumeration(n: int, m: int) -> None:
    # Count U = #(x > y pairs) over every way to split ranks 0..n+m-1 into the two samples.
    counts = np.zeros(n * m + 1)
    for xs in itertools.combinations(range(n + m), n):
        ys = sorted(set(range(n + m)) - set(xs))
        counts[sum(x > y for x in xs for y in ys)] += 1
    expected = np.cumsum(counts) / counts.sum()
    assert stats._rank_sum_cdf(n, m) == pytest.approx(expected)


@pytest.mark.parametrize(
    # Published two-tailed alpha = 0.01 critical values of U (Mann-Whitney tables).
    ("n", "expected"),
    [(3, -1), (5, 0), (6, 2), (8, 7), (10, 16), (20, 105)],
)
def test_rank_critical_value_matches_tables(n: int, expected: int) -> None:
    assert stats.rank_critical_value(n, n, 0.005) == expected


def test_rank_critical_value_normal_approximation_agrees_with_exact() -> None:
    exact = stats.rank_critical_value(50, 50, 0.005)  # 2500 pairs: still exact
    sd = math.sqrt(50 * 50 * 101 / 12)
    approx = math.floor(1250 - 2.5758293 * sd - 0.5)
    assert abs(exact - approx) <= 2
    assert stats.rank_critical_value(60, 60, 0.005) == math.floor(
        1800 - 2.5758293 * math.sqrt(3600 * 121 / 12) - 0.5
    )


def test_shift_interval_covers_the_true_shift_at_its_level() -> None:
    rng = np.random.default_rng(7)
    covered = 0
    trials = 400
    for _ in range(trials):
        b = rng.normal(0.0, 1.0, 12)
        c = rng.normal(0.3, 1.0, 12)
        lo, hi = stats.shift_interval(b, c, confidence=0.90)
        covered += lo <= 0.3 <= hi
    # Binomial(400, >=0.90): the discrete interval is slightly conservative.
    assert 348 <= covered <= 385


def test_shift_interval_unbounded_when_too_few_samples() -> None:
    assert stats.shift_interval([1, 2, 3], [4, 5, 6], 0.99) == (-math.inf, math.inf)


def test_compare_detects_a_ten_percent_slowdown() -> None:
    rng = np.random.default_rng(3)
    b = rng.lognormal(math.log(1e-3), 0.02, 40)
    c = rng.lognormal(math.log(1.1e-3), 0.02, 40)
    ch = stats.compare(b, c)
    assert ch.significant_increase and not ch.significant_decrease
    assert ch.ci_low < 1.1 < ch.ci_high
    assert ch.change == pytest.approx(0.1, abs=0.02)
    assert ch.p_increase is not None and ch.p_increase < 1e-6
    assert ch.p_decrease is not None and ch.p_decrease > 0.99


def test_compare_aa_is_rarely_significant() -> None:
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(200):
        b = rng.lognormal(0.0, 0.05, 20)
        c = rng.lognormal(0.0, 0.05, 20)
        ch = stats.compare(b, c)
        hits += ch.significant_increase or ch.significant_decrease
    assert hits <= 5  # expected 1% of 200 = 2


def test_compare_ignores_one_wild_outlier() -> None:
    b = [1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01, 0.99]
    c = [1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01, 9.0]  # one context switch
    ch = stats.compare(b, c)
    assert not ch.significant_increase
    assert ch.ratio == pytest.approx(1.0, abs=0.01)


def test_compare_without_spread_is_exact() -> None:
    ch = stats.compare([2.68] * 3, [2.95] * 3)
    assert ch.exact
    assert ch.ci_low == ch.ci_high == pytest.approx(2.95 / 2.68)
    assert ch.significant_increase
    same = stats.compare([2.68] * 3, [2.68] * 3)
    assert same.ratio == 1.0 and not same.significant_increase
    assert same.p_increase is None  # nothing to test when every value is equal


def test_compare_non_positive_values_use_differences() -> None:
    b = [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # median 2
    c = [v + 2.0 for v in b]  # median 4: +100% of the baseline median
    ch = stats.compare(b, c, confidence=0.9)
    assert ch.ratio == pytest.approx(2.0)
    assert ch.ci_low < 2.0 < ch.ci_high


def test_compare_rejects_bad_confidence() -> None:
    with pytest.raises(ValueError, match="confidence"):
        stats.shift_interval([1, 2], [3, 4], confidence=1.0)


def test_wilson_interval_known_values() -> None:
    lo, hi = stats.wilson_interval(0, 200)
    assert lo == 0.0
    assert hi == pytest.approx(3.8415 / (200 + 3.8415), rel=1e-3)  # z^2 / (n + z^2)
    lo, hi = stats.wilson_interval(10, 100)
    assert (lo, hi) == pytest.approx((0.0552, 0.1744), abs=5e-4)
    with pytest.raises(ValueError, match="successes"):
        stats.wilson_interval(5, 4)


def test_fast_half() -> None:
    assert stats.fast_half([5.0, 1.0, 4.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert stats.fast_half([2.0, 1.0]) == [1.0]
    assert stats.fast_half([7.0]) == [7.0]


def test_fast_median_is_the_median_of_the_faster_half():
    # faster half of [5, 1, 3, 100, 2]: [1, 2, 3] -> 2; of [4, 1, 2, 3]: [1, 2] -> 1.5
    assert stats.fast_median([5, 1, 3, 100, 2]) == 2
    assert stats.fast_median([4, 1, 2, 3]) == 1.5
