// The DKM kernels, written once with GCC/Clang vector extensions and compiled once per instruction
// set by kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp, which define
//   DKM_ISA_NS   the namespace of this copy (so copies never share a symbol),
//   DKM_VBYTES   the vector width in bytes,
//   DKM_ISA_NAME the instruction set's name, reported by dkm_kernels._C.isa().
// Include nothing here but kernels.h: a library inline function compiled with AVX-512 enabled
// could be the copy the linker keeps for everyone.
//
// Layout: kernels vectorise over centroids (j). A row's squared distances, exponentials and
// derivatives live in scratch rows of kp values (1 KiB for k = 256 in float), which stay in L1;
// nothing of size rows x k is ever allocated. Distances (and the forward accumulation) take 4 rows
// at a time, so that each centroid vector loaded serves 4 rows.

#include "kernels.h"

// The helpers of the lane kernels must melt into their callers (a call per block of rows, with
// the block's vectors passed through memory, costs a third of a pass at d = 1): inlining is forced
// where the compiler's size heuristics could decline.
#define DKM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace dkm {
namespace DKM_ISA_NS {
namespace {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(DKM_VBYTES)));
  typedef int32_t itype __attribute__((vector_size(DKM_VBYTES)));
  static constexpr int lanes = DKM_VBYTES / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(DKM_VBYTES)));
  typedef int64_t itype __attribute__((vector_size(DKM_VBYTES)));
  static constexpr int lanes = DKM_VBYTES / 8;
};

template <typename T>
using vec = typename Vec<T>::type;

