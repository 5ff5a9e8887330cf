// Runs the generated CUDA kernels on a CPU, for tests on machines without a GPU.
//
// Each CUDA thread of a block is a std::thread; blocks run one after another,
// so `__shared__` arrays can be function statics. __syncthreads() is a
// std::barrier over the block, and every warp-collective operation (shuffle,
// ldmatrix, mma.sync) is an exchange through per-warp scratch between two
// barriers over the warp. ldmatrix and mma.sync m16n8k16 follow the fragment
// layouts of the PTX ISA; defining QMM_HAS_<name> for each of them here makes
// the generated source (each declaration guarded so, tiled.source.prune) skip
// its inline-PTX versions.
//
// Compile as C++20 with g++ (needs _Float16): g++ -std=c++20 -O1 -pthread, with
// cpu_grid.h (the block/warp machinery shared with the Metal emulation) beside it.

#ifndef QMMPERF_CUDA_CPU_EMULATION
#define QMMPERF_CUDA_CPU_EMULATION

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "cpu_grid.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __shared__ static

// --- fp16 / bf16, stored as their bits --------------------------------------

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) {
    _Float16 h = static_cast<_Float16>(f);  // round to nearest even
    std::memcpy(&bits, &h, 2);
  }
  operator float() const {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return static_cast<float>(h);
  }
};

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(qmm_emu::float_to_bf16_bits(f)) {}
  operator float() const { return qmm_emu::bf16_bits_to_float(bits); }
};

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  h.bits = u;
  return h;
}
inline __half __float2half_rn(float f) { return __half(f); }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

namespace cooperative_groups {}

// --- thread ids over cpu_grid.h -----------------------------------------------

struct qmm_emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local qmm_emu_dim3 threadIdx;
inline thread_local qmm_emu_dim3 blockIdx;

namespace mlx::core::cu {
using Shape = std::array<int32_t, 10>;
using Strides = std::array<int64_t, 10>;
}  // namespace mlx::core::cu

namespace qmm_emu {

// Runs fn once per CUDA thread of a grid of (gx, gy) blocks of `threads`.
inline void launch_cuda(int gx, int gy, int threads, const std::function<void()>& fn) {
  launch(gx, gy, threads, [&fn](int t, int bx, int by) {
    threadIdx = {static_cast<unsigned>(t), 0, 0};
    blockIdx = {static_cast<unsigned>(bx), static_cast<unsigned>(by), 0};
    fn();
  });
}

template <typename T>
inline float elem(uint32_t reg, int half) {
  T v;
  v.bits = static_cast<uint16_t>(half ? (reg >> 16) : (reg & 0xFFFFu));
  return static_cast<float>(v);
}

}  // namespace qmm_emu

