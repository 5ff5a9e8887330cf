"""The tiled kernel family: parameters, names, registry entry, generator output, launch path."""

from __future__ import annotations

import re

import mlx.core as mx
import pytest

from pytest_qmmperf import tiled
from pytest_qmmperf.tiled import config as cfg
from pytest_qmmperf.tiled import source, variant
from pytest_qmmperf.tiled.config import (
    DecodeConfig,
    DequantConfig,
    SkinnyConfig,
    TileConfig,
    TileError,
    WideConfig,
    parse_name,
)
from pytest_qmmperf.variants import VariantError, get_variant, variant_names
from pytest_qmmperf.workloads.qmm import QmmSpec, make_inputs

# --- names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiled:160x32:wm4wn1", TileConfig(160, 32, 32, 4, 1)),
        ("tiled:160x32x32:wm4wn1", TileConfig(160, 32, 32, 4, 1)),
        ("tiled:64x64x64:wm2wn2", TileConfig(64, 64, 64, 2, 2)),
        ("tiled:32x32:wm2wn2:d0", TileConfig(32, 32, 32, 2, 2, decode_max_m=0)),
        ("tiled:96x64x64:wm4wn2:k4", TileConfig(96, 64, 64, 4, 2, splits=4)),
        ("tiled:32x32:wm2wn2:k2:d0", TileConfig(32, 32, 32, 2, 2, decode_max_m=0, splits=2)),
        ("tiled:decode", DecodeConfig(2, 4)),
        ("tiled:decode:r4w4", DecodeConfig(4, 4)),
        ("tiled:decode:r2w8", DecodeConfig(2, 8)),
        ("tiled:decode:r2w8u4", DecodeConfig(2, 8, 4)),
        ("tiled:decode:r2w8u1", DecodeConfig(2, 8, 1)),
        ("tiled:decode:r2w8k4", DecodeConfig(2, 8, 1, 4)),
        ("tiled:decode:r1w8u2k8", DecodeConfig(1, 8, 2, 8)),
        ("tiled:skinny:w8r2", SkinnyConfig(8, 2)),
        ("tiled:skinny:w4", SkinnyConfig(4, 1)),
        ("tiled:skinny:w16r3h", SkinnyConfig(16, 3, half=True)),
        ("tiled:skinny:w12r3hp", SkinnyConfig(12, 3, half=True, prefetch=True)),
        ("tiled:skinny:w8r6h:c2", SkinnyConfig(8, 6, half=True, clusters=2)),
        ("tiled:skinny:c4", SkinnyConfig(clusters=4)),
        ("tiled:wide:w8r2m64", WideConfig(8, 2, 64)),
        ("tiled:wide:w4r1m16:k4", WideConfig(4, 1, 16, splits=4)),
        ("tiled:wide:w4r2m32:k2:d0", WideConfig(4, 2, 32, splits=2, decode_max_m=0)),
        ("tiled:wide:w8r2m64:g512", WideConfig(8, 2, 64, gemm_min_m=512)),
        ("tiled:wide:w8r2m64:g512:q1", WideConfig(8, 2, 64, gemm_min_m=512, mlx_max_m=1)),
        ("tiled:wide:w8r2m64:c2", WideConfig(8, 2, 64, clusters=2)),
        ("tiled:wide:w4r2m32:c4:d0", WideConfig(4, 2, 32, clusters=4, decode_max_m=0)),
        ("tiled:dequant", DequantConfig()),
    ],
)
def test_parse_name(name, expected):
    assert parse_name(name) == expected


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("tiled:160x32x32:wm4wn1", "tiled:160x32:wm4wn1"),
        ("tiled:64x64x64:wm2wn2", "tiled:64x64x64:wm2wn2"),
        ("tiled:32x32:wm2wn2:d16", "tiled:32x32:wm2wn2"),
        ("tiled:32x32:wm2wn2:d8", "tiled:32x32:wm2wn2:d8"),
        ("tiled:skinny:w8", "tiled:skinny"),
        ("tiled:skinny:w4", "tiled:skinny:w4"),
        ("tiled:32x32:wm2wn2:d0", "tiled:32x32:wm2wn2:d0"),
        ("tiled:decode:r2w4", "tiled:decode"),
        ("tiled:decode:r4w4u1", "tiled:decode:r4w4"),
        ("tiled:decode:r2w8", "tiled:decode:r2w8"),
        ("tiled:decode:r2w8u1", "tiled:decode:r2w8"),
        ("tiled:decode:r1w4u8", "tiled:decode:r1w4u8"),
        ("tiled:decode:r2w4u1k1", "tiled:decode"),
        ("tiled:decode:r2w8k4", "tiled:decode:r2w8k4"),
        ("tiled:decode:r2w8u2k2", "tiled:decode:r2w8u2k2"),
        ("tiled:skinny:w8r1", "tiled:skinny"),
        ("tiled:64x64:wm2wn2:k1", "tiled:64x64:wm2wn2"),
        ("tiled:64x64:wm2wn2:k3:d8", "tiled:64x64:wm2wn2:k3:d8"),
        ("tiled:skinny:w16r2", "tiled:skinny:w16r2"),
        ("tiled:skinny:w8r1h", "tiled:skinny:w8h"),
        ("tiled:skinny:w12r3hp", "tiled:skinny:w12r3hp"),
        ("tiled:skinny:w8:c2", "tiled:skinny:c2"),
        ("tiled:skinny:w16r3h:c1", "tiled:skinny:w16r3h"),
        ("tiled:skinny:w8r2:c3", "tiled:skinny:w8r2:c3"),
        ("tiled:wide:w8r2m64:k1:d16", "tiled:wide:w8r2m64"),
        ("tiled:wide:w4r1m16:k4:d8", "tiled:wide:w4r1m16:k4:d8"),
        ("tiled:wide:w8r2m64:k1:d16:g0", "tiled:wide:w8r2m64"),
        ("tiled:wide:w8r2m64:d8:g512", "tiled:wide:w8r2m64:d8:g512"),
        ("tiled:wide:w8r2m64:k1:c1", "tiled:wide:w8r2m64"),
        ("tiled:wide:w8r2m64:c4:d16:g512", "tiled:wide:w8r2m64:c4:g512"),
    ],
)
def test_canonical_names_round_trip(name, canonical):
    config = parse_name(name)
    assert config.name == canonical
    assert parse_name(canonical) == config


