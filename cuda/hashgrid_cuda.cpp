// Torch binding of the cuda-tier hash-grid encoding (cuda/hashgrid.cu). Only torch headers here
// (DESIGN §3); the stream comes from Python (torch.cuda.current_stream().cuda_stream).

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

struct CUstream_st;

extern "C" {
int lift3d_hashgrid_max_levels();
const char* lift3d_hashgrid_forward(const float* positions, const float* table, float* out, int64_t N, int D, int F,
                                    const float* scales, const int64_t* resolutions, const int64_t* sizes,
                                    const int64_t* offsets, const uint8_t* hashed, int L, int active,
                                    CUstream_st* stream);
const char* lift3d_hashgrid_backward(const float* grad, const float* positions, const float* table, float* grad_table,
                                     float* grad_positions, int64_t N, int D, int F, const float* scales,
                                     const int64_t* resolutions, const int64_t* sizes, const int64_t* offsets,
                                     const uint8_t* hashed, int L, int active, CUstream_st* stream);
}

namespace {

CUstream_st* as_stream(int64_t stream) { return reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream)); }

// Host copies of the level metadata in the launchers' form.
struct Levels {
  std::vector<float> scales;
  std::vector<int64_t> resolutions, sizes, offsets;
  std::vector<uint8_t> hashed;
  int count() const { return static_cast<int>(scales.size()); }
};

Levels make_levels(c10::ArrayRef<double> scales, at::IntArrayRef resolutions, at::IntArrayRef offsets,
                   at::IntArrayRef hashed, int64_t table_rows) {
  const size_t L = scales.size();
  TORCH_CHECK(L >= 1 && static_cast<int>(L) <= lift3d_hashgrid_max_levels(), "hashgrid (cuda tier): 1 to ",
              lift3d_hashgrid_max_levels(), " levels are supported, got ", L);
  TORCH_CHECK(resolutions.size() == L && hashed.size() == L && offsets.size() == L + 1,
              "hashgrid (cuda tier): expected L scales, resolutions and hashed flags and L + 1 offsets");
  TORCH_CHECK(offsets[L] == table_rows, "hashgrid (cuda tier): table has ", table_rows, " rows, levels need ",
              offsets[L]);
  Levels levels;
  for (size_t l = 0; l < L; ++l) {
    const int64_t size = offsets[l + 1] - offsets[l];
    TORCH_CHECK(size >= 1 && size <= (int64_t{1} << 31), "hashgrid (cuda tier): level ", l, " has bad size ", size);
    TORCH_CHECK(resolutions[l] >= 1 && resolutions[l] < (int64_t{1} << 31), "hashgrid (cuda tier): bad resolution");
    const float scale = static_cast<float>(scales[l]);
    // Keeps x * scale + 0.5 + 1 within int32 / uint32 corner arithmetic.
    TORCH_CHECK(std::isfinite(scale) && scale >= 0.0f && scale < 1e9f, "hashgrid (cuda tier): bad scale ",
                scales[l]);
    levels.scales.push_back(scale);
    levels.resolutions.push_back(resolutions[l]);
    levels.sizes.push_back(size);
    levels.offsets.push_back(offsets[l]);
    levels.hashed.push_back(hashed[l] != 0 ? 1 : 0);
  }
  return levels;
}

void check_inputs(const at::Tensor& positions, const at::Tensor& table) {
  TORCH_CHECK(positions.is_cuda() && table.is_cuda() && positions.device() == table.device(),
              "hashgrid (cuda tier): positions and table must be CUDA tensors on one device");
  TORCH_CHECK(positions.scalar_type() == at::kFloat && table.scalar_type() == at::kFloat,
              "hashgrid (cuda tier): positions and table must be float32, got ", positions.scalar_type(), " and ",
              table.scalar_type());
  TORCH_CHECK(positions.is_contiguous() && table.is_contiguous(), "hashgrid (cuda tier): inputs must be contiguous");
  TORCH_CHECK(positions.dim() == 2 && (positions.size(1) == 3 || positions.size(1) == 4),
              "hashgrid (cuda tier): positions must be [N, 3] or [N, 4], got ", positions.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) >= 1, "hashgrid (cuda tier): table must be [rows, F], got ",
              table.sizes());
}

