"""The kernel generator: one body per kernel, rendered for Metal or CUDA.

A kernel is MLX's custom-kernel triple — a header, a body and the names of
its inputs and outputs — for ``mx.fast.metal_kernel`` or
``mx.fast.cuda_kernel``.  The body (tile loaders, dequantization, bounds,
the K loop, the launch geometry) is written once here; a :class:`Dialect`
supplies the few tokens that differ (address spaces, barrier, thread
indices) and its language's layer header supplies the fragment matrix
multiply, so the Metal kernel and its CUDA mirror cannot drift apart.

Both kernels read ``x`` (..., K), its leading dimensions together the M
rows, the packed weight ``w`` (N, K*bits/32) as
``mx.quantize`` writes it (uint32 words, value ``j`` of a word at bits
``j*bits``), and ``scales``/``biases`` (N, K/group_size) in the activation
dtype, and write ``out`` (M, N) = ``x @ dequantize(w).T`` accumulated in
float32.  M, N and K are read at run time from the arrays' shapes, so one
compiled kernel serves every problem size.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from pytest_qmmperf.tiled.config import (
    DECODE_MAX_TOKENS,
    PAD,
    SIMD,
    SKINNY_MAX_TOKENS,
    WIDE_ROW_PITCH,
    DecodeConfig,
    DequantConfig,
    KernelConfig,
    SkinnyConfig,
    TileConfig,
    TileError,
    WideConfig,
    output_planes,
)

PACKAGE = Path(__file__).resolve().parent.parent
INPUT_NAMES = ("x", "w", "scales", "biases")
OUTPUT_NAMES = ("out",)


@dataclass(frozen=True)
class Dialect:
    """What differs between the languages, token by token."""

    language: str
    shared: str  # declaration qualifier of a threadgroup/shared array
    tg: str  # pointer qualifier for threadgroup/shared memory, with its space
    dev: str  # pointer qualifier for device memory, with its space
    barrier: str
    #: Defines tid, lane, warp, bx, by (block indices), M, N, K.  x is (..., K):
    #: its leading dimensions together are the M rows, so a decode step's
    #: (1, 1, K) needs no reshape op before the launch.  Shape entries are
    #: read at constant indices (MLX allows 10 dimensions) and K comes from
    #: w.  Against the 2-D prologue this costs the decode kernel 2.5-2.8%
    #: alone (PERFORMANCE.md 6n) and saves the host two ops a call.
    prologue: str
    layer_files: tuple[str, ...]  # the layer's headers, relative to the package

    def layer(self) -> str:
        return "\n".join((PACKAGE / f).read_text() for f in self.layer_files)


METAL = Dialect(
    language="metal",
    shared="threadgroup",
    tg="threadgroup ",
    dev="device ",
    barrier="threadgroup_barrier(mem_flags::mem_threadgroup)",
    prologue="""\
  const uint tid = thread_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const uint warp = simdgroup_index_in_threadgroup;
  const int bx = int(threadgroup_position_in_grid.x);
  const int by = int(threadgroup_position_in_grid.y);
  int rows_of_x = 1;
#pragma unroll
  for (int d = 0; d < 9; ++d) {
    if (d + 1 < x_ndim) rows_of_x *= x_shape[d];
  }
  const int M = rows_of_x;
  const int K = w_shape[1] * 32 / BITS;
  const int N = w_shape[0];
""",
    layer_files=("metal/qmm_layer.h",),
)

CUDA = Dialect(
    language="cuda",
    shared="__shared__",
    tg="",
    dev="",
    barrier="__syncthreads()",
    prologue="""\
  const unsigned tid = threadIdx.x;
  const unsigned lane = tid % 32u;
  const unsigned warp = tid / 32u;
  const int bx = static_cast<int>(blockIdx.x);
  const int by = static_cast<int>(blockIdx.y);
  int rows_of_x = 1;
#pragma unroll
  for (int d = 0; d < 9; ++d) {
    if (d + 1 < x_ndim) rows_of_x *= x_shape[d];
  }
  const int M = rows_of_x;
  const int K = w_shape[1] * 32 / BITS;
  const int N = w_shape[0];
