// Torch binding of the cuda-tier ray marcher and compositor (cuda/raymarch.cu). Only torch headers
// here (DESIGN §3); the stream comes from Python (torch.cuda.current_stream().cuda_stream).

#include <torch/extension.h>

#include "raymarch_inputs.h"

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

struct CUstream_st;

extern "C" {
const char* lift3d_march_count(const float* origins, const float* dirs, const float* t_min, const float* t_max,
                               const float* aabb, const uint8_t* occupancy, int64_t resolution, float step,
                               const float* jitter, int64_t max_samples, int64_t R, int64_t* counts,
                               CUstream_st* stream);
const char* lift3d_march_fill(const float* origins, const float* dirs, const float* t_min, const float* t_max,
                              const float* aabb, const uint8_t* occupancy, int64_t resolution, float step,
                              const float* jitter, int64_t max_samples, int64_t R, const int64_t* inclusive_counts,
                              int64_t* ray_indices, float* t_starts, float* t_ends, CUstream_st* stream);
const char* lift3d_composite_forward(const float* sigmas, const float* values, const float* t_starts,
                                     const float* t_ends, const int64_t* offsets, int64_t R, int C,
                                     float max_optical_depth, float* weights, float* transmittance, float* survival,
                                     float* accumulated, float* opacity, float* depth, int64_t* kept_ends,
                                     CUstream_st* stream);
const char* lift3d_composite_backward(const float* values, const float* t_starts, const float* t_ends,
                                      const int64_t* offsets, int64_t R, int C, const float* weights,
                                      const float* transmittance, const float* survival, const float* grad_weights,
                                      const float* grad_accumulated, const float* grad_opacity,
                                      const float* grad_depth, float* grad_sigmas, float* grad_values,
                                      CUstream_st* stream);
}

