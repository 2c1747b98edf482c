// Multiresolution hash-grid encoding (Instant-NGP / tiny-cuda-nn HashGrid), cuda tier, with a
// hand-written backward for the table and for the positions.
//
// Semantics: lift3d/kernels/hashgrid.py, as cuda/hashgrid_cpu.cpp computes them. Inputs have D = 3
// (x, y, z) or D = 4 (x, y, z, t) dims, a template parameter of the kernels. Per level with scale s:
// x clamped to [0, 1] (NaN -> 0), p = x * s + 0.5 (two roundings, like torch), g = floor(p),
// t = p - g; corner c (bit d = axis d) is looked up at
//   dense:  (cx + cy r + cz r^2 [+ ct r^3]) % size          (64-bit, like the reference's int64)
//   hashed: (cx ^ cy 2654435761 ^ cz 805459861 [^ ct 3674653429]) % size   (uint32, tcnn's primes)
// and blended multilinearly with weights w_x * w_y * w_z [* w_t], multiplied left to right.
//
// Parallelism (tcnn's): one thread per (point, level), level-major, so a block touches one level's
// slice of the table. The table gradient is scattered with float atomicAdd: unlike the cpu tier,
// its summation order, and so its last bits, vary run to run. The position gradient is one thread
// per point summing its levels in order, so it is deterministic.

#include "common.cuh"

namespace {

constexpr int kThreads = 256;

constexpr int kMaxLevels = 32;

// tcnn's coherent prime hash factors per axis (x's is 1).
__constant__ uint32_t kPrimes[4] = {1u, 2654435761u, 805459861u, 3674653429u};

// Per-level metadata, passed by value as a kernel argument.
struct Levels {
  int count;
  float scale[kMaxLevels];
  uint32_t resolution[kMaxLevels];
  uint32_t size[kMaxLevels];
  int64_t offset[kMaxLevels];
  bool hashed[kMaxLevels];
};

template <int kD>
struct Cell {
  static constexpr int kCorners = 1 << kD;
  int64_t row[kCorners];
  float t[kD];
  bool inside[kD];  // x_d within [0, 1] (the clamp passes the gradient); false for NaN
};

template <int kD>
__device__ __forceinline__ void locate(const Levels& lv, int l, const float* x, Cell<kD>& cell) {
  uint32_t g[kD];
  const float scale = lv.scale[l];
#pragma unroll
  for (int d = 0; d < kD; ++d) {
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
#pragma unroll
    for (int c = 0; c < Cell<kD>::kCorners; ++c) {
      uint32_t h = g[0] + (c & 1);
#pragma unroll
      for (int d = 1; d < kD; ++d) h ^= (g[d] + ((c >> d) & 1)) * kPrimes[d];
      cell.row[c] = offset + h % size;
    }
  } else {
    const uint64_t r = lv.resolution[l];
#pragma unroll
    for (int c = 0; c < Cell<kD>::kCorners; ++c) {
      uint64_t i = g[0] + (c & 1), stride = r;
#pragma unroll
      for (int d = 1; d < kD; ++d) {
        i += (g[d] + ((c >> d) & 1)) * stride;
        stride *= r;
      }
      cell.row[c] = offset + static_cast<int64_t>(i % size);
    }
  }
}

// Per axis: the lower and upper corner's factor.
template <int kD>
__device__ __forceinline__ void axis_weights(const float t[kD], float w[kD][2]) {
#pragma unroll
  for (int d = 0; d < kD; ++d) {
    w[d][0] = 1.0f - t[d];
    w[d][1] = t[d];
  }
}

template <int kD>
__device__ __forceinline__ void corner_weights(const float t[kD], float w[1 << kD]) {
  float axis[kD][2];
  axis_weights<kD>(t, axis);
#pragma unroll
  for (int c = 0; c < (1 << kD); ++c) {
    float product = axis[0][c & 1];
#pragma unroll
    for (int d = 1; d < kD; ++d) product = __fmul_rn(product, axis[d][(c >> d) & 1]);
    w[c] = product;
  }
}

// Threads are level-major (idx = l * N + point), so a block reads one level's slice of the table.
template <int kD, int kF>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const float* __restrict__ x, const float* __restrict__ table, float* __restrict__ out, int64_t N,
                   int F_runtime, Levels levels, int active) {
  constexpr int kCorners = 1 << kD;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= N * active) return;
  const int F = kF > 0 ? kF : F_runtime;
  const int l = static_cast<int>(idx / N);
  const int64_t i = idx % N;
  Cell<kD> cell;
  locate<kD>(levels, l, x + kD * i, cell);
  float w[kCorners];
  corner_weights<kD>(cell.t, w);
  float* o = out + (i * levels.count + l) * F;
  if constexpr (kF > 0) {
    float acc[kF] = {};
#pragma unroll
    for (int c = 0; c < kCorners; ++c) {
      const float* row = table + cell.row[c] * kF;
#pragma unroll
      for (int f = 0; f < kF; ++f) acc[f] += w[c] * __ldg(row + f);
    }
#pragma unroll
    for (int f = 0; f < kF; ++f) o[f] = acc[f];
  } else {
    for (int f = 0; f < F; ++f) {
      float acc = 0.0f;
      for (int c = 0; c < kCorners; ++c) acc += w[c] * __ldg(table + cell.row[c] * F + f);
      o[f] = acc;
    }
  }
}

