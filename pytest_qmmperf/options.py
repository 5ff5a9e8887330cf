"""Command-line and ini options, resolved once into a frozen :class:`Options`.

Every option has a command-line flag (``default=None``) and, where it makes
sense to set it per project, an ini key: the flag wins, then the ini key,
then the default.  Bad values raise ``pytest.UsageError`` at configure time,
before any benchmark has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class Options:
    """The plugin's settings for one pytest session."""

    enabled: bool
    baseline_dir: Path
    baseline_rev: str | None
    thresholds: tuple[str, ...]
    save_baseline: bool
    allow_dirty: bool
    gate_virtual: bool
    gate_host_bound: bool
    json_path: Path | None
    markdown_path: Path | None
    precision: float | None
    time_budget_s: float | None
    min_rounds: int | None


def add_options(parser: pytest.Parser) -> None:
    """Declare the flags and ini keys (called from ``pytest_addoption``)."""
    group = parser.getgroup("qmmperf", "quantized-matmul benchmarks and regression gate")
    group.addoption("--qmm-bench", action="store_true", default=None,
                    help="time and gate the qmm_bench tests (default: check mode, run once "
                         "and verify outputs)")
    group.addoption("--qmm-baseline-dir", metavar="DIR", default=None,
                    help="where baselines live, relative to rootdir (ini: qmm_baseline_dir, "
                         "default: baselines)")
    group.addoption("--qmm-baseline-rev", metavar="REV", default=None,
                    help="compare with the baseline at REV or its nearest ancestor that has one "
                         "(default: HEAD's nearest)")
    group.addoption("--qmm-threshold", metavar="[METRIC=]PCT", action="append", default=None,
                    help="regression tolerance, e.g. 5%% or ttft_s=3%% (repeatable; ini: "
                         "qmm_thresholds)")
    group.addoption("--qmm-save-baseline", action="store_true", default=None,
                    help="after the run, write this hardware's baseline at HEAD")
    group.addoption("--qmm-allow-dirty", action="store_true", default=None,
                    help="let --qmm-save-baseline record from a work tree with uncommitted "
                         "changes")
    group.addoption("--qmm-gate-virtual", action="store_true", default=None,
                    help="fail on timing regressions even on a virtual GPU")
    group.addoption("--qmm-gate-host-bound", action="store_true", default=None,
                    help="fail on timing regressions even where dispatching a round (or a "
                         "prefill's decode step, for gen_tps) took as long as running it (the "
                         "sample then measures the host)")
    group.addoption("--qmm-json", metavar="PATH", default=None,
                    help="write results, the baseline used and verdicts as JSON")
    group.addoption("--qmm-markdown", metavar="PATH", default=None,
                    help="write the report as a Markdown table (also appended to "
                         "$GITHUB_STEP_SUMMARY when set)")
    group.addoption("--qmm-precision", metavar="PCT", default=None,
                    help="target half-width of the 95%% CI of each median (ini: qmm_precision; "
                         "default 0.5%% on GPUs, 1%% on CPU)")
    group.addoption("--qmm-time-budget", metavar="SECONDS", default=None,
                    help="time budget for the timed rounds of one benchmark (ini: "
                         "qmm_time_budget; default 5 on GPUs, 2 on CPU)")
    group.addoption("--qmm-min-rounds", metavar="N", default=None,
                    help="never fewer timed rounds than this (ini: qmm_min_rounds)")
    parser.addini("qmm_baseline_dir", "where baselines live, relative to rootdir",
                  default="baselines")
    parser.addini("qmm_thresholds", "regression tolerances, e.g. 5% ttft_s=3%", type="args",
                  default=[])
    parser.addini("qmm_precision", "target half-width of each median's 95% CI", default="")
    parser.addini("qmm_time_budget", "seconds of timed rounds per benchmark", default="")
    parser.addini("qmm_min_rounds", "minimum timed rounds per benchmark", default="")


def parse_percent(text: str, what: str) -> float:
    """``"5%"``, ``"5"`` or ``"0.05"``-style text as a fraction (``5% -> 0.05``).

    Bare numbers are percentages, as in ``--qmm-threshold 5``.
    """
    raw = str(text).strip()
    try:
        value = float(raw[:-1] if raw.endswith("%") else raw) / 100.0
    except ValueError:
        raise pytest.UsageError(
            f"{what}={text!r}: expected a percentage such as 5% or 0.5%"
        ) from None
    if not 0 < value < 10:
        raise pytest.UsageError(f"{what}={text!r}: expected a percentage above 0% and below 1000%")
    return value


def _number(text: Any, what: str, kind: type, minimum: float) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise pytest.UsageError(
            f"{what}={text!r}: expected a {kind.__name__} >= {minimum}"
        ) from None
    if value < minimum:
        raise pytest.UsageError(f"{what}={text!r}: expected a {kind.__name__} >= {minimum}")
    return value


def resolve(config: pytest.Config) -> Options:
    """Flags, then ini keys, then defaults; ``pytest.UsageError`` on bad values."""

    names: dict[str, str] = {}

    def pick(flag: str, ini: str | None = None) -> Any:
        """The flag's value, else the ini key's; remembers which one for error messages."""
        value = config.getoption(flag)
        names[flag] = "--" + flag.replace("_", "-")
        if value is None and ini is not None:
            value = config.getini(ini)
            names[flag] = f"ini {ini}"
            if value in ("", []):
                value = None
        return value

    rootdir = Path(str(config.rootpath))
    base = Path(pick("qmm_baseline_dir", "qmm_baseline_dir") or "baselines")
    cli_thresholds = config.getoption("qmm_threshold") or []
    ini_thresholds = config.getini("qmm_thresholds") or []
    precision = pick("qmm_precision", "qmm_precision")
    budget = pick("qmm_time_budget", "qmm_time_budget")
    min_rounds = pick("qmm_min_rounds", "qmm_min_rounds")

    def path(flag: str) -> Path | None:
        value = config.getoption(flag)
        return Path(value).resolve() if value else None

    return Options(
        enabled=bool(config.getoption("qmm_bench")),
        baseline_dir=base if base.is_absolute() else rootdir / base,
        baseline_rev=config.getoption("qmm_baseline_rev"),
        # ini first, command line after: later entries override earlier ones.
        thresholds=tuple(ini_thresholds) + tuple(cli_thresholds),
        save_baseline=bool(config.getoption("qmm_save_baseline")),
        allow_dirty=bool(config.getoption("qmm_allow_dirty")),
        gate_virtual=bool(config.getoption("qmm_gate_virtual")),
        gate_host_bound=bool(config.getoption("qmm_gate_host_bound")),
        json_path=path("qmm_json"),
        markdown_path=path("qmm_markdown"),
        precision=parse_percent(precision, names["qmm_precision"])
        if precision is not None else None,
        time_budget_s=_number(budget, names["qmm_time_budget"], float, 0.01)
        if budget is not None else None,
        min_rounds=_number(min_rounds, names["qmm_min_rounds"], int, 1)
        if min_rounds is not None else None,
    )
