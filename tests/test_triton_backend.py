"""Backend `triton` against the float64 reference: values, centroids, iterations, gradients.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), which is slow: shapes are small, but they cover every code path of the
kernels: one centroid block and several (running-max softmax), ragged row tiles, several programs
per group (slot reduction), atomic and deterministic reductions, grouped launches.

Tolerances for float32 inputs, compared with the float64 reference fed the same float32-rounded
inputs (so that only the backend's arithmetic is measured):
- values and centroids: relative error <= 2e-5 of the tensor's norm. Unit roundoff is 6e-8; scores
  are distances over a tau picked from the data (|S| of a few units), each pass sums M terms, and
  5 iterations compound: the plain float32 reference itself is at 1e-7..1e-6.
- gradients: relative error <= 1e-4. The chain through 5 iterations multiplies by 2/tau per step
  and divides by masses; the plain float32 reference measures up to 2e-5, the bound leaves ~5x.
Some problems are ill-conditioned (d = 1 with 16 centroids crowded on a line: the plain float32
reference's gradient is 1.7e-4 off); there the bound is twice the plain float32 reference's error,
measured in the same test, as in FlashAttention's rule.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import dkm_kernels  # noqa: E402
from dkm_kernels.backends import triton_kernels  # noqa: E402
from oracle import (  # noqa: E402
    assert_low_precision_close,
    make_problem,
    relative_error,
    run,
    staggered_groups,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)

VALUE_RTOL = 2e-5
GRADIENT_RTOL = 1e-4


def assert_float32_close(weights, centroids, tau, max_iter=5, epsilon=0.0, **kwargs):
    """float32 inputs against float64 on the same rounded inputs: every output on its own."""
    w32, c32 = weights.float(), centroids.float()
    ours = run("triton", w32.to(DEVICE), c32.to(DEVICE), tau, max_iter, epsilon, **kwargs)
    ref = run("reference", w32.double(), c32.double(), tau, max_iter, epsilon)
    naive = run("reference", w32, c32, tau, max_iter, epsilon)
    assert torch.equal(ours[2].cpu(), ref[2].cpu()), f"iterations {ours[2]} != reference {ref[2]}"
    for name, index, rtol in (("values", 0, VALUE_RTOL), ("centroids", 1, VALUE_RTOL),
                              ("gradients", 3, GRADIENT_RTOL)):
        assert ours[index].dtype == torch.float32
        err = relative_error(ours[index], ref[index])
        bound = max(rtol, 2 * relative_error(naive[index], ref[index]))
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"
    return ours, ref


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

def test_ops_are_registered():
    assert hasattr(torch.ops.dkm_kernels, "triton_forward")
    assert hasattr(torch.ops.dkm_kernels, "triton_backward")


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


@pytest.mark.parametrize("deterministic", [True, False])
def test_grouped_groups_stop_on_their_own(deterministic):
    """Groups that converge at different iterations give what each gives alone."""
    weights, centroids, tau = staggered_groups(131, groups=3)
    ours, ref = assert_float32_close(weights, centroids, tau, max_iter=8, epsilon=1e-3,
                                     deterministic=deterministic)
    assert len(set(ref[2].tolist())) > 1, f"groups should stop at different iterations: {ref[2]}"
    if not deterministic:
        return
    for g in range(3):
        alone = run("triton", weights[g].float().to(DEVICE), centroids[g].float().to(DEVICE), tau,
                    8, 1e-3, deterministic=deterministic)
        assert alone[2].item() == ours[2][g].item()
        for index in (0, 1):  # the gradients' upstream differs with the shape: checked above
            assert relative_error(alone[index], ours[index][g]) <= 1e-6


def test_grouped_stopped_group_keeps_its_centroids():
    """After a group stops, the kernels skip it: its final centroids are those of its last
    iteration, bit for bit, while the other groups go on."""
    weights, centroids, tau = make_problem(64, 2, k=4, groups=2, seed=7)
    centroids[0] = weights[0, :4]
    weights[0, 4:] = weights[0, :4].repeat(15, 1)  # every row sits on a centroid
    w = weights.float().to(DEVICE)
    c = centroids.float().to(DEVICE)
    out, history, masses, iterations = torch.ops.dkm_kernels.triton_forward(
        w, c, 1e-6, 5, 1e-3, True)
    stop = iterations[0].item()
    assert stop < iterations[1].item()
    for t in range(stop, 6):
        assert torch.equal(history[t, 0], history[stop, 0])
    assert (masses[stop:, 0] == 0).all()


def test_zero_mass_centroid_keeps_its_position():
    """A centroid no row attends to stays put, and neither it nor its gradient turns into NaN."""
    weights, centroids, tau = make_problem(300, 2, k=4, seed=11)
    centroids[3] = 1e3  # exp(-(1e3)^2 / tau) underflows to exactly 0 in float32
    ours, _ = assert_float32_close(weights, centroids, tau)
    assert torch.equal(ours[1][3].cpu(), centroids[3].float())
    assert torch.isfinite(ours[3]).all()


def test_zero_mass_centroid_above_one_block(small_blocks):
    weights, centroids, tau = make_problem(70, 2, k=20, seed=12)
    centroids[17] = 1e3
    ours, _ = assert_float32_close(weights, centroids, tau)
    assert torch.equal(ours[1][17].cpu(), centroids[17].float())


# ---------------------------------------------------------------------------------------------
# Low precision and the paper's regime, by the rule of FlashAttention's tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, d, k", [(257, 4, 16), (128, 8, 3)])
def test_low_precision_inputs(dtype, m, d, k):
    weights, centroids, tau = make_problem(m, d, k=k, seed=m + d + k)
    assert_low_precision_close("triton", weights.to(dtype).to(DEVICE),
                               centroids.float().to(DEVICE), tau)


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


def test_paper_regime_float32_over_seeds():
    """The paper's regime in float32. Here five iterations amplify roundoff by up to 1e4 (measured:
    the plain float32 reference's gradient is 2e-5 .. 2e-3 off, depending on the seed, and the
    kernels' error lands on either side of it from seed to seed), so one seed says little: summed
    over seeds, the kernels' error must be within 2x the plain float32 reference's."""
    tau = 2e-5
    ours_total, naive_total = [0.0] * 3, [0.0] * 3
    for seed in (21, 24, 25, 26):
        weights, centroids, _ = make_problem(300, 8, k=16, seed=seed, scale=0.02)
        w32, c32 = weights.float(), centroids.float()
        exact = run("reference", w32.double(), c32.double(), tau, 5, 0.0)
        ours = run("triton", w32.to(DEVICE), c32.to(DEVICE), tau, 5, 0.0)
        naive = run("reference", w32, c32, tau, 5, 0.0)
        for slot, index in enumerate((0, 1, 3)):
            ours_total[slot] += relative_error(ours[index], exact[index])
            naive_total[slot] += relative_error(naive[index], exact[index])
    for name, err, err_naive in zip(("values", "centroids", "gradients"), ours_total, naive_total):
        assert err <= 2 * err_naive, f"{name}: summed relative error {err:.3g} > 2 x {err_naive:.3g}"


def test_output_dtype_follows_weights():
    weights, centroids, tau = make_problem(40, 2, k=3, seed=2)
    w = weights.to(torch.bfloat16).to(DEVICE).requires_grad_(True)
    result = dkm_kernels.dkm(w, centroids.float().to(DEVICE), tau, backend="triton")
    result.weights.float().sum().backward()
    assert result.weights.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert result.centroids.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Determinism, memory, registration
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m, d, k", [(300, 4, 16), (97, 2, 300)])
def test_deterministic_mode_is_bit_identical(m, d, k):
    weights, centroids, tau = make_problem(m, d, k=k, seed=k)
    w, c = weights.float().to(DEVICE), centroids.float().to(DEVICE)
    first = run("triton", w, c, tau, 3, 0.0, deterministic=True)
    second = run("triton", w, c, tau, 3, 0.0, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_deterministic_flag_follows_torch_setting(monkeypatch):
    """dkm(deterministic=None) uses torch.are_deterministic_algorithms_enabled()."""
    seen = []
    original = triton_kernels._Plan.__init__

    def spy(self, groups, m, k, d, deterministic, device, **kwargs):
        seen.append(deterministic)
        original(self, groups, m, k, d, deterministic, device, **kwargs)

    monkeypatch.setattr(triton_kernels._Plan, "__init__", spy)
    weights, centroids, tau = make_problem(20, 2, k=2, seed=1)
    w, c = weights.float().to(DEVICE), centroids.float().to(DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        dkm_kernels.dkm(w, c, tau, 1, backend="triton")
        torch.use_deterministic_algorithms(False)
        dkm_kernels.dkm(w, c, tau, 1, backend="triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [True, False]  # forward only: no gradient was asked for


def test_opcheck():
    weights, centroids, tau = make_problem(37, 2, k=5, groups=2, seed=0)
    w, c = weights.float().to(DEVICE), centroids.float().to(DEVICE)
    torch.library.opcheck(torch.ops.dkm_kernels.triton_forward.default,
                          (w.clone().requires_grad_(True), c, tau, 3, 0.0, True))
    _, history, masses, iterations = torch.ops.dkm_kernels.triton_forward(w, c, tau, 3, 0.0, True)
    grad_out = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.library.opcheck(torch.ops.dkm_kernels.triton_backward.default,
                          (grad_out, w, history, masses, iterations, tau, True))


def test_torch_compile_fullgraph():
    weights, centroids, tau = make_problem(40, 2, k=4, seed=9)
    w, c = weights.float().to(DEVICE), centroids.float().to(DEVICE)

    def loss(x):
        return dkm_kernels.dkm(x, c, tau, 3, 0.0, backend="triton").weights.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x_compiled = w.clone().requires_grad_(True)
    x_eager = w.clone().requires_grad_(True)
    compiled(x_compiled).backward()
    loss(x_eager).backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=0, atol=0)
