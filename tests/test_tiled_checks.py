"""The generated kernels without a GPU: Metal syntax, nvcc compile, CPU emulation of both.

* Metal: every kernel, wrapped as ``mx.fast.metal_kernel`` wraps it, parsed
  by clang (the ``libclang`` wheel) against ``metal/syntax_stub.h``.
* CUDA: every kernel, wrapped as ``mx.fast.cuda_kernel`` wraps it, compiled
  by ``nvcc`` for sm_90a (no register spills) and sm_80.
* Both: the same translation units compiled by ``g++`` against the CPU
  emulations and run on awkward shapes against the float32 reference.

Each part skips, naming what is missing, when its tool is not installed.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from pytest_qmmperf import cuda, metal
from pytest_qmmperf.cuda import check as cuda_check
from pytest_qmmperf.metal import check as metal_check
from pytest_qmmperf.tiled import (
    PRESETS,
    DecodeConfig,
    DequantConfig,
    SkinnyConfig,
    WideConfig,
    generate,
    parse_name,
    template_args,
)
from pytest_qmmperf.tiled import emulate as emu
from pytest_qmmperf.tiled.config import REGISTERS_PER_BLOCK
from pytest_qmmperf.tiled.source import PACKAGE
from pytest_qmmperf.workloads.qmm import QmmSpec, check_output, make_inputs, relative_error

#: The presets and the extra tiles the GPU benchmark tries.
CONFIGS = [parse_name(n) for n in (
    # (":gM" only routes large M elsewhere: the same kernel as without it)
    *(p for p in PRESETS if ":g" not in p), "tiled:128x64x64:wm4wn2", "tiled:64x128x64:wm2wn4",
    "tiled:128x32x64:wm4wn1", "tiled:128x128:wm2wn4", "tiled:16x64x128:wm1wn4",
    "tiled:32x64x128:wm2wn2", "tiled:decode:r2w4u4", "tiled:decode:r1w8",
    "tiled:64x128:wm4wn4", "tiled:skinny:w4", "tiled:decode:r2w8k4", "tiled:skinny:w8r2",
    "tiled:skinny:w16r2", "tiled:skinny:w8r4", "tiled:skinny:w16r3h", "tiled:skinny:w12r3hp",
    "tiled:skinny:w8r4hp", "tiled:skinny:w16r3hp", "tiled:96x64x64:wm4wn2:k4",
    "tiled:32x64x128:wm2wn2:k3", "tiled:wide:w4r1m16:k4", "tiled:wide:w4r2m32:k4",
    "tiled:dequant",
)]
assert len({c.name for c in CONFIGS}) == len(CONFIGS), "a configuration is listed twice"


def _tokens(config) -> tuple[int, ...]:
    """M values that cover every template instance of ``config``."""
    if isinstance(config, DecodeConfig):
        return (1, 2, 4, 8)
    if isinstance(config, SkinnyConfig):
        return (1, 16)
    return (8,)


def _template(config, dtype: str, tokens: int = 8) -> list[tuple[str, str | int]]:
    return [("T", dtype), *template_args(config, tokens)]


# --- Metal: clang syntax and type check ---------------------------------------

needs_libclang = pytest.mark.skipif(metal_check.libclang_reason() is not None,
                                    reason=str(metal_check.libclang_reason()))


@needs_libclang
def test_every_generated_metal_kernel_parses():
    units = []
    for config in CONFIGS:
        for bits in (4, 8):
            for gs in (32, 64, 128):
                src = generate(config, bits=bits, group_size=gs, language="metal")
                for dtype in ("float16", "bfloat16"):
                    for tokens in _tokens(config):
                        units.append(metal.translation_unit(
                            src, dtype=dtype, template=_template(config, dtype, tokens)))
    errors = metal_check.check(units)
    assert not errors, "\n".join(str(e) for e in errors[:10])


@needs_libclang
@pytest.mark.parametrize("kind", sorted({type(c).__name__ for c in CONFIGS}))
def test_each_kind_of_kernel_parses_with_only_its_part_of_the_layer(kind):
    # The shared translation unit above would hide a declaration a kernel's
    # pruned header lacks (another unit's copy would serve), so each kind alone.
    config = next(c for c in CONFIGS if type(c).__name__ == kind)
    src = generate(config, bits=4, group_size=64, language="metal")
    units = [metal.translation_unit(src, dtype=dtype, template=_template(config, dtype, tokens))
             for dtype in ("float16", "bfloat16") for tokens in _tokens(config)]
    for unit in units:
        errors = metal_check.check([unit])
        assert not errors, "\n".join(str(e) for e in errors[:10])


@needs_libclang
@pytest.mark.parametrize(
    ("kernel", "old", "new", "expected"),
    [
        # a threadgroup tile read through a device pointer
        ("tiled:64x64:wm2wn2", "const threadgroup T* p = xs", "const device T* p = xs",
         "cannot initialize"),
        # simdgroup matrices of two element types in one multiply
        ("tiled:64x64:wm2wn2", "simdgroup_matrix<float, 8, 8> b[TN];",
         "simdgroup_matrix<half, 8, 8> b[TN];",
         "no matching function for call to 'simdgroup_multiply_accumulate'"),
        # a bit cast between types of different sizes
        ("tiled:64x64:wm2wn2", "as_type<ushort>(static_cast<T>(a))", "as_type<ushort>(a)",
         "sizes differ"),
        ("tiled:decode", "return v[i];", "return v[i] + lane;",
         "use of undeclared identifier 'lane'"),
    ],
)
def test_the_metal_check_catches_errors(kernel, old, new, expected):
    src = generate(parse_name(kernel), bits=4, group_size=64, language="metal")
    assert old in src.header
    broken = dataclasses.replace(src, header=src.header.replace(old, new))
    errors = metal_check.check([metal.translation_unit(broken, dtype="bfloat16")])
    assert any(expected in e.message for e in errors), [e.message for e in errors]


def test_metal_translation_unit_matches_mlx_wrapping():
    src = generate(parse_name("tiled:decode"), bits=4, group_size=64, language="metal")
    text = metal.translation_unit(src, dtype="bfloat16", template=[("T", "bfloat16"), ("MR", 4)])
    name = (f"custom_kernel_{src.name}__bfloat16_t_4_bfloat16_t_uint32_t_bfloat16_t_bfloat16_t"
            "_bfloat16_t")
    assert f"template <typename T, int MR>\n[[kernel]] void {name}(" in text
    assert ("  const device bfloat16_t* x [[buffer(0)]],\n"
            "  const constant int* x_shape [[buffer(1)]],\n"
            "  const constant int& x_ndim [[buffer(2)]],\n") in text
    assert "  device bfloat16_t* out [[buffer(7)]],\n  uint simdgroup_index_in_threadgroup" in text
    assert text.rstrip().endswith(
        f'template [[host_name("{name}")]] [[kernel]] decltype({name}<bfloat16_t, 4>) '
        f"{name}<bfloat16_t, 4>;")
    cxx = metal_check.as_cxx(text)
    assert f"template decltype({name}<bfloat16_t, 4>)" in cxx
    tiled = metal.translation_unit(generate(parse_name("tiled:32x32:wm2wn2"), bits=4,
                                            group_size=64, language="metal"))
    assert "\nstatic threadgroup uint4 xs_raw[" in metal_check.as_cxx(tiled)


# --- CUDA: nvcc ------------------------------------------------------------------

needs_nvcc = pytest.mark.skipif(cuda_check.nvcc() is None, reason="nvcc is not installed")


@needs_nvcc
def test_every_generated_cuda_kernel_compiles_without_spills(tmp_path):
    units = []
    names = []
    for config in CONFIGS:
        for bits, gs, dtype in ((4, 64, "float16"), (8, 32, "bfloat16")):
            src = generate(config, bits=bits, group_size=gs, language="cuda")
            for tokens in _tokens(config)[::3] if isinstance(config, DecodeConfig) \
                    else _tokens(config):
                template = _template(config, dtype, tokens)
                units.append(cuda.translation_unit(src, dtype=dtype, template=template,
                                                   default_header=not units))
                names.append((cuda.kernel_name(src, template), config))
    result = cuda_check.compile_check(units, tmp_path, archs=cuda_check.ARCHS)
    assert result.returncode == 0, result.log[-4000:]
    for name, config in names:
        # sm_90a (H100, where MLX runs them) without spills; sm_80 compiles (the BK=128
        # tiles spill a little there at 8 bits)
        k = result.kernel(name, "sm_90a")
        assert (k.spill_stores, k.spill_loads) == (0, 0), (name, k)
        assert 0 < k.registers <= 255
        # launchable: a block's registers fit the SM's 64K (what the validator estimates)
        assert k.registers * config.threads <= REGISTERS_PER_BLOCK, (name, k.registers)
        assert result.kernel(name, "sm_80").registers > 0


def test_every_asm_load_of_the_cuda_layer_is_predicated_or_volatile():
    # A plain asm statement inside `if (live)` may run whether or not the branch is
    # taken: ptxas made one unconditional and read past the weights (PERFORMANCE.md 6q).
    text = (PACKAGE / "cuda" / "qmm_ptx.cuh").read_text()
    statements = re.findall(r"asm(\s+volatile)?\((.*?)\);", text, re.S)
    loads = [(volatile, body) for volatile, body in statements if re.search(r"\bld[.m]", body)]
    assert len(loads) >= 5  # ldmatrix x2, x4 and the three weight loads
    for volatile, body in loads:
        for instruction in re.findall(r'"[^"]*\bld[.m][^"]*"', body):
            assert volatile or "@" in instruction, instruction


@needs_nvcc
@pytest.mark.parametrize("name", ["tiled:wide:w8r2m64:c2", "tiled:wide:w8r2m64:c4",
                                  "tiled:wide:w8r2m64:c5", "tiled:wide:w4r2m32:c4",
                                  "tiled:skinny:w8r6h:c2", "tiled:skinny:w8r2:c4"])
def test_cluster_kernels_compile_for_hopper_and_refuse_older_gpus(name, tmp_path):
    config = parse_name(name)
    src = generate(config, bits=4, group_size=64, language="cuda")
    template = _template(config, "float16")
    unit = cuda.translation_unit(src, dtype="float16", template=template)
    result = cuda_check.compile_check([unit], tmp_path / "sm90a")
    assert result.returncode == 0, result.log[-4000:]
    k = result.kernel(cuda.kernel_name(src, template))
    assert (k.spill_stores, k.spill_loads) == (0, 0) and k.registers * config.threads <= 65536
    older = cuda_check.compile_check([unit], tmp_path / "sm80", archs=["sm_80"])
    assert older.returncode != 0
    assert "splits K over a thread-block cluster, which needs sm_90 or later" in older.log


@needs_nvcc
def test_nvcc_check_reports_errors(tmp_path):
    src = generate(parse_name("tiled:32x32:wm2wn2"), bits=4, group_size=64, language="cuda")
    broken = dataclasses.replace(src, body=src.body.replace("tile.init(lane);", "tile.init();"))
    result = cuda_check.compile_check([cuda.translation_unit(broken)], tmp_path)
    assert result.returncode != 0
    assert "too few arguments" in result.log


def test_ptxas_log_parsing():
    log = """ptxas info    : Compiling entry function '_ZN3mlx4core2cu3fooEv' for 'sm_90a'
