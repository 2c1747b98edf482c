// Multiresolution hash-grid encoding (Instant-NGP / tiny-cuda-nn HashGrid), cpu tier (C++/OpenMP)
// with a hand-written backward for the table and for the positions.
//
// Semantics: lift3d/kernels/hashgrid.py (the reference tier is the definition). Inputs have D = 3
// (x, y, z) or D = 4 (x, y, z, t) dims, a compile-time parameter of every kernel below. Per level l
// with scale s, resolution r, slice of `size` rows at `offset`: x is clamped to [0, 1] (NaN -> 0),
// p = x * s + 0.5, g = floor(p), t = p - g; corner c in {0,1}^D (bit d = axis d) is looked up at
//   dense:  (cx + cy r + cz r^2 [+ ct r^3]) % size          (uint32)
//   hashed: (cx ^ cy 2654435761 ^ cz 805459861 [^ ct 3674653429]) % size   (uint32, tcnn's primes)
// and blended (tri/quadri)linearly. Output [N, L*F] level-major; levels >= active_levels are zeros.
//
// Layout of the work: the positions are clamped once per call into a structure of arrays. A
// level is then visited in blocks of 16 points: the corner rows and weights of a whole block are
// computed together (plain loops over the block that the compiler vectorises; an AVX2 build is
// picked at run time where the CPU has it, LIFT3D_KERNELS_NO_AVX2=1 forces the baseline), and the
// 128 rows of the next block are prefetched while the current one reads or updates the table.
// The kernels are bound by those random table accesses (a hashed level's slice is 4 MB at
// T = 2^19), so the aim is many of them in flight and few instructions around them.
//
// Parallelism and determinism (no float atomics; bit-identical for any thread count, and between
// the AVX2 and baseline builds: the same IEEE operations in the same order, nothing contracted):
//  - forward: level by level, so one level's slice of the table stays cache-resident (as tcnn
//    does); within a level, OpenMP over chunks of points. Outputs go to a level-major buffer
//    (each level streams its own), transposed to [N, L*F] at the end.
//  - backward, table: OpenMP over levels. A level's slice of the gradient is written by one thread
//    visiting the points in index order, so every entry is summed in a fixed order.
//  - backward, positions: level by level, OpenMP over chunks of points; each point sums its
//    levels in order.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "cpu_output_pool.h"