template <int kD, int kF>
__global__ void __launch_bounds__(kThreads)
    table_grad_kernel(const float* __restrict__ x, const float* __restrict__ grad, float* __restrict__ grad_table,
                      int64_t N, int F_runtime, Levels levels, int active) {
  constexpr int kCorners = 1 << kD;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= N * active) return;
  const int F = kF > 0 ? kF : F_runtime;
  const int l = static_cast<int>(idx / N);
  const int64_t i = idx % N;
  const float* g = grad + (i * levels.count + l) * F;
  bool any = false;
  for (int f = 0; f < F; ++f) any |= g[f] != 0.0f;
  if (!any) return;  // nothing flows back from this point at this level
  Cell<kD> cell;
  locate<kD>(levels, l, x + kD * i, cell);
  float w[kCorners];
  corner_weights<kD>(cell.t, w);
#pragma unroll
  for (int c = 0; c < kCorners; ++c) {
    float* row = grad_table + cell.row[c] * F;
    for (int f = 0; f < F; ++f) atomicAdd(row + f, w[c] * g[f]);  // order-nondeterministic (see top)
  }
}

// d out / d x_d = scale * sum_c (d w_c / d t_d) <grad, feature_c>, zero where the clamp is active.
template <int kD, int kF>
__global__ void __launch_bounds__(kThreads)
    position_grad_kernel(const float* __restrict__ x, const float* __restrict__ table,
                         const float* __restrict__ grad, float* __restrict__ grad_positions, int64_t N, int F_runtime,
                         Levels levels, int active) {
  constexpr int kCorners = 1 << kD;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N) return;
  const int F = kF > 0 ? kF : F_runtime;
  float total[kD] = {};
  for (int l = 0; l < active; ++l) {
    const float* g = grad + (i * levels.count + l) * F;
    Cell<kD> cell;
    locate<kD>(levels, l, x + kD * i, cell);
    float w[kD][2];
    axis_weights<kD>(cell.t, w);
    float dt[kD] = {};
#pragma unroll
    for (int c = 0; c < kCorners; ++c) {
      const float* row = table + cell.row[c] * F;
      float s = 0.0f;
      for (int f = 0; f < F; ++f) s += g[f] * __ldg(row + f);
      // d w_c / d t_d is +-1 (upper / lower corner along d) times the other factors, in axis order.
#pragma unroll
      for (int d = 0; d < kD; ++d) {
        float others = 1.0f;
#pragma unroll
        for (int e = 0; e < kD; ++e) {
          if (e != d) others *= w[e][(c >> e) & 1];
        }
        dt[d] += (((c >> d) & 1) ? s : -s) * others;
      }
    }
#pragma unroll
    for (int d = 0; d < kD; ++d) {
      if (cell.inside[d]) total[d] += dt[d] * levels.scale[l];
    }
  }
