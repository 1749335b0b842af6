"""Warm starts: k-means++ and random rows, on both k-means++ paths (the C++ op on CPU, torch
operations per draw elsewhere)."""
import pytest
import torch

import dkm_kernels
from dkm_kernels import init
from dkm_kernels.backends import cpu as cpu_backend
from dkm_kernels.init import INIT_METHODS, init_centroids


@pytest.fixture(params=INIT_METHODS)
def method(request):
    return request.param


@pytest.fixture(autouse=True, params=["op", "torch"])
def kmeans_path(request, monkeypatch):
    """Every test once with the C++ op (where built) and once with the torch path forced."""
    if request.param == "op" and cpu_backend.isa() is None:
        pytest.skip("needs the C++ extension dkm_kernels._C")
    if request.param == "torch":
        monkeypatch.setattr(init, "_fused_applies", lambda weights: False)
    return request.param


def _seeded_init(weights, k, method, seed):
    return init_centroids(weights, k, method, torch.Generator().manual_seed(seed))


def _is_row_of(centroids, weights):
    return (centroids[:, None, :] == weights[None]).all(-1).any(-1).all()


def test_seeded_generator_repeats_and_picks_rows(method):
    weights = torch.randn(1000, 4)
    first = _seeded_init(weights, 16, method, 3)
    again = _seeded_init(weights, 16, method, 3)
    other = _seeded_init(weights, 16, method, 4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (16, 4) and first.dtype == torch.float32
    assert _is_row_of(first, weights)
    assert len(torch.unique(first, dim=0)) == 16


def test_kmeans_plus_plus_finds_separated_clusters():
    """Four tight clusters far apart: k-means++ puts one centroid in each (a uniform draw would
    miss one with probability ~0.9)."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    weights = centers.repeat_interleave(250, 0) + 0.01 * torch.randn(1000, 2, generator=gen)
    for seed in range(10):
        centroids = dkm_kernels.kmeans_plus_plus(weights, 4, torch.Generator().manual_seed(seed))
        nearest = torch.cdist(centroids, centers).argmin(dim=1)
        assert sorted(nearest.tolist()) == [0, 1, 2, 3]


def test_fewer_rows_than_centroids_and_repeated_weights(method):
    few = torch.randn(3, 2)
    centroids = _seeded_init(few, 8, method, 0)
    assert centroids.shape == (8, 2) and _is_row_of(centroids, few)
    same = torch.full((500, 2), 0.25)
    centroids = _seeded_init(same, 16, method, 0)
    assert torch.isfinite(centroids).all() and (centroids == 0.25).all()
    # DKM on such a start stays finite.
    w = same.clone().requires_grad_(True)
    result = dkm_kernels.dkm(w, centroids, 1e-3, backend="torch")
    result.weights.sum().backward()
    assert torch.isfinite(result.weights).all() and torch.isfinite(w.grad).all()


def test_grouped_and_dtypes():
    weights = torch.randn(3, 200, 2, dtype=torch.bfloat16)
    centroids = dkm_kernels.kmeans_plus_plus(weights, 5, torch.Generator().manual_seed(1))
    assert centroids.shape == (3, 5, 2) and centroids.dtype == torch.float32
    assert dkm_kernels.kmeans_plus_plus(weights.double(), 5).dtype == torch.float64


def test_large_layer_samples_beyond_multinomial_limit():
    """Sampling is an inverse CDF, so more than 2**24 rows work (torch.multinomial stops there)."""
    weights = torch.zeros(2**24 + 10, 1)
    weights[-1] = 1.0
    centroids = dkm_kernels.kmeans_plus_plus(weights, 2, torch.Generator().manual_seed(0))
    assert sorted(centroids.flatten().tolist()) == [0.0, 1.0]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_clusters"):
        dkm_kernels.kmeans_plus_plus(torch.randn(10, 2), 0)
    with pytest.raises(ValueError, match="init_method"):
        init_centroids(torch.randn(10, 2), 2, "kmeans")
    with pytest.raises(ValueError, match="generator"):
        dkm_kernels.random_rows(torch.randn(10, 2, device="meta"), 2, torch.Generator())
