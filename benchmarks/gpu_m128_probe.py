"""What bounds a fused 4-bit kernel at 128 tokens on the H100: six probes (PERFORMANCE.md 6u, 6w).

    python benchmarks/gpu_m128_probe.py wgmma     # wgmma's rate, A from registers or shared memory
    python benchmarks/gpu_m128_probe.py l2        # how fast 128 blocks read L2-resident bytes
    python benchmarks/gpu_m128_probe.py overlap   # whether other instructions run beside wgmma
    python benchmarks/gpu_m128_probe.py ss gate_up:128:k2 gate_up:128:k2:NOX ...
    python benchmarks/gpu_m128_probe.py cluster   # clusters through mx.fast.cuda_kernel
    python benchmarks/gpu_m128_probe.py smem      # dynamic shared memory past 48 KiB, same

None of this is a shipped kernel.  ``ss`` is a prototype of the other way to
feed Hopper's ``wgmma`` (the shipped wide kernel keeps the dequantized
weights in registers, PERFORMANCE.md 6s): a block of ``2 x 64`` weight rows
and 128 tokens copies, per 128-k super-step, its packed weights and their
group terms with ``cp.async``, dequantizes them into shared memory in k
order (one ``prmt``, one ``lop3`` and two ``fma.rn.f16x2`` a pair), copies x
there too, and multiplies with both operands in shared memory
(``m64n128k16``, 8 a super-step and warpgroup).  float16, 4 bits, group 64,
K a multiple of 128 x splits, N of 128.  A case is ``SHAPE:M`` then any of
``kS`` (K split over S blocks, planes added by a second kernel), ``dD``
(copies issued D super-steps ahead), ``cC`` (clusters of C blocks along N
that share x: each loads 1/C of it and stores it into every member's shared
memory), ``rR`` (R 64-row tiles a warpgroup), ``sK`` (K-step), ``t64`` (64
tokens a block instead of 128: ``m64n64k16``) and flags joined by ``+``: ``WS``
(warp-specialized: two more warpgroups copy and dequantize, the first two
only multiply, named barriers between them; 6w), ``NOX`` / ``NOW`` (skip the
copies of x / of the weights), ``NODQ`` (skip the dequantization), ``NOMMA``,
``XREG`` (x through registers and ``st.shared`` instead of ``cp.async``),
``BULK`` (x by ``cp.async.bulk``, 256 bytes a token, into rows the MMA does
not read: a rate probe only), ``ROT`` (blocks start K at different
super-steps). An ablated case (``NOX`` to ``NOMMA``) computes garbage; its
error is reported, not checked.  Times: a CUDA graph of 50+ launches over weight sets rotated past
L2 (as ``gpu_kernels.event_time``), median of three.

The probe keeps its own small PTX helpers (``smem``, ``desc``, ``hfma2``, ...),
operands and graph-replay loop instead of the CUDA layer's ``qmm_*`` functions
and ``gpu_decode.problem`` / ``gpu_kernels.kernel_time``, on purpose: switched to
those, the same cases measured -18% to +5% apart (PERFORMANCE.md 6u), so 6u's
figures are reproduced only by the code that produced them.

``cluster`` and ``smem`` need MLX (CUDA); the others only CuPy.  Each prints one JSON
line a case and writes ``m128_probe_<probe>.json`` under ``$OUT`` (default
``results/``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

SHAPES = {"qo": (3072, 3072), "kv": (1024, 3072), "gate_up": (8192, 3072), "down": (3072, 8192)}
BANDWIDTH = 2.55e12  # the floor's ceilings, as gpu_kernels.py
FP16_RATE = 660e12


def _wgmma_asm(n: int, ss: bool, accumulate: str) -> str:
    """Inline PTX of one ``wgmma.mma_async.m64n{n}k16.f32.f16.f16`` into ``d[0 .. n/2)``."""
    acc = n // 2
    outs = ", ".join(f"%{i}" for i in range(acc))
    binds = ", ".join(f'"+f"(d[{i}])' for i in range(acc))
    if ss:
        a_op, a_in, tail = f"%{acc}", '"l"(da)', "1, 1, 0, 0"
        b_op, p_op, b_in = f"%{acc + 1}", acc + 2, '"l"(db)'
    else:
        a_op = "{" + ", ".join(f"%{acc + i}" for i in range(4)) + "}"
        a_in, tail = '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])', "1, 1, 0"
        b_op, p_op, b_in = f"%{acc + 4}", acc + 5, '"l"(db)'
    return (
        f'asm volatile("{{\\n .reg .pred p;\\n setp.ne.b32 p, %{p_op}, 0;\\n'
        f' wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{outs}}}, {a_op}, {b_op},'
        f' p, {tail};\\n}}\\n" : {binds} : {a_in}, {b_in}, "r"({accumulate}) : "memory");'
    )


_COMMON = r"""
#include <cuda_fp16.h>
typedef unsigned int uint32_t;
__device__ __forceinline__ uint32_t smem(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
// wgmma's shared-memory descriptor, no swizzle: lbo bytes between the core matrices of
// one row group along k, sbo between row groups (8 rows of 16 bytes each).
__device__ __forceinline__ unsigned long long desc(uint32_t addr, int lbo, int sbo) {
  return (unsigned long long)((addr >> 4) & 0x3FFF) |
         ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32);
}
"""


# --- wgmma: the tensor cores' rate, with nothing else to do -------------------------------------

# wgmma and overlap: one wgmma (A from registers or shared memory, as MMA_ASM reads it) and
# the operands in shared memory, ones and alternating bits, made visible to wgmma.
_OPERANDS = r"""
__device__ __forceinline__ void mma(float* d, const uint32_t (&a)[4], unsigned long long da,
                                    unsigned long long db) {
  MMA_ASM
}
__device__ __forceinline__ void fill_operands(unsigned short* A, unsigned short* B) {
  for (int i = threadIdx.x; i < 8192; i += blockDim.x) B[i] = 0x3c00 ^ (i & 1);
  for (int i = threadIdx.x; i < 4096; i += blockDim.x) A[i] = 0x3c00;
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
}
"""

_RATE_SRC = r"""
extern "C" __global__ void __launch_bounds__(128 * WG) rate(float* out, int iters) {
  __shared__ __align__(1024) unsigned short A[4096];
  __shared__ __align__(1024) unsigned short B[8192];
  fill_operands(A, B);
  const unsigned long long da = desc(smem(A), ALBO, ASBO), db = desc(smem(B), BLBO, BSBO);
  uint32_t a[4];
  for (int i = 0; i < 4; ++i) a[i] = 0x00010001u * (threadIdx.x + i);
  float d[RF][N / 2];
  for (int f = 0; f < RF; ++f)
    for (int i = 0; i < N / 2; ++i) d[f][i] = 0.0f;
  for (int it = 0; it < iters; ++it) {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int f = 0; f < RF; ++f) mma(d[f], a, da, db);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  float s = 0.0f;
  for (int f = 0; f < RF; ++f)
    for (int i = 0; i < N / 2; ++i) s += d[f][i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""

#: (N, accumulator sets a warpgroup, warpgroups a block, A in shared memory, A's lbo/sbo, B's)
RATE_CASES = [
    (64, 1, 1, False, (128, 256), (128, 256)), (64, 2, 2, False, (128, 256), (128, 256)),
    (128, 1, 1, False, (128, 256), (128, 256)), (128, 1, 2, False, (128, 256), (128, 256)),
    (128, 2, 2, False, (128, 256), (128, 256)), (256, 1, 2, False, (128, 256), (128, 256)),
    (64, 1, 2, True, (128, 256), (128, 256)), (128, 1, 2, True, (128, 256), (128, 256)),
    (128, 1, 2, True, (2048, 128), (2048, 128)), (64, 2, 2, True, (2048, 128), (1024, 128)),
]


def rate_source(n: int, rf: int, wg: int, ss: bool, a_lbo_sbo: tuple[int, int],
                b_lbo_sbo: tuple[int, int]) -> str:
    defs = (f"#define N {n}\n#define RF {rf}\n#define WG {wg}\n#define ALBO {a_lbo_sbo[0]}\n"
            f"#define ASBO {a_lbo_sbo[1]}\n#define BLBO {b_lbo_sbo[0]}\n"
            f"#define BSBO {b_lbo_sbo[1]}\n")
    return defs + _COMMON + (_OPERANDS + _RATE_SRC).replace("MMA_ASM", _wgmma_asm(n, ss, "1"))


def _one_launch_s(src: str, name: str, threads: int, iters: int, blocks: int = 132) -> float:
    """Median over 5 timed launches (after one short one) of kernel ``name(out, iters)``."""
    import cupy as cp

    fn = cp.RawModule(code=src, options=("--gpu-architecture=sm_90a",)).get_function(name)
    out = cp.zeros(blocks * threads, dtype=cp.float32)
    fn((blocks,), (threads,), (out, cp.int32(10)))
    times = []
    for _ in range(5):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn((blocks,), (threads,), (out, cp.int32(iters)))
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
    return statistics.median(times)


def probe_wgmma() -> list[dict[str, Any]]:
    """FLOP/s of back-to-back wgmma on 132 blocks (8 a commit group, the last group in flight)."""
    rows = []
    for n, rf, wg, ss, (alb, asb), (blb, bsb) in RATE_CASES:
        blocks, iters = 132, 2000
        t = _one_launch_s(rate_source(n, rf, wg, ss, (alb, asb), (blb, bsb)), "rate", 128 * wg,
                          iters, blocks)
        flops = 2 * 64 * n * 16 * 8 * rf * iters * wg * blocks
        rows.append({"n": n, "acc_sets": rf, "warpgroups": wg, "a": "smem" if ss else "registers",
                     "a_lbo_sbo": [alb, asb], "b_lbo_sbo": [blb, bsb],
                     "tflops": round(flops / t / 1e12, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- overlap: does other work run while a warpgroup's wgmma do? ---------------------------------

_OVERLAP_SRC = r"""
// The ALU step: fma.rn.f16x2 (OP 0, what the dequantization uses), fma.rn.f32 (1) or
// lop3.b32 (2), each dependent on the last.
__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  if (OP == 0) {
    asm volatile("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  } else if (OP == 1) {
    asm volatile("fma.rn.f32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  } else {
    asm volatile("lop3.b32 %0, %1, %2, %3, 0x96;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  }
  return r;
}
// Two warpgroups, RF m64n64k16 a step, a commit group a step, eight steps in flight at most (as
// the wide kernel). Between steps ALU dependent fma.rn.f16x2 in each of 4 chains: into the next
// step's A fragment (FEED) or into registers no wgmma reads.
// SPLIT: a third warpgroup does the ALU work and the first two
// only the wgmma: the same work on other warps.
extern "C" __global__ void __launch_bounds__(384) overlap(float* out, int iters) {
  const bool alu_here = SPLIT ? threadIdx.x >= 256 : true;
  const bool mma_here = SPLIT ? threadIdx.x < 256 : true;
  __shared__ __align__(1024) unsigned short A[4096];
  __shared__ __align__(1024) unsigned short B[8192];
  fill_operands(A, B);
  const unsigned long long da = desc(smem(A), 128, 256), db = desc(smem(B), 128, 256);
  uint32_t a[4], c[4];
  for (int i = 0; i < 4; ++i) a[i] = c[i] = 0x00010001u * (threadIdx.x + i);
  float d[RF][32];
  for (int f = 0; f < RF; ++f)
    for (int i = 0; i < 32; ++i) d[f][i] = 0.0f;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int step = 0; step < 8; ++step) {
      if (alu_here) {
#pragma unroll
        for (int l = 0; l < ALU; ++l)
#pragma unroll
          for (int i = 0; i < 4; ++i) c[i] = hfma2(c[i], 0x3c003c00u, 0x00010001u);
      }
      if (FEED) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = c[i];
      }
      if (MMA && mma_here) {
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int f = 0; f < RF; ++f) mma(d[f], a, da, db);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      }
    }
    if (MMA && mma_here) asm volatile("wgmma.wait_group.sync.aligned 8;\n" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  float s = 0.0f;
  for (int f = 0; f < RF; ++f)
    for (int i = 0; i < 32; ++i) s += d[f][i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s + float(c[0] ^ c[1] ^ c[2] ^ c[3]);
}
"""

#: (label, A from shared memory, wgmma on, ALU steps between them, ALU writes the next A,
#: a third warpgroup does the ALU work)
OVERLAP_CASES = [
    ("wgmma alone, A from registers", False, True, 0, False, False),
    ("ALU alone", False, False, 16, False, False),
    ("both, A from registers, ALU elsewhere", False, True, 16, False, False),
    ("both, A from registers, ALU writes the next A", False, True, 16, True, False),
    ("wgmma alone, A from shared memory", True, True, 0, False, False),
    ("both, A from shared memory", True, True, 16, False, False),
    ("ALU alone, on a third warpgroup", False, False, 16, False, True),
    ("both, the ALU on a third warpgroup", False, True, 16, False, True),
]
#: The ALU instruction of the cases above (fma.rn.f16x2), then the same cases of ALU alone
#: and both with fma.rn.f32 and with lop3.b32 instead.
OVERLAP_OPS = {0: "fma.rn.f16x2", 1: "fma.rn.f32", 2: "lop3.b32"}


def overlap_cases() -> list[tuple[int, str, bool, bool, int, bool, bool]]:
    """Every case of :data:`OVERLAP_CASES` with fma.rn.f16x2; with the other ALU instructions,
    those of ALU alone and of both without A fed or from shared memory."""
    return [(op, *case) for op in OVERLAP_OPS for case in OVERLAP_CASES
            if op == 0 or (case[3] and not case[4] and not case[1])]


def overlap_source(op: int, ss: bool, mma_on: bool, alu: int, feed: bool, split: bool) -> str:
    defs = (f"#define RF 2\n#define ALU {alu}\n#define FEED {int(feed)}\n"
            f"#define MMA {int(mma_on)}\n#define SPLIT {int(split)}\n#define OP {op}\n")
    return defs + _COMMON + (_OPERANDS + _OVERLAP_SRC).replace("MMA_ASM", _wgmma_asm(64, ss, "1"))


def probe_overlap() -> list[dict[str, Any]]:
    """Time a step of two warpgroups' wgmma (m64n64k16 x 2, as the wide kernel) alone, of
    16 dependent fma.rn.f16x2 in 4 chains alone, and of both in one warp: whether they
    overlap, with A from registers or from shared memory."""
    rows = []
    for op, label, ss, mma_on, alu, feed, split in overlap_cases():
        iters = 2000
        t = _one_launch_s(overlap_source(op, ss, mma_on, alu, feed, split), "overlap",
                          384 if split else 256, iters)
        rows.append({"case": label, "alu": OVERLAP_OPS[op],
                     "ns_a_step": round(t / (iters * 8) * 1e9, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- l2: L2-resident bytes into 128 SMs --------------------------------------------------------

_L2_SRC = r"""
extern "C" __global__ void l2read(const uint4* __restrict__ base, size_t block_stride, int windows,
                                  float* out) {
  // 256 threads read `windows` 32 KiB windows from base + blockIdx.x * block_stride, 8 16-byte
  // loads a thread and window, as a super-step loop would.
  const uint4* p = base + blockIdx.x * block_stride;
  unsigned acc = 0;
  for (int w = 0; w < windows; ++w) {
    uint4 v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = p[w * 2048 + threadIdx.x + 256 * j];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  }
  if (acc == 0x12345678u) out[0] = 1.0f;
}
"""


def probe_l2() -> list[dict[str, Any]]:
    """Read rate when every block reads the same bytes, 8 blocks share them, or each its own."""
    import cupy as cp

    fn = cp.RawModule(code=_L2_SRC, options=("--gpu-architecture=sm_90a",)).get_function("l2read")
    buf = cp.zeros((64 << 20) // 4, dtype=cp.uint32)
    out = cp.zeros(4, dtype=cp.float32)
    rows = []
    for windows in (12, 24):  # 384 KiB, 768 KiB a block
        vectors = windows * 2048
        for label, stride, blocks in (("all 128 blocks the same bytes", 0, 128),
                                      ("8 blocks share each byte", vectors // 8, 128),
                                      ("64 blocks, each its own bytes", vectors, 64)):
            def launch(stride: int = stride, blocks: int = blocks, windows: int = windows) -> None:
                fn((blocks,), (256,), (buf, cp.uint64(stride), cp.int32(windows), out))

            for _ in range(3):
                launch()
            times = []
            for _ in range(5):
                start, stop = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                for _ in range(20):
                    launch()
                stop.record()
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop) / 20 * 1e-3)
            t = statistics.median(times)
            rows.append({"pattern": label, "kib_a_block": windows * 32, "blocks": blocks,
                         "us": round(t * 1e6, 2),
                         "tb_per_s": round(blocks * vectors * 16 / t / 1e12, 2),
                         "gb_per_s_a_block": round(vectors * 16 / t / 1e9, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- ss: the prototype ----------------------------------------------------------------------

_SS_SRC = r"""
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(a), "r"(sel));
  return r;
}
__device__ __forceinline__ uint32_t lop_magic(uint32_t a) {  // (a & 0x00F0000F) | 0x64006400
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(0x00F0000Fu), "r"(0x64006400u));
  return r;
}
__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
__device__ __forceinline__ void mma(float* d, unsigned long long da, unsigned long long db,
                                    int accumulate) {
  MMA_ASM
}

// Named barriers 1-4 (0 is __syncthreads): n threads in all, some arriving, some waiting.
__device__ __forceinline__ void named_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n"
               ::: "memory");
}
template <int R, int A>
__device__ __forceinline__ void fence_acc(float (&d)[R][A]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < A; ++i) asm volatile("" : "+f"(d[r][i])::"memory");
}

// Block (bx, by, bz): out rows by*128 .. +128 (tokens), columns bx*BN .. +BN (weight rows), the
// bz-th of KS parts of K (KS > 1: float32 planes), in super-steps of KSTEP. Warpgroup g: weight
// rows 64 RA g .. + 64 RA, RA m64n128k16 a k16 step.
extern "C" __global__ void CLUSTER_ATTR __launch_bounds__(128 * (WGR + PWG))
ss(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scales,
   const __half* __restrict__ biases, void* outp, int M, int N, int K) {
  extern __shared__ __align__(1024) unsigned char sm[];
  constexpr int BN = 64 * WGR * RA, BT = BTOK, THREADS = 128 * WGR, NACC = BT / 2;
  // WS: PWG more warpgroups copy and dequantize; the WGR above only multiply. The copying
  // threads (all, or the producers) and a thread's place among them:
  constexpr int CT = WS ? 128 * PWG : THREADS;
  const int ctid = WS ? int(threadIdx.x) - THREADS : int(threadIdx.x);
  constexpr int KC = KSTEP / 8;                         // 16-byte chunks of a row a super-step
  constexpr int ABYTES = BN * KSTEP * 2;                // a super-step's dequantized weights
  constexpr int XBYTES = BULK ? BT * (KSTEP * 2 + 16) : BT * KSTEP * 2;  // and its x
  constexpr int WBYTES = BN * KSTEP / 2;                // and its packed weights
  constexpr int NX = D + 2, NW = D + 1;                 // buffers (x's are read by wgmma in flight)
  unsigned char* As = sm;                               // 2 buffers
  unsigned char* Xs = As + 2 * ABYTES;
  unsigned char* Ws = Xs + NX * XBYTES;
  unsigned char* Ss = Ws + NW * WBYTES;                 // a thread's scale and bias pairs
  const int tid = threadIdx.x, wg = tid / 128;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BT, bz = blockIdx.z;
  const int SS = K / KSTEP / KS, kb = bz * SS * KSTEP;
  const int KW = K / 8, G = K / 64;
  uint32_t crank = 0;
  if (CS > 1) asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(crank));
  // The k of super-step s (ROT: each cluster starts at a different one).
  auto k_of = [&](int s) { return kb + ((s + ROT * int(blockIdx.x / CS)) % SS) * KSTEP; };

  // Weights: 16-byte chunk c = ctid + j*CT is row c % BN, k 32 (c / BN) .. +31; a thread
  // copies the chunks it dequantizes and the row's group terms (the aligned pair of groups
  // that holds the super-step's: scale and bias, 4 bytes each).
  constexpr int WCH = BN * (KSTEP / 32) / CT;
  static_assert(CT % BN == 0, "a thread's chunks are all of one row");
  auto copy_w = [&](int s) {
    if (s >= SS) return;
    const int r = ctid % BN, b = s % NW;
    const size_t g = size_t(n0 + r) * G + ((k_of(s) / 64) & ~1);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                 :: "r"(smem(Ss + b * CT * 8 + ctid * 8)), "l"(scales + g));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                 :: "r"(smem(Ss + b * CT * 8 + ctid * 8 + 4)), "l"(biases + g));
#pragma unroll
    for (int j = 0; j < WCH; ++j) {
      const int c = ctid + j * CT;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                   :: "r"(smem(Ws + b * WBYTES + c * 16)),
                      "l"(w + size_t(n0 + c % BN) * KW + (k_of(s) + 32 * (c / BN)) / 8));
    }
  };
  // Dequantization into k order: byte p of a word is the pair (2p, 2p + 1); prmt puts it in
  // both halves, lop3 masks q0 and 16 q1 under 1024's exponent, the first FMA takes 1024 and
  // the 16 out exactly, the second applies scale and bias. Row r's k 8kc .. 8kc + 7 land in
  // core matrix (r / 8, kc) at (kc * BN / 8 + r / 8) * 128 + (r % 8) * 16.
  auto dequant = [&](int s) {
    const int b = s % NW;
    const uint32_t sp = *(const uint32_t*)(Ss + b * CT * 8 + ctid * 8);
    const uint32_t bp = *(const uint32_t*)(Ss + b * CT * 8 + ctid * 8 + 4);
#pragma unroll
    for (int j = 0; j < WCH; ++j) {
      const int c = ctid + j * CT, r = c % BN, q = c / BN;
      const uint4 wv = *(const uint4*)(Ws + b * WBYTES + c * 16);
      const int half = ((k_of(s) + 32 * q) / 64) & 1;
      const uint32_t s2 = prmt(sp, half ? 0x3232u : 0x1010u);
      const uint32_t b2 = prmt(bp, half ? 0x3232u : 0x1010u);
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t o[4];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const uint32_t h = lop_magic(prmt(words[i], 0x4040u | (p << 8) | p));
          o[p] = hfma2(hfma2(h, 0x2C003C00u, 0xD400E400u), s2, b2);  // (1, 1/16), (-1024, -64)
        }
        *(uint4*)(As + (s % 2) * ABYTES + ((4 * q + i) * (BN / 8) + r / 8) * 128 + (r % 8) * 16) =
            make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
  };
  // x: chunk c = ctid + j*CT is token (c % 8) + 8 (c / 8 KC), k 8 ((c / 8) % KC) .. +7, at
  // core matrix (t / 8, kc) like the weights; a warp's copies fill whole core matrices.
  constexpr int XCH = BT * KC / CT;
  static_assert(XCH % CS == 0, "x's chunks split over the cluster");
  auto x_chunk = [&](int s, int j, unsigned char*& dst) {
    const int c = ctid + j * CT, t = (c % 8) + 8 * (c / (8 * KC)), kc = (c / 8) % KC;
    dst = Xs + (s % NX) * XBYTES + (kc * (BT / 8) + t / 8) * 128 + (t % 8) * 16;
    return x + size_t(min(m0 + t, M - 1)) * K + k_of(s) + kc * 8;
  };
  auto copy_x = [&](int s) {
    if (s >= SS) return;
#pragma unroll
    for (int j = 0; j < XCH; ++j) {
      unsigned char* dst;
      const __half* src = x_chunk(s, j, dst);
      const int t = ((ctid + j * CT) % 8) + 8 * ((ctid + j * CT) / (8 * KC));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                   :: "r"(smem(dst)), "l"(src), "r"(m0 + t < M ? 16 : 0));
    }
  };
  uint4 xr[XCH];
  auto load_x = [&](int s) {  // XREG: this cluster member's share into registers
    if (s >= SS) return;
#pragma unroll
    for (int j = 0; j < XCH; ++j) {
      if (j % CS != int(crank)) continue;
      unsigned char* dst;
      xr[j] = *(const uint4*)x_chunk(s, j, dst);
    }
  };
  auto store_x = [&](int s) {  // ... then into every member's shared memory
#pragma unroll
    for (int j = 0; j < XCH; ++j) {
      if (j % CS != int(crank)) continue;
      unsigned char* dst;
      x_chunk(s, j, dst);
      if (CS == 1) {
        *(uint4*)dst = xr[j];
      } else {
#pragma unroll
        for (int p = 0; p < CS; ++p) {
          uint32_t ra;
          asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
                       : "=r"(ra) : "r"(smem(dst)), "r"(p));
          asm volatile("st.shared::cluster.v4.b32 [%0], {%1, %2, %3, %4};\n"
                       :: "r"(ra), "r"(xr[j].x), "r"(xr[j].y), "r"(xr[j].z), "r"(xr[j].w)
                       : "memory");
        }
      }
    }
  };
  __shared__ __align__(8) unsigned long long bars[NX];  // BULK: one mbarrier an x buffer
  if (BULK) {
    if (tid == 0)
      for (int i = 0; i < NX; ++i)
        asm volatile("mbarrier.init.shared.b64 [%0], 1;\n" :: "r"(smem(&bars[i])));
    __syncthreads();
  }
  auto bulk_x = [&](int s) {
    if (s >= SS || tid >= 32) return;
    const uint32_t bar = smem(&bars[s % NX]);
    if (tid == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;\n"
                   :: "r"(bar), "r"(BT * KSTEP * 2) : "memory");
    __syncwarp();
#pragma unroll
    for (int j = 0; j < BT / 32; ++j) {
      const int t = tid + 32 * j;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                   " [%0], [%1], %3, [%2];\n"
                   :: "r"(smem(Xs + (s % NX) * XBYTES + t * (KSTEP * 2 + 16))),
                      "l"(x + size_t(min(m0 + t, M - 1)) * K + k_of(s)), "r"(bar), "n"(KSTEP * 2)
                   : "memory");
    }
  };
  auto wait_bulk = [&](int s) {
    const uint32_t bar = smem(&bars[s % NX]), parity = (s / NX) & 1;
    uint32_t done = 0;
    while (!done)
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n"
                   " selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  };
  // One commit group a super-step, D ahead.
  auto issue = [&](int s) {
    if (!NOW) copy_w(s);
    if (BULK) bulk_x(s);
    else if (!NOX && !XREG) copy_x(s);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };

  float d[RA][NACC];
  int fresh = 1;
  // A super-step's wgmma, from A buffer s % 2 and x buffer s % NX; one commit group.
  auto multiply = [&](int s) {
    fence_acc(d);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    const uint32_t a0 = smem(As + (s % 2) * ABYTES + 8 * RA * wg * 128);
    const uint32_t b0 = smem(Xs + (s % NX) * XBYTES);
#pragma unroll
    for (int k16 = 0; k16 < KSTEP / 16; ++k16) {
      const unsigned long long db = desc(b0 + 2 * k16 * (BT / 8) * 128, (BT / 8) * 128, 128);
#pragma unroll
      for (int ra = 0; ra < RA; ++ra) {
        const unsigned long long da =
            desc(a0 + (2 * k16 * (BN / 8) + 8 * ra) * 128, (BN / 8) * 128, 128);
        if (!NOMMA) mma(d[ra], da, db, 1 - fresh);
      }
      fresh = 0;
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    fence_acc(d);
  };
  if (WS) {
    constexpr int ALL = THREADS + CT;
    if (int(threadIdx.x) >= THREADS) {
      // Producers: super-step s's copies land, A buffer s % 2 is free once the consumers'
      // wgmma of s - 2 are done (barrier 3 + s % 2; so is the x buffer that s + D refills),
      // the weights are dequantized into it and the consumers told (barrier 1 + s % 2).
#pragma unroll
      for (int j = 0; j < D; ++j) issue(j);
      for (int s = 0; s < SS; ++s) {
        asm volatile("cp.async.wait_group %0;\n" :: "n"(D - 1) : "memory");
        if (s >= 2) named_sync(3 + s % 2, ALL);
        issue(s + D);
        if (!NODQ) dequant(s);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        named_arrive(1 + s % 2, ALL);
      }
      return;
    }
    for (int s = 0; s < SS; ++s) {
      named_sync(1 + s % 2, ALL);
      multiply(s);
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
      fence_acc(d);
      if (s >= 1 && s - 1 <= SS - 3) named_arrive(3 + (s - 1) % 2, ALL);  // s - 1 is read
    }
  } else {
#pragma unroll
  for (int j = 0; j < D; ++j) issue(j);
  if (XREG) load_x(0);
  for (int s = 0; s < SS; ++s) {
    // This warpgroup's wgmma of super-step s - 2 are done (their A buffer is rewritten now;
    // the x buffer refilled after the barrier was read by every warpgroup's s - 2).
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    asm volatile("cp.async.wait_group %0;\n" :: "n"(D - 1) : "memory");
    if (!NODQ) dequant(s);
    if (XREG) store_x(s);
    if (BULK) wait_bulk(s);
    if (CS == 1) {
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncthreads();
    } else {
      asm volatile("fence.proxy.async;\n" ::: "memory");
      cluster_sync();
    }
    issue(s + D);
    if (XREG) load_x(s + 1);
    multiply(s);
  }
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fence_acc(d);
  if (CS > 1 || CSK) cluster_sync();
  const int lane = tid % 32, wq = (tid / 32) % 4;
  if (CSK) {
    // The KS blocks of a cluster split K; token tile j (8 tokens) belongs to rank j % KS. Each
    // block stores its partial sums of tile j into slot (its rank, ra, j / KS) of the owner's
    // shared memory (the buffers are free: every wgmma of the cluster has retired); the owner
    // adds the KS slots in rank order and writes T.
    uint32_t rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    constexpr int TJ = NACC / 4 / KS;  // tiles a rank owns
    static_assert(KS * RA * TJ * THREADS * 16 <= 2 * ABYTES + NX * XBYTES, "slots fit");
#pragma unroll
    for (int ra = 0; ra < RA; ++ra) {
#pragma unroll
      for (int j = 0; j < NACC / 4; ++j) {
        uint32_t ra_addr;
        const uint32_t local = smem(sm + (((rank * RA + ra) * TJ + j / KS) * THREADS + tid) * 16);
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
                     : "=r"(ra_addr) : "r"(local), "r"(j % KS));
        asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n"
                     :: "r"(ra_addr), "f"(d[ra][4 * j]), "f"(d[ra][4 * j + 1]),
                        "f"(d[ra][4 * j + 2]), "f"(d[ra][4 * j + 3]) : "memory");
      }
    }
    cluster_sync();
#pragma unroll
    for (int ra = 0; ra < RA; ++ra) {
#pragma unroll
      for (int jj = 0; jj < TJ; ++jj) {
        float4 v = *(const float4*)(sm + ((ra * TJ + jj) * THREADS + tid) * 16);
        for (int r = 1; r < KS; ++r) {
          const float4 u = *(const float4*)(sm + (((r * RA + ra) * TJ + jj) * THREADS + tid) * 16);
          v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
        }
        const int j = jj * KS + int(rank);
        const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = n0 + 64 * (RA * wg + ra) + 16 * wq + lane / 4 + 8 * (e / 2);
          const int m = m0 + 8 * j + 2 * (lane % 4) + (e % 2);
          if (m < M) ((__half*)outp)[size_t(m) * N + n] = __float2half_rn(vals[e]);
        }
      }
    }
    return;
  }
  // d[ra][4j + e]: weight row 64 ra + 16 (warp % 4) + lane / 4 + 8 (e / 2) of the
  // warpgroup's, token 8j + 2 (lane % 4) + e % 2.
#pragma unroll
  for (int ra = 0; ra < RA; ++ra) {
#pragma unroll
    for (int j = 0; j < NACC / 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = n0 + 64 * (RA * wg + ra) + 16 * wq + lane / 4 + 8 * (e / 2);
        const int m = m0 + 8 * j + 2 * (lane % 4) + (e % 2);
        if (m < M) {
          if (KS == 1) ((__half*)outp)[size_t(m) * N + n] = __float2half_rn(d[ra][4 * j + e]);
          else ((float*)outp)[(size_t(bz) * M + m) * N + n] = d[ra][4 * j + e];
        }
      }
    }
  }
}

// The planes' sum, four columns a thread.
extern "C" __global__ void add_planes4(const float4* __restrict__ p, __half2* __restrict__ out,
                                       int n4, int planes) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n4) {
    float4 v = p[i];
    for (int s = 1; s < planes; ++s) {
      const float4 u = p[(size_t)s * n4 + i];
      v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
    }
    out[2 * i] = __floats2half2_rn(v.x, v.y);
    out[2 * i + 1] = __floats2half2_rn(v.z, v.w);
  }
}
"""

FLAGS = ("NOX", "NOW", "NODQ", "NOMMA", "XREG", "BULK", "ROT", "CSK", "WS")
WGR = 2  # warpgroups a block, each 64 weight rows
PWG = 2  # WS: producer warpgroups a block, which copy and dequantize


def parse_ss_case(text: str) -> dict[str, Any]:
    """``"gate_up:128:k2:d1:XREG+ROT:c4"`` -> its shape, M and knobs (defaults k1, d1, c1)."""
    parts = text.split(":")
    if len(parts) < 2 or parts[0] not in SHAPES or not parts[1].isdigit():
        raise ValueError(f"case {text!r}: expected SHAPE:M[:kS][:dD][:cC][:rR][:sK][:FLAG+...]"
                         f" with SHAPE one of {', '.join(SHAPES)}")
    case: dict[str, Any] = {"shape": parts[0], "M": int(parts[1]), "ks": 1, "d": 1, "cs": 1,
                            "ra": 1, "kstep": 128, "bt": 128, "flags": []}
    for part in parts[2:]:
        if part in ("t64", "t128"):
            case["bt"] = int(part[1:])
        elif part[:1] in "kdcrs" and part[1:].isdigit():
            case[{"k": "ks", "d": "d", "c": "cs", "r": "ra", "s": "kstep"}[part[0]]] = int(part[1:])
        elif all(f in FLAGS for f in part.split("+")):
            case["flags"] = part.split("+")
        else:
            raise ValueError(f"case {text!r}: {part!r} is none of kS, dD, cC, rR, sK, t64, "
                             f"t128 or flags {'+'.join(FLAGS)}")
    clash = {"XREG", "BULK", "CSK"} & set(case["flags"])
    if "WS" in case["flags"] and (clash or case["cs"] > 1):
        raise ValueError(f"case {text!r}: WS (producer warpgroups) copies x with cp.async, "
                         "without clusters; not with XREG, BULK, CSK or cC")
    if "WS" in case["flags"] and (128 * PWG) % (64 * WGR * case["ra"]):
        raise ValueError(f"case {text!r}: WS needs the {128 * PWG} producer threads to be a "
                         f"multiple of the block's {64 * WGR * case['ra']} weight rows")
    return case


def ss_smem(case: dict[str, Any]) -> int:
    """Dynamic shared memory of the prototype's buffers, bytes."""
    bn, bt, d, ks = 64 * WGR * case["ra"], case["bt"], case["d"], case["kstep"]
    xbytes = bt * (ks * 2 + (16 if "BULK" in case["flags"] else 0))
    copiers = 128 * (PWG if "WS" in case["flags"] else WGR)  # a scale and bias pair each
    return 2 * bn * ks * 2 + (d + 2) * xbytes + (d + 1) * (bn * ks // 2 + copiers * 8)


def ss_source(case: dict[str, Any]) -> str:
    defs = {"WGR": WGR, "RA": case["ra"], "BTOK": case["bt"], "KSTEP": case["kstep"],
            "KS": case["ks"], "D": case["d"],
            "CS": case["cs"], "PWG": PWG if "WS" in case["flags"] else 0}
    defs.update({f: int(f in case["flags"]) for f in FLAGS})
    head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    if "CSK" in case["flags"]:
        dims = f"__cluster_dims__(1, 1, {case['ks']})"
    else:
        dims = f"__cluster_dims__({case['cs']}, 1, 1)" if case["cs"] > 1 else ""
    head += f"#define CLUSTER_ATTR {dims}\n"
    return head + _COMMON + _SS_SRC.replace("MMA_ASM", _wgmma_asm(case["bt"], True,
                                                                      "accumulate"))


def probe_ss(cases: list[str]) -> list[dict[str, Any]]:
    rows = [run_ss_case(text) for text in cases]
    return rows


def run_ss_case(text: str) -> dict[str, Any]:
    """Build, check and time one prototype case."""
    import cupy as cp
    import numpy as np

    case = parse_ss_case(text)
    N, K = SHAPES[case["shape"]]
    M, ks = case["M"], case["ks"]
    row: dict[str, Any] = {"case": text}
    mod = cp.RawModule(code=ss_source(case),
                       options=("--gpu-architecture=sm_90a", "-std=c++17"))
    fn, add = mod.get_function("ss"), mod.get_function("add_planes4")
    smem = ss_smem(case)
    fn.max_dynamic_shared_size_bytes = smem
    rng = cp.random.default_rng(0)
    x = rng.standard_normal((M, K), dtype=cp.float32).astype(cp.float16)
    count = max(2, min(64, (256 << 20) // (N * K // 2)))
    sets = [(x,
             cp.random.randint(0, 2**31 - 1, size=(N, K // 8), dtype=cp.int32).view(cp.uint32),
             (0.01 + 0.01 * rng.random((N, K // 64), dtype=cp.float32)).astype(cp.float16),
             (-0.08 + 0.01 * rng.random((N, K // 64), dtype=cp.float32)).astype(cp.float16))
            for _ in range(count)]
    out = cp.empty((M, N), dtype=cp.float16)
    planes = cp.empty((ks, M, N), dtype=cp.float32)
    grid = (N // (64 * WGR * case["ra"]), -(-M // case["bt"]), ks)
    n4 = M * N // 4
    on_chip = "CSK" in case["flags"]  # the cluster's blocks add their partial sums themselves

    def kernel(s: tuple[Any, ...]) -> None:
        fn(grid, (128 * (WGR + (PWG if "WS" in case["flags"] else 0)),),
           (*s, out if ks == 1 or on_chip else planes, cp.int32(M), cp.int32(N), cp.int32(K)),
           shared_mem=smem)

    def both(s: tuple[Any, ...]) -> None:
        kernel(s)
        if ks > 1 and not on_chip:
            add(((n4 + 255) // 256,), (256,), (planes, out, cp.int32(n4), cp.int32(ks)))

    both(sets[0])
    cp.cuda.Device().synchronize()
    wq = sets[0][1].get()
    q = np.stack([(wq >> (4 * i)) & 15 for i in range(8)], axis=-1).reshape(N, K)
    scale = np.repeat(sets[0][2].get().astype(np.float32), 64, axis=1)
    bias = np.repeat(sets[0][3].get().astype(np.float32), 64, axis=1)
    ref = x.get().astype(np.float32) @ (q * scale + bias).T
    got = out.get().astype(np.float32)
    row["max_error"] = float(np.abs(got - ref).max() / np.abs(ref).max())

    def replay(f: Any) -> float:
        runs = max(50, count)
        stream = cp.cuda.Stream(non_blocking=True)
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        with stream:
            for i in range(3):
                f(sets[i % count])
            stream.begin_capture()
            for i in range(runs):
                f(sets[i % count])
            graph = stream.end_capture()
            graph.launch(stream)
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) * 1e3 / runs

    row["us"] = round(statistics.median(replay(both) for _ in range(3)), 2)
    row["kernel_us"] = round(statistics.median(replay(kernel) for _ in range(3)), 2)
    floor = max((N * K // 2 + N * K // 64 * 4 + M * K * 2 + M * N * 2) / BANDWIDTH,
                2 * M * N * K / FP16_RATE)
    row["x_floor"] = round(row["us"] * 1e-6 / floor, 2)
    print(json.dumps(row), flush=True)
    return row


# --- cluster: clusters and distributed shared memory through MLX --------------------------------

_CLUSTER_HEADER = """
// MLX writes the kernel's signature itself; a compile-time cluster shape rides on __global__.
#undef __global__
#define __global__ __location__(global) __cluster_dims__(2, 1, 1)
"""

_CLUSTER_SRC = """
  __shared__ int buf[32];
  auto cl = cg::this_cluster();
  buf[threadIdx.x] = 0;
  cl.sync();
  int* peer = cl.map_shared_rank(buf, cl.block_rank() ^ 1);
  peer[threadIdx.x] = blockIdx.x * 100 + threadIdx.x + int(inp[0]);
  cl.sync();
  out[blockIdx.x * 32 + threadIdx.x] = buf[threadIdx.x] + 1000000 * int(cl.num_blocks());
"""


def probe_cluster() -> list[dict[str, Any]]:
    """Pairs of blocks write each other's shared memory, launched by mx.fast.cuda_kernel."""
    import mlx.core as mx
    import numpy as np

    kernel = mx.fast.cuda_kernel(name="qmmperf_cluster_probe", input_names=["inp"],
                                 output_names=["out"], source=_CLUSTER_SRC, header=_CLUSTER_HEADER)
    rows = []
    for evals in (1, 3):  # alone, and three in one evaluation (MLX's CUDA graph)
        outs = [kernel(inputs=[mx.array([i], dtype=mx.int32)], output_shapes=[(256,)],
                       output_dtypes=[mx.int32], grid=(256, 1, 1), threadgroup=(32, 1, 1))[0]
                for i in range(evals)]
        mx.eval(outs)
        ok = all((np.array(o).reshape(8, 32) == np.array(
            [[(b ^ 1) * 100 + t + i + 2000000 for t in range(32)] for b in range(8)])).all()
            for i, o in enumerate(outs))
        rows.append({"kernels_in_one_eval": evals, "peer_writes_seen": bool(ok)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- smem: dynamic shared memory past 48 KiB through MLX --------------------------------------

_SMEM_SRC = """
  extern __shared__ float buf[];
  const int n = int(size[0]);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    buf[i] = float(i + blockIdx.x);
  }
  __syncthreads();
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s += buf[n - 1 - i];
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
"""


def probe_smem() -> list[dict[str, Any]]:
    """A kernel asking ``mx.fast.cuda_kernel`` for up to 227 KiB of dynamic shared memory
    (``shared_memory=``), filling and reading all of it: whether MLX launches it (it must
    raise the kernel's limit past the default 48 KiB) and every value comes back."""
    import mlx.core as mx
    import numpy as np

    rows = []
    for kib in (32, 48, 100, 200, 227):
        floats = kib * 1024 // 4
        kernel = mx.fast.cuda_kernel(name=f"qmmperf_smem_probe_{kib}", input_names=["size"],
                                     output_names=["out"], source=_SMEM_SRC,
                                     shared_memory=kib * 1024)
        threads, blocks = 256, 4
        row: dict[str, Any] = {"kib": kib}
        try:
            out = kernel(inputs=[mx.array([floats], dtype=mx.int32)],
                         output_shapes=[(blocks * threads,)], output_dtypes=[mx.float32],
                         grid=(blocks * threads, 1, 1), threadgroup=(threads, 1, 1))[0]
            got = np.array(out).reshape(blocks, threads)
            # thread t adds buf[n - 1 - i] = n - 1 - i + block for i = t, t + threads, ...:
            # integers under 2^24, so float32 holds every partial sum exactly
            idx = np.arange(floats)
            want = [[float(np.sum(floats - 1 - idx[t::threads] + b)) for t in range(threads)]
                    for b in range(blocks)]
            row["values_ok"] = bool((got == np.array(want, dtype=np.float32)).all())
        except Exception as exc:  # the launch refused: record why
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    probes = {"wgmma": probe_wgmma, "l2": probe_l2, "cluster": probe_cluster,
              "smem": probe_smem, "overlap": probe_overlap}
    if not args or (args[0] not in probes and args[0] != "ss"):
        print(__doc__)
        print("probe: one of wgmma, l2, overlap, ss, cluster, smem", file=sys.stderr)
        return 2
    if args[0] == "ss":
        if len(args) < 2:
            print("ss: give one or more cases, e.g. gate_up:128:k2", file=sys.stderr)
            return 2
        for text in args[1:]:
            parse_ss_case(text)  # every case well formed before the first compiles
        rows = probe_ss(args[1:])
    else:
        rows = probes[args[0]]()
    out = Path(os.environ.get("OUT", "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"m128_probe_{args[0]}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
