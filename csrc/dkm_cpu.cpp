// Backend `cpu`: the DKM forward and backward passes of DESIGN §3 as fused CPU kernels.
//
// The driver here owns everything that touches ATen: validation, dtypes, threads and the
// reductions. A pass splits every group's rows into a fixed number of chunks (a function of the
// shapes only, never of the thread count); the threads of at::parallel_for take (group, chunk)
// items from a shared counter; each item accumulates into its own k x d partial sum, and the
// partials are added in chunk order.
// Results are therefore bit-identical run to run and for any number of threads. The row work
// itself is in kernel_impl.h, compiled per instruction set and chosen at run time.
//
// Memory: nothing of size M x k exists. Per pass the workspace is the partial sums (at most
// kPartialBudget bytes, independent of M) plus a few rows of kp values per thread.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace dkm {
namespace {

using at::Tensor;

constexpr int64_t kMinRowsPerChunk = 64;   // fewer rows and a chunk's k x d reduction dominates
constexpr int64_t kMaxChunks = 256;        // enough items to balance many threads
constexpr int64_t kPartialBudget = 64 << 20;  // bytes of per-chunk partial sums, all groups
constexpr int64_t kBlockRows = 64;         // rows converted to the compute type at a time

// ---------------------------------------------------------------- instruction set selection --

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// Compiled in and supported by this CPU, best first.
const std::vector<const KernelSet*>& available_sets() {
  static const std::vector<const KernelSet*> sets = [] {
    std::vector<const KernelSet*> found;
    if (kernels_avx512() && cpu_has_avx512()) found.push_back(kernels_avx512());
    if (kernels_avx2() && cpu_has_avx2()) found.push_back(kernels_avx2());
    found.push_back(kernels_generic());
    return found;
  }();
  return sets;
}

// The best available set, or the one named by DKM_KERNELS_ISA (read on every call, so that tests
// can compare instruction sets in one process).
const KernelSet& kernel_set() {
  const auto& sets = available_sets();
  const char* wanted = std::getenv("DKM_KERNELS_ISA");
  if (wanted == nullptr || *wanted == '\0') return *sets.front();
  std::string names;
  for (const KernelSet* set : sets) {
    if (std::strcmp(set->name, wanted) == 0) return *set;
    names += names.empty() ? set->name : std::string(", ") + set->name;
  }
  TORCH_CHECK_VALUE(false, "DKM_KERNELS_ISA=", wanted, " is not available on this CPU; available: ",
                    names, " (unset it to pick the best one)");
}

template <typename T>
const Kernels<T>& kernels();
template <>
const Kernels<float>& kernels<float>() { return kernel_set().f32; }
template <>
const Kernels<double>& kernels<double>() { return kernel_set().f64; }

// ------------------------------------------------------------------------------ helpers --

// How a group's rows are split into chunks: a function of the shapes only.
struct Plan {
  int64_t groups, m, d, k, kp, chunks, rows;
  int64_t slot() const { return (d + 1) * kp; }  // one chunk's partial: k x d sums and k masses
};

template <typename T>
Plan make_plan(int64_t groups, int64_t m, int64_t d, int64_t k) {
  Plan p{groups, m, d, k, (k + 15) / 16 * 16, 1, 1};
  const int64_t per_chunk = p.slot() * static_cast<int64_t>(sizeof(T));
  const int64_t max_chunks =
      std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, kPartialBudget / std::max<int64_t>(1, groups * per_chunk)));
  const int64_t wanted = std::max<int64_t>(1, (m + kMinRowsPerChunk - 1) / kMinRowsPerChunk);
  p.chunks = std::min(wanted, max_chunks);
  p.rows = std::max<int64_t>(1, (m + p.chunks - 1) / p.chunks);
  p.chunks = std::max<int64_t>(1, (m + p.rows - 1) / p.rows);
  return p;
}

// Centroids (k, d) row-major -> (d, kp), padding columns set to `fill`.
template <typename T>
void transpose_pad(const T* c, const Plan& p, T* out, T fill = T(0)) {
  std::fill(out, out + p.d * p.kp, fill);
  for (int64_t j = 0; j < p.k; ++j)
    for (int64_t l = 0; l < p.d; ++l) out[l * p.kp + j] = c[j * p.d + l];
}

