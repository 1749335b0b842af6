"""Backend `cpu` in every attention regime, from exactly one-hot (tau 1e-12 of the squared distance
to the nearest centroid, scores of 1e12) to soft, weight scales 1e-4 .. 1e4, every available
instruction set and every dtype, against the float64 reference (oracle.py's rules).

The rows sit in k tight blobs, one warm-start centroid in each (k-means++ of the rows, checked).
That keeps every problem well conditioned, so that the float32 plain-PyTorch reference's error is a
fair yardstick. With rows spread evenly (randn) and tau around 1e-4 .. 1e-2 of the squared
distances, some row lies near the bisector of two centroids that are far from it against tau, where
an ulp of its distances moves its attention by about dist/tau ulps: every float32 implementation
errs by that much, and two of them differ by chance factors of 10 either way, which no "2x the
reference" rule can judge.
"""
import functools

import pytest
import torch

import dkm_kernels
from dkm_kernels.backends import cpu, torch_chunked
from dkm_kernels.reference import squared_distances
from oracle import (CPU_EXTENSION_TESTS, assert_low_precision_close, assert_matches_reference_float64,
                    relative_error, run)

pytestmark = CPU_EXTENSION_TESTS

# Blob radius over blob separation: small enough that k-means++ seeds one centroid per blob for a
# seed or two, large enough that a float32 row still resolves it at |w| = 128 separations.
SPREAD = 1e-3
# tau over the mean squared distance of a row to its nearest centroid: scores of 1e12 down to 1e-2.
# Every row is one-hot here (other blobs are 1e6 / d nearest-distances away); what varies is how large
# the scores are, hence the rounding error of anything computed from them before the max is taken.
NEAR = (1e-12, 1e-9, 1e-6, 1e-3, 1.0, 1e2)
# tau over the squared separation of neighbouring blobs: attention spread over several centroids.
SOFT = (0.03, 0.3)
SCALES = (1e-4, 1e-2, 1.0, 1e2, 1e4)
SHAPES = [(d, k) for d in (1, 8) for k in (4, 16, 256)]


def sweep(quick, scales=SCALES):
    """(d, k, scale) for every shape and scale; those not quick(d, k, scale) are marked slow."""
    return [
        pytest.param(d, k, scale, marks=() if quick(d, k, scale) else pytest.mark.slow)
        for d, k in SHAPES
        for scale in scales
    ]


