// qmmperf tiled QMM: the tensor-core instructions of the CUDA layer, as inline PTX.
//
// ldmatrix, mma.sync m16n8k16 (sm_80 and newer, f16 or bf16 in, f32
// accumulate), Hopper's wgmma (sm_90a) and a packed-half FMA. Kept apart
// from qmm_layer.cuh so that a CPU emulation of these functions can run the
// rest of the generated source unchanged.

#ifndef QMMPERF_CUDA_QMM_PTX
#define QMMPERF_CUDA_QMM_PTX

// Generic pointer -> 32-bit shared-window address, in PTX so that nothing
// depends on which intrinsics NVRTC declares.
__device__ __forceinline__ unsigned qmm_smem_addr(const void* p) {
  unsigned addr;
  asm("{\n  .reg .u64 a;\n  cvta.to.shared.u64 a, %1;\n  cvt.u32.u64 %0, a;\n}\n"
      : "=r"(addr)
      : "l"(p));
  return addr;
}

// Four 8x8 b16 matrices from shared memory; lane l gives the address of
// row l % 8 of matrix l / 8 and receives two elements of each.
__device__ __forceinline__ void qmm_ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(qmm_smem_addr(p)));
}

__device__ __forceinline__ void qmm_ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(qmm_smem_addr(p)));
}

// a * b + c on two halves packed in a 32-bit word, low half first; one rounding.
__device__ __forceinline__ uint32_t qmm_hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// (a & b) | c as one LOP3. Written in C with b and c constant, ptxas emits
// two (an AND, then an OR: a LOP3 takes one immediate), which made the
// float16 dequantization 5 instructions a pair instead of 4.
__device__ __forceinline__ uint32_t qmm_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Bytes of the pair {b, a} picked by SEL's four nibbles (PTX prmt: byte i of
// the result is byte SEL[4i+3:4i] of b:a, a's bytes 0-3, b's 4-7): one PRMT.
template <uint32_t SEL>
__device__ __forceinline__ uint32_t qmm_prmt(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "n"(SEL));
  return d;
}

