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
// Culling: besides the radius square, every Gaussian gets a pixel rectangle that bounds its
// ellipse power >= power_floor (below power_floor alpha < 1/255 for sure), with a margin for the
// float rounding of power. Binning uses the tiles both touch, and a tile visits only the pixels in
// the rectangle. Every pixel left out would have been rejected by the evaluation, so culling
// changes no result: it only skips work (most of it: at the quickstart's splat sizes a Gaussian
// passes at a few percent of the pixels of the tiles its square touches).
//
// Loop order: within a tile the Gaussians are walked in list order (back to front in the backward)
// and each updates the per-pixel state (transmittance, sums, stop flag) of the pixels in its
// rectangle, 8 pixels of a tile row at a time. Per pixel that is the same sequence of operations
// as walking that pixel's list, so the result does not depend on the order. A tile stops once all
// its pixels have stopped.
//
// Vectors: the 8-pixel step is written once with GCC/Clang vector extensions and compiled twice,
// for AVX2 (chosen at run time, see cpu_features.h) and for the baseline x86-64 target (where each
// 8-lane op becomes two SSE ops). exp() is a polynomial made of the same IEEE operations in both,
// and neither build has FMA, so the two builds agree bit for bit; the forward and the backward
// evaluate alpha with the same inlined code, so the backward's alphas are the forward's bits.
//
// Determinism: every tile is processed by one thread in a fixed order; the backward writes
// per-(tile, entry) partial gradients (lane sums reduced in a fixed order) and reduces them
// serially per camera in tile order. No float atomics, so results are bit-identical run to run
// and for any thread count.
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
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_features.h"
#include "cpu_sort.h"

#ifdef LIFT3D_CPU_X86
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTile = 16;
constexpr int64_t kLanes = 8;  // pixels per vector step
// Per-pixel state of a tile is stored in rows of kStride: a step may start at any column of the
// tile and run into the padding (whose pixels never blend).
constexpr int64_t kStride = kTile + kLanes;
constexpr int64_t kTilePixels = kTile * kStride;
constexpr float kAlphaMax = 0.99f;
// Same float32 constants torch uses when comparing a float tensor with the Python scalars.
const float kAlphaMin = static_cast<float>(1.0 / 255.0);
const float kTransmittanceMin = static_cast<float>(1e-4);

#define GS_INLINE inline __attribute__((always_inline))
// The 32- and 64-byte vectors only live inside always-inlined code, never at a call boundary:
// GCC's warning about their calling convention without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
typedef double D8 __attribute__((vector_size(64)));
typedef int64_t L8 __attribute__((vector_size(64)));

