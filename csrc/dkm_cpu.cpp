// Backend `cpu`: the three DKM passes of docs/design.md §3 as fused CPU kernels, registered as the
// ops dkm_kernels::cpu_attention_sums, cpu_output and cpu_gradient_pass, and as the same passes
// over many problems at once, cpu_ragged_attention_sums, cpu_ragged_output and
// cpu_ragged_gradient_pass (dkm_many, docs/design.md §12). The recurrence that runs
// them (iterations, the epsilon stop, the backward's order) is shared by every backend and lives
// in dkm_kernels/recurrence.py; docs/design.md §4 says why it costs nothing measurable here.
//
// This file owns everything that touches ATen: checks, dtypes, threads and the reductions. A pass
// splits every group's rows into a fixed number of chunks (a function of the shapes only, never of
// the thread count); the threads of one at::parallel_for (per pass, or per wave of problems: see
// Memory) take (problem, group, chunk) items, most costly first, from a shared counter; each item accumulates into its own k x d partial sum, and
// each group's partials are added in chunk order. Results are therefore bit-identical run to run,
// for any number of threads, and whether a problem runs alone or among others. The row work
// itself is in kernel_impl.h, compiled per instruction set and chosen at run time.
//
// Memory: nothing of size M x k exists. Per pass the workspace is the partial sums (at most
// kPartialBudget bytes, independent of M and of the number of problems: a pass over problems
// whose partials exceed it runs in waves) plus a few rows of kp values per thread.

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
#include <mutex>
#include <new>
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
constexpr int64_t kBlockBytes = 32 << 10;  // of rows converted to the compute type at a time

// The kernels' buffers start on a cache line: a vector load from a line's middle reads two lines,
// and with malloc's 16-byte alignment most 64-byte loads would (a pass at k = 4096 took from 1.1x
// to 1.9x the aligned time, depending on where its buffers happened to land).
template <typename T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, kLine); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheAligned<T>>;

// Rows of d values converted to the compute type T at a time: kBlockBytes of them, and at least 64.
// A kernel call ends with per-call work (its sparse sums folded, the x86 control word restored):
// with 64 rows per call at d = 8, k = 256 that made the attention pass over bfloat16 weights 1.15x
// its time over float32.
template <typename T>
int64_t conversion_rows(int64_t d) {
  return std::max<int64_t>(64, kBlockBytes / (d * static_cast<int64_t>(sizeof(T))));
}

// Rows per kernel call: a block to convert when the storage type differs, else the whole chunk.
template <typename S, typename T>
int64_t rows_per_call(int64_t chunk_rows, int64_t d) {
  return std::is_same_v<S, T> ? std::max<int64_t>(1, chunk_rows) : conversion_rows<T>(d);
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

// A switch of 0 or 1 in the environment, `unset` where it is not set (or empty); any other value
// is refused with `fix`. Read on every call.
bool env_switch(const char* name, bool unset, const char* fix) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return unset;
  if (std::strcmp(value, "1") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(value, "0") == 0, name, "=", value, " is not 0 or 1: ", fix);
  return false;
}

// Whether sparse blocks take their attended pairs one by one: DKM_KERNELS_SPARSE=0 makes every
// block dense (read on every call, so that benchmarks can compare both ways in one process).
bool sparse_rows_enabled() {
  return env_switch("DKM_KERNELS_SPARSE", true, "set it to 0 to make every block dense, or unset it");
}

// DKM_KERNELS_POISON_SCRATCH=1 fills each work item's scratch with NaN before its kernels run,
// for tests: the kernels write every scratch value before they read it, so the results must not
// change (tests/test_cpu_backend.py).
bool poison_scratch() {
  return env_switch("DKM_KERNELS_POISON_SCRATCH", false,
                    "set it to 1 to fill each work item's scratch with NaN (a test of the kernels), or unset it");
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
  int64_t kp = (k + kPadding - 1) / kPadding * kPadding;
  // Rows of kp values a multiple of 4 KiB apart share their L1 sets and the low address bits
  // that x86 compares between loads and pending stores (4K aliasing): a block's scratch rows and
  // a transposed array's coordinates would all do so at k = 1024 and above. Padding them a line
  // apart made the same gradient call at k = 4096, d = 1 take 10.1 ms every time, instead of 10.6
  // or 13.4 depending on the call.
  if (kp * static_cast<int64_t>(sizeof(T)) % 4096 == 0) kp += kPadding;
  Plan p{groups, m, d, k, kp, 1, 1};
  const int64_t per_chunk = p.slot() * static_cast<int64_t>(sizeof(T));
  const int64_t max_chunks =
      std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, kPartialBudget / std::max<int64_t>(1, groups * per_chunk)));
  const int64_t wanted = std::max<int64_t>(1, (m + kMinRowsPerChunk - 1) / kMinRowsPerChunk);
  p.chunks = std::min(wanted, max_chunks);
  p.rows = std::max<int64_t>(1, (m + p.chunks - 1) / p.chunks);
  p.chunks = std::max<int64_t>(1, (m + p.rows - 1) / p.rows);
  return p;
}