""",
    layer_files=("cuda/qmm_ptx.cuh", "cuda/qmm_layer.cuh"),
)

DIALECTS = {d.language: d for d in (METAL, CUDA)}


@dataclass(frozen=True)
class KernelSource:
    """Everything ``mx.fast.{metal,cuda}_kernel`` needs, plus how to launch it.

    ``name`` holds every parameter baked into the source and a hash of the
    source itself: MLX caches compiled kernels by name, so two different
    kernels must never share one.  The activation dtype ``T`` (and the
    decode kernel's ``MR``) are template arguments, which MLX appends.
    """

    name: str
    language: str
    header: str
    body: str
    threads: int
    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES
    #: ``out``'s dtype when not the activations' (a tile split over K writes
    #: float32 partial sums, ``(splits, M, N)``); ``None``: the activations' dtype.
    output_dtype: str | None = None


# --- the shared bodies -----------------------------------------------------

_TILED_LOAD = """\
    // Global -> registers: x as 16-byte vectors, w as packed words with their group's affine terms.
#pragma unroll
    for (int j = 0; j < XJ; ++j) {
      const int i = int(tid) + j * THREADS;
      const int r = i / XVR;
      const int c = (i % XVR) * 8;
      xr[j] = qmm_zero4();
      if ((XV % THREADS == 0 || i < XV) && m0 + r < M) {
        xr[j] = *((const ${dev}uint4*)(x + size_t(m0 + r) * size_t(K) + size_t(kl + c)));
      }
    }
#pragma unroll
    for (int j = 0; j < WJ; ++j) {
      const int i = int(tid) + j * THREADS;
      const int r = i / WPR;
      const int c = i % WPR;
      wr[j] = 0u;
      sr[j] = 0.0f;
      br[j] = 0.0f;
      if ((WW % THREADS == 0 || i < WW) && n0 + r < N) {
        const size_t row = size_t(n0 + r);
        const size_t g = row * size_t(G) + size_t((kl + c * PACK) / GS);
        wr[j] = w[row * size_t(KW) + size_t(kl / PACK + c)];
        sr[j] = float(scales[g]);
        br[j] = float(biases[g]);
      }
    }
"""

_TILED_STORE = """\
    // Registers -> shared: x copied as is; w dequantized, scale * q + bias, into T.
#pragma unroll
    for (int j = 0; j < XJ; ++j) {
      const int i = int(tid) + j * THREADS;
      if (XV % THREADS == 0 || i < XV) {
        *((${tg}uint4*)(xs + (i / XVR) * BKP + (i % XVR) * 8)) = xr[j];
      }
    }
#pragma unroll
    for (int j = 0; j < WJ; ++j) {
      const int i = int(tid) + j * THREADS;
      if (WW % THREADS == 0 || i < WW) {
        ${tg}uint32_t* dst = (${tg}uint32_t*)(ws + (i / WPR) * BKP + (i % WPR) * PACK);
#pragma unroll
        for (int v = 0; v < PACK; v += 2) {
          const float q0 = qmm_q2f((wr[j] >> (v * BITS)) & MASK);
          const float q1 = qmm_q2f((wr[j] >> ((v + 1) * BITS)) & MASK);
          dst[v / 2] = qmm_pack<T>(sr[j] * q0 + br[j], sr[j] * q1 + br[j]);
        }
      }
    }
"""

_TILED_BODY = Template("""\
  // Block (bx, by) computes out[bm*BM : +BM, bx*BN : +BN] over the bz-th of
  // KS parts of K (by = bz * MB + bm); SIMD group (wm, wn) of the WM x WN
  // split its WTM x WTN part. The K loop keeps one BK-slice in shared memory
  // while the next is loaded into registers. With KS > 1, out is float32
  // (KS, M, N) and part bz writes plane bz; the caller adds the planes.
  constexpr int BM = $BM;
  constexpr int BN = $BN;
  constexpr int BK = $BK;
  constexpr int WM = $WM;
  constexpr int WN = $WN;
  constexpr int KS = $KS;
  constexpr int BITS = $BITS;
  constexpr int GS = $GS;
  constexpr int THREADS = WM * WN * $SIMD;
  constexpr int BKP = BK + $PAD;
  constexpr int PACK = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr int WTM = BM / WM;
  constexpr int WTN = BN / WN;
  constexpr int XVR = BK / 8;
  constexpr int XV = BM * XVR;
  constexpr int XJ = (XV + THREADS - 1) / THREADS;
  constexpr int WPR = BK / PACK;
  constexpr int WW = BN * WPR;
  constexpr int WJ = (WW + THREADS - 1) / THREADS;
$prologue
  const int KW = K / PACK;
  const int G = K / GS;
  const int MB = (M + BM - 1) / BM;
  const int bz = by / MB;
  const int m0 = (by % MB) * BM;
  const int n0 = bx * BN;
  const int wm = int(warp) / WN;
  const int wn = int(warp) % WN;
  // Part bz of K: slices [bz * PER, (bz + 1) * PER) of the K / BK.
  const int PER = (K / BK + KS - 1) / KS;
  const int kbeg = bz * PER * BK;
  const int kend = kbeg + PER * BK < K ? kbeg + PER * BK : K;

  $shared uint4 xs_raw[BM * BKP / 8];
  $shared uint4 ws_raw[BN * BKP / 8];
  ${tg}T* xs = (${tg}T*)xs_raw;
  ${tg}T* ws = (${tg}T*)ws_raw;

  uint4 xr[XJ];
  uint32_t wr[WJ];
  float sr[WJ];
  float br[WJ];
  QmmWarpTile<T, WTM, WTN, BK, BKP> tile;
  tile.init(lane);

  int kl = kbeg;
  if (kl < kend) {
$load
  }
  for (int k0 = kbeg; k0 < kend; k0 += BK) {
    $barrier;
$store
    $barrier;
    kl = k0 + BK;
    if (kl < kend) {
$load
    }
    tile.mma(xs + wm * WTM * BKP, ws + wn * WTN * BKP);
  }
  tile.store(out + size_t(bz) * size_t(M) * size_t(N), m0 + wm * WTM, n0 + wn * WTN, M, N);
""")

_DECODE_LOAD = """\
    $w[r][u] = qmm_zero4();
    $s[r][u] = 0.0f;
    $b[r][u] = 0.0f;
    if (n0 + r < N && $k + u * SPAN < K) {
      const size_t row = size_t(n0 + r);
      const size_t g = row * size_t(G) + size_t(($k + u * SPAN) / GS);
      $w[r][u] = qmm_load_w_guarded(
          (const ${dev}uint4*)(w + row * size_t(KW) + size_t(($k + u * SPAN) / PACK)));
      $s[r][u] = float(scales[g]);
      $b[r][u] = float(biases[g]);
    }"""

_DECODE_BODY = Template("""\
  // The NW warps of block bx form NW / KS groups of KS warps; group `grp`
  // computes out[by*MR : +MR, n0 : n0+R], its warp `part` taking every
  // KS-th step of K. Its 32 lanes split a step: a lane reads U 16-byte
  // vectors (V weights each, all in one quantization group; vector u at
  // u * SPAN past the lane's k, so the warp's reads stay contiguous) of
  // each of the R rows, dequantizes them and multiplies them with the
  // matching V activations of every token; the lanes' partial sums meet in
  // a SIMD sum, the group's warps' in threadgroup memory.
  constexpr int R = $R;
  constexpr int NW = $NW;
  constexpr int U = $U;
  constexpr int KS = $KS;
  constexpr int BITS = $BITS;
  constexpr int GS = $GS;
  constexpr int PACK = 32 / BITS;
  constexpr int V = 128 / BITS;
  constexpr int SPAN = $SIMD * V;
  constexpr int STEP = SPAN * U;
  constexpr int STRIDE = STEP * KS;
  // Weights are read as f = 1 + q / 2^BITS (the layer's qmm_unit), and
  // s * q + b = sp * f + bp with sp = s * 2^BITS, bp = b - sp.
  // One token (M = 1) applies sp and bp once per group to sum(f * x) and
  // sum(x); several tokens dequantize each weight once (one FMA) and reuse
  // it. Measured on the H100 (docs/PERFORMANCE.md, section 6c), each form is
  // the faster one where it is used; MR is a template argument, so only one
  // is compiled.
  constexpr float QSCALE = float(1 << BITS);
$prologue
  const int KW = K / PACK;
  const int G = K / GS;
  const int grp = int(warp) / KS;
  const int part = int(warp) % KS;
  const int n0 = (bx * (NW / KS) + grp) * R;
  const int m0 = by * MR;

  float acc[MR][R];
#pragma unroll
  for (int m = 0; m < MR; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[m][r] = 0.0f;
    }
  }

  // Software pipelined: the next step's R x U vectors are in flight while
  // this step's are dequantized and multiplied.
  uint4 wv[R][U];
  float s[R][U];
  float b[R][U];
  int k = part * STEP + int(lane) * V;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