namespace {

// tcnn's coherent prime hash factors per axis (x's is 1).
constexpr uint32_t kPrimes[4] = {1u, 2654435761u, 805459861u, 3674653429u};
constexpr int kMaxDims = 4;

struct Level {
  float scale;
  uint32_t resolution;
  uint32_t size;  // rows in this level's slice
  uint32_t mask;  // size - 1 (hashed levels, whose size is a power of two)
  int64_t offset;  // first row of the slice
  bool hashed;
};

std::vector<Level> make_levels(c10::ArrayRef<double> scales, at::IntArrayRef resolutions, at::IntArrayRef offsets,
                               at::IntArrayRef hashed, int64_t table_rows, int64_t D) {
  const size_t L = scales.size();
  TORCH_CHECK(L >= 1, "hashgrid (cpu tier): at least one level is needed");
  TORCH_CHECK(resolutions.size() == L && hashed.size() == L && offsets.size() == L + 1,
              "hashgrid (cpu tier): expected L scales, resolutions and hashed flags and L + 1 offsets");
  TORCH_CHECK(offsets[L] == table_rows, "hashgrid (cpu tier): table has ", table_rows, " rows, levels need ",
              offsets[L]);
  std::vector<Level> levels(L);
  for (size_t l = 0; l < L; ++l) {
    const int64_t size = offsets[l + 1] - offsets[l];
    TORCH_CHECK(size >= 1 && size <= (int64_t{1} << 31), "hashgrid (cpu tier): level ", l, " has bad size ", size);
    TORCH_CHECK(resolutions[l] >= 1 && resolutions[l] < (int64_t{1} << 31), "hashgrid (cpu tier): bad resolution");
    const bool is_hashed = hashed[l] != 0;
    const int64_t res = resolutions[l];
    const float scale = static_cast<float>(scales[l]);
    TORCH_CHECK(std::isfinite(scale) && scale >= 0.0f && scale < 1e9f, "hashgrid (cpu tier): bad scale ", scales[l]);
    if (is_hashed) {
      TORCH_CHECK((size & (size - 1)) == 0, "hashgrid (cpu tier): hashed level ", l, " must have a power-of-two size");
    } else {
      // Corners reach res per axis, so the dense index is at most res + res^2 + ... + res^D; one
      // conditional subtraction must be a full modulo, i.e. that bound must stay below 2 size.
      // The top corner is floor(scale + 0.5) + 1; it must not pass res for that bound to hold.
      int64_t bound = 0, power = 1;
      for (int64_t d = 0; d < D && res <= 2048; ++d) bound += (power *= res);  // res <= 2048: no int64 overflow
      TORCH_CHECK(static_cast<int64_t>(scale + 0.5f) + 1 <= res && res <= 2048 && bound < 2 * size,
                  "hashgrid (cpu tier): dense level ", l, " (scale ", scale, ", resolution ", res,
                  ") does not fit its ", size, " rows");
    }
    Level& lv = levels[l];
    lv.scale = scale;
    lv.resolution = static_cast<uint32_t>(res);
    lv.size = static_cast<uint32_t>(size);
    lv.mask = static_cast<uint32_t>(size - 1);
    lv.offset = offsets[l];
    lv.hashed = is_hashed;
  }
  return levels;
}

void check_inputs(const at::Tensor& positions, const at::Tensor& table) {
  TORCH_CHECK(positions.device().is_cpu() && table.device().is_cpu(), "hashgrid (cpu tier): tensors must be on the CPU");
  TORCH_CHECK(positions.scalar_type() == at::kFloat && table.scalar_type() == at::kFloat,
              "hashgrid (cpu tier): positions and table must be float32, got ", positions.scalar_type(), " and ",
              table.scalar_type());
  TORCH_CHECK(positions.is_contiguous() && table.is_contiguous(), "hashgrid (cpu tier): inputs must be contiguous");
  TORCH_CHECK(positions.dim() == 2 && (positions.size(1) == 3 || positions.size(1) == 4),
              "hashgrid (cpu tier): positions must be [N, 3] or [N, 4], got ", positions.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) >= 1, "hashgrid (cpu tier): table must be [rows, F], got ",
              table.sizes());
}

// Calls fn with a compile-time feature count for tcnn's F in {1, 2, 4, 8} (0 = runtime F).
template <typename Fn>
void dispatch_features(int64_t F, Fn&& fn) {
  switch (F) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

// Calls fn with the compile-time input dimension D in {3, 4} (checked by check_inputs).
template <typename Fn>
void dispatch_dims(int64_t D, Fn&& fn) {
  if (D == 4) {
    fn(std::integral_constant<int, 4>{});
  } else {
    fn(std::integral_constant<int, 3>{});
  }
}

// Scratch buffers are per thread and kept between calls, in 2 MiB pages where granted: fresh
// memory costs a page fault and a zeroing per page on first touch (see cpu_output_pool.h, which
// recycles the outputs for the same reason).
enum class Scratch { kLevelMajor, kPoints };

// The calling thread's scratch buffer `kind` of at least `count` floats (grown, never shrunk, reused).
template <Scratch kind>
float* thread_scratch(size_t count) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < count) {
    buffer = std::vector<float>();
    buffer.reserve(count);
    lift3d_cpu::advise_huge_pages(buffer.data(), count * sizeof(float));
    buffer.resize(count);
  }
  return buffer.data();
}

#define HASHGRID_INLINE inline __attribute__((always_inline))

