// Ray marching through an occupancy grid and volume-rendering compositing, cpu tier (C++/OpenMP)
// with a hand-written backward.
//
// Semantics: lift3d/kernels/raymarch.py (the reference tier is the definition).
//
// ray_segments: t_min/t_max of each ray (box and [near, far] clipping), raymarch.py's
//   _ray_segments in one pass with the same float32 operations.
//
// march_rays: per ray, from t_min/t_max,
//   for k = 0, 1, ...:  s = float(k) + jitter;  t0 = t_min + s * step;  t1 = t0 + step
//     stop unless t1 <= t_max;  tm = (t0 + t1) * 0.5;  x_c = o_c + tm * d_c
//     i_c = floor((x_c - lo_c) * scale_c);  keep if every 0 <= i_c < res and occupied
//     stop after max_samples kept samples.
//   Every operation is one float32 rounding, exactly as the torch reference does it, so both tiers
//   give identical samples. With AVX2 (march_ray_avx2), 8 candidates per step, each evaluated in
//   full. The baseline build goes cell by cell: one candidate is evaluated in full, and the run of
//   candidates that provably round into its cell (Marcher::next_candidate) is skipped at once if
//   the cell is empty, or kept with only t computed if it is occupied. The kept samples are the
//   same. One pass: blocks of rays march into their own buffers, then copy out in ray order.
//
// composite: per ray (samples contiguous, sorted by t), sd_i = sigma_i * (t1_i - t0_i),
//   excl_i = float(sum_{j<i} sd_j accumulated in double)   (torch.cumsum's CPU accumulation),
//   kept_i = excl_i <= -log(threshold)   (i.e. T_i >= threshold; decided identically in both tiers),
//   w_i = kept_i * exp(-excl_i) * (-expm1(-sd_i)), exp and expm1 evaluated in double (exp_double)
//   and rounded to float. The forward keeps T_i, exp(-sd_i) and each ray's kept end for the backward.
//   Backward: with G_i = dL/dw_i (direct + through colour, opacity and depth),
//   dL/dsd_j = kept_j G_j T_j exp(-sd_j) - sum_{i>j} G_i w_i   (a suffix sum, O(S) per ray).
//
// Determinism: each ray is handled by one thread and writes only its own outputs; no atomics.

#include <torch/extension.h>

#include "cpu_features.h"
#include "raymarch_inputs.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef LIFT3D_CPU_X86
#include <immintrin.h>
#endif

// The sample positions must round exactly like torch's separate mul and add kernels: never let
// the compiler fuse a * b + c into an FMA (it may with -march flags that enable FMA).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

using lift3d_raymarch::check_composite_backward_inputs;
using lift3d_raymarch::check_composite_forward_inputs;
using lift3d_raymarch::check_march_inputs;
using lift3d_raymarch::CompositeOutputs;
using lift3d_raymarch::max_optical_depth;
using lift3d_raymarch::Tier;

// ------------------------------------------------------------------------------------------------
// march_rays
// ------------------------------------------------------------------------------------------------

struct Marcher {
  const float* origins;
  const float* dirs;
  const float* t_min;
  const float* t_max;
  const float* jitter;  // null: no jitter
  const bool* occupancy;
  float lo[3];
  float scale[3];  // res / (hi - lo), rounded to float like torch
  int64_t res;
  float res_f;
  float step;
  int64_t max_samples;

  // What next_candidate needs of one ray, computed once per ray.
  struct Ray {
    float o[3], d[3];
    float start, stop, j;
    double inv_rate[3];  // 1 / (dU_c/dt), 0 where d_c = 0 (u_c constant)
    double margin_u[3];  // 2 err_u: how far short of a cell face a skipped candidate must stay (in u)
    double err_t;        // bound on |tm_k - (start + (k + j + 1/2) step)|
    double last_k;       // a few candidates past the stop: no jump needs to go further
  };

  Ray setup(int64_t r) const {
    constexpr double kRel = 4e-6;  // ~32 float ulps: covers each chain of roundings with room to spare
    Ray ray;
    for (int c = 0; c < 3; ++c) {
      ray.o[c] = origins[3 * r + c];
      ray.d[c] = dirs[3 * r + c];
    }
    ray.start = t_min[r];
    ray.stop = t_max[r];
    ray.j = jitter ? jitter[r] : 0.0f;
    // The largest |t| of a candidate up to the stop (bounds the roundings of t and of t * d).
    const double t_abs = std::max(std::fabs(static_cast<double>(ray.start)), std::fabs(static_cast<double>(ray.stop)));
    for (int c = 0; c < 3; ++c) {
      const double rate = static_cast<double>(ray.d[c]) * static_cast<double>(scale[c]);  // dU/dt, exact
      ray.inv_rate[c] = rate == 0.0 ? 0.0 : 1.0 / rate;
      // |u - U| over the four roundings of ((o + t * d) - lo) * scale, generously.
      const double err_u = kRel * (t_abs * std::fabs(static_cast<double>(ray.d[c])) + std::fabs(static_cast<double>(ray.o[c])) +
                                   std::fabs(static_cast<double>(lo[c]))) *
                               std::fabs(static_cast<double>(scale[c])) +
                           kRel * (res_f + 1.0);
      ray.margin_u[c] = 2.0 * err_u;
    }
    const double step_d = step;
    ray.err_t = kRel * (2.0 * t_abs + step_d);
    ray.last_k = (static_cast<double>(ray.stop) - static_cast<double>(ray.start)) / step_d + 4.0;
    return ray;
  }

