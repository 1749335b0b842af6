"""Row-sharded DKM on torch.distributed (docs/design.md §11): gloo over loopback, CPU processes.

The op: each rank passes its rows of one problem with the process group; the rows' outputs and
gradients, joined in rank order, must equal one process computing the whole problem (float64 to
1e-9 as for the backends, float32 by the float32 rule of oracle.py), the centroids and iteration
counts must be identical on every rank, and repeated runs bit-identical. The problems run on
4 ranks with uneven shards, most with an empty rank, and one on 2 ranks.

The model: under DDP and FSDP2 (fully_shard after or before compress_model) a model trains, snaps
and exports, on every rank, what one process exports after the same steps from the same initial
centroids; a weight already sharded initialises from a sample of its shards' rows, alike on every
rank.

The processes start once per module (starting one imports torch in every process).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import dkm_kernels
from oracle import (FLOAT32_GRADIENT_RTOL, FLOAT32_VALUE_RTOL, make_problem, relative_error,
                    run, skip_reason, staggered_groups, upstream_gradient)
from ranks import Ranks, pair

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch is built without torch.distributed")


@pytest.fixture(scope="module")
def ranks4():
    """Four ranks; two-rank runs use ranks.pair(), while ranks 2 and 3 wait."""
    pool = Ranks(4)
    yield pool
    pool.close()


# -- the op -------------------------------------------------------------------------------------

def _shard(tensor, sizes, rank):
    """Rank `rank`'s rows of a (G, M, d) tensor split along M into `sizes`."""
    return tensor.split(sizes, dim=1)[rank]


def _sharded_runs(rank, world_size, problem, sizes, backend, options, repeats=2,
                  group=None):
    """Forward and backward of this rank's rows with `group` (the world), `repeats` times."""
    weights, centroids, tau, upstream = problem
    group = group or torch.distributed.group.WORLD
    return [run(backend, _shard(weights, sizes, rank), centroids, tau,
                upstream=_shard(upstream, sizes, rank), process_group=group, deterministic=True,
                **options)
            for _ in range(repeats)]


def _grouped(weights, centroids, tau):
    if weights.dim() == 2:
        weights, centroids = weights.unsqueeze(0), centroids.unsqueeze(0)
    return weights, centroids, tau, upstream_gradient(weights.shape)


# (backend, dtype, problem, row counts per rank of 4, options)
CASES = {
    "torch-even": ("torch", torch.float64, lambda: make_problem(60, 2, 6, seed=1),
                   [15, 15, 15, 15], dict(max_iter=5, epsilon=1e-4)),
    # groups stopping at different iterations, an empty rank, uneven shards
    "torch-groups-empty-rank": ("torch", torch.float64, lambda: staggered_groups(50, 3),
                                [0, 13, 25, 12], dict(max_iter=6, epsilon=1e-3)),
    "cpu-groups-empty-rank": ("cpu", torch.float64,
                              lambda: make_problem(45, 3, 5, groups=2, seed=2),
                              [30, 0, 10, 5], dict(max_iter=5, epsilon=1e-4)),
    "cpu-float32": ("cpu", torch.float32, lambda: make_problem(64, 4, 8, seed=3),
                    [10, 40, 3, 11], dict(max_iter=5, epsilon=0.0)),
    "torch-float32-groups": ("torch", torch.float32,
                             lambda: make_problem(40, 2, 5, groups=2, seed=4),
                             [1, 25, 10, 4], dict(max_iter=4, epsilon=0.0)),
    "triton-float32-empty-rank": ("triton", torch.float32,
                                  lambda: make_problem(24, 2, 4, groups=2, seed=5),
                                  [8, 0, 10, 6], dict(max_iter=3, epsilon=0.0)),
}


def _problem(case):
    backend, dtype, make, sizes, options = CASES[case]
    weights, centroids, tau = make()
    weights, centroids, tau, upstream = _grouped(weights, centroids, tau)
    return (backend, (weights.to(dtype), centroids.to(dkm_kernels.recurrence.compute_dtype(dtype)),
                      tau, upstream), sizes, options)


def _run_cases(rank, world_size, problems):
    return {case: _sharded_runs(rank, world_size, problem, sizes, backend, options)
            for case, (backend, problem, sizes, options) in problems.items()}


@pytest.fixture(scope="module")
def sharded4(ranks4):
    """Every case on 4 ranks, each run twice: {case: [rank -> [run -> (W~, C, L, grad)]]}."""
    problems = {case: _problem(case) for case in CASES if skip_reason(CASES[case][0]) is None}
    per_rank = ranks4.run(_run_cases, problems)
    return problems, {case: [runs[case] for runs in per_rank] for case in problems}