constexpr int64_t kBlock = 16;  // points located together: two AVX2 vectors (four SSE ones) of floats
constexpr int64_t kChunk = 4096;  // points per OpenMP work item in the point-parallel loops

// Clamped positions as a structure of arrays (D of them), padded with zeros past N up to whole
// blocks (a block may start anywhere below N and always reads kBlock points), and per point the
// axes where the clamp passes the gradient (bit d: x_d within [0, 1]; NaN is outside).
struct Points {
  const float* coord[kMaxDims];
  const uint8_t* inside;
};

inline int64_t padded_points(int64_t N) { return (N + 2 * kBlock - 1) / kBlock * kBlock; }

Points prepare_points(const float* __restrict__ x, int64_t N, int D) {
  const int64_t padded = padded_points(N);
  // D coordinate arrays and the flags (a quarter of one more float array's bytes).
  float* buffer = thread_scratch<Scratch::kPoints>(static_cast<size_t>((D + 1) * padded));
  Points points{};
  float* coord[kMaxDims] = {};
  for (int d = 0; d < D; ++d) points.coord[d] = coord[d] = buffer + d * padded;
  uint8_t* inside = reinterpret_cast<uint8_t*>(buffer + D * padded);
  points.inside = inside;
  at::parallel_for(0, padded, kChunk, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      uint8_t flags = 0;
      for (int d = 0; d < D; ++d) {
        const float v = i < N ? x[D * i + d] : 0.0f;
        if (v >= 0.0f && v <= 1.0f) flags |= static_cast<uint8_t>(1u << d);
        coord[d][i] = v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f;  // NaN -> 0
      }
      inside[i] = flags;
    }
  });
  return points;
}

// One block of points at one level: per corner (2^D of them) the row within the level's slice and
// the multilinear weight, and the fractions t (structure of arrays: the loops below vectorise).
template <int kD>
struct alignas(64) Block {
  static constexpr int kCorners = 1 << kD;
  uint32_t index[kCorners][kBlock];
  float weight[kCorners][kBlock];
  float t[kD][kBlock];
};

template <int kD, bool kHashed>
HASHGRID_INLINE void locate_block(const Level& lv, const Points& points, int64_t first, Block<kD>& block) {
  int32_t cell[kD][kBlock];
  for (int d = 0; d < kD; ++d) {
    const float* coord = points.coord[d] + first;
    for (int64_t k = 0; k < kBlock; ++k) {
      const float p = coord[k] * lv.scale + 0.5f;
      // p >= 0.5, so truncation is floor (and avoids a libm call: baseline x86-64 has no roundss).
      cell[d][k] = static_cast<int32_t>(p);
      block.t[d][k] = p - static_cast<float>(cell[d][k]);
    }
  }
  constexpr int kCorners = 1 << kD;
  // Corner c takes axis d's high term where bit d of c is set. Every loop but the one over the
  // block's points has compile-time bounds and is unrolled, so each corner is straight-line code
  // and the point loop vectorises (left as loops over corners and axes, the compiler kept them
  // scalar: 1.8x slower at 2^18 points). uint32 arithmetic wraps as tcnn's does, so the order in
  // which the axes' terms are combined does not matter; the weights multiply in the reference's
  // order, w_x * w_y * w_z [* w_t].
  for (int64_t k = 0; k < kBlock; ++k) {
    uint32_t lo[kD], hi[kD];
    float w_lo[kD], w_hi[kD];
    uint32_t stride = 1;  // dense levels: r^d
#pragma GCC unroll 4
    for (int d = 0; d < kD; ++d) {
      const uint32_t step = kHashed ? kPrimes[d] : stride;
      lo[d] = static_cast<uint32_t>(cell[d][k]) * step;
      hi[d] = lo[d] + step;
      w_lo[d] = 1.0f - block.t[d][k];
      w_hi[d] = block.t[d][k];
      stride *= lv.resolution;
    }
#pragma GCC unroll 16
    for (int c = 0; c < kCorners; ++c) {
      uint32_t index = (c & 1) ? hi[0] : lo[0];
      float weight = (c & 1) ? w_hi[0] : w_lo[0];
#pragma GCC unroll 4
      for (int d = 1; d < kD; ++d) {
        const bool high = (c >> d) & 1;
        if constexpr (kHashed) {
          index ^= high ? hi[d] : lo[d];
        } else {
          index += high ? hi[d] : lo[d];
        }
        weight *= high ? w_hi[d] : w_lo[d];
      }
      if constexpr (kHashed) {
        block.index[c][k] = index & lv.mask;
      } else {
        // Corners reach at most res per axis, so the dense index is < 2 size (checked in
        // make_levels): one conditional subtraction is the modulo.
        block.index[c][k] = index >= lv.size ? index - lv.size : index;
      }
      block.weight[c][k] = weight;
    }
  }
}