  // Visits the kept samples of ray r in order; fn(t0) returns nothing (t1 is t0 + step, one float
  // rounding, recomputed by the caller). Returns the count.
  //
  // A candidate k evaluated in full is evaluated exactly as the reference does. From its cell,
  // next_candidate finds the first later candidate that can lie in another cell; all those in
  // between provably lie in the same cell, so they are skipped when it is empty and kept (with
  // only their t computed, the same roundings) when it is occupied.
  template <typename Fn>
  int64_t march(int64_t r, Fn&& fn) const {
    const Ray ray = setup(r);
    int64_t kept = 0;
    for (int64_t k = 0; kept < max_samples;) {
      const float s = static_cast<float>(k) + ray.j;
      const float offset = s * step;
      const float t0 = ray.start + offset;
      const float t1 = t0 + step;
      if (!(t1 <= ray.stop)) break;  // also stops on NaN
      const float tm = (t0 + t1) * 0.5f;
      int64_t cell = 0;
      bool inside = true;
      float u[3];
      for (int c = 0; c < 3; ++c) {
        const float along = tm * ray.d[c];
        const float x = ray.o[c] + along;
        u[c] = (x - lo[c]) * scale[c];
        // 0 <= floor(u) < res  <=>  0 <= u < res (res is an integer), and then floor(u) is the
        // truncation: same cells as the reference's floor without a libm call. Rejects NaN too.
        if (!(u[c] >= 0.0f && u[c] < res_f)) {
          inside = false;
          break;
        }
        cell = cell * res + static_cast<int64_t>(u[c]);
      }
      if (!inside) {
        ++k;
        continue;
      }
      const int64_t next = next_candidate(ray, k, tm, u);
      if (!occupancy[cell]) {
        k = next;
        continue;
      }
      fn(t0);
      ++kept;
      // The rest of the run lies in this occupied cell: kept unless past the stop or the cap.
      for (++k; k < next && kept < max_samples; ++k) {
        const float s_k = static_cast<float>(k) + ray.j;
        const float offset_k = s_k * step;
        const float t0_k = ray.start + offset_k;
        const float t1_k = t0_k + step;
        if (!(t1_k <= ray.stop)) return kept;  // t1 only grows with k: the ray is done
        fn(t0_k);
        ++kept;
      }
    }
    return kept;
  }

  // The first candidate after k (whose midpoint tm lies in a cell, with in-cell coordinates u)
  // that can lie outside that cell. Everything before it provably rounds into the cell:
  //  - each float u_c(tm) = ((o_c + tm * d_c) - lo_c) * scale_c is a chain of monotone roundings,
  //    so it never moves against the sign of d_c * scale_c as tm grows (nor as k grows: tm_k is
  //    monotone in k too); with d_c = 0 it is constant. A candidate can leave the cell only
  //    through the far face of some axis.
  //  - Each float differs from the exact linear U_c(t) = (o_c + t d_c - lo_c) * scale_c by at most
  //    err_u, and tm_k from start + (k + j + 1/2) step by at most err_t (Ray::setup). Candidates
  //    whose exact midpoint is short of the far face by 2 err_u (in u) and err_t (in t)
  //    therefore still round into the cell.
  // Everything here is double and conservative; when in doubt (NaN, overflow) it returns k + 1.
  int64_t next_candidate(const Ray& ray, int64_t k, float tm, const float u[3]) const {
    double t_exit = std::numeric_limits<double>::infinity();
    for (int c = 0; c < 3; ++c) {
      const double inv = ray.inv_rate[c];
      if (inv == 0.0) continue;
      const double uc = u[c];
      const double cell = std::floor(uc);
      const double face = inv > 0.0 ? cell + 1.0 - ray.margin_u[c] : cell + ray.margin_u[c];
      t_exit = std::min(t_exit, static_cast<double>(tm) + (face - uc) * inv);
    }
    const double step_d = step;
    // Largest k' whose exact midpoint start + (k' + j + 1/2) step stays below t_exit - err_t.
    const double last = std::floor((t_exit - ray.err_t - static_cast<double>(ray.start)) / step_d -
                                   static_cast<double>(ray.j) - 0.5);
    // Past the stop nothing is kept: a few candidates beyond it are far enough (the exact test
    // there ends the ray).
    const double next = std::min(last, ray.last_k) + 1.0;
    if (!(next > static_cast<double>(k + 1))) return k + 1;  // also NaN
    if (!(next < 9.0e15)) return k + 1;
    return static_cast<int64_t>(next);
  }
};

// The t0 of one block's kept samples, with room for a whole vector store past the end.
class SampleBuffer {
 public:
  // Where the next `extra` values may be written.
  float* reserve(int64_t extra) {
    if (count_ + extra > capacity_) {
      const int64_t capacity = std::max<int64_t>(2 * capacity_, std::max<int64_t>(count_ + extra, 1024));
      std::unique_ptr<float[]> grown(new float[static_cast<size_t>(capacity)]);  // uninitialised
      if (count_ > 0) std::memcpy(grown.get(), data_.get(), sizeof(float) * static_cast<size_t>(count_));
      data_ = std::move(grown);
      capacity_ = capacity;
    }
    return data_.get() + count_;
  }
  void push(float t0) { *reserve(1) = t0; ++count_; }
  void commit(int64_t n) { count_ += n; }
  const float* data() const { return data_.get(); }

 private:
  std::unique_ptr<float[]> data_;
  int64_t count_ = 0;
  int64_t capacity_ = 0;
};

