"""DKMLayer: the seed's constructor, the op underneath, warm start, eval-mode hard assignment,
per-grouped-channel palettes, per-channel scale and tau='auto'."""
import pytest
import torch
from torch import nn

import dkm_kernels
from dkm_kernels import DKMLayer
from dkm_kernels.kmeans import lloyd_kmeans, nearest_centroids
from dkm_kernels.layer import AUTO_TAU_FRACTION
from dkm_kernels.reference import dkm_reference


def _weight(shape, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(shape, generator=gen) * scale)


def _layer_on(shape, seed, **config):
    """A DKMLayer seeded with 0 on a fresh _weight(shape, seed); returns both."""
    weight = _weight(shape, seed)
    return weight, DKMLayer(weight, seed=0, **config)


def test_seed_constructor_and_shapes():
    weight = _weight((16, 8, 3, 3))
    layer = DKMLayer(weight, n_clusters=4, tau=1e-4, dim=2, max_iter=5, epsilon=1e-4,
                     init_method="kmeans++")
    assert layer.weight is weight
    assert layer().shape == weight.shape
    assert layer.get_codebook().shape == (4, 2)
    assert layer.get_codebook().dtype == torch.float32
    assignments = layer.get_assignments()
    assert assignments.shape == (weight.numel() // 2,)
    assert int(assignments.max()) < 4
    other = torch.randn(16, 8, 3, 3) * 0.05
    assert layer(weight_override=other).shape == other.shape
    layer.eval()
    assert layer().shape == weight.shape
    assert "bits=2" in repr(layer)


def test_output_and_gradient_equal_the_op():
    weight, layer = _layer_on((32, 24), 1, n_clusters=8, tau=2e-4, dim=2)
    start = layer.get_codebook()
    out = layer()
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    layer_grad = weight.grad.clone()

    op_weight = weight.detach().clone().requires_grad_()
    expected = dkm_kernels.dkm(dkm_kernels.vectorize(op_weight, 2), start, 2e-4)
    (expected.weights.reshape(out.shape) * grad_out).sum().backward()
    assert torch.equal(out.detach(), expected.weights.reshape(out.shape).detach())
    assert torch.equal(layer_grad, op_weight.grad)
    # Warm start: the final centroids are kept for the next call.
    assert torch.equal(layer.get_codebook(), expected.centroids)


def test_warm_start_continues_from_the_stored_centroids():
    weight, layer = _layer_on((64, 32), 2, n_clusters=4, tau=1e-4, max_iter=1)
    layer()
    after_one = layer.get_codebook()
    second = dkm_kernels.dkm(weight.detach().reshape(-1, 1), after_one, 1e-4, max_iter=1)
    layer()
    assert torch.equal(layer.get_codebook(), second.centroids)


def test_eval_mode_is_a_hard_assignment_that_keeps_the_centroids():
    weight, layer = _layer_on((20, 30), 3, n_clusters=8, tau=1e-4, dim=3)
    layer()  # one training step moves the centroids
    layer.eval()
    before = layer.get_codebook()
    out = layer()
    assert torch.equal(layer.get_codebook(), before)
    rows = weight.detach().reshape(-1, 3)
    nearest = torch.cdist(rows, before).argmin(dim=1)
    assert torch.equal(out.reshape(-1, 3), before[nearest])
    assert torch.equal(layer.get_assignments(), nearest)


def test_per_grouped_channel_palettes_run_as_independent_problems():
    weight, layer = _layer_on((12, 10), 4, n_clusters=4, tau=5e-4, dim=2, group_size=3)
    assert layer.groups == 4 and layer.get_codebook().shape == (4, 4, 2)
    start = layer.get_codebook().double()
    out = layer()
    rows = weight.detach().double().reshape(4, -1, 2)
    expected, final, _ = dkm_reference(rows, start, 5e-4)
    torch.testing.assert_close(out.double().reshape(4, -1, 2), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.get_codebook().double(), final, rtol=1e-5, atol=1e-6)
    # Each group's rows are its own output channels' weights.
    layer.eval()
    hard = layer()
    for group in range(4):
        values = hard[3 * group:3 * group + 3].reshape(-1, 2)
        codebook = layer.get_codebook()[group]
        assert all(bool((codebook == row).all(dim=1).any()) for row in values)


def test_per_channel_scale_clusters_the_normalised_weight():
    weight = _weight((6, 16), seed=5)
    with torch.no_grad():
        weight.mul_(torch.arange(1, 7).float().unsqueeze(1))  # very different channel ranges
    layer = DKMLayer(weight, n_clusters=4, tau="auto", enable_per_channel_scale=True, seed=0)
    scale = layer.channel_scale(weight)
    expected_scale = weight.detach().abs().amax(dim=1, keepdim=True).half().float()
    assert torch.equal(scale, expected_scale)
    start = layer.get_codebook()
    out = layer()
    expected = dkm_kernels.dkm((weight.detach() / scale).reshape(-1, 1), start, layer.tau)
    assert torch.equal(out.detach(), expected.weights.reshape(6, 16) * scale)
    layer.eval()
    codebook = layer.get_codebook()
    nearest = torch.cdist((weight.detach() / scale).reshape(-1, 1), codebook).argmin(dim=1)
    assert torch.equal(layer(), codebook[nearest].reshape(6, 16) * scale)


def test_auto_tau_is_a_fraction_of_the_mean_squared_nearest_distance():
    weight, layer = _layer_on((40, 25), 6, n_clusters=8, tau="auto", dim=5)
    rows = weight.detach().reshape(1, -1, 5)
    centroids = layer.get_codebook().unsqueeze(0)
    nearest = nearest_centroids(rows, centroids)
    mean_sq = (rows - centroids[0][nearest[0]]).square().sum(-1).mean().item()
    assert layer.tau == pytest.approx(AUTO_TAU_FRACTION * mean_sq, rel=1e-6)


def test_seeded_initialisation_is_reproducible():
    weight = _weight((50, 20), seed=7)
    first = DKMLayer(weight, n_clusters=16, seed=123).get_codebook()
    again = DKMLayer(weight, n_clusters=16, generator=torch.Generator().manual_seed(123))
    assert torch.equal(first, again.get_codebook())


def test_lazy_init_and_float64_weights():
    weight = nn.Parameter(torch.randn(8, 8, dtype=torch.float64) * 0.1)
    layer = DKMLayer(weight, n_clusters=4, tau=1e-3, seed=0, lazy_init=True)
    assert not bool(layer.initialized)
    out = layer()
    assert bool(layer.initialized) and out.dtype == torch.float64
    assert layer.centroids.dtype == torch.float32


def test_lloyd_kmeans_reaches_a_fixed_point():
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(2, 300, 2, generator=gen)
    start = dkm_kernels.kmeans_plus_plus(rows, 5, generator=gen)
    fitted = lloyd_kmeans(rows, start, iterations=100)
    assignment = nearest_centroids(rows, fitted)
    for group in range(2):
        for j in range(5):
            members = rows[group][assignment[group] == j]
            if len(members):
                torch.testing.assert_close(fitted[group, j], members.mean(dim=0))


@pytest.mark.parametrize("kwargs, option", [
    (dict(dim=7), "dim=7"),
    (dict(group_size=5), "group_size=5"),
    (dict(n_clusters=0), "n_clusters"),
    (dict(tau=-1.0), "tau"),
    (dict(init_method="bogus"), "init_method"),
])
def test_bad_arguments_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        DKMLayer(_weight((12, 4)), **{"n_clusters": 4, **kwargs})


def test_explicit_advance_commits_the_pending_centroids():
    weight = _weight((32, 8), seed=9)
    layer = DKMLayer(weight, n_clusters=4, tau=1e-3, max_iter=1, seed=0, auto_advance=False)
    start = layer.get_codebook()
    first, again = layer(), layer()
    # Without advance() every call (a recomputation, say) starts from the same centroids.
    assert torch.equal(first, again) and torch.equal(layer.get_codebook(), start)
    expected = dkm_kernels.dkm(weight.detach().reshape(-1, 1), start, 1e-3, max_iter=1)
    assert torch.equal(layer.pending_centroids, expected.centroids)
    layer.advance()
    assert torch.equal(layer.get_codebook(), expected.centroids)
    assert not torch.equal(layer(), first)
    state = layer.state_dict()
    assert torch.equal(state["pending_centroids"], layer.pending_centroids)
