"""How many rotated weight sets does a kernel-alone timing need before L2 stops helping?

    python benchmarks/gpu_rotation.py

Times a few kernels of the family alone (CuPy, a replayed CUDA graph, as
``gpu_tiles.py`` does) with 4, 8, 16, 32 and 64 distinct weight sets in
rotation, every set taking its turn, and prints each time against the
4-set one.  Once the sets' footprint is several times the L2 (50 MB on the
H100), the time stops moving: that is the kernel reading its weights from
DRAM, as it does in a model, where each layer's weights are read once per
step.  Fewer sets leave part of the weights in L2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_kernels as gk  # noqa: E402  (the shared timing and CuPy helpers)

CASES = (
    *(("tiled:decode", shape, 1) for shape in ("qo", "kv", "gate_up", "down")),
    ("tiled:skinny:w16r2", "down", 16), ("tiled:skinny:w8r2", "gate_up", 16),
    ("tiled:skinny:w16r2", "qo", 16), ("tiled:skinny:w16", "kv", 16),
    ("tiled:wide:w8r2m64:k2", "gate_up", 128), ("tiled:wide:w4r2m32:k4", "down", 128),
)
SETS = (4, 8, 16, 32, 64)


def main() -> int:
    import cupy as cp

    from pytest_qmmperf.workloads.qmm import QmmSpec

    for name, shape, M in CASES:
        N, K = gk.SHAPES[shape]
        per_set = QmmSpec(M=M, N=N, K=K).weight_bytes
        launch = gk.cupy_kernel(name, M, N, K)
        line = f"{name:24s} {shape:8s} M={M:4d} {per_set / 1e6:5.1f} MB a set"
        first = None
        for n in SETS:
            sets = gk.cupy_operands(M, N, K, n)
            t = gk.kernel_time(launch, sets, rounds=5) * 1e6
            first = first or t
            line += f" | {n} ({n * per_set / 1e6:.0f} MB) {t:.2f} us {t / first:.2f}"
            del sets
            cp.get_default_memory_pool().free_all_blocks()
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