ptxas info    : Function properties for _ZN3mlx4core2cu3fooEv
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 120 registers, used 1 barriers, 15360 bytes smem
ptxas info    : Compiling entry function '_ZN3mlx4core2cu3barEv' for 'sm_80'
ptxas info    : Function properties for _ZN3mlx4core2cu3barEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""
    foo, bar = cuda_check.parse_ptxas(log)
    assert (foo.arch, foo.registers, foo.spill_stores, foo.spill_loads, foo.shared_bytes) == \
        ("sm_90a", 120, 4, 12, 15360)
    assert (bar.arch, bar.registers, bar.spill_stores, bar.shared_bytes) == ("sm_80", 40, 0, 0)


def test_a_unit_whose_kernel_redefines_global_gives_cudas_back():
    # (a cluster shape, launch bounds): joined units, as the checks compile them,
    # would otherwise give every later kernel the same attributes
    bounded = generate(parse_name("tiled:skinny:w16r3hp"), bits=4, group_size=64,
                       language="cuda")
    text = cuda.translation_unit(bounded, template=[("T", "float16"), ("TILES", 2)])
    assert text.endswith("} // namespace mlx::core::cu\n\n#if !defined(QMMPERF_CUDA_CPU_EMULATION)"
                         "\n#undef __global__\n#define __global__ __location__(global)\n#endif\n")
    plain = generate(parse_name("tiled:skinny:w16r3h"), bits=4, group_size=64, language="cuda")
    text = cuda.translation_unit(plain, template=[("T", "float16"), ("TILES", 2)])
    assert "__global__ __location__" not in text


