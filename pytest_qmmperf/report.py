"""Reports of a session: the terminal table, Markdown and JSON.

All three are built from one :class:`Report` (results, verdicts, the
baseline used, machine drift, notes), so they cannot disagree.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_qmmperf import baselines, gate, stats
from pytest_qmmperf.metrics import METRICS, BenchResult

#: Version of the ``--qmm-json`` layout.
JSON_SCHEMA_VERSION = 1

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

#: Order in which a result's verdicts are summarised: the worst first.
_SEVERITY = {"regression": 0, "not-comparable": 1, "improvement": 2, "unchanged": 3, "new": 4,
             "missing": 5, "not-gated": 6}


@dataclass
class Report:
    """What one session measured and concluded."""

    results: list[BenchResult]
    verdicts: list[gate.Verdict]
    fingerprint: dict[str, Any]
    found: baselines.Found | None = None
    #: Why nothing was compared (no baseline, not a git repository), or the baseline error.
    message: str = ""
    drift: gate.Drift | None = None
    notes: list[str] = field(default_factory=list)
    reference_workload: str = ""

    @property
    def failed(self) -> list[gate.Verdict]:
        """Verdicts that fail their tests."""
        return [v for v in self.verdicts if v.failed]

    def verdicts_of(self, name: str) -> list[gate.Verdict]:
        return [v for v in self.verdicts if v.test == name]

    def baseline_line(self) -> str:
        """Which baseline was used, or why none was."""
        if self.found is None:
            return f"baseline: none: {self.message}" if self.message else "baseline: none"
        f = self.found
        rev = f.baseline.revision
        back = "HEAD's own commit" if f.distance == 0 else f"{f.distance} commits back"
        source = f.source
        if os.path.isabs(source):
            rel = os.path.relpath(source)
            source = source if rel.startswith("..") else rel
        return (f"baseline: {f.sha[:10]} ({back}; {rev.get('subject', '')!s}) from {source}, "
                f"MLX {f.baseline.mlx_version}")


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


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:+.1f}%"


def verdict_cell(verdicts: Iterable[gate.Verdict]) -> str:
    """The worst gated verdict of one result, in a few words (``-`` when none)."""
    gated = [v for v in verdicts if v.status != "not-gated"]
    if not gated:
        return "-"
    worst = min(gated, key=lambda v: (_SEVERITY[v.status], -abs(v.change or 0)))
    if worst.status in ("regression", "improvement"):
        word = worst.status.upper() if worst.failed else worst.status
        if worst.status == "regression" and not worst.enforced:
            word += " (not enforced)"
        return f"{word} {worst.metric} {_pct(worst.change)}"
    if worst.status == "unchanged":
        biggest = max(gated, key=lambda v: abs(v.change or 0))
        return f"unchanged ({biggest.metric} {_pct(biggest.change)})"
    return worst.status


def terminal_table(results: Iterable[BenchResult], fingerprint: dict[str, Any],
                   verdicts: Iterable[gate.Verdict] = ()) -> list[str]:
    """Lines of a fixed-width table: one row per result, medians with ±spread, verdict."""
    results = list(results)
    verdicts = list(verdicts)
    used = [c for c in COLUMNS if any(r.samples.get(c[0]) for r in results)]
    header = ["test", "workload", *[c[1] for c in used], "rounds x launches"]
    if verdicts:
        header.append("vs baseline")
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
        if verdicts:
            cells.append(verdict_cell(v for v in verdicts if v.test == r.name))
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"hardware: {fingerprint.get('key')} (MLX {fingerprint.get('mlx_version')})"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows)
    sources = {s for r in results if (s := r.info.get("roofline_source")) is not None}
    for source in sorted(sources):
        lines.append(f"roofline peaks: {source}")
    lines.append("± is half the interquartile range of the samples, relative to the median")
    return lines


def _count(verdicts: Iterable[gate.Verdict], status: str) -> int:
    return len({v.test for v in verdicts if v.status == status})


def summary_line(report: Report) -> str:
    """Counts of benchmarks by their worst verdict."""
    vs = report.verdicts
    parts = [f"{_count(vs, s)} {s}" for s in ("regression", "improvement", "not-comparable",
                                              "new", "missing") if _count(vs, s)]
    failing = len({v.test for v in report.failed})
    head = f"gate: {failing} failing" if failing else "gate: pass"
    return head + (f" ({', '.join(parts)})" if parts else "")


def terminal_lines(report: Report) -> list[str]:
    """The terminal summary: table, baseline used, drift, verdict details, notes."""
    lines = terminal_table(report.results, report.fingerprint, report.verdicts)
    lines.append(report.baseline_line())
    if report.drift is not None:
        lines.append(f"machine drift: {report.drift.describe()}")
    if report.fingerprint.get("virtual"):
        lines.append(f"virtual GPU ({report.fingerprint.get('device_name')}): timing is "
                     "reported, not enforced (--qmm-gate-virtual to enforce)")
    for v in report.verdicts:
        if v.status in ("regression", "improvement", "not-comparable"):
            lines.append(f"  {v.test}: {v.message()}")
    missing = sorted({v.test for v in report.verdicts if v.status == "missing"})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        lines.append(f"  {len(missing)} baseline benchmarks did not run: {shown}")
    if report.verdicts:
        lines.append(summary_line(report))
    lines.extend(report.notes)
    return lines


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: Report) -> str:
    """The report as Markdown: a header, one table row per gated metric, then notes."""
    fp = report.fingerprint
    out = ["## pytest-qmmperf", ""]
    out.append(f"**{summary_line(report)}** on `{fp.get('key')}` (MLX {fp.get('mlx_version')})")
    out.append("")
    out.append(_md(report.baseline_line()))
    if report.drift is not None:
        out += ["", _md(f"Machine drift: {report.drift.describe()}")]
    out += ["", "| test | metric | baseline | current | change | CI | threshold | verdict |",
            "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    by_name = {r.name: r for r in report.results}
    for v in report.verdicts:
        if v.status == "not-gated":
            continue
        ci = ""
        if v.ci_low is not None and v.ci_high is not None and v.confidence:
            ci = f"{_pct(v.ci_low)}..{_pct(v.ci_high)}"
        threshold = f"{v.threshold * 100:g}%" if v.threshold is not None else ""
        verdict = f"**{v.status}**" if v.failed else v.status
        if v.note:
            verdict += f" ({v.note})"
        cur = v.current
        if cur is None and v.test in by_name and by_name[v.test].samples.get(v.metric):
            cur = stats.summarize(by_name[v.test].samples[v.metric]).median
        out.append("| " + " | ".join(_md(c) for c in (
            v.test, v.metric, gate.format_value(v.baseline, v.unit),
            gate.format_value(cur, v.unit), _pct(v.change), ci, threshold, verdict)) + " |")
    if report.notes:
        out += [""] + [f"- {_md(n)}" for n in report.notes]
    return "\n".join(out) + "\n"


def _result_dict(result: BenchResult) -> dict[str, Any]:
    summary = {}
    for name, values in result.samples.items():
        if values:
            s = stats.summarize(values)
            summary[name] = {"n": s.n, "median": s.median, "mean": s.mean, "stdev": s.stdev,
                             "iqr": s.iqr, "min": s.min, "max": s.max}
    return {"name": result.name, "kind": result.kind, "params": baselines.normalize(result.params),
            "summary": summary, "samples": result.samples,
            "info": baselines.normalize(result.info)}


def as_json(report: Report) -> dict[str, Any]:
    """The ``--qmm-json`` document."""
    found = report.found
    d = report.drift
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "hardware": baselines.normalize(report.fingerprint),
        "baseline": None if found is None else {
            "sha": found.sha, "distance": found.distance, "source": found.source,
            "revision": found.baseline.revision, "mlx_version": found.baseline.mlx_version,
        },
        "baseline_message": report.message,
        "drift": None if d is None else {
            "ratio": d.ratio, "ci_low": d.ci_low, "ci_high": d.ci_high,
            "baseline_s": d.baseline_s, "current_s": d.current_s, "applied": d.applied,
            "reason": d.reason, "workload": report.reference_workload,
        },
        "passed": not report.failed,
        "results": [_result_dict(r) for r in report.results],
        "verdicts": [v.to_dict() for v in report.verdicts],
        "notes": report.notes,
    }


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, creating folders as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(o: Any) -> Any:
    """``o`` with NaN and infinities as ``None`` (JSON has neither)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def write_json(report: Report, path: Path) -> None:
    """Write the ``--qmm-json`` document (NaN becomes null: JSON has no NaN)."""
    write_text(path, json.dumps(finite(as_json(report)), indent=1, default=str) + "\n")
