"""Backend `torch` against the float64 reference: values, centroids, iterations, gradients."""
import pytest
import torch

import dkm_kernels
from dkm_kernels.backends import torch_chunked
from oracle import (
    assert_low_precision_close,
    assert_matches_reference_float64,
    make_problem,
    run,
    staggered_groups,
)


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


def test_grouped_groups_stop_on_their_own(small_chunks):
    """Groups that converge at different iterations give what each gives alone."""
    weights, centroids, tau = staggered_groups(211, groups=4)
    ours, ref = assert_matches_reference_float64("torch", weights, centroids, tau, max_iter=8,
                                                 epsilon=1e-3)
    assert len(set(ref[2].tolist())) > 1, f"groups should stop at different iterations: {ref[2]}"
    for g in range(4):
        alone = run("torch", weights[g], centroids[g], tau, 8, 1e-3)
        torch.testing.assert_close(alone[0], ours[0][g], rtol=1e-12, atol=1e-12)
        assert alone[2].item() == ours[2][g].item()


def test_zero_mass_centroid_keeps_its_position(small_chunks):
    """A centroid no row attends to stays put, and neither it nor its gradient turns into NaN."""
    weights, centroids, tau = make_problem(300, 2, k=4, seed=11)
    centroids[3] = 1e3  # exp(-(1e3)^2 / tau) underflows to exactly 0 in float64
    ours, ref = assert_matches_reference_float64("torch", weights, centroids, tau)
    assert torch.equal(ours[1][3], centroids[3])
    assert torch.isfinite(ours[3]).all()


def test_paper_regime(small_chunks):
    """Weights ~ 0.02, tau = 2e-5: the attention is nearly one-hot."""
    weights, centroids, _ = make_problem(1024, 1, k=4, seed=7, scale=0.02)
    assert_matches_reference_float64("torch", weights, centroids, 2e-5)


def test_no_early_stop_runs_max_iter():
    weights, centroids, tau = make_problem(128, 2, k=4, seed=2)
    ours, _ = assert_matches_reference_float64("torch", weights, centroids, tau, max_iter=3,
                                               epsilon=0.0)
    assert ours[2].item() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,d,k", [(1031, 1, 16), (512, 8, 256), (97, 4, 3)])
def test_low_precision(dtype, m, d, k, small_chunks):
    weights, centroids, tau = make_problem(m, d, k, seed=m + d + k, dtype=dtype)
    assert_low_precision_close("torch", weights, centroids, tau)


def test_low_precision_grouped():
    weights, centroids, tau = make_problem(300, 4, k=16, groups=3, seed=9, dtype=torch.bfloat16)
    assert_low_precision_close("torch", weights, centroids, tau)


def test_output_dtype_and_centroid_dtype():
    weights, centroids, tau = make_problem(64, 2, k=4, dtype=torch.float16)
    result = dkm_kernels.dkm(weights, centroids.float(), tau, backend="torch")
    assert result.weights.dtype == torch.float16
    assert result.centroids.dtype == torch.float32
    assert result.iterations.dtype == torch.int64


def test_chunking_does_not_change_the_result(monkeypatch):
    weights, centroids, tau = make_problem(777, 4, k=32, seed=12)
    whole = run("torch", weights, centroids, tau)
    monkeypatch.setattr(torch_chunked, "WORKSPACE_BYTES", 4096)
    assert torch_chunked.rows_per_chunk(1, 32, 4, torch.float64) < 777 // 10
    chunked = run("torch", weights, centroids, tau)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
