// Marching tetrahedra's topology and face orientation, cpu tier (C++/OpenMP).
//
// Semantics: lift3d/geometry/tetrahedra.py's marching_tetrahedra (the torch code is the definition;
// this computes its no-gradient part). Given tetrahedra [T, 4], the SDF [V] and the vertices [V, 3]:
//  - a vertex is inside where sdf < 0; a tetrahedron crosses with 1 to 3 inside vertices;
//  - edges: the distinct sign-changing edges (a, b), a < b, of the crossing tetrahedra, sorted
//    lexicographically (torch.unique's order);
//  - faces: per crossing tetrahedron in order, its 1 or 2 triangles from the case table (passed in
//    by the caller, so both tiers use one table), as indices into edges;
//  - orientation: a face is flipped where n . (c_out - c_in) < 0, n the normal of the triangle of
//    its edge midpoints, c_in / c_out the means of the tetrahedron's inside / outside corners.
//    The torch code evaluates that in float32; here it is evaluated in double with a bound on the
//    float32 evaluation's error (any order of its roundings, FMA or not): where |n . d| exceeds the
//    bound both have the same sign; faces within it (degenerate geometry) are returned unflipped,
//    listed with their tetrahedra in `undecided_faces` [A, 2], and the caller decides them with
//    the torch code itself. So the faces are the
//    torch code's, bit for bit.
//
// The integer work is exact; the edge keys a * V + b are sorted by a stable LSD radix sort.
//
// kuhn_crossing_cells: which tetrahedra of a Kuhn grid to march (crossing_cell_tets and
// used_vertices of tetrahedra.py in one pass over the sign grid; see the function).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_sort.h"

namespace {

constexpr const char* kOp = "marching_tetrahedra_topology";
constexpr int kEdges[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};  // tetrahedra.py's TET_EDGES

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, int64_t last,
           const char* op = kOp) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu tier): ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, op, " (cpu tier): ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (cpu tier): ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim && (last < 0 || t.size(dim - 1) == last), op, " (cpu tier): ", name,
              " has shape ", t.sizes());
}

// Whether the face (p0, p1, p2 edge midpoints, d = c_out - c_in) is decided, and flipped: see the
// header. u is float32's unit roundoff; the bound adds up, generously, the error of every float32
// operation of the torch code (the midpoints and their differences, the cross product, the
// centres, their difference and the dot product), each at most u times its operands' magnitudes.
struct Orientation {
  bool decided, flip;
};

