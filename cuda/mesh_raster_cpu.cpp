// Triangle rasterization, interpolation and analytic antialiasing, cpu tier (C++/OpenMP) with
// hand-written backwards.
//
// Semantics: lift3d/kernels/mesh_raster.py (the reference tier is the definition). In short, for a
// triangle with clip vertices (x, y, z, w)_k, e_k = (x, y, w)_k, n_i = e_{i+1} x e_{i+2},
// det = e_0 . n_0 and the pixel centre's NDC q = ((2x+1)/W - 1, (2y+1)/H - 1, 1) (row 0 at the
// bottom), the edge values are D_i = qx n_i.x + (qy n_i.y + n_i.w); the pixel is covered iff
// det != 0, every D_i has the sign of det or is 0, and z/w = (sum D_i z_i) / det lies in [-1, 1]
// (pixels are tested within the reference's bounding box, _pixel_boxes). Nearest z/w wins, ties
// to the smaller triangle index. (u, v) = (D_0, D_1) / (D_0 + D_1 + D_2).
//
// Numerics: every coverage/visibility decision and the barycentrics/depth are computed in double
// with the reference's operations in the reference's order. Products of two floats are exact in
// double, so the edge normals (and thus D on shared edges) are bit-identical to the reference's and
// exact negatives across a shared edge. Sums of products are rounded like torch's separate ops as
// long as the compiler does not contract them into FMAs (it does not for the default x86-64 target;
// on targets with FMA by default, near-ties can in rare cases resolve differently). The tile loop
// tests four pixels at once (AVX2; two on the baseline) with GCC/Clang vector extensions: the same
// IEEE operations per lane. The backward skips the terms of an output whose gradient is absent.
//
// Layout and parallelism (a fixed 32x32 tile grid: the work split never depends on the thread count):
//  - rasterize: per-vertex projection, then per-triangle boxes and tile counts over fixed chunks of
//    triangles, a counting sort into per-tile lists (in triangle order), then one OpenMP work item
//    per (image, tile) that sets up its triangles and depth-tests them in a tile-local buffer.
//  - rasterize / interpolate backward: one work item per (image, tile) sums its pixels per triangle
//    (pixel order within the tile); the per-(tile, triangle) sums are then added into the vertices
//    in tile order.
//  - antialias: silhouette edges decided once per shown triangle, then OpenMP over rows to find
//    the blended pixel pairs; the few blends (silhouettes only) are applied and differentiated
//    serially in slot order, the order the reference adds them.
//  Loops are scheduled dynamically (a thread that loses its core to another process does not hold
//  the others up for its whole static share); scratch buffers are per thread and kept between
//  calls. No float atomics anywhere: results are bit-identical run to run and for any thread count.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "cpu_scratch.h"

namespace {

constexpr int64_t kTile = 32;  // larger tiles: fewer (triangle, tile) visits for small triangles
constexpr int64_t kTilePixels = kTile * kTile;
constexpr int64_t kMaxLanes = 4;  // widest vector step of the tile loop (pixels)
constexpr double kBoxSlack = 1e-3;  // BOX_SLACK of the reference

// The tile loop is written once for N-lane vectors of doubles (GCC/Clang vector extensions) and
// compiled twice: N = 4 for AVX2 (chosen at run time where the CPU has it) and N = 2 for the
// baseline (SSE2 on x86-64). Only + - * /, comparisons and selects are used, so every lane rounds
// exactly like the reference's scalar op; AVX2 does not bring FMA, so nothing is contracted.
#define MESH_RASTER_INLINE inline __attribute__((always_inline))
// The 32-byte vectors only live inside always-inlined code, never at a call boundary: GCC's
// warning about their (unused) calling convention without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <int N>
struct Lanes;
template <>
struct Lanes<2> {
  typedef double D __attribute__((vector_size(16)));
};
template <>
struct Lanes<4> {
  typedef double D __attribute__((vector_size(32)));
};

using lift3d_cpu::load_vector;
using lift3d_cpu::store_vector;
template <typename V, typename T>
MESH_RASTER_INLINE V splat(T a) {
  V v;
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(T)); ++i) v[i] = a;
  return v;
}
// mask ? a : b per lane (mask lanes are all ones or all zeros).
template <typename V, typename M>
MESH_RASTER_INLINE V select(M mask, V a, V b) {
  return (V)((mask & (M)a) | (~mask & (M)b));
}

struct Vec3 {
  double x, y, w;
};

inline Vec3 cross(const Vec3& a, const Vec3& b) {
  return {a.y * b.w - a.w * b.y, a.w * b.x - a.x * b.w, a.x * b.y - a.y * b.x};
}

inline double dot(const Vec3& a, const Vec3& b) { return a.x * b.x + a.y * b.y + a.w * b.w; }

inline Vec3 scaled(const Vec3& a, double s) { return {a.x * s, a.y * s, a.w * s}; }

inline void add_to(Vec3& a, const Vec3& b) {
  a.x += b.x;
  a.y += b.y;
  a.w += b.w;
}

// D = q . n for q = (qx, qy, 1), bracketed as the reference: qx n.x + (qy n.y + n.w).
inline double row_part(const Vec3& n, double qy) { return qy * n.y + n.w; }
inline double edge_value(const Vec3& n, double qx, double qy) { return qx * n.x + row_part(n, qy); }

inline double pixel_ndc(int64_t index, int64_t size) {
  return (2.0 * static_cast<double>(index) + 1.0) / static_cast<double>(size) - 1.0;
}

// NDC of every pixel centre of an H x W image (each op computes the divisions once). x has
// kMaxLanes finite entries of padding so vector loads may run past the last column.
struct PixelCentres {
  std::vector<double> x, y;
  PixelCentres(int64_t height, int64_t width)
      : x(static_cast<size_t>(width + kMaxLanes), 0.0), y(static_cast<size_t>(height)) {
    for (int64_t i = 0; i < width; ++i) x[i] = pixel_ndc(i, width);
    for (int64_t i = 0; i < height; ++i) y[i] = pixel_ndc(i, height);
  }
};

inline Vec3 load_xyw(const float* vertex) {
  return {static_cast<double>(vertex[0]), static_cast<double>(vertex[1]), static_cast<double>(vertex[3])};
}

// Edge normals and det of a triangle from its three (x, y, w).
struct Frame {
  Vec3 n[3];
  double det;
};

inline Frame make_frame(const Vec3 e[3]) {
  Frame f;
  f.n[0] = cross(e[1], e[2]);
  f.n[1] = cross(e[2], e[0]);
  f.n[2] = cross(e[0], e[1]);
  f.det = dot(e[0], f.n[0]);
  return f;
}

inline Frame frame_of(const float* image_positions, const int32_t* face) {
  const Vec3 e[3] = {load_xyw(image_positions + static_cast<int64_t>(face[0]) * 4),
                     load_xyw(image_positions + static_cast<int64_t>(face[1]) * 4),
                     load_xyw(image_positions + static_cast<int64_t>(face[2]) * 4)};
  return make_frame(e);
}

// A triangle ready for the tile loop. Its normals and det are
// negated when det < 0 (negation is exact: the same D up to sign, the same z/w and (u, v)), so
// "inside" is always "every D >= 0".
struct Setup {
  Frame frame;
  double z[3];
};

// A triangle's inclusive pixel box (16 bytes: the binning passes stream through these); x0 > x1
// marks "never drawn".
struct Box {
  int32_t x0, x1, y0, y1;
};

// What the triangle setup needs of a vertex, computed once per vertex (each is shared by ~6
// triangles): the reference's per-vertex tests and its projection to the screen.
enum VertexFlags : uint32_t {
  kFinite = 1,  // all four coordinates finite
  kInFront = 2,  // w > 0
  kBeyondRight = 4,  // x > w
  kBeyondLeft = 8,  // x < -w
  kBeyondTop = 16,  // y > w
  kBeyondBottom = 32,  // y < -w
};

struct ProjectedVertex {
  double sx, sy;  // screen position (pixels); only meaningful with kInFront
  uint32_t flags;
};

inline ProjectedVertex project_vertex(const float* c, int64_t height, int64_t width) {
  const double x = c[0], y = c[1], w = c[3];
  ProjectedVertex p{0.0, 0.0, 0};
  if (std::isfinite(c[0]) && std::isfinite(c[1]) && std::isfinite(c[2]) && std::isfinite(c[3])) p.flags |= kFinite;
  if (w > 0) p.flags |= kInFront;
  if (x > w) p.flags |= kBeyondRight;
  if (x < -w) p.flags |= kBeyondLeft;
  if (y > w) p.flags |= kBeyondTop;
  if (y < -w) p.flags |= kBeyondBottom;
  if (w > 0) {
    const double inverse_w = 1.0 / w;
    p.sx = (x * inverse_w + 1.0) * (0.5 * static_cast<double>(width));
    p.sy = (y * inverse_w + 1.0) * (0.5 * static_cast<double>(height));
  }
  return p;
}