@functools.lru_cache(maxsize=None)
def blobs(d: int, k: int, scale: float, dtype):
    """Rows in k blobs of radius SPREAD * scale, centres scale apart (d = 1: a line; d = 8: corners
    of a hypercube), k-means++ warm start with one centroid per blob. Returns weights (M, d) in
    dtype, centroids in the compute dtype and the taus to test. Shared by the instruction sets."""
    gen = torch.Generator().manual_seed(d * 1000 + k)
    if d == 1:
        centres = torch.arange(k, dtype=torch.float64).unsqueeze(1) - (k - 1) / 2
    else:
        corners = torch.randperm(2 ** d, generator=gen)[:k]
        centres = ((corners.unsqueeze(1) >> torch.arange(d)) & 1).double() - 0.5
    per_blob = max(4, 256 // k)  # M >> k: every centroid keeps the mass of its blob
    weights = centres.repeat_interleave(per_blob, 0)
    weights = weights + SPREAD * torch.randn(weights.shape, generator=gen, dtype=torch.float64)
    weights = (weights[torch.randperm(len(weights), generator=gen)] * scale).to(dtype)
    for _ in range(20):
        centroids = dkm_kernels.kmeans_plus_plus(weights, k, generator=gen)
        owner = squared_distances(centroids.double(), centres * scale).argmin(dim=1)
        if len(set(owner.tolist())) == k:
            break
    else:
        raise AssertionError(f"k-means++ never seeded one centroid per blob (d={d}, k={k})")
    nearest = d * (SPREAD * scale) ** 2  # expected squared distance of a row to its blob's centre
    taus = [r * nearest for r in NEAR] + [r * scale ** 2 for r in SOFT]
    return weights, centroids, taus


def check_taus(d, k, scale, dtype, check):
    """Runs check(weights, centroids, tau) for every tau; reports every failing one."""
    weights, centroids, taus = blobs(d, k, scale, dtype)
    failures = []
    for tau in taus:
        try:
            check(weights, centroids, tau)
        except AssertionError as error:
            failures.append(f"tau={tau:.3g}: {str(error).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(taus)} taus fail:\n" + "\n".join(failures)


def finite_and_close(weights, centroids, tau):
    values, final, _, grad = run("cpu", weights, centroids, tau, epsilon=0.0)
    for name, x in (("values", values), ("centroids", final), ("gradients", grad)):
        assert torch.isfinite(x).all(), f"{name} not finite"
    assert_low_precision_close("cpu", weights, centroids, tau)


def float64_close(weights, centroids, tau):
    ours, _ = assert_matches_reference_float64("cpu", weights, centroids, tau, epsilon=0.0)
    for name, x in zip(("values", "centroids", "gradients"), ours[:2] + ours[3:]):
        assert torch.isfinite(x).all(), f"{name} not finite"


@pytest.mark.parametrize("d,k,scale", sweep(lambda d, k, s: s in (1e-4, 1.0, 1e4)))
def test_float32(isa, d, k, scale):
    check_taus(d, k, scale, torch.float32, finite_and_close)


@pytest.mark.parametrize("d,k,scale", sweep(lambda d, k, s: s == 1.0))
def test_float64(isa, d, k, scale):
    check_taus(d, k, scale, torch.float64, float64_close)


def half_cases(quick):
    # float16 tops out at 65504, and |w| reaches 128 blob separations on the line.
    return [
        pytest.param(dtype, *param.values, marks=param.marks, id="-".join(map(str, (str(dtype)[6:], *param.values))))
        for dtype in (torch.float16, torch.bfloat16)
        for param in sweep(quick, SCALES if dtype == torch.bfloat16 else SCALES[:-1])
    ]


@pytest.mark.parametrize("dtype,d,k,scale", half_cases(lambda d, k, s: s == 1.0 and k == 16))
def test_half_precision(isa, dtype, d, k, scale):
    check_taus(d, k, scale, dtype, finite_and_close)


def test_tau_fallback_after_a_training_step(isa):
    """tau = 1e-12, what tau="auto" falls back to when every row sits on a centroid (at most k
    distinct rows), after a training step moved the rows by 5% of their scale."""
    gen = torch.Generator().manual_seed(4)
    levels = torch.randn(16, 8, generator=gen, dtype=torch.float64) * 0.02
    rows = levels[torch.randint(16, (1024,), generator=gen)]
    centroids = dkm_kernels.kmeans_plus_plus(rows, 16, generator=gen)  # the 16 levels
    weights = rows + 1e-3 * torch.randn(rows.shape, generator=gen, dtype=torch.float64)
    finite_and_close(weights.float(), centroids.float(), 1e-12)
    float64_close(weights, centroids, 1e-12)


def light_problem():
    """Float32 rows at d = 8 where the first row's exponential towards the last centroid is
    2^-62: that centroid's whole mass, above MIN_MASS and far below M 2^-30, which certifies a
    centroid (csrc/kernels.h, Relevance). The other rows sit on the other 31 centroids, 1 apart,
    one-hot, so that every block of 4 rows is listed. Returns (weights, centroids, tau)."""
    d, k = 8, 32
    gen = torch.Generator().manual_seed(5)
    centroids = torch.zeros(k, d, dtype=torch.float64)
    centroids[:-1, 1] = torch.arange(k - 1, dtype=torch.float64)
    rows = centroids[:-1].repeat(4, 1) + 0.01 * torch.randn(4 * (k - 1), d, generator=gen, dtype=torch.float64)
    light = torch.zeros(1, d, dtype=torch.float64)
    light[0, 0] = 0.3  # nearest: centroid 0, at squared distance 0.09
    centroids[-1, 0] = 0.3 + 0.11 ** 0.5  # at squared distance 0.11
    weights, centroids = torch.cat([light, rows]).float(), centroids.float()
    gap = squared_distances(weights[:1].double(), centroids.double())[0]
    return weights, centroids, (gap[-1] - gap[0]).item() * 1.4426950408889634 / 62


def test_light_centroid_keeps_its_skipped_pairs(isa):
    """Listed blocks of float rows skip the pairs whose exponential is below 2^-60 of centroids
    whose mass certifies it. The light centroid's mass does not: the attention pass finds it too
    small and passes again, listing its pairs, and the reference moves it onto the first row. A
    pass that skipped them would leave it in place (mass 0)."""
    weights, centroids, tau = light_problem()
    ours = run("cpu", weights, centroids, tau, 5, 0.0)
    assert torch.allclose(ours[1][-1].double(), weights[0].double(), atol=1e-6)
    assert_low_precision_close("cpu", weights, centroids, tau, ours=ours)


def test_gradient_pass_takes_every_pair_of_a_light_centroid(isa):
    """The backward's gradient pass skips pairs only of the centroids that the masses it is given
    certify, and of none when it is given no masses. The light pair's dA is grad_over_mass =
    G / 2^-62 times the row: its term A dA in the first row's gradient is of the order of G, which
    skipping it would lose. Against the torch backend's pass in float64 on the same inputs (the
    float32 gradient rule: 1e-4 of the norm)."""
    weights, centroids, tau = light_problem()
    w, c = weights[None], centroids[None]
    active = torch.ones(1, dtype=torch.bool)
    sums, mass = torch.ops.dkm_kernels.cpu_attention_sums(w, w, c, active, tau)
    assert 2.0 ** -64 < mass[0, -1] < 2.0 ** -61
    grad_c = torch.randn(c.shape, generator=torch.Generator().manual_seed(6))
    grad_over_mass = grad_c / mass[..., None]
    c_next = sums / mass[..., None]
    grad_dot_next = (grad_over_mass * c_next).sum(-1)
    args = (c, grad_over_mass, grad_dot_next, c_next, active)
    ours, exact = torch.zeros_like(w), torch.zeros_like(w, dtype=torch.float64)
    ours_sums = cpu.Passes(w, 32, tau, True).gradient(None, *args, ours, mass)
    exact_sums = torch_chunked.Passes(w.double(), 32, tau, True).gradient(
        None, *(t.double() if t.is_floating_point() else t for t in args), exact, mass.double())
    assert relative_error(ours, exact) < 1e-4
    without_masses = torch.zeros_like(w)
    torch.ops.dkm_kernels.cpu_gradient_pass(w, None, *args[:4], active, without_masses, tau)
    assert relative_error(without_masses, exact) < 1e-4
    # The sums are rounding noise here (the light centroid's next position is the first row):
    # the gradient they give the centroids, (2/tau) sums, against the upstream gradient's scale.
    assert (2 / tau * (ours_sums - exact_sums)).abs().max() < 1e-4 * grad_c.abs().max()
