"""Tiled QMM kernels on a GPU: every preset verified, then timed against ``mlx`` and ``dequant``.

    python benchmarks/gpu_kernels.py --out "$OUT"          # everything
    python benchmarks/gpu_kernels.py --out out --skip-time # correctness only

Runs on whichever GPU backend MLX has (Metal or CUDA), through the same
variant registry the pytest plugin uses.

1. Check: every preset, each as shipped and with ``:d0`` (so the tile kernel
   itself runs even at M = 1), plus the extra tile candidates, against the
   float32 reference (``workloads.qmm.check_output``) on the Llama-3.2-3B
   projections (qo 3072x3072, kv 1024x3072, gate/up 8192x3072, down
   3072x8192) and on awkward shapes: M = 1, 7, 33 and others not a multiple
   of any tile, N not a multiple of any tile, K at the smallest multiple of
   the group size; float16 and bfloat16, 4 and 8 bits, group sizes 32/64/128.
   Each case runs twice: with x of shape (M, K), and of (1, M, K) as a
   model's layers pass it.
2. Time: for each projection and M in {1, 16, 128, 512, 2048, 8192}: ``mlx``,
   ``dequant`` and the tiled variants; 32 launches queued per ``mx.eval``
   over distinct input sets rotated (together larger than the L2 cache),
   synchronised, median over rounds.  On CUDA, without CUDA graphs (unless
   ``MLX_USE_CUDA_GRAPHS`` is set), so launches run one after another.
   Also a trivial kernel queued the same way (the launch cost) and the
   device's copy bandwidth and fp16 GEMM rate.
   Each time is compared with the floor ``max(bytes / 2.55 TB/s, FLOPs /
   660 TFLOP/s)`` (the H100 ceilings measured for this project; the run's
   own measured ceilings are in the JSON too).

Writes ``gpu_kernels.json`` and ``gpu_kernels.log`` under ``--out`` and prints
the summary table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qo": (3072, 3072), "kv": (1024, 3072), "gate_up": (8192, 3072), "down": (3072, 8192)}
M_VALUES = (1, 16, 128, 512, 2048, 8192)
BASELINES = ("mlx", "dequant")
#: Tiles beyond the seed's presets, tried on the GPU at M >= 128 ...
CANDIDATES = ("tiled:128x64x64:wm4wn2", "tiled:64x128x64:wm2wn4",
              "tiled:128x32x64:wm4wn1", "tiled:128x128:wm2wn4")
#: ... and at M = 16, where the seed's tiles leave most rows empty.
SMALL_M = ("tiled:16x64x128:wm1wn4", "tiled:32x64x128:wm2wn2")
BANDWIDTH = 2.55e12  # bytes/s, copy bandwidth measured on the lent H100
FP16_RATE = 660e12  # FLOP/s, fp16 GEMM measured on the lent H100
LAUNCHES = 32
#: Input sets rotate until their footprint reaches this: five times the
#: H100's 50 MB L2, like the plugin's own timer (TimingPolicy.rotate_bytes),
#: so a launch does not find its weights in L2. (Until 2026-11-25 this was
#: 64 MB with at most 8 sets: qo's and kv's 8 sets fit in L2; PERFORMANCE.md 6p.)
ROTATE_BYTES = 256 << 20
MAX_SETS = 128


def rotation(bytes_per_set: int) -> int:
    """How many input sets of ``bytes_per_set`` bytes reach :data:`ROTATE_BYTES` (2-128)."""
    return max(2, min(MAX_SETS, math.ceil(ROTATE_BYTES / max(1, bytes_per_set))))


def open_report(out: Path, stem: str) -> tuple[Log, dict[str, Any]]:
    """``out/stem.log`` and a report that starts with the date, MLX, the command and the device."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / f"{stem}.log")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mlx": mx.__version__, "command": " ".join(sys.argv),
        "device": str(mx.device_info().get("device_name", "")),
    }
    log(f"# {report['date']} MLX {mx.__version__} {report['device']}")
    return log, report


