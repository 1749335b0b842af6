"""The pass kernels of the DKM op, one module per backend.

Every backend computes the same thing (docs/design.md §1-§3) and differs only in how it runs one
pass over the rows: each module has a `Passes` class (the protocol in `recurrence.py`) and
`unavailable_reason(device, dtype)`, None when it can run there, else a sentence saying why not
and what to do. The op (`_ops.py`) and the recurrence are shared; `reference` is not a backend of
the op but plain autograd (`reference.py`), the oracle of the tests.

Grouped shapes, as the op sees them:

    weights            (G, M, d)           float16, bfloat16, float32 or float64
    centroids          (G, k, d)           compute dtype: float64 for float64 weights, else float32
    centroid_history   (max_iter + 1, G, k, d)   [0] = warm start, [t] = C_t; after a group stops
                                                 at L, [t > L] repeats C_L
    masses             (max_iter, G, k)    s_t = sum_i A_t[i, :]; zero for t >= L
    iterations         (G,) int64          L per group
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

# name -> module implementing its passes.
_MODULES = {
    "torch": "dkm_kernels.backends.torch_chunked",
    "triton": "dkm_kernels.backends.triton_kernels",
    "cpu": "dkm_kernels.backends.cpu",
}
BACKENDS = ("auto", "reference", *_MODULES)

# What `auto` tries first, by device type; `torch` runs everywhere and closes every list.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}

_LOADED: dict[str, ModuleType | None] = {}


def load_all() -> None:
    """Import every backend once (at package import), so that choosing one later is a dict lookup
    that torch.compile traces without a graph break."""
    for name, module in _MODULES.items():
        if name not in _LOADED:
            try:
                _LOADED[name] = importlib.import_module(module)
            except ImportError:  # an optional dependency (triton) is missing
                _LOADED[name] = None


def load(name: str) -> ModuleType | None:
    """The backend's module, or None when it cannot be imported here (say, no triton)."""
    return _LOADED.get(name)


def check_name(name) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if name == "reference":
        return None
    module = load(name)
    if module is None:
        return f"the {name!r} backend could not be imported (is its dependency installed?)"
    return module.unavailable_reason(device, dtype)


def choose(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend that can run on this device and dtype."""
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if unavailable_reason(name, device, dtype) is None:
            return name
    return "torch"


def resolve(name, device: torch.device, dtype: torch.dtype) -> str:
    """`name` itself when it can run here ('auto': the fastest that can), else a ValueError."""
    check_name(name)
    if name == "auto":
        return choose(device, dtype)
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run here: {reason}")
    return name


def passes(name: str, weights: Tensor, k: int, tau: float, deterministic: bool):
    """The pass kernels of backend `name` bound to these weights (recurrence.Passes)."""
    name = resolve(name, weights.device, weights.dtype)
    if name == "reference":
        raise ValueError("backend='reference' is plain autograd, not a backend of the op; "
                         "call dkm_kernels.dkm(..., backend='reference')")
    return load(name).Passes(weights, k, tau, deterministic)


def ragged_passes_class(name: str, device: torch.device, dtype: torch.dtype):
    """The class of backend `name`'s passes over many problems at once (docs/design.md §12), or
    None when it has none. It is built as `RaggedPasses(weights, layout, taus, deterministic)`
    (weights a list, layout a `many.Layout`) and has the methods of `many.RaggedPasses`."""
    name = resolve(name, device, dtype)
    return None if name == "reference" else getattr(load(name), "RaggedPasses", None)