// 16 bytes of packed weights, read once per kernel and never written while it
// runs: through the non-coherent path and not kept in L1 (from DRAM, the
// decode kernel 2-4.6% and the wide kernel 1.5-1.8% faster than a plain
// load below 2048 tokens; PERFORMANCE.md 6o, 6p). Zeros unless `live`: the
// load is predicated in PTX. A plain asm statement inside `if (live)` is not
// enough: the compiler may execute it whether or not the branch is taken (it
// did, reading past the weights, for tiled:skinny:w12r3hp).
__device__ __forceinline__ uint4 qmm_load_w(const uint4* p, bool live) {
  uint4 v;
  asm("{\n"
      "  .reg .pred q;\n"
      "  setp.ne.b32 q, %5, 0;\n"
      "  mov.b32 %0, 0;\n  mov.b32 %1, 0;\n  mov.b32 %2, 0;\n  mov.b32 %3, 0;\n"
      "  @q ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(static_cast<int>(live)));
  return v;
}

// The same, with L2 fetching the whole 128-byte line: the skinny kernel's
// lanes read a row's weights in 64-byte pieces, the line's other half being
// the next warp's (2.7-4% faster than a plain load there; the wide kernel,
// whose loads run a super-step ahead, was 1-4% slower with it).
__device__ __forceinline__ uint4 qmm_load_w_line(const uint4* p, bool live) {
  uint4 v;
  asm("{\n"
      "  .reg .pred q;\n"
      "  setp.ne.b32 q, %5, 0;\n"
      "  mov.b32 %0, 0;\n  mov.b32 %1, 0;\n  mov.b32 %2, 0;\n  mov.b32 %3, 0;\n"
      "  @q ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(static_cast<int>(live)));
  return v;
}

// qmm_load_w's load for use inside the caller's own guard: volatile, so that
// it stays in its branch. The decode kernel's loads take this form (the
// predicated one cost it up to 7%, PERFORMANCE.md 6p); the skinny and wide
// kernels' are 1-5% faster predicated.
__device__ __forceinline__ uint4 qmm_load_w_guarded(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// D = A (16x16, row-major) x B (16x8, column-major) + D in float.
template <typename T>
struct QmmMma;

template <>
struct QmmMma<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct QmmMma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// Hopper's warpgroup MMA (wgmma, sm_90a): D[64 x N] += A[64 x 16] x B[16 x N]
// in float, issued by the four warps of a warpgroup together. Warp q of the
// warpgroup holds rows 16q .. 16q + 15 of A in registers, in mma.m16n8k16's
// A layout, and of D in its C layout repeated every 8 columns (d[4j + e] is
// mma's c[e] of columns 8j .. 8j + 7); B (k x N, each column's 16 k
// contiguous: "K-major") is read from shared memory through a descriptor.
// The instructions exist only on sm_90a: callers use them under
// __CUDA_ARCH_FEAT_SM90_ALL, and everything here is empty elsewhere.

// B's descriptor: 8x8 core matrices (8 columns x 8 k, 16 contiguous bytes a
// column), no swizzle; lbo bytes between the two core matrices of a column
// group's 16 k, sbo bytes between groups of 8 columns.
__device__ __forceinline__ unsigned long long qmm_wgmma_desc(const void* p, int lbo, int sbo) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  return static_cast<unsigned long long>((qmm_smem_addr(p) >> 4) & 0x3FFFu) |
      (static_cast<unsigned long long>((lbo >> 4) & 0x3FFF) << 16) |
      (static_cast<unsigned long long>((sbo >> 4) & 0x3FFF) << 32);
#else
  return 0;
#endif
}

// Orders this thread's register writes before the wgmma that reads them.
__device__ __forceinline__ void qmm_wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void qmm_wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups are still running.
template <int N>
__device__ __forceinline__ void qmm_wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving or copying an accumulator of running
// wgmma (which would make ptxas serialize them).
__device__ __forceinline__ void qmm_fence_operand(float& r) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("" : "+f"(r)::"memory");
#endif
}

// Makes this thread's shared-memory stores visible to wgmma's reads (the
// async proxy); a barrier then covers the other threads'.
__device__ __forceinline__ void qmm_fence_async_shared() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

template <typename T>
struct QmmIsHalf {
  static constexpr bool value = false;
};

template <>
struct QmmIsHalf<__half> {
  static constexpr bool value = true;
};

// wgmma with N columns (64 is the one the family uses): d holds this thread's
// N / 2 accumulators, a its A fragment, b points at B in shared memory (lbo,
// sbo as for qmm_wgmma_desc); with accumulate 0 the old d is ignored.
template <typename T, int N>
struct QmmWgmma;

template <typename T>
struct QmmWgmma<T, 64> {
  __device__ __forceinline__ static void run(float* d, const uint32_t (&a)[4], const void* b,
                                             int lbo, int sbo, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    const unsigned long long desc = qmm_wgmma_desc(b, lbo, sbo);
    // One statement for both input types (PTX names the type in the opcode).
#define QMM_WGMMA_M64N64K16(TY) \
  asm volatile( \
      "{\n  .reg .pred p;\n  setp.ne.b32 p, %37, 0;\n" \
      "  wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
      " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), \
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), \
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), \
        "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
    if constexpr (QmmIsHalf<T>::value) {
      QMM_WGMMA_M64N64K16("f16");
    } else {
      QMM_WGMMA_M64N64K16("bf16");
    }
#undef QMM_WGMMA_M64N64K16
#endif
  }
};

// Writes `rows` token rows of ROWS outputs staged in shared memory (st, rows
// `pitch` elements apart) to out: staged row j is token m0 + 8 * (tile0 + (j / 8)
// * stride) + j % 8, its outputs nb .. nb + ROWS - 1. A thread writes whole
// 16-byte runs where N keeps them aligned and inside, else element by element.
template <int ROWS, int THREADS, typename O>
__device__ __forceinline__ void qmm_store_rows(O* out, const O* st, int pitch, int rows, int m0,
                                               int tile0, int stride, int nb, int M, int N,
                                               int tid) {
  constexpr int VEC = 16 / int(sizeof(O));
  constexpr int RUNS = ROWS / VEC;  // 16-byte runs of a row
  const bool whole = N % VEC == 0;
  for (int u = tid; u < rows * RUNS; u += THREADS) {
    const int j = u / RUNS;
    const int col = (u % RUNS) * VEC;
    const int m = m0 + 8 * (tile0 + (j / 8) * stride) + j % 8;
    const int n = nb + col;
    if (m < M) {
      const uint4 v = *reinterpret_cast<const uint4*>(st + j * pitch + col);
      O* dst = out + size_t(m) * size_t(N) + size_t(n);
      if (whole && n + VEC <= N) {
        *reinterpret_cast<uint4*>(dst) = v;
      } else {
        const O* e = reinterpret_cast<const O*>(&v);
        for (int c = 0; c < VEC && n + c < N; ++c) {
          dst[c] = e[c];
        }
      }
    }
  }
}

// Thread-block clusters (sm_90): K split over the CS blocks of a cluster, each
// holding partial sums of the same accumulators: RF fragments of TILES 8-token
// tiles, four a tile (QmmRowFrags' acc[f][i][0..3], two rows by two tokens).
// Tile i's sums belong to the block of rank i % CS, which owns whole token rows
// of the block's output that way (NT of its tiles a fragment; its owned float4
// k = f * NT + i / CS). run(): once every block of the cluster is past its K
// loop (so none reads the BYTES of shared memory at `slots` any more), each
// block puts the float4s it does not own into their owner's slots, one 16-byte
// st.shared::cluster each, in the part kept for its rank. In ROUNDS rounds of
// at most PER_ROUND owned float4s (what the BYTES hold from the CS - 1 other
// blocks), a cluster barrier between two. The owner adds the CS blocks' sums
// in rank order, stages its totals as T in the same shared memory ([token]
// [row], rows padded by 8) and writes whole 16-byte runs of its token rows.
// Every thread of a block calls run(); only kernels launched with a cluster
// shape use it (the generator's cluster header, which refuses older GPUs).
// PERFORMANCE.md 6w: 16-byte puts and staged stores against one float each.
__device__ __forceinline__ void qmm_cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// This block's rank in its cluster.
__device__ __forceinline__ int qmm_cluster_rank() {
  unsigned r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return static_cast<int>(r);
}

// The shared::cluster address of p (in this block's shared memory) in block `rank`'s.
__device__ __forceinline__ unsigned qmm_cluster_addr(const void* p, int rank) {
  unsigned remote = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote)
               : "r"(qmm_smem_addr(p)), "r"(rank));
#endif
  return remote;
}