#ifdef LIFT3D_CPU_X86
// Lane permutations that move the set lanes of an 8-bit mask to the front, in order (AVX2 has no
// compress instruction): row m lists the set lanes of m, then the rest.
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
  CompressTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask >> lane & 1) lanes[mask][n++] = lane;
      for (int lane = 0; lane < 8; ++lane)
        if (!(mask >> lane & 1)) lanes[mask][n++] = lane;
    }
  }
};
const CompressTable kCompress;

// The candidates a ray may have for the AVX2 march to count them in int32 lanes, and the
// resolution up to which a flat cell index fits one (larger ones take the scalar march).
constexpr double kAvx2MaxCandidates = 1 << 30;
constexpr int64_t kAvx2MaxResolution = 1024;

// March of ray r, 8 candidates per step: every candidate evaluated in full with the reference's
// float32 operations, lane by lane the same IEEE roundings as the scalar code (no FMA: this
// function's target has none, and fp-contract is off), so the samples are identical.
// Cheaper than the scalar march's cell skipping: no divisions, floors or branches per cell.
__attribute__((target("avx2"))) int64_t march_ray_avx2(const Marcher& m, int64_t r, SampleBuffer& out) {
  const bool* occupancy = m.occupancy;
  const float j = m.jitter ? m.jitter[r] : 0.0f;
  const __m256 jitter = _mm256_set1_ps(j);
  const __m256 step = _mm256_set1_ps(m.step);
  const __m256 start = _mm256_set1_ps(m.t_min[r]);
  const __m256 stop = _mm256_set1_ps(m.t_max[r]);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 res_f = _mm256_set1_ps(m.res_f);
  const __m256i res = _mm256_set1_epi32(static_cast<int32_t>(m.res));
  __m256 o[3], d[3], lo[3], scale[3];
  for (int c = 0; c < 3; ++c) {
    o[c] = _mm256_set1_ps(m.origins[3 * r + c]);
    d[c] = _mm256_set1_ps(m.dirs[3 * r + c]);
    lo[c] = _mm256_set1_ps(m.lo[c]);
    scale[c] = _mm256_set1_ps(m.scale[c]);
  }
  __m256i k = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t kept = 0;
  while (kept < m.max_samples) {
    const __m256 s = _mm256_add_ps(_mm256_cvtepi32_ps(k), jitter);  // float(k) + j
    const __m256 t0 = _mm256_add_ps(start, _mm256_mul_ps(s, step));
    const __m256 t1 = _mm256_add_ps(t0, step);
    const __m256 valid = _mm256_cmp_ps(t1, stop, _CMP_LE_OQ);  // false on NaN
    const int valid_bits = _mm256_movemask_ps(valid);
    if (valid_bits == 0) break;
    const __m256 tm = _mm256_mul_ps(_mm256_add_ps(t0, t1), half);
    __m256 inside = valid;
    __m256i cell = _mm256_setzero_si256();
    for (int c = 0; c < 3; ++c) {
      const __m256 x = _mm256_add_ps(o[c], _mm256_mul_ps(tm, d[c]));
      const __m256 u = _mm256_mul_ps(_mm256_sub_ps(x, lo[c]), scale[c]);
      // 0 <= u < res: then floor(u) is the truncation (see Marcher::march); rejects NaN too.
      inside = _mm256_and_ps(inside, _mm256_and_ps(_mm256_cmp_ps(u, zero, _CMP_GE_OQ), _mm256_cmp_ps(u, res_f, _CMP_LT_OQ)));
      cell = _mm256_add_epi32(_mm256_mullo_epi32(cell, res), _mm256_cvttps_epi32(u));
    }
    const int inside_bits = _mm256_movemask_ps(inside);
    if (inside_bits != 0) {
      // Eight byte loads, not a gather (microcoded and several times slower on AMD); lanes outside
      // the grid read cell 0 and are masked off.
      alignas(32) int32_t cells[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(cells), _mm256_and_si256(cell, _mm256_castps_si256(inside)));
      unsigned occupied = 0;
      for (int lane = 0; lane < 8; ++lane) occupied |= static_cast<unsigned>(occupancy[cells[lane]]) << lane;
      const int keep_bits = static_cast<int>(occupied) & inside_bits;
      if (keep_bits != 0) {
        const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[keep_bits]));
        _mm256_storeu_ps(out.reserve(8), _mm256_permutevar8x32_ps(t0, lanes));
        // The first ones in lane order are the lowest k: past the cap, the rest are dropped.
        const int64_t n = std::min<int64_t>(__builtin_popcount(static_cast<unsigned>(keep_bits)), m.max_samples - kept);
        out.commit(n);
        kept += n;
      }
    }
    if (valid_bits != 0xff) break;  // t1 only grows with k: every later candidate is past the stop
    k = _mm256_add_epi32(k, eight);
  }
  return kept;
}
#endif

// ------------------------------------------------------------------------------------------------
// ray_segments: raymarch.py's _ray_segments (ray_aabb, clipped to [near, far]) in one pass, the same
// float32 operations (1 / d, (lo - o) * inverse, ...), so the marches start from identical t.
// ------------------------------------------------------------------------------------------------

// torch.minimum / torch.maximum / amin / amax: a NaN operand wins.
inline float nan_min(float a, float b) { return a != a ? a : (b != b ? b : (b < a ? b : a)); }
inline float nan_max(float a, float b) { return a != a ? a : (b != b ? b : (b > a ? b : a)); }