// Inclusive span of pixels whose centres lie in [low, high] widened by kBoxSlack (screen units),
// clamped to the image: the reference's box, operation for operation.
// Values are clamped to [-2, size + 1] first (which changes no clamped result) so that ceil and
// floor can be done with integer truncation: std::ceil/floor are library calls on baseline x86-64.
inline void pixel_span(double low, double high, int64_t size, int32_t& first, int32_t& last) {
  const double lowest = -2.0, highest = static_cast<double>(size + 1);
  const double start = std::min(std::max(low - 0.5 - kBoxSlack, lowest), highest);
  const double end = std::min(std::max(high - 0.5 + kBoxSlack, lowest), highest);
  // Branch-free: whether a value has a fractional part is a coin toss, so branches mispredict.
  int64_t up = static_cast<int64_t>(start);  // truncation towards zero
  up += static_cast<double>(up) < start;  // ceil
  int64_t down = static_cast<int64_t>(end);
  down -= static_cast<double>(down) > end;  // floor
  first = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(up, 0), size - 1));
  last = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(down, 0), size - 1));
}

// The triangle's pixel box from its projected vertices (empty for the reference's culls).
inline Box triangle_box(const ProjectedVertex* projected, const int32_t* face, int64_t height, int64_t width) {
  Box box = {0, -1, 0, -1};
  const ProjectedVertex& p0 = projected[face[0]];
  const ProjectedVertex& p1 = projected[face[1]];
  const ProjectedVertex& p2 = projected[face[2]];
  const uint32_t all = p0.flags & p1.flags & p2.flags, any = p0.flags | p1.flags | p2.flags;
  // Exact culls: no pixel centre can be covered (see _pixel_boxes in the reference).
  if (!(all & kFinite) || !(any & kInFront)) return box;
  if (all & (kBeyondRight | kBeyondLeft | kBeyondTop | kBeyondBottom)) return box;
  if (all & kInFront) {
    pixel_span(std::min({p0.sx, p1.sx, p2.sx}), std::max({p0.sx, p1.sx, p2.sx}), width, box.x0, box.x1);
    pixel_span(std::min({p0.sy, p1.sy, p2.sy}), std::max({p0.sy, p1.sy, p2.sy}), height, box.y0, box.y1);
  } else {
    // A vertex at or behind the eye: the projection is unbounded, so test every pixel.
    box = {0, static_cast<int32_t>(width - 1), 0, static_cast<int32_t>(height - 1)};
  }
  return box;
}

// The setup of a triangle with a box (false when det == 0: never drawn). Computed where the tile
// loop needs it (a triangle touches ~1.2 tiles), which is cheaper than storing 104 bytes per triangle.
inline bool setup_triangle(const float* positions, const int32_t* face, Setup& s) {
  const float* c[3] = {positions + static_cast<int64_t>(face[0]) * 4, positions + static_cast<int64_t>(face[1]) * 4,
                       positions + static_cast<int64_t>(face[2]) * 4};
  const Vec3 e[3] = {load_xyw(c[0]), load_xyw(c[1]), load_xyw(c[2])};
  s.frame = make_frame(e);
  if (!(s.frame.det != 0.0)) return false;
  // Branch-free (half the triangles of a closed mesh face away: a coin toss for the predictor);
  // multiplying by -1 or 1 is exact.
  const double sign = s.frame.det < 0 ? -1.0 : 1.0;
  for (int i = 0; i < 3; ++i) s.frame.n[i] = scaled(s.frame.n[i], sign);
  s.frame.det *= sign;
  for (int k = 0; k < 3; ++k) s.z[k] = c[k][2];
  return true;
}

using lift3d_cpu::reusable_buffer;

// The fixed tile grid of an H x W image.
struct TileGrid {
  int64_t height, width, tiles_x, tiles_y, count;
  TileGrid(int64_t h, int64_t w)
      : height(h), width(w), tiles_x((w + kTile - 1) / kTile), tiles_y((h + kTile - 1) / kTile),
        count(tiles_x * tiles_y) {}
  int64_t x_begin(int64_t t) const { return (t % tiles_x) * kTile; }
  int64_t y_begin(int64_t t) const { return (t / tiles_x) * kTile; }
  int64_t x_end(int64_t t) const { return std::min(x_begin(t) + kTile, width); }
  int64_t y_end(int64_t t) const { return std::min(y_begin(t) + kTile, height); }
};

// The covered pixels of one tile grouped by triangle: slots numbered in first-seen order.
class TriangleSlots {
 public:
  // Uses the calling thread's reusable face -> slot table (all -1 between uses).
  explicit TriangleSlots(int64_t faces) : slot_of_(thread_table(faces)), faces_(thread_faces()) { clear(); }
  ~TriangleSlots() { clear(); }
  TriangleSlots(const TriangleSlots&) = delete;
  TriangleSlots& operator=(const TriangleSlots&) = delete;
  // The slot of face f; `added` says whether it was just created.
  int32_t find_or_add(int32_t f, bool& added) {
    int32_t s = slot_of_[f];
    added = s < 0;
    if (added) {
      s = static_cast<int32_t>(faces_.size());
      slot_of_[f] = s;
      faces_.push_back(f);
    }
    return s;
  }
  const std::vector<int32_t>& faces() const { return faces_; }
  void clear() {
    for (const int32_t f : faces_) slot_of_[f] = -1;
    faces_.clear();
  }

 private:
  static std::vector<int32_t>& thread_table(int64_t faces) {
    thread_local std::vector<int32_t> table;
    if (table.size() < static_cast<size_t>(faces)) table.resize(static_cast<size_t>(faces), -1);
    return table;
  }
  static std::vector<int32_t>& thread_faces() {
    thread_local std::vector<int32_t> seen;
    return seen;
  }
  std::vector<int32_t>& slot_of_;
  std::vector<int32_t>& faces_;
};

void check_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu tier): ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, op, " (cpu tier): ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (cpu tier): ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dims, op, " (cpu tier): ", name, " must have ", dims, " dims, got shape ", t.sizes());
}

// Whether every value lies in [low, high], in one pass of OR/SUB operations the compiler
// vectorises (the checks run on every call): v - low and high - v are both non-negative, i.e. have
// a clear top bit as unsigned numbers, exactly for values in range (high - low < 2^31 here).
template <typename T>
bool all_in_range(const T* p, int64_t n, int64_t low, int64_t high) {
  using U = typename std::conditional<sizeof(T) == 8, uint64_t, uint32_t>::type;
  const U base = static_cast<U>(low), span = static_cast<U>(high - low);
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const U v = static_cast<U>(static_cast<U>(p[i]) - base);
    bad |= v | static_cast<U>(span - v);
  }
  return (bad >> (8 * sizeof(U) - 1)) == 0;
}

// The smallest and largest entry, for error messages only.
template <typename T>
std::pair<int64_t, int64_t> min_max(const T* p, int64_t n) {
  int64_t low = n > 0 ? p[0] : 0, high = low;
  for (int64_t i = 0; i < n; ++i) {
    low = std::min<int64_t>(low, p[i]);
    high = std::max<int64_t>(high, p[i]);
  }
  return {low, high};
}

// Checks that an index tensor's values lie in [low, high] (high - low < 2^31).
template <typename T>
void check_index_range(const T* p, int64_t n, int64_t low, int64_t high, const char* op, const char* name) {
  TORCH_CHECK(high - low < (int64_t{1} << 31), op, ": ", name, " range too large");
  if (n == 0 || (high >= low && all_in_range(p, n, low, high))) return;
  const auto range = min_max(p, n);
  TORCH_CHECK(false, op, ": ", name, " holds values in [", range.first, ", ", range.second, "], outside [", low, ", ",
              high, "]");
}

void check_faces(const at::Tensor& faces, int64_t vertices, const char* op) {
  check_tensor(faces, op, "faces", at::kInt, 2);
  TORCH_CHECK(faces.size(1) == 3, op, ": faces must be [F, 3], got ", faces.sizes());
  TORCH_CHECK(faces.numel() == 0 || vertices > 0, op, ": faces index vertices outside [0, ", vertices, ")");
  check_index_range(faces.data_ptr<int32_t>(), faces.numel(), 0, vertices - 1, op, "faces");
}

void check_ids(const at::Tensor& ids, int64_t faces, const char* op) {
  check_tensor(ids, op, "triangle_id", at::kInt, 3);
  check_index_range(ids.data_ptr<int32_t>(), ids.numel(), -1, faces - 1, op, "triangle_id");
}

// ---------------------------------------------------------------------------------------------
// rasterize
// ---------------------------------------------------------------------------------------------

// Per-thread depth buffer of one tile, padded so a vector step may run up to kMaxLanes - 1 pixels
// past a row (those lanes are masked: they write back what they read).
struct TileBuffer {
  std::vector<double> depth, d0, d1, d2;
  std::vector<int64_t> id;
  TileBuffer()
      : depth(kTilePixels + kMaxLanes, 0.0), d0(kTilePixels + kMaxLanes, 0.0), d1(kTilePixels + kMaxLanes, 0.0),
        d2(kTilePixels + kMaxLanes, 0.0), id(kTilePixels + kMaxLanes, -1) {}
  void reset() {
    std::fill(depth.begin(), depth.end(), std::numeric_limits<double>::infinity());
    std::fill(id.begin(), id.end(), -1);
  }
};

// One (image, tile) of the rasterizer: the tile's triangle list (in triangle order) is depth-tested
// against the tile buffer (each triangle over its box clipped to the tile), N pixels at a time,
// and the winners are written to the outputs.
struct TileJob {
  const float* positions;  // the image's [V, 4]
  const int32_t* faces;
  const Box* boxes;  // the image's
  const int32_t* list;
  int64_t count, x_begin, y_begin, x_end, y_end;
  const double* qx;
  const double* qy;
  int64_t first_pixel, width;  // flat index of the image's pixel (0, 0); its row length
  int32_t* ids;
  float* bary;
  float* depth;
};