inline void __syncthreads() { qmm_emu::block_sync(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  auto& w = qmm_emu::warp();
  const int l = qmm_emu::lane();
  w.f[l] = v;
  w.sync();
  const float other = w.f[l ^ offset];
  w.sync();
  return other;
}

// --- the PTX instructions of qmm_ptx.cuh -------------------------------------

#define QMM_HAS_qmm_smem_addr
#define QMM_HAS_qmm_ldmatrix_x4
#define QMM_HAS_qmm_ldmatrix_x2
#define QMM_HAS_qmm_hfma2
#define QMM_HAS_qmm_and_or
#define QMM_HAS_qmm_prmt
#define QMM_HAS_qmm_load_w
#define QMM_HAS_qmm_load_w_line
#define QMM_HAS_qmm_load_w_guarded
#define QMM_HAS_QmmMma
#define QMM_HAS_qmm_wgmma_desc
#define QMM_HAS_qmm_wgmma_fence
#define QMM_HAS_qmm_wgmma_commit
#define QMM_HAS_qmm_wgmma_wait
#define QMM_HAS_qmm_fence_async_shared
#define QMM_HAS_qmm_fence_operand
#define QMM_HAS_QmmWgmma
#define QMM_HAS_qmm_cluster_sync
#define QMM_HAS_QmmClusterSum
#define QMM_HAS_QmmClusterAdd

// Predicated ld.global.nc with cache hints: plain loads, zeros unless live.
inline uint4 qmm_load_w(const uint4* p, bool live) { return live ? *p : uint4{0, 0, 0, 0}; }
inline uint4 qmm_load_w_line(const uint4* p, bool live) { return qmm_load_w(p, live); }
inline uint4 qmm_load_w_guarded(const uint4* p) { return *p; }

// ldmatrix .m8n8 .b16: lane l supplies row l % 8 of matrix l / 8 and receives,
// from each matrix, row l / 4 at columns 2 (l % 4) and 2 (l % 4) + 1.
template <int Count>
inline void qmm_emu_ldmatrix(uint32_t* r, const void* p) {
  auto& w = qmm_emu::warp();
  const int l = qmm_emu::lane();
  w.ptr[l] = p;
  w.sync();
  for (int i = 0; i < Count; ++i) {
    const auto* row = static_cast<const uint16_t*>(w.ptr[i * 8 + l / 4]);
    r[i] = static_cast<uint32_t>(row[2 * (l % 4)]) |
           (static_cast<uint32_t>(row[2 * (l % 4) + 1]) << 16);
  }
  w.sync();
}

inline void qmm_ldmatrix_x4(uint32_t (&r)[4], const void* p) { qmm_emu_ldmatrix<4>(r, p); }
inline void qmm_ldmatrix_x2(uint32_t (&r)[2], const void* p) { qmm_emu_ldmatrix<2>(r, p); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: with g = lane / 4 and
// t = lane % 4, A regs hold (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
// B regs hold k = 2t..2t+1 and 2t+8..2t+9 of column g; D holds (g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1).
inline uint32_t qmm_hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
  for (int h = 0; h < 2; ++h) {
    const float r = std::fma(qmm_emu::elem<__half>(a, h), qmm_emu::elem<__half>(b, h),
                             qmm_emu::elem<__half>(c, h));
    d |= static_cast<uint32_t>(__half(r).bits) << (16 * h);
  }
  return d;
}

// prmt.b32 in its default mode, for selectors without sign replication (bit 3 of a nibble).
template <uint32_t SEL>
inline uint32_t qmm_prmt(uint32_t a, uint32_t b) {
  static_assert((SEL & 0x8888u) == 0, "prmt's sign replication is not emulated");
  const uint64_t ba = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    d |= static_cast<uint32_t>((ba >> (8 * ((SEL >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
  }
  return d;
}

inline uint32_t qmm_and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }

// The 16x16 A operand of m16n8k16 (and of a warp's slice of wgmma) from the
// A registers every lane of the warp put in its scratch.
template <typename T>
inline void qmm_emu_a_matrix(float (&A)[16][16], const qmm_emu::Warp& w) {
  for (int src = 0; src < 32; ++src) {
    const int g = src / 4;
    const int t = src % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = qmm_emu::elem<T>(w.a[src][0], h);
      A[g + 8][2 * t + h] = qmm_emu::elem<T>(w.a[src][1], h);
      A[g][2 * t + 8 + h] = qmm_emu::elem<T>(w.a[src][2], h);
      A[g + 8][2 * t + 8 + h] = qmm_emu::elem<T>(w.a[src][3], h);
    }
  }
}

template <typename T>
struct QmmMma {
  static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    auto& w = qmm_emu::warp();
    const int l = qmm_emu::lane();
    for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
    for (int i = 0; i < 2; ++i) w.b[l][i] = b[i];
    w.sync();
    float A[16][16];
    float B[16][8];
    qmm_emu_a_matrix<T>(A, w);
    for (int src = 0; src < 32; ++src) {
      const int g = src / 4;
      const int t = src % 4;
      for (int h = 0; h < 2; ++h) {
        B[2 * t + h][g] = qmm_emu::elem<T>(w.b[src][0], h);
        B[2 * t + 8 + h][g] = qmm_emu::elem<T>(w.b[src][1], h);
      }
    }
    w.sync();
    const int g = l / 4;
    const int t = l % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8;
      const int col = 2 * t + (e & 1);
      float sum = 0.0f;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      d[e] += sum;
    }
  }
};

// wgmma (built with -D__CUDA_ARCH_FEAT_SM90_ALL, emulate.build(sm90a=True)):
// warp q of a warpgroup holds rows 16q .. 16q + 15 of A and of D, so each
// warp's part is its own: D[16 x N] (+)= A[16 x 16] x B[16 x N], A from
// the warp's registers in mma.m16n8k16's layout, B read from memory in the
// layout the descriptor describes (8x8 core matrices of 16-byte rows; lbo
// bytes between the two k halves, sbo between groups of 8 columns), D in
// mma's C layout every 8 columns.
// Asynchronous as on the GPU: issuing takes A (the registers are read
// then); B is read and D written only when a qmm_wgmma_wait retires the
// operation's commit group. So a kernel that restages a buffer while a
// wgmma may still read it, or reads D before the wait, computes wrong
// results here too (tests/test_tiled_checks.py breaks the wait to check).
namespace qmm_emu {
struct WgmmaQueue {
  std::vector<std::pair<int, std::function<void()>>> ops;  // (commit group, the rest of it)
  int committed = 0;
  // Runs the operations of every group but the newest `pending` committed ones, in order.
  void retire(int pending) {
    const int upto = committed - pending;
    std::size_t done = 0;
    while (done < ops.size() && ops[done].first < upto) {
      ops[done].second();
      ++done;
    }
    ops.erase(ops.begin(), ops.begin() + static_cast<std::ptrdiff_t>(done));
  }
};
inline thread_local WgmmaQueue wgmma_queue;
}  // namespace qmm_emu

inline void qmm_wgmma_fence() {}
inline void qmm_wgmma_commit() { ++qmm_emu::wgmma_queue.committed; }
template <int N>
inline void qmm_wgmma_wait() { qmm_emu::wgmma_queue.retire(N); }
inline void qmm_fence_async_shared() {}
inline void qmm_fence_operand(float&) {}

// Thread-block clusters. Blocks run one after another here, and a cluster's
// blocks (consecutive in y, the grid's outer loop) in rank order, so the sum
// over a cluster is kept from block to block instead of in shared memory: the
// block of rank 0 sets it, each next rank adds its own (the order in which
// the GPU's owner adds them), and the last rank writes every output. The
// cluster barrier has nothing to wait for.
namespace qmm_emu {
inline float* cluster_sums(int bx, int cluster, int n) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, std::vector<float>> sums;
  std::lock_guard<std::mutex> lock(mu);
  auto& v = sums[{bx, cluster}];
  if (static_cast<int>(v.size()) < n) v.resize(n);  // by the block's first thread only
  return v.data();
}
}  // namespace qmm_emu

