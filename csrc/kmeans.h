// The interface between the k-means++ driver (kmeans_cpu.cpp: ATen, threads, the draws) and its
// per-instruction-set kernel (kmeans_impl.h, compiled by each kernels_*.cpp beside the pass kernels).
// Declarations only, as in kernels.h.
#pragma once

#include <cstdint>

namespace dkm {

// Rows are stored in blocks of kKmeansBlock rows, coordinate-major inside a block: (blocks, d,
// kKmeansBlock). Every vector width (2 to 16 lanes) divides it, so a kernel reads a coordinate of
// a vector of rows with one load and never shuffles.
constexpr int64_t kKmeansBlock = 16;

template <typename T>
struct KmeansKernels {
  // One k-means++ pass over `blocks` blocks of rows with the newest centroid c (d values):
  // nearest_i = min(nearest_i, |w_i - c|^2) for every row, and the return value is
  // sum_i counts_i * nearest_i (counts_i = 1 when counts is null) after the update, accumulated in
  // double in an order fixed by the arguments alone. counts and nearest hold one value per row,
  // padding rows included.
  double (*nearest)(const T* w, const T* counts, T* nearest, int64_t blocks, int64_t d, const T* c);
};

struct KmeansSet {
  const char* name;
  KmeansKernels<float> f32;
  KmeansKernels<double> f64;
};

// Null when the instruction set was not compiled in (another architecture or compiler).
const KmeansSet* kmeans_generic();
const KmeansSet* kmeans_avx2();
const KmeansSet* kmeans_avx512();

}  // namespace dkm
