"""The `cpu` backend's passes over many problems (backends/cpu.py RaggedPasses on the C++ ops
cpu_ragged_*, docs/design.md §12): one parallel region per pass for every problem of a `dkm_many`
call. Each problem is chunked and reduced as when it runs alone, so everything `dkm_many` returns,
values, centroids, iteration counts and gradients, must be bit-identical to the per-problem path
(many.RaggedPasses calling the one-problem ops), for mixed d, k, tau, groups and stop iterations,
every weights dtype, 1 and 2 threads and every instruction set. That path itself is checked
against the float64 reference in test_cpu_backend.py and test_many.py.
"""
import pytest
import torch

from dkm_kernels import DKMProblem, backends, dkm_many, many
from dkm_kernels.backends import cpu
from oracle import CPU_EXTENSION_TESTS, make_problem

pytestmark = CPU_EXTENSION_TESTS

ops = torch.ops.dkm_kernels

# (groups, M, d, k, max_iter, epsilon): k = 300 is past 256 and, like 17 and 33, not a multiple of
# 16 (padded centroids); d = 3 takes the any-d kernels; M spans 1 to 13 chunks of 64 rows. The
# large problem gives 2 threads work enough to both run (the op wakes a thread per ~2M steps).
SHAPES = [(None, 700, 8, 300, 4, 0.0), (2, 130, 1, 17, 3, 1e-4), (3, 90, 3, 4, 5, 1e-3),
          (None, 40, 16, 33, 2, 0.0)]


def mixed_problems(dtypes, seed=0):
    """One problem per SHAPES entry, its weights of dtypes[i % len(dtypes)], a tau of its own; the
    three-group problem's middle group starts on its one point, so it stops at its first iteration
    while its neighbours run on."""
    found = []
    for index, (groups, m, d, k, max_iter, epsilon) in enumerate(SHAPES):
        dtype = dtypes[index % len(dtypes)]
        weights, centroids, tau = make_problem(m, d, k, groups=groups, seed=seed + index)
        weights = weights.to(dtype)
        centroids = centroids.to(torch.float64 if dtype == torch.float64 else torch.float32)
        if groups == 3:
            weights[1] = weights[1, :1]
            centroids[1] = weights[1, 0]
        found.append(DKMProblem(weights, centroids, tau * (1 + index), max_iter, epsilon))
    return found


def per_problem_passes(monkeypatch):
    """dkm_many on many.RaggedPasses: every problem's own one-problem ops, one after another."""
    monkeypatch.setattr(backends, "ragged_passes_class", lambda *args: None)


def forward_backward(problems, seed=3):
    leaves = [p.weights.clone().requires_grad_(True) for p in problems]
    results = dkm_many([p._replace(weights=w) for w, p in zip(leaves, problems)], backend="cpu")
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(r.weights.shape, generator=gen).to(r.weights) for r in results]
    torch.autograd.backward([r.weights for r in results], upstream)
    return [(r.weights, r.centroids, r.iterations, leaf.grad) for r, leaf in zip(results, leaves)]


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16, torch.bfloat16), (torch.float64,)],
                         ids=["float32-float16-bfloat16", "float64"])
@pytest.mark.parametrize("count", [1, 2])
def test_bit_identical_to_the_per_problem_path(isa, dtypes, count, threads, monkeypatch):
    problems = mixed_problems(dtypes)
    torch.set_num_threads(count)
    try:
        ragged = forward_backward(problems)
        with monkeypatch.context() as patch:
            per_problem_passes(patch)
            alone = forward_backward(problems)
    finally:
        torch.set_num_threads(threads)
    stopped = ragged[2][2]
    assert stopped[1] == 1 < stopped[0]  # one segment stops early, its neighbours run on
    for index, (a, b) in enumerate(zip(alone, ragged)):
        for name, x, y in zip(("values", "centroids", "iterations", "gradients"), a, b):
            assert x.dtype == y.dtype and torch.equal(x, y), f"problem {index}: {name} differ"


