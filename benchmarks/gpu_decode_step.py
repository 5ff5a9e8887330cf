"""Where a decode step's host time goes, per variant: building the graph, dispatching it.

    python benchmarks/gpu_decode_step.py --variants mlx,tiled:wide:w8r2m64:g512,hybrid \
        --out results/decode_step

Generation on the lent GPU is bound by the host (PERFORMANCE.md 3b, 3c):
a Llama-3.2-3B decode step is ~200 quantized matmuls and as many other
ops, each built into MLX's graph by Python and then dispatched by MLX's
C++.  One process builds the model once (``PrefillRunner``, random
weights), fills a KV cache with a ``--prompt-tokens`` prompt, and times
decode steps three ways:

* ``build``: the model's forward for one token (Python builds the graph);
* ``dispatch``: ``mx.async_eval`` of its logits (MLX encodes and launches);
* ``step``: from the start until the logits are computed.

Variants are interleaved (``--reps`` repetitions of ``--steps`` steps each,
medians), so the host's drift (3b) hits them alike; ``step / first`` is the
median over repetitions of a variant's step time over the first variant's
in the same repetition.  A cProfile of
``--steps`` steps per variant follows (the top functions by own time).
Writes ``decode_step.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("MLX_USE_CUDA_GRAPHS", "0")  # as benchmark sessions run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-3b")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--variants", default="mlx,tiled:wide:w8r2m64:g512,hybrid")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("decode_step_out"))
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from pytest_qmmperf.workloads.prefill import PrefillRunner, PrefillSpec

    spec = PrefillSpec(model=args.model, prompt_tokens=args.prompt_tokens, gen_tokens=8,
                       variant=variants[0])
    runner = PrefillRunner(spec, lambda msg: print(msg, flush=True))
    model = runner.model

    def steps(n: int) -> tuple[float, float, float]:
        cache = make_prompt_cache(model)
        mx.eval(model(runner.prompt[None], cache=cache))
        token = mx.array([[1]], dtype=mx.uint32)
        build, dispatch, total = [], [], []
        for _ in range(n):
            t0 = time.perf_counter()
            logits = model(token, cache=cache)
            t1 = time.perf_counter()
            mx.async_eval(logits)
            t2 = time.perf_counter()
            mx.eval(logits)
            t3 = time.perf_counter()
            build.append(t1 - t0)
            dispatch.append(t2 - t1)
            total.append(t3 - t0)
        return statistics.median(build), statistics.median(dispatch), statistics.median(total)

    for v in variants:  # compile and warm every variant's kernels
        runner.set_variant(v)
        steps(3)
        steps(3)
    samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for v in variants:
            runner.set_variant(v)
            samples[v].append(steps(args.steps))
    rows: list[dict[str, Any]] = []
    for v in variants:
        build, dispatch, step = (statistics.median(s[i] for s in samples[v]) for i in range(3))
        # paired: each repetition's step against the first variant's in the same repetition
        ratio = statistics.median(s[2] / b[2] for s, b in
                                  zip(samples[v], samples[variants[0]], strict=True))
        rows.append({"variant": v, "build_ms": build * 1e3, "dispatch_ms": dispatch * 1e3,
                     "step_ms": step * 1e3, "step_ratio": ratio})
    profiles = {}
    for v in variants:
        runner.set_variant(v)
        prof = cProfile.Profile()
        prof.enable()
        steps(args.steps)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        profiles[v] = text.getvalue()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "mlx": mx.__version__, "device": str(mx.default_device()),
              "command": " ".join(sys.argv), "rows": rows, "samples": samples,
              "profiles": profiles}
    (args.out / "decode_step.json").write_text(json.dumps(report, indent=1))
    for v in variants:
        print(f"===== {v}\n{profiles[v][-2500:]}")
    print(f"{'variant':32s} {'build ms':>9s} {'dispatch ms':>12s} {'step ms':>8s} "
          f"{'step / first':>12s}")
    for row in rows:
        print(f"{row['variant']:32s} {row['build_ms']:9.2f} {row['dispatch_ms']:12.2f} "
              f"{row['step_ms']:8.2f} {row['step_ratio']:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
