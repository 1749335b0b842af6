"""k-means++ as one C++ op (dkm_kernels::cpu_kmeans_plus_plus): its draws against a float64
reference of its contract, its distribution against the exact k-means++ probabilities (the torch
path's too), thread-count independence, repeated rows, counts and bad inputs."""
import math

import pytest
import torch

import dkm_kernels
from dkm_kernels import init
from dkm_kernels.backends import cpu as cpu_backend

pytestmark = pytest.mark.skipif(cpu_backend.isa() is None, reason="needs the C++ extension dkm_kernels._C")


def op(weights, counts, uniforms):
    return torch.ops.dkm_kernels.cpu_kmeans_plus_plus(weights, counts, uniforms)


def reference_indices(weights, counts, uniforms):
    """The op's contract, in float64 with torch: draw 0 by count (uniformly without counts); draw j
    by weight n_i D_i, D_i the squared distance to the nearest centroid so far (by count when every
    D_i is 0); each draw the first row whose cumulative weight exceeds u_j times the total."""
    out = []
    for g, w in enumerate(weights.double()):
        n = torch.ones(w.shape[0], dtype=torch.float64) if counts is None else counts[g].double()

        def pick(weight, u):
            cumulative = torch.cumsum(weight, 0)
            return int(torch.searchsorted(cumulative, u * cumulative[-1], right=True))

        rows = [pick(n, uniforms[g, 0])]
        nearest = torch.full_like(n, math.inf)
        for u in uniforms[g, 1:]:
            nearest = torch.minimum(nearest, (w - w[rows[-1]]).square().sum(-1))
            weight = nearest * n
            rows.append(pick(weight if weight.sum() > 0 else n, u))
        out.append(rows)
    return torch.tensor(out)


# Float32 weights are small integers, so that every distance and sum is exact in both the op and
# the reference; float64 weights are random. 9,000 x 8 and 66,000 x 1 span several chunks and
# take the parallel path.
@pytest.mark.parametrize("dtype,groups,m,d", [
    (torch.float32, 3, 37, 3), (torch.float32, 1, 9000, 8), (torch.float32, 5, 300, 2),
    (torch.float64, 2, 66_000, 1), (torch.float64, 3, 500, 4)])
@pytest.mark.parametrize("counted", [False, True])
@pytest.mark.parametrize("isa", cpu_backend.available_isas())
def test_draws_match_the_reference(dtype, groups, m, d, counted, isa, monkeypatch):
    monkeypatch.setenv("DKM_KERNELS_ISA", isa)  # the op follows the pass kernels' choice
    gen = torch.Generator().manual_seed(m + d)
    if dtype == torch.float32:
        weights = torch.randint(-40, 41, (groups, m, d), generator=gen).to(dtype)
    else:
        weights = torch.randn(groups, m, d, generator=gen, dtype=dtype)
    counts = torch.randint(0, 4, (groups, m), generator=gen).float() if counted else None
    if counted:
        counts[:, 0] = 1  # a positive count in every group
    uniforms = torch.rand(groups, 24, generator=gen, dtype=torch.float64)
    index = op(weights, counts, uniforms)
    assert index.dtype == torch.int64 and index.shape == (groups, 24)
    assert torch.equal(index, reference_indices(weights, counts, uniforms))
    if counted:
        assert bool((torch.gather(counts, 1, index) > 0).all())


