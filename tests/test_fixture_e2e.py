"""End-to-end runs of the plugin with pytester and real MLX on the CPU."""

from __future__ import annotations

import json

import pytest
from conftest import FAST

from pytest_qmmperf.variants import variant_names

SUITE = """
import mlx.core as mx
import pytest

@pytest.mark.parametrize("variant", ["mlx", "dequant"])
@pytest.mark.parametrize("mode,bits,gs,dtype", [
    ("affine", 4, 64, "float32"), ("affine", 8, 32, "float16"), ("mxfp4", 4, 32, "bfloat16"),
])
def test_qmm(qmm_bench, variant, mode, bits, gs, dtype):
    qmm_bench.qmm(2, 64, 128, bits=bits, group_size=gs, mode=mode, dtype=dtype, variant=variant)

def test_callable(qmm_bench):
    a = mx.random.normal((64, 64))
    qmm_bench(lambda: a @ a, flops=2 * 64**3, bytes=3 * 64 * 64 * 4,
              check=lambda out: out.shape == (64, 64))
"""


def test_check_mode_runs_each_workload_once_without_timing(pytester):
    pytester.makepyfile(SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)
    assert "qmm_bench results" not in result.stdout.str()
    assert "benchmark: 7 tests" not in result.stdout.str()  # no pytest-benchmark table


def test_bench_mode_times_reports_and_feeds_pytest_benchmark(pytester):
    pytester.makepyfile(SUITE)
    out = pytester.path / "bench.json"
    result = pytester.runpytest(*FAST, f"--benchmark-json={out}")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines([
        "*qmm_bench results*",
        "hardware: *-cpu (MLX *)",
        "test *workload*time (us)*TFLOP/s*GB/s*roofline %*memory (GB)*rounds x launches*",
        "test_qmm?affine-4-64-float32-mlx?*mlx M=2 N=64 K=128 affine 4-bit g64 float32*",
        "test_callable*test_callable.<locals>.<lambda>*",
        "roofline peaks: measured this session*",
    ])
    data = json.loads(out.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert "test_callable" in names and len(names) == 7
    extra = next(b for b in data["benchmarks"] if b["name"] == "test_callable")["extra_info"]
    assert extra["qmm_time_s"] > 0 and extra["qmm_launches_per_round"] >= 1
    assert extra["qmm_tflops"] == pytest.approx(2 * 64**3 / extra["qmm_time_s"] / 1e12, rel=0.01)
    assert data["machine_info"]["qmmperf_hardware_key"].endswith("-cpu")


def test_the_fixture_exposes_the_result(pytester):
    pytester.makepyfile("""
        import os

        def test_it(qmm_bench):
            result = qmm_bench.qmm(3, 64, 64, dtype="float32")
            assert qmm_bench.enabled
            assert result is qmm_bench.result and result.kind == "qmm"
            assert result.params["M"] == 3 and result.params["variant"] == "mlx"
            assert len(result.samples["time_s"]) == result.info["rounds"] >= 3
            assert set(result.samples) >= {"time_s", "tflops", "gbps", "roofline_pct",
                                           "peak_memory_gb", "cold_start_s"}
            assert result.info["relative_error"] < 1e-5
            # launches run in order on the CPU backend: no per-launch dispatch,
            # and the timing method is part of what a baseline must match
            assert result.params["timing"] == "serial"
            assert result.info["dispatch_each"] is False
            assert result.info["launch_order"] == "in order"
            # CUDA graphs are only turned off where MLX runs on CUDA
            assert "MLX_USE_CUDA_GRAPHS" not in os.environ
    """)
    pytester.runpytest(*FAST).assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("qmm_bench.qmm(4, 64, 100)", "qmm_bench.qmm: K=100: must be a multiple of group_size=64*"),
        ("qmm_bench.qmm(0, 64, 64)", "qmm_bench.qmm: M=0: must be a positive integer"),
        ("qmm_bench.qmm(4, 64, 64, bits=7)", "qmm_bench.qmm: bits=7: mode 'affine' accepts*"),
        ("qmm_bench.qmm(4, 64, 64, mode='q4')", "qmm_bench.qmm: mode='q4': accepted modes are*"),
        ("qmm_bench.qmm(4, 64, 64, dtype='fp8')", "qmm_bench.qmm: dtype='fp8': accepted dtypes*"),
        ("qmm_bench.qmm(4, 64, 64, variant='nope')",
         "qmm_bench.qmm: unknown variant 'nope'; known variants: mlx, dequant, hybrid*"),
        ("qmm_bench(lambda: 3)",
         "qmm_bench(fn): *<lambda> returned int; expected an mlx.core.array*"),
        ("qmm_bench(42)", "qmm_bench(fn): fn=42 is not callable*"),
        ("qmm_bench(lambda: mx.zeros((2,)), flops=-1)",
         "qmm_bench(fn): flops=-1: expected a positive number or None"),
        ("qmm_bench(lambda: mx.zeros((2,)), check=lambda out: False)",
         "qmm_bench(fn): check(*<lambda>) returned False"),
    ],
)
@pytest.mark.parametrize("mode", ["check", "bench"])
def test_bad_input_fails_the_test_with_one_clean_line(pytester, call, message, mode):
    pytester.makepyfile(f"""
        import mlx.core as mx

        def test_bad(qmm_bench):
            {call}
    """)
    result = pytester.runpytest(*(FAST if mode == "bench" else ("-p", "no:cacheprovider")))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([message])
    text = result.stdout.str()
    assert "Traceback" not in text and "During handling" not in text


