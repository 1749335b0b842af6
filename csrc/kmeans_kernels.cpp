// The k-means++ kernel (kmeans_impl.h) for every instruction set kernels_*.cpp compile the DKM
// kernels for: generic vectors with the package's portable flags, then AVX2 and AVX-512 under
// target pragmas. The driver picks the one named like the DKM kernels' choice (selected_isa()).
#include "kmeans.h"

#define DKM_ISA_NS generic
#define DKM_VBYTES 16
#define DKM_ISA_NAME "generic"
#include "kmeans_impl.h"
#undef DKM_ISA_NS
#undef DKM_VBYTES
#undef DKM_ISA_NAME

namespace dkm {
const KmeansSet* kmeans_generic() { return &generic::kmeans_table; }
}  // namespace dkm

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
#include "kmeans_impl.h"
#undef DKM_ISA_NS
#undef DKM_VBYTES
#undef DKM_ISA_NAME
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#endif
#define DKM_ISA_NS avx512
#define DKM_VBYTES 64
#define DKM_ISA_NAME "avx512"
#include "kmeans_impl.h"
#undef DKM_ISA_NS
#undef DKM_VBYTES
#undef DKM_ISA_NAME
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace dkm {
const KmeansSet* kmeans_avx2() { return &avx2::kmeans_table; }
const KmeansSet* kmeans_avx512() { return &avx512::kmeans_table; }
}  // namespace dkm

#else
namespace dkm {
const KmeansSet* kmeans_avx2() { return nullptr; }
const KmeansSet* kmeans_avx512() { return nullptr; }
}  // namespace dkm
#endif