@pytest.mark.parametrize("name", ["tiled:", "tiled:160x32", "tiled:160x32:wm4", "tiled:axb:wm1wn1",
                                  "tiled:decode:r4", "tiled:decode:u2", "tiles:160x32:wm4wn1"])
def test_unparsable_names_say_what_is_accepted(name):
    with pytest.raises(TileError) as info:
        parse_name(name)
    msg = str(info.value)
    assert "\n" not in msg
    assert "tiled:BMxBN[xBK]:wmWMwnWN" in msg and repr(name) in msg


# --- validation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("tiled:160x32:wm3wn1", "BM=160 is not divisible by WM=3"),
        ("tiled:64x48:wm2wn5", "BN=48 is not divisible by WN=5"),
        ("tiled:36x32:wm2wn1", "BM/WM=18 must be a multiple of 8"),
        ("tiled:64x32:wm2wn4", "BN/WN=8 must be a multiple of 16"),
        ("tiled:32x32x24:wm2wn2", "BK=24 must be a multiple of 16"),
        ("tiled:512x64:wm16wn4", "2048 threads, over the 1024-thread threadgroup limit"),
        ("tiled:256x256:wm4wn4", "needs 40960 bytes of threadgroup memory"),
        ("tiled:128x128:wm2wn2", "keeps 168 registers live across the K loop (128 accumulators"),
        ("tiled:128x64x64:wm2wn2", "keeps 120 registers live"),
        ("tiled:0x32:wm2wn2", "BM=0 must be a positive integer"),
        ("tiled:decode:r16w4", "rows=16 exceeds 4 rows per warp"),
        ("tiled:decode:r8w4", "rows=8 exceeds 4 rows per warp"),
        ("tiled:128x256:wm4wn4", "512 threads x about 176 registers each exceed the 65536"),
        ("tiled:32x128:wm4wn8", "1024 threads x about 107 registers"),
        ("tiled:decode:r4w64", "2048 threads, over the 1024-thread threadgroup limit"),
        ("tiled:decode:r4w4u4", "rows x vectors = 16 exceeds 8 16-byte vectors per lane"),
        ("tiled:decode:r1w4u0", "vectors=0 must be a positive integer"),
        ("tiled:decode:r2w8k3", "warps=8 is not divisible by splits=3"),
        ("tiled:decode:r2w4k0", "splits=0 must be a positive integer"),
        ("tiled:skinny:w8r5", "rows=5 exceeds 4 16-row fragments per warp"),
        ("tiled:skinny:w32", "1024 threads x about 96 registers each exceed the 65536"),
        ("tiled:skinny:w8r0", "rows=0 must be a positive integer"),
        ("tiled:skinny:w8r9h", "rows=9 exceeds 4 16-row fragments per warp (8 of 8 rows"),
        ("tiled:skinny:w8r2p", "prefetch (p) needs 8-row fragments (h)"),
        ("tiled:skinny:w8p", "prefetch (p) needs 8-row fragments (h)"),
        # fetching ahead, held to the block by launch bounds: the form without has to fit
        ("tiled:skinny:w16r5hp", "512 threads x about 144 registers each exceed the 65536 "
                                 "registers of a CUDA block (even without fetching ahead: its "
                                 "launch bounds would make it spill)"),
        ("tiled:64x64:wm2wn2:k0", "splits=0 must be a positive integer"),
        ("tiled:64x64:wm2wn2:k17", "splits=17 exceeds 16 blocks per output tile"),
        ("tiled:wide:w4r2m12", "tokens=12 must be a multiple of 8 (8-token fragments) up to 64"),
        ("tiled:wide:w8r1m72", "tokens=72 must be a multiple of 8 (8-token fragments) up to 64"),
        ("tiled:wide:w4r5m16", "rows=5 exceeds 4 16-row fragments per warp"),
        # 64 accumulators + 32 for the next x + 80 for this and the next weights
        ("tiled:wide:w4r2m64", "keeps 176 registers live across the K loop (64 accumulators"),
        ("tiled:wide:w32r1m32", "1024 threads x about 156 registers each exceed the 65536"),
        ("tiled:wide:w4r2m32:k17", "splits=17 exceeds 16 blocks per output tile"),
        ("tiled:wide:w0r2m32", "warps=0 must be a positive integer"),
        ("tiled:wide:w8r2m64:g16", "gemm_min_m=16 must exceed decode_max_m=16 (or be 0)"),
        ("tiled:wide:w8r2m64:g512:q512", "mlx_max_m=512 must be under gemm_min_m=512"),
        ("tiled:wide:w8r2m64:k2:c2", "splits K both into planes (k2) and over a cluster (c2)"),
        ("tiled:wide:w8r2m64:c16", "clusters=16 exceeds 8 blocks, the largest thread-block"),
        ("tiled:wide:w8r2m64:c0", "clusters=0 must be a positive integer"),
        ("tiled:skinny:w8r2:c9", "clusters=9 exceeds 8 blocks, the largest thread-block"),
        # 12 warps x 6 fragments x 32 lanes x 4 sums x 4 bytes: 36864 bytes. Over
        # Apple's 32 KiB, but a cluster split is CUDA's only, held to its 48 KiB
        ("tiled:skinny:w12r6h", "needs 36864 bytes of threadgroup memory (warps x rows x 32 "
                                "lanes x 8 partial sums), over the 32768-byte limit of Apple"),
        ("tiled:skinny:w16r8h:c2", "512 threads x about 204 registers each exceed the 65536"),
        # 16 bytes of sums from each of 7 other blocks for 256 threads: 28672 bytes; two x
        # buffers of 8 tokens x 128 halves: 4096
        ("tiled:wide:w8r1m8:c8", "other 7 blocks needs 28672 bytes, more than the 4096"),
        # the owned token rows staged as T: 8 rows of 8 x 2 x 16 weight rows (+ 8 of
        # padding) x 2 bytes = 4224 bytes; two x buffers of 8 tokens: 4096
        ("tiled:wide:w8r2m8:c2", "the 8 token rows a block of the cluster writes need 4224 "
                                 "bytes staged, more than the 4096"),
    ],
)
def test_invalid_tiles_are_rejected_up_front(name, fragment):
    with pytest.raises(TileError) as info:
        parse_name(name)
    msg = str(info.value)
    assert fragment in msg
    assert msg.startswith(f"{name}: ")
    assert "\n" not in msg


