// qmmperf tiled QMM: the CUDA layer.
//
// The kernel bodies (loaders, dequantization, bounds, the K loop) are
// generated once for every language by pytest_qmmperf/tiled/source.py; they
// call only what this file defines. pytest_qmmperf/metal/qmm_layer.h defines
// the same names for Metal. MLX's cuda_kernel includes <cuda_fp16.h> and
// <cuda_bf16.h> before this header; qmm_ptx.cuh (the matrix instructions as
// inline PTX, sm_80 and newer) comes right before it.

// Guarded so that several kernels can share one translation unit (the CI checks).
#ifndef QMMPERF_CUDA_QMM_LAYER
#define QMMPERF_CUDA_QMM_LAYER

// Bits of an unsigned integer below 2^23 -> the same value as a float,
// without an int-to-float conversion: 2^23 + q in the mantissa, minus 2^23.
__device__ __forceinline__ float qmm_q2f(uint32_t q) {
  return __uint_as_float(0x4B000000u | q) - 8388608.0f;
}

// Value i of a packed word as f = 1 + q / 2^BITS: q shifted under the
// exponent of 1.0 in a float's mantissa (a shift and a mask, no int-to-float
// conversion); s * q + b = (s * 2^BITS) * f + (b - s * 2^BITS).
template <int BITS>
__device__ __forceinline__ float qmm_unit(uint32_t word, int i) {
  const int sh = 23 - BITS - i * BITS;
  const uint32_t q = (sh >= 0 ? (word << sh) : (word >> (-sh))) &
      (((1u << BITS) - 1u) << (23 - BITS));
  return __uint_as_float(q | 0x3F800000u);
}

__device__ __forceinline__ uint4 qmm_zero4() {
  return make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ uint32_t qmm_word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// The two 16-bit activations packed in a 32-bit word, low half first.
template <typename T>
struct QmmHalves;

template <>
struct QmmHalves<__half> {
  __device__ __forceinline__ static float lo(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
  }
  __device__ __forceinline__ static float hi(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(a))) |
        (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(b))) << 16);
  }
};

template <>
struct QmmHalves<__nv_bfloat16> {
  __device__ __forceinline__ static float lo(uint32_t w) {
    return __uint_as_float(w << 16);
  }
  __device__ __forceinline__ static float hi(uint32_t w) {
    return __uint_as_float(w & 0xFFFF0000u);
  }
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
        (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
  }
};

template <typename T>
__device__ __forceinline__ float qmm_lo(uint32_t w) {
  return QmmHalves<T>::lo(w);
}

template <typename T>
__device__ __forceinline__ float qmm_hi(uint32_t w) {
  return QmmHalves<T>::hi(w);
}

// Two floats rounded to T, packed low half first (one 32-bit store to shared memory).
template <typename T>
__device__ __forceinline__ uint32_t qmm_pack(float a, float b) {
  return QmmHalves<T>::pack(a, b);
}

// How the float16 dequantization (QmmDq) and the pair order
// (qmm_pair_order) put bits together; each kernel picks what measured
// fastest for it (PERFORMANCE.md 6t):
// - QMM_OPS_C: shifts and masks in C. ptxas makes two instructions of each
//   mask-and-magic and of each half-word merge, but schedules the 16-row
//   skinny kernel best this way (up to 25% faster at one token).
// - QMM_OPS_PTX: one LOP3 (qmm_and_or) and one PRMT (qmm_prmt) each.
// - QMM_OPS_ONE_SHIFT: QMM_OPS_PTX, and one shift a word at 4 bits (QmmDq).
#define QMM_OPS_C 0
#define QMM_OPS_PTX 1
#define QMM_OPS_ONE_SHIFT 2

// Two values of a packed word dequantized to T and packed, low half first:
// the word's "pair" i (0 <= i < 16 / BITS) holds its values i and
// i + 16 / BITS, which is where the magic-number conversion below finds them
// (the wide and skinny kernels put x in the same order: qmm_pair_order).
// set() takes the group's scale and bias.
// The general form (bfloat16; a bfloat16 cannot hold 128 + q exactly for 8
// bits) works in float: s * q + b = (s * 2^BITS) * f + (b - s * 2^BITS).
// OPS: see the float16 form.
template <typename T, int BITS, int OPS = QMM_OPS_PTX>
struct QmmDq {
  float sp;
  float bp;
  __device__ __forceinline__ void set(float s, float b) {
    sp = s * static_cast<float>(1 << BITS);
    bp = b - sp;
  }
  __device__ __forceinline__ uint32_t pair(uint32_t word, int i) const {
    return qmm_pack<T>(sp * qmm_unit<BITS>(word, i) + bp,
                       sp * qmm_unit<BITS>(word, i + 16 / BITS) + bp);
  }
};

