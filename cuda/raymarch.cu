// Ray marching through an occupancy grid and volume-rendering compositing, cuda tier, with a
// hand-written backward.
//
// Semantics: lift3d/kernels/raymarch.py, as cuda/raymarch_cpu.cpp computes them.
//  - march_rays: one thread per ray, a count pass, an exclusive scan (in the binding) and a fill
//    pass. Every sample coordinate is computed with explicitly rounded float32 operations
//    (__fmul_rn, __fadd_rn, __fdiv_rn: no FMA contraction, no fast-math division), the same
//    sequence as the cpu tier and the torch reference, so all three tiers give identical samples.
//  - composite: one thread per ray. The optical depth is accumulated in double (torch.cumsum's CPU
//    accumulation, as the cpu tier), so the early-termination decisions are the cpu tier's. The
//    forward keeps T and exp(-sigma * delta) for the backward, which needs no transcendental. The
//    backward's suffix sums sum_{i>j} G_i w_i are the ray's total minus a running prefix (in
//    double), which avoids per-ray scratch storage. Each ray writes only its own outputs: no atomics.

#include "common.cuh"

namespace {

constexpr int kThreads = 256;

struct Marcher {
  const float* origins;
  const float* dirs;
  const float* t_min;
  const float* t_max;
  const float* jitter;  // null: no jitter
  const uint8_t* occupancy;
  const float* aabb;
  int64_t res;
  float step;
  int64_t max_samples;

  // Visits the kept samples of ray r in order, fn(t0, t1); returns the count.
  template <typename Fn>
  __device__ int64_t march(int64_t r, Fn&& fn) const {
    const float res_f = static_cast<float>(res);
    float o[3], d[3], lo[3], scale[3];
    for (int c = 0; c < 3; ++c) {
      o[c] = origins[3 * r + c];
      d[c] = dirs[3 * r + c];
      lo[c] = aabb[c];
      scale[c] = __fdiv_rn(res_f, __fsub_rn(aabb[c + 3], aabb[c]));  // res / size, rounded like torch
    }
    const float start = t_min[r];
    const float stop = t_max[r];
    const float j = jitter ? jitter[r] : 0.0f;
    int64_t kept = 0;
    for (int64_t k = 0; kept < max_samples; ++k) {
      const float s = __fadd_rn(static_cast<float>(k), j);
      const float t0 = __fadd_rn(start, __fmul_rn(s, step));
      const float t1 = __fadd_rn(t0, step);
      if (!(t1 <= stop)) break;  // also stops on NaN
      const float tm = __fmul_rn(__fadd_rn(t0, t1), 0.5f);
      int64_t cell = 0;
      bool inside = true;
      for (int c = 0; c < 3; ++c) {
        const float x = __fadd_rn(o[c], __fmul_rn(tm, d[c]));
        const float u = __fmul_rn(__fsub_rn(x, lo[c]), scale[c]);
        // 0 <= floor(u) < res  <=>  0 <= u < res, and then floor is truncation. Rejects NaN too.
        if (!(u >= 0.0f && u < res_f)) {
          inside = false;
          break;
        }
        cell = cell * res + static_cast<int64_t>(u);
      }
      if (!inside || !occupancy[cell]) continue;
      fn(t0, t1);
      ++kept;
    }
    return kept;
  }
};

__global__ void march_count_kernel(Marcher m, int64_t R, int64_t* counts) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= R) return;
  counts[r] = m.march(r, [](float, float) {});
}

__global__ void march_fill_kernel(Marcher m, int64_t R, const int64_t* inclusive_counts, int64_t* ray_indices,
                                  float* t_starts, float* t_ends) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= R) return;
  int64_t at = r == 0 ? 0 : inclusive_counts[r - 1];
  m.march(r, [&](float t0, float t1) {
    ray_indices[at] = r;
    t_starts[at] = t0;
    t_ends[at] = t1;
    ++at;
  });
}

struct CompositeInputs {
  const float* sigmas;
  const float* values;
  const float* t_starts;
  const float* t_ends;
  const int64_t* offsets;  // [R + 1]: ray r's samples are [offsets[r], offsets[r + 1])
  int64_t R;
  int C;
  float max_optical_depth;  // -log(threshold), rounded to float like torch's scalar comparison
};