// Prefetches the rows of the first `count` points of a block (for writing if kWrite).
template <bool kWrite, int kD>
HASHGRID_INLINE void prefetch_block(const Block<kD>& block, const float* rows, int64_t F, int64_t count) {
  for (int c = 0; c < Block<kD>::kCorners; ++c) {
    for (int64_t k = 0; k < count; ++k) __builtin_prefetch(rows + static_cast<int64_t>(block.index[c][k]) * F, kWrite, 3);
  }
}

// Visits points [begin, end) of one level block by block, in order: body(first, count, block).
// The next block is located and its rows (in `rows`, the level's slice) prefetched before the
// current block's body runs, so 128 random accesses are in flight while it works.
template <int kD, bool kHashed, bool kWrite, typename Body>
HASHGRID_INLINE void for_each_block_of(const Level& lv, const Points& points, int64_t begin, int64_t end,
                                       const float* rows, int64_t F, Body&& body) {
  if (begin >= end) return;
  Block<kD> blocks[2];
  locate_block<kD, kHashed>(lv, points, begin, blocks[0]);
  prefetch_block<kWrite>(blocks[0], rows, F, std::min(kBlock, end - begin));
  int current = 0;
  for (int64_t first = begin; first < end; first += kBlock, current ^= 1) {
    const int64_t next = first + kBlock;
    // The coordinates are streamed, but the table's random accesses crowd out the hardware
    // prefetcher: fetch them a few blocks early (past the padding is harmless, prefetches do not fault).
    for (int d = 0; d < kD; ++d) __builtin_prefetch(points.coord[d] + first + 4 * kBlock, 0, 3);
    if (next < end) {
      locate_block<kD, kHashed>(lv, points, next, blocks[current ^ 1]);
      prefetch_block<kWrite>(blocks[current ^ 1], rows, F, std::min(kBlock, end - next));
    }
    body(first, std::min(kBlock, end - first), blocks[current]);
  }
}

template <int kD, bool kWrite, typename Body>
HASHGRID_INLINE void for_each_block(const Level& lv, const Points& points, int64_t begin, int64_t end,
                                    const float* rows, int64_t F, Body&& body) {
  if (lv.hashed) {
    for_each_block_of<kD, true, kWrite>(lv, points, begin, end, rows, F, body);
  } else {
    for_each_block_of<kD, false, kWrite>(lv, points, begin, end, rows, F, body);
  }
}

