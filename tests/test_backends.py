"""What every backend of the op must do, one test body each, parametrized over the backends.

Values, final centroids, iteration counts and gradients against the float64 reference (oracle.py):
float64 parity where a backend computes in float64 (`torch`, `cpu`), the float32 rule where it
does not (`triton`). Backend-specific sweeps (shapes, instruction sets, tiles) live in
test_<backend>_backend.py.
"""
import pytest
import torch

import dkm_kernels
from oracle import (
    DEVICE,
    FUSED_BACKENDS,
    assert_compiled_gradient_equals_eager,
    assert_low_precision_close,
    assert_matches_reference,
    device_of,
    make_problem,
    relative_error,
    run,
    same_precision_reference_runs,
    skip_reason,
    staggered_groups,
    takes_float64,
)


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    reason = skip_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


def on_device(backend, *tensors):
    """The tensors on the backend's device, in float32 unless it computes in float64."""
    dtype = torch.float64 if takes_float64(backend) else torch.float32
    return [t.to(device=device_of(backend), dtype=dtype) for t in tensors]


def test_grouped_groups_stop_on_their_own(backend):
    """Groups that converge at different iterations give what each gives alone."""
    weights, centroids, tau = staggered_groups(131, groups=3)
    ours, ref = assert_matches_reference(backend, weights, centroids, tau, max_iter=8, epsilon=1e-3,
                                         deterministic=True)
    assert len(set(ref[2].tolist())) > 1, f"groups should stop at different iterations: {ref[2]}"
    for g in range(3):
        w, c = on_device(backend, weights[g], centroids[g])
        alone = run(backend, w, c, tau, 8, 1e-3, deterministic=True)
        assert alone[2].item() == ours[2][g].item()
        for index in (0, 1):  # the gradients' upstream differs with the shape: checked above
            assert relative_error(alone[index], ours[index][g]) <= 1e-6


def test_stopped_group_keeps_its_centroids(backend):
    """After a group stops, its history repeats its last centroids bit for bit and its masses are
    zero, while the other groups go on."""
    weights, centroids, _ = make_problem(64, 2, k=4, groups=2, seed=7)
    centroids[0] = weights[0, :4]
    weights[0, 4:] = weights[0, :4].repeat(15, 1)  # every row sits on a centroid
    w, c = on_device(backend, weights, centroids)
    out, history, masses, iterations = torch.ops.dkm_kernels.dkm_forward(
        w, c, 1e-6, 5, 1e-3, True, backend)
    stop = iterations[0].item()
    assert stop < iterations[1].item()
    for t in range(stop, 6):
        assert torch.equal(history[t, 0], history[stop, 0])
    assert (masses[stop:, 0] == 0).all()