__global__ void composite_forward_kernel(CompositeInputs in, float* weights, float* transmittance, float* survival,
                                         float* accumulated, float* opacity, float* depth, int64_t* kept_ends) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= in.R) return;
  double optical_depth = 0.0, total = 0.0, depth_sum = 0.0;
  int64_t kept_end = in.offsets[r];
  for (int64_t i = in.offsets[r]; i < in.offsets[r + 1]; ++i) {
    const float delta = __fsub_rn(in.t_ends[i], in.t_starts[i]);
    const float sd = __fmul_rn(in.sigmas[i], delta);
    const float excl = static_cast<float>(optical_depth);
    optical_depth += static_cast<double>(sd);
    if (!(excl <= in.max_optical_depth)) {  // terminated (or NaN): T = 0 tells the backward
      weights[i] = transmittance[i] = survival[i] = 0.0f;
      continue;
    }
    // T and exp(-sd) are kept for the backward, which then needs no transcendental.
    const float T = expf(-excl);
    const float w = T * -expm1f(-sd);
    weights[i] = w;
    transmittance[i] = T;
    survival[i] = expf(-sd);
    kept_end = i + 1;
    total += w;
    depth_sum += static_cast<double>(w) * (0.5 * (static_cast<double>(in.t_starts[i]) + in.t_ends[i]));
  }
  // Channels one at a time (a second sweep over the samples) keep the per-thread state O(1) for any C.
  for (int c = 0; c < in.C; ++c) {
    double acc = 0.0;
    for (int64_t i = in.offsets[r]; i < in.offsets[r + 1]; ++i) {
      acc += static_cast<double>(weights[i]) * in.values[i * in.C + c];
    }
    accumulated[r * in.C + c] = static_cast<float>(acc);
  }
  opacity[r] = static_cast<float>(total);
  depth[r] = static_cast<float>(depth_sum);
  kept_ends[r] = kept_end;
}

struct BackwardInputs {
  const float* values;
  const float* t_starts;
  const float* t_ends;
  const int64_t* offsets;
  const float* weights;        // the forward's w
  const float* transmittance;  // the forward's T (0 where terminated)
  const float* survival;       // the forward's exp(-sigma * delta)
  int64_t R;
  int C;
};

__device__ __forceinline__ double sample_gradient(const BackwardInputs& in, int64_t r, int64_t i,
                                                  const float* grad_weights, const float* grad_accumulated,
                                                  const float* grad_opacity, const float* grad_depth) {
  // G_i = dL/dw_i: direct (none when grad_weights is null), through the opacity, the depth and every channel.
  double G = static_cast<double>(grad_weights ? grad_weights[i] : 0.0f) + grad_opacity[r] +
             static_cast<double>(grad_depth[r]) * (0.5 * (static_cast<double>(in.t_starts[i]) + in.t_ends[i]));
  for (int c = 0; c < in.C; ++c) G += static_cast<double>(grad_accumulated[r * in.C + c]) * in.values[i * in.C + c];
  return G;
}

__global__ void composite_backward_kernel(BackwardInputs in, const float* grad_weights, const float* grad_accumulated,
                                          const float* grad_opacity, const float* grad_depth, float* grad_sigmas,
                                          float* grad_values) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= in.R) return;
  const int64_t begin = in.offsets[r], end = in.offsets[r + 1];
  // Pass 1: total = sum_i G_i w_i.
  double total = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    if (in.transmittance[i] != 0.0f)
      total += sample_gradient(in, r, i, grad_weights, grad_accumulated, grad_opacity, grad_depth) * in.weights[i];
  }
  // Pass 2: dL/dsd_j = G_j T_j exp(-sd_j) - sum_{i>j} G_i w_i  (terminated: T_j = 0, nothing of their own).
  double prefix = 0.0;  // sum_{i<=j} G_i w_i
  for (int64_t i = begin; i < end; ++i) {
    const float w = in.weights[i];
    double own = 0.0;
    if (in.transmittance[i] != 0.0f) {
      const double G = sample_gradient(in, r, i, grad_weights, grad_accumulated, grad_opacity, grad_depth);
      own = G * in.transmittance[i] * in.survival[i];
      prefix += G * w;
      for (int c = 0; c < in.C; ++c) grad_values[i * in.C + c] = w * grad_accumulated[r * in.C + c];
    } else {
      for (int c = 0; c < in.C; ++c) grad_values[i * in.C + c] = 0.0f;
    }
    const float delta = __fsub_rn(in.t_ends[i], in.t_starts[i]);
    grad_sigmas[i] = static_cast<float>((own - (total - prefix)) * delta);
  }
}

}  // namespace

