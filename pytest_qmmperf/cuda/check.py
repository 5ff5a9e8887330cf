"""Compile generated CUDA with ``nvcc`` on a machine without a GPU.

The translation unit is the one MLX hands NVRTC
(:func:`pytest_qmmperf.cuda.translation_unit`), so a kernel that compiles
here compiles on the GPU; ``ptxas -v`` reports each kernel's registers,
spills and shared memory, which the tests hold to zero spills.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: sm_90a: the H100 MLX targets there (NVRTC ``--gpu-architecture=sm_90a``); sm_80: the
#: oldest GPU with bf16 mma.sync.
ARCHS = ("sm_90a", "sm_80")

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_SPILL = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                    r"(?P<loads>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


@dataclass
class KernelResources:
    mangled: str
    arch: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0


@dataclass
class CompileResult:
    returncode: int
    log: str
    kernels: list[KernelResources]

    def kernel(self, name: str, arch: str = ARCHS[0]) -> KernelResources:
        """The resources of the kernel whose mangled name contains ``name``."""
        found = [k for k in self.kernels if name in k.mangled and k.arch == arch]
        if len(found) != 1:
            raise KeyError(f"{len(found)} kernels named like {name!r} for {arch}")
        return found[0]


def nvcc() -> str | None:
    """Path of ``nvcc``, or ``None``."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def parse_ptxas(log: str) -> list[KernelResources]:
    """Per-kernel resources from ``ptxas -v`` output."""
    kernels: list[KernelResources] = []
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            kernels.append(KernelResources(mangled=m["name"], arch=m["arch"]))
            continue
        if not kernels:
            continue
        m = _SPILL.search(line)
        if m:
            kernels[-1].spill_stores = int(m["stores"])
            kernels[-1].spill_loads = int(m["loads"])
            continue
        m = _USED.search(line)
        if m:
            kernels[-1].registers = int(m["regs"])
            kernels[-1].shared_bytes = int(m["smem"] or 0)
    return kernels


def compile_check(sources: Iterable[str], workdir: Path, archs: Iterable[str] = ARCHS[:1],
                  ) -> CompileResult:
    """Compile one translation unit made of ``sources`` to an object file."""
    exe = nvcc()
    if exe is None:
        raise FileNotFoundError("nvcc is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    cu = workdir / "qmmperf_kernels.cu"
    cu.write_text("\n".join(sources))
    cmd = [exe, "-std=c++17", "-c", "-Xptxas", "-v", str(cu), "-o", str(workdir / "k.o")]
    for arch in archs:
        num = arch.removeprefix("sm_")
        cmd.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    return CompileResult(returncode=proc.returncode, log=log, kernels=parse_ptxas(log))
