// Backend `cpu`: the three DKM passes of docs/design.md §3 as fused CPU kernels, registered as the
// ops dkm_kernels::cpu_attention_sums, cpu_output and cpu_gradient_pass. The recurrence that runs
// them (iterations, the epsilon stop, the backward's order) is shared by every backend and lives
// in dkm_kernels/recurrence.py; docs/design.md §4 says why it costs nothing measurable here.
//
// This file owns everything that touches ATen: checks, dtypes, threads and the reductions. A pass
// splits every group's rows into a fixed number of chunks (a function of the shapes only, never of
// the thread count); the threads of at::parallel_for take (group, chunk) items from a shared
// counter; each item accumulates into its own k x d partial sum, and the partials are added in
// chunk order. Results are therefore bit-identical run to run and for any number of threads. The
// row work itself is in kernel_impl.h, compiled per instruction set and chosen at run time.
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
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace dkm {
namespace {

using at::Tensor;

constexpr int64_t kMinRowsPerChunk = 64;   // fewer rows and a chunk's k x d reduction dominates
constexpr int64_t kMaxChunks = 256;        // enough items to balance many threads
constexpr double kLog2e = 1.4426950408889634;  // exp(x) = exp2(x log2(e))
constexpr int64_t kPartialBudget = 64 << 20;  // bytes of per-chunk partial sums, all groups
constexpr int64_t kBlockRows = 64;         // rows converted to the compute type at a time

// Rows per kernel call: a block to convert when the storage type differs, else the whole chunk
// (a call ends with its per-call sums and the x86 control-word switch: per call, not per row).
template <typename S, typename T>
int64_t rows_per_call(int64_t chunk_rows) {
  return std::is_same_v<S, T> ? std::max<int64_t>(1, chunk_rows) : kBlockRows;
}
constexpr int64_t kPadding = 16;           // centroids are padded to a multiple of this: every
                                           // vector width (4 to 16 lanes) divides it
constexpr int64_t kMinWorkPerThread = 1 << 21;  // (row, centroid, coordinate) steps: about a
                                                // fraction of a millisecond, below which waking a
                                                // thread costs more than it saves

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
  Plan p{groups, m, d, k, (k + kPadding - 1) / kPadding * kPadding, 1, 1};
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
Pass<T> base_pass(const Plan& plan, double tau) {
  Pass<T> p;
  p.k = plan.k;
  p.kp = plan.kp;
  p.d = plan.d;
  p.exp2_scale = static_cast<T>(kLog2e / tau);
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
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_item));
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

// ---------------------------------------------------------------------------- the passes --

// Every group's (k, d) centroids, transposed and padded for the kernels: (G, d, kp).
template <typename T>
std::vector<T> transposed(const Tensor& centroids, const Plan& plan, T fill) {
  std::vector<T> out(plan.groups * plan.d * plan.kp);
  const T* c = centroids.data_ptr<T>();
  for (int64_t g = 0; g < plan.groups; ++g)
    transpose_pad(c + g * plan.k * plan.d, plan, out.data() + g * plan.d * plan.kp, fill);
  return out;
}

std::vector<int64_t> active_groups(const Tensor& active) {
  const bool* flags = active.data_ptr<bool>();
  std::vector<int64_t> list;
  for (int64_t g = 0; g < active.size(0); ++g)
    if (flags[g]) list.push_back(g);
  return list;
}

// Per group, the sum of the chunk partials as (k, d) sums and (k,) totals (zero where inactive).
template <typename T>
std::tuple<Tensor, Tensor> reduced(const Plan& plan, const std::vector<T>& partial,
                                   const std::vector<int64_t>& groups, const at::TensorOptions& opt) {
  Tensor sums = at::zeros({plan.groups, plan.k, plan.d}, opt);
  Tensor totals = at::zeros({plan.groups, plan.k}, opt);
  T* s = sums.data_ptr<T>();
  T* m = totals.data_ptr<T>();
  std::vector<T> sum(plan.slot());
  for (int64_t g : groups) {
    reduce_chunks(plan, partial.data(), g, sum.data());
    for (int64_t j = 0; j < plan.k; ++j) {
      m[g * plan.k + j] = sum[plan.d * plan.kp + j];
      for (int64_t l = 0; l < plan.d; ++l) s[(g * plan.k + j) * plan.d + l] = sum[l * plan.kp + j];
    }
  }
  return {sums, totals};
}

// A block of rows in the compute type, converted into `buf` when the storage type differs.
template <typename S, typename T>
struct Rows {
  const S* base;
  int64_t m, d;
  std::vector<T> buf;
  Rows(const S* base, int64_t m, int64_t d) : base(base), m(m), d(d), buf(kBlockRows * d) {}
  const T* at(int64_t g, int64_t row, int64_t n) { return rows_as(base + (g * m + row) * d, n * d, buf.data()); }
};

// Rows b .. b + n of group g of a (G, M, d) input other than the weights, in the compute type:
// the input itself when the types agree, else a copy in the calling thread's buffer (the block
// bodies of reducing_pass convert one such block at a time).
template <typename S, typename T>
const T* block_rows(const S* rows, const Plan& plan, int64_t g, int64_t b, int64_t n) {
  thread_local std::vector<T> buf;
  buf.resize(kBlockRows * plan.d);
  return rows_as(rows + (g * plan.m + b) * plan.d, n * plan.d, buf.data());
}

// One pass's plan and every group's centroid matrices, laid out for the kernels (Pass).
template <typename T>
struct PassData {
  Plan plan;
  Pass<T> base;
  std::vector<T> cT, cLT, gmT, gdc;
  PassData(const Tensor& weights, const Tensor& attention_centroids, double tau)
      : plan(make_plan<T>(weights.size(0), weights.size(1), weights.size(2), attention_centroids.size(1))),
        base(base_pass<T>(plan, tau)),
        cT(transposed<T>(attention_centroids, plan, FarAway<T>::value)) {}
  // The output and gradient passes also read the final centroids.
  PassData(const Tensor& weights, const Tensor& attention_centroids, const Tensor& final_centroids, double tau)
      : PassData(weights, attention_centroids, tau) {
    cLT = transposed<T>(final_centroids, plan, T(0));
  }
  Pass<T> group(int64_t g) const {
    const int64_t mat = plan.d * plan.kp;
    Pass<T> p = base;
    p.cT = cT.data() + g * mat;
    if (!cLT.empty()) p.cLT = cLT.data() + g * mat;
    if (!gmT.empty()) p.gmT = gmT.data() + g * mat;
    if (!gdc.empty()) p.gdc = gdc.data() + g * plan.kp;
    return p;
  }
};

// Runs body(pass, rows, first_row, n, slot) on blocks of rows of every active group's chunks and
// returns the chunk partials reduced per group: (G, k, d) sums and (G, k) totals.
template <typename S, typename T, typename Body>
std::tuple<Tensor, Tensor> reducing_pass(const PassData<T>& data, const Tensor& weights, const Tensor& active,
                                         const at::TensorOptions& opt, const Body& body) {
  const Plan& plan = data.plan;
  std::vector<T> partial(plan.groups * plan.chunks * plan.slot());
  const std::vector<int64_t> groups = active_groups(active);
  for_each_chunk(plan, groups, partial.data(), [&](int64_t g, int64_t r0, int64_t r1, T* slot) {
    const Pass<T> p = data.group(g);
    std::vector<T> scratch(scratch_size(plan));
    Rows<S, T> w(weights.data_ptr<S>(), plan.m, plan.d);
    const int64_t block = rows_per_call<S, T>(r1 - r0);
    for (int64_t b = r0; b < r1; b += block) {
      const int64_t n = std::min(block, r1 - b);
      body(p, w.at(g, b, n), g, b, n, slot, scratch.data());
    }
  });
  return reduced(plan, partial, groups, opt);
}

template <typename S, typename T>
std::tuple<Tensor, Tensor> attention_sums_typed(const Tensor& weights, const Tensor& values,
                                                const Tensor& centroids, const Tensor& active, double tau) {
  const Kernels<T>& K = kernels<T>();
  const PassData<T> data(weights, centroids, tau);
  const int64_t mat = data.plan.d * data.plan.kp;
  return reducing_pass<S, T>(data, weights, active, centroids.options(),
                             [&](const Pass<T>& p, const T* w, int64_t g, int64_t b, int64_t n, T* slot, T* scratch) {
    const T* x = block_rows<S, T>(values.data_ptr<S>(), data.plan, g, b, n);
    K.accumulate(p, w, x, n, slot, slot + mat, scratch);
  });
}

template <typename S, typename T>
Tensor output_typed(const Tensor& weights, const Tensor& attention_centroids, const Tensor& final_centroids,
                    double tau) {
  const Kernels<T>& K = kernels<T>();
  const PassData<T> data(weights, attention_centroids, final_centroids, tau);
  const Plan& plan = data.plan;
  Tensor out = at::empty(weights.sizes(), weights.options());
  S* o = out.data_ptr<S>();
  for_each_chunk<T>(plan, all_groups(plan.groups), nullptr, [&](int64_t g, int64_t r0, int64_t r1, T*) {
    const Pass<T> p = data.group(g);
    std::vector<T> scratch(scratch_size(plan)), obuf(kBlockRows * plan.d);
    Rows<S, T> w(weights.data_ptr<S>(), plan.m, plan.d);
    const int64_t block = rows_per_call<S, T>(r1 - r0);
    for (int64_t b = r0; b < r1; b += block) {
      const int64_t n = std::min(block, r1 - b);
      S* dst = o + (g * plan.m + b) * plan.d;
      if constexpr (std::is_same_v<S, T>) {
        K.output(p, w.at(g, b, n), n, dst, scratch.data());
      } else {
        K.output(p, w.at(g, b, n), n, obuf.data(), scratch.data());
        for (int64_t i = 0; i < n * plan.d; ++i) dst[i] = static_cast<S>(obuf[i]);
      }
    }
  });
  return out;
}

// The gradient pass's inputs as cpu_gradient_pass checked them (contiguous, of matching shapes).
struct GradientInputs {
  Tensor weights;
  std::optional<Tensor> grad_out;
  Tensor centroids, grad_over_mass, grad_dot_next, final_centroids, active;
};

template <typename S, typename T>
Tensor gradient_typed(const GradientInputs& in, Tensor& grad_weights, double tau) {
  const Kernels<T>& K = kernels<T>();
  PassData<T> data(in.weights, in.centroids, in.final_centroids, tau);
  const Plan& plan = data.plan;
  data.gmT = transposed<T>(in.grad_over_mass, plan, T(0));
  data.gdc.assign(plan.groups * plan.kp, T(0));
  const T* dot = in.grad_dot_next.data_ptr<T>();
  for (int64_t g = 0; g < plan.groups; ++g)
    std::copy(dot + g * plan.k, dot + (g + 1) * plan.k, data.gdc.data() + g * plan.kp);
  T* dw = grad_weights.data_ptr<T>();
  const S* go = in.grad_out ? in.grad_out->data_ptr<S>() : nullptr;
  // Only the (G, k, d) sums: the recurrence needs no column totals of dS.
  return std::get<0>(reducing_pass<S, T>(data, in.weights, in.active, in.centroids.options(),
                                         [&](const Pass<T>& p, const T* w, int64_t g, int64_t b, int64_t n, T* slot,
                                             T* scratch) {
    const T* gb = go ? block_rows<S, T>(go, plan, g, b, n) : nullptr;
    K.grad_step(p, w, gb, n, dw + (g * plan.m + b) * p.d, slot, scratch);
  }));
}

// ------------------------------------------------------------------------------ the ops --
// Each op checks its own inputs (users and torch.compile may call it directly): shapes against
// each other, dtypes, devices. Inputs are made contiguous; the one output written in place,
// grad_weights, must be.

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "the cpu backend takes CPU tensors, got ", name, " on ", t.device());
}

