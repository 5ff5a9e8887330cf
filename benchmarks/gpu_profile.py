"""Launch one generated kernel alone, for a profiler to look at.

    ncu --kernel-name regex:qmmperf --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
        python benchmarks/gpu_profile.py tiled:128x64x64:wm4wn2 2048 8192 3072

Compiles ``NAME`` for an (M, K) x (N, K) problem (4-bit, group 64, fp16)
through CuPy from the source MLX compiles (:func:`gpu_kernels.cupy_kernel`)
and launches it ``--launches`` times, one after another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_kernels as gk  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("M", type=int)
    parser.add_argument("N", type=int)
    parser.add_argument("K", type=int)
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args(argv)

    import cupy as cp

    launch = gk.cupy_kernel(args.name, args.M, args.N, args.K)
    operands = gk.cupy_operands(args.M, args.N, args.K, 1)[0]
    for _ in range(args.launches):
        launch(*operands)
    cp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