// float16: both values masked under the exponent of 1024 (0x6400: 1024 + q,
// exact for q < 1024), 1024 subtracted exactly, then s * q + b in one
// packed FMA: 3-4 instructions a pair instead of ~9.
// QMM_OPS_ONE_SHIFT (4 bits): one shift a word instead of three. Odd pairs
// are masked where they lie, 4 bits up (1024 + 16q, exact), and scaled back
// in the first FMA (h / 16 - 64); pairs 2 and 3 come from the word shifted
// by 8. Two instructions fewer a word, but only the 8-row skinny kernel
// measured faster with it (PERFORMANCE.md 6t).
template <int BITS, int OPS>
struct QmmDq<__half, BITS, OPS> {
  uint32_t s2;
  uint32_t b2;
  __device__ __forceinline__ void set(float s, float b) {
    s2 = qmm_pack<__half>(s, s);
    b2 = qmm_pack<__half>(b, b);
  }
  __device__ __forceinline__ uint32_t pair(uint32_t word, int i) const {
    constexpr bool one_shift = OPS == QMM_OPS_ONE_SHIFT && BITS == 4;
    if (one_shift && (i & 1)) {
      const uint32_t h = qmm_and_or(i >= 2 ? word >> 8 : word, 0x00F000F0u, 0x64006400u);
      return qmm_hfma2(qmm_hfma2(h, 0x2C002C00u, 0xD400D400u), s2, b2);  // (h / 16 - 64) * s + b
    }
    constexpr uint32_t mask = ((1u << BITS) - 1u) * 0x00010001u;
    const uint32_t v = word >> (one_shift ? 4 * (i & 2) : BITS * i);
    const uint32_t h = OPS == QMM_OPS_C ? (v & mask) | 0x64006400u
                                        : qmm_and_or(v, mask, 0x64006400u);
    return qmm_hfma2(qmm_hfma2(h, 0x3C003C00u, 0xE400E400u), s2, b2);  // (h * 1 - 1024) * s + b
  }
};

// Eight consecutive 16-bit activations (four words of pairs) in the pair
// order of QmmDq<T, BITS>: the pairs (i, i + 16 / BITS) of each group of
// 32 / BITS values, so that a word's pair i of x meets the weights' pair i.
// Low halves of a and b, then their high halves: one PRMT a word, or (QMM_OPS_C) two
// instructions as ptxas compiles the shifts and masks.
template <int BITS, int OPS = QMM_OPS_PTX>
__device__ __forceinline__ uint4 qmm_pair_order(const uint4& v) {
  const uint32_t a = v.x;
  const uint32_t b = BITS == 4 ? v.z : v.y;
  const uint32_t c = BITS == 4 ? v.y : v.z;
  const uint32_t d = v.w;
  if constexpr (OPS == QMM_OPS_C) {
    return make_uint4((a & 0xFFFFu) | (b << 16), (a >> 16) | (b & 0xFFFF0000u),
                      (c & 0xFFFFu) | (d << 16), (c >> 16) | (d & 0xFFFF0000u));
  } else {
    return make_uint4(qmm_prmt<0x5410u>(a, b), qmm_prmt<0x7632u>(a, b),
                      qmm_prmt<0x5410u>(c, d), qmm_prmt<0x7632u>(c, d));
  }
}

__device__ __forceinline__ float qmm_warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  }
  return v;
}

// One warp's WTM x WTN block of out = x @ w.T, accumulated in float from the
// shared tiles xs (WTM x BK, row pitch BKP) and ws (WTN x BK).
// The product is computed transposed, out.T = w @ x.T, so that the weight
// rows fill m16n8k16's 16-row side and the tokens its 8-column side: the
// same 8-token granularity as Metal's 8x8 fragments.
// Fragment layout (g = lane / 4, t = lane % 4): A holds rows g and g + 8 at
// k = 2t, 2t+1 and 2t+8, 2t+9; B holds token g at those k; D holds rows g
// and g + 8 at tokens 2t and 2t+1.
template <typename T, int WTM, int WTN, int BK, int BKP>
struct QmmWarpTile {
  static constexpr int TM = WTM / 8;
  static constexpr int TN = WTN / 16;
  float acc[TN][TM][4];
  int lane;