def test_registry_wraps_invalid_tiles_in_variant_error():
    with pytest.raises(VariantError, match=r"BM=160 is not divisible by WM=3"):
        get_variant("tiled:160x32:wm3wn1")


def test_shared_memory_and_threads_arithmetic():
    c = TileConfig(160, 32, 32, 4, 1)
    assert (c.threads, c.warp_tile_m, c.warp_tile_n, c.pitch) == (128, 40, 32, 40)
    assert c.shared_bytes == (160 + 32) * 40 * 2 == 15360
    assert c.accumulators == 40 * 32 // 32
    # 160*32/8 = 640 activation vectors and 32*32/4 = 256 8-bit words over 128 threads
    assert c.live_registers == 40 + 4 * 5 + 3 * 2
    # the largest preset still fits Apple's 32 KiB
    assert TileConfig(256, 32, 32, 4, 1).shared_bytes == 288 * 80 <= cfg.TG_MEMORY_LIMIT


# --- presets and the registry ------------------------------------------------


def test_presets_are_the_seed_rows_and_listed():
    assert tiled.PRESETS == (
        "tiled:32x32:wm2wn2", "tiled:64x64:wm2wn2", "tiled:160x32:wm4wn1",
        "tiled:160x32:wm2wn2", "tiled:192x32:wm4wn1", "tiled:256x32:wm4wn1", "tiled:decode",
        "tiled:skinny", "tiled:wide:w8r2m64", "tiled:wide:w8r2m64:g512",
        "tiled:wide:w8r2m64:g512:q1",
    )
    names = variant_names()
    for preset in tiled.PRESETS:
        assert preset in names
        assert parse_name(preset).name == preset


def test_get_variant_builds_each_variant_once():
    first = get_variant("tiled:192x32:wm4wn1")
    assert get_variant("tiled:192x32:wm4wn1") is first
    # an alias resolves to the variant under its canonical name
    alias = get_variant("tiled:192x32x32:wm4wn1")
    assert alias.name == "tiled:192x32:wm4wn1"
    assert get_variant("tiled:192x32:wm4wn1") is first
    assert first.params["BM"] == 192 and first.params["WM"] == 4 and first.params["threads"] == 128