// Rows in the compute type: the input itself when the types agree, else a converted copy in buf.
template <typename S, typename T>
const T* rows_as(const S* src, int64_t n, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(src[i]);
    return buf;
  }
}

template <typename T>
bool all_finite(const T* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(x[i]);
  return ok;
}

template <typename T>
Pass<T> base_pass(const Plan& plan, double tau) {
  Pass<T> p;
  p.k = plan.k;
  p.kp = plan.kp;
  p.d = plan.d;
  p.exp2_scale = static_cast<T>(1.4426950408889634 / tau);
  p.two_over_tau = static_cast<T>(2.0 / tau);
  return p;
}

template <typename T>
void attention_centroids(const T* c, const Plan& plan, T* out) {
  transpose_pad(c, plan, out, FarAway<T>::value);
}

int64_t scratch_size(const Plan& plan) { return kScratchRows * (plan.kp + plan.d); }

// Sum of one group's chunk partials, in chunk order.
template <typename T>
void reduce_chunks(const Plan& plan, const T* partial, int64_t group, T* sum) {
  const int64_t n = plan.slot();
  const T* first = partial + group * plan.chunks * n;
  std::copy(first, first + n, sum);
  for (int64_t c = 1; c < plan.chunks; ++c) {
    const T* part = first + c * n;
    for (int64_t i = 0; i < n; ++i) sum[i] += part[i];
  }
}

// Chunks per thread so that each thread gets a fraction of a millisecond of work at least: waking
// threads for less costs more than it saves. Only the scheduling depends on it, never the arithmetic.
int64_t grain(int64_t work_per_item) {
  constexpr int64_t kMinWork = 1 << 21;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_item));
}

// Runs body(group, first_row, end_row, partial) for every chunk of every listed group, in
// parallel; `partial` is the chunk's own zeroed slot. Threads take chunks from a shared counter
// rather than fixed ranges, so a thread the OS descheduled (a busy machine) does not hold the
// pass up; which thread computes a chunk never changes what it computes.
template <typename T, typename Body>
void for_each_chunk(const Plan& plan, const std::vector<int64_t>& groups, T* partial, const Body& body) {
  const int64_t items = static_cast<int64_t>(groups.size()) * plan.chunks;
  const int64_t per_worker = grain(plan.rows * plan.kp * (plan.d + 4));
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (items + per_worker - 1) / per_worker);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t q = next.fetch_add(1); q < items; q = next.fetch_add(1)) {
        const int64_t g = groups[q / plan.chunks], c = q % plan.chunks;
        T* slot = partial ? partial + (g * plan.chunks + c) * plan.slot() : nullptr;
        if (slot) std::fill(slot, slot + plan.slot(), T(0));
        body(g, c * plan.rows, std::min(plan.m, (c + 1) * plan.rows), slot);
      }
    }
  });
}

std::vector<int64_t> all_groups(int64_t groups) {
  std::vector<int64_t> list(groups);
  for (int64_t g = 0; g < groups; ++g) list[g] = g;
  return list;
}

// ------------------------------------------------------------------------------ forward --

