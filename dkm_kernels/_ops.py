"""The DKM custom ops: schemas, fake (shape) implementations and autograd, in one place.

Each backend is a pair of ops, `dkm_kernels::<name>_forward` and `dkm_kernels::<name>_backward`,
with the signatures documented in `backends/__init__.py`. Python backends define theirs with
`define_ops`; a backend whose ops are defined elsewhere (the C++ extension registers its own schema
with TORCH_LIBRARY) calls `register_fake_and_autograd` for the rest.

Outputs are sized by max_iter, not by the number of iterations run, so shapes are static and
`torch.compile(fullgraph=True)` traces through the op.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

NAMESPACE = "dkm_kernels"

FORWARD_SCHEMA = (
    "(Tensor weights, Tensor centroids, float tau, int max_iter, float epsilon, bool deterministic)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor weights, Tensor centroid_history, Tensor masses, Tensor iterations,"
    " float tau, bool deterministic) -> Tensor"
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in float64 for float64 inputs and in float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite(weights: Tensor) -> None:
    """Raised inside the ops so that the check also runs under torch.compile."""
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(
            "weights contain NaN or Inf; DKM needs finite weights (check the layer's values "
            "or the training step that produced them)"
        )


def _fake_forward(weights, centroids, tau, max_iter, epsilon, deterministic):
    groups, _, dim = weights.shape
    k = centroids.shape[1]
    cdtype = compute_dtype(weights.dtype)
    return (
        torch.empty_like(weights),
        weights.new_empty((max_iter + 1, groups, k, dim), dtype=cdtype),
        weights.new_empty((max_iter, groups, k), dtype=cdtype),
        weights.new_empty((groups,), dtype=torch.int64),
    )


def _fake_backward(grad_out, weights, centroid_history, masses, iterations, tau, deterministic):
    return torch.empty_like(weights)


def _no_double_backward(ctx, grad):
    raise RuntimeError("DKM supports first derivatives only: its backward is not differentiable")


def register_fake_and_autograd(name: str) -> Callable:
    """Give the ops `<name>_forward/_backward` (schemas already defined) fake impls and autograd.

    Returns the forward op.
    """
    forward_name = f"{NAMESPACE}::{name}_forward"
    backward_name = f"{NAMESPACE}::{name}_backward"
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(backward_name)(_fake_backward)
    backward_op = getattr(getattr(torch.ops, NAMESPACE), f"{name}_backward").default

    def setup_context(ctx, inputs, output):
        weights, _, tau, _, _, deterministic = inputs
        _, centroid_history, masses, iterations = output
        ctx.mark_non_differentiable(centroid_history, masses, iterations)
        # Everything saved is W (alive anyway) or O(L*k*d): the attention is recomputed.
        ctx.save_for_backward(weights, centroid_history, masses, iterations)
        ctx.tau = tau
        ctx.deterministic = deterministic
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, *unused_grads):
        weights, centroid_history, masses, iterations = ctx.saved_tensors
        grad_weights = None
        if grad_out is not None and ctx.needs_input_grad[0]:
            grad_weights = backward_op(
                grad_out.contiguous(), weights, centroid_history, masses, iterations,
                ctx.tau, ctx.deterministic,
            )
        return grad_weights, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_name, _no_double_backward)
    return getattr(getattr(torch.ops, NAMESPACE), f"{name}_forward").default


def define_ops(name: str, forward_impl: Callable, backward_impl: Callable,
               device_types=None) -> Callable:
    """Define `<name>_forward/_backward` from Python implementations and register them fully.

    `device_types` restricts the implementations to those devices (None: any device).
    Returns the forward op.
    """
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    _LIBRARIES.append(lib)  # a Library deregisters its ops when collected
    lib.define(f"{name}_forward{FORWARD_SCHEMA}")
    lib.define(f"{name}_backward{BACKWARD_SCHEMA}")

    # The implementations compute their own gradients: autograd must not record them.
    @torch.no_grad()
    def checked_forward(weights, centroids, tau, max_iter, epsilon, deterministic):
        check_finite(weights)
        return forward_impl(weights, centroids, tau, max_iter, epsilon, deterministic)

    @torch.no_grad()
    def unrecorded_backward(*args):
        return backward_impl(*args)

    for device_type in device_types or ("CompositeExplicitAutograd",):
        key = device_type if device_type == "CompositeExplicitAutograd" else device_type.upper()
        lib.impl(f"{name}_forward", checked_forward, key)
        lib.impl(f"{name}_backward", unrecorded_backward, key)
    return register_fake_and_autograd(name)


_LIBRARIES: list[torch.library.Library] = []
