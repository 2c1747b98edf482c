// Multiresolution hash-grid encoding (Instant-NGP / tiny-cuda-nn HashGrid), cpu tier (C++/OpenMP)
// with a hand-written backward for the table and for the positions.
//
// Semantics: lift3d/kernels/hashgrid.py (the reference tier is the definition). Per level l with
// scale s, resolution r, slice of `size` rows at `offset`: x is clamped to [0, 1] (NaN -> 0),
// p = x * s + 0.5, g = floor(p), t = p - g; corner c in {0,1}^3 (bit 0 = x) is looked up at
//   dense:  (cx + cy r + cz r^2) % size          (uint32)
//   hashed: (cx ^ cy 2654435761 ^ cz 805459861) % size   (uint32, tcnn's coherent prime hash)
// and blended trilinearly. Output [N, L*F] level-major; levels >= active_levels are zeros.
//
// Parallelism and determinism:
//  - forward: OpenMP over points (a contiguous range per thread), levels one after another, so one
//    level's slice of the table stays cache-resident (as tcnn does); every output is written by
//    exactly one thread, into a level-major buffer transposed at the end.
//  - backward, table: OpenMP over levels. A level's slice of the gradient is written by one thread
//    visiting the points in index order, so every entry is summed in a fixed order: no float
//    atomics, bit-identical results for any thread count. (Parallelism is capped at L = 16 by
//    default, plenty for a CPU; per-thread partial tables would cost L * T * F floats each.)
//  - backward, positions: OpenMP over points; each point sums its levels in order.
//  Corner rows are located a few points ahead and prefetched, so several points' random table
//  accesses are in flight at once: the kernels are bound by the latency of those accesses.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr uint32_t kPrimeY = 2654435761u;
constexpr uint32_t kPrimeZ = 805459861u;

struct Level {
  float scale;
  uint32_t resolution;
  uint32_t size;  // rows in this level's slice
  uint32_t mask;  // size - 1 (hashed levels, whose size is a power of two)
  int64_t offset;  // first row of the slice
  bool hashed;
};

// One point at one level: the 8 corner rows (absolute, in the table) and the fractions.
struct Cell {
  int64_t row[8];
  float t[3];
  bool inside[3];  // x_d within [0, 1] (clamp passes the gradient); false for NaN
};

__attribute__((always_inline)) inline void locate(const Level& lv, const float* x, Cell& cell) {
  uint32_t g[3];
  for (int d = 0; d < 3; ++d) {
    const float v = x[d];
    cell.inside[d] = v >= 0.0f && v <= 1.0f;
    const float clamped = v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f;  // NaN -> 0
    const float p = clamped * lv.scale + 0.5f;
    // p >= 0.5, so truncation is floor (and avoids a libm call: baseline x86-64 has no roundss).
    g[d] = static_cast<uint32_t>(static_cast<int32_t>(p));
    cell.t[d] = p - static_cast<float>(g[d]);
  }
  uint32_t ax[2], ay[2], az[2];  // per-axis terms of the index for the low and high corner
  if (lv.hashed) {
    ax[0] = g[0];
    ax[1] = g[0] + 1u;
    ay[0] = g[1] * kPrimeY;
    ay[1] = (g[1] + 1u) * kPrimeY;
    az[0] = g[2] * kPrimeZ;
    az[1] = (g[2] + 1u) * kPrimeZ;
    for (int c = 0; c < 8; ++c) {
      cell.row[c] = lv.offset + ((ax[c & 1] ^ ay[(c >> 1) & 1] ^ az[(c >> 2) & 1]) & lv.mask);
    }
  } else {
    const uint32_t r = lv.resolution, r2 = r * r;
    ax[0] = g[0];
    ax[1] = g[0] + 1u;
    ay[0] = g[1] * r;
    ay[1] = (g[1] + 1u) * r;
    az[0] = g[2] * r2;
    az[1] = (g[2] + 1u) * r2;
    for (int c = 0; c < 8; ++c) {
      // Corners reach at most res per axis, so the dense index is < 2 size (checked in make_levels):
      // one conditional subtraction is the modulo.
      const uint32_t i = ax[c & 1] + ay[(c >> 1) & 1] + az[(c >> 2) & 1];
      cell.row[c] = lv.offset + (i >= lv.size ? i - lv.size : i);
    }
  }
}

