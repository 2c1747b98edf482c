// Edge adjacency of a triangle mesh, cpu tier (C++).
//
// Semantics: lift3d/geometry/meshes.py's edge_adjacency (the torch code there is the definition).
// Face f's edge k joins its vertices k and k + 1 (mod 3); the edge entries are numbered
// j = k * F + f and keyed by their (low, high) vertex pair. Sorted by (low, high, j) (a stable sort
// of the keys, as the torch code's), entries with the same key form a run:
//  - opposite [F, 3]: for a run of exactly two entries, each entry's face gets, at the index of the
//    vertex opposite that edge ((k + 2) % 3), the vertex opposite the edge in the other face; every
//    other slot is -1 (open edges, and edges shared by more than two faces);
//  - pairs [P, 2]: the faces of every two consecutive entries of a run, in sorted order.
//
// Integer work only, so the outputs are the torch code's exactly. The sort is a counting sort of
// the entries by low vertex (entries land in j order) and a sort of each low vertex's few entries
// by (high, j); where the vertex indices are far sparser than the entries, one comparison sort of
// all entries by (low, high, j) instead (the same order).

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu_scratch.h"

namespace {

constexpr const char* kOp = "mesh_edge_adjacency";

using lift3d_cpu::reusable_buffer;

// Items sorted in (low, high, j) order: item = (high << 32) | j, with the items of low vertex v at
// [start[v], start[v + 1]). Entries are scattered by low vertex in j order, then each vertex's
// few items sorted (they are unique, so every correct sort agrees).
template <typename Index>
void sort_by_low_vertex(const Index* face, int64_t F, int64_t V, uint32_t* start, uint64_t* items) {
  std::fill(start, start + V + 1, 0u);
  for (int64_t k = 0; k < 3; ++k)
    for (int64_t f = 0; f < F; ++f) ++start[std::min(face[3 * f + k], face[3 * f + (k + 1) % 3]) + 1];
  for (int64_t v = 0; v < V; ++v) start[v + 1] += start[v];
  uint32_t* next = start;  // next[v] walks low v's range; start[v] is restored from next[v - 1] below
  for (int64_t k = 0; k < 3; ++k) {  // j = k * F + f ascending
    for (int64_t f = 0; f < F; ++f) {
      const int64_t a = face[3 * f + k], b = face[3 * f + (k + 1) % 3];
      items[next[std::min(a, b)]++] = (static_cast<uint64_t>(std::max(a, b)) << 32) | static_cast<uint64_t>(k * F + f);
    }
  }
  for (int64_t v = V; v > 0; --v) start[v] = next[v - 1];  // next[v - 1] ended where v's range starts
  start[0] = 0;
  for (int64_t v = 0; v < V; ++v) {
    uint64_t* first = items + start[v];
    uint64_t* last = items + start[v + 1];
    if (last - first > 32) {  // a fan: many edges at one vertex
      std::sort(first, last);
      continue;
    }
    for (uint64_t* p = first + 1; p < last; ++p) {  // insertion sort: most vertices have a handful
      const uint64_t item = *p;
      uint64_t* q = p;
      for (; q > first && *(q - 1) > item; --q) *q = *(q - 1);
      *q = item;
    }
  }
}

template <typename Index>
std::tuple<at::Tensor, at::Tensor> edge_adjacency(const at::Tensor& faces) {
  const int64_t F = faces.size(0), E = 3 * F;
  const Index* face = faces.data_ptr<Index>();
  at::Tensor opposite = at::full({F, 3}, -1, faces.options().dtype(at::kLong));
  if (F == 0) return {opposite, at::empty({0, 2}, opposite.options())};
  TORCH_CHECK(E < (int64_t{1} << 32), kOp, ": too many faces (", F, ")");
  int64_t low_index = face[0], high_index = face[0];
  for (int64_t i = 0; i < E; ++i) {
    low_index = std::min<int64_t>(low_index, face[i]);
    high_index = std::max<int64_t>(high_index, face[i]);
  }
  TORCH_CHECK(low_index >= 0, kOp, ": faces hold the negative vertex index ", low_index);
  TORCH_CHECK(high_index < (int64_t{1} << 31), kOp, ": vertex index ", high_index, " is too large");
  const int64_t V = high_index + 1;
  // Entry j's edge number k and face f (k < 3: two compares, not a division).
  auto split = [F](uint64_t item, int64_t& k, int64_t& f) {
    const int64_t j = static_cast<int64_t>(item & 0xffffffffu);
    k = (j >= F) + (j >= 2 * F);
    f = j - k * F;
  };

  uint64_t* items = reusable_buffer<uint64_t, 0>(E).data();
  std::vector<int64_t>& run_low = reusable_buffer<int64_t, 1>(0);  // the fallback's low vertex per item
  const bool bucketed = V <= 4 * E + 4096;
  uint32_t* start = nullptr;
  if (bucketed) {
    start = reusable_buffer<uint32_t, 2>(V + 1).data();
    sort_by_low_vertex(face, F, V, start, items);
  } else {  // sparse vertex indices: one comparison sort (a bucket per vertex would be mostly empty)
    std::vector<std::pair<int64_t, uint64_t>> sorted(E);
    for (int64_t k = 0; k < 3; ++k) {
      for (int64_t f = 0; f < F; ++f) {
        const int64_t a = face[3 * f + k], b = face[3 * f + (k + 1) % 3];
        sorted[k * F + f] = {std::min(a, b), (static_cast<uint64_t>(std::max(a, b)) << 32) | static_cast<uint64_t>(k * F + f)};
      }
    }
    std::sort(sorted.begin(), sorted.end());
    run_low.resize(E);
    for (int64_t i = 0; i < E; ++i) {
      run_low[i] = sorted[i].first;
      items[i] = sorted[i].second;
    }
  }

  int64_t* out = opposite.data_ptr<int64_t>();
  int64_t* pair_faces = reusable_buffer<int64_t, 3>(2 * E).data();
  int64_t P = 0;
  // A run of equal (low, high) items [i, end): within one low vertex's range, or of equal run_low.
  auto visit_run = [&](int64_t i, int64_t end) {
    for (int64_t m = i; m + 1 < end; ++m) {
      int64_t k, f;
      split(items[m], k, f);
      pair_faces[2 * P] = f;
      split(items[m + 1], k, f);
      pair_faces[2 * P + 1] = f;
      ++P;
    }
    if (end - i == 2) {
      int64_t k1, f1, k2, f2;
      split(items[i], k1, f1);
      split(items[i + 1], k2, f2);
      const int64_t slot1 = 3 * f1 + (k1 + 2) % 3, slot2 = 3 * f2 + (k2 + 2) % 3;
      out[slot1] = face[slot2];
      out[slot2] = face[slot1];
    }
  };
  if (bucketed) {
    for (int64_t v = 0; v < V; ++v) {
      for (int64_t i = start[v], last = start[v + 1]; i < last;) {
        int64_t end = i + 1;
        while (end < last && (items[end] >> 32) == (items[i] >> 32)) ++end;
        visit_run(i, end);
        i = end;
      }
    }
  } else {
    for (int64_t i = 0; i < E;) {
      int64_t end = i + 1;
      while (end < E && run_low[end] == run_low[i] && (items[end] >> 32) == (items[i] >> 32)) ++end;
      visit_run(i, end);
      i = end;
    }
  }
  at::Tensor pairs = at::empty({P, 2}, opposite.options());
  std::copy(pair_faces, pair_faces + 2 * P, pairs.data_ptr<int64_t>());
  return {opposite, pairs};
}

std::tuple<at::Tensor, at::Tensor> mesh_edge_adjacency(const at::Tensor& faces) {
  TORCH_CHECK(faces.device().is_cpu(), kOp, " (cpu tier): faces must be on the CPU");
  TORCH_CHECK(faces.dim() == 2 && faces.size(1) == 3, kOp, ": faces must be [F, 3], got ", faces.sizes());
  TORCH_CHECK(faces.scalar_type() == at::kLong || faces.scalar_type() == at::kInt, kOp,
              ": faces must be int64 or int32, got ", faces.scalar_type());
  const at::Tensor contiguous = faces.contiguous();
  return faces.scalar_type() == at::kLong ? edge_adjacency<int64_t>(contiguous) : edge_adjacency<int32_t>(contiguous);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cpu, m) {
  m.def("mesh_edge_adjacency(Tensor faces) -> (Tensor opposite, Tensor pairs)", &mesh_edge_adjacency);
}
