"""The DKM op: defined once, for every device and backend (docs/design.md §5).

    dkm_kernels::dkm_forward(weights, centroids, tau, max_iter, epsilon, deterministic, backend,
                             group_name="") -> (out, centroid_history, masses, iterations)
    dkm_kernels::dkm_backward(grad_out, weights, centroid_history, masses, iterations, tau,
                              deterministic, backend, group_name="") -> grad_weights

on grouped tensors (shapes in `backends/__init__.py`). One implementation, the shared recurrence
(`recurrence.py`), runs on any device; what differs per device is the pass kernels, looked up by
`backend`: "auto" takes the fastest for the tensors' device (`backends.choose`), a name forces one
(tests and benchmarks compare them). The fake implementations check shapes as the real ones do,
and the outputs are sized by max_iter, so shapes are static and torch.compile(fullgraph=True)
traces through the op. Only the first derivative is defined.

`group_name` names a torch.distributed process group (`ProcessGroup.group_name`, as torch's
functional collectives take it; "" for none): the weights are then this rank's rows of a problem
split across the group's ranks, and every pass all-reduces its partial sums (docs/design.md §11).

Every check here reads shapes, dtypes and devices only: nothing syncs with the device. Values are
checked where the work already looks at them (NaN and Inf in the recurrence's first pass).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends, recurrence
from .recurrence import compute_dtype

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The op keeps max_iter + 1 centroid sets of G*k*d values; past this many iterations DKM has long
# converged (the paper runs 5), and a typo's max_iter would allocate without bound.
MAX_ITER_LIMIT = 10_000


class ErrorPrefix:
    """Re-raises a ValueError / TypeError with `prefix` in front (say, which layer or problem the
    error is about); no cost otherwise, and "" adds nothing."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not self.prefix or kind is None or not issubclass(kind, (ValueError, TypeError)):
            return False
        raise (ValueError if issubclass(kind, ValueError) else TypeError)(
            f"{self.prefix}{error}") from error


def _check_tau(tau: float) -> None:
    if not (tau > 0 and tau < float("inf")):
        raise ValueError(f"tau must be finite and > 0, got {tau}")


def process_group(group_name: str):
    """The process group named `group_name`, or None for ""."""
    if not group_name:
        return None
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError(f"group_name={group_name!r} needs torch.distributed initialised "
                         f"(torch.distributed.init_process_group) on every rank")
    from torch.distributed.distributed_c10d import _resolve_process_group
    try:
        return _resolve_process_group(group_name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"group_name={group_name!r} names no process group ({error}); pass "
                         f"ProcessGroup.group_name of a group every rank created") from None


def check_inputs(weights: Tensor, centroids: Tensor, tau: float, max_iter: int,
                 epsilon: float, sharded: bool = False) -> None:
    """The forward's arguments, against each other; errors name the argument and the fix.
    `sharded`: the weights are one rank's rows, and a rank may hold none."""
    if weights.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weights must be float16, bfloat16, float32 or float64, got "
                        f"{weights.dtype}; convert with weights.float()")
    if weights.dim() != 3 or centroids.dim() != 3:
        raise ValueError(f"the op takes weights (G, M, d) and centroids (G, k, d), got "
                         f"{tuple(weights.shape)} and {tuple(centroids.shape)}; "
                         f"dkm_kernels.dkm() also takes (M, d) and (k, d)")
    groups, rows, dim = weights.shape
    if rows < (0 if sharded else 1) or dim < 1 or centroids.shape[1] < 1:
        raise ValueError(f"weights need M >= 1 rows of d >= 1 (M = 0 only on a rank of a process "
                         f"group) and centroids k >= 1, got weights {tuple(weights.shape)} and "
                         f"centroids {tuple(centroids.shape)}")
    if centroids.shape[0] != groups or centroids.shape[2] != dim:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match weights "
                         f"{tuple(weights.shape)}: they must be (G={groups}, k, d={dim})")
    if centroids.device != weights.device:
        raise ValueError(f"centroids are on {centroids.device} but weights are on "
                         f"{weights.device}; move them with centroids.to(weights.device)")
    if centroids.dtype != compute_dtype(weights.dtype):
        raise TypeError(f"centroids are {centroids.dtype}; for {weights.dtype} weights they must "
                        f"be {compute_dtype(weights.dtype)} (the compute dtype)")
    _check_tau(tau)
    if not 1 <= max_iter <= MAX_ITER_LIMIT:
        raise ValueError(f"max_iter must be an integer from 1 to {MAX_ITER_LIMIT}, got {max_iter}")
    if not (epsilon >= 0 and epsilon < float("inf")):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")