template <int N>
MESH_RASTER_INLINE void raster_tile(const TileJob& job, TileBuffer& tile) {
  typedef typename Lanes<N>::D VecD;
  typedef decltype(VecD{} < VecD{}) VecL;  // comparison results: all-ones / all-zeros 64-bit lanes
  typedef typename std::remove_reference<decltype(VecL{}[0])>::type Lane;
  // Locals, not job.* in the loops: the buffer stores could otherwise alias the job's fields.
  const float* const positions = job.positions;
  const int32_t* const faces = job.faces;
  const Box* const boxes = job.boxes;
  const int32_t* const list = job.list;
  const int64_t count = job.count, x_begin = job.x_begin, y_begin = job.y_begin, x_end = job.x_end,
                y_end = job.y_end;
  const double* const qx = job.qx;
  const double* const qy = job.qy;
  const VecD zero = splat<VecD>(0.0), minus_one = splat<VecD>(-1.0), one = splat<VecD>(1.0);
  VecD lanes;  // lane positions as doubles: double comparisons are single instructions everywhere
  for (int i = 0; i < N; ++i) lanes[i] = i;
  double* const best_depth = tile.depth.data();
  int64_t* const best_id = tile.id.data();
  double* const best_d0 = tile.d0.data();
  double* const best_d1 = tile.d1.data();
  double* const best_d2 = tile.d2.data();
  for (int64_t j = 0; j < count; ++j) {
    const int32_t f = list[j];
    Setup s;
    if (!setup_triangle(positions, faces + 3 * static_cast<int64_t>(f), s)) continue;
    const Box box = boxes[f];
    const Frame& fr = s.frame;
    const int64_t y0 = std::max<int64_t>(box.y0, y_begin), y1 = std::min<int64_t>(box.y1 + 1, y_end);
    const int64_t x0 = std::max<int64_t>(box.x0, x_begin), x1 = std::min<int64_t>(box.x1 + 1, x_end);
    const VecD n0 = splat<VecD>(fr.n[0].x), n1 = splat<VecD>(fr.n[1].x), n2 = splat<VecD>(fr.n[2].x);
    const VecD z0 = splat<VecD>(s.z[0]), z1 = splat<VecD>(s.z[1]), z2 = splat<VecD>(s.z[2]);
    const VecD det = splat<VecD>(fr.det), end = splat<VecD>(static_cast<double>(x1));
    const VecL face = splat<VecL>(static_cast<Lane>(f));
    for (int64_t y = y0; y < y1; ++y) {
      const VecD r0 = splat<VecD>(row_part(fr.n[0], qy[y])), r1 = splat<VecD>(row_part(fr.n[1], qy[y])),
                 r2 = splat<VecD>(row_part(fr.n[2], qy[y]));
      const int64_t row = (y - y_begin) * kTile - x_begin;  // buffer index of pixel x is row + x
      for (int64_t x = x0; x < x1; x += N) {
        const int64_t i = row + x;
        const VecD q = load_vector<VecD>(qx + x);
        const VecD d0 = q * n0 + r0, d1 = q * n1 + r1, d2 = q * n2 + r2;
        const VecD z = (d0 * z0 + d1 * z1 + d2 * z2) / det;
        const VecD best = load_vector<VecD>(best_depth + i);
        // Triangles arrive in index order: the strict < keeps the first of equal depths.
        const VecL take = (d0 >= zero) & (d1 >= zero) & (d2 >= zero) & (z >= minus_one) & (z <= one) & (z < best) &
                          ((lanes + splat<VecD>(static_cast<double>(x))) < end);
        store_vector(best_depth + i, select(take, z, best));
        store_vector(best_id + i, select(take, face, load_vector<VecL>(best_id + i)));
        store_vector(best_d0 + i, select(take, d0, load_vector<VecD>(best_d0 + i)));
        store_vector(best_d1 + i, select(take, d1, load_vector<VecD>(best_d1 + i)));
        store_vector(best_d2 + i, select(take, d2, load_vector<VecD>(best_d2 + i)));
      }
    }
  }

  // The winners: ids, barycentrics (D0, D1) / (D0 + D1 + D2) and depth; zeros where empty.
  const int64_t width = job.width;
  int32_t* const ids = job.ids;
  float* const bary = job.bary;
  float* const depth = job.depth;
  for (int64_t y = y_begin; y < y_end; ++y) {
    const int64_t row = (y - y_begin) * kTile - x_begin, out_row = job.first_pixel + y * width;
    // Branch-free (empty pixels compute and discard a quotient) so the compiler vectorises it.
    for (int64_t x = x_begin; x < x_end; ++x) {
      const int64_t local = row + x, pix = out_row + x;
      const int64_t id = best_id[local];
      const bool covered = id >= 0;
      const double d0 = best_d0[local], d1 = best_d1[local], d2 = best_d2[local];
      const double total = d0 + d1 + d2;
      ids[pix] = static_cast<int32_t>(id);  // -1 where empty
      bary[2 * pix] = covered ? static_cast<float>(d0 / total) : 0.0f;
      bary[2 * pix + 1] = covered ? static_cast<float>(d1 / total) : 0.0f;
      depth[pix] = covered ? static_cast<float>(best_depth[local]) : 0.0f;
    }
  }
}

void raster_tile_baseline(const TileJob& job, TileBuffer& tile) { raster_tile<2>(job, tile); }

#ifdef LIFT3D_CPU_X86
__attribute__((target("avx2"))) void raster_tile_avx2(const TileJob& job, TileBuffer& tile) {
  raster_tile<4>(job, tile);
}
#endif

using RasterTileFn = void (*)(const TileJob&, TileBuffer&);

// LIFT3D_KERNELS_NO_AVX2=1 forces the baseline loop (read per call, so a test can compare both).
RasterTileFn raster_tile_for_this_cpu() {
#ifdef LIFT3D_CPU_X86
  if (lift3d_cpu::use_avx2()) return raster_tile_avx2;
#endif
  return raster_tile_baseline;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mesh_raster_rasterize_forward(const at::Tensor& positions,
                                                                             const at::Tensor& faces,
                                                                             int64_t height, int64_t width) {
  const char* op = "mesh_raster_rasterize";
  check_tensor(positions, op, "clip_positions", at::kFloat, 3);
  TORCH_CHECK(positions.size(2) == 4, op, ": clip_positions must be [B, V, 4], got ", positions.sizes());
  TORCH_CHECK(height > 0 && width > 0, op, ": resolution must be positive");
  const int64_t B = positions.size(0), V = positions.size(1), F = faces.size(0);
  check_faces(faces, V, op);
  const int64_t H = height, W = width;
  const TileGrid grid(H, W);
  const int64_t T = grid.count, BT = B * T, BF = B * F;
  const float* pos = positions.data_ptr<float>();
  const int32_t* tri = faces.data_ptr<int32_t>();

  // Triangle boxes are computed and counted per tile in fixed chunks (so the counting sort below
  // is the same for any thread count); each tile's list comes out in triangle order.
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>((BF + 1023) / 1024, 1), 64);  // balance 2+ threads
  const int64_t chunk_size = (BF + chunks - 1) / chunks;
  ProjectedVertex* projected = reusable_buffer<ProjectedVertex, 0>(B * V).data();
  Box* boxes = reusable_buffer<Box, 0>(BF).data();  // every entry is written below
  std::vector<int64_t> cursors(chunks * BT, 0);  // per (chunk, tile): count, then write position
  // Calls visit(b, f, box) for the triangles of chunk c, in order (no division per triangle).
  auto for_each_in_chunk = [&](int64_t c, auto visit) {
    const int64_t begin = std::min(BF, c * chunk_size), end = std::min(BF, (c + 1) * chunk_size);
    if (begin >= end) return;
    int64_t b = begin / F, f = begin - b * F;
    for (int64_t i = begin; i < end; ++i) {
      visit(b, f, boxes[i]);
      if (++f == F) {
        f = 0;
        ++b;
      }
    }
  };
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1024)
    for (int64_t bv = 0; bv < B * V; ++bv) projected[bv] = project_vertex(pos + bv * 4, H, W);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t* counts = cursors.data() + c * BT;
      for_each_in_chunk(c, [&](int64_t b, int64_t f, Box& box) {
        box = triangle_box(projected + b * V, tri + f * 3, H, W);
        if (box.x0 > box.x1 || box.y0 > box.y1) return;
        for (int64_t ty = box.y0 / kTile; ty <= box.y1 / kTile; ++ty)
          for (int64_t tx = box.x0 / kTile; tx <= box.x1 / kTile; ++tx) ++counts[b * T + ty * grid.tiles_x + tx];
      });
    }
  }
  std::vector<int64_t> offsets(BT + 1, 0);  // tile bt's list is [offsets[bt], offsets[bt + 1])
  {
    int64_t total = 0;
    for (int64_t bt = 0; bt < BT; ++bt) {
      offsets[bt] = total;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t count = cursors[c * BT + bt];
        cursors[c * BT + bt] = total;
        total += count;
      }
    }
    offsets[BT] = total;
  }
  int32_t* tile_triangles = reusable_buffer<int32_t, 0>(offsets[BT]).data();

  const PixelCentres centres(H, W);
  const double* qx = centres.x.data();
  const double* qy = centres.y.data();
  const RasterTileFn raster_tile = raster_tile_for_this_cpu();

  // Every pixel is written by its tile below (empty ones too), so no fill is needed here.
  at::Tensor ids = at::empty({B, H, W}, positions.options().dtype(at::kInt));
  at::Tensor bary = at::empty({B, H, W, 2}, positions.options());
  at::Tensor depth = at::empty({B, H, W}, positions.options());
  int32_t* p_ids = ids.data_ptr<int32_t>();
  float* p_bary = bary.data_ptr<float>();
  float* p_depth = depth.data_ptr<float>();

