// Declarations of the Metal Shading Language used by the qmmperf kernels,
// for checking generated Metal with clang's C++ front end off a Mac.
//
// Address spaces are clang address spaces, so mixing `device`, `threadgroup`
// and `constant` pointers is an error here as it is in Metal. Vector types
// are clang ext_vector types (swizzles, [i], splat casts). Only what MLX's
// prelude (<metal_stdlib>, `using namespace metal`, bfloat16_t) provides is
// declared, with Metal's signatures; nothing is implemented.

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef decltype(sizeof(0)) size_t;

typedef _Float16 half;
typedef __bf16 bfloat;

namespace metal {

template <typename T, int N>
using vec = T __attribute__((ext_vector_type(N)));

typedef vec<uint, 2> uint2;
typedef vec<uint, 3> uint3;
typedef vec<uint, 4> uint4;
typedef vec<int, 2> int2;
typedef vec<int, 3> int3;
typedef vec<int, 4> int4;
typedef vec<ulong, 2> ulong2;
typedef vec<ushort, 2> ushort2;
typedef vec<ushort, 4> ushort4;
typedef vec<short, 2> short2;
typedef vec<float, 2> float2;
typedef vec<float, 4> float4;
typedef vec<half, 2> half2;
typedef vec<half, 4> half4;
typedef vec<bfloat, 2> bfloat2;
typedef vec<bfloat, 4> bfloat4;

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

// Reinterprets the bits of a value of the same size, like Metal's as_type.
template <typename T, typename U>
T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type: source and destination sizes differ");
  return __builtin_bit_cast(T, x);
}

template <typename T>
T simd_sum(T x);
template <typename T>
T simd_max(T x);
template <typename T>
T simd_shuffle(T x, ushort lane);
template <typename T>
T simd_shuffle_down(T x, ushort delta);
template <typename T>
T simd_shuffle_xor(T x, ushort mask);

template <typename T>
T min(T a, T b);
template <typename T>
T max(T a, T b);
template <typename T>
T fma(T a, T b, T c);

template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  simdgroup_matrix();
  explicit simdgroup_matrix(T diagonal);
  thread vec<T, 2>& thread_elements();
};

template <typename T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value);

template <typename T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const threadgroup T* src,
                    ulong elements_per_row = Cols, ulong2 matrix_origin = 0,
                    bool transpose_matrix = false);

template <typename T, int Cols, int Rows>
void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, threadgroup T* dst,
                     ulong elements_per_row = Cols, ulong2 matrix_origin = 0,
                     bool transpose_matrix = false);

// d = a * b + c; Metal takes one element type for all four.
template <typename T, int K, int Rows, int Cols>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, Cols, Rows>& d,
                                   thread const simdgroup_matrix<T, K, Rows>& a,
                                   thread const simdgroup_matrix<T, Cols, K>& b,
                                   thread const simdgroup_matrix<T, Cols, Rows>& c);

}  // namespace metal

using namespace metal;

typedef half float16_t;
typedef bfloat bfloat16_t;
