// The interface between the driver (dkm_cpu.cpp: ATen, threads, dtypes) and the per-instruction-set
// kernels (kernels_*.cpp: plain arithmetic on rows already in the compute type).
//
// This header is included by translation units compiled for different instruction sets, so it
// holds declarations only: nothing here may be an inline function whose code could differ
// between them.
#pragma once

#include <cstdint>

// The torch.ops namespace the ops register in: dkm_kernels, or another name for a second build
// loaded beside the package's own (setup.py's DKM_KERNELS_OPS_NAMESPACE; benchmarks/cpu_passes.py
// --baseline-library times two builds in one process).
#ifndef DKM_KERNELS_OPS
#define DKM_KERNELS_OPS dkm_kernels
#endif

namespace dkm {

// Everything a kernel needs about one clustering problem for one pass. Centroid matrices are
// stored transposed and padded, (d, kp) with kp a multiple of 16, so that the kernels vectorise
// over centroids. Padding columns are zero, except in cT, where they hold kFarAway so that padding
// centroids are so far that their attention is exactly zero.
template <typename T>
struct Pass {
  int64_t k = 0, kp = 0, d = 0;
  T exp2_scale = 0;    // log2(e) / tau: scores in base 2
  T two_over_tau = 0;  // 2 / tau
  bool sparse_rows = true;  // sparse blocks take their attended pairs one by one (kernel_impl.h, Sparse)
  const T* cT = nullptr;   // (d, kp) C_t: the centroids the attention is computed against
  const T* cLT = nullptr;  // (d, kp) C_L: output pass, and the last backward step
  const T* gmT = nullptr;  // (d, kp) G_{t+1,j} / s_{t,j} (0 where s_{t,j} == 0): backward step
  const T* gdc = nullptr;  // (kp) (G_{t+1,j} / s_{t,j}) . C_{t+1,j}: backward step
  // (kp, d) row by row, for the sparse rows (a centroid's d coordinates in one load or two):
  const T* cR = nullptr;   // C_t
  const T* gmR = nullptr;  // G_{t+1} / s_t
  const T* cLR = nullptr;  // C_L: output pass, and the last step (grad_out given)
  // (kp) a listed block lists pair (i, j) where dist_ij <= dmin_i + reach[j]: kRelevanceExponent /
  // exp2_scale for a certified centroid, -Exp2Floor / exp2_scale (every nonzero exponential) for
  // the others. Null: every nonzero exponential of every centroid.
  const T* reach = nullptr;
};

// vexp2 (kernel_impl.h) clamps its exponent from below at this value, where its result is exactly
// 0: y <= it gives 0.
template <typename T>
struct Exp2Floor;
template <>
struct Exp2Floor<float> {
  static constexpr float value = -126.0f;
};
template <>
struct Exp2Floor<double> {
  static constexpr double value = -1022.0;
};

// Relevance (float). With a small tau most of a row's nonzero exponentials are far too small to
// change any result, and a listed block skips them: for each centroid whose mass certifies it,
// the pairs whose exponential is below 2^-kRelevanceExponent. The attention of a skipped pair is
// below that too (the row's sum is at least 1), so a centroid loses less than M 2^-60 of mass
// from M rows, and its sums and gradient terms as little in proportion: a centroid is certified
// when that is at most 2^-kRelevanceMargin of its mass, 64 times below float32's rounding. Rows
// lose less than k 2^-60 of their attention. The driver gives each centroid its reach (Pass::reach)
// from the masses of the pass's centroids, or, in the attention pass, where those are its own
// result, assumes every centroid certified and passes again over the groups where one is not.
// Float64 lists every nonzero exponential: its tolerance is 1e-9.
constexpr int kRelevanceExponent = 60;
constexpr int kRelevanceMargin = 30;

// Where a pass lists pairs (sparse blocks take their listed pairs one by one: kernel_impl.h,
// Sparse): at d = 8 and 16, where a centroid's coordinates are one vector or two, and above the
// lane kernels' k (kernel_impl.h, with_lane_shape), which take every pair.
constexpr int kLaneK = 16;
constexpr bool lists_pairs_at(int64_t d) { return d == 8 || d == 16; }
constexpr bool lists_pairs(int64_t d, int64_t k) { return lists_pairs_at(d) && k > kLaneK; }

// A kernel call may use kScratchRows * (kp + d) + kp * (2 d + 4) + 32 values of scratch: rows of kp
// values, and a (kp, 2 d) accumulator (d values per centroid, or d and its mass: ForwardSums) with
// a list of kp offsets (and room for 8 more) for each of the 4 rows of a block.
constexpr int64_t kScratchRows = 8;

// The coordinate of padding centroids in cT: its square times d stays finite for any practical d
// (and an infinite distance still gives zero attention).
template <typename T>
struct FarAway;
template <>
struct FarAway<float> {
  static constexpr float value = 1e18f;
};
template <>
struct FarAway<double> {
  static constexpr double value = 1e150;
};

// All kernels process `rows` consecutive rows (row-major, d values each) and add into their
// accumulators in row order, so a call's result does not depend on anything but its inputs.
template <typename T>
struct Kernels {
  // A = softmax(-|w - C_t|^2 / tau); accT[l][j] += sum_i A_ij x_il; mass[j] += sum_i A_ij
  // (mass may be null). x = w gives the centroid update, x = G~ gives G_L = A^T G~.
  void (*accumulate)(const Pass<T>& p, const T* w, const T* x, int64_t rows, T* accT, T* mass,
                     T* scratch);
  // out_i = sum_j A_ij C_L,j (overwrites out).
  void (*output)(const Pass<T>& p, const T* w, int64_t rows, T* out, T* scratch);
  // One backward step t (docs/design.md §3): dw_i += the row's gradient;
  // accT[l][j] += sum_i dS_ij (w_il - c_t,jl). grad_out is non-null only on the first backward
  // step (t = L-1).
  void (*grad_step)(const Pass<T>& p, const T* w, const T* grad_out, int64_t rows, T* dw,
                    T* accT, T* scratch);
};

struct KernelSet {
  const char* name;
  Kernels<float> f32;
  Kernels<double> f64;
};

// Null when the instruction set was not compiled in (another architecture or compiler).
const KernelSet* kernels_generic();
const KernelSet* kernels_avx2();
const KernelSet* kernels_avx512();

// The name of the instruction set the kernels run with (the best available, or $DKM_KERNELS_ISA):
// other kernel families (kmeans.h) follow the same choice.
const char* selected_isa();

}  // namespace dkm
