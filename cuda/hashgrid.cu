// Multiresolution hash-grid encoding (Instant-NGP / tiny-cuda-nn HashGrid), cuda tier, with a
// hand-written backward for the table and for the positions.
//
// Semantics: lift3d/kernels/hashgrid.py, as cuda/hashgrid_cpu.cpp computes them. Per level with
// scale s: x clamped to [0, 1] (NaN -> 0), p = x * s + 0.5 (two roundings, like torch), g = floor(p),
// t = p - g; corner c (bit 0 = x) is looked up at
//   dense:  (cx + cy r + cz r^2) % size           (64-bit, like the reference's int64)
//   hashed: (cx ^ cy 2654435761 ^ cz 805459861) % size   (uint32, tcnn's coherent prime hash)
// and blended trilinearly with weights wx * wy * wz.
//
// Parallelism (tcnn's): one thread per (point, level), level-major, so a block touches one level's
// slice of the table. The table gradient is scattered with float atomicAdd: unlike the cpu tier,
// its summation order, and so its last bits, vary run to run. The position gradient is one thread
// per point summing its levels in order, so it is deterministic.

#include "common.cuh"

namespace {

constexpr uint32_t kPrimeY = 2654435761u;
constexpr uint32_t kPrimeZ = 805459861u;
constexpr int kThreads = 256;

constexpr int kMaxLevels = 32;

// Per-level metadata, passed by value as a kernel argument.
struct Levels {
  int count;
  float scale[kMaxLevels];
  uint32_t resolution[kMaxLevels];
  uint32_t size[kMaxLevels];
  int64_t offset[kMaxLevels];
  bool hashed[kMaxLevels];
};

struct Cell {
  int64_t row[8];
  float t[3];
  bool inside[3];  // x_d within [0, 1] (the clamp passes the gradient); false for NaN
};

__device__ __forceinline__ void locate(const Levels& lv, int l, const float* x, Cell& cell) {
  uint32_t g[3];
  const float scale = lv.scale[l];
  for (int d = 0; d < 3; ++d) {
    const float v = x[d];
    cell.inside[d] = v >= 0.0f && v <= 1.0f;
    const float clamped = v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f;  // NaN -> 0
    const float p = __fadd_rn(__fmul_rn(clamped, scale), 0.5f);     // no FMA: round like torch
    g[d] = static_cast<uint32_t>(static_cast<int32_t>(p));           // p >= 0.5: truncation is floor
    cell.t[d] = __fsub_rn(p, static_cast<float>(g[d]));
  }
  const uint32_t size = lv.size[l];
  const int64_t offset = lv.offset[l];
  if (lv.hashed[l]) {
    for (int c = 0; c < 8; ++c) {
      const uint32_t h = (g[0] + (c & 1)) ^ ((g[1] + ((c >> 1) & 1)) * kPrimeY) ^ ((g[2] + ((c >> 2) & 1)) * kPrimeZ);
      cell.row[c] = offset + h % size;
    }
  } else {
    const uint64_t r = lv.resolution[l];
    for (int c = 0; c < 8; ++c) {
      const uint64_t i = (g[0] + (c & 1)) + (g[1] + ((c >> 1) & 1)) * r + (g[2] + ((c >> 2) & 1)) * r * r;
      cell.row[c] = offset + static_cast<int64_t>(i % size);
    }
  }
}

__device__ __forceinline__ void corner_weights(const float t[3], float w[8]) {
  const float wx[2] = {1.0f - t[0], t[0]};
  const float wy[2] = {1.0f - t[1], t[1]};
  const float wz[2] = {1.0f - t[2], t[2]};
#pragma unroll
  for (int c = 0; c < 8; ++c) w[c] = __fmul_rn(__fmul_rn(wx[c & 1], wy[(c >> 1) & 1]), wz[(c >> 2) & 1]);
}

// Threads are level-major (idx = l * N + point), so a block reads one level's slice of the table.
template <int kF>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const float* __restrict__ x, const float* __restrict__ table, float* __restrict__ out, int64_t N,
                   int F_runtime, Levels levels, int active) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= N * active) return;
  const int F = kF > 0 ? kF : F_runtime;
  const int l = static_cast<int>(idx / N);
  const int64_t i = idx % N;
  Cell cell;
  locate(levels, l, x + 3 * i, cell);
  float w[8];
  corner_weights(cell.t, w);
  float* o = out + (i * levels.count + l) * F;
  if constexpr (kF > 0) {
    float acc[kF] = {};
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float* row = table + cell.row[c] * kF;
#pragma unroll
      for (int f = 0; f < kF; ++f) acc[f] += w[c] * __ldg(row + f);
    }
#pragma unroll
    for (int f = 0; f < kF; ++f) o[f] = acc[f];
  } else {
    for (int f = 0; f < F; ++f) {
      float acc = 0.0f;
      for (int c = 0; c < 8; ++c) acc += w[c] * __ldg(table + cell.row[c] * F + f);
      o[f] = acc;
    }
  }
}

template <int kF>
__global__ void __launch_bounds__(kThreads)
    table_grad_kernel(const float* __restrict__ x, const float* __restrict__ grad, float* __restrict__ grad_table,
                      int64_t N, int F_runtime, Levels levels, int active) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= N * active) return;
  const int F = kF > 0 ? kF : F_runtime;
  const int l = static_cast<int>(idx / N);
  const int64_t i = idx % N;
  const float* g = grad + (i * levels.count + l) * F;
  bool any = false;
  for (int f = 0; f < F; ++f) any |= g[f] != 0.0f;
  if (!any) return;  // nothing flows back from this point at this level
  Cell cell;
  locate(levels, l, x + 3 * i, cell);
  float w[8];
  corner_weights(cell.t, w);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    float* row = grad_table + cell.row[c] * F;
    for (int f = 0; f < F; ++f) atomicAdd(row + f, w[c] * g[f]);  // order-nondeterministic (see top)
  }
}

