"""Reports of a session's results: the terminal table (and, later, JSON and Markdown)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from pytest_qmmperf.metrics import METRICS, BenchResult

#: Columns of the terminal table: (metric, header, scale, format).
COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("time_s", "time (us)", 1e6, "{:.2f}"),
    ("tflops", "TFLOP/s", 1.0, "{:.3g}"),
    ("gbps", "GB/s", 1.0, "{:.4g}"),
    ("roofline_pct", "roofline %", 1.0, "{:.1f}"),
    ("ttft_s", "TTFT (s)", 1.0, "{:.4g}"),
    ("prompt_tps", "prompt tok/s", 1.0, "{:.5g}"),
    ("gen_tps", "gen tok/s", 1.0, "{:.4g}"),
    ("peak_memory_gb", "memory (GB)", 1.0, "{:.3g}"),
)


def spread_pct(values: list[float]) -> float:
    """Half the interquartile range as a percentage of the median (0 for one value)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    med = statistics.median(values)
    return 50.0 * (q3 - q1) / med if med else math.nan


def describe(result: BenchResult) -> str:
    """A short human label for a result's workload."""
    p = result.params
    if result.kind == "qmm":
        return (f"{p['variant']} M={p['M']} N={p['N']} K={p['K']} "
                f"{p['mode']} {p['bits']}-bit g{p['group_size']} {p['dtype']}")
    if result.kind == "prefill":
        return f"{p.get('variant', '')} {p.get('model', '')} {p.get('prompt_tokens', '')}+" \
               f"{p.get('gen_tokens', '')}"
    return str(p.get("fn") or p.get("engine") or result.kind)


def terminal_table(results: Iterable[BenchResult], fingerprint: dict[str, Any]) -> list[str]:
    """Lines of a fixed-width table: one row per result, medians with ±spread."""
    results = list(results)
    used = [c for c in COLUMNS if any(r.samples.get(c[0]) for r in results)]
    header = ["test", "workload", *[c[1] for c in used], "rounds x launches"]
    rows = []
    for r in results:
        cells = [r.name.split("::")[-1], describe(r)]
        for name, _, scale, fmt in used:
            values = r.samples.get(name)
            if not values:
                cells.append("")
                continue
            text = fmt.format(statistics.median(values) * scale)
            if len(values) > 1 and METRICS[name].gated:
                text += f" ±{spread_pct(values):.1f}%"
            cells.append(text)
        launches = r.info.get("launches_per_round")
        cells.append(f"{r.info.get('rounds', '')}" + (f" x {launches}" if launches else ""))
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"hardware: {fingerprint.get('key')} (MLX {fingerprint.get('mlx_version')})"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)
    sources = {r.info.get("roofline_source") for r in results} - {None}
    for source in sorted(sources):
        lines.append(f"roofline peaks: {source}")
    lines.append("± is half the interquartile range of the samples, relative to the median")
    return lines