extern "C" {

// Pass 1 of march_rays: counts[R] kept samples per ray. occupancy: res^3 bools (1 byte each).
const char* lift3d_march_count(const float* origins, const float* dirs, const float* t_min, const float* t_max,
                               const float* aabb, const uint8_t* occupancy, int64_t resolution, float step,
                               const float* jitter, int64_t max_samples, int64_t R, int64_t* counts,
                               cudaStream_t stream) {
  if (R == 0) return nullptr;
  const Marcher m{origins, dirs, t_min, t_max, jitter, occupancy, aabb, resolution, step, max_samples};
  march_count_kernel<<<lift3d::ceil_div(R, kThreads), kThreads, 0, stream>>>(m, R, counts);
  return lift3d::launch_status();
}

// Pass 2: writes each ray's samples at the offsets given by the inclusive cumsum of the counts.
const char* lift3d_march_fill(const float* origins, const float* dirs, const float* t_min, const float* t_max,
                              const float* aabb, const uint8_t* occupancy, int64_t resolution, float step,
                              const float* jitter, int64_t max_samples, int64_t R, const int64_t* inclusive_counts,
                              int64_t* ray_indices, float* t_starts, float* t_ends, cudaStream_t stream) {
  if (R == 0) return nullptr;
  const Marcher m{origins, dirs, t_min, t_max, jitter, occupancy, aabb, resolution, step, max_samples};
  march_fill_kernel<<<lift3d::ceil_div(R, kThreads), kThreads, 0, stream>>>(m, R, inclusive_counts, ray_indices,
                                                                            t_starts, t_ends);
  return lift3d::launch_status();
}

// Writes every output entry. kept_ends[r]: one past ray r's last kept sample.
const char* lift3d_composite_forward(const float* sigmas, const float* values, const float* t_starts,
                                     const float* t_ends, const int64_t* offsets, int64_t R, int C,
                                     float max_optical_depth, float* weights, float* transmittance, float* survival,
                                     float* accumulated, float* opacity, float* depth, int64_t* kept_ends,
                                     cudaStream_t stream) {
  if (R == 0) return nullptr;
  const CompositeInputs in{sigmas, values, t_starts, t_ends, offsets, R, C, max_optical_depth};
  composite_forward_kernel<<<lift3d::ceil_div(R, kThreads), kThreads, 0, stream>>>(
      in, weights, transmittance, survival, accumulated, opacity, depth, kept_ends);
  return lift3d::launch_status();
}

// grad_weights null: zero. (The cpu tier also reads kept_ends; here one thread walks its whole ray anyway.)
const char* lift3d_composite_backward(const float* values, const float* t_starts, const float* t_ends,
                                      const int64_t* offsets, int64_t R, int C, const float* weights,
                                      const float* transmittance, const float* survival, const float* grad_weights,
                                      const float* grad_accumulated, const float* grad_opacity,
                                      const float* grad_depth, float* grad_sigmas, float* grad_values,
                                      cudaStream_t stream) {
  if (R == 0) return nullptr;
  const BackwardInputs in{values, t_starts, t_ends, offsets, weights, transmittance, survival, R, C};
  composite_backward_kernel<<<lift3d::ceil_div(R, kThreads), kThreads, 0, stream>>>(
      in, grad_weights, grad_accumulated, grad_opacity, grad_depth, grad_sigmas, grad_values);
  return lift3d::launch_status();
}

}  // extern "C"
