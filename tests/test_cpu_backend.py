"""Backend `cpu` (the C++ extension) against the float64 reference: values, centroids, iterations,
gradients; determinism; op registration; bytes saved for backward.

Every available instruction set (dkm_kernels.backends.cpu.available_isas(): avx512, avx2, generic)
is checked on the main float64 cases by forcing it with DKM_KERNELS_ISA.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dkm_kernels
from dkm_kernels.backends import cpu
from oracle import (
    assert_low_precision_close,
    assert_matches_reference_float64,
    make_problem,
    run,
    staggered_groups,
)

pytestmark = pytest.mark.skipif(
    cpu.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=str(cpu.unavailable_reason(torch.device("cpu"), torch.float32)),
)

ISAS = cpu.available_isas()


@pytest.fixture(autouse=True)
def one_thread(request):
    """Small problems run on one thread: on a loaded machine, waking OpenMP threads for
    millisecond ops makes the reference take seconds. The kernels' results do not depend on the
    thread count (test_deterministic_and_independent_of_thread_count), and tests that want
    threads ask for the `threads` fixture."""
    if "threads" in request.fixturenames:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def threads():
    return torch.get_num_threads()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("DKM_KERNELS_ISA", request.param)
    assert cpu.isa() == request.param
    return request.param


# (M, d, k): every d with every k, M alternating prime and power of two. k = 1000 is not a multiple
# of any vector width and larger than every row tile; d = 3 and 5 take the any-d kernels.
SHAPES = [
    (m, d, k)
    for i, (d, k) in enumerate((d, k) for d in (1, 2, 4, 8, 16) for k in (2, 3, 16, 256))
    for m in [(257, 128, 131, 64, 97)[i % 5]]
] + [(1031, 2, 1000), (512, 3, 33), (211, 5, 16), (1, 4, 3)]


@pytest.mark.parametrize("m,d,k", SHAPES)
def test_float64_matches_reference(m, d, k):
    weights, centroids, tau = make_problem(m, d, k, seed=m * 7 + d * 3 + k)
    assert_matches_reference_float64("cpu", weights, centroids, tau)


@pytest.mark.parametrize("m,d,k", [(257, 1, 256), (128, 8, 16), (97, 2, 3), (1031, 16, 300), (300, 3, 33)])
def test_float64_every_instruction_set(isa, m, d, k):
    weights, centroids, tau = make_problem(m, d, k, seed=m + d + k)
    assert_matches_reference_float64("cpu", weights, centroids, tau)


def test_grouped_groups_stop_on_their_own(isa):
    """Groups that converge at different iterations give what each gives alone."""
    weights, centroids, tau = staggered_groups(211, groups=4)
    ours, ref = assert_matches_reference_float64("cpu", weights, centroids, tau, max_iter=8, epsilon=1e-3)
    assert len(set(ref[2].tolist())) > 1, f"groups should stop at different iterations: {ref[2]}"
    for g in range(4):
        alone = run("cpu", weights[g], centroids[g], tau, 8, 1e-3)
        torch.testing.assert_close(alone[0], ours[0][g], rtol=1e-12, atol=1e-12)
        assert alone[2].item() == ours[2][g].item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_mass_centroid_keeps_its_position(dtype):
    """A centroid no row attends to stays put, and its gradient passes through without NaN."""
    weights, centroids, tau = make_problem(300, 2, k=4, seed=11)
    centroids[3] = 1e3  # exp(-(1e3)^2 / tau) is exactly 0, in float32 and in float64
    if dtype == torch.float64:
        ours, _ = assert_matches_reference_float64("cpu", weights, centroids, tau)
    else:
        assert_low_precision_close("cpu", weights.float(), centroids.float(), tau)
        ours = run("cpu", weights.float(), centroids.float(), tau)
    assert torch.equal(ours[1][3], centroids[3].to(ours[1].dtype))
    assert torch.isfinite(ours[3]).all()


def test_paper_regime():
    """Weights ~ 0.02, tau = 2e-5: the attention is nearly one-hot and the scores large."""
    weights, centroids, _ = make_problem(2048, 8, k=256, seed=7, scale=0.02)
    assert_matches_reference_float64("cpu", weights, centroids, 2e-5)
    weights, centroids, _ = make_problem(1024, 1, k=4, seed=8, scale=0.02)
    assert_matches_reference_float64("cpu", weights, centroids, 2e-5)


def test_no_early_stop_runs_max_iter():
    weights, centroids, tau = make_problem(128, 2, k=4, seed=2)
    ours, _ = assert_matches_reference_float64("cpu", weights, centroids, tau, max_iter=3, epsilon=0.0)
    assert ours[2].item() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,d,k", [(1031, 1, 16), (512, 8, 256), (97, 4, 3), (1031, 16, 300)])
def test_low_precision(dtype, m, d, k):
    weights, centroids, tau = make_problem(m, d, k, seed=m + d + k, dtype=dtype)
    assert_low_precision_close("cpu", weights, centroids, tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_paper_regime(dtype):
    weights, centroids, _ = make_problem(2048, 8, k=256, seed=21, scale=0.02, dtype=dtype)
    assert_low_precision_close("cpu", weights, centroids, 2e-5)


def test_low_precision_grouped():
    weights, centroids, tau = make_problem(300, 4, k=16, groups=3, seed=9, dtype=torch.float16)
    assert_low_precision_close("cpu", weights, centroids, tau)


def test_output_dtypes():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        weights, centroids, tau = make_problem(64, 2, k=4, dtype=dtype)
        weights.requires_grad_(True)
        result = dkm_kernels.dkm(weights, centroids.to(dkm_kernels._ops.compute_dtype(dtype)), tau,
                                 backend="cpu")
        result.weights.sum().backward()
        assert result.weights.dtype == dtype and weights.grad.dtype == dtype
        assert result.centroids.dtype == dkm_kernels._ops.compute_dtype(dtype)
        assert result.iterations.dtype == torch.int64


def test_auto_prefers_cpu_on_cpu():
    assert dkm_kernels.backends.choose(torch.device("cpu"), torch.float32) == "cpu"
    assert "CPU tensors" in cpu.unavailable_reason(torch.device("meta"), torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise_value_error(bad):
    weights, centroids, tau = make_problem(300, 4, k=16, dtype=torch.float32)
    weights[257, 3] = bad
    with pytest.raises(ValueError, match="weights contain NaN or Inf"):
        dkm_kernels.dkm(weights, centroids, tau, backend="cpu")
    with pytest.raises(ValueError, match="weights contain NaN or Inf"):
        torch.ops.dkm_kernels.cpu_forward(weights[None], centroids[None], tau, 5, 1e-4, False)


def _results(weights, centroids, tau):
    return run("cpu", weights, centroids, tau, max_iter=4, epsilon=0.0)


def test_deterministic_and_independent_of_thread_count(threads):
    """Bit-identical run to run and for 1, 2 or 3 threads (the chunking depends on shapes only)."""
    weights, centroids, tau = make_problem(20_011, 8, k=256, seed=5, dtype=torch.float32)
    first = _results(weights, centroids, tau)
    again = _results(weights, centroids, tau)
    try:
        others = []
        for n in (1, 3):
            torch.set_num_threads(n)
            others.append(_results(weights, centroids, tau))
    finally:
        torch.set_num_threads(threads)
    for other in [again, *others]:
        for a, b in zip(first, other):
            assert torch.equal(a, b)


def test_opcheck():
    weights, centroids, tau = make_problem(67, 4, k=5, groups=2, seed=6, dtype=torch.float32)
    args = (weights.requires_grad_(True), centroids, tau, 3, 1e-4, True)
    torch.library.opcheck(torch.ops.dkm_kernels.cpu_forward.default, args)
    _, history, masses, iterations = torch.ops.dkm_kernels.cpu_forward(*args)
    grad_out = torch.randn_like(weights)
    torch.library.opcheck(
        torch.ops.dkm_kernels.cpu_backward.default,
        (grad_out, weights.detach(), history, masses, iterations, tau, True),
    )


def test_missing_extension_falls_back_with_one_warning():
    """Without dkm_kernels._C the package imports, warns once how to build it, and runs on `torch`."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["dkm_kernels._C"] = None  # makes `from .. import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import dkm_kernels
            import torch
            from dkm_kernels.backends import cpu
        ours = [w for w in caught if "dkm_kernels._C" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "pip install --no-build-isolation -e ." in str(ours[0].message)
        reason = cpu.unavailable_reason(torch.device("cpu"), torch.float32)
        assert reason and "pip install --no-build-isolation -e ." in reason
        assert dkm_kernels.backends.choose(torch.device("cpu"), torch.float32) == "torch"
        w = torch.randn(50, 2)
        print(dkm_kernels.dkm(w, w[:4].clone(), 0.1).iterations.item())
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
