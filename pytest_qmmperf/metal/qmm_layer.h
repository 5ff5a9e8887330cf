// qmmperf tiled QMM: the Metal layer.
//
// The kernel bodies (loaders, dequantization, bounds, the K loop) are
// generated once for every language by pytest_qmmperf/tiled/source.py; they
// call only what this file defines. pytest_qmmperf/cuda/qmm_layer.cuh defines
// the same names for CUDA. MLX prepends <metal_stdlib> (with `using namespace
// metal`) and bfloat16_t before this header.

// Guarded so that several kernels can share one translation unit (the CI checks).
#ifndef QMMPERF_METAL_QMM_LAYER
#define QMMPERF_METAL_QMM_LAYER

// Bits of an unsigned integer below 2^23 -> the same value as a float,
// without an int-to-float conversion: 2^23 + q in the mantissa, minus 2^23.
inline float qmm_q2f(uint32_t q) {
  return as_type<float>(0x4B000000u | q) - 8388608.0f;
}

// Value i of a packed word as f = 1 + q / 2^BITS: q shifted under the
// exponent of 1.0 in a float's mantissa (a shift and a mask, no int-to-float
// conversion); s * q + b = (s * 2^BITS) * f + (b - s * 2^BITS).
template <int BITS>
inline float qmm_unit(uint32_t word, int i) {
  const int sh = 23 - BITS - i * BITS;
  const uint32_t q = (sh >= 0 ? (word << sh) : (word >> (-sh))) &
      (((1u << BITS) - 1u) << (23 - BITS));
  return as_type<float>(q | 0x3F800000u);
}

// The lane layout of an 8x8 simdgroup matrix (MLX's steel GEMM): this lane
// holds row fm, columns fn and fn + 1.
inline void qmm_lane_layout(uint lane, thread short& fm, thread short& fn) {
  const short qid = short(lane / 4);
  fm = short((qid & 4) + ((lane / 2) % 4));
  fn = short((qid & 2) * 2 + (lane % 2) * 2);
}

inline uint4 qmm_zero4() {
  return uint4(0u);
}

// 16 bytes of packed weights, zeros unless `live` (or, guarded, inside the
// caller's own branch). The CUDA layer adds cache hints to these loads;
// Metal has none to give, so they are plain loads.
inline uint4 qmm_load_w(const device uint4* p, bool live) {
  uint4 v = uint4(0u);
  if (live) {
    v = *p;
  }
  return v;
}

inline uint4 qmm_load_w_line(const device uint4* p, bool live) {
  return qmm_load_w(p, live);
}

inline uint4 qmm_load_w_guarded(const device uint4* p) {
  return *p;
}

inline uint32_t qmm_word(thread const uint4& v, int i) {
  return v[i];
}

// The two 16-bit activations packed in a 32-bit word, low half first.
template <typename T>
inline float qmm_lo(uint32_t w) {
  return static_cast<float>(as_type<T>(ushort(w & 0xFFFFu)));
}

template <typename T>
inline float qmm_hi(uint32_t w) {
  return static_cast<float>(as_type<T>(ushort(w >> 16)));
}

// Two floats rounded to T, packed low half first (one 32-bit store to threadgroup memory).
template <typename T>
inline uint32_t qmm_pack(float a, float b) {
  return uint32_t(as_type<ushort>(static_cast<T>(a))) |
      (uint32_t(as_type<ushort>(static_cast<T>(b))) << 16);
}

// How the half dequantization and the pair order put bits together, as in
// the CUDA layer (where QMM_OPS_C and QMM_OPS_PTX differ in the
// instructions ptxas gets; here they are the same code);
// QMM_OPS_ONE_SHIFT: one shift a word at 4 bits (QmmDq).
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
// OPS: see the half form.
template <typename T, int BITS, int OPS = QMM_OPS_PTX>
struct QmmDq {
  float sp;
  float bp;
  inline void set(float s, float b) {
    sp = s * float(1 << BITS);
    bp = b - sp;
  }
  inline uint32_t pair(uint32_t word, int i) const {
    return qmm_pack<T>(sp * qmm_unit<BITS>(word, i) + bp,
                       sp * qmm_unit<BITS>(word, i + 16 / BITS) + bp);
  }
};