Orientation orient(const double m[3][3], const double c_in[3], const double c_out[3], double scale) {
  constexpr double u = 5.9604644775390625e-08;  // 2^-24
  double e1[3], e2[3], d[3];
  for (int c = 0; c < 3; ++c) {
    e1[c] = m[1][c] - m[0][c];
    e2[c] = m[2][c] - m[0][c];
    d[c] = c_out[c] - c_in[c];
  }
  const double n[3] = {e1[1] * e2[2] - e1[2] * e2[1], e1[2] * e2[0] - e1[0] * e2[2], e1[0] * e2[1] - e1[1] * e2[0]};
  const double dot = n[0] * d[0] + n[1] * d[1] + n[2] * d[2];
  // Absolute errors: a float32 midpoint or centre coordinate is off by at most ~10 u scale (scale
  // bounds every coordinate; a centre sums up to 3 corners), so e1, e2, d by ~20 u scale plus their
  // own rounding: 32 u scale is taken.
  const double err_input = 32.0 * u * scale;
  double bound = 0.0;
  for (int c = 0; c < 3; ++c) {
    const int j = (c + 1) % 3, k = (c + 2) % 3;
    const double products = std::fabs(e1[j] * e2[k]) + std::fabs(e1[k] * e2[j]);
    const double err_e = err_input + u * (std::fabs(e1[j]) + std::fabs(e1[k]) + std::fabs(e2[j]) + std::fabs(e2[k]));
    const double err_n = 2.0 * err_e * (std::fabs(e1[j]) + std::fabs(e1[k]) + std::fabs(e2[j]) + std::fabs(e2[k]) + err_e) +
                         4.0 * u * products;
    const double err_d = err_input + u * std::fabs(d[c]);
    bound += (std::fabs(d[c]) + err_d) * err_n + std::fabs(n[c]) * err_d + 4.0 * u * std::fabs(n[c] * d[c]);
  }
  bound *= 4.0;  // margin over the sum above
  if (!(std::fabs(dot) > bound)) return {false, false};  // also NaN
  return {true, dot < 0.0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> marching_tetrahedra_topology(
    const at::Tensor& vertices, const at::Tensor& tets, const at::Tensor& sdf, const at::Tensor& case_triangles,
    const at::Tensor& case_count) {
  check(vertices, "vertices", at::kFloat, 2, 3);
  check(tets, "tets", at::kLong, 2, 4);
  check(sdf, "sdf", at::kFloat, 1, vertices.size(0));
  check(case_triangles, "case_triangles", at::kLong, 3, 3);
  check(case_count, "case_count", at::kLong, 1, 16);
  TORCH_CHECK(case_triangles.size(0) == 16 && case_triangles.size(1) == 2, kOp, ": case_triangles must be [16, 2, 3]");
  const int64_t V = vertices.size(0), T = tets.size(0);
  const float* pos = vertices.data_ptr<float>();
  const int64_t* tet = tets.data_ptr<int64_t>();
  const float* s = sdf.data_ptr<float>();
  const int64_t* table = case_triangles.data_ptr<int64_t>();
  const int64_t* count = case_count.data_ptr<int64_t>();
  for (int64_t i = 0; i < 4 * T; ++i)
    TORCH_CHECK(tet[i] >= 0 && tet[i] < V, kOp, ": tetrahedron vertex ", tet[i], " is not in [0, ", V, ")");

  // Crossing tetrahedra, in order, with their inside masks.
  std::vector<int64_t> crossing;
  std::vector<uint8_t> masks;
  for (int64_t t = 0; t < T; ++t) {
    int mask = 0;
    for (int k = 0; k < 4; ++k) mask |= (s[tet[4 * t + k]] < 0.0f ? 1 : 0) << k;
    if (mask != 0 && mask != 15) {
      crossing.push_back(t);
      masks.push_back(static_cast<uint8_t>(mask));
    }
  }
  const int64_t C = static_cast<int64_t>(crossing.size());

  // Sign-changing edge slots (tetrahedron c, edge e) -> key a * V + b; sorted, deduplicated.
  std::vector<uint64_t> keys;
  std::vector<int64_t> slots;
  keys.reserve(4 * C);
  slots.reserve(4 * C);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t* v = tet + 4 * crossing[c];
    for (int e = 0; e < 6; ++e) {
      const int i = kEdges[e][0], j = kEdges[e][1];
      if (((masks[c] >> i) ^ (masks[c] >> j)) & 1) {
        const int64_t a = std::min(v[i], v[j]), b = std::max(v[i], v[j]);
        keys.push_back(static_cast<uint64_t>(a) * static_cast<uint64_t>(V) + static_cast<uint64_t>(b));
        slots.push_back(6 * c + e);
      }
    }
  }
  int bits = 1;
  while (bits < 64 && (static_cast<uint64_t>(V) * static_cast<uint64_t>(V)) >> bits) ++bits;
  lift3d_cpu::radix_sort_pairs<11>(keys, slots, bits);
  std::vector<int64_t> slot_vertex(6 * C, -1);
  std::vector<uint64_t> unique;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (i == 0 || keys[i] != keys[i - 1]) unique.push_back(keys[i]);
    slot_vertex[slots[i]] = static_cast<int64_t>(unique.size()) - 1;
  }
  const int64_t E = static_cast<int64_t>(unique.size());
  at::Tensor edges = at::empty({E, 2}, tets.options());
  int64_t* edge = edges.data_ptr<int64_t>();
  for (int64_t i = 0; i < E; ++i) {
    edge[2 * i] = static_cast<int64_t>(unique[i] / static_cast<uint64_t>(V));
    edge[2 * i + 1] = static_cast<int64_t>(unique[i] % static_cast<uint64_t>(V));
  }

  // Faces in tetrahedron order; each oriented, or left for the caller where undecided.
  std::vector<int64_t> first_face(C + 1, 0);
  for (int64_t c = 0; c < C; ++c) first_face[c + 1] = first_face[c] + count[masks[c]];
  const int64_t F = first_face[C];
  at::Tensor faces = at::empty({F, 3}, tets.options());
  int64_t* face = faces.data_ptr<int64_t>();
  std::vector<uint8_t> undecided(F, 0);
  double scale = 0.0;  // bounds every coordinate
  for (int64_t i = 0; i < 3 * V; ++i) scale = std::max(scale, static_cast<double>(std::fabs(pos[i])));
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    const int64_t* v = tet + 4 * crossing[c];
    double c_in[3] = {0.0, 0.0, 0.0}, c_out[3] = {0.0, 0.0, 0.0};
    int inside = 0;
    for (int k = 0; k < 4; ++k) {
      const bool in = (masks[c] >> k) & 1;
      inside += in;
      for (int x = 0; x < 3; ++x) (in ? c_in : c_out)[x] += pos[3 * v[k] + x];
    }
    for (int x = 0; x < 3; ++x) {
      c_in[x] /= inside;
      c_out[x] /= 4 - inside;
    }
    for (int64_t f = first_face[c]; f < first_face[c + 1]; ++f) {
      const int64_t* local = table + 6 * masks[c] + 3 * (f - first_face[c]);  // local edge indices
      double m[3][3];
      for (int corner = 0; corner < 3; ++corner) {
        const int64_t id = slot_vertex[6 * c + local[corner]];
        face[3 * f + corner] = id;
        for (int x = 0; x < 3; ++x)
          m[corner][x] = 0.5 * (static_cast<double>(pos[3 * edge[2 * id] + x]) + pos[3 * edge[2 * id + 1] + x]);
      }
      const Orientation o = orient(m, c_in, c_out, std::max(scale, 1e-30));
      undecided[f] = !o.decided;
      if (o.flip) std::swap(face[3 * f + 1], face[3 * f + 2]);
    }
  }
  std::vector<int64_t> open;  // (face, its tetrahedron) of the undecided faces
  for (int64_t c = 0; c < C; ++c)
    for (int64_t f = first_face[c]; f < first_face[c + 1]; ++f)
      if (undecided[f]) open.insert(open.end(), {f, crossing[c]});
  at::Tensor undecided_faces = at::empty({static_cast<int64_t>(open.size()) / 2, 2}, tets.options());
  std::copy(open.begin(), open.end(), undecided_faces.data_ptr<int64_t>());
  return {edges, faces, undecided_faces};
}