def test_register_is_idempotent():
    tiled.register()
    tiled.register()
    assert variant_names().count("tiled:160x32:wm4wn1") == 1


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (QmmSpec(M=8, N=64, K=64, mode="mxfp4", group_size=32), "affine quantization only"),
        (QmmSpec(M=8, N=64, K=64, bits=3, group_size=32), "bits=3: the tiled kernels support"),
        (QmmSpec(M=8, N=64, K=64, transpose=False), "x @ w.T only"),
        (QmmSpec(M=8, N=64, K=64, dtype="float32"), "dtype='float32'"),
        (QmmSpec(M=17, N=64, K=96, group_size=32), "K=96: must be a multiple of BK=64"),
        (QmmSpec(M=1, N=1, K=32, group_size=32), "at least 8 words"),
    ],
)
def test_supports_names_the_reason(spec, fragment):
    v = get_variant("tiled:64x64x64:wm2wn2")
    reason = v.supports(spec)
    assert reason is not None and fragment in reason


@pytest.mark.parametrize(("name", "M"), [("tiled:wide:w8r2m64:c2", 128),
                                         ("tiled:skinny:w8r6h:c2", 16)])
def test_a_cluster_variant_is_unsupported_on_metal(monkeypatch, name, M):
    v = get_variant(name)
    spec = QmmSpec(M=M, N=512, K=256)
    monkeypatch.setattr(variant, "backend", lambda: "metal")
    reason = v.supports(spec)
    assert reason is not None and "thread-block cluster, which Metal does not have" in reason
    monkeypatch.setattr(variant, "backend", lambda: "cuda")
    assert v.supports(spec) is None


def test_supports_accepts_what_the_kernels_run():
    v = get_variant("tiled:160x32:wm4wn1")
    for bits in (4, 8):
        for gs in (32, 64, 128):
            for dtype in ("float16", "bfloat16"):
                assert v.supports(QmmSpec(M=33, N=40, K=128, bits=bits, group_size=gs,
                                          dtype=dtype)) is None
    # below the decode threshold the tile's BK does not matter
    assert get_variant("tiled:64x64x64:wm2wn2").supports(QmmSpec(M=1, N=64, K=96,
                                                                 group_size=32)) is None


def test_unavailable_on_the_cpu_backend():
    if variant.backend() is not None:
        pytest.skip("this MLX has a GPU backend")
    v = get_variant("tiled:160x32:wm4wn1")
    reason = v.available()
    assert reason is not None and reason.startswith("needs Metal or CUDA backend")
    spec = QmmSpec(M=4, N=64, K=64)
    inp = make_inputs(spec)
    with pytest.raises(RuntimeError, match="needs Metal or CUDA backend"):
        v(inp.x, inp.w, inp.scales, inp.biases, group_size=64, bits=4)


def test_bad_operands_are_refused_before_any_launch():
    v = get_variant("tiled:32x32:wm2wn2")
    spec = QmmSpec(M=4, N=64, K=128)
    inp = make_inputs(spec)
    with pytest.raises(TileError, match=r"scales are \(64, 2\): expected \(64, 4\)"):
        v(inp.x, inp.w, inp.scales, inp.biases, group_size=32, bits=4)
    with pytest.raises(TileError, match="w is .* expected uint32 \\(64, 32\\)"):
        v(inp.x, inp.w, inp.scales, inp.biases, group_size=64, bits=8)
    with pytest.raises(TileError, match="biases=None"):
        v(inp.x, inp.w, inp.scales, None, group_size=64, bits=4)


def test_metal_kernel_objects_are_built_once_per_configuration():
    config = TileConfig(96, 32, 32, 2, 1)
    src, first = variant.kernel(config, bits=4, group_size=64, language="metal")
    again = variant.kernel(config, bits=4, group_size=64, language="metal")[1]
    assert again is first
    assert variant.built_kernels().count(src.name) == 1
    other = variant.kernel(config, bits=8, group_size=64, language="metal")[0]
    assert other.name != src.name


# --- generator --------------------------------------------------------------

# every preset's kernel once (":g512" only routes large M elsewhere: same kernel)
_EVERY = [parse_name(n) for n in tiled.PRESETS if ":g" not in n] + [
    parse_name("tiled:64x64x64:wm2wn2:d0")]