template <typename S, typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_typed(const Tensor& weights, const Tensor& centroids,
                                                         double tau, int64_t max_iter, double epsilon) {
  const Kernels<T>& K = kernels<T>();
  const int64_t G = weights.size(0), M = weights.size(1), d = weights.size(2), k = centroids.size(1);
  const auto copt = weights.options().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor history = at::empty({max_iter + 1, G, k, d}, copt);
  Tensor masses = at::zeros({max_iter, G, k}, copt);
  Tensor iterations = at::full({G}, max_iter, weights.options().dtype(at::kLong));
  Tensor out = at::empty({G, M, d}, weights.options());
  history[0].copy_(centroids);

  const Plan plan = make_plan<T>(G, M, d, k);
  T* hist = history.data_ptr<T>();
  T* mass_out = masses.data_ptr<T>();
  int64_t* iters = iterations.data_ptr<int64_t>();
  const S* w = weights.data_ptr<S>();
  S* o = out.data_ptr<S>();
  auto cent = [&](int64_t t, int64_t g) { return hist + (t * G + g) * k * d; };

  std::vector<T> cT(G * d * plan.kp), cLT(G * d * plan.kp), partial(G * plan.chunks * plan.slot());
  std::vector<Pass<T>> passes(G, base_pass<T>(plan, tau));
  for (int64_t g = 0; g < G; ++g) {
    passes[g].cT = cT.data() + g * d * plan.kp;
    passes[g].cLT = cLT.data() + g * d * plan.kp;
  }
  std::vector<char> finite(G * plan.chunks, 1);

  std::vector<int64_t> active = all_groups(G);
  for (int64_t t = 0; t < max_iter && !active.empty(); ++t) {
    for (int64_t g : active) attention_centroids(cent(t, g), plan, cT.data() + g * d * plan.kp);
    for_each_chunk(plan, active, partial.data(), [&](int64_t g, int64_t r0, int64_t r1, T* slot) {
      std::vector<T> scratch(scratch_size(plan)), wbuf(kBlockRows * d);
      bool ok = true;
      for (int64_t b = r0; b < r1; b += kBlockRows) {
        const int64_t n = std::min(kBlockRows, r1 - b);
        const T* wb = rows_as(w + (g * M + b) * d, n * d, wbuf.data());
        if (t == 0) ok &= all_finite(wb, n * d);  // the first pass reads every weight anyway
        K.accumulate(passes[g], wb, wb, n, slot, slot + d * plan.kp, scratch.data());
      }
      if (!ok) finite[g * plan.chunks + r0 / plan.rows] = 0;
    });
    if (t == 0)
      TORCH_CHECK_VALUE(std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; }),
                        "weights contain NaN or Inf; DKM needs finite weights (check the layer's values "
                        "or the training step that produced them)");

    std::vector<char> done(G, 0);
    at::parallel_for(0, static_cast<int64_t>(active.size()), grain(plan.chunks * plan.slot()),
                     [&](int64_t begin, int64_t end) {
      std::vector<T> sum(plan.slot());
      for (int64_t a = begin; a < end; ++a) {
        const int64_t g = active[a];
        reduce_chunks(plan, partial.data(), g, sum.data());
        const T* c = cent(t, g);
        T* next = cent(t + 1, g);
        T* mass = mass_out + (t * G + g) * k;
        T delta = 0;
        for (int64_t j = 0; j < k; ++j) {
          const T s = sum[d * plan.kp + j];
          mass[j] = s;
          for (int64_t l = 0; l < d; ++l) {
            // A centroid nobody attends to keeps its position.
            const T moved = s > 0 ? sum[l * plan.kp + j] / s : c[j * d + l];
            next[j * d + l] = moved;
            delta = std::max(delta, std::abs(moved - c[j * d + l]));
          }
        }
        if (static_cast<double>(delta) <= epsilon) {
          iters[g] = t + 1;
          done[g] = 1;
        }
      }
    });
    std::vector<int64_t> still;
    for (int64_t g : active)
      if (!done[g]) still.push_back(g);
    active.swap(still);
  }

  // A group that stopped at L repeats C_L in the rest of the history.
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = iters[g] + 1; t <= max_iter; ++t) std::copy(cent(iters[g], g), cent(iters[g], g) + k * d, cent(t, g));

  // Output pass: W~ = A_{L-1} C_L.
  for (int64_t g = 0; g < G; ++g) {
    attention_centroids(cent(iters[g] - 1, g), plan, cT.data() + g * d * plan.kp);
    transpose_pad(cent(iters[g], g), plan, cLT.data() + g * d * plan.kp);
  }
  for_each_chunk<T>(plan, all_groups(G), nullptr, [&](int64_t g, int64_t r0, int64_t r1, T*) {
    std::vector<T> scratch(scratch_size(plan)), wbuf(kBlockRows * d), obuf(kBlockRows * d);
    for (int64_t b = r0; b < r1; b += kBlockRows) {
      const int64_t n = std::min(kBlockRows, r1 - b);
      const T* wb = rows_as(w + (g * M + b) * d, n * d, wbuf.data());
      S* dst = o + (g * M + b) * d;
      if constexpr (std::is_same_v<S, T>) {
        K.output(passes[g], wb, n, dst, scratch.data());
      } else {
        K.output(passes[g], wb, n, obuf.data(), scratch.data());
        for (int64_t i = 0; i < n * d; ++i) dst[i] = static_cast<S>(obuf[i]);
      }
    }
  });
  return {out, history, masses, iterations};
}