class Log:
    def __init__(self, path: Path) -> None:
        self.file = path.open("w")

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def floor_s(spec: Any) -> float:
    return max(spec.bytes / BANDWIDTH, spec.flops / FP16_RATE)


# --- phase 1: correctness ---------------------------------------------------


def check_cases(tiles: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(variant, QmmSpec kwargs) pairs to verify."""
    cases: list[tuple[str, dict[str, Any]]] = []
    # name:d0 differs from name only where M <= 8 (there name runs the decode kernel)
    every = [*tiles, *(t + ":d0" for t in tiles), "tiled:decode", "tiled:skinny"]
    for name in every:
        small_only = name.endswith(":d0")
        for N, K in SHAPES.values():
            for M in (1, 7, 33, 512):
                if M <= 8 or not small_only:
                    cases.append((name, dict(M=M, N=N, K=K)))
        for M, N, K, gs in ((1, 40, 64, 64), (7, 1000, 32, 32), (33, 200, 128, 128),
                            (161, 3000, 64, 64), (300, 72, 256, 32)):
            if M <= 8 or not small_only:
                cases.append((name, dict(M=M, N=N, K=K, group_size=gs)))
    quant = ["tiled:160x32:wm4wn1:d0", "tiled:32x32:wm2wn2:d0", "tiled:64x64:wm2wn2:d0",
             "tiled:decode", "tiled:skinny"]
    for name in quant:
        for dtype in ("float16", "bfloat16"):
            for bits in (4, 8):
                for gs in (32, 64, 128):
                    small = (3, 13) if name == "tiled:skinny" else (3,)  # 1 and 2 fragments
                    for M in ((3, 200) if name.endswith(":d0") else small):
                        cases.append((name, dict(M=M, N=200, K=384, bits=bits, group_size=gs,
                                                 dtype=dtype)))
    return cases


def run_checks(log: Log, tiles: list[str]) -> list[dict[str, Any]]:
    return run_cases(log, check_cases(tiles))


def run_cases(log: Log, cases: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each (variant, QmmSpec kwargs) through MLX against the float32 reference; one row each."""
    import mlx.core as mx

    from pytest_qmmperf.variants import get_variant
    from pytest_qmmperf.workloads.qmm import QmmSpec, check_output, make_inputs

    results = []
    log(f"# check: {len(cases)} cases")
    inputs_cache: dict[QmmSpec, Any] = {}
    t0 = time.perf_counter()
    for name, kw in cases:
        spec = QmmSpec(**kw)
        variant = get_variant(name)
        row: dict[str, Any] = {"variant": name, **spec.params()}
        reason = variant.supports(spec)
        if reason:
            row.update(ok=None, skipped=reason)
            results.append(row)
            continue
        if spec not in inputs_cache:
            if len(inputs_cache) > 64:
                inputs_cache.clear()
            inputs_cache[spec] = make_inputs(spec, seed=1)
        inp = inputs_cache[spec]
        try:
            how = dict(transpose=True, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
            out = variant(inp.x, inp.w, inp.scales, inp.biases, **how)
            mx.eval(out)
            err = check_output(spec, inp, out, name)
            # x as a model's layers pass it, (1, M, K): the output must be (1, M, N)
            out3 = variant(inp.x[None], inp.w, inp.scales, inp.biases, **how)
            if tuple(out3.shape) != (1, spec.M, spec.N):
                raise AssertionError(f"x of shape (1, {spec.M}, {spec.K}) gave an output of "
                                     f"shape {tuple(out3.shape)}")
            err = max(err, check_output(spec, inp, out3[0], name))
            row.update(ok=True, rel_error=err)
        except AssertionError as exc:
            row.update(ok=False, error=str(exc))
            log(f"FAIL {name} {spec.label()}: {exc}")
        except Exception as exc:  # a compile error must be reported, then the run goes on
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            log(f"ERROR {name} {spec.label()}: {type(exc).__name__}: {exc}")
            log(traceback.format_exc()[-3000:])
        results.append(row)
    passed = sum(1 for r in results if r.get("ok"))
    failed = sum(1 for r in results if r.get("ok") is False)
    worst = max((r["rel_error"] for r in results if r.get("ok")), default=float("nan"))
    log(f"# check: {passed} passed, {failed} failed, "
        f"{sum(1 for r in results if r.get('ok') is None)} not supported; worst error "
        f"{worst:.3g}; {time.perf_counter() - t0:.1f} s")
    return results


# --- phase 2: timing ---------------------------------------------------------


def time_batches(fn: Any, sets: list[Any], spec: Any, rounds: int) -> list[float]:
    """Per-launch seconds of ``rounds`` rounds, each LAUNCHES launches queued in one eval."""
    import mlx.core as mx

    kw = dict(transpose=True, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    samples = []
    for r in range(rounds):
        outs = []
        mx.synchronize()
        t0 = time.perf_counter()
        for i in range(LAUNCHES):
            s = sets[(r * LAUNCHES + i) % len(sets)]
            outs.append(fn(s.x, s.w, s.scales, s.biases, **kw))
        mx.eval(outs)
        mx.synchronize()
        samples.append((time.perf_counter() - t0) / LAUNCHES)
        del outs
    return samples


def timed(fn: Any, sets: list[Any], spec: Any) -> list[float]:
    warm = time_batches(fn, sets, spec, 2)  # compiles, then one warm round
    est = warm[-1] * LAUNCHES
    rounds = max(5, min(25, math.ceil(0.25 / max(est, 1e-6))))
    return time_batches(fn, sets, spec, rounds)


def trivial_kernel_s(backend: str) -> float:
    """A one-thread kernel queued LAUNCHES per eval: what any launch costs here."""
    import mlx.core as mx

    if backend == "cuda":
        k = mx.fast.cuda_kernel(name="qmmperf_trivial", input_names=["a"], output_names=["o"],
                                source="if (threadIdx.x == 0) o[0] = a[0];")
    else:
        k = mx.fast.metal_kernel(name="qmmperf_trivial", input_names=["a"], output_names=["o"],
                                 source="if (thread_position_in_grid.x == 0) o[0] = a[0];")
    inputs = [mx.full((16,), float(i), dtype=mx.float16) for i in range(LAUNCHES)]
    mx.eval(inputs)

    def batch() -> float:
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [k(inputs=[a], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                  output_dtypes=[mx.float16])[0] for a in inputs]
        mx.eval(outs)
        mx.synchronize()
        return (time.perf_counter() - t0) / LAUNCHES

    for _ in range(3):
        batch()
    return statistics.median(batch() for _ in range(20))


def measured_peaks() -> dict[str, float]:
    import mlx.core as mx

    a = mx.random.normal((1 << 29,)).astype(mx.float16)  # 1 GiB
    mx.eval(a)
    times = []
    for _ in range(6):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(a + 1)
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    bandwidth = 2 * a.nbytes / min(times[1:])
    del a
    n = 8192
    x = mx.random.normal((n, n)).astype(mx.float16)
    y = mx.random.normal((n, n)).astype(mx.float16)
    mx.eval(x, y)
    times = []
    for _ in range(5):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval([x @ y for _ in range(8)])
        mx.synchronize()
        times.append((time.perf_counter() - t0) / 8)
    return {"copy_bytes_per_s": bandwidth, "fp16_gemm_flops_per_s": 2 * n**3 / min(times[1:])}


def run_timing(log: Log, tiles: list[str], m_values: tuple[int, ...],
               candidates: tuple[str, ...] = CANDIDATES) -> list[dict[str, Any]]:
    import mlx.core as mx

    from pytest_qmmperf.variants import get_variant
    from pytest_qmmperf.workloads.qmm import QmmSpec, make_inputs

    rows = []
    for shape, (N, K) in SHAPES.items():
        for M in m_values:
            spec = QmmSpec(M=M, N=N, K=K, bits=4, group_size=64, dtype="bfloat16")
            count = rotation(spec.bytes)
            sets = [make_inputs(spec, seed=s) for s in range(count)]
            names = list(BASELINES) + tiles
            if M <= 128:
                names += ["tiled:decode", "tiled:skinny"]
            if M >= 128:
                names += list(candidates)
            if 1 < M <= 128:
                names += list(SMALL_M)
            for name in names:
                try:
                    samples = timed(get_variant(name), sets, spec)
                except Exception as exc:
                    log(f"ERROR timing {name} {spec.label()}: {type(exc).__name__}: {exc}")
                    continue
                med = statistics.median(samples)
                row = {"shape": shape, "M": M, "N": N, "K": K, "variant": name,
                       "median_s": med, "samples_s": samples, "floor_s": floor_s(spec),
                       "over_floor": med / floor_s(spec), "launches_per_eval": LAUNCHES,
                       "input_sets": count, "dtype": spec.dtype}
                rows.append(row)
                log(f"{shape:8s} M={M:5d} {name:28s} {med * 1e6:10.1f} us  "
                    f"{row['over_floor']:6.2f}x floor")
            del sets
            mx.clear_cache()
    return rows


# --- kernel-only times (CUDA): the same sources through CuPy, CUDA events -------

CUPY_HEADER = """\
#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef unsigned int uint32_t;
typedef int int32_t;
namespace cooperative_groups {}
namespace mlx::core::cu {
using Shape = const int*;
}
"""


def cupy_arch() -> str:
    """NVRTC's target for this GPU as MLX compiles for it on an H100: ``sm_90a``
    on Hopper (PERFORMANCE.md 6s: MLX's kernels see ``__CUDA_ARCH_FEAT_SM90_ALL``),
    else ``sm_XY``. CuPy's own default, ``compute_90``, would leave the wide
    kernel's wgmma out."""
    import cupy as cp

    cc = cp.cuda.Device().compute_capability  # e.g. "90"
    return f"--gpu-architecture=sm_{cc}" + ("a" if cc == "90" else "")


def cupy_kernel(name: str, M: int, N: int, K: int, *, bits: int = 4,
                group_size: int = 64) -> Any:
    """The generated CUDA kernel ``name`` for an (M, K) x (N, K) problem, through CuPy (fp16).

    The translation unit MLX would compile, with the shapes passed as device
    pointers instead of ``__grid_constant__`` arrays.  Returns ``launch(x,
    w, scales, biases, out)``, which queues it once on the current stream.
    """
    import cupy as cp

    from pytest_qmmperf import cuda
    from pytest_qmmperf.tiled import (
        DequantConfig,
        generate,
        geometry,
        parse_name,
        template_args,
    )
    from pytest_qmmperf.tiled.config import output_planes

    config = parse_name(name)
    src = generate(config, bits=bits, group_size=group_size, language="cuda")
    template: list[tuple[str, str | int]] = [("T", "float16"), *template_args(config, M)]
    code = cuda.translation_unit(src, dtype="float16", template=template,
                                 default_header=CUPY_HEADER)
    fname = "mlx::core::cu::" + cuda.kernel_name(src, template)
    fn = cp.RawModule(code=code, options=("--std=c++17", cupy_arch()),
                      name_expressions=[fname]).get_function(fname)

    grid, tg = geometry(config, M, N)
    blocks = (grid[0] // tg[0], grid[1], 1)
    xs = cp.array([M, K], dtype=cp.int32)
    xnd = cp.int32(2)  # x_ndim: the kernels take x's leading dimensions as rows
    wsh = cp.array([N, K * bits // 32], dtype=cp.int32)

    if isinstance(config, DequantConfig):
        # The dequant kernel writes the dense weight, then cuBLAS multiplies, as
        # the variant does through MLX. CuPy cannot capture cuBLAS in a graph:
        # ``graph = False`` tells the timer; ``dequant_only`` is the kernel alone.
        dense = cp.empty((N, K), dtype=cp.float16)

        def dequant_only(x: Any, w: Any, scales: Any, biases: Any, out: Any) -> None:
            fn(blocks, tg, (x, xs, xnd, w, wsh, scales, biases, dense))

        def launch_gemm(x: Any, w: Any, scales: Any, biases: Any, out: Any) -> None:
            dequant_only(x, w, scales, biases, out)
            cp.matmul(x, dense.T, out=out)

        launch_gemm.graph = False  # type: ignore[attr-defined]
        launch_gemm.dequant_only = dequant_only  # type: ignore[attr-defined]
        return launch_gemm

    if src.output_dtype is None:
        def launch(x: Any, w: Any, scales: Any, biases: Any, out: Any) -> None:
            fn(blocks, tg, (x, xs, xnd, w, wsh, scales, biases, out))

        return launch

    # A tile split over K writes float32 planes; add them into out, as the
    # variant does through MLX (one more kernel, timed with it).
    splits = output_planes(config)
    planes = cp.empty((splits, M, N), dtype=cp.float32)
    add = cp.RawKernel(r"""
#include <cuda_fp16.h>
extern "C" __global__ void add_planes(const float* p, __half* out, int n, int planes) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    float v = 0.0f;
    for (int s = 0; s < planes; ++s) v += p[(size_t)s * n + i];
    out[i] = __float2half_rn(v);
  }
}""", "add_planes")
    count = M * N

    def kernel(x: Any, w: Any, scales: Any, biases: Any, out: Any) -> None:
        fn(blocks, tg, (x, xs, xnd, w, wsh, scales, biases, planes))

    def addition(x: Any, w: Any, scales: Any, biases: Any, out: Any) -> None:
        add(((count + 255) // 256,), (256,), (planes, out, cp.int32(count), cp.int32(splits)))

    def launch_split(x: Any, w: Any, scales: Any, biases: Any, out: Any) -> None:
        kernel(x, w, scales, biases, out)
        addition(x, w, scales, biases, out)

    # Each alone too (gpu_kernel_ab.py --parts): what splitting K costs in the addition.
    launch_split.kernel = kernel  # type: ignore[attr-defined]
    launch_split.add = addition  # type: ignore[attr-defined]
    return launch_split


def event_time(launch: Any, operand_sets: list[tuple[Any, ...]], count: int | None = None,
               graph: bool = True) -> float:
    """Seconds per launch of ``count`` launches back to back, between two CUDA events.

    ``count`` defaults to 50, or to the number of operand sets where there
    are more, so that every set (see :func:`rotation`) takes its turn.

    With ``graph`` (default) the launches are captured once into a CUDA graph
    and the graph is replayed, so the GPU never waits for the host: the time
    is the kernels' own, plus what the GPU spends between two kernels of a
    graph.  Without it, each launch is a Python call, whose host cost (5-9 us
    through CuPy) bounds any kernel shorter than that.
    """
    import cupy as cp

    count = max(50, len(operand_sets)) if count is None else count
    stream = cp.cuda.Stream(non_blocking=True)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    with stream:
        for i in range(3):
            launch(*operand_sets[i % len(operand_sets)])
        if graph:
            stream.begin_capture()
            for i in range(count):
                launch(*operand_sets[i % len(operand_sets)])
            replay = stream.end_capture()
            replay.launch(stream)  # warm
            start.record(stream)
            replay.launch(stream)
            stop.record(stream)
        else:
            start.record(stream)
            for i in range(count):
                launch(*operand_sets[i % len(operand_sets)])
            stop.record(stream)
        stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / count


def kernel_time(launch: Any, operand_sets: list[tuple[Any, ...]], rounds: int = 3) -> float:
    """Median of ``rounds`` :func:`event_time` measurements of ``launch``: from a replayed
    CUDA graph unless the launch says ``graph = False`` (one that calls cuBLAS, which
    CuPy cannot capture)."""
    graph = getattr(launch, "graph", True)
    return statistics.median(event_time(launch, operand_sets, graph=graph)
                             for _ in range(rounds))


def cupy_operands(M: int, N: int, K: int, count: int) -> list[tuple[Any, ...]]:
    """``count`` sets of (x, w, scales, biases, out), fp16, 4-bit group 64, random weights."""
    import cupy as cp

    x = cp.random.standard_normal((M, K), dtype=cp.float32).astype(cp.float16)
    scales = cp.full((N, K // 64), 0.01, dtype=cp.float16)
    biases = cp.full((N, K // 64), -0.08, dtype=cp.float16)
    out = cp.empty((M, N), dtype=cp.float16)
    return [(x, cp.random.randint(0, 2**31 - 1, size=(N, K // 8), dtype=cp.int32).view(
        cp.uint32), scales, biases, out) for _ in range(count)]


def kernel_only(log: Log, tiles: list[str]) -> list[dict[str, Any]]:
    """Device time of each kernel alone: no MLX graph, no per-launch host work.

    Each kernel (:func:`cupy_kernel`) is launched 50 times between two CUDA
    events over rotated weights.  The difference from the MLX-path time of
    the same kernel is what a launch through ``mx.fast.cuda_kernel`` costs on
    the host.
    """
    from pytest_qmmperf.workloads.qmm import QmmSpec

    rows = []
    for shape in ("qo", "gate_up", "down"):
        N, K = SHAPES[shape]
        for M in (1, 16, 128, 2048, 8192):
            spec = QmmSpec(M=M, N=N, K=K, bits=4, group_size=64, dtype="float16")
            # small M: the decode kernel, and the smallest tile for contrast
            names = ["tiled:decode", tiles[0]] if M <= 16 else list(tiles)
            sets = cupy_operands(M, N, K, rotation(spec.weight_bytes))
            for name in names:
                try:
                    t = event_time(cupy_kernel(name, M, N, K), sets)
                except Exception as exc:
                    log(f"ERROR kernel-only {name} {shape} M={M}: {type(exc).__name__}: {exc}")
                    continue
                row = {"shape": shape, "M": M, "N": N, "K": K, "variant": name,
                       "kernel_s": t, "floor_s": floor_s(spec),
                       "over_floor": t / floor_s(spec)}
                rows.append(row)
                log(f"kernel-only {shape:8s} M={M:5d} {name:28s} {t * 1e6:10.1f} us  "
                    f"{row['over_floor']:6.2f}x floor")
    return rows


def summary(rows: list[dict[str, Any]], launch_s: float | None) -> list[str]:
    """One line per (shape, M): the floor, then each kernel's time and its ratio to the floor.

    Where M is at most the presets' small-M threshold they all run the decode
    (M = 1) or the skinny kernel, so the tiled column shows that kernel itself
    rather than the luckiest of several timings of one kernel.
    """
    from pytest_qmmperf.tiled.config import DEFAULT_DECODE_MAX_M

    seed = "tiled:160x32:wm4wn1"
    lines = [f"{'shape':8s} {'M':>5s} {'floor us':>9s} {'mlx':>13s} {'dequant':>13s} "
             f"{'160x32 4x1':>13s}  best tiled"]
    keys = sorted({(r["shape"], r["M"]) for r in rows},
                  key=lambda k: (list(SHAPES).index(k[0]), k[1]))
    for shape, M in keys:
        group = {r["variant"]: r for r in rows if (r["shape"], r["M"]) == (shape, M)}
        floor = next(iter(group.values()))["floor_s"]

        def cell(name: str, group: dict[str, Any] = group) -> str:
            r = group.get(name)
            return f"{r['median_s'] * 1e6:7.1f} {r['over_floor']:4.1f}x" if r else "-"

        if M <= DEFAULT_DECODE_MAX_M:
            best = group.get("tiled:decode" if M == 1 else "tiled:skinny")
        else:
            tiled = [r for n, r in group.items() if n.startswith("tiled:")]
            best = min(tiled, key=lambda r: r["median_s"]) if tiled else None
        best_txt = (f"{best['variant']} {best['median_s'] * 1e6:.1f} us "
                    f"{best['over_floor']:.2f}x" if best else "-")
        lines.append(f"{shape:8s} {M:5d} {floor * 1e6:9.2f} {cell('mlx'):>13s} "
                     f"{cell('dequant'):>13s} {cell(seed):>13s}  {best_txt}")
    if launch_s is not None:
        lines.append(f"trivial kernel, {LAUNCHES} per eval: {launch_s * 1e6:.2f} us per launch")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_kernels_out"))
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--m", type=int, nargs="*", default=list(M_VALUES),
                        help="M values to time (default: %(default)s)")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES),
                        help="tiles tried beyond the presets at M >= 128, checked and timed "
                             "(default: %(default)s)")
    parser.add_argument("--check-only-candidates", action="store_true",
                        help="verify only the --candidates (the presets were verified before)")
    args = parser.parse_args(argv)

    import mlx.core as mx

    from pytest_qmmperf.hardware import backend_name
    from pytest_qmmperf.tiled import PRESETS, TileConfig, backend, parse_name
    from pytest_qmmperf.timing import prefer_stream_order

    # Queued launches must run one after another, as in the plugin's timing.
    prefer_stream_order(backend_name(mx))

    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_kernels.log")
    lang = backend()
    if lang is None:
        log("no Metal or CUDA backend in this MLX: nothing to run")
        return 2
    info: dict[str, Any] = {}
    try:
        info = {k: (v if isinstance(v, (int, float, str)) else str(v))
                for k, v in mx.device_info().items()}
    except Exception as exc:
        info = {"error": str(exc)}
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backend": lang, "mlx": mx.__version__, "device": info,
        "python": platform.python_version(), "command": " ".join(sys.argv),
        "floor": {"bandwidth_bytes_per_s": BANDWIDTH, "fp16_flops_per_s": FP16_RATE},
    }
    log(f"# {report['date']} MLX {mx.__version__} {lang} {info.get('device_name', info)}")
    tiles = [p for p in PRESETS if isinstance(parse_name(p), TileConfig)]
    if not args.skip_check:
        checked = list(args.candidates)
        if not args.check_only_candidates:
            checked = tiles + checked + list(SMALL_M)
        report["checks"] = run_checks(log, checked)
        (args.out / "gpu_kernels.json").write_text(json.dumps(report, indent=1))
    launch_s = None
    if not args.skip_time:
        report["measured_peaks"] = measured_peaks()
        launch_s = report["trivial_kernel_s"] = trivial_kernel_s(lang)
        log(f"# peaks {report['measured_peaks']}, trivial kernel {launch_s * 1e6:.2f} us")
        report["timings"] = run_timing(log, tiles, tuple(args.m), tuple(args.candidates))
        if lang == "cuda":
            try:
                report["kernel_only"] = kernel_only(
                    log, ["tiled:32x32:wm2wn2", "tiled:160x32:wm4wn1", *args.candidates[:2]])
            except ImportError as exc:
                log(f"# kernel-only times skipped: {exc}")
    (args.out / "gpu_kernels.json").write_text(json.dumps(report, indent=1))
    if report.get("timings"):
        for line in summary(report["timings"], launch_s):
            log(line)
    failed = [r for r in report.get("checks", []) if r.get("ok") is False]
    log(f"# {len(failed)} failed checks")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
