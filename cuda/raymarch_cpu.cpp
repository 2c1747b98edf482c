// Ray marching through an occupancy grid and volume-rendering compositing, cpu tier (C++/OpenMP)
// with a hand-written backward.
//
// Semantics: lift3d/kernels/raymarch.py (the reference tier is the definition).
//
// march_rays: per ray, with t_min/t_max already clipped to the box and [near, far] in Python,
//   for k = 0, 1, ...:  s = float(k) + jitter;  t0 = t_min + s * step;  t1 = t0 + step
//     stop unless t1 <= t_max;  tm = (t0 + t1) * 0.5;  x_c = o_c + tm * d_c
//     i_c = floor((x_c - lo_c) * scale_c);  keep if every 0 <= i_c < res and occupied
//     stop after max_samples kept samples.
//   Every operation is one float32 rounding, exactly as the torch reference does it, so both tiers
//   give identical samples. Cell by cell: one candidate is evaluated in full, and the run of
//   candidates that provably round into its cell (Marcher::next_candidate) is skipped at once if
//   the cell is empty, or kept with only t computed if it is occupied; the kept samples are the
//   same. One pass: blocks of rays march into their own buffers, then copy out in ray order.
//
// composite: per ray (samples contiguous, sorted by t), sd_i = sigma_i * (t1_i - t0_i),
//   excl_i = float(sum_{j<i} sd_j accumulated in double)   (torch.cumsum's CPU accumulation),
//   kept_i = excl_i <= -log(threshold)   (i.e. T_i >= threshold; decided identically in both tiers),
//   w_i = kept_i * exp(-excl_i) * (-expm1(-sd_i)).
//   Backward: with G_i = dL/dw_i (direct + through colour, opacity and depth),
//   dL/dsd_j = kept_j G_j T_j exp(-sd_j) - sum_{i>j} G_i w_i   (a suffix sum, O(S) per ray).
//
// Determinism: each ray is handled by one thread and writes only its own outputs; no atomics.

#include <torch/extension.h>