// ----------------------------------------------------------------------------- backward --

template <typename S, typename T>
Tensor backward_typed(const Tensor& grad_out, const Tensor& weights, const Tensor& history_in,
                      const Tensor& masses_in, const Tensor& iterations_in, double tau) {
  const Kernels<T>& K = kernels<T>();
  const int64_t G = weights.size(0), M = weights.size(1), d = weights.size(2), k = history_in.size(2);
  const int64_t max_iter = masses_in.size(0);
  const auto copt = weights.options().dtype(c10::CppTypeToScalarType<T>::value);
  const Tensor history = history_in.to(copt).contiguous();
  const Tensor masses = masses_in.to(copt).contiguous();
  const Tensor iterations = iterations_in.to(at::kLong).contiguous();
  const int64_t* L = iterations.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK_VALUE(L[g] >= 1 && L[g] <= max_iter, "iterations[", g, "] = ", L[g], " is outside [1, ",
                      max_iter, "]");

  // Gradients accumulate over the steps in the compute type.
  Tensor grad = at::zeros({G, M, d}, copt);
  const Plan plan = make_plan<T>(G, M, d, k);
  const T* hist = history.data_ptr<T>();
  const T* mass_in = masses.data_ptr<T>();
  const S* w = weights.data_ptr<S>();
  const S* go = grad_out.data_ptr<S>();
  T* dw = grad.data_ptr<T>();
  auto cent = [&](int64_t t, int64_t g) { return hist + (t * G + g) * k * d; };

  const int64_t mat = d * plan.kp;
  std::vector<T> cT(G * mat), cLT(G * mat), gmT(G * mat), gdc(G * plan.kp), partial(G * plan.chunks * plan.slot());
  std::vector<T> grad_c(G * k * d), gm(k * d);
  std::vector<Pass<T>> passes(G, base_pass<T>(plan, tau));
  for (int64_t g = 0; g < G; ++g) {
    passes[g].cT = cT.data() + g * mat;
    passes[g].cLT = cLT.data() + g * mat;
    passes[g].gmT = gmT.data() + g * mat;
    passes[g].gdc = gdc.data() + g * plan.kp;
  }

  // G_L = A_{L-1}^T G~: the gradient reaching the final centroids through the output.
  for (int64_t g = 0; g < G; ++g) attention_centroids(cent(L[g] - 1, g), plan, cT.data() + g * mat);
  for_each_chunk(plan, all_groups(G), partial.data(), [&](int64_t g, int64_t r0, int64_t r1, T* slot) {
    std::vector<T> scratch(scratch_size(plan)), wbuf(kBlockRows * d), gbuf(kBlockRows * d);
    for (int64_t b = r0; b < r1; b += kBlockRows) {
      const int64_t n = std::min(kBlockRows, r1 - b);
      const T* wb = rows_as(w + (g * M + b) * d, n * d, wbuf.data());
      const T* gb = rows_as(go + (g * M + b) * d, n * d, gbuf.data());
      K.accumulate(passes[g], wb, gb, n, slot, nullptr, scratch.data());
    }
  });
  {
    std::vector<T> sum(plan.slot());
    for (int64_t g = 0; g < G; ++g) {
      reduce_chunks(plan, partial.data(), g, sum.data());
      for (int64_t j = 0; j < k; ++j)
        for (int64_t l = 0; l < d; ++l) grad_c[(g * k + j) * d + l] = sum[l * plan.kp + j];
    }
  }

  // Steps t = L-1 .. 0. Groups are aligned at their last iteration: step p is t = L_g - p.
  const int64_t longest = *std::max_element(L, L + G);
  for (int64_t p = 1; p <= longest; ++p) {
    std::vector<int64_t> active;
    for (int64_t g = 0; g < G; ++g)
      if (L[g] >= p) active.push_back(g);
    for (int64_t g : active) {
      const int64_t t = L[g] - p;
      const T* c_next = cent(t + 1, g);
      const T* s = mass_in + (t * G + g) * k;
      const T* gc = grad_c.data() + g * k * d;
      T* dot = gdc.data() + g * plan.kp;
      std::fill(dot, dot + plan.kp, T(0));
      for (int64_t j = 0; j < k; ++j) {
        T acc = 0;
        for (int64_t l = 0; l < d; ++l) {
          // Terms of a centroid without mass are zero.
          gm[j * d + l] = s[j] > 0 ? gc[j * d + l] / s[j] : T(0);
          acc += gm[j * d + l] * c_next[j * d + l];
        }
        dot[j] = acc;
      }
      transpose_pad(gm.data(), plan, gmT.data() + g * mat);
      attention_centroids(cent(t, g), plan, cT.data() + g * mat);
      if (p == 1) transpose_pad(cent(L[g], g), plan, cLT.data() + g * mat);
    }
    for_each_chunk(plan, active, partial.data(), [&](int64_t g, int64_t r0, int64_t r1, T* slot) {
      std::vector<T> scratch(scratch_size(plan)), wbuf(kBlockRows * d), gbuf(kBlockRows * d);
      for (int64_t b = r0; b < r1; b += kBlockRows) {
        const int64_t n = std::min(kBlockRows, r1 - b);
        const T* wb = rows_as(w + (g * M + b) * d, n * d, wbuf.data());
        const T* gb = p == 1 ? rows_as(go + (g * M + b) * d, n * d, gbuf.data()) : nullptr;
        K.grad_step(passes[g], wb, gb, n, dw + (g * M + b) * d, slot, slot + mat, scratch.data());
      }
    });
    std::vector<T> sum(plan.slot());
    for (int64_t g : active) {
      reduce_chunks(plan, partial.data(), g, sum.data());
      const int64_t t = L[g] - p;
      const T* c = cent(t, g);
      const T* s = mass_in + (t * G + g) * k;
      T* gc = grad_c.data() + g * k * d;
      for (int64_t j = 0; j < k; ++j)
        for (int64_t l = 0; l < d; ++l) {
          T next = passes[g].two_over_tau * (sum[l * plan.kp + j] - c[j * d + l] * sum[mat + j]);
          // A centroid without mass is carried over unchanged: its gradient passes through.
          if (!(s[j] > 0)) next += gc[j * d + l];
          gc[j * d + l] = next;
        }
    }
  }
  if constexpr (std::is_same_v<S, T>) return grad;
  return grad.to(weights.scalar_type());
}