using lift3d_cpu::load_vector;
using lift3d_cpu::store_vector;
GS_INLINE void add_to(float* p, F8 v) { store_vector(p, load_vector<F8>(p) + v); }
// mask ? a : b per lane (mask lanes are all ones or all zeros).
GS_INLINE F8 select(I8 mask, F8 a, F8 b) { return (F8)((mask & (I8)a) | (~mask & (I8)b)); }
GS_INLINE I8 select(I8 mask, I8 a, I8 b) { return (mask & a) | (~mask & b); }
GS_INLINE D8 select(I8 mask, D8 a, D8 b) {
  const L8 wide = __builtin_convertvector(mask, L8);  // sign-extends: -1 stays all ones
  return (D8)((wide & (L8)a) | (~wide & (L8)b));
}
GS_INLINE F8 to_float(D8 v) { return __builtin_convertvector(v, F8); }
GS_INLINE D8 to_double(F8 v) { return __builtin_convertvector(v, D8); }
// Lanes summed in one fixed order (the same in both builds).
GS_INLINE float lane_sum(F8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// exp(x) for x <= 0 (Cephes' expf: x = k ln2 + r, |r| <= ln2/2, a degree-7 polynomial, here
// evaluated by Estrin's scheme for a shorter dependency chain; within 2 ulp of the correctly
// rounded value). Below -87 it returns exp(-87) (alpha there is below 1/255 unless opacity > 1e35);
// NaN lanes come out as garbage and are masked by the caller.
GS_INLINE F8 exp_nonpositive(F8 x) {
  const F8 lowest = F8{} - 87.0f;
  x = select(x < lowest, lowest, x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds |v| < 2^22 to an integer
  const F8 shifted = x * 1.44269504088896341f + shifter;
  const F8 k = shifted - shifter;
  const F8 r = (x - k * 0.693359375f) - k * -2.12194440e-4f;  // ln2 in two parts: k * hi is exact
  const F8 r2 = r * r, r4 = r2 * r2;
  const F8 p01 = 5.0000001201e-1f + r * 1.6666665459e-1f;
  const F8 p23 = 4.1665795894e-2f + r * 8.3334519073e-3f;
  const F8 p45 = 1.3981999507e-3f + r * 1.9875691500e-4f;
  const F8 p = (p01 + r2 * p23) + r4 * p45;  // (exp(r) - 1 - r) / r^2
  const F8 e = (p * r2 + r) + 1.0f;
  I8 shifter_bits;
  const F8 shifter_vec = F8{} + shifter;
  std::memcpy(&shifter_bits, &shifter_vec, sizeof shifter_bits);
  const I8 scale = (((I8)shifted - shifter_bits) + 127) << 23;  // 2^k
  return e * (F8)scale;
}

// The instruction-set-specific pieces of the tile loops, which are templates over one of these:
// "is any lane of a mask set" (a branch taken per 8 pixels, so its cost matters).
struct Baseline {
  static GS_INLINE bool any(I8 mask) {
    uint64_t parts[4];
    std::memcpy(parts, &mask, sizeof parts);
    return (parts[0] | parts[1] | parts[2] | parts[3]) != 0;
  }
};
#ifdef LIFT3D_CPU_X86
struct Avx2 {
  // Not always_inline: it is inlined where the loops are flattened into their AVX2 function.
  __attribute__((target("avx2"))) static inline bool any(I8 mask) {
    return !_mm256_testz_si256((__m256i)mask, (__m256i)mask);
  }
};
#endif

struct Splat {
  float mx, my, a, b, c, opacity;
  float power_floor;  // below this power alpha < 1/255 for sure
  int32_t x_lo, x_hi, y_lo, y_hi;  // image pixels (inclusive) outside which power < power_floor
  // Where ellipse is set, the row at dy = my - py holds such pixels only for
  // (dx + shift dy)^2 <= (a_bound - det dy^2) inv_a^2 (see make_splat).
  bool ellipse;
  double a_bound, det, shift, inv_a;
};

// One Gaussian at the 8 pixels of a row segment, in two stages: the power test (which rejects
// most lanes of most segments, see culling above), then exp() and alpha only where one passed.
struct Eval {
  F8 dx, power, gauss, raw, alpha;
  float dy;
  I8 pass;  // power <= 0 and power >= power_floor (false on NaN); after alpha(): alpha >= 1/255 too
};

// px: the 8 pixel centres' x; py: the row's pixel centre y.
GS_INLINE Eval power_test(const Splat& s, F8 px, float py) {
  Eval e;
  e.dx = s.mx - px;
  e.dy = s.my - py;
  const float c_dy2 = s.c * e.dy * e.dy, b_dy = s.b * e.dy;
  e.power = -0.5f * (s.a * e.dx * e.dx + c_dy2) - b_dy * e.dx;
  e.pass = (e.power <= 0.0f) & (e.power >= s.power_floor);
  return e;
}

GS_INLINE void alpha_test(const Splat& s, Eval& e) {
  e.gauss = exp_nonpositive(e.power);
  e.raw = s.opacity * e.gauss;
  e.alpha = select(e.raw > kAlphaMax, F8{} + kAlphaMax, e.raw);  // NaN propagates, like torch.clamp
  e.pass &= e.alpha >= kAlphaMin;
}

// Pixel centres x + 0.5 of the 8 pixels starting at column x.
GS_INLINE F8 pixel_centres(int64_t x) {
  const F8 lanes = {0.5f, 1.5f, 2.5f, 3.5f, 4.5f, 5.5f, 6.5f, 7.5f};
  return lanes + static_cast<float>(x);
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

// Pixels [lo, hi] (clipped to [0, size - 1]) whose centre x + 0.5 lies within half_extent of
// centre; false if none.
bool pixel_range(double centre, double half_extent, int64_t size, int32_t& lo, int32_t& hi) {
  const double low = std::ceil(centre - half_extent - 0.5);
  const double high = std::floor(centre + half_extent - 0.5);
  if (!(high >= 0.0) || !(low <= static_cast<double>(size - 1)) || !(low <= high)) return false;
  lo = static_cast<int32_t>(std::max(low, 0.0));
  hi = static_cast<int32_t>(std::min(high, static_cast<double>(size - 1)));
  return true;
}

// The splat of one Gaussian with its pixel rectangle; false if no pixel can pass.
bool make_splat(const float* mean, const float* conic, float opacity, const Grid& grid, Splat& s) {
  s.mx = mean[0];
  s.my = mean[1];
  s.a = conic[0];
  s.b = conic[1];
  s.c = conic[2];
  s.opacity = opacity;
  // exp(power) <= e^-0.001 * (1/255) / opacity < 1/255 / opacity: a margin far above exp's ulp error.
  s.power_floor = std::log(kAlphaMin / opacity) - 1e-3f;
  if (std::isnan(s.power_floor)) s.power_floor = -std::numeric_limits<float>::infinity();
  if (s.power_floor > 0.0f) return false;  // power <= 0 < power_floor everywhere
  s.x_lo = s.y_lo = 0;
  s.x_hi = static_cast<int32_t>(grid.width - 1);
  s.y_hi = static_cast<int32_t>(grid.height - 1);
  s.ellipse = false;
  // Pixels pass only where q = a dx^2 + 2 b dx dy + c dy^2 <= t = -2 power_floor. With
  // rho = |b| / sqrt(ac) < 1, the float q is within 6 eps (1 + rho) / (1 - rho) q of the exact
  // one, and (1 + rho) / (1 - rho) = (1 + rho)^2 ac / det <= 4 ac / det, so the ellipse
  // q <= t' = t (1 + 32 eps ac / det) holds every pixel that can pass. Its bounding box has half
  // extents sqrt(t' c / det) and sqrt(t' a / det); its row at dy spans
  // dx = -(b / a) dy +- sqrt(t' a - det dy^2) / a.
  const double a = s.a, b = s.b, c = s.c, det = a * c - b * b;
  const double t = -2.0 * static_cast<double>(s.power_floor);
  if (!(a > 0.0 && c > 0.0 && det > 0.0 && std::isfinite(t) && std::isfinite(det))) return true;
  const double inverse_det = 1.0 / det;
  const double slack = 32.0 * std::numeric_limits<float>::epsilon() * a * c * inverse_det;
  if (!(slack < 0.5)) return true;  // nearly degenerate: keep the whole radius square
  const double bound = t * (1.0 + slack) + 1e-6;
  s.ellipse = true;
  s.a_bound = a * bound;
  s.det = det;
  s.inv_a = 1.0 / a;
  s.shift = b * s.inv_a;
  return pixel_range(s.mx, std::sqrt(bound * c * inverse_det), grid.width, s.x_lo, s.x_hi) &&
         pixel_range(s.my, std::sqrt(bound * a * inverse_det), grid.height, s.y_lo, s.y_hi);
}

void check_float(const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), "gaussian_rasterize (cpu tier): ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "gaussian_rasterize (cpu tier): ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "gaussian_rasterize (cpu tier): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "gaussian_rasterize (cpu tier): ", name,
              " has shape ", t.sizes(), ", expected ", at::IntArrayRef(shape));
}

struct Inputs {
  const float *means, *conics, *colors, *opacities, *depths;
  int64_t B, N, C;
};

// Every Gaussian's splat; valid[bn] = 0 where it is culled (radius 0, off the image, or no pixel
// can pass). The forward and the backward compute the same splats from the same inputs.
void make_splats(const Inputs& in, const int32_t* radii, const Grid& grid, std::vector<Splat>& splats,
                 std::vector<uint8_t>& valid) {
  const int64_t BN = in.B * in.N;
  splats.resize(BN);
  valid.assign(BN, 0);
  for (int64_t bn = 0; bn < BN; ++bn) {
    if (radii != nullptr && radii[bn] <= 0) continue;
    valid[bn] = make_splat(in.means + 2 * bn, in.conics + 3 * bn, in.opacities[bn], grid, splats[bn]);
  }
}

// The indices of depths[0, n) in stable increasing order (ties by index, -0 = +0, NaN last like
// torch.sort): an LSD radix sort of order-preserving 32-bit keys (stable by construction).
void depth_order(const float* depths, int64_t n, int32_t* order) {
  std::vector<uint32_t> keys(n);
  std::vector<int32_t> indices(n);
  for (int64_t i = 0; i < n; ++i) {
    const float z = depths[i] == 0.0f ? 0.0f : depths[i];
    uint32_t bits;
    std::memcpy(&bits, &z, sizeof bits);
    keys[i] = std::isnan(z) ? 0xffffffffu : (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
    indices[i] = static_cast<int32_t>(i);
  }
  lift3d_cpu::radix_sort_pairs<8>(keys, indices, 32);
  std::copy(indices.begin(), indices.end(), order);
}

// Stable depth order per camera (ties by index, NaN last like torch.sort), binned into the tiles
// that both the radius square and the splat's pixel rectangle touch.
void bin_gaussians(const Inputs& in, const int32_t* radii, const std::vector<Splat>& splats,
                   const std::vector<uint8_t>& valid, const Grid& grid, std::vector<int64_t>& offsets,
                   std::vector<int32_t>& ids) {
  const int64_t B = in.B, N = in.N, T = grid.tiles();
  std::vector<int64_t> counts(B * T + 1, 0);
  std::vector<int32_t> order(B * N);
  std::vector<int64_t> rect(B * N * 4);  // x_lo, x_hi, y_lo, y_hi; x_lo = -1 marks "not binned"

#pragma omp parallel for schedule(static) if (B > 1)
  for (int64_t b = 0; b < B; ++b) depth_order(in.depths + b * N, N, order.data() + b * N);
  for (int64_t bn = 0; bn < B * N; ++bn) {
    int64_t* r = rect.data() + 4 * bn;
    r[0] = -1;
    if (!valid[bn]) continue;
    const float radius = static_cast<float>(radii[bn]);
    if (!tile_range(in.means[2 * bn], radius, grid.tiles_x, r[0], r[1]) ||
        !tile_range(in.means[2 * bn + 1], radius, grid.tiles_y, r[2], r[3])) {
      r[0] = -1;
      continue;
    }
    const Splat& s = splats[bn];
    r[0] = std::max<int64_t>(r[0], s.x_lo / kTile);
    r[1] = std::min<int64_t>(r[1], s.x_hi / kTile);
    r[2] = std::max<int64_t>(r[2], s.y_lo / kTile);
    r[3] = std::min<int64_t>(r[3], s.y_hi / kTile);
    if (r[0] > r[1] || r[2] > r[3]) {
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

// One (camera, tile) work item: its Gaussians gathered contiguously (colour channels and depth
// interleaved, depth last) and its pixel bounds.
struct Tile {
  std::vector<Splat> splats;
  std::vector<float> features;  // [count, C + 1]
  int64_t count = 0, C = 0;
  int64_t x0 = 0, y0 = 0, x1 = 0, y1 = 0;  // image pixels [x0, x1) x [y0, y1)

  void gather(const Inputs& in, const std::vector<Splat>& all, const Grid& grid, int64_t bt,
              const int64_t* offsets, const int32_t* ids) {
    const int64_t T = grid.tiles(), b = bt / T, t = bt % T, start = offsets[bt];
    count = offsets[bt + 1] - start;
    C = in.C;
    x0 = (t % grid.tiles_x) * kTile;
    y0 = (t / grid.tiles_x) * kTile;
    x1 = std::min(x0 + kTile, grid.width);
    y1 = std::min(y0 + kTile, grid.height);
    splats.resize(count);
    features.resize(count * (C + 1));
    for (int64_t j = 0; j < count; ++j) {
      const int64_t g = b * in.N + ids[start + j];
      splats[j] = all[g];
      float* f = features.data() + j * (C + 1);
      for (int64_t ch = 0; ch < C; ++ch) f[ch] = in.colors[g * C + ch];
      f[C] = in.depths[g];
    }
  }

  // The rows [y_lo, y_hi] of the tile that splat j's rectangle touches, and in each row y the
  // columns [x_lo[y - y_lo], x_hi[...]] that hold the pixels that can pass (the row's chord of
  // the ellipse, else the rectangle's columns), clipped to the tile; x_lo > x_hi where none.
  // Rows are independent, so their square roots overlap in the pipeline.
  GS_INLINE void chords(int64_t j, int64_t& y_lo, int64_t& y_hi, int64_t* x_lo, int64_t* x_hi) const {
    const Splat& s = splats[j];
    y_lo = std::max<int64_t>(s.y_lo, y0);
    y_hi = std::min<int64_t>(s.y_hi, y1 - 1);
    const int64_t left = std::max<int64_t>(s.x_lo, x0), right = std::min<int64_t>(s.x_hi, x1 - 1);
    for (int64_t y = y_lo; y <= y_hi; ++y) {
      int64_t lo = left, hi = right;
      if (s.ellipse) {
        const double dy = static_cast<double>(s.my) - (static_cast<double>(y) + 0.5);
        const double disc = s.a_bound - s.det * dy * dy;
        const double half = std::sqrt(std::max(disc, 0.0)) * s.inv_a;
        const double centre = static_cast<double>(s.mx) - 0.5 + s.shift * dy;
        // Clamped to the tile's columns before the conversion (which could overflow otherwise).
        lo = static_cast<int64_t>(std::ceil(std::max(centre - half, static_cast<double>(left))));
        hi = disc >= 0.0 ? static_cast<int64_t>(std::floor(std::min(centre + half, static_cast<double>(right))))
                         : lo - 1;
      }
      x_lo[y - y_lo] = lo;
      x_hi[y - y_lo] = hi;
    }
  }
};

// Per-pixel state of the tile being composited, [channel][tile pixel].
struct ForwardState {
  std::vector<double> trans;
  std::vector<float> sums;  // [C + 1, kTilePixels]
  std::vector<int32_t> live, last;  // live: -1 while the pixel still blends (in the image, not stopped)
};

struct ForwardOutputs {
  float *rgb, *alpha, *depth;
  double* final_t;
  int32_t* n_contrib;
};

// kC > 0: the channel count as a constant (the common C = 3, whose loops the compiler unrolls);
// kC = 0: tile.C.
template <typename Isa, int64_t kC>
inline void forward_tile_body(const Tile& tile, int64_t b, int64_t H, int64_t W, ForwardState& st,
                              const ForwardOutputs& out) {
  const int64_t C = kC > 0 ? kC : tile.C, F = C + 1;
  st.trans.assign(kTilePixels, 1.0);
  st.sums.assign(F * kTilePixels, 0.0f);
  st.last.assign(kTilePixels, 0);
  st.live.assign(kTilePixels, 0);
  int64_t alive = 0;
  for (int64_t y = tile.y0; y < tile.y1; ++y)
    for (int64_t x = tile.x0; x < tile.x1; ++x, ++alive) st.live[(y - tile.y0) * kStride + (x - tile.x0)] = -1;

  for (int64_t j = 0; j < tile.count && alive > 0; ++j) {
    const Splat& s = tile.splats[j];
    const float* f = tile.features.data() + j * F;
    int64_t y_lo, y_hi, x_lo[kTile], x_hi[kTile];
    tile.chords(j, y_lo, y_hi, x_lo, x_hi);
    for (int64_t y = y_lo; y <= y_hi; ++y) {
      // Steps start at the chord, not at a multiple of 8: most chords then take one step.
      for (int64_t x = x_lo[y - y_lo]; x <= x_hi[y - y_lo]; x += kLanes) {
        const int64_t i = (y - tile.y0) * kStride + (x - tile.x0);
        const I8 live = load_vector<I8>(st.live.data() + i);
        if (!Isa::any(live)) continue;
        Eval e = power_test(s, pixel_centres(x), static_cast<float>(y) + 0.5f);
        if (!Isa::any(e.pass & live)) continue;
        alpha_test(s, e);
        const I8 blend = e.pass & live;
        if (!Isa::any(blend)) continue;
        const D8 trans = load_vector<D8>(st.trans.data() + i);
        const D8 next = trans * to_double(1.0f - e.alpha);
        const I8 stop = blend & (to_float(next) < kTransmittanceMin);
        const I8 take = blend & ~stop;
        if (Isa::any(stop)) {
          store_vector(st.live.data() + i, live & ~stop);
          for (int k = 0; k < kLanes; ++k) alive += stop[k];  // lanes are -1 where set
        }
        const F8 weight = e.alpha * to_float(trans);
        for (int64_t ch = 0; ch < F; ++ch) {
          float* sums = st.sums.data() + ch * kTilePixels + i;
          const F8 old = load_vector<F8>(sums);
          store_vector(sums, select(take, old + weight * f[ch], old));
        }
        store_vector(st.trans.data() + i, select(take, next, trans));
        store_vector(st.last.data() + i, select(take, I8{} + static_cast<int32_t>(j + 1), load_vector<I8>(st.last.data() + i)));
      }
    }
  }

  for (int64_t y = tile.y0; y < tile.y1; ++y) {
    for (int64_t x = tile.x0; x < tile.x1; ++x) {
      const int64_t i = (y - tile.y0) * kStride + (x - tile.x0), pix = (b * H + y) * W + x;
      for (int64_t ch = 0; ch < C; ++ch) out.rgb[pix * C + ch] = st.sums[ch * kTilePixels + i];
      out.depth[pix] = st.sums[C * kTilePixels + i];
      out.alpha[pix] = 1.0f - static_cast<float>(st.trans[i]);
      out.final_t[pix] = st.trans[i];
      out.n_contrib[pix] = st.last[i];
    }
  }
}

// Per-pixel state of the tile being differentiated, [channel][tile pixel].
struct BackwardState {
  std::vector<double> trans, t_final;
  std::vector<float> upstream, accum, last_feature;  // [C + 1, kTilePixels]
  std::vector<float> last_alpha, d_alpha_out;
  std::vector<int32_t> last;
  std::vector<float> grads;  // per-lane gradient sums of the current Gaussian, [6 + C + 1, kLanes]
};

struct BackwardInputs {
  const double* final_t;
  const int32_t* n_contrib;
  const float *grad_rgb, *grad_alpha, *grad_depth;
};

// Writes d(loss)/d(splat j's parameters) into part[j * (7 + C)]: d mean (2), d conic (3),
// d opacity (1), d colour (C), d depth (1).
template <typename Isa, int64_t kC>
inline void backward_tile_body(const Tile& tile, int64_t b, int64_t H, int64_t W, const BackwardInputs& in,
                               BackwardState& st, float* part) {
  const int64_t C = kC > 0 ? kC : tile.C, F = C + 1, S = 6 + F;
  st.trans.assign(kTilePixels, 1.0);
  st.t_final.assign(kTilePixels, 1.0);
  st.upstream.assign(F * kTilePixels, 0.0f);
  st.accum.assign(F * kTilePixels, 0.0f);
  st.last_feature.assign(F * kTilePixels, 0.0f);
  st.last_alpha.assign(kTilePixels, 0.0f);
  st.d_alpha_out.assign(kTilePixels, 0.0f);
  st.last.assign(kTilePixels, 0);  // 0 outside the image: no Gaussian is differentiated there
  if (kC == 0) st.grads.resize(S * kLanes);
  // Per-lane sums of one Gaussian's gradients, [S, kLanes]: on the stack for a constant C. Zero
  // between Gaussians (reset after each one that touched them).
  alignas(32) float local[kC > 0 ? (7 + kC) * kLanes : 1];
  float* g = kC > 0 ? local : st.grads.data();
  std::fill(g, g + S * kLanes, 0.0f);
  int32_t max_last = 0;
  for (int64_t y = tile.y0; y < tile.y1; ++y) {
    for (int64_t x = tile.x0; x < tile.x1; ++x) {
      const int64_t i = (y - tile.y0) * kStride + (x - tile.x0), pix = (b * H + y) * W + x;
      st.last[i] = in.n_contrib[pix];
      max_last = std::max(max_last, st.last[i]);
      st.trans[i] = st.t_final[i] = in.final_t[pix];
      for (int64_t ch = 0; ch < C; ++ch) st.upstream[ch * kTilePixels + i] = in.grad_rgb[pix * C + ch];
      st.upstream[C * kTilePixels + i] = in.grad_depth[pix];
      st.d_alpha_out[i] = in.grad_alpha[pix];
    }
  }

  // Back to front from the last contributor of any pixel of the tile.
  for (int64_t j = static_cast<int64_t>(max_last) - 1; j >= 0; --j) {
    const Splat& s = tile.splats[j];
    const float* f = tile.features.data() + j * F;
    // Per-lane sums of splat j's gradients, [S, kLanes]: on the stack (registers) for a constant C.
    bool touched = false;
    int64_t y_lo, y_hi, x_lo[kTile], x_hi[kTile];
    tile.chords(j, y_lo, y_hi, x_lo, x_hi);
    for (int64_t y = y_lo; y <= y_hi; ++y) {
      // Steps start at the chord, not at a multiple of 8: most chords then take one step.
      for (int64_t x = x_lo[y - y_lo]; x <= x_hi[y - y_lo]; x += kLanes) {
        const int64_t i = (y - tile.y0) * kStride + (x - tile.x0);
        // Only pixels whose blend reached j (not after their last contributor or stopping Gaussian).
        const I8 reached = load_vector<I8>(st.last.data() + i) > static_cast<int32_t>(j);
        if (!Isa::any(reached)) continue;
        Eval e = power_test(s, pixel_centres(x), static_cast<float>(y) + 0.5f);
        if (!Isa::any(e.pass & reached)) continue;
        alpha_test(s, e);
        const I8 m = e.pass & reached;
        if (!Isa::any(m)) continue;
        touched = true;
        // One division for both quotients below (a double ulp off theirs; T is rounded to float).
        const D8 inverse = 1.0 / to_double(1.0f - e.alpha);
        const D8 trans = select(m, load_vector<D8>(st.trans.data() + i) * inverse, load_vector<D8>(st.trans.data() + i));
        store_vector(st.trans.data() + i, trans);  // T before this Gaussian
        const F8 tr = to_float(trans);
        const F8 weight = e.alpha * tr;
        const F8 last_alpha = load_vector<F8>(st.last_alpha.data() + i);
        // d out / d alpha_j = T_j (f_j - accum_j), accum_j = the normalised blend behind j.
        F8 d_alpha = F8{};
        for (int64_t ch = 0; ch < F; ++ch) {
          float* accum_p = st.accum.data() + ch * kTilePixels + i;
          float* last_p = st.last_feature.data() + ch * kTilePixels + i;
          const F8 up = load_vector<F8>(st.upstream.data() + ch * kTilePixels + i);
          const F8 accum = last_alpha * load_vector<F8>(last_p) + (1.0f - last_alpha) * load_vector<F8>(accum_p);
          store_vector(accum_p, select(m, accum, load_vector<F8>(accum_p)));
          store_vector(last_p, select(m, F8{} + f[ch], load_vector<F8>(last_p)));
          d_alpha += (f[ch] - accum) * up;
          add_to(g + (6 + ch) * kLanes, select(m, weight * up, F8{}));
        }
        d_alpha *= tr;
        // Output alpha = 1 - prod(1 - alpha_k): d/d alpha_j = T_final / (1 - alpha_j).
        d_alpha += to_float(load_vector<D8>(st.t_final.data() + i) * inverse) * load_vector<F8>(st.d_alpha_out.data() + i);
        store_vector(st.last_alpha.data() + i, select(m, e.alpha, last_alpha));
        const I8 unclamped = m & (e.raw <= kAlphaMax);  // clamped at 0.99: no gradient, as torch.clamp
        const F8 d_power = d_alpha * e.raw;
        add_to(g + 5 * kLanes, select(unclamped, d_alpha * e.gauss, F8{}));
        add_to(g + 0 * kLanes, select(unclamped, d_power * (-s.a * e.dx - s.b * e.dy), F8{}));
        add_to(g + 1 * kLanes, select(unclamped, d_power * (-s.c * e.dy - s.b * e.dx), F8{}));
        add_to(g + 2 * kLanes, select(unclamped, d_power * (-0.5f * e.dx * e.dx), F8{}));
        add_to(g + 3 * kLanes, select(unclamped, d_power * (-e.dx * e.dy), F8{}));
        add_to(g + 4 * kLanes, select(unclamped, d_power * (-0.5f * e.dy * e.dy), F8{}));
      }
    }
    if (!touched) continue;
    for (int64_t k = 0; k < S; ++k) {
      part[j * S + k] = lane_sum(load_vector<F8>(g + k * kLanes));
      store_vector(g + k * kLanes, F8{});
    }
  }
}

// The tile bodies compiled for this CPU: AVX2 where it has it (and LIFT3D_KERNELS_NO_AVX2 is not
// 1), else the baseline x86-64 target. Read per call, so a test can compare both builds.
using ForwardTileFn = void (*)(const Tile&, int64_t, int64_t, int64_t, ForwardState&, const ForwardOutputs&);
using BackwardTileFn = void (*)(const Tile&, int64_t, int64_t, int64_t, const BackwardInputs&, BackwardState&,
                                float*);

template <typename Isa>
inline void forward_tile(const Tile& tile, int64_t b, int64_t H, int64_t W, ForwardState& st,
                         const ForwardOutputs& out) {
  if (tile.C == 3) return forward_tile_body<Isa, 3>(tile, b, H, W, st, out);
  forward_tile_body<Isa, 0>(tile, b, H, W, st, out);
}
template <typename Isa>
inline void backward_tile(const Tile& tile, int64_t b, int64_t H, int64_t W, const BackwardInputs& in,
                          BackwardState& st, float* part) {
  if (tile.C == 3) return backward_tile_body<Isa, 3>(tile, b, H, W, in, st, part);
  backward_tile_body<Isa, 0>(tile, b, H, W, in, st, part);
}

// flatten: everything the loops call is inlined and compiled for the function's target.
__attribute__((flatten)) void forward_tile_baseline(const Tile& tile, int64_t b, int64_t H, int64_t W,
                                                    ForwardState& st, const ForwardOutputs& out) {
  forward_tile<Baseline>(tile, b, H, W, st, out);
}
__attribute__((flatten)) void backward_tile_baseline(const Tile& tile, int64_t b, int64_t H, int64_t W,
                                                     const BackwardInputs& in, BackwardState& st, float* part) {
  backward_tile<Baseline>(tile, b, H, W, in, st, part);
}
#ifdef LIFT3D_CPU_X86
__attribute__((target("avx2"), flatten)) void forward_tile_avx2(const Tile& tile, int64_t b, int64_t H, int64_t W,
                                                                ForwardState& st, const ForwardOutputs& out) {
  forward_tile<Avx2>(tile, b, H, W, st, out);
}
__attribute__((target("avx2"), flatten)) void backward_tile_avx2(const Tile& tile, int64_t b, int64_t H,
                                                                 int64_t W, const BackwardInputs& in,
                                                                 BackwardState& st, float* part) {
  backward_tile<Avx2>(tile, b, H, W, in, st, part);
}
#endif

ForwardTileFn forward_tile_for_this_cpu() {
#ifdef LIFT3D_CPU_X86
  if (lift3d_cpu::use_avx2()) return forward_tile_avx2;
#endif
  return forward_tile_baseline;
}
BackwardTileFn backward_tile_for_this_cpu() {
#ifdef LIFT3D_CPU_X86
  if (lift3d_cpu::use_avx2()) return backward_tile_avx2;
#endif
  return backward_tile_baseline;
}

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
  const Inputs in{means2d.data_ptr<float>(), conics.data_ptr<float>(), colors.data_ptr<float>(),
                  opacities.data_ptr<float>(), depths.data_ptr<float>(), B, N, C};

  std::vector<Splat> splats;
  std::vector<uint8_t> valid;
  make_splats(in, radii.data_ptr<int32_t>(), grid, splats, valid);
  std::vector<int64_t> offsets;
  std::vector<int32_t> ids;
  bin_gaussians(in, radii.data_ptr<int32_t>(), splats, valid, grid, offsets, ids);

  const auto f32 = colors.options();
  at::Tensor rgb = at::zeros({B, H, W, C}, f32);
  at::Tensor alpha = at::zeros({B, H, W, 1}, f32);
  at::Tensor depth = at::zeros({B, H, W, 1}, f32);
  at::Tensor final_t = at::ones({B, H, W}, f32.dtype(at::kDouble));
  at::Tensor n_contrib = at::zeros({B, H, W}, f32.dtype(at::kInt));
  at::Tensor tile_offsets = at::from_blob(offsets.data(), {B * T + 1}, at::kLong).clone();
  at::Tensor tile_ids = at::from_blob(ids.data(), {static_cast<int64_t>(ids.size())}, at::kInt).clone();
  const ForwardOutputs out{rgb.data_ptr<float>(), alpha.data_ptr<float>(), depth.data_ptr<float>(),
                           final_t.data_ptr<double>(), n_contrib.data_ptr<int32_t>()};
  const ForwardTileFn forward_tile = forward_tile_for_this_cpu();

#pragma omp parallel if (B * T > 1)
  {
    Tile tile;
    ForwardState state;
#pragma omp for schedule(dynamic, 1)
    for (int64_t bt = 0; bt < B * T; ++bt) {
      if (offsets[bt + 1] == offsets[bt]) continue;  // outputs are already "nothing drawn"
      tile.gather(in, splats, grid, bt, offsets.data(), ids.data());
      forward_tile(tile, bt / T, H, W, state, out);
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
  const Inputs in{means2d.data_ptr<float>(), conics.data_ptr<float>(), colors.data_ptr<float>(),
                  opacities.data_ptr<float>(), depths.data_ptr<float>(), B, N, C};
  // The forward's splats (only binned Gaussians are visited, so radii are not needed here).
  std::vector<Splat> splats;
  std::vector<uint8_t> valid;
  make_splats(in, nullptr, grid, splats, valid);
  // Per entry: d mean (2), d conic (3), d opacity (1), d colour (C), d depth (1).
  const int64_t S = 6 + C + 1;
  std::vector<float> partial(E * S, 0.0f);
  const BackwardInputs grads_in{final_t.data_ptr<double>(), n_contrib.data_ptr<int32_t>(),
                                grad_rgb.data_ptr<float>(), grad_alpha.data_ptr<float>(),
                                grad_depth.data_ptr<float>()};
  const BackwardTileFn backward_tile = backward_tile_for_this_cpu();

#pragma omp parallel if (B * T > 1)
  {
    Tile tile;
    BackwardState state;
#pragma omp for schedule(dynamic, 1)
    for (int64_t bt = 0; bt < B * T; ++bt) {
      if (offsets[bt + 1] == offsets[bt]) continue;
      tile.gather(in, splats, grid, bt, offsets, ids);
      backward_tile(tile, bt / T, H, W, grads_in, state, partial.data() + offsets[bt] * S);
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
