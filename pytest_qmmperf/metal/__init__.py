"""Metal kernels of the tiled QMM family, for ``mx.fast.metal_kernel``.

``qmm_layer.h`` is the Metal layer (fragment multiply, SIMD sum, bit casts);
the kernel bodies come from :mod:`pytest_qmmperf.tiled.source`.
:func:`translation_unit` rebuilds the exact source MLX compiles (signature,
template instantiation), which the CI syntax check parses without a Mac.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_qmmperf.tiled.source import KernelSource

#: MLX's ``get_type_string`` for the dtypes these kernels see.
TYPE_STRINGS = {
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "float32": "float",
    "uint32": "uint32_t",
}

#: Attributes MLX adds to a kernel's signature when the body names them.
_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


def attributes(src: KernelSource) -> list[tuple[str, str]]:
    """The thread-position attributes MLX adds to ``src``'s signature, in order, with types."""
    return [(attr, attr_type) for attr, attr_type in _ATTRIBUTES if attr in src.body]


def build(src: KernelSource) -> Any:
    """The ``mx.fast.metal_kernel`` object for ``src`` (compiled by MLX on first launch)."""
    import mlx.core as mx

    return mx.fast.metal_kernel(
        name=src.name,
        input_names=list(src.input_names),
        output_names=list(src.output_names),
        source=src.body,
        header=src.header,
    )


def kernel_name(src: KernelSource, template: Sequence[tuple[str, str | int]],
                input_dtypes: Sequence[str], output_dtypes: Sequence[str]) -> str:
    """The host name MLX gives the compiled kernel: our name, template arguments, dtypes."""
    name = f"custom_kernel_{src.name}"
    if template:
        parts = [TYPE_STRINGS[v] if isinstance(v, str) else str(v) for _, v in template]
        name += "_" + "_" + "_".join(parts)
    for dtype in input_dtypes:
        name += "_" + TYPE_STRINGS[dtype]
    for dtype in output_dtypes:
        name += "_" + TYPE_STRINGS[dtype]
    return name


def translation_unit(src: KernelSource, *, dtype: str = "float16",
                     template: Sequence[tuple[str, str | int]] | None = None) -> str:
    """The Metal source MLX 0.32 compiles for ``src`` with activations of ``dtype``.

    This follows ``write_signature`` in MLX's ``backend/common/metal_kernel.cpp``:
    the header, ``template <...>`` over the template arguments, a
    ``[[kernel]]`` signature with one buffer per input (plus ``x_shape`` etc.
    when the body names them) and output, an attribute per thread-position
    name the body uses, the body, and an explicit instantiation under the
    host name.  MLX's own prelude (``<metal_stdlib>``, ``bfloat16_t``) is not
    included.  All inputs are taken to be large enough for ``device``.
    """
    if template is None:
        template = [("T", dtype)]
    input_dtypes = [dtype, "uint32", dtype, dtype]
    out_dtype = src.output_dtype or dtype
    name = kernel_name(src, template, input_dtypes, [out_dtype])
    lines: list[str] = [src.header]
    if template:
        params = ", ".join(
            ("typename " if isinstance(v, str) else "int ") + k for k, v in template
        )
        lines.append(f"template <{params}>")
    lines.append(f"[[kernel]] void {name}(")
    args: list[str] = []
    index = 0
    for arg_name, arg_dtype in zip(src.input_names, input_dtypes, strict=True):
        args.append(f"  const device {TYPE_STRINGS[arg_dtype]}* {arg_name} [[buffer({index})]]")
        index += 1
        for suffix, decl in (("_shape", "const constant int*"),
                             ("_strides", "const constant int64_t*"),
                             ("_ndim", "const constant int&")):
            if arg_name + suffix in src.body:
                args.append(f"  {decl} {arg_name}{suffix} [[buffer({index})]]")
                index += 1
    for out_name in src.output_names:
        args.append(f"  device {TYPE_STRINGS[out_dtype]}* {out_name} [[buffer({index})]]")
        index += 1
    for attr, attr_type in attributes(src):
        args.append(f"  {attr_type} {attr} [[{attr}]]")
    lines.append(",\n".join(args) + ") {")
    lines.append(src.body)
    lines.append("}")
    if template:
        targs = ", ".join(TYPE_STRINGS[v] if isinstance(v, str) else str(v) for _, v in template)
        inst = f"{name}<{targs}>"
        lines.append(
            f'template [[host_name("{name}")]] [[kernel]] decltype({inst}) {inst};'
        )
    return "\n".join(lines) + "\n"
