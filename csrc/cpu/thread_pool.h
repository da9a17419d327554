// The CPU kernels' worker pool: the calling thread never waits for a worker that has not started.
//
// Why not OpenMP: the end of a parallel region waits for every thread of the team. On a machine where other work
// runs, a worker is often descheduled, and each of a decode step's ~300 kernel calls then waited for the scheduler
// to run it again: plain 4-bit decoding on two busy cores fell from ~190 to ~40 tok/s with two threads, below one
// thread's ~115 (benchmarks/results/cpu_busy_machine_threads.md). Here a job is cut into chunks, and every
// thread, the caller first, claims chunks until none is left: the caller only waits for chunks a worker has
// claimed and not finished. A worker that wakes late finds no chunk and goes back to waiting. Beside one busy
// process on 2 cores a 4-bit step now costs what one thread's does, where OpenMP's cost 1.8x-9x that
// (benchmarks/results/cpu_pool_ab_busy1.md); on a quiet machine ~0-4% more than OpenMP's (cpu_pool_ab.md).
//
// Why not the pool this project had before (eaef976): it waited for every worker to acknowledge every job, so a
// worker kept off its core (there: by torch's spinning OpenMP threads) held up each call (1.6x on speculative steps).
//
// Claims are one 64-bit word, generation | next chunk | chunk count, changed only by compare-and-swap: a worker
// that read an old job's word fails its swap, so it can neither run a chunk of a finished job nor read the next
// job's description half written (the description changes only after every chunk of the job has finished).
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include <sched.h>
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

  // fn(u0, u1) over [0, units), on this thread and up to threads - 1 workers. Units are independent (callers'
  // contract): who runs a chunk never changes a result.
  template <class Fn>
  void run(int64_t units, int64_t threads, Fn& fn) {
    std::unique_lock<std::mutex> one_job(sync_->run_mu, std::try_to_lock);
    if (!one_job.owns_lock() || threads <= 1 || units <= 1) {  // another Python thread's job runs: use this one
      fn(int64_t(0), units);
      return;
    }
    ensure_workers(threads - 1);
    if (serial_left_ > 0) {  // the workers missed the last jobs: their cores are taken (see kAbsentJobs)
      --serial_left_;
      fn(int64_t(0), units);
      return;
    }
    const int64_t chunks = std::min<int64_t>({units, threads * kChunksPerThread, kMaxChunks});
    call_ = [](void* f, int64_t u0, int64_t u1) { (*static_cast<Fn*>(f))(u0, u1); };
    ctx_ = &fn;
    units_ = units;
    helpers_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = ((claim_.load(std::memory_order_relaxed) >> kGenShift) + 1) & 0xffffffffu;
    claim_.store((gen << kGenShift) | uint64_t(chunks), std::memory_order_seq_cst);  // publishes the fields above
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(sync_->mu);  // a worker between its check and its wait holds mu: no lost wakeup
      sync_->work_cv.notify_all();
    }
    const int64_t mine = claim_and_run(gen);
    wait_done(chunks);
    absent_ = mine == chunks ? absent_ + 1 : 0;
    if (absent_ >= kAbsentJobs) {
      absent_ = 0;
      serial_left_ = kSerialJobs;
    }
  }

  int64_t workers() const { return int64_t(workers_->size()); }

 private:
  // A chunk a thread: the caller takes over the whole share of a worker that has not started. More chunks take
  // over finer but cost in every call (plain 4-bit steps on a quiet 2-core VM, against OpenMP: 1 a thread ~2-3%
  // slower, 2 ~3-5%, 4 ~6%), and were no faster beside busy processes.
  static constexpr int64_t kChunksPerThread = 1;
  static constexpr int64_t kMaxChunks = 0xffff;
  // After kAbsentJobs jobs in a row whose every chunk the caller ran itself, the next kSerialJobs (about a decode
  // step's calls) run on the caller alone: on a machine whose other cores are busy, spinning workers only took
  // CPU time from the caller (two busy processes on 2 cores: 1.3x one thread's step time). Then it tries again.
  static constexpr int64_t kAbsentJobs = 4, kSerialJobs = 256;
  static constexpr int kNextShift = 16, kGenShift = 32;

  ThreadPool() { pthread_atfork(nullptr, nullptr, [] { instance().forget_workers(); }); }

  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  // Claims and runs chunks of job `gen` until none is left (or the job is no longer `gen`); how many it ran.
  int64_t claim_and_run(uint64_t gen) {
    uint64_t word = claim_.load(std::memory_order_acquire);
    for (int64_t ran = 0;; ++ran) {
      const uint64_t next = (word >> kNextShift) & 0xffff, chunks = word & 0xffff;
      if ((word >> kGenShift) != gen || next >= chunks) return ran;
      if (!claim_.compare_exchange_weak(word, word + (uint64_t(1) << kNextShift), std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        --ran;
        continue;  // `word` now holds the current value
      }
      const int64_t u0 = units_ * int64_t(next) / int64_t(chunks), u1 = units_ * int64_t(next + 1) / int64_t(chunks);
      if (u0 < u1) call_(ctx_, u0, u1);
      if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == int64_t(chunks) &&
          caller_asleep_.load(std::memory_order_seq_cst)) {
        std::lock_guard<std::mutex> lk(sync_->mu);
        sync_->done_cv.notify_one();
      }
      word = claim_.load(std::memory_order_acquire);
    }
  }

  // The chunks left are running on workers. Spin while they should finish within microseconds; sleep beyond that
  // (a worker descheduled mid-chunk then gets this core instead of waiting for its own).
  void wait_done(int64_t chunks) {
    const auto start = std::chrono::steady_clock::now();
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      pause();
      if (spins % 64 == 63 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(kCallerSpinUs)) {
        std::unique_lock<std::mutex> lk(sync_->mu);
        caller_asleep_.store(true, std::memory_order_seq_cst);
        sync_->done_cv.wait(lk, [&] { return done_.load(std::memory_order_seq_cst) >= chunks; });
        caller_asleep_.store(false, std::memory_order_relaxed);
      }
    }
  }

  // Worker `index` (0-based) of the pool: it helps with jobs that ask for more than index + 1 workers.
  void work(int64_t index, uint64_t seen) {
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      uint64_t gen;
      for (int spins = 0; (gen = claim_.load(std::memory_order_acquire) >> kGenShift) == seen; ++spins) {
        pause();
        if (spins % 64 != 63) continue;
        const auto waited = std::chrono::steady_clock::now() - start;
        if (waited > std::chrono::microseconds(kSpinUs)) {
          Sync* sync = sync_;
          std::unique_lock<std::mutex> lk(sync->mu);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          sync->work_cv.wait(lk, [&] { return (claim_.load(std::memory_order_seq_cst) >> kGenShift) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        } else if (waited > std::chrono::microseconds(kPoliteAfterUs)) {
          sched_yield();  // another thread on this core (torch's OpenMP workers) runs if it is ready
        }
      }
      seen = gen;
      if (index < helpers_.load(std::memory_order_relaxed)) claim_and_run(gen);
    }
  }

  void ensure_workers(int64_t count) {
    while (workers() < count) {
      const uint64_t seen = claim_.load(std::memory_order_relaxed) >> kGenShift;
      std::thread([this, index = workers(), seen] { work(index, seen); }).detach();
      workers_->push_back(1);
    }
  }

  // A forked child has none of the parent's threads: start afresh, with new mutexes and condition variables (the
  // old ones may list waiters that no longer exist, and a broadcast would wait for them forever). The old ones
  // leak, once a fork. (Not getpid() on each job: a system call, ~0.5 us in a VM, on every kernel call.)
  void forget_workers() {
    sync_ = new Sync();
    workers_->clear();
    absent_ = serial_left_ = 0;
    sleepers_.store(0);
    caller_asleep_.store(false);
  }

  // Workers spin for the next job for kSpinUs (a decode step's calls come within microseconds of each other, its
  // steps within ~100 us), yielding their core after kPoliteAfterUs (on a busy 2-core VM: ~130 tok/s against ~100
  // spinning without yielding), then sleep, so an idle engine costs no CPU.
  static constexpr int64_t kCallerSpinUs = 50, kPoliteAfterUs = 20, kSpinUs = 200;

  struct Sync {
    std::mutex run_mu, mu;
    std::condition_variable work_cv, done_cv;
  };
  Sync* sync_ = new Sync();
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0}, helpers_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_asleep_{false};
  void (*call_)(void*, int64_t, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t units_ = 0;
  int64_t absent_ = 0, serial_left_ = 0;  // the caller's (under run_mu)
  std::vector<char>* workers_ = new std::vector<char>();
};

}  // namespace amphista_cpu
