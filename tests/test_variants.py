from __future__ import annotations

import mlx.core as mx
import pytest

from pytest_qmmperf import variants
from pytest_qmmperf.variants import (
    Variant,
    VariantError,
    VariantFamily,
    get_variant,
    register_family,
    register_variant,
    unregister_variant,
    variant_names,
)
from pytest_qmmperf.workloads.qmm import QmmSpec, check_output, make_inputs


def _qmm(x, w, scales, biases, *, transpose=True, group_size=64, bits=4, mode="affine"):
    return mx.quantized_matmul(x, w, scales, biases, transpose=transpose,
                               group_size=group_size, bits=bits, mode=mode)


@pytest.fixture
def cleanup():
    names: list[str] = []
    yield names
    for name in names:
        unregister_variant(name)
    for prefix in [p for p in list(variants._families) if p.startswith("test")]:
        variants._families.pop(prefix)


def test_builtins_are_registered_and_correct():
    assert variant_names()[:3] == ["mlx", "dequant", "hybrid"]
    spec = QmmSpec(M=3, N=64, K=128, dtype="float32")
    i = make_inputs(spec)
    for name in ("mlx", "dequant", "hybrid"):
        out = get_variant(name)(i.x, i.w, i.scales, i.biases, transpose=True, group_size=64,
                                bits=4, mode="affine")
        assert check_output(spec, i, out, name) < 1e-5


def test_register_by_name_and_by_object(cleanup):
    cleanup.extend(["test-a", "test-b"])
    a = register_variant("test-a", _qmm, description="first")
    assert get_variant("test-a") is a and a.description == "first"
    b = register_variant(Variant("test-b", _qmm))
    assert get_variant("test-b") is b
    assert {"test-a", "test-b"} <= set(variant_names())


def test_a_taken_name_is_refused_unless_replaced(cleanup):
    cleanup.append("test-dup")
    register_variant("test-dup", _qmm)
    with pytest.raises(VariantError, match="'test-dup' is already registered; pass replace=True"):
        register_variant("test-dup", lambda *a, **k: None)
    replaced = register_variant("test-dup", _qmm, description="new", replace=True)
    assert get_variant("test-dup") is replaced


@pytest.mark.parametrize("bad", ["", "has space", "a,b", "a/b"])
def test_bad_names_are_refused(bad):
    with pytest.raises(VariantError, match="is not valid"):
        register_variant(bad, _qmm)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(VariantError) as info:
        get_variant("nope")
    assert str(info.value).startswith(
        "unknown variant 'nope'; known variants: mlx, dequant, hybrid")


def test_families_resolve_once_and_cache(cleanup):
    built: list[str] = []

    def parse(name: str) -> Variant:
        size = name.split(":", 1)[1]
        if not size.isdigit():
            raise VariantError(f"variant {name!r}: expected testfam:<digits>")
        built.append(name)
        return Variant(name, _qmm, params={"size": int(size)})

    register_family(VariantFamily("testfam", parse, presets=("testfam:32",)))
    cleanup.extend(["testfam:32", "testfam:64"])
    assert "testfam:32" in variant_names()
    first = get_variant("testfam:64")
    assert get_variant("testfam:64") is first and built == ["testfam:64"]
    assert first.params == {"size": 64}
    with pytest.raises(VariantError, match="expected testfam:<digits>"):
        get_variant("testfam:big")
    with pytest.raises(VariantError, match="unknown variant 'testfam'"):
        get_variant("testfam")


def test_entry_points_call_register(cleanup):
    class EntryPoint:  # the one method importlib.metadata.EntryPoint offers here
        def load(self):
            return lambda register: register("test-ep", _qmm, description="from a package")

    cleanup.append("test-ep")
    variants.load_entry_points([EntryPoint()])
    assert get_variant("test-ep").description == "from a package"


def test_hybrid_dispatches_on_activation_rows():
    calls: list[str] = []
    spec_small = QmmSpec(M=4, N=64, K=128, dtype="float32")
    spec_large = QmmSpec(M=variants.HYBRID_MIN_ROWS, N=64, K=128, dtype="float32")
    for spec in (spec_small, spec_large):
        i = make_inputs(spec)
        out = get_variant("hybrid")(i.x, i.w, i.scales, i.biases, transpose=True,
                                     group_size=64, bits=4, mode="affine")
        check_output(spec, i, out, "hybrid")
        # the dense path materialises a dequantized weight; the fused path does not
        mx.eval(out)
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(get_variant("hybrid")(i.x, i.w, i.scales, i.biases, transpose=True,
                                      group_size=64, bits=4, mode="affine"))
        calls.append("dequant" if mx.get_peak_memory() - before >= 64 * 128 * 4 else "mlx")
    assert calls == ["mlx", "dequant"]