// Where one problem's groups sit in a per-segment tensor, (S, k_max, d_max) or (S, k_max)
// (d_max = 1): from segment `first` on, its centroids [:k] and coordinates [:d] (docs/design.md
// §12). The one-problem ops are the case of one problem: S = G, k_max = k, d_max = d.
struct Segments {
  int64_t first, k_max, d_max;
  Segments(int64_t first, const Tensor& packed)
      : first(first), k_max(packed.size(1)), d_max(packed.dim() == 3 ? packed.size(2) : 1) {}
  int64_t at(int64_t g, int64_t j = 0) const { return ((first + g) * k_max + j) * d_max; }
};

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

int64_t scratch_size(const Plan& plan) {
  return kScratchRows * (plan.kp + plan.d) + plan.kp * (2 * plan.d + 4) + 32;
}

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

// A block of rows in the compute type, converted into `buf` when the storage type differs.
template <typename S, typename T>
struct Rows {
  const S* base;
  int64_t m, d;
  std::vector<T> buf;
  Rows(const S* base, int64_t m, int64_t d) : base(base), m(m), d(d), buf(conversion_rows<T>(d) * d) {}
  const T* at(int64_t g, int64_t row, int64_t n) { return rows_as(base + (g * m + row) * d, n * d, buf.data()); }
};

// Rows b .. b + n of group g of a (G, M, d) input other than the weights, in the compute type:
// the input itself when the types agree, else a copy in the calling thread's buffer (the block
// bodies of run_items convert one such block at a time).
template <typename S, typename T>
const T* block_rows(const S* rows, const Plan& plan, int64_t g, int64_t b, int64_t n) {
  thread_local std::vector<T> buf;
  buf.resize(conversion_rows<T>(plan.d) * plan.d);
  return rows_as(rows + (g * plan.m + b) * plan.d, n * plan.d, buf.data());
}

// Calls f(S{}) with S the storage type `type` of weights computed in T.
template <typename T, typename F>
void with_storage(at::ScalarType type, const F& f) {
  if constexpr (std::is_same_v<T, double>) {
    f(double{});  // only float64 weights compute in float64
  } else {
    switch (type) {
      case at::kFloat: return f(float{});
      case at::kHalf: return f(c10::Half{});
      case at::kBFloat16: return f(c10::BFloat16{});
      default: TORCH_CHECK_TYPE(false, "weights of ", type, " do not compute in float32");
    }
  }
}

// ---------------------------------------------------------------------------- the passes --
// Every pass runs over many problems at once (docs/design.md §12); the one-problem ops are the
// case of one. Each problem keeps the plan, centroid layout and partial sums it has alone, so its
// results are bit-identical either way.

// A pass's inputs, checked: per problem its weights (G, M, d), contiguous, an optional second
// input of the same shape and dtype (the values or the upstream gradient), k and tau; per segment
// the centroid tensors (S, k_max, d_max) and (S, k_max) of the compute type, as the pass needs.
struct PassInputs {
  std::vector<Tensor> weights, rows, grad_weights;
  std::vector<int64_t> ks;
  std::vector<double> taus;
  Tensor centroids, final_centroids, grad_over_mass, grad_dot_next, active;
  Tensor masses;  // gradient pass, optional: s_t (S, k_max), which certifies centroids (uncertify_light)
};

// One problem of a pass: its plan, its groups' centroid matrices laid out for the kernels (Pass),
// its first segment, its tensors and its chunks' partial sums.
template <typename T>
struct Problem {
  Plan plan;
  Pass<T> base;
  int64_t first;
  at::ScalarType storage;
  const void* w;
  const void* x = nullptr;  // the second input's rows, of the storage type, or null
  void* out = nullptr;      // output pass: W~ (G, M, d), of the storage type
  T* dw = nullptr;          // gradient pass: the (G, M, d) accumulator
  Buffer<T> cT, cLT, gmT, gdc, cR, gmR, cLR, reach;
  T* partial = nullptr;  // during a reducing pass: this problem's chunk partials, in PartialSums

  Pass<T> group(int64_t g) const {
    const int64_t mat = plan.d * plan.kp;
    Pass<T> p = base;
    p.cT = cT.data() + g * mat;
    if (!cLT.empty()) p.cLT = cLT.data() + g * mat;
    if (!gmT.empty()) p.gmT = gmT.data() + g * mat;
    if (!gdc.empty()) p.gdc = gdc.data() + g * plan.kp;
    if (!cR.empty()) p.cR = cR.data() + g * mat;
    if (!gmR.empty()) p.gmR = gmR.data() + g * mat;
    if (!cLR.empty()) p.cLR = cLR.data() + g * mat;
    if (!reach.empty()) p.reach = reach.data() + g * plan.kp;
    return p;
  }

  // Every group's (k, d) part of a (S, k_max, d_max) tensor, padded to kp centroids, coordinate
  // l of centroid j of group g at out[at(g, j, l)], the padding set to `fill`.
  template <typename At>
  Buffer<T> laid_out(const Tensor& packed, T fill, const At& at) const {
    const Segments seg(first, packed);
    const T* c = packed.data_ptr<T>();
    Buffer<T> out(plan.groups * plan.d * plan.kp, fill);
    for (int64_t g = 0; g < plan.groups; ++g)
      for (int64_t j = 0; j < plan.k; ++j)
        for (int64_t l = 0; l < plan.d; ++l) out[at(g, j, l)] = c[seg.at(g, j) + l];
    return out;
  }

