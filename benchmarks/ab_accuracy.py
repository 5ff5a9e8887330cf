"""Gate accuracy of same-machine A/B (``qmmperf compare``) next to baseline mode.

    python benchmarks/ab_accuracy.py [--sets 20] [--benchmarks 10] [--rounds-per-side 3]
                                     [--json PATH]

What it measures, with real MLX work on this machine:

* a temporary git repository holds a suite of ``--benchmarks`` identical
  tests, each timing ``REPEAT`` float32 matmuls of 128x128 per launch, and
  four commits of it: ``base`` (REPEAT = 20), ``aa`` (the same work under
  another commit: A/A), ``slow5`` (21 matmuls: 5% more work) and ``slow10``
  (22: 10% more); each is checked out into a worktree as compare does;
* a *set* runs ``--rounds-per-side`` rounds; each round starts one pytest
  process per commit, in a fresh random order (the interleaving of compare,
  over four arms instead of two), through compare's own runner;
* **A/B**: per benchmark, each arm's samples are merged over its runs and
  judged against base's with :func:`pytest_qmmperf.compare.judge_sides`
  (the gate's rule at the default 5% threshold);
* **baseline mode** on the same processes: base's first run stands for the
  recorded baseline (compacted as a baseline file stores it) and each arm's
  last run for the pull request's session, judged with the gate alone (no
  reference-workload drift correction: see the printed note);
* **median:5%** on the same pair: pytest-benchmark's
  ``--benchmark-compare-fail=median:5%`` rule (fail when the median grew by
  more than 5%).

Each benchmark of each set is one comparison: ``sets x benchmarks`` per
setting.  Benchmarks of one set share their processes, so the comparisons
are not fully independent; the per-set failure counts are printed too, and
the Wilson 95% intervals treat comparisons as independent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import git

from pytest_qmmperf import compare as cmp
from pytest_qmmperf import gate, stats

ARMS = {"base": 20, "aa": 20, "slow5": 21, "slow10": 22}
SETTINGS = {"aa": "A/A (no change)", "slow5": "5% slower", "slow10": "10% slower"}

SUITE = '''\
import mlx.core as mx
import pytest

from ab_work import N, REPEAT


@pytest.mark.parametrize("i", range({k}))
def test_mm(qmm_bench, i):
    mx.random.seed(i)
    x = mx.random.normal((N, N))
    ws = [mx.random.normal((N, N)) for _ in range(REPEAT)]
    qmm_bench(lambda: [x @ w for w in ws])
'''


def build_repo(root: Path, k: int) -> tuple[git.Repo, dict[str, str]]:
    """A repository with one commit per arm; returns it and the arms' shas."""
    repo = git.Repo.init(root, initial_branch="main")
    actor = git.Actor("ab accuracy", "ab@example.com")
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    (root / "bench").mkdir()
    (root / "bench" / "test_mm.py").write_text(SUITE.replace("{k}", str(k)))
    shas = {}
    for arm, repeat in ARMS.items():
        (root / "bench" / "ab_work.py").write_text(
            f"# arm {arm}\nN = 128\nREPEAT = {repeat}\n")
        repo.index.add(["pytest.ini", ".gitignore", "bench/test_mm.py", "bench/ab_work.py"])
        shas[arm] = repo.index.commit(arm, author=actor, committer=actor).hexsha
    return repo, shas


def run_set(sides: dict[str, cmp.Side], rounds: int, args: list[str], workdir: Path,
            rng: random.Random) -> dict[str, list[list[Any]]]:
    """Every arm's runs (a list of BenchResult lists), rounds interleaved in random order."""
    runs: dict[str, list[list[Any]]] = {arm: [] for arm in sides}
    total = rounds * len(sides)
    index = 0
    for _ in range(rounds):
        order = list(sides)
        rng.shuffle(order)
        for arm in order:
            index += 1
            results, _fp, _doc, _s = cmp.run_once(sides[arm], index, total, args, workdir,
                                                  "head", out=_Quiet())
            runs[arm].append(results)
    return runs


class _Quiet:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def merged(side: cmp.Side, runs: list[list[Any]]) -> cmp.SideResults:
    out = cmp.SideResults(side)
    for results in runs:
        out.add(results)
    return out


def ab_failures(sides: dict[str, cmp.Side], runs: dict[str, list[list[Any]]], arm: str
                ) -> dict[str, bool]:
    """Per benchmark: did A/B fail ``arm`` against base?"""
    thresholds = gate.Thresholds({}, {}, {})
    verdicts = cmp.judge_sides(merged(sides["base"], runs["base"]),
                               merged(sides[arm], runs[arm]), thresholds, True)
    return _per_test(verdicts)