$loadw
    }
  }
  for (; k < K; k += STRIDE) {
    uint4 wn[R][U];
    float sn[R][U];
    float bn[R][U];
    const int kn = k + STRIDE;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
$loadn
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ku = k + u * SPAN;
      if ((U == 1 || ku < K) && MR == 1) {
        // One token: sum f * x and x over the vector (one group), then apply
        // the group's terms once: sum(w * x) = sp * sum(f * x) + bp * sum(x).
        float pr[R];
        float xs = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          pr[r] = 0.0f;
        }
#pragma unroll
        for (int c = 0; c < V / 8; ++c) {
          const uint4 xv = *((const ${dev}uint4*)(x + size_t(m0) * size_t(K) + size_t(ku + c * 8)));
          float xf[8];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            xf[2 * e] = qmm_lo<T>(qmm_word(xv, e));
            xf[2 * e + 1] = qmm_hi<T>(qmm_word(xv, e));
          }
#pragma unroll
          for (int v = 0; v < 8; ++v) {
            xs += xf[v];
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int v = 0; v < 8; ++v) {
              const uint32_t word = qmm_word(wv[r][u], (c * 8 + v) / PACK);
              pr[r] += xf[v] * qmm_unit<BITS>(word, (c * 8 + v) % PACK);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float sp = s[r][u] * QSCALE;
          acc[0][r] += sp * pr[r] + (b[r][u] - sp) * xs;
        }
      } else if (U == 1 || ku < K) {
        // Several tokens: dequantize once, w = sp * f + bp (one FMA), and
        // reuse it for every token.
        float sp[R];
        float bp[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          sp[r] = s[r][u] * QSCALE;
          bp[r] = b[r][u] - sp[r];
        }
#pragma unroll
        for (int c = 0; c < V / 8; ++c) {
          float wf[R][8];
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int v = 0; v < 8; ++v) {
              const uint32_t word = qmm_word(wv[r][u], (c * 8 + v) / PACK);
              wf[r][v] = sp[r] * qmm_unit<BITS>(word, (c * 8 + v) % PACK) + bp[r];
            }
          }
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            if (m0 + m < M) {
              const uint4 xv =
                  *((const ${dev}uint4*)(x + size_t(m0 + m) * size_t(K) + size_t(ku + c * 8)));
              float xf[8];
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                xf[2 * e] = qmm_lo<T>(qmm_word(xv, e));
                xf[2 * e + 1] = qmm_hi<T>(qmm_word(xv, e));
              }
#pragma unroll
              for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int v = 0; v < 8; ++v) {
                  acc[m][r] += xf[v] * wf[r][v];
                }
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        wv[r][u] = wn[r][u];
        s[r][u] = sn[r][u];
        b[r][u] = bn[r][u];
      }
    }
  }

  $shared float red[NW * MR * R];
#pragma unroll
  for (int m = 0; m < MR; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float total = qmm_warp_sum(acc[m][r]);
      if (KS == 1) {
        if (lane == 0u && m0 + m < M && n0 + r < N) {
          out[size_t(m0 + m) * size_t(N) + size_t(n0 + r)] = static_cast<T>(total);
        }
      } else if (lane == 0u) {
        red[(int(warp) * MR + m) * R + r] = total;
      }
    }
  }
  if (KS > 1) {
    // The group's warps' sums, added in a fixed order by its first warp.
    $barrier;
    if (part == 0 && int(lane) < MR * R) {
      const int m = int(lane) / R;
      const int r = int(lane) % R;
      float total = 0.0f;
      for (int q = 0; q < KS; ++q) {
        total += red[((int(warp) + q) * MR + m) * R + r];
      }
      if (m0 + m < M && n0 + r < N) {
        out[size_t(m0 + m) * size_t(N) + size_t(n0 + r)] = static_cast<T>(total);
      }
    }
  }
""")


_SKINNY_BODY = Template("""\
  // Block bx computes out[by*TOK : +TOK, bx*16*RF : +16*RF] with TOK = 8 *
  // TILES tokens, as RF fragments of 16 weight rows. Its warps split K in
  // super-steps of 128: warp w takes steps w, w + W, ... In a step, lane
  // (row r, chunk c) of the layer's QmmSkinny reads k = step + 32c .. +31 of
  // weight rows r and r + 8 of every fragment (16-byte vectors, one
  // quantization group) and dequantizes them into pairs of T; the layer
  // loads the x it needs once for all fragments and feeds both to the matrix
  // unit, in an order of k that both operands share (a sum over k does not
  // care). The warps' partial sums meet in threadgroup memory, where the
  // warps share out adding them up and writing out.
$head
  constexpr int ACC = 4 * TILES * RF;

  QmmSkinny<T, TILES, RF, BITS> sk;
  sk.init(lane);
  $shared float red[W * ACC * $SIMD];
  for (int ks = $kfirst; ks < K; ks += $kstride) {
    // Every load of the step first (weights, their group's terms, x), so
    // that their latencies overlap; then dequantize and multiply.
    uint32_t wv[RF][2][CW];
    float sv[RF][2];
    float bv[RF][2];
$weights
    QmmDq<T, BITS, QMM_OPS_C> dq[RF][2];  // the layer's QMM_OPS: measured fastest here
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        dq[f][h].set(sv[f][h], bv[f][h]);
      }
    }
    sk.template load_x<QMM_OPS_C>(x, m0, ks, K, M);
#pragma unroll
    for (int f = 0; f < RF; ++f) {
      // Pair q of the chunk is pair q % PW of word q / PW (the layer's QmmDq);
      // the layer's load_x put x in the same pair order.
      uint32_t pa[16];
      uint32_t pb[16];
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        pa[q] = dq[f][0].pair(wv[f][0][q / PW], q % PW);
        pb[q] = dq[f][1].pair(wv[f][1][q / PW], q % PW);
      }
      sk.mma(f, pa, pb);
    }
  }
