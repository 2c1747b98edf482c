// Torch binding of the cuda-tier ray marcher and compositor (cuda/raymarch.cu). Only torch headers
// here (DESIGN §3); the stream comes from Python (torch.cuda.current_stream().cuda_stream).

#include <torch/extension.h>

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
                                     float max_optical_depth, float* weights, float* accumulated, float* opacity,
                                     float* depth, CUstream_st* stream);
const char* lift3d_composite_backward(const float* sigmas, const float* values, const float* t_starts,
                                      const float* t_ends, const int64_t* offsets, int64_t R, int C,
                                      float max_optical_depth, const float* grad_weights,
                                      const float* grad_accumulated, const float* grad_opacity,
                                      const float* grad_depth, float* grad_sigmas, float* grad_values,
                                      CUstream_st* stream);
}

namespace {

CUstream_st* as_stream(int64_t stream) { return reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream)); }

void check_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                  std::vector<int64_t> shape) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda tier): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, " (cuda tier): ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (cuda tier): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, " (cuda tier): ", name, " has shape ", t.sizes(),
              ", expected ", at::IntArrayRef(shape));
}

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, op, " (cuda tier) failed: ", error);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> march_rays(const at::Tensor& origins, const at::Tensor& dirs,
                                                          const at::Tensor& t_min, const at::Tensor& t_max,
                                                          const at::Tensor& aabb, const at::Tensor& occupancy,
                                                          int64_t resolution, double step_size,
                                                          const c10::optional<at::Tensor>& jitter,
                                                          int64_t max_samples, int64_t stream_handle) {
  const char* op = "march_rays";
  const int64_t R = origins.size(0);
  check_tensor(origins, op, "origins", at::kFloat, {R, 3});
  check_tensor(dirs, op, "dirs", at::kFloat, {R, 3});
  check_tensor(t_min, op, "t_min", at::kFloat, {R});
  check_tensor(t_max, op, "t_max", at::kFloat, {R});
  check_tensor(aabb, op, "aabb", at::kFloat, {6});
  TORCH_CHECK(resolution > 0, "march_rays: resolution must be positive");
  check_tensor(occupancy, op, "occupancy", at::kBool, {resolution * resolution * resolution});
  TORCH_CHECK(step_size > 0.0, "march_rays: step_size must be positive");
  TORCH_CHECK(max_samples >= 0, "march_rays: max_samples must be >= 0");
  if (jitter.has_value()) check_tensor(*jitter, op, "jitter", at::kFloat, {R});
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
               op);
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
                 op);
  }
  return {ray_indices, t_starts, t_ends};
}

