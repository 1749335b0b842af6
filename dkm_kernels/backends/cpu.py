"""Backend `cpu`: fused C++ kernels (csrc/) for CPU tensors.

The three passes are ops defined and implemented in C++ (csrc/dkm_cpu.cpp) and registered when
the extension `dkm_kernels._C` is imported: `dkm_kernels::cpu_attention_sums`, `cpu_output` and
`cpu_gradient_pass`. Each splits every group's rows into chunks fixed by the shapes, runs the
chunks in parallel (at::parallel_for) and, per row, computes the squared distances to all k
centroids, the softmax (a vectorised exp) and the row's contribution to k x d accumulators; the
chunks' partial sums are added in chunk order. Nothing of size M x k exists, and results are
bit-identical run to run and for any number of threads (so `deterministic` changes nothing here).
The kernels are compiled for generic vectors (SSE2 / NEON), AVX2 and AVX-512 and chosen at run
time (`isa()`; the environment variable DKM_KERNELS_ISA=generic|avx2|avx512 forces one).

Many problems in one call (`dkm_many`, docs/design.md §12) run on `cpu_ragged_attention_sums`,
`cpu_ragged_output` and `cpu_ragged_gradient_pass` (`RaggedPasses`): the same passes over the
chunks of every problem's groups in one parallel region per pass, each problem chunked and reduced
as alone, so its results are bit-identical to those of its own calls.

Without the compiled extension the package still imports and `auto` uses the `torch` backend;
importing warns once and says how to build it.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(needs a C++ compiler and the installed torch)"
)

try:
    from .. import _C  # loading the library registers the dkm_kernels::cpu_* ops
except ImportError as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = str(error)
    warnings.warn(
        f"dkm_kernels: the C++ extension dkm_kernels._C is not available ({_IMPORT_ERROR}), so "
        f"the 'cpu' backend is off and backend='auto' uses the 'torch' backend on CPU; "
        f"{BUILD_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _IMPORT_ERROR = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if _C is None:
        return f"the C++ extension dkm_kernels._C is not built ({_IMPORT_ERROR}); {BUILD_HINT}"
    if torch.device(device).type != "cpu":
        return f"the 'cpu' backend runs on CPU tensors, got {device}; use backend='auto' or 'torch'"
    if dtype not in _DTYPES:
        return f"the 'cpu' backend takes float16, bfloat16, float32 or float64 weights, got {dtype}"
    return None


def isa() -> str | None:
    """The instruction set the kernels run with ('avx512', 'avx2' or 'generic'); None if not built."""
    return None if _C is None else _C.isa()


def available_isas() -> tuple[str, ...]:
    """Instruction sets compiled in and supported by this CPU, best first."""
    return () if _C is None else tuple(_C.available_isas())


class Passes:
    """recurrence.Passes on the C++ ops; inactive groups are skipped."""

    def __init__(self, weights: Tensor, k: int, tau: float, deterministic: bool):
        self.weights = weights
        self.tau = tau

    def attention_sums(self, values, centroids, active):
        return torch.ops.dkm_kernels.cpu_attention_sums(self.weights, values, centroids, active,
                                                        self.tau)

    def output(self, attention_centroids, final_centroids):
        return torch.ops.dkm_kernels.cpu_output(self.weights, attention_centroids,
                                                final_centroids, self.tau)

    def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
                 active, grad_weights, mass):
        return torch.ops.dkm_kernels.cpu_gradient_pass(
            self.weights, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
            active, grad_weights, self.tau, mass)


class RaggedPasses:
    """recurrence.Passes over many problems (many.RaggedPasses' interface, docs/design.md §12): one
    C++ op call, one parallel region, per pass for all of them. The weights are not copied."""

    def __init__(self, weights: list[Tensor], layout, taus: list[float], deterministic: bool):
        self.weights = weights
        self.layout = layout
        self.taus = [float(tau) for tau in taus]

    def attention_sums(self, values, centroids, active):
        return torch.ops.dkm_kernels.cpu_ragged_attention_sums(
            self.weights, values, centroids, active, self.layout.ks, self.taus)

    def output(self, attention_centroids, final_centroids):
        return torch.ops.dkm_kernels.cpu_ragged_output(
            self.weights, attention_centroids, final_centroids, self.layout.ks, self.taus)

    def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
                 active, grad_weights, mass):
        return torch.ops.dkm_kernels.cpu_ragged_gradient_pass(
            self.weights, [] if grad_out is None else grad_out, centroids, grad_over_mass,
            grad_dot_next, final_centroids, active, grad_weights, self.layout.ks, self.taus, mass)
