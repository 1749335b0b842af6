"""The op contract (docs/design.md §5): shapes, errors, torch.library registration, torch.compile."""
import pytest
import torch

import dkm_kernels
from dkm_kernels.reference import dkm_single
from oracle import make_problem


def test_reference_matches_the_definition():
    """One iteration by hand, distances from differences: W~ = A_0 C_1."""
    weights, centroids, tau = make_problem(50, 3, k=5, seed=1)
    scores = -((weights[:, None, :] - centroids[None]) ** 2).sum(-1) / tau
    attention = torch.softmax(scores, dim=1)
    c1 = (attention.T @ weights) / attention.sum(0)[:, None]
    out, final, steps = dkm_single(weights, centroids, tau, max_iter=1, epsilon=0.0)
    torch.testing.assert_close(final, c1)
    torch.testing.assert_close(out, attention @ c1)
    assert steps == 1


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_gradcheck(backend):
    """The float64 backends' gradients against finite differences, two groups at once."""
    reason = dkm_kernels.backends.unavailable_reason(backend, torch.device("cpu"), torch.float64)
    if reason is not None:
        pytest.skip(reason)
    weights, centroids, tau = make_problem(13, 2, k=3, groups=2, seed=4)
    weights.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda w: dkm_kernels.dkm(w, centroids, tau, 3, 0.0, backend=backend).weights, (weights,)
    )


def test_result_shapes_ungrouped_and_grouped():
    weights, centroids, tau = make_problem(40, 2, k=4)
    result = dkm_kernels.dkm(weights, centroids, tau, backend="torch")
    assert result.weights.shape == (40, 2) and result.centroids.shape == (4, 2)
    assert result.iterations.shape == ()
    weights, centroids, tau = make_problem(40, 2, k=4, groups=3)
    result = dkm_kernels.dkm(weights, centroids, tau, backend="torch")
    assert result.weights.shape == (3, 40, 2) and result.centroids.shape == (3, 4, 2)
    assert result.iterations.shape == (3,)


def test_centroids_never_receive_a_gradient():
    weights, centroids, tau = make_problem(40, 2, k=4)
    centroids.requires_grad_(True)
    weights.requires_grad_(True)
    dkm_kernels.dkm(weights, centroids, tau, backend="torch").weights.sum().backward()
    assert centroids.grad is None and weights.grad is not None


def _valid():
    weights, centroids, tau = make_problem(20, 2, k=4, dtype=torch.float32)
    return dict(weights=weights, centroids=centroids, tau=tau)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a["weights"].__setitem__((0, 0), float("nan")), ValueError, "weights"),
        (lambda a: a["weights"].__setitem__((3, 1), float("inf")), ValueError, "weights"),
        (lambda a: a.update(tau=0.0), ValueError, "tau"),
        (lambda a: a.update(tau=-1e-5), ValueError, "tau"),
        (lambda a: a.update(tau=float("nan")), ValueError, "tau"),
        (lambda a: a.update(centroids=a["centroids"][:0]), ValueError, "k >= 1"),
        (lambda a: a.update(centroids=a["centroids"][:, :1]), ValueError, "dimension"),
        (lambda a: a.update(centroids=a["centroids"].double()), TypeError, "centroids"),
        (lambda a: a.update(weights=a["weights"].int()), TypeError, "weights"),
        (lambda a: a.update(weights=a["weights"].reshape(-1)), ValueError, "vectorize"),
        (lambda a: a.update(centroids=a["centroids"].to("meta")), ValueError, "centroids"),
        (lambda a: a.update(max_iter=0), ValueError, "max_iter"),
        (lambda a: a.update(epsilon=-1.0), ValueError, "epsilon"),
    ],
)
def test_bad_input_names_the_argument(backend, change, error, words):
    args = _valid()
    change(args)
    with pytest.raises(error, match=words):
        dkm_kernels.dkm(backend=backend, **args)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        dkm_kernels.dkm(backend="cuda-magic", **_valid())


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = dkm_kernels.backends.unavailable_reason("triton", torch.device("cpu"), torch.float32)
    assert reason is not None
    with pytest.raises(ValueError, match="backend='triton'"):
        dkm_kernels.dkm(backend="triton", **_valid())


def test_vectorize_checks_dim():
    weight = torch.randn(6, 5, 3, 3)
    assert dkm_kernels.vectorize(weight, 2).shape == (135, 2)
    with pytest.raises(ValueError, match="dim=4 does not divide"):
        dkm_kernels.vectorize(weight, 4)


def test_auto_never_fails_on_cpu():
    args = _valid()
    result = dkm_kernels.dkm(backend="auto", **args)
    expected = dkm_kernels.dkm(backend="reference", **args)
    torch.testing.assert_close(result.weights, expected.weights, rtol=1e-4, atol=1e-5)