def test_cuda_translation_unit_matches_mlx_wrapping():
    src = generate(parse_name("tiled:decode"), bits=8, group_size=32, language="cuda")
    text = cuda.translation_unit(src, dtype="float16", template=[("T", "float16"), ("MR", 2)])
    name = f"custom_kernel_{src.name}_float16_t_2"
    assert (f"__global__ void {name}(\n    const __half* x,\n"
            "    const __grid_constant__ Shape x_shape,\n    const __grid_constant__ int x_ndim,\n"
            "    const uint32_t* w,\n") in text
    assert "    __half* out) {\n  using T = __half;\n  constexpr int MR = 2;\n" in text
    assert text.rstrip().endswith("} // namespace mlx::core::cu")


# --- both: CPU emulation -------------------------------------------------------

needs_gxx = pytest.mark.skipif(emu.compiler_reason() is not None,
                               reason=str(emu.compiler_reason()))

#: (variant, spec): every configuration on a shape that is not a multiple of its
#: tile, rotating through dtypes, bit widths and group sizes.
_QUANT = [("float16", 4, 64), ("bfloat16", 8, 32), ("float16", 8, 128), ("bfloat16", 4, 32)]
EMULATED = []
for _i, _config in enumerate(CONFIGS):
    if isinstance(_config, DequantConfig):
        continue  # checked against mx.dequantize below
    _dtype, _bits, _gs = _QUANT[_i % len(_QUANT)]
    _M = 5 if isinstance(_config, DecodeConfig) else (13 if isinstance(_config, SkinnyConfig)
                                                      else 37)
    EMULATED.append((
        emu.EmulatedKernel(_config, _bits, _gs, _dtype, tokens=_M),
        QmmSpec(M=_M, N=72, K=256, bits=_bits, group_size=_gs, dtype=_dtype),
    ))
