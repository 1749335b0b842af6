// The k-means++ pass (kmeans.h), written once with GCC/Clang vector extensions and compiled once per
// instruction set by kernels_*.cpp, right after kernel_impl.h and under the same DKM_ISA_NS,
// DKM_VBYTES, DKM_ISA_NAME and target flags. No include guard: each inclusion is another
// instruction set. Its helpers live in their own namespace, `kmeans`, beside kernel_impl.h's.
// Include nothing here but kmeans.h (see kernel_impl.h).
//
// The pass streams the rows once against one centroid: per vector of rows, d subtract-and-FMA
// steps, a min with the row's running nearest distance, and the weighted sum in double (float
// distances are widened first, so a product count * distance is exact and the sum over millions of
// rows keeps its precision).

#include "kmeans.h"

namespace dkm {
namespace DKM_ISA_NS {
namespace kmeans {
namespace {

template <typename T>
struct Lanes {
  typedef T type __attribute__((vector_size(DKM_VBYTES)));
  typedef T half __attribute__((vector_size(DKM_VBYTES / 2)));
  static constexpr int count = DKM_VBYTES / static_cast<int>(sizeof(T));
};

template <typename T>
using vec = typename Lanes<T>::type;
using vdouble = vec<double>;

template <typename T>
inline vec<T> load(const T* p) {
  vec<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, vec<T> v) {
  __builtin_memcpy(p, &v, sizeof v);
}

// The low and high halves of a float vector (one instruction each, or none).
inline void halves(vec<float> x, typename Lanes<float>::half& lo, typename Lanes<float>::half& hi) {
#if DKM_VBYTES == 16
  lo = __builtin_shufflevector(x, x, 0, 1);
  hi = __builtin_shufflevector(x, x, 2, 3);
#elif DKM_VBYTES == 32
  lo = __builtin_shufflevector(x, x, 0, 1, 2, 3);
  hi = __builtin_shufflevector(x, x, 4, 5, 6, 7);
#else
  lo = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  hi = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
}

// total += x (times n), in double: one vector for double, two (low and high lanes) for float.
inline void add_wide(vdouble* total, vec<double> x) { total[0] += x; }

inline void add_wide(vdouble* total, vec<float> x) {
  typename Lanes<float>::half lo, hi;
  halves(x, lo, hi);
  total[0] += __builtin_convertvector(lo, vdouble);
  total[1] += __builtin_convertvector(hi, vdouble);
}

inline void add_wide_product(vdouble* total, vec<double> x, vec<double> n) { total[0] += x * n; }

inline void add_wide_product(vdouble* total, vec<float> x, vec<float> n) {
  typename Lanes<float>::half xl, xh, nl, nh;
  halves(x, xl, xh);
  halves(n, nl, nh);
  total[0] += __builtin_convertvector(xl, vdouble) * __builtin_convertvector(nl, vdouble);
  total[1] += __builtin_convertvector(xh, vdouble) * __builtin_convertvector(nh, vdouble);
}

// Whether any lane of a comparison's result (0 or all ones per lane) is set: one vptest on AVX2 and
// AVX-512 (two halves ORed first), two 64-bit words elsewhere.
template <typename M>
inline bool any_set(M mask) {
  typedef long long words __attribute__((vector_size(DKM_VBYTES)));
  const words x = (words)mask;
#if DKM_VBYTES == 16
  return (x[0] | x[1]) != 0;
#else
  typedef long long quad __attribute__((vector_size(32)));
  quad q;
#if DKM_VBYTES == 32
  q = x;
#else
  q = __builtin_shufflevector(x, x, 0, 1, 2, 3) | __builtin_shufflevector(x, x, 4, 5, 6, 7);
#endif
  return !__builtin_ia32_ptestz256(q, q);
#endif
}

// D is d when known at compile time, else 0. A block's distances are written back only when one
// of them shrank: a block of float distances is one cache line, and at large k most lines keep
// every value, so most of the pass only reads.
template <typename T, int D, bool Counted>
double nearest_impl(const T* w, const T* counts, T* nearest, int64_t blocks, int64_t d_runtime, const T* c) {
  constexpr int N = Lanes<T>::count;
  constexpr int V = kKmeansBlock / N;
  constexpr int64_t B = kKmeansBlock;
  const int64_t d = D ? D : d_runtime;
  vdouble total[2] = {vdouble{}, vdouble{}};
  for (int64_t b = 0; b < blocks; ++b) {
    const T* wb = w + b * d * B;
    T* nb = nearest + b * B;
    vec<T> now[V];
    decltype(now[0] < now[0]) shrank{};
    for (int v = 0; v < V; ++v) {
      vec<T> dist{};
      for (int64_t l = 0; l < d; ++l) {
        const vec<T> diff = load(wb + l * B + v * N) - c[l];
        dist += diff * diff;
      }
      const vec<T> old = load(nb + v * N);
      const auto closer = dist < old;
      now[v] = closer ? dist : old;
      shrank |= closer;
    }
    if (any_set(shrank))
      for (int v = 0; v < V; ++v) store(nb + v * N, now[v]);
    for (int v = 0; v < V; ++v) {
      if constexpr (Counted) {
        add_wide_product(total, now[v], load(counts + b * B + v * N));
      } else {
        add_wide(total, now[v]);
      }
    }
  }
  const vdouble sum = total[0] + total[1];
  double s = 0;
  for (int i = 0; i < Lanes<double>::count; ++i) s += sum[i];
  return s;
}

template <typename T, bool Counted>
double nearest_by_d(const T* w, const T* counts, T* nearest, int64_t blocks, int64_t d, const T* c) {
  switch (d) {
    case 1: return nearest_impl<T, 1, Counted>(w, counts, nearest, blocks, d, c);
    case 2: return nearest_impl<T, 2, Counted>(w, counts, nearest, blocks, d, c);
    case 4: return nearest_impl<T, 4, Counted>(w, counts, nearest, blocks, d, c);
    case 8: return nearest_impl<T, 8, Counted>(w, counts, nearest, blocks, d, c);
    default: return nearest_impl<T, 0, Counted>(w, counts, nearest, blocks, d, c);
  }
}

template <typename T>
double nearest_entry(const T* w, const T* counts, T* nearest, int64_t blocks, int64_t d, const T* c) {
  return counts ? nearest_by_d<T, true>(w, counts, nearest, blocks, d, c)
                : nearest_by_d<T, false>(w, counts, nearest, blocks, d, c);
}

}  // namespace
}  // namespace kmeans

const KmeansSet kmeans_table = {DKM_ISA_NAME, {&kmeans::nearest_entry<float>},
                                {&kmeans::nearest_entry<double>}};

}  // namespace DKM_ISA_NS
}  // namespace dkm