def _per_test(verdicts: list[gate.Verdict]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for v in verdicts:
        if v.metric != "time_s":
            continue
        out[v.test] = out.get(v.test, False) or v.failed
    return out


def baseline_failures(runs: dict[str, list[list[Any]]], arm: str) -> dict[str, tuple[bool, bool]]:
    """Per benchmark: (gate failed, median:5% failed) for base's first run against arm's last."""
    recorded = {r.name: r for r in runs["base"][0]}
    current = {r.name: r for r in runs[arm][-1]}
    out = {}
    for name, cur in current.items():
        ref = recorded[name]
        base_samples = {m: stats.compact(v) for m, v in ref.samples.items() if v}
        verdicts = gate.judge(name, cur.samples, base_samples, current_params=cur.params,
                              baseline_params=ref.params, baseline_revision="base")
        gate_failed = any(v.failed for v in verdicts if v.metric == "time_s")
        ratio = stats.summarize(cur.samples["time_s"]).median / \
            stats.summarize(ref.samples["time_s"]).median
        out[name] = (gate_failed, ratio > 1.05)
    return out


def rate(failures: int, trials: int) -> dict[str, Any]:
    lo, hi = stats.wilson_interval(failures, trials) if trials else (float("nan"),) * 2
    return {"failed": failures, "trials": trials, "rate": failures / trials if trials else None,
            "ci95": [lo, hi]}


def build_report(args: argparse.Namespace, argv: list[str] | None, started: float,
                 counts: dict[str, dict[str, list[bool]]],
                 per_set: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """Counts so far, with rates and Wilson intervals."""
    return {
        "command": "python benchmarks/ab_accuracy.py " + " ".join(argv or sys.argv[1:]),
        "sets_done": len(per_set["ab"]["aa"]), "benchmarks": args.benchmarks,
        "rounds_per_side": args.rounds_per_side, "time_budget_s": float(args.time_budget),
        "seconds": round(time.time() - started, 1),
        "rates": {mode: {arm: rate(sum(v), len(v)) for arm, v in arms.items()}
                  for mode, arms in counts.items()},
        "failures_per_set": per_set,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=int, default=20)
    parser.add_argument("--benchmarks", type=int, default=10)
    parser.add_argument("--rounds-per-side", type=int, default=3)
    parser.add_argument("--time-budget", default="0.3", help="--qmm-time-budget per benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the counts as JSON")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    pytest_args = ["bench", "-q", "--qmm-time-budget", args.time_budget]
    counts: dict[str, dict[str, list[bool]]] = {
        mode: {arm: [] for arm in SETTINGS} for mode in ("ab", "baseline", "median5")}
    per_set: dict[str, dict[str, list[int]]] = {
        mode: {arm: [] for arm in SETTINGS} for mode in ("ab", "baseline", "median5")}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="qmm-ab-accuracy-") as tmp:
        repo, shas = build_repo(Path(tmp) / "repo", args.benchmarks)
        with cmp.signals_as_interrupt(), contextlib.ExitStack() as stack:
            # One detached worktree per arm, made and removed as compare does.
            trees = {arm: stack.enter_context(cmp.base_worktree(repo, sha))
                     for arm, sha in shas.items()}
            sides = {arm: cmp.Side(arm, shas[arm], trees[arm], trees[arm]) for arm in ARMS}
            for s in range(args.sets):
                workdir = Path(tmp) / f"set-{s:03d}"
                workdir.mkdir()
                runs = run_set(sides, args.rounds_per_side, pytest_args, workdir, rng)
                for arm in SETTINGS:
                    ab = ab_failures(sides, runs, arm)
                    bl = baseline_failures(runs, arm)
                    counts["ab"][arm] += ab.values()
                    counts["baseline"][arm] += [g for g, _ in bl.values()]
                    counts["median5"][arm] += [m for _, m in bl.values()]
                    per_set["ab"][arm].append(sum(ab.values()))
                    per_set["baseline"][arm].append(sum(g for g, _ in bl.values()))
                    per_set["median5"][arm].append(sum(m for _, m in bl.values()))
                if args.json:
                    # Written after every set: a long run interrupted still leaves its counts.
                    args.json.write_text(json.dumps(
                        build_report(args, argv, started, counts, per_set), indent=1) + "\n")
                print(f"set {s + 1}/{args.sets} done in {time.time() - started:.0f} s: "
                      + ", ".join(f"{mode} {arm} {per_set[mode][arm][-1]}"
                                  for mode in per_set for arm in SETTINGS),
                      file=sys.stderr, flush=True)

    report = build_report(args, argv, started, counts, per_set)
    names = {"ab": f"A/B, {args.rounds_per_side} runs per side",
             "baseline": "baseline mode (1 run each)", "median5": "median:5% (1 run each)"}
    print(f"{'gate':34} " + "  ".join(f"{SETTINGS[a]:>26}" for a in SETTINGS))
    for mode, arms in report["rates"].items():
        cells = []
        for arm in SETTINGS:
            r = arms[arm]
            cells.append(f"{r['failed']:>3}/{r['trials']:<3} {100 * r['rate']:5.1f}% "
                         f"[{100 * r['ci95'][0]:4.1f}-{100 * r['ci95'][1]:5.1f}]")
        print(f"{names[mode]:34} " + "  ".join(f"{c:>26}" for c in cells))
    print("failure rates; [95% Wilson interval]; 'A/A' column = false failures, others = "
          "detection. Baseline mode here has no drift correction.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
