from __future__ import annotations

import math
import statistics

import mlx.core as mx
import pytest

from pytest_qmmperf.timing import (
    Peaks,
    RoundTimer,
    TimingPolicy,
    cuda_graphs_enabled,
    derived_metrics,
    launch_order,
    outputs,
    overlaps_independent_launches,
    robust_cv,
    rounds_for_precision,
)


def test_robust_cv_by_hand():
    # median 10, absolute deviations 1,0,0,1,100 -> MAD 1 -> 1.4826 / 10
    assert robust_cv([9, 10, 10, 11, 110]) == pytest.approx(0.14826)
    assert robust_cv([5.0, 5.0, 5.0]) == 0.0


def test_rounds_for_precision_by_hand():
    # (1.959964 * 1.2533 * 0.02 / 0.005)^2 = 9.8258^2 = 96.5 -> 97
    assert rounds_for_precision(0.02, 0.005) == 97
    assert rounds_for_precision(0.0, 0.005) == 1


def test_derived_metrics_by_hand():
    peaks = Peaks(bandwidth_gbps=100.0, tflops=1.0, source="table")
    out = derived_metrics([0.001, 0.002], flops=1e9, nbytes=1e7, peaks=peaks)
    assert out["tflops"] == pytest.approx([1.0, 0.5])
    assert out["gbps"] == pytest.approx([10.0, 5.0])
    # bound = max(1e9 / 1e12, 1e7 / 1e11) = 1 ms -> 100% at 1 ms, 50% at 2 ms
    assert out["roofline_pct"] == pytest.approx([100.0, 50.0])
    assert derived_metrics([0.001], None, None, peaks) == {}


def test_outputs_flatten_and_reject_non_arrays():
    a, b = mx.zeros((1,)), mx.ones((2,))
    assert len(outputs({"x": a, "y": (b, [a])})) == 3
    with pytest.raises(TypeError, match="returned int; expected an mlx.core.array"):
        outputs(3)
    with pytest.raises(TypeError, match="returned no mlx.core.array"):
        outputs([])


def test_round_timer_plans_and_records_per_launch_samples():
    sets = [mx.random.normal((128, 128)) for _ in range(3)]
    mx.eval(sets)
    seen: list[int] = []

    def launch(i: int):
        seen.append(i)
        return [sets[i % 3] @ sets[(i + 1) % 3]]

    policy = TimingPolicy.for_backend("cpu", budget_s=0.05, min_rounds=4)
    timer = RoundTimer(launch, policy, overhead_s=0.0)
    timer.prepare()
    assert timer.launches >= 1 and timer.launches & (timer.launches - 1) == 0  # power of two
    assert timer.rounds >= 4 and math.isfinite(timer.cold_start_s)
    before = len(seen)
    samples = timer.run()
    assert len(samples) == timer.rounds == len(timer.round_times_s)
    # one unrecorded round refills the pipeline, then one round per sample
    assert len(seen) - before == (timer.rounds + 1) * timer.launches
    assert seen == list(range(len(seen)))  # every launch takes the next input set
    # a sample is a round divided by its launches
    assert samples[0] == pytest.approx(timer.round_times_s[0] / timer.launches)
    assert timer.info()["launches_per_round"] == timer.launches
    assert timer._pending is None  # drained: nothing left queued


def test_pipelined_samples_measure_the_work_not_the_host():
    # Two workloads, one doing 4x the matmuls of the other, timed alike: the
    # per-launch samples must scale with the work (a host-bound timer would not).
    a = [mx.random.normal((192, 192)) for _ in range(2)]
    mx.eval(a)

    def work(n):
        def launch(i):
            out = a[i % 2]
            for _ in range(n):
                out = out @ a[(i + 1) % 2] * 0.01
            return [out]
        return launch

    policy = TimingPolicy.for_backend("cpu", budget_s=0.05, min_rounds=5)
    medians = []
    for n in (1, 4):
        timer = RoundTimer(work(n), policy)
        timer.prepare()
        medians.append(statistics.median(timer.run()))
    assert 2.5 < medians[1] / medians[0] < 6


