"""The ``tiled`` kernel family: tunable tiled transposed QMM for Metal and its CUDA mirror.

Variants are named by their parameters (see :mod:`pytest_qmmperf.tiled.config`),
e.g. ``tiled:160x32:wm4wn1``; :data:`~pytest_qmmperf.tiled.config.PRESETS`
are the rows of the 32x32 -> 160x32 retile ablation.  Importing this module
needs neither MLX nor a GPU: a kernel is generated when a variant is first
resolved and compiled by MLX when it first runs.
"""

from __future__ import annotations

from pytest_qmmperf.tiled.config import (
    FAMILY,
    PRESETS,
    DecodeConfig,
    DequantConfig,
    KernelConfig,
    SkinnyConfig,
    TileConfig,
    TileError,
    WideConfig,
    parse_name,
)
from pytest_qmmperf.tiled.source import KernelSource, generate, geometry, template_args
from pytest_qmmperf.tiled.variant import TiledQmm, available, backend, built_kernels, describe

__all__ = [
    "FAMILY", "PRESETS", "DecodeConfig", "DequantConfig", "KernelConfig", "KernelSource",
    "SkinnyConfig", "TileConfig", "TileError", "TiledQmm", "WideConfig", "available", "backend",
    "built_kernels", "generate", "geometry", "make_variant", "parse_name", "register",
    "template_args",
]


def make_variant(config: KernelConfig):  # -> Variant (imported lazily: variants imports us)
    """The registry entry for ``config``, under its canonical name."""
    from pytest_qmmperf.variants import Variant

    fn = TiledQmm(config)
    return Variant(
        name=config.name, fn=fn, description=describe(config), supports=fn.supports,
        available=available, params=config.params(),
    )


def _parse(name: str):
    from pytest_qmmperf.variants import VariantError

    try:
        config = parse_name(name)
    except TileError as exc:
        raise VariantError(str(exc)) from None
    return make_variant(config)


def register() -> None:
    """Register the family with the variant registry (idempotent)."""
    from pytest_qmmperf.variants import VariantFamily, register_family

    register_family(
        VariantFamily(
            prefix=FAMILY, parse=_parse, presets=PRESETS,
            description="tiled transposed QMM for Metal (mx.fast.metal_kernel) and CUDA "
                        "(mx.fast.cuda_kernel): " + ", ".join(PRESETS),
        ),
        replace=True,
    )
