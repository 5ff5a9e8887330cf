"""Pure helpers of the GPU benchmark scripts, checked on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_kernel_ab  # noqa: E402
import gpu_kernels  # noqa: E402
import gpu_load_hints  # noqa: E402

from pytest_qmmperf.tiled import source  # noqa: E402


@pytest.mark.parametrize(
    ("bytes_per_set", "expected"),
    [
        (5_300_000, 51),  # qo's weights: ceil(268435456 / 5.3e6) = ceil(50.6)
        (64 << 20, 4),  # exactly a quarter of 256 MiB
        ((64 << 20) - 1, 5),  # one byte short of a quarter: a fifth set
        (1, 128),  # capped
        (10**9, 2),  # one set would not rotate at all
    ],
)
def test_rotation_reaches_256_mib(bytes_per_set: int, expected: int) -> None:
    assert gpu_kernels.rotation(bytes_per_set) == expected


def test_load_hint_forms_rewrite_both_weight_loads() -> None:
    layer = source.DIALECTS["cuda"].layer()
    assert gpu_load_hints.layer_in_form(layer, "shipped") == layer

    plain = gpu_load_hints.layer_in_form(layer, "plain")
    assert plain.count("return live ? *p : make_uint4(0u, 0u, 0u, 0u);") == 2
    assert plain.count("return *p;") == 1
    assert "ld.global" not in plain

    wide = gpu_load_hints.layer_in_form(layer, "l2_256")
    loads = [line.strip() for line in wide.splitlines() if "ld.global" in line]
    assert loads == [
        '"  @q ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\\n"'
    ] * 2 + ['asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, '
             '[%4];\\n"']


def test_load_hint_x_forms_route_the_skinny_x_load_through_one_volatile_load() -> None:
    layer = source.DIALECTS["cuda"].layer()
    both = gpu_load_hints.layer_in_form(layer, "l2_256+x_na")
    # The weight helpers as in "l2_256", plus one new helper for x.
    assert both.count("L2::256B") == 3
    assert both.count('asm volatile("ld.global.nc.L1::no_allocate.v4.u32') == 1
    assert "v = *reinterpret_cast<const uint4*>(x + " not in both
    call = both[both.index("v = qmm_load_x_form("):]
    statement = call[:call.index(";") + 1]
    assert statement.count("(") == statement.count(")")
    assert both.index("uint4 qmm_load_x_form(") < both.index("void qmm_skinny_x")


def test_load_hint_forms_refuse_a_changed_layer() -> None:
    with pytest.raises(SystemExit, match="weight-load helpers changed shape"):
        gpu_load_hints.layer_in_form("// no helpers here\n", "plain")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("down:16:tiled:skinny:w16r3h", ("down", 16, "tiled:skinny:w16r3h")),
        ("gate_up:128:tiled:wide:w8r2m64:k2", ("gate_up", 128, "tiled:wide:w8r2m64:k2")),
    ],
)
def test_kernel_ab_cases_split_at_the_first_two_colons(text: str, expected: tuple) -> None:
    assert gpu_kernel_ab.parse_case(text) == expected


@pytest.mark.parametrize("text", ["up:16:tiled:decode", "down:0:tiled:decode",
                                  "down:x:tiled:decode", "down:16:mlx", "down:16"])
def test_kernel_ab_refuses_a_malformed_case_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=f"case {text!r}: expected SHAPE:M:VARIANT"):
        gpu_kernel_ab.parse_case(text)