#include "cpu_features.h"
#include "cpu_output_pool.h"
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
// function's target has none, and fp-contract is off), so the samples are identical. The
// occupancy is read by a gather of 4 bytes per lane from `occupancy` (padded by 3 bytes).
// Cheaper than the scalar march's cell skipping: no divisions, floors or branches per cell.
__attribute__((target("avx2"))) int64_t march_ray_avx2(const Marcher& m, const uint8_t* occupancy, int64_t r,
                                                        SampleBuffer& out) {
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
  // The AVX2 march gathers 4 bytes per cell: a copy of the grid with 3 bytes of padding.
  const bool avx2 = lift3d_cpu::use_avx2() && resolution <= kAvx2MaxResolution;
  std::vector<uint8_t> padded;
  if (avx2) {
    const size_t cells = static_cast<size_t>(resolution * resolution * resolution);
    padded.assign(cells + 3, 0);
    std::memcpy(padded.data(), m.occupancy, cells);
  }
#endif
  const auto march_ray = [&](int64_t r, SampleBuffer& buffer) -> int64_t {
#ifdef LIFT3D_CPU_X86
    if (avx2 && (static_cast<double>(m.t_max[r]) - m.t_min[r]) / m.step < kAvx2MaxCandidates)
      return march_ray_avx2(m, padded.data(), r, buffer);
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

// A float32 output of `sizes`, its memory recycled when it is large (cpu_output_pool.h).
at::Tensor pooled(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return lift3d_cpu::OutputPool::take(sizes, options).tensor;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_forward(
    const at::Tensor& sigmas, const at::Tensor& values, const at::Tensor& t_starts, const at::Tensor& t_ends,
    const at::Tensor& ray_indices, int64_t num_rays, double transmittance_threshold) {
  const auto [S, C, R] = check_composite_forward_inputs(Tier::kCpu, sigmas, values, t_starts, t_ends, ray_indices,
                                                        num_rays, transmittance_threshold);

  const std::vector<int64_t> offsets = ray_offsets(ray_indices, R);
  const CompositeInputs in{sigmas.data_ptr<float>(), values.data_ptr<float>(), t_starts.data_ptr<float>(),
                           t_ends.data_ptr<float>(), C,
                           static_cast<float>(-std::log(transmittance_threshold))};

  const auto f32 = sigmas.options();
  // Every entry of these is written.
  at::Tensor weights = pooled({S}, f32);
  at::Tensor transmittance = pooled({S}, f32);
  at::Tensor survival = pooled({S}, f32);
  at::Tensor accumulated = at::empty({R, C}, f32);
  at::Tensor opacity = at::empty({R, 1}, f32);
  at::Tensor depth = at::empty({R, 1}, f32);
  float* w_out = weights.data_ptr<float>();
  float* T_out = transmittance.data_ptr<float>();
  float* e_out = survival.data_ptr<float>();
  float* acc_out = accumulated.data_ptr<float>();
  float* op_out = opacity.data_ptr<float>();
  float* depth_out = depth.data_ptr<float>();

  with_channels(C, [&](auto channels) {
    constexpr int64_t kC = decltype(channels)::value;
#pragma omp parallel
    {
      std::vector<double> acc_dynamic(kC > 0 ? 0 : C);
#pragma omp for schedule(dynamic, 16)
      for (int64_t r = 0; r < R; ++r) {
        double acc_fixed[kC > 0 ? kC : 1] = {};
        double* acc = kC > 0 ? acc_fixed : acc_dynamic.data();
        const int64_t Cr = kC > 0 ? kC : C;
        std::fill(acc, acc + Cr, 0.0);
        const int64_t begin = offsets[r], end = offsets[r + 1];
        // Pass 1: the weights. Only the optical depth is live across the libm calls here, so
        // they spill nothing (all vector registers are caller-saved).
        double optical_depth = 0.0;
        for (int64_t i = begin; i < end; ++i) {
          const float delta = in.t_ends[i] - in.t_starts[i];
          const float sd = in.sigmas[i] * delta;
          const float excl = static_cast<float>(optical_depth);  // double accumulation, like torch.cumsum on CPU
          optical_depth += static_cast<double>(sd);
          // No early exit: with sigma >= 0 a terminated ray stays terminated, but the rule is per
          // sample (as in the reference), so negative densities give the same answer in every tier.
          if (!(excl <= in.max_optical_depth)) {  // terminated (or NaN): no weight, no gradient
            w_out[i] = T_out[i] = e_out[i] = 0.0f;
            continue;
          }
          // T and exp(-sd) are kept for the backward, which then needs no transcendental.
          const float T = std::exp(-excl);
          w_out[i] = T * -std::expm1(-sd);
          T_out[i] = T;
          e_out[i] = std::exp(-sd);
        }
        // Pass 2: the sums, in sample order (terminated samples add nothing).
        double total = 0.0, depth_sum = 0.0;
        for (int64_t i = begin; i < end; ++i) {
          if (T_out[i] == 0.0f) continue;
          const double wd = w_out[i];
          total += wd;
          depth_sum += wd * (0.5 * (static_cast<double>(in.t_starts[i]) + in.t_ends[i]));
          const float* v = in.values + i * Cr;
          for (int64_t c = 0; c < Cr; ++c) acc[c] += wd * v[c];
        }
        for (int64_t c = 0; c < Cr; ++c) acc_out[r * Cr + c] = static_cast<float>(acc[c]);
        op_out[r] = static_cast<float>(total);
        depth_out[r] = static_cast<float>(depth_sum);
      }
    }
  });
  at::Tensor offsets_tensor = at::empty({R + 1}, ray_indices.options());
  std::copy(offsets.begin(), offsets.end(), offsets_tensor.data_ptr<int64_t>());
  return {weights, accumulated, opacity, depth, offsets_tensor, transmittance, survival};
}

// With G_i = dL/dw_i (direct + through colour, opacity and depth) and the forward's w, T and
// exp(-sd) (T = 0 marks a terminated sample):
//   dL/dsd_j = G_j T_j exp(-sd_j) - sum_{i>j} G_i w_i   (a suffix sum, O(S) per ray);  dL/dv_j = w_j dL/dacc.
std::tuple<at::Tensor, at::Tensor> composite_backward(const at::Tensor& values, const at::Tensor& t_starts,
                                                      const at::Tensor& t_ends, const at::Tensor& ray_offsets_tensor,
                                                      const at::Tensor& weights, const at::Tensor& transmittance,
                                                      const at::Tensor& survival, const at::Tensor& grad_weights,
                                                      const at::Tensor& grad_accumulated,
                                                      const at::Tensor& grad_opacity, const at::Tensor& grad_depth) {
  const auto [S, C, R] = check_composite_backward_inputs(Tier::kCpu, values, t_starts, t_ends, ray_offsets_tensor,
                                                         weights, transmittance, survival, grad_weights,
                                                         grad_accumulated, grad_opacity, grad_depth);

  const int64_t* offsets = ray_offsets_tensor.data_ptr<int64_t>();
  TORCH_CHECK(R >= 0 && offsets[0] == 0 && offsets[R] == S, "composite_backward: bad ray_offsets");
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(offsets[r] <= offsets[r + 1], "composite_backward: ray_offsets must be non-decreasing");
  const float* values_in = values.data_ptr<float>();
  const float* t0 = t_starts.data_ptr<float>();
  const float* t1 = t_ends.data_ptr<float>();
  const float* w_in = weights.data_ptr<float>();
  const float* T_in = transmittance.data_ptr<float>();
  const float* e_in = survival.data_ptr<float>();
  const float* g_w = grad_weights.data_ptr<float>();
  const float* g_acc = grad_accumulated.data_ptr<float>();
  const float* g_op = grad_opacity.data_ptr<float>();
  const float* g_depth = grad_depth.data_ptr<float>();

  // Every entry is written below (offsets cover [0, S) exactly).
  at::Tensor grad_sigmas = pooled({S}, values.options());
  at::Tensor grad_values = pooled({S, C}, values.options());
  float* gs = grad_sigmas.data_ptr<float>();
  float* gv = grad_values.data_ptr<float>();

  with_channels(C, [&](auto channels) {
    constexpr int64_t kC = decltype(channels)::value;
    const int64_t Cr = kC > 0 ? kC : C;
#pragma omp parallel
    {
      std::vector<double> G;  // per sample of the ray: dL/dw (0 where terminated)
#pragma omp for schedule(dynamic, 16)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t begin = offsets[r], end = offsets[r + 1];
        const float* ga = g_acc + r * Cr;
        if (static_cast<int64_t>(G.size()) < end - begin) G.resize(static_cast<size_t>(end - begin));
        for (int64_t i = begin; i < end; ++i) {
          float* gvi = gv + i * Cr;
          if (T_in[i] == 0.0f) {  // terminated: zero weight, zero gradient, nothing added to the suffix
            std::fill(gvi, gvi + Cr, 0.0f);
            G[i - begin] = 0.0;
            continue;
          }
          const float* v = values_in + i * Cr;
          double Gi = static_cast<double>(g_w[i]) + g_op[r] +
                      static_cast<double>(g_depth[r]) * (0.5 * (static_cast<double>(t0[i]) + t1[i]));
          for (int64_t c = 0; c < Cr; ++c) {
            Gi += static_cast<double>(ga[c]) * v[c];
            gvi[c] = w_in[i] * ga[c];
          }
          G[i - begin] = Gi;
        }
        double suffix = 0.0;  // sum_{i > j} G_i w_i
        for (int64_t i = end - 1; i >= begin; --i) {
          const double Gi = G[i - begin];
          const double d_sd = Gi * T_in[i] * e_in[i] - suffix;
          suffix += Gi * w_in[i];
          const float delta = t1[i] - t0[i];
          gs[i] = static_cast<float>(d_sd * delta);
        }
      }
    }
  });
  return {grad_sigmas, grad_values};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cpu, m) {
  m.def(
      "march_rays(Tensor origins, Tensor dirs, Tensor t_min, Tensor t_max, Tensor aabb, Tensor occupancy, "
      "int resolution, float step_size, Tensor? jitter, int max_samples) -> (Tensor ray_indices, "
      "Tensor t_starts, Tensor t_ends)",
      &march_rays);
  m.def(
      "composite_forward(Tensor sigmas, Tensor values, Tensor t_starts, Tensor t_ends, Tensor ray_indices, "
      "int num_rays, float transmittance_threshold) -> (Tensor weights, Tensor accumulated, Tensor opacity, "
      "Tensor depth, Tensor ray_offsets, Tensor transmittance, Tensor survival)",
      &composite_forward);
  m.def(
      "composite_backward(Tensor values, Tensor t_starts, Tensor t_ends, Tensor ray_offsets, Tensor weights, "
      "Tensor transmittance, Tensor survival, Tensor grad_weights, Tensor grad_accumulated, Tensor grad_opacity, "
      "Tensor grad_depth) -> (Tensor grad_sigmas, Tensor grad_values)",
      &composite_backward);
}
