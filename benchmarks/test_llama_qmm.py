"""This repository's own gate suite: Llama-3.2-3B projection shapes, both built-in variants.

Run with ``pytest --qmm-bench benchmarks`` (timed and gated) or plain
``pytest benchmarks`` (each kernel checked once against the float32 reference).

On MLX's CPU backend (CI machines) the suite scales itself down: float16 QMM
is emulated there and about 40x slower than float32, so shapes shrink 8x,
M shrinks, and activations are float32; the whole suite then runs in about a
minute on 2 cores.  Test ids stay the same on every machine; baselines are
per hardware key, so the CPU and GPU shapes never meet.
"""

from __future__ import annotations

import pytest

from pytest_qmmperf.hardware import BackendError, backend_name, import_mlx

#: (name, N, K) of Llama-3.2-3B's quantized projections (hidden 3072, MLP 8192).
SHAPES = [
    ("qo", 3072, 3072),
    ("kv", 1024, 3072),
    ("gate_up", 8192, 3072),
    ("down", 3072, 8192),
]
M_VALUES = [1, 16, 128, 512, 2048]
#: M on the CPU backend, by the M it stands in for.
CPU_M = {1: 1, 16: 4, 128: 16, 512: 64, 2048: 128}
CPU_SHRINK = 8


def _on_cpu() -> bool:
    try:
        return backend_name(import_mlx()) == "cpu"
    except BackendError:
        return False  # the test itself reports the missing backend


ON_CPU = _on_cpu()


@pytest.mark.parametrize("variant", ["mlx", "dequant"])
@pytest.mark.parametrize("M", M_VALUES, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_llama_3b_projection(qmm_bench, shape, M, variant):
    _, N, K = shape
    if ON_CPU:
        qmm_bench.qmm(CPU_M[M], N // CPU_SHRINK, K // CPU_SHRINK, bits=4, group_size=64,
                      dtype="float32", variant=variant)
    else:
        qmm_bench.qmm(M, N, K, bits=4, group_size=64, dtype="float16", variant=variant)
