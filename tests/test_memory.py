"""Bytes saved for backward, counted exactly with saved_tensors_hooks (docs/design.md §2).

One 512x512x3x3 layer at 8/8: M = 294,912 rows of d = 8, k = 256, L = 5 iterations. The op saves
exactly W (alive anyway), the centroids of every iteration, the masses and the iteration counts;
the reference saves at least L*M*k floats.
"""
import pytest
import torch

import dkm_kernels
from oracle import device_of, skip_reason

M, D, K, L = 294_912, 8, 256, 5
# The Triton interpreter would take minutes at the layer's size: a smaller problem there (the
# formula is the same).
INTERPRETED = dict(m=4096, d=8, k=16)


def saved_bytes(fn) -> int:
    """Run fn() and add up the bytes of every tensor autograd saves for backward.

    A tensor saved twice counts twice, so a backend that kept a second copy of W would show it.
    """
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def exact_bytes(m: int, d: int, k: int, iterations: int, weight_bytes: int = 4) -> int:
    """W, plus history (L+1, 1, k, d) and masses (L, 1, k) in float32, plus one int64 count."""
    return m * d * weight_bytes + 4 * ((iterations + 1) * k * d + iterations * k) + 8


def problem(m, d, k, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(m, d, generator=gen) * 0.02
    centroids = dkm_kernels.random_rows(weights, k, generator=gen)
    return weights.to(device).requires_grad_(True), centroids.to(device)


def test_the_count_sees_a_second_copy():
    """The counter is not fooled by a tensor saved twice (what a bound would let through)."""
    w = torch.randn(100, requires_grad=True)
    once = saved_bytes(lambda: (w * w).sum())
    assert once == 2 * w.numel() * 4  # mul saves both operands: the same tensor twice


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_fused_backend_saves_only_weights_and_history(backend):
    reason = skip_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    m, d, k = (INTERPRETED["m"], INTERPRETED["d"], INTERPRETED["k"]) \
        if backend == "triton" and device_of(backend) == "cpu" else (M, D, K)
    weights, centroids = problem(m, d, k, device_of(backend))
    saved = saved_bytes(lambda: dkm_kernels.dkm(weights, centroids, 1e-4, L, 0.0, backend=backend))
    print(f"\n{backend} backend saves {saved / 2**20:.2f} MiB; W is {m * d * 4 / 2**20:.2f} MiB")
    assert saved == exact_bytes(m, d, k, L)


def test_reference_saves_the_attention_of_every_iteration():
    weights, centroids = problem(M, D, K)
    saved = saved_bytes(lambda: dkm_kernels.dkm(weights, centroids, 1e-4, L, 0.0, backend="reference"))
    print(f"\nreference saves {saved / 2**20:.1f} MiB (L*M*k*4 = {L * M * K * 4 / 2**20:.1f} MiB)")
    assert saved >= L * M * K * 4
