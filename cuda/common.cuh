// Shared helpers of the cuda-tier kernels. CUDA headers only (DESIGN §3): the torch bindings live in
// the *_cuda.cpp files and call the extern "C" launchers, which return nullptr on success or the
// CUDA error string.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lift3d {

constexpr unsigned kFullMask = 0xffffffffu;

inline const char* launch_status() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// Warp-sums v and adds the total to *dst from lane 0: one atomic per warp instead of 32.
// Every lane of the warp must call it (the shuffles need the full mask).
__device__ __forceinline__ void warp_atomic_add(float* dst, float v) {
  v = warp_sum(v);
  if ((threadIdx.x + blockDim.x * threadIdx.y) % 32 == 0 && v != 0.0f) atomicAdd(dst, v);
}

}  // namespace lift3d