// ------------------------------------------------------------------------------ the ops --

void check_common(const Tensor& weights, double tau) {
  TORCH_CHECK_VALUE(weights.dim() == 3, "weights must have shape (G, M, d), got ", weights.sizes());
  TORCH_CHECK_VALUE(weights.device().is_cpu(), "the cpu backend takes CPU tensors, got weights on ",
                    weights.device());
  TORCH_CHECK_VALUE(tau > 0 && std::isfinite(tau), "tau must be finite and > 0, got ", tau);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_forward(const Tensor& weights_in, const Tensor& centroids_in,
                                                       double tau, int64_t max_iter, double epsilon,
                                                       bool deterministic) {
  (void)deterministic;  // always deterministic
  check_common(weights_in, tau);
  TORCH_CHECK_VALUE(centroids_in.dim() == 3 && centroids_in.size(0) == weights_in.size(0) &&
                        centroids_in.size(2) == weights_in.size(2) && centroids_in.size(1) >= 1,
                    "centroids must have shape (G, k, d) with k >= 1 matching weights ", weights_in.sizes(),
                    ", got ", centroids_in.sizes());
  TORCH_CHECK_VALUE(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
  const Tensor weights = weights_in.contiguous();
  switch (weights.scalar_type()) {
    case at::kFloat:
      return forward_typed<float, float>(weights, centroids_in.to(at::kFloat).contiguous(), tau, max_iter, epsilon);
    case at::kDouble:
      return forward_typed<double, double>(weights, centroids_in.to(at::kDouble).contiguous(), tau, max_iter,
                                           epsilon);
    case at::kHalf:
      return forward_typed<c10::Half, float>(weights, centroids_in.to(at::kFloat).contiguous(), tau, max_iter,
                                             epsilon);
    case at::kBFloat16:
      return forward_typed<c10::BFloat16, float>(weights, centroids_in.to(at::kFloat).contiguous(), tau,
                                                 max_iter, epsilon);
    default:
      TORCH_CHECK_TYPE(false, "weights must be float16, bfloat16, float32 or float64, got ",
                       weights.scalar_type());
  }
}

Tensor cpu_backward(const Tensor& grad_out_in, const Tensor& weights_in, const Tensor& centroid_history,
                    const Tensor& masses, const Tensor& iterations, double tau, bool deterministic) {
  (void)deterministic;
  check_common(weights_in, tau);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == weights_in.sizes(), "grad_out has shape ", grad_out_in.sizes(),
                    " but weights have ", weights_in.sizes());
  TORCH_CHECK_VALUE(centroid_history.dim() == 4 && masses.dim() == 3 && iterations.dim() == 1 &&
                        centroid_history.size(0) == masses.size(0) + 1 &&
                        centroid_history.size(1) == weights_in.size(0) &&
                        centroid_history.size(3) == weights_in.size(2) &&
                        iterations.size(0) == weights_in.size(0),
                    "centroid_history (max_iter+1, G, k, d), masses (max_iter, G, k) and iterations (G,) "
                    "do not match weights ",
                    weights_in.sizes());
  const Tensor weights = weights_in.contiguous();
  const Tensor grad_out = grad_out_in.to(weights.scalar_type()).contiguous();
  switch (weights.scalar_type()) {
    case at::kFloat:
      return backward_typed<float, float>(grad_out, weights, centroid_history, masses, iterations, tau);
    case at::kDouble:
      return backward_typed<double, double>(grad_out, weights, centroid_history, masses, iterations, tau);
    case at::kHalf:
      return backward_typed<c10::Half, float>(grad_out, weights, centroid_history, masses, iterations, tau);
    case at::kBFloat16:
      return backward_typed<c10::BFloat16, float>(grad_out, weights, centroid_history, masses, iterations, tau);
    default:
      TORCH_CHECK_TYPE(false, "weights must be float16, bfloat16, float32 or float64, got ",
                       weights.scalar_type());
  }
}

}  // namespace
}  // namespace dkm