def test_overhead_is_subtracted_but_never_more_than_half_a_round():
    timer = RoundTimer(lambda i: [mx.zeros((1,))], TimingPolicy(), overhead_s=0.001)
    assert timer._per_launch(0.011, 10) == pytest.approx(0.001)
    assert timer._per_launch(0.0012, 1) == pytest.approx(0.0006)


def test_policy_overrides_ignore_none():
    p = TimingPolicy.for_backend("cpu", precision=None, budget_s=1.5)
    assert p.budget_s == 1.5 and p.precision == TimingPolicy.for_backend("cpu").precision


def test_host_fraction_tells_host_bound_from_device_bound():
    import time

    x = mx.ones((8,))
    big = [mx.random.normal((256, 256)) for _ in range(2)]
    mx.eval(x, *big)

    def host_heavy(i):
        time.sleep(0.001)  # building the launch costs far more than running it
        return [x + i]

    def device_heavy(i):
        return [big[i % 2] @ big[(i + 1) % 2] @ big[i % 2]]

    policy = TimingPolicy.for_backend("cpu", budget_s=0.05, min_rounds=5)
    fractions = {}
    for name, launch in (("host", host_heavy), ("device", device_heavy)):
        timer = RoundTimer(launch, policy)
        timer.prepare()
        timer.run()
        fractions[name] = timer.host_fraction()
        assert timer.info()["host_bound"] == (fractions[name] > 0.8)
    assert fractions["host"] > 0.8 > fractions["device"]


@pytest.mark.parametrize(("value", "enabled"), [
    (None, True), ("1", True), ("0", False), (" 0", False), ("2", True), ("yes", True),
])
def test_cuda_graphs_follow_mlx_parsing_of_the_variable(monkeypatch, value, enabled):
    # MLX parses MLX_USE_CUDA_GRAPHS as an integer; graphs stay on unless it is 0.
    if value is None:
        monkeypatch.delenv("MLX_USE_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", value)
    assert cuda_graphs_enabled() is enabled


def test_only_backends_that_overlap_launches_dispatch_each(monkeypatch):
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "1")
    assert overlaps_independent_launches("cuda") and overlaps_independent_launches("metal")
    assert not overlaps_independent_launches("cpu")
    assert TimingPolicy.for_backend("cuda").dispatch_each
    assert TimingPolicy.for_backend("metal").dispatch_each
    assert not TimingPolicy.for_backend("cpu").dispatch_each
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")
    policy = TimingPolicy.for_backend("cuda")
    assert not policy.dispatch_each
    assert launch_order(policy, "cuda") == "one stream, no CUDA graphs"
    assert launch_order(TimingPolicy.for_backend("metal"), "metal") == "one dispatch per launch"


def test_dispatch_each_queues_every_launch_on_its_own(monkeypatch):
    sets = [mx.random.normal((64, 64)) for _ in range(2)]
    mx.eval(sets)
    calls: list[int] = []
    real = mx.async_eval

    def counting_async_eval(*arrays):
        calls.append(len(arrays[0]) if len(arrays) == 1 and isinstance(arrays[0], list)
                     else len(arrays))
        return real(*arrays)

    monkeypatch.setattr(mx, "async_eval", counting_async_eval)
    policy = TimingPolicy.for_backend("cpu", budget_s=0.02, min_rounds=3, dispatch_each=True)
    timer = RoundTimer(lambda i: [sets[i % 2] @ sets[(i + 1) % 2]], policy)
    timer.launches = 4
    timer.resume()
    calls.clear()
    timer.step()
    # four single-launch dispatches, then the round as a whole (already queued)
    assert calls == [1, 1, 1, 1, 4]
    timer.drain()
    assert timer.info()["dispatch_each"] is True
