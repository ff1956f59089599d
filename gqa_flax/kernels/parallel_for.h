// Sharing a kernel's work out to XLA:CPU's intra-op threads.
#ifndef GQA_FLAX_KERNELS_PARALLEL_FOR_H_
#define GQA_FLAX_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

// Calls fn(i) once for every i in [0, n), on the calling thread and on up to
// pool.num_threads() - 1 tasks of XLA's pool, which claim indices in turn; returns when all
// calls have returned. The caller claims indices too, so this finishes even when XLA runs the
// tasks late or on the caller's thread (its FFI allows both): a task that starts after the
// last index was claimed returns at once, and owns (shared_ptr) the counters it reads.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, n, &fn] {
    for (int64_t i; (i = counters->next.fetch_add(1)) < n;) {
      fn(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, n); ++t) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

#endif  // GQA_FLAX_KERNELS_PARALLEL_FOR_H_