# M = 1 and M = 9 (two token blocks) through the decode kernel, K at one group
EMULATED.append((emu.EmulatedKernel(DecodeConfig(), 4, 32, "bfloat16", tokens=1),
                 QmmSpec(M=1, N=40, K=32, bits=4, group_size=32, dtype="bfloat16")))
EMULATED.append((emu.EmulatedKernel(DecodeConfig(2, 2), 8, 64, "float16", tokens=8),
                 QmmSpec(M=9, N=20, K=1088, bits=8, group_size=64)))
# several vectors per lane and step, the last step only partly inside K
EMULATED.append((emu.EmulatedKernel(DecodeConfig(2, 2, 3), 8, 64, "float16", tokens=4),
                 QmmSpec(M=3, N=20, K=1088, bits=8, group_size=64)))
EMULATED.append((emu.EmulatedKernel(DecodeConfig(1, 2, 5), 4, 32, "bfloat16", tokens=2),
                 QmmSpec(M=2, N=9, K=2112, bits=4, group_size=32, dtype="bfloat16")))
# warps splitting K (groups of 4 and of 2 sharing rows): the warps' sums meet in
# threadgroup memory; one token, and several with K short of one step per warp
EMULATED.append((emu.EmulatedKernel(DecodeConfig(2, 8, 1, 4), 4, 32, "float16", tokens=1),
                 QmmSpec(M=1, N=40, K=1088, bits=4, group_size=32)))
EMULATED.append((emu.EmulatedKernel(DecodeConfig(1, 4, 2, 2), 8, 64, "bfloat16", tokens=8),
                 QmmSpec(M=7, N=9, K=192, bits=8, group_size=64, dtype="bfloat16")))
# one token (the per-group sums form) at 8 bits, last step partial
EMULATED.append((emu.EmulatedKernel(DecodeConfig(2, 2, 2), 8, 128, "float16", tokens=1),
                 QmmSpec(M=1, N=21, K=1152, bits=8, group_size=128)))
# skinny: one 8-token fragment at 8 bits; two fragments and two token blocks, N not a
# multiple of 16 and K short of one 128-k super-step
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(2), 8, 32, "bfloat16", tokens=3),
                 QmmSpec(M=3, N=24, K=416, bits=8, group_size=32, dtype="bfloat16")))
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(3), 4, 32, "float16", tokens=21),
                 QmmSpec(M=21, N=40, K=96, bits=4, group_size=32)))