def test_torch_compile_fullgraph_traces_a_model_using_the_op():
    weights, centroids, tau = make_problem(64, 4, k=8, dtype=torch.float32, seed=3)
    weights.requires_grad_(True)

    def step(w):
        return dkm_kernels.dkm(w, centroids, tau, backend="torch").weights.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(weights)
    (grad,) = torch.autograd.grad(loss, weights)
    expected_loss = step(weights)
    (expected_grad,) = torch.autograd.grad(expected_loss, weights)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def _forward_outputs(backend="torch"):
    weights, centroids, tau = make_problem(30, 2, k=4, groups=2, seed=5, dtype=torch.float32)
    outputs = torch.ops.dkm_kernels.dkm_forward(weights, centroids, tau, 3, 0.0, True, backend)
    return weights, tau, outputs


@pytest.mark.parametrize("change, words", [
    (lambda a: a.update(masses=a["masses"][..., :3]), "disagree on k"),
    (lambda a: a.update(masses=a["masses"][:, :1]), "masses"),
    (lambda a: a.update(centroid_history=a["centroid_history"][:, :1]), "centroid_history"),
    (lambda a: a.update(iterations=a["iterations"][:1]), "iterations"),
    (lambda a: a.update(iterations=a["iterations"] * 0), r"iterations must lie in \[1, 3\]"),
    (lambda a: a.update(iterations=a["iterations"] + 5), r"iterations must lie in \[1, 3\]"),
    (lambda a: a.update(iterations=a["iterations"].int()), "int64"),
    (lambda a: a.update(grad_out=a["grad_out"][:, :5]), "grad_out"),
    (lambda a: a.update(backend="nope"), "backend must be one of"),
])
def test_backward_op_checks_its_inputs(change, words):
    """The registered backward, called directly with inputs that do not belong together, raises a
    clear error instead of reading outside its buffers."""
    weights, tau, (out, history, masses, iterations) = _forward_outputs()
    args = dict(grad_out=torch.ones_like(out), weights=weights, centroid_history=history,
                masses=masses, iterations=iterations, tau=tau, deterministic=True, backend="cpu")
    change(args)
    with pytest.raises((ValueError, TypeError), match=words):
        torch.ops.dkm_kernels.dkm_backward(*args.values())


@pytest.mark.parametrize("change, words", [
    (lambda a: a.update(centroids=a["centroids"][:1]), "do not match"),
    (lambda a: a.update(centroids=a["centroids"].double()), "compute dtype"),
    (lambda a: a.update(max_iter=10**9), "max_iter"),
    (lambda a: a.update(epsilon=float("inf")), "epsilon"),
    (lambda a: a.update(weights=a["weights"][:, :0]), "M >= 1"),
    (lambda a: a.update(backend="reference"), "plain autograd"),
])
def test_forward_op_checks_its_inputs(change, words):
    weights, centroids, tau = make_problem(30, 2, k=4, groups=2, seed=5, dtype=torch.float32)
    args = dict(weights=weights, centroids=centroids, tau=tau, max_iter=3, epsilon=0.0,
                deterministic=True, backend="torch")
    change(args)
    with pytest.raises((ValueError, TypeError), match=words):
        torch.ops.dkm_kernels.dkm_forward(*args.values())


def _stops_on_device(monkeypatch):
    """The torch backend run as the triton backend runs on a GPU: every iteration, the stop test
    kept on the device (its passes compute stopped groups and discard them)."""
    from dkm_kernels.backends import torch_chunked
    monkeypatch.setattr(torch_chunked.Passes, "stops_on_device", True, raising=False)


def test_stop_on_the_device_gives_the_same_results(monkeypatch):
    """Groups that stop at different iterations: values, history, masses, counts and gradients
    bit-identical whether the stop test is read on the host each iteration or kept on the
    device."""
    weights, centroids, tau = make_problem(80, 2, k=4, groups=3, seed=6, dtype=torch.float32)
    weights[1] = centroids[1, torch.arange(80) % 4]  # already clustered: stops early
    args = (weights, centroids, tau, 6, 1e-3, True, "torch")
    on_host = torch.ops.dkm_kernels.dkm_forward(*args)
    _stops_on_device(monkeypatch)
    on_device = torch.ops.dkm_kernels.dkm_forward(*args)
    assert on_host[3].tolist() != [6, 6, 6]  # some group stopped early
    for a, b in zip(on_host, on_device):
        assert torch.equal(a, b)
    grad_out = torch.randn(weights.shape, generator=torch.Generator().manual_seed(1))
    backward = (grad_out, weights, *on_host[1:], tau, True, "torch")
    monkeypatch.undo()
    expected = torch.ops.dkm_kernels.dkm_backward(*backward)
    _stops_on_device(monkeypatch)
    assert torch.equal(torch.ops.dkm_kernels.dkm_backward(*backward), expected)


def test_stop_on_the_device_reads_the_device_once(monkeypatch):
    """One host read per forward (the finite check, at the end), however many iterations; a NaN
    still raises."""
    weights, centroids, tau = make_problem(40, 2, k=3, groups=2, seed=2, dtype=torch.float32)
    _stops_on_device(monkeypatch)
    reads = []
    for method in ("__bool__", "tolist", "item"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _original=original, _name=method:
                            reads.append(_name) or _original(self, *a))
    torch.ops.dkm_kernels.dkm_forward(weights, centroids, tau, 5, 0.0, True, "torch")
    assert reads == ["__bool__"]
    weights[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.dkm_kernels.dkm_forward(weights, centroids, tau, 5, 0.0, True, "torch")
