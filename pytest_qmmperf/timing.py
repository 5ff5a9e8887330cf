"""Device-true timing of MLX work.

MLX builds a lazy graph; ``mx.eval`` dispatches it and waits for it.  Timing
one evaluation at a time measures the host as much as the device: the
fixed cost of an evaluation (0.13-0.38 ms per eval on an H100, against 11-36
us per QMM), and the idle gap while Python builds the next graph, during
which a GPU lowers its clocks.  Here, launches are *pipelined*:

1. a round is ``L`` launches, each on its own input set (sets rotate so the
   operands' footprint exceeds the caches), queued with ``mx.async_eval``;
2. each step queues round ``r + 1`` and only then waits for round ``r``, so
   the device always has the next round queued behind the one it is
   running and never idles;
3. a sample is the interval between the completions of consecutive rounds,
   divided by ``L``: in steady state that is the device time of one launch,
   with no synchronisation latency or host overhead in it.

``L`` (a power of two) grows until a round lasts at least ``round_s``; a
continuous warm-up brings clocks to steady state first; the number of rounds
comes from a pilot's spread, to reach the precision target within the time
budget.  The first launch JIT-compiles kernels: it is reported as
``cold_start_s`` and never mixed into the samples.  If the host cannot queue
launches as fast as the device runs them (kernels of a few microseconds),
a sample is the host's dispatch time instead; ``single_eval_s`` in the info
is one launch per evaluation, for comparison.

**Launches run one after another.**  The launches of a round have no data
dependency on each other, and a backend free to run them concurrently
would time how many fit on the device side by side, not how long one
takes.  MLX's CUDA backend does exactly that inside its CUDA graphs: on an
H100, CUPTI showed up to 92% of the kernel time of small QMMs overlapping
other launches of the same round, and the per-launch time read up to 4.5x
below the kernel's own duration (docs/PERFORMANCE.md, section 2a).  So on CUDA the
plugin turns graphs off for benchmark sessions (``MLX_USE_CUDA_GRAPHS=0``
unless the user set it; the stream then keeps launch order), and wherever
launches could overlap (Metal's concurrent encoders, CUDA with graphs on)
every launch is dispatched on its own (``dispatch_each``), which orders
them at the price of a higher host cost per launch.  With graphs off, the
H100 medians are 0.99-1.06x CUPTI's kernel durations (median 0.5% apart)
for every kernel the host keeps up with.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: A launch: given a running index, build (lazily) one unit of work.
Launch = Callable[[int], Sequence[Any]]

#: Host share of a round above which a benchmark counts as host-bound.
HOST_BOUND_FRACTION = 0.8

Z95 = 1.959964
#: Standard error of a sample median is about sqrt(pi/2) = 1.2533 times the
#: standard error of the mean for near-normal data.
MEDIAN_SE_FACTOR = 1.2533


@dataclass(frozen=True)
class TimingPolicy:
    """How hard to try for a precise median.

    ``precision`` is the target half-width of the 95% confidence interval of
    the median, relative to the median; ``budget_s`` caps the timed rounds'
    wall-clock time per benchmark; rounds never go below ``min_rounds``.
    """

    precision: float = 0.005
    min_rounds: int = 10
    max_rounds: int = 2000
    budget_s: float = 5.0
    warmup_s: float = 0.5
    round_s: float = 0.002
    max_launches: int = 512
    rotate_bytes: int = 256 << 20
    #: Dispatch every launch on its own (one ``mx.async_eval`` each), for
    #: backends that would otherwise run independent launches concurrently
    #: (:func:`overlaps_independent_launches`).
    dispatch_each: bool = False

    @classmethod
    def for_backend(cls, backend: str, **overrides: Any) -> TimingPolicy:
        """Defaults per backend; CPU rounds are longer and operands smaller."""
        if backend == "cpu":
            base = cls(precision=0.01, min_rounds=7, budget_s=2.0, warmup_s=0.02,
                       round_s=0.004, max_launches=64, rotate_bytes=64 << 20)
        else:
            base = cls(dispatch_each=overlaps_independent_launches(backend))
        return cls(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})


def cuda_graphs_enabled() -> bool:
    """Whether MLX's CUDA backend records work into CUDA graphs (``MLX_USE_CUDA_GRAPHS``).

    MLX reads the variable once, when it first encodes GPU work; it parses it
    as an integer and uses graphs unless it is 0.
    """
    value = os.environ.get("MLX_USE_CUDA_GRAPHS")
    try:
        return value is None or int(value) != 0
    except ValueError:
        return True


def overlaps_independent_launches(backend: str) -> bool:
    """Whether one evaluation may run launches with no data dependency concurrently.

    MLX's CUDA backend records an evaluation into CUDA graphs of up to ~100
    kernels whose only edges are data dependencies, so the GPU runs
    independent launches side by side; Metal's backend encodes into
    concurrent compute encoders with barriers only between dependent
    kernels.  Without graphs the CUDA backend launches onto one stream, and
    the CPU backend runs one operation at a time: both keep launch order.
    """
    if backend == "cpu":
        return False
    if backend == "cuda":
        return cuda_graphs_enabled()
    return True


def prefer_stream_order(backend: str) -> None:
    """On CUDA, have MLX launch onto its stream without graphs, unless the user chose.

    Call before MLX first encodes GPU work (it reads ``MLX_USE_CUDA_GRAPHS``
    once, then); a value already set is kept, and timing then dispatches
    every launch on its own.
    """
    if backend == "cuda":
        os.environ.setdefault("MLX_USE_CUDA_GRAPHS", "0")


def launch_order(policy: TimingPolicy, backend: str) -> str:
    """How a round's launches reach the device, for reports."""
    if policy.dispatch_each:
        return "one dispatch per launch"
    if backend == "cuda":
        return "one stream, no CUDA graphs"
    return "in order"