#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t* cursor = cursors.data() + c * BT;
      for_each_in_chunk(c, [&](int64_t b, int64_t f, const Box& box) {
        if (box.x0 > box.x1 || box.y0 > box.y1) return;
        for (int64_t ty = box.y0 / kTile; ty <= box.y1 / kTile; ++ty)
          for (int64_t tx = box.x0 / kTile; tx <= box.x1 / kTile; ++tx)
            tile_triangles[cursor[b * T + ty * grid.tiles_x + tx]++] = static_cast<int32_t>(f);
      });
    }

    TileBuffer& tile = reusable_buffer<TileBuffer, 0>(1)[0];
#pragma omp for schedule(dynamic, 1)
    for (int64_t bt = 0; bt < BT; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      tile.reset();
      const TileJob job{pos + b * V * 4, tri, boxes + b * F, tile_triangles + offsets[bt],
                        offsets[bt + 1] - offsets[bt], grid.x_begin(t), grid.y_begin(t), grid.x_end(t),
                        grid.y_end(t), qx, qy, b * H * W, W, p_ids, p_bary, p_depth};
      raster_tile(job, tile);
    }
  }
  return {ids, bary, depth};
}

// Per (tile, triangle) sums of the rasterize backward: the gradient of the triangle's three vertices
// is linear in them (see mesh_raster_rasterize_backward).
struct RasterGradSums {
  Vec3 e[3];
  Frame frame;
  double z[3], inverse_det;
  Vec3 sum_gd_q[3];
  double sum_g_z[3], sum_g_det;
};

// Adds pixel (qx, qy)'s terms to its triangle's sums; the flags say which output gradients exist.
template <bool kBary, bool kDepth>
MESH_RASTER_INLINE void add_pixel_terms(RasterGradSums& a, double qx, double qy, const float* g_bary,
                                        const float* g_depth) {
  const Frame& fr = a.frame;
  const double d0 = edge_value(fr.n[0], qx, qy), d1 = edge_value(fr.n[1], qx, qy), d2 = edge_value(fr.n[2], qx, qy);
  // d loss / d D_i = (gu (delta_i0 - u) + gv (delta_i1 - v)) / S + gz z_i / det
  double g_d[3] = {0.0, 0.0, 0.0};
  if (kBary) {
    const double gu = g_bary[0], gv = g_bary[1];
    const double inverse_total = 1.0 / (d0 + d1 + d2);
    const double u = d0 * inverse_total, v = d1 * inverse_total;
    const double shared = -(gu * u + gv * v) * inverse_total;
    g_d[0] = gu * inverse_total + shared;
    g_d[1] = gv * inverse_total + shared;
    g_d[2] = shared;
  }
  if (kDepth) {
    const double gz_det = static_cast<double>(*g_depth) * a.inverse_det;
    const double zw = (d0 * a.z[0] + d1 * a.z[1] + d2 * a.z[2]) * a.inverse_det;
    const double d[3] = {d0, d1, d2};
    for (int i = 0; i < 3; ++i) {
      g_d[i] += gz_det * a.z[i];
      a.sum_g_z[i] += gz_det * d[i];
    }
    a.sum_g_det -= gz_det * zw;
  }
  for (int i = 0; i < 3; ++i) add_to(a.sum_gd_q[i], {g_d[i] * qx, g_d[i] * qy, g_d[i]});
}

// One (image, tile) of the rasterize backward: its pixels' terms summed per triangle (pixel order),
// then each triangle's vertex gradients ([3 vertices][x, y, z, w]) in first-seen order.
struct RasterBackwardJob {
  const float* positions;  // the image's [V, 4]
  const int32_t* faces;
  const int32_t* ids;  // the image's [H, W]
  const float* grad_bary;  // the image's [H, W, 2] (null without)
  const float* grad_depth;  // the image's [H, W] (null without)
  int64_t width, x_begin, y_begin, x_end, y_end;
  const double* qx;
  const double* qy;
};

template <bool kBary, bool kDepth>
void raster_backward_tile(const RasterBackwardJob& job, TriangleSlots& slots, RasterGradSums* sums,
                          std::vector<int32_t>& faces_out, std::vector<double>& grads_out) {
  const float* const positions = job.positions;
  const int32_t* const faces = job.faces;
  const int32_t* const ids = job.ids;
  const float* const grad_bary = job.grad_bary;
  const float* const grad_depth = job.grad_depth;
  const int64_t width = job.width, x_begin = job.x_begin, x_end = job.x_end;
  const double* const qx = job.qx;
  int32_t current = -1;  // neighbouring pixels mostly show the same triangle: skip the lookup then
  RasterGradSums* a = nullptr;
  for (int64_t y = job.y_begin; y < job.y_end; ++y) {
    const double qy = job.qy[y];
    for (int64_t x = x_begin; x < x_end; ++x) {
      const int64_t pix = y * width + x;
      const int32_t f = ids[pix];
      if (f < 0) continue;
      if (f != current) {
        current = f;
        bool added;
        a = &sums[slots.find_or_add(f, added)];
        if (added) {
          for (int k = 0; k < 3; ++k) {
            const float* vertex = positions + static_cast<int64_t>(faces[3 * f + k]) * 4;
            a->e[k] = load_xyw(vertex);
            a->z[k] = vertex[2];
            a->sum_gd_q[k] = {0.0, 0.0, 0.0};
            a->sum_g_z[k] = 0.0;
          }
          a->frame = make_frame(a->e);
          a->inverse_det = 1.0 / a->frame.det;
          a->sum_g_det = 0.0;
        }
      }
      add_pixel_terms<kBary, kDepth>(*a, qx[x], qy, kBary ? grad_bary + 2 * pix : nullptr,
                                     kDepth ? grad_depth + pix : nullptr);
    }
  }
  const std::vector<int32_t>& seen = slots.faces();
  faces_out = seen;
  grads_out.resize(seen.size() * 12);
  for (size_t s = 0; s < seen.size(); ++s) {
    const RasterGradSums& a = sums[s];
    for (int k = 0; k < 3; ++k) {
      const int next = (k + 1) % 3, after = (k + 2) % 3;  // after == k - 1 (mod 3)
      Vec3 g_e = scaled(a.frame.n[k], a.sum_g_det);
      add_to(g_e, cross(a.e[next], a.sum_gd_q[after]));
      add_to(g_e, scaled(cross(a.e[after], a.sum_gd_q[next]), -1.0));
      double* o = grads_out.data() + s * 12 + 4 * k;
      o[0] = g_e.x;
      o[1] = g_e.y;
      o[2] = a.sum_g_z[k];
      o[3] = g_e.w;
    }
  }
  slots.clear();
}

