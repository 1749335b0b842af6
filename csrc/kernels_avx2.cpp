// The kernels for x86-64 CPUs with AVX2 and FMA (2013 on), chosen at run time by dkm_cpu.cpp.
// Only this file's code is compiled for AVX2, so the package stays loadable on any x86-64.
#include "kernels.h"
#include "kmeans.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define DKM_ISA_NS avx2
#define DKM_VBYTES 32
#define DKM_ISA_NAME "avx2"
#include "kernel_impl.h"
#include "kmeans_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace dkm {
const KernelSet* kernels_avx2() { return &avx2::table; }
const KmeansSet* kmeans_avx2() { return &avx2::kmeans_table; }
}  // namespace dkm
#else
namespace dkm {
const KernelSet* kernels_avx2() { return nullptr; }
const KmeansSet* kmeans_avx2() { return nullptr; }
}  // namespace dkm
#endif
