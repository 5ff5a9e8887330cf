"""Shared settings for the test suite."""

from __future__ import annotations

# pytester's in-process runs drop every module first imported during a run;
# MLX's compiled extension aborts the process when it is imported a second
# time.  Importing it here, before any run, keeps it loaded for good.
import mlx.core  # noqa: F401

#: Options that keep a pytester run of ``--qmm-bench`` to a fraction of a second
#: per benchmark on a 2-core CPU.
FAST = ("--qmm-bench", "--qmm-time-budget=0.05", "--qmm-min-rounds=3", "-p", "no:cacheprovider")
