// Run-time choice of the instruction set for the cpu-tier kernels that ship an AVX2 build of
// their hot loop next to the baseline x86-64 one (mesh_raster_cpu.cpp, hashgrid_cpu.cpp,
// gaussian_raster_cpu.cpp), and the vector load / store helpers those loops share.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#define LIFT3D_CPU_X86 1
#endif

namespace lift3d_cpu {

// True where the CPU has AVX2 and LIFT3D_KERNELS_NO_AVX2=1 is not set. The variable is read per
// call, so a test can run both builds in one process and compare them.
inline bool use_avx2() {
#ifdef LIFT3D_CPU_X86
  const char* no_avx2 = std::getenv("LIFT3D_KERNELS_NO_AVX2");
  if (no_avx2 != nullptr && std::strcmp(no_avx2, "1") == 0) return false;
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// An unaligned load / store of a GCC vector V from / to memory of its lane type T (memcpy: no
// aliasing or alignment assumptions; compilers emit one vector move). The wide vectors only pass
// through these always-inlined functions, never a real call boundary: GCC's warning about their
// calling convention without AVX does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename V, typename T>
inline __attribute__((always_inline)) V load_vector(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename T>
inline __attribute__((always_inline)) void store_vector(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
#pragma GCC diagnostic pop

}  // namespace lift3d_cpu