def test_zero_mass_centroid_keeps_its_position(backend):
    """A centroid no row attends to stays put, and neither it nor its gradient turns into NaN."""
    weights, centroids, tau = make_problem(300, 2, k=4, seed=11)
    centroids[3] = 1e3  # exp(-(1e3)^2 / tau) is exactly 0 in float32 and in float64
    ours, _ = assert_matches_reference(backend, weights, centroids, tau)
    assert torch.equal(ours[1][3].cpu(), centroids[3].to(ours[1].dtype))
    assert torch.isfinite(ours[3]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_of_equal_weights_is_that_weight(backend, dtype):
    """A centroid that only equal weights attend to moves exactly onto them (a division by the
    mass, not a product with its rounded inverse). 16-bit weights repeat, and at a tiny tau one
    ulp off decides ties between centroids (the reference keeps them: the fuzz found a 10-ulp
    error in bfloat16 values from it)."""
    weights = torch.tensor([[-0.1875]] * 7 + [[0.5]] * 5, dtype=dtype)  # sums exact in float32
    centroids = torch.tensor([[-0.18], [0.49]])
    result = dkm_kernels.dkm(weights.to(device_of(backend)), centroids.to(device_of(backend)),
                             1e-6, max_iter=1, backend=backend)
    expected = torch.tensor([[-0.1875], [0.5]])
    assert torch.equal(result.centroids.cpu(), expected)


def test_tiny_mass_counts_as_none(backend):
    """A centroid whose mass is below recurrence.MIN_MASS is treated as massless by every backend
    and the reference alike: it keeps its position, and nothing turns into NaN or Inf. Here the
    mass is about 1e-40, subnormal in float32, where 1 / mass overflows to Inf."""
    weights, centroids, _ = make_problem(200, 1, k=3, seed=13)
    tau = 1.0
    centroids[2] = weights.max() + 9.6  # exp(-9.6^2) is about 1e-40
    ours, ref = assert_matches_reference(backend, weights, centroids, tau, max_iter=2)
    kept = centroids[2].to(ours[1].dtype)
    assert torch.equal(ref[1][2].to(kept.dtype), kept) and torch.equal(ours[1][2].cpu(), kept)
    assert torch.isfinite(ours[3]).all()


def test_paper_regime(backend):
    """Weights ~ 0.02, tau = 2e-5: the attention is nearly one-hot and the scores large.

    In float32, five iterations here amplify roundoff by up to 1e4 (the plain float32 reference's
    gradient is 2e-5 .. 2e-3 off, depending on the seed, and a backend's error lands on either
    side of it from seed to seed), so one seed says little: summed over seeds, the backend's error
    must be within 2x the plain float32 reference's (the largest over its row orders, as in
    oracle.assert_low_precision_close)."""
    tau = 2e-5
    if takes_float64(backend):
        weights, centroids, _ = make_problem(512, 8, k=16, seed=7, scale=0.02)
        assert_matches_reference(backend, weights, centroids, tau)
    ours_total, naive_total = [0.0] * 3, [0.0] * 3
    for seed in (21, 24, 25, 26):
        weights, centroids, _ = make_problem(300, 8, k=16, seed=seed, scale=0.02)
        w32, c32 = weights.float(), centroids.float()
        exact = run("reference", w32.double(), c32.double(), tau, 5, 0.0)
        ours = run(backend, w32.to(device_of(backend)), c32.to(device_of(backend)), tau, 5, 0.0)
        naive_runs = list(same_precision_reference_runs(w32, c32, tau, 5, 0.0))
        for slot, index in enumerate((0, 1, 3)):
            ours_total[slot] += relative_error(ours[index], exact[index])
            naive_total[slot] += max(relative_error(naive[index], exact[index])
                                     for naive in naive_runs)
    for name, err, err_naive in zip(("values", "centroids", "gradients"), ours_total, naive_total):
        assert err <= 2 * err_naive, f"{name}: summed relative error {err:.3g} > 2 x {err_naive:.3g}"


def test_no_early_stop_runs_max_iter(backend):
    weights, centroids, tau = make_problem(128, 2, k=4, seed=2)
    ours, _ = assert_matches_reference(backend, weights, centroids, tau, max_iter=3, epsilon=0.0)
    assert ours[2].item() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,d,k,groups", [(257, 4, 16, None), (128, 8, 3, None), (97, 2, 5, 3)])
def test_low_precision(backend, dtype, m, d, k, groups):
    weights, centroids, tau = make_problem(m, d, k, groups=groups, seed=m + d + k, dtype=dtype)
    assert_low_precision_close(backend, weights.to(device_of(backend)),
                               centroids.float().to(device_of(backend)), tau)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtypes(backend, dtype):
    if skip_reason(backend, dtype) is not None:
        pytest.skip(skip_reason(backend, dtype))
    weights, centroids, tau = make_problem(64, 2, k=4, dtype=dtype, device=device_of(backend))
    weights.requires_grad_(True)
    result = dkm_kernels.dkm(weights, centroids, tau, backend=backend)
    result.weights.float().sum().backward()
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert result.weights.dtype == dtype and weights.grad.dtype == dtype
    assert result.centroids.dtype == compute and result.iterations.dtype == torch.int64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 3e19])
def test_non_finite_or_overflowing_weights_raise(backend, bad):
    """NaN, Inf, or a weight whose squared distance overflows float32: a ValueError naming the
    weights, from the public function and from the op called directly."""
    weights, centroids, tau = make_problem(300, 4, k=16, dtype=torch.float32,
                                           device=device_of(backend))
    weights[257, 3] = bad
    with pytest.raises(ValueError, match="weights"):
        dkm_kernels.dkm(weights, centroids, tau, backend=backend)
    with pytest.raises(ValueError, match="weights"):
        torch.ops.dkm_kernels.dkm_forward(weights[None], centroids[None], tau, 5, 1e-4, False,
                                          backend)