template <typename T>
inline vec<T> load(const T* p) {
  vec<T> v;
  __builtin_memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

template <typename T>
inline void store(T* p, vec<T> v) {
  __builtin_memcpy(p, &v, sizeof v);
}

template <typename T>
inline vec<T> splat(T x) {
  return vec<T>{} + x;
}

template <typename T, int Bytes>
struct Part {
  typedef T type __attribute__((vector_size(Bytes)));
};

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define DKM_HAS_SHUFFLE 1
#endif
#endif

// The first and the second half of a vector of Bytes. By shuffles where the compiler has them: a
// copy through memory takes the vector's address, and GCC then keeps a loop's accumulator that
// ends in a horizontal sum on the stack, a store and a load per step of its loop.
template <typename T, int Bytes>
inline void halves(typename Part<T, Bytes>::type v, typename Part<T, Bytes / 2>::type& lo,
                   typename Part<T, Bytes / 2>::type& hi) {
#ifdef DKM_HAS_SHUFFLE
  constexpr int n = Bytes / static_cast<int>(sizeof(T));
  static_assert(n == 2 || n == 4 || n == 8 || n == 16, "halves: 2 to 16 lanes");
  if constexpr (n == 16) {
    lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  } else if constexpr (n == 8) {
    lo = __builtin_shufflevector(v, v, 0, 1, 2, 3);
    hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  } else if constexpr (n == 4) {
    lo = __builtin_shufflevector(v, v, 0, 1);
    hi = __builtin_shufflevector(v, v, 2, 3);
  } else {
    lo = __builtin_shufflevector(v, v, 0);
    hi = __builtin_shufflevector(v, v, 1);
  }
#else
  __builtin_memcpy(&lo, &v, Bytes / 2);
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
#endif
}

// Horizontal sum and minimum by halving (log2 of the lanes vector steps, not a lane-by-lane
// chain): a row ends with a dozen of these, so their cost is not negligible next to k = 256.
template <typename T, int Bytes>
inline T tree_sum(typename Part<T, Bytes>::type v) {
  if constexpr (Bytes <= 16) {
    T s = v[0];
    for (int i = 1; i < Bytes / static_cast<int>(sizeof(T)); ++i) s += v[i];
    return s;
  } else {
    typename Part<T, Bytes / 2>::type lo, hi;
    halves<T, Bytes>(v, lo, hi);
    return tree_sum<T, Bytes / 2>(lo + hi);
  }
}

template <typename T, int Bytes>
inline T tree_min(typename Part<T, Bytes>::type v) {
  if constexpr (Bytes <= 16) {
    T s = v[0];
    for (int i = 1; i < Bytes / static_cast<int>(sizeof(T)); ++i) s = v[i] < s ? v[i] : s;
    return s;
  } else {
    typename Part<T, Bytes / 2>::type lo, hi;
    halves<T, Bytes>(v, lo, hi);
    return tree_min<T, Bytes / 2>(hi < lo ? hi : lo);
  }
}

template <typename T>
inline T hsum(vec<T> v) {
  return tree_sum<T, DKM_VBYTES>(v);
}

template <typename T>
inline T hmin(vec<T> v) {
  return tree_min<T, DKM_VBYTES>(v);
}

template <typename T>
inline vec<T> vmin(vec<T> a, vec<T> b) {
  return a < b ? a : b;
}

// a > b ? a : b, which is what x86's max instructions compute (b where either is NaN). GCC
// compiles the comparison and the selection as written (two operations, vexp2's clamp among them):
// the instruction by name where there is one.
template <typename T>
inline vec<T> vmax(vec<T> a, vec<T> b) {
#if defined(__x86_64__) && DKM_VBYTES == 64
  if constexpr (sizeof(T) == 4)
    return __builtin_ia32_maxps512_mask(a, b, a, static_cast<unsigned short>(-1), 4);
  else
    return __builtin_ia32_maxpd512_mask(a, b, a, static_cast<unsigned char>(-1), 4);
#elif defined(__x86_64__) && DKM_VBYTES == 32
  if constexpr (sizeof(T) == 4)
    return __builtin_ia32_maxps256(a, b);
  else
    return __builtin_ia32_maxpd256(a, b);
#elif defined(__x86_64__) && DKM_VBYTES == 16
  if constexpr (sizeof(T) == 4)
    return __builtin_ia32_maxps(a, b);
  else
    return __builtin_ia32_maxpd(a, b);
#else
  return a > b ? a : b;
#endif
}

// 2^y for y <= 0 (y = -inf included), exactly 1 for y = 0: the row's largest attention weight.
// Results below the smallest normal number (2^-126 in float, 2^-1022 in double) are flushed to
// exactly 0: denormal results cost microcode assists on many CPUs and, with a small tau, most of a
// row's entries fall there; an attention weight that small changes no sum it enters. A centroid
// whose attention is that small for every row has exactly zero mass and keeps its position.
// y = n + f with n an integer and |f| <= 1/2 (rounding by the magic-number addition), 2^f by a
// polynomial, 2^n built in the exponent bits. The polynomial's coefficients are doubled (exactly)
// and the exponent built is n - 1, whose field n + bias - 1 is 0 at the smallest n kept after
// clamping: so the flush costs no comparison, and p * 2^(n-1) is bit for bit the value of
// (p / 2) * 2^n. 12 vector operations in float.
// Float: degree 5, minimax for relative error on [-1/2, 1/2] with float coefficients: at most
// 2.3 ulps (1.9e-7). The rounding of y itself (half an ulp of |y|, up to 126) moves 2^y by more
// wherever |y| > 3, which is most of a row's nonzero entries with a small tau.
inline vec<float> vexp2(vec<float> y) {
  typedef vec<float> vf;
  typedef Vec<float>::itype vi;
  y = vmax<float>(y, splat(Exp2Floor<float>::value));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = y + magic;
  const vf n = t - magic;
  const vf f = y - n;  // exact
  vf p = f * (2 * 0.00133423868f) + 2 * 0.00967179053f;
  p = p * f + 2 * 0.0555048101f;
  p = p * f + 2 * 0.240222365f;
  p = p * f + 2 * 0.693147182f;
  p = p * f + 2.0f;
  const vf half_scale = (vf)(((vi)t - (0x4B400000 - 126)) << 23);  // 2^(n-1); 0 at n = -126
  return p * half_scale;
}

// Double: the Taylor series of 2^f = e^(f ln2) to degree 13 (the first omitted term is below
// 5e-18), as above otherwise.
inline vec<double> vexp2(vec<double> y) {
  typedef vec<double> vd;
  typedef Vec<double>::itype vi;
  y = vmax<double>(y, splat(Exp2Floor<double>::value));
  const vd magic = splat(6755399441055744.0);  // 1.5 * 2^52
  const vd t = y + magic;
  const vd n = t - magic;
  const vd f = y - n;
  const double coef[14] = {1.0,
                           6.9314718055994530942e-01,
                           2.4022650695910071233e-01,
                           5.5504108664821579953e-02,
                           9.6181291076284771620e-03,
                           1.3333558146428443423e-03,
                           1.5403530393381609954e-04,
                           1.5252733804059840280e-05,
                           1.3215486790144309488e-06,
                           1.0178086009239699727e-07,
                           7.0549116208011233298e-09,
                           4.4455382718708114975e-10,
                           2.5678435993488202381e-11,
                           1.3691488853904124338e-12};
  vd p = splat(2 * coef[13]);
  for (int i = 12; i >= 0; --i) p = p * f + 2 * coef[i];
  const vd half_scale = (vd)(((vi)t - (0x4338000000000000LL - 1022)) << 52);
  return p * half_scale;
}

// Squared distances of R rows to every centroid: scores[r * kp + j]. Padding centroids sit at a
// huge coordinate, so their distance is huge and their attention exactly 0. Returns each row's
// smallest distance in dmin[r]. D is d when known at compile time, else 0.
// With d known, the R d coordinates enter pre-broadcast (wv, from the stack, as a memory operand):
// a scalar read through w is a broadcast per use, and the compiler re-reads it after every store
// into scores, which might alias it.
// A caller that keeps the broadcasts for its own sweeps passes them in (given).
template <typename T, int D, int R>
inline void distances(const Pass<T>& p, const T* w, T* scores, T* dmin, const vec<T>* given = nullptr) {
  constexpr int N = Vec<T>::lanes;
  const int64_t d = D ? D : p.d, kp = p.kp;
  const T* const cT = p.cT;
  vec<T> own[D ? R * D : 1];
  if constexpr (D != 0)
    if (!given)
      for (int q = 0; q < R * D; ++q) own[q] = splat<T>(w[q]);
  const vec<T>* const wv = given ? given : own;
  vec<T> lowest[R];
  for (int r = 0; r < R; ++r) lowest[r] = splat<T>(__builtin_inf());
  for (int64_t j = 0; j < kp; j += N) {
    vec<T> acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vec<T>{};
    for (int64_t l = 0; l < d; ++l) {
      const vec<T> c = load(cT + l * kp + j);
      for (int r = 0; r < R; ++r) {
        vec<T> diff;
        if constexpr (D != 0)
          diff = c - wv[r * D + l];
        else
          diff = c - w[r * d + l];
        acc[r] += diff * diff;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(scores + r * kp + j, acc[r]);
      lowest[r] = vmin<T>(lowest[r], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) dmin[r] = hmin<T>(lowest[r]);
}

// e_ij = 2^((dmin - dist) log2(e) / tau) for a vector of squared distances, dmin a row's smallest
// (or, in the lane kernels, a vector of rows' smallest): the one form every pass takes, so that a
// pair's weight is the same in every pass (exponentiate says why the subtraction comes first).
template <typename T, typename Nearest>
inline vec<T> attention_exponential(vec<T> dist, Nearest dmin, T scale) {
  return vexp2((dmin - dist) * scale);
}

// The smallest exponential a dense sweep counts as attended, for the next block's choice of
// listing: in float the relevant ones (kernels.h, Relevance), which a listing keeps of certified
// centroids; in double every nonzero one.
template <typename T>
inline vec<T> counted_from() {
  return splat<T>(sizeof(T) == 4 ? T(1.0 / (1ull << kRelevanceExponent)) : T(__DBL_MIN__));
}

// Turns one row of squared distances into exp(S_ij - max_j S_ij) in place, S = -dist / tau, and
// returns 1 / sum_j of them: A_ij = row[j] * (returned value). The exponent is computed base 2 as
// (dmin - dist) log2(e) / tau, subtraction first: for the row's nearest centroid it is exactly 0,
// so that entry is exactly 1 (and A exactly 1 in a one-hot row). Folding the subtraction into one
// fused multiply-add, dist * (-scale) + dmin * scale, leaves the rounding error of dmin * scale
// as that entry's exponent instead: about dmin / tau ulps, which overflows 2^y when tau is small
// against the distances, and otherwise makes A_ij = e_ij / sum differ from 1 by an ulp, which the
// backward pass amplifies by 2 / tau. The rounding of the constant log2(e) / tau changes every
// score of the row by the same factor, as a relative change of tau of an ulp.
// With `attended` given, adds the row's count of attended entries (counted_from) to it.
template <typename T>
inline T exponentiate(const Pass<T>& p, T* row, T dmin, int64_t* attended = nullptr) {
  constexpr int N = Vec<T>::lanes;
  const T scale = p.exp2_scale;
  vec<T> sum{};
  typename Vec<T>::itype counted{};  // minus the count of attended entries per lane
  for (int64_t j = 0; j < p.kp; j += N) {
    const vec<T> e = attention_exponential(load(row + j), dmin, scale);
    store(row + j, e);
    sum += e;
    if (attended) counted += (typename Vec<T>::itype)(e >= counted_from<T>());
  }
  if (attended)
    for (int q = 0; q < N; ++q) *attended -= counted[q];
  return T(1) / hsum<T>(sum);
}

// Scaled copies of R rows of x: xs[r * d + l] = x[r * d + l] * scale[r].
template <typename T>
inline void scale_rows(const T* x, const T* scale, int R, int64_t d, T* xs) {
  for (int r = 0; r < R; ++r)
    for (int64_t l = 0; l < d; ++l) xs[r * d + l] = x[r * d + l] * scale[r];
}

// ------------------------------------------------------------------------- attended pairs --
// Bit q set where lane q of a comparison result m is set: one instruction with AVX and AVX-512
// (vpmovd2m / vpmovq2m, where halves would go through memory), a loop over the lanes for 16-byte
// vectors.
template <typename T, int Bytes>
inline unsigned lane_bits(typename Part<T, Bytes>::type m) {
#if DKM_VBYTES >= 64  // AVX-512 DQ
  if constexpr (Bytes == 64) {
    if constexpr (sizeof(T) == 4)
      return __builtin_ia32_cvtd2mask512((Part<int32_t, 64>::type)m);
    else
      return __builtin_ia32_cvtq2mask512((Part<long long, 64>::type)m);
  } else
#endif
#if DKM_VBYTES >= 32  // the builtins exist where AVX is enabled
  if constexpr (Bytes == 32) {
    if constexpr (sizeof(T) == 4)
      return __builtin_ia32_movmskps256((Part<float, 32>::type)m);
    else
      return __builtin_ia32_movmskpd256((Part<double, 32>::type)m);
  } else
#endif
  {
    unsigned bits = 0;
    for (int q = 0; q < Bytes / static_cast<int>(sizeof(T)); ++q) bits |= (m[q] != 0 ? 1u : 0u) << q;
    return bits;
  }
}

// kPacked.at[b]: the positions of the set bits of the byte b, in order (then zeros).
struct PackedBits {
  int32_t at[256][8];
  constexpr PackedBits() : at() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int q = 0; q < 8; ++q)
        if (b >> q & 1) at[b][n++] = q;
    }
  }
};
constexpr PackedBits kPacked;

// The offset of a vector's first lane in every lane of 8 ints: the listing carries it from vector
// to vector (a vector add, not a broadcast of the scalar offset each time).
typedef int32_t Offsets8 __attribute__((vector_size(32)));

// Appends to list[n..] the offsets j + q of the lanes q whose bit is set (j in every lane of `at`),
// without a branch per lane (8 offsets are written per byte of bits, the count advances by its
// set bits): list needs 8 values of room past its end. Returns the new n.
inline int64_t append_set_lanes(unsigned bits, int lanes, Offsets8 at, int32_t* list, int64_t n) {
  for (int h = 0; h < lanes; h += 8) {
    const unsigned b = lanes <= 8 ? bits : bits >> h & 0xffu;  // lane_bits has no bits past `lanes`
    Offsets8 offsets;
    __builtin_memcpy(&offsets, kPacked.at[b], sizeof offsets);
    offsets += at + h;
    __builtin_memcpy(list + n, &offsets, sizeof offsets);
    n += __builtin_popcount(b);
  }
  return n;
}

// Sparse rows. With a small tau most attention weights of a row are exactly 0 (vexp2 flushes
// them), and so are their terms in every sum of a pass: at d = 8, k = 256, tau = 2e-5 on weights
// ~ N(0, 0.02^2), 9.7% of the (row, centroid) pairs are attended, and 2.8% relevant (above 2^-60:
// kernels.h, Relevance), which a listing takes of certified centroids. When few of a block's are,
// the passes go pair by pair over the attended ones (accumulate_sparse, grad_rows_sparse): a
// centroid's D coordinates of C_t, G / s and its sums are a vector or two each (rows of p.cR,
// p.gmR and a (kp, D) accumulator in scratch, folded into accT at the end of the call). The pairs
// are listed from the distances (list_within_reach: relevant, or not flushed by vexp2),
// and the exponentials formed for the listed pairs alone (attended_exponentials), as dA in the
// backward step (attended_gradients). A block's first sweep lists its pairs when the block before
// was sparse (or listed and nearly so: few_attended), and else is the dense sweep, which counts
// them: a dense problem pays a count, and a listing per kernel call. A block takes its listed
// pairs while at most one in `*_below` of its pairs is attended: the shares where both ways took
// equal time (8/8 with a few tau, in one process: the forward 13% at D = 8 and 20% at D = 16, the
// backward 25-30%; more at k = 4096). The output pass's sparse rows gather C_L and scatter
// nothing: with AVX-512 it was as fast or faster listed up to a third of its pairs (8/8 and
// d = 16, tau 2e-5 to 8e-5; with AVX2 the forward's share held).
// At D = 4 the dense sweeps cost little per pair and a third of the benchmark's pairs are
// attended: D = 4 stays dense.
// The same formulas and differences as accumulate_rows and grad_row per pair: A_ij, dS'_ij = A_ij
// (dA_ij - sum A dA) (2/tau) and t = dS'_ij (c_j - w_i) per pair, t added into the row's gradient
// and the centroid's sum; the order of the sums differs.
template <int D>
struct Sparse {
  static constexpr bool rows = lists_pairs_at(D);
  static constexpr int64_t forward_below = D == 8 ? 8 : 6;
  static constexpr int64_t output_below = DKM_VBYTES == 64 ? 3 : forward_below;
  static constexpr int64_t gradient_below = 4;
};

// Whether R rows with attended[r] pairs each (listed or counted) have at most `slack` in `below`
// of their pairs attended. A block takes its pairs one by one at slack 1, and the next block lists
// its pairs if this one did, or if this one was listed and is dense within slack 2: else a few
// dense blocks among sparse ones would each turn the listing off for the block after them too.
template <int R>
inline bool few_attended(const int64_t* attended, int64_t kp, int64_t below, int64_t slack = 1) {
  int64_t pairs = 0;
  for (int r = 0; r < R; ++r) pairs += attended[r];
  return pairs * below <= slack * R * kp;
}

// The sparse rows' working memory: the (kp, 2 D) accumulator of the centroids' sums (t summed over
// rows; ForwardSums), then one list of attended offsets per row of a block (kp of them and 8 of
// room each).
template <typename T>
inline int32_t* attended_lists(const Pass<T>& p, T* sums, int r) {
  return reinterpret_cast<int32_t*>(sums + 2 * p.kp * p.d) + r * (p.kp + 8);
}

// The forward's sparse sums of a centroid: its D coordinates, and where they fill half a vector
// (float at d = 8 with AVX-512) its mass in the next lane: a pair then takes one load, multiply-add
// and store of a vector, not those and a scalar's besides (the attention pass 0.89-0.94 at 8/8).
template <typename T, int D>
struct ForwardSums {
  static constexpr bool mass_lane = D * sizeof(T) * 2 == DKM_VBYTES && DKM_VBYTES == 64;
  static constexpr int stride = mass_lane ? 2 * D : D;
};

// Ends a list of n offsets with 8 offsets 0 (a valid centroid): a loop that takes the pairs 8 at a
// time reads the last group whole, at e = 0 past n, with no test per pair.
inline void end_list(int32_t* list, int64_t n) {
  const Offsets8 zeros{};
  __builtin_memcpy(list + n, &zeros, sizeof zeros);
}

#if DKM_VBYTES == 64
// With AVX-512 a comparison gives a mask register and vpcompressd packs the offsets it selects in
// one instruction (list_within_reach); attended_exponentials then gathers the listed distances a
// vector at a time.

// Appends the offsets (lanes of `at`) of the lanes of v at or below `threshold` to list[n..], a
// whole vector: n is at most the lanes listed before, so the store stays within a row of kp.
// Returns the new n.
inline int64_t append_at_or_below(vec<float> v, vec<float> threshold, Vec<float>::itype at, int32_t* list,
                                  int64_t n) {
  const unsigned short m = __builtin_ia32_cmpps512_mask(v, threshold, 18 /* _CMP_LE_OQ */, 0xffff, 4);
  const Vec<float>::itype offsets = __builtin_ia32_compresssi512_mask(at, Vec<float>::itype{}, m);
  __builtin_memcpy(list + n, &offsets, sizeof offsets);
  return n + __builtin_popcount(m);
}
inline int64_t append_at_or_below(vec<double> v, vec<double> threshold, Offsets8 at, int32_t* list,
                                  int64_t n) {
  const unsigned char m = __builtin_ia32_cmppd512_mask(v, threshold, 18 /* _CMP_LE_OQ */, 0xff, 4);
  const Offsets8 offsets = __builtin_ia32_compresssi256_mask(at, Offsets8{}, m);
  __builtin_memcpy(list + n, &offsets, sizeof offsets);
  return n + __builtin_popcount(m);
}

// row[list[q]] for the `left` listed pairs from list on (a vector's worth at most); the lanes past
// them infinite, whose exponential is 0. Neither list nor row is read past them.
inline vec<float> gather_listed(const float* row, const int32_t* list, int64_t left) {
  const unsigned short m = left >= 16 ? 0xffff : (1u << left) - 1;
  const Vec<float>::itype offsets = __builtin_ia32_loaddqusi512_mask(list, Vec<float>::itype{}, m);
  return __builtin_ia32_gathersiv16sf(splat<float>(__builtin_inff()), row, offsets, m, 4);
}
inline vec<double> gather_listed(const double* row, const int32_t* list, int64_t left) {
  const unsigned char m = left >= 8 ? 0xff : (1u << left) - 1;
  const Offsets8 offsets = __builtin_ia32_loaddqusi256_mask(list, Offsets8{}, m);
  return __builtin_ia32_gathersiv8df(splat<double>(__builtin_inf()), row, offsets, m, 8);
}

// The offsets of a vector's lanes as the listing carries them: 16 ints in float, 8 in double.
template <typename T>
struct ListingOffsets {
  typedef Offsets8 type;
};
template <>
struct ListingOffsets<float> {
  typedef Vec<float>::itype type;
};
#endif

// Lists, for each of R rows of squared distances, the centroids within reach (Pass::reach): the
// relevant pairs of certified centroids, and every pair of the others whose exponential may be
// nonzero (n[r] of them, attended_lists), found without forming the exponentials. One comparison
// per pair, of the distance with dmin + reach_j. Where the reach is vexp2's floor (-126 in float,
// -1022 in double) over the scale, the threshold's rounding (a few ulps, where half an exponent
// unit is 0.4% of the floor) lists no fewer pairs than those whose exponential is above 2^-125.5:
// vexp2 gives 0 below; at or below the threshold, as it is dmin itself where the reach is below
// half an ulp of dmin (a tiny tau).
template <typename T, int R>
inline void list_within_reach(const Pass<T>& p, const T* dist, const T* dmin, T* sums, int64_t* n) {
  constexpr int N = Vec<T>::lanes;
  const int64_t kp = p.kp;
  const T* const reach = p.reach;
  const T floor_reach = -Exp2Floor<T>::value / p.exp2_scale;
  for (int r = 0; r < R; ++r) {
    int32_t* __restrict list = attended_lists(p, sums, r);
    const T* __restrict row = dist + r * kp;
    const vec<T> nearest = splat<T>(dmin[r]), uniform = splat<T>(dmin[r] + floor_reach);
    const auto threshold = [&](int64_t j) { return reach ? nearest + load(reach + j) : uniform; };
    int64_t count = 0;
#if DKM_VBYTES == 64
    typename ListingOffsets<T>::type at{};
    for (int q = 0; q < N; ++q) at[q] = q;
    for (int64_t j = 0; j < kp; j += N, at += N)
      count = append_at_or_below(load(row + j), threshold(j), at, list, count);
#else
    Offsets8 at{};
    for (int64_t j = 0; j < kp; j += N, at += N) {
      const unsigned bits = lane_bits<T, DKM_VBYTES>((vec<T>)(load(row + j) <= threshold(j)));
      count = append_set_lanes(bits, N, at, list, count);
    }
#endif
    n[r] = count;
    end_list(list, count);
  }
}

// Lists the attended offsets of each of R rows of e (n[r] of them), and replaces each row of e and
// of da (dA by centroid) by its attended entries in list order: in place, as list[q] >= q.
template <typename T, int R>
inline void list_attended(const Pass<T>& p, T* e_rows, T* da, T* sums, int64_t* n) {
  constexpr int N = Vec<T>::lanes;
  const int64_t kp = p.kp;
  for (int r = 0; r < R; ++r) {
    int32_t* list = attended_lists(p, sums, r);
    n[r] = 0;
    Offsets8 at{};
    for (int64_t j = 0; j < kp; j += N, at += N) {
      const unsigned bits = lane_bits<T, DKM_VBYTES>((vec<T>)(load(e_rows + r * kp + j) != T(0)));
      n[r] = append_set_lanes(bits, N, at, list, n[r]);
    }
    end_list(list, n[r]);
    for (int64_t q = 0; q < n[r]; ++q) {
      e_rows[r * kp + q] = e_rows[r * kp + list[q]];
      da[r * kp + q] = da[r * kp + list[q]];
    }
  }
}

// Whether a row that listed n pairs is one-hot. Its nearest centroid is always within reach, so a
// row that lists one pair lists that centroid alone, whose exponent is exactly 0: its attention is
// exactly 1 there and 0 elsewhere, and the passes' general arithmetic on such a row reduces exactly
// to what they take from it here (its dS is exactly 0: A (dA - A dA)). With a small tau against
// the distances most rows are (ResNet-50's layers at tau = 2e-5).
inline bool one_hot_row(int64_t n) { return n == 1; }

// The exponentials of the listed pairs of R rows in list order (rows of e, from the rows of squared
// distances dist), and inv[r] = 1 / their sum: exponentiate for the listed pairs alone, the others'
// being exactly 0. The last vector of a list is filled up with infinite distances (exponential 0):
// copied into e first, or with AVX-512 gathered a vector at a time. A row that lists one pair is
// one-hot (one_hot_row): its e is 1 and its sum 1, set without a gather, an exponential or a
// division.
template <typename T, int R>
inline void attended_exponentials(const Pass<T>& p, const T* dist, const T* dmin, const int64_t* n, T* sums,
                                  T* e, T* inv) {
  constexpr int N = Vec<T>::lanes;
  const int64_t kp = p.kp;
  int64_t common = kp;  // vectors every row has, taken for the R rows in turn: independent chains
  for (int r = 0; r < R; ++r) {
    if (one_hot_row(n[r])) {
      vec<T> unit{};
      unit[0] = T(1);
      store(e + r * kp, unit);
      inv[r] = T(1);
      continue;
    }
#if DKM_VBYTES == 64
    const int64_t q = (n[r] + N - 1) / N * N;
#else
    const int32_t* list = attended_lists(p, sums, r);
    T* er = e + r * kp;
    int64_t q = 0;
    for (; q < n[r]; ++q) er[q] = dist[r * kp + list[q]];
    for (; q % N; ++q) er[q] = T(__builtin_inf());
#endif
    common = q < common ? q : common;
  }
  vec<T> sum[R];
  const auto exponentials = [&](int r, int64_t q) {
#if DKM_VBYTES == 64
    const vec<T> listed = gather_listed(dist + r * kp, attended_lists(p, sums, r) + q, n[r] - q);
#else
    const vec<T> listed = load(e + r * kp + q);
#endif
    const vec<T> ev = attention_exponential(listed, dmin[r], p.exp2_scale);
    store(e + r * kp + q, ev);
    sum[r] += ev;
  };
  for (int r = 0; r < R; ++r) sum[r] = vec<T>{};
  for (int64_t q = 0; q < common; q += N)
    for (int r = 0; r < R; ++r)
      if (!one_hot_row(n[r])) exponentials(r, q);
  for (int r = 0; r < R; ++r) {
    if (one_hot_row(n[r])) continue;
    for (int64_t q = common; q < n[r]; q += N) exponentials(r, q);
    inv[r] = T(1) / hsum<T>(sum[r]);
  }
}

// A block's listing step, taken when the block before was sparse (`listing`): lists its pairs from
// the distances (rows of dist) and, if at most one in `below` is attended, forms their
// exponentials in list order (rows of e) and inv, and returns true. Else the block is dense, and
// the next one is listed only if this one was within twice that share (few_attended).
template <typename T, int R>
inline bool listed_exponentials(const Pass<T>& p, const T* dist, const T* dmin, T* sums, int64_t below,
                                bool& listing, int64_t* attended, T* e, T* inv) {
  list_within_reach<T, R>(p, dist, dmin, sums, attended);
  if (few_attended<R>(attended, p.kp, below)) {
    attended_exponentials<T, R>(p, dist, dmin, attended, sums, e, inv);
    return true;
  }
  listing = few_attended<R>(attended, p.kp, below, 2);
  return false;
}

// A block of R rows of the forward's passes (its sums and its output), from the distances in the
// first R scratch rows: where the block is listed and sparse, its exponentials in list order in the
// next R rows (returns true, attended[r] pairs each, and inv); else dense_row(r, counter) for each
// row, which adds the row's attended pairs to *counter where it is given: they are counted for the
// next block's choice where this one was not listed. sums is null where d has no sparse rows (or
// they are switched off). A block is sparse while at most one in `below` of its pairs is attended
// (Sparse). Out of line: inlined into the forward's sums, it made that pass 1.05x slower at 8/8.
template <typename T, int R, typename DenseRow>
__attribute__((noinline)) bool forward_block(const Pass<T>& p, T* scratch, const T* dmin, T* sums, bool& listing,
                                             int64_t* attended, T* inv, int64_t below, const DenseRow& dense_row) {
  const bool count = sums && !listing;
  if (sums && listing &&
      listed_exponentials<T, R>(p, scratch, dmin, sums, below, listing, attended, scratch + R * p.kp, inv))
    return true;
  int64_t counted[R] = {};
  for (int r = 0; r < R; ++r) dense_row(r, count ? &counted[0] : nullptr);
  if (count) listing = few_attended<R>(counted, p.kp, below);
  return false;
}

// With d = 1 from kRecomputeFrom centroids the passes recompute the distances where they use them
// instead of storing 4 rows of them, which lie beyond L1 there: a sweep for dmin alone, then each
// distance formed again (two operations per pair). The attention pass 0.94-0.99 of its time at
// k = 4096, 0.99 at k = 2048, 1.03-1.06 at k = 1024 (where the rows fit L1).
constexpr int64_t kRecomputeFrom = 2048;

// A squared distance at d = 1 as distances forms it: rounded before any subtraction from it, never
// fused into one.
template <typename T>
inline vec<T> scalar_distance(vec<T> c, vec<T> w) {
  const vec<T> diff = c - w;
  vec<T> dist{};
  dist += diff * diff;
  return dist;
}

// dmin[r] of R rows at d = 1 (each row's w pre-broadcast in wv), as distances finds it.
template <typename T, int R>
inline void scalar_nearest(const Pass<T>& p, const vec<T>* wv, T* dmin) {
  constexpr int N = Vec<T>::lanes;
  vec<T> lowest[R];
  for (int r = 0; r < R; ++r) lowest[r] = splat<T>(__builtin_inf());
  for (int64_t j = 0; j < p.kp; j += N) {
    const vec<T> c = load(p.cT + j);
    for (int r = 0; r < R; ++r) lowest[r] = vmin<T>(lowest[r], scalar_distance<T>(c, wv[r]));
  }
  for (int r = 0; r < R; ++r) dmin[r] = hmin<T>(lowest[r]);
}

// The exponentials of R rows at d = 1 (into their scratch rows) and inv, as exponentiate forms
// them, from recomputed distances.
template <typename T, int R>
__attribute__((noinline)) void scalar_exponentials(const Pass<T>& p, const T* w, T* e, T* inv) {
  constexpr int N = Vec<T>::lanes;
  const int64_t kp = p.kp;
  vec<T> wv[R], sum[R];
  T dmin[R];
  for (int r = 0; r < R; ++r) wv[r] = splat<T>(w[r]), sum[r] = vec<T>{};
  scalar_nearest<T, R>(p, wv, dmin);
  for (int64_t j = 0; j < kp; j += N) {
    const vec<T> c = load(p.cT + j);
    for (int r = 0; r < R; ++r) {
      const vec<T> ev = attention_exponential(scalar_distance<T>(c, wv[r]), dmin[r], p.exp2_scale);
      store(e + r * kp + j, ev);
      sum[r] += ev;
    }
  }
  for (int r = 0; r < R; ++r) inv[r] = T(1) / hsum<T>(sum[r]);
}

// A row's or a centroid's D coordinates in registers: one vector of D values where they fit in
// one, else D * sizeof(T) / DKM_VBYTES full vectors (GCC keeps a vector type wider than the
// instruction set's in memory and moves it through general registers, a pair loop's cost many
// times over).
template <typename T, int D>
struct Coords {
  static constexpr int bytes = D * sizeof(T) < DKM_VBYTES ? D * sizeof(T) : DKM_VBYTES;
  static constexpr int parts = D * sizeof(T) / bytes;
  static constexpr int lanes = bytes / sizeof(T);
  typedef typename Part<T, bytes>::type part;
  part v[parts];

  static Coords at(const T* x) {  // part by part: a copy of the whole array goes through memory
    Coords c;
    for (int q = 0; q < parts; ++q) __builtin_memcpy(&c.v[q], x + q * lanes, bytes);
    return c;
  }
  static Coords zero() {
    Coords c;
    for (int q = 0; q < parts; ++q) c.v[q] = part{};
    return c;
  }
  void store(T* x) const {
    for (int q = 0; q < parts; ++q) __builtin_memcpy(x + q * lanes, &v[q], bytes);
  }
  Coords& operator+=(const Coords& o) {
    for (int q = 0; q < parts; ++q) v[q] += o.v[q];
    return *this;
  }
  Coords operator+(const Coords& o) const { return Coords(*this) += o; }
  Coords operator-(const Coords& o) const {
    Coords c;
    for (int q = 0; q < parts; ++q) c.v[q] = v[q] - o.v[q];
    return c;
  }
  Coords operator*(const Coords& o) const {
    Coords c;
    for (int q = 0; q < parts; ++q) c.v[q] = v[q] * o.v[q];
    return c;
  }
  friend Coords operator*(T s, const Coords& x) {
    Coords c;
    for (int q = 0; q < parts; ++q) c.v[q] = s * x.v[q];
    return c;
  }
  part folded() const {  // the parts added lane by lane
    part f = v[0];
    for (int q = 1; q < parts; ++q) f += v[q];
    return f;
  }
  T sum() const { return tree_sum<T, bytes>(folded()); }
  T operator[](int l) const { return v[l / lanes][l % lanes]; }
};

// The forward's sums of R rows from their listed pairs alone, e in list order (rows of e_rows):
// sums[j] += e_ij xs_i (a (kp, D) accumulator; xs_i = x_i / s_i) and mass[j] += e_ij / s_i.
template <typename T, int D, int R>
inline void accumulate_sparse(const Pass<T>& p, const T* xs, const T* e_rows, const T* inv, const int64_t* n,
                              T* mass, T* sums) {
  if constexpr (ForwardSums<T, D>::mass_lane) {  // x_i / s_i and 1 / s_i in one vector
    constexpr int S = ForwardSums<T, D>::stride;
    for (int r = 0; r < R; ++r) {
      const int32_t* list = attended_lists(p, sums, r);
      const T* __restrict e = e_rows + r * p.kp;
      vec<T> x{};
      for (int l = 0; l < D; ++l) x[l] = xs[r * D + l];
      x[D] = mass ? inv[r] : T(0);
      for (int64_t q = 0; q < n[r]; ++q) {
        T* const s = sums + list[q] * S;
        store(s, load(s) + e[q] * x);
      }
    }
    return;
  }
  for (int r = 0; r < R; ++r) {
    const int32_t* list = attended_lists(p, sums, r);
    const T* __restrict e = e_rows + r * p.kp;  // apart from sums and mass: e is read once per pair
    const Coords<T, D> x = Coords<T, D>::at(xs + r * D);
    if (mass)  // one loop: the offset and e loaded once per pair
      for (int64_t q = 0; q < n[r]; ++q) {
        const int64_t j = list[q];
        (Coords<T, D>::at(sums + j * D) + e[q] * x).store(sums + j * D);
        mass[j] += e[q] * inv[r];
      }
    else
      for (int64_t q = 0; q < n[r]; ++q) {
        const int64_t j = list[q];
        (Coords<T, D>::at(sums + j * D) + e[q] * x).store(sums + j * D);
      }
  }
}

// R rows: accT[l][j] += sum_r A_rj x_rl, mass[j] += sum_r A_rj. A_rj = e_rj / sum_r, and the
// division is folded into x (d multiplies per row instead of kp). Where d has sparse rows
// (sparse_sums non-null), as the backward step: after a sparse block the pairs are listed from
// the distances, and a block with few attended pairs forms the exponentials and the sums for those
// alone (accumulate_sparse); the exponential sweep of a dense block counts the attended pairs.
template <typename T, int D, int R>
inline void accumulate_rows(const Pass<T>& p, const T* w, const T* x, T* accT, T* mass, T* scratch,
                            T* sparse_sums, bool& listing) {
  constexpr int N = Vec<T>::lanes;
  const int64_t d = D ? D : p.d, kp = p.kp;
  T dmin[R], inv[R];
  T* xs = scratch + kScratchRows * kp;
  int64_t attended[R] = {};  // set by forward_block where the block is sparse (GCC cannot see it)
  bool sparse = false;
  if (D == 1 && kp >= kRecomputeFrom) {
    scalar_exponentials<T, R>(p, w, scratch, inv);
  } else {
    distances<T, D, R>(p, w, scratch, dmin);
    sparse = forward_block<T, R>(p, scratch, dmin, sparse_sums, listing, attended, inv, Sparse<D>::forward_below,
                                 [&](int r, int64_t* counter) {
                                   inv[r] = exponentiate(p, scratch + r * kp, dmin[r], counter);
                                 });
  }
  scale_rows(x, inv, R, d, xs);
  if constexpr (Sparse<D>::rows)
    if (sparse) return accumulate_sparse<T, D, R>(p, xs, scratch + R * kp, inv, attended, mass, sparse_sums);
  for (int64_t j = 0; j < kp; j += N) {
    vec<T> e[R];
    for (int r = 0; r < R; ++r) e[r] = load(scratch + r * kp + j);
    if (mass) {
      vec<T> m = load(mass + j);
      for (int r = 0; r < R; ++r) m += e[r] * inv[r];
      store(mass + j, m);
    }
    for (int64_t l = 0; l < d; ++l) {
      vec<T> acc = load(accT + l * kp + j);
      for (int r = 0; r < R; ++r) acc += e[r] * xs[r * d + l];
      store(accT + l * kp + j, acc);
    }
  }
}

template <typename T, int D>
void accumulate_impl(const Pass<T>& p, const T* w, const T* x, int64_t rows, T* accT, T* mass,
                     T* scratch) {
  const int64_t d = D ? D : p.d;
  // The sparse rows' (kp, S) sums, after the scratch rows (null where d has no sparse rows).
  T* const sums = Sparse<D>::rows && p.sparse_rows ? scratch + kScratchRows * (p.kp + d) : nullptr;
  constexpr int S = ForwardSums<T, D>::stride;
  if (sums)
    for (int64_t q = 0; q < p.kp * S; ++q) sums[q] = T(0);
  bool listing = true;  // list the pairs from the distances (the last block was sparse)
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4)
    accumulate_rows<T, D, 4>(p, w + i * d, x + i * d, accT, mass, scratch, sums, listing);
  for (; i < rows; ++i) accumulate_rows<T, D, 1>(p, w + i * d, x + i * d, accT, mass, scratch, nullptr, listing);
  if (sums)
    for (int64_t j = 0; j < p.k; ++j) {
      for (int64_t l = 0; l < d; ++l) accT[l * p.kp + j] += sums[j * S + l];
      if constexpr (ForwardSums<T, D>::mass_lane)
        if (mass) mass[j] += sums[j * S + D];
    }
}

