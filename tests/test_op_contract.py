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
