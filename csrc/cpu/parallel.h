// Work splitting for pyshrink's CPU kernels. Where it runs depends on how the thread count was chosen:
//
// * Following torch's count (the default): on torch's own intra-op threads (at::parallel_for). In a model
//   run at torch's thread count, torch's operators around the kernels (norms, activations, attention) start
//   OpenMP regions whenever they are large enough (a prompt's, or a batch's), and OpenMP's workers spin for a
//   while after each region; a second set of workers (the pool below) then had to share the cores with those
//   spinners. bench/kernel_threads.py (SmolLM2-135M q4-g64, 2 threads, eager transformers, in one process):
//   a 64-token prompt took 279-309 ms on the pool beside torch's workers against 130-191 ms on torch's threads,
//   a 64 x 576 -> 1536 GEMM right after a torch add 1284-1341 against 862-993 us; one-token steps moved both
//   ways within noise.
// * Set apart from torch's (set_num_threads, kernel_threads; TorchDecoder runs its prompt and its steps with
//   torch on one thread and the kernels on several): on the pool below, since torch's pool then has fewer
//   threads.
//
// The pool: its caller never waits for a worker that has not started. With torch's OpenMP backend every
// region ends in a barrier that all threads must reach, so when the machine is busy and one worker is
// descheduled the whole op waits a scheduler timeslice. On a shared 2-core machine (load average ~10) a
// 4096x4096 GEMV measured 63 ms that way against 1.3 ms for ONNX Runtime, whose pool lets the caller take back
// work that no worker has claimed. This pool does the same: chunks are claimed from an atomic counter by the
// caller and by whichever workers wake up in time; the caller only waits for chunks already claimed. A nested
// or concurrent call to the pool runs serially on its own thread (on torch's threads, concurrent callers each
// get an OpenMP team, as torch's own operators do).
//
// Between calls a worker first spins for a short while (PYSHRINK_SPIN_US, default 200 us; 0 = never), then
// sleeps on a condition variable. Decoding calls the op ~120 times per token with ~30 us of other work in
// between, and a sleeping worker takes a futex wake-up and a reschedule (tens of microseconds on a VM) to
// join, which on a 0.3-1 MB weight is longer than the op itself (development measurements: with a sleeping
// worker, two threads were no faster than one there; bench/RESULTS.md, Decode speed, has the committed effect
// on whole decode steps). The spin loop yields the core (sched_yield) between checks, so on a busy machine
// a spinning worker gives way to any thread that has work, as ONNX Runtime's and llama.cpp's spinning pools do;
// a caller only pays a wake-up syscall when a worker is really asleep.
#pragma once

#include <ATen/Parallel.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pyshrink {
namespace cpu {

class Pool {
 public:
  static Pool& instance() {
    static std::mutex m;
    static Pool* pool = nullptr;  // leaked on purpose: no worker joins at interpreter exit
    std::lock_guard<std::mutex> g(m);
    if (pool == nullptr || pool->pid_ != ::getpid()) pool = new Pool();  // after fork() the workers are gone
    return *pool;
  }

  // Runs fn(c) for every c in [0, n) on the calling thread and up to nthreads - 1 workers.
  void run(int64_t n, int nthreads, const std::function<void(int64_t)>& fn) {
    bool idle = false;
    if (nthreads <= 1 || n <= 1 || !busy_.compare_exchange_strong(idle, true)) {
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    ensure_workers(nthreads - 1);
    auto job = std::make_shared<Job>(fn, n);
    bool wake;
    {
      std::lock_guard<std::mutex> g(mu_);
      job_ = job;
      wanted_ = static_cast<size_t>(nthreads - 1);
      epoch_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    work(*job);
    // every chunk is claimed; wait only for the ones workers are still running
    while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
    {
      std::lock_guard<std::mutex> g(mu_);
      job_.reset();
    }
    busy_.store(false, std::memory_order_release);
  }

 private:
  struct Job {
    Job(std::function<void(int64_t)> f, int64_t t) : fn(std::move(f)), total(t) {}
    std::function<void(int64_t)> fn;
    const int64_t total;
    std::atomic<int64_t> next{0}, done{0};
  };

  static void work(Job& j) {
    for (int64_t c; (c = j.next.fetch_add(1, std::memory_order_relaxed)) < j.total;) {
      j.fn(c);
      j.done.fetch_add(1, std::memory_order_release);
    }
  }

  void ensure_workers(int n) {
    std::lock_guard<std::mutex> g(mu_);
    while (static_cast<int>(workers_.size()) < n) {
      const size_t idx = workers_.size();
      workers_.emplace_back([this, idx] { loop(idx); });
      workers_.back().detach();
    }
  }

  // Spins (yielding) until the epoch moves past `seen` or spin_ns_ has passed; loop() then looks under the lock.
  void spin(uint64_t seen) const {
    if (spin_ns_ <= 0) return;
    const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin_ns_);
    for (int i = 0; epoch_.load(std::memory_order_acquire) == seen; ++i) {
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) return;
      sched_yield();
    }
  }