  // Transposed for the kernels, (G, d, kp).
  Buffer<T> transposed(const Tensor& packed, T fill) const {
    return laid_out(packed, fill, [&](int64_t g, int64_t j, int64_t l) { return (g * plan.d + l) * plan.kp + j; });
  }

  // Row by row, (G, kp, d), padding rows zero.
  Buffer<T> padded(const Tensor& packed) const {
    return laid_out(packed, T(0), [&](int64_t g, int64_t j, int64_t l) { return (g * plan.kp + j) * plan.d + l; });
  }
};

// The mass that certifies a centroid of a group of m rows (kernels.h, Relevance).
template <typename T>
T certifying_mass(int64_t m) {
  return std::ldexp(static_cast<T>(m), kRelevanceMargin - kRelevanceExponent);
}

// The reach (Pass::reach) that lists every pair of a centroid whose exponential vexp2 does not flush.
template <typename T>
T every_pair_reach(const Problem<T>& problem) {
  return -Exp2Floor<T>::value / problem.base.exp2_scale;
}

// Every centroid of every group taken as certified (Pass::reach: its relevant pairs listed), where
// the problem lists pairs at all, in float: the output pass (whose results are per row), the
// attention pass (which checks the masses it finds: attention_sums_pass) and the gradient pass
// given the masses (which then uncertifies the light ones). Without it a pass lists every
// unflushed pair, as float64 always does.
template <typename T>
void assume_certified(Problem<T>& problem) {
  const Plan& plan = problem.plan;
  if (std::is_same_v<T, float> && problem.base.sparse_rows && lists_pairs(plan.d, plan.k))
    problem.reach.assign(plan.groups * plan.kp, kRelevanceExponent / problem.base.exp2_scale);
}

// Lists every unflushed pair of each centroid of the active groups (every group where `active` is
// null) whose mass in `masses` (S, k_max) does not certify it (a NaN mass certifies nothing), and
// marks those groups in `marked` where it is given. Nothing where the problem keeps no reach.
template <typename T>
void uncertify_light(Problem<T>& problem, const Tensor& masses, const bool* active, bool* marked) {
  if (problem.reach.empty()) return;
  const Plan& plan = problem.plan;
  const Segments seg(problem.first, masses);
  const T* mass = masses.data_ptr<T>();
  const T certifying = certifying_mass<T>(plan.m), every = every_pair_reach(problem);
  for (int64_t g = 0; g < plan.groups; ++g) {
    if (active && !active[problem.first + g]) continue;
    for (int64_t j = 0; j < plan.k; ++j) {
      if (mass[seg.at(g, j)] >= certifying) continue;
      problem.reach[g * plan.kp + j] = every;
      if (marked) marked[problem.first + g] = true;
    }
  }
}

// Every problem of a pass, with C_t (far away in the padding, so that it gets no attention) and,
// for the output and gradient passes, C_L.
template <typename T>
std::vector<Problem<T>> make_problems(const PassInputs& in) {
  std::vector<Problem<T>> problems;
  int64_t first = 0;
  const bool sparse_rows = sparse_rows_enabled();
  for (size_t q = 0; q < in.weights.size(); ++q) {
    const Tensor& w = in.weights[q];
    const Plan plan = make_plan<T>(w.size(0), w.size(1), w.size(2), in.ks[q]);
    Pass<T> base;
    base.k = plan.k;
    base.kp = plan.kp;
    base.d = plan.d;
    base.exp2_scale = static_cast<T>(kLog2e / in.taus[q]);
    base.two_over_tau = static_cast<T>(2.0 / in.taus[q]);
    base.sparse_rows = sparse_rows;
    Problem<T> p{plan, base, first, w.scalar_type(), w.data_ptr()};
    if (!in.rows.empty()) p.x = in.rows[q].data_ptr();
    p.cT = p.transposed(in.centroids, FarAway<T>::value);
    if (in.final_centroids.defined()) p.cLT = p.transposed(in.final_centroids, T(0));
    problems.push_back(std::move(p));
    first += plan.groups;
  }
  return problems;
}

// One chunk of one group of one problem: the unit of work a thread takes.
struct Item {
  int64_t problem, group, chunk, cost;
};