def test_a_wrong_kernel_fails_check_mode(pytester):
    pytester.makeconftest("""
        import mlx.core as mx

        def pytest_qmmperf_register_variants(register):
            def off_by_one_group(x, w, scales, biases, **kw):
                # shifts every scale by one group: the kind of bug check mode exists for
                return mx.quantized_matmul(x, w, mx.roll(scales, 1, axis=1), biases, **kw)
            register("broken", off_by_one_group, description="wrong on purpose")
    """)
    pytester.makepyfile("""
        def test_broken(qmm_bench):
            qmm_bench.qmm(4, 64, 256, dtype="float32", variant="broken")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*variant 'broken' is wrong for M=4 N=64 K=256*relative error*"
                                 "exceeds*float32 tolerance*"])
    # the hook's registration lasted one session only
    assert "broken" not in variant_names()


def test_user_variants_run_and_unavailable_ones_skip(pytester):
    pytester.makeconftest("""
        import mlx.core as mx
        from pytest_qmmperf import Variant

        def pytest_qmmperf_register_variants(register):
            register("mine", lambda x, w, s, b, **kw: mx.quantized_matmul(x, w, s, b, **kw))
            register(Variant("gpu-only", lambda *a, **k: None, available=lambda: "needs Metal"))
            register(Variant("affine-only", mx.quantized_matmul,
                             supports=lambda spec: None if spec.mode == "affine"
                             else "affine mode only"))
    """)
    pytester.makepyfile("""
        def test_mine(qmm_bench):
            qmm_bench.qmm(2, 64, 64, dtype="float32", variant="mine")

        def test_gpu_only(qmm_bench):
            qmm_bench.qmm(2, 64, 64, variant="gpu-only")

        def test_unsupported(qmm_bench):
            qmm_bench.qmm(2, 64, 64, mode="mxfp4", group_size=32, variant="affine-only")
    """)
    result = pytester.runpytest(*FAST, "-rs")
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines([
        "*variant 'affine-only' does not support M=2 N=64 K=64 mxfp4 4-bit g32*: affine mode only",
        "*variant 'gpu-only' cannot run here: needs Metal*",
    ])


def test_one_benchmark_per_test(pytester):
    pytester.makepyfile("""
        def test_twice(qmm_bench):
            qmm_bench.qmm(2, 64, 64, dtype="float32")
            qmm_bench.qmm(2, 64, 64, dtype="float32")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*qmm_bench already ran a qmm benchmark in this test; one "
                                 "benchmark per test*"])


def test_benchmark_disable_verifies_without_timing(pytester):
    pytester.makepyfile("""
        def test_it(qmm_bench):
            assert qmm_bench.qmm(2, 64, 64, dtype="float32") is None
    """)
    result = pytester.runpytest(*FAST, "--benchmark-disable")
    result.assert_outcomes(passed=1)
    assert "qmm_bench results" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qmm-precision=abc"], "*--qmm-precision='abc': expected a percentage such as 5%*"),
        (["--qmm-precision=-1%"], "*--qmm-precision='-1%': expected a percentage above 0%*"),
        (["--qmm-time-budget=soon"], "*--qmm-time-budget='soon': expected a float >= 0.01*"),
        (["--qmm-min-rounds=0"], "*--qmm-min-rounds='0': expected a int >= 1*"),
        (["-o", "qmm_precision=lots"], "*ini qmm_precision='lots': expected a percentage*"),
    ],
)
def test_bad_options_are_usage_errors_before_anything_runs(pytester, args, message):
    pytester.makepyfile("def test_never(qmm_bench):\n    raise AssertionError('ran')\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_ini_options_are_read(pytester):
    # A loose precision asks for a handful of rounds whatever the machine's speed
    # (a 10 ms budget alone allowed 67 on a fast, idle one), so the minimum wins.
    pytester.makeini("[pytest]\nqmm_min_rounds = 40\nqmm_time_budget = 0.01\n"
                     "qmm_precision = 50%\n")
    pytester.makepyfile("""
        def test_it(qmm_bench):
            result = qmm_bench.qmm(2, 64, 64, dtype="float32")
            assert result.info["precision_target"] == 0.5
            assert result.info["rounds"] == 40
    """)
    pytester.runpytest("--qmm-bench", "-p", "no:cacheprovider").assert_outcomes(passed=1)


@pytest.mark.parametrize("mode", ["check", "bench"])
def test_mlx_without_a_backend_names_the_extra_to_install(pytester, mode):
    # What a Linux `pip install mlx` without an extra looks like: the import fails.
    pytester.makeconftest("""
        import sys
        sys.modules["mlx"] = None
        sys.modules["mlx.core"] = None
    """)
    pytester.makepyfile("def test_it(qmm_bench):\n    qmm_bench.qmm(2, 64, 64)\n")
    args = FAST if mode == "bench" else ("-p", "no:cacheprovider")
    result = pytester.runpytest_subprocess(*args)
    if mode == "bench":  # refused before anything runs
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        text = result.stderr.str()
    else:  # check mode: the test fails, with the same line
        result.assert_outcomes(failed=1)
        text = result.stdout.str()
    assert ('MLX has no usable backend here (import of mlx.core halted; None in sys.modules); '
            'install one: pip install "pytest-qmmperf[cpu]" (CPU backend) or '
            '"pytest-qmmperf[cuda]" (NVIDIA CUDA backend)') in text
    assert "Traceback" not in text