  void loop(size_t idx) {
    uint64_t seen = 0;
    for (;;) {
      spin(seen);
      std::shared_ptr<Job> job;  // keeps the job alive even if the caller has returned
      {
        std::unique_lock<std::mutex> lk(mu_);
        if (epoch_.load(std::memory_order_relaxed) == seen) {
          ++sleepers_;
          cv_.wait(lk, [&] { return epoch_.load(std::memory_order_relaxed) != seen; });
          --sleepers_;
        }
        seen = epoch_.load(std::memory_order_relaxed);
        if (idx >= wanted_) continue;
        job = job_;
      }
      if (job) work(*job);
    }
  }

  static int64_t spin_ns_from_env() {
    const char* env = std::getenv("PYSHRINK_SPIN_US");
    return env && *env ? std::max<int64_t>(0, std::atoll(env)) * 1000 : 200 * 1000;
  }

  const pid_t pid_ = ::getpid();
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> epoch_{0};
  size_t wanted_ = 0;
  int sleepers_ = 0;  // workers waiting on cv_ (guarded by mu_)
  const int64_t spin_ns_ = spin_ns_from_env();
  std::vector<std::thread> workers_;
  std::atomic<bool> busy_{false};
};

// Threads for pyshrink's kernels: 0 (the default) follows torch.get_num_threads(). Set apart from torch's
// by pyshrink.ops.set_num_threads; TorchDecoder runs its prompt and its one-token steps with torch on one thread
// and the kernels on the requested count (pyshrink/runtime/torch_decoder.py says why).
inline std::atomic<int>& kernel_threads_setting() {
  static std::atomic<int> n{0};
  return n;
}

inline int num_threads() {
  const int n = kernel_threads_setting().load(std::memory_order_relaxed);
  return n > 0 ? n : std::max(1, at::get_num_threads());
}

// fn(c) for c in [0, chunks), spread over num_threads() threads: torch's own when the kernels follow torch's
// count, else the pool (see the top of this file). Either way the chunks are claimed from a counter, so a
// thread that starts late takes fewer.
inline void parallel_chunks(int64_t chunks, const std::function<void(int64_t)>& fn) {
  if (chunks <= 0) return;
  const bool nested = at::in_parallel_region();
  if (!nested && chunks > 1 && kernel_threads_setting().load(std::memory_order_relaxed) == 0 &&
      at::get_num_threads() > 1) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) fn(c);
    });
    return;
  }
  Pool::instance().run(chunks, nested ? 1 : num_threads(), fn);
}

// f(begin, end) over [0, n) in chunks of at least `grain` (about 8 chunks per thread, for balance).
template <typename F>
void parallel_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t nt = num_threads();
  grain = std::max<int64_t>(1, grain);
  if (nt == 1 || n <= grain) return f(0, n);
  const int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, nt * 8);
  const int64_t size = (n + chunks - 1) / chunks;
  parallel_chunks((n + size - 1) / size, [&](int64_t c) { f(c * size, std::min(n, (c + 1) * size)); });
}

}  // namespace cpu
}  // namespace pyshrink
