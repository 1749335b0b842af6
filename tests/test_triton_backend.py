"""Backend `triton`: its tiles, blocks and reductions against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), which is slow: shapes are small, but they cover every code path of the
kernels: one centroid block and several (running-max softmax), ragged row tiles, several programs
per group (slot reduction), atomic and deterministic reductions, grouped launches. Tolerances:
oracle.assert_float32_close. What every backend must do is in test_backends.py.
"""
import functools
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import dkm_kernels  # noqa: E402
from dkm_kernels.backends import triton_kernels  # noqa: E402
from oracle import DEVICE, assert_low_precision_close, make_problem  # noqa: E402
from oracle import assert_float32_close as _assert_float32_close  # noqa: E402

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)

assert_float32_close = functools.partial(_assert_float32_close, "triton")


@pytest.fixture
def small_blocks(monkeypatch):
    """Centroid blocks of 16 and row tiles of 16, so that a small k takes the multi-block path
    (two sweeps with a running max) and a small M spans many tiles."""
    monkeypatch.setattr(triton_kernels, "MAX_SINGLE_BLOCK_K", 16)
    monkeypatch.setattr(triton_kernels, "MULTI_BLOCK_K", 16)
    monkeypatch.setattr(triton_kernels, "MULTI_BLOCK_M", 16)


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------


def test_float64_is_refused_with_a_pointer_to_other_backends():
    reason = triton_kernels.unavailable_reason(torch.device(DEVICE), torch.float64)
    assert reason is not None and "backend='torch'" in reason
    weights, centroids, tau = make_problem(8, 2, 2)
    with pytest.raises(ValueError, match="float64"):
        dkm_kernels.dkm(weights.to(DEVICE), centroids.to(DEVICE), tau, backend="triton")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_kernels.unavailable_reason(torch.device("cpu"), torch.float32)
    assert reason is not None and "backend='cpu'" in reason and "backend='torch'" in reason
    assert triton_kernels.unavailable_reason(torch.device("cuda"), torch.float32) is None


# ---------------------------------------------------------------------------------------------
# Float32 against float64, tight
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 97, 256, 509])
@pytest.mark.parametrize("d", [1, 2, 4, 8, 16])
def test_rows_and_dims(m, d):
    weights, centroids, tau = make_problem(m, d, k=16, seed=m * 31 + d)
    assert_float32_close(weights, centroids, tau, epsilon=0.0 if m > 16 else 1e-4)


@pytest.mark.parametrize("k", [1, 2, 3, 16, 256])
def test_centroid_counts_in_one_block(k):
    weights, centroids, tau = make_problem(509 if k < 256 else 293, 4, k=k, seed=k)
    assert_float32_close(weights, centroids, tau)


@pytest.mark.parametrize("deterministic", [True, False])
def test_centroid_count_above_one_block(deterministic):
    """k = 300 > MAX_SINGLE_BLOCK_K: five blocks of 64 centroids, the last one ragged."""
    weights, centroids, tau = make_problem(331, 2, k=300, seed=300)
    assert_float32_close(weights, centroids, tau, max_iter=2, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("m, d, k", [(61, 2, 40), (50, 3, 17)])
def test_multi_block_path_with_small_blocks(m, d, k, deterministic, small_blocks):
    weights, centroids, tau = make_problem(m, d, k=k, seed=k + m)
    assert_float32_close(weights, centroids, tau, deterministic=deterministic)


def test_zero_mass_centroid_above_one_block(small_blocks):
    weights, centroids, tau = make_problem(70, 2, k=20, seed=12)
    centroids[17] = 1e3
    ours, _ = assert_float32_close(weights, centroids, tau)
    assert torch.equal(ours[1][17].cpu(), centroids[17].float())


# ---------------------------------------------------------------------------------------------
# Low precision and the paper's regime, by the rule of FlashAttention's tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_above_one_block(dtype, small_blocks):
    weights, centroids, tau = make_problem(61, 2, k=33, seed=33)
    assert_low_precision_close("triton", weights.to(dtype).to(DEVICE), centroids.float().to(DEVICE),
                               tau)


def test_paper_regime_bfloat16():
    """Weights of a trained layer (std 0.02) and the paper's tau = 2e-5: nearly one-hot."""
    weights, centroids, _ = make_problem(300, 8, k=16, seed=21, scale=0.02)
    assert_low_precision_close("triton", weights.to(torch.bfloat16).to(DEVICE),
                               centroids.float().to(DEVICE), 2e-5)