// Per-row accumulators for the horizontal sums over centroids: registers when d is known.
template <int D>
struct RowSlots {
  static constexpr int value = D ? D : 1;
};

// out[r * D + l] = sum_j A_rj x_jl of R rows from their listed pairs alone, e in list order (rows
// of e_rows), x row-major (a centroid's D coordinates a vector or two): the output pass's rows
// (x = C_L, p.cLR) and the backward's sum_j A_ij G_j / s_j where the dense sweep formed dA
// (x = p.gmR; attended_gradients forms it from dA's own loads).
template <typename T, int D, int R>
inline void listed_sums(const Pass<T>& p, const T* x, const T* e_rows, const T* inv, const int64_t* n, T* sums,
                        T* out) {
  typedef Coords<T, D> coords;
  for (int r = 0; r < R; ++r) {
    const int32_t* list = attended_lists(p, sums, r);
    const T* e = e_rows + r * p.kp;
    coords o[2] = {coords::zero(), coords::zero()};  // even and odd pairs apart, as grad_rows_sparse
    int64_t q = 0;
    for (; q + 2 <= n[r]; q += 2) {
      o[0] += e[q] * coords::at(x + list[q] * D);
      o[1] += e[q + 1] * coords::at(x + list[q + 1] * D);
    }
    if (q < n[r]) o[0] += e[q] * coords::at(x + list[q] * D);
    (inv[r] * (o[0] + o[1])).store(out + r * D);
  }
}