at::Tensor mesh_raster_rasterize_backward(const at::Tensor& positions, const at::Tensor& faces,
                                          const at::Tensor& ids, const std::optional<at::Tensor>& grad_bary,
                                          const std::optional<at::Tensor>& grad_depth) {
  const char* op = "mesh_raster_rasterize_backward";
  check_tensor(positions, op, "clip_positions", at::kFloat, 3);
  const int64_t B = positions.size(0), V = positions.size(1), F = faces.size(0);
  check_faces(faces, V, op);
  check_ids(ids, F, op);
  TORCH_CHECK(ids.size(0) == B, op, ": triangle_id and clip_positions disagree on the batch");
  const int64_t H = ids.size(1), W = ids.size(2), N = B * H * W;
  // An absent gradient (None: that output was not used) contributes nothing and costs nothing.
  const bool has_bary = grad_bary.has_value() && grad_bary->defined();
  const bool has_depth = grad_depth.has_value() && grad_depth->defined();
  if (has_bary) {
    check_tensor(*grad_bary, op, "grad_barycentrics", at::kFloat, 4);
    TORCH_CHECK(grad_bary->numel() == 2 * N, op, ": grad_barycentrics must be [B, H, W, 2] like the raster");
  }
  if (has_depth) {
    check_tensor(*grad_depth, op, "grad_depth", at::kFloat, 3);
    TORCH_CHECK(grad_depth->numel() == N, op, ": grad_depth must be [B, H, W] like the raster");
  }
  if (!has_bary && !has_depth) return at::zeros({B, V, 4}, positions.options());
  const float* pos = positions.data_ptr<float>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const float* g_bary = has_bary ? grad_bary->data_ptr<float>() : nullptr;
  const float* g_depth = has_depth ? grad_depth->data_ptr<float>() : nullptr;
  const TileGrid grid(H, W);
  const int64_t T = grid.count, BT = B * T;
  const PixelCentres centres(H, W);

  // Per (tile, triangle): the gradient of the triangle's three vertices (x, y, z, w each) from the
  // tile's pixels. With u = D0 / S, v = D1 / S, z/w = (sum D_j z_j) / det and D_i = q . n_i, it is
  // linear in per-pixel sums: d/d e_k = n_k sum(g_det) + e_{k+1} x sum(gD_{k-1} q)
  // - e_{k+2} x sum(gD_{k+1} q), since e_k enters D_{k-1} = e_k . (e_{k+1} x q) and
  // D_{k+1} = e_k . (q x e_{k+2}), and d det / d e_k = n_k.
  std::vector<std::vector<int32_t>> tile_faces(BT);
  std::vector<std::vector<double>> tile_grads(BT);
  auto run = [&](auto bary_flag, auto depth_flag) {
    constexpr bool kBary = decltype(bary_flag)::value, kDepth = decltype(depth_flag)::value;
#pragma omp parallel
    {
      TriangleSlots slots(F);
      RasterGradSums* sums = reusable_buffer<RasterGradSums, 0>(kTilePixels).data();
#pragma omp for schedule(dynamic, 1)
      for (int64_t bt = 0; bt < BT; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const RasterBackwardJob job{pos + b * V * 4, tri, p_ids + b * H * W, kBary ? g_bary + b * H * W * 2 : nullptr,
                                    kDepth ? g_depth + b * H * W : nullptr, W, grid.x_begin(t), grid.y_begin(t),
                                    grid.x_end(t), grid.y_end(t), centres.x.data(), centres.y.data()};
        raster_backward_tile<kBary, kDepth>(job, slots, sums, tile_faces[bt], tile_grads[bt]);
      }
    }
  };
  if (has_bary && has_depth) {
    run(std::true_type(), std::true_type());
  } else if (has_bary) {
    run(std::true_type(), std::false_type());
  } else {
    run(std::false_type(), std::true_type());
  }
  // Sum into the vertices in tile order: one image per thread, so the order is fixed.
  std::vector<double>& sums = reusable_buffer<double, 0>(B * V * 4);
  std::fill(sums.begin(), sums.begin() + B * V * 4, 0.0);
#pragma omp parallel for schedule(static) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    double* image_sums = sums.data() + b * V * 4;
    for (int64_t bt = b * T; bt < (b + 1) * T; ++bt) {
      const std::vector<int32_t>& seen = tile_faces[bt];
      const double* in = tile_grads[bt].data();
      for (size_t s = 0; s < seen.size(); ++s, in += 12) {
        for (int k = 0; k < 3; ++k) {
          double* target = image_sums + static_cast<int64_t>(tri[3 * seen[s] + k]) * 4;
          for (int c = 0; c < 4; ++c) target[c] += in[4 * k + c];
        }
      }
    }
  }
  at::Tensor grad = at::empty({B, V, 4}, positions.options());
  float* p_grad = grad.data_ptr<float>();
  for (int64_t i = 0; i < B * V * 4; ++i) p_grad[i] = static_cast<float>(sums[i]);
  return grad;
}

// ---------------------------------------------------------------------------------------------
// interpolate
// ---------------------------------------------------------------------------------------------

void check_interpolate(const at::Tensor& attributes, const at::Tensor& bary, const at::Tensor& ids,
                       const at::Tensor& faces, const char* op) {
  check_tensor(attributes, op, "attributes", at::kFloat, 3);
  check_faces(faces, attributes.size(1), op);
  check_ids(ids, faces.size(0), op);
  check_tensor(bary, op, "barycentrics", at::kFloat, 4);
  TORCH_CHECK(bary.size(0) == ids.size(0) && bary.size(1) == ids.size(1) && bary.size(2) == ids.size(2) &&
                  bary.size(3) == 2,
              op, ": barycentrics must be [B, H, W, 2] like triangle_id");
  TORCH_CHECK(attributes.size(0) == 1 || attributes.size(0) == ids.size(0), op,
              ": attributes must have batch 1 or the raster's batch");
}

// Calls body(std::integral_constant<int, K>) with K = C for the common channel counts 1-4 (whose
// per-channel loops then unroll) and K = 0 ("read C at run time") otherwise.
template <typename Body>
void with_channels(int64_t C, Body body) {
  switch (C) {
    case 1: body(std::integral_constant<int, 1>()); break;
    case 2: body(std::integral_constant<int, 2>()); break;
    case 3: body(std::integral_constant<int, 3>()); break;
    case 4: body(std::integral_constant<int, 4>()); break;
    default: body(std::integral_constant<int, 0>()); break;
  }
}

// One row of interpolate: out = u a0 + v a1 + (1 - u - v) a2 of the pixel's triangle (0 if empty).
template <int kC>
void interpolate_row(const float* attr, const int32_t* faces, const int32_t* ids, const float* bary, float* out,
                     int64_t width, int64_t channels) {
  const int64_t C = kC > 0 ? kC : channels;
  for (int64_t x = 0; x < width; ++x) {
    const int32_t f = ids[x];
    float* o = out + x * C;
    if (f < 0) {
      for (int64_t c = 0; c < C; ++c) o[c] = 0.0f;
      continue;
    }
    const float* a0 = attr + static_cast<int64_t>(faces[3 * f]) * C;
    const float* a1 = attr + static_cast<int64_t>(faces[3 * f + 1]) * C;
    const float* a2 = attr + static_cast<int64_t>(faces[3 * f + 2]) * C;
    const float u = bary[2 * x], v = bary[2 * x + 1];
    const float w = 1.0f - u - v;
    for (int64_t c = 0; c < C; ++c) o[c] = u * a0[c] + v * a1[c] + w * a2[c];
  }
}

at::Tensor mesh_raster_interpolate_forward(const at::Tensor& attributes, const at::Tensor& bary,
                                           const at::Tensor& ids, const at::Tensor& faces) {
  const char* op = "mesh_raster_interpolate";
  check_interpolate(attributes, bary, ids, faces, op);
  const int64_t A = attributes.size(0), V = attributes.size(1), C = attributes.size(2);
  const int64_t B = ids.size(0), H = ids.size(1), W = ids.size(2);
  at::Tensor out = at::empty({B, H, W, C}, attributes.options());  // every pixel is written below
  const float* attr = attributes.data_ptr<float>();
  const float* p_bary = bary.data_ptr<float>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  float* p_out = out.data_ptr<float>();
  with_channels(C, [&](auto channels) {
    constexpr int kC = decltype(channels)::value;
#pragma omp parallel for schedule(dynamic, 8)
    for (int64_t row = 0; row < B * H; ++row) {
      interpolate_row<kC>(attr + (A > 1 ? row / H : 0) * V * C, tri, p_ids + row * W, p_bary + row * W * 2,
                          p_out + row * W * C, W, C);
    }
  });
  return out;
}

// One (image, tile) of the interpolate backward: d loss / d (u, v) per pixel (when grad_bary is set)
// and, when faces_out is set, per triangle the sums over the tile's pixels (pixel order) of
// weight_k * grad for its three vertices ([3, C] each, first-seen order).
struct InterpolateBackwardJob {
  const float* attr;  // the image's [V, C]
  const int32_t* faces;
  const int32_t* ids;  // the image's [H, W]
  const float* bary;  // the image's [H, W, 2]
  const float* grad;  // the image's [H, W, C]
  float* grad_bary;  // the image's [H, W, 2], or null
  int64_t width, x_begin, y_begin, x_end, y_end, channels;
};

template <int kC>
void interpolate_backward_tile(const InterpolateBackwardJob& job, TriangleSlots& slots, std::vector<double>& scratch,
                               std::vector<int32_t>* faces_out, std::vector<double>* sums_out) {
  const int64_t C = kC > 0 ? kC : job.channels;
  const float* const attr = job.attr;
  const int32_t* const faces = job.faces;
  const int32_t* const ids = job.ids;
  const float* const bary = job.bary;
  const float* const grad = job.grad;
  float* const grad_bary = job.grad_bary;
  const bool sums_wanted = faces_out != nullptr;
  const int64_t width = job.width, x_begin = job.x_begin, x_end = job.x_end;
  // Per slot: the sums [3][C], then a0 - a2 and a1 - a2 [C] each (the same for all its pixels).
  const int64_t stride = 5 * C;
  if (scratch.size() < static_cast<size_t>(kTilePixels * stride)) scratch.resize(kTilePixels * stride);
  double* const slot_data = scratch.data();
  int32_t current = -1;  // neighbouring pixels mostly show the same triangle: skip the lookup then
  double* sums = nullptr;
  for (int64_t y = job.y_begin; y < job.y_end; ++y) {
    for (int64_t x = x_begin; x < x_end; ++x) {
      const int64_t pix = y * width + x;
      const int32_t f = ids[pix];
      if (f < 0) {
        if (grad_bary) {
          grad_bary[2 * pix] = 0.0f;
          grad_bary[2 * pix + 1] = 0.0f;
        }
        continue;
      }
      if (f != current) {
        current = f;
        bool added;
        sums = slot_data + slots.find_or_add(f, added) * stride;
        if (added) {
          const float* a0 = attr + static_cast<int64_t>(faces[3 * f]) * C;
          const float* a1 = attr + static_cast<int64_t>(faces[3 * f + 1]) * C;
          const float* a2 = attr + static_cast<int64_t>(faces[3 * f + 2]) * C;
          for (int64_t c = 0; c < 3 * C; ++c) sums[c] = 0.0;
          for (int64_t c = 0; c < C; ++c) {
            sums[3 * C + c] = static_cast<double>(a0[c]) - a2[c];
            sums[4 * C + c] = static_cast<double>(a1[c]) - a2[c];
          }
        }
      }
      const float* gp = grad + pix * C;
      if (grad_bary) {
        double gu = 0.0, gv = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const double gc = gp[c];
          gu += gc * sums[3 * C + c];
          gv += gc * sums[4 * C + c];
        }
        grad_bary[2 * pix] = static_cast<float>(gu);
        grad_bary[2 * pix + 1] = static_cast<float>(gv);
      }
      if (sums_wanted) {
        const float u = bary[2 * pix], v = bary[2 * pix + 1];
        const double weights[3] = {u, v, 1.0f - u - v};
        for (int k = 0; k < 3; ++k)
          for (int64_t c = 0; c < C; ++c) sums[k * C + c] += weights[k] * gp[c];
      }
    }
  }
  const std::vector<int32_t>& seen = slots.faces();
  if (sums_wanted) {
    *faces_out = seen;
    sums_out->resize(seen.size() * 3 * C);
    for (size_t s = 0; s < seen.size(); ++s)
      std::copy(slot_data + s * stride, slot_data + s * stride + 3 * C, sums_out->data() + s * 3 * C);
  }
  slots.clear();
}

