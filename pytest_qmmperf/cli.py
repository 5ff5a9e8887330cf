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
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import git


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


def _pytest(args: Sequence[str], quiet: bool = False) -> int:
    """Run pytest in a child process (so its plugins and MLX state stay out of this one).

    ``quiet`` keeps its output to the last line unless it ends in an error.
    """
    import subprocess

    cmd = [sys.executable, "-m", "pytest", *args]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    if not quiet:
        return subprocess.run(cmd, check=False).returncode
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.stderr.write(done.stdout + done.stderr)
    else:
        lines = done.stdout.strip().splitlines()
        print(f"  {lines[-1].strip('= ') if lines else ''}", file=sys.stderr, flush=True)
    return done.returncode


def _baseline_place(args: argparse.Namespace) -> tuple[git.Repo | None, Path]:
    """The git repository (or None) and the baseline folder the command works on.

    ``--dir`` wins; else ``qmm_baseline_dir`` from the repository's
    pyproject.toml or pytest.ini; else ``baselines``; relative to the
    repository root (the current folder outside git).
    """
    from pytest_qmmperf import revision

    try:
        repo = revision.open_repo(Path.cwd())
        root = Path(str(repo.working_tree_dir))
    except revision.RevisionError:
        repo, root = None, Path.cwd()
    name = args.dir or _ini_baseline_dir(root) or "baselines"
    path = Path(name)
    return repo, path if path.is_absolute() else root / path


def _ini_baseline_dir(root: Path) -> str | None:
    import configparser

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = None  # type: ignore[assignment]
    pyproject = root / "pyproject.toml"
    if tomllib is not None and pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
        value = data.get("tool", {}).get("pytest", {}).get("ini_options", {}).get(
            "qmm_baseline_dir")
        if value:
            return str(value)
    ini = root / "pytest.ini"
    if ini.is_file():
        cp = configparser.ConfigParser()
        cp.read(ini, encoding="utf-8")
        if cp.has_option("pytest", "qmm_baseline_dir"):
            return cp.get("pytest", "qmm_baseline_dir")
    return None


def _this_key(args: argparse.Namespace) -> str | None:
    if args.hardware:
        return str(args.hardware)
    from pytest_qmmperf.hardware import BackendError, hardware_key

    try:
        return hardware_key()
    except BackendError as exc:
        print(f"qmmperf baseline: {exc}; or name a key with --hardware", file=sys.stderr)
        return None


def _pytest_args(args: argparse.Namespace) -> list[str]:
    """The arguments meant for pytest (a leading ``--`` separator dropped)."""
    extra = list(args.extra)
    return extra[1:] if extra[:1] == ["--"] else extra


def _cmd_baseline_update(args: argparse.Namespace) -> int:
    return _pytest(["--qmm-bench", "--qmm-save-baseline", *_pytest_args(args)])


def _cmd_baseline_show(args: argparse.Namespace) -> int:
    from pytest_qmmperf import baselines, revision

    repo, root = _baseline_place(args)
    key = _this_key(args)
    if key is None:
        return 2
    try:
        listing = baselines.listing(root, key)
        head = None
        if repo is not None:
            hit = revision.nearest(repo, revision.head(repo).sha, {b.sha for b in listing})
            head = hit
    except (baselines.BaselineError, revision.RevisionError) as exc:
        print(f"qmmperf baseline show: {exc}", file=sys.stderr)
        return 2
    others = [k for k in baselines.keys(root) if k != key]
    if args.json:
        print(json.dumps({
            "key": key, "folder": str(root),
            "baselines": [{"sha": b.sha, "revision": b.revision, "mlx_version": b.mlx_version,
                           "benchmarks": sorted(b.entries), "recorded_at": b.recorded_at}
                          for b in listing],
            "head_baseline": head[0] if head else None, "other_keys": others,
        }, indent=2))
        return 0
    print(f"{key}: {len(listing)} baseline{'s' if len(listing) != 1 else ''} in {root / key}")
    for b in listing:
        mark = ""
        if head and head[0] == b.sha:
            back = f" ({head[1]} commits back)" if head[1] else ""
            mark = f"  <- HEAD compares with this{back}"
        dirty = " (dirty)" if b.revision.get("dirty") else ""
        print(f"  {b.sha[:10]}  {str(b.revision.get('date', ''))[:16]}  "
              f"{len(b.entries):>3} benchmarks  MLX {b.mlx_version}  "
              f"{b.revision.get('subject', '')}{dirty}{mark}")
    if repo is not None and listing and not head:
        print("  (none of these is an ancestor of HEAD)")
    if not listing:
        print(f"  {baselines.RECORD_HINT}")
    if others:
        print(f"other hardware: {', '.join(others)}")
    return 0