std::tuple<at::Tensor, at::Tensor> ray_segments(const at::Tensor& origins, const at::Tensor& dirs,
                                                const at::Tensor& aabb, double near, double far) {
  const int64_t R = origins.size(0);
  lift3d_raymarch::check_tensor(origins, Tier::kCpu, "ray_segments", "origins", at::kFloat, {R, 3});
  lift3d_raymarch::check_tensor(dirs, Tier::kCpu, "ray_segments", "dirs", at::kFloat, {R, 3});
  lift3d_raymarch::check_tensor(aabb, Tier::kCpu, "ray_segments", "aabb", at::kFloat, {6});
  at::Tensor t_min = at::empty({R}, origins.options());
  at::Tensor t_max = at::empty({R}, origins.options());
  const float* o = origins.data_ptr<float>();
  const float* d = dirs.data_ptr<float>();
  const float* box = aabb.data_ptr<float>();
  float* out_min = t_min.data_ptr<float>();
  float* out_max = t_max.data_ptr<float>();
  const float near_f = static_cast<float>(near), far_f = static_cast<float>(far);
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float t_near = -inf, t_far = inf;
    bool moving = false;
    for (int c = 0; c < 3; ++c) {
      const float oc = o[3 * r + c], dc = d[3 * r + c], lo = box[c], hi = box[c + 3];
      float t_lo, t_hi;
      if (dc == 0.0f) {  // the slab is the whole line (origin between the planes) or empty
        const bool inside = oc >= lo && oc <= hi;
        t_lo = inside ? -inf : inf;
        t_hi = inside ? inf : -inf;
      } else {
        const float inverse = 1.0f / dc;
        const float t0 = (lo - oc) * inverse, t1 = (hi - oc) * inverse;
        t_lo = nan_min(t0, t1);
        t_hi = nan_max(t0, t1);
        moving = true;
      }
      t_near = c == 0 ? t_lo : nan_max(t_near, t_lo);
      t_far = c == 0 ? t_hi : nan_min(t_far, t_hi);
    }
    const bool hit = t_near <= t_far && t_far >= 0.0f;
    const float lo_t = nan_max(t_near, near_f), hi_t = nan_min(t_far, far_f);
    // Zero directions would march forever in place; non-finite ends cannot be stepped.
    const bool ok = hit && lo_t < hi_t && std::isfinite(lo_t) && std::isfinite(hi_t) && moving;
    out_min[r] = ok ? lo_t : 0.0f;
    out_max[r] = ok ? hi_t : 0.0f;
  }
  return {t_min, t_max};
}

// Rays handled per task of the one-pass march: each task keeps its samples' t0 in its own buffer,
// then all tasks copy into the packed outputs at their offsets.
constexpr int64_t kMarchBlock = 32;

std::tuple<at::Tensor, at::Tensor, at::Tensor> march_rays(const at::Tensor& origins, const at::Tensor& dirs,
                                                          const at::Tensor& t_min, const at::Tensor& t_max,
                                                          const at::Tensor& aabb, const at::Tensor& occupancy,
                                                          int64_t resolution, double step_size,
                                                          const c10::optional<at::Tensor>& jitter,
                                                          int64_t max_samples) {
  check_march_inputs(Tier::kCpu, origins, dirs, t_min, t_max, aabb, occupancy, resolution, step_size, jitter,
                     max_samples);
  const int64_t R = origins.size(0);

  Marcher m;
  m.origins = origins.data_ptr<float>();
  m.dirs = dirs.data_ptr<float>();
  m.t_min = t_min.data_ptr<float>();
  m.t_max = t_max.data_ptr<float>();
  m.jitter = jitter.has_value() ? jitter->data_ptr<float>() : nullptr;
  m.occupancy = occupancy.data_ptr<bool>();
  const float* box = aabb.data_ptr<float>();
  m.res = resolution;
  m.res_f = static_cast<float>(resolution);
  for (int c = 0; c < 3; ++c) {
    m.lo[c] = box[c];
    const float size = box[c + 3] - box[c];
    m.scale[c] = m.res_f / size;
  }
  m.step = static_cast<float>(step_size);
  m.max_samples = max_samples;

#ifdef LIFT3D_CPU_X86
  const bool avx2 = lift3d_cpu::use_avx2() && resolution <= kAvx2MaxResolution;
#endif
  const auto march_ray = [&](int64_t r, SampleBuffer& buffer) -> int64_t {
#ifdef LIFT3D_CPU_X86
    if (avx2 && (static_cast<double>(m.t_max[r]) - m.t_min[r]) / m.step < kAvx2MaxCandidates)
      return march_ray_avx2(m, r, buffer);
#endif
    return m.march(r, [&](float t0) { buffer.push(t0); });
  };

  // One pass: each block of rays marches into its own buffer (t0 only) and records per-ray counts;
  // a prefix sum gives the offsets, then the blocks copy out in ray order.
  const int64_t blocks = (R + kMarchBlock - 1) / kMarchBlock;
  std::vector<SampleBuffer> block_t0(static_cast<size_t>(blocks));
  std::vector<int64_t> offsets(R + 1, 0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = std::min(R, (b + 1) * kMarchBlock);
    for (int64_t r = b * kMarchBlock; r < end; ++r) offsets[r + 1] = march_ray(r, block_t0[b]);
  }
  for (int64_t r = 0; r < R; ++r) offsets[r + 1] += offsets[r];

  const int64_t S = offsets[R];
  at::Tensor ray_indices = at::empty({S}, origins.options().dtype(at::kLong));
  at::Tensor t_starts = at::empty({S}, origins.options());
  at::Tensor t_ends = at::empty({S}, origins.options());
  int64_t* out_ray = ray_indices.data_ptr<int64_t>();
  float* out_t0 = t_starts.data_ptr<float>();
  float* out_t1 = t_ends.data_ptr<float>();
  const float step = m.step;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const float* t0 = block_t0[b].data();
    const int64_t end = std::min(R, (b + 1) * kMarchBlock);
    for (int64_t r = b * kMarchBlock; r < end; ++r) {
      for (int64_t i = offsets[r]; i < offsets[r + 1]; ++i) {
        out_ray[i] = r;
        out_t0[i] = *t0;
        out_t1[i] = *t0 + step;  // the same single rounding as the march's t1
        ++t0;
      }
    }
    block_t0[b] = SampleBuffer();
  }
  return {ray_indices, t_starts, t_ends};
}

