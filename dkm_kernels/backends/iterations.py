"""The host side of the DKM iterations, shared by the backends that run them from Python.

A backend supplies one pass over the weights, `attention_sums(c, active) -> (sum_i A_ij w_i,
sum_i A_ij)` for centroids c (G, k, d); this module turns the sums into centroid updates, applies
each group's stopping rule, and records the history the backward needs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def safe_inverse(mass: Tensor) -> Tensor:
    """1 / s_j, and 0 for a centroid with no attention mass (its terms vanish)."""
    return torch.where(mass > 0, 1.0 / torch.where(mass > 0, mass, 1.0), 0.0)


def iterate(centroids: Tensor, max_iter: int, epsilon: float,
            attention_sums: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]):
    """Run up to max_iter iterations from the warm start `centroids` (G, k, d).

    Returns the history (max_iter + 1, G, k, d), the masses (max_iter, G, k) and the iterations
    (G,) of the backend interface (backends/__init__.py). A group stops after the iteration in
    which no centroid moved more than epsilon; from then on its centroids stay put.
    """
    groups, k, d = centroids.shape
    history = centroids.new_empty((max_iter + 1, groups, k, d))
    masses = centroids.new_zeros((max_iter, groups, k))
    iterations = torch.full((groups,), max_iter, dtype=torch.int64, device=centroids.device)
    active = torch.ones(groups, dtype=torch.bool, device=centroids.device)
    history[0] = centroids
    for t in range(max_iter):
        c = history[t]
        weighted_sum, mass = attention_sums(c, active)
        moved = weighted_sum * safe_inverse(mass).unsqueeze(-1)
        c_next = torch.where((mass > 0).unsqueeze(-1), moved, c)  # no mass: keep the position
        c_next = torch.where(active[:, None, None], c_next, c)  # a stopped group stays put
        history[t + 1] = c_next
        masses[t] = torch.where(active[:, None], mass, 0.0)
        converged = active & ((c_next - c).abs().amax(dim=(1, 2)) <= epsilon)
        iterations[converged] = t + 1
        active &= ~converged
        if not bool(active.any()):
            history[t + 2:] = c_next
            break
    return history, masses, iterations


def final_centroids(history: Tensor, iterations: Tensor) -> tuple[Tensor, Tensor]:
    """Per group, C_{L-1} (the centroids of the last attention) and C_L, each (G, k, d)."""
    group = torch.arange(history.shape[1], device=history.device)
    return history[iterations - 1, group].contiguous(), history[iterations, group].contiguous()
