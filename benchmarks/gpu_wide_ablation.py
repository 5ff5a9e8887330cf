"""Where the wide and skinny kernels' time goes: the kernel alone with parts of it taken out.

    python benchmarks/gpu_wide_ablation.py gate_up:128:tiled:wide:w8r2m64:c2 \
        gate_up:128:tiled:wide:w8r2m64:c2@EPI0 gate_up.256:128:tiled:wide:w8r2m64:c2@NOMMA
    python benchmarks/gpu_wide_ablation.py --past-estimate gate_up:128:tiled:wide:w4r2m64@NOW

Each case is ``SHAPE[.K]:M:NAME[@ABL[+ABL...]]``: a Llama-3.2-3B projection
(``qo``, ``kv``, ``gate_up``, ``down``) or ``NxK``, optionally with its K
replaced (``.256``: one 128-k super-step), the tokens, a ``tiled:wide:`` or
``tiled:skinny`` kernel name, and ablations from :data:`ABLATIONS`, each a
textual edit of the generated CUDA source (the kernel then runs under a name
of its own; ``--past-estimate`` also builds wide configurations that the
configuration check refuses on its register estimate, as ptxas compiles
them).  An ablated kernel computes wrong sums on purpose; what it still does
costs what it cost.  A few edits change how a kernel runs, not what it
computes (``SKNOGUARD`` on whole tiles, ``SKPREFETCH``, ``LB512``, ``SB2``,
``MBAR``): theirs stay right.  Every ablation keeps every accumulator in use:
ptxas removes a ``wgmma`` whose results nothing reads, which would time a
kernel with half its matrix work gone.

A case is compiled through CuPy from the source MLX compiles
(:func:`gpu_kernels.cupy_kernel`), its error against a float32 reference
printed (expected to be large for an ablated one), and timed as
``gpu_kernel_ab.py --parts`` times a kernel: alone, without the addition of a
split's planes, the median of three replays of a CUDA graph over weight sets
rotated past L2.  Run it in the tree to measure (``cd`` into a ``git archive``
of an older commit to ablate that commit's kernel: the edits name source text,
and one that no longer matches stops the run, naming the ablation).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SHAPES = {"qo": (3072, 3072), "kv": (1024, 3072), "gate_up": (8192, 3072),
          "down": (3072, 8192)}


class AblationError(ValueError):
    """An ablation whose source text is not in the kernel (or a malformed case)."""


def _swap(text: str, old: str, new: str, ablation: str) -> str:
    if old not in text:
        raise AblationError(f"ablation {ablation}: {old[:60]!r} is not in this kernel's source; "
                            "it applies to the wide kernel of the commit it was written for")
    return text.replace(old, new)


_KEEP_PAIRS = """
#pragma unroll
for (int f = 0; f < RF; ++f) {
#pragma unroll
for (int p = 0; p < QMM_WIDE_PAIRS; ++p) {
asm volatile("" :: "r"(pa[f][p]), "r"(pb[f][p]));
}
}"""

# Every accumulator read, so that no wgmma is dead; the sum written only if it is
# a value no real sum takes.
_SUM_ALL = """
{
float sum = 0.f;
#pragma unroll
for (int e = 0; e < RF * 4 * (TOK / 8); ++e) {
sum += wd.frag.value(e);
}
if (sum == 12345.f) {
out[0] = static_cast<T>(1.f);
}
}
"""


def _epilogue(body: str, ablation: str, code: str) -> str:
    mark = "wd.finish();"
    if mark not in body:
        raise AblationError(f"ablation {ablation}: no {mark!r} in this kernel's source")
    return body[:body.index(mark) + len(mark)] + "\n" + code


# For the cluster sum as it was up to 5a44198 (QmmClusterSum<CS, ACCS, ...>,
# put(e, v) a float at a time): its barriers alone, then its puts as well.
_OLD_SUM = "Sum cs;\ncs.init((float*)xs_raw, int(tid));\n"


def _old_cluster(body: str, ablation: str, code: str) -> str:
    if _OLD_SUM not in body:
        raise AblationError(f"ablation {ablation}: this kernel has no cluster sum of the form "
                            "up to 5a44198 (Sum cs; cs.init(...))")
    return body[:body.index(_OLD_SUM)] + _OLD_SUM + code + _SUM_ALL


_SKINNY_X = ("sk.template load_x<QMM_OPS_C>(x, m0, ks, K, M);", "sk.load_x(x, m0, ks, K, M);")


def _first_x(body: str, ablation: str) -> str:
    for call in _SKINNY_X:
        if call in body:
            return body.replace(call, "if (ks < W * 128) {\n" + call + "\n}")
    raise AblationError(f"ablation {ablation}: no skinny kernel's x load in this kernel's source")


_TERMS = ("sn[f][h] = 0.0f;\nbn[f][h] = 0.0f;\nif (live) {\n"
          "const size_t g = size_t(row) * size_t(G) + size_t(k / GS);\n"
          "sn[f][h] = float(scales[g]);\nbn[f][h] = float(biases[g]);\n}\n")
_TERMS_AHEAD = ("sr[f][h] = T(0.0f);\nbr[f][h] = T(0.0f);\nif (row < N && k + 128 < K) {\n"
                "const size_t g = size_t(row) * size_t(G) + size_t((k + 128) / GS);\n"
                "sr[f][h] = scales[g];\nbr[f][h] = biases[g];\n}\n")


def _terms_ahead(body: str, ablation: str) -> str:
    """The wide kernel's group terms loaded a super-step earlier, as T, and converted to
    float a super-step before their use (where they are loaded now)."""
    if body.count(_TERMS) != 2 or "int kl = kbeg;" not in body:
        raise AblationError(f"ablation {ablation}: this kernel's source has not the wide "
                            "kernel's two loads of its group terms")
    first = body.index(_TERMS)
    second = body.index(_TERMS, first + 1)
    body = (body[:second] + "sn[f][h] = float(sr[f][h]);\nbn[f][h] = float(br[f][h]);\n"
            + _TERMS_AHEAD + body[second + len(_TERMS):])
    body = body[:first] + _TERMS + _TERMS_AHEAD + body[first + len(_TERMS):]
    return body.replace("int kl = kbeg;", "T sr[RF][2];\nT br[RF][2];\nint kl = kbeg;", 1)


# The barriers' addresses by CUDA's intrinsic, not the layer's qmm_smem_addr (an asm
# statement the compiler cannot fold): that changes the SASS that 6y measured.
_MBAR_INIT = """
__shared__ unsigned long long qmm_full[XB];
if (tid == 0) {
#pragma unroll
for (int b = 0; b < XB; ++b) {
asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(
    static_cast<unsigned>(__cvta_generic_to_shared(&qmm_full[b]))), "r"(THREADS) : "memory");
}
}
__syncthreads();
int use = 0;
"""
_MBAR_ARRIVE = """wd.staged();
asm volatile("{\\n.reg .b64 st;\\nmbarrier.arrive.shared::cta.b64 st, [%0];\\n}" ::"r"(
    static_cast<unsigned>(__cvta_generic_to_shared(&qmm_full[buf]))) : "memory");