def test_same_draws_for_any_thread_count():
    """Fixed chunks: one thread (every group on it) and two threads (each pass split over them)
    give the same bits."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 60_000, 4, generator=gen)
    uniforms = torch.rand(3, 64, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(weights, None, uniforms)
        torch.set_num_threads(2)
        two = op(weights, None, uniforms)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def _chi_square_bound(dof, z=4.75):
    """The chi-square quantile at about 1 - 1e-6 (z = 4.75 standard deviations; Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _exact_pairs(values, counts, power=2):
    """P(first = a, second = b) of k-means++ on scalar rows (power 1: drawn by distance, a wrong
    k-means++)."""
    n = counts / counts.sum()
    p = torch.zeros(len(values), len(values), dtype=torch.float64)
    for a in range(len(values)):
        weight = counts * (values - values[a]).abs() ** power
        p[a] = n[a] * weight / weight.sum()
    return p


@pytest.mark.parametrize("path", ["op", "torch"])
@pytest.mark.parametrize("counted", [False, True])
def test_first_two_draws_follow_k_means_plus_plus(path, counted, monkeypatch):
    """Empirical frequencies of the (first, second) pair against the exact probabilities, with a
    chi-square bound that a draw by distance instead of squared distance (or a uniform second
    draw) exceeds several times over at this sample size."""
    if path == "torch":
        monkeypatch.setattr(init, "_fused_applies", lambda weights: False)
    values = torch.tensor([0.0, 1.0, 3.0, 7.0, 8.0], dtype=torch.float64)
    counts = torch.tensor([1.0, 2.0, 0.0, 3.0, 1.0] if counted else [1.0] * 5, dtype=torch.float64)
    samples = 20_000 if path == "op" else 3000
    weights = values.reshape(1, -1, 1).expand(samples, -1, -1)
    gen = torch.Generator().manual_seed(1)
    centroids = dkm_kernels.kmeans_plus_plus(
        weights, 2, gen, counts=counts.expand(samples, -1) if counted else None)
    index = (centroids[..., 0, None] == values).to(torch.int64).argmax(-1)  # (samples, 2) rows
    observed = torch.bincount(index[:, 0] * len(values) + index[:, 1], minlength=len(values) ** 2)
    exact = _exact_pairs(values, counts).flatten()
    possible = exact > 0
    assert observed[~possible].sum() == 0  # no zero-count row, no row twice
    expected = samples * exact[possible]
    statistic = float(((observed[possible] - expected) ** 2 / expected).sum())
    bound = _chi_square_bound(int(possible.sum()) - 1)
    assert statistic < bound
    # The test can fail: the expected statistic of the wrong distributions is far above the bound.
    uniform = counts * (values != values[:, None]).double()
    wrong = [_exact_pairs(values, counts, power=1).flatten(),
             ((counts / counts.sum())[:, None] * uniform / uniform.sum(1, keepdim=True)).flatten()]
    for q in wrong:
        assert samples * float(((q[possible] - exact[possible]) ** 2 / exact[possible]).sum()) > 3 * bound


def test_fewer_distinct_rows_than_centroids():
    """Draws by distance while some row is off every centroid, then by count: the three distinct
    rows come first, and rows of count 0 are never drawn."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.tensor([[0.0, 1.0], [2.0, -1.0], [5.0, 5.0]])
    weights = rows[torch.randint(3, (300,), generator=gen)]
    for _ in range(5):
        centroids = dkm_kernels.kmeans_plus_plus(weights, 8, gen)
        assert torch.equal(torch.unique(centroids[:3], dim=0), torch.unique(rows, dim=0))
        assert (centroids[:, None] == rows).all(-1).any(-1).all()
    values = torch.tensor([[0.0], [1.0], [2.0], [0.0]])
    counts = torch.tensor([5.0, 1.0, 2.0, 0.0])
    index = op(values[None], counts[None], torch.rand(1, 6, generator=gen, dtype=torch.float64))[0]
    assert sorted(index[:3].tolist()) == [0, 1, 2] and bool((index < 3).all())


def test_public_function_takes_every_layout():
    """(M, d) and (G, M, d) weights of every floating dtype, counts (M,) and (G, M); the result is
    rows of the weights in the compute dtype, repeated by a seeded generator."""
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(2, 500, 3, generator=gen, dtype=torch.bfloat16)
    counts = torch.randint(1, 5, (2, 500), generator=gen)
    for w, c in [(weights, None), (weights, counts), (weights[0], counts[0]), (weights.double(), None)]:
        first = dkm_kernels.kmeans_plus_plus(w, 7, torch.Generator().manual_seed(4), counts=c)
        again = dkm_kernels.kmeans_plus_plus(w, 7, torch.Generator().manual_seed(4), counts=c)
        assert torch.equal(first, again) and first.dtype == init.compute_dtype(w.dtype)
        assert first.shape == w.shape[:-2] + (7, 3)
        grouped = w.reshape(-1, *w.shape[-2:]).to(first.dtype)
        for g, centroids in enumerate(first.reshape(-1, 7, 3)):
            assert (centroids[:, None] == grouped[g]).all(-1).any(-1).all()


def test_bad_inputs_name_the_argument():
    w = torch.randn(2, 10, 3)
    u = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="weights must be float32 or float64"):
        op(w.half(), None, u)
    with pytest.raises(ValueError, match="weights must have shape"):
        op(w[0], None, u)
    with pytest.raises(ValueError, match="weights must be finite"):
        op(torch.full((2, 10, 3), math.nan), None, u)
    with pytest.raises(ValueError, match="overflow"):
        op(torch.tensor([[[0.0], [3e19]]]), None, torch.rand(1, 2, dtype=torch.float64))  # 9e38 > float max
    with pytest.raises(ValueError, match="uniforms must have shape"):
        op(w, None, u[0])
    with pytest.raises(TypeError, match="uniforms must be float64"):
        op(w, None, u.float())
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        op(w, None, u + 1)
    with pytest.raises(ValueError, match="counts must have shape"):
        op(w, torch.ones(2, 9), u)
    with pytest.raises(ValueError, match="counts must be finite and >= 0"):
        op(w, -torch.ones(2, 10), u)
    with pytest.raises(ValueError, match="positive entry in every group"):
        op(w, torch.ones(2, 10) * torch.tensor([[1.0], [0.0]]), u)
    with pytest.raises(ValueError, match="weights must be finite"):
        dkm_kernels.kmeans_plus_plus(torch.full((10, 2), math.inf), 3)
