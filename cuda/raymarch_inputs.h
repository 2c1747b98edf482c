// Input checks of the ray-marching ops, shared by the cpu tier (raymarch_cpu.cpp) and the cuda
// tier's binding (raymarch_cuda.cpp): one set of rules, with errors naming the op, tier and input.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace lift3d_raymarch {

enum class Tier { kCpu, kCuda };

inline const char* tier_name(Tier tier) { return tier == Tier::kCpu ? "cpu" : "cuda"; }

inline void check_tensor(const at::Tensor& t, Tier tier, const char* op, const char* name, at::ScalarType dtype,
                         std::vector<int64_t> shape) {
  const bool on_device = tier == Tier::kCpu ? t.device().is_cpu() : t.is_cuda();
  TORCH_CHECK(on_device, op, " (", tier_name(tier), " tier): ", name,
              tier == Tier::kCpu ? " must be on the CPU" : " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, " (", tier_name(tier), " tier): ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (", tier_name(tier), " tier): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, " (", tier_name(tier), " tier): ", name, " has shape ",
              t.sizes(), ", expected ", at::IntArrayRef(shape));
}

inline void check_march_inputs(Tier tier, const at::Tensor& origins, const at::Tensor& dirs, const at::Tensor& t_min,
                               const at::Tensor& t_max, const at::Tensor& aabb, const at::Tensor& occupancy,
                               int64_t resolution, double step_size, const c10::optional<at::Tensor>& jitter,
                               int64_t max_samples) {
  const char* op = "march_rays";
  const int64_t R = origins.size(0);
  check_tensor(origins, tier, op, "origins", at::kFloat, {R, 3});
  check_tensor(dirs, tier, op, "dirs", at::kFloat, {R, 3});
  check_tensor(t_min, tier, op, "t_min", at::kFloat, {R});
  check_tensor(t_max, tier, op, "t_max", at::kFloat, {R});
  check_tensor(aabb, tier, op, "aabb", at::kFloat, {6});
  TORCH_CHECK(resolution > 0, "march_rays: resolution must be positive");
  check_tensor(occupancy, tier, op, "occupancy", at::kBool, {resolution * resolution * resolution});
  TORCH_CHECK(step_size > 0.0, "march_rays: step_size must be positive");
  TORCH_CHECK(max_samples >= 0, "march_rays: max_samples must be >= 0");
  if (jitter.has_value()) check_tensor(*jitter, tier, op, "jitter", at::kFloat, {R});
}

// Samples S, channels C and rays R of a composite_forward call, after checking its inputs.
struct CompositeShape {
  int64_t S, C, R;
};

inline CompositeShape check_composite_forward_inputs(Tier tier, const at::Tensor& sigmas, const at::Tensor& values,
                                                     const at::Tensor& t_starts, const at::Tensor& t_ends,
                                                     const at::Tensor& ray_indices, int64_t num_rays,
                                                     double transmittance_threshold) {
  const char* op = "composite_forward";
  const int64_t S = sigmas.size(0);
  TORCH_CHECK(values.dim() == 2, "composite_forward: values must be [S, C]");
  const int64_t C = values.size(1);
  TORCH_CHECK(num_rays >= 0, "composite_forward: num_rays must be >= 0");
  check_tensor(sigmas, tier, op, "sigmas", at::kFloat, {S});
  check_tensor(values, tier, op, "values", at::kFloat, {S, C});
  check_tensor(t_starts, tier, op, "t_starts", at::kFloat, {S});
  check_tensor(t_ends, tier, op, "t_ends", at::kFloat, {S});
  check_tensor(ray_indices, tier, op, "ray_indices", at::kLong, {S});
  TORCH_CHECK(transmittance_threshold > 0.0, "composite_forward: transmittance_threshold must be positive");
  return {S, C, num_rays};
}

// The backward takes the forward's per-sample weights, transmittance T (0 where terminated) and
// survival exp(-sigma * delta) instead of recomputing them, and each ray's kept_end (one past its
// last kept sample: T and survival are read only before it). grad_weights may be empty: zero.
inline CompositeShape check_composite_backward_inputs(
    Tier tier, const at::Tensor& values, const at::Tensor& t_starts, const at::Tensor& t_ends,
    const at::Tensor& ray_offsets, const at::Tensor& kept_ends, const at::Tensor& weights,
    const at::Tensor& transmittance, const at::Tensor& survival, const at::Tensor& grad_weights,
    const at::Tensor& grad_accumulated, const at::Tensor& grad_opacity, const at::Tensor& grad_depth) {
  const char* op = "composite_backward";
  const int64_t S = t_starts.size(0);
  TORCH_CHECK(values.dim() == 2, "composite_backward: values must be [S, C]");
  const int64_t C = values.size(1);
  const int64_t R = ray_offsets.size(0) - 1;
  TORCH_CHECK(R >= 0, "composite_backward: bad ray_offsets");
  check_tensor(values, tier, op, "values", at::kFloat, {S, C});
  check_tensor(t_starts, tier, op, "t_starts", at::kFloat, {S});
  check_tensor(t_ends, tier, op, "t_ends", at::kFloat, {S});
  check_tensor(ray_offsets, tier, op, "ray_offsets", at::kLong, {R + 1});
  check_tensor(kept_ends, tier, op, "kept_ends", at::kLong, {R});
  check_tensor(weights, tier, op, "weights", at::kFloat, {S});
  check_tensor(transmittance, tier, op, "transmittance", at::kFloat, {S});
  check_tensor(survival, tier, op, "survival", at::kFloat, {S});
  check_tensor(grad_weights, tier, op, "grad_weights", at::kFloat, {grad_weights.numel() == 0 ? 0 : S});
  check_tensor(grad_accumulated, tier, op, "grad_accumulated", at::kFloat, {R, C});
  check_tensor(grad_opacity, tier, op, "grad_opacity", at::kFloat, {R, 1});
  check_tensor(grad_depth, tier, op, "grad_depth", at::kFloat, {R, 1});
  return {S, C, R};
}

// The compositing's termination bound, -log(threshold), rounded to float as torch rounds the
// scalar in the reference's comparison.
inline float max_optical_depth(double transmittance_threshold) {
  return static_cast<float>(-std::log(transmittance_threshold));
}

// The composite forward's outputs for S samples, R rays and C channels, allocated alike by both
// tiers (each writes every entry), and the op's return tuple with the tier's ray offsets.
struct CompositeOutputs {
  at::Tensor weights, transmittance, survival, accumulated, opacity, depth, kept_ends;

  CompositeOutputs(int64_t S, int64_t R, int64_t C, const at::TensorOptions& f32, const at::TensorOptions& index)
      : weights(at::empty({S}, f32)),
        transmittance(at::empty({S}, f32)),
        survival(at::empty({S}, f32)),
        accumulated(at::empty({R, C}, f32)),
        opacity(at::empty({R, 1}, f32)),
        depth(at::empty({R, 1}, f32)),
        kept_ends(at::empty({R}, index)) {}

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  with_offsets(const at::Tensor& offsets) const {
    return {weights, accumulated, opacity, depth, offsets, kept_ends, transmittance, survival};
  }
};

}  // namespace lift3d_raymarch
