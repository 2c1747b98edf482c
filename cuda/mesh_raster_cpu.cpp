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
// on targets with FMA by default, near-ties can in rare cases resolve differently).
//
// Layout and parallelism:
//  - rasterize: per-triangle setup (OpenMP over triangles), serial binning into 32x32 tiles in
//    triangle order, then one OpenMP work item per (image, tile) with a tile-local depth buffer.
//  - rasterize backward: covered pixels grouped by triangle (stable counting sort); OpenMP over
//    triangles, each summing its pixels in pixel order; then the vertices sum their triangles in
//    face order (one image per thread).
//  - interpolate: OpenMP over pixels; the attribute gradient is scattered serially in pixel order.
//  - antialias: OpenMP over rows to find the blended pixel pairs; the few blended pairs (silhouette
//    crossings only) are then applied / differentiated in slot order.
//  No float atomics anywhere: results are bit-identical run to run and for any thread count.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kTile = 32;  // larger tiles: fewer (triangle, tile) visits for small triangles
constexpr double kBoxSlack = 1e-3;  // BOX_SLACK of the reference

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

// NDC of every pixel centre of an H x W image (each op computes the divisions once).
struct PixelCentres {
  std::vector<double> x, y;
  PixelCentres(int64_t height, int64_t width) : x(static_cast<size_t>(width)), y(static_cast<size_t>(height)) {
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

// A triangle ready for the tile loop. Its normals and det are
// negated when det < 0 (negation is exact: the same D up to sign, the same z/w and (u, v)), so
// "inside" is always "every D >= 0".
struct Setup {
  Frame frame;
  double z[3];
};

// Its inclusive pixel box, kept apart from the setup so binning streams through 16 bytes per
// triangle; x0 > x1 marks "never drawn".
struct Box {
  int32_t x0, x1, y0, y1;
};

// Inclusive span of pixels whose centres lie in [low, high] widened by kBoxSlack (screen units),
// clamped to the image: the reference's box, operation for operation.
// Values are clamped to [-2, size + 1] first (which changes no clamped result) so that ceil and
// floor can be done with integer truncation: std::ceil/floor are library calls on baseline x86-64.
inline void pixel_span(double low, double high, int64_t size, int32_t& first, int32_t& last) {
  const double lowest = -2.0, highest = static_cast<double>(size + 1);
  const double start = std::min(std::max(low - 0.5 - kBoxSlack, lowest), highest);
  const double end = std::min(std::max(high - 0.5 + kBoxSlack, lowest), highest);
  int64_t up = static_cast<int64_t>(start);  // truncation towards zero
  if (static_cast<double>(up) < start) ++up;  // ceil
  int64_t down = static_cast<int64_t>(end);
  if (static_cast<double>(down) > end) --down;  // floor
  first = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(up, 0), size - 1));
  last = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(down, 0), size - 1));
}

