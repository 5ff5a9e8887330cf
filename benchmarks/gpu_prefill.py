"""Model prefill and decode on a GPU, run to run: the measurement behind docs/PERFORMANCE.md.

For each variant, ``--runs`` separate processes each build the model (seeded
random weights, so every run has the same model), make one cold run (JIT
compilation included: ``cold_start_s``) and one warm-up run, verify the
logits (check mode), then time ``--rounds`` rounds with
:class:`pytest_qmmperf.workloads.prefill.PrefillRunner` exactly as
``qmm_bench.prefill`` does.  Variants alternate order from run to run
(A B, B A, ...) so that drift of the machine hits both alike.

Reported per variant: the median over runs of each run's median (TTFT,
prompt tok/s, gen tok/s, peak memory), the cold start, and the run-to-run
spread of TTFT and gen tok/s, defined as ``(max - min) / median`` of the
per-run medians.  For comparison the same runs also give the *naive* figure
mlx-lm's ``stream_generate`` would print: the first measured round only,
and generation as ``gen_tokens / time`` of one decode pass.

On CUDA, processes run with ``MLX_USE_CUDA_GRAPHS=0`` unless it is set, as
benchmark sessions of the plugin do (pytest_qmmperf.timing explains why);
``MLX_USE_CUDA_GRAPHS=1 python benchmarks/gpu_prefill.py ...`` measures with
graphs.

Kernel caches: MLX's CUDA backend keeps compiled kernels on disk
(``MLX_PTX_CACHE_DIR``, by default /tmp/mlx/<version>/ptx), and the driver
its own (``CUDA_CACHE_PATH``), so only the first process ever pays for all the
compilation.  ``--ptx-cache first`` (default) gives the first run of each
variant empty caches (its ``cold_start_s`` is the true first run) and later
runs a cache shared among that variant's runs (their start is reported apart, as
``start_cached_s``); ``fresh`` gives every run empty caches (every run cold,
slowest); ``default`` leaves MLX's own cache alone.

Results already in ``--out`` are reused (``--fresh`` to redo them), so a run
cut short by a time limit can be finished by running the same command again;
``--max-seconds`` stops starting new processes before a limit is reached.

    python benchmarks/gpu_prefill.py --model llama-3.2-3b --prompt-tokens 10049 \\
        --gen-tokens 32 --variants mlx,dequant --runs 5 --out results/prefill
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METRICS = ("ttft_s", "prompt_tps", "gen_tps", "peak_memory_gb")


def spread_pct(values: list[float]) -> float:
    """Run-to-run spread in percent: ``100 * (max - min) / median`` (NaN below two values)."""
    values = [v for v in values if math.isfinite(v)]
    if len(values) < 2:
        return math.nan
    return 100.0 * (max(values) - min(values)) / statistics.median(values)


# --- one process: one run of one variant ---------------------------------------------


def child(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from pytest_qmmperf.hardware import backend_name, fingerprint
    from pytest_qmmperf.timing import prefer_stream_order
    from pytest_qmmperf.workloads.prefill import PrefillRunner, PrefillSpec

    prefer_stream_order(backend_name(mx))  # as the plugin does in benchmark sessions

    start = time.perf_counter()
    cache = os.environ.get("MLX_PTX_CACHE_DIR")
    cache_empty = None if cache is None else not (Path(cache).exists() and any(
        Path(cache).iterdir()))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    spec = PrefillSpec(model=args.model, prompt_tokens=args.prompt_tokens,
                       gen_tokens=args.gen_tokens, bits=args.bits, group_size=args.group_size,
                       mode=args.mode, variant=args.child_variant,
                       prefill_step=args.prefill_step, seed=args.seed)
    runner = PrefillRunner(spec, progress=log, decode_passes=args.decode_passes)
    cold = runner.warmup()
    runner.check()
    log(f"check: relative error {runner.check_error:.3g} against the float32 reference")
    rounds, timings = [], []
    for _ in range(args.rounds):
        rounds.append(runner.run_round())
        timings.append(runner.last_timings)
    samples = {m: [r[m] for r in rounds if m in r] for m in METRICS}
    first = timings[0]
    naive = {"ttft_s": first["ttft_s"]}
    if first["decode_s"]:
        # mlx-lm's stream_generate: all gen_tokens over the time of one decode pass.
        naive["gen_tps"] = args.gen_tokens / first["decode_s"][0]
    doc = {
        "variant": args.child_variant,
        "run": args.child_run,
        "samples": samples,
        "median": {m: statistics.median(v) for m, v in samples.items() if v},
        "naive": naive,
        "cold_start_s": cold,
        "kernel_cache_empty": cache_empty,
        "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
        "check_relative_error": runner.check_error,
        "timings": timings,
        "info": runner.info(),
        "hardware": {k: v for k, v in fingerprint().items() if k != "device_info"},
        "wall_s": time.perf_counter() - start,
    }
    Path(args.child_out).write_text(json.dumps(doc, indent=1))
    log("done")
    return 0


# --- the parent: schedule, collect, summarise ------------------------------------------


def schedule(variants: list[str], runs: int) -> list[tuple[int, str]]:
    """(run, variant) pairs, the variant order reversed on every other run."""
    out = []
    for k in range(1, runs + 1):
        order = variants if k % 2 else list(reversed(variants))
        out.extend((k, v) for v in order)
    return out


def summarise(results: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Per variant: medians of per-run medians, spreads, cold starts, naive spreads."""
    per_variant: dict[str, Any] = {}
    for v in variants:
        mine = sorted((r for r in results if r["variant"] == v), key=lambda r: r["run"])
        if not mine:
            continue
        run_medians = {m: [r["median"].get(m, math.nan) for r in mine] for m in METRICS}
        naive = {m: [r["naive"].get(m, math.nan) for r in mine] for m in ("ttft_s", "gen_tps")}
        # A first run that found compiled kernels on disk is no cold start.
        cold = [r["cold_start_s"] for r in mine if r.get("kernel_cache_empty") is not False]
        cached = [r["cold_start_s"] for r in mine if r.get("kernel_cache_empty") is False]
        per_variant[v] = {
            "runs": [r["run"] for r in mine],
            "median": {m: statistics.median(x) for m, x in run_medians.items()
                       if all(math.isfinite(y) for y in x)},
            "run_medians": run_medians,
            "spread_pct": {m: spread_pct(x) for m, x in run_medians.items()},
            "within_run_spread_pct": {
                m: statistics.median(spread_pct(r["samples"][m]) for r in mine)
                for m in ("ttft_s", "gen_tps") if all(len(r["samples"].get(m, [])) > 1
                                                      for r in mine)
            },
            "naive_run_values": naive,
            "naive_spread_pct": {m: spread_pct(x) for m, x in naive.items()},
            "cold_start_s": cold,
            "cold_start_s_median": statistics.median(cold) if cold else math.nan,
            "start_cached_s": cached,
            "start_cached_s_median": statistics.median(cached) if cached else math.nan,
            "check_relative_error_max": max(r["check_relative_error"] for r in mine),
        }
    return per_variant


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def table(summary: dict[str, Any]) -> list[list[str]]:
    header = ["Variant", "runs", "TTFT (s)", "Prompt tok/s", "Gen tok/s", "Peak (GB)",
              "Cold start (s)", "Start, cached (s)", "TTFT spread", "Gen spread",
              "naive TTFT spread", "naive gen spread"]
    rows = [header]
    for v, s in summary["per_variant"].items():
        med = s["median"]
        rows.append([
            v, str(len(s["runs"])), _fmt(med.get("ttft_s", math.nan)),
            _fmt(med.get("prompt_tps", math.nan)), _fmt(med.get("gen_tps", math.nan)),
            _fmt(med.get("peak_memory_gb", math.nan), 3), _fmt(s["cold_start_s_median"], 3),
            _fmt(s["start_cached_s_median"], 3),
            f"{_fmt(s['spread_pct']['ttft_s'], 2)}%", f"{_fmt(s['spread_pct']['gen_tps'], 2)}%",
            f"{_fmt(s['naive_spread_pct']['ttft_s'], 2)}%",
            f"{_fmt(s['naive_spread_pct']['gen_tps'], 2)}%",
        ])
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |",
           "| --- | " + " | ".join(["---:"] * (len(rows[0]) - 1)) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def parent(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants:
        print("gpu_prefill: --variants is empty", file=sys.stderr)
        return 4
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results, incomplete, durations = [], [], []
    plan = schedule(variants, args.runs)
    for i, (k, v) in enumerate(plan, 1):
        safe = v.replace(":", "_")
        path = out / f"run{k}-{safe}.json"
        if path.exists() and not args.fresh:
            results.append(json.loads(path.read_text()))
            print(f"[{i}/{len(plan)}] run {k} {v}: reusing {path}", flush=True)
            continue
        elapsed = time.perf_counter() - started
        expected = max(durations) if durations else 0.0
        if args.max_seconds and elapsed + expected > args.max_seconds:
            incomplete.append((k, v))
            print(f"[{i}/{len(plan)}] run {k} {v}: skipped, --max-seconds {args.max_seconds} "
                  f"would be passed (rerun the same command to finish)", flush=True)
            continue
        env = dict(os.environ)
        cache = None
        if args.ptx_cache == "fresh" or (args.ptx_cache == "first" and k == 1):
            cache = out / ".kernel-cache" / f"run{k}-{safe}"
            shutil.rmtree(cache, ignore_errors=True)
        elif args.ptx_cache == "first":
            # one shared cache per variant: a cache holding another variant's
            # kernels is not empty, yet compiles this one's from scratch
            cache = out / ".kernel-cache" / f"shared-{safe}"
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            env["MLX_PTX_CACHE_DIR"] = str(cache / "mlx")
            env["CUDA_CACHE_PATH"] = str(cache / "cuda")
        cmd = [sys.executable, __file__, "--child-run", str(k), "--child-variant", v,
               "--child-out", str(path), *args.passthrough]
        print(f"[{i}/{len(plan)}] run {k} {v} ...", flush=True)
        t0 = time.perf_counter()
        with open(out / f"run{k}-{safe}.log", "w") as log:
            try:
                proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=args.child_timeout, check=False)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        durations.append(time.perf_counter() - t0)
        if cache is not None and not cache.name.startswith("shared-"):
            shutil.rmtree(cache, ignore_errors=True)
        if rc != 0 or not path.exists():
            tail = (out / f"run{k}-{safe}.log").read_text().strip().splitlines()[-5:]
            print(f"  failed ({rc}):\n    " + "\n    ".join(tail), file=sys.stderr)
            incomplete.append((k, v))
            continue
        doc = json.loads(path.read_text())
        results.append(doc)
        med = doc["median"]
        print(f"  {durations[-1]:.0f} s: cold {doc['cold_start_s']:.3g} s, TTFT "
              f"{med['ttft_s']:.4g} s, gen {med.get('gen_tps', math.nan):.4g} tok/s, "
              f"peak {med['peak_memory_gb']:.3g} GB", flush=True)
    shutil.rmtree(out / ".kernel-cache", ignore_errors=True)
    if not results:
        print("gpu_prefill: no run finished", file=sys.stderr)
        return 1
    hw = results[0]["hardware"]
    summary = {
        "params": {"model": args.model, "prompt_tokens": args.prompt_tokens,
                   "gen_tokens": args.gen_tokens, "bits": args.bits,
                   "group_size": args.group_size, "mode": args.mode,
                   "prefill_step": args.prefill_step, "seed": args.seed,
                   "rounds_per_run": args.rounds, "decode_passes": args.decode_passes,
                   "ptx_cache": args.ptx_cache},
        "hardware": hw,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "definitions": {
            "per-run value": "median of the run's rounds",
            "value": "median over runs of the per-run values",
            "spread_pct": "100 * (max - min) / median of the per-run values",
            "naive": "mlx-lm stream_generate's figures: first round only, gen = "
                     "gen_tokens / one decode pass",
        },
        "per_variant": summarise(results, variants),
        "incomplete": [f"run {k} {v}" for k, v in incomplete],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rows = table(summary)
    title = (f"{args.model}, {args.prompt_tokens} prompt + {args.gen_tokens} generated tokens, "
             f"{args.mode} {args.bits}-bit g{args.group_size}, {args.runs} runs x {args.rounds} "
             f"rounds, on {hw.get('device_name') or hw.get('cpu_name')} "
             f"(MLX {hw.get('mlx_version')}, {hw.get('backend')})")
    note = ("spread = (max - min) / median of per-run medians; naive = mlx-lm's own figures "
            "(first round, gen_tokens / one decode pass)")
    (out / "summary.md").write_text(f"**{title}**\n\n{render_markdown(rows)}\n\n{note}\n")
    print(f"\n{title}\n\n{render_text(rows)}\n\n{note}")
    if incomplete:
        print(f"incomplete: {', '.join(summary['incomplete'])}")
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return 0 if not incomplete else 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.2-3b")
    p.add_argument("--prompt-tokens", type=int, default=10049)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--variants", default="mlx,dequant")
    p.add_argument("--runs", type=int, default=5, help="processes per variant (default 5)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per run (default 5)")
    p.add_argument("--decode-passes", type=int, default=3,
                   help="decode passes timed per round, median taken (default 3)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--mode", default="affine")
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/prefill"))
    p.add_argument("--fresh", action="store_true", help="redo runs already in --out")
    p.add_argument("--ptx-cache", choices=("first", "fresh", "default"), default="first",
                   help="empty kernel caches for each variant's first run, shared after "
                        "(default); empty for every run; or MLX's own cache")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no process that would likely end past this many seconds")
    p.add_argument("--child-timeout", type=float, default=540)
    p.add_argument("--child-run", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-variant", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_variant is not None:
        return child(args)
    args.passthrough = [
        "--model", args.model, "--prompt-tokens", str(args.prompt_tokens),
        "--gen-tokens", str(args.gen_tokens), "--rounds", str(args.rounds),
        "--decode-passes", str(args.decode_passes), "--bits", str(args.bits),
        "--group-size", str(args.group_size), "--mode", args.mode,
        "--prefill-step", str(args.prefill_step), "--seed", str(args.seed),
    ]
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
