// The block and warp machinery of the CPU emulations of the generated
// kernels (cuda/cpu_emulation.h, metal/cpu_emulation.h).
//
// A block's threads are std::threads; blocks run one after another, so
// threadgroup/shared arrays may be function statics. A block barrier is a
// std::barrier; a warp (SIMD group) has its own barrier and scratch, through
// which its collective operations exchange values: each lane writes, the
// warp syncs, each lane reads, the warp syncs again.

#ifndef QMMPERF_CPU_GRID
#define QMMPERF_CPU_GRID

#include <algorithm>
#include <array>
#include <barrier>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace qmm_emu {

// bfloat16 as both emulations store it: round to nearest even, NaN kept quiet.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) {
    return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  }
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Warp {
  explicit Warp(int n) : bar(n) {}
  std::barrier<> bar;
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float f[32];
  float m[32][3][2];
  void sync() { bar.arrive_and_wait(); }
};

inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<Warp>> warps;
inline thread_local int thread_in_block = 0;

inline Warp& warp() { return *warps[thread_in_block / 32]; }
inline int lane() { return thread_in_block % 32; }
inline void block_sync() { block_barrier->arrive_and_wait(); }

// Runs fn(thread, block_x, block_y) for every thread of a (gx, gy) grid.
inline void launch(int gx, int gy, int threads, const std::function<void(int, int, int)>& fn) {
  for (int by = 0; by < gy; ++by) {
    for (int bx = 0; bx < gx; ++bx) {
      block_barrier = std::make_unique<std::barrier<>>(threads);
      warps.clear();
      for (int w = 0; w < (threads + 31) / 32; ++w) {
        warps.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
      }
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([=, &fn] {
          thread_in_block = t;
          fn(t, bx, by);
        });
      }
      for (auto& th : pool) {
        th.join();
      }
    }
  }
}

// Sum of v over the 32 lanes of the calling thread's warp, in lane order
// (a real SIMD sum reduces in a tree; float sums may differ in the last bit).
inline float warp_sum(float v) {
  auto& w = warp();
  const int l = lane();
  w.f[l] = v;
  w.sync();
  float total = 0.0f;
  for (int i = 0; i < 32; ++i) total += w.f[i];
  w.sync();
  return total;
}

}  // namespace qmm_emu

#endif  // QMMPERF_CPU_GRID
