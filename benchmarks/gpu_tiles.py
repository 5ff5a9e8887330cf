"""Tile kernels at prefill sizes on a CUDA GPU: alone, next to cuBLAS, and checked through MLX.

    python benchmarks/gpu_tiles.py --out results/tiles --names tiled:128x64x64:wm4wn2 \
        tiled:128x128:wm2wn4

1. Kernel alone: each named configuration, for each Llama-3.2-3B projection
   and M in ``--m``, compiled through CuPy's NVRTC from the source MLX
   compiles, checked against a float32 reference computed by CuPy (4-bit,
   group 64, float16) and timed from a replayed CUDA graph of 50 or more
   launches over weight sets rotated until they reach 256 MB, five times
   the H100's L2 (:func:`gpu_kernels.event_time`, :func:`gpu_kernels.rotation`);
   ``tiled:dequant``
   (the dequant kernel, then cuBLAS) launched one by one, as CuPy cannot
   capture cuBLAS, with its dequant kernel also timed alone.  In the same run,
   cuBLAS's float16 GEMM of the same (M, K) x (K, N) on dense weights (launched
   one by one: CuPy cannot capture it in a graph): what a kernel that
   dequantized for free would take at best.
2. Through MLX: every named configuration verified through the variant
   registry (``workloads.qmm.check_output``) on the Llama shapes at M = 33,
   161 and 512, awkward shapes (N and M not tile multiples, K at one
   group), and every quantization setting (bits 4/8, groups 32/64/128,
   float16/bfloat16).

Times are compared with the floor ``max(bytes / 2.55 TB/s, FLOPs / 660
TFLOP/s)`` of ``gpu_kernels.py``.  Writes ``gpu_tiles.json`` and
``gpu_tiles.log`` under ``--out``.
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

import gpu_decode as gd  # noqa: E402  (the CuPy float32 reference)
import gpu_kernels as gk  # noqa: E402  (the shared timing and CuPy helpers)

M_VALUES = (128, 512, 2048, 8192)


def cublas_s(M: int, N: int, K: int) -> float:
    """cuBLAS float16 GEMM (M, K) x (K, N), dense weights, timed like the kernels."""
    import cupy as cp

    x = cp.random.standard_normal((M, K), dtype=cp.float32).astype(cp.float16)
    sets = [(x, cp.random.standard_normal((N, K), dtype=cp.float32).astype(cp.float16),
             cp.empty((M, N), dtype=cp.float16)) for _ in range(gk.rotation(2 * N * K))]

    def launch(a: Any, w: Any, out: Any) -> None:
        cp.matmul(a, w.T, out=out)

    # CuPy cannot capture cuBLAS calls in a graph: launched one by one, which
    # costs nothing at these sizes (the GEMM outlasts the host's launch).
    return statistics.median(gk.event_time(launch, sets, graph=False) for _ in range(3))


def kernel_alone(log: gk.Log, names: list[str], m_values: list[int]) -> list[dict[str, Any]]:
    import cupy as cp

    rows = []
    for shape, (N, K) in gk.SHAPES.items():
        for M in m_values:
            spec, sets, ref, scale = gd.problem(M, N, K)
            del ref  # recomputed per kernel (gpu_decode.max_error): at large M it is large
            blas = cublas_s(M, N, K)
            rows.append({"shape": shape, "M": M, "N": N, "K": K, "variant": "cublas-fp16",
                         "kernel_s": blas, "floor_s": gk.floor_s(spec),
                         "over_floor": blas / gk.floor_s(spec), "ok": True})
            log(f"alone {shape:8s} M={M:5d} {'cublas fp16 (dense)':28s} {blas * 1e6:9.2f} us "
                f"{blas / gk.floor_s(spec):6.2f}x floor")
            for name in names:
                try:
                    launch = gk.cupy_kernel(name, M, N, K)
                    err = gd.max_error(launch, sets, scale)
                    t = gk.kernel_time(launch, sets)
                    alone = getattr(launch, "dequant_only", None)
                    if alone is not None:
                        ta = gk.kernel_time(alone, sets)
                        log(f"alone {shape:8s} M={M:5d} {'  its dequant kernel':28s} "
                            f"{ta * 1e6:9.2f} us  {spec.weight_bytes / ta / 1e12:.2f} TB/s "
                            "read (packed weights, scales, biases)")
                except Exception as exc:
                    log(f"ERROR {name} {shape} M={M}: {type(exc).__name__}: {exc}")
                    continue
                row = {"shape": shape, "M": M, "N": N, "K": K, "variant": name, "kernel_s": t,
                       "floor_s": gk.floor_s(spec), "over_floor": t / gk.floor_s(spec),
                       "over_cublas": t / blas, "max_rel_error": err, "ok": err < 1e-2}
                rows.append(row)
                log(f"alone {shape:8s} M={M:5d} {name:28s} {t * 1e6:9.2f} us "
                    f"{row['over_floor']:6.2f}x floor {t / blas:5.2f}x cublas  err {err:.2e}"
                    f"{'' if row['ok'] else ' FAIL'}")
            del sets
            cp.get_default_memory_pool().free_all_blocks()
    return rows


def mlx_checks(log: gk.Log, names: list[str]) -> list[dict[str, Any]]:
    shapes: list[dict[str, Any]] = []
    for (N, K), M in itertools.product(gk.SHAPES.values(), (33, 161, 512)):
        shapes.append(dict(M=M, N=N, K=K))
    for M, N, K, gs in ((33, 200, 128, 128), (161, 3000, 64, 64), (300, 72, 256, 32),
                        (17, 40, 32, 32), (100, 1000, 96, 32)):
        shapes.append(dict(M=M, N=N, K=K, group_size=gs))
    for dtype, bits, gs in itertools.product(("float16", "bfloat16"), (4, 8), (32, 64, 128)):
        shapes.append(dict(M=200, N=200, K=384, bits=bits, group_size=gs, dtype=dtype))
    return gk.run_cases(log, [(name, kw) for name in names for kw in shapes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_tiles_out"))
    parser.add_argument("--names", nargs="+", required=True, help="tile configurations")
    parser.add_argument("--m", type=int, nargs="*", default=list(M_VALUES),
                        help="M values to time (default: %(default)s)")
    parser.add_argument("--skip-mlx-check", action="store_true")
    args = parser.parse_args(argv)

    log, report = gk.open_report(args.out, "gpu_tiles")
    t0 = time.perf_counter()
    rows = report["alone"] = kernel_alone(log, args.names, args.m)
    (args.out / "gpu_tiles.json").write_text(json.dumps(report, indent=1))
    log(f"# kernel alone: {time.perf_counter() - t0:.0f} s")
    checks = report["checks"] = [] if args.skip_mlx_check else mlx_checks(log, args.names)
    (args.out / "gpu_tiles.json").write_text(json.dumps(report, indent=1))
    log(f"# total {time.perf_counter() - t0:.0f} s")
    for shape, M in itertools.product(gk.SHAPES, args.m):
        group = [r for r in rows if (r["shape"], r["M"]) == (shape, M)]
        if not group:
            continue
        tiles = [r for r in group if r["variant"] != "cublas-fp16" and r["ok"]]
        blas = next(r for r in group if r["variant"] == "cublas-fp16")
        best = min(tiles, key=lambda r: r["kernel_s"]) if tiles else None
        log(f"{shape:8s} M={M:5d} floor {blas['floor_s'] * 1e6:8.2f} us  cublas "
            f"{blas['over_floor']:4.2f}x  " + (
                f"best {best['variant']} {best['kernel_s'] * 1e6:.2f} us "
                f"{best['over_floor']:.2f}x floor" if best else "no tile"))
    failed = [r for r in rows if not r["ok"]] + [c for c in checks if c.get("ok") is False]
    log(f"# {len(failed)} failed checks")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