// Schemas identical to FORWARD_SCHEMA / BACKWARD_SCHEMA in dkm_kernels/_ops.py.
TORCH_LIBRARY_FRAGMENT(dkm_kernels, m) {
  m.def(
      "cpu_forward(Tensor weights, Tensor centroids, float tau, int max_iter, float epsilon, bool deterministic)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpu_backward(Tensor grad_out, Tensor weights, Tensor centroid_history, Tensor masses, Tensor iterations,"
      " float tau, bool deterministic) -> Tensor");
}

TORCH_LIBRARY_IMPL(dkm_kernels, CPU, m) {
  m.impl("cpu_forward", &dkm::cpu_forward);
  m.impl("cpu_backward", &dkm::cpu_backward);
}

// ------------------------------------------------------------------- the Python module --
// Importing dkm_kernels._C loads this library, which registers the ops above. The module itself
// only reports which instruction set the kernels use.

namespace {

PyObject* py_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(dkm::kernel_set().name);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* py_available_isas(PyObject*, PyObject*) {
  const auto& sets = dkm::available_sets();
  PyObject* names = PyTuple_New(static_cast<Py_ssize_t>(sets.size()));
  if (names == nullptr) return nullptr;
  for (size_t i = 0; i < sets.size(); ++i)
    PyTuple_SET_ITEM(names, static_cast<Py_ssize_t>(i), PyUnicode_FromString(sets[i]->name));
  return names;
}

PyMethodDef methods[] = {
    {"isa", py_isa, METH_NOARGS,
     "The instruction set the kernels run with: the best available, or $DKM_KERNELS_ISA."},
    {"available_isas", py_available_isas, METH_NOARGS,
     "Instruction sets compiled in and supported by this CPU, best first."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dkm_kernels CPU kernels (registers dkm_kernels::cpu_*)",
                          -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