  __device__ __forceinline__ void init(unsigned l) {
    lane = static_cast<int>(l);
#pragma unroll
    for (int j = 0; j < TN; ++j) {
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[j][i][e] = 0.0f;
        }
      }
    }
  }

  __device__ __forceinline__ void mma(const T* xs, const T* ws) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[TN][4];
      uint32_t b[TM][2];
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        // matrices: rows 0-7 | 8-15 at k 0-7, then the same rows at k 8-15
        qmm_ldmatrix_x4(a[j], ws + (j * 16 + (lane & 15)) * BKP + kk + (lane >> 4) * 8);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        // matrices: tokens 0-7 at k 0-7, then at k 8-15 (lanes 16-31 repeat 0-15)
        qmm_ldmatrix_x2(b[i], xs + (i * 8 + (lane & 7)) * BKP + kk + ((lane >> 3) & 1) * 8);
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          QmmMma<T>::run(acc[j][i], a[j], b[i]);
        }
      }
    }
  }

  // out is T, or float for a tile split over K (its partial sums).
  template <typename O>
  __device__ __forceinline__ void store(O* out, int m0, int n0, int M, int N) {
    const int g = lane >> 2;
    const int t = lane & 3;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = n0 + j * 16 + g + (e >> 1) * 8;
          const int m = m0 + i * 8 + 2 * t + (e & 1);
          if (m < M && n < N) {
            out[static_cast<size_t>(m) * static_cast<size_t>(N) + static_cast<size_t>(n)] =
                static_cast<O>(acc[j][i][e]);
          }
        }
      }
    }
  }
};

// The fragments of the skinny and wide kernels: RF fragments of 16 weight
// rows x 8 * TILES tokens per warp, accumulated in float. Lane (g = lane / 4,
// t = lane % 4) owns rows g and g + 8 of each fragment (`row`) and, of each
// 128-k super-step, k = 32t .. 32t + 31 (`chunk` t) of its weights; the
// m16n8k16 results it holds are rows g, g + 8 at tokens 2t, 2t + 1.
template <int TILES, int RF>
struct QmmRowFrags {
  static constexpr int ACC = 4 * TILES;  // accumulators per fragment
  float acc[RF][TILES][4];
  int row;    // g: rows row and row + 8 of each fragment
  int chunk;  // t
  int g;
  int t;

  // The lane's place in the fragments, without touching the accumulators.
  __device__ __forceinline__ void place(unsigned lane) {
    g = static_cast<int>(lane) >> 2;
    t = static_cast<int>(lane) & 3;
    row = g;
    chunk = t;
  }

  __device__ __forceinline__ void init(unsigned lane) {
    place(lane);
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[f][i][e] = 0.0f;
        }
      }
    }
  }

  // Accumulator e (0 .. RF * ACC - 1): its value, token and weight row in the block.
  __device__ __forceinline__ float value(int e) const {
    return acc[e / ACC][(e % ACC) / 4][e % 4];
  }
  __device__ __forceinline__ int token(int e) const {
    return 8 * ((e % ACC) / 4) + 2 * t + (e & 1);
  }
  __device__ __forceinline__ int out_row(int e) const {
    return 16 * (e / ACC) + g + 8 * ((e % 4) >> 1);
  }

  // out[m0 + token(e)][n0 + out_row(e)] = value(e) inside M x N; out is T, or
  // float for a kernel split over K (its partial sums).
  template <typename O>
  __device__ __forceinline__ void store(O* out, int m0, int n0, int M, int N) const {
#pragma unroll
    for (int e = 0; e < RF * ACC; ++e) {
      const int m = m0 + token(e);
      const int n = n0 + out_row(e);
      if (m < M && n < N) {
        out[static_cast<size_t>(m) * static_cast<size_t>(N) + static_cast<size_t>(n)] =
            static_cast<O>(value(e));
      }
    }
  }
};