// half: both values masked under the exponent of 1024 (0x6400: 1024 + q,
// exact for q < 1024), 1024 subtracted exactly, then s * q + b in one FMA.
// QMM_OPS_ONE_SHIFT (4 bits), as in the CUDA layer: odd pairs masked 4 bits
// up (1024 + 16q) and scaled back (h / 16 - 64), pairs 2 and 3 from the word
// shifted by 8; one shift a word instead of three.
template <int BITS, int OPS>
struct QmmDq<half, BITS, OPS> {
  half s2;
  half b2;
  inline void set(float s, float b) {
    s2 = static_cast<half>(s);
    b2 = static_cast<half>(b);
  }
  inline uint32_t pair(uint32_t word, int i) const {
    const bool one_shift = OPS == QMM_OPS_ONE_SHIFT && BITS == 4;
    const bool odd = one_shift && (i & 1);
    const uint32_t mask = (odd ? 0xF0u : ((1u << BITS) - 1u)) * 0x00010001u;
    const int shift = one_shift ? 4 * (i & 2) : BITS * i;
    const uint32_t h = ((word >> shift) & mask) | 0x64006400u;
    const half scale = odd ? half(0.0625) : half(1);
    const half base = odd ? half(-64) : half(-1024);
    const half lo = fma(fma(as_type<half>(ushort(h & 0xFFFFu)), scale, base), s2, b2);
    const half hi = fma(fma(as_type<half>(ushort(h >> 16)), scale, base), s2, b2);
    return uint32_t(as_type<ushort>(lo)) | (uint32_t(as_type<ushort>(hi)) << 16);
  }
};

// Eight consecutive 16-bit activations (four words of pairs) in the pair
// order of QmmDq<T, BITS>: the pairs (i, i + 16 / BITS) of each group of
// 32 / BITS values, so that a word's pair i of x meets the weights' pair i.
template <int BITS, int OPS = QMM_OPS_PTX>
inline uint4 qmm_pair_order(uint4 v) {
  const uint32_t a = v.x;
  const uint32_t b = BITS == 4 ? v.z : v.y;
  const uint32_t c = BITS == 4 ? v.y : v.z;
  const uint32_t d = v.w;
  uint4 o;
  o.x = (a & 0xFFFFu) | (b << 16);
  o.y = (a >> 16) | (b & 0xFFFF0000u);
  o.z = (c & 0xFFFFu) | (d << 16);
  o.w = (c >> 16) | (d & 0xFFFF0000u);
  return o;
}

inline float qmm_warp_sum(float v) {
  return simd_sum(v);
}

// One SIMD group's WTM x WTN block of out = x @ w.T, accumulated in float
// from the threadgroup tiles xs (WTM x BK, row pitch BKP) and ws (WTN x BK).
// Fragments are 8x8 simdgroup matrices: A = x (tokens x k), B = w.T (k x rows).
// Each lane owns two elements of a fragment, at row fm and columns fn, fn+1
// (the lane layout MLX's steel GEMM uses).
template <typename T, int WTM, int WTN, int BK, int BKP>
struct QmmWarpTile {
  static constexpr int TM = WTM / 8;
  static constexpr int TN = WTN / 8;
  simdgroup_matrix<float, 8, 8> acc[TM][TN];
  short fm;
  short fn;

  inline void init(uint lane) {
    qmm_lane_layout(lane, fm, fn);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        acc[i][j].thread_elements()[0] = 0.0f;
        acc[i][j].thread_elements()[1] = 0.0f;
      }
    }
  }

  inline void mma(const threadgroup T* xs, const threadgroup T* ws) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
      simdgroup_matrix<float, 8, 8> a[TM];
      simdgroup_matrix<float, 8, 8> b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const threadgroup T* p = xs + (i * 8 + fm) * BKP + kk + fn;
        a[i].thread_elements()[0] = static_cast<float>(p[0]);
        a[i].thread_elements()[1] = static_cast<float>(p[1]);
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        // B(k = fm, row = fn + e) = w[row][k]
        const threadgroup T* p = ws + (j * 8 + fn) * BKP + kk + fm;
        b[j].thread_elements()[0] = static_cast<float>(p[0]);
        b[j].thread_elements()[1] = static_cast<float>(p[BKP]);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
    }
  }

  // out is T, or float for a tile split over K (its partial sums).
  template <typename O>
  inline void store(device O* out, int m0, int n0, int M, int N) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int m = m0 + i * 8 + fm;
      if (m >= M) {
        continue;
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int n = n0 + j * 8 + fn;
        device O* o = out + size_t(m) * size_t(N) + size_t(n);
        if (n < N) {
          o[0] = static_cast<O>(acc[i][j].thread_elements()[0]);
        }
        if (n + 1 < N) {
          o[1] = static_cast<O>(acc[i][j].thread_elements()[1]);
        }
      }
    }
  }
};