def synchronize() -> None:
    """Wait for all queued device work."""
    import mlx.core as mx

    mx.synchronize()


def _flatten(out: Any) -> list[Any]:
    import mlx.core as mx

    if isinstance(out, mx.array):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        flat: list[Any] = []
        for item in out:
            flat.extend(_flatten(item))
        return flat
    raise TypeError(
        f"returned {type(out).__name__}; expected an mlx.core.array or a tuple/list/dict of them"
    )


def outputs(out: Any) -> list[Any]:
    """The MLX arrays in a callable's result; ``TypeError`` if there are none."""
    flat = _flatten(out)
    if not flat:
        raise TypeError("returned no mlx.core.array; expected at least one array to evaluate")
    return flat


def _timed_eval(arrays: Sequence[Any]) -> float:
    import mlx.core as mx

    t0 = time.perf_counter()
    mx.eval(list(arrays))
    mx.synchronize()
    return time.perf_counter() - t0


@functools.cache
def eval_overhead_s(device: str = "default") -> float:
    """Median wall time of evaluating one trivial kernel: the fixed cost per round.

    Measured once per process and device (``device`` only keys the cache).
    """
    import mlx.core as mx

    x = mx.zeros((16,), dtype=mx.float32)
    mx.eval(x)
    times = []
    for i in range(60):
        y = x + float(i)
        times.append(_timed_eval([y]))
    return statistics.median(times[10:])


def robust_cv(values: Sequence[float]) -> float:
    """Coefficient of variation from the median absolute deviation (outlier-proof)."""
    med = statistics.median(values)
    if med <= 0:
        return 0.0
    mad = statistics.median(abs(v - med) for v in values)
    return 1.4826 * mad / med


def rounds_for_precision(cv: float, precision: float) -> int:
    """Rounds needed for the median's 95% CI half-width to reach ``precision``."""
    if cv <= 0:
        return 1
    return math.ceil((Z95 * MEDIAN_SE_FACTOR * cv / precision) ** 2)