def check_backward_inputs(grad_out: Tensor, weights: Tensor, history: Tensor, masses: Tensor,
                          iterations: Tensor, tau: float) -> None:
    groups, _, dim = weights.shape
    if grad_out.shape != weights.shape or grad_out.device != weights.device:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} on {grad_out.device} must match "
                         f"weights {tuple(weights.shape)} on {weights.device}")
    steps = masses.shape[0] if masses.dim() == 3 else -1
    expected = ((steps + 1, groups, -1, dim), (steps, groups, -1), (groups,))
    for name, tensor, shape in zip(("centroid_history", "masses", "iterations"),
                                   (history, masses, iterations), expected):
        if tensor.dim() != len(shape) or any(want not in (-1, got)
                                             for want, got in zip(shape, tensor.shape)):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; the forward of weights "
                             f"{tuple(weights.shape)} returns centroid_history (L+1, G, k, d), "
                             f"masses (L, G, k) and iterations (G,): pass those")
        if tensor.device != weights.device:
            raise ValueError(f"{name} is on {tensor.device} but weights are on {weights.device}")
    if steps < 1 or history.shape[2] != masses.shape[2] or history.shape[2] < 1:
        raise ValueError(f"centroid_history {tuple(history.shape)} and masses "
                         f"{tuple(masses.shape)} disagree on k or hold no iteration")
    cdtype = compute_dtype(weights.dtype)
    if history.dtype != cdtype or masses.dtype != cdtype or iterations.dtype != torch.int64:
        raise TypeError(f"centroid_history and masses must be {cdtype} and iterations int64, got "
                        f"{history.dtype}, {masses.dtype} and {iterations.dtype}")
    _check_tau(tau)


@torch.library.custom_op("dkm_kernels::dkm_forward", mutates_args=())
def dkm_forward(weights: Tensor, centroids: Tensor, tau: float, max_iter: int, epsilon: float,
                deterministic: bool, backend: str,
                group_name: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_inputs(weights, centroids, tau, max_iter, epsilon, sharded=bool(group_name))
    group = process_group(group_name)
    passes = backends.passes(backend, weights.contiguous(), centroids.shape[1], tau,
                             deterministic)
    with torch.no_grad():
        return recurrence.forward(passes, centroids.contiguous(), max_iter, epsilon, group)


def empty_forward_outputs(weights: Tensor, centroids: Tensor, max_iter: int):
    """Uninitialised (out, centroid_history, masses, iterations) of a forward: the fakes' result."""
    groups, _, dim = weights.shape
    k = centroids.shape[1]
    cdtype = compute_dtype(weights.dtype)
    return (
        torch.empty_like(weights, memory_format=torch.contiguous_format),
        weights.new_empty((max_iter + 1, groups, k, dim), dtype=cdtype),
        weights.new_empty((max_iter, groups, k), dtype=cdtype),
        weights.new_empty((groups,), dtype=torch.int64),
    )


@dkm_forward.register_fake
def _(weights, centroids, tau, max_iter, epsilon, deterministic, backend, group_name=""):
    check_inputs(weights, centroids, tau, max_iter, epsilon, sharded=bool(group_name))
    return empty_forward_outputs(weights, centroids, max_iter)


@torch.library.custom_op("dkm_kernels::dkm_backward", mutates_args=())
def dkm_backward(grad_out: Tensor, weights: Tensor, centroid_history: Tensor, masses: Tensor,
                 iterations: Tensor, tau: float, deterministic: bool, backend: str,
                 group_name: str = "") -> Tensor:
    check_backward_inputs(grad_out, weights, centroid_history, masses, iterations, tau)
    group = process_group(group_name)
    weights = weights.contiguous()
    passes = backends.passes(backend, weights, centroid_history.shape[2], tau, deterministic)
    with torch.no_grad():
        grad = recurrence.backward(passes, grad_out.to(weights.dtype).contiguous(),
                                   centroid_history.contiguous(), masses.contiguous(),
                                   iterations.contiguous(), tau, group)
    return grad.to(weights.dtype)


@dkm_backward.register_fake
def _(grad_out, weights, centroid_history, masses, iterations, tau, deterministic, backend,
      group_name=""):
    check_backward_inputs(grad_out, weights, centroid_history, masses, iterations, tau)
    return torch.empty_like(weights, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    weights, _, tau, _, _, deterministic, backend, *group = inputs
    _, centroid_history, masses, iterations = output
    ctx.mark_non_differentiable(centroid_history, masses, iterations)
    # Everything saved is W (alive anyway) or O(L k d): the attention is recomputed.
    ctx.save_for_backward(weights, centroid_history, masses, iterations)
    ctx.options = (tau, deterministic, backend, group[0] if group else "")
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *unused_grads):
    unused = (None,) * (len(ctx.needs_input_grad) - 1)
    if grad_out is None or not ctx.needs_input_grad[0]:
        return (None,) + unused
    weights, centroid_history, masses, iterations = ctx.saved_tensors
    grad = dkm_backward(grad_out, weights, centroid_history, masses, iterations, *ctx.options)
    return (grad,) + unused


def _no_double_backward(ctx, grad):
    raise RuntimeError("DKM supports first derivatives only: its backward is not differentiable")


dkm_forward.register_autograd(_backward, setup_context=_setup_context)
dkm_backward.register_autograd(_no_double_backward)
