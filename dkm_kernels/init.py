"""Warm-start centroids: k-means++ in O(M*k*d) work, and random rows.

Both take weights (M, d) or (G, M, d), return centroids (k, d) or (G, k, d) in the compute dtype
(float64 for float64 weights, float32 otherwise) on the weights' device, and draw every random
number from `generator` when one is given, so a seeded generator gives the same centroids again.
With fewer distinct weight rows than k, some centroids repeat: DKM handles equal centroids (they
share their rows' attention), and nothing divides by zero.

k-means++ on CPU runs as one C++ op when the extension is built (dkm_kernels::cpu_kmeans_plus_plus,
csrc/kmeans_cpu.cpp): every draw in one call, one pass over the rows per draw, the sums of the
draw weights in float64. Elsewhere, or without the extension, it runs as torch operations per draw.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._ops import compute_dtype
from .backends import cpu as cpu_backend
from .functional import check_count

INIT_METHODS = ("kmeans++", "random")
# Seeds drawn from one generator to start another (on a new device, or per layer): any int64 is a
# valid seed; this bound keeps them positive with room to spare.
SEED_BOUND = 2**62


def _check(weights: Tensor, k: int, generator: torch.Generator | None) -> None:
    if not isinstance(weights, Tensor) or weights.dim() not in (2, 3):
        raise ValueError("weights must be a tensor of shape (M, d) or (G, M, d)")
    check_count("n_clusters (k)", k)
    if weights.shape[-2] < 1:
        raise ValueError("weights must have at least one row")
    if generator is not None and generator.device.type != weights.device.type:
        raise ValueError(
            f"generator is on {generator.device} but weights are on {weights.device}; "
            f"create it with torch.Generator(device=weights.device)"
        )


def _per_group(init_single, weights: Tensor, k: int, generator) -> Tensor:
    """init_single(w, k, generator) on the (M, d) weights in the compute dtype, or on each group of
    (G, M, d) weights in order (one generator draws for every group)."""
    _check(weights, k, generator)
    w = weights.detach().to(compute_dtype(weights.dtype))
    if w.dim() == 2:
        return init_single(w, k, generator)
    return torch.stack([init_single(g, k, generator) for g in w.unbind(0)])


def _uniform(generator, device, dtype) -> Tensor:
    return torch.rand((), generator=generator, device=device, dtype=dtype)


def _draw(weight: Tensor, generator) -> Tensor:
    """One index drawn with probability proportional to `weight` (>= 0, not all 0): inverse CDF."""
    cumulative = torch.cumsum(weight, dim=0)
    u = _uniform(generator, weight.device, weight.dtype)
    index = torch.searchsorted(cumulative, (u * cumulative[-1]).unsqueeze(0), right=True)
    return index.clamp_max(weight.shape[0] - 1)[0]


def _counted_kmeans_plus_plus_single(w: Tensor, k: int, generator, counts: Tensor) -> Tensor:
    """k-means++ over distinct rows, row v standing for counts[v] weights: the same distribution
    as k-means++ over the weights (row v is drawn with probability n_v D_v^2 / sum n D^2), in
    O(U k) instead of O(M k). Rows with a count of 0 (padding) are never drawn."""
    counts = counts.to(w.dtype)
    centroids = w.new_empty((k, w.shape[1]))
    centroids[0] = w[_draw(counts, generator)]
    nearest = (w - centroids[0]).square().sum(dim=1)
    for j in range(1, k):
        weight = nearest * counts
        # When every weight already sits on a centroid, any weight will do.
        weight = torch.where(weight.sum() > 0, weight, counts)
        centroids[j] = w[_draw(weight, generator)]
        nearest = torch.minimum(nearest, (w - centroids[j]).square().sum(dim=1))
    return centroids


def _kmeans_plus_plus_single(w: Tensor, k: int, generator) -> Tensor:
    m = w.shape[0]
    centroids = w.new_empty((k, w.shape[1]))
    first = torch.randint(m, (), generator=generator, device=w.device)
    centroids[0] = w[first]
    nearest = (w - centroids[0]).square().sum(dim=1)  # running squared distance to the nearest
    for j in range(1, k):
        cumulative = torch.cumsum(nearest, dim=0)
        total = cumulative[-1]
        # Sample a row with probability proportional to its distance (inverse CDF, any M);
        # when every row already sits on a centroid, any row will do.
        u = _uniform(generator, w.device, w.dtype)
        index = torch.searchsorted(cumulative, (u * total).unsqueeze(0), right=True)
        index = torch.where(total > 0, index.clamp_max(m - 1),
                            torch.randint(m, (1,), generator=generator, device=w.device))
        centroids[j] = w[index[0]]
        nearest = torch.minimum(nearest, (w - centroids[j]).square().sum(dim=1))
    return centroids


def _fused_applies(weights: Tensor) -> bool:
    """Whether the C++ op runs this k-means++: CPU weights, the extension built."""
    return weights.device.type == "cpu" and cpu_backend.unavailable_reason(
        weights.device, compute_dtype(weights.dtype)) is None


def _fused_kmeans_plus_plus(weights: Tensor, k: int, generator, counts: Tensor | None) -> Tensor:
    """Every group's k draws in one call of the C++ op, one float64 uniform per centroid."""
    _check(weights, k, generator)
    w = weights.detach().to(compute_dtype(weights.dtype))
    grouped = w if w.dim() == 3 else w.unsqueeze(0)
    # float64: a float32 uniform has 2^24 values, too coarse to draw among millions of rows.
    uniforms = torch.rand(grouped.shape[0], k, generator=generator, dtype=torch.float64)
    index = torch.ops.dkm_kernels.cpu_kmeans_plus_plus(
        grouped, None if counts is None else counts.reshape(grouped.shape[:2]), uniforms)
    centroids = torch.gather(grouped, 1, index.unsqueeze(-1).expand(-1, -1, grouped.shape[-1]))
    return centroids if w.dim() == 3 else centroids[0]


