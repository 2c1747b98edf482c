// Gaussian splat rasterization, cuda tier, with a hand-written backward.
//
// Semantics: lift3d/kernels/gaussian_raster.py, exactly as cuda/gaussian_raster_cpu.cpp computes
// them (same culling by tile rectangles, alpha threshold 1/255, 0.99 clamp, stop when
// T (1 - alpha) < 1e-4, transmittance carried in double, depth ties by index).
//
// Pipeline (gsplat's / 3DGS's design):
//  1. count: tiles touched per Gaussian; the binding turns the counts into offsets (cumsum).
//  2. emit: one 64-bit key per (Gaussian, tile): (camera * T + tile) << 32 | sortable depth bits,
//     written in Gaussian index order; a stable CUB radix sort then leaves every tile's list in
//     (depth, index) order, the cpu tier's order.
//  3. ranges: per-tile [start, end) in the sorted list (the cpu tier's tile_offsets layout).
//  4. forward: one 16x16 block per tile, the tile's Gaussians staged through shared memory in
//     batches of 256, front to back, the block stops once every pixel has terminated.
//  5. backward: back to front from each pixel's last contributor, T recovered by division as in
//     the forward's double arithmetic; per-Gaussian gradients are warp-summed (__shfl_down_sync)
//     and added with one atomicAdd per warp. Float atomics make the gradient's summation order,
//     and so its last bits, vary run to run (the cpu tier is bit-deterministic; this one is not).
//
// The alpha of a (Gaussian, pixel) is computed with explicitly rounded operations (__fmul_rn,
// ...) so FMA contraction cannot make the backward's alphas differ from the forward's.

#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"

namespace {

constexpr int kTile = 16;
constexpr int kBlock = kTile * kTile;
constexpr float kAlphaMax = 0.99f;
constexpr float kAlphaMin = static_cast<float>(1.0 / 255.0);
constexpr float kTransmittanceMin = static_cast<float>(1e-4);

struct Eval {
  float dx, dy, gauss, raw, alpha;
};

__device__ __forceinline__ bool evaluate(float2 mean, float4 conic_opacity, float px, float py, Eval& e) {
  const float a = conic_opacity.x, b = conic_opacity.y, c = conic_opacity.z;
  e.dx = __fsub_rn(mean.x, px);
  e.dy = __fsub_rn(mean.y, py);
  const float quad = __fadd_rn(__fmul_rn(__fmul_rn(a, e.dx), e.dx), __fmul_rn(__fmul_rn(c, e.dy), e.dy));
  const float power = __fsub_rn(__fmul_rn(-0.5f, quad), __fmul_rn(__fmul_rn(b, e.dx), e.dy));
  if (!(power <= 0.0f)) return false;  // also rejects NaN
  e.gauss = expf(power);
  e.raw = __fmul_rn(conic_opacity.w, e.gauss);
  e.alpha = e.raw > kAlphaMax ? kAlphaMax : e.raw;  // NaN propagates, like torch.clamp
  return e.alpha >= kAlphaMin;                      // also rejects NaN
}

// The cpu tier's tile_range, in the same double arithmetic.
__device__ __forceinline__ bool tile_range(float centre, float radius, int tiles, int& lo, int& hi) {
  const double low = floor((static_cast<double>(centre) - radius - 1.0) / kTile);
  const double high = floor((static_cast<double>(centre) + radius) / kTile);
  if (!(high >= 0.0) || !(low <= static_cast<double>(tiles - 1))) return false;
  lo = static_cast<int>(fmax(low, 0.0));
  hi = static_cast<int>(fmin(high, static_cast<double>(tiles - 1)));
  return true;
}

__device__ __forceinline__ bool gaussian_rect(const float* means, const int32_t* radii, int64_t bn, int tiles_x,
                                              int tiles_y, int rect[4]) {
  if (radii[bn] <= 0) return false;
  const float radius = static_cast<float>(radii[bn]);
  return tile_range(means[2 * bn], radius, tiles_x, rect[0], rect[1]) &&
         tile_range(means[2 * bn + 1], radius, tiles_y, rect[2], rect[3]);
}

__global__ void count_tiles_kernel(const float* means, const int32_t* radii, int64_t BN, int tiles_x, int tiles_y,
                                   int64_t* counts) {
  const int64_t bn = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bn >= BN) return;
  int r[4];
  counts[bn] = gaussian_rect(means, radii, bn, tiles_x, tiles_y, r)
                   ? static_cast<int64_t>(r[1] - r[0] + 1) * (r[3] - r[2] + 1)
                   : 0;
}