def test_kernel_names_are_unique_and_carry_every_parameter():
    names = set()
    count = 0
    for config in _EVERY:
        for language in ("metal", "cuda"):
            for bits in (4, 8):
                for gs in (32, 64, 128):
                    src = source.generate(config, bits=bits, group_size=gs, language=language)
                    names.add(src.name)
                    count += 1
                    assert f"_b{bits}_g{gs}_{language}_" in src.name
                    assert re.fullmatch(r"qmmperf_\w+_[0-9a-f]{10}", src.name)
                    if isinstance(config, TileConfig):
                        assert (f"{config.bm}x{config.bn}x{config.bk}_wm{config.wm}wn{config.wn}"
                                in src.name)
    # 64x64x64:d0 differs from the presets; the decode threshold is not in the kernel
    assert len(names) == count
    same = source.generate(TileConfig(32, 32, 32, 2, 2, decode_max_m=0), bits=4, group_size=64,
                           language="cuda")
    assert same == source.generate(parse_name("tiled:32x32:wm2wn2"), bits=4, group_size=64,
                                   language="cuda")
    # nor the M from which a wide variant switches to the dequant kernel
    assert source.generate(parse_name("tiled:wide:w8r2m64:g512"), bits=4, group_size=64,
                           language="cuda") == source.generate(
        parse_name("tiled:wide:w8r2m64"), bits=4, group_size=64, language="cuda")



@pytest.mark.parametrize("language", ["cuda", "metal"])
def test_each_kernel_asks_for_the_dequantization_form_it_measured_fastest_with(language):
    """PERFORMANCE.md 6t: the 16-row skinny kernel keeps C shifts and masks (25% faster at
    one token than with the one-LOP3 form), the 8-row one shifts once a word, and the
    others take the layer's default (one LOP3, one PRMT)."""
    def body(name):
        return source.generate(parse_name(name), bits=4, group_size=64, language=language).body

    skinny16 = body("tiled:skinny:w12r2")
    assert "QmmDq<T, BITS, QMM_OPS_C>" in skinny16
    assert "sk.template load_x<QMM_OPS_C>(" in skinny16
    skinny8 = body("tiled:skinny:w16r3h")
    assert "QmmDq<T, BITS, QMM_OPS_ONE_SHIFT>" in skinny8
    assert "sk.load_x(" in skinny8
    for name in ("tiled:wide:w8r2m64", "tiled:decode", "tiled:dequant"):
        assert "QMM_OPS_" not in body(name), name

@pytest.mark.parametrize(("name", "rounds"), [
    # owned: 2 fragments x the 8 tiles / S rounded up, 16 bytes each for 256 threads (4 KiB)
    ("tiled:wide:w8r2m64:c2", 1),  # 8 owned from 1 other block: 32 KiB of 48
    ("tiled:wide:w8r2m64:c4", 1),  # 4 owned from 3 others: 48 KiB, exactly
    ("tiled:wide:w8r2m64:c5", 2),  # 4 owned from 4 others: 3 fit a round
    ("tiled:wide:w8r2m64:c8", 2),  # 2 owned from 7 others: 1 fits a round
    ("tiled:wide:w4r1m16:c3", 1),
])
def test_cluster_exchange_rounds(name, rounds):
    assert parse_name(name).cluster_rounds == rounds


@pytest.mark.parametrize(("name", "tiles"), [
    ("tiled:wide:w8r2m64:c2", 4),  # 8 token tiles: 4 each
    ("tiled:wide:w8r2m64:c3", 3),  # 3, 3, 2
    ("tiled:wide:w8r2m64:c5", 2),  # 2, 2, 2, 1, 1
    ("tiled:wide:w4r2m32:c8", 1),  # 4 tiles: ranks 4-7 own none
])
def test_a_clusters_first_block_owns_the_most_token_tiles(name, tiles):
    assert parse_name(name).cluster_tiles == tiles


def test_a_cluster_split_is_cuda_only_and_carries_its_cluster_shape():
    config = parse_name("tiled:wide:w8r2m64:c2")
    with pytest.raises(TileError, match=r"^tiled:wide:w8r2m64:c2: splits K over a thread-block "
                                        r"cluster \(c2\), which metal does not have"):
        source.generate(config, bits=4, group_size=64, language="metal")
    src = source.generate(config, bits=4, group_size=64, language="cuda")
    # the shape rides on __global__, which MLX writes after the header; not in the emulation
    assert "#define __global__ __location__(global) __cluster_dims__(1, 2, 1)" in src.header
    assert src.header.index("__cluster_dims__") < src.header.index("QMM_HAS_")
    assert "#if !defined(QMMPERF_CUDA_CPU_EMULATION)" in src.header
    assert "QmmClusterSum<CS" in src.body and "wd.frag.store" not in src.body
    assert "_w8r2m64k1c2_" in src.name and src.output_dtype is None  # T, no planes
    assert source.output_shape(config, 128, 8192, 3072) == (128, 8192)
    # without a cluster: no cluster shape, and the planes' store
    plain = source.generate(parse_name("tiled:wide:w8r2m64:k2"), bits=4, group_size=64,
                            language="cuda")
    assert "__cluster_dims__" not in plain.header and "QmmClusterSum" not in plain.header
    assert "wd.frag.store" in plain.body and plain.output_dtype == "float32"