float max_optical_depth(double transmittance_threshold) {
  return static_cast<float>(-std::log(transmittance_threshold));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_forward(
    const at::Tensor& sigmas, const at::Tensor& values, const at::Tensor& t_starts, const at::Tensor& t_ends,
    const at::Tensor& ray_indices, int64_t num_rays, double transmittance_threshold, int64_t stream) {
  const char* op = "composite_forward";
  const int64_t S = sigmas.size(0);
  TORCH_CHECK(values.dim() == 2, "composite_forward: values must be [S, C]");
  const int64_t C = values.size(1);
  const int64_t R = num_rays;
  TORCH_CHECK(R >= 0, "composite_forward: num_rays must be >= 0");
  check_tensor(sigmas, op, "sigmas", at::kFloat, {S});
  check_tensor(values, op, "values", at::kFloat, {S, C});
  check_tensor(t_starts, op, "t_starts", at::kFloat, {S});
  check_tensor(t_ends, op, "t_ends", at::kFloat, {S});
  check_tensor(ray_indices, op, "ray_indices", at::kLong, {S});
  TORCH_CHECK(transmittance_threshold > 0.0, "composite_forward: transmittance_threshold must be positive");
  const c10::DeviceGuard guard(sigmas.device());
  if (S > 0) {
    const bool sorted = S == 1 || (ray_indices.slice(0, 1) >= ray_indices.slice(0, 0, S - 1)).all().item<bool>();
    const bool in_range = ray_indices[0].item<int64_t>() >= 0 && ray_indices[S - 1].item<int64_t>() < R;
    TORCH_CHECK(sorted && in_range, "composite: ray_indices must be non-decreasing and in [0, num_rays)");
  }
  // offsets[r] = first sample of ray r or later (so offsets[R] = S).
  const at::Tensor offsets = at::searchsorted(ray_indices, at::arange(R + 1, ray_indices.options()));

  const auto f32 = sigmas.options();
  at::Tensor weights = at::empty({S}, f32);
  at::Tensor accumulated = at::empty({R, C}, f32);
  at::Tensor opacity = at::empty({R, 1}, f32);
  at::Tensor depth = at::empty({R, 1}, f32);
  check_launch(lift3d_composite_forward(sigmas.data_ptr<float>(), values.data_ptr<float>(),
                                        t_starts.data_ptr<float>(), t_ends.data_ptr<float>(),
                                        offsets.data_ptr<int64_t>(), R, static_cast<int>(C),
                                        max_optical_depth(transmittance_threshold), weights.data_ptr<float>(),
                                        accumulated.data_ptr<float>(), opacity.data_ptr<float>(),
                                        depth.data_ptr<float>(), as_stream(stream)),
               op);
  return {weights, accumulated, opacity, depth, offsets};
}

std::tuple<at::Tensor, at::Tensor> composite_backward(const at::Tensor& sigmas, const at::Tensor& values,
                                                      const at::Tensor& t_starts, const at::Tensor& t_ends,
                                                      const at::Tensor& ray_offsets, const at::Tensor& grad_weights,
                                                      const at::Tensor& grad_accumulated,
                                                      const at::Tensor& grad_opacity, const at::Tensor& grad_depth,
                                                      double transmittance_threshold, int64_t stream) {
  const char* op = "composite_backward";
  const int64_t S = sigmas.size(0);
  TORCH_CHECK(values.dim() == 2, "composite_backward: values must be [S, C]");
  const int64_t C = values.size(1);
  const int64_t R = ray_offsets.size(0) - 1;
  TORCH_CHECK(R >= 0, "composite_backward: bad ray_offsets");
  check_tensor(sigmas, op, "sigmas", at::kFloat, {S});
  check_tensor(values, op, "values", at::kFloat, {S, C});
  check_tensor(t_starts, op, "t_starts", at::kFloat, {S});
  check_tensor(t_ends, op, "t_ends", at::kFloat, {S});
  check_tensor(ray_offsets, op, "ray_offsets", at::kLong, {R + 1});
  check_tensor(grad_weights, op, "grad_weights", at::kFloat, {S});
  check_tensor(grad_accumulated, op, "grad_accumulated", at::kFloat, {R, C});
  check_tensor(grad_opacity, op, "grad_opacity", at::kFloat, {R, 1});
  check_tensor(grad_depth, op, "grad_depth", at::kFloat, {R, 1});
  const c10::DeviceGuard guard(sigmas.device());
  // Every entry is written (the offsets from composite_forward cover [0, S) exactly).
  at::Tensor grad_sigmas = at::empty({S}, sigmas.options());
  at::Tensor grad_values = at::empty({S, C}, values.options());
  check_launch(lift3d_composite_backward(sigmas.data_ptr<float>(), values.data_ptr<float>(),
                                         t_starts.data_ptr<float>(), t_ends.data_ptr<float>(),
                                         ray_offsets.data_ptr<int64_t>(), R, static_cast<int>(C),
                                         max_optical_depth(transmittance_threshold), grad_weights.data_ptr<float>(),
                                         grad_accumulated.data_ptr<float>(), grad_opacity.data_ptr<float>(),
                                         grad_depth.data_ptr<float>(), grad_sigmas.data_ptr<float>(),
                                         grad_values.data_ptr<float>(), as_stream(stream)),
               op);
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
      "Tensor opacity, Tensor depth, Tensor ray_offsets)",
      &composite_forward);
  m.def(
      "composite_backward(Tensor sigmas, Tensor values, Tensor t_starts, Tensor t_ends, Tensor ray_offsets, "
      "Tensor grad_weights, Tensor grad_accumulated, Tensor grad_opacity, Tensor grad_depth, "
      "float transmittance_threshold, int stream) -> (Tensor grad_sigmas, Tensor grad_values)",
      &composite_backward);
}