// Trilinear weights w_c = wx * wy * wz in the reference's multiplication order.
inline void corner_weights(const float t[3], float w[8]) {
  const float wx[2] = {1.0f - t[0], t[0]};
  const float wy[2] = {1.0f - t[1], t[1]};
  const float wz[2] = {1.0f - t[2], t[2]};
  for (int c = 0; c < 8; ++c) w[c] = wx[c & 1] * wy[(c >> 1) & 1] * wz[(c >> 2) & 1];
}

std::vector<Level> make_levels(c10::ArrayRef<double> scales, at::IntArrayRef resolutions, at::IntArrayRef offsets,
                               at::IntArrayRef hashed, int64_t table_rows) {
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
      // Corners reach res per axis, so the dense index is at most res + res^2 + res^3; one
      // conditional subtraction must be a full modulo, i.e. that bound must stay below 2 size.
      // The top corner is floor(scale + 0.5) + 1; it must not pass res for that bound to hold.
      TORCH_CHECK(static_cast<int64_t>(scale + 0.5f) + 1 <= res && res <= 2048 &&
                      res + res * res + res * res * res < 2 * size,
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
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3, "hashgrid (cpu tier): positions must be [N, 3], got ",
              positions.sizes());
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

// Fresh multi-megabyte buffers come from mmap and are faulted in page by page on first touch;
// at 2^18 points the outputs and scratch buffers (~150 MB per forward + backward) cost tens of
// milliseconds of page faults. Two remedies: 2 MiB pages where the kernel grants them (a hint,
// THP "madvise" mode), and a per-thread scratch buffer kept between calls.
inline void advise_huge_pages(void* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // failure is harmless
#else
  (void)data;
  (void)bytes;
#endif
}

// The calling thread's scratch of at least `count` floats (grown, never shrunk, reused).
inline float* thread_scratch(size_t count) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < count) {
    buffer = std::vector<float>();
    buffer.reserve(count);
    advise_huge_pages(buffer.data(), count * sizeof(float));
    buffer.resize(count);
  }
  return buffer.data();
}

constexpr int64_t kAhead = 8;  // points located ahead of the one being processed (power of two)

inline void prefetch_rows(const Cell& cell, const float* base, int64_t F, bool for_write) {
  if (base == nullptr) return;
  for (int c = 0; c < 8; ++c) {
    if (for_write) {
      __builtin_prefetch(base + cell.row[c] * F, 1, 3);
    } else {
      __builtin_prefetch(base + cell.row[c] * F, 0, 3);
    }
  }
}