// out_i = sum_j A_ij C_L,j for one row of squared distances in `row`: its exponentials, as
// exponentiate forms them, enter their sum and the output's sums in the same sweep and are never
// stored (A_ij = e_ij / sum_j e_ij divides the sums at the end). With `attended` given, adds the
// row's count of attended exponentials (counted_from) to it.
template <typename T, int D>
inline void output_row(const Pass<T>& p, T* row, T dmin, T* out, int64_t* attended) {
  constexpr int N = Vec<T>::lanes;
  constexpr int S = RowSlots<D>::value;
  const int64_t d = D ? D : p.d, kp = p.kp;
  if (D) {
    vec<T> o[S], sum{};
    typename Vec<T>::itype counted{};  // minus the count of attended entries per lane
    for (int l = 0; l < S; ++l) o[l] = vec<T>{};
    for (int64_t j = 0; j < kp; j += N) {
      const vec<T> e = attention_exponential(load(row + j), dmin, p.exp2_scale);
      sum += e;
      if (attended) counted += (typename Vec<T>::itype)(e >= counted_from<T>());
      for (int l = 0; l < S; ++l) o[l] += e * load(p.cLT + l * kp + j);
    }
    const T inv = T(1) / hsum<T>(sum);
    for (int l = 0; l < S; ++l) out[l] = hsum<T>(o[l]) * inv;
    if (attended)
      for (int q = 0; q < N; ++q) *attended -= counted[q];
  } else {
    // Any d: the exponentials in place first, then one sweep per coordinate.
    const T* const e = row;
    const T inv = exponentiate(p, row, dmin, attended);
    for (int64_t l = 0; l < d; ++l) {
      vec<T> o{};
      for (int64_t j = 0; j < kp; j += N) o += load(e + j) * load(p.cLT + l * kp + j);
      out[l] = hsum<T>(o) * inv;
    }
  }
}

// With d known, 4 rows at a time: distances for 4 rows per centroid load, and where d has sparse
// rows (and the driver gave C_L row by row), a block with few attended pairs takes them one by
// one, as the forward's sums (accumulate_rows); a dense block's rows take output_row, counting
// their attended pairs for the next block's choice where this one was not listed.
template <typename T, int D>
void output_impl(const Pass<T>& p, const T* w, int64_t rows, T* out, T* scratch) {
  const int64_t d = D ? D : p.d, kp = p.kp;
  int64_t i = 0;
  if constexpr (D != 0) {
    constexpr int R = 4;
    T* const sums = Sparse<D>::rows && p.sparse_rows && p.cLR ? scratch + kScratchRows * (kp + d) : nullptr;
    bool listing = true;  // list the pairs from the distances (the last block was sparse)
    for (; i + R <= rows; i += R) {
      T dmin[R], inv[R];
      int64_t attended[R] = {};
      distances<T, D, R>(p, w + i * d, scratch, dmin);
      const bool sparse = forward_block<T, R>(p, scratch, dmin, sums, listing, attended, inv, Sparse<D>::output_below,
                                              [&](int r, int64_t* counter) {
                                                output_row<T, D>(p, scratch + r * kp, dmin[r], out + (i + r) * d,
                                                                 counter);
                                              });
      if constexpr (Sparse<D>::rows)
        if (sparse) listed_sums<T, D, R>(p, p.cLR, scratch + R * kp, inv, attended, sums, out + i * d);
    }
  }
  for (; i < rows; ++i) {
    T dmin;
    distances<T, D, 1>(p, w + i * d, scratch, &dmin);
    output_row<T, D>(p, scratch, dmin, out + i * d, nullptr);
  }
}