// Float depth -> uint32 whose unsigned order is the float order. -0 and +0 map together and every
// NaN maps above +inf, so ties (and NaNs, last) fall back to index order like the cpu tier's sort.
__device__ __forceinline__ uint32_t depth_key(float z) {
  if (z == 0.0f) z = 0.0f;
  uint32_t u = isnan(z) ? 0x7fc00000u : __float_as_uint(z);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void emit_keys_kernel(const float* means, const float* depths, const int32_t* radii,
                                 const int64_t* inclusive_counts, int64_t BN, int64_t N, int tiles_x, int tiles_y,
                                 uint64_t* keys, int32_t* ids) {
  const int64_t bn = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bn >= BN) return;
  int r[4];
  if (!gaussian_rect(means, radii, bn, tiles_x, tiles_y, r)) return;
  int64_t at = bn == 0 ? 0 : inclusive_counts[bn - 1];
  const uint64_t camera_tile0 = static_cast<uint64_t>(bn / N) * tiles_x * tiles_y;
  const uint64_t low = depth_key(depths[bn]);
  for (int ty = r[2]; ty <= r[3]; ++ty) {
    for (int tx = r[0]; tx <= r[1]; ++tx) {
      keys[at] = ((camera_tile0 + static_cast<uint64_t>(ty) * tiles_x + tx) << 32) | low;
      ids[at] = static_cast<int32_t>(bn % N);
      ++at;
    }
  }
}

// offsets[t] = first entry of tile t (offsets[BT] = E); entries are sorted by tile.
__global__ void tile_ranges_kernel(const uint64_t* keys, int64_t E, int64_t BT, int64_t* offsets) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= E) return;
  const int64_t tile = static_cast<int64_t>(keys[e] >> 32);
  const int64_t previous = e == 0 ? -1 : static_cast<int64_t>(keys[e - 1] >> 32);
  for (int64_t t = previous + 1; t <= tile; ++t) offsets[t] = e;
  if (e == E - 1) {
    for (int64_t t = tile + 1; t <= BT; ++t) offsets[t] = E;
  }
}

// Per-pixel channel vector: registers for a compile-time channel count kC, otherwise a per-pixel
// slice of global memory owned by the thread (kC = 0, any C).
template <int kC>
struct Channels {
  float reg[kC > 0 ? kC : 1];
  float* mem;
  __device__ __forceinline__ float& operator[](int i) {
    if constexpr (kC > 0) {
      return reg[i];
    } else {
      return mem[i];
    }
  }
};

struct Frame {
  int b, x, y, tile_base;  // camera, pixel, first entry of (b, tile) in tile_ids
  bool inside;
  int64_t pix, start, end;
};

__device__ __forceinline__ Frame frame(const int64_t* tile_offsets, int W, int H, int tiles_x, int T) {
  Frame f;
  f.b = blockIdx.y;
  const int t = blockIdx.x;
  f.x = (t % tiles_x) * kTile + threadIdx.x;
  f.y = (t / tiles_x) * kTile + threadIdx.y;
  f.inside = f.x < W && f.y < H;
  f.pix = (static_cast<int64_t>(f.b) * H + f.y) * W + f.x;
  f.start = tile_offsets[static_cast<int64_t>(f.b) * T + t];
  f.end = tile_offsets[static_cast<int64_t>(f.b) * T + t + 1];
  return f;
}

struct Gathered {
  int32_t id[kBlock];
  float2 mean[kBlock];
  float4 conic_opacity[kBlock];
};

__device__ __forceinline__ void gather(Gathered& s, int slot, int64_t g, const float* means, const float* conics,
                                       const float* opacities) {
  s.id[slot] = static_cast<int32_t>(g);
  s.mean[slot] = make_float2(means[2 * g], means[2 * g + 1]);
  s.conic_opacity[slot] = make_float4(conics[3 * g], conics[3 * g + 1], conics[3 * g + 2], opacities[g]);
}

