// Gaussian splat rasterization, cpu tier (C++/OpenMP) with a hand-written backward.
//
// Semantics: lift3d/kernels/gaussian_raster.py (the reference tier is the definition). Per pixel
// centre p = (x + 0.5, y + 0.5), Gaussians with radius > 0 in stable depth order:
//   power = -0.5 (a dx^2 + c dy^2) - b dx dy   (skip if power > 0)
//   alpha = min(0.99, opacity exp(power))     (skip if alpha < 1/255)
//   stop if T (1 - alpha) < 1e-4; else blend and T *= 1 - alpha.
//
// Layout: 16x16 tiles; each Gaussian is binned into the tiles its square (mean +- radius) touches.
// Gaussians are stable-sorted by depth once per camera and binned in that order, so every tile's
// list is already in (depth, index) order. One OpenMP work item per tile.
//
// Determinism: every tile is processed by one thread in a fixed pixel order; the backward writes
// per-(tile, entry) partial gradients and reduces them serially per camera in tile order. No float
// atomics, so results are bit-identical run to run and for any thread count.
//
// Transmittance is carried in double: the reference's torch.cumprod accumulates float products in
// double, so the early-stop decisions agree (up to exp() rounding), and the backward recovers T by
// division (T_i = T_{i+1} / (1 - alpha_i), as 3DGS does) without float drift.
//
// Tile binning trusts the radii: the reference looks at every Gaussian with radius > 0 at every
// pixel, so the tiers agree when radius bounds the alpha >= 1/255 footprint (3.33 sigma, as
// project_gaussians computes it).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int kTile = 16;
constexpr float kAlphaMax = 0.99f;
// Same float32 constants torch uses when comparing a float tensor with the Python scalars.
const float kAlphaMin = static_cast<float>(1.0 / 255.0);
const float kTransmittanceMin = static_cast<float>(1e-4);

struct Splat {
  float mx, my, a, b, c, opacity;
  float power_floor;  // below this power alpha < 1/255 for sure: skips exp() for far pixels
};

struct Eval {
  float dx, dy, power, gauss, raw, alpha;
};

inline bool evaluate(const Splat& s, float px, float py, Eval& e) {
  e.dx = s.mx - px;
  e.dy = s.my - py;
  e.power = -0.5f * (s.a * e.dx * e.dx + s.c * e.dy * e.dy) - s.b * e.dx * e.dy;
  if (!(e.power <= 0.0f)) return false;  // also rejects NaN
  if (e.power < s.power_floor) return false;
  e.gauss = std::exp(e.power);
  e.raw = s.opacity * e.gauss;
  e.alpha = e.raw > kAlphaMax ? kAlphaMax : e.raw;  // NaN propagates, like torch.clamp
  return e.alpha >= kAlphaMin;  // also rejects NaN
}

// Gaussians are evaluated in fixed chunks of a tile's list by this one out-of-line function, and
// the backward re-evaluates exactly the forward's chunks. So the backward sees bit-identical
// alphas whatever the compiler does (FMA contraction under -march=native, vectorised loop bodies
// vs scalar epilogues), which its recovery of T by division relies on.
constexpr int64_t kChunk = 32;

#if defined(__GNUC__) && !defined(__clang__)
#define LIFT3D_ONE_COPY __attribute__((noinline, noipa))
#else
#define LIFT3D_ONE_COPY __attribute__((noinline))
#endif

// Evaluates splats[0, n) at (px, py); stores the ones that pass (alpha >= 1/255) compactly in
// evals / index (positions within the chunk) and returns how many passed.
LIFT3D_ONE_COPY int64_t evaluate_chunk(const Splat* splats, int64_t n, float px, float py, Eval* evals,
                                       int32_t* index) {
  int64_t k = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (evaluate(splats[j], px, py, evals[k])) index[k++] = static_cast<int32_t>(j);
  }
  return k;
}

