"""The small-M kernels on a CUDA GPU: decode (rows, warps, vectors per lane) and skinny.

    python benchmarks/gpu_decode.py --out results/decode

A matrix-vector product streams the weight once, so its time is set by how
many bytes are in flight per SM; the decode kernel (``tiled:decode:rRwWuU``)
has three knobs for that: weight rows per warp (R), warps per block (W) and
16-byte vectors per lane and row in each step (U, double-buffered).

1. Kernel alone: every configuration of the grid and the skinny kernel
   (``SKINNY``: tensor cores, 2-16 warps splitting K), for each Llama-3.2-3B
   projection and M in {1, 8, 16, 32} (decode up to 16), compiled through CuPy's NVRTC from the
   same source MLX compiles, checked against a float32 reference computed by
   CuPy, and timed with CUDA events over 50 launches back to back on rotated
   weights (together larger than the L2 cache), replayed from a CUDA graph so
   that host launch cost does not bound them (the one-by-one launch time is
   kept as ``host_loop_s``).  Also a trivial kernel launched both ways: the
   launch cost, which the qo target is relative to.
2. Through MLX: the fastest configurations of phase 1, each verified through
   the variant registry (``workloads.qmm.check_output``, float16 and
   bfloat16, M = 1, 7, 16) and timed as ``gpu_kernels.py`` times (32
   launches per eval), next to ``mlx`` and ``dequant``.

Times are compared with the floor ``max(bytes / 2.55 TB/s, FLOPs / 660
TFLOP/s)``.  Writes ``gpu_decode.json`` and ``gpu_decode.log`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_kernels as gk  # noqa: E402  (the shared timing and CuPy helpers)

M_VALUES = (1, 8, 16, 32)
#: The skinny kernel (tensor cores, warps splitting K), tried beside the decode grid.
SKINNY = ("tiled:skinny:w4", "tiled:skinny", "tiled:skinny:w16")
ROWS = (1, 2, 4)
WARPS = (4, 8)
VECTORS = (1, 2, 4, 8)


def grid() -> list[str]:
    """Every valid ``tiled:decode:rRwWuU`` of the grid."""
    from pytest_qmmperf.tiled import DecodeConfig
    from pytest_qmmperf.tiled.config import MAX_DECODE_VECTORS

    return [DecodeConfig(r, w, u).name for r, w, u in itertools.product(ROWS, WARPS, VECTORS)
            if r * u <= MAX_DECODE_VECTORS]


def reference(x: Any, w: Any, scales: Any, biases: Any) -> Any:
    """x @ dequantize(w).T in float32 (4-bit, group 64), computed by CuPy."""
    import cupy as cp

    N = w.shape[0]
    shifts = cp.arange(8, dtype=cp.uint32) * 4
    q = ((w[:, :, None] >> shifts) & 15).reshape(N, -1).astype(cp.float32)
    groups = q.reshape(N, -1, 64)
    deq = groups * scales.astype(cp.float32)[:, :, None] + biases.astype(cp.float32)[:, :, None]
    return x.astype(cp.float32) @ deq.reshape(N, -1).T


def trivial_launch_s(graph: bool) -> float:
    """A one-thread kernel, 50 back to back (:func:`gpu_kernels.event_time`): the launch cost."""
    import cupy as cp

    k = cp.RawKernel('extern "C" __global__ void t(float* o) { if (threadIdx.x == 0) o[0] = 1; }',
                     "t")
    o = cp.zeros(1, dtype=cp.float32)
    return statistics.median(gk.event_time(lambda a: k((1,), (32,), (a,)), [(o,)], graph=graph)
                             for _ in range(5))


def problem(M: int, N: int, K: int) -> tuple[Any, list[tuple[Any, ...]], Any, float]:
    """(spec, operand sets, float32 reference of the first set, its largest magnitude) for
    an fp16 4-bit group-64 problem, with enough weight sets to rotate through L2."""
    import cupy as cp

    from pytest_qmmperf.workloads.qmm import QmmSpec

    spec = QmmSpec(M=M, N=N, K=K, bits=4, group_size=64, dtype="float16")
    sets = gk.cupy_operands(M, N, K, gk.rotation(spec.weight_bytes))
    x, w, s, b, _ = sets[0]
    ref = reference(x, w, s, b)
    return spec, sets, ref, float(cp.abs(ref).max())


def max_error(launch: Any, sets: list[tuple[Any, ...]], scale: float, ref: Any = None) -> float:
    """The largest error of ``launch`` on the first operand set, relative to ``scale``;
    ``ref``: that set's float32 reference (computed here if not given)."""
    import cupy as cp

    x, w, s, b, out = sets[0]
    out.fill(0)
    launch(x, w, s, b, out)
    if ref is None:
        ref = reference(x, w, s, b)
    return float(cp.abs(out.astype(cp.float32) - ref).max()) / scale