# several 16-row fragments a warp, N ending inside the last one
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(2, 3), 8, 128, "bfloat16", tokens=13),
                 QmmSpec(M=13, N=100, K=384, bits=8, group_size=128, dtype="bfloat16")))
# 8-row fragments: one token fragment at 8 bits, N ending inside a fragment and K short
# of a super-step; two token blocks with the next step's weights fetched ahead, the
# last step partial
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(2, 3, half=True), 8, 32, "bfloat16", tokens=5),
                 QmmSpec(M=5, N=29, K=416, bits=8, group_size=32, dtype="bfloat16")))
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(2, 2, half=True, prefetch=True), 4, 64,
                                    "float16", tokens=19),
                 QmmSpec(M=19, N=40, K=704, bits=4, group_size=64)))
# launch bounds (CUDA; none in the emulation): 16 warps fetching ahead, most without a
# super-step of their own
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(16, 3, half=True, prefetch=True), 4, 32,
                                    "bfloat16", tokens=16),
                 QmmSpec(M=16, N=48, K=640, bits=4, group_size=32, dtype="bfloat16")))
# tiles split over K: uneven parts (8 slices in 3), and more parts than slices
# (2 slices in 4: the last parts write zeros)
EMULATED.append((emu.EmulatedKernel(parse_name("tiled:32x32:wm2wn2:k3"), 8, 64, "bfloat16"),
                 QmmSpec(M=37, N=72, K=256, bits=8, group_size=64, dtype="bfloat16")))
EMULATED.append((emu.EmulatedKernel(parse_name("tiled:32x64x64:wm2wn2:k4"), 4, 64, "float16"),
                 QmmSpec(M=33, N=100, K=128, bits=4, group_size=64)))
# wide: M and N inside the last token and row fragments, K not a multiple of the
# 128-k super-step; split over K unevenly (5 super-steps in 2 parts) and into more
# parts than super-steps (the last writes zeros); 8 bits with both dtypes
EMULATED.append((emu.EmulatedKernel(WideConfig(2, 2, 16), 4, 64, "float16"),
                 QmmSpec(M=37, N=72, K=320, bits=4, group_size=64)))
EMULATED.append((emu.EmulatedKernel(WideConfig(2, 1, 24, splits=2), 8, 32, "bfloat16"),
                 QmmSpec(M=30, N=40, K=608, bits=8, group_size=32, dtype="bfloat16")))
EMULATED.append((emu.EmulatedKernel(WideConfig(1, 3, 8, splits=4), 8, 128, "float16"),
                 QmmSpec(M=9, N=50, K=256, bits=8, group_size=128)))
# wide at 64 tokens (wgmma on Hopper, two warpgroups): two token blocks, the second partial, more
# super-steps than the three x buffers, the last one partial; and more parts of K
# than super-steps, whose empty parts write zeros
EMULATED.append((emu.EmulatedKernel(WideConfig(8, 2, 64, splits=2), 4, 32, "bfloat16"),
                 QmmSpec(M=70, N=40, K=1184, bits=4, group_size=32, dtype="bfloat16")))
EMULATED.append((emu.EmulatedKernel(WideConfig(8, 2, 64, splits=4), 8, 64, "float16"),
                 QmmSpec(M=64, N=24, K=256, bits=8, group_size=64)))
# wide with K split over a thread-block cluster (CUDA only): each split above again,
# its parts now the blocks of a cluster (uneven parts, parts that own no super-step,
# both matrix forms); and accumulators that do not divide among the blocks (12 over 5),
# and sums exchanged in two rounds (c8)
EMULATED += [(dataclasses.replace(k, config=dataclasses.replace(k.config, splits=1,
                                                                 clusters=k.config.splits)), spec)
             for k, spec in list(EMULATED)
             if isinstance(k.config, WideConfig) and k.config.splits > 1]
EMULATED.append((emu.EmulatedKernel(WideConfig(2, 1, 24, clusters=5), 4, 64, "float16"),
                 QmmSpec(M=25, N=40, K=704, bits=4, group_size=64)))
EMULATED.append((emu.EmulatedKernel(WideConfig(8, 2, 64, clusters=8), 4, 32, "float16"),
                 QmmSpec(M=64, N=256, K=1024, bits=4, group_size=32)))
