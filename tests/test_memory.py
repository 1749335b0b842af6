"""Bytes saved for backward, counted exactly with saved_tensors_hooks (DESIGN §2).

One 512x512x3x3 layer at 8/8: M = 294,912 rows of d = 8, k = 256, L = 5 iterations. Every fused
backend saves W (alive anyway) + O(L*k*d + L*M); the reference saves at least L*M*k floats.
"""
import pytest
import torch

import dkm_kernels

M, D, K, L = 294_912, 8, 256, 5


def saved_bytes(fn) -> int:
    """Run fn() and add up the bytes of every tensor autograd saves for backward.

    A tensor saved twice counts twice, so this is an upper bound of what backward keeps alive.
    """
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def fused_bound(weights: torch.Tensor) -> int:
    """W's bytes + O(L*k*d + L*M): history (L+1)*k*d, masses L*k, iterations, and room for one
    float per row per iteration (a saved log-sum-exp), at 8 bytes each."""
    return weights.numel() * weights.element_size() + 8 * ((L + 1) * K * D + L * K + L * M + 1)


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(M, D, generator=gen) * 0.02
    centroids = dkm_kernels.random_rows(weights, K, generator=gen)
    return weights.requires_grad_(True), centroids


def _backend_or_skip(name):
    reason = dkm_kernels.backends.unavailable_reason(name, torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fused_backend_saves_only_weights_and_history(layer, backend):
    _backend_or_skip(backend)
    weights, centroids = layer
    saved = saved_bytes(lambda: dkm_kernels.dkm(weights, centroids, 1e-4, L, 0.0, backend=backend))
    print(f"\n{backend} backend saves {saved / 2**20:.2f} MiB; W is {weights.numel() * 4 / 2**20:.2f} MiB")
    assert weights.numel() * 4 <= saved <= fused_bound(weights)


def test_triton_saves_only_weights_and_history():
    """Fake tensors: what the op saves is counted without running the kernels at this size (the
    interpreter would take minutes); the registration that saves is the same as on a GPU."""
    pytest.importorskip("triton")
    _backend_or_skip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        weights = torch.empty(1, M, D).requires_grad_(True)
        centroids = torch.empty(1, K, D)
        saved = saved_bytes(
            lambda: torch.ops.dkm_kernels.triton_forward(weights, centroids, 1e-4, L, 0.0, True))
    print(f"\ntriton backend saves {saved / 2**20:.2f} MiB")
    assert weights.numel() * 4 <= saved <= fused_bound(weights)


def test_reference_saves_the_attention_of_every_iteration(layer):
    weights, centroids = layer
    saved = saved_bytes(lambda: dkm_kernels.dkm(weights, centroids, 1e-4, L, 0.0, backend="reference"))
    print(f"\nreference saves {saved / 2**20:.1f} MiB (L*M*k*4 = {L * M * K * 4 / 2**20:.1f} MiB)")
    assert saved >= L * M * K * 4