def kernel_alone(log: gk.Log, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for shape, (N, K) in gk.SHAPES.items():
        for M in M_VALUES:
            spec, sets, ref, scale = problem(M, N, K)
            for name in names:
                if M > 16 and name.startswith("tiled:decode"):
                    continue  # past the decode kernel's range
                try:
                    launch = gk.cupy_kernel(name, M, N, K)
                    err = max_error(launch, sets, scale, ref)
                    t = gk.kernel_time(launch, sets)
                    t_loop = statistics.median(gk.event_time(launch, sets, graph=False)
                                               for _ in range(3))
                except Exception as exc:
                    log(f"ERROR {name} {shape} M={M}: {type(exc).__name__}: {exc}")
                    continue
                row = {"shape": shape, "M": M, "N": N, "K": K, "variant": name, "kernel_s": t,
                       "host_loop_s": t_loop,
                       "floor_s": gk.floor_s(spec), "over_floor": t / gk.floor_s(spec),
                       "max_rel_error": err, "ok": err < 1e-2}
                rows.append(row)
                log(f"alone {shape:8s} M={M:3d} {name:24s} {t * 1e6:8.2f} us "
                    f"{row['over_floor']:6.2f}x floor  err {err:.2e}{'' if row['ok'] else ' FAIL'}")
    return rows


def best_by_case(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["shape"], r["M"])
        if r["ok"] and (key not in best or r["kernel_s"] < best[key]["kernel_s"]):
            best[key] = r
    return best


def through_mlx(log: gk.Log, names: list[str]) -> dict[str, Any]:
    import mlx.core as mx

    from pytest_qmmperf.variants import get_variant
    from pytest_qmmperf.workloads.qmm import QmmSpec, make_inputs

    checks = gk.run_cases(log, [
        (name, dict(M=M, N=N, K=K, bits=4, group_size=64, dtype=dtype))
        for name in names
        for (N, K), M, dtype in itertools.product(gk.SHAPES.values(), (1, 7, 16, 29),
                                                  ("float16", "bfloat16"))
    ])
    timings = []
    for shape, (N, K) in gk.SHAPES.items():
        for M in M_VALUES:
            spec = QmmSpec(M=M, N=N, K=K, bits=4, group_size=64, dtype="bfloat16")
            count = gk.rotation(spec.bytes)
            sets = [make_inputs(spec, seed=s) for s in range(count)]
            for name in dict.fromkeys(["mlx", "dequant", "tiled:decode", *names]):
                med = statistics.median(gk.timed(get_variant(name), sets, spec))
                timings.append({"shape": shape, "M": M, "variant": name, "median_s": med,
                                "floor_s": gk.floor_s(spec), "over_floor": med / gk.floor_s(spec)})
                log(f"mlx-path {shape:8s} M={M:3d} {name:24s} {med * 1e6:8.2f} us "
                    f"{med / gk.floor_s(spec):6.2f}x floor")
            del sets
            mx.clear_cache()
    return {"checks": checks, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_decode_out"))
    parser.add_argument("--top", type=int, default=4,
                        help="configurations taken through MLX (default %(default)s)")
    parser.add_argument("--names", nargs="*",
                        help="time only these configurations alone (default: the decode grid "
                             "and the skinny kernels)")
    args = parser.parse_args(argv)

    import mlx.core as mx

    from pytest_qmmperf.hardware import backend_name
    from pytest_qmmperf.timing import prefer_stream_order

    prefer_stream_order(backend_name(mx))
    log, report = gk.open_report(args.out, "gpu_decode")
    t0 = time.perf_counter()
    report["launch_alone_s"] = trivial_launch_s(graph=True)
    report["launch_host_loop_s"] = trivial_launch_s(graph=False)
    log(f"# trivial kernel alone: {report['launch_alone_s'] * 1e6:.2f} us per launch in a "
        f"CUDA graph, {report['launch_host_loop_s'] * 1e6:.2f} us launched one by one")
    rows = report["alone"] = kernel_alone(log, args.names or grid() + list(SKINNY))
    log(f"# phase 1: {time.perf_counter() - t0:.0f} s")
    (args.out / "gpu_decode.json").write_text(json.dumps(report, indent=1))
    best = best_by_case(rows)
    # the configurations that win most cases, then the rest by total time
    wins: dict[str, int] = {}
    for r in best.values():
        wins[r["variant"]] = wins.get(r["variant"], 0) + 1
    total = {n: sum(r["over_floor"] for r in rows if r["variant"] == n and r["M"] <= 16)
             for n in {r["variant"] for r in rows} if n.startswith("tiled:decode")}
    chosen = sorted(total, key=lambda n: (-wins.get(n, 0), total[n]))[:args.top]
    chosen += [n for n in SKINNY if wins.get(n) or n == "tiled:skinny"]
    report["chosen"] = chosen
    report["launch_mlx_s"] = gk.trivial_kernel_s("cuda")
    report.update(through_mlx(log, chosen))
    (args.out / "gpu_decode.json").write_text(json.dumps(report, indent=1))
    log(f"# total {time.perf_counter() - t0:.0f} s")
    log(f"{'shape':8s} {'M':>3s} {'floor us':>8s} {'default (what a tile variant runs)':>30s}"
        "  best alone")
    for (shape, M), r in sorted(best.items(), key=lambda kv: (list(gk.SHAPES).index(kv[0][0]),
                                                              kv[0][1])):
        default = "tiled:decode" if M == 1 else "tiled:skinny"
        d = next((x for x in rows if (x["shape"], x["M"], x["variant"]) == (shape, M, default)),
                 None)
        if d is None:  # not among --names
            log(f"{shape:8s} {M:3d} {r['floor_s'] * 1e6:8.2f} {default:>13s} not run  "
                f"{r['variant']} {r['kernel_s'] * 1e6:.2f} us ({r['over_floor']:.2f}x)")
            continue
        log(f"{shape:8s} {M:3d} {r['floor_s'] * 1e6:8.2f} {default:>13s} "
            f"{d['kernel_s'] * 1e6:7.2f} "
            f"({d['over_floor']:4.2f}x)  {r['variant']} {r['kernel_s'] * 1e6:.2f} us "
            f"({r['over_floor']:.2f}x)")
    log(f"launch alone {report['launch_alone_s'] * 1e6:.2f} us; through MLX "
        f"{report['launch_mlx_s'] * 1e6:.2f} us")
    failed = [r for r in rows if not r["ok"]]
    failed += [c for c in report["checks"] if c.get("ok") is False]
    log(f"# {len(failed)} failed checks")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
