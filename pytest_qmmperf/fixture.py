"""``QmmBench``: the object behind the ``qmm_bench`` fixture.

One benchmark per test, as with pytest-benchmark's ``benchmark``.  Without
``--qmm-bench`` every method runs its workload once and verifies the output
(check mode); with it, the workload is timed on pytest-benchmark
(``benchmark.pedantic``) by :mod:`pytest_qmmperf.timing`, turned into a
:class:`~pytest_qmmperf.metrics.BenchResult` and judged by the session
inside this test's own call, so a regression fails this test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pytest_qmmperf import timing
from pytest_qmmperf.hardware import BackendError, import_mlx
from pytest_qmmperf.metrics import BenchResult
from pytest_qmmperf.variants import Variant, VariantError, get_variant
from pytest_qmmperf.workloads.qmm import (
    QmmSpec,
    QmmSpecError,
    check_output,
    input_sets,
    launcher,
    make_inputs,
)

if TYPE_CHECKING:
    from pytest_qmmperf.session import QmmSession

#: Most input sets rotated through; beyond this the set-up cost outweighs the
#: cache effect it removes.
MAX_INPUT_SETS = 128

#: Part of every timed benchmark's parameters, so a baseline recorded with
#: another timing method is "not comparable" rather than compared: launches
#: run one after another (before, MLX's CUDA graphs could overlap them).
TIMING_METHOD = "serial"

_OOM_WORDS = ("out of memory", "unable to allocate", "failed to allocate", "[malloc]",
              "cudaerrormemoryallocation", "insufficient memory")


#: Fewest measured prefill rounds: the gate's 99% interval needs 5 samples a
#: side to bound a change at all (fewer can never fail, whatever the change).
PREFILL_MIN_ROUNDS = 5

def _fail(message: str) -> NoReturn:
    """Fail the test with one clean line (no traceback, no chained exception)."""
    raise pytest.fail.Exception(message, pytrace=False) from None


class QmmBench:
    """Runs one QMM, model prefill, external result or MLX callable per test."""

    def __init__(self, request: pytest.FixtureRequest, session: QmmSession) -> None:
        self._request = request
        self._session = session
        self._used: str | None = None
        self._timer: timing.RoundTimer | None = None
        #: The result of this test's benchmark (``None`` in check mode).
        self.result: BenchResult | None = None

    # --- public API ------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when timing and gating (``--qmm-bench``), False in check mode."""
        return self._session.options.enabled

    def qmm(self, M: int, N: int, K: int, *, bits: int = 4, group_size: int = 64,
            mode: str = "affine", transpose: bool = True, dtype: str = "float16",
            variant: str = "mlx") -> BenchResult | None:
        """One quantized matmul ``x @ w.T`` (or ``x @ w``) with a registry variant."""
        self._claim("qmm")
        try:
            spec = QmmSpec(M=M, N=N, K=K, bits=bits, group_size=group_size, mode=mode,
                           transpose=transpose, dtype=dtype)
        except QmmSpecError as exc:
            _fail(f"qmm_bench.qmm: {exc}")
        kernel = self._variant(variant, spec)
        mx = self._mx()
        params = {**spec.params(), "variant": variant, "timing": TIMING_METHOD}

        with self._device_errors(f"{variant} {spec.label()}"):
            first = make_inputs(spec, seed=0)
            try:
                out = launcher(spec, kernel, [first])(0)[0]
                mx.eval(out)
                err = check_output(spec, first, out, variant)
            except AssertionError as exc:
                _fail(str(exc))
            del out
            if not self._timing_wanted():
                return None
            sets = input_sets(spec, self._session.policy().rotate_bytes, MAX_INPUT_SETS, first)
            launch = launcher(spec, kernel, sets)
            samples, info = self._time(launch, f"{variant} {spec.label()}")
            samples.update(timing.derived_metrics(samples["time_s"], spec.flops, spec.bytes,
                                                  self._session.peaks()))
            samples["peak_memory_gb"] = [self._working_set_gb(launch, spec.bytes)]
            info.update(input_sets=len(sets), relative_error=err, flops=spec.flops,
                        bytes=spec.bytes, roofline_source=self._session.peaks().source)
        return self._finish("qmm", params, samples, info, second_look=self._second_look(
            f"{variant} {spec.label()}", (spec.flops, spec.bytes, self._session.peaks())))

    def __call__(self, fn: Callable[[], Any], *, flops: float | None = None,
                 bytes: float | None = None,  # noqa: A002 - SPEC's keyword name
                 check: Callable[[Any], Any] | None = None) -> BenchResult | None:
        """Any MLX callable returning arrays; ``check(out)`` verifies its output."""
        self._claim("callable")
        if not callable(fn):
            _fail(f"qmm_bench(fn): fn={fn!r} is not callable; pass a function returning MLX arrays")
        for name, value in (("flops", flops), ("bytes", bytes)):
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                _fail(f"qmm_bench(fn): {name}={value!r}: expected a positive number or None")
        mx = self._mx()
        label = getattr(fn, "__qualname__", type(fn).__name__)
        with self._device_errors(label):
            out = fn()
            try:
                arrays = timing.outputs(out)
            except TypeError as exc:
                _fail(f"qmm_bench(fn): {label} {exc}")
            mx.eval(arrays)
            if check is not None and check(out) is False:
                _fail(f"qmm_bench(fn): check({label}) returned False")
            del out, arrays
            if not self._timing_wanted():
                return None
            samples, info = self._time(lambda _i: timing.outputs(fn()), label)
            samples.update(timing.derived_metrics(samples["time_s"], flops, bytes,
                                                  self._session.peaks() if (flops or bytes)
                                                  else None))
            samples["peak_memory_gb"] = [self._working_set_gb(lambda _i: timing.outputs(fn()), 0)]
            if flops or bytes:
                info["roofline_source"] = self._session.peaks().source
        params = {"fn": label, "flops": flops, "bytes": bytes, "timing": TIMING_METHOD}
        return self._finish("callable", params, samples, info, second_look=self._second_look(
            label, (flops, bytes, self._session.peaks() if (flops or bytes) else None)))

    def prefill(self, model: str, *, prompt_tokens: int, gen_tokens: int, bits: int = 4,
                group_size: int = 64, mode: str = "affine", variant: str = "mlx",
                prefill_step: int = 2048) -> BenchResult | None:
        """Model prefill and decode: ``ttft_s``, ``prompt_tps``, ``gen_tps``, memory."""
        self._claim("prefill")
        self._mx()
        from pytest_qmmperf.workloads import prefill as pf

        try:
            spec = pf.PrefillSpec(model=model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                  bits=bits, group_size=group_size, mode=mode, variant=variant,
                                  prefill_step=prefill_step)
            if variant != "mlx":
                get_variant(variant)
            runner = pf.PrefillRunner(spec, progress=self._progress)
        except pf.PrefillUnavailable as exc:
            pytest.skip(str(exc))
        except (pf.PrefillError, VariantError) as exc:
            _fail(f"qmm_bench.prefill: {exc}")
        label = f"prefill {model} {prompt_tokens}+{gen_tokens} {variant}"
        with self._device_errors(label):
            if not self._timing_wanted():
                try:
                    runner.check()
                except AssertionError as exc:
                    _fail(f"qmm_bench.prefill: {exc}")
                return None
            cold = runner.warmup()
            t0 = time.perf_counter()
            first = runner.run_round()
            round_s = time.perf_counter() - t0
            policy = self._session.policy()
            # the first round counts: at least PREFILL_MIN_ROUNDS (or --qmm-min-rounds) in all
            least = max(PREFILL_MIN_ROUNDS, self._session.options.min_rounds or 0) - 1
            rounds = max(least, min(policy.max_rounds, int(policy.budget_s / max(round_s, 1e-9))))
            rows: list[dict[str, float]] = [first]

            def one_round() -> None:
                rows.append(runner.run_round())
                self._progress(f"{label}: round {len(rows)} of {rounds + 1}, "
                               f"TTFT {rows[-1].get('ttft_s', math.nan):.4g} s")

            self._benchmark().pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
            samples: dict[str, list[float]] = {}
            for row in rows:
                for key, value in row.items():
                    samples.setdefault(key, []).append(float(value))
            samples["cold_start_s"] = [cold]
            info = {**runner.info(), "rounds": len(rows)}

        def again(result: BenchResult) -> BenchResult:
            more: dict[str, list[float]] = {k: list(v) for k, v in result.samples.items()}
            for i in range(rounds):
                row = runner.run_round()
                self._progress(f"{label}: second look, round {i + 1} of {rounds}, "
                               f"TTFT {row.get('ttft_s', math.nan):.4g} s")
                for key, value in row.items():
                    more.setdefault(key, []).append(float(value))
            return dataclasses.replace(result, samples=more, info={
                **result.info, "rounds": len(rows) + rounds})

        return self._finish("prefill", spec.params(), samples, info, second_look=again)

    def external(self, source: str | None = None, *, command: list[str] | str | None = None,
                 format: str = "uzu",  # noqa: A002 - mirrors the file format's name
                 mapping: dict[str, str] | None = None) -> BenchResult | None:
        """Results of another engine (a result file, or a command that writes one)."""
        self._claim("external")
        from pytest_qmmperf.workloads import external as ext

        try:
            res = ext.load_external(source, command=command, format=format, mapping=mapping,
                                    cwd=str(self._request.config.rootpath))
        except ext.ExternalError as exc:
            _fail(f"qmm_bench.external: {exc}")
        if not self.enabled:
            return None
        return self._finish("external", dict(res.params), dict(res.samples), dict(res.info))

    # --- helpers ------------------------------------------------------------

    def _claim(self, kind: str) -> None:
        if self._used is not None:
            raise pytest.UsageError(
                f"qmm_bench already ran a {self._used} benchmark in this test; one benchmark per "
                "test (parametrize the test to run several)"
            )
        self._used = kind

    def _mx(self) -> Any:
        try:
            return import_mlx()
        except BackendError as exc:
            _fail(str(exc))

    def _variant(self, name: str, spec: QmmSpec) -> Variant:
        try:
            kernel = get_variant(name)
        except VariantError as exc:
            _fail(f"qmm_bench.qmm: {exc}")
        missing = kernel.available()
        if missing:
            pytest.skip(f"variant {name!r} cannot run here: {missing}")
        reason = kernel.supports(spec)
        if reason:
            _fail(f"qmm_bench.qmm: variant {name!r} does not support {spec.label()}: {reason}")
        return kernel

    def _timing_wanted(self) -> bool:
        if not self.enabled:
            return False
        if self._benchmark().disabled:
            # --benchmark-disable (or xdist): pytest-benchmark will not time, so
            # neither do we; the output was verified above.
            return False
        return True

    def _benchmark(self) -> Any:
        return self._request.getfixturevalue("benchmark")

    def _time(self, launch: timing.Launch, label: str) -> tuple[dict[str, list[float]],
                                                                  dict[str, Any]]:
        policy = self._session.policy()
        timer = timing.RoundTimer(launch, policy, self._session.eval_overhead_s())
        self._progress(f"{label}: warming up")
        timer.prepare()
        self._progress(f"{label}: {timer.rounds} rounds of {timer.launches} launches")
        timer.resume()  # refill the pipeline after the progress line
        try:
            self._benchmark().pedantic(timer.step, rounds=timer.rounds, iterations=1,
                                       warmup_rounds=0)
        finally:
            timer.drain()
        self._timer = timer
        info = timer.info()
        info["cold_start_s"] = timer.cold_start_s
        info["launch_order"] = timing.launch_order(policy, self._session.backend())
        return {"time_s": list(timer.samples_s), "cold_start_s": [timer.cold_start_s]}, info

    def _working_set_gb(self, launch: timing.Launch, input_bytes: int) -> float:
        """Peak memory of one launch above what was live before it, plus its inputs."""
        mx = self._mx()
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        arrays = launch(0)
        mx.eval(arrays)
        mx.synchronize()
        peak = mx.get_peak_memory()
        del arrays
        return (max(0, peak - before) + input_bytes) / 1e9

    @contextlib.contextmanager
    def _device_errors(self, label: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:
            text = str(exc).lower()
            if any(word in text for word in _OOM_WORDS):
                _fail(f"out of device memory running {label}: {exc} "
                      "(use smaller shapes or prompt_tokens)")
            raise

    def _progress(self, message: str) -> None:
        self._session.progress(self._request.node.nodeid, message)

    def _second_look(self, label: str, rates: tuple[float | None, float | None, Any]
                     ) -> Callable[[BenchResult], BenchResult]:
        """Re-measure with this test's timer: its planned rounds once more, both sets kept.

        The extra rounds run outside pytest-benchmark (a test may use its
        ``benchmark`` fixture once), so its table shows the first measurement;
        the gate, the reports and a saved baseline get both.
        """
        timer = self._timer
        assert timer is not None  # set by _time, which every timed kind runs first

        def again(result: BenchResult) -> BenchResult:
            self._progress(f"{label}: second look, {timer.rounds} more rounds")
            samples_s = list(timer.run())
            samples = {**result.samples, "time_s": samples_s}
            samples.update(timing.derived_metrics(samples_s, *rates))
            return dataclasses.replace(result, samples=samples, info={**result.info,
                                                                       **timer.info()})

        return again

    def _finish(self, kind: str, params: dict[str, Any], samples: dict[str, list[float]],
                info: dict[str, Any],
                second_look: Callable[[BenchResult], BenchResult] | None = None) -> BenchResult:
        medians = {k: statistics.median(v) for k, v in samples.items() if v}
        result = BenchResult(name=self._request.node.nodeid, kind=kind, params=params,
                             samples=samples, info=info)
        self.result = result
        if kind != "external" and not self._benchmark().disabled:
            extra = self._benchmark().extra_info
            extra.update({f"qmm_{k}": v for k, v in medians.items()})
            extra["qmm_params"] = params
            if "launches_per_round" in info:
                extra["qmm_launches_per_round"] = info["launches_per_round"]
        again = functools.partial(second_look, result) if second_look is not None else None
        result, message = self._session.record(result, self._request.node, again)
        self.result = result
        if message:
            _fail(message)
        return result