void setup_triangle(const float* positions, const int32_t* face, int64_t height, int64_t width, Setup& s,
                    Box& box) {
  box = {0, -1, 0, -1};
  double c[3][4];
  double sum = 0.0;  // float inputs cannot overflow a double sum: it is finite iff every value is
  for (int k = 0; k < 3; ++k) {
    for (int j = 0; j < 4; ++j) {
      c[k][j] = static_cast<double>(positions[static_cast<int64_t>(face[k]) * 4 + j]);
      sum += c[k][j];
    }
  }
  if (!std::isfinite(sum)) return;
  // Exact culls: no pixel centre can be covered (see _pixel_boxes in the reference).
  if (!(c[0][3] > 0 || c[1][3] > 0 || c[2][3] > 0)) return;
  for (int j = 0; j < 2; ++j) {
    if (c[0][j] > c[0][3] && c[1][j] > c[1][3] && c[2][j] > c[2][3]) return;
    if (c[0][j] < -c[0][3] && c[1][j] < -c[1][3] && c[2][j] < -c[2][3]) return;
  }
  const Vec3 e[3] = {{c[0][0], c[0][1], c[0][3]}, {c[1][0], c[1][1], c[1][3]}, {c[2][0], c[2][1], c[2][3]}};
  s.frame = make_frame(e);
  if (!(s.frame.det != 0.0)) return;
  if (s.frame.det < 0) {
    for (int i = 0; i < 3; ++i) s.frame.n[i] = scaled(s.frame.n[i], -1.0);
    s.frame.det = -s.frame.det;
  }
  for (int k = 0; k < 3; ++k) s.z[k] = c[k][2];
  if (c[0][3] > 0 && c[1][3] > 0 && c[2][3] > 0) {
    double sx[3], sy[3];
    for (int k = 0; k < 3; ++k) {
      const double inverse_w = 1.0 / c[k][3];
      sx[k] = (c[k][0] * inverse_w + 1.0) * (0.5 * static_cast<double>(width));
      sy[k] = (c[k][1] * inverse_w + 1.0) * (0.5 * static_cast<double>(height));
    }
    pixel_span(std::min({sx[0], sx[1], sx[2]}), std::max({sx[0], sx[1], sx[2]}), width, box.x0, box.x1);
    pixel_span(std::min({sy[0], sy[1], sy[2]}), std::max({sy[0], sy[1], sy[2]}), height, box.y0, box.y1);
  } else {
    // A vertex at or behind the eye: the projection is unbounded, so test every pixel.
    box = {0, static_cast<int32_t>(width - 1), 0, static_cast<int32_t>(height - 1)};
  }
}

void check_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu tier): ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, op, " (cpu tier): ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (cpu tier): ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dims, op, " (cpu tier): ", name, " must have ", dims, " dims, got shape ", t.sizes());
}

void check_faces(const at::Tensor& faces, int64_t vertices, const char* op) {
  check_tensor(faces, op, "faces", at::kInt, 2);
  TORCH_CHECK(faces.size(1) == 3, op, ": faces must be [F, 3], got ", faces.sizes());
  const int32_t* f = faces.data_ptr<int32_t>();
  for (int64_t i = 0; i < faces.numel(); ++i) {
    TORCH_CHECK(f[i] >= 0 && f[i] < vertices, op, ": faces index vertices outside [0, ", vertices, ")");
  }
}

void check_ids(const at::Tensor& ids, int64_t faces, const char* op) {
  check_tensor(ids, op, "triangle_id", at::kInt, 3);
  const int32_t* p = ids.data_ptr<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(p[i] >= -1 && p[i] < faces, op, ": triangle_id holds ", p[i], ", outside [-1, ", faces, ")");
  }
}

// ---------------------------------------------------------------------------------------------
// rasterize
// ---------------------------------------------------------------------------------------------

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
  const int64_t tiles_x = (W + kTile - 1) / kTile, tiles_y = (H + kTile - 1) / kTile, T = tiles_x * tiles_y;
  const float* pos = positions.data_ptr<float>();
  const int32_t* tri = faces.data_ptr<int32_t>();

  // Default-initialised (not zeroed): setup_triangle writes every box, and the setup of every
  // triangle with a non-empty box.
  std::unique_ptr<Setup[]> setups(new Setup[B * F]);
  std::unique_ptr<Box[]> boxes(new Box[B * F]);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t f = 0; f < F; ++f) {
      setup_triangle(pos + b * V * 4, tri + f * 3, H, W, setups[b * F + f], boxes[b * F + f]);
    }
  }

  // Bin into tiles in (image, triangle) order, so every tile's list is in triangle order.
  std::vector<int64_t> offsets(B * T + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t f = 0; f < F; ++f) {
      const Box& s = boxes[b * F + f];
      if (s.x0 > s.x1 || s.y0 > s.y1) continue;
      for (int64_t ty = s.y0 / kTile; ty <= s.y1 / kTile; ++ty)
        for (int64_t tx = s.x0 / kTile; tx <= s.x1 / kTile; ++tx) ++offsets[b * T + ty * tiles_x + tx + 1];
    }
  }
  for (int64_t t = 0; t < B * T; ++t) offsets[t + 1] += offsets[t];
  std::vector<int32_t> tile_triangles(offsets[B * T]);
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t f = 0; f < F; ++f) {
        const Box& s = boxes[b * F + f];
        if (s.x0 > s.x1 || s.y0 > s.y1) continue;
        for (int64_t ty = s.y0 / kTile; ty <= s.y1 / kTile; ++ty)
          for (int64_t tx = s.x0 / kTile; tx <= s.x1 / kTile; ++tx)
            tile_triangles[cursor[b * T + ty * tiles_x + tx]++] = static_cast<int32_t>(f);
      }
    }
  }

  const PixelCentres centres(H, W);
  const double* qx = centres.x.data();
  const double* qy = centres.y.data();

  // Every pixel is written by its tile below (empty ones too), so no fill is needed here.
  at::Tensor ids = at::empty({B, H, W}, positions.options().dtype(at::kInt));
  at::Tensor bary = at::empty({B, H, W, 2}, positions.options());
  at::Tensor depth = at::empty({B, H, W}, positions.options());
  int32_t* p_ids = ids.data_ptr<int32_t>();
  float* p_bary = bary.data_ptr<float>();
  float* p_depth = depth.data_ptr<float>();

