"""Hard k-means pieces: nearest-centroid assignment in bounded memory, and Lloyd's iterations.

Used by the layer's evaluation mode and post-training palettes, and by snapping and export.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Rows of one chunk when computing nearest centroids, so that no M x k matrix is ever built.
_ASSIGN_CHUNK_BYTES = 32 * 2**20
# Bytes budgeted per row-centroid distance in a chunk: a distance in the widest dtype it can have
# (float64), which also covers the float32 case with cdist's workspace.
_DISTANCE_BYTES = torch.float64.itemsize


def nearest_centroids_checked(rows: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest centroid of every row, and whether that distance is finite.

    rows (G, M, d), centroids (G, k, d) -> indices (G, M), finite (G, M) bool. A row holding NaN or
    Inf has no nearest centroid (its distances are NaN or Inf); `finite` says so from the distances
    already computed, without another pass over the rows or a wait for the device. Ties go to the
    lowest index. Distances are sums of squared differences in the centroids' dtype.
    """
    groups, m, _ = rows.shape
    k = centroids.shape[1]
    chunk = max(1, _ASSIGN_CHUNK_BYTES // (_DISTANCE_BYTES * groups * k))
    out = torch.empty((groups, m), dtype=torch.int64, device=rows.device)
    finite = torch.empty((groups, m), dtype=torch.bool, device=rows.device)
    for start in range(0, m, chunk):
        block = rows[:, start:start + chunk].to(centroids.dtype)
        dist = torch.cdist(block, centroids, compute_mode="donot_use_mm_for_euclid_dist")
        nearest, index = dist.min(dim=-1)
        out[:, start:start + chunk] = index
        finite[:, start:start + chunk] = torch.isfinite(nearest)
    return out, finite


def nearest_centroids(rows: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of every row: rows (G, M, d), centroids (G, k, d) -> (G, M).

    Raises ValueError when a row holds NaN or Inf (it has no nearest centroid).
    """
    indices, finite = nearest_centroids_checked(rows, centroids)
    if not bool(finite.all()):
        raise ValueError("weights contain NaN or Inf, which have no nearest centroid; "
                         "check the weights' values")
    return indices


def lloyd_kmeans(rows: Tensor, centroids: Tensor, iterations: int = 50) -> Tensor:
    """Plain (hard) k-means from a warm start: rows (G, M, d), centroids (G, k, d) -> (G, k, d).

    An empty cluster keeps its centroid. Stops early when no assignment changes.
    """
    rows = rows.to(centroids.dtype)
    groups, _, d = rows.shape
    k = centroids.shape[1]
    centroids = centroids.clone()
    previous = None
    for _ in range(iterations):
        assignment = nearest_centroids(rows, centroids)
        if previous is not None and torch.equal(assignment, previous):
            break
        previous = assignment
        flat = (assignment + k * torch.arange(groups, device=rows.device)[:, None]).reshape(-1)
        sums = torch.zeros(groups * k, d, dtype=rows.dtype, device=rows.device)
        sums.index_add_(0, flat, rows.reshape(-1, d))
        counts = torch.bincount(flat, minlength=groups * k).to(rows.dtype).unsqueeze(1)
        means = (sums / counts.clamp_min(1)).reshape(groups, k, d)
        centroids = torch.where(counts.reshape(groups, k, 1) > 0, means, centroids)
    return centroids