// weights (G, M, d) of a supported dtype; returns the compute type.
at::ScalarType check_weights(const Tensor& weights, double tau) {
  check_cpu(weights, "weights");
  TORCH_CHECK_VALUE(weights.dim() == 3 && weights.size(2) >= 1, "weights must have shape (G, M, d) with d >= 1, got ",
                    weights.sizes());
  TORCH_CHECK_VALUE(tau > 0 && std::isfinite(tau), "tau must be finite and > 0, got ", tau);
  switch (weights.scalar_type()) {
    case at::kFloat: case at::kHalf: case at::kBFloat16: return at::kFloat;
    case at::kDouble: return at::kDouble;
    default:
      TORCH_CHECK_TYPE(false, "weights must be float16, bfloat16, float32 or float64, got ", weights.scalar_type());
  }
}

// A (G, k, d) or (G, k) tensor of the compute type; k is taken from the first one checked (k < 0).
Tensor checked_per_centroid(const Tensor& t, const char* name, const Tensor& weights, int64_t& k,
                            at::ScalarType compute, bool with_d = true) {
  check_cpu(t, name);
  const int64_t dims = with_d ? 3 : 2;
  const bool ok = t.dim() == dims && t.size(0) == weights.size(0) && (k < 0 ? t.size(1) >= 1 : t.size(1) == k) &&
                  (!with_d || t.size(2) == weights.size(2));
  TORCH_CHECK_VALUE(ok, name, " must have shape ", with_d ? "(G, k, d)" : "(G, k)", " with G = ", weights.size(0),
                    with_d ? ", d = " + std::to_string(weights.size(2)) : std::string(),
                    k < 0 ? std::string(", k >= 1") : ", k = " + std::to_string(k), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == compute, name, " must be ", compute, " (the compute type of ",
                   weights.scalar_type(), " weights), got ", t.scalar_type());
  if (k < 0) k = t.size(1);
  return t.contiguous();
}

