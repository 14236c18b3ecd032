// tinymoe's stand-in for the device header MLX's CUDA backend includes in front of every
// custom kernel ("mlx/backend/cuda/device/utils.cuh", MLX 0.32).
//
// What is taken from MLX is facts, not code: the standard headers it brings in (so the CUDA
// types a kernel body may use are the same), its two macros, and the names it declares in
// namespace mlx::core::cu, where the generated kernel lives too: a tinymoe body or header that
// defines one of these names fails to compile here as it would on a GPU. The helpers behind the
// names are not reproduced; tinymoe's kernels use none of them.
#pragma once

#define MAX_NDIM 10
#define WARP_SIZE 32

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cuda/std/tuple>

namespace mlx::core::cu {

template <typename T> struct complex_t;
template <typename T, int N> struct AlignedVector;
template <typename T, typename Enable> struct Limits;
template <int Dim, bool General, typename OffsetT> struct LoopedElemToLoc;

using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;

// Function templates of the same names (signatures simplified: only the names matter here).
template <int N, typename T> __host__ __device__ bool is_aligned(T* x);
template <int N, typename T, typename... Rest> __device__ AlignedVector<T, N> load_vector(const T* p, Rest... rest);
template <int N, typename T> __device__ AlignedVector<T, N> unsafe_load_vector(const T* p, uint32_t offset);
template <int N, typename T, typename... Rest> __device__ void store_vector(T* p, Rest... rest);
template <typename IdxT, typename... Rest> __host__ __device__ IdxT elem_to_loc(Rest... rest);
template <int NDIM, typename IdxT, typename... Rest> __host__ __device__ IdxT elem_to_loc_nd(Rest... rest);

} // namespace mlx::core::cu
