"""``qmmperf sweep``: the ablation table of a kernel change, one row per variant.

    qmmperf sweep --model llama-3.2-3b --prompt-tokens 10049 --gen-tokens 32 \\
        --variants mlx,dequant [--rounds R] [--markdown PATH] [--json PATH] [--plot PATH]

One model is built (or loaded) once; for each variant in turn every quantized
layer is re-routed through it (same weights); a cold run and a warm-up run,
check mode's verification of its logits, and ``--rounds`` measured rounds
follow (:class:`~pytest_qmmperf.workloads.prefill.PrefillRunner`).  Each cell is
the median of the rounds; the last column compares TTFT, generation rate and
memory with the first row.  ``cold_start_s`` of later rows is lower than a
fresh process would see: kernels shared with earlier rows (attention, norms)
are compiled by then.

Exit status: 0 done, 1 a variant failed its check (the other rows are still
measured and reported), 4 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

#: Table columns: (header, metric).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("TTFT (s)", "ttft_s"),
    ("Prompt tok/s", "prompt_tps"),
    ("Gen tok/s", "gen_tps"),
    ("Memory (GB)", "peak_memory_gb"),
)
#: What the last column reports, and its short name there.
CHANGE_METRICS: tuple[tuple[str, str], ...] = (
    ("ttft_s", "TTFT"),
    ("gen_tps", "gen"),
    ("peak_memory_gb", "mem"),
)


class SweepError(ValueError):
    """Bad sweep input (variants list, output paths, missing plotting library)."""


@dataclass(frozen=True)
class SweepRow:
    """One variant's measurements: per-metric samples of its rounds, or why it has none."""

    variant: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    cold_start_s: float | None = None
    check_relative_error: float | None = None
    error: str | None = None

    def median(self, metric: str) -> float:
        values = self.samples.get(metric)
        return float(statistics.median(values)) if values else math.nan


@dataclass(frozen=True)
class SweepResult:
    """A whole sweep: workload parameters, rows in the order asked, and context."""

    params: dict[str, Any]
    rows: list[SweepRow]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(r.error for r in self.rows)


# --- pure formatting ------------------------------------------------------------


def format_value(metric: str, value: float) -> str:
    """A table cell: seconds to 3-4 significant digits, rates to whole tokens, GB to 2 places.

    Below 1 GB memory keeps 3 significant digits, so small models do not read 0.00.
    """
    if value is None or not math.isfinite(value):
        return "-"
    if metric == "peak_memory_gb":
        return f"{value:.2f}" if value >= 1 else f"{value:.3g}"
    if metric.endswith("_tps"):
        if value >= 100:
            return f"{value:.0f}"
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if value >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}" if value >= 1 else f"{value:.4f}"


def change_pct(value: float, first: float) -> float:
    """Relative change in percent: ``100 * (value / first - 1)`` (NaN when undefined)."""
    if not (math.isfinite(value) and math.isfinite(first)) or first == 0:
        return math.nan
    return 100.0 * (value / first - 1.0)


def change_text(row: SweepRow, first: SweepRow) -> str:
    """The last column: e.g. ``TTFT -17.6%, gen +0.4%, mem -7.5%``."""
    if row is first:
        return "baseline"
    if row.error:
        return "-"
    parts = []
    for metric, short in CHANGE_METRICS:
        pct = change_pct(row.median(metric), first.median(metric))
        if math.isfinite(pct):
            parts.append(f"{short} {pct:+.1f}%")
    return ", ".join(parts) or "-"


