// qmmperf tiled QMM: the tensor-core instructions of the CUDA layer, as inline PTX.
//
// ldmatrix, mma.sync m16n8k16 (sm_80 and newer, f16 or bf16 in, f32
// accumulate) and a packed-half FMA. Kept apart from qmm_layer.cuh so that a
// CPU emulation of these functions can run the rest of the generated source
// unchanged.

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

#endif  // QMMPERF_CUDA_QMM_PTX
