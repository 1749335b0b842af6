"""Many problems in one call (docs/design.md §12): `dkm_many` against one `dkm` call per problem.

The packed recurrence must not change any problem's result: forward bit-identical, backward
bit-identical where the problems share d (else within float32 rounding of one dot product), for
every backend, dtype, shape, option and stop iteration. `dkm` itself is checked against the
float64 reference elsewhere (test_backends.py); here the float64 problems are also compared with
the reference directly.
"""
import pytest
import torch
from torch import nn

import dkm_kernels
from dkm_kernels import DKMProblem, compress, dkm, dkm_many
from dkm_kernels import layer as layer_module
from oracle import (FUSED_BACKENDS, assert_float32_close, assert_low_precision_close, device_of,
                    make_problem, pick_tau, skip_reason, upstream_gradient)


def problems(dtype, dims=(1, 4, 8), seed=0):
    """Three problems with their own M, d, k, groups, tau, max_iter and epsilon: ungrouped, two
    groups and three groups, one of which is already clustered and stops at its first iteration."""
    shapes = [(None, 120, 4, 5, 1e-4), (2, 90, 16, 3, 0.0), (3, 60, 7, 7, 1e-3)]
    found = []
    for index, ((groups, m, k, max_iter, epsilon), d) in enumerate(zip(shapes, dims)):
        weights, centroids, tau = make_problem(m, d, k, groups=groups, seed=seed + index)
        if groups == 3:
            # every weight and centroid the same point: the centroids stay put, so it stops at once
            weights[1], centroids[1] = centroids[1, 0], centroids[1, 0]
        weights = weights.to(dtype)
        centroids = centroids.to(torch.float64 if dtype == torch.float64 else torch.float32)
        if groups == 3:
            centroids[1] = weights[1, 0]  # as rounded to the weights' dtype
        found.append(DKMProblem(weights, centroids, tau, max_iter, epsilon))
    return found


def forward_backward(call, weights: list, seed=3, upstream=None):
    """Runs `call(leaves)` (a list of DKMResult), backward with fixed random upstream gradients
    (or the loss sum(W~ upstream(result)) in float64); returns the results and the weights'
    gradients."""
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    results = call(leaves)
    if upstream is None:
        gen = torch.Generator().manual_seed(seed)
        upstream = [torch.randn(r.weights.shape, generator=gen).to(r.weights) for r in results]
        torch.autograd.backward([r.weights for r in results], upstream)
    else:
        sum((r.weights.double() * upstream(r).to(r.weights.device)).sum()
            for r in results).backward()
    return results, [leaf.grad for leaf in leaves]


def one_by_one(problems, backend):
    return forward_backward(
        lambda leaves: [dkm(w, *p[1:], backend=backend, uniquify=False)
                        for w, p in zip(leaves, problems)],
        [p.weights for p in problems])


def together(problems, backend):
    return forward_backward(
        lambda leaves: dkm_many([p._replace(weights=w) for w, p in zip(leaves, problems)],
                                backend=backend),
        [p.weights for p in problems])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_each_problem_as_if_alone(backend, dtype):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("triton: float32 here (its interpreter is slow; its dtypes are covered by "
                    "test_triton_backend.py, and this test is about the packing)")
    if (reason := skip_reason(backend, dtype)) is not None:
        pytest.skip(reason)
    found = [p._replace(weights=p.weights.to(device_of(backend)),
                        centroids=p.centroids.to(device_of(backend)))
             for p in problems(dtype, dims=(4, 4, 4))]
    (alone, grads_alone), (many, grads_many) = one_by_one(found, backend), together(found, backend)
    assert many[2].iterations[1] == 1 < many[2].iterations[0]  # stops on its own
    for index, (a, b, ga, gb) in enumerate(zip(alone, many, grads_alone, grads_many)):
        for name, x, y in (("values", a.weights, b.weights), ("centroids", a.centroids,
                           b.centroids), ("iterations", a.iterations, b.iterations),
                           ("gradients", ga, gb)):
            assert x.shape == y.shape and x.dtype == y.dtype, (index, name)
            assert torch.equal(x, y), f"problem {index}: {name} differ"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_different_dimensions(backend):
    """With d = 1, 4 and 8 in one call, the forward is still bit-identical; the backward agrees to
    float32 rounding (its sum over d runs over d_max terms)."""
    found = problems(torch.float32)
    (alone, grads_alone), (many, grads_many) = one_by_one(found, backend), together(found, backend)
    for a, b, ga, gb in zip(alone, many, grads_alone, grads_many):
        assert torch.equal(a.weights, b.weights) and torch.equal(a.centroids, b.centroids)
        assert torch.equal(a.iterations, b.iterations)
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6 * ga.abs().max().item())