// The fragments of the skinny and wide kernels: RF fragments of 16 weight
// rows x 8 * TILES tokens per SIMD group, as 8x8 simdgroup matrices in float:
// C = rows x tokens, two per 16 rows. Lane (fm, fn) owns weight rows fm and
// fm + 8 of each fragment (`row`) at chunk fn / 2 of each 128-k super-step
// (`chunk`; k = 32 * chunk .. +31), and holds C at rows fm, fm + 8 and
// tokens fn, fn + 1 (the lane layout MLX's steel GEMM uses).
template <int TILES, int RF>
struct QmmRowFrags {
  static constexpr int ACC = 4 * TILES;  // accumulators per fragment
  simdgroup_matrix<float, 8, 8> acc[RF][TILES][2];
  int row;
  int chunk;
  short fm;
  short fn;

  inline void init(uint lane) {
    qmm_lane_layout(lane, fm, fn);
    row = fm;
    chunk = fn / 2;
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          acc[f][i][h].thread_elements()[0] = 0.0f;
          acc[f][i][h].thread_elements()[1] = 0.0f;
        }
      }
    }
  }

  // Accumulator e (0 .. RF * ACC - 1): its value, token and weight row in the block.
  inline float value(int e) {
    return acc[e / ACC][(e % ACC) / 4][(e % 4) / 2].thread_elements()[e % 2];
  }
  inline int token(int e) const { return 8 * ((e % ACC) / 4) + fn + (e % 2); }
  inline int out_row(int e) const { return 16 * (e / ACC) + fm + 8 * ((e % 4) / 2); }

  // out[m0 + token(e)][n0 + out_row(e)] = value(e) inside M x N; out is T, or
  // float for a kernel split over K (its partial sums).
  template <typename O>
  inline void store(device O* out, int m0, int n0, int M, int N) {
#pragma unroll
    for (int e = 0; e < RF * ACC; ++e) {
      const int m = m0 + token(e);
      const int n = n0 + out_row(e);
      if (m < M && n < N) {
        out[size_t(m) * size_t(N) + size_t(n)] = static_cast<O>(value(e));
      }
    }
  }
};

// Lane (fm, fn)'s x for the skinny kernels: tokens m0 + 8i + fn (xa) and
// + 1 (xb) at k = ks + 32 * (fm / 2) .. +31 for i < TILES, as 16 pairs each
// in QmmDq's pair order; zeros past M or K.
template <typename T, int TILES, int BITS, int OPS = QMM_OPS_PTX>
inline void qmm_skinny_x(thread uint32_t (&xa)[TILES][16], thread uint32_t (&xb)[TILES][16],
                         const device T* x, int m0, int ks, int K, int M, short fm, short fn) {
  const int k = ks + 32 * (fm / 2);
#pragma unroll
  for (int i = 0; i < TILES; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m = m0 + 8 * i + fn + e;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        uint4 v = uint4(0u);
        if (k < K && m < M) {
          v = *((const device uint4*)(x + size_t(m) * size_t(K) + size_t(k + 8 * c)));
        }
        v = qmm_pair_order<BITS, OPS>(v);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (e == 0) {
            xa[i][4 * c + q] = v[q];
          } else {
            xb[i][4 * c + q] = v[q];
          }
        }
      }
    }
  }
}

// B = x.T (k x tokens) of the skinny kernels' step s: lane (fm, fn) holds k slot
// fm, tokens fn and fn + 1 (xa, xb: their pair s of chunk fm / 2; the pair's
// low half for even fm).
template <typename T>
inline simdgroup_matrix<float, 8, 8> qmm_skinny_b(uint32_t xa, uint32_t xb, short fm) {
  simdgroup_matrix<float, 8, 8> b;
  b.thread_elements()[0] = (fm % 2 == 0) ? qmm_lo<T>(xa) : qmm_hi<T>(xa);
  b.thread_elements()[1] = (fm % 2 == 0) ? qmm_lo<T>(xb) : qmm_hi<T>(xb);
  return b;
}

