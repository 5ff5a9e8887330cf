"""This machine's fingerprint and the stable key that names its baselines.

The key keeps only what decides speed: chip or GPU name, GPU core count or
architecture, memory, MLX backend (``apple-m3-max-40c-64gb-metal``,
``nvidia-h100-80gb-hbm3-cuda``, ``intel-xeon-processor-2c-24gb-cpu``).  OS,
MLX and Python versions go in the fingerprint only: an MLX upgrade that slows
a kernel must be compared against, not hidden under a new key.

Reading the fingerprint imports MLX but runs no GPU work; ``fingerprint_key``
and ``slug`` are pure.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys
from typing import Any

#: Substrings of device names that identify virtual GPUs, whose timings are
#: too erratic to gate (hosted macOS runners expose "Apple Paravirtual device").
VIRTUAL_MARKERS = ("paravirtual", "virtual device", "vmware", "virtualbox", "llvmpipe")


class BackendError(RuntimeError):
    """MLX is missing or has no usable backend on this platform."""


def slug(text: str) -> str:
    """Lower-case ``text`` and join its alphanumeric runs with single dashes."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower().replace("(r)", "").replace("(tm)", "")))


def _gb(nbytes: int | float | None) -> int | None:
    if not nbytes:
        return None
    return int(round(float(nbytes) / 2**30))


def fingerprint_key(fp: dict[str, Any]) -> str:
    """The hardware key of a fingerprint (see module docstring)."""
    backend = fp.get("backend", "cpu")
    name = str(fp.get("device_name") or fp.get("cpu_name") or "unknown")
    parts = [slug(name)]
    if backend == "metal":
        if fp.get("gpu_cores"):
            parts.append(f"{fp['gpu_cores']}c")
        elif fp.get("architecture"):
            parts.append(slug(str(fp["architecture"])))
        if fp.get("memory_gb"):
            parts.append(f"{fp['memory_gb']}gb")
    elif backend == "cuda":
        # NVIDIA names usually carry memory and type ("H100 80GB HBM3");
        # add the memory only when they do not.
        if fp.get("memory_gb") and not re.search(r"\d+\s*gb", name.lower()):
            parts.append(f"{fp['memory_gb']}gb")
    else:
        if fp.get("cpu_cores"):
            parts.append(f"{fp['cpu_cores']}c")
        if fp.get("memory_gb"):
            parts.append(f"{fp['memory_gb']}gb")
    parts.append(backend)
    return "-".join(p for p in parts if p)


def is_virtual(fp: dict[str, Any]) -> bool:
    """Whether the fingerprint names a virtual GPU (timings not trustworthy)."""
    name = str(fp.get("device_name", "")).lower()
    return any(marker in name for marker in VIRTUAL_MARKERS)


def import_mlx() -> Any:
    """Import ``mlx.core`` or raise :class:`BackendError` saying which extra to install."""
    try:
        import mlx.core as mx
    except (ImportError, OSError) as exc:
        if sys.platform == "darwin":
            hint = 'pip install "pytest-qmmperf" (MLX with Metal, Apple silicon only)'
        else:
            hint = ('pip install "pytest-qmmperf[cpu]" (CPU backend) or '
                    '"pytest-qmmperf[cuda]" (NVIDIA CUDA backend)')
        raise BackendError(f"MLX has no usable backend here ({exc}); install one: {hint}") from exc
    return mx


def backend_name(mx: Any) -> str:
    """``metal``, ``cuda`` or ``cpu``: the backend MLX's default device runs on."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def _cpu_name() -> str:
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        out = _run(["sysctl", "-n", "hw.memsize"])
        return int(out) if out and out.isdigit() else None


def _apple_gpu_cores() -> int | None:
    out = _run(["ioreg", "-rc", "AGXAccelerator", "-d", "1"])
    m = re.search(r'"gpu-core-count"\s*=\s*(\d+)', out or "")
    return int(m.group(1)) if m else None


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False
                              ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def fingerprint() -> dict[str, Any]:
    """Everything known about this machine and its MLX backend (cached per process)."""
    mx = import_mlx()
    backend = backend_name(mx)
    info = dict(mx.device_info()) if backend != "cpu" else {}
    # Cores this process may run on (a container's share), not the host's.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    fp: dict[str, Any] = {
        "backend": backend,
        "cpu_name": _cpu_name(),
        "cpu_cores": cores,
        "memory_gb": _gb(_total_memory()),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mlx_version": getattr(mx, "__version__", "unknown"),
    }
    if backend == "metal":
        fp["device_name"] = info.get("device_name", "Apple GPU")
        fp["architecture"] = info.get("architecture")
        fp["gpu_cores"] = _apple_gpu_cores()
        fp["memory_gb"] = _gb(info.get("memory_size")) or fp["memory_gb"]
    elif backend == "cuda":
        fp["device_name"] = info.get("device_name", "NVIDIA GPU")
        fp["architecture"] = info.get("architecture")
        fp["memory_gb"] = _gb(info.get("total_memory") or info.get("memory_size"))
    fp["device_info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
    fp["virtual"] = is_virtual(fp)
    fp["key"] = fingerprint_key(fp)
    return fp


def hardware_key() -> str:
    """This machine's hardware key."""
    return str(fingerprint()["key"])