// Every chunk of every active segment (all of them if `active` is undefined) of problems
// [begin, end), most costly first: a large item taken last would leave the other threads idle.
template <typename T>
std::vector<Item> work_items(const std::vector<Problem<T>>& problems, size_t begin, size_t end, const Tensor& active) {
  const bool* flags = active.defined() ? active.data_ptr<bool>() : nullptr;
  std::vector<Item> items;
  for (size_t q = begin; q < end; ++q) {
    const Plan& plan = problems[q].plan;
    for (int64_t g = 0; g < plan.groups; ++g) {
      if (flags && !flags[problems[q].first + g]) continue;
      for (int64_t c = 0; c < plan.chunks; ++c) {
        const int64_t rows = std::min(plan.m, (c + 1) * plan.rows) - c * plan.rows;
        items.push_back({static_cast<int64_t>(q), g, c, rows * plan.kp * (plan.d + 4)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// Runs body(S{}, problem, pass, w, g, b, n, slot, scratch) on blocks of n rows from row b (the
// weights `w` in the compute type) of every item, S the problem's storage type, `slot` the
// item's own zeroed partial (null if the pass does not reduce): one parallel region for all
// the items. Threads take items from a shared counter rather than fixed ranges, so a thread the
// OS descheduled (a busy machine) does not hold the pass up; which thread computes an item never
// changes what it computes. Threads are woken only for a fraction of a millisecond of work each
// at least: for less, waking them costs more than it saves.
template <typename T, typename Body>
void run_items(std::vector<Problem<T>>& problems, const std::vector<Item>& items, const Body& body) {
  int64_t work = 0;
  for (const Item& item : items) work += item.cost;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (work + kMinWorkPerThread - 1) / kMinWorkPerThread);
  const int64_t count = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  const bool poison = poison_scratch();
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t begin, int64_t end) {
    // One per worker, not zeroed per item: the kernels write what they read (poison_scratch). Zeroing
    // it for each item (116 KiB at k = 1024) took 7% of a pass there; an allocation per item more.
    Buffer<T> scratch;
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t q = next.fetch_add(1); q < count; q = next.fetch_add(1)) {
        const Item& item = items[q];
        Problem<T>& problem = problems[item.problem];
        const Plan& plan = problem.plan;
        T* slot = problem.partial ? problem.partial + (item.group * plan.chunks + item.chunk) * plan.slot() : nullptr;
        if (slot) std::fill(slot, slot + plan.slot(), T(0));
        const Pass<T> p = problem.group(item.group);
        if (static_cast<int64_t>(scratch.size()) < scratch_size(plan)) scratch.resize(scratch_size(plan));
        if (poison) std::fill(scratch.begin(), scratch.end(), std::numeric_limits<T>::quiet_NaN());
        const int64_t r0 = item.chunk * plan.rows, r1 = std::min(plan.m, r0 + plan.rows);
        with_storage<T>(problem.storage, [&](auto tag) {
          using S = decltype(tag);
          Rows<S, T> w(static_cast<const S*>(problem.w), plan.m, plan.d);
          const int64_t block = rows_per_call<S, T>(r1 - r0, plan.d);
          for (int64_t b = r0; b < r1; b += block) {
            const int64_t n = std::min(block, r1 - b);
            body(tag, problem, p, w.at(item.group, b, n), item.group, b, n, slot, scratch.data());
          }
        });
      }
    }
  });
}

// The chunk partials of the reducing passes, kept from pass to pass (at most kPartialBudget bytes
// per compute type): freed after each pass, the allocator returned them to the system and every
// pass faulted them back in page by page, 6% of a whole model's backward over many problems. A
// pass that finds them in use (another thread's) takes a buffer of its own.
template <typename T>
struct PartialSums {
  std::mutex lock;
  Buffer<T> kept;
  static PartialSums& instance() {
    static PartialSums sums;
    return sums;
  }
};

// Runs body (as run_items) on every item of the active segments and returns, per active segment,
// the sum of its chunk partials in chunk order: `sums` shaped as `like`, (S, k_max, d_max), and
// `totals` (S, k_max), zero elsewhere. One parallel region per wave of consecutive problems whose
// partial sums fit in kPartialBudget together (one problem's always do), so that a pass over many
// problems needs no more workspace than a pass over one; the waves share one buffer (PartialSums).
template <typename T, typename Body>
std::tuple<Tensor, Tensor> reducing_pass(std::vector<Problem<T>>& problems, const Tensor& active, const Tensor& like,
                                         const Body& body) {
  Tensor sums = at::zeros(like.sizes(), like.options());
  Tensor totals = at::zeros({like.size(0), like.size(1)}, like.options());
  const bool* flags = active.data_ptr<bool>();
  T* s = sums.data_ptr<T>();
  T* m = totals.data_ptr<T>();
  const auto partial_size = [&](size_t q) { return problems[q].plan.groups * problems[q].plan.chunks * problems[q].plan.slot(); };
  PartialSums<T>& shared = PartialSums<T>::instance();
  std::unique_lock<std::mutex> held(shared.lock, std::try_to_lock);
  Buffer<T> own;
  Buffer<T>& partials = held.owns_lock() ? shared.kept : own;
  for (size_t begin = 0, end; begin < problems.size(); begin = end) {
    int64_t bytes = partial_size(begin) * static_cast<int64_t>(sizeof(T));
    for (end = begin + 1; end < problems.size(); ++end) {
      bytes += partial_size(end) * static_cast<int64_t>(sizeof(T));
      if (bytes > kPartialBudget) break;
    }
    int64_t wave = 0;
    for (size_t q = begin; q < end; ++q) wave += partial_size(q);
    if (static_cast<int64_t>(partials.size()) < wave) partials.resize(wave);  // each item zeroes its slot
    for (size_t q = begin, at = 0; q < end; at += partial_size(q), ++q) problems[q].partial = partials.data() + at;
    run_items(problems, work_items(problems, begin, end, active), body);
    for (size_t q = begin; q < end; ++q) {
      Problem<T>& problem = problems[q];
      const Plan& plan = problem.plan;
      const Segments at_sum(problem.first, sums), at_total(problem.first, totals);
      std::vector<T> sum(plan.slot());
      for (int64_t g = 0; g < plan.groups; ++g) {
        if (!flags[problem.first + g]) continue;
        reduce_chunks(plan, problem.partial, g, sum.data());
        for (int64_t j = 0; j < plan.k; ++j) {
          m[at_total.at(g, j)] = sum[plan.d * plan.kp + j];
          for (int64_t l = 0; l < plan.d; ++l) s[at_sum.at(g, j) + l] = sum[l * plan.kp + j];
        }
      }
      problem.partial = nullptr;
    }
  }
  // A single problem's partials may exceed the budget (one chunk per group, §2): not kept.
  if (static_cast<int64_t>(partials.size() * sizeof(T)) > kPartialBudget) Buffer<T>().swap(partials);
  return {sums, totals};
}

// The attention pass. Its masses are its own result, so the pass assumes every centroid certified
// (kernels.h, Relevance) and checks the masses it found, lower bounds of the true ones: the groups
// where a centroid is not certified pass again, listing every nonzero exponential of those
// centroids, and their results replace the first ones.
template <typename T>
std::tuple<Tensor, Tensor> attention_sums_pass(const PassInputs& in) {
  const Kernels<T>& K = kernels<T>();
  std::vector<Problem<T>> problems = make_problems<T>(in);
  const auto body = [&](auto tag, const Problem<T>& problem, const Pass<T>& p, const T* w, int64_t g, int64_t b,
                        int64_t n, T* slot, T* scratch) {
    using S = decltype(tag);
    const T* x = block_rows<S, T>(static_cast<const S*>(problem.x), problem.plan, g, b, n);
    K.accumulate(p, w, x, n, slot, slot + p.d * p.kp, scratch);
  };
  for (Problem<T>& problem : problems) assume_certified(problem);
  Tensor sums, masses;
  std::tie(sums, masses) = reducing_pass(problems, in.active, in.centroids, body);
  Tensor again = at::zeros_like(in.active);  // the groups with a light centroid
  for (Problem<T>& problem : problems)
    uncertify_light(problem, masses, in.active.data_ptr<bool>(), again.data_ptr<bool>());
  if (again.any().item<bool>()) {
    Tensor sums_again, masses_again;
    std::tie(sums_again, masses_again) = reducing_pass(problems, again, in.centroids, body);
    const Tensor redone = again.nonzero().squeeze(1);
    sums.index_copy_(0, redone, sums_again.index_select(0, redone));
    masses.index_copy_(0, redone, masses_again.index_select(0, redone));
  }
  return {sums, masses};
}

template <typename T>
std::vector<Tensor> output_pass(const PassInputs& in) {
  const Kernels<T>& K = kernels<T>();
  std::vector<Problem<T>> problems = make_problems<T>(in);
  std::vector<Tensor> outs;
  for (size_t q = 0; q < problems.size(); ++q) {
    outs.push_back(at::empty(in.weights[q].sizes(), in.weights[q].options()));
    problems[q].out = outs.back().data_ptr();
    problems[q].cLR = problems[q].padded(in.final_centroids);  // for the sparse rows
    assume_certified(problems[q]);
  }
  run_items(problems, work_items(problems, 0, problems.size(), Tensor()),
            [&](auto tag, const Problem<T>& problem, const Pass<T>& p, const T* w, int64_t g, int64_t b, int64_t n,
                T*, T* scratch) {
    using S = decltype(tag);
    S* dst = static_cast<S*>(problem.out) + (g * problem.plan.m + b) * p.d;
    if constexpr (std::is_same_v<S, T>) {
      K.output(p, w, n, dst, scratch);
    } else {
      thread_local std::vector<T> buf;
      buf.resize(conversion_rows<T>(p.d) * p.d);
      K.output(p, w, n, buf.data(), scratch);
      for (int64_t i = 0; i < n * p.d; ++i) dst[i] = static_cast<S>(buf[i]);
    }
  });
  return outs;
}

template <typename T>
Tensor gradient_pass(const PassInputs& in) {
  const Kernels<T>& K = kernels<T>();
  std::vector<Problem<T>> problems = make_problems<T>(in);
  const T* dot = in.grad_dot_next.data_ptr<T>();
  for (size_t q = 0; q < problems.size(); ++q) {
    Problem<T>& problem = problems[q];
    const Plan& plan = problem.plan;
    problem.dw = in.grad_weights[q].data_ptr<T>();
    problem.gmT = problem.transposed(in.grad_over_mass, T(0));
    problem.cR = problem.padded(in.centroids);
    problem.gmR = problem.padded(in.grad_over_mass);
    if (problem.x) problem.cLR = problem.padded(in.final_centroids);
    problem.gdc.assign(plan.groups * plan.kp, T(0));
    const Segments seg(problem.first, in.grad_dot_next);
    for (int64_t g = 0; g < plan.groups; ++g)
      std::copy(dot + seg.at(g), dot + seg.at(g) + plan.k, problem.gdc.data() + g * plan.kp);
    if (in.masses.defined()) {  // without them no centroid is certified
      assume_certified(problem);
      uncertify_light(problem, in.masses, nullptr, nullptr);
    }
  }
  // Only the sums: the recurrence needs no column totals of dS.
  return std::get<0>(reducing_pass(problems, in.active, in.centroids,
                                   [&](auto tag, const Problem<T>& problem, const Pass<T>& p, const T* w, int64_t g,
                                       int64_t b, int64_t n, T* slot, T* scratch) {
    using S = decltype(tag);
    const T* gb = problem.x ? block_rows<S, T>(static_cast<const S*>(problem.x), problem.plan, g, b, n) : nullptr;
    K.grad_step(p, w, gb, n, problem.dw + (g * problem.plan.m + b) * p.d, slot, scratch);
  }));
}

// ------------------------------------------------------------------------------ the ops --
// Each op checks its own inputs (users and torch.compile may call it directly): shapes against
// each other, dtypes, devices. Inputs are made contiguous; the one output written in place,
// grad_weights, must be.

void check_cpu(const Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "the cpu backend takes CPU tensors, got ", name, " on ", t.device());
}

