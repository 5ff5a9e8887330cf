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

``--configs`` compares environments (e.g. ``default,MLX_USE_CUDA_GRAPHS=0``):
every run starts one process per configuration, in an order rotated from run
to run.  ``--cupti`` also records, in every process, each kernel's device
time as CUPTI sees it (through PyTorch's profiler, which records every CUDA
kernel of the process, MLX's included): the sum of kernel durations per
launch, and how much of it overlapped other kernels of the same round
(independent launches may run concurrently inside MLX's CUDA graphs).
``--methods ours`` times with the fixture's timer only.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _cupti_profile(launch, launches: int, start: int, dispatch_each: bool) -> dict | None:
    """Device time per launch and concurrent share from CUPTI, or None without PyTorch."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    import mlx.core as mx

    def round_() -> None:
        outs = []
        for i in range(launches):
            out = launch(start + i)
            if dispatch_each:
                mx.async_eval(out)
            outs.extend(out)
        mx.eval(outs)

    round_()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            round_()
        mx.synchronize()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:
        return {"kernels": 0}
    busy = 0.0
    union = 0.0
    cur_s, cur_e = spans[0]
    for s, e in spans:
        busy += e - s
        if s > cur_e:
            union += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    union += cur_e - cur_s
    return {"kernels": len(spans), "kernels_per_launch": len(spans) / (2 * launches),
            "device_s": busy * 1e-6 / (2 * launches),
            "overlap": 1.0 - union / busy if busy else 0.0,
            "span_s": (spans[-1][1] - spans[0][0]) * 1e-6 / (2 * launches)}


def child(out: Path, budget: float, shrink: int, round_ms: float | None,
          m_values: list[int], methods: str, cupti: bool) -> None:
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
    timing.prefer_stream_order(backend)  # as the plugin does
    policy = timing.TimingPolicy.for_backend(
        backend, budget_s=budget, round_s=round_ms / 1e3 if round_ms else None,
        warmup_s=float(os.environ["QMM_TIMING_WARMUP"]) if "QMM_TIMING_WARMUP" in os.environ
        else None,
        dispatch_each={"0": False, "1": True}.get(os.environ.get("QMM_DISPATCH_EACH", "")))
    overhead = timing.eval_overhead_s(backend)
    rows = []
    for name, N, K in SHAPES:
        for M in m_values:
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
                bare = plain32 = single = None
                if methods == "all":
                    bare = _median_loop(launch, timer.launches, 30, start=10_000)
                    one = launcher(spec, kernel, [first])
                    plain32 = _median_loop(one, 32, 40)
                    single = _median_loop(one, 1, 40) if M == 1 else None
                prof = (_cupti_profile(launch, timer.launches, 20_000, policy.dispatch_each)
                        if cupti else None)
                rows.append({"shape": name, "M": M, "N": spec.N, "K": spec.K,
                             "variant": variant, "ours_s": ours, "bare_s": bare,
                             "plain32_s": plain32, "single_s": single,
                             "launches": timer.launches, "rounds": timer.rounds,
                             "host_fraction": timer.host_fraction(), "cupti": prof,
                             "sets": len(sets), "cold_start_s": timer.cold_start_s})
                extra = ""
                if prof and prof.get("kernels"):
                    extra = (f"  cupti {prof['device_s'] * 1e6:8.2f} us "
                             f"x{prof['kernels_per_launch']:.0f} overlap {prof['overlap']:.0%}")
                print(f"{name:8s} M={M:<5d} {variant:8s} ours {ours * 1e6:9.2f} us  "
                      f"host {timer.host_fraction():.2f}{extra}  "
                      f"L={timer.launches} R={timer.rounds} sets={len(sets)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "QMM_"))}
    out.write_text(json.dumps({"fingerprint": fingerprint(), "eval_overhead_s": overhead,
                               "env": env, "rows": rows}, indent=1))


def spread(values: list[float]) -> float:
    """(max - min) / median, in percent."""
    return 100.0 * (max(values) - min(values)) / statistics.median(values)


def _within(spreads: list[float], limit: float) -> int:
    return sum(1 for v in spreads if v <= limit)


def summarize(runs: list[dict]) -> str:
    """The methods' spreads over the runs of one configuration."""
    lines = ["| shape | M | variant | ours median (us) | spread ours | spread bare | "
             "spread plain32 | ours / bare | single / batched (M=1) | L x R |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for idx, row in enumerate(runs[0]["rows"]):
        per = [r["rows"][idx] for r in runs]
        ours = [p["ours_s"] for p in per]
        if row["bare_s"] is None:
            lines.append(f"| {row['shape']} | {row['M']} | {row['variant']} | "
                         f"{statistics.median(ours) * 1e6:.2f} | {spread(ours):.2f}% | | | | | "
                         f"{row['launches']} x {row['rounds']} |")
            continue
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


def compare_configs(by_config: dict[str, list[dict]]) -> str:
    """Per kernel and configuration: median, spread, host share, CUPTI device time and overlap."""
    names = list(by_config)
    head = "| shape | M | variant | " + " | ".join(
        f"{n}: median (us) / spread / host / CUPTI (us) / overlap" for n in names) + " |"
    lines = [head, "| --- | --- | --- |" + " --- |" * len(names)]
    big: dict[str, list[float]] = {n: [] for n in names}
    first = by_config[names[0]][0]["rows"]
    for idx, row in enumerate(first):
        cells = []
        for n in names:
            per = [r["rows"][idx] for r in by_config[n]]
            ours = [p["ours_s"] for p in per]
            sp = spread(ours)
            if row["M"] >= 128:
                big[n].append(sp)
            host = statistics.median(p["host_fraction"] for p in per)
            prof = [p["cupti"] for p in per if p.get("cupti") and p["cupti"].get("kernels")]
            dev = (f"{statistics.median(q['device_s'] for q in prof) * 1e6:.2f}"
                   if prof else "-")
            ovl = f"{statistics.median(q['overlap'] for q in prof):.0%}" if prof else "-"
            cells.append(f"{statistics.median(ours) * 1e6:.2f} / {sp:.2f}% / {host:.2f} / "
                         f"{dev} / {ovl}")
        lines.append(f"| {row['shape']} | {row['M']} | {row['variant']} | " + " | ".join(cells)
                     + " |")
    lines.append("")
    for n in names:
        v = big[n]
        if v:
            lines.append(f"{n}: kernels with M >= 128 within 1% / 2% / 5% spread: "
                         f"{_within(v, 1)} / {_within(v, 2)} / {_within(v, 5)} of {len(v)}")
    return "\n".join(lines)


def _parse_config(text: str) -> dict[str, str]:
    if text == "default":
        return {}
    env = {}
    for item in text.split("+"):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(("MLX_", "QMM_")):
            raise SystemExit(f"--configs {text!r}: expected default or NAME=VALUE[+...] "
                             "with MLX_ or QMM_ names")
        env[key] = value
    return env


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
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)),
                        help="comma-separated M values (default: the suite's)")
    parser.add_argument("--methods", choices=["all", "ours"], default="all")
    parser.add_argument("--configs", default="default",
                        help="comma-separated environments: default or NAME=VALUE[+...] "
                        "(MLX_ variables, QMM_DISPATCH_EACH=0/1, QMM_TIMING_WARMUP=S)")
    parser.add_argument("--cupti", action="store_true",
                        help="record CUPTI kernel times through PyTorch's profiler")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    m_values = [int(v) for v in args.m.split(",")]
    if args.child:
        child(args.out / "run.json", args.budget, args.shrink, args.round_ms, m_values,
              args.methods, args.cupti)
        return 0
    configs = args.configs.split(",")
    by_config: dict[str, list[dict]] = {c: [] for c in configs}
    for i in range(args.runs):
        for j in range(len(configs)):
            config = configs[(i + j) % len(configs)]
            label = config.replace("=", "").replace("+", "_") if config != "default" else ""
            run_dir = args.out / (f"run{i + 1}" + (f"-{label}" if label else ""))
            run_dir.mkdir(exist_ok=True)
            t0 = time.time()
            cmd = [sys.executable, __file__, "--child", "--out", str(run_dir),
                   "--budget", str(args.budget), "--shrink", str(args.shrink), "--m", args.m,
                   "--methods", args.methods] + (["--cupti"] if args.cupti else [])
            if args.round_ms:
                cmd += ["--round-ms", str(args.round_ms)]
            subprocess.run(cmd, check=True, env={**os.environ, **_parse_config(config)})
            print(f"run {i + 1} {config} took {time.time() - t0:.0f} s", flush=True)
            by_config[config].append(json.loads((run_dir / "run.json").read_text()))
    fp = by_config[configs[0]][0]["fingerprint"]
    header = (f"{fp['key']} (MLX {fp['mlx_version']}), {args.runs} processes per configuration, "
              f"eval overhead {by_config[configs[0]][0]['eval_overhead_s'] * 1e6:.1f} us")
    parts = [header, ""]
    for c in configs:
        parts += [f"### {c}", "", summarize(by_config[c]), ""]
    if len(configs) > 1 or args.cupti:
        parts += ["### configurations compared", "", compare_configs(by_config), ""]
    text = "\n".join(parts)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
