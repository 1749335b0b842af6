"""Backend `torch`: portable, memory-efficient DKM in plain PyTorch, on any device.

The forward runs the iterations over chunks of rows and keeps only the centroids and attention
masses of each iteration; the backward recomputes the attention chunk by chunk and applies the
formulas of DESIGN §3. No tensor of size M x k ever exists: a chunk's rows are bounded by
WORKSPACE_BYTES.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._ops import compute_dtype, define_ops
from .iterations import final_centroids, iterate, safe_inverse

# Transient memory one chunk may use. Larger chunks mean fewer, bigger kernel launches.
WORKSPACE_BYTES = 64 * 2**20

# Tensors of k values each that a row of a chunk keeps alive at the busiest point (backward).
_LIVE_ROW_VECTORS = 6


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def rows_per_chunk(groups: int, k: int, d: int, dtype: torch.dtype) -> int:
    """How many rows of every group one chunk takes so that it stays within WORKSPACE_BYTES."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = groups * (_LIVE_ROW_VECTORS * k + 4 * d) * itemsize
    return max(1, WORKSPACE_BYTES // per_row)


@contextlib.contextmanager
def _full_precision_matmul():
    """Scores are divided by a tau as small as 1e-5: TF32 would ruin them."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _attention(w: Tensor, c: Tensor, tau: float) -> Tensor:
    """softmax_j(-||w_i - c_j||^2 / tau) for a chunk: w (G, R, d), c (G, k, d) -> (G, R, k).

    Distances come from differences, not from dot products, so nothing cancels.
    """
    dist = torch.cdist(w, c, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.softmax(dist.square_().div_(-tau), dim=-1)


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def forward(weights: Tensor, centroids: Tensor, tau: float, max_iter: int, epsilon: float,
            deterministic: bool):
    groups, m, d = weights.shape
    k = centroids.shape[1]
    cdtype = compute_dtype(weights.dtype)
    rows = rows_per_chunk(groups, k, d, cdtype)

    def attention_sums(c: Tensor, active: Tensor):  # a stopped group's sums are not used
        weighted_sum = torch.zeros_like(c)
        mass = c.new_zeros((groups, k))
        for rows_slice in _chunks(m, rows):
            w = weights[:, rows_slice].to(cdtype)
            attention = _attention(w, c, tau)
            weighted_sum.baddbmm_(attention.transpose(1, 2), w)
            mass += attention.sum(dim=1)
        return weighted_sum, mass

    with _full_precision_matmul():
        history, masses, iterations = iterate(centroids.to(cdtype), max_iter, epsilon, attention_sums)
        c_last_attention, c_final = final_centroids(history, iterations)
        out = torch.empty_like(weights)
        for rows_slice in _chunks(m, rows):
            w = weights[:, rows_slice].to(cdtype)
            out[:, rows_slice] = torch.bmm(_attention(w, c_last_attention, tau), c_final).to(out.dtype)
    return out, history, masses, iterations


def backward(grad_out: Tensor, weights: Tensor, history: Tensor, masses: Tensor,
             iterations: Tensor, tau: float, deterministic: bool) -> Tensor:
    groups, m, d = weights.shape
    k = history.shape[2]
    cdtype = history.dtype
    rows = rows_per_chunk(groups, k, d, cdtype)
    last = iterations - 1
    c_last_attention, c_final = final_centroids(history, iterations)
    grad_weights = torch.zeros(weights.shape, dtype=cdtype, device=weights.device)

    with _full_precision_matmul():
        # G_L = A_{L-1}^T G~: the gradient reaching the final centroids through the output.
        grad_c = torch.zeros_like(c_final)
        for rows_slice in _chunks(m, rows):
            attention = _attention(weights[:, rows_slice].to(cdtype), c_last_attention, tau)
            grad_c.baddbmm_(attention.transpose(1, 2), grad_out[:, rows_slice].to(cdtype))

        for t in reversed(range(int(iterations.max()))):
            active = (t < iterations)[:, None, None]
            is_last = (t == last)[:, None, None]
            any_last = bool(is_last.any())  # one host sync per iteration, not per chunk
            c, c_next, mass = history[t], history[t + 1], masses[t]
            grad_over_mass = grad_c * safe_inverse(mass).unsqueeze(-1)  # G_{t+1,j} / s_j
            grad_dot_c_next = (grad_over_mass * c_next).sum(dim=-1)  # (G, k)
            sum_ds_w = torch.zeros_like(c)
            sum_ds = c.new_zeros((groups, k))
            for rows_slice in _chunks(m, rows):
                w = weights[:, rows_slice].to(cdtype)
                attention = _attention(w, c, tau)
                # dA_ij = G_{t+1,j} . (w_i - C_{t+1,j}) / s_j  (+ G~_i . C_L,j on the last one)
                grad_a = torch.bmm(w, grad_over_mass.transpose(1, 2)) - grad_dot_c_next.unsqueeze(1)
                if any_last:
                    go = grad_out[:, rows_slice].to(cdtype)
                    grad_a += is_last * torch.bmm(go, c_final.transpose(1, 2))
                grad_s = attention * (grad_a - (attention * grad_a).sum(dim=-1, keepdim=True))
                grad_s_rows = grad_s.sum(dim=-1, keepdim=True)
                grad_w = torch.bmm(attention, grad_over_mass)
                grad_w -= (2.0 / tau) * (w * grad_s_rows - torch.bmm(grad_s, c))
                grad_weights[:, rows_slice] += torch.where(active, grad_w, 0.0)
                sum_ds_w.baddbmm_(grad_s.transpose(1, 2), w)
                sum_ds += grad_s.sum(dim=1)
            grad_c_t = (2.0 / tau) * (sum_ds_w - c * sum_ds.unsqueeze(-1))
            # A centroid without mass is carried over unchanged: its gradient passes through.
            grad_c_t += torch.where((mass > 0).unsqueeze(-1), 0.0, grad_c)
            grad_c = torch.where(active, grad_c_t, grad_c)
    return grad_weights.to(weights.dtype)


forward_op = define_ops("torch", forward, backward)
