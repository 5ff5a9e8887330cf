"""The regression gate: thresholds, machine-drift correction and verdicts.

Pure: no pytest, no MLX.  The plugin turns :class:`ThresholdError` into
``pytest.UsageError`` and a failing :class:`Verdict` into ``pytest.fail``.

**The rule.**  For each gated metric the current samples are compared with
the baseline's (:func:`pytest_qmmperf.stats.compare`: ratio of medians and a
99% rank-based confidence interval for it).  With ``T`` the threshold and the
interval expressed as a change in the metric's bad direction (slower, less
throughput, more memory), a metric

* **regresses** when the whole interval lies on the bad side of "no change"
  (the rank test is significant: noise alone does this in at most 0.5% of
  comparisons), the interval reaches beyond ``T`` (a change of ``T`` or
  more is consistent with the data), *and* the measured change is at least
  ``T / 2`` (:data:`MIN_CHANGE_SHARE`: on a shared 2-core CPU, A/A false
  failures were shifts of 2.1-2.6% whose intervals, from 7 rounds a side,
  were wide enough to reach 5%);
* **improves** by the mirror rule;
* is **unchanged** otherwise.

So a threshold is the size of change the gate is built to catch, and the
significance requirement is what keeps noise from failing a build.  A real
slowdown somewhat under ``T`` can fail when the samples are too noisy to show
it stays within ``T``: more rounds (a tighter interval) or a larger ``T``
decides such cases.  Measured on a shared 2-core CPU: see
``benchmarks/gate_accuracy.py``.

**Machine drift.**  A fixed reference workload is timed right before and
right after every benchmark and stored with the baseline.  When it ran
significantly faster or slower around a benchmark now than around the same
benchmark at recording (thermal throttling, a busy shared runner), the
machine changed, not the code: time metrics are divided by the reference
ratio and rate metrics multiplied by it before comparing, and every verdict
says so.  The ratio is taken between the faster halves of the reference
samples, so a passing spike in a few reference rounds does not count as a
slower machine (see :func:`local_drift`).  On GPUs a reference change under
10% is reported and not corrected (:func:`drift_floor`): the reference
kernel's own speed moves up to ~8% between processes while the benchmarks
do not.  Memory is never scaled.  No
correction is made across MLX versions, since the reference workload runs
on MLX too and an MLX slowdown is a regression to catch, not drift to
explain away.  Nothing is widened: the interval is the one the corrected
samples give.  When the reference right before and right after a benchmark
differ by more than :data:`UNSTEADY_LIMIT`, the machine changed speed while
the benchmark ran; no single correction fits its rounds, so its timing
verdicts are reported and not enforced (:func:`unsteady`).

The correction is only as good as the reference's likeness to the benchmark:
under contention from other work, different workloads slow down by
different factors (measured on a shared 2-core CPU: a 1.8-2.4x slowdown of a
QMM benchmark came with a 1.5-2.0x slowdown of the reference).  Where that
matters, same-machine A/B (``qmmperf compare``) is the remedy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pytest_qmmperf import stats
from pytest_qmmperf.metrics import METRICS

DEFAULT_THRESHOLD = 0.05

STATUSES = (
    "regression",
    "improvement",
    "unchanged",
    "new",
    "missing",
    "not-gated",
    "not-comparable",
)

#: How a metric scales with machine speed: +1 for times (a machine 2x slower
#: doubles them), -1 for rates (halves them), 0 for everything else (memory).
_DRIFT_POWER_BY_UNIT = {"s": 1, "TFLOP/s": -1, "GB/s": -1, "tok/s": -1, "%": -1}


class ThresholdError(ValueError):
    """A threshold that cannot be parsed; the message names the input and what is accepted."""


# --- thresholds ---------------------------------------------------------------

_ACCEPTED = "accepted: PCT or METRIC=PCT, e.g. 5%, 0.5, ttft_s=3%"


def _gated_names() -> str:
    return ", ".join(name for name, m in METRICS.items() if m.gated)


def _check_metric(name: str, source: str, text: str) -> str:
    if name not in METRICS:
        raise ThresholdError(
            f"{source} {text!r}: unknown metric {name!r}; gated metrics: {_gated_names()}"
        )
    if not METRICS[name].gated:
        raise ThresholdError(
            f"{source} {text!r}: {name} is reported but not gated (derived or informational); "
            f"gated metrics: {_gated_names()}"
        )
    return name


def parse_percent(value: Any, source: str, text: str | None = None) -> float:
    """A percentage (``"5%"``, ``"5"``, ``5``, ``"0.5%"``) as a fraction (``0.05``).

    Bare numbers are percent, as pytest-benchmark's ``median:5%`` reads them.
    Accepts more than 0% and less than 1000%.
    """
    shown = text if text is not None else str(value)
    if isinstance(value, bool):
        raise ThresholdError(f"{source} {shown!r}: not a percentage; {_ACCEPTED}")
    raw = str(value).strip()
    number = raw[:-1].strip() if raw.endswith("%") else raw
    try:
        pct = float(number)
    except ValueError:
        raise ThresholdError(f"{source} {shown!r}: not a percentage; {_ACCEPTED}") from None
    if not (math.isfinite(pct) and 0 < pct < 1000):
        raise ThresholdError(
            f"{source} {shown!r}: a threshold must be above 0% and below 1000%; {_ACCEPTED}"
        )
    return pct / 100.0


def parse_threshold(text: str, source: str = "--qmm-threshold") -> tuple[str | None, float]:
    """``"5%"`` -> ``(None, 0.05)``; ``"ttft_s=3%"`` -> ``("ttft_s", 0.03)``.

    ``ThresholdError`` names ``source`` and the input for anything else,
    including unknown and ungated metric names.
    """
    raw = str(text).strip()
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*[=:]\s*(.+)", raw)
    if match:
        name = _check_metric(match.group(1), source, raw)
        return name, parse_percent(match.group(2), source, raw)
    return None, parse_percent(raw, source, raw)


def parse_thresholds(items: Iterable[str], source: str) -> dict[str | None, float]:
    """Several ``[METRIC=]PCT`` items; later items override earlier ones.

    The key ``None`` holds the level's value for every metric.
    """
    out: dict[str | None, float] = {}
    for item in items:
        # An ini value may hold several items separated by commas or spaces.
        for part in re.split(r"[,\s]+", str(item).strip()):
            if part:
                name, value = parse_threshold(part, source)
                out[name] = value
    return out


def parse_marker(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str | None, float]:
    """Thresholds of ``@pytest.mark.qmm_threshold("5%", ttft_s="3%")``.

    One positional value for every metric, keywords for single metrics.
    """
    source = "@pytest.mark.qmm_threshold"
    if len(args) > 1:
        raise ThresholdError(
            f"{source}{tuple(args)!r}: at most one positional threshold; "
            "give per-metric ones as keywords, e.g. qmm_threshold('5%', ttft_s='3%')"
        )
    out: dict[str | None, float] = {}
    if args:
        out[None] = parse_percent(args[0], source, str(args[0]))
    for name, value in kwargs.items():
        _check_metric(name, source, f"{name}={value}")
        out[name] = parse_percent(value, source, f"{name}={value}")
    return out


@dataclass(frozen=True)
class Thresholds:
    """Thresholds by precedence: marker, then command line, then ini, then the default.

    Within one level a metric's own value beats the level's general one; a
    higher level beats a lower one even when the lower one names the metric
    (``--qmm-threshold 10%`` loosens every metric of a noisy CI job).
    """

    marker: Mapping[str | None, float]
    cli: Mapping[str | None, float]
    ini: Mapping[str | None, float]
    default: float = DEFAULT_THRESHOLD

    @classmethod
    def from_options(
        cls, cli: Iterable[str] = (), ini: Iterable[str] = (), default: float = DEFAULT_THRESHOLD
    ) -> Thresholds:
        """Parse the command line's and ini's items (``ThresholdError`` on bad ones)."""
        return cls(
            marker={},
            cli=parse_thresholds(cli, "--qmm-threshold"),
            ini=parse_thresholds(ini, "qmm_thresholds"),
            default=default,
        )

    def with_marker(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Thresholds:
        """A copy with a test's ``qmm_threshold`` marker as the top level."""
        return Thresholds(parse_marker(args, kwargs), self.cli, self.ini, self.default)

    def for_metric(self, metric: str) -> tuple[float, str]:
        """``(threshold, source)`` for ``metric``; source is marker, cli, ini or default."""
        for source, level in (("marker", self.marker), ("cli", self.cli), ("ini", self.ini)):
            if metric in level:
                return level[metric], source
            if None in level:
                return level[None], source
        return self.default, "default"