// d out / d x_d = scale * sum_c (d w_c / d t_d) <grad, feature_c>, zero where the clamp is active.
template <int kF>
__global__ void __launch_bounds__(kThreads)
    position_grad_kernel(const float* __restrict__ x, const float* __restrict__ table,
                         const float* __restrict__ grad, float* __restrict__ grad_positions, int64_t N, int F_runtime,
                         Levels levels, int active) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N) return;
  const int F = kF > 0 ? kF : F_runtime;
  float total[3] = {0.0f, 0.0f, 0.0f};
  for (int l = 0; l < active; ++l) {
    const float* g = grad + (i * levels.count + l) * F;
    Cell cell;
    locate(levels, l, x + 3 * i, cell);
    const float* t = cell.t;
    const float wx[2] = {1.0f - t[0], t[0]};
    const float wy[2] = {1.0f - t[1], t[1]};
    const float wz[2] = {1.0f - t[2], t[2]};
    float dt[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float* row = table + cell.row[c] * F;
      float s = 0.0f;
      for (int f = 0; f < F; ++f) s += g[f] * __ldg(row + f);
      const int bx = c & 1, by = (c >> 1) & 1, bz = (c >> 2) & 1;
      dt[0] += (bx ? s : -s) * (wy[by] * wz[bz]);
      dt[1] += (by ? s : -s) * (wx[bx] * wz[bz]);
      dt[2] += (bz ? s : -s) * (wx[bx] * wy[by]);
    }
    for (int d = 0; d < 3; ++d) {
      if (cell.inside[d]) total[d] += dt[d] * levels.scale[l];
    }
  }
  for (int d = 0; d < 3; ++d) grad_positions[3 * i + d] = total[d];
}

template <template <int> class Fn, typename... Args>
void dispatch_features(int F, Args... args) {
  switch (F) {
    case 1: Fn<1>::run(args...); break;
    case 2: Fn<2>::run(args...); break;
    case 4: Fn<4>::run(args...); break;
    case 8: Fn<8>::run(args...); break;
    default: Fn<0>::run(args...); break;
  }
}

template <int kF>
struct LaunchForward {
  template <typename... Args>
  static void run(int64_t threads, cudaStream_t stream, Args... args) {
    forward_kernel<kF><<<lift3d::ceil_div(threads, kThreads), kThreads, 0, stream>>>(args...);
  }
};

template <int kF>
struct LaunchTableGrad {
  template <typename... Args>
  static void run(int64_t threads, cudaStream_t stream, Args... args) {
    table_grad_kernel<kF><<<lift3d::ceil_div(threads, kThreads), kThreads, 0, stream>>>(args...);
  }
};

template <int kF>
struct LaunchPositionGrad {
  template <typename... Args>
  static void run(int64_t threads, cudaStream_t stream, Args... args) {
    position_grad_kernel<kF><<<lift3d::ceil_div(threads, kThreads), kThreads, 0, stream>>>(args...);
  }
};

Levels make_levels(const float* scales, const int64_t* resolutions, const int64_t* sizes, const int64_t* offsets,
                   const uint8_t* hashed, int L) {
  Levels levels{};
  levels.count = L;
  for (int l = 0; l < L; ++l) {
    levels.scale[l] = scales[l];
    levels.resolution[l] = static_cast<uint32_t>(resolutions[l]);
    levels.size[l] = static_cast<uint32_t>(sizes[l]);
    levels.offset[l] = offsets[l];
    levels.hashed[l] = hashed[l] != 0;
  }
  return levels;
}

}  // namespace

extern "C" {

int lift3d_hashgrid_max_levels() { return kMaxLevels; }

// Level arrays (host memory, L <= lift3d_hashgrid_max_levels()): scale, resolution, rows, first
// row and hashed flag per level.

// out: [N, L * F], levels >= active already zeroed by the caller.
const char* lift3d_hashgrid_forward(const float* positions, const float* table, float* out, int64_t N, int F,
                                    const float* scales, const int64_t* resolutions, const int64_t* sizes,
                                    const int64_t* offsets, const uint8_t* hashed, int L, int active,
                                    cudaStream_t stream) {
  if (N == 0 || active == 0) return nullptr;
  const Levels levels = make_levels(scales, resolutions, sizes, offsets, hashed, L);
  dispatch_features<LaunchForward>(F, N * active, stream, positions, table, out, N, F, levels, active);
  return lift3d::launch_status();
}

// grad_table (zeroed by the caller, may be null) and grad_positions ([N, 3], may be null) from
// grad [N, L * F].
const char* lift3d_hashgrid_backward(const float* grad, const float* positions, const float* table, float* grad_table,
                                     float* grad_positions, int64_t N, int F, const float* scales,
                                     const int64_t* resolutions, const int64_t* sizes, const int64_t* offsets,
                                     const uint8_t* hashed, int L, int active, cudaStream_t stream) {
  if (N == 0) return nullptr;
  const Levels levels = make_levels(scales, resolutions, sizes, offsets, hashed, L);
  if (grad_table != nullptr && active > 0) {
    dispatch_features<LaunchTableGrad>(F, N * active, stream, positions, grad, grad_table, N, F, levels, active);
  }
  if (grad_positions != nullptr) {
    dispatch_features<LaunchPositionGrad>(F, N, stream, positions, table, grad, grad_positions, N, F, levels,
                                          active);
  }
  return lift3d::launch_status();
}

}  // extern "C"
