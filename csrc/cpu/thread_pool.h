// A persistent worker pool for kernels too short to start a thread for (the 4-bit products: 10-100 us).
//
// Why not OpenMP: torch ships its own OpenMP runtime, and a second one in the process would bring a second set
// of spinning threads. Why not std::thread per call (parallel_rows): a start costs ~50-100 us on a small VM.
// Workers spin for a short while after each job (a decode step calls the next product within tens of
// microseconds), then sleep on a condition variable, so an idle engine costs no CPU.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace amphista_cpu {

class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool();  // never destroyed: workers may still be asleep at exit
    return *pool;
  }

  // fn(u0, u1) over [0, units) split in contiguous ranges over up to `threads` threads (the caller is one),
  // each with at least `min_units` units. Ranges never change a result: callers' units are independent.
  template <class Fn>
  void run(int64_t units, int64_t min_units, int64_t threads, Fn&& fn) {
    const int64_t n = std::min({threads, units / std::max<int64_t>(min_units, 1), kMaxThreads});
    if (n <= 1) {
      fn(int64_t(0), units);
      return;
    }
    std::lock_guard<std::mutex> one_job(run_mu_);  // Python threads may call concurrently (the GIL is released)
    ensure_workers(n - 1);
    const int64_t chunk = (units + n - 1) / n;
    job_ = [&](int64_t part) {
      const int64_t u0 = part * chunk, u1 = std::min(units, u0 + chunk);
      if (u0 < u1) fn(u0, u1);
    };
    participants_ = n;
    // Every worker acknowledges every job, participant or not: none can lag into the next job's setup.
    pending_.store(int(workers_->size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);  // a worker between its check and its wait holds mu_: no lost wakeup
      cv_.notify_all();
    }
    job_(0);
    while (pending_.load(std::memory_order_acquire) > 0) pause();
  }

 private:
  static constexpr int64_t kMaxThreads = 256;

  ThreadPool() {
    const char* env = std::getenv("AMPHISTA_CPU_SPIN_US");
    spin_us_ = env != nullptr ? std::max(0L, std::atol(env)) : 200;
  }

  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  void ensure_workers(int64_t count) {
    if (pid_ != getpid()) {  // a forked child has none of the parent's threads: start afresh (leak the handles)
      workers_.release();
      workers_.reset(new std::vector<std::thread*>());
      pid_ = getpid();
    }
    while (int64_t(workers_->size()) < count) {
      const int64_t index = int64_t(workers_->size()) + 1;
      workers_->push_back(new std::thread([this, index, gen = generation_.load()] { work(index, gen); }));
    }
  }

  void work(int64_t index, uint64_t seen) {
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        pause();
        if (++spins % 64 == 0 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < participants_) job_(index);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0}, sleepers_{0};
  std::function<void(int64_t)> job_;
  int64_t participants_ = 0;
  int64_t spin_us_;
  pid_t pid_ = getpid();
  std::unique_ptr<std::vector<std::thread*>> workers_{new std::vector<std::thread*>()};
};

}  // namespace amphista_cpu
