"""Gate accuracy on this machine: false failures on unchanged code, detection of real slowdowns.

    python benchmarks/gate_accuracy.py [--blocks 221] [--budget 0.3] [--load | --no-load]
                                       [--threshold 0.05] [--seed 0] [--json PATH]

What it measures, with real MLX work (CPU backend here):

* the workload is one benchmark launch of ``REPEAT`` 4-bit affine float32
  ``mx.quantized_matmul`` calls (M=8, N=K=256, distinct activations), timed
  by the plugin's own :class:`~pytest_qmmperf.timing.RoundTimer` under the
  plugin's CPU timing policy (its rounds, warm-up and precision target; the
  per-benchmark time budget is ``--budget``);
* four *arms*: ``base`` and ``aa`` (REPEAT = 20), ``slow5`` (21 QMMs: 5% more
  work) and ``slow10`` (22: 10% more).  A *session* of an arm builds fresh
  inputs, times the plugin's reference workload right before and right
  after the benchmark (as ``qmm_bench`` does), and keeps both;
* a *block* runs one session of each arm in a random order.  Each block's
  ``aa``, ``slow5`` and ``slow10`` sessions are compared against the ``base``
  session of a uniformly random *earlier* block, as a pull request is
  compared against a baseline recorded minutes or days before;
* the baseline side is stored exactly as a baseline file stores it
  (:func:`pytest_qmmperf.baselines.compact_samples`, the recording
  session's reference samples and the reference median around the entry);
* per comparison, on the same samples:
  - **qmmperf**: :func:`pytest_qmmperf.gate.judge` at the default 5%
    threshold (``--threshold``) with the machine-drift handling the plugin
    applies: correction from the reference around the benchmark, and timing
    not enforced when the reference before and after it differ by more than
    10% (:func:`pytest_qmmperf.gate.unsteady`);
  - **qmmperf, drift corrected from 5%**: the same, but a reference change
    under 5% is not corrected (GPUs use such a floor, at 10%:
    :func:`pytest_qmmperf.gate.drift_floor`);
  - **qmmperf, no drift correction**: the same gate without either;
  - **median:5%**: pytest-benchmark's ``--benchmark-compare-fail=median:5%``
    rule, through its own ``parse_compare_fail`` (fail when the median grew
    by more than 5%).

With ``--load`` (the default) a background process alternates between busy
(MLX matmuls on both cores) and idle for random 2-12 s spells, as other jobs
on a shared CI runner do; this machine's other users add their own load.
Comparisons that share a baseline session are not fully independent; the
Wilson 95% intervals treat them as independent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from pytest_benchmark.utils import parse_compare_fail

from pytest_qmmperf import baselines, gate, stats, timing
from pytest_qmmperf.session import ReferenceWorkload

ARMS = {"base": 20, "aa": 20, "slow5": 21, "slow10": 22}
SETTINGS = {"aa": "A/A (no change)", "slow5": "5% more work", "slow10": "10% more work"}
RULES = {"ours": "qmmperf gate", "ours_first": "qmmperf, first measurement only",
         "ours_floor5": "qmmperf, drift corrected from 5%",
         "ours_nodrift": "qmmperf, no drift correction", "median5": "pytest-benchmark median:5%"}
SHAPE = (8, 256, 256)

LOAD = """
import random, sys, time
import mlx.core as mx
rng = random.Random(int(sys.argv[1]))
a = mx.random.normal((384, 384)); mx.eval(a)
log = open(sys.argv[2], "w")
while True:
    busy = rng.uniform(2, 12)
    log.write(f"{time.time():.3f} busy {busy:.2f}\\n"); log.flush()
    end = time.time() + busy
    while time.time() < end:
        mx.eval(a @ a)
    idle = rng.uniform(2, 12)
    log.write(f"{time.time():.3f} idle {idle:.2f}\\n"); log.flush()
    time.sleep(idle)
"""


@dataclass
class Session:
    """One arm's benchmark samples and the reference samples around them."""

    arm: str
    samples: list[float]
    reference: list[float]
    rounds: int
    launches: int
    split: int = 0  # reference[:split] ran before the benchmark, the rest after
    #: The second look, when the gate asked for one: only the new rounds, and the
    #: reference bursts around them.
    second: Session | None = None

    def pooled(self) -> Session:
        """Both measurements' samples and reference bursts, as the plugin judges them."""
        if self.second is None:
            return self
        return Session(self.arm, self.samples + self.second.samples,
                       self.reference + self.second.reference,
                       self.rounds + self.second.rounds, self.launches, self.split)