// Forward of points [begin, end) at one level into the level-major output of that level.
template <int kD, int kF>
HASHGRID_INLINE void forward_range(const Level& lv, const Points& points, const float* __restrict__ table,
                                   float* __restrict__ level_out, int64_t begin, int64_t end, int64_t F_runtime) {
  constexpr int kCorners = 1 << kD;
  const int64_t F = kF > 0 ? kF : F_runtime;
  const float* rows = table + lv.offset * F;
  for_each_block<kD, /*kWrite=*/false>(lv, points, begin, end, rows, F, [&](int64_t first, int64_t count,
                                                                           const Block<kD>& b) {
    for (int64_t k = 0; k < count; ++k) {
      float* out = level_out + (first + k) * F;
      if constexpr (kF > 0) {
        float acc[kF] = {};
        for (int c = 0; c < kCorners; ++c) {
          const float* row = rows + static_cast<int64_t>(b.index[c][k]) * kF;
          const float w = b.weight[c][k];
          for (int f = 0; f < kF; ++f) acc[f] += w * row[f];
        }
        for (int f = 0; f < kF; ++f) out[f] = acc[f];
      } else {
        for (int64_t f = 0; f < F; ++f) out[f] = 0.0f;
        for (int c = 0; c < kCorners; ++c) {
          const float* row = rows + static_cast<int64_t>(b.index[c][k]) * F;
          const float w = b.weight[c][k];
          for (int64_t f = 0; f < F; ++f) out[f] += w * row[f];
        }
      }
    }
  });
}

// Table gradient of points [begin, end) at one level: w_c * grad added into the level's slice of
// grad_table, points in index order (the caller gives a level's slice to one thread).
template <int kD, int kF>
HASHGRID_INLINE void scatter_range(const Level& lv, const Points& points, const float* __restrict__ grad_level,
                                   float* __restrict__ grad_table, int64_t begin, int64_t end, int64_t F_runtime) {
  constexpr int kCorners = 1 << kD;
  const int64_t F = kF > 0 ? kF : F_runtime;
  float* rows = grad_table + lv.offset * F;
  for_each_block<kD, /*kWrite=*/true>(lv, points, begin, end, rows, F, [&](int64_t first, int64_t count,
                                                                          const Block<kD>& b) {
    for (int64_t k = 0; k < count; ++k) {
      const float* g = grad_level + (first + k) * F;
      if constexpr (kF > 0) {
        float gk[kF];  // in registers: the row updates below cannot alias it
        for (int f = 0; f < kF; ++f) gk[f] = g[f];
        for (int c = 0; c < kCorners; ++c) {
          float* row = rows + static_cast<int64_t>(b.index[c][k]) * kF;
          const float w = b.weight[c][k];
          for (int f = 0; f < kF; ++f) row[f] += w * gk[f];
        }
      } else {
        for (int c = 0; c < kCorners; ++c) {
          float* row = rows + static_cast<int64_t>(b.index[c][k]) * F;
          const float w = b.weight[c][k];
          for (int64_t f = 0; f < F; ++f) row[f] += w * g[f];
        }
      }
    }
  });
}

// Position gradient of points [begin, end) at one level, added to grad_positions:
// d out / d x_d = scale * sum_c (d w_c / d t_d) <grad, feature_c>, zero where the clamp is active.
template <int kD, int kF>
HASHGRID_INLINE void position_range(const Level& lv, const Points& points, const float* __restrict__ table,
                                    const float* __restrict__ grad_level, float* __restrict__ grad_positions,
                                    int64_t begin, int64_t end, int64_t F_runtime) {
  constexpr int kCorners = 1 << kD;
  const int64_t F = kF > 0 ? kF : F_runtime;
  const float* rows = table + lv.offset * F;
  for_each_block<kD, /*kWrite=*/false>(lv, points, begin, end, rows, F, [&](int64_t first, int64_t count,
                                                                           const Block<kD>& b) {
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = first + k;
      const float* g = grad_level + i * F;
      float w[kD][2];  // per axis: the lower and upper corner's factor
      for (int d = 0; d < kD; ++d) {
        w[d][0] = 1.0f - b.t[d][k];
        w[d][1] = b.t[d][k];
      }
      float dt[kD] = {};
      for (int c = 0; c < kCorners; ++c) {
        const float* row = rows + static_cast<int64_t>(b.index[c][k]) * F;
        float s = 0.0f;  // <grad, feature of corner c>
        for (int64_t f = 0; f < F; ++f) s += g[f] * row[f];
        // d w_c / d t_d is +-1 (upper / lower corner along d) times the other factors, in axis order.
        for (int d = 0; d < kD; ++d) {
          float others = 1.0f;  // 1 * w is exact, so this is w_y * w_z for d = 0 in 3-D
          for (int e = 0; e < kD; ++e) {
            if (e != d) others *= w[e][(c >> e) & 1];
          }
          dt[d] += (((c >> d) & 1) ? s : -s) * others;
        }
      }
      const uint8_t inside = points.inside[i];
      for (int d = 0; d < kD; ++d) {
        if (inside & (1u << d)) grad_positions[kD * i + d] += dt[d] * lv.scale;
      }
    }
  });
}

