"""Per-session state of the plugin, kept under one stash key.

It owns what is measured once per session (fingerprint, roofline peaks,
evaluation overhead, the reference workload), collects every test's result
and verdicts, and does the session-end work (reports, baseline save).  Hooks
in ``plugin.py`` only forward to it.

The gate runs inside each test's own call (:meth:`QmmSession.record`, called
by the fixture), so a regression fails that test.  The baseline is looked up
once, on the first timed result; options that need git (``--qmm-baseline-rev``,
``--qmm-save-baseline``) are checked when the session starts, before any
benchmark runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from pytest_qmmperf import baselines, gate, timing
from pytest_qmmperf import revision as rev
from pytest_qmmperf.metrics import BenchResult
from pytest_qmmperf.options import Options

if TYPE_CHECKING:
    from pytest_qmmperf.timing import Peaks


class ReferenceWorkload:
    """A fixed MLX workload timed in short bursts to track the machine's own speed.

    It is one 4-bit affine ``mx.quantized_matmul`` of a fixed shape with fixed
    inputs and a fixed number of launches per round (a round lasts a few
    milliseconds, like a benchmark's), so its time changes only when the
    machine (clock, thermal state, other load) or MLX changes.  A burst runs
    right before and right after every benchmark: the machine's speed is
    taken where and when the benchmark ran, not once at the session's start.
    """

    def __init__(self, backend: str) -> None:
        if backend == "cpu":
            # MLX's CPU QMM is slow and its fp16 path emulated: a small float32 shape.
            self.shape, self.dtype, self.launches = (16, 256, 256), "float32", 8
        else:
            self.shape, self.dtype, self.launches = (512, 2048, 2048), "float16", 32
        self._timer: timing.RoundTimer | None = None

    @property
    def description(self) -> str:
        """What the workload is, for the baseline file and the report."""
        m, n, k = self.shape
        return (f"mx.quantized_matmul affine 4-bit g64 M={m} N={n} K={k} {self.dtype}, "
                f"{self.launches} launches per round")

    def _build(self, overhead_s: float) -> timing.RoundTimer:
        import mlx.core as mx

        m, n, k = self.shape
        dtype = getattr(mx, self.dtype)
        key = mx.random.key(20240607)
        kw, *kx = mx.random.split(key, 5)
        w = mx.random.normal((n, k), key=kw).astype(dtype)
        wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
        xs = [mx.random.normal((m, k), key=kk).astype(dtype) for kk in kx]
        mx.eval(wq, scales, biases, *xs)

        def launch(i: int) -> list[Any]:
            return [mx.quantized_matmul(xs[i % len(xs)], wq, scales, biases, transpose=True,
                                        group_size=64, bits=4)]

        timer = timing.RoundTimer(launch, overhead_s=overhead_s, launches=self.launches)
        timer.run(3)  # warm-up: compile and page in; discarded below
        timer.samples_s.clear()
        timer.round_times_s.clear()
        return timer

    def burst(self, overhead_s: float, rounds: int = 7) -> list[float]:
        """``rounds`` samples of the reference workload (seconds per launch)."""
        if self._timer is None:
            self._timer = self._build(overhead_s)
        start = len(self._timer.samples_s)
        self._timer.run(rounds)
        return list(self._timer.samples_s[start:])


@dataclass
class GateState:
    """What the gate compares with in this session, found on the first timed result."""

    key: str
    fingerprint: dict[str, Any]
    lookup: baselines.Lookup | None = None
    #: Why there is nothing to compare with (no baseline, not a git repository).
    message: str = ""
    #: A baseline that exists but cannot be used: every timed test fails with it.
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> baselines.Found | None:
        return self.lookup.found if self.lookup else None


class QmmSession:
    """Everything the plugin knows during one pytest session."""

    def __init__(self, config: pytest.Config, options: Options) -> None:
        self.config = config
        self.options = options
        self.results: list[BenchResult] = []
        self.verdicts: list[gate.Verdict] = []
        #: Variants registered through the hook this session (removed at its end).
        self.hook_variants: list[str] = []
        #: Reference workload samples of this session, in order.
        self.reference_samples: list[float] = []
        #: Reference samples taken around each benchmark (before and after), by test.
        self.local_reference: dict[str, list[float]] = {}
        self._pending_reference: list[float] = []
        #: Lines for the report's footer (baseline saved, HEAD detached, ...).
        self.notes: list[str] = []
        self.saved: baselines.Saved | None = None
        self.save_error = ""
        self.head: rev.Revision | None = None
        self._fingerprint: dict[str, Any] | None = None
        self._peaks: Peaks | None = None
        self._policy: timing.TimingPolicy | None = None
        self._reference: ReferenceWorkload | None = None
        self._gate: GateState | None = None
        self._last_progress = 0.0
        try:
            self.thresholds = gate.Thresholds.from_options(
                cli=config.getoption("qmm_threshold") or (),
                ini=config.getini("qmm_thresholds") or (),
            )
        except gate.ThresholdError as exc:
            raise pytest.UsageError(str(exc)) from None
        if options.enabled:
            self._check_git()

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

    def reference(self) -> ReferenceWorkload:
        """The machine-drift reference workload of this backend."""
        if self._reference is None:
            self._reference = ReferenceWorkload(self.backend())
        return self._reference

    # --- git, checked up front -----------------------------------------

    def _repo(self) -> Any:
        return rev.open_repo(self.config.rootpath)

    def _check_git(self) -> None:
        """Fail at start-up, not after the benchmarks, on options git cannot satisfy."""
        o = self.options
        if not (o.save_baseline or o.baseline_rev):
            return
        try:
            repo = self._repo()
            if o.baseline_rev:
                rev.resolve(repo, o.baseline_rev)
                rev.repo_relative(repo, o.baseline_dir)  # read from REV's tree: must be in it
            if o.save_baseline:
                self.head = rev.head(repo)
                self._refuse_dirty(repo)
                rev.repo_relative(repo, o.baseline_dir)
        except (rev.RevisionError, baselines.BaselineError) as exc:
            raise pytest.UsageError(str(exc)) from None

    def _refuse_dirty(self, repo: Any) -> list[str]:
        """Changed paths of the work tree; ``RevisionError`` unless --qmm-allow-dirty."""
        inside = rev.repo_relative(repo, self.options.baseline_dir)
        dirty = rev.dirty_paths(repo, [inside] if inside != "." else [])
        if dirty and not self.options.allow_dirty:
            shown = ", ".join(p.strip() for p in dirty[:5]) + (" ..." if len(dirty) > 5 else "")
            raise rev.RevisionError(
                f"--qmm-save-baseline: the work tree has uncommitted changes ({shown}); a "
                "baseline must describe a commit: commit or stash them, or pass "
                "--qmm-allow-dirty to record anyway (the file is then marked dirty)"
            )
        return dirty

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

    def check_markers(self, items: list[pytest.Item]) -> None:
        """Validate every ``qmm_threshold`` marker at collection (``pytest.UsageError``)."""
        for item in items:
            for mark in item.iter_markers("qmm_threshold"):
                try:
                    gate.parse_marker(mark.args, mark.kwargs)
                except gate.ThresholdError as exc:
                    raise pytest.UsageError(f"{item.nodeid}: {exc}") from None

    def gate_state(self) -> GateState:
        """The baseline to compare with, looked up once (needs the fingerprint and git)."""
        if self._gate is not None:
            return self._gate
        fp = self.fingerprint()
        state = GateState(key=str(fp["key"]), fingerprint=fp)
        try:
            repo = self._repo()
        except rev.RevisionError as exc:
            state.message = f"{exc}; nothing to compare with"
            self._gate = state
            return state
        if not repo.head.is_valid() and not self.options.baseline_rev:
            # A repository without commits has no baseline yet; that is not an error.
            state.message = (f"{repo.working_tree_dir}: the repository has no commits yet, so "
                             "there is no baseline; commit, then record one with "
                             "--qmm-save-baseline")
            self._gate = state
            return state
        try:
            state.lookup = baselines.find(repo, self.options.baseline_dir, state.key,
                                          self.options.baseline_rev)
            state.message = state.lookup.message
        except (baselines.BaselineError, rev.RevisionError) as exc:
            state.error = str(exc)
        self._gate = state
        return state

    def _thresholds_for(self, item: pytest.Item | None) -> gate.Thresholds:
        mark = item.get_closest_marker("qmm_threshold") if item is not None else None
        if mark is None:
            return self.thresholds
        return self.thresholds.with_marker(mark.args, mark.kwargs)

    def drift_for(self, state: GateState, entry: baselines.Entry | None,
                  current: list[float] | None = None) -> gate.Drift | None:
        """Machine drift since the baseline was recorded.

        ``current`` holds the reference samples taken around this benchmark
        (default: the whole session's).  The baseline side is the recording
        session's reference samples, rescaled to the median that was measured
        around this entry's own benchmark (``reference_s``): the speed ratio
        is local on both sides, its spread that of a whole session.
        """
        found = state.found
        if found is None:
            return None
        return gate.local_drift(
            found.baseline.reference,
            entry.reference_s if entry is not None else None,
            current if current is not None else self.reference_samples,
            same_mlx=found.baseline.mlx_version == str(state.fingerprint.get("mlx_version")),
            min_change=gate.drift_floor(self.backend()),
        )

    def before_benchmark(self) -> None:
        """Time a reference burst before a ``qmm_bench`` test (only with --qmm-bench)."""
        if self.options.enabled:
            self._pending_reference = self.reference().burst(self.eval_overhead_s())

    def record(self, result: BenchResult, item: pytest.Item,
               second_look: Callable[[], BenchResult] | None = None,
               ) -> tuple[BenchResult, str | None]:
        """Keep ``result`` and judge it; return it and a failure message when it regressed.

        ``second_look`` re-measures the same benchmark and returns a result
        holding both measurements' samples.  When the first verdicts ask for it
        (:func:`pytest_qmmperf.gate.wants_second_look`: a timing regression, or
        a timing change of half the threshold that was not significant), it
        is called between two more reference bursts and the pooled result is
        judged instead; that result is the one kept and returned.
        """
        if not self.options.enabled:
            self.results.append(result)
            return result, None
        before = self._pending_reference
        after = self.reference().burst(self.eval_overhead_s())
        self._pending_reference = []
        state = self.gate_state()
        if state.error:
            self._keep(result, before + after)
            return result, state.error
        verdicts = self._judge(result, item, state, before, after)
        if (second_look is not None and not self.options.save_baseline
                and gate.wants_second_look(verdicts)):
            before2 = self.reference().burst(self.eval_overhead_s())
            pooled = second_look()
            after2 = self.reference().burst(self.eval_overhead_s())
            first_rounds = int(result.info.get("rounds", 0))
            rounds = int(pooled.info.get("rounds", 0))
            result = dataclasses.replace(pooled, info={
                **pooled.info, "second_look": {
                    "rounds_first": first_rounds, "rounds_second": rounds - first_rounds,
                    "first": {v.metric: v.status for v in verdicts
                              if gate.drift_power(v.metric) and v.status != "not-gated"},
                }})
            note = (f"second look: judged on {first_rounds} + {rounds - first_rounds} rounds "
                    "of two measurements")
            verdicts = [
                dataclasses.replace(v, note="; ".join(filter(None, [v.note, note])))
                if gate.drift_power(v.metric) else v
                for v in self._judge(result, item, state, before + before2, after + after2,
                                     unsteady=[(before, after), (before2, after2)])
            ]
            before, after = before + before2, after + after2
        self._keep(result, before + after)
        if self.options.save_baseline:
            # Recording a new yardstick: changes are reported, not enforced.
            verdicts = [
                dataclasses.replace(v, enforced=False, note="; ".join(
                    filter(None, [v.note, "recording a new baseline: not enforced"])))
                if v.status == "regression" else v
                for v in verdicts
            ]
        self.verdicts.extend(verdicts)
        failed = [v for v in verdicts if v.failed]
        if failed:
            return result, " | ".join(v.message() for v in failed)
        return result, None

    def _keep(self, result: BenchResult, local: list[float]) -> None:
        self.results.append(result)
        self.local_reference[result.name] = local
        self.reference_samples += local

    def _judge(self, result: BenchResult, item: pytest.Item, state: GateState,
               before: list[float], after: list[float],
               unsteady: list[tuple[list[float], list[float]]] | None = None,
               ) -> list[gate.Verdict]:
        """The gate's verdicts for ``result``, with the reference bursts around it."""
        thresholds = self._thresholds_for(item)
        found = state.found
        entry = found.baseline.entries.get(result.name) if found else None
        enforce, why = True, ""
        unsteady_reason = None
        if found is not None:
            for b, a in unsteady or [(before, after)]:
                unsteady_reason = unsteady_reason or gate.unsteady(b, a)
        if state.fingerprint.get("virtual") and not self.options.gate_virtual:
            enforce, why = False, "virtual GPU: timing reported, not enforced (--qmm-gate-virtual)"
        elif result.info.get("host_bound") and not self.options.gate_host_bound:
            enforce, why = False, (
                f"host-bound: dispatch took {100 * result.info['host_fraction']:.0f}% of each "
                "round, so time_s measures the host; timing reported, not enforced "
                "(--qmm-gate-host-bound)")
        elif unsteady_reason:
            enforce, why = False, unsteady_reason
        unenforced = {}
        if result.info.get("gen_host_bound") and not self.options.gate_host_bound:
            unenforced["gen_tps"] = (
                f"host-bound generation: building and queueing a decode step took "
                f"{100 * result.info['gen_host_fraction']:.0f}% of the step, so gen_tps "
                "measures the host; reported, not enforced (--qmm-gate-host-bound)")
        return gate.judge(
            result.name,
            result.samples,
            entry.samples if entry is not None else None,
            current_params=baselines.normalize(result.params),
            baseline_params=entry.params if entry is not None else None,
            baseline_medians={m: s["median"] for m, s in entry.summary.items()} if entry else {},
            thresholds=thresholds,
            baseline_revision=found.sha if found else None,
            drift=self.drift_for(state, entry, before + after),
            enforce_timing=enforce,
            timing_note=why,
            unenforced=unenforced,
        )

    # --- session end -----------------------------------------------------

    def drift(self) -> gate.Drift | None:
        """The session's machine drift against the baseline (for the report)."""
        if self._gate is None:
            return None
        return self.drift_for(self._gate, None)

    def missing_verdicts(self) -> list[gate.Verdict]:
        """Baseline entries whose tests did not run in this session."""
        if self._gate is None or self._gate.found is None:
            return []
        ran = {r.name for r in self.results}
        found = self._gate.found
        out: list[gate.Verdict] = []
        for name, entry in sorted(found.baseline.entries.items()):
            if name not in ran:
                out += gate.missing(name, entry.samples, found.sha)
        return out

    def report(self) -> Any:
        """Everything the report writers need, as one object."""
        from pytest_qmmperf.report import Report

        state = self._gate
        return Report(
            results=list(self.results),
            verdicts=list(self.verdicts) + self.missing_verdicts(),
            fingerprint=self.fingerprint() if self.results else {},
            found=state.found if state else None,
            message=(state.error or state.message) if state else "",
            drift=self.drift(),
            notes=list(self.notes),
            reference_workload=self._reference.description if self._reference else "",
        )

    def terminal_summary(self, terminalreporter: Any) -> None:
        from pytest_qmmperf.report import terminal_lines

        if not self.results:
            return
        terminalreporter.write_sep("-", "qmm_bench results")
        for line in terminal_lines(self.report()):
            terminalreporter.write_line(line)

    def finish(self, session: pytest.Session) -> None:
        """Session-end work: baseline save, then the JSON and Markdown reports."""
        if not self.options.enabled or not self.results:
            return
        if self.options.save_baseline:
            self._save()
            if self.save_error and session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        from pytest_qmmperf import report

        rep = self.report()
        if self.options.json_path:
            report.write_json(rep, self.options.json_path)
        if self.options.markdown_path:
            text = report.markdown(rep)
            report.write_text(self.options.markdown_path, text)
            summary = os.environ.get("GITHUB_STEP_SUMMARY")
            if summary:
                with open(summary, "a", encoding="utf-8") as f:
                    f.write(text + "\n")

    def _save(self) -> None:
        """Write this hardware's baseline at HEAD (refusing a tree that became dirty)."""
        from pytest_qmmperf import __version__

        try:
            repo = self._repo()
            head = rev.head(repo)
            if self.head is not None and head.sha != self.head.sha:
                raise rev.RevisionError(
                    f"--qmm-save-baseline: HEAD moved from {self.head.short} to {head.short} "
                    "during the run; nothing saved, run again"
                )
            dirty = self._refuse_dirty(repo)
        except rev.RevisionError as exc:
            self._save_failed(str(exc))
            return
        fp = self.fingerprint()
        revision = {**head.as_dict(), "dirty": bool(dirty)}
        base = baselines.new_baseline(
            self.results, hardware=fp, revision=revision, reference=self.reference_samples,
            reference_workload=self.reference().description, tool=f"pytest-qmmperf {__version__}",
            local_reference={name: gate.reference_speed(v)
                             for name, v in self.local_reference.items() if v},
        )
        try:
            self.saved = baselines.save(self.options.baseline_dir, base)
        except baselines.BaselineError as exc:
            self._save_failed(str(exc))
            return
        where = os.path.relpath(self.saved.path, self.config.rootpath)
        count = len(base.entries)
        line = f"baseline saved: {where} ({count} benchmark{'s' if count != 1 else ''}"
        if self.saved.kept:
            line += f", {self.saved.kept} kept from an earlier save at this commit"
        if self.saved.replaced:
            line += ", replacing one recorded with another MLX version"
        self.notes.append(line + ")")
        if head.detached:
            self.notes.append(f"HEAD is detached at {head.short}: the baseline is recorded for "
                              "that commit")
        if dirty:
            self.notes.append(f"recorded from a dirty work tree ({len(dirty)} changed paths, "
                              "--qmm-allow-dirty): the file is marked dirty")

    def _save_failed(self, message: str) -> None:
        """A save that cannot happen is reported, and fails the session (see :meth:`finish`)."""
        self.notes.append(f"baseline NOT saved: {message}")
        self.save_error = message
