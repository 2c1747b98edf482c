// Torch binding of the cuda-tier Gaussian rasterizer (cuda/gaussian_raster.cu). Only torch headers
// here (DESIGN §3); the kernels are reached through their extern "C" launchers, and the stream
// comes from Python (torch.cuda.current_stream().cuda_stream) as an integer.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

struct CUstream_st;

extern "C" {
const char* lift3d_gs_count_tiles(const float* means, const int32_t* radii, int64_t BN, int tiles_x, int tiles_y,
                                  int64_t* counts, CUstream_st* stream);
const char* lift3d_gs_emit_keys(const float* means, const float* depths, const int32_t* radii,
                                const int64_t* inclusive_counts, int64_t BN, int64_t N, int tiles_x, int tiles_y,
                                uint64_t* keys, int32_t* ids, CUstream_st* stream);
const char* lift3d_gs_sort_keys(void* temp, size_t* temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                                const int32_t* ids_in, int32_t* ids_out, int E, int end_bit, CUstream_st* stream);
const char* lift3d_gs_tile_ranges(const uint64_t* keys, int64_t E, int64_t BT, int64_t* offsets,
                                  CUstream_st* stream);
const char* lift3d_gs_rasterize_forward(const float* means, const float* conics, const float* colors,
                                        const float* opacities, const float* depths, const int64_t* tile_offsets,
                                        const int32_t* tile_ids, int64_t B, int64_t N, int C, int W, int H,
                                        int tiles_x, int tiles_y, float* rgb, float* alpha, float* depth,
                                        double* final_t, int32_t* n_contrib, CUstream_st* stream);
const char* lift3d_gs_rasterize_backward(const float* means, const float* conics, const float* colors,
                                         const float* opacities, const float* depths, const double* final_t,
                                         const int32_t* n_contrib, const int64_t* tile_offsets,
                                         const int32_t* tile_ids, const float* grad_rgb, const float* grad_alpha,
                                         const float* grad_depth, float* scratch, int64_t B, int64_t N, int C, int W,
                                         int H, int tiles_x, int tiles_y, float* d_means, float* d_conics,
                                         float* d_colors, float* d_opacities, float* d_depths, CUstream_st* stream);
}

namespace {

constexpr int64_t kTile = 16;

CUstream_st* as_stream(int64_t stream) { return reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream)); }

void check_launch(const char* error, const char* what) {
  TORCH_CHECK(error == nullptr, "gaussian_rasterize (cuda tier): ", what, " failed: ", error);
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.is_cuda(), "gaussian_rasterize (cuda tier): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "gaussian_rasterize (cuda tier): ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "gaussian_rasterize (cuda tier): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "gaussian_rasterize (cuda tier): ", name, " has shape ",
              t.sizes(), ", expected ", at::IntArrayRef(shape));
}

struct Grid {
  int64_t tiles_x, tiles_y;
  int64_t tiles() const { return tiles_x * tiles_y; }
};