// Each range kernel is compiled twice, for baseline x86-64 and for AVX2, and picked per call (for
// each input dimension and feature count).
using ForwardFn = void (*)(const Level&, const Points&, const float*, float*, int64_t, int64_t, int64_t);
using ScatterFn = void (*)(const Level&, const Points&, const float*, float*, int64_t, int64_t, int64_t);
using PositionFn = void (*)(const Level&, const Points&, const float*, const float*, float*, int64_t, int64_t,
                            int64_t);

template <int kD, int kF>
void forward_baseline(const Level& lv, const Points& p, const float* table, float* out, int64_t begin, int64_t end,
                      int64_t F) {
  forward_range<kD, kF>(lv, p, table, out, begin, end, F);
}
template <int kD, int kF>
void scatter_baseline(const Level& lv, const Points& p, const float* grad, float* grad_table, int64_t begin,
                      int64_t end, int64_t F) {
  scatter_range<kD, kF>(lv, p, grad, grad_table, begin, end, F);
}
template <int kD, int kF>
void position_baseline(const Level& lv, const Points& p, const float* table, const float* grad, float* grad_positions,
                       int64_t begin, int64_t end, int64_t F) {
  position_range<kD, kF>(lv, p, table, grad, grad_positions, begin, end, F);
}

#ifdef LIFT3D_CPU_X86
template <int kD, int kF>
__attribute__((target("avx2"))) void forward_avx2(const Level& lv, const Points& p, const float* table, float* out,
                                                  int64_t begin, int64_t end, int64_t F) {
  forward_range<kD, kF>(lv, p, table, out, begin, end, F);
}
template <int kD, int kF>
__attribute__((target("avx2"))) void scatter_avx2(const Level& lv, const Points& p, const float* grad,
                                                  float* grad_table, int64_t begin, int64_t end, int64_t F) {
  scatter_range<kD, kF>(lv, p, grad, grad_table, begin, end, F);
}
template <int kD, int kF>
__attribute__((target("avx2"))) void position_avx2(const Level& lv, const Points& p, const float* table,
                                                   const float* grad, float* grad_positions, int64_t begin,
                                                   int64_t end, int64_t F) {
  position_range<kD, kF>(lv, p, table, grad, grad_positions, begin, end, F);
}
#endif

// The range kernels of one input dimension and feature count, in the build for this CPU.
struct RangeKernels {
  ForwardFn forward;
  ScatterFn scatter;
  PositionFn position;
};

template <int kD, int kF>
RangeKernels range_kernels_for_this_cpu() {
#ifdef LIFT3D_CPU_X86
  if (lift3d_cpu::use_avx2()) return {forward_avx2<kD, kF>, scatter_avx2<kD, kF>, position_avx2<kD, kF>};
#endif
  return {forward_baseline<kD, kF>, scatter_baseline<kD, kF>, position_baseline<kD, kF>};
}

RangeKernels range_kernels(int64_t D, int64_t F) {
  RangeKernels kernels{};
  dispatch_features(F, [&](auto kF) {
    dispatch_dims(D, [&](auto kD) { kernels = range_kernels_for_this_cpu<decltype(kD)::value, decltype(kF)::value>(); });
  });
  return kernels;
}

