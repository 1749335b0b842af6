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
from dkm_kernels.reference import squared_distances
from oracle import CPU_EXTENSION_TESTS, assert_low_precision_close, assert_matches_reference_float64, run

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
