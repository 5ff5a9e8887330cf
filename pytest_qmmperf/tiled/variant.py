"""The ``tiled`` variants: configuration -> callable with ``mx.quantized_matmul``'s signature."""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

from pytest_qmmperf.tiled.config import (
    DTYPES,
    FAMILY,
    DecodeConfig,
    DequantConfig,
    KernelConfig,
    SkinnyConfig,
    TileConfig,
    TileError,
    WideConfig,
    output_planes,
    spec_reason,
)
from pytest_qmmperf.tiled.source import (
    KernelSource,
    generate,
    geometry,
    output_shape,
    template_args,
)

if TYPE_CHECKING:
    import mlx.core as mx

    from pytest_qmmperf.workloads.qmm import QmmSpec

_lock = threading.Lock()
#: (language, config, bits, group_size) -> (source, MLX kernel object). One
#: entry per compiled kernel; MLX compiles each (kernel, template) once more
#: on first launch and caches it under the source's unique name.
_kernels: dict[tuple[str, KernelConfig, int, int], tuple[KernelSource, Any]] = {}


def backend() -> str | None:
    """``"metal"`` or ``"cuda"`` when MLX has that GPU backend here, else ``None``."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def available() -> str | None:
    """``None`` when a tiled kernel can run on this machine, else why not."""
    if backend() is None:
        import mlx.core as mx

        return (
            "needs Metal or CUDA backend (this MLX build has neither; default device "
            f"{mx.default_device()})"
        )
    return None


def kernel(config: KernelConfig, *, bits: int, group_size: int, language: str
           ) -> tuple[KernelSource, Any]:
    """The source and MLX kernel object for ``config``, built once per process."""
    key = (language, config, bits, group_size)
    with _lock:
        found = _kernels.get(key)
        if found is None:
            src = generate(config, bits=bits, group_size=group_size, language=language)
            if language == "metal":
                from pytest_qmmperf import metal as lang
            else:
                from pytest_qmmperf import cuda as lang  # type: ignore[no-redef]
            found = _kernels[key] = (src, lang.build(src))
    return found


def built_kernels() -> list[str]:
    """Names of the kernels built so far in this process."""
    with _lock:
        return [src.name for src, _ in _kernels.values()]


class TiledQmm:
    """A tiled QMM variant: ``x @ dequantize(w).T`` through the generated kernels.

    For a tile or wide configuration, M = 1 goes to the decode kernel (as
    MLX sends small M to its matrix-vector kernel), 2 <= M <=
    ``decode_max_m`` to the skinny kernel, larger M to the tile or wide
    kernel, and for a wide configuration with ``gemm_min_m`` M from there on
    to the dequant kernel followed by MLX's dense matmul (as the ``hybrid``
    variant does with ``mx.dequantize``); with ``mlx_max_m``, M up to it to
    MLX's own ``mx.quantized_matmul``.
    """

    def __init__(self, config: KernelConfig, decode: DecodeConfig | None = None,
                 skinny: SkinnyConfig | None = None) -> None:
        self.config = config
        self.decode = decode or DecodeConfig()
        self.skinny = skinny or SkinnyConfig()
        self._plans: dict[tuple[Any, ...], tuple[Any, dict[str, Any], bool, Any]] = {}
        #: M up to this goes straight to mx.quantized_matmul (``:qN``), before any planning.
        self._mlx_max_m = config.mlx_max_m if isinstance(config, WideConfig) else 0
        if self._mlx_max_m:
            import mlx.core as mx

            self._quantized_matmul = mx.quantized_matmul

    def __repr__(self) -> str:
        return f"TiledQmm({self.config.name})"

    def kernel_for(self, M: int) -> KernelConfig | None:
        """The configuration that runs M rows; ``None``: MLX's ``quantized_matmul`` does."""
        if M <= self._mlx_max_m:
            return None
        if not isinstance(self.config, (TileConfig, WideConfig)):
            return self.config
        if isinstance(self.config, WideConfig) and 0 < self.config.gemm_min_m <= M:
            return DequantConfig()
        if M > self.config.decode_max_m:
            return self.config
        return self.decode if M == 1 else self.skinny

    def supports(self, spec: QmmSpec) -> str | None:
        reason = spec_reason(
            self.config, M=spec.M, N=spec.N, K=spec.K, bits=spec.bits,
            group_size=spec.group_size, mode=spec.mode, transpose=spec.transpose,
            dtype=spec.dtype,
        )
        config = self.config
        if (reason is None and isinstance(config, (SkinnyConfig, WideConfig))
                and config.clusters > 1 and backend() == "metal"):
            reason = (f"clusters={config.clusters}: K split over a thread-block cluster, "
                      "which Metal does not have (CUDA, sm_90 and later)")
        return reason

    def __call__(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *,
                 transpose: bool = True, group_size: int = 64, bits: int = 4,
                 mode: str = "affine") -> mx.array:
        if self._mlx_max_m and x.size <= self._mlx_max_m * x.shape[-1]:
            # :qN: MLX's own kernel, as cheaply as the `mlx` variant calls it (a
            # decode step is host-bound); MLX validates these inputs itself.
            return self._quantized_matmul(x, w, scales, biases, transpose=transpose,
                                          group_size=group_size, bits=bits, mode=mode)
        # Hot path: one dict lookup per call. Everything derived from the
        # shapes (validation, kernel, launch geometry) is planned once per
        # distinct problem; the wrapper otherwise costs more than MLX's own
        # per-launch overhead.
        key = (x.shape, x.dtype, w.shape, w.dtype, scales.shape, biases is None, bits,
               group_size, mode, transpose)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(x, w, scales, biases, transpose=transpose,
                                                 group_size=group_size, bits=bits, mode=mode)
        # x goes to the kernel in its own shape: the kernels read it as (M, K)
        # rows (MLX makes it row-contiguous) and the output is declared in x's
        # leading shape, so a decode step's (1, 1, K) costs no reshape ops.
        kern, launch, partial, matmul = plan
        out = kern(inputs=[x, w, scales, biases], **launch)[0]
        if matmul is not None:
            # The dequant kernel wrote the dense (N, K) weight; MLX's matmul does the rest.
            return matmul(x, out.T)
        if partial:
            # A kernel split over K: add its float32 planes, then round once to x's dtype.
            return out.sum(axis=0).astype(x.dtype)
        return out

    def _plan(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *,
              transpose: bool, group_size: int, bits: int, mode: str
              ) -> tuple[Any, dict[str, Any], bool, Any]:
        import mlx.core as mx

        name = self.config.name
        if x.ndim < 1 or w.ndim != 2:
            raise TileError(f"{name}: x must be (..., K) and w (N, K*bits/32), got "
                            f"{tuple(x.shape)} and {tuple(w.shape)}")
        K = int(x.shape[-1])
        M = math.prod(int(d) for d in x.shape[:-1])
        N = int(w.shape[0])
        dtype = str(x.dtype).removeprefix("mlx.core.")
        reason = spec_reason(self.config, M=M, N=N, K=K, bits=bits, group_size=group_size,
                             mode=mode, transpose=transpose, dtype=dtype)
        if reason is None and biases is None:
            reason = "biases=None: affine quantization needs biases"
        if reason is None and (w.dtype != mx.uint32 or int(w.shape[1]) * 32 != K * bits):
            reason = (f"w is {w.dtype} {tuple(w.shape)}: expected uint32 ({N}, {K * bits // 32}) "
                      f"for K={K} at bits={bits}, as mx.quantize packs it")
        if reason is None and tuple(scales.shape) != (N, K // group_size):
            reason = (f"scales are {tuple(scales.shape)}: expected ({N}, {K // group_size}) "
                      f"for group_size={group_size}")
        if reason is None and tuple(biases.shape) != tuple(scales.shape):  # type: ignore[union-attr]
            reason = f"biases are {tuple(biases.shape)}: expected {tuple(scales.shape)}"  # type: ignore[union-attr]
        if reason is not None:
            raise TileError(f"{name}: {reason}")
        language = backend()
        if language is None:
            raise RuntimeError(f"{name}: {available()}")
        config = self.kernel_for(M)
        assert config is not None, "M <= mlx_max_m is routed in __call__, before planning"
        src, kern = kernel(config, bits=bits, group_size=group_size, language=language)
        grid, threadgroup = geometry(config, M, N)
        template: list[tuple[str, Any]] = [("T", x.dtype), *template_args(config, M)]
        partial = output_planes(config) > 1
        matmul = mx.matmul if isinstance(config, DequantConfig) else None
        out_dtype = getattr(mx, src.output_dtype) if src.output_dtype else x.dtype
        shape = output_shape(config, M, N, K)
        if matmul is None:
            shape = (*shape[:-2], *x.shape[:-1], N)  # (M, N) in x's leading shape
        launch = {"template": template, "grid": grid, "threadgroup": threadgroup,
                  "output_shapes": [shape], "output_dtypes": [out_dtype]}
        return kern, launch, partial, matmul


def describe(config: KernelConfig) -> str:
    """One line for ``qmmperf variants``."""
    if isinstance(config, SkinnyConfig):
        return (f"{FAMILY} skinny kernel: {config.rows_per_block} weight rows x up to 16 "
                f"tokens a block on the "
                f"matrix units, {config.warps} warps splitting K; affine bits 4/8, "
                f"{'/'.join(DTYPES)} (Metal, CUDA)")
    if isinstance(config, DecodeConfig):
        vectors = f"{config.vectors} 16-byte vector" + ("s" if config.vectors != 1 else "")
        split = (f" ({config.splits} warps splitting each row's K)" if config.splits > 1
                 else "")
        return (f"{FAMILY} decode kernel: {config.rows} weight rows per warp, {vectors} per "
                f"row and lane a step, {config.warps} warps a block{split}; "
                f"affine bits 4/8, {'/'.join(DTYPES)} (Metal, CUDA)")
    if isinstance(config, DequantConfig):
        return (f"{FAMILY} dequant kernel (packed weight to dense, in the activations' dtype), "
                f"then MLX's dense matmul; affine bits 4/8, {'/'.join(DTYPES)} (Metal, CUDA)")
    split = f", K split over {config.splits} blocks" if config.splits > 1 else ""
    if isinstance(config, WideConfig):
        gemm = (f", dequant kernel + dense matmul from M = {config.gemm_min_m}"
                if config.gemm_min_m else "")
        if config.mlx_max_m:
            gemm += f", mx.quantized_matmul up to M = {config.mlx_max_m}"
        return (f"{FAMILY} wide kernel: {config.rows_per_block} weight rows x {config.tokens} "
                f"tokens a block, weights dequantized in registers, x staged in threadgroup "
                f"memory{split}, decode/skinny kernels for M <= {config.decode_max_m}{gemm}; "
                f"affine bits 4/8, {'/'.join(DTYPES)} (Metal, CUDA)")
    return (f"{FAMILY} transposed QMM: {config.bm}x{config.bn}x{config.bk} tile, "
            f"{config.wm}x{config.wn} SIMD groups{split}, decode/skinny kernels for M <= "
            f"{config.decode_max_m}; "
            "affine bits 4/8 (Metal, CUDA)")