template <int CS, int TILES, int RF, int THREADS, int BYTES>
struct QmmClusterSum {
  static constexpr int NT_MAX = (TILES + CS - 1) / CS;  // tiles a fragment rank 0 owns
  static constexpr int OWNED = RF * NT_MAX;              // float4s a thread owns at most
  static constexpr int PER_ROUND_MAX = BYTES / ((CS - 1) * THREADS * 16);
  static constexpr int ROUNDS = PER_ROUND_MAX > 0 ? (OWNED + PER_ROUND_MAX - 1) / PER_ROUND_MAX : 1;
  static constexpr int PER_ROUND = (OWNED + ROUNDS - 1) / ROUNDS;
  static constexpr int ROWS = THREADS / 32 * RF * 16;  // weight rows of the block
  static constexpr int PITCH = ROWS + 8;               // a staged token row, in T
  float* slots;
  int rank;
  int tid;

  // Tiles a fragment the block of rank r owns, and the place of tile i's float4 in
  // its owner's (fragment f): both known at compile time where r and i are.
  static constexpr __device__ __forceinline__ int tiles_of(int r) {
    return (TILES - r + CS - 1) / CS;
  }
  static constexpr __device__ __forceinline__ int owned_index(int f, int i) {
    return f * tiles_of(i % CS) + i / CS;
  }

  __device__ __forceinline__ void init(float* s, int thread) {
    slots = s;
    tid = thread;
    rank = qmm_cluster_rank();
  }

  // Where the owner keeps the float4 with owned index k that block `from` sent.
  __device__ __forceinline__ float4* slot(int k, int from, int owner) const {
    const int part = from < owner ? from : from - 1;
    return reinterpret_cast<float4*>(slots) + (part * PER_ROUND + k % PER_ROUND) * THREADS + tid;
  }

