"""Backend `torch`: the DKM passes in plain PyTorch, chunk by chunk, on any device.

Each pass recomputes the attention of a chunk of rows (distances, softmax) and reduces it into
k x d sums before the next chunk: no tensor of size M x k ever exists, and a chunk's transient
memory is bounded by WORKSPACE_BYTES. The portable default of the op: what `auto` falls back to
where no faster backend runs (MPS, a CPU without the compiled extension).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..recurrence import compute_dtype

# Transient memory one chunk may use. Larger chunks mean fewer, bigger kernel launches.
WORKSPACE_BYTES = 64 * 2**20

# Tensors of k values each that a row of a chunk keeps alive at the busiest point (backward).
_LIVE_ROW_VECTORS = 6


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def rows_per_chunk(groups: int, k: int, d: int, dtype: torch.dtype) -> int:
    """How many rows of every group one chunk takes so that it stays within WORKSPACE_BYTES."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = max(1, groups) * (_LIVE_ROW_VECTORS * k + 4 * d) * itemsize
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

    Distances are sums of squared differences, one coordinate at a time: nothing cancels (as in
    dot-product forms), nothing is rounded twice (as in cdist's square root squared), and the
    transient stays (G, R, k).
    """
    diff = w[:, :, None, 0] - c[:, None, :, 0]
    dist = diff.square()
    for dim in range(1, w.shape[-1]):
        torch.sub(w[:, :, None, dim], c[:, None, :, dim], out=diff)
        dist.addcmul_(diff, diff)
    return torch.softmax(dist.div_(-tau), dim=-1)


class Passes:
    """recurrence.Passes over chunks of rows. Inactive groups are computed and discarded: the
    batched matrix products cost the same either way."""

    def __init__(self, weights: Tensor, k: int, tau: float, deterministic: bool):
        self.weights = weights
        self.tau = tau
        self.cdtype = compute_dtype(weights.dtype)
        # The chunks' k x d partial sums are added in float64 where the device has it (not MPS):
        # a float32 running sum's rounding grows with the number of chunks, beyond that of one
        # matrix product over all rows (the plain reference's).
        self.sum_dtype = torch.float64 if weights.device.type != "mps" else self.cdtype
        self.groups, self.m, self.d = weights.shape
        self.k = k

    def _chunks(self):
        size = rows_per_chunk(self.groups, self.k, self.d, self.cdtype)
        for start in range(0, self.m, size):
            rows = slice(start, min(start + size, self.m))
            yield rows, self.weights[:, rows].to(self.cdtype)

    def attention_sums(self, values, centroids, active):
        weighted_sum = centroids.new_zeros(centroids.shape, dtype=self.sum_dtype)
        mass = centroids.new_zeros(centroids.shape[:2], dtype=self.sum_dtype)
        with _full_precision_matmul():
            for rows, w in self._chunks():
                attention = _attention(w, centroids, self.tau)
                weighted_sum += torch.bmm(attention.transpose(1, 2), values[:, rows].to(self.cdtype))
                mass += attention.sum(dim=1)
        return weighted_sum.to(self.cdtype), mass.to(self.cdtype)

    def output(self, attention_centroids, final_centroids):
        out = torch.empty_like(self.weights, memory_format=torch.contiguous_format)
        with _full_precision_matmul():
            for rows, w in self._chunks():
                attention = _attention(w, attention_centroids, self.tau)
                out[:, rows] = torch.bmm(attention, final_centroids).to(out.dtype)
        return out

    def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
                 active, grad_weights, mass):
        sum_ds_diff = centroids.new_zeros(centroids.shape, dtype=self.sum_dtype)
        active = active[:, None, None]
        with _full_precision_matmul():
            for rows, w in self._chunks():
                attention = _attention(w, centroids, self.tau)
                grad_a = torch.bmm(w, grad_over_mass.transpose(1, 2)) - grad_dot_next.unsqueeze(1)
                if grad_out is not None:
                    go = grad_out[:, rows].to(self.cdtype)
                    grad_a += torch.bmm(go, final_centroids.transpose(1, 2))
                grad_s = attention * (grad_a - (attention * grad_a).sum(dim=-1, keepdim=True))
                grad_w = torch.bmm(attention, grad_over_mass)
                # sum_j dS_ij (c_j - w_i) and sum_i dS_ij (w_i - c_j) with the differences formed
                # first, one coordinate at a time (recurrence.Passes.gradient): a (rows, k) tensor
                # at a time instead of (rows, k, d).
                for dim in range(w.shape[-1]):
                    weighted = grad_s * (centroids[:, None, :, dim] - w[:, :, dim, None])
                    grad_w[..., dim] += (2.0 / self.tau) * weighted.sum(dim=-1)
                    sum_ds_diff[..., dim] -= weighted.sum(dim=1)
                grad_weights[:, rows] += torch.where(active, grad_w, 0.0)
        return sum_ds_diff.to(self.cdtype)