def table_rows(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table, shared by the text and Markdown renderings."""
    header = ["Variant", *(h for h, _ in COLUMNS), "Change vs first row"]
    cells = []
    first = result.rows[0]
    for row in result.rows:
        if row.error:
            cells.append([row.variant, *(["-"] * len(COLUMNS)), f"failed: {row.error}"])
            continue
        values = [format_value(m, row.median(m)) for _, m in COLUMNS]
        cells.append([row.variant, *values, change_text(row, first)])
    return header, cells


def _title(result: SweepResult) -> str:
    p = result.params
    return (
        f"{p['model']}, {p['prompt_tokens']} prompt + {p['gen_tokens']} generated tokens, "
        f"{p['mode']} {p['bits']}-bit group {p['group_size']}, prefill step {p['prefill_step']}"
    )


def _footer(result: SweepResult) -> str:
    rounds = result.info.get("rounds")
    where = result.info.get("hardware_key", "unknown hardware")
    return (
        f"Medians of {rounds} rounds per variant on {where}; gen tok/s counts decode steps "
        "after the first token; memory is MLX's peak (1 GB = 1e9 bytes)."
    )


def format_table(result: SweepResult) -> str:
    """The table as aligned plain text (numbers right-aligned)."""
    header, cells = table_rows(result)
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        out = [r[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)]
        out.append(r[-1])
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([_title(result), "", line(header), rule, *map(line, cells), "",
                      _footer(result)])


def format_markdown(result: SweepResult) -> str:
    """The table as GitHub Markdown, with its title and footnote."""
    header, cells = table_rows(result)
    align = ["---", *(["---:"] * len(COLUMNS)), "---"]

    def md(r: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"

    return "\n".join([f"**{_title(result)}**", "", md(header), md(align), *map(md, cells), "",
                      _footer(result), ""])


def to_json(result: SweepResult) -> dict[str, Any]:
    """Everything measured, raw samples included, with a schema version."""
    first = result.rows[0]
    rows = []
    for row in result.rows:
        medians = {m: row.median(m) for m in sorted(row.samples)}
        rows.append({
            "variant": row.variant,
            "median": medians,
            "samples": row.samples,
            "cold_start_s": row.cold_start_s,
            "check_relative_error": row.check_relative_error,
            "change_vs_first_pct": {
                m: change_pct(v, first.median(m)) for m, v in medians.items()
            } if row is not first and not row.error else {},
            "error": row.error,
        })
    doc = {"schema_version": SCHEMA_VERSION, "kind": "qmmperf-sweep", "params": result.params,
           "rows": rows, "info": result.info}
    return _finite(doc)


def _finite(node: Any) -> Any:
    """JSON has no NaN: undefined numbers become null."""
    if isinstance(node, float):
        return node if math.isfinite(node) else None
    if isinstance(node, dict):
        return {str(k): _finite(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_finite(v) for v in node]
    return node


def plot(result: SweepResult, path: str | os.PathLike[str]) -> None:
    """Draw the sweep as a PNG: one panel per metric, medians with min-max bars."""
    plt = _pyplot()
    names = [r.variant for r in result.rows]
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.2 * len(COLUMNS), 3.6))
    for ax, (header, metric) in zip(axes, COLUMNS, strict=True):
        heights, lo, hi = [], [], []
        for row in result.rows:
            values = row.samples.get(metric) or []
            med = row.median(metric)
            ok = bool(values) and math.isfinite(med)
            heights.append(med if ok else 0.0)  # a failed row: an empty slot
            lo.append(med - min(values) if ok else 0.0)
            hi.append(max(values) - med if ok else 0.0)
        ax.bar(range(len(names)), heights, yerr=[lo, hi], capsize=4,
               color=["#4c72b0"] + ["#dd8452"] * (len(names) - 1))
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        better = "lower" if metric in ("ttft_s", "peak_memory_gb") else "higher"
        ax.set_title(f"{header} ({better} is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise SweepError(
            '--plot needs matplotlib: pip install matplotlib (or "pytest-qmmperf[plot]")'
        ) from None
    return plt


def _atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None],
                  binary: bool = False) -> None:
    """Write next to ``path`` and rename over it, so a failure never leaves half a file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- running ---------------------------------------------------------------------


def parse_variants(text: str | Sequence[str]) -> list[str]:
    """``"mlx,dequant"`` -> ``["mlx", "dequant"]``; each must exist, none twice."""
    from pytest_qmmperf.variants import VariantError, get_variant

    items = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in items]
    if not names or any(not n for n in names):
        raise SweepError(f"--variants {text!r}: give a comma-separated list such as mlx,dequant")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"--variants: {', '.join(dupes)} listed twice")
    for name in names:
        try:
            get_variant(name)
        except VariantError as exc:
            raise SweepError(f"--variants: {exc}") from None
    return names


