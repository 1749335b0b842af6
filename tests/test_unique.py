"""Uniquified DKM (docs/design.md §10): scalar palettes of float16/bfloat16 weights clustered over
their distinct values with counts.

Values, centroids and gradients against the float64 reference run on the same 16-bit values, by
the low-precision rule of oracle.py; both ways of finding the distinct values (the bit-pattern
table and the sort); groups; the exact bytes saved for backward; the option off.
"""
import pytest
import torch

import dkm_kernels
from dkm_kernels import unique
from oracle import (assert_compiled_gradient_equals_eager, assert_low_precision_close, make_problem,
                    pick_tau, run)
from test_memory import exact_bytes, saved_bytes

SIXTEEN_BIT = [torch.float16, torch.bfloat16]


@pytest.fixture(params=["table", "sort"])
def path(request, monkeypatch):
    """Both ways of finding the distinct values: the bit-pattern table (forced for small groups)
    and the sort (forced for every size); weights and value tables meet in several chunks."""
    monkeypatch.setattr(unique, "TABLE_MIN_ROWS", 0 if request.param == "table" else 2**62)
    monkeypatch.setattr(unique, "CHUNK", 777)
    return request.param


def sixteen_bit_problem(m, k, dtype, groups=None, seed=0):
    """Random 16-bit weights that repeat, as a large weight's do (each value about 4 times),
    k-means++ centroids of them and a tau from the data."""
    weights, _, _ = make_problem(m, 1, k, groups=groups, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    weights = weights[..., torch.randint(m // 4, (m,), generator=gen), :].to(dtype)
    found = unique.distinct(weights.reshape(-1, m, 1))
    assert found.values.shape[1] <= m // 4 and found.counts.max() > 1
    centroids = dkm_kernels.kmeans_plus_plus(weights, k, generator=gen)
    return weights, centroids, pick_tau(weights, centroids)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("groups", [None, 3])
def test_matches_float64_reference_on_the_same_values(dtype, groups, path):
    weights, centroids, tau = sixteen_bit_problem(2000, 16, dtype, groups)
    assert_low_precision_close("auto", weights, centroids, tau, max_iter=4, uniquify=True)


def test_groups_that_stop_early_keep_their_results(path):
    """Each group stops on its own criterion, as in the plain op."""
    weights, centroids, tau = sixteen_bit_problem(1500, 8, torch.bfloat16, groups=2, seed=4)
    weights[0] = centroids[0, torch.arange(1500) % 8, :].to(torch.bfloat16)  # already clustered
    centroids[0] = weights[0, :8].float()
    ours = run("auto", weights, centroids, tau, 6, 1e-3, uniquify=True)
    plain = run("torch", weights, centroids, tau, 6, 1e-3)
    assert ours[2].tolist() == plain[2].tolist() and ours[2][0] == 1 < ours[2][1]
    for index, name in ((0, "values"), (1, "centroids"), (3, "gradients")):
        torch.testing.assert_close(ours[index].float(), plain[index].float(), rtol=2e-2,
                                   atol=2e-2 * plain[index].float().abs().max().item(), msg=name)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_table_and_sort_find_the_same_distinct_values(dtype, monkeypatch):
    weights = (torch.randn(3, 4000, 1, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    weights[0, :10] = 0.0
    weights[0, 10:20] = -0.0  # a distinct bit pattern with an equal value
    found = {}
    for name, rows in (("table", 0), ("sort", 2**62)):
        monkeypatch.setattr(unique, "TABLE_MIN_ROWS", rows)
        found[name] = unique.distinct(weights)
        values, counts = found[name].values, found[name].counts
        # Every weight reads back its own bit pattern.
        patterns = found[name].expand(values.view(torch.int16).squeeze(-1).float())
        assert torch.equal(patterns.view(weights.shape), weights.view(torch.int16).float())
        assert torch.equal(counts.sum(dim=1), torch.full((3,), 4000.0))
        # A value's count is the number of its weights, padding counts nothing.
        assert torch.equal(found[name].gather_sums(torch.ones(12000)).float(), counts)
    assert torch.equal(found["table"].values.view(torch.int16), found["sort"].values.view(torch.int16))
    assert torch.equal(found["table"].counts, found["sort"].counts)
    zero_patterns = ((found["table"].values[0, :, 0] == 0) & (found["table"].counts[0] > 0)).sum()
    assert zero_patterns == 2  # +0.0 and -0.0 kept apart (both exact)


def test_saves_exactly_what_the_plain_op_saves():
    """W (2 bytes a weight) and the O(L k) history: nothing of size M is kept (docs/design.md §2)."""
    m, k, iterations = 2**20, 16, 5
    gen = torch.Generator().manual_seed(0)
    weights = (torch.randn(m, 1, generator=gen) * 0.02).to(torch.bfloat16).requires_grad_(True)
    centroids = dkm_kernels.random_rows(weights, k, generator=gen)
    saved = saved_bytes(lambda: dkm_kernels.dkm(weights, centroids, 1e-5, iterations, 0.0,
                                                uniquify=True))
    assert saved == exact_bytes(m, 1, k, iterations, weight_bytes=2)


def test_the_option_chooses_the_path(monkeypatch):
    """uniquify=False runs the plain op; None uniquifies only for backend='auto'; float32 weights
    and d > 1 never uniquify."""
    calls = []
    real = unique.dkm_unique_forward
    monkeypatch.setattr(unique, "dkm_unique_forward", lambda *a: calls.append(1) or real(*a))
    weights, centroids, tau = sixteen_bit_problem(500, 4, torch.float16)
    for kwargs, expected in ((dict(uniquify=False), 0), (dict(), 1), (dict(backend="torch"), 0),
                             (dict(backend="torch", uniquify=True), 1)):
        calls.clear()
        dkm_kernels.dkm(weights, centroids, tau, **kwargs)
        assert len(calls) == expected, kwargs
    calls.clear()
    dkm_kernels.dkm(weights.float(), centroids, tau, uniquify=True)
    dkm_kernels.dkm(weights.reshape(-1, 2), centroids.repeat(1, 2), tau, uniquify=True)
    assert not calls
    plain = dkm_kernels.dkm(weights, centroids, tau, backend="cpu")
    off = dkm_kernels.dkm(weights, centroids, tau, uniquify=False)
    assert torch.equal(plain.weights, off.weights)
    with pytest.raises(ValueError, match="uniquify must be True, False, None or 'bfloat16'"):
        dkm_kernels.dkm(weights, centroids, tau, uniquify=1)


def test_nan_weights_raise_as_in_the_plain_op():
    weights, centroids, tau = sixteen_bit_problem(300, 4, torch.bfloat16)
    weights[7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        dkm_kernels.dkm(weights, centroids, tau, uniquify=True)


def test_opcheck():
    weights, centroids, tau = sixteen_bit_problem(300, 5, torch.bfloat16, groups=2)
    args = (weights.requires_grad_(True), centroids, tau, 3, 1e-4)
    torch.library.opcheck(torch.ops.dkm_kernels.dkm_unique_forward.default, args)
    _, history, masses, iterations = torch.ops.dkm_kernels.dkm_unique_forward(*args)
    grad_out = torch.randn(weights.shape, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.dkm_kernels.dkm_unique_backward.default,
                          (grad_out.to(torch.bfloat16), weights.detach(), history, masses,
                           iterations, tau))


def test_torch_compile_fullgraph():
    weights, centroids, tau = sixteen_bit_problem(400, 4, torch.bfloat16)

    def loss(x):
        return dkm_kernels.dkm(x, centroids, tau, 3, 0.0, uniquify=True).weights.float().square().sum()

    assert_compiled_gradient_equals_eager(loss, weights)


def test_layer_and_compressor_option(monkeypatch):
    """DKMLayer and compress_model uniquify by default; uniquify=False runs the plain op."""
    calls = []
    real = unique.dkm_unique_forward
    monkeypatch.setattr(unique, "dkm_unique_forward", lambda *a: calls.append(1) or real(*a))
    weight = (torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    for kwargs, expected in ((dict(), 1), (dict(uniquify=False), 0)):
        calls.clear()
        dkm_kernels.DKMLayer(weight.clone().requires_grad_(True), n_clusters=4, **kwargs)()
        assert len(calls) == expected, kwargs
        model = torch.nn.Sequential(torch.nn.Linear(32, 64)).to(torch.bfloat16)
        dkm_kernels.compress_model(model, bits=2, skip_first_last=False, small_layer_threshold=0,
                                   **kwargs)
        model(torch.randn(3, 32, dtype=torch.bfloat16))
        assert len(calls) == 2 * expected, kwargs
    with pytest.raises(ValueError, match="uniquify must be True, False or 'bfloat16'"):
        dkm_kernels.DKMLayer(weight, n_clusters=4, uniquify=None)
    with pytest.raises(ValueError, match="uniquify must be True, False or 'bfloat16'"):
        dkm_kernels.compress_model(torch.nn.Sequential(torch.nn.Linear(32, 64)), uniquify="fp16")


@pytest.mark.parametrize("groups", [None, 3])
def test_bfloat16_rounding_of_float32_weights(groups):
    """uniquify="bfloat16" on float32 weights is the uniquified op on their bfloat16 rounding,
    exactly: values (returned as float32), centroids, iterations and the gradient reaching the
    float32 weights; and near the float32 result, as an approximation at bfloat16's precision."""
    weights, centroids, tau = make_problem(3000, 1, k=16, groups=groups, seed=4, scale=0.02,
                                           dtype=torch.float32)
    upstream = torch.randn(weights.shape, generator=torch.Generator().manual_seed(1))
    w32 = weights.clone().requires_grad_(True)
    approx = dkm_kernels.dkm(w32, centroids, tau, uniquify="bfloat16")
    (approx.weights * upstream).sum().backward()
    w16 = weights.bfloat16().requires_grad_(True)
    exact16 = dkm_kernels.dkm(w16, centroids, tau, uniquify=True)
    (exact16.weights.float() * upstream).sum().backward()
    assert approx.weights.dtype == torch.float32
    assert torch.equal(approx.weights, exact16.weights.float())
    assert torch.equal(approx.centroids, exact16.centroids)
    assert torch.equal(approx.iterations, exact16.iterations)
    assert torch.equal(w32.grad, w16.grad.float())
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9); the attention amplifies it a few
    # times at this tau (0.3 of the squared nearest distances).
    full = dkm_kernels.dkm(weights, centroids, tau, backend="torch")
    assert (approx.weights - full.weights).norm() <= 2**-5 * full.weights.norm()
    # Not for d > 1 (16-bit vectors rarely repeat): the plain op runs, exactly as without it.
    rows = weights.reshape(*weights.shape[:-2], -1, 2)
    pairs = centroids.reshape(*centroids.shape[:-2], -1, 2)
    assert torch.equal(dkm_kernels.dkm(rows, pairs, tau, uniquify="bfloat16").weights,
                       dkm_kernels.dkm(rows, pairs, tau).weights)


def test_bfloat16_rounding_in_the_layer():
    """A float32 layer with uniquify="bfloat16" runs the uniquified op and trains."""
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = dkm_kernels.DKMLayer(weight.clone().requires_grad_(True), n_clusters=4,
                                 uniquify="bfloat16")
    out = layer()
    assert out.dtype == torch.float32
    out.square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