// Calls fn(level, begin, end) for levels 0 .. count - 1, one level after another, with OpenMP over
// chunks of points within a level. The barrier after each level keeps all threads on one level,
// so its slice of the table stays cache-resident (as tcnn does), and every point sees its levels
// in order, so per-point sums over levels are deterministic.
template <typename Fn>
void for_levels_in_order(int64_t count, int64_t N, int threads, Fn&& fn) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(threads)
  for (int64_t l = 0; l < count; ++l) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) fn(l, chunk * kChunk, std::min(N, (chunk + 1) * kChunk));
  }
}

// Moves level-major values [A, N, F] to point-major rows [N, L*F], levels >= A as zeros
// (kToPoints), or point-major rows back to level-major for the first A levels. Blocks of points
// keep both sides' cache lines hot, so this is two streams over memory; ATen's generic
// permute + contiguous copy took about a fifth of the whole forward + backward at 2^18 points.
template <int kF, bool kToPoints>
void transpose_levels(const float* __restrict__ src, float* __restrict__ dst, int64_t N, int64_t L, int64_t A,
                      int64_t F_runtime) {
  const int64_t F = kF > 0 ? kF : F_runtime;
  constexpr int64_t kBlock = 256;  // points per block: 256 rows of L*F floats (32 KiB at L*F = 32)
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 16, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * kBlock, end = std::min(N, begin + kBlock);
      for (int64_t l = 0; l < (kToPoints ? L : A); ++l) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t level_index = (l * N + i) * F, point_index = i * L * F + l * F;
          for (int64_t f = 0; f < F; ++f) {
            if constexpr (kToPoints) {
              dst[point_index + f] = l < A ? src[level_index + f] : 0.0f;
            } else {
              dst[level_index + f] = src[point_index + f];
            }
          }
        }
      }
    }
  });
}

at::Tensor hashgrid_forward(const at::Tensor& positions, const at::Tensor& table, c10::ArrayRef<double> scales,
                            at::IntArrayRef resolutions, at::IntArrayRef offsets, at::IntArrayRef hashed,
                            int64_t active_levels) {
  check_inputs(positions, table);
  const int64_t D = positions.size(1);
  const std::vector<Level> levels = make_levels(scales, resolutions, offsets, hashed, table.size(0), D);
  const int64_t L = static_cast<int64_t>(levels.size());
  TORCH_CHECK(active_levels >= 0 && active_levels <= L, "hashgrid (cpu tier): active_levels out of range");
  const int64_t N = positions.size(0), F = table.size(1);
  at::Tensor features = lift3d_cpu::OutputPool::take({N, L * F}, positions.options()).tensor;
  if (N == 0) return features;
  // Level-major scratch for the active levels only (one level pass then streams its output).
  float* level_major = thread_scratch<Scratch::kLevelMajor>(static_cast<size_t>(std::max<int64_t>(active_levels, 1) * N * F));
  const float* tab = table.data_ptr<float>();
  dispatch_features(F, [&](auto kF) {
    constexpr int kFeatures = decltype(kF)::value;
    if (active_levels > 0) {
      const Points points = prepare_points(positions.data_ptr<float>(), N, static_cast<int>(D));
      const ForwardFn forward = range_kernels(D, F).forward;
      for_levels_in_order(active_levels, N, at::get_num_threads(), [&](int64_t l, int64_t begin, int64_t end) {
        forward(levels[l], points, tab, level_major + l * N * F, begin, end, F);
      });
    }
    transpose_levels<kFeatures, /*kToPoints=*/true>(level_major, features.data_ptr<float>(), N, L, active_levels, F);
  });
  return features;
}

