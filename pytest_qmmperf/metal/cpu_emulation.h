// Runs the generated Metal kernels on a CPU, for tests on machines without a Mac.
//
// The Metal used by the kernels (address spaces, vector types, as_type,
// simd_sum, threadgroup_barrier, 8x8 simdgroup matrices) implemented in C++
// over cpu_grid.h: a threadgroup's threads are std::threads, SIMD-group
// collectives exchange through per-warp scratch. A simdgroup_matrix keeps,
// per lane, the two elements that lane owns in hardware (row fm, columns fn
// and fn + 1, the layout MLX's steel GEMM relies on), so code that gets the
// ownership wrong computes wrong numbers here too.
//
// The source must first go through pytest_qmmperf.metal.check.as_cxx (static
// threadgroup arrays, no attributes on the explicit instantiation).
// Compile as C++20 with g++ (needs _Float16): g++ -std=c++20 -O1 -pthread.

#ifndef QMMPERF_METAL_CPU_EMULATION
#define QMMPERF_METAL_CPU_EMULATION

#include "cpu_grid.h"

#define device
#define constant
#define threadgroup
#define thread

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

typedef _Float16 half;

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) : bits(qmm_emu::float_to_bf16_bits(f)) {}
  operator float() const { return qmm_emu::bf16_bits_to_float(bits); }
};

namespace metal {

struct alignas(16) uint4 {
  uint x, y, z, w;
  uint4() = default;
  explicit uint4(uint v) : x(v), y(v), z(v), w(v) {}
  uint operator[](int i) const { return i == 0 ? x : (i == 1 ? y : (i == 2 ? z : w)); }
};

struct uint3 {
  uint x, y, z;
};

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags) { qmm_emu::block_sync(); }

template <typename T, typename U>
inline T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type: source and destination sizes differ");
  T out;
  std::memcpy(&out, &x, sizeof(T));
  return out;
}

inline float simd_sum(float v) { return qmm_emu::warp_sum(v); }

inline half fma(half a, half b, half c) {
  return static_cast<half>(std::fma(static_cast<float>(a), static_cast<float>(b),
                                    static_cast<float>(c)));
}

template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the emulation implements 8x8 matrices");
  struct Elements {
    T v[2];
    T& operator[](int i) { return v[i]; }
    const T& operator[](int i) const { return v[i]; }
  };
  Elements e;
  Elements& thread_elements() { return e; }
  const Elements& thread_elements() const { return e; }
};

// Row and first column of the two elements lane l owns.
inline void simdgroup_coord(int l, int& fm, int& fn) {
  const int qid = l / 4;
  fm = (qid & 4) + ((l / 2) % 4);
  fn = (qid & 2) * 2 + (l % 2) * 2;
}

template <typename T, int K, int Rows, int Cols>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, Cols, Rows>& d,
                                          const simdgroup_matrix<T, K, Rows>& a,
                                          const simdgroup_matrix<T, Cols, K>& b,
                                          const simdgroup_matrix<T, Cols, Rows>& c) {
  auto& w = qmm_emu::warp();
  const int l = qmm_emu::lane();
  for (int h = 0; h < 2; ++h) {
    w.m[l][0][h] = static_cast<float>(a.e[h]);
    w.m[l][1][h] = static_cast<float>(b.e[h]);
    w.m[l][2][h] = static_cast<float>(c.e[h]);
  }
  w.sync();
  float A[8][8], B[8][8], C[8][8];
  for (int src = 0; src < 32; ++src) {
    int fm, fn;
    simdgroup_coord(src, fm, fn);
    for (int h = 0; h < 2; ++h) {
      A[fm][fn + h] = w.m[src][0][h];
      B[fm][fn + h] = w.m[src][1][h];
      C[fm][fn + h] = w.m[src][2][h];
    }
  }
  w.sync();
  int fm, fn;
  simdgroup_coord(l, fm, fn);
  for (int h = 0; h < 2; ++h) {
    float sum = C[fm][fn + h];
    for (int k = 0; k < 8; ++k) sum += A[fm][k] * B[k][fn + h];
    d.e[h] = static_cast<T>(sum);
  }
}

}  // namespace metal

using namespace metal;

typedef half float16_t;
typedef bfloat bfloat16_t;

#endif  // QMMPERF_METAL_CPU_EMULATION