// ------------------------------------------------------------------------------------------------
// composite
// ------------------------------------------------------------------------------------------------

struct CompositeInputs {
  const float* sigmas;
  const float* values;
  const float* t_starts;
  const float* t_ends;
  int64_t C;
  float max_optical_depth;  // -log(threshold), rounded to float like torch's scalar comparison
};

// Calls fn(std::integral_constant<int64_t, C>) for the channel counts worth a loop of their own
// (C = 1, 3, 4: densities, colours, colours + a feature), fn(std::integral_constant<int64_t, 0>)
// for any other C: per-ray accumulators then live in registers.
template <typename Fn>
void with_channels(int64_t C, Fn&& fn) {
  switch (C) {
    case 1: fn(std::integral_constant<int64_t, 1>{}); break;
    case 3: fn(std::integral_constant<int64_t, 3>{}); break;
    case 4: fn(std::integral_constant<int64_t, 4>{}); break;
    default: fn(std::integral_constant<int64_t, 0>{}); break;
  }
}

// Ray r's samples are [offsets[r], offsets[r + 1]); checks ray_indices is sorted and in range.
// Each sample writes the offsets of the rays that start at it, so every entry is written once
// and the scan runs in parallel.
std::vector<int64_t> ray_offsets(const at::Tensor& ray_indices, int64_t R) {
  const int64_t S = ray_indices.size(0);
  const int64_t* idx = ray_indices.data_ptr<int64_t>();
  std::vector<int64_t> offsets(R + 1);
  bool ordered = true;
#pragma omp parallel for schedule(static) reduction(&& : ordered)
  for (int64_t i = 0; i < S; ++i) {
    const int64_t previous = i > 0 ? idx[i - 1] : -1;
    const int64_t r = idx[i];
    if (r < previous || r >= R) {
      ordered = false;
      continue;
    }
    for (int64_t q = previous + 1; q <= r; ++q) offsets[q] = i;  // rays previous + 1 .. r start here
  }
  if (!ordered) {
    int64_t previous = 0;
    for (int64_t i = 0; i < S; ++i) {
      TORCH_CHECK(idx[i] >= previous && idx[i] < R,
                  "composite: ray_indices must be non-decreasing and in [0, num_rays); got ", idx[i], " at position ", i);
      previous = idx[i];
    }
  }
  for (int64_t q = S > 0 ? idx[S - 1] + 1 : 0; q <= R; ++q) offsets[q] = S;
  return offsets;
}

// Whether some sample of [begin, end) has sigma * delta < 0 (the optical depth can then shrink).
inline bool any_negative_density(const CompositeInputs& in, int64_t begin, int64_t end) {
  bool negative = false;
  for (int64_t i = begin; i < end; ++i) negative |= in.sigmas[i] * (in.t_ends[i] - in.t_starts[i]) < 0.0f;
  return negative;
}

