"""How stable and how honest is the QMM timing?  The measurement behind docs/PERFORMANCE.md.

Runs the suite's shapes (Llama-3.2-3B projections x M x {mlx, dequant}) in
``--runs`` separate processes and, in each, times every kernel four ways:

* ``ours``   - :class:`pytest_qmmperf.timing.RoundTimer` exactly as the fixture
  uses it (rotated input sets, adaptive launches per round, overhead
  subtracted, adaptive rounds);
* ``bare``   - a bare batched loop over the same launches and input sets:
  build L launches, ``mx.eval``, synchronise, divide by L; nothing subtracted;
* ``plain32`` - 32 launches of one input set per eval, 40 rounds, median;
* ``single`` - one launch per eval (M = 1 only), 40 rounds, median.

It reports, per kernel, the spread of each method's median across the runs
((max - min) / median of the run medians) and, for M = 1, single-launch vs
batched timing; ``ours`` vs ``bare`` is the harness's overhead.

    python benchmarks/gpu_timing.py --runs 5 --out results/
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [("qo", 3072, 3072), ("kv", 1024, 3072), ("gate_up", 8192, 3072), ("down", 3072, 8192)]
M_VALUES = [1, 16, 128, 512, 2048]
VARIANTS = ["mlx", "dequant"]


def _median_loop(launch, launches: int, rounds: int, start: int = 0) -> float:
    import mlx.core as mx

    times = []
    i = start
    for _ in range(rounds):
        outs = []
        for _ in range(launches):
            outs.extend(launch(i))
            i += 1
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t0) / launches)
    return statistics.median(times)


def child(out: Path, budget: float, shrink: int, round_ms: float | None) -> None:
    import mlx.core as mx

    from pytest_qmmperf import timing
    from pytest_qmmperf.hardware import backend_name, fingerprint
    from pytest_qmmperf.variants import get_variant
    from pytest_qmmperf.workloads.qmm import (
        QmmSpec,
        check_output,
        input_sets,
        launcher,
        make_inputs,
    )

    backend = backend_name(mx)
    policy = timing.TimingPolicy.for_backend(
        backend, budget_s=budget, round_s=round_ms / 1e3 if round_ms else None)
    overhead = timing.eval_overhead_s(backend)
    rows = []
    for name, N, K in SHAPES:
        for M in M_VALUES:
            for variant in VARIANTS:
                spec = QmmSpec(max(1, M // shrink), N // shrink, K // shrink,
                               dtype="float16" if backend != "cpu" else "float32")
                kernel = get_variant(variant)
                first = make_inputs(spec)
                check_output(spec, first, launcher(spec, kernel, [first])(0)[0], variant)
                sets = input_sets(spec, policy.rotate_bytes, 128, first)
                launch = launcher(spec, kernel, sets)
                timer = timing.RoundTimer(launch, policy, overhead)
                timer.prepare()
                timer.run()
                ours = statistics.median(timer.samples_s)
                bare = _median_loop(launch, timer.launches, 30, start=10_000)
                one = launcher(spec, kernel, [first])
                plain32 = _median_loop(one, 32, 40)
                single = _median_loop(one, 1, 40) if M == 1 else None
                rows.append({"shape": name, "M": M, "N": spec.N, "K": spec.K,
                             "variant": variant, "ours_s": ours, "bare_s": bare,
                             "plain32_s": plain32, "single_s": single,
                             "launches": timer.launches, "rounds": timer.rounds,
                             "sets": len(sets), "cold_start_s": timer.cold_start_s})
                print(f"{name:8s} M={M:<5d} {variant:8s} ours {ours * 1e6:9.2f} us  "
                      f"bare {bare * 1e6:9.2f}  plain32 {plain32 * 1e6:9.2f}  "
                      f"L={timer.launches} R={timer.rounds} sets={len(sets)}", flush=True)
    out.write_text(json.dumps({"fingerprint": fingerprint(), "eval_overhead_s": overhead,
                               "rows": rows}, indent=1))


def spread(values: list[float]) -> float:
    """(max - min) / median, in percent."""
    return 100.0 * (max(values) - min(values)) / statistics.median(values)


def summarize(runs: list[dict]) -> str:
    lines = ["| shape | M | variant | ours median (us) | spread ours | spread bare | "
             "spread plain32 | ours / bare | single / batched (M=1) | L x R |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for idx, row in enumerate(runs[0]["rows"]):
        per = [r["rows"][idx] for r in runs]
        ours = [p["ours_s"] for p in per]
        bare = [p["bare_s"] for p in per]
        plain = [p["plain32_s"] for p in per]
        ratio = statistics.median(o / b for o, b in zip(ours, bare, strict=True))
        single = ""
        if row["single_s"]:
            single = f"{statistics.median(p['single_s'] / p['ours_s'] for p in per):.1f}x"
        lines.append(
            f"| {row['shape']} | {row['M']} | {row['variant']} | "
            f"{statistics.median(ours) * 1e6:.2f} | {spread(ours):.2f}% | {spread(bare):.2f}% | "
            f"{spread(plain):.2f}% | {ratio:.4f} | {single} | "
            f"{row['launches']} x {row['rounds']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=0.75,
                        help="seconds of timed rounds per kernel and run (default 0.75)")
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide every size by this (for a quick CPU try)")
    parser.add_argument("--round-ms", type=float, default=None,
                        help="minimum device time per round (default: the fixture's policy)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.out / "run.json", args.budget, args.shrink, args.round_ms)
        return 0
    runs = []
    for i in range(args.runs):
        run_dir = args.out / f"run{i + 1}"
        run_dir.mkdir(exist_ok=True)
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "--child", "--out", str(run_dir),
                        "--budget", str(args.budget), "--shrink", str(args.shrink)]
                       + (["--round-ms", str(args.round_ms)] if args.round_ms else []), check=True)
        print(f"run {i + 1} took {time.time() - t0:.0f} s", flush=True)
        runs.append(json.loads((run_dir / "run.json").read_text()))
    table = summarize(runs)
    fp = runs[0]["fingerprint"]
    header = (f"{fp['key']} (MLX {fp['mlx_version']}), {args.runs} processes, "
              f"eval overhead {runs[0]['eval_overhead_s'] * 1e6:.1f} us")
    (args.out / "summary.md").write_text(header + "\n\n" + table + "\n")
    print(header)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