def ragged_problems(dtype):
    """Problems of three kernel variants (d = 1, 2, 4; one centroid block, several blocks with
    k = 260 > MAX_SINGLE_BLOCK_K and M < k), two of them in the same variant with their own k
    and tau, and a group that stops at its first iteration (epsilon = 0 stops only a group whose
    centroids do not move at all, so that no stop hangs on a rounding)."""
    found = [DKMProblem(*make_problem(40, 1, 5, seed=10), 3, 0.0),
             DKMProblem(*make_problem(30, 1, 3, seed=11), 2, 0.0)]
    gen = torch.Generator().manual_seed(12)
    weights = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    centroids = weights[torch.randint(64, (260,), generator=gen)] + 0.1 * torch.randn(
        260, 2, generator=gen, dtype=torch.float64)
    found.append(DKMProblem(weights, centroids, pick_tau(weights, centroids), 2, 0.0))
    weights, centroids, tau = make_problem(48, 4, 16, groups=2, seed=13)
    # one point of few mantissa bits: its float32 means are exact, so the group stops at once
    weights[1] = centroids[1] = torch.round(centroids[1, 0] * 8) / 8
    found.append(DKMProblem(weights, centroids, tau, 3, 0.0))
    rounded = []
    for p in found:
        rounded.append(p._replace(weights=p.weights.to(dtype).to(device_of("triton")),
                                  centroids=p.centroids.float().to(device_of("triton"))))
    return rounded


def launch_counter(monkeypatch):
    """Counts the triton backend's launches by kernel."""
    from dkm_kernels.backends import triton_kernels
    counts = {}
    launch = triton_kernels._launch

    def counted(kernel, *args, **kwargs):
        counts[kernel.__name__] = counts.get(kernel.__name__, 0) + 1
        return launch(kernel, *args, **kwargs)
    monkeypatch.setattr(triton_kernels, "_launch", counted)
    return counts


@pytest.mark.parametrize("dtype, deterministic, small_tiles", [
    (torch.float32, True, True), (torch.float32, False, False), (torch.float16, True, False)],
    ids=["float32-deterministic-small-tiles", "float32-atomic", "float16-deterministic"])
def test_triton_ragged_passes_against_the_reference(dtype, deterministic, small_tiles,
                                                    monkeypatch):
    """dkm_many on the triton backend: every problem's values, centroids, iterations and gradients
    against the float64 reference by the rule of oracle.py; one launch per kernel variant and
    pass (three variants, four problems). `small_tiles`: tiles of 16 rows and two items per
    launch, so that the segments of a variant split their rows into different numbers of items
    (40 rows: two, 30 rows: one) and a segment's slots are reduced across items."""
    if (reason := skip_reason("triton", dtype)) is not None:
        pytest.skip(reason)
    if small_tiles:
        from dkm_kernels.backends import triton_kernels
        for name in ("SINGLE_BLOCK_TILE", "BACKWARD_SINGLE_BLOCK_TILE"):
            monkeypatch.setattr(triton_kernels, name, 256)
        monkeypatch.setattr(triton_kernels, "INTERPRETER_PROGRAMS", 2)
    found = ragged_problems(dtype)
    counts = launch_counter(monkeypatch)
    results, grads = forward_backward(
        lambda leaves: dkm_many([p._replace(weights=w) for w, p in zip(leaves, found)],
                                backend="triton", deterministic=deterministic),
        [p.weights for p in found], upstream=lambda r: upstream_gradient(r.weights.shape))
    steps, variants = max(p.max_iter for p in found), 3
    assert counts == {"_attention_sums_kernel": (steps + 1) * variants,  # + the backward's G_L
                      "_output_kernel": variants, "_backward_kernel": steps * variants,
                      "_store_addresses_kernel": 3,  # of W~, G~ and dW, four problems each
                      **({"_reduce_slots_kernel": 2 * steps + 1} if deterministic else {})}
    assert results[3].iterations.tolist() == [3, 1]  # the second group stops on its own
    for p, result, grad in zip(found, results, grads):
        ours = (result.weights.detach(), result.centroids, result.iterations, grad)
        if dtype == torch.float32:
            assert_float32_close("triton", p.weights, p.centroids, p.tau, p.max_iter, p.epsilon,
                                 ours=ours)
        else:
            assert_low_precision_close("triton", p.weights, p.centroids, p.tau, p.max_iter,
                                       p.epsilon, ours=ours)


