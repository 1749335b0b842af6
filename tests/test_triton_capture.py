"""Backend `triton` under CUDA-graph capture (docs/design.md §4, §12): after a warm-up call, a
whole `dkm` or `dkm_many` forward+backward reads nothing from the device on the host and copies
nothing to it, so that torch.cuda.graph can capture it; its results are those of an eager call.

Without a GPU, capture is faked: torch.cuda.is_current_stream_capturing answers True (the op's
code takes its capture path), torch._assert_async records what it is asked to check, and every way
the op path could read the device on the host (item, tolist, bool, int, float, numpy, cpu) or
copy to it (torch.tensor, pin_memory, the backend's table builders) is counted and must not be
used. benchmarks/gpu_bench.py --resnet50 captures and replays a real graph on a GPU.
"""
import contextlib
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from dkm_kernels import DKMProblem, dkm, dkm_many  # noqa: E402
from dkm_kernels.backends import triton_kernels  # noqa: E402
from oracle import DEVICE, make_problem  # noqa: E402

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)

# Host reads of a device tensor (each a sync on a GPU) and host-to-device copies.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")
COPIES = ((torch, "tensor"), (torch, "as_tensor"), (torch, "from_numpy"),
          (torch.Tensor, "pin_memory"), (triton_kernels, "_to_device"),
          (triton_kernels.RaggedPasses, "_build"))


@contextlib.contextmanager
def fake_capture(monkeypatch, assert_async=None):
    """The op believes a CUDA graph is being captured; yields the calls it made that a capture
    forbids ({name: count}) and the tensors handed to torch._assert_async (recorded, not checked,
    unless `assert_async` is given to run instead)."""
    forbidden: dict[str, int] = {}
    asserted: list[torch.Tensor] = []

    def counting(owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            forbidden[name] = forbidden.get(name, 0) + 1
            return original(*args, **kwargs)
        return counted

    def record(tensor, *message):
        asserted.append(tensor.clone())
        if assert_async is not None:
            assert_async(tensor, *message)

    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        patch.setattr(torch, "_assert_async", record)
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counting(torch.Tensor, name))
        for owner, name in COPIES:
            patch.setattr(owner, name, counting(owner, name))
        yield forbidden, asserted


def one_problem():
    """Two groups that stop before max_iter = 6, after 4 iterations and after 1 (one repeated
    point): the backward's steps past a group's count, and under capture the steps past the
    longest count, must leave it alone."""
    weights, centroids, tau = make_problem(24, 2, 4, groups=2, seed=20)
    weights[1], centroids[1] = centroids[1, 0], centroids[1, 0]
    return DKMProblem(weights.float().to(DEVICE), centroids.float().to(DEVICE), tau, 6, 1e-2)


def many_problems():
    """Two kernel variants (d = 1 and d = 2), their own k, tau, max_iter and epsilon, and a group
    that stops at once."""
    weights, centroids, tau = make_problem(20, 1, 3, seed=21)
    first = DKMProblem(weights.float().to(DEVICE), centroids.float().to(DEVICE), tau, 3, 0.0)
    return [first, one_problem()]


def backward_launches(monkeypatch) -> list:
    """Records every launch of the backward kernel."""
    launches = []
    launch = triton_kernels._launch

    def counted(kernel, *args, **kwargs):
        if kernel is triton_kernels._backward_kernel:
            launches.append(kernel)
        return launch(kernel, *args, **kwargs)
    monkeypatch.setattr(triton_kernels, "_launch", counted)
    return launches


def run(call, problems, upstream):
    """One forward+backward of `call(problems)` into the same leaves (static inputs, as a captured
    graph has): the results and the weights' gradients, detached."""
    results = call(problems)
    leaves = [p.weights for p in problems]
    grads = torch.autograd.grad([r.weights for r in results], leaves, upstream)
    return [(r.weights.detach(), r.centroids, r.iterations, g) for r, g in zip(results, grads)]


def calls():
    single = lambda problems: [dkm(*problems[0], backend="triton",  # noqa: E731
                                   deterministic=True)]
    many = lambda problems: dkm_many(problems, backend="triton", deterministic=True)  # noqa: E731
    return [("dkm", single, [one_problem()]), ("dkm_many", many, many_problems())]