def test_passes_match_the_one_problem_ops_with_inactive_segments():
    """Each pass directly: packed results equal the one-problem ops' on each part, zero for an
    inactive segment and in the padding; the gradient pass with and without the upstream gradient."""
    problems = mixed_problems((torch.float32,), seed=7)
    weights = [p.weights if p.weights.dim() == 3 else p.weights[None] for p in problems]
    layout = many.Layout.of(weights, [p.centroids.shape[-2] for p in problems])
    taus = [p.tau for p in problems]
    gen = torch.Generator().manual_seed(1)

    def packed(dims=3):  # random per-segment values, zero in the padding
        return layout.pack([torch.randn((g, k, d)[:dims], generator=gen)
                            for g, k, d in zip(layout.groups, layout.ks, layout.dims)], dims=dims)

    centroids = layout.pack([p.centroids.reshape(w.shape[0], -1, w.shape[2])
                             for p, w in zip(problems, weights)])
    final, over_mass, dot = centroids + 0.01 * packed(), packed(), packed(2)
    active = torch.tensor([True, False, True, True, False, True, True])
    assert active.numel() == layout.segments
    upstream = [torch.randn(w.shape, generator=gen) for w in weights]
    ragged = cpu.RaggedPasses(weights, layout, taus, True)
    alone = many.RaggedPasses([cpu.Passes(w, k, tau, True) for w, k, tau in
                               zip(weights, layout.ks, taus)], layout)
    for values in (weights, upstream):
        sums, mass = ragged.attention_sums(values, centroids, active)
        expected_sums, expected_mass = alone.attention_sums(values, centroids, active)
        assert torch.equal(sums, expected_sums) and torch.equal(mass, expected_mass)
        assert not sums[~active].any() and mass[active].sum() > 0
    for a, b in zip(ragged.output(centroids, final), alone.output(centroids, final)):
        assert torch.equal(a, b)
    for grad_out in (upstream, None):
        grads = [[torch.zeros(w.shape) for w in weights] for _ in range(2)]
        sums = [passes.gradient(grad_out, centroids, over_mass, dot, final, active, into, mass)
                for passes, into in zip((ragged, alone), grads)]
        assert torch.equal(*sums) and sums[0].abs().sum() > 0
        for a, b in zip(*grads):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_partial_sums_beyond_the_budget_run_in_waves():
    """Two problems whose chunk partials take 40 MiB each, over the 64 MiB a pass may hold (csrc's
    kPartialBudget): the pass runs them one wave each, with the same sums."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(80, 16_384, 1, generator=gen) for _ in range(2)]  # 80 x 256 chunks x 2 KiB
    layout = many.Layout.of(weights, [256, 250])
    centroids = layout.pack([torch.randn(80, k, 1, generator=gen) for k in layout.ks])
    active = torch.ones(layout.segments, dtype=torch.bool)
    ragged = cpu.RaggedPasses(weights, layout, [0.01, 0.02], True)
    alone = many.RaggedPasses([cpu.Passes(w, k, tau, True) for w, k, tau in
                               zip(weights, layout.ks, [0.01, 0.02])], layout)
    for a, b in zip(ragged.attention_sums(weights, centroids, active),
                    alone.attention_sums(weights, centroids, active)):
        assert torch.equal(a, b)


def test_dkm_many_uses_the_ragged_ops_on_the_weights_themselves(monkeypatch):
    """On the cpu backend dkm_many never builds the per-problem passes, and its passes hold the
    caller's weights, not copies."""
    def refuse(*args, **kwargs):
        raise AssertionError("many.RaggedPasses used")

    monkeypatch.setattr(many.RaggedPasses, "__init__", refuse)
    problems = mixed_problems((torch.float32,))
    assert backends.ragged_passes_class("cpu", torch.device("cpu"), torch.float32) is cpu.RaggedPasses
    forward_backward(problems)
    weights = [p.weights if p.weights.dim() == 3 else p.weights[None] for p in problems]
    passes = many._passes("cpu", weights, [p.centroids.shape[-2] for p in problems],
                          [p.tau for p in problems], True)
    assert isinstance(passes, cpu.RaggedPasses)
    assert [w.data_ptr() for w in passes.weights] == [w.data_ptr() for w in weights]


