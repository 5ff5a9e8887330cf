"""Per-session state of the plugin, kept under one stash key.

It owns what is measured once per session (fingerprint, roofline peaks,
evaluation overhead), collects every test's result and verdicts, and does
the session-end work (reports, baseline save).  Hooks in ``plugin.py`` only
forward to it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest

from pytest_qmmperf import timing
from pytest_qmmperf.metrics import BenchResult
from pytest_qmmperf.options import Options

if TYPE_CHECKING:
    from pytest_qmmperf.timing import Peaks


class QmmSession:
    """Everything the plugin knows during one pytest session."""

    def __init__(self, config: pytest.Config, options: Options) -> None:
        self.config = config
        self.options = options
        self.results: list[BenchResult] = []
        #: Variants registered through the hook this session (removed at its end).
        self.hook_variants: list[str] = []
        self._fingerprint: dict[str, Any] | None = None
        self._peaks: Peaks | None = None
        self._policy: timing.TimingPolicy | None = None
        self._last_progress = 0.0

    # --- measured once per session -------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """This machine's fingerprint (see :mod:`pytest_qmmperf.hardware`)."""
        if self._fingerprint is None:
            from pytest_qmmperf.hardware import fingerprint

            self._fingerprint = fingerprint()
        return self._fingerprint

    def backend(self) -> str:
        return str(self.fingerprint()["backend"])

    def policy(self) -> timing.TimingPolicy:
        """Timing policy for this backend with the session's overrides."""
        if self._policy is None:
            o = self.options
            self._policy = timing.TimingPolicy.for_backend(
                self.backend(), precision=o.precision, budget_s=o.time_budget_s,
                min_rounds=o.min_rounds,
            )
        return self._policy

    def eval_overhead_s(self) -> float:
        return timing.eval_overhead_s(self.backend())

    def peaks(self) -> Peaks:
        """Roofline ceilings, measured on first use."""
        if self._peaks is None:
            self._peaks = timing.measure_peaks(self.backend())
        return self._peaks

    # --- per test --------------------------------------------------------

    def progress(self, nodeid: str, message: str) -> None:
        """Progress of a long benchmark: every line with -v, else every few seconds."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        now = time.monotonic()
        if self.config.get_verbosity() < 1 and now - self._last_progress < 5.0:
            return
        self._last_progress = now
        reporter.write_line(f"[qmm] {nodeid}: {message}", cyan=True)

    def record(self, result: BenchResult, item: pytest.Item) -> str | None:
        """Keep ``result``; return a failure message when it regressed, else ``None``."""
        self.results.append(result)
        return None

    # --- session end -----------------------------------------------------

    def terminal_summary(self, terminalreporter: Any) -> None:
        from pytest_qmmperf.report import terminal_table

        if not self.results:
            return
        terminalreporter.write_sep("-", "qmm_bench results")
        for line in terminal_table(self.results, self.fingerprint()):
            terminalreporter.write_line(line)

    def finish(self, session: pytest.Session) -> None:
        """Session-end work: reports and baseline save."""