def _check_against_one_process(backend, problem, options, rank_runs):
    weights, centroids, tau, upstream = problem
    ranks = [runs[0] for runs in rank_runs]
    out = torch.cat([r[0] for r in ranks], dim=1)
    grad = torch.cat([r[3] for r in ranks], dim=1)
    for r in ranks[1:]:  # every rank holds the same global state, to the bit
        assert torch.equal(r[1], ranks[0][1]) and torch.equal(r[2], ranks[0][2])
    for runs in rank_runs:  # deterministic: the second run repeats the first bit for bit
        for first, again in zip(*runs):
            assert torch.equal(first, again)
    whole = run(backend, weights, centroids, tau, upstream=upstream, deterministic=True, **options)
    assert torch.equal(ranks[0][2], whole[2]), f"iterations {ranks[0][2]} != {whole[2]}"
    ours = (out, ranks[0][1], grad)
    if weights.dtype == torch.float64:
        for name, a, b in zip(("values", "centroids", "gradients"), ours, whole[:2] + whole[3:]):
            assert relative_error(a, b) <= 1e-9, name
        return
    # float32: against float64 on the same inputs, within the float32 rule (oracle.py)
    exact = run("reference", weights.double(), centroids.double(), tau, upstream=upstream,
                **options)
    naive = run("reference", weights, centroids, tau, upstream=upstream, **options)
    for name, index, mine, rtol in (("values", 0, out, FLOAT32_VALUE_RTOL),
                                    ("centroids", 1, ranks[0][1], FLOAT32_VALUE_RTOL),
                                    ("gradients", 3, grad, FLOAT32_GRADIENT_RTOL)):
        bound = max(rtol, 2 * relative_error(naive[index], exact[index]))
        assert relative_error(mine, exact[index]) <= bound, name


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_op_equals_one_process(case, sharded4):
    problems, results = sharded4
    if case not in problems:
        pytest.skip(str(skip_reason(CASES[case][0])))
    backend, problem, _, options = problems[case]
    _check_against_one_process(backend, problem, options, results[case])


def _on_pair(rank, world_size, backend, problem, sizes, options):
    group, member = pair()
    if member:
        return _sharded_runs(rank, 2, problem, sizes, backend, options, group=group)


def test_sharded_op_on_two_ranks(ranks4):
    backend, problem, _, options = _problem("cpu-groups-empty-rank")
    if skip_reason(backend) is not None:
        pytest.skip(skip_reason(backend))
    per_rank = ranks4.run(_on_pair, backend, problem, [28, 17], options)
    _check_against_one_process(backend, problem, options, per_rank[:2])


def _nan_on_rank_1(rank, world_size):
    weights, centroids, tau = make_problem(30, 2, 4, seed=6, dtype=torch.float32)
    if rank == 1:
        weights[3, 1] = float("nan")
    try:
        dkm_kernels.dkm(weights, centroids, tau, backend="cpu",
                        process_group=torch.distributed.group.WORLD)
    except ValueError as error:
        return str(error)
    return None


def test_nan_on_one_rank_raises_on_every_rank(ranks4):
    if skip_reason("cpu") is not None:
        pytest.skip(skip_reason("cpu"))
    messages = ranks4.run(_nan_on_rank_1)
    assert all(message is not None and "NaN or Inf" in message for message in messages)


def _fake_with_group(rank, world_size):
    """The op's fake implementations with a group give the real outputs' shapes and dtypes, each
    rank holding uneven rows (ranks 2 and 3: none). (A full opcheck imports for seconds per process;
    test_backends.py runs it without a group.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    weights, centroids, tau = make_problem(9, 3, k=4, groups=2, seed=8, dtype=torch.float32)
    mine = weights.split([6, 3, 0, 0], dim=1)[rank].contiguous()
    name = torch.distributed.group.WORLD.group_name
    forward = (mine, centroids, tau, 3, 1e-4, True, "torch", name)
    real = torch.ops.dkm_kernels.dkm_forward(*forward)
    backward = (torch.ones_like(mine), mine, *real[1:], tau, True, "torch", name)
    real = (*real, torch.ops.dkm_kernels.dkm_backward(*backward))
    with FakeTensorMode() as mode:
        def fake(args):
            return [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        faked = (*torch.ops.dkm_kernels.dkm_forward(*fake(forward)),
                 torch.ops.dkm_kernels.dkm_backward(*fake(backward)))
    return [(tuple(a.shape), a.dtype, tuple(b.shape), b.dtype) for a, b in zip(real, faked)]


def test_fake_implementations_with_process_group(ranks4):
    for outputs in ranks4.run(_fake_with_group):
        for real_shape, real_dtype, fake_shape, fake_dtype in outputs:
            assert (real_shape, real_dtype) == (fake_shape, fake_dtype)


def test_process_group_argument_errors():
    weights, centroids, tau = make_problem(10, 2, 3)
    with pytest.raises(TypeError, match="process_group must be"):
        dkm_kernels.dkm(weights, centroids, tau, process_group="0")
    with pytest.raises(ValueError, match="at least one row"):
        dkm_kernels.dkm(weights[:0], centroids, tau)
    with pytest.raises(ValueError, match="needs torch.distributed initialised|names no process"):
        torch.ops.dkm_kernels.dkm_forward(weights[None], centroids[None], tau, 3, 0.0, True,
                                          "torch", "7")


# -- the model level -------------------------------------------------------------------------------

def _model():
    torch.manual_seed(0)  # every rank builds the same model
    return torch.nn.Sequential(torch.nn.Linear(6, 13), torch.nn.ReLU(),
                               torch.nn.Linear(13, 4)).double()


def _tied_model():
    """Layers 0 and 2 share their weight (one DKMLayer, which FSDP2 sees on two modules)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6),
                                torch.nn.ReLU(), torch.nn.Linear(6, 4)).double()
    model[2].weight = model[0].weight
    return model