def test_launch_bounds_only_where_fetching_ahead_would_not_fit_the_block():
    bounded = parse_name("tiled:skinny:w16r3hp")  # 512 threads x 134 registers > 65536
    assert bounded.launch_bounds and bounded.launch_registers == 104
    src = source.generate(bounded, bits=8, group_size=32, language="cuda")
    assert src.header.startswith("#if !defined(QMMPERF_CUDA_CPU_EMULATION)\n#undef __global__\n"
                                 "#define __global__ __location__(global) "
                                 "__launch_bounds__(512)\n#endif\n")
    both = source.generate(parse_name("tiled:skinny:w16r3hp:c2"), bits=4, group_size=64,
                           language="cuda")
    assert ("#define __global__ __location__(global) __cluster_dims__(1, 2, 1) "
            "__launch_bounds__(512)\n") in both.header
    assert "needs sm_90 or later" in both.header
    # 384 x 134 fits: no bounds (they would change ptxas's schedule of a measured kernel)
    for name in ("tiled:skinny:w12r3hp", "tiled:skinny:w16r3h"):
        config = parse_name(name)
        assert not config.launch_bounds and config.launch_registers == config.registers
        src = source.generate(config, bits=4, group_size=64, language="cuda")
        assert "__launch_bounds__" not in src.header and "#undef __global__" not in src.header
    metal = source.generate(bounded, bits=4, group_size=64, language="metal")
    assert "__launch_bounds__" not in metal.header


def test_a_skinny_cluster_split_is_cuda_only_and_shares_out_k():
    config = parse_name("tiled:skinny:w8r6h:c2")
    assert config.shared_bytes == 24576  # the block's sums, kept where warp 0's were
    assert parse_name("tiled:skinny:w12r6h:c2").shared_bytes == 36864  # CUDA's 48 KiB
    with pytest.raises(TileError, match=r"^tiled:skinny:w8r6h:c2: splits K over a thread-block "
                                        r"cluster \(c2\), which metal does not have"):
        source.generate(config, bits=4, group_size=64, language="metal")
    src = source.generate(config, bits=4, group_size=64, language="cuda")
    assert "#define __global__ __location__(global) __cluster_dims__(1, 2, 1)" in src.header
    assert "QmmClusterAdd<CS> ca;" in src.body and "_w8r6hc2_" in src.name
    # block bz's warps take super-steps bz * W + w, then every CS * W further
    assert "for (int ks = (bz * W + int(warp)) * 128; ks < K; ks += CS * W * 128)" in src.body
    assert "if (!PREFETCH || ks == (bz * W + int(warp)) * 128)" in src.body
    assert source.output_shape(config, 16, 3072, 8192) == (16, 3072)
    # without a cluster the source is the one the measured kernels ran
    plain = source.generate(parse_name("tiled:skinny:w8r6h"), bits=4, group_size=64,
                            language="cuda")
    assert "__cluster_dims__" not in plain.header and "QmmClusterAdd" not in plain.header
    assert "for (int ks = int(warp) * 128; ks < K; ks += W * 128)" in plain.body


def test_generator_rejects_unknown_language():
    with pytest.raises(ValueError, match="language='opencl'"):
        source.generate(TileConfig(32, 32), bits=4, group_size=64, language="opencl")


def _normalized(body: str, language: str) -> list[str]:
    """The body with the dialect's own tokens replaced by neutral ones."""
    if language == "metal":
        body = body.replace("threadgroup_barrier(mem_flags::mem_threadgroup)", "BARRIER")
        body = body.replace("threadgroup ", "").replace("device ", "")
    else:
        body = body.replace("__syncthreads()", "BARRIER").replace("__shared__ ", "")
    skip = ("const uint tid", "const unsigned tid", "const uint lane", "const unsigned lane",
            "const uint warp", "const unsigned warp", "const int bx", "const int by")
    return [line for line in body.splitlines() if not line.startswith(skip)]


@pytest.mark.parametrize("config", _EVERY, ids=lambda c: c.name)
def test_metal_and_cuda_bodies_differ_only_in_dialect_tokens(config):
    metal = source.generate(config, bits=4, group_size=64, language="metal").body
    cuda = source.generate(config, bits=4, group_size=64, language="cuda").body
    assert "threadgroup_barrier" in metal or isinstance(config, DecodeConfig)
    assert "__syncthreads()" in cuda or isinstance(config, DecodeConfig)
    assert "__syncthreads" not in metal and "threadgroup" not in cuda
    assert _normalized(metal, "metal") == _normalized(cuda, "cuda")


def test_both_layers_define_the_same_interface():
    metal = (source.PACKAGE / "metal/qmm_layer.h").read_text()
    cuda = "".join((source.PACKAGE / f).read_text()
                   for f in ("cuda/qmm_ptx.cuh", "cuda/qmm_layer.cuh"))
    interface = ["qmm_q2f", "qmm_unit", "qmm_zero4", "qmm_word", "qmm_lo", "qmm_hi",
                 "qmm_pack", "qmm_warp_sum", "struct QmmWarpTile", "void init(", "void mma(",
                 "void store(", "struct QmmSkinny", "void load_x(", "float value(int e)",
                 "int token(int e)", "int out_row(int e)", "struct QmmRowFrags", "struct QmmWide",
                 "#define QMM_WIDE_STEPS", "#define QMM_WIDE_PAIRS"]
    for name in interface:
        assert name in metal and name in cuda, name