template <int kC>
__global__ void __launch_bounds__(kBlock)
    rasterize_forward_kernel(const float* __restrict__ means, const float* __restrict__ conics,
                             const float* __restrict__ colors, const float* __restrict__ opacities,
                             const float* __restrict__ depths, const int64_t* __restrict__ tile_offsets,
                             const int32_t* __restrict__ tile_ids, int64_t N, int C_runtime, int W, int H,
                             int tiles_x, int T, float* __restrict__ rgb, float* __restrict__ alpha_out,
                             float* __restrict__ depth_out, double* __restrict__ final_t,
                             int32_t* __restrict__ n_contrib) {
  const int C = kC > 0 ? kC : C_runtime;
  const Frame f = frame(tile_offsets, W, H, tiles_x, T);
  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int64_t cam = static_cast<int64_t>(f.b) * N;
  __shared__ Gathered s;

  Channels<kC> acc;
  acc.mem = rgb + f.pix * C;  // kC = 0 accumulates in place in the (zeroed) output
  if constexpr (kC > 0) {
#pragma unroll
    for (int ch = 0; ch < kC; ++ch) acc[ch] = 0.0f;
  }
  float acc_depth = 0.0f;
  const float px = static_cast<float>(f.x) + 0.5f, py = static_cast<float>(f.y) + 0.5f;
  double trans = 1.0;
  int32_t last = 0;
  bool done = !f.inside;

  for (int64_t base = f.start; base < f.end; base += kBlock) {
    // Also the barrier before the batch in shared memory is overwritten.
    if (__syncthreads_count(done) == kBlock) break;
    if (base + tid < f.end) gather(s, tid, cam + tile_ids[base + tid], means, conics, opacities);
    __syncthreads();
    const int n = static_cast<int>(min(static_cast<int64_t>(kBlock), f.end - base));
    for (int k = 0; k < n && !done; ++k) {
      Eval e;
      if (!evaluate(s.mean[k], s.conic_opacity[k], px, py, e)) continue;
      const double next = trans * static_cast<double>(1.0f - e.alpha);
      if (static_cast<float>(next) < kTransmittanceMin) {
        done = true;
        break;
      }
      const float weight = e.alpha * static_cast<float>(trans);
      const int64_t g = cam + s.id[k];
      const float* color = colors + g * C;
#pragma unroll
      for (int ch = 0; ch < C; ++ch) acc[ch] += weight * color[ch];
      acc_depth += weight * depths[g];
      trans = next;
      last = static_cast<int32_t>(base - f.start + k + 1);
    }
  }
  if (!f.inside) return;
  if constexpr (kC > 0) {
#pragma unroll
    for (int ch = 0; ch < kC; ++ch) rgb[f.pix * kC + ch] = acc[ch];
  }
  depth_out[f.pix] = acc_depth;
  alpha_out[f.pix] = 1.0f - static_cast<float>(trans);
  final_t[f.pix] = trans;
  n_contrib[f.pix] = last;
}