$reduce""")

# The skinny kernels' start: parameters, thread indices, and block bx's first
# weight row (fragments of $FR rows) and by's first token.
_SKINNY_HEAD = """\
  constexpr int W = $W;
  constexpr int RF = $RF;
  constexpr int BITS = $BITS;
  constexpr int GS = $GS;
  constexpr int PACK = 32 / BITS;
  constexpr int CW = BITS;  // 32-bit words holding 32 values
  constexpr int PW = PACK / 2;  // pairs per word
$prologue
  const int KW = K / PACK;
  const int G = K / GS;
  const int n0 = bx * $FR * RF;
$parts"""

# The skinny kernels' end: the warps' partial sums meet in threadgroup memory.
_SKINNY_SUMS = """\
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    red[(int(warp) * ACC + e) * $SIMD + int(lane)] = sk.frag.value(e);
  }
  $barrier;
"""

_SKINNY_REDUCE = _SKINNY_SUMS + """\
  // Warp q adds up accumulators q, q + W, ... over the warps, in warp order.
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    const int m = m0 + sk.frag.token(e);
    const int n = n0 + sk.frag.out_row(e);
    if (e % W == int(warp) && m < M && n < N) {
      float v = 0.0f;
      for (int q = 0; q < W; ++q) {
        v += red[(q * ACC + e) * $SIMD + int(lane)];
      }
      out[size_t(m) * size_t(N) + size_t(n)] = static_cast<T>(v);
    }
  }
"""

# The skinny kernels' first token: by's, or with K split over a cluster (CUDA,
# `:cS`, _CLUSTER_PARTS) its cluster's; block bz of the CS blocks then takes
# super-steps bz * W + w, (bz + CS) * W + w, ... (warp w), so that the cluster's
# blocks share out one K between them, as a block's warps do.
_SKINNY_PLAIN_PARTS = """\
  const int m0 = by * 8 * TILES;"""

_SKINNY_CLUSTER_REDUCE = _SKINNY_SUMS + """\
  // The block's sums: warp q adds up accumulators q, q + W, ... over the warps,
  // in warp order, and once every warp has read keeps them where warp 0's were.
  float v[ACC];
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    v[e] = 0.0f;
    if (e % W == int(warp)) {
      for (int q = 0; q < W; ++q) {
        v[e] += red[(q * ACC + e) * $SIMD + int(lane)];
      }
    }
  }
  $barrier;
  // The cluster adds its CS blocks' sums (the layer's QmmClusterAdd): a lane's
  // accumulator e belongs to block e % CS, whose warp (e / CS) % W reads the
  // CS blocks' sums of it in block order and writes it.
  QmmClusterAdd<CS> ca;
  ca.init(red, ACC * $SIMD);
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    if (e % W == int(warp)) {
      ca.put(e * $SIMD + int(lane), v[e]);
    }
  }
  ca.sync();
#pragma unroll
  for (int e = 0; e < ACC; ++e) {
    const int m = m0 + sk.frag.token(e);
    const int n = n0 + sk.frag.out_row(e);
    if ((e / CS) % W == int(warp) && ca.owns(e) && m < M && n < N) {
      out[size_t(m) * size_t(N) + size_t(n)] = static_cast<T>(ca.total(e * $SIMD + int(lane)));
    }
  }
  ca.done();
"""


_SKINNY8_BODY = Template("""\
  // The skinny kernel with fragments of 8 weight rows (`h`): block bx computes
  // out[by*TOK : +TOK, bx*8*RF : +8*RF], TOK = 8 * TILES. As in the 16-row
  // form, the warps split K in super-steps of 128 and each lane reads k =
  // step + 32c .. +31 of its row of every fragment; the layer's QmmSkinny8
  // puts its x and weights into the matrix unit. With PREFETCH (`p`) a lane
  // asks for the next super-step's weights before it dequantizes this one's,
  // which the 8-row form has the registers for.
$head
  constexpr bool PREFETCH = $PREFETCH;

  QmmSkinny8<T, TILES, RF, BITS> sk;
  sk.init(lane);
  constexpr int ACC = QmmSkinny8<T, TILES, RF, BITS>::ACC;
  $shared float red[W * ACC * $SIMD];
  // The step's weights and their groups' terms (with PREFETCH, loaded a step ahead).
  uint32_t wv[RF][1][CW];
  float sv[RF][1];
  float bv[RF][1];
  for (int ks = $kfirst; ks < K; ks += $kstride) {
    if (!PREFETCH || ks == $kfirst) {
$weights
    }
    sk.load_x(x, m0, ks, K, M);
    uint32_t wn[RF][1][CW];
    float sn[RF][1];
    float bn[RF][1];
    if (PREFETCH) {
      const int kn = ks + $kstride;
$next
    }
#pragma unroll
    for (int f = 0; f < RF; ++f) {
      QmmDq<T, BITS, QMM_OPS_ONE_SHIFT> dq;  // one shift a word (PERFORMANCE.md 6t)
      dq.set(sv[f][0], bv[f][0]);
      uint32_t pw[16];
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        pw[q] = dq.pair(wv[f][0][q / PW], q % PW);
      }
      sk.mma(f, pw);
    }
    if (PREFETCH) {
#pragma unroll
      for (int f = 0; f < RF; ++f) {
#pragma unroll
        for (int i = 0; i < CW; ++i) {
          wv[f][0][i] = wn[f][0][i];
        }
        sv[f][0] = sn[f][0];
        bv[f][0] = bn[f][0];
      }
    }
  }