@dataclass
class RoundTimer:
    """Times ``launch`` in pipelined rounds of ``launches`` launches (see module docstring).

    Use :meth:`prepare` once (cold start, launches per round, warm-up, pilot,
    rounds), then either :meth:`run`, or :meth:`resume`, ``rounds`` calls of
    :meth:`step` (e.g. through ``benchmark.pedantic``) and :meth:`drain`.
    """

    launch: Launch
    policy: TimingPolicy = field(default_factory=TimingPolicy)
    overhead_s: float = 0.0
    launches: int = 1
    rounds: int = 0
    cold_start_s: float = math.nan
    single_eval_s: float = math.nan
    pilot_cv: float = math.nan
    samples_s: list[float] = field(default_factory=list)
    round_times_s: list[float] = field(default_factory=list)
    #: Host time per recorded round: building the lazy graph and dispatching it.
    host_times_s: list[float] = field(default_factory=list)
    _counter: int = 0
    _pending: list[Any] | None = None
    _last_done: float = 0.0

    def _build(self, count: int) -> list[Any]:
        import mlx.core as mx

        arrays: list[Any] = []
        for _ in range(count):
            out = outputs(self.launch(self._counter))
            if self.policy.dispatch_each:
                mx.async_eval(out)
            arrays.extend(out)
            self._counter += 1
        return arrays

    def _per_launch(self, elapsed: float, count: int) -> float:
        # For the estimate from single evaluations only: never let the overhead
        # correction remove more than half of what was measured.
        return max(elapsed - self.overhead_s, 0.5 * elapsed) / count

    def prepare(self) -> None:
        """Cold run, launches per round, warm-up, pilot and number of rounds."""
        p = self.policy
        self.cold_start_s = _timed_eval(self._build(1))
        single = [_timed_eval(self._build(1)) for _ in range(5)]
        self.single_eval_s = statistics.median(single)
        per_launch = self._per_launch(self.single_eval_s, 1)
        launches = min(p.max_launches, max(1, math.ceil(p.round_s / max(per_launch, 1e-9))))
        # A power of two keeps L stable between runs when the estimate wobbles.
        self.launches = min(1 << math.ceil(math.log2(launches)), p.max_launches)
        self.resume()
        start = time.perf_counter()
        while time.perf_counter() - start < p.warmup_s:
            self.step(record=False)
        pilot = [self.step(record=False) for _ in range(5)]
        self.pilot_cv = robust_cv(pilot)
        wanted = rounds_for_precision(self.pilot_cv, p.precision)
        affordable = max(1, int(p.budget_s / max(statistics.median(pilot) * self.launches, 1e-9)))
        self.rounds = max(p.min_rounds, min(wanted, affordable, p.max_rounds))

    def resume(self) -> None:
        """(Re)fill the pipeline after a pause: one round queued behind one waited for."""
        import mlx.core as mx

        if self._pending is None:
            self._pending = self._build(self.launches)
            mx.async_eval(self._pending)
        self.step(record=False)

    def step(self, record: bool = True) -> float:
        """Queue the next round, wait for the previous one; return its per-launch time."""
        import mlx.core as mx

        start = time.perf_counter()
        queued = self._build(self.launches)
        mx.async_eval(queued)
        host = time.perf_counter() - start
        mx.eval(self._pending)
        done = time.perf_counter()
        per_launch = (done - self._last_done) / self.launches
        self._last_done = done
        self._pending = queued
        if record:
            self.round_times_s.append(per_launch * self.launches)
            self.samples_s.append(per_launch)
            self.host_times_s.append(host)
        return per_launch

    def host_fraction(self) -> float:
        """Median host time per round over the median round: near 1, the host is the limit.

        When building and dispatching a round takes as long as running it,
        the device waits for the host, and a sample measures the host's
        dispatch rate (which varies between processes), not the kernel.
        """
        if not self.host_times_s:
            return math.nan
        return statistics.median(self.host_times_s) / statistics.median(self.round_times_s)

    def drain(self) -> None:
        """Wait for the round still queued (untimed) and empty the pipeline."""
        import mlx.core as mx

        if self._pending is not None:
            mx.eval(self._pending)
            mx.synchronize()
            self._pending = None

    def run(self, rounds: int | None = None) -> list[float]:
        """Run the planned rounds without pytest-benchmark; return all samples."""
        self.resume()
        for _ in range(self.rounds if rounds is None else rounds):
            self.step()
        self.drain()
        return self.samples_s

    def info(self) -> dict[str, Any]:
        """How the samples were taken, for reports."""
        return {
            "launches_per_round": self.launches,
            "rounds": len(self.samples_s),
            "timing": "pipelined",
            "dispatch_each": self.policy.dispatch_each,
            "host_fraction": self.host_fraction(),
            "host_bound": self.host_fraction() > HOST_BOUND_FRACTION,
            "single_eval_s": self.single_eval_s,
            "eval_overhead_s": self.overhead_s,
            "pilot_cv": self.pilot_cv,
            "precision_target": self.policy.precision,
        }


