"""Where does generation's round-to-round spread come from? Rounds under a few conditions.

    python benchmarks/gpu_decode_spread.py --model llama-3.2-3b --prompt-tokens 10049 \
        --gen-tokens 32 --rounds 8 --out results/decode_spread

One process builds the model once (:class:`PrefillRunner`, as
``qmm_bench.prefill`` does), makes its cold and warm-up runs, then measures
rounds under each condition in turn (A B C A B C ...), so that drift of the
machine hits them alike:

* ``default``: a round as the plugin measures it (fresh KV cache, MLX's
  buffer cache emptied first, garbage collector paused);
* ``keep-cache``: the same without emptying MLX's buffer cache, so the
  round's allocations are served from buffers freed by the last round;
* ``pinned``: every thread of the process pinned to ``--cores`` for the
  round (Linux ``sched_setaffinity``), so the host side of generation, which
  dispatches each of a decode step's kernels, stays on the same cores;
* ``contended`` (only when named in ``--conditions``): pinned as above,
  with a busy-looping process pinned to the same cores for the round, so
  the host builds and dispatches at a fraction of its speed while the GPU
  is unchanged.  Comparing it with ``pinned`` shows how much a variant's
  TTFT and gen tok/s depend on the host.

With ``--variants A,B,...`` the conditions are variants instead: each
round re-routes the model's quantized layers to the next variant (same
weights, ``PrefillRunner.set_variant``) and measures a ``default`` round,
so two variants' generation speeds are compared under the same drift of
the host (section 3b: gen tok/s moves with it); the order of the variants
reverses every other round.

Reports each round's TTFT and gen tok/s and, per condition, the spread
``(max - min) / median`` over its rounds.  Writes ``decode_spread.json``
under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_prefill import spread_pct  # noqa: E402  (the same run-to-run spread)

CONDITIONS = ("default", "keep-cache", "pinned")
ALL_CONDITIONS = (*CONDITIONS, "contended")


@contextlib.contextmanager
def pinned(cores: set[int]) -> Iterator[None]:
    """Every thread of this process on ``cores`` for the duration; restored afterwards."""
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    before = {t: os.sched_getaffinity(t) for t in tids}
    for t in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(t, cores)
    try:
        yield
    finally:
        for t, mask in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(t, mask)


@contextlib.contextmanager
def contended(cores: set[int]) -> Iterator[None]:
    """Pinned to ``cores``, sharing them with a busy-looping process for the duration."""
    burner = subprocess.Popen([
        sys.executable, "-c",
        f"import os\nos.sched_setaffinity(0, {sorted(cores)!r})\nwhile True:\n    pass",
    ])
    try:
        with pinned(cores):
            yield
    finally:
        burner.kill()
        burner.wait()


@contextlib.contextmanager
def buffer_cache_kept() -> Iterator[None]:
    import mlx.core as mx

    clear = mx.clear_cache
    mx.clear_cache = lambda: None
    try:
        yield
    finally:
        mx.clear_cache = clear


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-3b")
    parser.add_argument("--prompt-tokens", type=int, default=10049)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--variant", default="mlx")
    parser.add_argument("--variants", default="",
                        help="comma-separated variants to interleave (instead of the conditions)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS),
                        help=f"comma-separated, of {', '.join(ALL_CONDITIONS)} "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per condition")
    parser.add_argument("--cores", default="0-3", help="cores for the pinned condition")
    parser.add_argument("--out", type=Path, default=Path("decode_spread_out"))
    args = parser.parse_args(argv)
    lo, _, hi = args.cores.partition("-")
    cores = set(range(int(lo), int(hi or lo) + 1))

    import mlx.core as mx

    from pytest_qmmperf.hardware import backend_name
    from pytest_qmmperf.timing import prefer_stream_order
    from pytest_qmmperf.workloads.prefill import PrefillRunner, PrefillSpec

    prefer_stream_order(backend_name(mx))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    variants = [v for v in args.variants.split(",") if v]
    named = [c for c in args.conditions.split(",") if c]
    unknown = sorted(set(named) - set(ALL_CONDITIONS))
    if unknown or not named:
        parser.error(f"--conditions {args.conditions!r}: accepted are "
                     f"{', '.join(ALL_CONDITIONS)}, comma-separated")
    conditions = variants or named
    first = variants[0] if variants else args.variant
    spec = PrefillSpec(model=args.model, prompt_tokens=args.prompt_tokens,
                       gen_tokens=args.gen_tokens, variant=first)
    runner = PrefillRunner(spec, say)
    cold: dict[str, float] = {}
    for v in variants or [args.variant]:
        runner.set_variant(v)
        runner.check()  # logits against the float32 dequantize reference
        cold[v] = runner.warmup()
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        # variants alternate their order (A B C, C B A, ...): no variant always runs first
        order = conditions[::-1] if variants and r % 2 else conditions
        for cond in order:
            ctx = (pinned(cores) if cond == "pinned" else contended(cores)
                   if cond == "contended" else buffer_cache_kept()
                   if cond == "keep-cache" else contextlib.nullcontext())
            if variants:
                runner.set_variant(cond)
            with ctx:
                result = runner.run_round()
            rows.append({"condition": cond, "round": r + 1, **result,
                         "decode_s": list(runner.last_timings["decode_s"])})
            say(f"{cond:10s} round {r + 1}: TTFT {result['ttft_s']:.4f} s, peak "
                f"{result['peak_memory_gb']:.2f} GB, gen {result['gen_tps']:.1f} tok/s, passes "
                + " ".join(f"{d * 1e3:.1f}" for d in runner.last_timings["decode_s"]) + " ms")
    summary = {}
    for cond in conditions:
        mine = [row for row in rows if row["condition"] == cond]
        gen = [row["gen_tps"] for row in mine]
        ttft = [row["ttft_s"] for row in mine]
        peak = [row["peak_memory_gb"] for row in mine]
        summary[cond] = {"gen_tps_median": statistics.median(gen), "gen_spread_pct":
                         spread_pct(gen), "ttft_median": statistics.median(ttft),
                         "ttft_spread_pct": spread_pct(ttft),
                         "peak_memory_gb_median": statistics.median(peak)}
        say(f"{cond:10s}: gen {summary[cond]['gen_tps_median']:.1f} tok/s spread "
            f"{summary[cond]['gen_spread_pct']:.1f}%; TTFT {summary[cond]['ttft_median']:.4f} s "
            f"spread {summary[cond]['ttft_spread_pct']:.1f}%; peak {min(peak):.1f}-"
            f"{max(peak):.1f} GB")
    if variants:  # paired: each round's gen tok/s against the first variant's in that round
        base = [row for row in rows if row["condition"] == variants[0]]
        for cond in variants[1:]:
            mine = [row for row in rows if row["condition"] == cond]
            ratios = [m["gen_tps"] / b["gen_tps"] for m, b in zip(mine, base, strict=True)]
            ttft = [m["ttft_s"] / b["ttft_s"] for m, b in zip(mine, base, strict=True)]
            summary[cond]["gen_ratio_median"] = statistics.median(ratios)
            summary[cond]["ttft_ratio_median"] = statistics.median(ttft)
            say(f"{cond}: gen tok/s {statistics.median(ratios):.3f}x, TTFT "
                f"{statistics.median(ttft):.3f}x {variants[0]}'s in the same round (medians of "
                f"{len(ratios)} rounds; gen ratios {min(ratios):.3f}-{max(ratios):.3f})")
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "mlx": mx.__version__, "command": " ".join(sys.argv), "cores": sorted(cores),
              "cpu_count": os.cpu_count(), "cold_start_s": cold, "rounds": rows,
              "summary": summary}
    (args.out / "decode_spread.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