// Lane (g, t)'s x for the skinny kernels: x[m0 + 8i + g][ks + 32t .. +31]
// for i < TILES, as 16 pairs each in QmmDq's pair order; zeros past M or K.
template <typename T, int TILES, int BITS, int OPS = QMM_OPS_PTX>
__device__ __forceinline__ void qmm_skinny_x(uint32_t (&xw)[TILES][16], const T* x, int m0, int ks,
                                             int K, int M, int g, int t) {
  const int k = ks + 32 * t;
#pragma unroll
  for (int i = 0; i < TILES; ++i) {
    const int m = m0 + 8 * i + g;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint4 v = qmm_zero4();
      if (k < K && m < M) {
        v = *reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * static_cast<size_t>(K) +
                                            static_cast<size_t>(k + 8 * c));
      }
      v = qmm_pair_order<BITS, OPS>(v);
      xw[i][4 * c] = v.x;
      xw[i][4 * c + 1] = v.y;
      xw[i][4 * c + 2] = v.z;
      xw[i][4 * c + 3] = v.w;
    }
  }
}

// The skinny kernel: QmmRowFrags, each lane loading its own x (tokens g + 8i,
// its chunk) from device memory. mma step s (of 8) gives m16n8k16's k slots
// 2t, 2t+1 the chunk's pair 2s and slots 2t+8, 2t+9 its pair 2s+1, in A
// (weights) and B (x) alike, so each lane only uses data it loaded itself;
// the x it loads serves all RF fragments.
template <typename T, int TILES, int RF, int BITS, typename F = QmmRowFrags<TILES, RF>>
struct QmmSkinny {
  F frag;
  uint32_t xw[TILES][16];  // the chunk's x of token g + 8i, as 16 pairs

  __device__ __forceinline__ void init(unsigned lane) {
    frag.init(lane);
  }

  // OPS: the pair order's instructions (QMM_OPS_C for the 16-row kernel).
  template <int OPS = QMM_OPS_PTX>
  __device__ __forceinline__ void load_x(const T* x, int m0, int ks, int K, int M) {
    qmm_skinny_x<T, TILES, BITS, OPS>(xw, x, m0, ks, K, M, frag.g, frag.t);
  }

  // Fragment f; pa/pb: the chunk's 16 pairs of its weight rows g and g + 8, packed T.
  __device__ __forceinline__ void mma(int f, const uint32_t (&pa)[16], const uint32_t (&pb)[16]) {
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint32_t a[4] = {pa[2 * s], pb[2 * s], pa[2 * s + 1], pb[2 * s + 1]};
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        const uint32_t b[2] = {xw[i][2 * s], xw[i][2 * s + 1]};
        QmmMma<T>::run(frag.acc[f][i], a, b);
      }
    }
  }
};

// The skinny kernel with 8-row fragments (`h`): m16n8k16 with the roles of
// the 16-row form swapped, x as A and the weights as B, so that a block can
// hold 8 x RF weight rows (down's 3072 rows: 128 blocks of 24 instead of 96
// of 32). Lane (g, t) supplies A's rows g and g + 8 (its tokens g and g + 8,
// the x qmm_skinny_x loads; zeros for the upper 8 when TILES = 1) and B's
// column g (weight row g of the fragment), both at its chunk t, and holds
// the results of tokens g and g + 8 at rows 2t and 2t + 1.
template <int RF>
struct QmmRowFrags8 : QmmRowFrags<1, RF> {
  // value(e) as QmmRowFrags<1, RF>'s: fragment e / 4, element e % 4.
  __device__ __forceinline__ int token(int e) const { return this->g + 8 * ((e % 4) >> 1); }
  __device__ __forceinline__ int out_row(int e) const {
    return 8 * (e / 4) + 2 * this->t + (e & 1);
  }
};

template <typename T, int TILES, int RF, int BITS>
struct QmmSkinny8 : QmmSkinny<T, TILES, RF, BITS, QmmRowFrags8<RF>> {
  static constexpr int ACC = 4 * RF;  // accumulators per lane

  // Fragment f; pw: the chunk's 16 pairs of its weight row g, packed T.
  __device__ __forceinline__ void mma(int f, const uint32_t (&pw)[16]) {
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint32_t(&x)[TILES][16] = this->xw;
      const uint32_t a[4] = {x[0][2 * s], TILES > 1 ? x[TILES - 1][2 * s] : 0u,
                             x[0][2 * s + 1], TILES > 1 ? x[TILES - 1][2 * s + 1] : 0u};
      const uint32_t b[2] = {pw[2 * s], pw[2 * s + 1]};
      QmmMma<T>::run(this->frag.acc[f][0], a, b);
    }
  }
};