// The skinny kernel: QmmRowFrags, each lane loading its own x from device
// memory. A = weights (rows x k; rows 0-7 and 8-15), B = x.T (k x tokens).
// Step s (of 16) gives A's k slot 2c + e element e of chunk c's pair s
// (QmmDq's pair order, in which load_x also keeps x); B's slot r is then
// element r % 2 of pair s of chunk r / 2, which lane (fm, fn) loads for its
// tokens fn and fn + 1. The same idea as the CUDA layer's QmmSkinny, with
// Metal's fragment layout; the x a lane loads serves all RF fragments.
template <typename T, int TILES, int RF, int BITS, typename F = QmmRowFrags<TILES, RF>>
struct QmmSkinny {
  F frag;
  uint32_t xa[TILES][16];  // token fn of fragment i, chunk fm / 2, as pairs
  uint32_t xb[TILES][16];  // token fn + 1

  inline void init(uint lane) {
    frag.init(lane);
  }
  template <int OPS = QMM_OPS_PTX>
  inline void load_x(const device T* x, int m0, int ks, int K, int M) {
    qmm_skinny_x<T, TILES, BITS, OPS>(xa, xb, x, m0, ks, K, M, frag.fm, frag.fn);
  }

  // Fragment f; pa/pb: the chunk's 16 pairs of its weight rows fm and fm + 8, packed T.
  inline void mma(int f, thread const uint32_t (&pa)[16], thread const uint32_t (&pb)[16]) {
#pragma unroll
    for (int s = 0; s < 16; ++s) {
      simdgroup_matrix<float, 8, 8> a0;
      simdgroup_matrix<float, 8, 8> a1;
      a0.thread_elements()[0] = qmm_lo<T>(pa[s]);
      a0.thread_elements()[1] = qmm_hi<T>(pa[s]);
      a1.thread_elements()[0] = qmm_lo<T>(pb[s]);
      a1.thread_elements()[1] = qmm_hi<T>(pb[s]);
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        const simdgroup_matrix<float, 8, 8> b = qmm_skinny_b<T>(xa[i][s], xb[i][s], frag.fm);
        simdgroup_multiply_accumulate(frag.acc[f][i][0], a0, b, frag.acc[f][i][0]);
        simdgroup_multiply_accumulate(frag.acc[f][i][1], a1, b, frag.acc[f][i][1]);
      }
    }
  }
};

// The skinny kernel with 8-row fragments (`h`): the 16-row form without its
// second A matrix. C = rows x tokens in 8x8 simdgroup matrices, one per
// fragment and token tile; lane (fm, fn) owns weight row fm of each 8-row
// fragment (`row`) at chunk fn / 2, and holds C at row fm, tokens fn, fn + 1.
// The CUDA layer's QmmSkinny8 swaps m16n8k16's operands to get the same
// 8-row blocks; Metal's 8x8 matrices need no swap.
template <int TILES, int RF>
struct QmmRowFrags8 : QmmRowFrags<TILES, RF> {
  // Only the first of each 16-row pair of QmmRowFrags' matrices holds sums.
  inline float value(int e) {
    return this->acc[e / (2 * TILES)][(e % (2 * TILES)) / 2][0].thread_elements()[e % 2];
  }
  inline int token(int e) const { return 8 * ((e % (2 * TILES)) / 2) + this->fn + (e % 2); }
  inline int out_row(int e) const { return 8 * (e / (2 * TILES)) + this->fm; }
};

template <typename T, int TILES, int RF, int BITS>
struct QmmSkinny8 : QmmSkinny<T, TILES, RF, BITS, QmmRowFrags8<TILES, RF>> {
  static constexpr int ACC = 2 * TILES * RF;  // accumulators per lane

  // Fragment f; pw: the chunk's 16 pairs of its weight row fm, packed T.
  inline void mma(int f, thread const uint32_t (&pw)[16]) {
#pragma unroll
    for (int s = 0; s < 16; ++s) {
      simdgroup_matrix<float, 8, 8> a;
      a.thread_elements()[0] = qmm_lo<T>(pw[s]);
      a.thread_elements()[1] = qmm_hi<T>(pw[s]);
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        const simdgroup_matrix<float, 8, 8> b =
            qmm_skinny_b<T>(this->xa[i][s], this->xb[i][s], this->frag.fm);
        simdgroup_multiply_accumulate(this->frag.acc[f][i][0], a, b,
                                      this->frag.acc[f][i][0]);
      }
    }
  }
};