std::tuple<at::Tensor, at::Tensor> mesh_raster_interpolate_backward(const at::Tensor& attributes,
                                                                    const at::Tensor& bary, const at::Tensor& ids,
                                                                    const at::Tensor& faces,
                                                                    const at::Tensor& grad_output,
                                                                    bool need_attributes, bool need_bary) {
  const char* op = "mesh_raster_interpolate_backward";
  check_interpolate(attributes, bary, ids, faces, op);
  const int64_t A = attributes.size(0), V = attributes.size(1), C = attributes.size(2);
  const int64_t B = ids.size(0), H = ids.size(1), W = ids.size(2), N = B * H * W, F = faces.size(0);
  check_tensor(grad_output, op, "grad_output", at::kFloat, 4);
  TORCH_CHECK(grad_output.numel() == N * C, op, ": grad_output must be [B, H, W, C]");
  const float* attr = attributes.data_ptr<float>();
  const float* p_bary = bary.data_ptr<float>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  const float* g = grad_output.data_ptr<float>();
  const TileGrid grid(H, W);
  const int64_t T = grid.count, BT = B * T;

  // Outputs not asked for are returned empty (the autograd wrapper drops them).
  at::Tensor grad_bary = at::empty({need_bary ? B : 0, H, W, 2}, attributes.options());
  float* p_gb = need_bary ? grad_bary.data_ptr<float>() : nullptr;
  at::Tensor grad_attr = at::empty({need_attributes ? A : 0, V, C}, attributes.options());
  // Per (tile, triangle): sum over the tile's pixels of weight_k * grad for its three vertices
  // ([3, C]), added into the vertices in tile order below.
  std::vector<std::vector<int32_t>> tile_faces(need_attributes ? BT : 0);
  std::vector<std::vector<double>> tile_sums(need_attributes ? BT : 0);
  with_channels(C, [&](auto channels) {
    constexpr int kC = decltype(channels)::value;
#pragma omp parallel
    {
      TriangleSlots slots(F);
      std::vector<double>& scratch = reusable_buffer<double, 1>(0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t bt = 0; bt < BT; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const InterpolateBackwardJob job{attr + (A > 1 ? b : 0) * V * C, tri, p_ids + b * H * W,
                                         p_bary + b * H * W * 2, g + b * H * W * C,
                                         need_bary ? p_gb + b * H * W * 2 : nullptr, W, grid.x_begin(t),
                                         grid.y_begin(t), grid.x_end(t), grid.y_end(t), C};
        interpolate_backward_tile<kC>(job, slots, scratch, need_attributes ? &tile_faces[bt] : nullptr,
                                      need_attributes ? &tile_sums[bt] : nullptr);
      }
    }
  });

  if (need_attributes) {
    // Serially in tile order (shared attributes sum over the images too).
    std::vector<double>& sums = reusable_buffer<double, 0>(A * V * C);
    std::fill(sums.begin(), sums.begin() + A * V * C, 0.0);
    for (int64_t bt = 0; bt < BT; ++bt) {
      double* image_sums = sums.data() + (A > 1 ? bt / T : 0) * V * C;
      const std::vector<int32_t>& seen = tile_faces[bt];
      const double* in = tile_sums[bt].data();
      for (size_t s = 0; s < seen.size(); ++s) {
        for (int k = 0; k < 3; ++k, in += C) {
          double* target = image_sums + static_cast<int64_t>(tri[3 * seen[s] + k]) * C;
          for (int64_t c = 0; c < C; ++c) target[c] += in[c];
        }
      }
    }
    float* p_ga = grad_attr.data_ptr<float>();
    for (int64_t i = 0; i < A * V * C; ++i) p_ga[i] = static_cast<float>(sums[i]);
  }
  return {grad_attr, grad_bary};
}

// ---------------------------------------------------------------------------------------------
// antialias
// ---------------------------------------------------------------------------------------------

// Pair slots: [B, 2, H, W]; direction 0 pairs (x, y) with (x + 1, y), direction 1 with (x, y + 1).
// A slot's code is -1 (no blend) or edge + 3 * (front is the second pixel) + 6 * (the blend goes to
// the front pixel, t < 0.5).
inline int code_edge(int code) { return code % 3; }
inline bool code_second_front(int code) { return (code / 3) % 2 == 1; }
inline bool code_to_front(int code) { return code >= 6; }

struct PairGeometry {
  int64_t front, back;  // flat pixel indices
  double qfx, qfy, qbx, qby;
};

inline PairGeometry pair_geometry(int64_t b, int64_t direction, int64_t y, int64_t x, bool second_front, int64_t H,
                                  int64_t W, const PixelCentres& centres) {
  const int64_t first = (b * H + y) * W + x;
  const int64_t second = direction == 0 ? first + 1 : first + W;
  const int64_t x2 = direction == 0 ? x + 1 : x, y2 = direction == 0 ? y : y + 1;
  PairGeometry g;
  g.front = second_front ? second : first;
  g.back = second_front ? first : second;
  g.qfx = centres.x[second_front ? x2 : x];
  g.qfy = centres.y[second_front ? y2 : y];
  g.qbx = centres.x[second_front ? x : x2];
  g.qby = centres.y[second_front ? y : y2];
  return g;
}

// Crossing t of the front triangle's edge (vertices i+1, i+2) along front -> back, with its edge normal.
inline double crossing(const float* image_positions, const int32_t* face, int edge, const PairGeometry& g,
                       Vec3& start, Vec3& end, double& d_front, double& d_back) {
  start = load_xyw(image_positions + static_cast<int64_t>(face[(edge + 1) % 3]) * 4);
  end = load_xyw(image_positions + static_cast<int64_t>(face[(edge + 2) % 3]) * 4);
  const Vec3 n = cross(start, end);
  d_front = edge_value(n, g.qfx, g.qfy);
  d_back = edge_value(n, g.qbx, g.qby);
  return d_front / (d_front - d_back);
}

// The weight of a blend (which pixel receives colour is t < 0.5, kept in the code).
inline float blend_weight(double t) { return static_cast<float>(t < 0.5 ? 0.5 - t : t - 0.5); }

void check_antialias(const at::Tensor& color, const at::Tensor& positions, const at::Tensor& ids,
                     const at::Tensor& faces, const char* op) {
  check_tensor(color, op, "color", at::kFloat, 4);
  check_tensor(positions, op, "clip_positions", at::kFloat, 3);
  TORCH_CHECK(positions.size(2) == 4, op, ": clip_positions must be [B, V, 4]");
  check_faces(faces, positions.size(1), op);
  check_ids(ids, faces.size(0), op);
  TORCH_CHECK(color.size(0) == ids.size(0) && color.size(1) == ids.size(1) && color.size(2) == ids.size(2), op,
              ": color must be [B, H, W, C] like triangle_id");
  TORCH_CHECK(positions.size(0) == 1 || positions.size(0) == ids.size(0), op,
              ": clip_positions must have batch 1 or the raster's batch");
}

inline PairGeometry slot_geometry(int64_t slot, int code, int64_t H, int64_t W, const PixelCentres& centres) {
  const int64_t x = slot % W, y = (slot / W) % H, direction = (slot / (H * W)) % 2, b = slot / (2 * H * W);
  return pair_geometry(b, direction, y, x, code_second_front(code), H, W, centres);
}

// Whether the blend of a pair goes to its first pixel.
inline bool blend_to_first(int code) { return code_to_front(code) != code_second_front(code); }

// The slots with a blend (code >= 0), in slot order. Codes are -1 almost everywhere, so whole
// 8-byte words of -1 are skipped at once.
std::vector<int64_t> blended_slots(const int8_t* codes, int64_t count) {
  std::vector<int64_t> slots;
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    uint64_t word;
    std::memcpy(&word, codes + i, sizeof word);
    if (word == ~uint64_t{0}) continue;
    for (int64_t j = i; j < i + 8; ++j) {
      if (codes[j] >= 0) slots.push_back(j);
    }
  }
  for (; i < count; ++i) {
    if (codes[i] >= 0) slots.push_back(i);
  }
  return slots;
}