// The wide kernel: QmmRowFrags against x staged in threadgroup memory,
// TILES 8-token fragments. Step s (of QMM_WIDE_STEPS) gives m16n8k16's k
// slots 2t, 2t+1 the chunk's pair 2s and slots 2t+8, 2t+9 its pair 2s+1, in
// A (the weights, from registers) and B (x) alike. Two forms, picked at
// compile time by qmm_wide_wgmma<TILES, W, RF>():
//
// - wgmma (sm_90a; 64 tokens, whole warpgroups, RF >= 2): the warpgroups
//   multiply with Hopper's wgmma, reading x where it is staged. x's layout:
//   per step s a 16 x 64 tile of B in wgmma's canonical K-major form
//   without swizzle: for each 8 tokens two 8x8 core matrices (k slots 0-7,
//   then 8-15; a token's 8 slots in 16 contiguous bytes) 128 bytes apart,
//   groups of 8 tokens 256 bytes apart, steps 8 TILES x 32 bytes apart. So
//   slots 2t, 2t+1 of token n at step s are word t of row n % 8 of core
//   matrix (n / 8, 0): pair 2s of chunk t. Three buffers, so that a
//   super-step's wgmma run on while the block stages the next.
// - mma.sync (elsewhere, and where wgmma measured no faster: fewer tokens
//   or one fragment a warp, PERFORMANCE.md 6s): x rows of pitch XP halves,
//   16-byte unit u of a row at qmm_wide_unit(row, u); a lane reads 16 bytes
//   of each token, two steps' worth, every other step. Two buffers.
#define QMM_WIDE_STEPS 8
#define QMM_WIDE_PAIRS 2

// wgmma needs whole warpgroups (W, the block's warps, a multiple of 4); it
// measured faster only with 64 tokens and two or more fragments a warp.
template <int TILES, int W, int RF>
__device__ __forceinline__ constexpr bool qmm_wide_wgmma() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  return TILES == 8 && W % 4 == 0 && RF >= 2;
#else
  return false;
#endif
}

template <int TILES, int W, int RF>
__device__ __forceinline__ constexpr int qmm_wide_buffers() {
  return qmm_wide_wgmma<TILES, W, RF>() ? 3 : 2;
}

// The mma.sync form's staged x: unit u (0-15) of token row `row` sits at
// unit qmm_wide_unit(row, u) of the row, so that each quarter-warp's
// 16-byte fragment reads (rows g, g + 1; chunks 0-3, the same unit of each)
// and the staging stores (8 consecutive units of a row) hit 8 different
// groups of 4 banks.
__device__ __forceinline__ int qmm_wide_unit(int row, int u) {
  return u ^ (((u >> 3) & 1) << 1) ^ (row & 1);
}

// Staging: vector i of a super-step's x (TOK x 16 of them) is unit
// qmm_wide_col(i) of token row qmm_wide_row(i). For wgmma's layout, unit 4t +
// j of row 8 (i / 128) + (i / 4) % 8 with t = i % 4 and j = (i / 32) % 4, so
// that a warp's 32 stores land in 32 different banks (row % 8 and chunk t
// pick the bank); otherwise unit i % 16 of row i / 16.
template <int TILES, int W, int RF>
__device__ __forceinline__ int qmm_wide_row(int i) {
  return qmm_wide_wgmma<TILES, W, RF>() ? (((i >> 7) << 3) | ((i >> 2) & 7)) : i / 16;
}

template <int TILES, int W, int RF>
__device__ __forceinline__ int qmm_wide_col(int i) {
  return qmm_wide_wgmma<TILES, W, RF>() ? (((i & 3) << 2) | ((i >> 5) & 3)) : i % 16;
}

// Stores token row r's 16-byte unit u (k = 8u .. 8u + 7 of the super-step,
// chunk u / 4) of the staged x, in pair order. In wgmma's layout its word w
// is the chunk's pair 4 (u % 4) + w: step 2 (u % 4) + w / 2, k-slot half w % 2.
template <typename T, int BITS, int TILES, int W, int RF, int XP>
__device__ __forceinline__ void qmm_wide_stage(T* xb, int r, int u, const uint4& v) {
  const uint4 p = qmm_pair_order<BITS>(v);
  if constexpr (qmm_wide_wgmma<TILES, W, RF>()) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(xb) + (r >> 3) * 64 + (r & 7) * 4 + (u >> 2);
    const int s0 = 2 * (u & 3);
    dst[s0 * TILES * 64] = p.x;
    dst[s0 * TILES * 64 + 32] = p.y;
    dst[(s0 + 1) * TILES * 64] = p.z;
    dst[(s0 + 1) * TILES * 64 + 32] = p.w;
  } else {
    *reinterpret_cast<uint4*>(xb + r * XP + qmm_wide_unit(r, u) * 8) = p;
  }
}