template <int kC>
__global__ void __launch_bounds__(kBlock)
    rasterize_backward_kernel(const float* __restrict__ means, const float* __restrict__ conics,
                              const float* __restrict__ colors, const float* __restrict__ opacities,
                              const float* __restrict__ depths, const double* __restrict__ final_t,
                              const int32_t* __restrict__ n_contrib, const int64_t* __restrict__ tile_offsets,
                              const int32_t* __restrict__ tile_ids, const float* __restrict__ grad_rgb,
                              const float* __restrict__ grad_alpha, const float* __restrict__ grad_depth,
                              float* __restrict__ scratch, int64_t N, int C_runtime, int W, int H, int tiles_x,
                              int T, float* __restrict__ d_means, float* __restrict__ d_conics,
                              float* __restrict__ d_colors, float* __restrict__ d_opacities,
                              float* __restrict__ d_depths) {
  const int C = kC > 0 ? kC : C_runtime;
  const Frame f = frame(tile_offsets, W, H, tiles_x, T);
  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int64_t cam = static_cast<int64_t>(f.b) * N;
  __shared__ Gathered s;
  __shared__ int block_last;

  // Pixels outside the image take part in every warp reduction with zero contributions.
  const int32_t last = f.inside ? n_contrib[f.pix] : 0;
  if (tid == 0) block_last = 0;
  __syncthreads();
  atomicMax(&block_last, last);

  // accum: the normalised blend behind the current Gaussian; last_feature: the one behind it.
  Channels<kC> upstream, accum, last_feature;
  upstream.mem = const_cast<float*>(grad_rgb) + f.pix * C;  // read only
  accum.mem = scratch + f.pix * 2 * C;                       // kC = 0: per-pixel scratch slices
  last_feature.mem = accum.mem + C;
  float upstream_depth = 0.0f, accum_depth = 0.0f, last_depth = 0.0f, d_alpha_out = 0.0f;
  double t_final = 1.0;
  if (f.inside) {
#pragma unroll
    for (int ch = 0; ch < C; ++ch) {
      if constexpr (kC > 0) upstream[ch] = grad_rgb[f.pix * kC + ch];
      accum[ch] = 0.0f;
      last_feature[ch] = 0.0f;
    }
    upstream_depth = grad_depth[f.pix];
    d_alpha_out = grad_alpha[f.pix];
    t_final = final_t[f.pix];
  }
  float last_alpha = 0.0f;
  double trans = t_final;
  const float px = static_cast<float>(f.x) + 0.5f, py = static_cast<float>(f.y) + 0.5f;
  __syncthreads();
  const int64_t block_end = f.start + block_last;

  for (int64_t hi = block_end; hi > f.start; hi -= kBlock) {
    const int64_t lo = max(hi - static_cast<int64_t>(kBlock), f.start);
    __syncthreads();  // the previous batch is finished with
    if (lo + tid < hi) gather(s, tid, cam + tile_ids[lo + tid], means, conics, opacities);
    __syncthreads();
    for (int k = static_cast<int>(hi - lo) - 1; k >= 0; --k) {
      const int64_t j = lo + k - f.start;
      Eval e{};
      const bool valid = j < last && evaluate(s.mean[k], s.conic_opacity[k], px, py, e);
      if (!__any_sync(lift3d::kFullMask, valid)) continue;
      const int64_t g = cam + s.id[k];
      float weight = 0.0f, d_alpha = 0.0f;
      if (valid) {
        trans /= static_cast<double>(1.0f - e.alpha);  // T before this Gaussian
        const float tr = static_cast<float>(trans);
        weight = e.alpha * tr;
        const float* color = colors + g * C;
#pragma unroll
        for (int ch = 0; ch < C; ++ch) {
          accum[ch] = last_alpha * last_feature[ch] + (1.0f - last_alpha) * accum[ch];
          last_feature[ch] = color[ch];
          d_alpha += (color[ch] - accum[ch]) * upstream[ch];
        }
        const float z = depths[g];
        accum_depth = last_alpha * last_depth + (1.0f - last_alpha) * accum_depth;
        last_depth = z;
        d_alpha += (z - accum_depth) * upstream_depth;
        d_alpha *= tr;
        // Output alpha = 1 - prod(1 - alpha_k): d/d alpha_j = T_final / (1 - alpha_j).
        d_alpha += static_cast<float>(t_final / static_cast<double>(1.0f - e.alpha)) * d_alpha_out;
        last_alpha = e.alpha;
      }
      // Clamped at 0.99: no gradient through alpha, as torch.clamp.
      const bool through = valid && e.raw <= kAlphaMax;
      const float a = s.conic_opacity[k].x, b = s.conic_opacity[k].y, c = s.conic_opacity[k].z;
      const float d_power = through ? d_alpha * e.raw : 0.0f;
      const float dx = valid ? e.dx : 0.0f, dy = valid ? e.dy : 0.0f;
      lift3d::warp_atomic_add(d_means + 2 * g, d_power * (-a * dx - b * dy));
      lift3d::warp_atomic_add(d_means + 2 * g + 1, d_power * (-c * dy - b * dx));
      lift3d::warp_atomic_add(d_conics + 3 * g, d_power * (-0.5f * dx * dx));
      lift3d::warp_atomic_add(d_conics + 3 * g + 1, d_power * (-dx * dy));
      lift3d::warp_atomic_add(d_conics + 3 * g + 2, d_power * (-0.5f * dy * dy));
      lift3d::warp_atomic_add(d_opacities + g, through ? d_alpha * e.gauss : 0.0f);
#pragma unroll
      for (int ch = 0; ch < C; ++ch) lift3d::warp_atomic_add(d_colors + g * C + ch, valid ? weight * upstream[ch] : 0.0f);
      lift3d::warp_atomic_add(d_depths + g, weight * upstream_depth);
    }
  }
}

template <template <int> class Fn, typename... Args>
void dispatch_channels(int C, Args... args) {
  switch (C) {
    case 1: Fn<1>::run(args...); break;
    case 2: Fn<2>::run(args...); break;
    case 3: Fn<3>::run(args...); break;
    case 4: Fn<4>::run(args...); break;
    default: Fn<0>::run(args...); break;
  }
}

template <int kC>
struct LaunchForward {
  template <typename... Args>
  static void run(dim3 grid, cudaStream_t stream, Args... args) {
    rasterize_forward_kernel<kC><<<grid, dim3(kTile, kTile), 0, stream>>>(args...);
  }
};

template <int kC>
struct LaunchBackward {
  template <typename... Args>
  static void run(dim3 grid, cudaStream_t stream, Args... args) {
    rasterize_backward_kernel<kC><<<grid, dim3(kTile, kTile), 0, stream>>>(args...);
  }
};

constexpr int kThreads = 256;

}  // namespace