# --- machine drift ------------------------------------------------------------


def drift_power(metric: str) -> int:
    """+1 if ``metric`` scales like a time, -1 like a rate, 0 if machine speed leaves it alone."""
    m = METRICS.get(metric)
    return _DRIFT_POWER_BY_UNIT.get(m.unit, 0) if m else 0


@dataclass(frozen=True)
class Drift:
    """The machine's speed now against when the baseline was recorded.

    ``ratio`` is the reference workload's median time now over then (1.8:
    the machine runs 1.8x slower); ``applied`` says whether verdicts were
    corrected by it, and ``reason`` why or why not, in words for the report.
    """

    ratio: float
    ci_low: float
    ci_high: float
    baseline_s: float
    current_s: float
    applied: bool
    reason: str

    def describe(self) -> str:
        """One line for the report."""
        if self.ratio >= 1:
            speed = f"{self.ratio:.2f}x slower"
        else:
            speed = f"{1 / self.ratio:.2f}x faster"
        return (
            f"reference workload {format_value(self.baseline_s, 's')} at recording, "
            f"{format_value(self.current_s, 's')} now: machine {speed}; {self.reason}"
        )


def estimate_drift(
    reference_baseline: Sequence[float] | None,
    reference_current: Sequence[float] | None,
    *,
    same_mlx: bool = True,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    min_change: float = 0.0,
) -> Drift | None:
    """Compare the reference workload's samples; ``None`` when either side has none.

    The correction is applied only when the reference changed significantly,
    by at least ``min_change`` (a fraction), and both sides ran the same MLX
    version (see the module docstring).
    """
    if not reference_baseline or not reference_current:
        return None
    ch = stats.compare(reference_baseline, reference_current, confidence)
    base = stats.summarize(reference_baseline).median
    cur = stats.summarize(reference_current).median
    significant = ch.significant_increase or ch.significant_decrease
    if not same_mlx:
        applied, reason = False, "not corrected: the baseline ran another MLX version"
    elif not significant:
        applied, reason = False, "within noise, not corrected"
    elif abs(math.log(ch.ratio)) < math.log1p(min_change):
        applied, reason = False, (
            f"under {100 * min_change:g}%, not corrected (a change this small in the reference "
            "does not carry over reliably to other workloads)")
    else:
        applied = True
        reason = "times divided and rates multiplied by this ratio before comparing"
    return Drift(ch.ratio, ch.ci_low, ch.ci_high, base, cur, applied, reason)


