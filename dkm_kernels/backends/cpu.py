"""Backend `cpu`: fused C++ kernels (csrc/) for CPU tensors.

The ops `dkm_kernels::cpu_forward` / `cpu_backward` are defined and implemented in C++
(csrc/dkm_cpu.cpp) and registered when the extension `dkm_kernels._C` is imported; this module adds
their fake implementations and autograd (`_ops.register_fake_and_autograd`).

What the kernels do: each pass over the weights splits every group's rows into chunks fixed by the
shapes, processes the chunks in parallel (at::parallel_for) and, per row, computes the squared
distances to all k centroids, the softmax (a vectorised exp) and the row's contribution to k x d
accumulators; the chunks' partial sums are added in chunk order. Nothing of size M x k exists, and
results are bit-identical run to run and for any number of threads. Math runs in float32 for
float16/bfloat16/float32 weights and in float64 for float64 weights. The kernels are compiled for
generic x86-64/ARM vectors, AVX2 and AVX-512 and chosen at run time (`isa()`; the environment
variable DKM_KERNELS_ISA=generic|avx2|avx512 forces one).

Without the compiled extension the package still imports and `auto` uses the `torch` backend;
importing warns once and says how to build it.
"""
from __future__ import annotations

import warnings

import torch

from .. import _ops

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(needs a C++ compiler and the installed torch)"
)

try:
    from .. import _C  # loading the library registers dkm_kernels::cpu_forward / cpu_backward
except ImportError as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = str(error)
    forward_op = None
    warnings.warn(
        f"dkm_kernels: the C++ extension dkm_kernels._C is not available ({_IMPORT_ERROR}), so "
        f"the 'cpu' backend is off and backend='auto' uses the 'torch' backend on CPU; "
        f"{BUILD_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _IMPORT_ERROR = None
    forward_op = _ops.register_fake_and_autograd("cpu")

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