// One backward step for one row i (docs/design.md §3), given e_ij (A_ij = e_ij * inv) in `row`:
//   dA_ij = gm_j . w_i - gdc_j (+ G~_i . C_L,j on the last step)
//   dS_ij = A_ij (dA_ij - sum_l A_il dA_il)
//   dW_i += sum_j A_ij gm_j + (2/tau) sum_j dS_ij (c_t,j - w_i)
//   accT[l][j] += dS_ij (w_il - c_t,jl)
// The differences c_t,j - w_i are formed before the sums: written as w_i sum_j dS_ij minus
// sum_j dS_ij c_t,j, the two terms cancel (sum_j dS_ij is 0 in exact arithmetic) and leave the
// rounding of |w_i| amplified by 2/tau.
template <typename T, int D>
inline void grad_row(const Pass<T>& p, const T* wi, const T* gi, T inv, T* row, T* grad_a, T* dwi,
                     T* accT) {
  constexpr int N = Vec<T>::lanes;
  constexpr int S = RowSlots<D>::value;
  const int64_t d = D ? D : p.d, kp = p.kp;
  vec<T> row_dot{};
  if (D) {
    // One accumulator per coordinate, sum_j A_ij gm_jl + (2/tau) dS_ij (c_jl - w_il): d vector
    // registers, so that nothing spills (two per coordinate would not fit 16 of them at d = 8).
    vec<T> acc[S];
    for (int l = 0; l < S; ++l) acc[l] = vec<T>{};
    for (int64_t j = 0; j < kp; j += N) {
      vec<T> da = -load(p.gdc + j);
      for (int l = 0; l < S; ++l) da += load(p.gmT + l * kp + j) * wi[l];
      if (gi)
        for (int l = 0; l < S; ++l) da += load(p.cLT + l * kp + j) * gi[l];
      const vec<T> a = load(row + j) * inv;
      store(row + j, a);
      store(grad_a + j, da);
      row_dot += a * da;
    }
    const T dot = hsum<T>(row_dot);
    for (int64_t j = 0; j < kp; j += N) {
      const vec<T> a = load(row + j);
      const vec<T> ds = a * (load(grad_a + j) - dot);
      const vec<T> ds_scaled = ds * p.two_over_tau;
      for (int l = 0; l < S; ++l) {
        const vec<T> diff = load(p.cT + l * kp + j) - wi[l];
        acc[l] += a * load(p.gmT + l * kp + j) + ds_scaled * diff;
        store(accT + l * kp + j, load(accT + l * kp + j) - ds * diff);
      }
    }
    for (int l = 0; l < S; ++l) dwi[l] += hsum<T>(acc[l]);
  } else {
    // Any d: rows of A and dS go to scratch, then one sweep over centroids per coordinate.
    for (int64_t j = 0; j < kp; j += N) {
      vec<T> da = -load(p.gdc + j);
      for (int64_t l = 0; l < d; ++l) da += load(p.gmT + l * kp + j) * wi[l];
      if (gi)
        for (int64_t l = 0; l < d; ++l) da += load(p.cLT + l * kp + j) * gi[l];
      const vec<T> a = load(row + j) * inv;
      store(row + j, a);
      store(grad_a + j, da);
      row_dot += a * da;
    }
    const T dot = hsum<T>(row_dot);
    for (int64_t j = 0; j < kp; j += N) {
      const vec<T> ds = load(row + j) * (load(grad_a + j) - dot);
      store(grad_a + j, ds);
    }
    for (int64_t l = 0; l < d; ++l) {
      vec<T> u{}, v{};
      for (int64_t j = 0; j < kp; j += N) {
        const vec<T> ds = load(grad_a + j);
        const vec<T> diff = load(p.cT + l * kp + j) - wi[l];
        u += load(row + j) * load(p.gmT + l * kp + j);
        v += ds * diff;
        store(accT + l * kp + j, load(accT + l * kp + j) - ds * diff);
      }
      dwi[l] += hsum<T>(u) + p.two_over_tau * hsum<T>(v);
    }
  }
}

template <typename T, int D, int R>
inline void grad_rows(const Pass<T>& p, const T* w, const T* grad_out, T* dw, T* accT,
                      T* scratch) {
  const int64_t d = D ? D : p.d, kp = p.kp;
  T dmin[R], inv[R];
  distances<T, D, R>(p, w, scratch, dmin);
  for (int r = 0; r < R; ++r) inv[r] = exponentiate(p, scratch + r * kp, dmin[r]);
  for (int r = 0; r < R; ++r)
    grad_row<T, D>(p, w + r * d, grad_out ? grad_out + r * d : nullptr, inv[r], scratch + r * kp,
                   scratch + R * kp, dw + r * d, accT);
}

// 8 lanes of T: a vector with AVX2 in float, half of one with AVX-512 (and all of one in double).
template <typename T>
using eight = typename Part<T, 8 * sizeof(T)>::type;

// A coordinates' sum by lane (Coords::folded) reduced to 8 lanes.
template <typename T, int Bytes>
inline eight<T> to_eight(typename Part<T, Bytes>::type v) {
  if constexpr (Bytes == 8 * sizeof(T)) {
    return v;
  } else {
    typename Part<T, Bytes / 2>::type lo, hi;
    halves<T, Bytes>(v, lo, hi);
    return to_eight<T, Bytes / 2>(lo + hi);
  }
}

#ifdef DKM_HAS_SHUFFLE
// gdc[list[b]] in lane b of 8 by one gather (x86 float: vgatherdps), 0 in the lanes from `left`:
// lane by lane, each is a load and an insert into the vector, and the inserts share one port.
// list has 8 values of room past its end, so the load of 8 offsets stays in bounds.
#if defined(__x86_64__) && DKM_VBYTES >= 32
template <typename T>
constexpr bool kGatherEight = sizeof(T) == 4;
inline eight<float> gather_eight(const float* gdc, const int32_t* list, int64_t left) {
  Offsets8 at;
  __builtin_memcpy(&at, list, sizeof at);
  const Offsets8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const eight<float> in = (eight<float>)(lane < static_cast<int32_t>(left < 8 ? left : 8));
  return __builtin_ia32_gathersiv8sf(eight<float>{}, gdc, at, in, 4);
}
#else
template <typename T>
constexpr bool kGatherEight = false;
template <typename T>
inline eight<T> gather_eight(const T*, const int32_t*, int64_t) {  // never called
  eight<T> none{};
  return none;
}
#endif