def local_drift(
    baseline_reference: Sequence[float] | None,
    baseline_anchor: float | None,
    current_reference: Sequence[float] | None,
    *,
    same_mlx: bool = True,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    min_change: float = 0.0,
) -> Drift | None:
    """Drift for one benchmark, from the faster half of the reference samples on each side.

    ``baseline_reference`` holds the recording session's reference samples,
    ``baseline_anchor`` :func:`reference_speed` of the samples taken around
    this very benchmark when it was recorded, ``current_reference`` the
    samples taken around it now.  Each side keeps its faster half
    (:func:`stats.fast_half`: a spike from other work that hit a few
    reference rounds must not be mistaken for a slower machine), and the
    baseline's is rescaled to the anchor, so the ratio compares the
    machine's speed where each benchmark ran, with the spread of a whole
    recording session.
    """
    if not baseline_reference or not current_reference:
        return None
    base = stats.fast_half(baseline_reference)
    if baseline_anchor:
        median = stats.summarize(base).median
        base = [v * baseline_anchor / median for v in base]
    return estimate_drift(base, stats.fast_half(current_reference), same_mlx=same_mlx,
                          confidence=confidence, min_change=min_change)


def reference_speed(samples: Sequence[float]) -> float:
    """The reference time that stands for a burst: the median of its faster half."""
    return stats.fast_median(samples)