@dataclass(frozen=True)
class Peaks:
    """The device's roofline ceilings and where they came from."""

    bandwidth_gbps: float
    tflops: float
    source: str


@functools.cache
def measure_peaks(backend: str) -> Peaks:
    """Measure copy bandwidth and dense matmul rate on this device, once per process.

    A table of vendor peaks would flatter nobody's kernel into 100% of a
    number no kernel reaches; measured ceilings say how far from the best
    *achievable* a kernel is.  fp16 on GPUs; float32 on CPU, where MLX's
    fp16 arithmetic is emulated.
    """
    import mlx.core as mx

    gpu = backend != "cpu"
    n_elem = (256 << 20) // 2 if gpu else (16 << 20) // 4
    dtype = mx.float16 if gpu else mx.float32
    src = [mx.random.uniform(shape=(n_elem,)).astype(dtype) for _ in range(2)]
    mx.eval(src)
    policy = TimingPolicy.for_backend(backend, precision=0.02, budget_s=0.5, min_rounds=5)
    overhead = eval_overhead_s(backend)
    copy = RoundTimer(lambda i: [src[i % 2] * 2], policy, overhead)
    copy.prepare()
    copy.run()
    copy_bytes = 2 * n_elem * src[0].itemsize
    bw = copy_bytes / statistics.median(copy.samples_s) / 1e9

    size = 4096 if gpu else 512
    a = [mx.random.normal((size, size)).astype(dtype) for _ in range(2)]
    mx.eval(a)
    mm = RoundTimer(lambda i: [a[i % 2] @ a[(i + 1) % 2]], policy, overhead)
    mm.prepare()
    mm.run()
    tf = 2 * size**3 / statistics.median(mm.samples_s) / 1e12
    dname = "fp16" if gpu else "fp32"
    source = (f"measured this session: copy of {copy_bytes >> 21} MiB ({bw:.0f} GB/s), "
              f"{dname} {size}^3 matmul ({tf:.3g} TFLOP/s)")
    return Peaks(bandwidth_gbps=bw, tflops=tf, source=source)


def derived_metrics(samples_s: Sequence[float], flops: float | None, nbytes: float | None,
                    peaks: Peaks | None) -> dict[str, list[float]]:
    """``tflops``, ``gbps`` and ``roofline_pct`` per sample, where the inputs allow.

    ``roofline_pct`` is the roofline bound ``max(flops / peak_flops,
    bytes / peak_bandwidth)`` as a percentage of the measured time.
    """
    out: dict[str, list[float]] = {}
    if flops:
        out["tflops"] = [flops / t / 1e12 for t in samples_s]
    if nbytes:
        out["gbps"] = [nbytes / t / 1e9 for t in samples_s]
    if peaks is not None and (flops or nbytes):
        bound = max((flops or 0) / (peaks.tflops * 1e12),
                    (nbytes or 0) / (peaks.bandwidth_gbps * 1e9))
        out["roofline_pct"] = [100.0 * bound / t for t in samples_s]
    return out