Tensor checked_rows(const Tensor& t, const char* name, const Tensor& weights) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.sizes() == weights.sizes(), name, " has shape ", t.sizes(), " but weights have ", weights.sizes());
  return t.to(weights.scalar_type()).contiguous();
}

Tensor checked_active(const Tensor& active, const Tensor& weights) {
  check_cpu(active, "active");
  TORCH_CHECK_VALUE(active.dim() == 1 && active.size(0) == weights.size(0), "active must have shape (G,) = (",
                    weights.size(0), ",), got ", active.sizes());
  return active.to(at::kBool).contiguous();
}

// What every op checks first: tau and the weights (then made contiguous), the compute type they
// imply, and k, taken from the first per-centroid input checked.
struct OpInputs {
  at::ScalarType compute;
  Tensor weights;
  int64_t k = -1;
  OpInputs(const Tensor& weights_in, double tau)
      : compute(check_weights(weights_in, tau)), weights(weights_in.contiguous()) {}
  Tensor per_centroid(const Tensor& t, const char* name, bool with_d = true) {
    return checked_per_centroid(t, name, weights, k, compute, with_d);
  }
};

#define DKM_DISPATCH(weights, NAME, ...)                                                  \
  switch (weights.scalar_type()) {                                                        \
    case at::kFloat: return NAME<float, float>(__VA_ARGS__);                              \
    case at::kDouble: return NAME<double, double>(__VA_ARGS__);                           \
    case at::kHalf: return NAME<c10::Half, float>(__VA_ARGS__);                           \
    case at::kBFloat16: return NAME<c10::BFloat16, float>(__VA_ARGS__);                   \
    default: TORCH_CHECK_TYPE(false, "unsupported weights dtype ", weights.scalar_type()); \
  }