#: The smallest machine-speed change (a fraction) corrected for, by backend.  On
#: a GPU the reference kernel's own speed moves between processes with nothing
#: changed (measured on an H100 over 20 A/A runs: 0.92-1.04x, while the
#: benchmarks it would have corrected did not move; correcting by it failed 5 of
#: 519 enforced timing verdicts, none with a 10% floor).  Larger changes
#: (throttling, contention) are still corrected.  On the CPU, where contention slows every
#: workload alike, correcting small changes too raised detection of a 5%
#: slowdown from 76% to 87% at the same A/A rate (docs/PERFORMANCE.md,
#: sections 4 and 7).
DRIFT_FLOOR = {"cpu": 0.0}
DRIFT_FLOOR_GPU = 0.10


def drift_floor(backend: str) -> float:
    """:data:`DRIFT_FLOOR` for ``backend`` (``cpu``, ``cuda``, ``metal``)."""
    return DRIFT_FLOOR.get(backend, DRIFT_FLOOR_GPU)


#: Reference speed before and after one benchmark differing by more than this means the
#: machine changed speed while the benchmark ran (measured: see benchmarks/gate_accuracy.py).
UNSTEADY_LIMIT = 0.10


def unsteady(before: Sequence[float], after: Sequence[float],
             limit: float | None = None) -> str | None:
    """Why timing around one benchmark cannot be trusted, or ``None`` when it can.

    ``before`` and ``after`` are the reference samples taken right before and
    right after the benchmark.  When their speeds (:func:`reference_speed`)
    differ by more than ``limit``, other work started or stopped while the
    benchmark ran: neither side's speed describes the benchmark's rounds, so
    no correction is right and a timing verdict would be a guess.  ``limit``
    defaults to :data:`UNSTEADY_LIMIT`.
    """
    if not before or not after:
        return None
    limit = UNSTEADY_LIMIT if limit is None else limit
    b, a = reference_speed(before), reference_speed(after)
    if abs(math.log(a / b)) <= math.log1p(limit):
        return None
    return (f"machine speed changed during this benchmark (reference {format_value(b, 's')} "
            f"before, {format_value(a, 's')} after): timing reported, not enforced")


def correct(metric: str, samples: Sequence[float], drift: Drift | None) -> list[float]:
    """``samples`` as if measured at the baseline's machine speed (unchanged if not applied)."""
    power = drift_power(metric)
    if drift is None or not drift.applied or power == 0:
        return list(samples)
    factor = drift.ratio ** (-power)
    return [v * factor for v in samples]


# --- verdicts -----------------------------------------------------------------