namespace {

using lift3d_raymarch::check_composite_backward_inputs;
using lift3d_raymarch::check_composite_forward_inputs;
using lift3d_raymarch::check_march_inputs;
using lift3d_raymarch::CompositeOutputs;
using lift3d_raymarch::max_optical_depth;
using lift3d_raymarch::Tier;

CUstream_st* as_stream(int64_t stream) { return reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream)); }

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, op, " (cuda tier) failed: ", error);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> march_rays(const at::Tensor& origins, const at::Tensor& dirs,
                                                          const at::Tensor& t_min, const at::Tensor& t_max,
                                                          const at::Tensor& aabb, const at::Tensor& occupancy,
                                                          int64_t resolution, double step_size,
                                                          const c10::optional<at::Tensor>& jitter,
                                                          int64_t max_samples, int64_t stream_handle) {
  check_march_inputs(Tier::kCuda, origins, dirs, t_min, t_max, aabb, occupancy, resolution, step_size, jitter,
                     max_samples);
  const int64_t R = origins.size(0);
  const c10::DeviceGuard guard(origins.device());
  CUstream_st* stream = as_stream(stream_handle);
  const float step = static_cast<float>(step_size);
  const float* jitter_ptr = jitter.has_value() ? jitter->data_ptr<float>() : nullptr;
  const uint8_t* occ = reinterpret_cast<const uint8_t*>(occupancy.data_ptr<bool>());

  // Pass 1: count per ray; scan; pass 2: fill at the offsets (packed in ray order).
  at::Tensor counts = at::empty({R}, origins.options().dtype(at::kLong));
  check_launch(lift3d_march_count(origins.data_ptr<float>(), dirs.data_ptr<float>(), t_min.data_ptr<float>(),
                                  t_max.data_ptr<float>(), aabb.data_ptr<float>(), occ, resolution, step, jitter_ptr,
                                  max_samples, R, counts.data_ptr<int64_t>(), stream),
               "march_rays");
  const at::Tensor inclusive = counts.cumsum(0);
  const int64_t S = R > 0 ? inclusive[R - 1].item<int64_t>() : 0;
  at::Tensor ray_indices = at::empty({S}, origins.options().dtype(at::kLong));
  at::Tensor t_starts = at::empty({S}, origins.options());
  at::Tensor t_ends = at::empty({S}, origins.options());
  if (S > 0) {
    check_launch(lift3d_march_fill(origins.data_ptr<float>(), dirs.data_ptr<float>(), t_min.data_ptr<float>(),
                                   t_max.data_ptr<float>(), aabb.data_ptr<float>(), occ, resolution, step,
                                   jitter_ptr, max_samples, R, inclusive.data_ptr<int64_t>(),
                                   ray_indices.data_ptr<int64_t>(), t_starts.data_ptr<float>(),
                                   t_ends.data_ptr<float>(), stream),
                 "march_rays");
  }
  return {ray_indices, t_starts, t_ends};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_forward(
    const at::Tensor& sigmas, const at::Tensor& values, const at::Tensor& t_starts, const at::Tensor& t_ends,
    const at::Tensor& ray_indices, int64_t num_rays, double transmittance_threshold, int64_t stream) {
  const auto [S, C, R] = check_composite_forward_inputs(Tier::kCuda, sigmas, values, t_starts, t_ends, ray_indices,
                                                        num_rays, transmittance_threshold);
  const c10::DeviceGuard guard(sigmas.device());
  if (S > 0) {
    const bool sorted = S == 1 || (ray_indices.slice(0, 1) >= ray_indices.slice(0, 0, S - 1)).all().item<bool>();
    const bool in_range = ray_indices[0].item<int64_t>() >= 0 && ray_indices[S - 1].item<int64_t>() < R;
    TORCH_CHECK(sorted && in_range, "composite: ray_indices must be non-decreasing and in [0, num_rays)");
  }
  // offsets[r] = first sample of ray r or later (so offsets[R] = S).
  const at::Tensor offsets = at::searchsorted(ray_indices, at::arange(R + 1, ray_indices.options()));

  const CompositeOutputs out(S, R, C, sigmas.options(), ray_indices.options());
  check_launch(lift3d_composite_forward(sigmas.data_ptr<float>(), values.data_ptr<float>(),
                                        t_starts.data_ptr<float>(), t_ends.data_ptr<float>(),
                                        offsets.data_ptr<int64_t>(), R, static_cast<int>(C),
                                        max_optical_depth(transmittance_threshold), out.weights.data_ptr<float>(),
                                        out.transmittance.data_ptr<float>(), out.survival.data_ptr<float>(),
                                        out.accumulated.data_ptr<float>(), out.opacity.data_ptr<float>(),
                                        out.depth.data_ptr<float>(), out.kept_ends.data_ptr<int64_t>(),
                                        as_stream(stream)),
               "composite_forward");
  return out.with_offsets(offsets);
}

std::tuple<at::Tensor, at::Tensor> composite_backward(const at::Tensor& values, const at::Tensor& t_starts,
                                                      const at::Tensor& t_ends, const at::Tensor& ray_offsets,
                                                      const at::Tensor& kept_ends, const at::Tensor& weights,
                                                      const at::Tensor& transmittance, const at::Tensor& survival,
                                                      const at::Tensor& grad_weights,
                                                      const at::Tensor& grad_accumulated,
                                                      const at::Tensor& grad_opacity, const at::Tensor& grad_depth,
                                                      int64_t stream) {
  const auto [S, C, R] = check_composite_backward_inputs(Tier::kCuda, values, t_starts, t_ends, ray_offsets,
                                                         kept_ends, weights, transmittance, survival, grad_weights,
                                                         grad_accumulated, grad_opacity, grad_depth);
  const c10::DeviceGuard guard(values.device());
  // Every entry is written (the offsets from composite_forward cover [0, S) exactly).
  at::Tensor grad_sigmas = at::empty({S}, values.options());
  at::Tensor grad_values = at::empty({S, C}, values.options());
  check_launch(lift3d_composite_backward(values.data_ptr<float>(), t_starts.data_ptr<float>(),
                                         t_ends.data_ptr<float>(), ray_offsets.data_ptr<int64_t>(), R,
                                         static_cast<int>(C), weights.data_ptr<float>(),
                                         transmittance.data_ptr<float>(), survival.data_ptr<float>(),
                                         grad_weights.numel() > 0 ? grad_weights.data_ptr<float>() : nullptr,
                                         grad_accumulated.data_ptr<float>(),
                                         grad_opacity.data_ptr<float>(), grad_depth.data_ptr<float>(),
                                         grad_sigmas.data_ptr<float>(), grad_values.data_ptr<float>(),
                                         as_stream(stream)),
               "composite_backward");
  return {grad_sigmas, grad_values};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cuda, m) {
  m.def(
      "march_rays(Tensor origins, Tensor dirs, Tensor t_min, Tensor t_max, Tensor aabb, Tensor occupancy, "
      "int resolution, float step_size, Tensor? jitter, int max_samples, int stream) -> (Tensor ray_indices, "
      "Tensor t_starts, Tensor t_ends)",
      &march_rays);
  m.def(
      "composite_forward(Tensor sigmas, Tensor values, Tensor t_starts, Tensor t_ends, Tensor ray_indices, "
      "int num_rays, float transmittance_threshold, int stream) -> (Tensor weights, Tensor accumulated, "
      "Tensor opacity, Tensor depth, Tensor ray_offsets, Tensor kept_ends, Tensor transmittance, Tensor survival)",
      &composite_forward);
  m.def(
      "composite_backward(Tensor values, Tensor t_starts, Tensor t_ends, Tensor ray_offsets, Tensor kept_ends, "
      "Tensor weights, Tensor transmittance, Tensor survival, Tensor grad_weights, Tensor grad_accumulated, "
      "Tensor grad_opacity, Tensor grad_depth, int stream) -> (Tensor grad_sigmas, Tensor grad_values)",
      &composite_backward);
}
