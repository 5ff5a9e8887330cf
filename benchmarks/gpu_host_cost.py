"""Host cost of one quantized-matmul call at decode (M = 1), through MLX on the GPU.

    python benchmarks/gpu_host_cost.py --out results/host_cost

Generation without CUDA graphs is bound by the host (PERFORMANCE.md 3b):
a decode step of Llama-3.2-3B is ~200 quantized matmuls, each built into
MLX's graph and dispatched by the host.  This measures what one call costs
the host, for:

- ``mlx``: ``mx.quantized_matmul``;
- the tiled variant (``--variant``, its decode kernel), called as the
  model's layers call it, with x of shape (1, 1, K);
- the same with x reshaped to (1, K) and the output back, as the variant
  did before it declared its output in x's own shape;
- a trivial custom kernel with the same inputs, its source small, and again
  padded (a comment) to the decode kernel's source size: MLX concatenates
  and hashes a custom kernel's source on every call, so this isolates what
  the source's size costs.

Each repetition times, per candidate in turn, ``--calls`` calls built and
dispatched with ``mx.async_eval`` (host time), then until the GPU is done
(total).  Medians over ``--reps`` repetitions, candidates interleaved.
Writes ``host_cost.json`` under ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("MLX_USE_CUDA_GRAPHS", "0")  # as benchmark sessions run


def candidates(args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    import mlx.core as mx

    from pytest_qmmperf import variants
    from pytest_qmmperf.tiled import DecodeConfig, variant

    K, N = args.k, args.n
    dtype = getattr(mx, args.dtype)
    mx.random.seed(0)
    x3 = mx.random.normal((1, 1, K)).astype(dtype)
    w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size=64, bits=4)
    mx.eval(x3, w, scales, biases)
    kw = dict(transpose=True, group_size=64, bits=4)
    tiled = variants.get_variant(args.variant).fn
    assert tiled is not None

    def reshaped() -> Any:
        return tiled(x3.reshape(1, K), w, scales, biases, **kw).reshape(1, 1, N)

    src, _ = variant.kernel(DecodeConfig(), bits=4, group_size=64,
                            language=variant.backend() or "cuda")
    size = len(src.header) + len(src.body)
    body = "if (threadIdx.x == 0 && blockIdx.x == 0) { out[0] = x[0]; }"

    def trivial(name: str, header: str) -> Callable[[], Any]:
        kern = mx.fast.cuda_kernel(name=name, input_names=["x", "w", "scales", "biases"],
                                   output_names=["out"], source=body, header=header)

        def call() -> Any:
            return kern(inputs=[x3, w, scales, biases], template=[("T", dtype)],
                        grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1, 1, N)],
                        output_dtypes=[dtype])[0]
        return call

    padding = "/*" + "x" * max(0, size - len(body) - 4) + "*/\n"
    return {
        "mlx": lambda: mx.quantized_matmul(x3, w, scales, biases, **kw),
        args.variant: lambda: tiled(x3, w, scales, biases, **kw),
        f"{args.variant}, x reshaped": reshaped,
        "trivial kernel, small source": trivial("hc_small", ""),
        f"trivial kernel, source of {size} chars": trivial("hc_padded", padding),
        "_size": lambda: size,  # not timed
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", default="tiled:wide:w8r2m64:g512")
    parser.add_argument("--k", type=int, default=3072)
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--reps", type=int, default=41)
    args = parser.parse_args()

    import mlx.core as mx

    cands = candidates(args)
    size = cands.pop("_size")()
    for fn in cands.values():  # compile and warm
        for _ in range(3):
            mx.eval([fn() for _ in range(args.calls)])
    host: dict[str, list[float]] = {n: [] for n in cands}
    total: dict[str, list[float]] = {n: [] for n in cands}
    for _ in range(args.reps):
        for name, fn in cands.items():
            mx.synchronize()
            t0 = time.perf_counter()
            outs = [fn() for _ in range(args.calls)]
            mx.async_eval(outs)
            t1 = time.perf_counter()
            mx.synchronize()
            t2 = time.perf_counter()
            host[name].append((t1 - t0) / args.calls * 1e6)
            total[name].append((t2 - t0) / args.calls * 1e6)
    rows = []
    for name in cands:
        h, t = sorted(host[name]), sorted(total[name])
        rows.append({"candidate": name, "host_us": statistics.median(h),
                     "host_q1_us": h[len(h) // 4], "host_q3_us": h[3 * len(h) // 4],
                     "total_us": statistics.median(t)})
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(mx.default_device()), "mlx": mx.__version__, "K": args.k, "N": args.n,
            "dtype": args.dtype, "calls": args.calls, "reps": args.reps,
            "decode_source_chars": size,
            "graphs": os.environ.get("MLX_USE_CUDA_GRAPHS")}
    (args.out / "host_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))
    print(f"{'candidate':44s} {'host us/call':>12s} {'(q1-q3)':>15s} {'total us/call':>13s}")
    for r in rows:
        print(f"{r['candidate']:44s} {r['host_us']:12.2f} "
              f"{r['host_q1_us']:7.2f}-{r['host_q3_us']:<7.2f} {r['total_us']:13.2f}")


if __name__ == "__main__":
    main()