def test_float64_against_the_reference():
    found = problems(torch.float64)
    (exact, grads_exact), (many, grads_many) = (
        forward_backward(lambda leaves: [dkm(w, *p[1:], backend="reference")
                                         for w, p in zip(leaves, found)],
                         [p.weights for p in found]),
        together(found, "cpu"))
    for a, b, ga, gb in zip(exact, many, grads_exact, grads_many):
        assert torch.equal(a.iterations, b.iterations)
        torch.testing.assert_close(b.weights, a.weights, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.centroids, a.centroids, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12 * ga.abs().max().item())


def test_mixed_dtypes_and_the_reference_backend():
    """float32 and float64 problems in one list run as two calls; backend='reference' too."""
    found = problems(torch.float32)
    found[1] = problems(torch.float64)[1]
    for backend in ("cpu", "reference"):
        (alone, grads_alone), (many, grads_many) = (one_by_one(found, backend),
                                                    together(found, backend))
        for a, b, ga, gb in zip(alone, many, grads_alone, grads_many):
            assert b.weights.dtype == a.weights.dtype
            assert torch.equal(a.weights, b.weights) and torch.equal(ga, gb)


def test_an_unused_problem_gets_no_gradient():
    found = problems(torch.float32, dims=(2, 2, 2))
    leaves = [p.weights.clone().requires_grad_(True) for p in found]
    results = dkm_many([p._replace(weights=w) for w, p in zip(leaves, found)], backend="cpu")
    results[1].weights.sum().backward()
    assert leaves[0].grad is None and leaves[2].grad is None
    alone = leaves[1].detach().clone().requires_grad_(True)
    dkm(alone, *found[1][1:], backend="cpu").weights.sum().backward()
    assert torch.equal(alone.grad, leaves[1].grad)


def test_bad_arguments_name_the_problem():
    good = problems(torch.float32)
    with pytest.raises(ValueError, match="at least one"):
        dkm_many([])
    with pytest.raises(ValueError, match=r"problems\[1\]: tau must be finite and > 0"):
        dkm_many([good[0], good[1]._replace(tau=-1.0)])
    with pytest.raises(TypeError, match=r"problems\[0\]: a problem is a DKMProblem"):
        dkm_many([object()])
    with pytest.raises(ValueError, match=r"problems\[2\]: centroids have dimension"):
        dkm_many([good[0], good[1], good[2]._replace(centroids=good[1].centroids[:3])])
    ops = torch.ops.dkm_kernels
    w = [p.weights if p.weights.dim() == 3 else p.weights[None] for p in good]
    c = [p.centroids if p.centroids.dim() == 3 else p.centroids[None] for p in good]
    with pytest.raises(ValueError, match="one length"):
        ops.dkm_many_forward(w, c, [1.0], [3, 3, 3], [0.0] * 3, True, "cpu")
    with pytest.raises(ValueError, match=r"problem 1: max_iter"):
        ops.dkm_many_forward(w, c, [1.0] * 3, [3, 0, 3], [0.0] * 3, True, "cpu")
    with pytest.raises(ValueError, match="one device and compute dtype"):
        ops.dkm_many_forward([w[0], w[1].double()], [c[0], c[1].double()], [1.0] * 2, [3, 3],
                             [0.0] * 2, True, "cpu")


def test_opcheck():
    found = problems(torch.float32, dims=(2, 3, 2))
    w = [(p.weights if p.weights.dim() == 3 else p.weights[None]).requires_grad_(True)
         for p in found]
    c = [p.centroids if p.centroids.dim() == 3 else p.centroids[None] for p in found]
    args = (w, c, [p.tau for p in found], [2, 3, 2], [1e-4] * 3, True, "torch")
    torch.library.opcheck(torch.ops.dkm_kernels.dkm_many_forward.default, args)
    _, histories, masses, iterations = torch.ops.dkm_kernels.dkm_many_forward(*args)
    grads = [torch.randn(x.shape) for x in w]
    torch.library.opcheck(torch.ops.dkm_kernels.dkm_many_backward.default,
                          (grads, [x.detach() for x in w], histories, masses, iterations,
                           [p.tau for p in found], True, "torch"))