// exp and expm1 of one argument, in double: x = k ln2 + r with |r| <= ln2 / 2, q = expm1(r) by
// its Taylor series to r^11 (truncation < 1e-14 relative), then exp(x) = 2^k (1 + q) and
// expm1(x) = 2^k q + (2^k - 1). Rounded to float these are the correctly rounded values unless
// the exact one lies within ~1e-14 of a rounding boundary: as accurate as libm's expf (<= 0.502
// ulp) and more than its expm1f, and, unlike libm, the same operations scalar or 4 lanes at a time
// (no FMA here), so the baseline and AVX2 builds agree bit for bit.
namespace exp_double {
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // fdlibm's split: k * kLn2Hi is exact for |k| < 2^20
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kShifter = 6755399441055744.0;       // 1.5 * 2^52: x + kShifter rounds x to an integer
constexpr uint64_t kShifterBits = 0x4338000000000000ull;
constexpr double kLowest = -200.0, kHighest = 100.0;  // beyond them the float results are 0, -1 or inf
// 1/n! for n = 2 .. 11, lowest first.
constexpr double kInverseFactorial[10] = {1.0 / 2,         1.0 / 6,          1.0 / 24,          1.0 / 120,
                                          1.0 / 720,       1.0 / 5040,       1.0 / 40320,       1.0 / 362880,
                                          1.0 / 3628800.0, 1.0 / 39916800.0};

struct ExpExpm1 {
  double exp, expm1;
};

inline ExpExpm1 exp_expm1(double x) {
  x = x < kLowest ? kLowest : x;  // NaN passes through both and comes out NaN
  x = x > kHighest ? kHighest : x;
  const double shifted = x * kLog2e + kShifter;
  const double k = shifted - kShifter;
  uint64_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  const double r = (x - k * kLn2Hi) - k * kLn2Lo;
  double p = kInverseFactorial[9];
  for (int n = 8; n >= 0; --n) p = p * r + kInverseFactorial[n];
  const double q = r + (r * r) * p;
  const uint64_t scale_bits = (bits - kShifterBits + 1023) << 52;  // 2^k
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return {scale * (1.0 + q), scale * q + (scale - 1.0)};
}

#ifdef LIFT3D_CPU_X86
// The same sequence on 4 lanes.
__attribute__((target("avx2"))) inline void exp_expm1_avx2(__m256d x, __m256d& exp, __m256d& expm1) {
  x = _mm256_max_pd(_mm256_set1_pd(kLowest), x);  // max/min return the second operand on NaN
  x = _mm256_min_pd(_mm256_set1_pd(kHighest), x);
  const __m256d shifted = _mm256_add_pd(_mm256_mul_pd(x, _mm256_set1_pd(kLog2e)), _mm256_set1_pd(kShifter));
  const __m256d k = _mm256_sub_pd(shifted, _mm256_set1_pd(kShifter));
  const __m256d r = _mm256_sub_pd(_mm256_sub_pd(x, _mm256_mul_pd(k, _mm256_set1_pd(kLn2Hi))),
                                  _mm256_mul_pd(k, _mm256_set1_pd(kLn2Lo)));
  __m256d p = _mm256_set1_pd(kInverseFactorial[9]);
  for (int n = 8; n >= 0; --n) p = _mm256_add_pd(_mm256_mul_pd(p, r), _mm256_set1_pd(kInverseFactorial[n]));
  const __m256d q = _mm256_add_pd(r, _mm256_mul_pd(_mm256_mul_pd(r, r), p));
  const __m256i k_bits = _mm256_sub_epi64(_mm256_castpd_si256(shifted), _mm256_set1_epi64x(static_cast<int64_t>(kShifterBits)));
  const __m256d scale = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(k_bits, _mm256_set1_epi64x(1023)), 52));
  const __m256d one = _mm256_set1_pd(1.0);
  exp = _mm256_mul_pd(scale, _mm256_add_pd(one, q));
  expm1 = _mm256_add_pd(_mm256_mul_pd(scale, q), _mm256_sub_pd(scale, one));
}
#endif
}  // namespace exp_double

// The kept samples' transmittance T = exp(-excl), survival e = exp(-sd) and weight
// w = T * (-expm1(-sd)) from their optical depths before them (excl) and their own (sd), written
// over those: on entry T holds excl, e holds sd and w holds 1 where the sample is kept, 0 where it
// is terminated (and gets zeros).
inline void sample_weights(float* T, float* e, float* w, int64_t i) {
  if (w[i] == 0.0f) {
    T[i] = e[i] = 0.0f;
    return;
  }
  const float transmittance = static_cast<float>(exp_double::exp_expm1(-static_cast<double>(T[i])).exp);
  const exp_double::ExpExpm1 own = exp_double::exp_expm1(-static_cast<double>(e[i]));
  T[i] = transmittance;
  e[i] = static_cast<float>(own.exp);
  w[i] = transmittance * static_cast<float>(-own.expm1);
}

void sample_weights_scalar(float* T, float* e, float* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) sample_weights(T, e, w, i);
}

#ifdef LIFT3D_CPU_X86
__attribute__((target("avx2"))) void sample_weights_avx2(float* T, float* e, float* w, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256d T_exp, T_expm1, e_exp, e_expm1;
    exp_double::exp_expm1_avx2(_mm256_sub_pd(_mm256_setzero_pd(), _mm256_cvtps_pd(_mm_loadu_ps(T + i))), T_exp, T_expm1);
    exp_double::exp_expm1_avx2(_mm256_sub_pd(_mm256_setzero_pd(), _mm256_cvtps_pd(_mm_loadu_ps(e + i))), e_exp, e_expm1);
    const __m128 kept = _mm_cmpneq_ps(_mm_loadu_ps(w + i), _mm_setzero_ps());
    const __m128 transmittance = _mm_and_ps(kept, _mm256_cvtpd_ps(T_exp));
    const __m128 alpha = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_setzero_pd(), e_expm1));
    _mm_storeu_ps(T + i, transmittance);
    _mm_storeu_ps(e + i, _mm_and_ps(kept, _mm256_cvtpd_ps(e_exp)));
    _mm_storeu_ps(w + i, _mm_and_ps(kept, _mm_mul_ps(transmittance, alpha)));
  }
  for (; i < n; ++i) sample_weights(T, e, w, i);
}
#endif

using SampleWeightsFn = void (*)(float*, float*, float*, int64_t);

SampleWeightsFn pick_sample_weights() {
#ifdef LIFT3D_CPU_X86
  if (lift3d_cpu::use_avx2()) return sample_weights_avx2;
#endif
  return sample_weights_scalar;
}

struct RaySums {
  double opacity, depth;
  int64_t kept_end;  // one past the last kept sample
};