// The sums of 8 vectors of 8 lanes, sum b in lane b: a transposing add tree (interleaves, pairs of
// lanes, halves), 14 shuffles and 7 additions for the 8 sums, where each alone takes 3 of each
// and a scalar extraction.
template <typename T>
inline eight<T> sums_of_eight(const eight<T>* v) {
  eight<T> s[4], t[2];
  for (int b = 0; b < 4; ++b)
    s[b] = __builtin_shufflevector(v[2 * b], v[2 * b + 1], 0, 8, 1, 9, 4, 12, 5, 13) +
           __builtin_shufflevector(v[2 * b], v[2 * b + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  for (int b = 0; b < 2; ++b)
    t[b] = __builtin_shufflevector(s[2 * b], s[2 * b + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(s[2 * b], s[2 * b + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(t[0], t[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(t[0], t[1], 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif

// dA_ij = gm_j . w_i - gdc_j (+ G~_i . C_L,j on the last step, First: gi given) of the listed pairs
// of R rows (into da in list order; e in list order too), dots[r] = sum_j A_ij dA_ij, and the row's
// first gradient term sum_j A_ij gm_j (into agm[r * D + l]), from the same loads of gm: the dense
// sweep's dA, which costs d / lanes multiply-adds per pair attended or not, for the attended pairs
// only (one or two vector products and a sum each). First is a template argument: as a run-time
// choice GCC formed the C_L term for every pair and dropped it where gi is null.
template <typename T, int D, int R, bool First>
inline void attended_gradients(const Pass<T>& p, const T* w, const T* gi, const T* e_rows, const T* inv,
                               const int64_t* n, T* sums, T* da, T* dots, T* agm) {
  typedef Coords<T, D> coords;
  const int64_t kp = p.kp;
  for (int r = 0; r < R; ++r) {
    const int32_t* list = attended_lists(p, sums, r);
    if (one_hot_row(n[r])) {  // sum_j A_ij gm_j is gm_j of the one centroid; dS is 0 (grad_rows_sparse)
      coords::at(p.gmR + list[0] * D).store(agm + r * D);
      continue;
    }
    const T* e = e_rows + r * kp;
    T* dar = da + r * kp;
    const coords wr = coords::at(w + r * D), gr = First ? coords::at(gi + r * D) : coords::zero();
    coords eg[2] = {coords::zero(), coords::zero()};  // sum_j e_ij gm_j, even and odd pairs apart
    // Read once: a store into da could alias p's pointers, and each pair would reload them.
    const T* __restrict gmR = p.gmR;
    const T* __restrict cLR = p.cLR;
    const T* __restrict gdc = p.gdc;
    const auto product = [&](int64_t q, int32_t j) {  // gm_j w_i (+ C_L,j G~_i), by coordinate
      const coords g = coords::at(gmR + j * D);
      eg[q & 1] += e[q] * g;
      const coords x = g * wr;
      if constexpr (First) return x + coords::at(cLR + j * D) * gr;
      return x;
    };
    T dot[2] = {};
    int64_t q = 0;
#ifdef DKM_HAS_SHUFFLE
    if constexpr (coords::lanes >= 8) {
      // 8 pairs at a time: their products' sums by one add tree, dA and e dA as vectors. The last
      // group is read whole: the list ends with 8 offsets 0 (end_list) and the rows of e are 0
      // from n[r] to the end of the last vector of exponentials (at least 8 lanes). Its dA past
      // n[r] is never read.
      eight<T> dot8{};
      for (; q < n[r]; q += 8) {
        const int64_t left = n[r] - q;
        eight<T> v[8], gdc8{}, e8;
        for (int b = 0; b < 8; ++b) {
          const int32_t j = list[q + b];
          v[b] = to_eight<T, coords::bytes>(product(q + b, j).folded());
          if constexpr (!kGatherEight<T>) gdc8[b] = gdc[j];
        }
        if constexpr (kGatherEight<T>) gdc8 = gather_eight(gdc, list + q, left);
        __builtin_memcpy(&e8, e + q, sizeof e8);
        const eight<T> dA = sums_of_eight<T>(v) - gdc8;
        __builtin_memcpy(dar + q, &dA, sizeof dA);
        dot8 += e8 * dA;
      }
      dot[0] = tree_sum<T, sizeof dot8>(dot8);
    }
#endif
    for (; q < n[r]; ++q) {
      const int32_t j = list[q];
      const T dA = product(q, j).sum() - gdc[j];
      dar[q] = dA;
      dot[q & 1] += e[q] * dA;
    }
    dots[r] = (dot[0] + dot[1]) * inv[r];
    (inv[r] * (eg[0] + eg[1])).store(agm + r * D);
  }
}

// R rows given each row's n[r] attended offsets (attended_lists), their e (A = e inv) and dA in
// list order (rows of e_rows and da, which dS' replaces), sum_j A_ij dA_ij (dots) and
// sum_j A_ij gm_j (agm).
template <typename T, int D, int R>
inline void grad_rows_sparse(const Pass<T>& p, const T* w, T* e_rows, T* da, const T* inv, const T* dots,
                             const T* agm, const int64_t* n, T* dw, T* sums) {
  typedef Coords<T, D> coords;
  constexpr int N = Vec<T>::lanes;
  const int64_t kp = p.kp;
  for (int r = 0; r < R; ++r) {
    if (one_hot_row(n[r])) {  // dS is 0: the row's gradient is sum_j A_ij gm_j alone, its sums get nothing
      (coords::at(dw + r * D) + coords::at(agm + r * D)).store(dw + r * D);
      continue;
    }
    const T* e = e_rows + r * kp;
    T* ds = da + r * kp;
    const int32_t* list = attended_lists(p, sums, r);
    // dS' = (2/tau) dS of the row's pairs in place of dA, a vector at a time (the lanes past
    // n[r], within the row, are formed and never read).
    for (int64_t q = 0; q < n[r]; q += N)
      store(ds + q, load(e + q) * inv[r] * (load(ds + q) - dots[r]) * p.two_over_tau);
    // The row's sum of t_ij = dS'_ij (c_j - w_i) in two accumulators, even and odd pairs apart:
    // one chain of dependent additions would set the pace.
    const coords wr = coords::at(w + r * D);
    coords acc[2] = {coords::at(agm + r * D), coords::zero()};
    const T* __restrict cR = p.cR;  // read once: a store into sums could alias p's pointers
    const auto pair = [&](int64_t q, coords& acc_t) {
      const int64_t j = list[q];
      const coords t = ds[q] * (coords::at(cR + j * D) - wr);
      acc_t += t;
      (coords::at(sums + j * D) + t).store(sums + j * D);
    };
    int64_t q = 0;
    for (; q + 2 <= n[r]; q += 2) {
      pair(q, acc[0]);
      pair(q + 1, acc[1]);
    }
    if (q < n[r]) pair(q, acc[0]);
    (coords::at(dw + r * D) + (acc[0] + acc[1])).store(dw + r * D);
  }
}

// grad_rows for R rows at once, d known (R = 4): the per-row form reads and writes every
// centroid's k x d sums (accT) and reads cT and gm once per row, which leaves L1 at k = 256,
// d = 8 (three 8 KiB matrices) and L2 at k = 4096. Here each vector of them is loaded once per R
// rows. After the distances, one sweep forms the exponentials, their sums, dA (from one load of gm,
// and C_L) and sum_j e_ij dA_ij of the R rows: sum_j A_ij dA_ij is that times 1 / sum_j e_ij, so the
// softmax and dA need no second sweep. Then, tile by tile of centroids, A and dS replace e and dA
// in place, and the tile (4R KiB, in L1 at any k) serves the coordinates one at a time while the
// coordinate's slices of cT, gm and accT stream past it.
// Same formulas and the same differences as grad_row; the order of the sums differs.
// Recompute: d = 1 from kRecomputeFrom centroids (a template argument: a choice in the sweep
// changed how GCC compiled it for every k).
template <typename T, int D, int R, bool Recompute = false>
inline void grad_rows_blocked(const Pass<T>& p, const T* w, const T* gi, T* dw, T* accT, T* scratch,
                              T* sparse_sums, bool& listing) {
  constexpr int N = Vec<T>::lanes;
  constexpr int64_t kTile = 2048 / sizeof(T);  // centroids per tile: a multiple of kPadding
  const int64_t kp = p.kp;
  const T scale = p.exp2_scale;
  T dmin[R], inv[R], dots[R], agm[R * (D ? D : 1)];
  int64_t attended[R];
  T* ds = scratch + R * kp;  // R rows: dA, then (2/tau) dS
  vec<T> wv[R * D], gv[R * D];  // w_il and G~_il pre-broadcast, as in distances (gv read only with gi)
  for (int q = 0; q < R * D; ++q) wv[q] = splat<T>(w[q]);
  if (gi)
    for (int q = 0; q < R * D; ++q) gv[q] = splat<T>(gi[q]);
  if constexpr (Recompute)
    scalar_nearest<T, R>(p, wv, dmin);
  else
    distances<T, D, R>(p, w, scratch, dmin, wv);
  const T* const cT = p.cT;
  const T* const gmT = p.gmT;
  const T* const cLT = p.cLT;
  // The previous block was sparse: expect this one to be. The pairs within reach are listed from
  // the distances alone, and the exponentials and dA formed for those pairs alone; a block that
  // turns out dense takes the dense sweep below.
  const bool listed = sparse_sums && listing && (!gi || p.cLR);
  if (listed && listed_exponentials<T, R>(p, scratch, dmin, sparse_sums, Sparse<D>::gradient_below, listing,
                                          attended, ds, inv)) {  // e in list order in ds, dA in scratch
    if (gi)
      attended_gradients<T, D, R, true>(p, w, gi, ds, inv, attended, sparse_sums, scratch, dots, agm);
    else
      attended_gradients<T, D, R, false>(p, w, gi, ds, inv, attended, sparse_sums, scratch, dots, agm);
    return grad_rows_sparse<T, D, R>(p, w, ds, scratch, inv, dots, agm, attended, dw, sparse_sums);
  }
  // One sweep forms the exponentials, their sums, dA (from one load of gm, and C_L) and
  // sum_j e_ij dA_ij, and counts the attended pairs where d has sparse rows.
  vec<T> sum[R], dot[R];
  for (int r = 0; r < R; ++r) sum[r] = dot[r] = vec<T>{};
  typename Vec<T>::itype counted{};  // minus the count of attended e per lane
  for (int64_t j = 0; j < kp; j += N) {
    vec<T> e[R], da[R];
    const vec<T> next = -load(p.gdc + j);
    const vec<T> c = Recompute ? load(cT + j) : vec<T>{};
    for (int r = 0; r < R; ++r) {
      vec<T> dist;
      if constexpr (Recompute)
        dist = scalar_distance<T>(c, wv[r]);
      else
        dist = load(scratch + r * kp + j);
      e[r] = attention_exponential(dist, dmin[r], scale);
      store(scratch + r * kp + j, e[r]);
      sum[r] += e[r];
      if constexpr (Sparse<D>::rows) counted += (typename Vec<T>::itype)(e[r] >= counted_from<T>());
      da[r] = next;
    }
    for (int l = 0; l < D; ++l) {
      const vec<T> g = load(gmT + l * kp + j);
      for (int r = 0; r < R; ++r) da[r] += g * wv[r * D + l];
    }
    if (gi)
      for (int l = 0; l < D; ++l) {
        const vec<T> c = load(cLT + l * kp + j);
        for (int r = 0; r < R; ++r) da[r] += c * gv[r * D + l];
      }
    for (int r = 0; r < R; ++r) {
      store(ds + r * kp + j, da[r]);
      dot[r] += e[r] * da[r];
    }
  }
  for (int r = 0; r < R; ++r) {
    inv[r] = T(1) / hsum<T>(sum[r]);
    dots[r] = hsum<T>(dot[r]) * inv[r];
  }
  if (sparse_sums && !listed) {
    for (int r = 0; r < R; ++r) attended[r] = 0;
    for (int q = 0; q < N; ++q) attended[0] -= counted[q];
    listing = few_attended<R>(attended, kp, Sparse<D>::gradient_below);
    if (listing) {
      list_attended<T, R>(p, scratch, ds, sparse_sums, attended);
      listed_sums<T, D, R>(p, p.gmR, scratch, inv, attended, sparse_sums, agm);
      return grad_rows_sparse<T, D, R>(p, w, scratch, ds, inv, dots, agm, attended, dw, sparse_sums);
    }
  }
  // Per tile: A and dS' = (2/tau) dS of the R rows in place of e and dA (formed where used when
  // the coordinates are one group, d <= LB), then the coordinates LB at a time. Per centroid
  // vector and row, A and dS' are loaded once for LB coordinates, and the row's two sums of
  // grad_row share one accumulator: sum_j A_ij gm_jl + dS'_ij (c_jl - w_il).
  // t = dS'_ij (c_jl - w_il) is formed once and added into both that and the centroid's sum (which
  // takes tau/2 once per centroid vector and coordinate, for R rows): a multiply and two adds
  // instead of two multiply-adds, so that the adders, not only the multiply-add units, work. R LB
  // accumulators with the LB slices of cT and gm fill the 16 AVX2 registers at R = 4, LB = 2. With
  // the 32 of AVX-512, d = 4 takes LB = 4: A and dS' are then formed where used, with no sweep of
  // their own (the pass 0.81 of LB = 2's time at k = 4096, 0.90 at k = 256; d = 8 gained nothing).
  constexpr int LB = DKM_VBYTES == 64 && D == 4 ? 4 : D >= 2 ? 2 : 1;
  const T half_tau = T(1) / p.two_over_tau;
  for (int64_t j0 = 0; j0 < kp; j0 += kTile) {
    const int64_t j1 = j0 + kTile < kp ? j0 + kTile : kp;
    if constexpr (D > LB)
      for (int64_t j = j0; j < j1; j += N)
        for (int r = 0; r < R; ++r) {
          const vec<T> a = load(scratch + r * kp + j) * inv[r];
          store(scratch + r * kp + j, a);
          store(ds + r * kp + j, a * (load(ds + r * kp + j) - dots[r]) * p.two_over_tau);
        }
    for (int l = 0; l < D; l += LB) {
      vec<T> acc[R * LB];
      for (int q = 0; q < R * LB; ++q) acc[q] = vec<T>{};
      for (int64_t j = j0; j < j1; j += N) {
        vec<T> c[LB], g[LB], sum[LB];
        for (int q = 0; q < LB; ++q) {
          c[q] = load(cT + (l + q) * kp + j);
          g[q] = load(gmT + (l + q) * kp + j);
          sum[q] = vec<T>{};
        }
        for (int r = 0; r < R; ++r) {
          vec<T> a, dsr;
          if constexpr (D > LB) {
            a = load(scratch + r * kp + j), dsr = load(ds + r * kp + j);
          } else {  // one group of coordinates: A and dS' are used once, formed here
            a = load(scratch + r * kp + j) * inv[r];
            dsr = a * (load(ds + r * kp + j) - dots[r]) * p.two_over_tau;
          }
          for (int q = 0; q < LB; ++q) {
            const vec<T> t = dsr * (c[q] - wv[r * D + l + q]);
            acc[r * LB + q] += a * g[q];
            acc[r * LB + q] += t;
            sum[q] += t;
          }
        }
        for (int q = 0; q < LB; ++q)
          store(accT + (l + q) * kp + j, load(accT + (l + q) * kp + j) - sum[q] * half_tau);
      }
      for (int r = 0; r < R; ++r)
        for (int q = 0; q < LB; ++q) dw[r * D + l + q] += hsum<T>(acc[r * LB + q]);
    }
  }
}

template <typename T, int D>
void grad_step_impl(const Pass<T>& p, const T* w, const T* grad_out, int64_t rows, T* dw, T* accT,
                    T* scratch) {
  const int64_t d = D ? D : p.d;
  // The sparse rows' centroid sums, after the scratch rows (null where d has no sparse rows).
  T* const sums = Sparse<D>::rows && p.sparse_rows && p.cR ? scratch + kScratchRows * (p.kp + d) : nullptr;
  if (sums)
    for (int64_t q = 0; q < p.kp * d; ++q) sums[q] = T(0);
  bool listing = true;  // list the attended pairs in the exponential sweep (the last block was sparse)
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const T* gi = grad_out ? grad_out + i * d : nullptr;
    if constexpr (D == 1)
      if (p.kp >= kRecomputeFrom)
        grad_rows_blocked<T, D, 4, true>(p, w + i * d, gi, dw + i * d, accT, scratch, sums, listing);
      else
        grad_rows_blocked<T, D, 4>(p, w + i * d, gi, dw + i * d, accT, scratch, sums, listing);
    else if constexpr (D != 0)
      grad_rows_blocked<T, D, 4>(p, w + i * d, gi, dw + i * d, accT, scratch, sums, listing);
    else
      grad_rows<T, D, 4>(p, w + i * d, gi, dw + i * d, accT, scratch);
  }
  for (; i < rows; ++i)
    grad_rows<T, D, 1>(p, w + i * d, grad_out ? grad_out + i * d : nullptr, dw + i * d, accT, scratch);
  if (sums) {
    const T half_tau = T(1) / p.two_over_tau;
    for (int64_t j = 0; j < p.k; ++j)
      for (int64_t l = 0; l < d; ++l) accT[l * p.kp + j] -= sums[j * d + l] * half_tau;
  }
}

// ------------------------------------------------------------------ few centroids: rows in lanes --
// With k <= 16 a row's scores fill at most two vectors, most of them padding for k = 4, and each
// row ends in horizontal sums and a division: per-row overhead, not arithmetic, sets the pace. Here
// a vector holds one coordinate of N rows instead (N = the lanes), the K centroids are scalars
// broadcast from cT, and a block of N rows goes through every fused step of its pass in registers:
// no scratch rows, no horizontal operation per row, one vector division per N rows. Sums over rows
// (the k x d accumulators) stay per lane until the call ends. K is k rounded up to 4, 8 or 16: the
// padding centroids cT carries up to kp >= 16 lie far away and get attention exactly 0, as in the
// centroid-vectorised kernels. The arithmetic per (row, centroid) pair is theirs, in the same order
// (distance from exact differences, exponent (dmin - dist) * scale), so results agree to rounding.
// Up to k = kLaneK (kernels.h): these kernels take every pair, and list none.

#ifdef DKM_HAS_SHUFFLE
// The even and the odd lanes of the 2N lanes of (a, b), and its inverse, zip: lo, hi = the first
// and the second half of a0 b0 a1 b1 ... Single instructions with AVX-512 and SSE, two with AVX2.
template <typename T>
DKM_ALWAYS_INLINE void unzip(vec<T> a, vec<T> b, vec<T>& even, vec<T>& odd) {
  constexpr int N = Vec<T>::lanes;
  if constexpr (N == 2) {
    even = __builtin_shufflevector(a, b, 0, 2);
    odd = __builtin_shufflevector(a, b, 1, 3);
  } else if constexpr (N == 4) {
    even = __builtin_shufflevector(a, b, 0, 2, 4, 6);
    odd = __builtin_shufflevector(a, b, 1, 3, 5, 7);
  } else if constexpr (N == 8) {
    // AVX2 has no two-source permute across its 128-bit halves: the straight shuffle becomes two
    // index-vector permutes and a blend per output. An in-half shuffle (vshufps) and one
    // single-source permute of 64-bit pairs do it in two.
    const vec<T> e = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14);
    const vec<T> o = __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    even = __builtin_shufflevector(e, e, 0, 1, 4, 5, 2, 3, 6, 7);
    odd = __builtin_shufflevector(o, o, 0, 1, 4, 5, 2, 3, 6, 7);
  } else {
    static_assert(N == 16, "vectors of 2 to 16 lanes");
    even = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    odd = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  }
}

template <typename T>
DKM_ALWAYS_INLINE void zip(vec<T> a, vec<T> b, vec<T>& lo, vec<T>& hi) {
  constexpr int N = Vec<T>::lanes;
  if constexpr (N == 2) {
    lo = __builtin_shufflevector(a, b, 0, 2);
    hi = __builtin_shufflevector(a, b, 1, 3);
  } else if constexpr (N == 4) {
    lo = __builtin_shufflevector(a, b, 0, 4, 1, 5);
    hi = __builtin_shufflevector(a, b, 2, 6, 3, 7);
  } else if constexpr (N == 8) {
    // In-half interleaves (vunpcklps, vunpckhps), then the halves recombined (vperm2f128), as in
    // unzip.
    const vec<T> l = __builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13);
    const vec<T> h = __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
    lo = __builtin_shufflevector(l, h, 0, 1, 2, 3, 8, 9, 10, 11);
    hi = __builtin_shufflevector(l, h, 4, 5, 6, 7, 12, 13, 14, 15);
  } else {
    lo = __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    hi = __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  }
}
#endif

#ifdef DKM_HAS_SHUFFLE
// The transpose of 8 vectors of 8 lanes, in place: r[l][q] <-> r[q][l]. The classic AVX2 form:
// 24 in-half shuffles and half swaps, against 48 for three rounds of unzips.
template <typename T>
DKM_ALWAYS_INLINE void transpose8(vec<T>* r) {
  vec<T> t[8], s[8];
  for (int q = 0; q < 4; ++q) {
    t[2 * q] = __builtin_shufflevector(r[2 * q], r[2 * q + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * q + 1] = __builtin_shufflevector(r[2 * q], r[2 * q + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int h = 0; h < 2; ++h)  // rows 4h .. 4h + 3
    for (int q = 0; q < 2; ++q) {
      s[4 * h + 2 * q] = __builtin_shufflevector(t[4 * h + q], t[4 * h + q + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      s[4 * h + 2 * q + 1] = __builtin_shufflevector(t[4 * h + q], t[4 * h + q + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int l = 0; l < 4; ++l) {
    r[l] = __builtin_shufflevector(s[l], s[l + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[l + 4] = __builtin_shufflevector(s[l], s[l + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
#endif

// N rows (n <= N valid, the rest zero) of x, one coordinate per vector: out[l][r] = x[r * D + l].
// A full block is D vector loads and log2(D) rounds of D / 2 unzips (the flat index r D + l loses
// its lowest bit of l per round), instead of N D single-lane inserts.
template <typename T, int D>
DKM_ALWAYS_INLINE void rows_to_lanes(const T* x, int n, vec<T>* out) {
  constexpr int N = Vec<T>::lanes;
  if (n == N) {
    if constexpr (D == 1) {
      out[0] = load(x);
      return;
    }
#ifdef DKM_HAS_SHUFFLE
    if constexpr (D == 8 && N == 8) {
      for (int q = 0; q < 8; ++q) out[q] = load(x + q * N);
      transpose8<T>(out);
      return;
    }
    if constexpr (D == 2 || D == 4 || D == 8) {
      vec<T> cur[D], next[D];
      for (int q = 0; q < D; ++q) cur[q] = load(x + q * N);
      for (int round = 1; round < D; round *= 2) {
        for (int q = 0; q < D / 2; ++q) unzip<T>(cur[2 * q], cur[2 * q + 1], next[q], next[q + D / 2]);
        for (int q = 0; q < D; ++q) cur[q] = next[q];
      }
      for (int l = 0; l < D; ++l) out[l] = cur[l];
      return;
    }
#endif
  }
  for (int l = 0; l < D; ++l) out[l] = vec<T>{};
  for (int r = 0; r < n; ++r)
    for (int l = 0; l < D; ++l) out[l][r] = x[r * D + l];
}

// The inverse of rows_to_lanes for the n valid rows: x[r * D + l] (+)= v[l][r].
template <typename T, int D, bool Add>
DKM_ALWAYS_INLINE void lanes_to_rows(const vec<T>* v, int n, T* x) {
  constexpr int N = Vec<T>::lanes;
  if (n == N) {
    if constexpr (D == 1) {
      store(x, Add ? load(x) + v[0] : v[0]);
      return;
    }
#ifdef DKM_HAS_SHUFFLE
    if constexpr (D == 8 && N == 8) {
      vec<T> cur[8];
      for (int q = 0; q < 8; ++q) cur[q] = v[q];
      transpose8<T>(cur);
      for (int q = 0; q < 8; ++q) store(x + q * N, Add ? load(x + q * N) + cur[q] : cur[q]);
      return;
    }
    if constexpr (D == 2 || D == 4 || D == 8) {
      vec<T> cur[D], next[D];
      for (int q = 0; q < D; ++q) cur[q] = v[q];
      for (int round = 1; round < D; round *= 2) {
        for (int q = 0; q < D / 2; ++q) zip<T>(cur[q], cur[q + D / 2], next[2 * q], next[2 * q + 1]);
        for (int q = 0; q < D; ++q) cur[q] = next[q];
      }
      for (int q = 0; q < D; ++q) store(x + q * N, Add ? load(x + q * N) + cur[q] : cur[q]);
      return;
    }
#endif
  }
  for (int r = 0; r < n; ++r)
    for (int l = 0; l < D; ++l) x[r * D + l] = Add ? x[r * D + l] + v[l][r] : v[l][r];
}

// Blocks of N rows taken per step: B blocks go through each fused step together, so that the B
// independent chains (distance, exponential, normaliser, division, sums) overlap. One block's
// chain is long (the exponential alone is a 7-deep multiply-add chain, then the sum over centroids
// and a division) and holds only a hundred-odd operations, which is too little to keep the vector
// units busy. More blocks than the registers hold (about 2 (D + K) vectors per block) spill: with
// AVX-512's 32 registers 3 blocks at d <= 4 (against 2: the 2-bit layer's gradient pass 0.89, its
// attention and output 0.94-0.95; k = 16, d = 4 0.94-0.96), 2 at d = 8 (3 took 1.1x-1.2x there).
template <int D, int K>
constexpr int lane_blocks() {
#ifdef DKM_LANE_BLOCKS
  return DKM_LANE_BLOCKS;
#else
  return DKM_VBYTES == 64 && D <= 4 ? 3 : 2;
#endif
}

// The attention of B blocks of N rows (block b, lane r: row b N + r) to K centroids:
// e[b K + j] = exp(S_ij - max_j S_ij) and inv[b] = 1 / sum_j e[b K + j], set to 0 in lanes past
// the n valid rows so that they contribute nothing. Per row the same operations in the same order
// whatever B.
template <typename T, int D, int K, int B>
DKM_ALWAYS_INLINE void lane_attention(const Pass<T>& p, const vec<T>* w, int n, vec<T>* e, vec<T>* inv) {
  constexpr int N = Vec<T>::lanes;
  const int64_t kp = p.kp;
  vec<T> lowest[B], sum[B];
  for (int b = 0; b < B; ++b) lowest[b] = splat<T>(__builtin_inf()), sum[b] = vec<T>{};
  for (int j = 0; j < K; ++j) {
    vec<T> acc[B];
    for (int b = 0; b < B; ++b) acc[b] = vec<T>{};
    for (int l = 0; l < D; ++l) {
      const T c = p.cT[l * kp + j];
      for (int b = 0; b < B; ++b) {
        const vec<T> diff = c - w[b * D + l];
        acc[b] += diff * diff;
      }
    }
    for (int b = 0; b < B; ++b) {
      e[b * K + j] = acc[b];
      lowest[b] = vmin<T>(lowest[b], acc[b]);
    }
  }
  for (int j = 0; j < K; ++j)
    for (int b = 0; b < B; ++b) {
      e[b * K + j] = attention_exponential(e[b * K + j], lowest[b], p.exp2_scale);
      sum[b] += e[b * K + j];
    }
  for (int b = 0; b < B; ++b) inv[b] = T(1) / sum[b];
  if (n < B * N)
    for (int r = n; r < B * N; ++r) inv[r / N][r % N] = T(0);
}

// Runs step.template operator()<B>(first_row, valid_rows) over `rows` rows: steps of B blocks of
// N rows while they are full, then one block at a time. Blocks are taken in row order either way,
// and each lane's sums see its rows in that order, so results do not depend on B.
template <typename T, int B, typename Step>
inline void lane_steps(int64_t rows, const Step& step) {
  constexpr int N = Vec<T>::lanes;
  int64_t i = 0;
  if constexpr (B > 1)
    for (; i + B * N <= rows; i += B * N) step.template operator()<B>(i, B * N);
  for (; i < rows; i += N) step.template operator()<1>(i, rows - i < N ? static_cast<int>(rows - i) : N);
}

// The rows of B blocks (n valid rows in all) in lanes, D vectors per block.
template <typename T, int D, int B>
DKM_ALWAYS_INLINE void blocks_to_lanes(const T* x, int n, vec<T>* out) {
  constexpr int N = Vec<T>::lanes;
  for (int b = 0; b < B; ++b) {
    const int nb = n - b * N < N ? n - b * N : N;
    rows_to_lanes<T, D>(x + b * N * D, nb > 0 ? nb : 0, out + b * D);
  }
}

// Adds the per-lane sums acc[l * K + j] into accT[l][j] (and mass[j] += msum[j]).
template <typename T, int D, int K>
inline void lanes_to_sums(const Pass<T>& p, const vec<T>* acc, const vec<T>* msum, T* accT, T* mass) {
  for (int j = 0; j < K; ++j) {
    if (mass) mass[j] += hsum<T>(msum[j]);
    for (int l = 0; l < D; ++l) accT[l * p.kp + j] += hsum<T>(acc[l * K + j]);
  }
}

template <typename T, int D, int K>
void lane_accumulate(const Pass<T>& p, const T* w, const T* x, int64_t rows, T* accT, T* mass) {
  vec<T> acc[D * K], msum[K];
  for (int i = 0; i < D * K; ++i) acc[i] = vec<T>{};
  for (int j = 0; j < K; ++j) msum[j] = vec<T>{};
  lane_steps<T, lane_blocks<D, K>()>(rows, [&]<int B>(int64_t i, int n) {
    vec<T> wl[B * D], xl[B * D], e[B * K], inv[B];
    blocks_to_lanes<T, D, B>(w + i * D, n, wl);
    if (D > 1 && x == w)  // the forward's iterations: the values are the rows, transposed once
      for (int q = 0; q < B * D; ++q) xl[q] = wl[q];
    else
      blocks_to_lanes<T, D, B>(x + i * D, n, xl);
    lane_attention<T, D, K, B>(p, wl, n, e, inv);
    for (int b = 0; b < B; ++b)
      for (int l = 0; l < D; ++l) xl[b * D + l] *= inv[b];  // A_ij x_il = e_ij (x_il / sum_j e_ij)
    // Blocks innermost: each per-lane sum, which spills at D K > 8, is loaded and stored once per
    // step, not once per block; every sum still takes block 0's rows, then block 1's.
    for (int j = 0; j < K; ++j) {
      for (int b = 0; b < B; ++b) msum[j] += e[b * K + j] * inv[b];
      for (int l = 0; l < D; ++l)
        for (int b = 0; b < B; ++b) acc[l * K + j] += e[b * K + j] * xl[b * D + l];
    }
  });
  lanes_to_sums<T, D, K>(p, acc, msum, accT, mass);
}

template <typename T, int D, int K>
void lane_output(const Pass<T>& p, const T* w, int64_t rows, T* out) {
  constexpr int N = Vec<T>::lanes;
  lane_steps<T, lane_blocks<D, K>()>(rows, [&]<int B>(int64_t i, int n) {
    vec<T> wl[B * D], e[B * K], inv[B], o[B * D];
    blocks_to_lanes<T, D, B>(w + i * D, n, wl);
    lane_attention<T, D, K, B>(p, wl, n, e, inv);
    for (int q = 0; q < B * D; ++q) o[q] = vec<T>{};
    for (int j = 0; j < K; ++j)
      for (int l = 0; l < D; ++l) {
        const T c = p.cLT[l * p.kp + j];
        for (int b = 0; b < B; ++b) o[b * D + l] += e[b * K + j] * c;
      }
    for (int b = 0; b < B; ++b) {
      for (int l = 0; l < D; ++l) o[b * D + l] *= inv[b];
      const int nb = n - b * N < N ? n - b * N : N;
      lanes_to_rows<T, D, false>(o + b * D, nb, out + (i + b * N) * D);
    }
  });
}

// The backward step of grad_row, B blocks of N rows at a time (same formulas, same order per row).
template <typename T, int D, int K>
void lane_grad_step(const Pass<T>& p, const T* w, const T* grad_out, int64_t rows, T* dw, T* accT) {
  constexpr int N = Vec<T>::lanes;
  const int64_t kp = p.kp;
  vec<T> acc[D * K];
  for (int i = 0; i < D * K; ++i) acc[i] = vec<T>{};
  lane_steps<T, lane_blocks<D, K>()>(rows, [&]<int B>(int64_t i, int n) {
    vec<T> wl[B * D], gl[B * D]{}, e[B * K], da[B * K], inv[B];
    blocks_to_lanes<T, D, B>(w + i * D, n, wl);
    if (grad_out) blocks_to_lanes<T, D, B>(grad_out + i * D, n, gl);
    lane_attention<T, D, K, B>(p, wl, n, e, inv);
    vec<T> u[B * D], v[B * D], dot[B];  // sum_j e_ij gm_jl and sum_j dS_ij (c_jl - w_il)
    for (int q = 0; q < B * D; ++q) u[q] = v[q] = vec<T>{};
    for (int b = 0; b < B; ++b) dot[b] = vec<T>{};
    for (int j = 0; j < K; ++j) {
      vec<T> d[B];
      for (int b = 0; b < B; ++b) d[b] = splat<T>(-p.gdc[j]);
      for (int l = 0; l < D; ++l) {
        const T g = p.gmT[l * kp + j];
        for (int b = 0; b < B; ++b) {
          d[b] += g * wl[b * D + l];
          u[b * D + l] += e[b * K + j] * g;
        }
      }
      if (grad_out)
        for (int l = 0; l < D; ++l) {
          const T c = p.cLT[l * kp + j];
          for (int b = 0; b < B; ++b) d[b] += c * gl[b * D + l];
        }
      for (int b = 0; b < B; ++b) {
        e[b * K + j] *= inv[b];  // A_ij from here on
        da[b * K + j] = d[b];
        dot[b] += e[b * K + j] * d[b];
      }
    }
    for (int j = 0; j < K; ++j) {  // blocks innermost, as in lane_accumulate
      vec<T> ds[B];
      for (int b = 0; b < B; ++b) ds[b] = e[b * K + j] * (da[b * K + j] - dot[b]);
      for (int l = 0; l < D; ++l) {
        const T c = p.cT[l * kp + j];
        for (int b = 0; b < B; ++b) {
          const vec<T> diff = c - wl[b * D + l];
          v[b * D + l] += ds[b] * diff;
          acc[l * K + j] -= ds[b] * diff;
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      for (int l = 0; l < D; ++l) u[b * D + l] = u[b * D + l] * inv[b] + v[b * D + l] * p.two_over_tau;
      const int nb = n - b * N < N ? n - b * N : N;
      lanes_to_rows<T, D, true>(u + b * D, nb, dw + (i + b * N) * D);
    }
  });
  lanes_to_sums<T, D, K>(p, acc, nullptr, accT, nullptr);
}

template <int D>
struct Dim {
  static constexpr int value = D;
};

// Calls f.template operator()<D, K>() when k and d suit the lane kernels; returns whether it did.
template <typename T, typename F>
inline bool with_lane_shape(const Pass<T>& p, const F& f) {
  if (p.k > kLaneK) return false;
  const int K = p.k <= 4 ? 4 : p.k <= 8 ? 8 : 16;
  auto by_k = [&](auto d) {
    constexpr int D = decltype(d)::value;
    if (K == 4) f.template operator()<D, 4>();
    else if (K == 8) f.template operator()<D, 8>();
    else f.template operator()<D, 16>();
    return true;
  };
  switch (p.d) {
    case 1: return by_k(Dim<1>{});
    case 2: return by_k(Dim<2>{});
    case 4: return by_k(Dim<4>{});
    case 8: return by_k(Dim<8>{});
    default: return false;
  }
}

// While a kernel runs, denormal results are flushed to zero and denormal inputs read as zero
// (x86 MXCSR FTZ and DAZ; restored on return, so torch's own code never sees the change). With a
// small tau most attention weights are tiny, and products with them would otherwise land in the
// denormal range, where x86 CPUs take a slow path: up to 1.4x on the whole pass here. Values that
// small change no sum they enter.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__SSE2__)
  unsigned saved;
  FlushDenormals() : saved(__builtin_ia32_stmxcsr()) { __builtin_ia32_ldmxcsr(saved | 0x8040u); }
  ~FlushDenormals() { __builtin_ia32_ldmxcsr(saved); }
#endif
};

// Entry points: pick the instantiation for d.
template <typename T>
void accumulate_entry(const Pass<T>& p, const T* w, const T* x, int64_t rows, T* accT, T* mass,
                      T* scratch) {
  const FlushDenormals flush;
  if (with_lane_shape(p, [&]<int D, int K>() { lane_accumulate<T, D, K>(p, w, x, rows, accT, mass); })) return;
  switch (p.d) {
    case 1: return accumulate_impl<T, 1>(p, w, x, rows, accT, mass, scratch);
    case 2: return accumulate_impl<T, 2>(p, w, x, rows, accT, mass, scratch);
    case 4: return accumulate_impl<T, 4>(p, w, x, rows, accT, mass, scratch);
    case 8: return accumulate_impl<T, 8>(p, w, x, rows, accT, mass, scratch);
    case 16: return accumulate_impl<T, 16>(p, w, x, rows, accT, mass, scratch);
    default: return accumulate_impl<T, 0>(p, w, x, rows, accT, mass, scratch);
  }
}

template <typename T>
void output_entry(const Pass<T>& p, const T* w, int64_t rows, T* out, T* scratch) {
  const FlushDenormals flush;
  if (with_lane_shape(p, [&]<int D, int K>() { lane_output<T, D, K>(p, w, rows, out); })) return;
  switch (p.d) {
    case 1: return output_impl<T, 1>(p, w, rows, out, scratch);
    case 2: return output_impl<T, 2>(p, w, rows, out, scratch);
    case 4: return output_impl<T, 4>(p, w, rows, out, scratch);
    case 8: return output_impl<T, 8>(p, w, rows, out, scratch);
    case 16: return output_impl<T, 16>(p, w, rows, out, scratch);
    default: return output_impl<T, 0>(p, w, rows, out, scratch);
  }
}

template <typename T>
void grad_step_entry(const Pass<T>& p, const T* w, const T* grad_out, int64_t rows, T* dw, T* accT,
                     T* scratch) {
  const FlushDenormals flush;
  if (with_lane_shape(p, [&]<int D, int K>() { lane_grad_step<T, D, K>(p, w, grad_out, rows, dw, accT); }))
    return;
  switch (p.d) {
    case 1: return grad_step_impl<T, 1>(p, w, grad_out, rows, dw, accT, scratch);
    case 2: return grad_step_impl<T, 2>(p, w, grad_out, rows, dw, accT, scratch);
    case 4: return grad_step_impl<T, 4>(p, w, grad_out, rows, dw, accT, scratch);
    case 8: return grad_step_impl<T, 8>(p, w, grad_out, rows, dw, accT, scratch);
    case 16: return grad_step_impl<T, 16>(p, w, grad_out, rows, dw, accT, scratch);
    default: return grad_step_impl<T, 0>(p, w, grad_out, rows, dw, accT, scratch);
  }
}

}  // namespace

const KernelSet table = {
    DKM_ISA_NAME,
    {&accumulate_entry<float>, &output_entry<float>, &grad_step_entry<float>},
    {&accumulate_entry<double>, &output_entry<double>, &grad_step_entry<double>},
};

}  // namespace DKM_ISA_NS
}  // namespace dkm
