// The C++ side of tests/kernel_emulator.py, part 1: Metal/CUDA builtins as plain C++ (address
// spaces, thread ids, IEEE half and bfloat16 storage, SIMD groups as threads). Kernel templates
// generated from tinymoe's sources follow it, then emulator_main.cpp.
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
using os_thread = std::thread;  // before `thread` becomes a Metal address space below
// Metal address spaces and kernel qualifiers, as plain C++.
#define device
#define constant
#define thread
#define __device__
#define __forceinline__ inline
typedef unsigned int uint;
struct uint3 { uint32_t x, y, z; };
struct dim3 { uint32_t x, y, z; };

// IEEE binary16 and bfloat16 storage with round-to-nearest-even from float, like the GPU's.
static inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
struct Half {
  uint16_t bits;
  Half() = default;
  explicit Half(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, exp = (u >> 23) & 0xffu, man = u & 0x7fffffu;
    if (exp == 0xffu) { bits = sign | 0x7c00u | (man ? 0x200u : 0u); return; }
    int e = int(exp) - 127 + 15;
    if (e >= 31) { bits = sign | 0x7c00u; return; }
    if (e <= 0) {  // subnormal half (or zero): shift the full mantissa, round to nearest even
      if (e < -10) { bits = sign; return; }
      man |= 0x800000u;
      int shift = 14 - e;
      uint32_t half_man = man >> shift, rest = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
      if (rest > mid || (rest == mid && (half_man & 1u))) ++half_man;
      bits = sign | half_man;
      return;
    }
    uint32_t h = sign | (uint32_t(e) << 10) | (man >> 13), rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
    bits = uint16_t(h);
  }
  explicit operator float() const {
    uint32_t sign = uint32_t(bits & 0x8000u) << 16, exp = (bits >> 10) & 0x1fu, man = bits & 0x3ffu;
    if (exp == 0x1fu) return u2f(sign | 0x7f800000u | (man << 13));
    if (exp == 0) return (sign ? -1.0f : 1.0f) * float(man) * 5.9604644775390625e-8f;  // 2^-24
    return u2f(sign | ((exp - 15 + 127) << 23) | (man << 13));
  }
};
struct BFloat {
  uint16_t bits;
  BFloat() = default;
  explicit BFloat(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  explicit operator float() const { return u2f(uint32_t(bits) << 16); }
};

// One SIMD group / warp: its lanes are OS threads that meet in collective operations.
struct SimdGroup {
  std::mutex m;
  std::condition_variable cv;
  int active = 0, arrived = 0, op = 0, arg = 0;
  unsigned mask = 0;
  long gen = 0;
  bool fault = false, waiting[32] = {};
  float in[32] = {}, out[32] = {};
  void complete() {  // under the lock, by the last lane to arrive (or to leave)
    float sum = 0.0f;
    for (int l = 0; l < 32; ++l) if (waiting[l]) sum += in[l];
    int count = 0;
    for (int l = 0; l < 32; ++l) count += waiting[l];
    if (op == 2 && (mask != 0xffffffffu || count != 32)) fault = true;  // not every masked lane
    for (int l = 0; l < 32; ++l) {
      if (!waiting[l]) continue;
      if (op == 1) out[l] = sum;
      else if (waiting[l ^ arg]) out[l] = in[l ^ arg];
      else { fault = true; out[l] = 0.0f; }
    }
    for (int l = 0; l < 32; ++l) waiting[l] = false;
    arrived = 0;
    ++gen;
    cv.notify_all();
  }
  float collective(int lane, int op_, int arg_, unsigned mask_, float v) {
    std::unique_lock<std::mutex> lk(m);
    if (arrived > 0 && (op != op_ || arg != arg_)) fault = true;  // lanes diverged
    op = op_; arg = arg_; mask = mask_; in[lane] = v; waiting[lane] = true;
    long g = gen;
    if (++arrived == active) complete(); else cv.wait(lk, [&] { return gen != g; });
    return out[lane];
  }
  void leave() {
    std::lock_guard<std::mutex> lk(m);
    --active;
    if (arrived > 0 && arrived == active) complete();
  }
};
struct Barrier {  // C++17 has no std::barrier
  std::mutex m;
  std::condition_variable cv;
  int n, count = 0;
  long gen = 0;
  explicit Barrier(int n_) : n(n_) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    long g = gen;
    if (++count == n) { count = 0; ++gen; cv.notify_all(); }
    else cv.wait(lk, [&] { return gen != g; });
  }
};
static thread_local SimdGroup* tl_group = nullptr;
static thread_local int tl_lane = 0;
static bool g_fault = false;  // a collective outside a SIMD launch

namespace metal {
inline float simd_sum(float v) {
  if (!tl_group) { g_fault = true; return v; }
  return tl_group->collective(tl_lane, 1, 0, 0u, v);
}
}  // namespace metal
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (!tl_group) { g_fault = true; return v; }
  return tl_group->collective(tl_lane, 2, lane_mask, mask, v);
}

// Calls f(T{}) with the type of a dtype code: the templates are instantiated per dtype.
template <typename F> static void with_type(int code, F f) {
  if (code == 0) f(float{});
  else if (code == 1) f(Half{});
  else if (code == 2) f(BFloat{});
  else g_fault = true;
}
typedef void (*Launch)(bool, const int*, void**, int**, void**, int, int, uint3, uint3);
