// k-means++ seeding as one op, dkm_kernels::cpu_kmeans_plus_plus (dkm_kernels/init.py calls it):
// every draw of every group in one call, the random numbers given by the caller.
//
// Per group, the rows are copied once into the kernel's blocked layout (kmeans.h) and split into
// chunks fixed by M alone. Each draw after the first is one pass over the rows with the newest
// centroid (kmeans_impl.h), which updates each row's squared distance to its nearest centroid D_i
// and returns each chunk's sum of n_i D_i in double; the next row is then drawn by inverse CDF:
// u * total located among the chunk sums, then among the rows of that chunk. A chunk's sum is
// computed by one kernel call in a fixed order, so the draws are bit-identical for any number of
// threads. Memory: the blocked copy of the rows, D and the counts, one value per row each.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "kernels.h"
#include "kmeans.h"

namespace dkm {
namespace {

using at::Tensor;

constexpr int64_t kMaxChunks = 256;      // enough chunks to balance many threads
constexpr int64_t kMinChunkRows = 2048;  // a chunk's pass is worth a thread's wake-up, and the
                                         // serial walk inside a chunk stays a small part of a draw
constexpr int64_t kMinParallelWork = 1 << 16;  // (row, coordinate) steps per pass below which
                                               // a group's passes run on one thread

const KmeansSet& kmeans_set() {
  const char* name = selected_isa();
  for (const KmeansSet* set : {kmeans_avx512(), kmeans_avx2(), kmeans_generic()})
    if (set != nullptr && std::strcmp(set->name, name) == 0) return *set;
  return *kmeans_generic();
}

template <typename T>
const KmeansKernels<T>& kmeans_kernels();
template <>
const KmeansKernels<float>& kmeans_kernels<float>() { return kmeans_set().f32; }
template <>
const KmeansKernels<double>& kmeans_kernels<double>() { return kmeans_set().f64; }

// Runs fn(i) for i in [0, n): on the calling thread, or on torch's threads taking items from a
// shared counter (a thread the OS descheduled does not hold the others up). Only the scheduling
// depends on the thread count.
template <typename F>
void for_each(int64_t n, bool parallel, const F& fn) {
  const int64_t workers = parallel ? std::min<int64_t>(at::get_num_threads(), n) : 1;
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// One group's rows in the kernel's layout, their running nearest distances, and the chunking.
// The per-row buffers are left uninitialised and filled chunk by chunk, padding included, so that
// their first touch (the page faults of tens of MiB) is split over the threads too.
template <typename T>
struct Group {
  int64_t m, d, chunk_rows, chunks;
  std::unique_ptr<T[]> rows;     // (blocks, d, kKmeansBlock); padding rows are zero
  std::unique_ptr<T[]> counts;   // one per row, 0 for padding; null without counts
  std::unique_ptr<T[]> nearest;  // D_i; 0 for padding, so that padding never weighs anything
  std::vector<double> sums;        // per chunk: sum of n_i D_i
  std::vector<double> count_sums;  // per chunk: sum of n_i (with counts)

  // Copies the rows chunk by chunk (in parallel when `parallel`), checking that they are finite.
  Group(const T* w, const T* n, int64_t m, int64_t d, bool parallel) : m(m), d(d) {
    const int64_t wanted = std::max(kMinChunkRows, (m + kMaxChunks - 1) / kMaxChunks);
    chunk_rows = (wanted + kKmeansBlock - 1) / kKmeansBlock * kKmeansBlock;
    chunks = (m + chunk_rows - 1) / chunk_rows;
    const int64_t padded = (m + kKmeansBlock - 1) / kKmeansBlock * kKmeansBlock;
    rows.reset(new T[padded * d]);
    nearest.reset(new T[padded]);
    sums.assign(chunks, 0.0);
    if (n != nullptr) {
      counts.reset(new T[padded]);
      count_sums.assign(chunks, 0.0);
    }
    std::vector<char> finite(chunks, 1);
    for_each(chunks, parallel, [&](int64_t ch) {
      bool ok = true;
      const int64_t end = std::min(padded, (ch + 1) * chunk_rows);
      for (int64_t b = ch * chunk_rows; b < end; b += kKmeansBlock) {
        T* block = rows.get() + b * d;
        for (int64_t r = 0; r < kKmeansBlock; ++r) {
          const int64_t i = b + r;
          const bool real = i < m;
          for (int64_t l = 0; l < d; ++l) {
            const T x = real ? w[i * d + l] : T(0);
            block[l * kKmeansBlock + r] = x;
            ok &= x - x == 0;  // false for NaN and Inf
          }
          nearest[i] = real ? std::numeric_limits<T>::infinity() : T(0);
          if (n != nullptr) {
            counts[i] = real ? n[i] : T(0);
            count_sums[ch] += counts[i];
          }
        }
      }
      finite[ch] = ok;
    });
    TORCH_CHECK_VALUE(std::all_of(finite.begin(), finite.end(), [](char ok) { return ok; }),
                      "weights must be finite (no NaN or Inf)");
  }

  double count(int64_t i) const { return counts ? static_cast<double>(counts[i]) : 1.0; }

  // D_i = min(D_i, |w_i - c|^2) for the centroid `row`, and the chunk sums.
  void pass(const KmeansKernels<T>& K, int64_t row, bool parallel) {
    std::vector<T> c(d);
    const T* block = rows.get() + (row / kKmeansBlock) * d * kKmeansBlock + row % kKmeansBlock;
    for (int64_t l = 0; l < d; ++l) c[l] = block[l * kKmeansBlock];
    const T* n = counts.get();
    for_each(chunks, parallel, [&](int64_t ch) {
      const int64_t first = ch * chunk_rows;
      const int64_t blocks = (std::min(m, first + chunk_rows) - first + kKmeansBlock - 1) / kKmeansBlock;
      sums[ch] = K.nearest(rows.get() + first * d, n ? n + first : nullptr, nearest.get() + first, blocks, d,
                           c.data());
    });
  }

  // The first row i with sum_{r <= i} weight(r) > target, the chunk sums `per_chunk` of `weight`
  // locating its chunk first. Rows of weight 0 are never drawn: when rounding leaves the target
  // past the last chunk or row, the last row of positive weight is drawn. Callers make sure some
  // weight is positive.
  template <typename W>
  int64_t inverse_cdf(const std::vector<double>& per_chunk, double target, const W& weight) const {
    int64_t ch = 0, last = -1;
    double before = 0;
    for (; ch < chunks; ++ch) {
      if (!(per_chunk[ch] > 0)) continue;
      last = ch;
      if (before + per_chunk[ch] > target) break;
      before += per_chunk[ch];
    }
    const bool past = ch == chunks;
    if (past) ch = last;
    const double rest = past ? std::numeric_limits<double>::infinity() : target - before;
    double seen = 0;
    int64_t found = -1;
    for (int64_t i = ch * chunk_rows; i < std::min(m, (ch + 1) * chunk_rows); ++i) {
      const double x = weight(i);
      if (x > 0) {
        found = i;
        seen += x;
        if (seen > rest) break;
      }
    }
    return found;
  }

  // A row drawn with probability proportional to its count (uniformly without counts).
  int64_t by_count(double u) const {
    if (!counts) return std::min(m - 1, static_cast<int64_t>(u * static_cast<double>(m)));
    double total = 0;
    for (double s : count_sums) total += s;
    return inverse_cdf(count_sums, u * total, [&](int64_t i) { return count(i); });
  }
};

// The k draws of one group: indices[j] for uniforms u[j].
template <typename T>
void draw_group(const T* w, const T* n, int64_t m, int64_t d, const double* u, int64_t k, int64_t* indices,
                bool parallel) {
  const KmeansKernels<T>& K = kmeans_kernels<T>();
  Group<T> g(w, n, m, d, parallel);
  indices[0] = g.by_count(u[0]);
  for (int64_t j = 1; j < k; ++j) {
    g.pass(K, indices[j - 1], parallel);
    double total = 0;
    for (double s : g.sums) total += s;
    TORCH_CHECK_VALUE(std::isfinite(total), "k-means++: the squared distances between weight rows overflow ",
                      sizeof(T) == 4 ? "float32" : "float64", " (weights too large); scale the weights first");
    // When every row already sits on a centroid, any row will do: drawn by count.
    indices[j] = total > 0 ? g.inverse_cdf(g.sums, u[j] * total,
                                           [&](int64_t i) { return static_cast<double>(g.nearest[i]) * g.count(i); })
                           : g.by_count(u[j]);
  }
}

template <typename T>
void draw_all(const Tensor& weights, const Tensor& counts, const Tensor& uniforms, Tensor& indices) {
  const int64_t groups = weights.size(0), m = weights.size(1), d = weights.size(2), k = uniforms.size(1);
  const T* w = weights.data_ptr<T>();
  const T* n = counts.defined() ? counts.data_ptr<T>() : nullptr;
  const double* u = uniforms.data_ptr<double>();
  int64_t* out = indices.data_ptr<int64_t>();
  // Many groups or small ones: a thread per group, each group's passes on that thread; else one
  // group at a time, each pass split over the threads. The draws are the same either way.
  const bool by_group = groups >= 2 * at::get_num_threads() || m * d < kMinParallelWork;
  for_each(groups, by_group, [&](int64_t g) {
    draw_group<T>(w + g * m * d, n ? n + g * m : nullptr, m, d, u + g * k, k, out + g * k, !by_group);
  });
}

// ------------------------------------------------------------------------------ the op --

Tensor cpu_kmeans_plus_plus(const Tensor& weights_in, const std::optional<Tensor>& counts_in,
                            const Tensor& uniforms_in) {
  TORCH_CHECK_VALUE(weights_in.device().is_cpu(), "cpu_kmeans_plus_plus takes CPU tensors, got weights on ",
                    weights_in.device());
  TORCH_CHECK_VALUE(weights_in.dim() == 3 && weights_in.size(1) >= 1 && weights_in.size(2) >= 1,
                    "weights must have shape (G, M, d) with M >= 1 and d >= 1, got ", weights_in.sizes());
  const at::ScalarType dtype = weights_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "weights must be float32 or float64 (the compute type), got ", dtype);
  const Tensor weights = weights_in.contiguous();
  const int64_t groups = weights.size(0), m = weights.size(1);

  TORCH_CHECK_VALUE(uniforms_in.device().is_cpu(), "uniforms must be a CPU tensor, got ", uniforms_in.device());
  TORCH_CHECK_VALUE(uniforms_in.dim() == 2 && uniforms_in.size(0) == groups && uniforms_in.size(1) >= 1,
                    "uniforms must have shape (G, k) with G = ", groups, " and k >= 1 (one per centroid), got ",
                    uniforms_in.sizes());
  TORCH_CHECK_TYPE(uniforms_in.scalar_type() == at::kDouble, "uniforms must be float64, got ",
                   uniforms_in.scalar_type());
  const Tensor uniforms = uniforms_in.contiguous();
  TORCH_CHECK_VALUE(uniforms.numel() == 0 || (uniforms.min().item<double>() >= 0 && uniforms.max().item<double>() < 1),
                    "uniforms must lie in [0, 1) (torch.rand)");

  Tensor counts;
  if (counts_in) {
    TORCH_CHECK_VALUE(counts_in->device().is_cpu(), "counts must be a CPU tensor, got ", counts_in->device());
    TORCH_CHECK_VALUE(counts_in->dim() == 2 && counts_in->size(0) == groups && counts_in->size(1) == m,
                      "counts must have shape (G, M) = (", groups, ", ", m, "), one per weight row, got ",
                      counts_in->sizes());
    TORCH_CHECK_TYPE(counts_in->scalar_type() != at::kBool && !counts_in->is_complex(),
                     "counts must be a real tensor, got ", counts_in->scalar_type());
    counts = counts_in->to(dtype).contiguous();
    TORCH_CHECK_VALUE(at::isfinite(counts).all().item<bool>() && (counts >= 0).all().item<bool>(),
                      "counts must be finite and >= 0");
    TORCH_CHECK_VALUE((counts > 0).any(1).all().item<bool>(), "counts must have a positive entry in every group");
  }

  Tensor indices = at::empty(uniforms.sizes(), weights.options().dtype(at::kLong));
  if (dtype == at::kFloat) {
    draw_all<float>(weights, counts, uniforms, indices);
  } else {
    draw_all<double>(weights, counts, uniforms, indices);
  }
  return indices;
}

}  // namespace
}  // namespace dkm

TORCH_LIBRARY_FRAGMENT(DKM_KERNELS_OPS, m) {
  m.def("cpu_kmeans_plus_plus(Tensor weights, Tensor? counts, Tensor uniforms) -> Tensor");
}

TORCH_LIBRARY_IMPL(DKM_KERNELS_OPS, CPU, m) { m.impl("cpu_kmeans_plus_plus", &dkm::cpu_kmeans_plus_plus); }
