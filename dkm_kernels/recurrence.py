"""The DKM recurrence, written once for every fused backend (docs/design.md §3, §4).

A backend supplies only its pass kernels (`Passes`): one sweep over the rows of W that recomputes
the attention tile by tile and reduces what crosses rows into k x d sums. This module runs the
passes in order and does the O(L k d) work between them on the host side of the op:

    forward    L passes of `attention_sums` (the centroid updates and each group's epsilon stop),
               then one `output` pass: W~ = A_{L-1} C_L.
    backward   one `attention_sums` pass over the upstream gradient (G_L = A_{L-1}^T G~), then one
               `gradient` pass per iteration, groups aligned at their last iteration.

With a process group, W is this rank's rows of one problem split across the ranks (docs/design.md
§11): every cross-row sum a pass returns is all-reduced (`_all_reduce`), so every rank computes the
same centroids, stop decisions and NaN check, and its row gradients are exact for its rows.

Shapes are grouped, as in `backends/__init__.py`: W (G, M, d), centroids (G, k, d).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .capture import capturing

# A centroid whose attention mass is below this counts as having none: it keeps its position, its
# 1/s terms vanish and its gradient passes through unchanged. The float32 backends flush or lose
# attention values below float32's smallest normal number (2^-126) in every row; even summed over
# 2^24 rows that is 2^-102, far below this threshold, so a mass at or above it is accurate to
# float32 rounding, and every backend and the float64 reference classify each centroid alike.
# A centroid this light contributes under 2^-64 of one row's attention to any output.
MIN_MASS = 2.0 ** -64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in float64 for float64 inputs and in float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_mass(mass: Tensor) -> Tensor:
    return mass >= MIN_MASS


def inverse_mass(mass: Tensor) -> Tensor:
    """1 / s_j, and 0 for a centroid without mass (its terms vanish)."""
    return torch.where(has_mass(mass), 1.0 / mass.clamp_min(MIN_MASS), 0.0)


class Passes(Protocol):
    """The pass kernels of one backend, bound to the weights W (G, M, d), k, tau and the
    reduction mode. Every pass skips (or discards) the groups whose `active` entry is False."""

    weights: Tensor

    def attention_sums(self, values: Tensor, centroids: Tensor,
                       active: Tensor) -> tuple[Tensor, Tensor]:
        """A = softmax(-|w_i - c_j|^2 / tau); returns sum_i A_ij v_i (G, k, d) and sum_i A_ij
        (G, k) in the compute dtype, for v = W (an iteration) or v = G~ (the backward's G_L)."""

    def output(self, attention_centroids: Tensor, final_centroids: Tensor) -> Tensor:
        """W~ = A C_L with A the attention to `attention_centroids`; (G, M, d) in W's dtype."""

    def gradient(self, grad_out: Tensor | None, centroids: Tensor, grad_over_mass: Tensor,
                 grad_dot_next: Tensor, final_centroids: Tensor, active: Tensor,
                 grad_weights: Tensor, mass: Tensor) -> Tensor:
        """One backward pass for iteration t (§3): with A = A_t (attention to `centroids` = C_t),
            dA_ij = grad_over_mass_j . w_i - grad_dot_next_j  (+ G~_i . C_L,j when grad_out given)
            dS_ij = A_ij (dA_ij - sum_l A_il dA_il)
        adds dW_i = sum_j A_ij grad_over_mass_j + (2/tau) sum_j dS_ij (c_j - w_i) into
        `grad_weights` (G, M, d, compute dtype) for active groups, and returns
        sum_i dS_ij (w_i - c_j) (G, k, d). Differences are best formed before the sums: expanded
        into w_i sum_j dS_ij - sum_j dS_ij c_j, two terms cancel and leave the rounding of |w|
        amplified by 2/tau (docs/design.md §8). `mass` is s_t (G, k), whose grad_over_mass this
        is: a backend may skip pairs too small to count for a centroid of large enough mass
        (the cpu backend's relevance, docs/design.md §8)."""


def _all_reduce(process_group, *partials: Tensor) -> tuple[Tensor, ...]:
    """The sums over every rank's rows from this rank's partial sums, in one collective; the
    partials themselves without a group. All-reducing the same fixed-order partials gives the
    same bits run to run for a fixed world size, and the same bits on every rank."""
    if process_group is None:
        return partials
    flat = torch.cat([partial.reshape(-1) for partial in partials])
    torch.distributed.all_reduce(flat, group=process_group)
    sizes = [partial.numel() for partial in partials]
    return tuple(piece.view_as(partial)
                 for piece, partial in zip(flat.split(sizes), partials))


def forward(passes: Passes, centroids: Tensor, max_iter: int, epsilon: float | Tensor,
            process_group=None, limits: Tensor | None = None):
    """Iterate from the warm start `centroids` (G, k, d, compute dtype), then the output pass.

    Returns (W~, history (max_iter + 1, G, k, d), masses (max_iter, G, k), iterations (G,)):
    history[t] = C_t, and a group that stopped after L iterations repeats C_L in history[t > L]
    and has zero masses for t >= L. `process_group`: the group whose ranks hold the other rows.
    Many problems in one call (docs/design.md §12) give `epsilon` per group, (G,), and `limits`,
    each group's own max_iter (G,) int64, at most `max_iter`.
    """
    groups, k, d = centroids.shape
    # Backends whose kernels skip a stopped group on the device (reading `active` there) run every
    # iteration with no host sync in between: the stop costs a launch that does nothing instead
    # of a sync per iteration. The others read the stop test on the host and break early.
    stops_on_device = getattr(passes, "stops_on_device", False)
    if not stops_on_device and capturing():
        raise RuntimeError("only backend='triton' runs under CUDA-graph capture: the other "
                           "backends read their stop test on the host each iteration")
    history = centroids.new_empty((max_iter + 1, groups, k, d))
    masses = centroids.new_zeros((max_iter, groups, k))
    iterations = (torch.full((groups,), max_iter, dtype=torch.int64, device=centroids.device)
                  if limits is None else limits.clone())
    active = torch.ones(groups, dtype=torch.bool, device=centroids.device)
    history[0] = centroids
    for t in range(max_iter):
        c = history[t]
        weighted_sum, mass = _all_reduce(process_group,
                                         *passes.attention_sums(passes.weights, c, active))
        # A division, not a product with 1/s: the mean of equal weights is then exactly that
        # weight (16-bit weights repeat), as in the reference, and a tie between two centroids
        # at a tiny tau is not broken by a rounding of 1/s.
        c_next = torch.where(has_mass(mass).unsqueeze(-1),
                             weighted_sum / mass.clamp_min(MIN_MASS).unsqueeze(-1), c)
        c_next = torch.where(active[:, None, None], c_next, c)  # a stopped group stays put
        history[t + 1] = c_next
        masses[t] = torch.where(active[:, None], mass, 0.0)
        converged = active & ((c_next - c).abs().amax(dim=(1, 2)) <= epsilon)
        iterations.masked_fill_(converged, t + 1)  # no host sync (a boolean index would sync)
        active &= ~converged
        if limits is not None:
            active &= limits > t + 1  # a group at its own max_iter stops with that count
        if t == 0:
            # A NaN or Inf weight (or centroid) turns its row's attention, and so these sums, into
            # NaN; so does a squared distance beyond the compute dtype's range. Checked on k x d
            # values, with the stop test's host sync (or the one at the end, below).
            finite = torch.isfinite(c_next).all() & torch.isfinite(mass).all()
        if stops_on_device:
            continue  # every iteration runs; a stopped group's passes do nothing and it stays put
        if t == 0:
            any_active, finite_now = torch.stack([active.any(), finite]).tolist()
            _check_finite(finite_now)
        else:
            any_active = bool(active.any())
        if not any_active:
            history[t + 2:] = c_next
            break
    if stops_on_device and capturing():
        # A captured graph cannot read the device: the check runs there and fails the next launch.
        torch._assert_async(finite, NOT_FINITE)
    elif stops_on_device:
        _check_finite(bool(finite))  # the forward's one host sync
    group = torch.arange(groups, device=centroids.device)
    out = passes.output(history[iterations - 1, group], history[iterations, group])
    return out, history, masses, iterations


NOT_FINITE = ("weights or centroids contain NaN or Inf, or weights so large that their squared "
              "distances overflow float32 (|w| above about 1e18); DKM needs finite weights: check "
              "the layer's values or the training step that produced them")


def _check_finite(finite: bool) -> None:
    if not finite:
        raise ValueError(NOT_FINITE)


def _backward_steps(iterations: Tensor, max_iter: int) -> int:
    """The longest group's iteration count, after checking that every count indexes the history
    (out of range they would read outside it); one host sync for both. Under CUDA-graph capture,
    which cannot read the device, the check runs on the device and every step runs: a group past
    its own count is inactive in the later steps, whose passes skip it: the same result."""
    if not iterations.numel():
        return 0
    if capturing():
        torch._assert_async((iterations.min() >= 1) & (iterations.max() <= max_iter),
                             f"iterations must lie in [1, {max_iter}] (what the forward returned)")
        return max_iter
    low, high = torch.stack([iterations.min(), iterations.max()]).tolist()
    if low < 1 or high > max_iter:
        raise ValueError(f"iterations must lie in [1, {max_iter}] (what the forward "
                         f"returned), got values from {low} to {high}")
    return high


def _zeros_like_weights(weights: Tensor | list[Tensor], dtype: torch.dtype):
    """The gradient accumulator: zeros shaped as the weights (a list of them for many problems)."""
    if isinstance(weights, Tensor):
        return torch.zeros(weights.shape, dtype=dtype, device=weights.device)
    return [_zeros_like_weights(w, dtype) for w in weights]


def backward(passes: Passes, grad_out: Tensor, history: Tensor, masses: Tensor,
             iterations: Tensor, tau: float | Tensor, process_group=None) -> Tensor:
    """dLoss/dW (G, M, d, compute dtype) through every iteration, from G~ = grad_out.

    Groups are aligned at their last iteration: backward step p (1, 2, ...) handles iteration
    t = L_g - p of every group that ran at least p iterations, so the output's term (which needs
    G~) enters every group in the first step. Many problems in one call give `tau` per group as a
    float64 tensor (G, 1, 1), and W, G~ and the result are lists (docs/design.md §12).
    """
    groups = history.shape[1]
    group = torch.arange(groups, device=history.device)
    steps = _backward_steps(iterations, masses.shape[0])
    c_final = history[iterations, group]
    grad_weights = _zeros_like_weights(passes.weights, history.dtype)
    everyone = torch.ones(groups, dtype=torch.bool, device=history.device)
    # 2/tau rounded once to the compute dtype, as a Python float is when it multiplies a tensor.
    two_over_tau = 2.0 / tau
    if isinstance(two_over_tau, Tensor):
        two_over_tau = two_over_tau.to(history.dtype)
    # G_L = A_{L-1}^T G~: the gradient reaching the final centroids through the output.
    grad_c, _ = passes.attention_sums(grad_out, history[iterations - 1, group], everyone)
    grad_c, = _all_reduce(process_group, grad_c)
    for p in range(1, steps + 1):
        active = iterations >= p
        t = (iterations - p).clamp_min(0)
        c, c_next, mass = history[t, group], history[t + 1, group], masses[t, group]
        grad_over_mass = grad_c * inverse_mass(mass).unsqueeze(-1)  # G_{t+1,j} / s_j
        grad_dot_next = (grad_over_mass * c_next).sum(dim=-1)
        sum_ds_diff, = _all_reduce(process_group, passes.gradient(
            grad_out if p == 1 else None, c, grad_over_mass, grad_dot_next, c_final, active,
            grad_weights, mass))
        grad_c_t = two_over_tau * sum_ds_diff
        # A centroid without mass is carried over unchanged: its gradient passes through.
        grad_c_t = grad_c_t + torch.where(has_mass(mass).unsqueeze(-1), 0.0, grad_c)
        grad_c = torch.where(active[:, None, None], grad_c_t, grad_c)
    return grad_weights