extern "C" {

// counts[B*N]: tiles touched by each Gaussian (0 when culled).
const char* lift3d_gs_count_tiles(const float* means, const int32_t* radii, int64_t BN, int tiles_x, int tiles_y,
                                  int64_t* counts, cudaStream_t stream) {
  if (BN == 0) return nullptr;
  count_tiles_kernel<<<lift3d::ceil_div(BN, kThreads), kThreads, 0, stream>>>(means, radii, BN, tiles_x, tiles_y,
                                                                              counts);
  return lift3d::launch_status();
}

// keys/ids[E] at the offsets given by the inclusive cumsum of the counts.
const char* lift3d_gs_emit_keys(const float* means, const float* depths, const int32_t* radii,
                                const int64_t* inclusive_counts, int64_t BN, int64_t N, int tiles_x, int tiles_y,
                                uint64_t* keys, int32_t* ids, cudaStream_t stream) {
  if (BN == 0) return nullptr;
  emit_keys_kernel<<<lift3d::ceil_div(BN, kThreads), kThreads, 0, stream>>>(means, depths, radii, inclusive_counts,
                                                                            BN, N, tiles_x, tiles_y, keys, ids);
  return lift3d::launch_status();
}

// Stable radix sort of (key, id) pairs on bits [0, end_bit). With temp == nullptr only sets
// *temp_bytes (CUB's two-call protocol; the binding allocates through torch's allocator).
const char* lift3d_gs_sort_keys(void* temp, size_t* temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                                const int32_t* ids_in, int32_t* ids_out, int E, int end_bit, cudaStream_t stream) {
  const cudaError_t error = cub::DeviceRadixSort::SortPairs(temp, *temp_bytes, keys_in, keys_out, ids_in, ids_out, E,
                                                            0, end_bit, stream);
  return error == cudaSuccess ? lift3d::launch_status() : cudaGetErrorString(error);
}

// offsets[BT + 1] from the sorted keys (E > 0).
const char* lift3d_gs_tile_ranges(const uint64_t* keys, int64_t E, int64_t BT, int64_t* offsets,
                                  cudaStream_t stream) {
  if (E == 0) return nullptr;
  tile_ranges_kernel<<<lift3d::ceil_div(E, kThreads), kThreads, 0, stream>>>(keys, E, BT, offsets);
  return lift3d::launch_status();
}

// Outputs as the cpu tier's op; rgb must be zeroed (C not in 1..4 accumulates in place).
const char* lift3d_gs_rasterize_forward(const float* means, const float* conics, const float* colors,
                                        const float* opacities, const float* depths, const int64_t* tile_offsets,
                                        const int32_t* tile_ids, int64_t B, int64_t N, int C, int W, int H,
                                        int tiles_x, int tiles_y, float* rgb, float* alpha, float* depth,
                                        double* final_t, int32_t* n_contrib, cudaStream_t stream) {
  if (B == 0 || W == 0 || H == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(tiles_x * tiles_y), static_cast<unsigned>(B));
  dispatch_channels<LaunchForward>(C, grid, stream, means, conics, colors, opacities, depths, tile_offsets, tile_ids,
                                   N, C, W, H, tiles_x, tiles_x * tiles_y, rgb, alpha, depth, final_t, n_contrib);
  return lift3d::launch_status();
}

// Gradients (zeroed by the caller) are accumulated atomically. scratch: 2 * C floats per pixel,
// used only when C is not in 1..4 (may be null otherwise).
const char* lift3d_gs_rasterize_backward(const float* means, const float* conics, const float* colors,
                                         const float* opacities, const float* depths, const double* final_t,
                                         const int32_t* n_contrib, const int64_t* tile_offsets,
                                         const int32_t* tile_ids, const float* grad_rgb, const float* grad_alpha,
                                         const float* grad_depth, float* scratch, int64_t B, int64_t N, int C, int W,
                                         int H, int tiles_x, int tiles_y, float* d_means, float* d_conics,
                                         float* d_colors, float* d_opacities, float* d_depths, cudaStream_t stream) {
  if (B == 0 || W == 0 || H == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(tiles_x * tiles_y), static_cast<unsigned>(B));
  dispatch_channels<LaunchBackward>(C, grid, stream, means, conics, colors, opacities, depths, final_t, n_contrib,
                                    tile_offsets, tile_ids, grad_rgb, grad_alpha, grad_depth, scratch, N, C, W, H,
                                    tiles_x, tiles_x * tiles_y, d_means, d_conics, d_colors, d_opacities, d_depths);
  return lift3d::launch_status();
}

}  // extern "C"
