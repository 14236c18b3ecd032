// A minimal stand-in for what a custom Metal kernel sees before the source MLX generates, so that
// tests/test_kernel_sources.py can syntax-check that source with a host C++ compiler:
// <metal_stdlib> + MLX's metal::utils() preamble (bf16.h: `using namespace metal;
// typedef bfloat bfloat16_t;`, utils.h: `typedef half float16_t;`). Deliberately small:
// a kernel that uses anything not declared here fails the check and must be added on purpose.
// Self-contained (no system headers) so it works with g++, clang++ and PyPI's libclang.

// ---- address spaces --------------------------------------------------------------------------
// clang: real, distinct address spaces, so `thread float* p = device_ptr;` is an error as in
// Metal. g++ has no C++ address spaces: they vanish (only const-correctness is then checked).
#if defined(__clang__)
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#else
#define device
#define constant
#define threadgroup
#endif
#define thread
#define kernel  // `[[kernel]]` becomes `[[]]`, `kernel void f` becomes `void f`
// [[buffer(i)]], [[thread_position_in_grid]], [[host_name("...")]] stay as unknown attributes:
// compile with -Wno-attributes (g++) / -Wno-unknown-attributes (clang).

// ---- scalar types ----------------------------------------------------------------------------
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned long size_t;

namespace metal {
#if defined(__clang__)
// clang: builtin arithmetic types, so they work through address-space-qualified pointers
// (member functions of a class would need address-space-qualified `this`).
typedef _Float16 half;
typedef __bf16 bfloat;
#else
// half: an arithmetic type; implicit conversions to and from float as in MSL.
struct half {
  float v;
  half() = default;
  constexpr half(float f) : v(f) {}
  constexpr operator float() const { return v; }
};
// bfloat (MSL 3.1): conversions *from* float kept explicit here (conservative: MLX itself
// always writes static_cast<bfloat16_t>(...)), to float implicit. No math functions.
struct bfloat {
  float v;
  bfloat() = default;
  explicit constexpr bfloat(float f) : v(f) {}
  constexpr operator float() const { return v; }
};
#endif
template <typename T> struct vec3 { T x, y, z; };
typedef vec3<uint> uint3;
typedef vec3<int> int3;

// The few metal:: functions a kernel body may reasonably use; add more deliberately.
template <typename T> T min(T a, T b) { return a < b ? a : b; }
template <typename T> T max(T a, T b) { return a < b ? b : a; }
float exp(float);
float log(float);
float sqrt(float);
float rsqrt(float);
float tanh(float);
float fma(float, float, float);
// SIMD-group reductions (MSL 2.1+; every Apple Silicon GPU): declared for the types MSL has them.
float simd_sum(float);
int simd_sum(int);
uint simd_sum(uint);
}  // namespace metal

using namespace metal;             // from MLX's bf16.h
typedef metal::bfloat bfloat16_t;  // from MLX's bf16.h
typedef metal::half float16_t;     // from MLX's utils.h
