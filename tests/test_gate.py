"""Unit tests of the gate: thresholds, drift correction and verdicts on plain data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_qmmperf import gate, stats
from pytest_qmmperf.gate import Drift, ThresholdError, Thresholds, Verdict

REV = "abc1234def" + "0" * 30


def lognormal(median: float, sigma: float, n: int, seed: int) -> list[float]:
    return list(np.random.default_rng(seed).lognormal(math.log(median), sigma, n))


# --- thresholds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5%", (None, 0.05)),
        ("5", (None, 0.05)),
        ("0.5%", (None, 0.005)),
        (" 12.5 % ", (None, 0.125)),
        ("ttft_s=3%", ("ttft_s", 0.03)),
        ("prompt_tps: 2", ("prompt_tps", 0.02)),
    ],
)
def test_parse_threshold(text: str, expected: tuple[str | None, float]) -> None:
    name, value = gate.parse_threshold(text)
    assert name == expected[0]
    assert value == pytest.approx(expected[1])


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("abc", "not a percentage"),
        ("-5%", "above 0%"),
        ("0", "above 0%"),
        ("5000%", "below 1000%"),
        ("nan", "above 0%"),
        ("ttft=3%", "unknown metric 'ttft'"),
        ("tflops=3%", "tflops is reported but not gated"),
        ("time_s=fast", "not a percentage"),
    ],
)
def test_parse_threshold_rejects_with_input_and_accepted_forms(text: str, says: str) -> None:
    with pytest.raises(ThresholdError) as info:
        gate.parse_threshold(text, "--qmm-threshold")
    msg = str(info.value)
    assert says in msg
    assert repr(text.strip()) in msg and "--qmm-threshold" in msg
    assert "\n" not in msg


def test_parse_thresholds_splits_ini_items_and_later_wins() -> None:
    parsed = gate.parse_thresholds(["5%, ttft_s=3%", "ttft_s=4%  gen_tps=10"], "qmm_thresholds")
    assert parsed == {None: 0.05, "ttft_s": 0.04, "gen_tps": 0.10}


def test_parse_marker() -> None:
    assert gate.parse_marker(("7%",), {"ttft_s": 3}) == {None: 0.07, "ttft_s": 0.03}
    with pytest.raises(ThresholdError, match="at most one positional"):
        gate.parse_marker(("5%", "6%"), {})
    with pytest.raises(ThresholdError, match="unknown metric 'speed'"):
        gate.parse_marker((), {"speed": "5%"})


def test_threshold_precedence_marker_cli_ini_default() -> None:
    t = Thresholds.from_options(cli=["8%"], ini=["6%", "ttft_s=3%", "gen_tps=9%"])
    assert t.for_metric("time_s") == (0.08, "cli")
    # A command-line threshold loosens every metric, even one the ini names.
    assert t.for_metric("ttft_s") == (0.08, "cli")
    ini_only = Thresholds.from_options(ini=["6%", "ttft_s=3%"])
    assert ini_only.for_metric("ttft_s") == (0.03, "ini")
    assert ini_only.for_metric("time_s") == (0.06, "ini")
    assert Thresholds.from_options().for_metric("time_s") == (0.05, "default")
    marked = t.with_marker((), {"ttft_s": "2%"})
    assert marked.for_metric("ttft_s") == (0.02, "marker")
    assert marked.for_metric("time_s") == (0.08, "cli")


# --- drift --------------------------------------------------------------------


def test_drift_power_follows_units() -> None:
    powers = {m: gate.drift_power(m) for m in
              ("time_s", "ttft_s", "prompt_tps", "tflops", "roofline_pct", "peak_memory_gb")}
    assert powers == {"time_s": 1, "ttft_s": 1, "prompt_tps": -1, "tflops": -1,
                      "roofline_pct": -1, "peak_memory_gb": 0}


def test_estimate_drift_applies_only_when_significant_and_same_mlx() -> None:
    then = lognormal(6.6e-3, 0.02, 20, 1)
    busy = lognormal(12.1e-3, 0.02, 20, 2)
    d = gate.estimate_drift(then, busy)
    assert d is not None and d.applied
    assert d.ratio == pytest.approx(12.1 / 6.6, rel=0.03)
    assert "1.8" in d.describe() and "slower" in d.describe()
    other_mlx = gate.estimate_drift(then, busy, same_mlx=False)
    assert other_mlx is not None and not other_mlx.applied
    assert "another MLX version" in other_mlx.reason
    calm = gate.estimate_drift(then, lognormal(6.6e-3, 0.02, 20, 3))
    assert calm is not None and not calm.applied and "within noise" in calm.reason
    assert gate.estimate_drift(then, []) is None
    assert gate.estimate_drift(None, busy) is None


def test_a_small_shift_with_a_wide_interval_is_not_a_regression() -> None:
    base = [1.00] * 4 + [1.001] * 4
    # Medians 1.0005 -> 1.02 (+1.95%): the rank interval excludes no change and,
    # through the three slow rounds, reaches past 5%; but the change itself is
    # under half the threshold.
    small = [1.02] * 5 + [1.10] * 3
    ch = stats.compare(base, small)
    assert ch.significant_increase and ch.ci_high > 1.05 and ch.change < 0.025
    [v] = gate.judge("t", {"time_s": small}, {"time_s": base})
    assert v.status == "unchanged"
    # +2.95%: at least half the threshold, so the same interval shape fails.
    larger = [1.03] * 5 + [1.10] * 3
    [v] = gate.judge("t", {"time_s": larger}, {"time_s": base})
    assert v.status == "regression" and v.failed


def test_drift_under_the_floor_is_reported_not_corrected() -> None:
    # Identical spreadless samples, 4% and 6% slower: both changes are exact,
    # so significant; only the one beyond a 5% floor is corrected for.
    then = [1.0e-3] * 10
    four = gate.estimate_drift(then, [1.04e-3] * 10, min_change=0.05)
    assert four is not None and not four.applied
    assert four.ratio == pytest.approx(1.04)
    assert "under 5%, not corrected" in four.reason
    assert gate.estimate_drift(then, [1.04e-3] * 10).applied  # no floor
    six = gate.estimate_drift(then, [1.06e-3] * 10, min_change=0.05)
    assert six is not None and six.applied
    faster = gate.estimate_drift(then, [0.96e-3] * 10, min_change=0.05)
    assert faster is not None and not faster.applied  # 1/0.96 = 4.2% faster: under 5%


def test_drift_floor_is_zero_on_cpu_and_ten_percent_on_gpus() -> None:
    assert gate.drift_floor("cpu") == 0.0
    assert gate.drift_floor("cuda") == gate.drift_floor("metal") == 0.10


def test_correct_divides_times_multiplies_rates_leaves_memory() -> None:
    d = Drift(2.0, 1.9, 2.1, 1e-3, 2e-3, True, "")
    assert gate.correct("time_s", [4.0], d) == [2.0]
    assert gate.correct("prompt_tps", [100.0], d) == [200.0]
    assert gate.correct("peak_memory_gb", [2.5], d) == [2.5]
    not_applied = Drift(2.0, 0.5, 4.0, 1e-3, 2e-3, False, "")
    assert gate.correct("time_s", [4.0], not_applied) == [4.0]


# --- verdicts -----------------------------------------------------------------


def test_ten_percent_slowdown_fails_with_one_informative_line() -> None:
    base = {"time_s": lognormal(6.6e-3, 0.02, 30, 1)}
    cur = {"time_s": lognormal(7.26e-3, 0.02, 30, 2)}
    [v] = gate.judge("test_gate_up", cur, base, baseline_revision=REV)
    assert v.status == "regression" and v.failed
    assert v.change == pytest.approx(0.10, abs=0.02)
    assert v.ci_low is not None and v.ci_low > 0
    msg = v.message()
    assert "\n" not in msg
    for part in ("time_s regression", "at abc1234def", "6.", "ms", "7.", "+1", "99% CI",
                 "p=", "threshold 5% (default)"):
        assert part in msg, part


def test_noise_alone_is_unchanged() -> None:
    base = {"time_s": lognormal(6.6e-3, 0.05, 30, 4)}
    cur = {"time_s": lognormal(6.6e-3, 0.05, 30, 5)}
    [v] = gate.judge("t", cur, base, baseline_revision=REV)
    assert v.status == "unchanged" and not v.failed


def test_a_precisely_measured_small_change_stays_under_the_threshold() -> None:
    base = {"time_s": lognormal(1e-3, 0.002, 30, 6)}
    cur = {"time_s": lognormal(1.02e-3, 0.002, 30, 7)}  # +2%, measured to +-0.2%
    [v] = gate.judge("t", cur, base)
    ch = stats.compare(base["time_s"], cur["time_s"])
    assert ch.significant_increase and ch.ci_high < 1.05  # real, but within tolerance
    assert v.status == "unchanged"


def test_a_significant_change_whose_interval_reaches_the_threshold_fails() -> None:
    # +4% measured with 2% noise: certainly slower, and +5% cannot be ruled out.
    base = {"time_s": lognormal(1e-3, 0.02, 30, 8)}
    cur = {"time_s": lognormal(1.04e-3, 0.02, 30, 9)}
    ch = stats.compare(base["time_s"], cur["time_s"])
    assert ch.ci_low > 1.0 and ch.ci_high > 1.05
    [v] = gate.judge("t", cur, base)
    assert v.status == "regression"


def test_improvement_is_reported_never_failed() -> None:
    base = {"time_s": lognormal(1e-3, 0.02, 30, 10)}
    cur = {"time_s": lognormal(0.8e-3, 0.02, 30, 11)}
    [v] = gate.judge("t", cur, base)
    assert v.status == "improvement" and not v.failed
    assert v.change == pytest.approx(-0.2, abs=0.02)


def test_throughput_direction() -> None:
    base = {"prompt_tps": lognormal(212.0, 0.01, 10, 12)}
    slower = {"prompt_tps": lognormal(190.0, 0.01, 10, 13)}
    faster = {"prompt_tps": lognormal(258.0, 0.01, 10, 14)}
    assert gate.judge("t", slower, base)[0].status == "regression"
    assert gate.judge("t", faster, base)[0].status == "improvement"


def test_memory_without_spread_is_judged_from_three_samples() -> None:
    [v] = gate.judge("t", {"peak_memory_gb": [2.95] * 3}, {"peak_memory_gb": [2.68] * 3})
    assert v.status == "regression" and v.failed
    [same] = gate.judge("t", {"peak_memory_gb": [2.68] * 3}, {"peak_memory_gb": [2.68] * 3})
    assert same.status == "unchanged" and same.p_value is None


def test_too_few_timing_samples_cannot_fail_and_say_so() -> None:
    [v] = gate.judge("t", {"ttft_s": [60.0, 61.0, 59.0]}, {"ttft_s": [47.0, 47.5, 46.8]})
    assert v.status == "unchanged"
    assert "too few samples" in v.note and "need >= 5" in v.note


def test_threshold_from_marker_changes_the_verdict() -> None:
    base = {"time_s": lognormal(1e-3, 0.005, 30, 15)}
    cur = {"time_s": lognormal(1.04e-3, 0.005, 30, 16)}  # +4% +- ~0.5%
    default = Thresholds.from_options()
    assert gate.judge("t", cur, base, thresholds=default)[0].status == "unchanged"
    strict = default.with_marker((), {"time_s": "2%"})
    [v] = gate.judge("t", cur, base, thresholds=strict)
    assert v.status == "regression" and "threshold 2% (marker)" in v.message()


def test_machine_drift_is_corrected_and_said() -> None:
    base = {"time_s": lognormal(6.6e-3, 0.02, 30, 17), "peak_memory_gb": [2.68] * 5}
    slow_machine = 12.1 / 6.6
    cur = {"time_s": lognormal(6.6e-3 * slow_machine, 0.02, 30, 18),
           "peak_memory_gb": [2.68] * 5}
    assert gate.judge("t", cur, base)[0].status == "regression"  # uncorrected: blamed on code
    d = gate.estimate_drift(lognormal(6.6e-3, 0.01, 20, 19), lognormal(12.1e-3, 0.01, 20, 20))
    assert d is not None and d.applied
    time_v, mem_v = gate.judge("t", cur, base, drift=d, baseline_revision=REV)
    assert time_v.status == "unchanged"
    assert time_v.drift == pytest.approx(d.ratio)
    assert time_v.current == pytest.approx(np.median(cur["time_s"]))  # reported as measured
    assert "corrected for machine drift x1.8" in time_v.message()
    assert mem_v.drift is None  # memory is not scaled


def test_real_regression_on_a_drifting_machine_is_still_caught() -> None:
    base = {"time_s": lognormal(6.6e-3, 0.02, 30, 21)}
    cur = {"time_s": lognormal(6.6e-3 * 1.8 * 1.10, 0.02, 30, 22)}
    d = Drift(1.8, 1.78, 1.82, 6.6e-3, 11.9e-3, True, "")
    [v] = gate.judge("t", cur, base, drift=d)
    assert v.status == "regression"
    assert v.change == pytest.approx(0.10, abs=0.02)


def test_virtual_gpu_reports_timing_regressions_without_failing() -> None:
    base = {"time_s": lognormal(1e-3, 0.02, 20, 23), "peak_memory_gb": [1.0] * 5}
    cur = {"time_s": lognormal(1.3e-3, 0.02, 20, 24), "peak_memory_gb": [1.2] * 5}
    time_v, mem_v = gate.judge("t", cur, base, enforce_timing=False)
    assert time_v.status == "regression" and not time_v.failed
    assert "virtual GPU" in time_v.note and "--qmm-gate-virtual" in time_v.note
    assert mem_v.status == "regression" and mem_v.failed  # memory is not timing


def test_named_metrics_are_reported_not_enforced() -> None:
    # host-bound generation: gen_tps regresses 30% but does not fail; TTFT still does
    base = {"gen_tps": lognormal(120.0, 0.02, 20, 25), "ttft_s": lognormal(0.5, 0.01, 20, 26)}
    cur = {"gen_tps": lognormal(84.0, 0.02, 20, 27), "ttft_s": lognormal(0.6, 0.01, 20, 28)}
    note = "host-bound generation: reported, not enforced"
    gen_v, ttft_v = gate.judge("t", cur, base, unenforced={"gen_tps": note})
    assert gen_v.status == "regression" and not gen_v.enforced and not gen_v.failed
    assert note in gen_v.note
    assert ttft_v.status == "regression" and ttft_v.enforced and ttft_v.failed
    assert note not in ttft_v.note
    # no regression, no note
    [same] = gate.judge("t", {"gen_tps": base["gen_tps"]}, base, unenforced={"gen_tps": note})
    assert same.status == "unchanged" and note not in same.note and not same.enforced


def test_params_mismatch_is_not_compared() -> None:
    base = {"time_s": [1e-3] * 5}
    cur = {"time_s": [9e-3] * 5}
    vs = gate.judge("t", cur, base, current_params={"M": 256, "N": 8}, baseline_params={"M": 512,
                    "N": 8}, baseline_revision=REV)
    assert [v.status for v in vs] == ["not-comparable"]
    assert not vs[0].failed
    assert "M: 512 -> 256" in vs[0].message() and "record a new baseline" in vs[0].message()


def test_new_missing_and_not_gated() -> None:
    [new] = gate.judge("t", {"time_s": [1.0]}, None)
    assert new.status == "new" and not new.failed
    vs = gate.judge("t", {"time_s": [1e-3] * 5, "tflops": [2.0] * 5}, {"time_s": [1e-3] * 5},
                    baseline_medians={"tflops": 1.0})
    tflops = next(v for v in vs if v.metric == "tflops")
    assert tflops.status == "not-gated" and tflops.change == pytest.approx(1.0)
    [gone] = gate.missing("t_old", ["time_s"], REV)
    assert gone.status == "missing" and "not run" in gone.message()


def test_verdict_rejects_unknown_status_and_serialises() -> None:
    with pytest.raises(ValueError, match="status='bad'"):
        Verdict("t", "time_s", "bad")
    d = Verdict("t", "time_s", "regression", "s", baseline=1.0, current=2.0).to_dict()
    assert d["failed"] is True and d["metric"] == "time_s"


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [(6.6e-3, "s", "6.600 ms"), (2.5e-5, "s", "25.00 us"), (47.33, "s", "47.330 s"),
     (212.0, "tok/s", "212 tok/s"), (2.68, "GB", "2.68 GB"), (None, "s", "-")],
)
def test_format_value(value: float | None, unit: str, text: str) -> None:
    assert gate.format_value(value, unit) == text


# --- calibration --------------------------------------------------------------


def test_recommend_thresholds_from_aa_runs() -> None:
    runs = [
        {"t1": {"time_s": [1.00] * 5, "peak_memory_gb": [2.0] * 3, "tflops": [9.0] * 5}},
        {"t1": {"time_s": [1.03] * 5, "peak_memory_gb": [2.0] * 3, "tflops": [8.7] * 5}},
    ]
    recs = gate.recommend_thresholds(runs)
    assert set(recs) == {"time_s", "peak_memory_gb"}  # tflops is not gated
    t = recs["time_s"]
    # run 0 as baseline, run 1 current: exactly +3% -> needs 3%; x1.25 = 3.75% -> 4%.
    assert (t.needed, t.threshold, t.pairs, t.worst) == (pytest.approx(0.03), 0.04, 2, "t1")
    assert t.spread == pytest.approx(0.03)
    m = recs["peak_memory_gb"]
    assert (m.needed, m.threshold) == (0.0, 0.01)  # no noise: the 1% floor


def test_recommend_thresholds_ignore_noise_that_is_not_significant() -> None:
    a = lognormal(1e-3, 0.05, 10, 30)
    b = lognormal(1e-3, 0.05, 10, 31)
    assert not stats.compare(a, b).significant_increase
    rec = gate.recommend_thresholds([{"t": {"time_s": a}}, {"t": {"time_s": b}}])["time_s"]
    assert rec.needed == 0.0 and rec.threshold == 0.01


def test_reference_speed_ignores_a_spike() -> None:
    calm = [1.00, 1.01, 0.99, 1.00, 1.02, 0.98, 1.00]
    spiked = [1.00, 1.01, 0.99, 1.60, 1.70, 1.80, 1.00]  # other work hit three rounds
    # Faster halves: 0.98, 0.99, 1.00, 1.00 and 0.99, 1.00, 1.00, 1.01.
    assert gate.reference_speed(calm) == pytest.approx(0.995)
    assert gate.reference_speed(spiked) == pytest.approx(1.00)


def test_local_drift_compares_the_speed_around_each_benchmark() -> None:
    session = lognormal(1e-3, 0.01, 32, 40)  # the recording session's reference samples
    # This benchmark was recorded while the machine ran 20% slower than the session's median.
    anchor = 1.2 * gate.reference_speed(session)
    now = lognormal(1.2e-3, 0.01, 14, 41)
    d = gate.local_drift(session, anchor, now)
    assert d is not None and not d.applied  # same speed as at its own recording
    assert d.ratio == pytest.approx(1.0, abs=0.02)
    unanchored = gate.local_drift(session, None, now)
    assert unanchored is not None and unanchored.applied
    assert unanchored.ratio == pytest.approx(1.2, abs=0.03)
    assert gate.local_drift([], anchor, now) is None


def test_unsteady_when_the_machine_changed_speed_mid_benchmark() -> None:
    before = [1.0e-3, 1.01e-3, 0.99e-3, 1.0e-3]
    assert gate.unsteady(before, [1.05e-3, 1.04e-3, 1.06e-3, 1.05e-3]) is None  # +5%: steady
    note = gate.unsteady(before, [1.3e-3, 1.31e-3, 1.29e-3, 1.3e-3])
    # Medians of the faster halves: (0.99 + 1.00) / 2 and (1.29 + 1.30) / 2.
    assert note is not None and "995.00 us before, 1.295 ms after" in note
    assert "not enforced" in note
    assert gate.unsteady([], before) is None
    base = {"time_s": lognormal(1e-3, 0.02, 20, 42)}
    cur = {"time_s": lognormal(1.3e-3, 0.02, 20, 43)}
    [v] = gate.judge("t", cur, base, enforce_timing=False, timing_note=note)
    assert v.status == "regression" and not v.failed and note in v.note


@pytest.mark.parametrize(
    ("metric", "status", "change", "enforced", "expected"),
    [
        # an enforced timing regression is measured again
        ("time_s", "regression", 0.12, True, True),
        # a slowdown of half the 5% threshold that was not significant, too
        ("time_s", "unchanged", 0.025, True, True),
        ("time_s", "unchanged", 0.024, True, False),
        # a rate: lower is worse
        ("prompt_tps", "unchanged", -0.03, True, True),
        ("prompt_tps", "unchanged", 0.03, True, False),
        # derived rates restate time_s and are not gated
        ("tflops", "regression", -0.2, True, False),
        # faster, or not enforced (virtual GPU, unsteady machine): no second look
        ("time_s", "improvement", -0.2, True, False),
        ("time_s", "regression", 0.12, False, False),
        # memory does not depend on the machine's speed
        ("peak_memory_gb", "regression", 0.3, True, False),
    ],
)
def test_wants_second_look(metric: str, status: str, change: float, enforced: bool,
                           expected: bool) -> None:
    v = Verdict("t", metric, status, change=change, threshold=0.05, enforced=enforced)
    assert gate.wants_second_look([v]) is expected
    assert gate.wants_second_look([Verdict("t", "time_s", "unchanged", change=0.0,
                                           threshold=0.05), v]) is expected


def test_no_second_look_without_a_comparison() -> None:
    assert not gate.wants_second_look([Verdict("t", "time_s", "new")])
    assert not gate.wants_second_look([])
