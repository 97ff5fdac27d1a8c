#include "plif_cpu_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace plif {
namespace {

// Below this a buffer comes from torch's allocator, which serves small sizes from the heap.
constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kPageBytes = 4096;

struct Block {
  void* data;
  size_t bytes;  // capacity: the request rounded up to whole pages
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() {
    const char* env = std::getenv("PLIF_CPU_CACHE_MB");
    limit_bytes_ = env != nullptr ? std::strtoull(env, nullptr, 10) << 20 : SIZE_MAX;
  }

  bool enabled() const { return limit_bytes_.load() > 0; }

  size_t set_limit(size_t bytes) {
    std::vector<Block> evicted;
    size_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = limit_bytes_.exchange(bytes);
      evict_until(bytes, evicted);
    }
    unmap(evicted);
    return previous;
  }

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinCachedBytes || !enabled()) return c10::GetCPUAllocator()->allocate(bytes);
    const Block block = take((bytes + kPageBytes - 1) / kPageBytes * kPageBytes);
    return {block.data, block.data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  void clear() {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted.swap(free_);
      cached_bytes_ = 0;
      peak_live_bytes_ = live_bytes_;
    }
    unmap(evicted);
  }

  // Fork (pthread_atfork): no thread may hold the lock across it, and the child drops what
  // the parent had cached rather than keep copy-on-write copies of it.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }
  void reset_in_child() {
    std::vector<Block> inherited;
    inherited.swap(free_);
    cached_bytes_ = 0;
    mutex_.unlock();
    unmap(inherited);
  }

 private:
  static void release(void* data);

  Block take(size_t bytes) {
    std::vector<Block> evicted;
    Block block{nullptr, bytes};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Best fit within a fifth of waste; on ties the most recently released (its lines are the
      // likeliest to be in cache). Where a new buffer would push live + cached over the peak,
      // the smallest cached buffer that holds the request serves it whatever the waste:
      // evicting a large buffer to map a small one would fault both in again (a backward's
      // [N] gradient next to the forward's [T, N] H, every training step).
      const bool over_peak = live_bytes_ + cached_bytes_ + bytes > peak_live_bytes_;
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes >= bytes && (over_peak || it->bytes - bytes <= it->bytes / 5) &&
            (best == free_.end() || it->bytes <= best->bytes)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        block = *best;
        free_.erase(best);
        cached_bytes_ -= block.bytes;
      } else {
        // A new buffer: evict the oldest until live + cached fits under the peak again.
        peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_ + bytes);
        evict_until(peak_live_bytes_ - live_bytes_ - bytes, evicted);
      }
      live_bytes_ += block.bytes;
      if (block.data != nullptr) live_.emplace(block.data, block.bytes);
    }
    unmap(evicted);
    if (block.data == nullptr) {
      block.data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (block.data == MAP_FAILED) {
        std::lock_guard<std::mutex> lock(mutex_);
        live_bytes_ -= bytes;
        TORCH_CHECK(false, "plif_cuda: out of memory allocating ", bytes, " bytes for a CPU output");
      }
      std::lock_guard<std::mutex> lock(mutex_);
      live_.emplace(block.data, block.bytes);
    }
    return block;
  }

  void give_back(void* data) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = live_.find(data);
      const Block block{data, it->second};
      live_.erase(it);
      live_bytes_ -= block.bytes;
      free_.push_back(block);
      cached_bytes_ += block.bytes;
      // live + cached is unchanged by a release, so only the explicit cap can be exceeded.
      evict_until(std::min(limit_bytes_.load(), peak_live_bytes_ - live_bytes_), evicted);
    }
    unmap(evicted);
  }

  // Moves the least recently released buffers to `evicted` until at most `bound` bytes stay.
  void evict_until(size_t bound, std::vector<Block>& evicted) {
    size_t count = 0;
    while (cached_bytes_ > bound) {
      cached_bytes_ -= free_[count].bytes;
      evicted.push_back(free_[count++]);
    }
    free_.erase(free_.begin(), free_.begin() + count);
  }

  static void unmap(const std::vector<Block>& blocks) {
    for (const Block& block : blocks) munmap(block.data, block.bytes);
  }

  std::mutex mutex_;
  std::vector<Block> free_;                 // in release order, oldest first
  std::unordered_map<void*, size_t> live_;  // buffers handed out, by address
  size_t cached_bytes_ = 0;
  size_t live_bytes_ = 0;
  size_t peak_live_bytes_ = 0;
  std::atomic<size_t> limit_bytes_{SIZE_MAX};  // read without the lock by enabled()
};

// Never destroyed: tensors released during interpreter shutdown still return their buffers.
OutputCache& cache() {
  static OutputCache* instance = [] {
    auto* created = new OutputCache();
    pthread_atfork([] { cache().lock_for_fork(); }, [] { cache().unlock_after_fork(); },
                   [] { cache().reset_in_child(); });
    return created;
  }();
  return *instance;
}

void OutputCache::release(void* data) { cache().give_back(data); }

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!cache().enabled()) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

int64_t cpu_cache_bytes() { return static_cast<int64_t>(cache().cached_bytes()); }

void empty_cpu_cache() { cache().clear(); }

int64_t set_cpu_cache_limit(int64_t bytes) {
  const size_t previous = cache().set_limit(bytes < 0 ? SIZE_MAX : static_cast<size_t>(bytes));
  return previous == SIZE_MAX ? -1 : static_cast<int64_t>(previous);
}

}  // namespace plif