// Ray r's samples [begin, end): writes their w, and T (0 where terminated) and exp(-sd) up to the
// last kept sample (the backward reads no further), and returns the ray's sums, its colour in
// acc[C] (double, in sample order). The outputs are restrict parameters so that their stores do
// not make the compiler reload every input.
template <int64_t kC>
RaySums forward_ray(const CompositeInputs& in, SampleWeightsFn weights_of, int64_t begin, int64_t end,
                    float* __restrict__ w, float* __restrict__ T, float* __restrict__ e, double* __restrict__ acc) {
  const int64_t C = kC > 0 ? kC : in.C;
  // Pass 1: the optical depths (a serial chain) and the termination decisions; T and e hold the
  // optical depth before the sample and the sample's own until pass 2, w whether it is kept.
  double optical_depth = 0.0;
  int64_t last_kept = begin - 1;
  bool checked = false;  // whether the rest of the ray was searched for a negative density
  for (int64_t i = begin; i < end; ++i) {
    const float delta = in.t_ends[i] - in.t_starts[i];
    const float sd = in.sigmas[i] * delta;
    const float excl = static_cast<float>(optical_depth);  // double accumulation, like torch.cumsum on CPU
    optical_depth += static_cast<double>(sd);
    const bool kept = excl <= in.max_optical_depth;  // false on NaN
    T[i] = excl;
    e[i] = sd;
    w[i] = kept ? 1.0f : 0.0f;
    last_kept = kept ? i : last_kept;
    // The rule is per sample (as in the reference), so a negative density could bring a
    // terminated ray back; without one after it (a vectorised check) it stays terminated.
    if (!kept && !checked) {
      if (!any_negative_density(in, i + 1, end)) break;
      checked = true;
    }
  }
  // Pass 2: T, exp(-sd) (kept for the backward, which then needs no transcendental) and w,
  // vectorised up to the last kept sample; terminated samples get zeros.
  const int64_t stop = last_kept + 1;
  weights_of(T + begin, e + begin, w + begin, stop - begin);
  std::fill(w + stop, w + end, 0.0f);
  // Pass 3: the sums, in sample order (terminated samples add nothing); with C known here the
  // colour sums live in registers.
  double fixed[kC > 0 ? kC : 1] = {};
  double* sum = kC > 0 ? fixed : acc;
  std::fill(sum, sum + C, 0.0);
  RaySums sums{0.0, 0.0, stop};
  for (int64_t i = begin; i < stop; ++i) {
    if (T[i] == 0.0f) continue;
    const double wd = w[i];
    sums.opacity += wd;
    sums.depth += wd * (0.5 * (static_cast<double>(in.t_starts[i]) + in.t_ends[i]));
    const float* v = in.values + i * C;
    for (int64_t c = 0; c < C; ++c) sum[c] += wd * v[c];
  }
  if (kC > 0) std::copy(fixed, fixed + C, acc);
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
composite_forward(const at::Tensor& sigmas, const at::Tensor& values, const at::Tensor& t_starts,
                  const at::Tensor& t_ends, const at::Tensor& ray_indices, int64_t num_rays,
                  double transmittance_threshold) {
  const auto [S, C, R] = check_composite_forward_inputs(Tier::kCpu, sigmas, values, t_starts, t_ends, ray_indices,
                                                        num_rays, transmittance_threshold);

  const std::vector<int64_t> offsets = ray_offsets(ray_indices, R);
  const CompositeInputs in{sigmas.data_ptr<float>(), values.data_ptr<float>(), t_starts.data_ptr<float>(),
                           t_ends.data_ptr<float>(), C, max_optical_depth(transmittance_threshold)};

  const CompositeOutputs out(S, R, C, sigmas.options(), ray_indices.options());
  int64_t* kept_end_out = out.kept_ends.data_ptr<int64_t>();
  float* w_out = out.weights.data_ptr<float>();
  float* T_out = out.transmittance.data_ptr<float>();
  float* e_out = out.survival.data_ptr<float>();
  float* acc_out = out.accumulated.data_ptr<float>();
  float* op_out = out.opacity.data_ptr<float>();
  float* depth_out = out.depth.data_ptr<float>();

  const SampleWeightsFn weights_of = pick_sample_weights();
  with_channels(C, [&](auto channels) {
    constexpr int64_t kC = decltype(channels)::value;
#pragma omp parallel
    {
      std::vector<double> acc(C);
#pragma omp for schedule(dynamic, 16)
      for (int64_t r = 0; r < R; ++r) {
        const RaySums sums = forward_ray<kC>(in, weights_of, offsets[r], offsets[r + 1], w_out, T_out, e_out, acc.data());
        for (int64_t c = 0; c < C; ++c) acc_out[r * C + c] = static_cast<float>(acc[c]);
        op_out[r] = static_cast<float>(sums.opacity);
        depth_out[r] = static_cast<float>(sums.depth);
        kept_end_out[r] = sums.kept_end;
      }
    }
  });
  at::Tensor offsets_tensor = at::empty({R + 1}, ray_indices.options());
  std::copy(offsets.begin(), offsets.end(), offsets_tensor.data_ptr<int64_t>());
  return out.with_offsets(offsets_tensor);
}

struct BackwardInputs {
  const float* values;
  const float* t_starts;
  const float* t_ends;
  const int64_t* kept_ends;    // [R]: one past each ray's last kept sample
  const float* weights;
  const float* transmittance;  // 0 where terminated (read only before kept_ends)
  const float* survival;
  const float* grad_weights;   // null: zero
  const float* grad_accumulated;
  const float* grad_opacity;
  const float* grad_depth;
  int64_t C;
};

// Ray r's gradients: samples [begin, end), G[begin, end) scratch. The outputs are restrict
// parameters so that their stores do not make the compiler reload every input.
template <int64_t kC>
void backward_ray(const BackwardInputs& in, int64_t r, int64_t begin, int64_t end, double* __restrict__ G,
                  float* __restrict__ gs, float* __restrict__ gv) {
  const int64_t C = kC > 0 ? kC : in.C;
  const float* ga = in.grad_accumulated + r * C;
  const double g_op = in.grad_opacity[r], g_depth = in.grad_depth[r];
  const float* T = in.transmittance;
  // Past the last kept sample everything is zero (no weight of their own, none after them).
  const int64_t last = in.kept_ends[r];
  std::fill(gv + last * C, gv + end * C, 0.0f);
  std::fill(gs + last, gs + end, 0.0f);
  for (int64_t i = begin; i < last; ++i) {
    float* gvi = gv + i * C;
    if (T[i] == 0.0f) {  // terminated: zero weight, zero gradient, nothing added to the suffix
      std::fill(gvi, gvi + C, 0.0f);
      G[i] = 0.0;
      continue;
    }
    const float* v = in.values + i * C;
    double Gi = static_cast<double>(in.grad_weights ? in.grad_weights[i] : 0.0f) + g_op +
                g_depth * (0.5 * (static_cast<double>(in.t_starts[i]) + in.t_ends[i]));
    for (int64_t c = 0; c < C; ++c) {
      Gi += static_cast<double>(ga[c]) * v[c];
      gvi[c] = in.weights[i] * ga[c];
    }
    G[i] = Gi;
  }
  double suffix = 0.0;  // sum_{i > j} G_i w_i
  for (int64_t i = last - 1; i >= begin; --i) {
    const double d_sd = G[i] * T[i] * in.survival[i] - suffix;
    suffix += G[i] * in.weights[i];
    const float delta = in.t_ends[i] - in.t_starts[i];
    gs[i] = static_cast<float>(d_sd * delta);
  }
}

std::tuple<at::Tensor, at::Tensor> composite_backward(const at::Tensor& values, const at::Tensor& t_starts,
                                                      const at::Tensor& t_ends, const at::Tensor& ray_offsets_tensor,
                                                      const at::Tensor& kept_ends, const at::Tensor& weights,
                                                      const at::Tensor& transmittance, const at::Tensor& survival,
                                                      const at::Tensor& grad_weights,
                                                      const at::Tensor& grad_accumulated,
                                                      const at::Tensor& grad_opacity, const at::Tensor& grad_depth) {
  const auto [S, C, R] = check_composite_backward_inputs(Tier::kCpu, values, t_starts, t_ends, ray_offsets_tensor,
                                                         kept_ends, weights, transmittance, survival, grad_weights,
                                                         grad_accumulated, grad_opacity, grad_depth);

  const int64_t* offsets = ray_offsets_tensor.data_ptr<int64_t>();
  const int64_t* ends = kept_ends.data_ptr<int64_t>();
  TORCH_CHECK(R >= 0 && offsets[0] == 0 && offsets[R] == S, "composite_backward: bad ray_offsets");
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(offsets[r] <= ends[r] && ends[r] <= offsets[r + 1],
                "composite_backward: ray_offsets must be non-decreasing, with kept_ends between them");
  const BackwardInputs in{values.data_ptr<float>(),
                          t_starts.data_ptr<float>(),
                          t_ends.data_ptr<float>(),
                          ends,
                          weights.data_ptr<float>(),
                          transmittance.data_ptr<float>(),
                          survival.data_ptr<float>(),
                          grad_weights.numel() > 0 ? grad_weights.data_ptr<float>() : nullptr,
                          grad_accumulated.data_ptr<float>(),
                          grad_opacity.data_ptr<float>(),
                          grad_depth.data_ptr<float>(),
                          C};

  // Every entry is written below (offsets cover [0, S) exactly).
  at::Tensor grad_sigmas = at::empty({S}, values.options());
  at::Tensor grad_values = at::empty({S, C}, values.options());
  float* gs = grad_sigmas.data_ptr<float>();
  float* gv = grad_values.data_ptr<float>();

  with_channels(C, [&](auto channels) {
    constexpr int64_t kC = decltype(channels)::value;
#pragma omp parallel
    {
      std::vector<double> G;  // per sample of the ray: dL/dw (0 where terminated)
#pragma omp for schedule(dynamic, 16)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t begin = offsets[r], end = offsets[r + 1];
        if (static_cast<int64_t>(G.size()) < end - begin) G.resize(static_cast<size_t>(end - begin));
        backward_ray<kC>(in, r, begin, end, G.data() - begin, gs, gv);
      }
    }
  });
  return {grad_sigmas, grad_values};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cpu, m) {
  m.def("ray_segments(Tensor origins, Tensor dirs, Tensor aabb, float near, float far) -> (Tensor t_min, Tensor t_max)",
        &ray_segments);
  m.def(
      "march_rays(Tensor origins, Tensor dirs, Tensor t_min, Tensor t_max, Tensor aabb, Tensor occupancy, "
      "int resolution, float step_size, Tensor? jitter, int max_samples) -> (Tensor ray_indices, "
      "Tensor t_starts, Tensor t_ends)",
      &march_rays);
  m.def(
      "composite_forward(Tensor sigmas, Tensor values, Tensor t_starts, Tensor t_ends, Tensor ray_indices, "
      "int num_rays, float transmittance_threshold) -> (Tensor weights, Tensor accumulated, Tensor opacity, "
      "Tensor depth, Tensor ray_offsets, Tensor kept_ends, Tensor transmittance, Tensor survival)",
      &composite_forward);
  m.def(
      "composite_backward(Tensor values, Tensor t_starts, Tensor t_ends, Tensor ray_offsets, Tensor kept_ends, "
      "Tensor weights, Tensor transmittance, Tensor survival, Tensor grad_weights, Tensor grad_accumulated, "
      "Tensor grad_opacity, Tensor grad_depth) -> (Tensor grad_sigmas, Tensor grad_values)",
      &composite_backward);
}
