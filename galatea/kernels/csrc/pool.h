// A small thread pool for the kernels, made to behave on a shared machine.
//
// Work is a list of items claimed one at a time from an atomic counter, the calling thread
// included. A worker that the OS has not scheduled (a browser or another process on the other
// core) therefore costs nothing: the others take its items, and the call waits only for items
// already begun. With a static split (OpenMP's default schedule, libgomp spinning) a 2-thread
// region cost 20 ms instead of 0.1 ms on a busy machine.
//
// Idle workers spin for `spin_us` (50 µs; the gap between two mat-muls of one decoding step is a few
// microseconds of small ops), then sleep on a condition variable until the next call.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace gx {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t item);

  ~Pool() { resize(1); }

  int threads() const { return static_cast<int>(workers_.size()) + 1; }
  void set_spin_us(int us) { spin_us_.store(us); }

  // Total threads, the caller included. Only call between runs.
  void resize(int n) {
    if (n < 1) n = 1;
    if (n == threads()) return;
    stop_.store(true);
    {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_.store(false);
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { work(); });
  }

  // fn(ctx, i) for every i in [0, n), on all threads; returns when all are done.
  void run(int64_t n, Fn fn, void* ctx) {
    if (workers_.empty() || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(ctx, i);
      return;
    }
    // Jobs alternate between two slots: a worker still reading the previous job's slot reads a
    // stale copy, and its claim then fails because the epoch moved on.
    const uint32_t epoch = ++epoch_;
    Job& job = jobs_[epoch & 1];
    job.n.store(n, std::memory_order_relaxed);
    job.fn.store(fn, std::memory_order_relaxed);
    job.ctx.store(ctx, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    state_.store(static_cast<uint64_t>(epoch) << 32);  // publishes the job
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    drain(epoch, n, fn, ctx);
    while (done_.load(std::memory_order_acquire) < n) cpu_relax();
  }

 private:
  struct Job {
    std::atomic<int64_t> n{0};
    std::atomic<Fn> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
  };

  // Claim and run items of `epoch` until none are left.
  void drain(uint32_t epoch, int64_t n, Fn fn, void* ctx) {
    uint64_t s = state_.load();
    for (;;) {
      if (static_cast<uint32_t>(s >> 32) != epoch) return;
      const int64_t item = static_cast<int64_t>(s & 0xFFFFFFFFu);
      if (item >= n) return;
      if (!state_.compare_exchange_weak(s, s + 1)) continue;
      fn(ctx, item);
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load();
    }
  }

  uint32_t wait_for_job(uint32_t seen) {
    const auto start = std::chrono::steady_clock::now();
    const auto spin = std::chrono::microseconds(spin_us_.load());
    for (uint32_t i = 1;; ++i) {
      const uint32_t e = static_cast<uint32_t>(state_.load() >> 32);
      if (e != seen || stop_.load()) return e;
      cpu_relax();
      if ((i & 127) == 0 && std::chrono::steady_clock::now() - start > spin) break;
    }
    std::unique_lock<std::mutex> lock(mu_);
    sleepers_.fetch_add(1);
    while (static_cast<uint32_t>(state_.load() >> 32) == seen && !stop_.load()) cv_.wait(lock);
    sleepers_.fetch_sub(1);
    return static_cast<uint32_t>(state_.load() >> 32);
  }

  void work() {
    uint32_t seen = static_cast<uint32_t>(state_.load() >> 32);
    for (;;) {
      const uint32_t epoch = wait_for_job(seen);
      if (stop_.load()) return;
      seen = epoch;
      const Job& job = jobs_[epoch & 1];
      drain(epoch, job.n.load(std::memory_order_relaxed), job.fn.load(std::memory_order_relaxed),
            job.ctx.load(std::memory_order_relaxed));
    }
  }

  Job jobs_[2];
  std::atomic<uint64_t> state_{0};  // epoch << 32 | next item
  std::atomic<int64_t> done_{0};
  uint32_t epoch_ = 0;
  std::vector<std::thread> workers_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> spin_us_{50};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace gx