void check_tau(double tau, const std::string& name) {
  TORCH_CHECK_VALUE(tau > 0 && std::isfinite(tau), name, " must be finite and > 0, got ", tau);
}

// weights (G, M, d) of a supported dtype; returns the compute type.
at::ScalarType check_weights(const Tensor& weights, const std::string& name) {
  check_cpu(weights, name);
  TORCH_CHECK_VALUE(weights.dim() == 3 && weights.size(2) >= 1, name, " must have shape (G, M, d) with d >= 1, got ",
                    weights.sizes());
  switch (weights.scalar_type()) {
    case at::kFloat: case at::kHalf: case at::kBFloat16: return at::kFloat;
    case at::kDouble: return at::kDouble;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16, float32 or float64, got ", weights.scalar_type());
  }
}

void check_compute(const Tensor& t, const std::string& name, at::ScalarType compute, const Tensor& weights) {
  TORCH_CHECK_TYPE(t.scalar_type() == compute, name, " must be ", compute, " (the compute type of ",
                   weights.scalar_type(), " weights), got ", t.scalar_type());
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
  check_compute(t, name, compute, weights);
  if (k < 0) k = t.size(1);
  return t.contiguous();
}

Tensor checked_rows(const Tensor& t, const std::string& name, const Tensor& weights, const std::string& weights_name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.sizes() == weights.sizes(), name, " has shape ", t.sizes(), " but ", weights_name, " has ",
                    weights.sizes());
  return t.to(weights.scalar_type()).contiguous();
}

