// CPU expert worker: a native thread that computes the decode step's CPU-side experts from a mailbox in
// (pinned) host memory, so the GPU side never waits for the host between layers and the whole decode step
// can be one CUDA graph (kernels/handoff.py posts a layer's misses and waits for its result on the device).
//
// Mailbox: contiguous CPU tensors, one row per MoE layer r (Lm rows; TM = tokens a row holds, the most a step
// has: 1 for a decode step, up to MAX_STEP_TOKENS for a verify step; K = top-k, D = hidden size):
//   seq    [Lm]        int64    the layer's post counter, written by the poster AFTER the rest of its row
//   done   [Lm]        int64    written here: the seq value whose result `out` holds (release store)
//   ntok   [Lm]        int64    tokens n (1 <= n <= TM) in the row's current post; cells t >= n are stale
//   miss   [Lm, TM, K] int64    expert ids to compute here; -1 = skip (a GPU hit, or a missing cell)
//   w      [Lm, TM, K] float32  router weights of those ids
//   x      [Lm, TM, D] fp32 / bf16 / fp16   the layer's expert input, one row per token
//   out    [Lm, TM, D] float32  per token t < n: sum_k w * expert(x) over its miss ids (zeros when none)
//   cpu_ns [Lm]        int64    accumulated compute time per layer (statistics)
//   err    [1]         int64    0 = fine; 1 = a kernel error here (message: take_error()); the poster may set
//                               others
// The n tokens of a row are one fused kernel call (forward_checked over [n, D]: each missed expert's weights
// are read once for all the tokens routed to it).
// Protocol: the thread scans the rows for seq != done, reads the row (acquire load of seq first), computes,
// writes out, then release-stores done = seq. Rows are independent: no step number, no layer order. If seq
// moved on while a row was read (a newer post overwrote it), done still gets the old value, so the row is
// found pending again and recomputed from the complete newer post before its done is published.
// The thread spins while work comes in, and naps (sleep_us) after idle_ms without any.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

#include "cpu_moe.h"

