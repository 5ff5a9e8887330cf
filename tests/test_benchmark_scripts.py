"""Pure helpers of the GPU benchmark scripts, checked on the CPU."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_kernel_ab  # noqa: E402
import gpu_kernels  # noqa: E402
import gpu_load_hints  # noqa: E402
import gpu_m128_probe  # noqa: E402
import gpu_wide_ablation  # noqa: E402

from pytest_qmmperf import cuda  # noqa: E402
from pytest_qmmperf.cuda import check as cuda_check  # noqa: E402
from pytest_qmmperf.tiled import parse_name, source, template_args  # noqa: E402


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gate_up:128", {"shape": "gate_up", "M": 128, "ks": 1, "d": 1, "cs": 1, "ra": 1,
                         "kstep": 128, "bt": 128, "flags": []}),
        ("gate_up:128:k4:r2:s64:d2:NOX+NOW", {"shape": "gate_up", "M": 128, "ks": 4, "d": 2,
                                              "cs": 1, "ra": 2, "kstep": 64, "bt": 128,
                                              "flags": ["NOX", "NOW"]}),
        ("down:128:XREG:c4", {"shape": "down", "M": 128, "ks": 1, "d": 1, "cs": 4, "ra": 1,
                              "kstep": 128, "bt": 128, "flags": ["XREG"]}),
        ("gate_up:128:k2:r2:t64:WS", {"shape": "gate_up", "M": 128, "ks": 2, "d": 1, "cs": 1,
                                      "ra": 2, "kstep": 128, "bt": 64, "flags": ["WS"]}),
    ],
)
def test_probe_cases_name_their_knobs(text: str, expected: dict) -> None:
    assert gpu_m128_probe.parse_ss_case(text) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("up:128", "expected SHAPE:M"),
    ("gate_up", "expected SHAPE:M"),
    ("gate_up:128:z2", "'z2' is none of kS, dD, cC, rR, sK, t64, t128 or flags"),
    ("gate_up:128:NOX+FAST", "'NOX+FAST' is none of"),
    ("gate_up:128:t32", "'t32' is none of"),
    ("gate_up:128:WS+XREG", "WS (producer warpgroups) copies x with cp.async"),
    ("gate_up:128:WS:c2", "not with XREG, BULK, CSK or cC"),
    # 256 producer threads against 512 weight rows (r4): a thread's chunks would span rows
    ("gate_up:128:r4:WS", "the 256 producer threads to be a multiple of the block's 512"),
])
def test_probe_refuses_a_malformed_case_naming_it(text: str, fragment: str) -> None:
    pattern = re.escape(f"case {text!r}: ") + ".*" + re.escape(fragment)
    with pytest.raises(ValueError, match=pattern):
        gpu_m128_probe.parse_ss_case(text)


@pytest.mark.parametrize(("text", "expected"), [
    # 2 buffers of dequantized weights (128 rows x 128 k x 2 bytes), 3 of x (128 tokens x
    # 128 k x 2 bytes), 2 of packed weights (128 rows x 64 bytes) and of group terms (8
    # bytes a thread): 65536 + 98304 + 2 x (8192 + 2048)
    ("gate_up:128:k2", 184320),
    # two ahead: 4 x buffers and 3 of packed weights and terms
    ("gate_up:128:k2:d2", 65536 + 4 * 32768 + 3 * (8192 + 2048)),
    # 256 rows, 64-k super-steps: 2 x 32768 + 3 x 16384 + 2 x (8192 + 2048)
    ("gate_up:128:k4:r2:s64", 135168),
    # bulk copies land in rows padded by 16 bytes
    ("gate_up:128:k2:BULK", 65536 + 3 * 128 * 272 + 2 * (8192 + 2048)),
    # 64 tokens, 256 rows: 2 x 65536 of weights, 3 x 16384 of x, 2 x (16384 + 2048)
    ("gate_up:128:k2:r2:t64", 217088),
    # the same with producers: the group terms are theirs (256 of them, 8 bytes each)
    ("gate_up:128:k2:r2:t64:WS", 217088),
])
def test_probe_shared_memory_arithmetic(text: str, expected: int) -> None:
    assert gpu_m128_probe.ss_smem(gpu_m128_probe.parse_ss_case(text)) == expected


@pytest.mark.skipif(cuda_check.nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("text", ["gate_up:128:k2", "gate_up:128:k2:d2:XREG+ROT:c4",
                                  "gate_up:128:k2:BULK", "down:128:k4:CSK",
                                  "gate_up:128:k2:r2:t64:WS", "gate_up:128:k2:r2:t64"])
def test_probe_kernels_compile_for_hopper_without_spills(text: str, tmp_path: Path) -> None:
    src = gpu_m128_probe.ss_source(gpu_m128_probe.parse_ss_case(text))
    result = cuda_check.compile_check([src], tmp_path)
    assert result.returncode == 0, result.log[-4000:]
    k = result.kernel("ss")
    assert (k.spill_stores, k.spill_loads) == (0, 0), k


# --- gpu_wide_ablation.py ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gate_up.256:128:tiled:wide:w8r2m64:c2@NOMMA+NOW",
         (8192, 256, 128, "tiled:wide:w8r2m64:c2", ("NOMMA", "NOW"))),
        ("down:128:tiled:wide:w8r2m64:k5", (3072, 8192, 128, "tiled:wide:w8r2m64:k5", ())),
        ("3000x64:161:tiled:wide:w8r2m64@EPI0", (3000, 64, 161, "tiled:wide:w8r2m64", ("EPI0",))),
        ("down:16:tiled:skinny:w16r3h@SKPREFETCH+LB512",
         (3072, 8192, 16, "tiled:skinny:w16r3h", ("SKPREFETCH", "LB512"))),
    ],
)
def test_ablation_cases_name_shape_k_tokens_kernel_and_ablations(text: str,
                                                                  expected: tuple) -> None:
    case = gpu_wide_ablation.parse_case(text)
    assert (case.N, case.K, case.M, case.name, case.ablations) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("gate_up:0:tiled:wide:w8r2m64", "K and M positive integers"),
        ("up:128:tiled:wide:w8r2m64", "SHAPE one of qo, kv, gate_up, down or NxK"),
        ("gate_up.x:128:tiled:wide:w8r2m64", "expected SHAPE[.K]:M:NAME"),
        ("gate_up:128:tiled:decode", "NAME a tiled:wide: or tiled:skinny kernel"),
        ("gate_up:128:tiled:wide:w8r2m64@NOPE", "ablation 'NOPE' is not one of NODQ, NOMMA"),
    ],
)
def test_ablation_refuses_a_malformed_case_naming_it(text: str, fragment: str) -> None:
    with pytest.raises(gpu_wide_ablation.AblationError) as info:
        gpu_wide_ablation.parse_case(text)
    assert f"case {text!r}" in str(info.value) and fragment in str(info.value)


def _wide(name: str) -> source.KernelSource:
    return source.generate(parse_name(name), bits=4, group_size=64, language="cuda")


@pytest.mark.parametrize("ablation", ["NODQ", "NOMMA", "NOW", "NOXL", "NOXS", "EPI0", "NOSB",
                                      "SB2", "NOBAR", "MBAR"])
@pytest.mark.parametrize("name", ["tiled:wide:w8r2m64:k2", "tiled:wide:w8r2m64:c2"])
def test_each_ablation_edits_the_wide_kernel_it_names(name: str, ablation: str) -> None:
    src = _wide(name)
    header, body = gpu_wide_ablation.ablate(src.header, src.body, [ablation])
    assert header == src.header and body != src.body


def test_the_mbarrier_edit_arrives_after_staging_and_waits_before_the_first_wgmma_only() -> None:
    src = _wide("tiled:wide:w8r2m64:c2")
    _, body = gpu_wide_ablation.ablate(src.header, src.body, ["MBAR"])
    loop = body[body.index("for (int ks = kbeg;"):body.index("wd.finish();")]
    assert "__syncthreads();" not in loop
    # the arrival follows the wait for the wgmma of the super-step before last
    assert loop.index("wd.staged();") < loop.index("mbarrier.arrive") < loop.index("kl = ks + 128;")
    # one wait a super-step, before its first step's wgmma; parity flips as the buffers wrap
    assert loop.count("mbarrier.try_wait.parity") == 1 and "if (s == 0) {" in loop
    assert "use += buf == 0;" in loop
    assert "mbarrier.init.shared::cta.b64" in body[:body.index("for (int ks = kbeg;")]


def test_past_the_estimate_a_refused_wide_configuration_builds_until_the_block_ends() -> None:
    refused = "tiled:wide:w4r2m64"  # 176 live registers estimated, over 160
    with pytest.raises(ValueError, match="176 registers live"):
        parse_name(refused)
    with gpu_wide_ablation.register_estimate(gpu_wide_ablation.PAST_ESTIMATE):
        assert _wide(refused).threads == 128
    with pytest.raises(ValueError, match="over 160"):
        parse_name(refused)
    with gpu_wide_ablation.register_estimate(None):
        with pytest.raises(ValueError, match="over 160"):
            parse_name(refused)


def test_the_barrier_and_wait_ablations_take_out_one_each_of_the_loops_syncs() -> None:
    src = _wide("tiled:wide:w8r2m64:c2")
    header, body = gpu_wide_ablation.ablate(src.header, src.body, ["NOBAR", "NOWAIT"])
    assert src.body.count("__syncthreads();") == body.count("__syncthreads();") + 1
    assert "wd.staged();\nkl = ks + 128;" in body
    staged = header[header.index("void staged()"):]
    staged = staged[:staged.index("void finish()")]
    assert "qmm_wgmma_wait" not in staged and "qmm_fence_async_shared();" in staged
    assert header.count("qmm_wgmma_wait<") == src.header.count("qmm_wgmma_wait<") - 1


@pytest.mark.parametrize("ablations", [["NOFENCE"], ["NOACCFENCE"], ["NOFENCE", "NOACCFENCE"],
                                       ["NOACCFENCE", "NOFENCE"]])
def test_the_fence_ablations_edit_the_layers_wgmma_step_in_either_order(
        ablations: list[str]) -> None:
    src = _wide("tiled:wide:w8r2m64:k2")
    header, body = gpu_wide_ablation.ablate(src.header, src.body, ablations)
    step = header[header.index("void mma(const T* xb, int s"):]
    step = step[:step.index("} else {")]
    assert body == src.body
    assert ("if (s == 0) {\nqmm_wgmma_fence();\n}" in step) == ("NOFENCE" in ablations)
    assert step.count("fence_acc();") == (0 if "NOACCFENCE" in ablations else 2)


def test_the_terms_ahead_edit_loads_them_two_steps_ahead_and_converts_one_ahead() -> None:
    src = _wide("tiled:wide:w8r2m64:k5")
    _, body = gpu_wide_ablation.ablate(src.header, src.body, ["SB2"])
    loop = body[body.index("for (int ks = kbeg;"):]
    before = body[:body.index("for (int ks = kbeg;")]
    # before the loop: this super-step's terms as float, and the next one's as loaded
    assert "sn[f][h] = float(scales[g]);" in before and "sr[f][h] = scales[g];" in before
    assert "T sr[RF][2];\nT br[RF][2];\nint kl = kbeg;" in before
    # in the loop: last step's loads converted, the step after next's loaded
    assert "float(scales[g])" not in loop and "sn[f][h] = float(sr[f][h]);" in loop
    assert "size_t((k + 128) / GS);\nsr[f][h] = scales[g];" in loop
    with pytest.raises(gpu_wide_ablation.AblationError, match="ablation SB2: "):
        plain = _wide("tiled:skinny:w8r2")
        gpu_wide_ablation.ablate(plain.header, plain.body, ["SB2"])


def test_the_epilogue_ablation_still_reads_every_accumulator() -> None:
    # ptxas drops a wgmma whose accumulators nothing reads: the ablated kernel must
    # read them all, or it times half the matrix work.
    src = _wide("tiled:wide:w8r2m64:c2")
    _, body = gpu_wide_ablation.ablate(src.header, src.body, ["EPI0"])
    tail = body[body.index("wd.finish();"):]
    assert "for (int e = 0; e < RF * 4 * (TOK / 8); ++e) {\nsum += wd.frag.value(e);" in tail
    assert "QmmClusterSum" not in tail and "out[0] = static_cast<T>(1.f);" in tail


def test_the_put_ablation_edits_the_cluster_sum_in_the_header() -> None:
    src = _wide("tiled:wide:w8r2m64:c2")
    header, body = gpu_wide_ablation.ablate(src.header, src.body, ["NOPUT"])
    assert body == src.body and "st.shared::cluster" not in header
    with pytest.raises(gpu_wide_ablation.AblationError, match="ablation NOPUT: "):
        plain = _wide("tiled:wide:w8r2m64:k2")
        gpu_wide_ablation.ablate(plain.header, plain.body, ["NOPUT"])


@pytest.mark.parametrize("ablation", ["SYNC1", "SYNC2", "PUT"])
def test_ablations_of_the_earlier_cluster_sum_refuse_todays_kernel(ablation: str) -> None:
    src = _wide("tiled:wide:w8r2m64:c2")
    with pytest.raises(gpu_wide_ablation.AblationError,
                       match=f"ablation {ablation}: this kernel has no cluster sum of the form "
                             r"up to 5a44198"):
        gpu_wide_ablation.ablate(src.header, src.body, [ablation])


@pytest.mark.parametrize("name", ["tiled:skinny:w8r2", "tiled:skinny:w16r3h"])
def test_the_skinny_ablations_edit_both_forms_of_the_kernel(name: str) -> None:
    src = _wide(name)
    edit = {a: gpu_wide_ablation.ablate(src.header, src.body, [a])
            for a in ("XLINE", "SKNOX", "SKNOW", "SKNOGUARD", "LB512")}
    # x's four 16-byte loads of a token: 8 k apart for one lane -> 32 k apart
    header, body = edit["XLINE"]
    assert body == src.body and "const int k = ks + 8 * t;" in header
    assert "static_cast<size_t>(k + 32 * c));" in header
    # x loaded only in a warp's first super-step; the weights live only then
    header, body = edit["SKNOX"]
    assert header == src.header and body.count("if (ks < W * 128) {\n") == 1
    header, body = edit["SKNOW"]
    assert "const bool live = k < K && row < N && ks < W * 128;" in body
    assert "const bool live = k < K && row < N;" not in body
    header, body = edit["SKNOGUARD"]
    assert "if (k < K && m < M) {" not in header and "const bool live = true;" in body
    header, body = edit["LB512"]
    assert header.startswith("#undef __global__\n#define __global__ __location__(global) "
                             "__launch_bounds__(512)\n") and body == src.body


def test_launch_bounds_join_a_cluster_kernels_own_attributes() -> None:
    src = _wide("tiled:wide:w8r2m64:c2")
    header, body = gpu_wide_ablation.ablate(src.header, src.body, ["LB256"])
    assert body == src.body and header.count("#define __global__") == 1
    assert ("#define __global__ __location__(global) __cluster_dims__(1, 2, 1) "
            "__launch_bounds__(256)\n") in header
    bounded = _wide("tiled:skinny:w16r3hp")  # declares its own (ac66385)
    with pytest.raises(gpu_wide_ablation.AblationError, match="declares launch bounds already"):
        gpu_wide_ablation.ablate(bounded.header, bounded.body, ["LB512"])


def test_the_prefetch_ablation_takes_the_8_row_kernel_without_it_only() -> None:
    src = _wide("tiled:skinny:w16r3h")
    _, body = gpu_wide_ablation.ablate(src.header, src.body, ["SKPREFETCH"])
    assert "constexpr bool PREFETCH = true;" in body
    for name in ("tiled:skinny:w12r3hp", "tiled:skinny:w8r2", "tiled:wide:w8r2m64"):
        src = _wide(name)
        with pytest.raises(gpu_wide_ablation.AblationError, match="ablation SKPREFETCH: "):
            gpu_wide_ablation.ablate(src.header, src.body, ["SKPREFETCH"])


@pytest.mark.skipif(cuda_check.nvcc() is None, reason="nvcc is not installed")
def test_ablated_kernels_compile_for_hopper(tmp_path: Path) -> None:
    units = []
    for name, ablations in (("tiled:wide:w8r2m64:c2", ["EPI0", "NOMMA"]),
                            ("tiled:wide:w8r2m64:k2", ["NODQ", "NOW", "NOXL", "NOXS"]),
                            ("tiled:wide:w8r2m64:c2", ["NOBAR", "NOWAIT"]),
                            ("tiled:wide:w8r2m64:k5", ["MBAR"]),
                            ("tiled:wide:w8r2m64:k5", ["SB2"]),
                            ("tiled:skinny:w8r2", ["XLINE", "SKNOX", "SKNOW"]),
                            ("tiled:skinny:w8r2", ["SKNOGUARD"]),
                            ("tiled:skinny:w16r3h", ["SKPREFETCH", "LB512"])):
        config = parse_name(name)
        src = _wide(name)
        header, body = gpu_wide_ablation.ablate(src.header, src.body, ablations)
        src = source.KernelSource(name=src.name + "_ablated_" + "_".join(ablations),
                                  language="cuda", header=header,
                                  body=body, threads=src.threads, output_dtype=src.output_dtype)
        units.append(cuda.translation_unit(src, template=[("T", "float16"),
                                                          *template_args(config, 128)]))
    result = cuda_check.compile_check(units, tmp_path)
    assert result.returncode == 0, result.log[-4000:]
    ablated = [k for k in result.kernels if "_ablated" in k.mangled]
    assert len(ablated) == 8
    # the 8-row kernel fetching ahead, held to 128 registers a thread by its launch
    # bounds: without them it takes more than 512 threads can have (and does not launch)
    assert all((k.spill_stores, k.spill_loads) == (0, 0) for k in ablated)
    assert max(k.registers for k in ablated if "skinny_w16r3h" in k.mangled) <= 128


def test_overlap_probe_cases_try_every_alu_instruction_alone_and_beside_wgmma() -> None:
    cases = gpu_m128_probe.overlap_cases()
    assert len(cases) == 8 + 2 * 4
    for op in (1, 2):
        labels = [c[1] for c in cases if c[0] == op]
        assert labels == ["ALU alone", "both, A from registers, ALU elsewhere",
                          "ALU alone, on a third warpgroup", "both, the ALU on a third warpgroup"]


@pytest.mark.skipif(cuda_check.nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("index", [2, 3, 5, 7, 13])
def test_overlap_probe_kernels_compile_for_hopper(index: int, tmp_path: Path) -> None:
    op, _, ss, mma_on, alu, feed, split = gpu_m128_probe.overlap_cases()[index]
    result = cuda_check.compile_check(
        [gpu_m128_probe.overlap_source(op, ss, mma_on, alu, feed, split)], tmp_path)
    assert result.returncode == 0, result.log[-4000:]
    k = result.kernel("overlap")
    assert (k.spill_stores, k.spill_loads) == (0, 0), k