// The cells of a Kuhn grid (tetrahedral_grid's: vertex (i, j, k) is i n^2 + j n + k, n = r + 1)
// whose 8 corners are not all inside or all outside (sdf < 0), in cell order; the vertices they
// use, ascending; and their 6 tetrahedra each (corner indices from `kuhn_tets` [6, 4]) re-indexed
// into those vertices. The torch code is used_vertices(crossing_cell_tets(...)) in
// lift3d/geometry/tetrahedra.py: integer work, so the tensors are the same. The signs are read two
// grid planes at a time; the used vertices are a bitset with per-word ranks.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "kuhn_crossing_cells reads byte flags as words");

std::tuple<at::Tensor, at::Tensor> kuhn_crossing_cells(const at::Tensor& sdf, int64_t resolution,
                                                       const at::Tensor& kuhn_tets) {
  constexpr const char* op = "kuhn_crossing_cells";
  const int64_t r = resolution, n = r + 1;
  TORCH_CHECK(r >= 1 && r <= 2048, op, ": resolution must be in [1, 2048], got ", r);
  TORCH_CHECK(sdf.device().is_cpu() && sdf.scalar_type() == at::kFloat && sdf.is_contiguous() && sdf.dim() == 1 &&
                  sdf.size(0) == n * n * n,
              op, " (cpu tier): sdf must be a contiguous float32 CPU tensor [", n * n * n, "], got ", sdf.sizes(), " ",
              sdf.scalar_type());
  check(kuhn_tets, "kuhn_tets", at::kLong, 2, 4, op);
  TORCH_CHECK(kuhn_tets.size(0) == 6, op, ": kuhn_tets must be [6, 4]");
  const int64_t* kuhn = kuhn_tets.data_ptr<int64_t>();
  for (int64_t i = 0; i < 24; ++i) TORCH_CHECK(kuhn[i] >= 0 && kuhn[i] < 8, op, ": kuhn_tets holds corner ", kuhn[i]);
  const float* s = sdf.data_ptr<float>();
  const int64_t plane = n * n;
  int64_t corner_offset[8];
  for (int c = 0; c < 8; ++c) corner_offset[c] = (c & 1) * plane + ((c >> 1) & 1) * n + ((c >> 2) & 1);

  // Crossing cells by their corner-0 vertex, in cell order (i, j, k ascending).
  std::vector<int64_t> cells;
  const int64_t padded = (r + 7) / 8 * 8;  // crossing flags of a row, read 8 at a time
  std::vector<uint8_t> inside_a(plane), inside_b(plane), any_row(n), all_row(n), crossing(padded, 0);
  uint8_t* low = inside_a.data();
  uint8_t* high = inside_b.data();
  for (int64_t v = 0; v < plane; ++v) low[v] = s[v] < 0.0f;
  for (int64_t i = 0; i < r; ++i) {
    const float* next = s + (i + 1) * plane;
    for (int64_t v = 0; v < plane; ++v) high[v] = next[v] < 0.0f;
    for (int64_t j = 0; j < r; ++j) {
      const uint8_t *a = low + j * n, *b = low + (j + 1) * n, *c = high + j * n, *d = high + (j + 1) * n;
      for (int64_t k = 0; k < n; ++k) {
        any_row[k] = a[k] | b[k] | c[k] | d[k];
        all_row[k] = a[k] & b[k] & c[k] & d[k];
      }
      for (int64_t k = 0; k < r; ++k) crossing[k] = (any_row[k] | any_row[k + 1]) & ~(all_row[k] & all_row[k + 1]) & 1;
      // Few cells cross: skip 8 flags at a time (a branch per cell would mispredict at the surface);
      // byte m - k of the word is flag m (little-endian, asserted above).
      for (int64_t k = 0; k < r; k += 8) {
        uint64_t word;
        std::memcpy(&word, crossing.data() + k, sizeof word);
        for (int64_t m = k; word != 0; word >>= 8, ++m)
          if (word & 1) cells.push_back(i * plane + j * n + m);
      }
    }
    std::swap(low, high);
  }

  // The used vertices: every corner of a crossing cell (its 6 tetrahedra use all 8).
  const int64_t V = n * plane, words = (V + 63) / 64;
  std::vector<uint64_t> used_bits(words, 0);
  for (const int64_t base : cells)
    for (int c = 0; c < 8; ++c) {
      const int64_t v = base + corner_offset[c];
      used_bits[v >> 6] |= uint64_t{1} << (v & 63);
    }
  std::vector<int64_t> rank(words + 1, 0);  // used vertices before each word
  for (int64_t w = 0; w < words; ++w) rank[w + 1] = rank[w] + __builtin_popcountll(used_bits[w]);
  const int64_t U = rank[words];
  at::Tensor used = at::empty({U}, sdf.options().dtype(at::kLong));
  int64_t* used_out = used.data_ptr<int64_t>();
  for (int64_t w = 0; w < words; ++w)
    for (uint64_t bits = used_bits[w]; bits != 0; bits &= bits - 1) *used_out++ = 64 * w + __builtin_ctzll(bits);

  const int64_t C = static_cast<int64_t>(cells.size());
  at::Tensor local_tets = at::empty({6 * C, 4}, used.options());
  int64_t* out = local_tets.data_ptr<int64_t>();
  for (int64_t cell = 0; cell < C; ++cell) {
    int64_t local[8];
    for (int c = 0; c < 8; ++c) {
      const int64_t v = cells[cell] + corner_offset[c];
      local[c] = rank[v >> 6] + __builtin_popcountll(used_bits[v >> 6] & ((uint64_t{1} << (v & 63)) - 1));
    }
    for (int t = 0; t < 24; ++t) out[24 * cell + t] = local[kuhn[t]];
  }
  return {used, local_tets};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cpu, m) {
  m.def(
      "marching_tetrahedra_topology(Tensor vertices, Tensor tets, Tensor sdf, Tensor case_triangles, "
      "Tensor case_count) -> (Tensor edges, Tensor faces, Tensor undecided_faces)",
      &marching_tetrahedra_topology);
  m.def("kuhn_crossing_cells(Tensor sdf, int resolution, Tensor kuhn_tets) -> (Tensor used, Tensor local_tets)",
        &kuhn_crossing_cells);
}