template <typename T, int TILES, int RF, int W, int XP>
struct QmmWide {
  static constexpr bool WG = qmm_wide_wgmma<TILES, W, RF>();
  QmmRowFrags<TILES, RF> frag;
  // wgmma: 1 until a step has run. The first wgmma then ignores the
  // accumulators instead of adding to zeros that other instructions wrote
  // (ptxas would serialize every wgmma of the kernel for those); finish()
  // zeros them if no step ran at all.
  int fresh;
  // mma.sync: x of token g + 8i, words 2s .. 2s + 3 of the chunk; unit j of
  // chunk t of token g starts at xo + ((8j) ^ xc): qmm_wide_unit(g, 4t + j)
  // only flips the two low bits of j (tokens g + 8i: 8i rows further, same
  // parity).
  uint32_t xq[WG ? 1 : TILES][4];
  int xo;
  int xc;

  __device__ __forceinline__ void init(unsigned lane) {
    if constexpr (WG) {
      frag.place(lane);
      fresh = 1;
    } else {
      frag.init(lane);
      xo = frag.g * XP + 32 * frag.t;
      xc = (qmm_wide_unit(frag.g, 4 * frag.t) - 4 * frag.t) * 8;
    }
  }

  // After staging a super-step's x, before the barrier. wgmma: the stores
  // are made visible to it, and this warpgroup's wgmma of the super-step
  // before last are done (the last one's QMM_WIDE_STEPS groups may run on),
  // so past the barrier none reads the buffer the next super-step stages
  // into (waiting only before that staging would leave the other
  // warpgroup's wgmma reading it).
  __device__ __forceinline__ void staged() {
    if constexpr (WG) {
      qmm_fence_async_shared();
      qmm_wgmma_wait<QMM_WIDE_STEPS>();
    }
  }

  // Before reading the accumulators.
  __device__ __forceinline__ void finish() {
    if constexpr (WG) {
      qmm_wgmma_wait<0>();
      fence_acc();
      if (fresh) {
        frag.init(frag.g * 4 + frag.t);
      }
    }
  }

  // Keeps the compiler from moving the accumulators of running wgmma.
  __device__ __forceinline__ void fence_acc() {
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          qmm_fence_operand(frag.acc[f][i][e]);
        }
      }
    }
  }

  // Step s against the staged x xb; pa/pb: pairs 2s and 2s+1 of every
  // fragment's weight rows g and g + 8, packed T.
  __device__ __forceinline__ void mma(const T* xb, int s, const uint32_t (&pa)[RF][2],
                                      const uint32_t (&pb)[RF][2]) {
    if constexpr (WG) {
      fence_acc();
      qmm_wgmma_fence();
#pragma unroll
      for (int f = 0; f < RF; ++f) {
        const uint32_t a[4] = {pa[f][0], pb[f][0], pa[f][1], pb[f][1]};
        QmmWgmma<T, 8 * TILES>::run(&frag.acc[f][0][0], a, xb + s * TILES * 128, 128, 256,
                                    1 - fresh);
      }
      qmm_wgmma_commit();
      fresh = 0;
      fence_acc();
    } else {
      if ((s & 1) == 0) {
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
          const uint4 v =
              *reinterpret_cast<const uint4*>(xb + xo + (((s / 2) * 8) ^ xc) + 8 * i * XP);
          xq[i][0] = v.x;
          xq[i][1] = v.y;
          xq[i][2] = v.z;
          xq[i][3] = v.w;
        }
      }
#pragma unroll
      for (int f = 0; f < RF; ++f) {
        const uint32_t a[4] = {pa[f][0], pb[f][0], pa[f][1], pb[f][1]};
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
          const uint32_t b[2] = {xq[i][2 * (s & 1)], xq[i][2 * (s & 1) + 1]};
          QmmMma<T>::run(frag.acc[f][i], a, b);
        }
      }
    }
  }
};

#endif  // QMMPERF_CUDA_QMM_LAYER