def workload(repeat: int, seed: int) -> timing.Launch:
    """``repeat`` QMMs per launch on fresh inputs (one weight, four activation sets each)."""
    m, n, k = SHAPE
    key = mx.random.key(seed)
    kw, *kx = mx.random.split(key, 1 + 4 * repeat)
    wq, scales, biases = mx.quantize(mx.random.normal((n, k), key=kw), group_size=64, bits=4)
    xs = [mx.random.normal((m, k), key=kk) for kk in kx]
    mx.eval(wq, scales, biases, *xs)

    def launch(i: int) -> list[Any]:
        base = (i % 4) * repeat
        return [mx.quantized_matmul(xs[base + j], wq, scales, biases, transpose=True,
                                    group_size=64, bits=4) for j in range(repeat)]

    return launch


def run_session(arm: str, seed: int, budget_s: float,
                base: Session | None = None, threshold: float = 0.05) -> Session:
    """A session as the plugin runs one benchmark: reference, benchmark, reference.

    With ``base``, the gate judges it against ``base`` at once and, when it
    asks for a second look, the same timer runs its rounds again between two
    more reference bursts (as :meth:`pytest_qmmperf.session.QmmSession.record`).
    """
    overhead = timing.eval_overhead_s("cpu")
    ref = ReferenceWorkload("cpu")
    before = ref.burst(overhead)
    policy = timing.TimingPolicy.for_backend("cpu", budget_s=budget_s)
    timer = timing.RoundTimer(workload(ARMS[arm], seed), policy, overhead)
    timer.prepare()
    timer.run()
    after = ref.burst(overhead)
    session = Session(arm, list(timer.samples_s), before + after, len(timer.samples_s),
                      timer.launches, len(before))
    if base is not None and gate.wants_second_look([verdict(base, session, True, threshold)]):
        first = len(session.samples)
        before2 = ref.burst(overhead)
        timer.run()
        after2 = ref.burst(overhead)
        session.second = Session(arm, list(timer.samples_s[first:]), before2 + after2,
                                 len(timer.samples_s) - first, timer.launches, len(before2))
    return session


def verdict(base: Session, cur: Session, drift_correction: bool, threshold: float,
            min_drift: float | None = None, steady: list[Session] | None = None
            ) -> gate.Verdict:
    """The plugin's verdict on one measurement ``cur`` against ``base`` stored as a baseline.

    As :meth:`pytest_qmmperf.session.QmmSession.record` does: drift from the
    reference around each benchmark, and no enforcement when the machine's
    speed changed while the current benchmark ran (in any of the ``steady``
    measurements, by default ``cur`` itself).
    """
    stored = baselines.compact_samples(base.samples)
    drift, why = None, None
    if drift_correction:
        drift = gate.local_drift(baselines.compact_samples(base.reference),
                                 gate.reference_speed(base.reference), cur.reference,
                                 min_change=gate.drift_floor("cpu") if min_drift is None
                                 else min_drift)
        why = next(filter(None, (unsteady_reason(m) for m in steady or [cur])), None)
    [v] = gate.judge("bench", {"time_s": cur.samples}, {"time_s": stored}, drift=drift,
                     thresholds=gate.Thresholds({}, {}, {}, threshold),
                     enforce_timing=why is None, timing_note=why or "")
    return v


def judge(base: Session, cur: Session, drift_correction: bool, threshold: float,
          min_drift: float | None = None, second_look: bool = False) -> bool:
    """Whether the gate fails ``cur``: on its first measurement, or as shipped (second look)."""
    if second_look and cur.second is not None:
        return verdict(base, cur.pooled(), drift_correction, threshold, min_drift,
                       steady=[cur, cur.second]).failed
    return verdict(base, cur, drift_correction, threshold, min_drift).failed


def unsteady_reason(cur: Session) -> str | None:
    return gate.unsteady(cur.reference[:cur.split], cur.reference[cur.split:])


def unenforced(cur: Session) -> bool:
    """Whether the gate declined to enforce timing (machine speed changed mid-benchmark)."""
    return unsteady_reason(cur) is not None


def median5(base: Session, cur: Session) -> bool:
    """pytest-benchmark's ``--benchmark-compare-fail=median:5%`` on the same samples."""
    check = parse_compare_fail("median:5%")
    return bool(check.fails({"median": statistics.median(cur.samples)},
                            {"median": statistics.median(base.samples)}))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_fraction(log: Path, start: float, end: float) -> float | None:
    """Share of [start, end] the load generator was busy, from its log."""
    try:
        rows = [line.split() for line in log.read_text().splitlines()]
    except OSError:
        return None
    events = [(float(t), state) for t, state, _ in rows] + [(end, "end")]
    busy = 0.0
    for (t0, state), (t1, _) in zip(events, events[1:], strict=False):
        lo, hi = max(t0, start), min(t1, end)
        if state == "busy" and hi > lo:
            busy += hi - lo
    return busy / (end - start)


def sessions_of(blocks: list[dict[str, Session]]) -> list[Session]:
    return [s for blk in blocks for s in blk.values()]