"""
_MBAR_WAIT = """if (s == 0) {
const unsigned bar = static_cast<unsigned>(__cvta_generic_to_shared(&qmm_full[buf]));
unsigned done = 0;
while (!done) {
asm volatile("{\\n.reg .pred p;\\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\\n"
             "selp.u32 %0, 1, 0, p;\\n}" : "=r"(done) : "r"(bar), "r"(use & 1) : "memory");
}
}
wd.mma(xb, s, pa, pb);"""


def _mbarriers(body: str, ablation: str) -> str:
    """The loop's block barrier split in two: each thread arrives on its buffer's
    mbarrier once it has staged its part of x (after the wait for the wgmma of the
    super-step before last, as before the barrier), and waits on it only before the
    super-step's first wgmma; the loads of the next super-step and the first step's
    dequantization run in between. Right, not an ablation: a buffer read at super-step s
    is restaged at s + XB, after its restager has waited on the buffer of s + XB - 1, on
    which every thread arrived only once its reads of this one were done (its ``wgmma``
    waited for two super-steps on; ``mma.sync``'s reads, XB = 2, are synchronous)."""
    body = _swap(body, "int buf = 0;\nfor (int ks = kbeg;",
                 _MBAR_INIT + "int buf = 0;\nfor (int ks = kbeg;", ablation)
    body = _swap(body, "wd.staged();\n__syncthreads();\n", _MBAR_ARRIVE, ablation)
    body = _swap(body, "wd.mma(xb, s, pa, pb);", _MBAR_WAIT, ablation)
    return _swap(body, "buf = buf + 1 == XB ? 0 : buf + 1;\n",
                 "buf = buf + 1 == XB ? 0 : buf + 1;\nuse += buf == 0;\n", ablation)


def _bounds(header: str, threads: int, ablation: str) -> str:
    """Launch bounds on ``__global__``: added to the kernel's own attributes (a cluster's
    shape) where it has some."""
    bounds = f"__launch_bounds__({threads})"
    if "__launch_bounds__" in header:
        raise AblationError(f"ablation {ablation}: this kernel declares launch bounds already")
    line = "#define __global__ __location__(global)"
    if line in header:
        start = header.index(line)
        end = header.index("\n", start)
        return header[:end] + " " + bounds + header[end:]
    return "#undef __global__\n" + line + " " + bounds + "\n" + header


Edit = Callable[[str, str, str], tuple[str, str]]

#: name -> (what it takes out, edit(header, body, name) -> (header, body)).
ABLATIONS: dict[str, tuple[str, Edit]] = {
    "NODQ": ("the dequantization (each pair is its packed word, masked)", lambda h, b, a: (h, _swap(
        _swap(b, "pa[f][p] = dq[f][0].pair(wc[f][0][q / PW], q % PW);",
              "pa[f][p] = wc[f][0][q / PW] & 0x3c003c00u;", a),
        "pb[f][p] = dq[f][1].pair(wc[f][1][q / PW], q % PW);",
        "pb[f][p] = wc[f][1][q / PW] & 0x3c003c00u;", a))),
    "NOMMA": ("the matrix instructions (the dequantized pairs kept alive)",
              lambda h, b, a: (h, _swap(b, "wd.mma(xb, s, pa, pb);", _KEEP_PAIRS, a))),
    "NOW": ("the weights' loads after the first super-step",
            lambda h, b, a: (h, _swap(b, "const bool live = k < K && row < N;",
                                      "const bool live = k < K && row < N && kl == kbeg;", a))),
    "NOSB": ("the weights' scales and biases' loads after the first super-step (the "
             "weights' own loads stay)",
             lambda h, b, a: (h, _swap(b, "bn[f][h] = 0.0f;\nif (live) {",
                                       "bn[f][h] = 0.0f;\nif (live && kl == kbeg) {", a))),
    "SB2": ("nothing: the group terms loaded two super-steps ahead (as T) and converted "
            "one ahead, where the kernel loads and converts them one ahead",
            lambda h, b, a: (h, _terms_ahead(b, a))),
    "NOXL": ("x's loads after the first super-step",
             lambda h, b, a: (h, _swap(b, "m0 + r < M && kl + c < K) {",
                                       "m0 + r < M && kl + c < K && kl == kbeg) {", a))),
    "NOXS": ("x's staging stores after the first super-step",
             lambda h, b, a: (h, _swap(b, "qmm_wide_stage<T, BITS, TOK / 8, W, RF, XP>(xb",
                                       "if (kl == kbeg) qmm_wide_stage<T, BITS, TOK / 8, W, RF, "
                                       "XP>(xb", a))),
    "NOBAR": ("the block's barrier after each super-step's staging (its buffers then race: "
              "timing only)",
              lambda h, b, a: (h, _swap(b, "wd.staged();\n__syncthreads();\n",
                                        "wd.staged();\n", a))),
    "NOWAIT": ("each super-step's wait for the wgmma of the super-step before last (its "
               "buffer then races: timing only)",
               lambda h, b, a: (_swap(h, "qmm_fence_async_shared();\n"
                                         "qmm_wgmma_wait<QMM_WIDE_STEPS>();",
                                      "qmm_fence_async_shared();", a), b)),
    "MBAR": ("nothing: the loop's barrier split into an arrival on the staged buffer's "
             "mbarrier and a wait before its first wgmma",
             lambda h, b, a: (h, _mbarriers(b, a))),
    "EPI0": ("everything after the K loop (the sums read, nothing written)",
             lambda h, b, a: (h, _epilogue(b, a, _SUM_ALL))),
    "NOPUT": ("the cluster sum's stores into other blocks (its barriers stay)",
              lambda h, b, a: (_swap(h, "st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};",
                                     "mov.b32 %0, %0;", a), b)),
    "NOFENCE": ("the wgmma fence of every step but a super-step's first (its A registers are "
                "then unordered: timing only)",
                lambda h, b, a: (_swap(h, "qmm_wgmma_fence();\n#pragma unroll\n"
                                          "for (int f = 0; f < RF; ++f) {\nconst uint32_t a[4]",
                                       "if (s == 0) {\nqmm_wgmma_fence();\n}\n#pragma unroll\n"
                                       "for (int f = 0; f < RF; ++f) {\nconst uint32_t a[4]", a),
                                 b)),
    "NOACCFENCE": ("the compiler-only fences on the accumulators around each step's wgmma",
                   lambda h, b, a: (_swap(_swap(h, "if constexpr (WG) {\nfence_acc();\n",
                                                "if constexpr (WG) {\n", a),
                                          "fresh = 0;\nfence_acc();\n", "fresh = 0;\n", a), b)),
    # The skinny kernels (a warp loads its x and weights each super-step it takes).
    "XLINE": ("x's loads, each lane's four 16 bytes of a token moved so that the four "
              "lanes of a token read 64 contiguous bytes an instruction (k = 8t + 32c "
              "instead of 32t + 8c: as many bytes, in half the sectors and lines)",
              lambda h, b, a: (_swap(_swap(h, "const int k = ks + 32 * t;",
                                           "const int k = ks + 8 * t;", a),
                                     "static_cast<size_t>(k + 8 * c));",
                                     "static_cast<size_t>(k + 32 * c));", a), b)),
    "SKNOX": ("x's loads after a warp's first super-step (the first x kept)",
              lambda h, b, a: (h, _first_x(b, a))),
    "SKNOW": ("the weights' loads after a warp's first super-step (zeros from then on)",
              lambda h, b, a: (h, _swap(b, "const bool live = k < K && row < N;",
                                        "const bool live = k < K && row < N && ks < W * 128;",
                                        a))),
    "SKNOGUARD": ("the range checks of x's and the weights' loads (still right where the "
                  "tokens, rows and K fill whole fragments and super-steps)",
                  lambda h, b, a: (_swap(h, "if (k < K && m < M) {", "if (true) {", a),
                                   _swap(b, "const bool live = k < K && row < N;",
                                         "const bool live = true;", a))),
    "SKPREFETCH": ("nothing: the 8-row skinny kernel's weights fetched a super-step ahead "
                   "(its `p`), where the configuration check would refuse it for 8 bits",
                   lambda h, b, a: (h, _swap(b, "constexpr bool PREFETCH = false;",
                                             "constexpr bool PREFETCH = true;", a))),
    "LB512": ("nothing: the kernel declared for blocks of up to 512 threads "
              "(__launch_bounds__(512), so ptxas keeps to 128 registers a thread)",
              lambda h, b, a: (_bounds(h, 512, a), b)),
    "LB256": ("nothing: the kernel declared for blocks of up to 256 threads "
              "(__launch_bounds__(256): no register limit below 255, a schedule of ptxas's "
              "own)", lambda h, b, a: (_bounds(h, 256, a), b)),
    "SYNC1": ("the cluster sum as up to 5a44198, cut to its first barrier",
              lambda h, b, a: (h, _old_cluster(b, a, ""))),
    "SYNC2": ("the cluster sum as up to 5a44198, cut to its two barriers",
              lambda h, b, a: (h, _old_cluster(b, a, "cs.sync();\n"))),
    "PUT": ("the cluster sum as up to 5a44198, cut to its barriers and puts",
            lambda h, b, a: (h, _old_cluster(
                b, a, "#pragma unroll\nfor (int e = 0; e < ACCS; ++e) {\nif (!cs.owns(e)) {\n"
                      "cs.put(e, wd.frag.value(e));\n}\n}\ncs.sync();\n"))),
}


def ablate(header: str, body: str, ablations: list[str]) -> tuple[str, str]:
    """The kernel's ``(header, body)`` with each of ``ablations`` applied in turn."""
    for name in ablations:
        if name not in ABLATIONS:
            raise AblationError(f"ablation {name!r}: expected one of {', '.join(ABLATIONS)}")
        header, body = ABLATIONS[name][1](header, body, name)
    return header, body


@dataclasses.dataclass(frozen=True)
class Case:
    text: str
    N: int
    K: int
    M: int
    name: str
    ablations: tuple[str, ...]


def parse_case(text: str) -> Case:
    """``"gate_up.256:128:tiled:wide:w8r2m64:c2@NOMMA+NOW"`` -> N 8192, K 256, M 128, ..."""
    shape, _, rest = text.partition(":")
    m, _, spec = rest.partition(":")
    name, _, abl = spec.partition("@")
    shape, _, k = shape.partition(".")
    try:
        N, K = SHAPES[shape] if shape in SHAPES else (int(v) for v in shape.split("x"))
        K = int(k) if k else K
        M = int(m)
    except ValueError:
        N = K = M = 0
    if min(N, K, M) < 1 or not name.startswith(("tiled:wide:", "tiled:skinny")):
        raise AblationError(
            f"case {text!r}: expected SHAPE[.K]:M:NAME[@ABL[+ABL...]] with SHAPE one of "
            f"{', '.join(SHAPES)} or NxK, K and M positive integers, NAME a tiled:wide: or "
            "tiled:skinny kernel"
        )
    ablations = tuple(abl.split("+")) if abl else ()
    for a in ablations:
        if a not in ABLATIONS:
            raise AblationError(f"case {text!r}: ablation {a!r} is not one of "
                                f"{', '.join(ABLATIONS)}")
    return Case(text, N, K, M, name, ablations)


#: What ``--past-estimate`` raises the wide kernel's live-register estimate to: every
#: configuration of at most 255 registers a thread then builds, and ptxas decides.
PAST_ESTIMATE = 255


@contextlib.contextmanager
def register_estimate(limit: int | None) -> Iterator[None]:
    """Inside, the configuration check refuses a wide configuration only past ``limit``
    live registers (``None``: as it stands); restored on the way out."""
    import pytest_qmmperf.tiled.config as config_module

    saved = config_module.MAX_WIDE_LIVE_REGISTERS
    if limit is not None:
        config_module.MAX_WIDE_LIVE_REGISTERS = limit
    try:
        yield
    finally:
        config_module.MAX_WIDE_LIVE_REGISTERS = saved


def run(case: Case, past_estimate: bool = False) -> dict[str, Any]:
    """Compile, check and time one case on the GPU (the tree in the working directory).

    ``past_estimate``: build a wide configuration that the configuration check refuses on
    its register estimate (``WideConfig.live_registers``), to measure it as ptxas compiles
    it; the check is restored afterwards.
    """
    import cupy as cp
    import gpu_decode as gd
    import gpu_kernels as gk

    import pytest_qmmperf.tiled as tiled

    generate = tiled.generate

    def ablated(config: Any, **kwargs: Any) -> Any:
        src = generate(config, **kwargs)
        if not case.ablations:
            return src
        header, body = ablate(src.header, src.body, list(case.ablations))
        return dataclasses.replace(src, header=header, body=body,
                                   name=src.name + "_" + "_".join(case.ablations))

    tiled.generate = ablated  # cupy_kernel imports it by name when called
    try:
        with register_estimate(PAST_ESTIMATE if past_estimate else None):
            launch = gk.cupy_kernel(case.name, case.M, case.N, case.K)
    finally:
        tiled.generate = generate
    sets = gk.cupy_operands(case.M, case.N, case.K, gk.rotation(case.N * case.K // 2))
    x, w, s, b, _ = sets[0]
    ref = gd.reference(x, w, s, b)
    error = gd.max_error(launch, sets, float(cp.abs(ref).max()), ref)
    seconds = gk.kernel_time(getattr(launch, "kernel", launch), sets)
    return {"case": case.text, "us": seconds * 1e6, "error": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="SHAPE[.K]:M:NAME[@ABL[+ABL...]]")
    parser.add_argument("--past-estimate", action="store_true",
                        help="also build wide configurations the configuration check refuses "
                             "on its register estimate (ptxas decides)")
    args = parser.parse_args(argv)
    try:
        cases = [parse_case(text) for text in args.cases]
    except AblationError as exc:
        parser.error(str(exc))
    tree = Path.cwd()
    sys.path[:0] = [str(tree), str(tree / "benchmarks")]  # the tree being measured
    for case in cases:
        row = run(case, past_estimate=args.past_estimate)
        print(f"{row['case']:60s} {row['us']:8.2f} us  err {row['error']:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