std::tuple<at::Tensor, at::Tensor> hashgrid_backward(const at::Tensor& grad_features, const at::Tensor& positions,
                                                     const at::Tensor& table, c10::ArrayRef<double> scales,
                                                     at::IntArrayRef resolutions, at::IntArrayRef offsets,
                                                     at::IntArrayRef hashed, int64_t active_levels, bool need_table,
                                                     bool need_positions) {
  check_inputs(positions, table);
  const int64_t D = positions.size(1);
  const std::vector<Level> levels = make_levels(scales, resolutions, offsets, hashed, table.size(0), D);
  const int64_t L = static_cast<int64_t>(levels.size());
  TORCH_CHECK(active_levels >= 0 && active_levels <= L, "hashgrid (cpu tier): active_levels out of range");
  const int64_t N = positions.size(0), F = table.size(1);
  TORCH_CHECK(grad_features.scalar_type() == at::kFloat && grad_features.dim() == 2 && grad_features.size(0) == N &&
                  grad_features.size(1) == L * F,
              "hashgrid (cpu tier): grad_features must be float32 [N, L*F], got ", grad_features.sizes());

  using lift3d_cpu::OutputPool;
  const OutputPool::Buffer grad_table_buffer =
      need_table ? OutputPool::take(table.sizes(), table.options()) : OutputPool::Buffer{at::empty({0}, table.options()), true};
  const at::Tensor& grad_table = grad_table_buffer.tensor;
  at::Tensor grad_positions = at::empty({0}, positions.options());
  if (need_positions) {
    const OutputPool::Buffer buffer = OutputPool::take({N, D}, positions.options());
    grad_positions = buffer.tensor;
    if (!buffer.zeroed) grad_positions.zero_();
  }
  const bool work = active_levels > 0 && N > 0;
  // Level-major copy of the active levels' gradients, so each level pass reads a contiguous stream.
  const at::Tensor grad_point_major = grad_features.contiguous();
  float* grad_levels = work ? thread_scratch<Scratch::kLevelMajor>(static_cast<size_t>(active_levels * N * F)) : nullptr;
  Points points{};
  if (work) {
    dispatch_features(F, [&](auto kF) {
      transpose_levels<decltype(kF)::value, /*kToPoints=*/false>(grad_point_major.data_ptr<float>(), grad_levels, N, L,
                                                                 active_levels, F);
    });
    points = prepare_points(positions.data_ptr<float>(), N, static_cast<int>(D));
  }
  const float* tab = table.data_ptr<float>();
  const float* g = grad_levels;
  const int threads = at::get_num_threads();

  const RangeKernels kernels = range_kernels(D, F);
  if (need_table) {
    float* gt = grad_table.data_ptr<float>();
    // A level's slice of grad_table belongs to one thread, which visits the points in index
    // order: every entry is summed in a fixed order, for any thread count. No atomics.
    const bool zeroed = grad_table_buffer.zeroed;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t l = L - 1; l >= 0; --l) {  // finest (slowest) levels first balances the threads
      const Level& lv = levels[l];
      // Recycled memory is zeroed here rather than up front: in parallel, and the slice is then
      // warm in this thread's cache.
      if (!zeroed) std::memset(gt + lv.offset * F, 0, sizeof(float) * static_cast<size_t>(lv.size) * F);
      if (l < active_levels && N > 0) kernels.scatter(lv, points, g + l * N * F, gt, 0, N, F);
    }
  }
  if (need_positions && work) {
    float* gp = grad_positions.data_ptr<float>();
    // Each point sums its levels in order: deterministic too.
    for_levels_in_order(active_levels, N, threads, [&](int64_t l, int64_t begin, int64_t end) {
      kernels.position(levels[l], points, tab, g + l * N * F, gp, begin, end, F);
    });
  }
  return {grad_table, grad_positions};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cpu, m) {
  m.def(
      "hashgrid_forward(Tensor positions, Tensor table, float[] scales, int[] resolutions, int[] offsets, "
      "int[] hashed, int active_levels) -> Tensor",
      &hashgrid_forward);
  m.def(
      "hashgrid_backward(Tensor grad_features, Tensor positions, Tensor table, float[] scales, int[] resolutions, "
      "int[] offsets, int[] hashed, int active_levels, bool need_table, bool need_positions) -> "
      "(Tensor grad_table, Tensor grad_positions)",
      &hashgrid_backward);
}
