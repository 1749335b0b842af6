"""Backend `torch`: shape sweeps over many chunks, and chunking that does not change the result.

What every backend must do is in test_backends.py."""
import pytest
import torch

from dkm_kernels.backends import torch_chunked
from oracle import assert_low_precision_close, assert_matches_reference_float64, make_problem, run


@pytest.fixture
def small_chunks(monkeypatch):
    """A workspace of a few KB, so that every pass runs over many chunks."""
    monkeypatch.setattr(torch_chunked, "WORKSPACE_BYTES", 8 * 1024)


@pytest.mark.parametrize("m", [1, 97, 256, 1031])
@pytest.mark.parametrize("d", [1, 2, 4, 8, 16])
def test_float64_rows_and_dims(m, d, small_chunks):
    weights, centroids, tau = make_problem(m, d, k=16, seed=m * 31 + d)
    assert_matches_reference_float64("torch", weights, centroids, tau)


@pytest.mark.parametrize("k", [1, 2, 3, 16, 256, 300])
def test_float64_centroid_counts(k, small_chunks):
    weights, centroids, tau = make_problem(509, 4, k=k, seed=k)
    assert_matches_reference_float64("torch", weights, centroids, tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,d,k", [(1031, 1, 16), (512, 8, 256), (97, 4, 3)])
def test_low_precision(dtype, m, d, k, small_chunks):
    weights, centroids, tau = make_problem(m, d, k, seed=m + d + k, dtype=dtype)
    assert_low_precision_close("torch", weights, centroids, tau)


def test_chunking_does_not_change_the_result(monkeypatch):
    weights, centroids, tau = make_problem(777, 4, k=32, seed=12)
    whole = run("torch", weights, centroids, tau)
    monkeypatch.setattr(torch_chunked, "WORKSPACE_BYTES", 4096)
    assert torch_chunked.rows_per_chunk(1, 32, 4, torch.float64) < 777 // 10
    chunked = run("torch", weights, centroids, tau)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
