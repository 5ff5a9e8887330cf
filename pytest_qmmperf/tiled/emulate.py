"""Run generated kernels on the CPU through C++ emulations of Metal and CUDA.

Neither Metal nor a GPU is needed: the exact translation unit MLX would
compile (:func:`pytest_qmmperf.metal.translation_unit`,
:func:`pytest_qmmperf.cuda.translation_unit`) is compiled by ``g++`` against
``metal/cpu_emulation.h`` or ``cuda/cpu_emulation.h``, which implement the
few Metal/CUDA facilities the kernels use (threadgroup barriers, SIMD-group
sums and shuffles, 8x8 simdgroup matrices, ``ldmatrix`` and ``mma.sync``
with their hardware lane layouts) over one ``std::thread`` per GPU thread.
The launch geometry is :func:`pytest_qmmperf.tiled.source.geometry`'s.

Slow (a block's threads meet at every barrier) but exact about the tile
arithmetic: the tests run small awkward shapes through every preset.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_qmmperf.tiled.config import KernelConfig, output_planes
from pytest_qmmperf.tiled.source import (
    PACKAGE,
    KernelSource,
    generate,
    geometry,
    output_shape,
    template_args,
)

if TYPE_CHECKING:
    import mlx.core as mx

_METAL_ATTRIBUTE_VALUES = {
    "simdgroup_index_in_threadgroup": "uint(t / 32)",
    "thread_index_in_simdgroup": "uint(t % 32)",
    "thread_index_in_threadgroup": "uint(t)",
    "threadgroup_position_in_grid": "uint3{uint(bx), uint(by), 0u}",
}


_MAIN = r"""
static std::string slurp(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    std::perror(path.c_str());
    std::exit(2);
  }
  std::string data;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.append(buf, n);
  std::fclose(f);
  return data;
}

// usage: which M N K blocks_x blocks_y threads dir (dir holds x/w/scales/biases.bin)
int main(int argc, char** argv) {
  if (argc != 9) return 2;
  const int which = std::atoi(argv[1]), M = std::atoi(argv[2]), N = std::atoi(argv[3]),
            K = std::atoi(argv[4]), gx = std::atoi(argv[5]), gy = std::atoi(argv[6]),
            threads = std::atoi(argv[7]);
  const std::string dir = argv[8];
  const std::string x = slurp(dir + "/x.bin"), w = slurp(dir + "/w.bin"),
                    s = slurp(dir + "/scales.bin"), b = slurp(dir + "/biases.bin");
  std::string out;  // sized by each case: T, or float partial sums of a tile split over K
  switch (which) {
@CASES@
  default:
    return 2;
  }
  std::FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
  std::fwrite(out.data(), 1, out.size(), f);
  std::fclose(f);
  return 0;
}
"""


@dataclass(frozen=True)
class EmulatedKernel:
    """One kernel instance: configuration, quantization, dtype and (decode) tokens per block."""

    config: KernelConfig
    bits: int
    group_size: int
    dtype: str
    tokens: int = 8  # M the template arguments are chosen for (decode MR, skinny TILES)

    def template(self) -> list[tuple[str, str | int]]:
        return [("T", self.dtype), *template_args(self.config, self.tokens)]

    def source(self, language: str) -> KernelSource:
        return generate(self.config, bits=self.bits, group_size=self.group_size,
                        language=language)


def compiler_reason() -> str | None:
    """``None`` when ``g++`` is here, else why the emulation cannot run."""
    if shutil.which("g++") is None:
        return "g++ is not installed (the CPU emulation compiles the kernels with it)"
    return None


def _call_args(src: KernelSource, ctype: str, out_ctype: str) -> list[str]:
    args = []
    for name, cast in (("x", f"(const {ctype}*)x.data()"), ("w", "(const uint32_t*)w.data()"),
                       ("scales", f"(const {ctype}*)s.data()"),
                       ("biases", f"(const {ctype}*)b.data()")):
        args.append(cast)
        if name + "_shape" in src.body:
            args.append(f"{name}_shape")
        if name + "_ndim" in src.body:
            args.append(f"{name}_ndim")
    args.append(f"({out_ctype}*)out.data()")
    return args


def translation_unit(kernels: Sequence[EmulatedKernel], language: str) -> str:
    """The emulation program: the kernels as MLX wraps them, and a main that runs one."""
    from pytest_qmmperf import cuda, metal
    from pytest_qmmperf.metal.check import as_cxx

    parts = ['#include "cpu_emulation.h"', "#include <cstdio>", "#include <cstdlib>",
             "#include <string>"]
    cases = []
    for i, k in enumerate(kernels):
        src = k.source(language)
        template = k.template()
        if language == "metal":
            parts.append(as_cxx(metal.translation_unit(src, dtype=k.dtype, template=template)))
            ctype = metal.TYPE_STRINGS[k.dtype]
            name = metal.kernel_name(src, template, [k.dtype, "uint32", k.dtype, k.dtype],
                                     [src.output_dtype or k.dtype])
            out_ctype = metal.TYPE_STRINGS[src.output_dtype or k.dtype]
            targs = ", ".join(metal.TYPE_STRINGS[v] if isinstance(v, str) else str(v)
                              for _, v in template)
            attrs = [_METAL_ATTRIBUTE_VALUES[a] for a, _ in metal.attributes(src)]
            args = [a.replace("_shape", "_shape.data()") if a.endswith("_shape") else a
                    for a in _call_args(src, ctype, out_ctype)] + attrs
            call = (f"qmm_emu::launch(gx, gy, threads, [&](int t, int bx, int by) {{\n"
                    f"      {name}<{targs}>({', '.join(args)});\n    }});")
            shape_type = "std::array<int, 10>"
        else:
            parts.append(cuda.translation_unit(src, dtype=k.dtype, template=template,
                                               default_header=False))
            ctype = cuda.CUDA_TYPES[k.dtype]
            out_ctype = cuda.CUDA_TYPES[src.output_dtype or k.dtype]
            name = "mlx::core::cu::" + cuda.kernel_name(src, template)
            call = (f"qmm_emu::launch_cuda(gx, gy, threads, [&] {{\n"
                    f"      {name}({', '.join(_call_args(src, ctype, out_ctype))});\n    }});")
            shape_type = "mlx::core::cu::Shape"
        # out's shape as C++: output_shape() with the run's M, N, K left symbolic
        symbols: Any = ("M", "N", "K")
        count = " * ".join(f"size_t({d})" for d in output_shape(k.config, *symbols))
        cases.append(
            f"  case {i}: {{\n"
            f"    out.assign({count} * {_element_size(k)}, '\\0');\n"
            f"    {shape_type} x_shape{{}}, w_shape{{}};\n"
            # x as a decode step passes it, (1, M, K): the kernels take its leading dims as rows
            f"    int x_ndim = 3;\n"
            f"    x_shape[0] = 1; x_shape[1] = M; x_shape[2] = K;\n"
            f"    w_shape[0] = N; w_shape[1] = K * {k.bits} / 32;\n"
            f"    {call}\n    break;\n  }}"
        )
    parts.append(_MAIN.replace("@CASES@", "\n".join(cases)))
    return "\n".join(parts)


def _element_size(kernel: EmulatedKernel) -> int:
    """Bytes of one element of ``out``: float32 planes of a kernel split over K, else T."""
    return 4 if output_planes(kernel.config) > 1 else 2


def build(kernels: Sequence[EmulatedKernel], language: str, workdir: Path, *,
          sm90a: bool = False) -> Path:
    """Compile the emulation program for ``kernels``; returns the executable.

    ``sm90a`` (CUDA) compiles the layer's Hopper forms, as NVRTC does for an
    H100: the wide kernel's wgmma path, against the emulation's wgmma.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"emulate_{language}" + ("_sm90a" if sm90a else "")
    source = workdir / f"{stem}.cpp"
    source.write_text(translation_unit(kernels, language))
    exe = workdir / stem
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-w", f"-I{PACKAGE / language}",
           f"-I{PACKAGE / 'cuda'}", str(source), "-o", str(exe)]
    if sm90a:
        cmd.insert(1, "-D__CUDA_ARCH_FEAT_SM90_ALL=1")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"emulation build failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return exe