inline void qmm_cluster_sync() {}

// A cluster's sums, slot by slot: rank 0 sets each slot, each
// next rank adds its own (the owner's order on the GPU), and the last rank
// owns, and writes, every slot. sync() is the block's barrier, since the
// thread that writes a slot's total is not always the one that put it.
template <int CS>
struct QmmClusterAdd {
  float* sums;
  int rank;
  void init(float*, int n) {
    rank = static_cast<int>(blockIdx.y) % CS;
    sums = qmm_emu::cluster_sums(static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y) / CS,
                                 n);
    qmm_emu::block_sync();  // no thread resizes the sums while another holds them
  }
  void put(int i, float v) { sums[i] = rank == 0 ? v : sums[i] + v; }
  void sync() const { qmm_emu::block_sync(); }
  bool owns(int) const { return rank == CS - 1; }
  float total(int i) const { return sums[i]; }
  void done() const {}
};

// The wide kernel's, on the same sums: each thread puts and, in the last rank,
// writes its own accumulators.
template <int CS, int TILES, int RF, int THREADS, int BYTES>
struct QmmClusterSum {
  static constexpr int ACCS = RF * 4 * TILES;
  QmmClusterAdd<CS> add;
  int tid;
  void init(float* s, int thread) {
    tid = thread;
    add.init(s, ACCS * THREADS);
  }
  template <typename T, typename F>
  void run(const F& frag, T* out, int m0, int nb, int nl, int M, int N) {
    for (int e = 0; e < ACCS; ++e) {
      const int i = e * THREADS + tid;
      add.put(i, frag.value(e));
      const int m = m0 + frag.token(e);
      const int n = nb + nl + frag.out_row(e);
      if (add.owns(e) && m < M && n < N) {
        out[size_t(m) * size_t(N) + size_t(n)] = static_cast<T>(add.total(i));
      }
    }
  }
};

template <typename T, int N>
struct QmmWgmma {
  static void run(float* d, const uint32_t (&a)[4], const void* b, int lbo, int sbo,
                  int accumulate) {
    auto& w = qmm_emu::warp();
    const int l = qmm_emu::lane();
    for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
    w.sync();
    float A[16][16];
    qmm_emu_a_matrix<T>(A, w);
    w.sync();
    auto& q = qmm_emu::wgmma_queue;
    q.ops.emplace_back(q.committed, [=]() {
      const auto* base = static_cast<const unsigned char*>(b);
      const int g = l / 4;
      const int t = l % 4;
      for (int j = 0; j < N / 8; ++j) {
        for (int e = 0; e < 4; ++e) {
          const int row = g + (e >> 1) * 8;
          const int col = 8 * j + 2 * t + (e & 1);
          float sum = 0.0f;
          for (int k = 0; k < 16; ++k) {
            T v;
            std::memcpy(&v, base + (col / 8) * sbo + (k / 8) * lbo + (col % 8) * 16 + (k % 8) * 2,
                        2);
            sum += A[row][k] * static_cast<float>(v);
          }
          d[4 * j + e] = (accumulate ? d[4 * j + e] : 0.0f) + sum;
        }
      }
    });
  }
};

#endif  // QMMPERF_CUDA_CPU_EMULATION
