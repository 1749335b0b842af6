// The kernels for any CPU: 16-byte vectors, which the compiler maps to SSE2 on x86-64 and NEON on
// ARM (or to scalar code elsewhere). Compiled with the package's portable flags.
#define DKM_ISA_NS generic
#define DKM_VBYTES 16
#define DKM_ISA_NAME "generic"
#include "kernel_impl.h"
#include "kmeans_impl.h"

namespace dkm {
const KernelSet* kernels_generic() { return &generic::table; }
const KmeansSet* kmeans_generic() { return &generic::kmeans_table; }
}  // namespace dkm