at::Tensor hashgrid_forward(const at::Tensor& positions, const at::Tensor& table, c10::ArrayRef<double> scales,
                            at::IntArrayRef resolutions, at::IntArrayRef offsets, at::IntArrayRef hashed,
                            int64_t active_levels, int64_t stream) {
  check_inputs(positions, table);
  const Levels lv = make_levels(scales, resolutions, offsets, hashed, table.size(0));
  const int64_t L = lv.count();
  TORCH_CHECK(active_levels >= 0 && active_levels <= L, "hashgrid (cuda tier): active_levels out of range");
  const c10::DeviceGuard guard(positions.device());
  const int64_t N = positions.size(0), D = positions.size(1), F = table.size(1);
  at::Tensor out = at::zeros({N, L * F}, positions.options());  // inactive levels stay zero
  const char* error = lift3d_hashgrid_forward(positions.data_ptr<float>(), table.data_ptr<float>(),
                                              out.data_ptr<float>(), N, static_cast<int>(D), static_cast<int>(F),
                                              lv.scales.data(), lv.resolutions.data(), lv.sizes.data(),
                                              lv.offsets.data(), lv.hashed.data(), static_cast<int>(L),
                                              static_cast<int>(active_levels), as_stream(stream));
  TORCH_CHECK(error == nullptr, "hashgrid_forward (cuda tier) failed: ", error);
  return out;
}

std::tuple<at::Tensor, at::Tensor> hashgrid_backward(const at::Tensor& grad_features, const at::Tensor& positions,
                                                     const at::Tensor& table, c10::ArrayRef<double> scales,
                                                     at::IntArrayRef resolutions, at::IntArrayRef offsets,
                                                     at::IntArrayRef hashed, int64_t active_levels, bool need_table,
                                                     bool need_positions, int64_t stream) {
  check_inputs(positions, table);
  const Levels lv = make_levels(scales, resolutions, offsets, hashed, table.size(0));
  const int64_t L = lv.count();
  TORCH_CHECK(active_levels >= 0 && active_levels <= L, "hashgrid (cuda tier): active_levels out of range");
  const int64_t N = positions.size(0), D = positions.size(1), F = table.size(1);
  TORCH_CHECK(grad_features.is_cuda() && grad_features.scalar_type() == at::kFloat && grad_features.is_contiguous() &&
                  grad_features.dim() == 2 && grad_features.size(0) == N && grad_features.size(1) == L * F,
              "hashgrid (cuda tier): grad_features must be contiguous float32 CUDA [N, L*F], got ",
              grad_features.sizes());
  const c10::DeviceGuard guard(positions.device());
  at::Tensor grad_table = need_table ? at::zeros_like(table) : at::empty({0}, table.options());
  // Every row is written by the kernel (zeros when no level is active).
  at::Tensor grad_positions = need_positions ? at::empty({N, D}, positions.options()) : at::empty({0}, positions.options());
  const char* error = lift3d_hashgrid_backward(
      grad_features.data_ptr<float>(), positions.data_ptr<float>(), table.data_ptr<float>(),
      need_table ? grad_table.data_ptr<float>() : nullptr, need_positions ? grad_positions.data_ptr<float>() : nullptr,
      N, static_cast<int>(D), static_cast<int>(F), lv.scales.data(), lv.resolutions.data(), lv.sizes.data(),
      lv.offsets.data(), lv.hashed.data(), static_cast<int>(L), static_cast<int>(active_levels), as_stream(stream));
  TORCH_CHECK(error == nullptr, "hashgrid_backward (cuda tier) failed: ", error);
  return {grad_table, grad_positions};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cuda, m) {
  m.def(
      "hashgrid_forward(Tensor positions, Tensor table, float[] scales, int[] resolutions, int[] offsets, "
      "int[] hashed, int active_levels, int stream) -> Tensor",
      &hashgrid_forward);
  m.def(
      "hashgrid_backward(Tensor grad_features, Tensor positions, Tensor table, float[] scales, int[] resolutions, "
      "int[] offsets, int[] hashed, int active_levels, bool need_table, bool need_positions, int stream) -> "
      "(Tensor grad_table, Tensor grad_positions)",
      &hashgrid_backward);
}