Splat make_splat(const float* mean, const float* conic, float opacity) {
  Splat s;
  s.mx = mean[0];
  s.my = mean[1];
  s.a = conic[0];
  s.b = conic[1];
  s.c = conic[2];
  s.opacity = opacity;
  // exp(power) <= e^-0.001 * (1/255) / opacity < 1/255 / opacity: a margin far above exp's ulp error.
  s.power_floor = static_cast<float>(std::log(static_cast<double>(kAlphaMin) / opacity) - 1e-3);
  if (std::isnan(s.power_floor)) s.power_floor = -std::numeric_limits<float>::infinity();
  return s;
}

struct Grid {
  int64_t width, height, tiles_x, tiles_y;
  int64_t tiles() const { return tiles_x * tiles_y; }
};

Grid make_grid(int64_t width, int64_t height) {
  TORCH_CHECK(width >= 0 && height >= 0, "gaussian_rasterize: negative image size");
  return Grid{width, height, (width + kTile - 1) / kTile, (height + kTile - 1) / kTile};
}

// Inclusive tile range [lo, hi] touched by [centre - radius, centre + radius]; false if none.
// A pixel x is reached iff x + 0.5 lies in the interval; one extra pixel of slack is harmless.
bool tile_range(float centre, float radius, int64_t tiles, int64_t& lo, int64_t& hi) {
  const double low = std::floor((static_cast<double>(centre) - radius - 1.0) / kTile);
  const double high = std::floor((static_cast<double>(centre) + radius) / kTile);
  if (!(high >= 0.0) || !(low <= static_cast<double>(tiles - 1))) return false;  // also NaN
  lo = static_cast<int64_t>(std::max(low, 0.0));
  hi = static_cast<int64_t>(std::min(high, static_cast<double>(tiles - 1)));
  return true;
}

void check_float(const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), "gaussian_rasterize (cpu tier): ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "gaussian_rasterize (cpu tier): ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "gaussian_rasterize (cpu tier): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "gaussian_rasterize (cpu tier): ", name,
              " has shape ", t.sizes(), ", expected ", at::IntArrayRef(shape));
}

// Stable depth order per camera (ties by index, NaN last like torch.sort), binned into tiles.
void bin_gaussians(const float* means, const float* depths, const int32_t* radii, int64_t B, int64_t N,
                   const Grid& grid, std::vector<int64_t>& offsets, std::vector<int32_t>& ids) {
  const int64_t T = grid.tiles();
  std::vector<int64_t> counts(B * T + 1, 0);
  std::vector<int32_t> order(B * N);
  std::vector<int64_t> rect(B * N * 4);  // x_lo, x_hi, y_lo, y_hi; x_lo = -1 marks "not binned"

#pragma omp parallel for schedule(static) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    const float* z = depths + b * N;
    int32_t* o = order.data() + b * N;
    for (int64_t i = 0; i < N; ++i) o[i] = static_cast<int32_t>(i);
    std::sort(o, o + N, [z](int32_t i, int32_t j) {
      const bool ni = std::isnan(z[i]), nj = std::isnan(z[j]);
      if (ni != nj) return nj;
      if (!ni && z[i] != z[j]) return z[i] < z[j];
      return i < j;
    });
  }
  for (int64_t bn = 0; bn < B * N; ++bn) {
    int64_t* r = rect.data() + 4 * bn;
    r[0] = -1;
    if (radii[bn] <= 0) continue;
    const float radius = static_cast<float>(radii[bn]);
    if (!tile_range(means[2 * bn], radius, grid.tiles_x, r[0], r[1]) ||
        !tile_range(means[2 * bn + 1], radius, grid.tiles_y, r[2], r[3])) {
      r[0] = -1;
      continue;
    }
    const int64_t base = (bn / std::max<int64_t>(N, 1)) * T;
    for (int64_t ty = r[2]; ty <= r[3]; ++ty)
      for (int64_t tx = r[0]; tx <= r[1]; ++tx) ++counts[base + ty * grid.tiles_x + tx + 1];
  }
  offsets.assign(B * T + 1, 0);
  for (int64_t t = 0; t < B * T; ++t) offsets[t + 1] = offsets[t] + counts[t + 1];
  ids.resize(offsets[B * T]);
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < N; ++k) {  // depth order, so every tile list comes out sorted
      const int32_t g = order[b * N + k];
      const int64_t* r = rect.data() + 4 * (b * N + g);
      if (r[0] < 0) continue;
      for (int64_t ty = r[2]; ty <= r[3]; ++ty)
        for (int64_t tx = r[0]; tx <= r[1]; ++tx) ids[cursor[b * T + ty * grid.tiles_x + tx]++] = g;
    }
  }
}