  // out[m0 + token][nb + row] for the frag's sums, added over the cluster;
  // nl: the warp's first row in the block.
  template <typename T, typename F>
  __device__ __forceinline__ void run(const F& frag, T* out, int m0, int nb, int nl, int M,
                                      int N) {
#if defined(__CUDA_ARCH__)  // the device pass's x buffers (nvcc's host pass sees fewer)
    static_assert(PER_ROUND_MAX >= 1, "the shared memory holds a round of the other blocks' sums");
    static_assert(NT_MAX * 8 * PITCH * int(sizeof(T)) <= BYTES,
                  "the shared memory holds the owned token rows");
#endif
    float tot[RF][NT_MAX][4];
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      qmm_cluster_sync();  // past the K loop (r = 0), or the last round's slots are read
#pragma unroll
      for (int f = 0; f < RF; ++f) {
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
          const int k = owned_index(f, i);
          if (k / PER_ROUND == r && i % CS != rank) {
            put(slot(k, rank, i % CS), i % CS, frag.acc[f][i]);
          }
        }
      }
      qmm_cluster_sync();
#pragma unroll
      for (int f = 0; f < RF; ++f) {
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
          const int k = owned_index(f, i);
          if (k / PER_ROUND == r && i % CS == rank) {
            float v[4];
#pragma unroll
            for (int from = 0; from < CS; ++from) {
              float4 o = make_float4(frag.acc[f][i][0], frag.acc[f][i][1], frag.acc[f][i][2],
                                     frag.acc[f][i][3]);
              if (from != rank) {
                o = *slot(k, from, rank);
              }
              v[0] = from == 0 ? o.x : v[0] + o.x;
              v[1] = from == 0 ? o.y : v[1] + o.y;
              v[2] = from == 0 ? o.z : v[2] + o.z;
              v[3] = from == 0 ? o.w : v[3] + o.w;
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              tot[f][i / CS][c] = v[c];
            }
          }
        }
      }
    }
    __syncthreads();  // every slot of this block is read
    T* st = reinterpret_cast<T*>(slots);
#pragma unroll
    for (int f = 0; f < RF; ++f) {
#pragma unroll
      for (int j = 0; j < NT_MAX; ++j) {
        if (j < tiles_of(rank)) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            st[(8 * j + 2 * frag.t + (c & 1)) * PITCH + nl + 16 * f + frag.g + 8 * (c >> 1)] =
                static_cast<T>(tot[f][j][c]);
          }
        }
      }
    }
    __syncthreads();
    qmm_store_rows<ROWS, THREADS>(out, st, PITCH, 8 * tiles_of(rank), m0, rank, CS, nb, M, N, tid);
  }

  // One 16-byte store into block `owner`'s shared memory.
  __device__ __forceinline__ void put(float4* dst, int owner, const float (&v)[4]) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned remote = qmm_cluster_addr(dst, owner);
    asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(remote), "f"(v[0]),
                 "f"(v[1]), "f"(v[2]), "f"(v[3])
                 : "memory");
#endif
  }
};

// The skinny kernels' K split over the CS blocks of a cluster (sm_90): each
// block keeps its sum of each slot (one float a lane and accumulator) in its
// own shared memory (put), and once the cluster has met (sync) the slot's
// owner reads the CS blocks' sums of it, in rank order, straight from their
// shared memory (total: ld.shared::cluster; a lane reads 4 consecutive bytes,
// a warp 128). done(): the cluster meets again, so that no block leaves while
// its sums may still be read. A slot of group g (the caller's accumulator)
// belongs to the block of rank g % CS. PERFORMANCE.md 6x.
template <int CS>
struct QmmClusterAdd {
  float* slots;
  int rank;

  // s: the block's slots (n of them; the CPU emulation keeps its own n).
  __device__ __forceinline__ void init(float* s, int) {
    slots = s;
    rank = qmm_cluster_rank();
  }
  __device__ __forceinline__ void put(int i, float v) { slots[i] = v; }
  __device__ __forceinline__ void sync() const { qmm_cluster_sync(); }
  __device__ __forceinline__ bool owns(int g) const { return g % CS == rank; }
  __device__ __forceinline__ float total(int i) const {
    float t = 0.0f;
#pragma unroll
    for (int q = 0; q < CS; ++q) {
      float v = 0.0f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      asm volatile("ld.shared::cluster.f32 %0, [%1];\n"
                   : "=f"(v)
                   : "r"(qmm_cluster_addr(slots + i, q))
                   : "memory");
#endif
      t += v;
    }
    return t;
  }
  __device__ __forceinline__ void done() const { qmm_cluster_sync(); }
};
#endif  // QMMPERF_CUDA_QMM_PTX