Grid make_grid(int64_t width, int64_t height, int64_t B) {
  TORCH_CHECK(width >= 0 && height >= 0, "gaussian_rasterize: negative image size");
  const Grid grid{(width + kTile - 1) / kTile, (height + kTile - 1) / kTile};
  TORCH_CHECK(B * grid.tiles() < (int64_t{1} << 31) && B < 65536,
              "gaussian_rasterize (cuda tier): too many cameras x tiles");
  return grid;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gaussian_rasterize_forward(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors,
                           const at::Tensor& opacities, const at::Tensor& depths, const at::Tensor& radii,
                           int64_t width, int64_t height, int64_t stream_handle) {
  TORCH_CHECK(colors.dim() == 3 && colors.size(2) >= 1, "gaussian_rasterize: colors must be [B, N, C]");
  const int64_t B = colors.size(0), N = colors.size(1), C = colors.size(2);
  check_tensor(means2d, "means2d", at::kFloat, {B, N, 2});
  check_tensor(conics, "conics", at::kFloat, {B, N, 3});
  check_tensor(colors, "colors", at::kFloat, {B, N, C});
  check_tensor(opacities, "opacities", at::kFloat, {B, N});
  check_tensor(depths, "depths", at::kFloat, {B, N});
  check_tensor(radii, "radii", at::kInt, {B, N});
  const c10::DeviceGuard guard(colors.device());
  const Grid grid = make_grid(width, height, B);
  const int64_t H = height, W = width, T = grid.tiles();
  CUstream_st* stream = as_stream(stream_handle);
  const int tx = static_cast<int>(grid.tiles_x), ty = static_cast<int>(grid.tiles_y);

  const auto f32 = colors.options();
  at::Tensor rgb = at::zeros({B, H, W, C}, f32);
  at::Tensor alpha = at::zeros({B, H, W, 1}, f32);
  at::Tensor depth = at::zeros({B, H, W, 1}, f32);
  at::Tensor final_t = at::ones({B, H, W}, f32.dtype(at::kDouble));
  at::Tensor n_contrib = at::zeros({B, H, W}, f32.dtype(at::kInt));
  at::Tensor tile_offsets = at::zeros({B * T + 1}, f32.dtype(at::kLong));
  at::Tensor tile_ids = at::empty({0}, f32.dtype(at::kInt));
  if (B * N == 0 || T == 0) return {rgb, alpha, depth, final_t, n_contrib, tile_offsets, tile_ids};

  at::Tensor counts = at::empty({B * N}, f32.dtype(at::kLong));
  check_launch(lift3d_gs_count_tiles(means2d.data_ptr<float>(), radii.data_ptr<int32_t>(), B * N, tx, ty,
                                     counts.data_ptr<int64_t>(), stream),
               "count_tiles");
  const at::Tensor inclusive = counts.cumsum(0);
  const int64_t E = inclusive[B * N - 1].item<int64_t>();
  if (E == 0) return {rgb, alpha, depth, final_t, n_contrib, tile_offsets, tile_ids};
  TORCH_CHECK(E < (int64_t{1} << 31), "gaussian_rasterize (cuda tier): ", E, " (Gaussian, tile) pairs is too many");

  at::Tensor keys = at::empty({E}, f32.dtype(at::kLong));
  at::Tensor ids = at::empty({E}, f32.dtype(at::kInt));
  check_launch(lift3d_gs_emit_keys(means2d.data_ptr<float>(), depths.data_ptr<float>(), radii.data_ptr<int32_t>(),
                                   inclusive.data_ptr<int64_t>(), B * N, N, tx, ty,
                                   reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()), ids.data_ptr<int32_t>(),
                                   stream),
               "emit_keys");
  int tile_bits = 0;
  while ((int64_t{1} << tile_bits) < B * T) ++tile_bits;
  at::Tensor sorted_keys = at::empty_like(keys);
  tile_ids = at::empty_like(ids);
  size_t temp_bytes = 0;
  const uint64_t* keys_in = reinterpret_cast<const uint64_t*>(keys.data_ptr<int64_t>());
  uint64_t* keys_out = reinterpret_cast<uint64_t*>(sorted_keys.data_ptr<int64_t>());
  check_launch(lift3d_gs_sort_keys(nullptr, &temp_bytes, keys_in, keys_out, ids.data_ptr<int32_t>(),
                                   tile_ids.data_ptr<int32_t>(), static_cast<int>(E), 32 + tile_bits, stream),
               "sort (size query)");
  // At least one byte: a null temp pointer would make CUB answer the size query again instead of sorting.
  at::Tensor temp = at::empty({std::max<int64_t>(static_cast<int64_t>(temp_bytes), 1)}, f32.dtype(at::kByte));
  check_launch(lift3d_gs_sort_keys(temp.data_ptr(), &temp_bytes, keys_in, keys_out, ids.data_ptr<int32_t>(),
                                   tile_ids.data_ptr<int32_t>(), static_cast<int>(E), 32 + tile_bits, stream),
               "sort");
  check_launch(lift3d_gs_tile_ranges(keys_out, E, B * T, tile_offsets.data_ptr<int64_t>(), stream), "tile_ranges");
  check_launch(lift3d_gs_rasterize_forward(means2d.data_ptr<float>(), conics.data_ptr<float>(),
                                           colors.data_ptr<float>(), opacities.data_ptr<float>(),
                                           depths.data_ptr<float>(), tile_offsets.data_ptr<int64_t>(),
                                           tile_ids.data_ptr<int32_t>(), B, N, static_cast<int>(C),
                                           static_cast<int>(W), static_cast<int>(H), tx, ty, rgb.data_ptr<float>(),
                                           alpha.data_ptr<float>(), depth.data_ptr<float>(),
                                           final_t.data_ptr<double>(), n_contrib.data_ptr<int32_t>(), stream),
               "rasterize_forward");
  return {rgb, alpha, depth, final_t, n_contrib, tile_offsets, tile_ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_rasterize_backward(
    const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors, const at::Tensor& opacities,
    const at::Tensor& depths, const at::Tensor& final_t, const at::Tensor& n_contrib,
    const at::Tensor& tile_offsets, const at::Tensor& tile_ids, const at::Tensor& grad_rgb,
    const at::Tensor& grad_alpha, const at::Tensor& grad_depth, int64_t width, int64_t height,
    int64_t stream_handle) {
  TORCH_CHECK(colors.dim() == 3 && colors.size(2) >= 1, "gaussian_rasterize: colors must be [B, N, C]");
  const int64_t B = colors.size(0), N = colors.size(1), C = colors.size(2);
  const Grid grid = make_grid(width, height, B);
  const int64_t H = height, W = width, T = grid.tiles();
  check_tensor(means2d, "means2d", at::kFloat, {B, N, 2});
  check_tensor(conics, "conics", at::kFloat, {B, N, 3});
  check_tensor(colors, "colors", at::kFloat, {B, N, C});
  check_tensor(opacities, "opacities", at::kFloat, {B, N});
  check_tensor(depths, "depths", at::kFloat, {B, N});
  check_tensor(final_t, "final_t", at::kDouble, {B, H, W});
  check_tensor(n_contrib, "n_contrib", at::kInt, {B, H, W});
  check_tensor(tile_offsets, "tile_offsets", at::kLong, {B * T + 1});
  TORCH_CHECK(tile_ids.is_cuda() && tile_ids.scalar_type() == at::kInt && tile_ids.is_contiguous() &&
                  tile_ids.dim() == 1,
              "gaussian_rasterize_backward: tile_ids must come from gaussian_rasterize_forward");
  check_tensor(grad_rgb, "grad_rgb", at::kFloat, {B, H, W, C});
  check_tensor(grad_alpha, "grad_alpha", at::kFloat, {B, H, W, 1});
  check_tensor(grad_depth, "grad_depth", at::kFloat, {B, H, W, 1});
  const c10::DeviceGuard guard(colors.device());

  const auto f32 = colors.options();
  at::Tensor d_means = at::zeros({B, N, 2}, f32);
  at::Tensor d_conics = at::zeros({B, N, 3}, f32);
  at::Tensor d_colors = at::zeros({B, N, C}, f32);
  at::Tensor d_opac = at::zeros({B, N}, f32);
  at::Tensor d_depths = at::zeros({B, N}, f32);
  if (tile_ids.numel() == 0 || B * H * W == 0) return {d_means, d_conics, d_colors, d_opac, d_depths};
  // The kernel keeps C <= 4 channels in registers; other counts use 2 C floats of scratch per pixel.
  at::Tensor scratch = C <= 4 ? at::empty({0}, f32) : at::empty({B * H * W * 2 * C}, f32);
  check_launch(lift3d_gs_rasterize_backward(
                   means2d.data_ptr<float>(), conics.data_ptr<float>(), colors.data_ptr<float>(),
                   opacities.data_ptr<float>(), depths.data_ptr<float>(), final_t.data_ptr<double>(),
                   n_contrib.data_ptr<int32_t>(), tile_offsets.data_ptr<int64_t>(), tile_ids.data_ptr<int32_t>(),
                   grad_rgb.data_ptr<float>(), grad_alpha.data_ptr<float>(), grad_depth.data_ptr<float>(),
                   C <= 4 ? nullptr : scratch.data_ptr<float>(), B, N, static_cast<int>(C), static_cast<int>(W),
                   static_cast<int>(H), static_cast<int>(grid.tiles_x), static_cast<int>(grid.tiles_y),
                   d_means.data_ptr<float>(), d_conics.data_ptr<float>(), d_colors.data_ptr<float>(),
                   d_opac.data_ptr<float>(), d_depths.data_ptr<float>(), as_stream(stream_handle)),
               "rasterize_backward");
  return {d_means, d_conics, d_colors, d_opac, d_depths};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cuda, m) {
  m.def(
      "gaussian_rasterize_forward(Tensor means2d, Tensor conics, Tensor colors, Tensor opacities, Tensor depths, "
      "Tensor radii, int width, int height, int stream) -> (Tensor rgb, Tensor alpha, Tensor depth, "
      "Tensor final_t, Tensor n_contrib, Tensor tile_offsets, Tensor tile_ids)",
      &gaussian_rasterize_forward);
  m.def(
      "gaussian_rasterize_backward(Tensor means2d, Tensor conics, Tensor colors, Tensor opacities, Tensor depths, "
      "Tensor final_t, Tensor n_contrib, Tensor tile_offsets, Tensor tile_ids, Tensor grad_rgb, "
      "Tensor grad_alpha, Tensor grad_depth, int width, int height, int stream) -> (Tensor d_means2d, "
      "Tensor d_conics, Tensor d_colors, Tensor d_opacities, Tensor d_depths)",
      &gaussian_rasterize_backward);
}