Tensor checked_active(const Tensor& active, int64_t segments, const char* what) {
  check_cpu(active, "active");
  TORCH_CHECK_VALUE(active.dim() == 1 && active.size(0) == segments, "active must have shape (", what, ",) = (",
                    segments, ",), got ", active.sizes());
  return active.to(at::kBool).contiguous();
}

void check_grad_weights(const Tensor& grad_weights, const std::string& name, const Tensor& weights,
                        at::ScalarType compute) {
  check_cpu(grad_weights, name);
  TORCH_CHECK_VALUE(grad_weights.sizes() == weights.sizes() && grad_weights.is_contiguous(), name,
                    " must be a contiguous tensor of the weights' shape ", weights.sizes(), ", got ",
                    grad_weights.sizes());
  TORCH_CHECK_TYPE(grad_weights.scalar_type() == compute, name, " must be ", compute, ", got ",
                   grad_weights.scalar_type());
}

// What every one-problem op checks first: tau and the weights (then made contiguous), the compute
// type they imply, and k, taken from the first per-centroid input checked.
struct OpInputs {
  at::ScalarType compute;
  PassInputs pass;
  int64_t k = -1;
  OpInputs(const Tensor& weights, double tau) : compute(check_weights(weights, "weights")) {
    check_tau(tau, "tau");
    pass.weights = {weights.contiguous()};
    pass.taus = {tau};
  }
  const Tensor& weights() const { return pass.weights[0]; }
  Tensor per_centroid(const Tensor& t, const char* name, bool with_d = true) {
    Tensor checked = checked_per_centroid(t, name, weights(), k, compute, with_d);
    pass.ks = {k};
    return checked;
  }
  void rows(const Tensor& t, const char* name) { pass.rows = {checked_rows(t, name, weights(), "weights")}; }
  void active(const Tensor& t) { pass.active = checked_active(t, weights().size(0), "G"); }
};