#pragma omp parallel
  {
    constexpr int64_t kPixels = kTile * kTile;
    std::vector<double> best_depth(kPixels), best_d(kPixels * 3);
    std::vector<int32_t> best_id(kPixels);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bt = 0; bt < B * T; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const int64_t x_begin = (t % tiles_x) * kTile, y_begin = (t / tiles_x) * kTile;
      const int64_t x_end = std::min(x_begin + kTile, W), y_end = std::min(y_begin + kTile, H);
      std::fill(best_depth.begin(), best_depth.end(), std::numeric_limits<double>::infinity());
      std::fill(best_id.begin(), best_id.end(), -1);
      for (int64_t j = offsets[bt]; j < offsets[bt + 1]; ++j) {
        const int32_t f = tile_triangles[j];
        const Setup& s = setups[b * F + f];
        const Box& box = boxes[b * F + f];
        const Frame& fr = s.frame;
        const int64_t y0 = std::max<int64_t>(box.y0, y_begin), y1 = std::min<int64_t>(box.y1 + 1, y_end);
        const int64_t x0 = std::max<int64_t>(box.x0, x_begin), x1 = std::min<int64_t>(box.x1 + 1, x_end);
        for (int64_t y = y0; y < y1; ++y) {
          const double r0 = row_part(fr.n[0], qy[y]), r1 = row_part(fr.n[1], qy[y]), r2 = row_part(fr.n[2], qy[y]);
          // Rounding is monotonic, so along a row each D is monotonic in x (qx increases) and the
          // covered pixels form one run: stop at the first miss after a hit (exact, not a guess).
          bool entered = false;
          for (int64_t x = x0; x < x1; ++x) {
            const double d0 = qx[x] * fr.n[0].x + r0;
            const double d1 = qx[x] * fr.n[1].x + r1;
            const double d2 = qx[x] * fr.n[2].x + r2;
            if (!((d0 >= 0) & (d1 >= 0) & (d2 >= 0))) {
              if (entered) break;
              continue;
            }
            entered = true;
            const double z = (d0 * s.z[0] + d1 * s.z[1] + d2 * s.z[2]) / fr.det;
            if (!(z >= -1.0 && z <= 1.0)) continue;
            const int64_t local = (y - y_begin) * kTile + (x - x_begin);
            if (z < best_depth[local]) {  // triangles arrive in index order: ties keep the first
              best_depth[local] = z;
              best_id[local] = f;
              best_d[3 * local] = d0;
              best_d[3 * local + 1] = d1;
              best_d[3 * local + 2] = d2;
            }
          }
        }
      }
      for (int64_t y = y_begin; y < y_end; ++y) {
        for (int64_t x = x_begin; x < x_end; ++x) {
          const int64_t local = (y - y_begin) * kTile + (x - x_begin);
          const int64_t pix = (b * H + y) * W + x;
          if (best_id[local] < 0) {
            p_ids[pix] = -1;
            p_bary[2 * pix] = 0.0f;
            p_bary[2 * pix + 1] = 0.0f;
            p_depth[pix] = 0.0f;
            continue;
          }
          const double* d = best_d.data() + 3 * local;
          const double total = d[0] + d[1] + d[2];
          p_ids[pix] = best_id[local];
          p_bary[2 * pix] = static_cast<float>(d[0] / total);
          p_bary[2 * pix + 1] = static_cast<float>(d[1] / total);
          p_depth[pix] = static_cast<float>(best_depth[local]);
        }
      }
    }
  }
  return {ids, bary, depth};
}

