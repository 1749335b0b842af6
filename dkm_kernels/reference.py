"""The naive DKM: plain PyTorch that materialises the M x k attention of every iteration.

It is the oracle of the tests (run it in float64) and the baseline of the benchmarks: its memory
grows as L * M * k, which is the problem the other backends solve. Autograd differentiates through
every iteration.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .recurrence import compute_dtype, has_mass


def squared_distances(weights: Tensor, centroids: Tensor) -> Tensor:
    """||w_i - c_j||^2 for all pairs, (M, k), in the expanded form the public implementations use."""
    w_sq = (weights * weights).sum(dim=1, keepdim=True)
    c_sq = (centroids * centroids).sum(dim=1)
    return (w_sq - 2.0 * weights @ centroids.T + c_sq).clamp_min(0.0)


def _rounded(tensor: Tensor, dtype: torch.dtype | None, generator=None) -> Tensor:
    """`tensor` moved by a random relative error of up to one unit in the last place of `dtype`
    (uniform in [-2u, 2u], u its unit roundoff): a rounding or two, in a random direction."""
    if dtype is None:
        return tensor
    unit = torch.finfo(dtype).eps
    noise = 2 * torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) - 1
    return tensor * (1 + unit * noise.to(tensor.device))


def dkm_single(weights: Tensor, centroids: Tensor, tau: float, max_iter: int, epsilon: float,
               intermediate_dtype: torch.dtype | None = None):
    """One clustering problem: weights (M, d), centroids (k, d) -> (W~, C_L, L).

    `weights` is used in its own dtype (callers upcast); `centroids` is a constant warm start.
    With `intermediate_dtype`, the distances and each iteration's centroids are rounded to it
    (gradients pass through the rounding): the tests' model of the rounding that any evaluation
    holding those intermediates in float32 inherits, however it sums.
    """
    c = centroids.detach().to(weights.dtype)
    for t in range(max_iter):
        distances = _rounded(squared_distances(weights, c), intermediate_dtype)
        attention = torch.softmax(-distances / tau, dim=1)
        mass = attention.sum(dim=0)
        # A centroid nobody attends to (mass below recurrence.MIN_MASS) keeps its position and
        # passes its gradient through.
        heavy = has_mass(mass).unsqueeze(1)
        mean = (attention.T @ weights) / torch.where(heavy, mass.unsqueeze(1), 1.0)
        c_next = _rounded(torch.where(heavy, mean, c), intermediate_dtype)
        delta = (c_next - c).abs().max()
        c = c_next
        if delta.item() <= epsilon:
            break
    return attention @ c, c, t + 1


def dkm_reference(weights: Tensor, centroids: Tensor, tau: float, max_iter: int = 5,
                  epsilon: float = 1e-4, intermediate_dtype: torch.dtype | None = None):
    """Grouped reference: weights (G, M, d), centroids (G, k, d).

    Returns (W~ in weights' dtype, final centroids in the compute dtype, iterations (G,) int64).
    Each group runs alone, exactly as docs/design.md §1 describes.
    """
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contain NaN or Inf; DKM needs finite weights (check the layer's "
                         "values or the training step that produced them)")
    cdtype = compute_dtype(weights.dtype)
    if weights.shape[0] == 0:  # no problems to solve
        return weights.clone(), centroids.clone(), weights.new_zeros((0,), dtype=torch.int64)
    outs, finals, iterations = [], [], []
    for w, c in zip(weights.to(cdtype).unbind(0), centroids.unbind(0)):
        out, final, steps = dkm_single(w, c, tau, max_iter, epsilon, intermediate_dtype)
        outs.append(out)
        finals.append(final.detach())
        iterations.append(steps)
    return (
        torch.stack(outs).to(weights.dtype),
        torch.stack(finals),
        torch.tensor(iterations, dtype=torch.int64, device=weights.device),
    )
