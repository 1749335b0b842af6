"""Backends of the DKM op.

Every backend computes the same thing (DESIGN: the DKM iterations and their exact gradient) and
exposes the same two operations on *grouped* tensors, already validated by `functional.dkm`:

    forward(weights (G, M, d), centroids (G, k, d) in the compute dtype, tau, max_iter, epsilon,
            deterministic)
        -> out (G, M, d) in weights' dtype,
           centroid_history (max_iter + 1, G, k, d) compute dtype   [0] = warm start, [t] = C_t;
                                                                     after a group stops at L,
                                                                     [t > L] repeats C_L
           masses (max_iter, G, k) compute dtype                    s_t = sum_i A_t[i, :];
                                                                     zero for t >= L
           iterations (G,) int64                                    L per group

    backward(grad_out (G, M, d), weights, centroid_history, masses, iterations, tau, deterministic)
        -> grad_weights (G, M, d) in weights' dtype

The compute dtype is float64 for float64 weights and float32 otherwise.

Each backend module registers its pair as the custom ops `dkm_kernels::<name>_forward` and
`dkm_kernels::<name>_backward` (see `_ops.py`) and has `unavailable_reason(device, dtype)`, which
returns None when it can run on that device and dtype, or a sentence saying why not and what to do.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module implementing it. `reference` is not a custom op: it is plain autograd.
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