// What every ragged op checks first: one entry per problem in each list; every problem's weights
// (then made contiguous) of one compute type, k >= 1 and tau; and the per-segment tensors, (S,
// k_max, d_max) or (S, k_max) with S the problems' groups summed, k_max and d_max at least every
// problem's k and d.
struct RaggedInputs {
  at::ScalarType compute = at::kFloat;
  PassInputs pass;
  int64_t segments = 0, k_max = 1, d_max = 1;
  RaggedInputs(at::TensorList weights, at::IntArrayRef ks, at::ArrayRef<double> taus) {
    TORCH_CHECK_VALUE(!weights.empty() && ks.size() == weights.size() && taus.size() == weights.size(),
                      "weights, ks and taus must be non-empty lists of one length (one entry per problem), got ",
                      weights.size(), ", ", ks.size(), " and ", taus.size());
    for (size_t q = 0; q < weights.size(); ++q) {
      const std::string name = "weights[" + std::to_string(q) + "]";
      const at::ScalarType type = check_weights(weights[q], name);
      TORCH_CHECK_TYPE(q == 0 || type == compute, name, " is ", weights[q].scalar_type(), " but weights[0] is ",
                       weights[0].scalar_type(), ": one call takes problems of one compute type");
      compute = type;
      TORCH_CHECK_VALUE(ks[q] >= 1, "ks[", q, "] must be >= 1, got ", ks[q]);
      check_tau(taus[q], "taus[" + std::to_string(q) + "]");
      pass.weights.push_back(weights[q].contiguous());
      segments += weights[q].size(0);
      k_max = std::max(k_max, ks[q]);
      d_max = std::max(d_max, weights[q].size(2));
    }
    pass.ks = ks.vec();
    pass.taus = taus.vec();
  }
  Tensor packed(const Tensor& t, const char* name, bool with_d = true) {
    check_cpu(t, name);
    const bool ok = t.dim() == (with_d ? 3 : 2) && t.size(0) == segments && t.size(1) >= k_max &&
                    (!with_d || t.size(2) >= d_max);
    TORCH_CHECK_VALUE(ok, name, " must have shape ", with_d ? "(S, k_max, d_max)" : "(S, k_max)", " with S = ",
                      segments, " (the weights' groups summed), k_max >= ", k_max,
                      with_d ? ", d_max >= " + std::to_string(d_max) : std::string(), ", got ", t.sizes());
    check_compute(t, name, compute, pass.weights[0]);
    return t.contiguous();
  }
  // Every problem's (G, M, d) rows of a second input, as its weights; none if the list is empty.
  std::vector<Tensor> rows(at::TensorList list, const char* name, bool optional = false) {
    if (optional && list.empty()) return {};
    TORCH_CHECK_VALUE(list.size() == pass.weights.size(), name, " must have one entry per problem (",
                      pass.weights.size(), ")", optional ? " or none" : "", ", got ", list.size());
    std::vector<Tensor> checked;
    for (size_t q = 0; q < list.size(); ++q)
      checked.push_back(checked_rows(list[q], std::string(name) + "[" + std::to_string(q) + "]", pass.weights[q],
                                     "weights[" + std::to_string(q) + "]"));
    return checked;
  }
  void active(const Tensor& t) { pass.active = checked_active(t, segments, "S"); }
};

#define DKM_DISPATCH(compute, NAME, ...) \
  return (compute) == at::kDouble ? NAME<double>(__VA_ARGS__) : NAME<float>(__VA_ARGS__)

std::tuple<Tensor, Tensor> cpu_attention_sums(const Tensor& weights, const Tensor& values, const Tensor& centroids,
                                              const Tensor& active, double tau) {
  OpInputs in(weights, tau);
  in.rows(values, "values");
  in.pass.centroids = in.per_centroid(centroids, "centroids");
  in.active(active);
  DKM_DISPATCH(in.compute, attention_sums_pass, in.pass);
}

Tensor cpu_output(const Tensor& weights, const Tensor& attention_centroids, const Tensor& final_centroids,
                  double tau) {
  OpInputs in(weights, tau);
  in.pass.centroids = in.per_centroid(attention_centroids, "attention_centroids");
  in.pass.final_centroids = in.per_centroid(final_centroids, "final_centroids");
  return (in.compute == at::kDouble ? output_pass<double>(in.pass) : output_pass<float>(in.pass))[0];
}

Tensor cpu_gradient_pass(const Tensor& weights, const std::optional<Tensor>& grad_out, const Tensor& centroids,
                         const Tensor& grad_over_mass, const Tensor& grad_dot_next, const Tensor& final_centroids,
                         const Tensor& active, Tensor& grad_weights, double tau, const std::optional<Tensor>& mass) {
  OpInputs in(weights, tau);
  if (grad_out) in.rows(*grad_out, "grad_out");
  in.pass.centroids = in.per_centroid(centroids, "centroids");
  in.pass.grad_over_mass = in.per_centroid(grad_over_mass, "grad_over_mass");
  in.pass.grad_dot_next = in.per_centroid(grad_dot_next, "grad_dot_next", false);
  in.pass.final_centroids = in.per_centroid(final_centroids, "final_centroids");
  if (mass) in.pass.masses = in.per_centroid(*mass, "mass", false);
  in.active(active);
  check_grad_weights(grad_weights, "grad_weights", in.weights(), in.compute);
  in.pass.grad_weights = {grad_weights};
  DKM_DISPATCH(in.compute, gradient_pass, in.pass);
}

