from __future__ import annotations

import pytest

from pytest_qmmperf.hardware import fingerprint, fingerprint_key, hardware_key, is_virtual, slug


@pytest.mark.parametrize(
    ("fp", "key"),
    [
        ({"backend": "metal", "device_name": "Apple M3 Max", "gpu_cores": 40, "memory_gb": 64},
         "apple-m3-max-40c-64gb-metal"),
        ({"backend": "metal", "device_name": "Apple M2", "architecture": "applegpu_g14g",
          "memory_gb": 16}, "apple-m2-applegpu-g14g-16gb-metal"),
        ({"backend": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "memory_gb": 79},
         "nvidia-h100-80gb-hbm3-cuda"),
        ({"backend": "cuda", "device_name": "NVIDIA GeForce RTX 4090", "memory_gb": 24},
         "nvidia-geforce-rtx-4090-24gb-cuda"),
        ({"backend": "cpu", "cpu_name": "Intel(R) Xeon(R) Processor", "cpu_cores": 2,
          "memory_gb": 24}, "intel-xeon-processor-2c-24gb-cpu"),
    ],
)
def test_keys_keep_what_decides_speed(fp, key):
    # OS and versions must not change the key: an MLX upgrade is compared, not hidden.
    assert fingerprint_key({**fp, "os": "Darwin 24.1", "mlx_version": "9.9"}) == key


def test_slug():
    assert slug("Intel(R) Core(TM) i9-13900K  CPU @ 3.0GHz") == "intel-core-i9-13900k-cpu-3-0ghz"


def test_virtual_gpus_are_recognised():
    assert is_virtual({"device_name": "Apple Paravirtual device"})
    assert not is_virtual({"device_name": "Apple M3 Max"})


def test_this_machine():
    fp = fingerprint()
    assert fp["backend"] in ("cpu", "metal", "cuda")
    assert hardware_key() == fp["key"] == fingerprint_key(fp)
    assert fp["key"].endswith("-" + fp["backend"])
    assert fp["mlx_version"] and fp["cpu_cores"] >= 1