$reduce""")


_FRAG_WEIGHTS = """\
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int h = 0; h < $H; ++h) {
        // Lane (row r, chunk c): k = $k + 32c .. +31 of row r of fragment f, and of
        // row r + 8 in a 16-row fragment ($H halves of 8 rows).
        const int row = $n + $FR * f + $frag.row + 8 * h;
        const int k = $k + 32 * $frag.chunk;
        const bool live = k < K && row < N;
#pragma unroll
        for (int i = 0; i < CW; i += 4) {
          const uint4 v = $load_w(
              (const ${dev}uint4*)(w + size_t(row) * size_t(KW) + size_t(k / PACK + i)), live);
          $w[f][h][i] = qmm_word(v, 0);
          $w[f][h][i + 1] = qmm_word(v, 1);
          $w[f][h][i + 2] = qmm_word(v, 2);
          $w[f][h][i + 3] = qmm_word(v, 3);
        }
        $s[f][h] = 0.0f;
        $b[f][h] = 0.0f;
        if (live) {
          const size_t g = size_t(row) * size_t(G) + size_t(k / GS);
          $s[f][h] = float(scales[g]);
          $b[f][h] = float(biases[g]);
        }
      }
    }
"""

_WIDE_LOAD = """\
    // Global -> registers, for the super-step at kl: the block's x as 16-byte
    // vectors, and this lane's 32 k of its weight rows with their groups' terms.
#pragma unroll
    for (int j = 0; j < XJ; ++j) {
      const int i = int(tid) + j * THREADS;
      const int r = qmm_wide_row<TOK / 8, W, RF>(i);
      const int c = qmm_wide_col<TOK / 8, W, RF>(i) * 8;
      xr[j] = qmm_zero4();
      if ((XV % THREADS == 0 || i < XV) && m0 + r < M && kl + c < K) {
        xr[j] = *((const ${dev}uint4*)(x + size_t(m0 + r) * size_t(K) + size_t(kl + c)));
      }
    }
$weights
"""

_WIDE_STAGE = """\
#pragma unroll
    for (int j = 0; j < XJ; ++j) {
      const int i = int(tid) + j * THREADS;
      if (XV % THREADS == 0 || i < XV) {
        qmm_wide_stage<T, BITS, TOK / 8, W, RF, XP>($dst, qmm_wide_row<TOK / 8, W, RF>(i),
                                             qmm_wide_col<TOK / 8, W, RF>(i), xr[j]);
      }
    }
"""

_WIDE_BODY = Template("""\
  // Block (bx, by) computes out[m0 : +TOK, bx*W*RF*16 : +W*RF*16] over the
  // bz-th of KS parts of K (by = bz * MB + m-block). Warp `warp` owns RF
  // fragments of 16 weight rows from nw. Per 128-k super-step the block
  // stages x[m0 : +TOK][ks : +128] in one of the layer's XB threadgroup
  // buffers (qmm_wide_stage places its 16-byte units) while the next
  // super-step's x and weights are loaded into registers; lane
  // (row r, chunk c) of the layer's QmmWide holds k = ks + 32c .. +31 of
  // weight rows r and r + 8 of each of its fragments, dequantizes them pair
  // by pair (the layer's QmmDq: pair i of a word holds its values i and
  // i + PACK / 2) and multiplies each pair with every 8-token fragment of x
  // it reads back from threadgroup memory, where x is staged in the same
  // pair order. The buffers (two; three for CUDA's wgmma) take turns, so
  // a super-step needs one barrier (after staging); the layer's QmmWide
  // picks the matrix unit. With KS > 1, out is float32 (KS, M, N) and part
  // bz writes plane bz; the caller adds the planes. With CS > 1 (CUDA) the
  // parts are the blocks of a thread-block cluster, which add their partial
  // sums among themselves and write T.
  constexpr int W = $W;
  constexpr int RF = $RF;
  constexpr int TOK = $TOK;
  constexpr int KS = $KS;
  constexpr int BITS = $BITS;
  constexpr int GS = $GS;
  constexpr int XP = $XP;
  constexpr int THREADS = W * $SIMD;
  constexpr int PACK = 32 / BITS;
  constexpr int CW = BITS;  // 32-bit words holding 32 values
  constexpr int PW = PACK / 2;  // pairs per word
  constexpr int XV = TOK * 16;  // 16-byte vectors of x per super-step
  constexpr int XJ = (XV + THREADS - 1) / THREADS;
$prologue
  const int KW = K / PACK;
  const int G = K / GS;
$parts
  const int nw = bx * W * RF * 16 + int(warp) * RF * 16;
  // Part bz of K: super-steps [bz * PER, (bz + 1) * PER) of the K / 128.
  const int PER = ((K + 127) / 128 + $NPARTS - 1) / $NPARTS;
  const int kbeg = bz * PER * 128;
  const int kend = kbeg + PER * 128 < K ? kbeg + PER * 128 : K;

  constexpr int XB = qmm_wide_buffers<TOK / 8, W, RF>();  // the layer's number of x buffers
  $shared uint4 xs_raw[XB * TOK * XP / 8];
  ${tg}T* xs = (${tg}T*)xs_raw;
  QmmWide<T, TOK / 8, RF, W, XP> wd;
  wd.init(lane);

  uint4 xr[XJ];
  uint32_t wn[RF][2][CW];
  float sn[RF][2];
  float bn[RF][2];
  int kl = kbeg;
  if (kl < kend) {
$load
  }
  int buf = 0;
  for (int ks = kbeg; ks < kend; ks += 128) {
    uint32_t wc[RF][2][CW];
    QmmDq<T, BITS> dq[RF][2];
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int i = 0; i < CW; ++i) {
          wc[f][h][i] = wn[f][h][i];
        }
        dq[f][h].set(sn[f][h], bn[f][h]);
      }
    }
    // x staged in pair order (the layer's qmm_pair_order), as QmmDq pairs
    // weights, into the buffer last read XB super-steps ago:
    // the barrier of the last super-step (and the layer's staged()) keeps
    // it from being overwritten while read.
    ${tg}T* xb = xs + buf * TOK * XP;
$stage
    wd.staged();
    $barrier;
    kl = ks + 128;
    if (kl < kend) {
$load
    }
    // Step s of the layer's QMM_WIDE_STEPS takes QMM_WIDE_PAIRS pairs of each
    // row: pair q of the chunk is pair q % PW of word q / PW.
#pragma unroll
    for (int s = 0; s < QMM_WIDE_STEPS; ++s) {
      uint32_t pa[RF][QMM_WIDE_PAIRS];
      uint32_t pb[RF][QMM_WIDE_PAIRS];
#pragma unroll
      for (int f = 0; f < RF; ++f) {
#pragma unroll
        for (int p = 0; p < QMM_WIDE_PAIRS; ++p) {
          const int q = s * QMM_WIDE_PAIRS + p;
          pa[f][p] = dq[f][0].pair(wc[f][0][q / PW], q % PW);
          pb[f][p] = dq[f][1].pair(wc[f][1][q / PW], q % PW);
        }
      }
      wd.mma(xb, s, pa, pb);
    }
    buf = buf + 1 == XB ? 0 : buf + 1;
  }
  wd.finish();