# skinny with K split over a cluster (CUDA only): the 8-row form at 8 bits, its parts
# uneven (4 super-steps, one partial, over 2 blocks of 2 warps); with the next step's
# weights fetched ahead, in 3 blocks (6 warps for 6 super-steps, the last partial);
# the 16-row form with N ending inside a fragment; and more warps than super-steps (2 for
# 8 warps over 4 blocks: most write zeros)
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(2, 3, half=True, clusters=2), 8, 32, "bfloat16",
                                    tokens=5),
                 QmmSpec(M=5, N=29, K=416, bits=8, group_size=32, dtype="bfloat16")))
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(2, 2, half=True, prefetch=True, clusters=3), 4,
                                    64, "float16", tokens=19),
                 QmmSpec(M=19, N=40, K=704, bits=4, group_size=64)))
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(2, 3, clusters=2), 8, 128, "bfloat16",
                                    tokens=13),
                 QmmSpec(M=13, N=100, K=384, bits=8, group_size=128, dtype="bfloat16")))
EMULATED.append((emu.EmulatedKernel(SkinnyConfig(2, clusters=4), 4, 32, "float16", tokens=16),
                 QmmSpec(M=16, N=24, K=256, bits=4, group_size=32)))
# the dequant kernel (checked against mx.dequantize): every bit width and dtype,
# rows of 2-4 groups, K at one group, and a row longer than a block's threads
for _bits, _gs, _dtype, _N, _K in ((4, 64, "float16", 5, 320), (8, 32, "bfloat16", 3, 96),
                                   (4, 128, "bfloat16", 2, 4224), (8, 64, "float16", 4, 640),
                                   (4, 32, "float16", 7, 32)):
    EMULATED.append((emu.EmulatedKernel(DequantConfig(), _bits, _gs, _dtype),
                     QmmSpec(M=3, N=_N, K=_K, bits=_bits, group_size=_gs, dtype=_dtype)))
# the tile at M = 1 and at the smallest K
EMULATED.append((emu.EmulatedKernel(parse_name("tiled:160x32:wm4wn1"), 4, 32, "float16"),
                 QmmSpec(M=1, N=33, K=32, bits=4, group_size=32)))


@pytest.fixture(scope="module", params=["metal", "cuda", "cuda-sm90a"])
def emulator(request, tmp_path_factory):
    """The emulation of every case; ``cuda-sm90a`` with the CUDA layer's Hopper
    forms (the wide kernel's wgmma at 64 tokens), as NVRTC builds it on an H100."""
    if emu.compiler_reason():
        pytest.skip(emu.compiler_reason())
    language, _, arch = request.param.partition("-")
    # Metal has no thread-block clusters: the kernels that split K over one are CUDA's
    cases = [(k, spec) for k, spec in EMULATED
             if language == "cuda" or getattr(k.config, "clusters", 1) == 1]
    exe = emu.build([k for k, _ in cases], language,
                    tmp_path_factory.mktemp(request.param), sm90a=arch == "sm90a")
    return language, exe, cases


@needs_gxx
def test_emulated_kernels_match_the_reference(emulator):
    import mlx.core as mx

    language, exe, cases = emulator
    for index, (kernel, spec) in enumerate(cases):
        inputs = make_inputs(spec, seed=index)
        out = emu.run(exe, index, kernel, inputs.x, inputs.w, inputs.scales, inputs.biases)
        if isinstance(kernel.config, DequantConfig):
            ref = mx.dequantize(inputs.w, inputs.scales, inputs.biases,
                                group_size=spec.group_size, bits=spec.bits).astype(mx.float32)
            assert out.shape == ref.shape and out.dtype == getattr(mx, spec.dtype), out.dtype
            # s * q + b is rounded once to T here (one FMA); MLX rounds s * q first,
            # so they differ by up to a unit in the last place of s * q: allow two
            # at the matrix's largest value (a wrong value is off by about s).
            ulp = 2.0 ** -10 if spec.dtype == "float16" else 2.0 ** -7
            bound = 2 * ulp * float(mx.max(mx.abs(ref)))
            err = float(mx.max(mx.abs(out.astype(mx.float32) - ref)))
            assert err <= bound, (language, spec.label(), err, bound)
        else:
            check_output(spec, inputs, out, f"{language} {kernel.config.name}")