def run_sweep(
    model: str,
    *,
    prompt_tokens: int,
    gen_tokens: int,
    variants: Sequence[str],
    rounds: int = 3,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    prefill_step: int = 2048,
    seed: int = 0,
    dtype: str | None = None,
    decode_passes: int = 3,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Measure every variant on one model build; see the module docstring.

    Raises :class:`~pytest_qmmperf.workloads.prefill.PrefillError` (bad model or
    lengths), :class:`SweepError` (bad variants) or
    :class:`~pytest_qmmperf.workloads.prefill.PrefillUnavailable`.
    """
    from pytest_qmmperf.hardware import backend_name, import_mlx
    from pytest_qmmperf.timing import prefer_stream_order
    from pytest_qmmperf.workloads.prefill import PrefillRunner, PrefillSpec

    # Measure as benchmark sessions do (no CUDA graphs unless the user set them),
    # so a sweep's rows and a gated prefill's numbers agree.
    prefer_stream_order(backend_name(import_mlx()))
    names = parse_variants(variants)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise SweepError(f"rounds={rounds!r}: must be a positive integer")
    say = progress or (lambda _msg: None)
    spec = PrefillSpec(model=model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                       bits=bits, group_size=group_size, mode=mode, variant=names[0],
                       prefill_step=prefill_step, seed=seed, dtype=dtype)
    runner = PrefillRunner(spec, progress=say, decode_passes=decode_passes)
    rows = []
    for name in names:
        runner.set_variant(name)
        # Cold run first, so that check mode's forward passes compile nothing for it.
        cold = runner.warmup()
        try:
            runner.check()
        except AssertionError as exc:
            say(f"{name}: check failed: {exc}")
            rows.append(SweepRow(name, cold_start_s=cold, error=f"check failed: {exc}"))
            continue
        samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            for metric, value in runner.run_round().items():
                samples.setdefault(metric, []).append(float(value))
        rows.append(SweepRow(name, samples, cold, runner.check_error))
    params = spec.params()
    params.pop("variant")
    info = {**runner.info(), "rounds": rounds, "date": _dt.datetime.now(_dt.timezone.utc)
            .isoformat(timespec="seconds")}
    info.pop("cold_start_s", None)
    info.pop("check_relative_error", None)
    info.update(_hardware())
    return SweepResult(params, rows, info)


def _hardware() -> dict[str, Any]:
    from pytest_qmmperf.hardware import BackendError, fingerprint

    try:
        fp = fingerprint()
    except BackendError as exc:
        return {"hardware_key": f"unknown ({exc})"}
    return {"hardware_key": fp["key"], "mlx_version": fp.get("mlx_version"),
            "device_name": fp.get("device_name") or fp.get("cpu_name")}


# --- command line ------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def add_parser(subparsers: Any) -> None:
    """Add ``sweep`` to ``qmmperf``'s subcommands."""
    from pytest_qmmperf.workloads.qmm import DTYPES, MODES

    p = subparsers.add_parser(
        "sweep", allow_abbrev=False,
        help="ablation table of a model prefill across kernel variants",
        description="Build the model once, then for each variant: check its logits, warm up, "
                    "and time --rounds rounds of prefill and decode. Prints Variant, TTFT, "
                    "prompt and generation tok/s, peak memory and the change against the "
                    "first row.",
    )
    p.add_argument("--model", required=True,
                   help="a preset (llama-3.2-1b, llama-3.2-3b, qwen2.5-0.5b, tiny, ...) or a "
                        "local MLX model directory")
    p.add_argument("--prompt-tokens", type=_positive, required=True, metavar="P")
    p.add_argument("--gen-tokens", type=_positive, required=True, metavar="G")
    p.add_argument("--variants", required=True, metavar="A,B,...",
                   help="comma-separated variant names; the first row is the reference")
    p.add_argument("--rounds", type=_positive, default=3, metavar="R",
                   help="measured rounds per variant (default 3)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--mode", choices=list(MODES), default="affine")
    p.add_argument("--prefill-step", type=_positive, default=2048, metavar="N")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="activation dtype (default: the model's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-passes", type=_positive, default=3, metavar="N",
                   help="decode passes timed per round, median taken (default 3)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the Markdown table")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    p.add_argument("--plot", type=Path, metavar="PATH", help="also draw the table as a PNG")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``qmmperf sweep``: returns the exit status."""
    from pytest_qmmperf.workloads.prefill import PrefillError, PrefillUnavailable

    def fail(message: str) -> int:
        print(f"qmmperf sweep: {message}", file=sys.stderr)
        return 4

    # Everything that can be refused is refused before minutes of measuring.
    for option in ("markdown", "json", "plot"):
        path = getattr(args, option)
        if path is not None and not path.resolve().parent.is_dir():
            return fail(f"--{option} {path}: directory {path.resolve().parent} does not exist")
    try:
        if args.plot is not None:
            _pyplot()
        progress = None if args.quiet else (lambda m: print(f"  {m}", file=sys.stderr,
                                                             flush=True))
        result = run_sweep(
            args.model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
            variants=args.variants, rounds=args.rounds, bits=args.bits,
            group_size=args.group_size, mode=args.mode, prefill_step=args.prefill_step,
            seed=args.seed, dtype=args.dtype, decode_passes=args.decode_passes,
            progress=progress,
        )
    except (SweepError, PrefillError) as exc:
        return fail(str(exc))
    except PrefillUnavailable as exc:
        return fail(str(exc))
    print(format_table(result))
    if args.markdown is not None:
        _atomic_write(args.markdown, lambda f: f.write(format_markdown(result)))
    if args.json is not None:
        _atomic_write(args.json, lambda f: json.dump(to_json(result), f, indent=2))
    if args.plot is not None:
        plot(result, args.plot)
    return 1 if result.failed else 0