$epilogue
""")

# The wide kernel's parts of K: planes (KS, the part major in y) or the blocks of a
# cluster (CS, consecutive in y), and what it writes.
_WIDE_PLANE_PARTS = """\
  const int MB = (M + TOK - 1) / TOK;
  const int bz = by / MB;
  const int m0 = (by % MB) * TOK;"""

_WIDE_PLANE_STORE = """\
  wd.frag.store(out + size_t(bz) * size_t(M) * size_t(N), m0, nw, M, N);"""

# (the skinny kernels' too: $TOKENS, the block's tokens)
_CLUSTER_PARTS = """\
  // K split over the CS blocks of a thread-block cluster, consecutive in y.
  constexpr int CS = $CS;
  const int bz = by % CS;
  const int m0 = (by / CS) * $TOKENS;"""

_WIDE_CLUSTER_STORE = """\
  // The cluster adds its CS partial sums (the layer's QmmClusterSum, in the x
  // buffers, which no block reads any more, over as many rounds as they need):
  // 8-token tile i belongs to block i % CS, which adds the CS blocks' sums in
  // block order and writes those token rows of T.
  QmmClusterSum<CS, TOK / 8, RF, THREADS, int(sizeof(xs_raw))> cs;
  cs.init((${tg}float*)xs_raw, int(tid));
  cs.run(wd.frag, out, m0, bx * W * RF * 16, int(warp) * RF * 16, M, N);"""

#: Ahead of a cluster kernel's header (CUDA). MLX writes the kernel's signature
#: itself and takes no cluster shape, but the header comes before it, so the shape
#: rides on ``__global__`` (PERFORMANCE.md 6u: so launched, alone and in MLX's CUDA
#: graphs), as do launch bounds (:func:`_kernel_attributes`). Not in the CPU
#: emulation, which runs a cluster's blocks in turn.
_CLUSTER_CHECK = """\
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "qmmperf: this kernel splits K over a thread-block cluster, which needs sm_90 or later"
#endif
"""


def _kernel_attributes(config: KernelConfig, clusters: int) -> str:
    """The CUDA kernel's attributes, ahead of its header: a cluster's shape, and launch
    bounds where a skinny kernel that fetches weights ahead (``p``) would take more
    registers than its block may have (:attr:`SkinnyConfig.launch_bounds`,
    PERFORMANCE.md 6x)."""
    attributes = []
    if clusters > 1:
        attributes.append(f"__cluster_dims__(1, {clusters}, 1)")
    if isinstance(config, SkinnyConfig) and config.launch_bounds:
        attributes.append(f"__launch_bounds__({config.threads})")
    if not attributes:
        return ""
    return ("#if !defined(QMMPERF_CUDA_CPU_EMULATION)\n"
            + (_CLUSTER_CHECK if clusters > 1 else "")
            + "#undef __global__\n#define __global__ __location__(global) "
            + " ".join(attributes) + "\n#endif\n")


_DEQUANT_BODY = Template("""\
  // Block bx dequantizes weight row bx into out[bx][0 : K] (T): thread t takes
  // the row's 32-bit words t, t + THREADS, ... (PACK values of one
  // quantization group each), dequantizes them pair by pair with the layer's
  // QmmDq (pair i of a word holds its values i and i + PACK / 2) and writes
  // the values back in order: a warp reads 128 contiguous bytes and writes
  // 32 * PACK * 2. x is an input only for its shape (K), as in every kernel
  // of the family.
  constexpr int BITS = $BITS;
  constexpr int GS = $GS;
  constexpr int THREADS = $THREADS;
  constexpr int PACK = 32 / BITS;
  constexpr int PW = PACK / 2;  // pairs per word
$prologue
  const int KW = K / PACK;
  const int G = K / GS;
  const size_t row = size_t(bx);
  for (int c = int(tid); c < KW; c += THREADS) {
    const int k = c * PACK;
    const uint32_t word = w[row * size_t(KW) + size_t(c)];
    const size_t g = row * size_t(G) + size_t(k / GS);
    QmmDq<T, BITS> dq;
    dq.set(float(scales[g]), float(biases[g]));
    uint32_t p[PW];
#pragma unroll
    for (int q = 0; q < PW; ++q) {
      p[q] = dq.pair(word, q);
    }
    // Output word j holds values 2j and 2j + 1: halves of pairs 2j and 2j + 1
    // (low halves for the word's first PACK / 2 values, then high halves).
    ${dev}uint32_t* dst = (${dev}uint32_t*)(out + row * size_t(K) + size_t(k));
    if (PW == 4) {  // 4 bits: 8 values, one 16-byte store (% PW: in range at 8 bits too)
      uint4 d;
      d.x = (p[0] & 0xFFFFu) | (p[1] << 16);
      d.y = (p[2 % PW] & 0xFFFFu) | (p[3 % PW] << 16);
      d.z = (p[0] >> 16) | (p[1] & 0xFFFF0000u);
      d.w = (p[2 % PW] >> 16) | (p[3 % PW] & 0xFFFF0000u);
      *((${dev}uint4*)dst) = d;
    } else {  // 8 bits: 4 values
      dst[0] = (p[0] & 0xFFFFu) | (p[1] << 16);
      dst[1] = (p[0] >> 16) | (p[1] & 0xFFFF0000u);
    }
  }