#pragma unroll
  for (int d = 0; d < kD; ++d) grad_positions[kD * i + d] = total[d];
}

template <template <int, int> class Fn, int kD, typename... Args>
void dispatch_features(int F, Args... args) {
  switch (F) {
    case 1: Fn<kD, 1>::run(args...); break;
    case 2: Fn<kD, 2>::run(args...); break;
    case 4: Fn<kD, 4>::run(args...); break;
    case 8: Fn<kD, 8>::run(args...); break;
    default: Fn<kD, 0>::run(args...); break;
  }
}

// Launches Fn<D, F> for D in {3, 4} (checked by the binding) and tcnn's F in {1, 2, 4, 8} (0 = runtime F).
template <template <int, int> class Fn, typename... Args>
void dispatch(int D, int F, Args... args) {
  if (D == 4) {
    dispatch_features<Fn, 4>(F, args...);
  } else {
    dispatch_features<Fn, 3>(F, args...);
  }
}

template <int kD, int kF>
struct LaunchForward {
  template <typename... Args>
  static void run(int64_t threads, cudaStream_t stream, Args... args) {
    forward_kernel<kD, kF><<<lift3d::ceil_div(threads, kThreads), kThreads, 0, stream>>>(args...);
  }
};

template <int kD, int kF>
struct LaunchTableGrad {
  template <typename... Args>
  static void run(int64_t threads, cudaStream_t stream, Args... args) {
    table_grad_kernel<kD, kF><<<lift3d::ceil_div(threads, kThreads), kThreads, 0, stream>>>(args...);
  }
};

template <int kD, int kF>
struct LaunchPositionGrad {
  template <typename... Args>
  static void run(int64_t threads, cudaStream_t stream, Args... args) {
    position_grad_kernel<kD, kF><<<lift3d::ceil_div(threads, kThreads), kThreads, 0, stream>>>(args...);
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
const char* lift3d_hashgrid_forward(const float* positions, const float* table, float* out, int64_t N, int D, int F,
                                    const float* scales, const int64_t* resolutions, const int64_t* sizes,
                                    const int64_t* offsets, const uint8_t* hashed, int L, int active,
                                    cudaStream_t stream) {
  if (N == 0 || active == 0) return nullptr;
  const Levels levels = make_levels(scales, resolutions, sizes, offsets, hashed, L);
  dispatch<LaunchForward>(D, F, N * active, stream, positions, table, out, N, F, levels, active);
  return lift3d::launch_status();
}

// positions: [N, D] with D in {3, 4}.
// grad_table (zeroed by the caller, may be null) and grad_positions ([N, D], may be null) from
// grad [N, L * F].
const char* lift3d_hashgrid_backward(const float* grad, const float* positions, const float* table, float* grad_table,
                                     float* grad_positions, int64_t N, int D, int F, const float* scales,
                                     const int64_t* resolutions, const int64_t* sizes, const int64_t* offsets,
                                     const uint8_t* hashed, int L, int active, cudaStream_t stream) {
  if (N == 0) return nullptr;
  const Levels levels = make_levels(scales, resolutions, sizes, offsets, hashed, L);
  if (grad_table != nullptr && active > 0) {
    dispatch<LaunchTableGrad>(D, F, N * active, stream, positions, grad, grad_table, N, F, levels, active);
  }
  if (grad_positions != nullptr) {
    dispatch<LaunchPositionGrad>(D, F, N, stream, positions, table, grad, grad_positions, N, F, levels, active);
  }
  return lift3d::launch_status();
}

}  // extern "C"