def test_compact_source_drops_comments_but_keeps_pragmas():
    text = "  // why\n\n  #pragma unroll\n  for (;;) {  // trailing\n  }\n"
    assert source.compact(text) == "#pragma unroll\nfor (;;) {  // trailing\n}\n"


PRUNE_LAYER = """\
#ifndef LAYER_GUARD
#define LAYER_GUARD
inline int helper(int v) {
return v + 1;
}
template <typename T>
struct Pair;
template <>
struct Pair<int> {
int get() { return helper(1); }
};
inline int unused(int v) { return v; }
#define STEPS 8
#endif  // LAYER_GUARD
"""


def test_prune_keeps_what_the_body_uses_each_declaration_guarded():
    pruned = source.prune(PRUNE_LAYER, "Pair<int> p;\nout[0] = p.get();\n")
    assert pruned == (
        "#ifndef QMM_HAS_helper\n#define QMM_HAS_helper\n"
        "inline int helper(int v) {\nreturn v + 1;\n}\n#endif\n"
        "#ifndef QMM_HAS_Pair\n#define QMM_HAS_Pair\n"
        "template <typename T>\nstruct Pair;\n"
        "template <>\nstruct Pair<int> {\nint get() { return helper(1); }\n};\n#endif\n"
        "#define STEPS 8\n"
    )
    # nothing used: only the other preprocessor lines remain
    assert source.prune(PRUNE_LAYER, "out[0] = 0;\n") == "#define STEPS 8\n"
    assert "unused" in source.prune(PRUNE_LAYER, "out[0] = unused(2);\n")


@pytest.mark.parametrize(("layer", "message"), [
    ("inline int f() {\nreturn 1;\n", "unterminated declaration"),
    ("inline int f() {\n}\n}\n", "unbalanced braces"),
])
def test_prune_refuses_a_layer_it_cannot_split(layer, message):
    with pytest.raises(ValueError, match=message):
        source.prune(layer, "f();")


def test_decode_kernel_carries_a_third_of_the_layer():
    # The kernel launched ~200 times a generated token: MLX copies and hashes
    # its whole source per launch, so it carries only the parts it calls.
    for language in ("cuda", "metal"):
        full = len(source.compact(source.DIALECTS[language].layer()))
        src = tiled.generate(DecodeConfig(), bits=4, group_size=64, language=language)
        assert len(src.header) < full / 3, (language, len(src.header), full)
        assert "QmmWide" not in src.header and "qmm_warp_sum" in src.header


@pytest.mark.parametrize(
    ("config", "M", "N", "grid", "threadgroup"),
    [
        (TileConfig(160, 32, 32, 4, 1), 33, 40, (2 * 128, 1, 1), (128, 1, 1)),
        (TileConfig(32, 32, 32, 2, 2), 8192, 3072, (96 * 128, 256, 1), (128, 1, 1)),
        (TileConfig(128, 64, 64, 4, 2), 129, 64, (256, 2, 1), (256, 1, 1)),
        # K split 4 ways: the y axis walks M's blocks once per part of K
        (TileConfig(128, 64, 64, 4, 2, splits=4), 129, 3072, (48 * 256, 8, 1), (256, 1, 1)),
        (DecodeConfig(4, 4), 1, 8192, (512 * 128, 1, 1), (128, 1, 1)),
        (DecodeConfig(4, 4), 9, 20, (2 * 128, 2, 1), (128, 1, 1)),
        (DecodeConfig(2, 8), 3, 100, (7 * 256, 1, 1), (256, 1, 1)),
        # 8 warps in groups of 4 sharing rows: 2 x 2 rows a block
        (DecodeConfig(2, 8, 1, 4), 1, 1024, (256 * 256, 1, 1), (256, 1, 1)),
        # 16 weight rows a block; 8 tokens a block up to M = 8, then 16
        (SkinnyConfig(8), 8, 3072, (192 * 256, 1, 1), (256, 1, 1)),
        (SkinnyConfig(4), 9, 40, (3 * 128, 1, 1), (128, 1, 1)),
        (SkinnyConfig(4), 33, 16, (128, 3, 1), (128, 1, 1)),
        # two 16-row fragments a block
        (SkinnyConfig(8, 2), 16, 8192, (256 * 256, 1, 1), (256, 1, 1)),
        (SkinnyConfig(4, 3), 3, 100, (3 * 128, 1, 1), (128, 1, 1)),
        # wide: 8 x 2 x 16 = 256 weight rows and 64 tokens a block; K split 2 ways
        (WideConfig(8, 2, 64), 2048, 8192, (32 * 256, 32, 1), (256, 1, 1)),
        (WideConfig(4, 1, 16, splits=4), 17, 100, (2 * 128, 8, 1), (128, 1, 1)),
        # K split over clusters of 2 blocks, consecutive in y
        (WideConfig(8, 2, 64, clusters=2), 128, 8192, (32 * 256, 4, 1), (256, 1, 1)),
        # skinny split over clusters of 3 blocks, consecutive in y (two token blocks)
        (SkinnyConfig(8, 6, half=True, clusters=3), 20, 3072, (64 * 256, 6, 1), (256, 1, 1)),
        # dequant: one weight row a block, whatever M
        (DequantConfig(), 7, 300, (300 * 256, 1, 1), (256, 1, 1)),
        (DequantConfig(), 4096, 3, (3 * 256, 1, 1), (256, 1, 1)),
    ],
)
def test_launch_geometry(config, M, N, grid, threadgroup):
    assert source.geometry(config, M, N) == (grid, threadgroup)


