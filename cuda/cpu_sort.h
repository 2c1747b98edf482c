// A stable LSD radix sort of (key, item) pairs for the cpu-tier kernels (gaussian_raster_cpu.cpp's
// depth order, tetrahedra_cpu.cpp's edge keys).
#pragma once

#include <array>
#include <cstddef>
#include <vector>

namespace lift3d_cpu {

// Sorts `keys` (unsigned, all < 2^bits) with their `items`, stably (equal keys keep their order),
// kRadix bits a pass; a pass whose digit is the same for every key would move nothing and is skipped.
template <int kRadix, typename Key, typename Item>
void radix_sort_pairs(std::vector<Key>& keys, std::vector<Item>& items, int bits) {
  constexpr Key kDigit = (Key{1} << kRadix) - 1;
  const size_t n = keys.size();
  std::vector<Key> keys_out(n);
  std::vector<Item> items_out(n);
  for (int shift = 0; shift < bits; shift += kRadix) {
    std::array<size_t, (size_t{1} << kRadix) + 1> start{};
    for (const Key key : keys) ++start[((key >> shift) & kDigit) + 1];
    if (n == 0 || start[((keys[0] >> shift) & kDigit) + 1] == n) continue;
    for (size_t d = 1; d < start.size(); ++d) start[d] += start[d - 1];
    for (size_t i = 0; i < n; ++i) {
      const size_t at = start[(keys[i] >> shift) & kDigit]++;
      keys_out[at] = keys[i];
      items_out[at] = items[i];
    }
    keys.swap(keys_out);
    items.swap(items_out);
  }
}

}  // namespace lift3d_cpu
