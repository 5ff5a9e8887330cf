"""pytest-qmmperf: benchmark and gate quantized-matmul kernels and LLM prefill with MLX."""

from __future__ import annotations

__version__ = "0.1.0"

from pytest_qmmperf.variants import Variant, get_variant, register_variant, variant_names

__all__ = ["Variant", "__version__", "get_variant", "register_variant", "variant_names"]
