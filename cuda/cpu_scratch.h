// Per-thread scratch buffers for the cpu-tier kernels (mesh_raster_cpu.cpp, mesh_adjacency_cpu.cpp).
#pragma once

#include <cstddef>
#include <vector>

namespace lift3d_cpu {
// Unnamed: every kernel file gets its own buffers, so two files' uses of the same <T, kTag> never
// share one.
namespace {

// The calling thread's buffer of at least `count` T, kept between calls (grown, never shrunk; kTag
// tells a file's uses apart). Fresh allocations of hundreds of KB or more come from mmap and fault
// in page by page on every call otherwise.
template <typename T, int kTag>
std::vector<T>& reusable_buffer(size_t count) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < count) buffer.resize(count);
  return buffer;
}

}  // namespace
}  // namespace lift3d_cpu