def format_value(value: float | None, unit: str) -> str:
    """A value with its unit at a readable scale (seconds as s/ms/us)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        a = abs(value)
        if a >= 1:
            return f"{value:.3f} s"
        if a >= 1e-3:
            return f"{value * 1e3:.3f} ms"
        return f"{value * 1e6:.2f} us"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "GB" and abs(value) < 0.1:
        return f"{value * 1e3:.4g} MB"
    return f"{value:.4g} {unit}".rstrip()


def _pct(x: float) -> str:
    if math.isinf(x):
        return "+inf%" if x > 0 else "-inf%"
    return f"{x * 100:+.1f}%"


@dataclass(frozen=True)
class Verdict:
    """The gate's finding for one metric of one benchmark.

    Values are medians in the metric's unit; ``current`` as measured.
    ``change``, ``ci_low`` and ``ci_high`` are fractional changes of the
    median (after any drift correction; ``+0.05`` is 5% larger).
    ``enforced`` is false where a regression is reported but may not fail
    (timing on a virtual GPU).
    """

    test: str
    metric: str
    status: str
    unit: str = ""
    baseline: float | None = None
    current: float | None = None
    change: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    threshold: float | None = None
    threshold_source: str = ""
    confidence: float | None = None
    p_value: float | None = None
    baseline_revision: str | None = None
    drift: float | None = None
    enforced: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status={self.status!r}: must be one of {', '.join(STATUSES)}")

    @property
    def failed(self) -> bool:
        """A regression that fails its test."""
        return self.status == "regression" and self.enforced

    def message(self) -> str:
        """One line: metric, baseline value and revision, current value, change, threshold,
        confidence."""
        rev = (self.baseline_revision or "?")[:10]
        head = f"{self.metric} {self.status}"
        if self.status == "not-comparable":
            return f"{head}: {self.note}"
        if self.status in ("new", "missing", "not-gated") and self.change is None:
            return f"{head}" + (f": {self.note}" if self.note else "")
        parts = [
            f"{head}: {format_value(self.baseline, self.unit)} at {rev} -> "
            f"{format_value(self.current, self.unit)}"
        ]
        if self.change is not None:
            detail = _pct(self.change)
            if self.ci_low is not None and self.ci_low == self.ci_high:
                detail += ", exact: no spread in either sample set"
            elif self.ci_low is not None and self.ci_high is not None and self.confidence:
                detail += (
                    f", {self.confidence * 100:g}% CI {_pct(self.ci_low)}..{_pct(self.ci_high)}"
                )
            if self.p_value is not None:
                detail += f", p={self.p_value:.2g}"
            parts.append(f"({detail})")
        if self.threshold is not None:
            parts.append(f"threshold {self.threshold * 100:g}% ({self.threshold_source})")
        line = " ".join(parts)
        if self.drift is not None:
            line += f"; corrected for machine drift x{self.drift:.3f}"
        if self.note:
            line += f"; {self.note}"
        return line

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the JSON report (``failed`` included)."""
        out = asdict(self)
        out["failed"] = self.failed
        return out