def kmeans_plus_plus(weights: Tensor, k: int, generator: torch.Generator | None = None,
                     counts: Tensor | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii): each centroid is a row drawn with probability
    proportional to its squared distance to the nearest centroid chosen so far.

    counts ((M,) or (G, M), optional): row i stands for counts[i] weights (distinct values with
    their counts, `dkm_kernels.unique.distinct`); rows of count 0 are never drawn.

    CPU weights with the C++ extension built take the C++ op, anything else torch operations per
    draw. The two draw from the same distribution but use the generator differently (the op takes
    one float64 uniform per centroid, all at once), so one seed gives different centroids on the
    two paths; each path repeats its own.
    """
    if counts is not None and counts.shape != weights.shape[:-1]:
        raise ValueError(f"counts {tuple(counts.shape)} must have the shape of the weights' rows "
                         f"{tuple(weights.shape[:-1])}")
    if isinstance(weights, Tensor) and _fused_applies(weights):
        return _fused_kmeans_plus_plus(weights, k, generator, counts)
    if counts is None:
        return _per_group(_kmeans_plus_plus_single, weights, k, generator)
    rows = iter(counts.reshape(-1, counts.shape[-1]).unbind(0))
    return _per_group(lambda w, k, gen: _counted_kmeans_plus_plus_single(w, k, gen, next(rows)),
                      weights, k, generator)


def _random_single(w: Tensor, k: int, generator) -> Tensor:
    m = w.shape[0]
    if m >= k:
        index = torch.randperm(m, generator=generator, device=w.device)[:k]
    else:
        index = torch.randint(m, (k,), generator=generator, device=w.device)
    return w[index].clone()


def random_rows(weights: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k distinct rows chosen uniformly (with repeats only when there are fewer than k rows)."""
    return _per_group(_random_single, weights, k, generator)


def init_centroids(weights: Tensor, k: int, method: str = "kmeans++",
                   generator: torch.Generator | None = None) -> Tensor:
    """Warm-start centroids by name: 'kmeans++' or 'random'."""
    if method == "kmeans++":
        return kmeans_plus_plus(weights, k, generator)
    if method == "random":
        return random_rows(weights, k, generator)
    raise ValueError(f"init_method must be one of {INIT_METHODS}, got {method!r}")