@needs_gxx
@pytest.mark.parametrize("language", ["metal", "cuda"])
def test_emulation_catches_a_wrong_fragment_layout(language, tmp_path, monkeypatch):
    """Swapping the two k-halves a lane loads must break the product, in either language."""
    from pytest_qmmperf.tiled import source

    wrong = {
        "metal": ("const threadgroup T* p = xs + (i * 8 + fm) * BKP + kk + fn;",
                  "const threadgroup T* p = xs + (i * 8 + fn) * BKP + kk + fm;"),
        "cuda": ("kk + (lane >> 4) * 8);", "kk + ((lane >> 3) & 1) * 8);"),
    }[language]
    dialect = source.DIALECTS[language]
    layer = dialect.layer()
    assert wrong[0] in layer
    monkeypatch.setattr(type(dialect), "layer", lambda self: layer.replace(*wrong))
    kernel = emu.EmulatedKernel(parse_name("tiled:32x32:wm2wn2"), 4, 64, "float16")
    spec = QmmSpec(M=16, N=32, K=64)
    exe = emu.build([kernel], language, tmp_path)
    inputs = make_inputs(spec)
    out = emu.run(exe, 0, kernel, inputs.x, inputs.w, inputs.scales, inputs.biases)
    from pytest_qmmperf.workloads.qmm import reference

    assert relative_error(out, reference(spec, inputs)) > 0.5


@needs_gxx
def test_sm90a_emulation_runs_the_wgmma_layout(tmp_path, monkeypatch):
    """The sm_90a build reads x where wgmma's descriptor says: swapping its two strides
    breaks the 64-token wide kernel there, and only there."""
    from pytest_qmmperf.tiled import source
    from pytest_qmmperf.workloads.qmm import reference

    dialect = source.DIALECTS["cuda"]
    layer = dialect.layer()
    call = "xb + s * TILES * 128, 128, 256,"
    assert layer.count(call) == 1
    monkeypatch.setattr(type(dialect), "layer",
                        lambda self: layer.replace(call, "xb + s * TILES * 128, 256, 128,"))
    kernel = emu.EmulatedKernel(WideConfig(8, 2, 64), 4, 64, "float16")
    spec = QmmSpec(M=64, N=256, K=256)
    inputs = make_inputs(spec)
    ref = reference(spec, inputs)
    errors = {}
    for sm90a in (False, True):
        exe = emu.build([kernel], "cuda", tmp_path / str(sm90a), sm90a=sm90a)
        out = emu.run(exe, 0, kernel, inputs.x, inputs.w, inputs.scales, inputs.biases)
        errors[sm90a] = relative_error(out, ref)
    assert errors[False] < 0.01 and errors[True] > 0.5, errors


@needs_gxx
@pytest.mark.parametrize("wait", ["qmm_wgmma_wait<QMM_WIDE_STEPS>();", "qmm_wgmma_wait<0>();"])
def test_sm90a_emulation_is_asynchronous_like_wgmma(tmp_path, monkeypatch, wait):
    """The emulated wgmma reads B and writes D only when a wait retires it, as on the GPU:
    without the wait before the barrier, the x buffers are restaged under running wgmma
    (the race PERFORMANCE.md 6s found on the H100); without the final wait, D never lands."""
    from pytest_qmmperf.tiled import source
    from pytest_qmmperf.workloads.qmm import reference

    dialect = source.DIALECTS["cuda"]
    layer = dialect.layer()
    assert layer.count(wait) == 1
    kernel = emu.EmulatedKernel(WideConfig(8, 2, 64), 4, 64, "float16")
    spec = QmmSpec(M=64, N=256, K=1024)  # 8 super-steps over 3 buffers
    inputs = make_inputs(spec)
    ref = reference(spec, inputs)
    errors = {}
    for broken in (False, True):
        if broken:
            monkeypatch.setattr(type(dialect), "layer", lambda self: layer.replace(wait, ""))
        exe = emu.build([kernel], "cuda", tmp_path / str(broken), sm90a=True)
        out = emu.run(exe, 0, kernel, inputs.x, inputs.w, inputs.scales, inputs.biases)
        errors[broken] = relative_error(out, ref)
    assert errors[False] < 0.01 and errors[True] > 0.1, errors