""")


def _indent_free(text: str) -> str:
    return text.rstrip("\n")


def _render(template: Template, dialect: Dialect, **values: object) -> str:
    snippets = {
        key: Template(val).substitute(dev=dialect.dev, tg=dialect.tg)
        for key, val in (("load", _TILED_LOAD), ("store", _TILED_STORE))
    }
    weights = Template(_FRAG_WEIGHTS)
    if template is _WIDE_BODY:
        cluster = int(str(values["CS"])) > 1
        values = {
            **values,
            "parts": Template(_CLUSTER_PARTS if cluster else _WIDE_PLANE_PARTS
                              ).substitute(values, TOKENS="TOK"),
            "NPARTS": "CS" if cluster else "KS",
            "epilogue": Template(_WIDE_CLUSTER_STORE if cluster else _WIDE_PLANE_STORE
                                 ).substitute(tg=dialect.tg),
        }
        snippets["load"] = Template(_WIDE_LOAD).substitute(dev=dialect.dev, weights=_indent_free(
            weights.substitute(dev=dialect.dev, frag="wd.frag", n="nw", k="kl", w="wn", s="sn",
                               b="bn", load_w="qmm_load_w", FR=16, H=2)))
        values = {**values, "stage": _indent_free(
            Template(_WIDE_STAGE).substitute(tg=dialect.tg, dst="xb"))}
    if template in (_SKINNY_BODY, _SKINNY8_BODY):
        cluster = int(str(values["CS"])) > 1
        values = {
            **values,
            "reduce": _indent_free(Template(
                _SKINNY_CLUSTER_REDUCE if cluster else _SKINNY_REDUCE).substitute(
                    SIMD=SIMD, barrier=dialect.barrier)),
            "head": Template(_SKINNY_HEAD).substitute(
                values, prologue=_indent_free(dialect.prologue),
                FR=8 if template is _SKINNY8_BODY else 16,
                parts=Template(_CLUSTER_PARTS if cluster else _SKINNY_PLAIN_PARTS
                               ).substitute(values, TOKENS="8 * TILES")),
            "kfirst": "(bz * W + int(warp)) * 128" if cluster else "int(warp) * 128",
            "kstride": "CS * W * 128" if cluster else "W * 128",
        }
    if template is _SKINNY_BODY:
        values = {**values, "weights": _indent_free(weights.substitute(
            dev=dialect.dev, frag="sk.frag", n="n0", k="ks", w="wv", s="sv", b="bv",
            load_w="qmm_load_w_line", FR=16, H=2))}
    if template is _SKINNY8_BODY:
        values = {**values, **{
            key: _indent_free(weights.substitute(
                dev=dialect.dev, frag="sk.frag", n="n0", k=k, w=w, s=s, b=b,
                load_w="qmm_load_w_line", FR=8, H=1))
            for key, k, w, s, b in (("weights", "ks", "wv", "sv", "bv"),
                                    ("next", "kn", "wn", "sn", "bn"))
        }}
    decode = Template(_DECODE_LOAD)
    snippets["loadw"] = decode.substitute(dev=dialect.dev, w="wv", s="s", b="b", k="k")
    snippets["loadn"] = decode.substitute(dev=dialect.dev, w="wn", s="sn", b="bn", k="kn")
    return template.substitute(
        shared=dialect.shared, tg=dialect.tg, dev=dialect.dev, barrier=dialect.barrier,
        prologue=_indent_free(dialect.prologue), load=_indent_free(snippets["load"]),
        store=_indent_free(snippets["store"]), loadw=_indent_free(snippets["loadw"]),
        loadn=_indent_free(snippets["loadn"]), SIMD=SIMD, PAD=PAD, **values,
    )


def compact(text: str) -> str:
    """Drop comment-only lines, blank lines and indentation.

    MLX concatenates and hashes a custom kernel's full source on every launch
    (``cuda_kernel`` builds it per call, both backends hash it per eval), so
    a shorter source is a cheaper launch; the layer files stay readable.
    """
    kept = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in kept if line and not line.startswith("//")) + "\n"


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_DECLARED = re.compile(r"\bstruct\s+(\w+)|(\w+)\s*\(")


def prune(header: str, body: str) -> str:
    """The top-level declarations of ``header`` that ``body`` uses, directly or not.

    ``header`` is a compacted layer: preprocessor lines and declarations
    (functions and structs, each with its ``template`` line).  Each kernel
    uses a part of the layer, and MLX copies and hashes a kernel's whole
    source on every launch (:func:`compact`), so the decode kernel, the one
    launched ~200 times a generated token, carries only what it calls.

    The layer files' include guards are dropped and each declaration (with
    its specializations) gets a guard of its own, ``QMM_HAS_<name>``, so
    that units with different parts of the layer still make one translation
    unit for the checks (the Metal syntax check, nvcc, the CPU emulation);
    other preprocessor lines are kept.  Raises ``ValueError`` on unbalanced
    braces, so a layer this cannot split fails loudly, not with a missing
    declaration.
    """
    items: list[tuple[str | None, str]] = []
    current: list[str] = []
    guards: set[str] = set()
    depth = 0
    for line in header.splitlines():
        if depth == 0 and not current and line.startswith("#"):
            word, _, rest = line.partition(" ")
            if word == "#ifndef":
                guards.add(rest.strip())
            elif word != "#endif" and not (word == "#define" and rest.strip() in guards):
                items.append((None, line))
            continue
        current.append(line)
        depth += line.count("{") - line.count("}")
        if depth < 0:
            raise ValueError(f"unbalanced braces in the kernel layer at {line!r}")
        if depth == 0 and line.endswith(("}", ";")):
            text = "\n".join(current)
            head = next(x for x in current if not x.startswith("template"))
            found = _DECLARED.search(head)
            if found is None:
                raise ValueError(f"no declared name in the kernel layer's {head!r}")
            items.append((found.group(1) or found.group(2), text))
            current = []
    if current:
        raise ValueError(f"unterminated declaration in the kernel layer: {current[0]!r}")
    declared = {name for name, _ in items if name is not None}
    wanted = set(_IDENTIFIER.findall(body)) & declared
    pending = list(wanted)
    while pending:
        name = pending.pop()
        for item, text in items:
            if item == name:
                for used in set(_IDENTIFIER.findall(text)) & declared - wanted:
                    wanted.add(used)
                    pending.append(used)
    out: list[str] = []
    for i, (name, text) in enumerate(items):
        if name is None:
            out.append(text)
        elif name in wanted:
            first = i == 0 or items[i - 1][0] != name
            last = i + 1 == len(items) or items[i + 1][0] != name
            out.append((f"#ifndef QMM_HAS_{name}\n#define QMM_HAS_{name}\n" if first else "")
                       + text + ("\n#endif" if last else ""))
    return "\n".join(out) + "\n"


def _name(stem: str, header: str, body: str) -> str:
    digest = hashlib.sha1((header + "\0" + body).encode()).hexdigest()[:10]
    return f"{stem}_{digest}"


def generate(config: KernelConfig, *, bits: int, group_size: int, language: str) -> KernelSource:
    """The kernel for ``config`` at these quantization settings, in ``language``."""
    try:
        dialect = DIALECTS[language]
    except KeyError:
        raise ValueError(
            f"language={language!r}: kernels are generated for {', '.join(DIALECTS)}"
        ) from None
    header = compact(dialect.layer())
    clusters = config.clusters if isinstance(config, (SkinnyConfig, WideConfig)) else 1
    if clusters > 1 and language != "cuda":
        raise TileError(
            f"{config.name}: splits K over a thread-block cluster (c{clusters}), "
            f"which {language} does not have; only the CUDA kernel (sm_90 and later) does"
        )
    cluster = f"c{clusters}" if clusters > 1 else ""
    if isinstance(config, TileConfig):
        body = _render(
            _TILED_BODY, dialect, BM=config.bm, BN=config.bn, BK=config.bk, WM=config.wm,
            WN=config.wn, KS=config.splits, BITS=bits, GS=group_size,
        )
        stem = (
            f"qmmperf_tiled_{config.bm}x{config.bn}x{config.bk}_wm{config.wm}wn{config.wn}"
            f"k{config.splits}_b{bits}_g{group_size}_{language}"
        )
    elif isinstance(config, SkinnyConfig) and config.half:
        body = _render(_SKINNY8_BODY, dialect, W=config.warps, RF=config.rows, BITS=bits,
                       GS=group_size, PREFETCH="true" if config.prefetch else "false",
                       CS=clusters)
        stem = (f"qmmperf_skinny_w{config.warps}r{config.rows}h{'p' if config.prefetch else ''}"
                f"{cluster}_b{bits}_g{group_size}_{language}")
    elif isinstance(config, SkinnyConfig):
        body = _render(_SKINNY_BODY, dialect, W=config.warps, RF=config.rows, BITS=bits,
                       GS=group_size, CS=clusters)
        stem = (f"qmmperf_skinny_w{config.warps}r{config.rows}{cluster}"
                f"_b{bits}_g{group_size}_{language}")
    elif isinstance(config, WideConfig):
        body = _render(
            _WIDE_BODY, dialect, W=config.warps, RF=config.rows, TOK=config.tokens,
            KS=config.splits, CS=config.clusters, BITS=bits, GS=group_size, XP=WIDE_ROW_PITCH,
        )
        stem = (f"qmmperf_wide_w{config.warps}r{config.rows}m{config.tokens}k{config.splits}"
                f"{cluster}_b{bits}_g{group_size}_{language}")
    elif isinstance(config, DequantConfig):
        body = _render(_DEQUANT_BODY, dialect, THREADS=config.threads, BITS=bits,
                       GS=group_size)
        stem = f"qmmperf_dequant_b{bits}_g{group_size}_{language}"
    elif isinstance(config, DecodeConfig):
        body = _render(
            _DECODE_BODY, dialect, R=config.rows, NW=config.warps, U=config.vectors,
            KS=config.splits, BITS=bits, GS=group_size,
        )
        stem = (f"qmmperf_decode_r{config.rows}w{config.warps}u{config.vectors}k{config.splits}"
                f"_b{bits}_g{group_size}_{language}")
    else:
        raise TypeError(f"not a kernel configuration: {config!r}")
    body = compact(body)
    header = prune(header, body)
    if language == "cuda":
        header = _kernel_attributes(config, clusters) + header
    return KernelSource(
        name=_name(stem, header, body), language=language, header=header, body=body,
        threads=config.threads, output_dtype="float32" if output_planes(config) > 1 else None,
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def decode_tokens(M: int) -> int:
    """The decode kernel's ``MR`` for M rows: the next power of two, at most 8."""
    mr = 1
    while mr < min(M, DECODE_MAX_TOKENS):
        mr *= 2
    return mr


