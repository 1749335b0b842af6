"""Backend `cpu` (the C++ extension) against the float64 reference: values, centroids, iterations,
gradients; determinism; op registration; bytes saved for backward.

Every available instruction set (dkm_kernels.backends.cpu.available_isas(): avx512, avx2, generic)
is checked on the main float64 cases by forcing it with DKM_KERNELS_ISA (conftest.py's `isa`).
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dkm_kernels
from dkm_kernels.backends import cpu
from oracle import (
    CPU_EXTENSION_TESTS,
    assert_low_precision_close,
    assert_matches_reference_float64,
    make_problem,
    run,
)

pytestmark = CPU_EXTENSION_TESTS


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


# k = 512 and 1024 pad their rows of kp values off 4 KiB multiples (float64, float32); from k = 2048
# d = 1 recomputes its distances in the exponential sweep.
@pytest.mark.parametrize("m,d,k", [(257, 1, 256), (128, 8, 16), (97, 2, 3), (1031, 16, 300), (300, 3, 33),
                                   (61, 4, 512), (67, 1, 2048), (29, 8, 1024)])
def test_float64_every_instruction_set(isa, m, d, k):
    weights, centroids, tau = make_problem(m, d, k, seed=m + d + k)
    assert_matches_reference_float64("cpu", weights, centroids, tau)


# k <= 16 with d in {1, 2, 4, 8} runs the kernels that lay rows across vector lanes: k at and past
# each of their centroid tiles (4, 8, 16) and at 17 (the centroid-vectorised kernels again), M not
# a multiple of any lane count (a partial block of rows at the end), two groups.
LANE_SHAPES = [(37, 1, 1), (53, 2, 4), (61, 4, 5), (29, 8, 8), (45, 1, 9), (67, 2, 16), (19, 4, 16), (41, 8, 17)]


@pytest.mark.parametrize("m,d,k", LANE_SHAPES)
def test_rows_across_lanes_every_instruction_set(isa, m, d, k):
    weights, centroids, tau = make_problem(m, d, k, groups=2, seed=m * d + k)
    assert_matches_reference_float64("cpu", weights, centroids, tau)
    weights, centroids, tau = make_problem(m, d, k, groups=2, seed=m * d + k, dtype=torch.float16)
    assert_low_precision_close("cpu", weights, centroids, tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,d,k", [(1031, 1, 16), (512, 8, 256), (97, 4, 3), (1031, 16, 300), (131, 1, 2048),
                                   (67, 4, 1024)])
def test_low_precision(dtype, m, d, k):
    weights, centroids, tau = make_problem(m, d, k, seed=m + d + k, dtype=dtype)
    assert_low_precision_close("cpu", weights, centroids, tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,k", [(8, 256), (1, 4), (4, 16)])  # centroids in lanes, then rows in lanes
def test_low_precision_paper_regime(isa, dtype, d, k):
    """The paper's weights and tau on every instruction set: the sparse passes (listed pairs, an
    AVX-512 listing of its own) and the lane kernels within the tolerance rule."""
    weights, centroids, _ = make_problem(2048, d, k=k, seed=21, scale=0.02, dtype=dtype)
    assert_low_precision_close("cpu", weights, centroids, 2e-5)


# The share of a 4-row block's pairs attended at or under which a pass takes its pairs one by one
# (csrc/kernel_impl.h, Sparse::forward_below and gradient_below), by d; the output pass takes them
# at this share or a larger one (Sparse::output_below).
SPARSE_BELOW = {"forward": {8: 8, 16: 6}, "backward": {8: 4, 16: 4}}


def sparse_block_share(weights, centroids, tau, sweep):
    """The share of 4-row blocks whose `sweep` ("forward" or "backward") takes the sparse rows
    (d = 8 or 16 and at most 1 / SPARSE_BELOW of the block's (row, centroid) pairs listed), at the
    starting centroids. Listed: in float an exponential of at least 2^-60 (csrc/kernels.h, relevance;
    every centroid here has the mass that certifies it), in float64 one above the smallest normal
    number."""
    if weights.shape[1] not in (8, 16):
        return 0.0
    w, c = weights.double(), centroids.double()
    dist = torch.cdist(w, c) ** 2
    exponent = (dist.min(1, keepdim=True).values - dist) * (math.log2(math.e) / tau)
    listed = exponent >= -60 if weights.dtype != torch.float64 else exponent > -1022
    blocks = listed[: len(w) // 4 * 4].reshape(-1, 4 * len(c)).double().mean(1)
    return (blocks * SPARSE_BELOW[sweep][w.shape[1]] <= 1).double().mean().item()


@pytest.mark.parametrize("dtype,d,k,tau_scale,sparse_sweeps", [
    (torch.float32, 8, 256, 0.22, ("forward", "backward")),  # two fifths of the forward's blocks dense
    (torch.float32, 8, 256, 0.3, ("backward",)),  # a fifth of the backward's blocks dense
    (torch.float64, 8, 256, 0.01, ("forward", "backward")),
    (torch.float32, 16, 64, 0.06, ("forward", "backward")),  # half the forward's blocks dense
    (torch.float64, 16, 64, 0.001, ("forward", "backward")),
])
def test_sparse_rows(isa, dtype, d, k, tau_scale, sparse_sweeps):
    """A tau so small against the distances that most attention weights are exactly 0: the
    forward's sums, its output pass and the backward step take their pairs one by one (in some
    blocks, beside dense ones in the same call where noted; the output pass in at least the
    forward's), and values and gradients still match the float64 reference, on every
    instruction set."""
    weights, centroids, tau = make_problem(1031, d, k, seed=d + k)
    weights, tau = weights.to(dtype), tau * tau_scale
    for sweep in sparse_sweeps:
        share = sparse_block_share(weights, centroids, tau, sweep)
        assert share >= 0.25, f"only {share:.0%} of the {sweep} blocks are sparse: the test would not reach them"
    if dtype == torch.float64:
        assert_matches_reference_float64("cpu", weights, centroids, tau)
    else:
        assert_low_precision_close("cpu", weights, centroids.float(), tau)


def test_sparse_rows_switch(monkeypatch):
    """DKM_KERNELS_SPARSE=0 makes every block dense: other results (another order of summation),
    within the tolerance of the float64 reference all the same; a value other than 0 or 1 is
    refused, naming the variable and the fix."""
    weights, centroids, tau = make_problem(1031, 8, 256, seed=8 + 256)
    weights, tau = weights.float(), tau * 0.1
    assert sparse_block_share(weights, centroids, tau, "backward") >= 0.25
    sparse = run("cpu", weights, centroids.float(), tau, max_iter=4, epsilon=0.0)
    monkeypatch.setenv("DKM_KERNELS_SPARSE", "0")
    dense = run("cpu", weights, centroids.float(), tau, max_iter=4, epsilon=0.0)
    assert not all(torch.equal(a, b) for a, b in zip(sparse, dense)), "the switch changed nothing"
    assert_low_precision_close("cpu", weights, centroids.float(), tau)
    monkeypatch.setenv("DKM_KERNELS_SPARSE", "no")
    with pytest.raises(ValueError, match="DKM_KERNELS_SPARSE=no is not 0 or 1"):
        run("cpu", weights, centroids.float(), tau, max_iter=1, epsilon=0.0)


@pytest.mark.parametrize("dtype,m,d,k,tau_scale", [
    (torch.float32, 1031, 8, 256, 0.1),   # sparse and dense blocks, the forward's mass lane
    (torch.float64, 1031, 8, 256, 0.01),
    (torch.float32, 515, 16, 64, 0.03),
    (torch.float32, 131, 1, 2048, 1.0),   # distances recomputed
    (torch.float32, 1031, 4, 16, 1.0),    # rows in lanes
    (torch.float32, 1031, 1, 4, 1.0),
    (torch.float64, 97, 3, 300, 1.0),     # d known only at run time
])
def test_kernels_read_only_scratch_they_wrote(isa, monkeypatch, dtype, m, d, k, tau_scale):
    """The work items share one scratch per thread, not zeroed between them: with every item's
    scratch filled with NaN first (DKM_KERNELS_POISON_SCRATCH=1) values and gradients are
    bit-identical, so no kernel reads a scratch value it did not write."""
    weights, centroids, tau = make_problem(m, d, k, seed=m + d + k)
    weights, centroids, tau = weights.to(dtype), centroids.to(dtype), tau * tau_scale
    plain = run("cpu", weights, centroids, tau, max_iter=3, epsilon=0.0)
    monkeypatch.setenv("DKM_KERNELS_POISON_SCRATCH", "1")
    poisoned = run("cpu", weights, centroids, tau, max_iter=3, epsilon=0.0)
    for a, b in zip(plain, poisoned):
        assert torch.equal(a, b)
    assert all(torch.isfinite(t).all() for t in plain[:2] + plain[3:])


def test_poison_switch_refuses_other_values(monkeypatch):
    weights, centroids, tau = make_problem(64, 8, 16, seed=5)
    monkeypatch.setenv("DKM_KERNELS_POISON_SCRATCH", "yes")
    with pytest.raises(ValueError, match="DKM_KERNELS_POISON_SCRATCH=yes is not 0 or 1"):
        run("cpu", weights, centroids, tau, max_iter=1, epsilon=0.0)


def test_auto_prefers_cpu_on_cpu():
    assert dkm_kernels.backends.choose(torch.device("cpu"), torch.float32) == "cpu"
    assert "CPU tensors" in cpu.unavailable_reason(torch.device("meta"), torch.float32)


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


def _pass_args(groups=2, m=20, d=3, k=4):
    weights, centroids, tau = make_problem(m, d, k, groups=groups, dtype=torch.float32)
    active = torch.ones(groups, dtype=torch.bool)
    return weights, centroids, tau, active


@pytest.mark.parametrize("bad, words", [
    (lambda a: a.update(values=a["values"][:, :5]), "values"),
    (lambda a: a.update(centroids=a["centroids"][:1]), "centroids must have shape"),
    (lambda a: a.update(centroids=a["centroids"][..., :2]), "centroids must have shape"),
    (lambda a: a.update(centroids=a["centroids"].double()), "centroids must be Float"),
    (lambda a: a.update(active=a["active"][:1]), "active"),
    (lambda a: a.update(weights=a["weights"].int()), "weights must be"),
    (lambda a: a.update(weights=a["weights"][0]), "weights must have shape"),
    (lambda a: a.update(tau=0.0), "tau"),
])
def test_pass_ops_check_their_inputs(bad, words):
    """The registered C++ ops, called directly with disagreeing inputs, raise instead of reading
    past their buffers."""
    weights, centroids, tau, active = _pass_args()
    args = dict(weights=weights, values=weights, centroids=centroids, active=active, tau=tau)
    bad(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
        torch.ops.dkm_kernels.cpu_attention_sums(*args.values())


def test_gradient_pass_checks_its_inputs():
    weights, centroids, tau, active = _pass_args()
    grad_weights = torch.zeros_like(weights)
    mass_k = torch.zeros(2, 4)
    good = [weights, weights, centroids, centroids, mass_k, centroids, active, grad_weights, tau, mass_k]
    torch.ops.dkm_kernels.cpu_gradient_pass(*good)
    for index, bad, words in [
        (9, torch.zeros(2, 5), "mass must have shape \\(G, k\\)"),
        (9, torch.zeros(2, 4, dtype=torch.float64), "mass must be Float"),
        (4, torch.zeros(2, 5), "grad_dot_next"),
        (3, centroids[:, :3], "grad_over_mass"),
        (5, centroids[:1], "final_centroids"),
        (7, torch.zeros(2, 20, 2), "grad_weights"),
        (7, torch.zeros(2, 3, 20).transpose(1, 2), "grad_weights"),
        (1, weights[:, :3], "grad_out"),
    ]:
        args = list(good)
        args[index] = bad
        with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
            torch.ops.dkm_kernels.cpu_gradient_pass(*args)


def test_output_pass_checks_its_inputs():
    weights, centroids, tau, _ = _pass_args()
    with pytest.raises(ValueError, match="final_centroids"):
        torch.ops.dkm_kernels.cpu_output(weights, centroids, centroids[:, :3], tau)


def test_converted_rows_in_many_blocks_per_chunk():
    """bfloat16 weights are converted to float32 a block of rows at a time (32 KiB of them per
    kernel call: csrc/dkm_cpu.cpp, conversion_rows). Here 256 chunks of 640 rows at d = 16 take two
    calls each, the second partial. The results are float32's on the same values up to the order
    of the sums at the calls' boundaries: centroids within 1e-6 of their norm, and the values and
    gradients, returned in bfloat16, within its rounding."""
    weights, centroids, tau = make_problem(256 * 640, 16, 32, seed=5, dtype=torch.bfloat16)
    centroids = centroids.float()
    ours = run("cpu", weights, centroids, tau, max_iter=3, epsilon=0.0)
    same_values = run("cpu", weights.float(), centroids, tau, max_iter=3, epsilon=0.0)
    assert (ours[1] - same_values[1]).norm() <= 1e-6 * same_values[1].norm()
    for index in (0, 3):  # values and gradients: float32's rounded to bfloat16, or an ulp from it
        expected = same_values[index].to(torch.bfloat16).float()
        assert (ours[index].float() - expected).norm() <= 2 ** -8 * expected.norm()