def _cmd_baseline_prune(args: argparse.Namespace) -> int:
    from pytest_qmmperf import baselines, revision

    repo, root = _baseline_place(args)
    if repo is None:
        print(f"qmmperf baseline prune: {Path.cwd()}: not inside a git repository; prune keeps "
              "what HEAD compares with, so it needs one", file=sys.stderr)
        return 2
    try:
        done = baselines.prune(repo, root, args.keep, protect_revs=["HEAD", *args.rev],
                               key=args.hardware, dry_run=args.dry_run)
    except (baselines.BaselineError, revision.RevisionError) as exc:
        print(f"qmmperf baseline prune: {exc}", file=sys.stderr)
        return 2
    verb = "would remove" if args.dry_run else "removed"
    for path in done.removed:
        print(f"{verb} {path}")
    for path in done.protected:
        print(f"kept {path} (what HEAD or --rev compares with)")
    print(f"{verb} {len(done.removed)}, kept {len(done.kept) + len(done.protected)}"
          + ("" if args.dry_run or not done.removed else "; commit the deletions"))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import tempfile

    from pytest_qmmperf import gate

    if args.runs < 2:
        print(f"qmmperf calibrate: --runs {args.runs}: need at least 2 runs to compare",
              file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="qmmperf-calibrate-") as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}.json"
            rc = _pytest(["--qmm-bench", f"--qmm-json={out}", *_pytest_args(args)], quiet=True)
            if rc not in (0, 1) or not out.is_file():  # 1: regressions against a baseline
                print(f"qmmperf calibrate: run {i + 1} of {args.runs} ended with exit status "
                      f"{rc}; fix the suite first", file=sys.stderr)
                return rc or 2
            data = json.loads(out.read_text(encoding="utf-8"))
            runs.append({r["name"]: r["samples"] for r in data["results"]})
    recs = gate.recommend_thresholds(runs)
    if not recs:
        print("qmmperf calibrate: no gated metric was measured", file=sys.stderr)
        return 2
    print(f"A/A over {args.runs} runs on this machine (every run judged against every other):")
    print(f"  {'metric':<16} {'recommend':>9}  {'A/A needed':>10}  {'max drift':>9}  "
          "pairs  worst benchmark")
    for r in recs.values():
        print(f"  {r.metric:<16} {r.threshold * 100:>8.1f}%  {r.needed * 100:>9.1f}%  "
              f"{r.spread * 100:>8.1f}%  {r.pairs:>5}  {r.worst}")
    items = ", ".join(f'"{r.metric}={r.threshold * 100:g}%"' for r in recs.values())
    print("\nfor pyproject.toml, [tool.pytest.ini_options]:")
    print(f"qmm_thresholds = [{items}]")
    return 0


def _add_baseline_parsers(sub: Any) -> None:
    p = sub.add_parser("baseline", help="record, list and prune committed baselines")
    bsub = p.add_subparsers(dest="baseline_command", metavar="ACTION", required=True)
    u = bsub.add_parser("update", help="run the suite with --qmm-bench and record this "
                        "hardware's baseline at HEAD (other arguments go to pytest)")
    u.set_defaults(func=_cmd_baseline_update, passthrough=True)
    for name, helptext, func in (
        ("show", "list the baselines of a hardware key and the one HEAD compares with",
         _cmd_baseline_show),
        ("prune", "keep the newest N baselines per hardware key, never the one HEAD (or "
         "--rev) compares with", _cmd_baseline_prune),
    ):
        q = bsub.add_parser(name, help=helptext)
        q.add_argument("--hardware", metavar="KEY",
                       help="hardware key (show: default this machine's; prune: default all)")
        q.add_argument("--dir", metavar="DIR", help="baseline folder (default: qmm_baseline_dir "
                       "of the repository's pytest config, else baselines)")
        q.set_defaults(func=func)
        if name == "show":
            q.add_argument("--json", action="store_true", help="print the listing as JSON")
        else:
            q.add_argument("--keep", type=int, required=True, metavar="N",
                           help="baselines to keep per hardware key")
            q.add_argument("--rev", action="append", default=[], metavar="REV",
                           help="also keep what REV compares with (repeatable)")
            q.add_argument("--dry-run", action="store_true", help="only say what would go")
    c = sub.add_parser("calibrate", help="run the suite A/A a few times and recommend "
                       "per-metric thresholds from the noise (other arguments go to pytest)")
    c.add_argument("--runs", type=int, default=5, help="how many runs (default 5)")
    c.set_defaults(func=_cmd_calibrate, passthrough=True)


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

    _add_baseline_parsers(sub)

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