def test_non_finite_centroids_raise(backend):
    weights, centroids, tau = make_problem(50, 2, k=4, dtype=torch.float32,
                                           device=device_of(backend))
    centroids[1, 0] = float("inf")
    with pytest.raises(ValueError, match="centroids"):
        dkm_kernels.dkm(weights, centroids, tau, backend=backend)


def test_no_groups(backend):
    """G = 0 problems: empty results and an empty gradient, no crash."""
    weights = torch.zeros(0, 10, 2, device=device_of(backend), requires_grad=True)
    centroids = torch.zeros(0, 3, 2, device=device_of(backend))
    result = dkm_kernels.dkm(weights, centroids, 0.1, backend=backend)
    assert result.weights.shape == (0, 10, 2) and result.iterations.shape == (0,)
    result.weights.sum().backward()
    assert weights.grad.shape == (0, 10, 2)


def test_more_centroids_than_rows_and_one_row(backend):
    for m, k in ((1, 4), (3, 16)):
        weights, centroids, tau = make_problem(m, 2, k=k, seed=m + k)
        centroids = centroids + 0.01 * torch.arange(k, dtype=centroids.dtype)[:, None]
        assert_matches_reference(backend, weights, centroids, tau)


def test_non_contiguous_weights_given_to_the_op(backend):
    """The op called directly with a transposed (non-contiguous) weight gives the same result as
    with its contiguous copy."""
    weights, centroids, tau = make_problem(2 * 37, 2, k=5, dtype=torch.float32,
                                           device=device_of(backend))
    strided = weights.reshape(37, 2, 2).permute(1, 0, 2)
    assert not strided.is_contiguous()
    c = centroids[None].expand(2, -1, -1)
    ours = torch.ops.dkm_kernels.dkm_forward(strided, c, tau, 3, 0.0, True, backend)
    expected = torch.ops.dkm_kernels.dkm_forward(strided.contiguous(), c.contiguous(), tau, 3, 0.0,
                                                 True, backend)
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)


def test_deterministic_mode_is_bit_identical(backend):
    weights, centroids, tau = make_problem(300, 4, k=16, seed=16)
    w, c = on_device(backend, weights.float(), centroids.float())
    first = run(backend, w, c, tau, 3, 0.0, deterministic=True)
    second = run(backend, w, c, tau, 3, 0.0, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_deterministic_flag_follows_torch_setting(backend, monkeypatch):
    """dkm(deterministic=None) hands torch.are_deterministic_algorithms_enabled() to the backend's
    passes, forward and backward."""
    seen = []
    original = dkm_kernels.backends.passes

    def spy(name, weights, k, tau, deterministic):
        seen.append(deterministic)
        return original(name, weights, k, tau, deterministic)

    monkeypatch.setattr(dkm_kernels.backends, "passes", spy)
    weights, centroids, tau = make_problem(20, 2, k=2, seed=1, dtype=torch.float32,
                                           device=device_of(backend))
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for setting in (True, False):
            torch.use_deterministic_algorithms(setting)
            w = weights.clone().requires_grad_(True)
            dkm_kernels.dkm(w, centroids, tau, 1, backend=backend).weights.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [True, True, False, False]


def test_opcheck(backend):
    weights, centroids, tau = make_problem(37, 3, k=5, groups=2, seed=8, dtype=torch.float32,
                                           device=device_of(backend))
    args = (weights.requires_grad_(True), centroids, tau, 3, 1e-4, True, backend)
    torch.library.opcheck(torch.ops.dkm_kernels.dkm_forward.default, args)
    _, history, masses, iterations = torch.ops.dkm_kernels.dkm_forward(*args)
    grad_out = torch.randn(weights.shape, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(
        torch.ops.dkm_kernels.dkm_backward.default,
        (grad_out.to(weights.device), weights.detach(), history, masses, iterations, tau, True,
         backend),
    )


def test_torch_compile_fullgraph(backend):
    weights, centroids, tau = make_problem(40, 2, k=4, seed=9, dtype=torch.float32,
                                           device=device_of(backend))

    def loss(x):
        return dkm_kernels.dkm(x, centroids, tau, 3, 0.0, backend=backend).weights.square().sum()

    assert_compiled_gradient_equals_eager(loss, weights)
