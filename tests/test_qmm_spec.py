from __future__ import annotations

import math

import mlx.core as mx
import pytest

from pytest_qmmperf.workloads.qmm import (
    QmmSpec,
    QmmSpecError,
    check_output,
    make_inputs,
    reference,
    relative_error,
    tolerance,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"M": 0}, "M=0: must be a positive integer"),
        ({"N": -4}, "N=-4: must be a positive integer"),
        ({"K": 2.5}, "K=2.5: must be a positive integer"),
        ({"M": True}, "M=True: must be a positive integer"),
        ({"K": 100}, "K=100: must be a multiple of group_size=64"),
        ({"bits": 7}, "bits=7: mode 'affine' accepts bits in (1, 2, 3, 4, 5, 6, 8)"),
        ({"group_size": 16}, "group_size=16: mode 'affine' accepts group_size in (32, 64, 128)"),
        ({"mode": "int4"}, "mode='int4': accepted modes are affine, mxfp4, mxfp8, nvfp4"),
        ({"mode": "mxfp4", "group_size": 64}, "group_size=64: mode 'mxfp4' accepts"),
        ({"mode": "nvfp4", "bits": 8, "group_size": 16},
         "bits=8: mode 'nvfp4' accepts bits in (4,)"),
        ({"dtype": "int8"}, "dtype='int8': accepted dtypes are float16, bfloat16, float32"),
        ({"mode": "mxfp8", "bits": 8, "group_size": 32, "dtype": "float32"},
         "microscaling modes take float16 or bfloat16"),
        ({"transpose": False, "N": 96}, "N=96: must be a multiple of group_size=64"),
    ],
)
def test_bad_specs_name_the_parameter_and_what_is_accepted(kwargs, message):
    base = {"M": 4, "N": 128, "K": 256}
    with pytest.raises(QmmSpecError, match=None) as info:
        QmmSpec(**{**base, **kwargs})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cost_model_by_hand():
    spec = QmmSpec(M=2, N=64, K=64, bits=4, group_size=32, dtype="float16")
    assert spec.flops == 2 * 2 * 64 * 64 == 16384
    # 64*64 4-bit weights = 2048 bytes; 64*64/32 = 128 groups x (fp16 scale + bias) = 512.
    assert spec.weight_bytes == 2048 + 512
    # activations 2*64*2 = 256, outputs 2*64*2 = 256
    assert spec.bytes == 256 + 2560 + 256
    mx_spec = QmmSpec(M=1, N=64, K=64, bits=4, group_size=32, mode="mxfp4")
    assert mx_spec.weight_bytes == 2048 + 128  # one 8-bit scale per group, no bias


def test_tolerance_grows_with_k_and_has_a_floor():
    assert tolerance("float16", 256) == pytest.approx(8 * 2**-10)  # the floor
    assert tolerance("float16", 8192) == pytest.approx(0.25 * 2**-10 * math.sqrt(8192))
    assert tolerance("float32", 64) == pytest.approx(8 * 2**-23)
    assert tolerance("bfloat16", 1024) > tolerance("float16", 1024)


def test_inputs_are_seeded_packed_like_mlx_and_never_zero():
    spec = QmmSpec(M=3, N=64, K=128, bits=4, group_size=64, dtype="bfloat16")
    a, b, c = make_inputs(spec, 0), make_inputs(spec, 0), make_inputs(spec, 1)
    assert a.w.dtype == mx.uint32 and a.w.shape == (64, 128 * 4 // 32)
    assert a.scales.dtype == mx.bfloat16 and a.scales.shape == (64, 2)
    assert mx.array_equal(a.x, b.x) and mx.array_equal(a.w, b.w)
    assert not mx.array_equal(a.x, c.x)
    assert mx.abs(a.x).max().item() > 0 and mx.abs(a.w).max().item() > 0


def test_reference_is_exact_for_float32():
    spec = QmmSpec(M=2, N=32, K=64, bits=8, group_size=32, dtype="float32")
    inputs = make_inputs(spec)
    wd = mx.dequantize(inputs.w, inputs.scales, inputs.biases, group_size=32, bits=8)
    assert relative_error(reference(spec, inputs), inputs.x @ wd.T) < 1e-6


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize(
    ("mode", "bits", "group_size", "dtype"),
    [("affine", 4, 64, "float16"), ("affine", 3, 32, "bfloat16"), ("affine", 8, 128, "float32"),
     ("mxfp4", 4, 32, "float16"), ("mxfp8", 8, 32, "bfloat16"), ("nvfp4", 4, 16, "float16")],
)
def test_mlx_kernel_passes_the_check(mode, bits, group_size, dtype, transpose):
    spec = QmmSpec(M=5, N=128, K=256, bits=bits, group_size=group_size, mode=mode,
                   transpose=transpose, dtype=dtype)
    i = make_inputs(spec)
    out = mx.quantized_matmul(i.x, i.w, i.scales, i.biases, transpose=transpose,
                              group_size=group_size, bits=bits, mode=mode)
    assert check_output(spec, i, out, "mlx") <= tolerance(dtype, 256)


def test_check_catches_wrong_kernels():
    spec = QmmSpec(M=4, N=64, K=128, dtype="float16")
    i = make_inputs(spec)
    good = mx.quantized_matmul(i.x, i.w, i.scales, i.biases, group_size=64, bits=4)
    with pytest.raises(AssertionError, match="relative error 1 exceeds"):
        check_output(spec, i, mx.zeros_like(good), "zeros")
    with pytest.raises(AssertionError, match="relative error .* exceeds"):
        check_output(spec, i, good * 1.05, "scaled")  # a 5% error, e.g. a dropped group
    with pytest.raises(AssertionError, match=r"returned shape \(64, 4\), expected \(4, 64\)"):
        check_output(spec, i, good.T, "transposed")
    with pytest.raises(AssertionError, match="returned ndarray, expected an mlx.core.array"):
        import numpy as np

        check_output(spec, i, np.zeros((4, 64)), "numpy")