at::Tensor mesh_raster_rasterize_backward(const at::Tensor& positions, const at::Tensor& faces,
                                          const at::Tensor& ids, const at::Tensor& grad_bary,
                                          const at::Tensor& grad_depth) {
  const char* op = "mesh_raster_rasterize_backward";
  check_tensor(positions, op, "clip_positions", at::kFloat, 3);
  const int64_t B = positions.size(0), V = positions.size(1), F = faces.size(0);
  check_faces(faces, V, op);
  check_ids(ids, F, op);
  TORCH_CHECK(ids.size(0) == B, op, ": triangle_id and clip_positions disagree on the batch");
  const int64_t H = ids.size(1), W = ids.size(2), N = B * H * W;
  check_tensor(grad_bary, op, "grad_barycentrics", at::kFloat, 4);
  check_tensor(grad_depth, op, "grad_depth", at::kFloat, 3);
  TORCH_CHECK(grad_bary.numel() == 2 * N && grad_depth.numel() == N, op, ": gradient shapes do not match the raster");
  const float* pos = positions.data_ptr<float>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const float* g_bary = grad_bary.data_ptr<float>();
  const float* g_depth = grad_depth.data_ptr<float>();

  // Group the covered pixels by (image, triangle), in pixel order (a stable counting sort).
  struct PixelIndex {
    int32_t x, y;
  };
  std::vector<int64_t> offsets(B * F + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t local = 0; local < H * W; ++local) {
      const int32_t f = p_ids[b * H * W + local];
      if (f >= 0) ++offsets[b * F + f + 1];
    }
  }
  for (int64_t bf = 0; bf < B * F; ++bf) offsets[bf + 1] += offsets[bf];
  std::vector<PixelIndex> pixels(static_cast<size_t>(offsets[B * F]));
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t x = 0; x < W; ++x) {
          const int32_t f = p_ids[(b * H + y) * W + x];
          if (f >= 0) pixels[cursor[b * F + f]++] = {static_cast<int32_t>(x), static_cast<int32_t>(y)};
        }
      }
    }
  }

  const PixelCentres centres(H, W);
  // Per (image, triangle): the gradient of its three vertices, summed over its pixels in order.
  // With u = D0 / S, v = D1 / S, z/w = (sum D_j z_j) / det and D_i = q . n_i, the gradient of a
  // vertex is linear in per-pixel sums: d/d e_k = n_k sum(g_det) + e_{k+1} x sum(gD_{k-1} q)
  // - e_{k+2} x sum(gD_{k+1} q), since e_k enters D_{k-1} = e_k . (e_{k+1} x q) and
  // D_{k+1} = e_k . (q x e_{k+2}), and d det / d e_k = n_k.
  // Written for every (image, triangle) with pixels, and only those are read.
  std::unique_ptr<double[]> triangle_grads(new double[B * F * 12]);
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t bf = 0; bf < B * F; ++bf) {
    if (offsets[bf] == offsets[bf + 1]) continue;
    const int64_t b = bf / F, f = bf % F;
    Vec3 e[3];
    double z[3];
    for (int k = 0; k < 3; ++k) {
      const float* vertex = pos + (b * V + tri[3 * f + k]) * 4;
      e[k] = load_xyw(vertex);
      z[k] = vertex[2];
    }
    const Frame fr = make_frame(e);
    const double inverse_det = 1.0 / fr.det;
    double sum_g_det = 0.0, sum_g_z[3] = {0.0, 0.0, 0.0};
    Vec3 sum_gd_q[3] = {{0.0, 0.0, 0.0}, {0.0, 0.0, 0.0}, {0.0, 0.0, 0.0}};
    for (int64_t j = offsets[bf]; j < offsets[bf + 1]; ++j) {
      const PixelIndex p = pixels[j];
      const int64_t pix = (b * H + p.y) * W + p.x;
      const double gu = g_bary[2 * pix], gv = g_bary[2 * pix + 1], gz = g_depth[pix];
      const double qx = centres.x[p.x], qy = centres.y[p.y];
      double d[3];
      for (int i = 0; i < 3; ++i) d[i] = edge_value(fr.n[i], qx, qy);
      const double inverse_total = 1.0 / (d[0] + d[1] + d[2]);
      const double u = d[0] * inverse_total, v = d[1] * inverse_total;
      const double zw = (d[0] * z[0] + d[1] * z[1] + d[2] * z[2]) * inverse_det;
      const double gz_det = gz * inverse_det;
      for (int i = 0; i < 3; ++i) {
        const double g_d =
            (gu * ((i == 0 ? 1.0 : 0.0) - u) + gv * ((i == 1 ? 1.0 : 0.0) - v)) * inverse_total + gz_det * z[i];
        add_to(sum_gd_q[i], {g_d * qx, g_d * qy, g_d});
        sum_g_z[i] += gz_det * d[i];
      }
      sum_g_det -= gz_det * zw;
    }
    double* out = triangle_grads.get() + bf * 12;
    for (int k = 0; k < 3; ++k) {
      const int next = (k + 1) % 3, after = (k + 2) % 3;  // after == k - 1 (mod 3)
      Vec3 g_e = scaled(fr.n[k], sum_g_det);
      add_to(g_e, cross(e[next], sum_gd_q[after]));
      add_to(g_e, scaled(cross(e[after], sum_gd_q[next]), -1.0));
      out[4 * k] = g_e.x;
      out[4 * k + 1] = g_e.y;
      out[4 * k + 2] = sum_g_z[k];
      out[4 * k + 3] = g_e.w;
    }
  }

  // Sum into the vertices in face order: one image per thread, so the order is fixed.
  std::vector<double> sums(B * V * 4, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    double* image_sums = sums.data() + b * V * 4;
    for (int64_t f = 0; f < F; ++f) {
      const int64_t bf = b * F + f;
      if (offsets[bf] == offsets[bf + 1]) continue;
      const double* in = triangle_grads.get() + bf * 12;
      for (int k = 0; k < 3; ++k) {
        double* target = image_sums + static_cast<int64_t>(tri[3 * f + k]) * 4;
        for (int c = 0; c < 4; ++c) target[c] += in[4 * k + c];
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

at::Tensor mesh_raster_interpolate_forward(const at::Tensor& attributes, const at::Tensor& bary,
                                           const at::Tensor& ids, const at::Tensor& faces) {
  const char* op = "mesh_raster_interpolate";
  check_interpolate(attributes, bary, ids, faces, op);
  const int64_t A = attributes.size(0), V = attributes.size(1), C = attributes.size(2);
  const int64_t B = ids.size(0), H = ids.size(1), W = ids.size(2), N = B * H * W;
  at::Tensor out = at::empty({B, H, W, C}, attributes.options());  // every pixel is written below
  const float* attr = attributes.data_ptr<float>();
  const float* p_bary = bary.data_ptr<float>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  float* p_out = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t pix = 0; pix < N; ++pix) {
    const int32_t f = p_ids[pix];
    float* o = p_out + pix * C;
    if (f < 0) {
      std::fill(o, o + C, 0.0f);
      continue;
    }
    const int64_t a = A > 1 ? pix / (H * W) : 0;
    const float* a0 = attr + (a * V + tri[3 * f]) * C;
    const float* a1 = attr + (a * V + tri[3 * f + 1]) * C;
    const float* a2 = attr + (a * V + tri[3 * f + 2]) * C;
    const float u = p_bary[2 * pix], v = p_bary[2 * pix + 1];
    const float w = 1.0f - u - v;
    for (int64_t c = 0; c < C; ++c) o[c] = u * a0[c] + v * a1[c] + w * a2[c];
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> mesh_raster_interpolate_backward(const at::Tensor& attributes,
                                                                    const at::Tensor& bary, const at::Tensor& ids,
                                                                    const at::Tensor& faces,
                                                                    const at::Tensor& grad_output,
                                                                    bool need_attributes, bool need_bary) {
  const char* op = "mesh_raster_interpolate_backward";
  check_interpolate(attributes, bary, ids, faces, op);
  const int64_t A = attributes.size(0), V = attributes.size(1), C = attributes.size(2);
  const int64_t B = ids.size(0), H = ids.size(1), W = ids.size(2), N = B * H * W;
  check_tensor(grad_output, op, "grad_output", at::kFloat, 4);
  TORCH_CHECK(grad_output.numel() == N * C, op, ": grad_output must be [B, H, W, C]");
  const float* attr = attributes.data_ptr<float>();
  const float* p_bary = bary.data_ptr<float>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  const float* g = grad_output.data_ptr<float>();

  // Outputs not asked for are returned empty (the autograd wrapper drops them).
  at::Tensor grad_bary = at::empty({need_bary ? B : 0, H, W, 2}, attributes.options());
  if (need_bary) {
    float* p_gb = grad_bary.data_ptr<float>();
#pragma omp parallel for schedule(static)
    for (int64_t pix = 0; pix < N; ++pix) {
      const int32_t f = p_ids[pix];
      if (f < 0) {
        p_gb[2 * pix] = 0.0f;
        p_gb[2 * pix + 1] = 0.0f;
        continue;
      }
      const int64_t a = A > 1 ? pix / (H * W) : 0;
      const float* a0 = attr + (a * V + tri[3 * f]) * C;
      const float* a1 = attr + (a * V + tri[3 * f + 1]) * C;
      const float* a2 = attr + (a * V + tri[3 * f + 2]) * C;
      double gu = 0.0, gv = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const double gc = g[pix * C + c];
        gu += gc * (static_cast<double>(a0[c]) - a2[c]);
        gv += gc * (static_cast<double>(a1[c]) - a2[c]);
      }
      p_gb[2 * pix] = static_cast<float>(gu);
      p_gb[2 * pix + 1] = static_cast<float>(gv);
    }
  }

  at::Tensor grad_attr = at::empty({need_attributes ? A : 0, V, C}, attributes.options());
  if (need_attributes) {
    // Scatter into the vertices in pixel order; images run in parallel only when each has its own
    // attributes (shared attributes are summed over the images serially, in image order).
    std::vector<double> sums(A * V * C, 0.0);
    const int64_t images_per_slot = A > 1 ? 1 : B;
#pragma omp parallel for schedule(static)
    for (int64_t a = 0; a < A; ++a) {
      double* slot = sums.data() + a * V * C;
      for (int64_t pix = a * H * W; pix < (a + images_per_slot) * H * W; ++pix) {
        const int32_t f = p_ids[pix];
        if (f < 0) continue;
        const float u = p_bary[2 * pix], v = p_bary[2 * pix + 1];
        const float weights[3] = {u, v, 1.0f - u - v};
        for (int k = 0; k < 3; ++k) {
          double* target = slot + static_cast<int64_t>(tri[3 * f + k]) * C;
          for (int64_t c = 0; c < C; ++c) target[c] += static_cast<double>(weights[k]) * g[pix * C + c];
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
// A slot's code is -1 (no blend) or edge + 3 * (front is the second pixel).
struct PairGeometry {
  int64_t front, back;  // flat pixel indices
  double qfx, qfy, qbx, qby;
};

inline PairGeometry pair_geometry(int64_t b, int64_t direction, int64_t y, int64_t x, int code, int64_t H,
                                  int64_t W, const PixelCentres& centres) {
  const int64_t first = (b * H + y) * W + x;
  const int64_t second = direction == 0 ? first + 1 : first + W;
  const int64_t x2 = direction == 0 ? x + 1 : x, y2 = direction == 0 ? y : y + 1;
  const bool second_front = code >= 3;
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

// Which pixel of a blended pair receives colour and with what weight.
struct Blend {
  int64_t destination, source;
  float weight;
  bool to_front;
};

inline Blend blend_of(const PairGeometry& g, double t) {
  Blend bl;
  bl.to_front = t < 0.5;
  bl.destination = bl.to_front ? g.front : g.back;
  bl.source = bl.to_front ? g.back : g.front;
  bl.weight = static_cast<float>(bl.to_front ? 0.5 - t : t - 0.5);
  return bl;
}

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
  return pair_geometry(b, direction, y, x, code, H, W, centres);
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
  check_tensor(topology, op, "topology", at::kInt, 2);
  TORCH_CHECK(topology.numel() == F * 3, op, ": topology must be [F, 3]");
  const int32_t* opposite = topology.data_ptr<int32_t>();
  for (int64_t i = 0; i < F * 3; ++i) {
    TORCH_CHECK(opposite[i] >= -1 && opposite[i] < V, op, ": topology holds vertex ", opposite[i], ", outside [-1, ",
                V, ")");
  }
  const float* pos = positions.data_ptr<float>();
  const int32_t* tri = faces.data_ptr<int32_t>();
  const int32_t* p_ids = ids.data_ptr<int32_t>();
  const float* p_depth = depth.data_ptr<float>();
  const float* p_color = color.data_ptr<float>();

  const PixelCentres centres(H, W);
  // Edge normals of the triangles some pixel shows (only those can be a pair's front triangle).
  std::vector<uint8_t> shown(P * F, 0);
  for (int64_t b = 0; b < B; ++b) {
    uint8_t* image_shown = shown.data() + (P > 1 ? b : 0) * F;
    for (int64_t local = 0; local < H * W; ++local) {
      const int32_t f = p_ids[b * H * W + local];
      if (f >= 0) image_shown[f] = 1;
    }
  }
  std::unique_ptr<Frame[]> frames(new Frame[P * F]);  // read only where shown
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t f = 0; f < F; ++f) {
      if (!shown[p * F + f]) continue;
      const float* image_positions = pos + p * V * 4;
      const int32_t* face = tri + f * 3;
      const Vec3 e[3] = {load_xyw(image_positions + static_cast<int64_t>(face[0]) * 4),
                         load_xyw(image_positions + static_cast<int64_t>(face[1]) * 4),
                         load_xyw(image_positions + static_cast<int64_t>(face[2]) * 4)};
      frames[p * F + f] = make_frame(e);
    }
  }

  at::Tensor codes = at::full({B, 2, H, W}, -1, color.options().dtype(at::kChar));
  int8_t* p_codes = codes.data_ptr<int8_t>();
  std::unique_ptr<double[]> crossings(new double[B * 2 * H * W]);  // read only where a code is set

  // Pass 1: which pairs blend, across which edge, at which t.
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < B * 2 * H; ++row) {
    const int64_t b = row / (2 * H), direction = (row / H) % 2, y = row % H;
    if (direction == 1 && y + 1 >= H) continue;
    const int64_t position_batch = P > 1 ? b : 0;
    for (int64_t x = 0; x < W; ++x) {
      if (direction == 0 && x + 1 >= W) continue;
      const int64_t first = (b * H + y) * W + x;
      const int64_t second = direction == 0 ? first + 1 : first + W;
      const int32_t id1 = p_ids[first], id2 = p_ids[second];
      if (id1 == id2) continue;
      const float z1 = p_depth[first], z2 = p_depth[second];
      const bool first_front = id2 < 0 || (id1 >= 0 && (z1 < z2 || (z1 == z2 && id1 < id2)));
      const int32_t f = first_front ? id1 : id2;
      const PairGeometry g = pair_geometry(b, direction, y, x, first_front ? 0 : 3, H, W, centres);
      const Frame& fr = frames[position_batch * F + f];
      int best = -1;
      double best_t = std::numeric_limits<double>::infinity();
      for (int i = 0; i < 3; ++i) {
        const double d_back = edge_value(fr.n[i], g.qbx, g.qby);
        const bool exits = fr.det > 0 ? d_back < 0 : (fr.det < 0 && d_back > 0);
        if (!exits) continue;
        const double d_front = edge_value(fr.n[i], g.qfx, g.qfy);
        const double t = d_front / (d_front - d_back);
        if (t < best_t) {  // strict: ties keep the smaller edge index
          best_t = t;
          best = i;
        }
      }
      if (best < 0) continue;
      const int32_t far_vertex = opposite[static_cast<int64_t>(f) * 3 + best];
      if (far_vertex >= 0) {
        const double side = dot(load_xyw(pos + (position_batch * V + far_vertex) * 4), fr.n[best]);
        const bool folded = fr.det > 0 ? side >= 0 : side <= 0;
        if (!folded) continue;  // the surface goes on across this edge: not a silhouette
      }
      const int64_t slot = ((b * 2 + direction) * H + y) * W + x;
      p_codes[slot] = static_cast<int8_t>(best + (first_front ? 0 : 3));
      crossings[slot] = best_t;
    }
  }

  // Pass 2: apply the blends serially in slot order (there are few: silhouette pairs only). A
  // pixel's deltas are thus added in the reference's order (left, right, below, above pair).
  at::Tensor out = color.clone();
  float* p_out = out.data_ptr<float>();
  for (int64_t slot = 0; slot < B * 2 * H * W; ++slot) {
    const int code = p_codes[slot];
    if (code < 0) continue;
    const Blend bl = blend_of(slot_geometry(slot, code, H, W, centres), crossings[slot]);
    const float* source = p_color + bl.source * C;
    const float* own = p_color + bl.destination * C;
    float* o = p_out + bl.destination * C;
    for (int64_t c = 0; c < C; ++c) o[c] += bl.weight * (source[c] - own[c]);
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

  const PixelCentres centres(H, W);
  std::vector<int64_t> active;  // blended slots, in slot order
  for (int64_t slot = 0; slot < S; ++slot) {
    if (p_codes[slot] >= 0) active.push_back(slot);
  }
  const int64_t A = static_cast<int64_t>(active.size());

  // Per blended pair: its blend, and d loss / d (x, y, w) of the edge's two endpoints.
  std::vector<Blend> blends(A);
  std::vector<double> partial(A * 6, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < A; ++k) {
    const int64_t slot = active[k];
    const int code = p_codes[slot];
    const int64_t b = slot / (2 * H * W);
    const PairGeometry geo = slot_geometry(slot, code, H, W, centres);
    const int32_t f = p_ids[geo.front];
    const float* image_positions = pos + (P > 1 ? b : 0) * V * 4;
    Vec3 start, end;
    double d_front, d_back;
    const double t = crossing(image_positions, tri + 3 * static_cast<int64_t>(f), code % 3, geo, start, end,
                              d_front, d_back);
    const Blend bl = blend_of(geo, t);
    blends[k] = bl;
    // out[dest] += w(t) (color[src] - color[dest]); dw/dt = -1 towards the front, +1 towards the back.
    double g_weight = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      g_weight += static_cast<double>(g[bl.destination * C + c]) *
                  static_cast<double>(p_color[bl.source * C + c] - p_color[bl.destination * C + c]);
    }
    const double g_t = bl.to_front ? -g_weight : g_weight;
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

  // Colour: the identity plus each blend's two terms, applied serially in slot order.
  at::Tensor grad_color = grad_output.clone();
  float* p_gc = grad_color.data_ptr<float>();
  for (int64_t k = 0; k < A; ++k) {
    const Blend& bl = blends[k];
    const float* g_dest = g + bl.destination * C;
    for (int64_t c = 0; c < C; ++c) {
      p_gc[bl.destination * C + c] -= bl.weight * g_dest[c];
      p_gc[bl.source * C + c] += bl.weight * g_dest[c];
    }
  }

  // Positions: the pairs' partials summed into the vertices serially in slot order.
  std::vector<double> sums(P * V * 4, 0.0);
  for (int64_t k = 0; k < A; ++k) {
    const int64_t slot = active[k];
    const int code = p_codes[slot];
    const int64_t b = slot / (2 * H * W);
    const PairGeometry geo = slot_geometry(slot, code, H, W, centres);
    const int32_t* face = tri + 3 * static_cast<int64_t>(p_ids[geo.front]);
    const int edge = code % 3;
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
      "Tensor grad_barycentrics, Tensor grad_depth) -> Tensor",
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