def test_exported_at_the_top_level():
    assert dkm_kernels.dkm_many is dkm_many and dkm_kernels.DKMProblem is DKMProblem
    weights, centroids, tau = make_problem(50, 2, 3, dtype=torch.float32)
    result, = dkm_many([(weights, centroids, tau)], backend="torch")
    assert torch.equal(result.weights, dkm(weights, centroids, tau, backend="torch").weights)


# -- the compressor's step: its layers clustered together ------------------------------------------

class TwoPaths(nn.Module):
    """Convolutions, linear layers, and one layer that a forward may skip."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        self.spare = nn.Linear(32, 10)

    def forward(self, x, use_spare=False):
        return (self.spare if use_spare else self.head)(self.body(x))


def train(batch_layers, monkeypatch=None, steps=3, use_spare=(False, True, False), **options):
    """A few SGD steps of a compressed TwoPaths; returns the model, and the number of dkm_many
    calls with their problem counts and of single dkm calls (when monkeypatch is given)."""
    torch.manual_seed(0)
    model = TwoPaths()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(10, (4,))
    calls = {"many": [], "single": 0}
    if monkeypatch is not None:
        many, single = compress.dkm_many, layer_module.dkm

        def counted_many(problems, **kwargs):
            calls["many"].append(len(problems))
            return many(problems, **kwargs)

        def counted_single(*args, **kwargs):
            calls["single"] += 1
            return single(*args, **kwargs)
        monkeypatch.setattr(compress, "dkm_many", counted_many)
        monkeypatch.setattr(layer_module, "dkm", counted_single)
    dkm_kernels.compress_model(model, bits=3, dim=2, skip_first_last=False, seed=1,
                               backend="cpu", batch_layers=batch_layers, conv_config="4/1",
                               **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for spare in use_spare[:steps]:
        loss = nn.functional.cross_entropy(model(x, use_spare=spare), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, calls


def test_compressor_step_is_one_call_with_the_same_results(monkeypatch):
    plain, _ = train(False)
    together_model, calls = train(True, monkeypatch)
    assert calls == {"many": [5, 5, 5], "single": 0}  # every layer, one call per step
    expected, found = plain.state_dict(), together_model.state_dict()
    assert expected.keys() == found.keys()
    for key in expected:
        assert torch.equal(expected[key], found[key]), key


def test_a_layer_not_read_is_not_stepped(monkeypatch):
    """A layer the step's forward does not read keeps its centroids and gets no gradient, as
    with one call per layer: its batched result is served only when read."""
    model, _ = train(True, steps=1, use_spare=(False,))
    spare = model.spare.parametrizations.weight[0]
    before = spare.centroids.clone()
    assert model.spare.parametrizations.weight.original.grad is None
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    spare.advance()
    assert torch.equal(spare.centroids, before)


def test_batches_are_bounded(monkeypatch):
    monkeypatch.setattr(compress, "BATCH_MAX_ELEMENTS", 700)
    plain, _ = train(False, steps=2)
    batched, calls = train(True, monkeypatch, steps=2)
    # weights of 216, 1152, 8192, 320 and 320 elements: batches [216] [1152] [8192] [320, 320]
    assert calls["many"] == [1, 1, 1, 2] * 2 and calls["single"] == 0
    for key, value in plain.state_dict().items():
        assert torch.equal(value, batched.state_dict()[key]), key


def test_uniquified_layers_cluster_on_their_own(monkeypatch):
    torch.manual_seed(0)
    model = TwoPaths().to(torch.bfloat16)
    calls = []
    monkeypatch.setattr(compress, "dkm_many", lambda problems, **kw: calls.append(problems))
    dkm_kernels.compress_model(model, bits=2, dim=1, skip_first_last=False, seed=1)
    model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)).float().sum().backward()
    assert calls == []  # scalar 16-bit weights: the uniquified op, per layer