// Visits points [begin, end) of one level in order, calling body(i, cell). Cells are located
// kAhead points early and their rows prefetched from `read` (and `write` for writing), so the
// random table accesses of several points are in flight at once instead of one after another.
template <typename Body>
inline void for_each_cell(const Level& lv, const float* x, int64_t begin, int64_t end, const float* read,
                          const float* write, int64_t F, Body&& body) {
  Cell ring[kAhead];
  const int64_t warm = std::min(end - begin, kAhead);
  for (int64_t k = 0; k < warm; ++k) {
    locate(lv, x + 3 * (begin + k), ring[k]);
    prefetch_rows(ring[k], read, F, false);
    prefetch_rows(ring[k], write, F, true);
  }
  for (int64_t i = begin; i < end; ++i) {
    Cell& slot = ring[(i - begin) & (kAhead - 1)];
    const Cell cell = slot;
    if (i + kAhead < end) {
      locate(lv, x + 3 * (i + kAhead), slot);
      prefetch_rows(slot, read, F, false);
      prefetch_rows(slot, write, F, true);
    }
    body(i, cell);
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

// Writes level-major features [L, N, F]: each level's outputs are contiguous (the caller
// transposes), so a level pass streams its output instead of touching every row of [N, L*F].
template <int kF>
void forward_kernel(const float* __restrict__ x, const float* __restrict__ table, float* __restrict__ out, int64_t N,
                    int64_t F_runtime, const std::vector<Level>& levels, int64_t active) {
  const int64_t F = kF > 0 ? kF : F_runtime;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t begin = N * thread / threads, end = N * (thread + 1) / threads;
    // Level by level, so one level's slice of the table stays cache-resident (as tcnn does).
    for (int64_t l = 0; l < active; ++l) {
      float* level_out = out + l * N * F;
      for_each_cell(levels[l], x, begin, end, table, nullptr, F, [&](int64_t i, const Cell& cell) {
        float w[8];
        corner_weights(cell.t, w);
        float* o = level_out + i * F;
        if constexpr (kF > 0) {
          float acc[kF] = {};
          for (int c = 0; c < 8; ++c) {
            const float* row = table + cell.row[c] * kF;
            for (int f = 0; f < kF; ++f) acc[f] += w[c] * row[f];
          }
          for (int f = 0; f < kF; ++f) o[f] = acc[f];
        } else {
          for (int64_t f = 0; f < F; ++f) o[f] = 0.0f;
          for (int c = 0; c < 8; ++c) {
            const float* row = table + cell.row[c] * F;
            for (int64_t f = 0; f < F; ++f) o[f] += w[c] * row[f];
          }
        }
      });
    }
  }
}

at::Tensor hashgrid_forward(const at::Tensor& positions, const at::Tensor& table, c10::ArrayRef<double> scales,
                            at::IntArrayRef resolutions, at::IntArrayRef offsets, at::IntArrayRef hashed,
                            int64_t active_levels) {
  check_inputs(positions, table);
  const std::vector<Level> levels = make_levels(scales, resolutions, offsets, hashed, table.size(0));
  const int64_t L = static_cast<int64_t>(levels.size());
  TORCH_CHECK(active_levels >= 0 && active_levels <= L, "hashgrid (cpu tier): active_levels out of range");
  const int64_t N = positions.size(0), F = table.size(1);
  at::Tensor features = at::empty({N, L * F}, positions.options());
  if (N == 0) return features;
  advise_huge_pages(features.data_ptr<float>(), sizeof(float) * static_cast<size_t>(features.numel()));
  // Level-major scratch for the active levels only (one level pass then streams its output).
  float* level_major = thread_scratch(static_cast<size_t>(std::max<int64_t>(active_levels, 1) * N * F));
  dispatch_features(F, [&](auto kF) {
    constexpr int kFeatures = decltype(kF)::value;
    if (active_levels > 0) {
      forward_kernel<kFeatures>(positions.data_ptr<float>(), table.data_ptr<float>(), level_major, N, F, levels,
                                active_levels);
    }
    transpose_levels<kFeatures, /*kToPoints=*/true>(level_major, features.data_ptr<float>(), N, L, active_levels, F);
  });
  return features;
}

// Table gradient of one level: scatter w_c * grad into the level's slice, points in index order.
template <int kF>
void scatter_level(const Level& lv, const float* __restrict__ x, const float* __restrict__ grad_level,
                   float* __restrict__ grad_table, int64_t N, int64_t F_runtime) {
  const int64_t F = kF > 0 ? kF : F_runtime;
  for_each_cell(lv, x, 0, N, nullptr, grad_table, F, [&](int64_t i, const Cell& cell) {
    const float* g = grad_level + i * F;
    bool any = false;
    for (int64_t f = 0; f < F; ++f) any |= g[f] != 0.0f;
    if (!any) return;  // nothing flows back from this point at this level
    float w[8];
    corner_weights(cell.t, w);
    for (int c = 0; c < 8; ++c) {
      float* row = grad_table + cell.row[c] * F;
      for (int64_t f = 0; f < F; ++f) row[f] += w[c] * g[f];
    }
  });
}

// Position gradient of points [begin, end) at one level, added to grad_positions:
// d out / d x_d = scale * sum_c (d w_c / d t_d) feature_c, zero where the clamp is active.
template <int kF>
void position_grad_level(const Level& lv, const float* __restrict__ x, const float* __restrict__ table,
                         const float* __restrict__ grad_level, float* __restrict__ grad_positions, int64_t begin,
                         int64_t end, int64_t F_runtime) {
  const int64_t F = kF > 0 ? kF : F_runtime;
  for_each_cell(lv, x, begin, end, table, nullptr, F, [&](int64_t i, const Cell& cell) {
    const float* g = grad_level + i * F;
    const float* t = cell.t;
    const float wx[2] = {1.0f - t[0], t[0]};
    const float wy[2] = {1.0f - t[1], t[1]};
    const float wz[2] = {1.0f - t[2], t[2]};
    float dt[3] = {0.0f, 0.0f, 0.0f};
    for (int c = 0; c < 8; ++c) {
      const float* row = table + cell.row[c] * F;
      float s = 0.0f;  // <grad, feature of corner c>
      for (int64_t f = 0; f < F; ++f) s += g[f] * row[f];
      // d w_c / d t_d is +-1 (upper / lower corner along d) times the other two factors.
      const int bx = c & 1, by = (c >> 1) & 1, bz = (c >> 2) & 1;
      dt[0] += (bx ? s : -s) * (wy[by] * wz[bz]);
      dt[1] += (by ? s : -s) * (wx[bx] * wz[bz]);
      dt[2] += (bz ? s : -s) * (wx[bx] * wy[by]);
    }
    for (int d = 0; d < 3; ++d) {
      if (cell.inside[d]) grad_positions[3 * i + d] += dt[d] * lv.scale;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> hashgrid_backward(const at::Tensor& grad_features, const at::Tensor& positions,
                                                     const at::Tensor& table, c10::ArrayRef<double> scales,
                                                     at::IntArrayRef resolutions, at::IntArrayRef offsets,
                                                     at::IntArrayRef hashed, int64_t active_levels, bool need_table,
                                                     bool need_positions) {
  check_inputs(positions, table);
  const std::vector<Level> levels = make_levels(scales, resolutions, offsets, hashed, table.size(0));
  const int64_t L = static_cast<int64_t>(levels.size());
  TORCH_CHECK(active_levels >= 0 && active_levels <= L, "hashgrid (cpu tier): active_levels out of range");
  const int64_t N = positions.size(0), F = table.size(1);
  TORCH_CHECK(grad_features.scalar_type() == at::kFloat && grad_features.dim() == 2 && grad_features.size(0) == N &&
                  grad_features.size(1) == L * F,
              "hashgrid (cpu tier): grad_features must be float32 [N, L*F], got ", grad_features.sizes());

  at::Tensor grad_table = need_table ? at::empty_like(table) : at::empty({0}, table.options());
  if (need_table) advise_huge_pages(grad_table.data_ptr<float>(), sizeof(float) * static_cast<size_t>(grad_table.numel()));
  at::Tensor grad_positions = need_positions ? at::zeros({N, 3}, positions.options()) : at::empty({0}, positions.options());
  const bool work = active_levels > 0 && N > 0;
  // Level-major copy of the active levels' gradients, so each level pass reads a contiguous stream.
  const at::Tensor grad_point_major = grad_features.contiguous();
  float* grad_levels = work ? thread_scratch(static_cast<size_t>(active_levels * N * F)) : nullptr;
  if (work) {
    dispatch_features(F, [&](auto kF) {
      transpose_levels<decltype(kF)::value, /*kToPoints=*/false>(grad_point_major.data_ptr<float>(), grad_levels, N, L,
                                                                 active_levels, F);
    });
  }
  const float* x = positions.data_ptr<float>();
  const float* tab = table.data_ptr<float>();
  const float* g = grad_levels;
  const int threads = at::get_num_threads();

  dispatch_features(F, [&](auto kF) {
    constexpr int kFeatures = decltype(kF)::value;
    if (need_table) {
      float* gt = grad_table.data_ptr<float>();
      // A level's slice of grad_table belongs to one thread, which visits the points in index
      // order: every entry is summed in a fixed order, for any thread count. No atomics.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (int64_t l = L - 1; l >= 0; --l) {  // finest (slowest) levels first balances the threads
        const Level& lv = levels[l];
        // Zeroed here rather than up front: in parallel, and the slice is then warm in this thread's cache.
        std::memset(gt + lv.offset * F, 0, sizeof(float) * static_cast<size_t>(lv.size) * F);
        if (l < active_levels && N > 0) scatter_level<kFeatures>(lv, x, g + l * N * F, gt, N, F);
      }
    }
    if (need_positions && work) {
      float* gp = grad_positions.data_ptr<float>();
      // Each point belongs to one thread and sums its levels in order: deterministic too.
#pragma omp parallel num_threads(threads)
      {
        const int64_t count = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t begin = N * thread / count, end = N * (thread + 1) / count;
        for (int64_t l = 0; l < active_levels; ++l) {
          position_grad_level<kFeatures>(levels[l], x, tab, g + l * N * F, gp, begin, end, F);
        }
      }
    }
  });
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
