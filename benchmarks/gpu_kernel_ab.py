"""Named kernels alone on a CUDA GPU, one source tree against another, rounds alternating.

    python benchmarks/gpu_kernel_ab.py --trees /tmp/old . --rounds 4 \
        --cases down:16:tiled:skinny:w16r3h gate_up:128:tiled:wide:w8r2m64:k2

Each case is ``SHAPE:M:VARIANT`` (a Llama-3.2-3B projection of
``gpu_kernels.SHAPES``, the tokens, a ``tiled:`` kernel name).  For every
round, every tree in turn runs all cases in a process of its own, importing
the plugin and ``benchmarks/`` helpers from that tree, so two commits are
compared in one call under the same conditions (make the old tree with
``git archive OLD | tar -x -C /tmp/old``; trees from 79c6bea on, whose CuPy
kernels build for ``sm_90a`` as MLX does).  A case is timed as
``gpu_tiles.py`` times it: compiled through CuPy from the source MLX
compiles, checked against a float32 reference, the median of three replays
of a CUDA graph of launches over weight sets rotated past L2
(:func:`gpu_kernels.event_time`), the planes of a kernel split over K added
by one more kernel, timed with it (``tiled:dequant``, which calls cuBLAS,
launched one by one instead of from a graph).

``--parts`` also times a split kernel's launch without that addition, and
the addition alone; ``--k 256 512 ...`` replaces the projection's K (the
fixed cost of a launch against the cost of a 128-k super-step).  Prints one
``AB`` line a case and round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

SHAPES = ("qo", "kv", "gate_up", "down")


def parse_case(text: str) -> tuple[str, int, str]:
    """``"down:16:tiled:skinny:w16r3h"`` -> ``("down", 16, "tiled:skinny:w16r3h")``."""
    shape, _, rest = text.partition(":")
    m, _, name = rest.partition(":")
    if shape not in SHAPES or not m.isdigit() or int(m) < 1 or not name.startswith("tiled:"):
        raise ValueError(
            f"case {text!r}: expected SHAPE:M:VARIANT with SHAPE one of {', '.join(SHAPES)}, "
            "M a positive integer and VARIANT a tiled: kernel name"
        )
    return shape, int(m), name


def run_tree(tag: str, cases: list[tuple[str, int, str]], ks: list[int], parts: bool) -> None:
    """Time every case in this process, with the plugin and helpers of the tree it runs in."""
    tree = Path.cwd()
    sys.path[:0] = [str(tree), str(tree / "benchmarks")]  # before this script's own directory
    import cupy as cp
    import gpu_decode as gd
    import gpu_kernels as gk

    # Only what every comparable tree's helpers have (from 79c6bea on): problem, reference,
    # cupy_kernel and event_time; not the later gpu_decode.max_error / gpu_kernels.kernel_time,
    # which the old tree of an A/B may lack.
    for shape, M, name in cases:
        N, K0 = gk.SHAPES[shape]
        for K in ks or [K0]:
            spec, sets, ref, scale = gd.problem(M, N, K)
            x, w, s, b, out = sets[0]
            launch = gk.cupy_kernel(name, M, N, K)
            out.fill(0)
            launch(x, w, s, b, out)
            err = float(cp.abs(out.astype(cp.float32) - ref).max()) / scale
            del ref
            graph = getattr(launch, "graph", True)  # tiled:dequant calls cuBLAS: no graph
            t = statistics.median(gk.event_time(launch, sets, graph=graph) for _ in range(3))
            line = (f"AB {tag:8s} {shape:8s} M={M:5d} K={K:5d} {name:28s} {t * 1e6:8.2f} us "
                    f"{t / gk.floor_s(spec):5.2f}x floor  err {err:.1e}")
            kernel, add = getattr(launch, "kernel", None), getattr(launch, "add", None)
            if parts and kernel is not None and add is not None:
                tk = statistics.median(gk.event_time(kernel, sets) for _ in range(3))
                ta = statistics.median(gk.event_time(add, sets) for _ in range(3))
                line += f"  kernel {tk * 1e6:.2f} us, addition {ta * 1e6:.2f} us"
            print(line, flush=True)
            del sets
            cp.get_default_memory_pool().free_all_blocks()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", required=True, help="SHAPE:M:VARIANT ...")
    parser.add_argument("--trees", nargs="+", default=["."], help="source trees to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, nargs="*", default=[],
                        help="K values instead of the shape's")
    parser.add_argument("--parts", action="store_true",
                        help="also time a split kernel without its addition, and the addition")
    parser.add_argument("--tag", help=argparse.SUPPRESS)  # set for the per-tree child process
    args = parser.parse_args(argv)
    try:
        cases = [parse_case(c) for c in args.cases]
    except ValueError as exc:
        parser.error(str(exc))
    if args.tag is not None:
        run_tree(args.tag, cases, args.k, args.parts)
        return 0
    trees = [Path(t).resolve() for t in args.trees]
    for tree in trees:
        if not (tree / "pytest_qmmperf").is_dir() or not (tree / "benchmarks").is_dir():
            parser.error(f"--trees: {tree} is not a source tree "
                         "(no pytest_qmmperf/ and benchmarks/)")
    for _ in range(args.rounds):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(tree), str(tree / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
            cmd: list[Any] = [sys.executable, __file__, "--tag", tree.name or str(tree),
                              "--cases", *args.cases, "--rounds", "1"]
            if args.k:
                cmd += ["--k", *map(str, args.k)]
            if args.parts:
                cmd.append("--parts")
            subprocess.run(cmd, cwd=tree, env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