MODELS = {"plain": _model, "tied": _tied_model}


def _data():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(8, 6, generator=gen, dtype=torch.float64),
            torch.randn(8, 4, generator=gen, dtype=torch.float64))


def _compress(model, group, shard_rows=True):
    return dkm_kernels.compress_model(
        model, bits=2, dim=1, tau="auto", skip_first_last=False, small_layer_threshold=0,
        layer_configs={"0": {"dim": 2}}, lut_dtype=torch.float32, backend="torch",
        process_group=group, shard_rows=shard_rows)


def _train(wrap, rank, world_size, group, steps=3, shard_rows=True, wrap_first=False,
           model="plain"):
    """compress_model and `wrap` (DDP, fully_shard or nothing; `wrap_first`: in that order), then
    `steps` SGD steps on this rank's share of the batch, snap, export. The k-means++ draws differ
    per rank (the broadcast makes the centroids agree). Returns the initial centroids and taus and
    the export."""
    model = MODELS[model]()
    torch.manual_seed(100 + rank)
    forward = wrap(model) if wrap_first else None
    compressor = _compress(model, group, shard_rows)
    forward = forward or wrap(model)
    initial = {name: (layer.centroids.clone(), layer.tau)
               for name, layer in compressor.dkm_layers.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, targets = _data()
    share = inputs.shape[0] // world_size
    rows = slice(rank * share, (rank + 1) * share)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(forward(inputs[rows]), targets[rows]).backward()
        optimizer.step()
    compressor.snap_weights()
    return initial, compressor.export_compressed()


def _ddp(rank, world_size, shard_rows=True):
    group, member = pair()
    if member:
        from torch.nn.parallel import DistributedDataParallel
        return _train(lambda model: DistributedDataParallel(model, process_group=group),
                      rank, 2, group, shard_rows=shard_rows)


def _ddp_whole_weights(rank, world_size):
    """Every rank clusters the whole weight (no communication of its own)."""
    return _ddp(rank, world_size, shard_rows=False)


def _fully_shard(group):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    mesh = DeviceMesh.from_group(group, "cpu")

    def shard(model):
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return shard


def _fsdp2(rank, world_size):
    group, member = pair()
    if member:
        return _train(_fully_shard(group), rank, 2, group)


@contextlib.contextmanager
def _sample_size(rows):
    """distributed.INIT_SAMPLE_ROWS set to `rows` in this rank's process, for the duration."""
    kept, dkm_kernels.distributed.INIT_SAMPLE_ROWS = dkm_kernels.distributed.INIT_SAMPLE_ROWS, rows
    try:
        yield
    finally:
        dkm_kernels.distributed.INIT_SAMPLE_ROWS = kept


def _fsdp2_first(rank, world_size):
    """fully_shard, then compress_model (its group found from the mesh), the centroids from a
    sample of 20 of each weight's rows (39 and 52 rows)."""
    group, member = pair()
    if member:
        with _sample_size(20):
            return _train(_fully_shard(group), rank, 2, None, wrap_first=True)


def _one_process(initial, model="plain"):
    """The same steps on the whole batch in one process, from the ranks' initial centroids and
    taus (loaded as a checkpoint: tau_value holds tau rounded to float32, a relative change of
    at most 2^-24, far inside the comparison's tolerance)."""
    model = MODELS[model]()
    compressor = _compress(model, None)
    for name, layer in compressor.dkm_layers.items():
        centroids, tau = initial[name]
        layer.load_state_dict({"centroids": centroids, "pending_centroids": centroids,
                               "tau_value": torch.tensor(tau), "initialized": torch.tensor(True)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, targets = _data()
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return compressor.export_compressed()


def _is_row_of(centroids, weight, dim):
    """Whether every centroid is one of the weight's rows (as k-means++ draws them)."""
    rows = weight.reshape(-1, dim).float()
    return all(bool((rows == centroid).all(dim=1).any()) for centroid in centroids)


def _fsdp2_first_tied(rank, world_size):
    """fully_shard (the root only: FSDP2 keeps a shared parameter in one group), then
    compress_model, on the tied model."""
    group, member = pair()
    if member:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard
        mesh = DeviceMesh.from_group(group, "cpu")
        return _train(lambda model: fully_shard(model, mesh=mesh), rank, 2, None,
                      wrap_first=True, model="tied")


@pytest.mark.parametrize("wrapper,model", [(_ddp, "plain"), (_ddp_whole_weights, "plain"),
                                           (_fsdp2, "plain"), (_fsdp2_first, "plain"),
                                           (_fsdp2_first_tied, "tied")],
                         ids=["ddp", "ddp-whole-weights", "fsdp2", "fsdp2-before-compress",
                              "fsdp2-before-compress-tied"])
def test_trained_model_exports_as_one_process(wrapper, model, ranks4):
    (initial0, export0), (initial1, export1) = ranks4.run(wrapper)[:2]
    for name, (centroids, tau) in initial0.items():  # broadcast from the first rank
        assert torch.equal(centroids, initial1[name][0]) and tau == initial1[name][1]
        weight = dict(MODELS[model]().named_modules())[name].weight.detach()
        assert _is_row_of(centroids, weight, 2 if name == "0" else 1), name
    for table in ("codebooks", "assignments"):  # every rank exports the same whole model
        for name, tensor in export0[table].items():
            assert torch.equal(tensor, export1[table][name])
    expected = dkm_kernels.load_compressed(_one_process(initial0, model),
                                           MODELS[model]).state_dict()
    loaded = dkm_kernels.load_compressed(export0, MODELS[model]).state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-9, msg=key)


# -- initialisation from a sample of FSDP2's shards ----------------------------------------------

def _weight(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(9))


def _dtensor(whole):
    """`whole` split along dim 0 across every rank, as fully_shard splits a parameter."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = DeviceMesh.from_group(torch.distributed.group.WORLD, "cpu")
    return distribute_tensor(whole, mesh, [Shard(0)])


# (shape, palettes, dim, vector_axis): on 4 ranks the shares hold 2, 2, 2, 0 and 3, 3, 3, 3
# output channels, and vectors straddle them (a flat one across channels, an "output" one across
# ranks' channels)
SAMPLED = [((6, 5), 1, 3, "flat"), ((12, 3), 2, 2, "output")]


def _sample_of_shards(rank, world_size):
    from dkm_kernels.distributed import sample_rows, shard_of
    from dkm_kernels.layer import row_elements
    samples = []
    for shape, palettes, dim, axis in SAMPLED:
        local, position, group = shard_of(_dtensor(_weight(shape)))
        rows = torch.randint(_weight(shape).numel() // (palettes * dim), (palettes, 7),
                             generator=torch.Generator().manual_seed(rank))
        rows = dkm_kernels.distributed.broadcast_(rows, group)
        samples.append((rows, sample_rows(local, position,
                                          row_elements(shape, palettes, dim, axis, rows), group)))
    return samples


def test_sample_rows_of_shards_equals_the_rows(ranks4):
    for samples in ranks4.run(_sample_of_shards):
        for (shape, palettes, dim, axis), (rows, sample) in zip(SAMPLED, samples):
            whole = dkm_kernels.layer.weight_rows(_weight(shape), palettes, dim, axis)
            expected = torch.gather(whole, 1, rows.unsqueeze(-1).expand(-1, -1, dim))
            assert torch.equal(sample, expected), (shape, axis)


LAYER_OPTIONS = dict(n_clusters=4, dim=2, group_size=6, vector_axis="output",
                     enable_per_channel_scale=True, tau="auto", backend="torch")


def _layer_on_shards(rank, world_size):
    """A DKMLayer built on a DTensor, each rank with its own seed, from samples of 5 of each
    palette's 9 rows."""
    with _sample_size(5):
        layer = dkm_kernels.DKMLayer(_dtensor(_weight((12, 3))), seed=rank, keep_weight=False,
                                     **LAYER_OPTIONS)
    return layer.centroids, layer.tau


def test_layer_initialised_on_shards_alike_on_every_rank(ranks4):
    results = ranks4.run(_layer_on_shards)
    plain = dkm_kernels.DKMLayer(_weight((12, 3)), lazy_init=True, **LAYER_OPTIONS)
    rows = plain.rows(plain.normalized(_weight((12, 3)))[0])
    centroids, tau = results[0]
    for other in results[1:]:
        assert torch.equal(other[0], centroids) and other[1] == tau
    for palette, palette_rows in zip(centroids, rows):  # k-means++ draws rows of the palette
        assert all(bool((palette_rows == centroid).all(dim=1).any()) for centroid in palette)
    assert tau > 0
