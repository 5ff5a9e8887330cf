"""The ``qmmperf`` command: hardware, variants, baselines, compare, sweep.

Each subcommand is a ``_cmd_<name>(args) -> int`` function plus a few lines
in :func:`build_parser`; the heavy modules are imported inside the command
so ``qmmperf --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_hardware(args: argparse.Namespace) -> int:
    from pytest_qmmperf.hardware import BackendError, fingerprint

    try:
        fp = fingerprint()
    except BackendError as exc:
        print(f"qmmperf hardware: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(fp, indent=2, sort_keys=True))
        return 0
    print(fp["key"])
    for key in sorted(fp):
        if key not in ("key", "device_info"):
            print(f"  {key}: {fp[key]}")
    return 0


def _cmd_variants(args: argparse.Namespace) -> int:
    from pytest_qmmperf import variants

    names = variants.variant_names()
    rows = []
    for name in names:
        try:
            v = variants.get_variant(name)
        except variants.VariantError as exc:
            rows.append((name, "invalid", str(exc)))
            continue
        missing = v.available()
        rows.append((name, "no: " + missing if missing else "yes", v.description))
    if args.json:
        print(json.dumps([{"name": n, "available": a, "description": d} for n, a, d in rows],
                         indent=2))
        return 0
    width = max(len(r[0]) for r in rows)
    awidth = max(len(r[1]) for r in rows)
    print(f"{'variant'.ljust(width)}  {'runs here'.ljust(awidth)}  description")
    for name, avail, desc in rows:
        print(f"{name.ljust(width)}  {avail.ljust(awidth)}  {desc}")
    fams = variants.families()
    for fam in fams:
        print(f"\n{fam.prefix}:...  {fam.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="qmmperf",
        description="Benchmark and gate quantized-matmul kernels and LLM prefill with MLX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("hardware", help="this machine's hardware key and fingerprint")
    p.add_argument("--json", action="store_true", help="print the fingerprint as JSON")
    p.set_defaults(func=_cmd_hardware)

    p = sub.add_parser("variants", help="kernel variants and whether they run here")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=_cmd_variants)

    from pytest_qmmperf import compare  # light: git and the gate load when it runs

    compare.add_parser(sub)

    from pytest_qmmperf import sweep  # light: MLX and mlx-lm load when it runs

    sweep.add_parser(sub)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qmmperf`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