def _bits(a: mx.array) -> bytes:
    import mlx.core as mx
    import numpy as np

    if a.dtype == mx.uint32:
        return np.asarray(a).tobytes()
    return np.asarray(a.view(mx.uint16)).tobytes()


def run(exe: Path, index: int, kernel: EmulatedKernel, x: mx.array, w: mx.array,
        scales: mx.array, biases: mx.array) -> mx.array:
    """Run kernel ``index`` of ``exe`` on these operands; returns ``out`` as an MLX array
    (``(M, N)``; the dequant kernel's: the dense ``(N, K)`` weight)."""
    import mlx.core as mx
    import numpy as np

    M, K = (int(d) for d in x.shape)
    N = int(w.shape[0])
    grid, threadgroup = geometry(kernel.config, M, N)
    threads = threadgroup[0]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for fname, arr in (("x", x), ("w", w), ("scales", scales), ("biases", biases)):
            (d / f"{fname}.bin").write_bytes(_bits(arr))
        cmd = [str(exe), str(index), str(M), str(N), str(K), str(grid[0] // threads),
               str(grid[1]), str(threads), tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"emulated kernel failed ({' '.join(cmd)}): {proc.stderr[-2000:]}")
        data = (d / "out.bin").read_bytes()
    shape = output_shape(kernel.config, M, N, K)
    if output_planes(kernel.config) > 1:
        # What the variant does: add the float32 partial sums, then round to T.
        partial = np.frombuffer(data, dtype=np.float32).reshape(shape)
        return mx.array(partial.sum(axis=0)).astype(getattr(mx, kernel.dtype))
    raw = np.frombuffer(data, dtype=np.uint16).reshape(shape)
    if kernel.dtype == "float16":
        values: Any = raw.view(np.float16).astype(np.float32)
    else:
        values = (raw.astype(np.uint32) << 16).view(np.float32)
    return mx.array(values).astype(getattr(mx, kernel.dtype))
