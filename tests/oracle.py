"""Shared checks: every backend against the float64 reference, values and gradients separately.

Tolerances (docs/design.md §7):
- float64 inputs: the backend and the reference compute the same exact function in a different
  order of summation, so they agree to rounding amplified by the scores' 1/tau and a few
  iterations: relative error <= 1e-9 of each tensor's norm.
- float32 / float16 / bfloat16 inputs: the rule of FlashAttention's tests. The backend's error
  against the float64 reference (fed the same rounded inputs) must be at most twice the error of
  the plain-PyTorch reference run at the same precision, plus one rounding of the output dtype.
"""
from __future__ import annotations

import math

import pytest
import torch

import dkm_kernels
from dkm_kernels.backends import cpu
from dkm_kernels.reference import dkm_reference, squared_distances

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)

# The op's backends (the reference is plain autograd) and where each runs in the tests: Triton runs
# in its interpreter on CPU tensors when there is no GPU (conftest.py).
FUSED_BACKENDS = ("torch", "cpu", "triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# float32 inputs against float64 fed the same rounded inputs: values and centroids within 2e-5 of
# the norm (unit roundoff 6e-8, scores of a few units, M-term sums, 5 compounding iterations: the
# plain float32 reference itself is at 1e-7..1e-6), gradients within 1e-4 (each step multiplies
# by 2/tau and divides by masses; the plain float32 reference measures up to 2e-5). Where a problem
# is ill-conditioned, twice the plain float32 reference's own error, measured in the same test.
FLOAT32_VALUE_RTOL = 2e-5
FLOAT32_GRADIENT_RTOL = 1e-4


# pytestmark of the modules that test the C++ extension: skipped without it, and each test on one
# thread (conftest.py's one_thread).
CPU_EXTENSION_TESTS = [
    pytest.mark.skipif(cpu.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
                       reason=str(cpu.unavailable_reason(torch.device("cpu"), torch.float32))),
    pytest.mark.usefixtures("one_thread"),
]


def device_of(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def skip_reason(backend: str, dtype=torch.float32) -> str | None:
    """Why `backend` cannot run these tests here (None: it can)."""
    if backend == "reference":
        return None
    return dkm_kernels.backends.unavailable_reason(backend, torch.device(device_of(backend)), dtype)


def takes_float64(backend: str) -> bool:
    return skip_reason(backend, torch.float64) is None


def pick_tau(weights: torch.Tensor, centroids: torch.Tensor, fraction: float = 0.3) -> float:
    """A tau at which the attention is neither one-hot nor uniform: a fraction of the mean squared
    distance of a row to its nearest centroid (all groups pooled)."""
    w = weights.reshape(-1, weights.shape[-1]).double()
    c = centroids.reshape(-1, centroids.shape[-1]).double()
    nearest = squared_distances(w, c).min(dim=1).values.mean().item()
    return fraction * max(nearest, 1e-12)


def make_problem(m: int, d: int, k: int, groups: int | None = None, seed: int = 0,
                 scale: float = 1.0, dtype=torch.float64, device="cpu"):
    """Random weights ((M, d) or (G, M, d)), k-means++ centroids of them, and a tau from the data."""
    gen = torch.Generator().manual_seed(seed)
    shape = (m, d) if groups is None else (groups, m, d)
    weights = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    weights = weights.to(dtype)
    centroids = dkm_kernels.kmeans_plus_plus(weights, k, generator=gen)  # in the compute dtype
    tau = pick_tau(weights, centroids)
    return weights.to(device), centroids.to(device), tau


def staggered_groups(m: int, groups: int, seed: int = 3):
    """Grouped problem (G, M, 2) with k = 8 whose groups stop at different iterations: group 0 is
    converged from the start (its rows sit on centroids 10 apart, so it stops after one
    iteration), the others are random."""
    weights, centroids, tau = make_problem(m, 2, k=8, groups=groups, seed=seed)
    gen = torch.Generator().manual_seed(5)
    weights[0] = torch.randn(m, 2, dtype=torch.float64, generator=gen) * 0.01
    weights[0, :8] += torch.arange(8, dtype=torch.float64).unsqueeze(1) * 10
    weights[0, 8:] += 10 * torch.randint(0, 8, (m - 8, 1), generator=gen)
    centroids[0] = weights[0, :8]
    return weights, centroids, tau


def upstream_gradient(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(backend: str, weights, centroids, tau, max_iter=5, epsilon=1e-4, seed=1, upstream=None,
        **kwargs):
    """Forward and backward with a fixed random upstream gradient (or the one given).

    Returns (W~, final centroids, iterations, dLoss/dW), all detached.
    """
    w = weights.detach().clone().requires_grad_(True)
    result = dkm_kernels.dkm(w, centroids, tau, max_iter, epsilon, backend=backend, **kwargs)
    if upstream is None:
        upstream = upstream_gradient(result.weights.shape, seed)
    (result.weights.double() * upstream.to(w.device)).sum().backward()
    return result.weights.detach(), result.centroids, result.iterations, w.grad.detach()


# One run of the same-precision reference samples its rounding error once; in ill-conditioned
# problems (small tau, many iterations) that sample varies by more than 2x with the order of the
# sums alone. The reference's error is therefore the largest over this many row orders.
REFERENCE_ORDERS = 3


def same_precision_reference_runs(weights, centroids, tau, max_iter, epsilon):
    """The plain reference at the inputs' precision, on the rows as given and in permuted orders;
    outputs put back in the original order."""
    yield run("reference", weights, centroids.float(), tau, max_iter, epsilon)
    gen = torch.Generator().manual_seed(0)
    upstream = upstream_gradient(weights.shape)
    for _ in range(REFERENCE_ORDERS - 1):
        order = torch.randperm(weights.shape[-2], generator=gen)
        back = torch.argsort(order)
        out, final, iterations, grad = run("reference", weights[..., order, :], centroids.float(),
                                           tau, max_iter, epsilon,
                                           upstream=upstream[..., order, :])
        yield out[..., back, :], final, iterations, grad[..., back, :]


def relative_error(actual, expected) -> float:
    expected = expected.double().cpu()
    return ((actual.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_matches_reference_float64(backend: str, weights, centroids, tau, max_iter=5,
                                     epsilon=1e-4, rtol=1e-9, **kwargs):
    """Values, centroids, iteration counts and gradients, each checked on its own."""
    assert weights.dtype == torch.float64
    ours = run(backend, weights, centroids, tau, max_iter, epsilon, **kwargs)
    ref = run("reference", weights, centroids, tau, max_iter, epsilon)
    assert torch.equal(ours[2].cpu(), ref[2].cpu()), f"iterations {ours[2]} != reference {ref[2]}"
    sensitivity = None
    for slot, (name, a, b) in enumerate(zip(("values", "centroids", "gradients"),
                                            ours[:2] + ours[3:], ref[:2] + ref[3:])):
        err = relative_error(a, b)
        if err > rtol:  # an ill-conditioned output: the reference itself moves as far under
            # one ulp of its inputs, so twice that movement is the bound (computed only here)
            sensitivity = sensitivity or float64_sensitivity(weights, centroids, tau, max_iter,
                                                             epsilon, ref)
            bound = max(rtol, 2 * sensitivity[slot])
            assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"
    return ours, ref


def float64_sensitivity(weights, centroids, tau, max_iter, epsilon, exact):
    """Relative movement of the float64 reference's values, centroids and gradients when its
    inputs move by float64's unit roundoff (three random relative perturbations of 2^-53): what
    any float64 evaluation, whatever its order of summation, can be off by."""
    gen = torch.Generator().manual_seed(2)

    def nudge(t):
        t = t.double().cpu()
        return t * (1 + 2.0 ** -53 * (2 * torch.rand(t.shape, generator=gen,
                                                     dtype=torch.float64) - 1))
    moved = [run("reference", nudge(weights), nudge(centroids), tau, max_iter, epsilon)
             for _ in range(3)]
    return [max(relative_error(m[index], exact[index]) for m in moved) for index in (0, 1, 3)]


def _rounded_intermediates_run(weights, centroids, tau, max_iter, epsilon, dtype):
    """`run` of the float64 reference with its distances and centroids rounded to `dtype` at
    every iteration (reference.dkm_single's intermediate_dtype)."""
    w = weights.detach().double().cpu().requires_grad_(True)
    c = centroids.double().cpu()
    grouped = w.dim() == 3
    out, final, iterations = dkm_reference(w if grouped else w[None], c if grouped else c[None],
                                           tau, max_iter, epsilon, intermediate_dtype=dtype)
    if not grouped:
        out, final = out[0], final[0]
    (out * upstream_gradient(out.shape)).sum().backward()
    return out.detach(), final, iterations, w.grad


def input_rounding_sensitivity(weights, centroids, tau, max_iter, epsilon, exact,
                               error=lambda moved, exact: (moved - exact).abs().max().item()):
    """How far the float64 result moves under rounding that every float32 evaluation inherits,
    however it sums: the inputs moved by float32's unit roundoff (random relative perturbations
    of 2^-24), and the distances and each iteration's centroids rounded to float32 (the op holds
    both in float32). In a well-conditioned problem this is far below the reference's own error;
    where tau is tiny against the distances, or the gradient is very sensitive to the centroid
    path, it dominates both, and one float32 evaluation's error is a sample of it. `error`
    measures each moved output against the exact one (default: the largest absolute difference)."""
    gen = torch.Generator().manual_seed(2)
    unit = 2.0 ** -24

    def nudge(t):
        t = t.double().cpu()
        return t * (1 + unit * (2 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        moved = [run("reference", nudge(weights), nudge(centroids), tau, max_iter, epsilon)]
        moved += [_rounded_intermediates_run(weights, centroids, tau, max_iter, epsilon,
                                             torch.float32) for _ in range(REFERENCE_ORDERS)]
    return [max(error(m[index], exact[index]) for m in moved) for index in (0, 1, 3)]


def assert_low_precision_close(backend: str, weights, centroids, tau, max_iter=5, epsilon=0.0,
                               ours=None, **kwargs):
    """Backend error vs float64 <= 2x the same-precision reference's error + one output rounding.

    The same-precision reference's error is the largest over REFERENCE_ORDERS row orders, and at
    least the problem's sensitivity to float32 rounding (input_rounding_sensitivity):
    one float32 evaluation samples that error, and an ill-conditioned problem spreads the samples
    over orders of magnitude. epsilon defaults to 0 so that both runs take all max_iter
    iterations (a stop decided by a rounding difference would compare different functions).
    `ours`: the backend's results computed elsewhere (by `dkm_many`, say), as `run` returns them.
    """
    assert weights.dtype in LOW_PRECISION
    exact = run("reference", weights.double(), centroids.double(), tau, max_iter, epsilon)
    if ours is None:
        ours = run(backend, weights, centroids, tau, max_iter, epsilon, **kwargs)
    naive_runs = list(same_precision_reference_runs(weights.cpu(), centroids.cpu(), tau, max_iter,
                                                    epsilon))
    sensitivity = input_rounding_sensitivity(weights, centroids, tau, max_iter, epsilon, exact)
    ulp = torch.finfo(weights.dtype).eps
    for slot, (name, index) in enumerate((("values", 0), ("centroids", 1), ("gradients", 3))):
        target = exact[index]
        mine = ours[index].double().cpu()
        naive = [other[index].double() for other in naive_runs]
        if index != 1:  # values and gradients come back in the weights' dtype
            # Beyond the dtype's largest value, the representable answer is that value (or Inf)
            # with the same sign: results are compared clamped to the range, so an exact value
            # beyond it is missed by as much as the returned value falls short of the largest.
            largest = torch.finfo(weights.dtype).max
            target, mine = target.clamp(-largest, largest), mine.clamp(-largest, largest)
            naive = [n.clamp(-largest, largest) for n in naive]
        scale = target.abs().max().item()
        err_ours = (mine - target).abs().max().item()
        err_naive = max(max((n - target).abs().max().item() for n in naive), sensitivity[slot])
        bound = 2 * err_naive + ulp * scale + 1e-6 * scale
        assert math.isfinite(err_ours) and err_ours <= bound, (
            f"{name} ({weights.dtype}): error {err_ours:.3g} > bound {bound:.3g} "
            f"(same-precision reference error {err_naive:.3g}, scale {scale:.3g})"
        )


def assert_float32_close(backend: str, weights, centroids, tau, max_iter=5, epsilon=0.0,
                         ours=None, **kwargs):
    """float32 inputs against float64 on the same rounded inputs: every output on its own.
    `ours`: the backend's results computed elsewhere, as `run` returns them."""
    w32, c32 = weights.float(), centroids.float()
    device = device_of(backend)
    if ours is None:
        ours = run(backend, w32.to(device), c32.to(device), tau, max_iter, epsilon, **kwargs)
    ref = run("reference", w32.double(), c32.double(), tau, max_iter, epsilon)
    # The float32 reference in REFERENCE_ORDERS row orders: one float32 evaluation samples them.
    naive_runs = list(same_precision_reference_runs(w32, c32, tau, max_iter, epsilon))
    assert torch.equal(ours[2].cpu(), ref[2].cpu()), f"iterations {ours[2]} != reference {ref[2]}"
    sensitivity = None
    for slot, (name, index, rtol) in enumerate((("values", 0, FLOAT32_VALUE_RTOL),
                                                ("centroids", 1, FLOAT32_VALUE_RTOL),
                                                ("gradients", 3, FLOAT32_GRADIENT_RTOL))):
        assert ours[index].dtype == torch.float32
        err = relative_error(ours[index], ref[index])
        bound = max(rtol, 2 * max(relative_error(naive[index], ref[index])
                                  for naive in naive_runs))
        if err > bound:  # as in assert_low_precision_close: the problem's own sensitivity to
            # float32 rounding counts too (computed only here, where it decides)
            sensitivity = sensitivity or input_rounding_sensitivity(
                w32, c32, tau, max_iter, epsilon, ref, error=relative_error)
            bound = max(bound, 2 * sensitivity[slot])
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"
    return ours, ref


def assert_matches_reference(backend: str, weights, centroids, tau, max_iter=5, epsilon=1e-4,
                             **kwargs):
    """Float64 parity where the backend computes in float64, else the float32 check above."""
    if takes_float64(backend):
        return assert_matches_reference_float64(backend, weights, centroids, tau, max_iter,
                                                epsilon, **kwargs)
    return assert_float32_close(backend, weights, centroids, tau, max_iter, epsilon, **kwargs)


def assert_compiled_gradient_equals_eager(loss, weights) -> None:
    """torch.compile(loss, fullgraph=True) traces (no graph break) and its gradient with respect
    to `weights` equals eager's bit for bit."""
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x_compiled = weights.clone().requires_grad_(True)
    x_eager = weights.clone().requires_grad_(True)
    compiled(x_compiled).backward()
    loss(x_eager).backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=0, atol=0)