// The wide kernel: QmmRowFrags, with x read back from the block's threadgroup copy
// (token row pitch XP halves, 16-byte units placed by qmm_wide_unit) for
// TILES 8-token fragments.
// Step s (of QMM_WIDE_STEPS) gives A's k slot 2c + e element e of chunk c's
// pair s (QmmDq's pair order, in which x is staged); B's slot r is element
// r % 2 of pair s of chunk r / 2, which lane (fm, fn) reads for its tokens
// fn and fn + 1.
// The wide kernel's staged x: 16-byte unit u (0-15) of token row `row` sits
// at unit qmm_wide_unit(row, u) of the row, so that the staging stores (8
// consecutive units of a row) hit 8 different groups of 4 banks.
inline int qmm_wide_unit(int row, int u) {
  return u ^ (((u >> 3) & 1) << 1) ^ (row & 1);
}

// Stores token row r's 16-byte unit u (k = 8u .. 8u + 7 of the super-step) of
// the staged x, in pair order.
template <typename T, int BITS, int TILES, int W, int RF, int XP>
inline void qmm_wide_stage(threadgroup T* xb, int r, int u, thread const uint4& v) {
  *((threadgroup uint4*)(xb + r * XP + qmm_wide_unit(r, u) * 8)) = qmm_pair_order<BITS>(v);
}

// Staging: vector i of a super-step's x (TOK x 16 of them) is unit i % 16 of
// token row i / 16, so that a simdgroup stores two rows' 16 units.
template <int TILES, int W, int RF>
inline int qmm_wide_row(int i) {
  return i / 16;
}

template <int TILES, int W, int RF>
inline int qmm_wide_col(int i) {
  return i % 16;
}

// Two x buffers: one staged while the other is read.
template <int TILES, int W, int RF>
constexpr int qmm_wide_buffers() {
  return 2;
}

#define QMM_WIDE_STEPS 16
#define QMM_WIDE_PAIRS 1
template <typename T, int TILES, int RF, int W, int XP>
struct QmmWide {
  QmmRowFrags<TILES, RF> frag;
  float xv[TILES][2];  // tokens fn and fn + 1 of fragment i at this step's k slot fm

  inline void init(uint lane) {
    frag.init(lane);
  }

  // The CUDA layer's hooks around staging and before the store (its
  // asynchronous matrix unit); nothing to do here.
  inline void staged() {}
  inline void finish() {}

  inline void load_x(const threadgroup T* xs, int s) {
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = 8 * i + frag.fn + e;
        const int k = 32 * (frag.fm / 2) + 2 * s + frag.fm % 2;  // this step's k slot fm
        xv[i][e] = static_cast<float>(xs[row * XP + qmm_wide_unit(row, k / 8) * 8 + k % 8]);
      }
    }
  }

  // Step s against the staged x xs; pa/pb: pair s of every fragment's weight
  // rows fm and fm + 8, packed T.
  inline void mma(const threadgroup T* xs, int s, thread const uint32_t (&pa)[RF][1],
                  thread const uint32_t (&pb)[RF][1]) {
    load_x(xs, s);
    // Each token fragment's B once, for every row fragment.
    simdgroup_matrix<float, 8, 8> b[TILES];
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
      b[i].thread_elements()[0] = xv[i][0];
      b[i].thread_elements()[1] = xv[i][1];
    }
#pragma unroll
    for (int f = 0; f < RF; ++f) {
      simdgroup_matrix<float, 8, 8> a0;
      simdgroup_matrix<float, 8, 8> a1;
      a0.thread_elements()[0] = qmm_lo<T>(pa[f][0]);
      a0.thread_elements()[1] = qmm_hi<T>(pa[f][0]);
      a1.thread_elements()[0] = qmm_lo<T>(pb[f][0]);
      a1.thread_elements()[1] = qmm_hi<T>(pb[f][0]);
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        simdgroup_multiply_accumulate(frag.acc[f][i][0], a0, b[i], frag.acc[f][i][0]);
        simdgroup_multiply_accumulate(frag.acc[f][i][1], a1, b[i], frag.acc[f][i][1]);
      }
    }
  }
};

#endif  // QMMPERF_METAL_QMM_LAYER