def params_difference(baseline: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["M: 512 -> 256", ...]`` for every parameter that differs (empty when equal)."""
    diffs = []
    for key in sorted(set(baseline) | set(current), key=str):
        b, c = baseline.get(key, "<absent>"), current.get(key, "<absent>")
        if b != c:
            diffs.append(f"{key}: {b!r} -> {c!r}")
    return diffs


#: A verdict also needs the measured change (ratio of medians) to reach this
#: share of the threshold: a small shift whose interval is merely wide enough
#: to reach the threshold is not a regression.
MIN_CHANGE_SHARE = 0.5


def _decide(ch: stats.Change, higher_is_better: bool, threshold: float) -> str:
    floor = MIN_CHANGE_SHARE * threshold
    if higher_is_better:
        worse = (ch.significant_decrease and ch.ci_low < 1.0 - threshold
                 and ch.change <= -floor)
        better = (ch.significant_increase and ch.ci_high > 1.0 + threshold
                  and ch.change >= floor)
    else:
        worse = (ch.significant_increase and ch.ci_high > 1.0 + threshold
                 and ch.change >= floor)
        better = (ch.significant_decrease and ch.ci_low < 1.0 - threshold
                  and ch.change <= -floor)
    if worse:
        return "regression"
    if better:
        return "improvement"
    return "unchanged"


def wants_second_look(verdicts: Iterable[Verdict]) -> bool:
    """Whether a benchmark's timing should be measured once more before its verdicts stand.

    One measurement on a shared machine can be hit by other work for its whole
    duration, which no interval computed from its own rounds shows.  An
    enforced timing regression, or an enforced timing change that reached
    :data:`MIN_CHANGE_SHARE` of its threshold in the bad direction without
    being significant, is measured again right away and judged on both
    measurements' samples together (:meth:`pytest_qmmperf.session.QmmSession.record`).
    Replayed on the recorded CPU gate-accuracy runs, this halved A/A false
    failures and raised detection (docs/PERFORMANCE.md, section 4).
    Memory and other speed-independent metrics are not measured again.
    """
    for v in verdicts:
        meta = METRICS.get(v.metric)
        if (meta is None or not meta.gated or drift_power(v.metric) == 0 or not v.enforced
                or v.threshold is None or v.change is None):
            continue
        worse = -v.change if meta.higher_is_better else v.change
        if v.status == "regression" or (
                v.status == "unchanged" and worse >= MIN_CHANGE_SHARE * v.threshold):
            return True
    return False


def judge(
    test: str,
    current: Mapping[str, Sequence[float]],
    baseline: Mapping[str, Sequence[float]] | None,
    *,
    current_params: Mapping[str, Any] | None = None,
    baseline_params: Mapping[str, Any] | None = None,
    baseline_medians: Mapping[str, float] | None = None,
    thresholds: Thresholds | None = None,
    baseline_revision: str | None = None,
    drift: Drift | None = None,
    enforce_timing: bool = True,
    timing_note: str = "virtual GPU: timing reported, not enforced (--qmm-gate-virtual)",
    unenforced: Mapping[str, str] | None = None,
    confidence: float = stats.DEFAULT_CONFIDENCE,
) -> list[Verdict]:
    """Verdicts for every metric of one benchmark.

    ``current`` and ``baseline`` map metric names to samples; ``baseline`` is
    ``None`` when the baseline has no entry for this test (every metric is
    ``new``).  Metrics that are not gated are reported as ``not-gated`` with
    the change of their medians (``baseline_medians`` supplies the baseline's
    when it stores no samples for them).  Differing ``params`` make every
    metric ``not-comparable``.  ``enforce_timing=False`` (a virtual GPU, a
    machine whose speed changed during the benchmark) keeps time and rate
    regressions from failing; ``timing_note`` says why in their verdicts.
    ``unenforced`` does the same for the metrics it names, each with its own
    note (host-bound generation: ``gen_tps``).
    """
    unenforced = unenforced or {}
    thresholds = thresholds or Thresholds({}, {}, {})
    baseline_medians = baseline_medians or {}
    verdicts: list[Verdict] = []

    if baseline is not None and current_params is not None and baseline_params is not None:
        diffs = params_difference(baseline_params, current_params)
        if diffs:
            note = (
                f"parameters differ from the baseline at {(baseline_revision or '?')[:10]} "
                f"({'; '.join(diffs)}); record a new baseline to compare"
            )
            return [
                Verdict(test, name, "not-comparable", _unit(name),
                        baseline_revision=baseline_revision, note=note)
                for name in current
            ]

    for name, samples in current.items():
        unit = _unit(name)
        meta = METRICS.get(name)
        cur_med = stats.summarize(samples).median if samples else None
        if baseline is None:
            verdicts.append(Verdict(test, name, "new", unit, current=cur_med,
                                    note="no baseline entry"))
            continue
        corrected = correct(name, samples, drift)
        applied = drift.ratio if (drift and drift.applied and drift_power(name)) else None
        base_samples = baseline.get(name)
        if meta is None or not meta.gated:
            base_med = (
                stats.summarize(base_samples).median if base_samples
                else baseline_medians.get(name)
            )
            change = None
            if base_med and corrected:
                change = stats.summarize(corrected).median / base_med - 1.0
            verdicts.append(Verdict(test, name, "not-gated", unit, baseline=base_med,
                                    current=cur_med, change=change,
                                    baseline_revision=baseline_revision, drift=applied))
            continue
        if not base_samples:
            verdicts.append(Verdict(test, name, "new", unit, current=cur_med,
                                    baseline_revision=baseline_revision,
                                    note="not in the baseline entry"))
            continue
        threshold, source = thresholds.for_metric(name)
        ch = stats.compare(base_samples, corrected, confidence)
        status = _decide(ch, meta.higher_is_better, threshold)
        if ch.exact:
            p = None  # a rank test has nothing to say about two constant sets
        elif status == "regression":
            p = ch.p_decrease if meta.higher_is_better else ch.p_increase
        elif status == "improvement":
            p = ch.p_increase if meta.higher_is_better else ch.p_decrease
        else:
            # Two-sided: how surprising the observed direction would be under no change.
            one_sided = [q for q in (ch.p_increase, ch.p_decrease) if q is not None]
            p = min(1.0, 2 * min(one_sided)) if one_sided else None
        notes = []
        if math.isinf(ch.ci_low) or math.isinf(ch.ci_high):
            notes.append(
                f"too few samples to judge at {confidence * 100:g}% "
                f"({ch.n_baseline} baseline, {ch.n_current} now; need >= 5 each)"
            )
        enforced = True
        if not enforce_timing and drift_power(name) != 0:
            enforced = False
            if status == "regression":
                notes.append(timing_note)
        elif name in unenforced:
            enforced = False
            if status == "regression":
                notes.append(unenforced[name])
        verdicts.append(
            Verdict(
                test, name, status, unit,
                baseline=stats.summarize(base_samples).median,
                current=cur_med,
                change=ch.change,
                ci_low=ch.ci_low - 1.0,
                ci_high=ch.ci_high - 1.0,
                threshold=threshold,
                threshold_source=source,
                confidence=confidence,
                p_value=p,
                baseline_revision=baseline_revision,
                drift=applied,
                enforced=enforced,
                note="; ".join(notes),
            )
        )
    return verdicts


def missing(test: str, metrics: Iterable[str], baseline_revision: str | None) -> list[Verdict]:
    """Verdicts for a baseline entry whose test did not run in this session."""
    return [
        Verdict(test, name, "missing", _unit(name), baseline_revision=baseline_revision,
                note="in the baseline, not run")
        for name in metrics
    ]


def _unit(name: str) -> str:
    m = METRICS.get(name)
    return m.unit if m else ""


# --- calibration --------------------------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    """A threshold for one metric, from repeated runs of unchanged code (A/A).

    ``needed`` is the smallest threshold under which no A/A pair would have
    failed; ``threshold`` adds the margin and rounds up to half a percent.
    ``spread`` is the largest run-to-run ratio of medians minus one, for
    scale.  ``worst`` names the benchmark that needed the most.
    """

    metric: str
    threshold: float
    needed: float
    spread: float
    pairs: int
    worst: str


def recommend_thresholds(
    runs: Sequence[Mapping[str, Mapping[str, Sequence[float]]]],
    *,
    margin: float = 1.25,
    floor: float = 0.01,
    confidence: float = stats.DEFAULT_CONFIDENCE,
) -> dict[str, Recommendation]:
    """Per gated metric, the threshold at which these A/A runs would all have passed.

    ``runs`` holds one mapping per run: benchmark name -> metric -> samples.
    Every ordered pair of runs is judged as baseline and current with the
    gate's own rule; a pair fails at threshold ``T`` only when it is
    significant and its interval reaches past ``T``, so the threshold it
    needs is that interval's far end.  The recommendation is the largest
    need times ``margin``, at least ``floor``, rounded up to 0.5%.
    """
    needs: dict[str, list[tuple[float, str]]] = {}
    spreads: dict[str, float] = {}
    for i, base in enumerate(runs):
        for j, cur in enumerate(runs):
            if i == j:
                continue
            for name, metrics in cur.items():
                for metric, samples in metrics.items():
                    meta = METRICS.get(metric)
                    b = base.get(name, {}).get(metric)
                    if meta is None or not meta.gated or not b or not samples:
                        continue
                    ch = stats.compare(b, samples, confidence)
                    if meta.higher_is_better:
                        need = 1.0 - ch.ci_low if ch.significant_decrease else 0.0
                    else:
                        need = ch.ci_high - 1.0 if ch.significant_increase else 0.0
                    needs.setdefault(metric, []).append((need, name))
                    spreads[metric] = max(spreads.get(metric, 0.0), abs(ch.ratio - 1.0))
    out = {}
    for metric, values in sorted(needs.items()):
        need, worst = max(values)
        rounded = math.ceil(max(floor, need * margin) * 200 - 1e-9) / 200
        out[metric] = Recommendation(metric, rounded, need, spreads[metric], len(values), worst)
    return out