std::tuple<Tensor, Tensor> cpu_attention_sums(const Tensor& weights_in, const Tensor& values_in,
                                              const Tensor& centroids_in, const Tensor& active_in, double tau) {
  OpInputs in(weights_in, tau);
  const Tensor values = checked_rows(values_in, "values", in.weights);
  const Tensor centroids = in.per_centroid(centroids_in, "centroids");
  const Tensor active = checked_active(active_in, in.weights);
  DKM_DISPATCH(in.weights, attention_sums_typed, in.weights, values, centroids, active, tau);
}

Tensor cpu_output(const Tensor& weights_in, const Tensor& attention_in, const Tensor& final_in, double tau) {
  OpInputs in(weights_in, tau);
  const Tensor attention = in.per_centroid(attention_in, "attention_centroids");
  const Tensor final_c = in.per_centroid(final_in, "final_centroids");
  DKM_DISPATCH(in.weights, output_typed, in.weights, attention, final_c, tau);
}

Tensor cpu_gradient_pass(const Tensor& weights_in, const std::optional<Tensor>& grad_out_in,
                         const Tensor& centroids_in, const Tensor& grad_over_mass_in,
                         const Tensor& grad_dot_next_in, const Tensor& final_in,
                         const Tensor& active_in, Tensor& grad_weights, double tau) {
  OpInputs in(weights_in, tau);
  GradientInputs checked;
  checked.weights = in.weights;
  if (grad_out_in) checked.grad_out = checked_rows(*grad_out_in, "grad_out", in.weights);
  checked.centroids = in.per_centroid(centroids_in, "centroids");
  checked.grad_over_mass = in.per_centroid(grad_over_mass_in, "grad_over_mass");
  checked.grad_dot_next = in.per_centroid(grad_dot_next_in, "grad_dot_next", false);
  checked.final_centroids = in.per_centroid(final_in, "final_centroids");
  checked.active = checked_active(active_in, in.weights);
  check_cpu(grad_weights, "grad_weights");
  TORCH_CHECK_VALUE(grad_weights.sizes() == in.weights.sizes() && grad_weights.is_contiguous(),
                    "grad_weights must be a contiguous tensor of the weights' shape ", in.weights.sizes(), ", got ",
                    grad_weights.sizes());
  TORCH_CHECK_TYPE(grad_weights.scalar_type() == in.compute, "grad_weights must be ", in.compute, ", got ",
                   grad_weights.scalar_type());
  DKM_DISPATCH(in.weights, gradient_typed, checked, grad_weights, tau);
}

#undef DKM_DISPATCH

}  // namespace

const char* selected_isa() { return kernel_set().name; }

}  // namespace dkm

TORCH_LIBRARY_FRAGMENT(dkm_kernels, m) {
  m.def("cpu_attention_sums(Tensor weights, Tensor values, Tensor centroids, Tensor active, float tau)"
        " -> (Tensor, Tensor)");
  m.def("cpu_output(Tensor weights, Tensor attention_centroids, Tensor final_centroids, float tau) -> Tensor");
  m.def(
      "cpu_gradient_pass(Tensor weights, Tensor? grad_out, Tensor centroids, Tensor grad_over_mass,"
      " Tensor grad_dot_next, Tensor final_centroids, Tensor active, Tensor(a!) grad_weights, float tau)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(dkm_kernels, CPU, m) {
  m.impl("cpu_attention_sums", &dkm::cpu_attention_sums);
  m.impl("cpu_output", &dkm::cpu_output);
  m.impl("cpu_gradient_pass", &dkm::cpu_gradient_pass);
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