@pytest.mark.parametrize("name, call, problems", calls(), ids=["dkm", "dkm_many"])
def test_captured_call_reads_and_copies_nothing_and_equals_eager(name, call, problems,
                                                                 monkeypatch):
    problems = [p._replace(weights=p.weights.requires_grad_(True)) for p in problems]
    gen = torch.Generator().manual_seed(22)
    upstream = [torch.randn(p.weights.shape, generator=gen).to(p.weights) for p in problems]
    launches = backward_launches(monkeypatch)
    eager = run(call, problems, upstream)  # also the warm-up: builds and caches the tables
    assert eager[-1][2].tolist() == [4, 1]  # every group stops before max_iter = 6
    eager_launches, launches[:] = len(launches), []
    with fake_capture(monkeypatch) as (forbidden, asserted):
        captured = run(call, problems, upstream)
    assert forbidden == {}, f"{name} under capture read the device or copied to it: {forbidden}"
    # Eager runs the backward's 4 steps (the longest count), captured all 6, one launch each per
    # kernel variant; the 2 more find every group inactive.
    variants = len(problems)
    assert (eager_launches, len(launches)) == (4 * variants, 6 * variants)
    # The forward's NaN/Inf check and the backward's check of the counts, on the device.
    assert len(asserted) == 2 and all(bool(a) for a in asserted)
    for ours, theirs in zip(captured, eager):
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


def test_a_nan_weight_reaches_the_device_assert(monkeypatch):
    """A NaN written into captured (static) weights is caught on the device at replay: the
    forward's check hands torch._assert_async a False, which on a GPU fails the next launch and,
    on CPU tensors, raises with the message eager mode raises."""
    problem = one_problem()
    dkm(*problem, backend="triton", deterministic=True)  # warm-up
    problem.weights[0, 3, 1] = float("nan")  # in place: the captured graph's input buffer
    with fake_capture(monkeypatch) as (forbidden, asserted):
        dkm(*problem, backend="triton", deterministic=True)
    assert forbidden == {} and len(asserted) == 1 and not bool(asserted[0])
    if DEVICE == "cpu":  # on a GPU a failed device assert ends the process's CUDA context
        real = torch._assert_async
        with fake_capture(monkeypatch, assert_async=real), pytest.raises(RuntimeError,
                                                                           match="NaN or Inf"):
            dkm(*problem, backend="triton", deterministic=True)
    with pytest.raises(ValueError, match="NaN or Inf"):  # eager: the clear error as before
        dkm(*problem, backend="triton", deterministic=True)


def test_capture_without_warm_up_is_a_clear_error(monkeypatch):
    """The tables are built (and copied to the device) on the first call with given shapes and
    weights; under capture that copy cannot run, so the op says what to do instead of failing
    inside CUDA."""
    problem = one_problem()
    # The tables are keyed by the weights' address among the rest: an earlier test's weights of
    # the same shapes, freed, may have left their tables under this address. Start cold.
    triton_kernels._TABLES.clear()
    with fake_capture(monkeypatch), pytest.raises(RuntimeError, match="before capturing"):
        dkm(*problem, backend="triton", deterministic=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA graph needs a GPU")
def test_a_real_capture_replays_the_eager_results():
    """dkm_many forward+backward captured in a CUDA graph (warm-up on a side stream, as
    torch.cuda.graph asks) and replayed: the eager results, bit for bit (deterministic)."""
    _, call, problems = calls()[1]
    problems = [p._replace(weights=p.weights.requires_grad_(True)) for p in problems]
    upstream = [torch.randn_like(p.weights) for p in problems]
    eager = run(call, problems, upstream)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(call, problems, upstream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(call, problems, upstream)
    graph.replay()
    torch.cuda.synchronize()
    for ours, theirs in zip(captured, eager):
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


def test_a_backend_that_reads_the_host_is_refused_under_capture(monkeypatch):
    """The torch backend reads its stop test on the host each iteration: under capture it says
    which backend can run instead of failing inside CUDA."""
    problem = one_problem()
    with fake_capture(monkeypatch), pytest.raises(RuntimeError, match="backend='triton'"):
        dkm(*problem, backend="torch")