// A tile's Gaussians gathered contiguously (colour channels and depth interleaved, depth last).
struct TileData {
  std::vector<Splat> splats;
  std::vector<float> features;  // [count, C + 1]

  void gather(const int32_t* ids, int64_t count, const float* means, const float* conics,
              const float* colors, const float* opacities, const float* depths, int64_t C) {
    splats.resize(count);
    features.resize(count * (C + 1));
    for (int64_t j = 0; j < count; ++j) {
      const int64_t g = ids[j];
      splats[j] = make_splat(means + 2 * g, conics + 3 * g, opacities[g]);
      float* f = features.data() + j * (C + 1);
      for (int64_t ch = 0; ch < C; ++ch) f[ch] = colors[g * C + ch];
      f[C] = depths[g];
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gaussian_rasterize_forward(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors,
                           const at::Tensor& opacities, const at::Tensor& depths, const at::Tensor& radii,
                           int64_t width, int64_t height) {
  TORCH_CHECK(colors.dim() == 3 && colors.size(2) >= 1, "gaussian_rasterize: colors must be [B, N, C]");
  const int64_t B = colors.size(0), N = colors.size(1), C = colors.size(2);
  check_float(means2d, "means2d", {B, N, 2});
  check_float(conics, "conics", {B, N, 3});
  check_float(colors, "colors", {B, N, C});
  check_float(opacities, "opacities", {B, N});
  check_float(depths, "depths", {B, N});
  TORCH_CHECK(radii.scalar_type() == at::kInt && radii.is_contiguous() && radii.device().is_cpu() &&
                  radii.sizes() == at::IntArrayRef({B, N}),
              "gaussian_rasterize (cpu tier): radii must be a contiguous int32 [B, N] CPU tensor");
  const Grid grid = make_grid(width, height);
  const int64_t H = height, W = width, T = grid.tiles();

  std::vector<int64_t> offsets;
  std::vector<int32_t> ids;
  bin_gaussians(means2d.data_ptr<float>(), depths.data_ptr<float>(), radii.data_ptr<int32_t>(), B, N, grid,
                offsets, ids);

  const auto f32 = colors.options();
  at::Tensor rgb = at::zeros({B, H, W, C}, f32);
  at::Tensor alpha = at::zeros({B, H, W, 1}, f32);
  at::Tensor depth = at::zeros({B, H, W, 1}, f32);
  at::Tensor final_t = at::ones({B, H, W}, f32.dtype(at::kDouble));
  at::Tensor n_contrib = at::zeros({B, H, W}, f32.dtype(at::kInt));
  at::Tensor tile_offsets = at::from_blob(offsets.data(), {B * T + 1}, at::kLong).clone();
  at::Tensor tile_ids = at::from_blob(ids.data(), {static_cast<int64_t>(ids.size())}, at::kInt).clone();

  const float* p_means = means2d.data_ptr<float>();
  const float* p_conics = conics.data_ptr<float>();
  const float* p_colors = colors.data_ptr<float>();
  const float* p_opac = opacities.data_ptr<float>();
  const float* p_depths = depths.data_ptr<float>();
  float* p_rgb = rgb.data_ptr<float>();
  float* p_alpha = alpha.data_ptr<float>();
  float* p_depth = depth.data_ptr<float>();
  double* p_final = final_t.data_ptr<double>();
  int32_t* p_contrib = n_contrib.data_ptr<int32_t>();

#pragma omp parallel if (B * T > 1)
  {
    TileData tile;
    std::vector<float> acc(C + 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bt = 0; bt < B * T; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const int64_t start = offsets[bt], count = offsets[bt + 1] - start;
      const int64_t x0 = (t % grid.tiles_x) * kTile, y0 = (t / grid.tiles_x) * kTile;
      const int64_t x1 = std::min(x0 + kTile, W), y1 = std::min(y0 + kTile, H);
      if (count == 0) continue;  // outputs are already "nothing drawn"
      tile.gather(ids.data() + start, count, p_means + b * N * 2, p_conics + b * N * 3, p_colors + b * N * C,
                  p_opac + b * N, p_depths + b * N, C);
      for (int64_t y = y0; y < y1; ++y) {
        for (int64_t x = x0; x < x1; ++x) {
          const float px = static_cast<float>(x) + 0.5f, py = static_cast<float>(y) + 0.5f;
          std::fill(acc.begin(), acc.end(), 0.0f);
          double trans = 1.0;
          int32_t last = 0;
          bool done = false;
          Eval evals[kChunk];
          int32_t index[kChunk];
          for (int64_t j0 = 0; j0 < count && !done; j0 += kChunk) {
            const int64_t passed =
                evaluate_chunk(tile.splats.data() + j0, std::min(kChunk, count - j0), px, py, evals, index);
            for (int64_t q = 0; q < passed; ++q) {
              const Eval& e = evals[q];
              const double next = trans * static_cast<double>(1.0f - e.alpha);
              if (static_cast<float>(next) < kTransmittanceMin) {
                done = true;
                break;
              }
              const int64_t j = j0 + index[q];
              const float weight = e.alpha * static_cast<float>(trans);
              const float* f = tile.features.data() + j * (C + 1);
              for (int64_t ch = 0; ch <= C; ++ch) acc[ch] += weight * f[ch];
              trans = next;
              last = static_cast<int32_t>(j + 1);
            }
          }
          const int64_t pix = (b * H + y) * W + x;
          for (int64_t ch = 0; ch < C; ++ch) p_rgb[pix * C + ch] = acc[ch];
          p_depth[pix] = acc[C];
          p_alpha[pix] = 1.0f - static_cast<float>(trans);
          p_final[pix] = trans;
          p_contrib[pix] = last;
        }
      }
    }
  }
  return {rgb, alpha, depth, final_t, n_contrib, tile_offsets, tile_ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_rasterize_backward(
    const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& colors, const at::Tensor& opacities,
    const at::Tensor& depths, const at::Tensor& final_t, const at::Tensor& n_contrib,
    const at::Tensor& tile_offsets, const at::Tensor& tile_ids, const at::Tensor& grad_rgb,
    const at::Tensor& grad_alpha, const at::Tensor& grad_depth, int64_t width, int64_t height) {
  TORCH_CHECK(colors.dim() == 3 && colors.size(2) >= 1, "gaussian_rasterize: colors must be [B, N, C]");
  const int64_t B = colors.size(0), N = colors.size(1), C = colors.size(2);
  const Grid grid = make_grid(width, height);
  const int64_t H = height, W = width, T = grid.tiles();
  check_float(means2d, "means2d", {B, N, 2});
  check_float(conics, "conics", {B, N, 3});
  check_float(colors, "colors", {B, N, C});
  check_float(opacities, "opacities", {B, N});
  check_float(depths, "depths", {B, N});
  check_float(grad_rgb, "grad_rgb", {B, H, W, C});
  check_float(grad_alpha, "grad_alpha", {B, H, W, 1});
  check_float(grad_depth, "grad_depth", {B, H, W, 1});
  TORCH_CHECK(final_t.scalar_type() == at::kDouble && final_t.is_contiguous() && final_t.numel() == B * H * W,
              "gaussian_rasterize_backward: final_t must come from gaussian_rasterize_forward");
  TORCH_CHECK(n_contrib.scalar_type() == at::kInt && n_contrib.is_contiguous() && n_contrib.numel() == B * H * W,
              "gaussian_rasterize_backward: n_contrib must come from gaussian_rasterize_forward");
  TORCH_CHECK(tile_offsets.scalar_type() == at::kLong && tile_offsets.is_contiguous() &&
                  tile_offsets.numel() == B * T + 1,
              "gaussian_rasterize_backward: tile_offsets must come from gaussian_rasterize_forward");
  TORCH_CHECK(tile_ids.scalar_type() == at::kInt && tile_ids.is_contiguous(),
              "gaussian_rasterize_backward: tile_ids must come from gaussian_rasterize_forward");

  const int64_t* offsets = tile_offsets.data_ptr<int64_t>();
  const int32_t* ids = tile_ids.data_ptr<int32_t>();
  const int64_t E = offsets[B * T];
  TORCH_CHECK(tile_ids.numel() == E, "gaussian_rasterize_backward: tile_ids/tile_offsets mismatch");
  // Per entry: d mean (2), d conic (3), d opacity (1), d colour (C), d depth (1).
  const int64_t S = 6 + C + 1;
  std::vector<float> partial(E * S, 0.0f);

  const float* p_means = means2d.data_ptr<float>();
  const float* p_conics = conics.data_ptr<float>();
  const float* p_colors = colors.data_ptr<float>();
  const float* p_opac = opacities.data_ptr<float>();
  const float* p_depths = depths.data_ptr<float>();
  const double* p_final = final_t.data_ptr<double>();
  const int32_t* p_contrib = n_contrib.data_ptr<int32_t>();
  const float* g_rgb = grad_rgb.data_ptr<float>();
  const float* g_alpha = grad_alpha.data_ptr<float>();
  const float* g_depth = grad_depth.data_ptr<float>();

#pragma omp parallel if (B * T > 1)
  {
    TileData tile;
    std::vector<float> upstream(C + 1), accum(C + 1), last_feature(C + 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bt = 0; bt < B * T; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const int64_t start = offsets[bt], count = offsets[bt + 1] - start;
      if (count == 0) continue;
      const int64_t x0 = (t % grid.tiles_x) * kTile, y0 = (t / grid.tiles_x) * kTile;
      const int64_t x1 = std::min(x0 + kTile, W), y1 = std::min(y0 + kTile, H);
      tile.gather(ids + start, count, p_means + b * N * 2, p_conics + b * N * 3, p_colors + b * N * C,
                  p_opac + b * N, p_depths + b * N, C);
      float* part = partial.data() + start * S;
      for (int64_t y = y0; y < y1; ++y) {
        for (int64_t x = x0; x < x1; ++x) {
          const int64_t pix = (b * H + y) * W + x;
          const int32_t last = p_contrib[pix];
          if (last == 0) continue;
          const float px = static_cast<float>(x) + 0.5f, py = static_cast<float>(y) + 0.5f;
          for (int64_t ch = 0; ch < C; ++ch) upstream[ch] = g_rgb[pix * C + ch];
          upstream[C] = g_depth[pix];
          const float d_alpha_out = g_alpha[pix];
          const double t_final = p_final[pix];
          std::fill(accum.begin(), accum.end(), 0.0f);
          std::fill(last_feature.begin(), last_feature.end(), 0.0f);
          float last_alpha = 0.0f;
          double trans = t_final;
          Eval evals[kChunk];
          int32_t index[kChunk];
          // Back to front over the forward's chunks (same starts and lengths, so same alphas).
          for (int64_t j0 = ((last - 1) / kChunk) * kChunk; j0 >= 0; j0 -= kChunk) {
            const int64_t passed =
                evaluate_chunk(tile.splats.data() + j0, std::min(kChunk, count - j0), px, py, evals, index);
            for (int64_t q = passed - 1; q >= 0; --q) {
              const int64_t j = j0 + index[q];
              if (j >= last) continue;  // after the last contributor (or the stopping Gaussian)
              const Eval& e = evals[q];
              const Splat& s = tile.splats[j];
              trans /= static_cast<double>(1.0f - e.alpha);  // T before this Gaussian
              const float tr = static_cast<float>(trans);
              const float weight = e.alpha * tr;
              const float* f = tile.features.data() + j * (C + 1);
              float* gp = part + j * S;
              // d out / d alpha_j = T_j (f_j - accum_j), accum_j = the normalised blend behind j.
              float d_alpha = 0.0f;
              for (int64_t ch = 0; ch <= C; ++ch) {
                accum[ch] = last_alpha * last_feature[ch] + (1.0f - last_alpha) * accum[ch];
                last_feature[ch] = f[ch];
                d_alpha += (f[ch] - accum[ch]) * upstream[ch];
                gp[6 + ch] += weight * upstream[ch];
              }
              d_alpha *= tr;
              // Output alpha = 1 - prod(1 - alpha_k): d/d alpha_j = T_final / (1 - alpha_j).
              d_alpha += static_cast<float>(t_final / static_cast<double>(1.0f - e.alpha)) * d_alpha_out;
              last_alpha = e.alpha;
              if (!(e.raw <= kAlphaMax)) continue;  // clamped at 0.99: no gradient, as torch.clamp
              const float d_power = d_alpha * e.raw;
              gp[5] += d_alpha * e.gauss;
              gp[0] += d_power * (-s.a * e.dx - s.b * e.dy);
              gp[1] += d_power * (-s.c * e.dy - s.b * e.dx);
              gp[2] += d_power * (-0.5f * e.dx * e.dx);
              gp[3] += d_power * (-e.dx * e.dy);
              gp[4] += d_power * (-0.5f * e.dy * e.dy);
            }
          }
        }
      }
    }
  }

  const auto f32 = colors.options();
  at::Tensor d_means = at::zeros({B, N, 2}, f32);
  at::Tensor d_conics = at::zeros({B, N, 3}, f32);
  at::Tensor d_colors = at::zeros({B, N, C}, f32);
  at::Tensor d_opac = at::zeros({B, N}, f32);
  at::Tensor d_depths = at::zeros({B, N}, f32);
  float* q_means = d_means.data_ptr<float>();
  float* q_conics = d_conics.data_ptr<float>();
  float* q_colors = d_colors.data_ptr<float>();
  float* q_opac = d_opac.data_ptr<float>();
  float* q_depths = d_depths.data_ptr<float>();
  // Cameras are independent; within one, entries are summed serially in tile order (deterministic).
#pragma omp parallel for schedule(static) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = offsets[b * T]; e < offsets[(b + 1) * T]; ++e) {
      const int64_t g = b * N + ids[e];
      const float* gp = partial.data() + e * S;
      q_means[2 * g] += gp[0];
      q_means[2 * g + 1] += gp[1];
      q_conics[3 * g] += gp[2];
      q_conics[3 * g + 1] += gp[3];
      q_conics[3 * g + 2] += gp[4];
      q_opac[g] += gp[5];
      for (int64_t ch = 0; ch < C; ++ch) q_colors[g * C + ch] += gp[6 + ch];
      q_depths[g] += gp[6 + C];
    }
  }
  return {d_means, d_conics, d_colors, d_opac, d_depths};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cpu, m) {
  m.def(
      "gaussian_rasterize_forward(Tensor means2d, Tensor conics, Tensor colors, Tensor opacities, Tensor depths, "
      "Tensor radii, int width, int height) -> (Tensor rgb, Tensor alpha, Tensor depth, Tensor final_t, "
      "Tensor n_contrib, Tensor tile_offsets, Tensor tile_ids)",
      &gaussian_rasterize_forward);
  m.def(
      "gaussian_rasterize_backward(Tensor means2d, Tensor conics, Tensor colors, Tensor opacities, Tensor depths, "
      "Tensor final_t, Tensor n_contrib, Tensor tile_offsets, Tensor tile_ids, Tensor grad_rgb, "
      "Tensor grad_alpha, Tensor grad_depth, int width, int height) -> (Tensor d_means2d, Tensor d_conics, "
      "Tensor d_colors, Tensor d_opacities, Tensor d_depths)",
      &gaussian_rasterize_backward);
}