// The two pixels of a pair slot ([B, 2, H, W]; direction 0 pairs (x, y) with (x + 1, y), 1 with (x, y + 1)).
inline void slot_pixels(int64_t slot, int64_t H, int64_t W, int64_t& first, int64_t& second) {
  const int64_t x = slot % W, y = (slot / W) % H, direction = (slot / (H * W)) % 2, b = slot / (2 * H * W);
  first = (b * H + y) * W + x;
  second = first + (direction == 0 ? 1 : W);
}

// Pass 1 of antialias for one row of pair slots (b, direction, y): which pairs blend, across which
// edge, with which weight (codes: -1 or the blend's code; weights: only where a code is set).
// A triangle some pixel shows: its frame, and which of its edges are silhouettes (bit i: no single
// neighbour across edge i, or the neighbour's far vertex lies on this triangle's side of it, i.e.
// the surface folds over there). That test depends on the triangle and edge only, not on the pixel
// pair, so it is done once per shown triangle instead of once per pair.
struct ShownTriangle {
  Frame frame;
  int silhouette;
};

template <typename Index>
ShownTriangle shown_triangle(const float* positions, const int32_t* face, const Index* opposite) {
  ShownTriangle t;
  t.frame = frame_of(positions, face);
  t.silhouette = 0;
  for (int i = 0; i < 3; ++i) {
    const int64_t far_vertex = opposite[i];
    bool folded = true;
    if (far_vertex >= 0) {
      const double side = dot(load_xyw(positions + far_vertex * 4), t.frame.n[i]);
      folded = t.frame.det > 0 ? side >= 0 : side <= 0;
    }
    if (folded) t.silhouette |= 1 << i;
  }
  return t;
}

struct BlendRowJob {
  const int32_t* ids;  // the image's [H, W]
  const float* depth;  // the image's [H, W]
  const ShownTriangle* shown;
  const int32_t* shown_index;  // the image's [F]: row in `shown` of each shown face
  int64_t direction, y, height, width;
  const double* qx;
  const double* qy;
  int8_t* codes;  // the row's [W]
  float* weights;  // the row's [W]
  int32_t* scratch;  // [W]
};

void find_blends_row(const BlendRowJob& job) {
  const int32_t* const ids = job.ids;
  const float* const depth = job.depth;
  const ShownTriangle* const shown = job.shown;
  const int32_t* const shown_index = job.shown_index;
  const int64_t direction = job.direction, y = job.y, W = job.width;
  const double* const qx = job.qx;
  const double* const qy = job.qy;
  int8_t* const codes = job.codes;
  float* const weights = job.weights;
  std::fill(codes, codes + W, static_cast<int8_t>(-1));
  if (direction == 1 && y + 1 >= job.height) return;
  const int64_t step = direction == 0 ? 1 : W, last = direction == 0 ? W - 1 : W;
  // The pairs with different ids, listed branch-free first: whether neighbours differ is close to
  // a coin toss on a finely tessellated mesh, which a branch per pair mispredicts.
  int32_t* const differ = job.scratch;
  int64_t count = 0;
  for (int64_t x = 0; x < last; ++x) {
    differ[count] = static_cast<int32_t>(x);
    count += ids[y * W + x] != ids[y * W + x + step];
  }
  for (int64_t k = 0; k < count; ++k) {
    const int64_t x = differ[k];
    const int64_t first = y * W + x, second = first + step;
    const int32_t id1 = ids[first], id2 = ids[second];
    const float z1 = depth[first], z2 = depth[second];
    const bool first_front = id2 < 0 || (id1 >= 0 && (z1 < z2 || (z1 == z2 && id1 < id2)));
    const ShownTriangle& triangle = shown[shown_index[first_front ? id1 : id2]];
    if (triangle.silhouette == 0) continue;  // no exit edge can be a silhouette
    const Frame& fr = triangle.frame;
    // Pixel centres of the front and back pixels.
    const int64_t x2 = direction == 0 ? x + 1 : x, y2 = direction == 0 ? y : y + 1;
    const double qfx = qx[first_front ? x : x2], qfy = qy[first_front ? y : y2];
    const double qbx = qx[first_front ? x2 : x], qby = qy[first_front ? y2 : y];
    // The exit edges; t is only needed to choose among several and for the weight of a blend.
    double d_back[3];
    int exits = 0, best = -1;
    for (int i = 0; i < 3; ++i) {
      d_back[i] = edge_value(fr.n[i], qbx, qby);
      if (fr.det > 0 ? d_back[i] < 0 : (fr.det < 0 && d_back[i] > 0)) {
        ++exits;
        best = i;
      }
    }
    if (exits == 0) continue;
    double best_t = std::numeric_limits<double>::infinity();
    if (exits > 1) {
      best = -1;
      for (int i = 0; i < 3; ++i) {
        if (!(fr.det > 0 ? d_back[i] < 0 : d_back[i] > 0)) continue;
        const double d_front = edge_value(fr.n[i], qfx, qfy);
        const double t = d_front / (d_front - d_back[i]);
        if (t < best_t) {  // strict: ties keep the smaller edge index
          best_t = t;
          best = i;
        }
      }
      if (best < 0) continue;
    }
    if (!(triangle.silhouette & (1 << best))) continue;  // the surface goes on across this edge
    if (exits == 1) {
      const double d_front = edge_value(fr.n[best], qfx, qfy);
      best_t = d_front / (d_front - d_back[best]);
    }
    const bool to_front = best_t < 0.5;
    codes[x] = static_cast<int8_t>(best + (first_front ? 0 : 3) + (to_front ? 6 : 0));
    weights[x] = blend_weight(best_t);
  }
}

std::tuple<at::Tensor, at::Tensor> mesh_raster_antialias_forward(const at::Tensor& color, const at::Tensor& positions,
                                                                 const at::Tensor& ids, const at::Tensor& depth,
                                                                 const at::Tensor& faces, const at::Tensor& topology) {
  const char* op = "mesh_raster_antialias";
  check_antialias(color, positions, ids, faces, op);
  const int64_t B = color.size(0), H = color.size(1), W = color.size(2), C = color.size(3);
  const int64_t P = positions.size(0), V = positions.size(1), F = faces.size(0);
  check_tensor(depth, op, "depth", at::kFloat, 3);
  TORCH_CHECK(depth.numel() == B * H * W, op, ": depth must be [B, H, W] like triangle_id");
  TORCH_CHECK(topology.device().is_cpu() && topology.is_contiguous() && topology.dim() == 2 &&
                  (topology.scalar_type() == at::kInt || topology.scalar_type() == at::kLong),
              op, ": topology must be a contiguous int32 or int64 [F, 3] CPU tensor");
  TORCH_CHECK(topology.numel() == F * 3, op, ": topology must be [F, 3]");
  const bool long_topology = topology.scalar_type() == at::kLong;
  if (long_topology) {
    check_index_range(topology.data_ptr<int64_t>(), F * 3, -1, V - 1, op, "topology");
  } else {
    check_index_range(topology.data_ptr<int32_t>(), F * 3, -1, V - 1, op, "topology");
  }
  const float* pos = positions.data_ptr<float>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const float* p_depth = depth.data_ptr<float>();
  const float* p_color = color.data_ptr<float>();

  const PixelCentres centres(H, W);
  // The triangles some pixel shows (only those can be a pair's front triangle), stored compactly:
  // shown_index[p * F + f] is the row of (image p, face f) in `shown`.
  int32_t* shown_index = reusable_buffer<int32_t, 1>(P * F).data();
  std::fill(shown_index, shown_index + P * F, -1);
  for (int64_t b = 0; b < B; ++b) {
    int32_t* image_index = shown_index + (P > 1 ? b : 0) * F;
    for (int64_t local = 0; local < H * W; ++local) {
      const int32_t f = p_ids[b * H * W + local];
      if (f >= 0) image_index[f] = 0;
    }
  }
  std::vector<int64_t> shown_faces;  // flat (p, f) of the shown triangles
  for (int64_t pf = 0; pf < P * F; ++pf) {
    if (shown_index[pf] < 0) continue;
    shown_index[pf] = static_cast<int32_t>(shown_faces.size());
    shown_faces.push_back(pf);
  }
  ShownTriangle* shown = reusable_buffer<ShownTriangle, 0>(shown_faces.size()).data();
  const int64_t* opposite_long = long_topology ? topology.data_ptr<int64_t>() : nullptr;
  const int32_t* opposite_int = long_topology ? nullptr : topology.data_ptr<int32_t>();
// Below ~16k shown triangles (~0.1 ms) waking a thread team costs more than it saves.
#pragma omp parallel for schedule(dynamic, 256) if (shown_faces.size() > 16384)
  for (size_t i = 0; i < shown_faces.size(); ++i) {
    const int64_t p = shown_faces[i] / F, f = shown_faces[i] % F;
    shown[i] = opposite_long ? shown_triangle(pos + p * V * 4, tri + f * 3, opposite_long + f * 3)
                             : shown_triangle(pos + p * V * 4, tri + f * 3, opposite_int + f * 3);
  }

  // Pass 1: which pairs blend, across which edge, with which weight.
  at::Tensor codes = at::empty({B, 2, H, W}, color.options().dtype(at::kChar));  // every slot is written
  int8_t* p_codes = codes.data_ptr<int8_t>();
  float* weights = reusable_buffer<float, 0>(B * 2 * H * W).data();  // read only where a code is set
#pragma omp parallel
  {
    int32_t* scratch = reusable_buffer<int32_t, 2>(W).data();
#pragma omp for schedule(dynamic, 8)
    for (int64_t row = 0; row < B * 2 * H; ++row) {
      const int64_t b = row / (2 * H), p = P > 1 ? b : 0;
      find_blends_row(BlendRowJob{p_ids + b * H * W, p_depth + b * H * W, shown, shown_index + p * F, (row / H) % 2,
                                  row % H, H, W, centres.x.data(), centres.y.data(), p_codes + row * W,
                                  weights + row * W, scratch});
    }
  }

  // Pass 2: the blends, applied serially in slot order (there are few: silhouette pairs only), so
  // a pixel's deltas add up in the reference's order (left, right, below, above pair).
  at::Tensor out = color.clone();
  float* p_out = out.data_ptr<float>();
  for (const int64_t slot : blended_slots(p_codes, B * 2 * H * W)) {
    const int code = p_codes[slot];
    int64_t first, second;
    slot_pixels(slot, H, W, first, second);
    const int64_t destination = blend_to_first(code) ? first : second;
    const int64_t source = blend_to_first(code) ? second : first;
    const float weight = weights[slot];
    const float* own = p_color + destination * C;
    const float* from = p_color + source * C;
    float* o = p_out + destination * C;
    for (int64_t c = 0; c < C; ++c) o[c] += weight * (from[c] - own[c]);
  }
  return {out, codes};
}