def skinny_tiles(M: int) -> int:
    """The skinny kernel's ``TILES``: 8-token fragments per block (1, or 2 from M = 9)."""
    return 1 if M <= 8 else SKINNY_MAX_TOKENS // 8


def template_args(config: KernelConfig, M: int) -> list[tuple[str, int]]:
    """Template arguments after ``T`` for M rows: the decode ``MR``, the skinny ``TILES``."""
    if isinstance(config, DecodeConfig):
        return [("MR", decode_tokens(M))]
    if isinstance(config, SkinnyConfig):
        return [("TILES", skinny_tiles(M))]
    return []


def output_shape(config: KernelConfig, M: int, N: int, K: int) -> tuple[int, ...]:
    """``out``'s shape for an (M, K) x (N, K) problem: ``(M, N)``; ``(splits, M, N)``
    float32 planes for a kernel split over K; the dense ``(N, K)`` weight for the
    dequant kernel."""
    if isinstance(config, DequantConfig):
        return (N, K)
    planes = output_planes(config)
    return (planes, M, N) if planes > 1 else (M, N)


def geometry(config: KernelConfig, M: int, N: int) -> tuple[tuple[int, int, int],
                                                             tuple[int, int, int]]:
    """``(grid, threadgroup)`` in threads, as both ``metal_kernel`` and ``cuda_kernel`` take them.

    The grid's x axis walks N (so neighbouring blocks share an activation
    tile), its y axis walks M (and, for a tile split over K, the parts of K).
    """
    threads = config.threads
    if isinstance(config, TileConfig):
        blocks = (_ceil_div(N, config.bn), _ceil_div(M, config.bm) * config.splits)
    elif isinstance(config, WideConfig):
        blocks = (_ceil_div(N, config.rows_per_block),
                  _ceil_div(M, config.tokens) * config.splits * config.clusters)
    elif isinstance(config, DequantConfig):
        blocks = (N, 1)  # one weight row a block, whatever M
    elif isinstance(config, SkinnyConfig):
        blocks = (_ceil_div(N, config.rows_per_block),
                  _ceil_div(M, 8 * skinny_tiles(M)) * config.clusters)
    else:
        blocks = (_ceil_div(N, config.rows_per_block), _ceil_div(M, decode_tokens(M)))
    return (blocks[0] * threads, blocks[1], 1), (threads, 1, 1)
