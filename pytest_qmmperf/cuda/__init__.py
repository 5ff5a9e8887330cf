"""CUDA mirror of the tiled QMM family, for ``mx.fast.cuda_kernel``.

``qmm_layer.cuh`` is the CUDA layer (``ldmatrix`` + ``mma.sync`` m16n8k16
fragments, warp shuffles, bit casts); the kernel bodies come from
:mod:`pytest_qmmperf.tiled.source`, the same text the Metal kernels are
rendered from.  :func:`translation_unit` rebuilds the source MLX hands to
NVRTC, so that CI can compile it with ``nvcc`` on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_qmmperf.tiled.source import KernelSource

#: MLX's ``dtype_to_cuda_type``.
CUDA_TYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "uint32": "uint32_t",
}
#: MLX's ``get_type_string``, used in the template part of kernel names.
TYPE_STRINGS = {"float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float"}

#: Stands in for MLX's default header (``mlx/backend/cuda/device/utils.cuh``
#: and ``<cooperative_groups.h>``), which ships inside MLX's CUDA library:
#: the kernels use only the fp16/bf16 types from it, and ``Shape``.
DEFAULT_HEADER = """\
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cstdint>
#include <cooperative_groups.h>

namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}  // namespace mlx::core::cu
"""


def build(src: KernelSource) -> Any:
    """The ``mx.fast.cuda_kernel`` object for ``src`` (compiled by NVRTC on first launch)."""
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name=src.name,
        input_names=list(src.input_names),
        output_names=list(src.output_names),
        source=src.body,
        header=src.header,
    )


def kernel_name(src: KernelSource, template: Sequence[tuple[str, str | int]]) -> str:
    """The ``__global__`` function name MLX gives the kernel."""
    name = f"custom_kernel_{src.name}"
    for _, value in template:
        name += "_" + (TYPE_STRINGS[value] if isinstance(value, str) else str(value))
    return name


def translation_unit(src: KernelSource, *, dtype: str = "float16",
                     template: Sequence[tuple[str, str | int]] | None = None,
                     default_header: bool | str = True) -> str:
    """The CUDA source MLX 0.32 compiles for ``src`` with activations of ``dtype``.

    This follows ``build_kernel`` in MLX's ``backend/cuda/custom_kernel.cpp``:
    default header, our header, then in ``namespace mlx::core::cu`` a
    ``__global__`` function taking each input (plus ``x_shape`` etc. as
    ``__grid_constant__`` when the body names them) and output, with the
    template arguments as ``using``/``constexpr`` lines ahead of the body.
    ``default_header`` may be a replacement for :data:`DEFAULT_HEADER`, or
    ``False`` for none.  A kernel whose header redefines ``__global__`` gets CUDA's
    back at the end, so that units can be joined.
    """
    if template is None:
        template = [("T", dtype)]
    input_dtypes = [dtype, "uint32", dtype, dtype]
    if default_header is True:
        default_header = DEFAULT_HEADER
    parts = [default_header or "", src.header,
             "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n"]
    args: list[str] = []
    for arg_name, arg_dtype in zip(src.input_names, input_dtypes, strict=True):
        args.append(f"    const {CUDA_TYPES[arg_dtype]}* {arg_name}")
        for suffix, decl in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
            if arg_name + suffix in src.body:
                args.append(f"    const __grid_constant__ {decl} {arg_name}{suffix}")
    for out_name in src.output_names:
        args.append(f"    {CUDA_TYPES[src.output_dtype or dtype]}* {out_name}")
    parts.append(f"__global__ void {kernel_name(src, template)}(\n" + ",\n".join(args) + ") {")
    for key, value in template:
        if isinstance(value, str):
            parts.append(f"  using {key} = {CUDA_TYPES[value]};")
        else:
            parts.append(f"  constexpr int {key} = {value};")
    parts.append(src.body)
    parts.append("}\n\n} // namespace mlx::core::cu\n")
    if "#define __global__" in src.header:
        # The kernel's attributes ride on __global__ (a cluster shape, launch bounds).
        # MLX compiles each kernel alone; a unit of several, as the checks build, gives
        # the next kernel CUDA's own.
        parts.append("#if !defined(QMMPERF_CUDA_CPU_EMULATION)\n#undef __global__\n"
                     "#define __global__ __location__(global)\n#endif\n")
    return "\n".join(parts)