// The ragged ops: the same passes over many problems, their per-segment state packed as
// many.Layout packs it (docs/design.md §12), in one parallel region per pass.

std::tuple<Tensor, Tensor> cpu_ragged_attention_sums(at::TensorList weights, at::TensorList values,
                                                     const Tensor& centroids, const Tensor& active, at::IntArrayRef ks,
                                                     at::ArrayRef<double> taus) {
  RaggedInputs in(weights, ks, taus);
  in.pass.rows = in.rows(values, "values");
  in.pass.centroids = in.packed(centroids, "centroids");
  in.active(active);
  DKM_DISPATCH(in.compute, attention_sums_pass, in.pass);
}

std::vector<Tensor> cpu_ragged_output(at::TensorList weights, const Tensor& attention_centroids,
                                      const Tensor& final_centroids, at::IntArrayRef ks, at::ArrayRef<double> taus) {
  RaggedInputs in(weights, ks, taus);
  in.pass.centroids = in.packed(attention_centroids, "attention_centroids");
  in.pass.final_centroids = in.packed(final_centroids, "final_centroids");
  DKM_DISPATCH(in.compute, output_pass, in.pass);
}

Tensor cpu_ragged_gradient_pass(at::TensorList weights, at::TensorList grad_out, const Tensor& centroids,
                                const Tensor& grad_over_mass, const Tensor& grad_dot_next,
                                const Tensor& final_centroids, const Tensor& active, at::TensorList grad_weights,
                                at::IntArrayRef ks, at::ArrayRef<double> taus, const std::optional<Tensor>& mass) {
  RaggedInputs in(weights, ks, taus);
  in.pass.rows = in.rows(grad_out, "grad_out", true);
  in.pass.centroids = in.packed(centroids, "centroids");
  in.pass.grad_over_mass = in.packed(grad_over_mass, "grad_over_mass");
  in.pass.grad_dot_next = in.packed(grad_dot_next, "grad_dot_next", false);
  in.pass.final_centroids = in.packed(final_centroids, "final_centroids");
  if (mass) in.pass.masses = in.packed(*mass, "mass", false);
  in.active(active);
  TORCH_CHECK_VALUE(grad_weights.size() == weights.size(), "grad_weights must have one entry per problem (",
                    weights.size(), "), got ", grad_weights.size());
  for (size_t q = 0; q < grad_weights.size(); ++q)
    check_grad_weights(grad_weights[q], "grad_weights[" + std::to_string(q) + "]", in.pass.weights[q], in.compute);
  in.pass.grad_weights = grad_weights.vec();
  DKM_DISPATCH(in.compute, gradient_pass, in.pass);
}

#undef DKM_DISPATCH

}  // namespace
const char* selected_isa() { return kernel_set().name; }

}  // namespace dkm

TORCH_LIBRARY_FRAGMENT(DKM_KERNELS_OPS, m) {
  m.def("cpu_attention_sums(Tensor weights, Tensor values, Tensor centroids, Tensor active, float tau)"
        " -> (Tensor, Tensor)");
  m.def("cpu_output(Tensor weights, Tensor attention_centroids, Tensor final_centroids, float tau) -> Tensor");
  m.def(
      "cpu_gradient_pass(Tensor weights, Tensor? grad_out, Tensor centroids, Tensor grad_over_mass,"
      " Tensor grad_dot_next, Tensor final_centroids, Tensor active, Tensor(a!) grad_weights, float tau,"
      " Tensor? mass=None) -> Tensor");
  // The same passes over many problems (docs/design.md §12), their per-segment state packed as
  // dkm_kernels.many.Layout packs it; grad_out is empty except on the backward's first step.
  m.def(
      "cpu_ragged_attention_sums(Tensor[] weights, Tensor[] values, Tensor centroids, Tensor active, int[] ks,"
      " float[] taus) -> (Tensor, Tensor)");
  m.def(
      "cpu_ragged_output(Tensor[] weights, Tensor attention_centroids, Tensor final_centroids, int[] ks,"
      " float[] taus) -> Tensor[]");
  m.def(
      "cpu_ragged_gradient_pass(Tensor[] weights, Tensor[] grad_out, Tensor centroids, Tensor grad_over_mass,"
      " Tensor grad_dot_next, Tensor final_centroids, Tensor active, Tensor(a!)[] grad_weights, int[] ks,"
      " float[] taus, Tensor? mass=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(DKM_KERNELS_OPS, CPU, m) {
  m.impl("cpu_attention_sums", &dkm::cpu_attention_sums);
  m.impl("cpu_output", &dkm::cpu_output);
  m.impl("cpu_gradient_pass", &dkm::cpu_gradient_pass);
  m.impl("cpu_ragged_attention_sums", &dkm::cpu_ragged_attention_sums);
  m.impl("cpu_ragged_output", &dkm::cpu_ragged_output);
  m.impl("cpu_ragged_gradient_pass", &dkm::cpu_ragged_gradient_pass);
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