namespace {

using Clock = std::chrono::steady_clock;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

int64_t load_acquire(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void store_release(int64_t* p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

struct LayerWeights {
  int64_t f13, f2;
  at::Tensor q13, q2;
  c10::optional<at::Tensor> s13, z13, s2, z2;
  ExpertAct act;
};

class CpuWorker {
 public:
  CpuWorker(at::Tensor seq, at::Tensor done, at::Tensor ntok, at::Tensor miss, at::Tensor w, at::Tensor x,
            at::Tensor out, at::Tensor cpu_ns, at::Tensor err, std::vector<int64_t> f13, std::vector<at::Tensor> q13,
            std::vector<c10::optional<at::Tensor>> s13, std::vector<c10::optional<at::Tensor>> z13,
            std::vector<int64_t> f2, std::vector<at::Tensor> q2, std::vector<c10::optional<at::Tensor>> s2,
            std::vector<c10::optional<at::Tensor>> z2, std::vector<int64_t> act, std::vector<double> alpha,
            std::vector<double> limit, std::vector<c10::optional<at::Tensor>> b13, int64_t nthreads, bool act_quant,
            int64_t prefetch_rows, double idle_ms, double sleep_us)
      : seq_(seq), done_(done), ntok_(ntok), miss_(miss), w_(w), x_(x), out_(out), cpu_ns_(cpu_ns), err_(err),
        nthreads_(nthreads), act_quant_(act_quant), prefetch_(prefetch_rows),
        idle_ns_(int64_t(idle_ms * 1e6)), sleep_us_(int64_t(sleep_us)) {
    const int64_t Lm = seq.size(0);
    for (const auto* t : {&seq, &done, &ntok, &miss, &w, &x, &out, &cpu_ns, &err}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "cpu worker: mailbox tensors must be contiguous CPU");
    }
    TORCH_CHECK(seq.scalar_type() == at::kLong && done.scalar_type() == at::kLong && ntok.scalar_type() == at::kLong
                    && miss.scalar_type() == at::kLong && cpu_ns.scalar_type() == at::kLong
                    && err.scalar_type() == at::kLong,
                "cpu worker: seq, done, ntok, miss, cpu_ns, err must be int64");
    TORCH_CHECK(miss.dim() == 3 && w.dim() == 3 && x.dim() == 3 && out.dim() == 3,
                "cpu worker: miss, w, x, out must be [rows, tokens, K or D]");
    TORCH_CHECK(w.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "cpu worker: w, out must be float32");
    TORCH_CHECK(done.size(0) == Lm && ntok.size(0) == Lm && miss.size(0) == Lm && w.size(0) == Lm
                    && x.size(0) == Lm && out.size(0) == Lm && cpu_ns.size(0) == Lm && int64_t(q13.size()) == Lm
                    && int64_t(q2.size()) == Lm
                    && int64_t(act.size()) == Lm && int64_t(alpha.size()) == Lm && int64_t(limit.size()) == Lm
                    && int64_t(b13.size()) == Lm,
                "cpu worker: every mailbox tensor and weight list needs one row per MoE layer");
    TM_ = miss.size(1);
    K_ = miss.size(2);
    D_ = x.size(2);
    TORCH_CHECK(w.size(1) == TM_ && x.size(1) == TM_ && out.size(1) == TM_ && w.size(2) == K_ && out.size(2) == D_,
                "cpu worker: miss, w, x, out must hold the same tokens per row (and K, D)");
    ids_.resize(TM_ * K_);
    w_copy_.resize(TM_ * K_);
    x_copy_.resize(size_t(TM_ * D_) * x.element_size());
    for (int64_t r = 0; r < Lm; r++)
      layers_.push_back({f13[r], f2[r], q13[r], q2[r], s13[r], z13[r], s2[r], z2[r],
                         ExpertAct{act[r], alpha[r], limit[r], b13[r]}});
    thread_ = std::thread([this] { run(); });
  }

  ~CpuWorker() { close(); }

  void close() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }

  // Spin (GIL released) until done[r] >= value; false on timeout. The CPU stand-in for the GPU's wait.
  bool wait(int64_t r, int64_t value, double timeout_s) {
    const int64_t* done = done_.data_ptr<int64_t>() + r;
    const int64_t limit = now_ns() + int64_t(timeout_s * 1e9);
    for (int64_t i = 0; load_acquire(done) < value; i++) {
      if ((i & 1023) == 1023) {
        if (now_ns() > limit) return false;
        std::this_thread::yield();
      }
      cpu_relax();
    }
    return true;
  }

  // The host's acknowledgement of err == code: clears err only if it still holds `code` (compare-and-swap,
  // so a failure reported meanwhile is not lost) and hands over the worker's message, if any, forgetting it
  // (also when the device's timeout code overwrote the worker's 1), so the next failure reports its own.
  // Under the lock fail() holds while it reports.
  std::string take_error(int64_t code) {
    std::lock_guard<std::mutex> g(mu_);
    int64_t expect = code;
    __atomic_compare_exchange_n(err_.data_ptr<int64_t>(), &expect, int64_t(0), false, __ATOMIC_ACQ_REL,
                                __ATOMIC_ACQUIRE);
    std::string msg;
    msg.swap(error_);
    return msg;
  }

  int64_t processed() const { return processed_.load(); }

 private:
  void run() {
    const int64_t Lm = seq_.size(0);
    int64_t* seq = seq_.data_ptr<int64_t>();
    int64_t* done = done_.data_ptr<int64_t>();
    int64_t next = 0, last_work = now_ns();
    while (!stop_.load(std::memory_order_relaxed)) {
      int64_t found = -1;
      for (int64_t i = 0; i < Lm; i++) {
        const int64_t r = (next + i) % Lm;
        if (load_acquire(seq + r) != load_acquire(done + r)) { found = r; break; }
      }
      if (found >= 0) {
        const int64_t s = load_acquire(seq + found);
        process(found);
        store_release(done + found, s);
        processed_.fetch_add(1);
        next = (found + 1) % Lm;
        last_work = now_ns();
        continue;
      }
      if (now_ns() - last_work > idle_ns_) std::this_thread::sleep_for(std::chrono::microseconds(sleep_us_));
      else cpu_relax();
    }
  }

  // Computes from a private copy of the row: if the poster rewrites the row meanwhile (it does not wait for a
  // row without CPU misses, so a lagging worker can meet the next post), the copy may be torn but every read
  // stays in bounds; such a result is never used, since the newer post's done comes from a recompute.
  void process(int64_t r) {
    float* out = out_.data_ptr<float>() + r * TM_ * D_;
    const int64_t n = __atomic_load_n(ntok_.data_ptr<int64_t>() + r, __ATOMIC_RELAXED);
    if (n < 1 || n > TM_) {                           // a torn row: bounded, reported
      fail(r, "token count " + std::to_string(n) + " out of range [1, " + std::to_string(TM_) + "]", out, TM_);
      return;
    }
    const int64_t* live = miss_.data_ptr<int64_t>() + r * TM_ * K_;
    std::copy(live, live + n * K_, ids_.begin());
    const float* wl = w_.data_ptr<float>() + r * TM_ * K_;
    std::copy(wl, wl + n * K_, w_copy_.begin());
    const size_t xbytes = size_t(D_) * x_.element_size();
    std::memcpy(x_copy_.data(), static_cast<char*>(x_.data_ptr()) + r * TM_ * xbytes, n * xbytes);
    const auto& L = layers_[r];
    const int64_t E = L.q13.size(0);
    bool any = false;
    for (int64_t k = 0; k < n * K_; k++) {
      if (ids_[k] < -1 || ids_[k] >= E) {             // checked here: a throw inside the kernel is fatal
        fail(r, "expert id " + std::to_string(ids_[k]) + " out of range [-1, " + std::to_string(E) + ")", out, n);
        return;
      }
      any = any || ids_[k] >= 0;
    }
    if (!any) return;                                 // nothing here: the poster does not read `out`
    const int64_t t0 = now_ns();
    at::Tensor x = at::from_blob(x_copy_.data(), {n, D_}, x_.options());
    at::Tensor id = at::from_blob(ids_.data(), {n, K_}, miss_.options());
    at::Tensor wt = at::from_blob(w_copy_.data(), {n, K_}, w_.options());
    at::Tensor o = at::from_blob(out, {n, D_}, out_.options());
    std::string msg = forward_checked(x, id, wt, L.f13, L.q13, L.s13, L.z13, L.f2, L.q2, L.s2, L.z2, o,
                                      nthreads_, act_quant_, prefetch_, L.act);
    if (!msg.empty()) fail(r, msg, out, n);
    cpu_ns_.data_ptr<int64_t>()[r] += now_ns() - t0;
  }

  void fail(int64_t r, const std::string& msg, float* out, int64_t n) {
    std::fill(out, out + n * D_, 0.f);
    std::lock_guard<std::mutex> g(mu_);
    if (error_.empty()) error_ = "MoE layer row " + std::to_string(r) + ": " + msg;
    __atomic_store_n(err_.data_ptr<int64_t>(), int64_t(1), __ATOMIC_RELEASE);
  }

  at::Tensor seq_, done_, ntok_, miss_, w_, x_, out_, cpu_ns_, err_;
  std::vector<LayerWeights> layers_;
  std::vector<int64_t> ids_;                          // the row being computed, copied (see process)
  std::vector<float> w_copy_;
  std::vector<char> x_copy_;
  int64_t TM_ = 1, K_ = 0, D_ = 0, nthreads_;
  bool act_quant_;
  int64_t prefetch_, idle_ns_, sleep_us_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> processed_{0};
  std::mutex mu_;
  std::string error_;
  std::thread thread_;
};

}  // namespace

void register_worker(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<CpuWorker>(m, "CpuWorker")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor, std::vector<int64_t>, std::vector<at::Tensor>, std::vector<c10::optional<at::Tensor>>,
                    std::vector<c10::optional<at::Tensor>>, std::vector<int64_t>, std::vector<at::Tensor>,
                    std::vector<c10::optional<at::Tensor>>, std::vector<c10::optional<at::Tensor>>,
                    std::vector<int64_t>, std::vector<double>, std::vector<double>,
                    std::vector<c10::optional<at::Tensor>>, int64_t, bool, int64_t, double, double>())
      .def("wait", &CpuWorker::wait, py::call_guard<py::gil_scoped_release>(),
           "wait(row, value, timeout_s) -> bool: spin until done[row] >= value")
      .def("close", &CpuWorker::close, py::call_guard<py::gil_scoped_release>())
      .def("take_error", &CpuWorker::take_error)
      .def("processed", &CpuWorker::processed);
}
