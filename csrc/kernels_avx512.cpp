// The kernels for x86-64 CPUs with AVX-512 (F, DQ, BW, VL: Skylake-SP, Ice Lake, Zen 4 and later),
// chosen at run time by dkm_cpu.cpp. Only this file's code is compiled for AVX-512.
#include "kernels.h"
#include "kmeans.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#endif
#define DKM_ISA_NS avx512
#define DKM_VBYTES 64
#define DKM_ISA_NAME "avx512"
#include "kernel_impl.h"
#include "kmeans_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace dkm {
const KernelSet* kernels_avx512() { return &avx512::table; }
const KmeansSet* kmeans_avx512() { return &avx512::kmeans_table; }
}  // namespace dkm
#else
namespace dkm {
const KernelSet* kernels_avx512() { return nullptr; }
const KmeansSet* kmeans_avx512() { return nullptr; }
}  // namespace dkm
#endif