@pytest.mark.parametrize(("M", "tokens"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8),
                                           (9, 8), (500, 8)])
def test_decode_tokens_per_block(M, tokens):
    assert source.decode_tokens(M) == tokens


def test_small_m_goes_to_the_decode_then_the_skinny_kernel():
    fn = variant.TiledQmm(TileConfig(160, 32, 32, 4, 1))
    assert isinstance(fn.kernel_for(1), DecodeConfig)
    assert isinstance(fn.kernel_for(2), SkinnyConfig)
    assert isinstance(fn.kernel_for(16), SkinnyConfig)
    assert fn.kernel_for(17) == TileConfig(160, 32, 32, 4, 1)
    never = variant.TiledQmm(TileConfig(160, 32, 32, 4, 1, decode_max_m=0))
    assert never.kernel_for(1) == never.config
    alone = variant.TiledQmm(SkinnyConfig())
    assert alone.kernel_for(1) == alone.kernel_for(500) == SkinnyConfig()
    wide = variant.TiledQmm(WideConfig(8, 2, 64))
    assert isinstance(wide.kernel_for(1), DecodeConfig)
    assert isinstance(wide.kernel_for(16), SkinnyConfig)
    assert wide.kernel_for(17) == wide.kernel_for(100000) == WideConfig(8, 2, 64)
    # :g512: the dequant kernel and MLX's matmul from M = 512
    gemm = variant.TiledQmm(WideConfig(8, 2, 64, gemm_min_m=512))
    assert gemm.kernel_for(511) == WideConfig(8, 2, 64, gemm_min_m=512)
    assert gemm.kernel_for(512) == gemm.kernel_for(10049) == DequantConfig()
    assert isinstance(gemm.kernel_for(1), DecodeConfig)
    # :q1: M = 1 to mx.quantized_matmul, the rest as before
    mlx1 = variant.TiledQmm(WideConfig(8, 2, 64, gemm_min_m=512, mlx_max_m=1))
    assert mlx1.kernel_for(1) is None
    assert isinstance(mlx1.kernel_for(2), SkinnyConfig)
    assert mlx1.kernel_for(512) == DequantConfig()


def test_small_m_through_mlx_is_mlx_quantized_matmul_exactly():
    # Runs anywhere, the CPU included: no custom kernel is involved up to mlx_max_m.
    fn = get_variant("tiled:wide:w8r2m64:g512:q1").fn
    spec = QmmSpec(M=1, N=96, K=128, dtype="float16")
    inp = make_inputs(spec, seed=3)
    for x in (inp.x, inp.x[None]):  # (1, K) and a decode step's (1, 1, K)
        got = fn(x, inp.w, inp.scales, inp.biases, transpose=True, group_size=64, bits=4)
        want = mx.quantized_matmul(x, inp.w, inp.scales, inp.biases, transpose=True,
                                   group_size=64, bits=4)
        assert got.shape == want.shape
        assert mx.array_equal(got, want).item()
    two = QmmSpec(M=2, N=96, K=128, dtype="float16")
    inp2 = make_inputs(two, seed=3)
    with pytest.raises(RuntimeError, match="needs Metal or CUDA"):  # M = 2: a custom kernel
        fn(inp2.x, inp2.w, inp2.scales, inp2.biases, transpose=True, group_size=64, bits=4)


def test_packing_matches_mx_quantize():
    """The layout the kernels read: value j of a word at bits j*bits, little-endian along K."""
    import numpy as np

    for bits in (4, 8):
        w = mx.random.normal((3, 128), key=mx.random.key(bits))
        packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
        words = np.asarray(packed)
        per = 32 // bits
        k = np.arange(128)
        q = (words[:, k // per] >> ((k % per) * bits)) & ((1 << bits) - 1)
        deq = q * np.asarray(scales)[:, k // 32] + np.asarray(biases)[:, k // 32]
        expected = np.asarray(mx.dequantize(packed, scales, biases, group_size=32, bits=bits))
        np.testing.assert_allclose(deq, expected, rtol=1e-6, atol=1e-6)
