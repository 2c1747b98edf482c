// Recycled memory for the large outputs of the cpu-tier kernels.
//
// A training step allocates the same large outputs again and again (the hash grid's features and
// table gradient are 32 and 50 MB at threestudio's sizes). Fresh memory comes from mmap, and every
// page then costs a fault and a zeroing by the kernel on first touch: about ten times the cost of
// writing memory that is already mapped. The pool keeps the memory of outputs that have been freed
// and hands it out again for a request that fits it (the smallest free buffer at most a quarter
// larger than asked, so sizes that vary from step to step, as the sample counts of a NeRF do, still
// find one), as PyTorch's CUDA caching allocator does for GPU memory. At most kRetainBytes are
// kept: past that, the oldest free buffers go back to the system. A buffer is never handed to two
// live tensors.
#pragma once

#include <torch/extension.h>

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace lift3d_cpu {

constexpr size_t kHugePage = size_t{1} << 21;

// Asks for 2 MiB pages over [data, data + bytes) where the kernel grants them (THP "madvise"
// mode): one fault per 2 MiB instead of per 4 KiB. A hint; failure is harmless.
inline void advise_huge_pages(void* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

class OutputPool {
 public:
  static constexpr size_t kRetainBytes = size_t{256} << 20;  // freed memory kept for reuse, at most
  static constexpr size_t kMinBytes = kHugePage;  // smaller outputs come from torch's allocator

  struct Buffer {
    at::Tensor tensor;
    bool zeroed;  // fresh pages (all zeros); otherwise the contents are stale
  };

  // A float32 CPU tensor of `sizes`, uninitialised unless `zeroed` says otherwise.
  static Buffer take(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const at::TensorOptions float_options = options.dtype(at::kFloat).device(at::kCPU);
    const size_t wanted = sizeof(float) * static_cast<size_t>(c10::multiply_integers(sizes));
    if (wanted < kMinBytes) return {at::empty(sizes, float_options), false};
    size_t bytes = (wanted + kHugePage - 1) / kHugePage * kHugePage;
    OutputPool& pool = instance();
    void* data = pool.reuse(bytes);  // may hand out a larger buffer (and say so in `bytes`)
    bool zeroed = false;
    if (data == nullptr) {
      data = map_aligned(bytes);
      if (data == nullptr) return {at::empty(sizes, float_options), false};
      zeroed = true;
    }
    at::Tensor tensor = at::from_blob(
        data, sizes, [bytes](void* pointer) { instance().give_back(pointer, bytes); }, float_options);
    return {tensor, zeroed};
  }

 private:
  struct Entry {
    void* data;
    size_t bytes;
  };

  // Never destroyed: tensors freed while the process exits still hand their memory back here.
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

  // 2 MiB-aligned anonymous memory (so every huge page of it can be granted), or nullptr.
  static void* map_aligned(size_t bytes) {
    const size_t span = bytes + kHugePage;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
    if (aligned > start) munmap(raw, aligned - start);
    const size_t tail = start + span - (aligned + bytes);
    if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
    advise_huge_pages(reinterpret_cast<void*>(aligned), bytes);
    return reinterpret_cast<void*>(aligned);
  }

  // The smallest free buffer of [bytes, bytes * 5/4 + 2 MiB], taken out of the pool; size in `bytes`.
  void* reuse(size_t& bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t most = bytes + bytes / 4 + kHugePage;
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].bytes >= bytes && free_[i].bytes <= most && (best == free_.size() || free_[i].bytes < free_[best].bytes)) {
        best = i;
      }
    }
    if (best == free_.size()) return nullptr;
    void* data = free_[best].data;
    bytes = free_[best].bytes;
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    retained_ -= bytes;
    return data;
  }

  void give_back(void* data, size_t bytes) {
    std::vector<Entry> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > kRetainBytes) {
        evicted.push_back({data, bytes});
      } else {
        // Oldest first: a size that is no longer asked for does not hold memory for ever.
        size_t drop = 0;
        while (retained_ + bytes > kRetainBytes) {
          retained_ -= free_[drop].bytes;
          evicted.push_back(free_[drop++]);
        }
        free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
        free_.push_back({data, bytes});
        retained_ += bytes;
      }
    }
    for (const Entry& entry : evicted) munmap(entry.data, entry.bytes);
  }

  std::mutex mutex_;
  std::vector<Entry> free_;
  size_t retained_ = 0;
};

}  // namespace lift3d_cpu