def _ragged_args(groups=(2, 1), m=20, d=(3, 2), k=(4, 5)):
    weights = [torch.randn(g, m, dim) for g, dim in zip(groups, d)]
    centroids = torch.randn(sum(groups), max(k), max(d))
    return weights, centroids, list(k), [0.5] * len(groups)


@pytest.mark.parametrize("bad, words", [
    (lambda a: a.update(values=a["values"][:1]), r"values must have one entry per problem \(2\)"),
    (lambda a: a.update(values=[a["values"][0], a["values"][1][:, :5]]), r"values\[1\] has shape"),
    (lambda a: a.update(centroids=a["centroids"][:2]), r"centroids must have shape \(S, k_max, d_max\) with S = 3"),
    (lambda a: a.update(centroids=a["centroids"][:, :4]), "k_max >= 5"),
    (lambda a: a.update(centroids=a["centroids"][..., :2]), "d_max >= 3"),
    (lambda a: a.update(centroids=a["centroids"].double()), "centroids must be Float"),
    (lambda a: a.update(active=a["active"][:2]), r"active must have shape \(S,\) = \(3,\)"),
    (lambda a: a.update(weights=[a["weights"][0], a["weights"][1].double()]),
     r"weights\[1\] is Double but weights\[0\] is Float"),
    (lambda a: a.update(weights=[a["weights"][0].int(), a["weights"][1]]), r"weights\[0\] must be float16"),
    (lambda a: a.update(weights=[a["weights"][0], a["weights"][1][0]]), r"weights\[1\] must have shape"),
    (lambda a: a.update(ks=[4, 0]), r"ks\[1\] must be >= 1"),
    (lambda a: a.update(ks=[4]), "one length"),
    (lambda a: a.update(taus=[0.5, float("nan")]), r"taus\[1\] must be finite and > 0"),
])
def test_ragged_ops_check_their_inputs(bad, words):
    """The ragged ops, called directly with disagreeing inputs, raise naming the argument instead
    of reading past their buffers."""
    weights, centroids, ks, taus = _ragged_args()
    args = dict(weights=weights, values=weights, centroids=centroids, active=torch.ones(3, dtype=torch.bool),
                ks=ks, taus=taus)
    ops.cpu_ragged_attention_sums(*args.values())
    bad(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
        ops.cpu_ragged_attention_sums(*args.values())


def test_ragged_gradient_and_output_check_their_inputs():
    weights, centroids, ks, taus = _ragged_args()
    active = torch.ones(3, dtype=torch.bool)
    grads = [torch.zeros(w.shape) for w in weights]
    good = [weights, [], centroids, centroids, torch.zeros(3, 5), centroids, active, grads, ks, taus,
            torch.zeros(3, 5)]
    ops.cpu_ragged_gradient_pass(*good)
    for index, bad, words in [
        (10, torch.zeros(3, 4), "mass must have shape \\(S, k_max\\)"),
        (1, weights[:1], "grad_out must have one entry per problem \\(2\\) or none"),
        (4, torch.zeros(3, 4), "grad_dot_next must have shape \\(S, k_max\\)"),
        (3, centroids[:, :, :2], "grad_over_mass"),
        (5, centroids[:1], "final_centroids"),
        (7, grads[:1], "grad_weights must have one entry per problem"),
        (7, [grads[0], torch.zeros(1, 20, 3)], r"grad_weights\[1\] must be a contiguous tensor"),
        (7, [grads[0].double(), grads[1]], r"grad_weights\[0\] must be Float"),
    ]:
        args = list(good)
        args[index] = bad
        with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
            ops.cpu_ragged_gradient_pass(*args)
    with pytest.raises(ValueError, match="final_centroids"):
        ops.cpu_ragged_output(weights, centroids, centroids[:, :3], ks, taus)