def pct(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of already sorted values."""
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=221,
                    help="blocks of four sessions (comparisons per setting: blocks - 1)")
    ap.add_argument("--budget", type=float, default=0.3,
                    help="time budget of one benchmark's timed rounds, seconds")
    ap.add_argument("--load", action=argparse.BooleanOptionalAction, default=True,
                    help="run a background load generator that switches on and off")
    ap.add_argument("--threshold", type=float, default=0.05,
                    help="the gate's threshold as a fraction (default 0.05, the plugin's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write every comparison and the rates as JSON")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)

    load_log = Path(f"/tmp/gate_accuracy_load_{args.seed}.log")
    load = None
    if args.load:
        load = subprocess.Popen([sys.executable, "-c", LOAD, str(args.seed), str(load_log)])
    start = time.time()
    blocks: list[dict[str, Session]] = []
    rows: list[dict[str, Any]] = []
    try:
        for b in range(args.blocks):
            order = list(ARMS)
            rng.shuffle(order)
            j = rng.randrange(len(blocks)) if blocks else None
            base = blocks[j]["base"] if j is not None else None
            block = {arm: run_session(arm, rng.randrange(1 << 30), args.budget,
                                      base if arm in SETTINGS else None, args.threshold)
                     for arm in order}
            if base is not None:
                for arm in SETTINGS:
                    cur = block[arm]
                    rows.append({
                        "block": b, "baseline_block": j, "arm": arm,
                        "ratio": statistics.median(cur.samples) / statistics.median(base.samples),
                        "reference_ratio": statistics.median(cur.reference)
                        / statistics.median(base.reference),
                        "rounds": (base.rounds, cur.rounds),
                        "ours": judge(base, cur, True, args.threshold, second_look=True),
                        "ours_first": judge(base, cur, True, args.threshold),
                        "second_look": cur.second is not None,
                        "ours_floor5": judge(base, cur, True, args.threshold, 0.05),
                        "ours_nodrift": judge(base, cur, False, args.threshold),
                        "not_enforced": unenforced(cur),
                        "median5": median5(base, cur),
                    })
            blocks.append(block)
            if b % 20 == 0:
                print(f"block {b}/{args.blocks}: {time.time() - start:.0f} s", file=sys.stderr)
    finally:
        if load is not None:
            load.terminate()
            load.wait()
    end = time.time()

    rates: dict[str, dict[str, Any]] = {}
    lines = []
    for arm, label in SETTINGS.items():
        arm_rows = [r for r in rows if r["arm"] == arm]
        for rule, rule_label in RULES.items():
            k = sum(r[rule] for r in arm_rows)
            lo, hi = stats.wilson_interval(k, len(arm_rows))
            rates[f"{arm}/{rule}"] = {"failed": k, "n": len(arm_rows), "rate": k / len(arm_rows),
                                      "ci95": [lo, hi]}
            lines.append(f"{label:<16} {rule_label:<30} {k:>4}/{len(arm_rows):<4} "
                         f"{100 * k / len(arm_rows):6.1f}%   {100 * lo:5.1f}%..{100 * hi:5.1f}%")
    aa = sorted(r["ratio"] for r in rows if r["arm"] == "aa")
    refs = sorted(r["reference_ratio"] for r in rows)
    launch_ms = statistics.median(s for x in sessions_of(blocks) for s in x.samples) * 1e3
    busy = busy_fraction(load_log, start, end) if load is not None else None
    sessions = sessions_of(blocks)

    print(f"machine: {cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores; "
          f"MLX {mx.__version__} ({'cpu' if mx.default_device() == mx.cpu else 'gpu'}); "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"workload: {ARMS['base']} x QMM M={SHAPE[0]} N={SHAPE[1]} K={SHAPE[2]} 4-bit g64 "
          f"float32 per launch, median {launch_ms:.2f} ms; "
          f"rounds per session median {statistics.median(s.rounds for s in sessions):g}")
    load_text = f"on, busy {100 * busy:.0f}% of the run" if busy is not None else "off"
    skipped = sum(r["not_enforced"] for r in rows)
    looks = sum(r["second_look"] for r in rows)
    print(f"load generator: {load_text}; {len(blocks)} blocks, {len(rows) // 3} comparisons "
          f"per setting, {end - start:.0f} s")
    print(f"A/A ratio of medians, 5th..95th percentile: {pct(aa, 5):.3f}..{pct(aa, 95):.3f}; "
          f"reference ratio: {pct(refs, 5):.3f}..{pct(refs, 95):.3f}")
    print(f"qmmperf gate at threshold {100 * args.threshold:g}%; timing not enforced in "
          f"{skipped}/{len(rows)} comparisons (machine speed changed mid-benchmark); "
          f"second look taken in {looks}/{len(rows)}")
    print()
    print(f"{'setting':<16} {'rule':<30} {'failed':>9}  {'rate':>6}   95% CI (Wilson)")
    for line in lines:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({
            "rates": rates, "comparisons": rows,
            "sessions": [{a: dataclasses.asdict(s) for a, s in blk.items()} for blk in blocks],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