std::tuple<at::Tensor, at::Tensor> mesh_raster_antialias_backward(const at::Tensor& color, const at::Tensor& positions,
                                                                  const at::Tensor& ids, const at::Tensor& faces,
                                                                  const at::Tensor& codes,
                                                                  const at::Tensor& grad_output) {
  const char* op = "mesh_raster_antialias_backward";
  check_antialias(color, positions, ids, faces, op);
  const int64_t B = color.size(0), H = color.size(1), W = color.size(2), C = color.size(3);
  const int64_t P = positions.size(0), V = positions.size(1);
  check_tensor(codes, op, "pair_codes", at::kChar, 4);
  TORCH_CHECK(codes.numel() == B * 2 * H * W, op, ": pair_codes must come from mesh_raster_antialias_forward");
  check_tensor(grad_output, op, "grad_output", at::kFloat, 4);
  TORCH_CHECK(grad_output.sizes() == color.sizes(), op, ": grad_output must have color's shape");
  const float* pos = positions.data_ptr<float>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const float* p_color = color.data_ptr<float>();
  const int8_t* p_codes = codes.data_ptr<int8_t>();
  const float* g = grad_output.data_ptr<float>();
  const int64_t S = B * 2 * H * W;
  check_index_range(p_codes, S, -1, 11, op, "pair_codes (from mesh_raster_antialias_forward)");

  const PixelCentres centres(H, W);
  const std::vector<int64_t> active = blended_slots(p_codes, S);  // in slot order
  const int64_t A = static_cast<int64_t>(active.size());

  // Per blended pair: its weight, and d loss / d (x, y, w) of the edge's two endpoints.
  std::vector<float> weights(A);
  std::vector<double> partial(A * 6, 0.0);
// Silhouette pairs only: usually too few to be worth waking a thread team.
#pragma omp parallel for schedule(dynamic, 64) if (A > 16384)
  for (int64_t k = 0; k < A; ++k) {
    const int64_t slot = active[k];
    const int code = p_codes[slot];
    const int64_t b = slot / (2 * H * W);
    const PairGeometry geo = slot_geometry(slot, code, H, W, centres);
    const int32_t f = p_ids[geo.front];
    const float* image_positions = pos + (P > 1 ? b : 0) * V * 4;
    Vec3 start, end;
    double d_front, d_back;
    const double t = crossing(image_positions, tri + 3 * static_cast<int64_t>(f), code_edge(code), geo, start, end,
                              d_front, d_back);
    const bool to_front = code_to_front(code);
    const float weight = blend_weight(t);
    weights[k] = weight;
    const int64_t destination = to_front ? geo.front : geo.back, source = to_front ? geo.back : geo.front;
    // out[dest] += w(t) (color[src] - color[dest]); dw/dt = -1 towards the front, +1 towards the back.
    double g_weight = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      g_weight += static_cast<double>(g[destination * C + c]) *
                  static_cast<double>(p_color[source * C + c] - p_color[destination * C + c]);
    }
    const double g_t = to_front ? -g_weight : g_weight;
    // t = Df / (Df - Db)
    const double denominator = d_front - d_back;
    const double g_front = g_t * (-d_back) / (denominator * denominator);
    const double g_back = g_t * d_front / (denominator * denominator);
    // D = q . n, n = start x end: d/d start = end x g_n, d/d end = g_n x start.
    const Vec3 g_n{g_front * geo.qfx + g_back * geo.qbx, g_front * geo.qfy + g_back * geo.qby, g_front + g_back};
    const Vec3 g_start = cross(end, g_n), g_end = cross(g_n, start);
    double* out = partial.data() + k * 6;
    out[0] = g_start.x;
    out[1] = g_start.y;
    out[2] = g_start.w;
    out[3] = g_end.x;
    out[4] = g_end.y;
    out[5] = g_end.w;
  }

  // Colour: the identity plus each blend's two terms, applied serially in slot order (a pair takes
  // its destination's gradient away and hands it to its source).
  at::Tensor grad_color = grad_output.clone();
  float* p_gc = grad_color.data_ptr<float>();
  for (int64_t k = 0; k < A; ++k) {
    const int code = p_codes[active[k]];
    int64_t first, second;
    slot_pixels(active[k], H, W, first, second);
    const int64_t destination = blend_to_first(code) ? first : second;
    const int64_t source = blend_to_first(code) ? second : first;
    const float* g_destination = g + destination * C;
    for (int64_t c = 0; c < C; ++c) {
      p_gc[destination * C + c] -= weights[k] * g_destination[c];
      p_gc[source * C + c] += weights[k] * g_destination[c];
    }
  }

  // Positions: the pairs' partials summed into the vertices serially in slot order.
  std::vector<double>& sums = reusable_buffer<double, 0>(P * V * 4);
  std::fill(sums.begin(), sums.begin() + P * V * 4, 0.0);
  for (int64_t k = 0; k < A; ++k) {
    const int64_t slot = active[k];
    const int code = p_codes[slot];
    const int64_t b = slot / (2 * H * W);
    const PairGeometry geo = slot_geometry(slot, code, H, W, centres);
    const int32_t* face = tri + 3 * static_cast<int64_t>(p_ids[geo.front]);
    const int edge = code_edge(code);
    const double* in = partial.data() + k * 6;
    for (int j = 0; j < 2; ++j) {
      double* target = sums.data() + ((P > 1 ? b : 0) * V + face[(edge + 1 + j) % 3]) * 4;
      target[0] += in[3 * j];
      target[1] += in[3 * j + 1];
      target[3] += in[3 * j + 2];
    }
  }
  at::Tensor grad_positions = at::empty({P, V, 4}, positions.options());
  float* p_gp = grad_positions.data_ptr<float>();
  for (int64_t i = 0; i < P * V * 4; ++i) p_gp[i] = static_cast<float>(sums[i]);
  return {grad_color, grad_positions};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cpu, m) {
  m.def(
      "mesh_raster_rasterize_forward(Tensor clip_positions, Tensor faces, int height, int width) -> "
      "(Tensor triangle_id, Tensor barycentrics, Tensor depth)",
      &mesh_raster_rasterize_forward);
  m.def(
      "mesh_raster_rasterize_backward(Tensor clip_positions, Tensor faces, Tensor triangle_id, "
      "Tensor? grad_barycentrics, Tensor? grad_depth) -> Tensor",
      &mesh_raster_rasterize_backward);
  m.def(
      "mesh_raster_interpolate_forward(Tensor attributes, Tensor barycentrics, Tensor triangle_id, Tensor faces) "
      "-> Tensor",
      &mesh_raster_interpolate_forward);
  m.def(
      "mesh_raster_interpolate_backward(Tensor attributes, Tensor barycentrics, Tensor triangle_id, Tensor faces, "
      "Tensor grad_output, bool need_attributes, bool need_barycentrics) -> (Tensor grad_attributes, "
      "Tensor grad_barycentrics)",
      &mesh_raster_interpolate_backward);
  m.def(
      "mesh_raster_antialias_forward(Tensor color, Tensor clip_positions, Tensor triangle_id, Tensor depth, "
      "Tensor faces, Tensor topology) -> (Tensor output, Tensor pair_codes)",
      &mesh_raster_antialias_forward);
  m.def(
      "mesh_raster_antialias_backward(Tensor color, Tensor clip_positions, Tensor triangle_id, Tensor faces, "
      "Tensor pair_codes, Tensor grad_output) -> (Tensor grad_color, Tensor grad_clip_positions)",
      &mesh_raster_antialias_backward);
}
