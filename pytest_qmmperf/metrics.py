"""Metric names, units and directions, and the result record of one benchmark.

Pure data: no pytest, no MLX.  Everything that gates or reports a metric
looks it up here, so a metric's direction is decided in exactly one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Metric:
    """One measured quantity.

    ``higher_is_better`` decides which direction is a regression;
    ``gated`` says whether the default gate checks it (derived metrics such
    as ``tflops`` restate ``time_s`` and would count the same change twice).
    """

    name: str
    unit: str
    higher_is_better: bool
    gated: bool
    description: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("time_s", "s", False, True, "device time of one kernel launch"),
        Metric("tflops", "TFLOP/s", True, False, "achieved FLOP rate (derived from time_s)"),
        Metric("gbps", "GB/s", True, False, "achieved memory bandwidth (derived from time_s)"),
        Metric(
            "roofline_pct", "%", True, False, "share of the roofline bound reached (derived)"
        ),
        Metric("ttft_s", "s", False, True, "time to first token: prompt processed, first sampled"),
        Metric("prompt_tps", "tok/s", True, True, "prompt (prefill) throughput"),
        Metric("gen_tps", "tok/s", True, True, "generation (decode) throughput"),
        Metric("peak_memory_gb", "GB", False, True, "peak device memory during the run"),
        Metric("cold_start_s", "s", False, False, "first run including JIT compilation"),
    )
}


def metric(name: str) -> Metric:
    """Look a metric up by name; unknown names raise ``KeyError`` listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(METRICS)
        raise KeyError(f"unknown metric {name!r}; known metrics: {known}") from None


@dataclass(frozen=True)
class BenchResult:
    """What one ``qmm_bench`` test measured.

    ``params`` identify the workload (shape, bits, variant, ...): a baseline
    entry is only comparable when its params are equal.  ``samples`` holds the
    raw per-round values of every metric, in the metric's unit.  ``info``
    carries how it was measured (launches per round, rounds, roofline source)
    and is reported but never compared.
    """

    name: str
    kind: str
    params: dict[str, Any]
    samples: dict[str, list[float]]
    info: dict[str, Any] = field(default_factory=dict)

    def median(self, metric_name: str) -> float:
        """Median of one metric's samples (NaN when the metric was not measured)."""
        values = sorted(self.samples.get(metric_name, ()))
        if not values:
            return math.nan
        mid = len(values) // 2
        if len(values) % 2:
            return values[mid]
        return 0.5 * (values[mid - 1] + values[mid])
