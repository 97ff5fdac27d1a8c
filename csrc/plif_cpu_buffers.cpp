#include "plif_cpu_buffers.h"

#include <c10/util/accumulate.h>

#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>

namespace plif {
namespace {

// Below this a buffer comes from torch's allocator, which serves small sizes from the heap.
constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kAlignment = 64;

class BufferCache {
 public:
  BufferCache() {
    const char* env = std::getenv("PLIF_CPU_CACHE_MB");
    limit_bytes_ = (env != nullptr ? std::strtoull(env, nullptr, 10) : 2048ull) << 20;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Most recently released first: its lines are the likeliest to still be in cache.
      const auto range = free_.equal_range(bytes);
      if (range.first != range.second) {
        const auto it = std::prev(range.second);
        void* block = it->second;
        free_.erase(it);
        cached_bytes_ -= bytes;
        return block;
      }
    }
    void* block = nullptr;
    if (posix_memalign(&block, kAlignment, bytes) != 0) return nullptr;
    return block;
  }

  void give_back(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_bytes_) {
        free_.emplace(bytes, block);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  bool enabled() const { return limit_bytes_ > 0; }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  void clear() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& entry : blocks) std::free(entry.second);
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // exact-size reuse: training repeats the same shapes
  size_t cached_bytes_ = 0;
  size_t limit_bytes_ = 0;
};

// Never destroyed: tensors released during interpreter shutdown still return their blocks.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinCachedBytes || !cache().enabled()) return at::empty(sizes, options);
  void* data = cache().take(bytes);
  TORCH_CHECK(data != nullptr, "plif_cuda: out of memory allocating ", bytes, " bytes");
  return at::from_blob(data, sizes, [bytes](void* block) { cache().give_back(block, bytes); }, options);
}

int64_t cpu_cache_bytes() { return static_cast<int64_t>(cache().cached_bytes()); }

void empty_cpu_cache() { cache().clear(); }

}  // namespace plif
